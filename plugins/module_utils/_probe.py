# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""Probe the device plugin link on a node: sockets, the plugin's gRPC answers, the kubelet's view.

Three layers, so unit tests reach each without Ansible:

- observation (I/O, every gRPC call with a deadline): :func:`inspect_socket`,
  :func:`probe_plugin`, :func:`probe_pod_resources`, :func:`kubelet_view`;
- pure logic: :func:`parse_device_id`, :func:`compare_devices`, :func:`assess` turns the
  observations into findings (codes with evidence and the next action);
- :func:`probe_node` runs it all for one node root and returns a :class:`ProbeReport`.

An unhealthy node is data (findings). Only input the probe cannot use (a relative path, a
socket path that is a directory or too long for a unix socket, an unreadable checkpoint, a bad
deadline) raises :class:`InvalidOptionError` / :class:`NodeProbeError`.

Node side: runs on Python 3.9 (no ``match``, no runtime ``X | Y``).
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import errno
import math
import os
import re
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from ansible_collections.gpunode.bringup.plugins.module_utils._checkpoint import (
    CHECKPOINT_NAME,
    KubeletCheckpoint,
    read_checkpoint,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import (
    InvalidOptionError,
    NodeProbeError,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._kubelet_api import (
    deviceplugin_v1beta1 as dp,
    podresources_v1 as pr,
)

try:
    import grpc
except ImportError:  # the module reports it with missing_required_lib (see _runtime.HAS_GRPC)
    grpc = None

# sun_path holds 108 bytes including the terminating NUL.
UNIX_SOCKET_PATH_MAX = 107
MAX_DEADLINE = 300.0
KUBELET_SOCKET_NAME = "kubelet.sock"
HEALTHY = "Healthy"

# Finding codes (the plan keys its remediation on them).
PLUGIN_DIR_MISSING = "plugin_dir_missing"
KUBELET_SOCKET_MISSING = "kubelet_socket_missing"
PLUGIN_SOCKET_MISSING = "plugin_socket_missing"
PLUGIN_SOCKET_NOT_SOCKET = "plugin_socket_not_socket"
PLUGIN_NOT_ANSWERING = "plugin_not_answering"
PLUGIN_DEVICES_MISSING = "plugin_devices_missing"
PLUGIN_DEVICES_EXTRA = "plugin_devices_extra"
PLUGIN_DEVICES_UNHEALTHY = "plugin_devices_unhealthy"
NOT_REGISTERED = "not_registered"
REGISTRATION_STALE = "registration_stale"
KUBELET_DEVICES_MISMATCH = "kubelet_devices_mismatch"

ACTIONS = {
    PLUGIN_DIR_MISSING: "check kubelet_root_dir against the kubelet's --root-dir (MicroK8s: "
                        "/var/snap/microk8s/common/var/lib/kubelet) and that the kubelet runs on this node",
    KUBELET_SOCKET_MISSING: "check the kubelet on this node (systemctl status kubelet; journalctl -u kubelet)",
    PLUGIN_SOCKET_MISSING: "restart the device plugin pod on this node and read its log",
    PLUGIN_SOCKET_NOT_SOCKET: "restart the device plugin pod on this node (it replaces the path when it "
                              "starts) and read its log",
    PLUGIN_NOT_ANSWERING: "restart the device plugin pod on this node; if it hangs again, read its log "
                          "(a hung NVML call often means a GPU fell off the bus)",
    PLUGIN_DEVICES_MISSING: "compare the plugin log with nvml_info (driver, MIG and time-slicing config), "
                            "then restart the device plugin pod",
    PLUGIN_DEVICES_EXTRA: "the plugin advertises devices NVML does not list: restart the device plugin pod "
                          "so it reads NVML again",
    PLUGIN_DEVICES_UNHEALTHY: "check the GPU's XID and ECC errors (nvml_info, dmesg); the device stays "
                              "unschedulable until the plugin reports it Healthy (often after a GPU reset or reboot)",
    NOT_REGISTERED: "restart the device plugin pod so it registers with the kubelet; if it still does not, "
                    "restart the kubelet",
    REGISTRATION_STALE: "restart the device plugin pod so it registers with the restarted kubelet",
    KUBELET_DEVICES_MISMATCH: "restart the device plugin pod so the kubelet receives a fresh device list",
}

# Socket states.
SOCKET_LISTENING = "listening"  # a socket that accepts connections
SOCKET_MISSING = "missing"
SOCKET_DEAD = "dead_socket"  # a socket file nobody listens on (connection refused)
SOCKET_UNRESPONSIVE = "unresponsive"  # a socket whose connect() did not complete in time
SOCKET_REGULAR_FILE = "regular_file"
SOCKET_OTHER = "not_a_socket"  # FIFO, device node, ...


# ---------------------------------------------------------------------------------------------
# Request and paths


@dataclass(frozen=True)
class ProbeRequest:
    """The module's options."""

    node_root: str = "/"
    kubelet_root_dir: str = "/var/lib/kubelet"
    resource_name: str = "nvidia.com/gpu"
    plugin_socket_name: str = "nvidia-gpu.sock"
    expected_device_ids: Tuple[str, ...] = ()
    deadline: float = 5.0


@dataclass(frozen=True)
class NodePaths:
    """Where the probe looks, on the node as seen from ``node_root``."""

    kubelet_root: str
    device_plugins_dir: str
    kubelet_socket: str
    plugin_socket: str
    pod_resources_socket: str
    checkpoint: str

    def to_dict(self) -> Dict[str, str]:
        return {
            "kubelet_root": self.kubelet_root,
            "device_plugins_dir": self.device_plugins_dir,
            "kubelet_socket": self.kubelet_socket,
            "plugin_socket": self.plugin_socket,
            "pod_resources_socket": self.pod_resources_socket,
            "checkpoint": self.checkpoint,
        }


_RESOURCE_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def validate_request(request: ProbeRequest) -> None:
    """Raise InvalidOptionError naming the option when a value cannot be used."""
    if not os.path.isabs(request.node_root):
        raise InvalidOptionError("node_root must be an absolute path, got %r" % request.node_root)
    if not os.path.isabs(request.kubelet_root_dir):
        raise InvalidOptionError("kubelet_root_dir must be an absolute path, got %r" % request.kubelet_root_dir)
    name = request.plugin_socket_name
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise InvalidOptionError(
            "plugin_socket_name must be a file name in the device-plugins directory (e.g. nvidia-gpu.sock), "
            "got %r" % name)
    if not _RESOURCE_NAME.match(request.resource_name or ""):
        raise InvalidOptionError(
            "resource_name must be an extended resource name like nvidia.com/gpu, got %r" % request.resource_name)
    deadline = request.deadline
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or math.isnan(deadline):
        raise InvalidOptionError("deadline must be a number of seconds, got %r" % (deadline,))
    if deadline <= 0 or deadline > MAX_DEADLINE:
        raise InvalidOptionError(
            "deadline must be more than 0 and at most %d seconds, got %s" % (MAX_DEADLINE, deadline))
    for device_id in request.expected_device_ids:
        if not isinstance(device_id, str) or not device_id.strip():
            raise InvalidOptionError("expected_device_ids must hold non-empty strings, got %r" % (device_id,))


def node_paths(request: ProbeRequest) -> NodePaths:
    """The node's kubelet paths under ``node_root`` (``/`` on a real node)."""
    kubelet_root = os.path.normpath(
        os.path.join(request.node_root, request.kubelet_root_dir.lstrip("/")))
    device_plugins_dir = os.path.join(kubelet_root, "device-plugins")
    return NodePaths(
        kubelet_root=kubelet_root,
        device_plugins_dir=device_plugins_dir,
        kubelet_socket=os.path.join(device_plugins_dir, KUBELET_SOCKET_NAME),
        plugin_socket=os.path.join(device_plugins_dir, request.plugin_socket_name),
        pod_resources_socket=os.path.join(kubelet_root, "pod-resources", KUBELET_SOCKET_NAME),
        checkpoint=os.path.join(device_plugins_dir, CHECKPOINT_NAME),
    )


def check_socket_path_length(path: str, what: str) -> None:
    """Unix sockets cannot be reached at paths longer than 107 bytes: say so instead of failing later."""
    size = len(path.encode("utf-8"))
    if size > UNIX_SOCKET_PATH_MAX:
        raise InvalidOptionError(
            "%s %s is %d bytes long; unix socket paths are limited to %d bytes, so it cannot be "
            "connected to. Use a shorter node_root or kubelet_root_dir" % (what, path, size, UNIX_SOCKET_PATH_MAX),
            path=path,
        )


# ---------------------------------------------------------------------------------------------
# Sockets


@dataclass(frozen=True)
class SocketCheck:
    """What is at a socket path: its kind, its mtime and whether it accepts a connection."""

    path: str
    state: str
    mtime: Optional[float] = None
    error: Optional[str] = None

    @property
    def listening(self) -> bool:
        return self.state == SOCKET_LISTENING

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "state": self.state, "listening": self.listening,
                "mtime": self.mtime, "error": self.error}


def _permission_error(path: str, exc: OSError) -> NodeProbeError:
    return NodeProbeError(
        "cannot inspect %s: %s" % (path, exc.strerror or exc),
        action="run the module as root (become: true): the kubelet's directories are root-only",
        path=path,
    )


def _connect(path: str, timeout: float) -> Tuple[str, Optional[str]]:
    """Connect once (and close): listening, dead (refused) or unresponsive, with the error."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except socket.timeout:
        return SOCKET_UNRESPONSIVE, "connect() did not complete within %gs" % timeout
    except OSError as exc:
        if exc.errno == errno.ECONNREFUSED:
            return SOCKET_DEAD, "connection refused: nothing listens on this socket"
        if exc.errno == errno.ENOENT:
            return SOCKET_MISSING, "removed while probing"
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise _permission_error(path, exc)
        return SOCKET_UNRESPONSIVE, "connect() failed: %s" % (exc.strerror or exc)
    finally:
        sock.close()
    return SOCKET_LISTENING, None


def inspect_socket(path: str, timeout: float) -> SocketCheck:
    """Classify a socket path; raise NodeProbeError when it is a directory or cannot be inspected."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return SocketCheck(path, SOCKET_MISSING, error="dangling symlink to %s" % os.readlink(path))
        return SocketCheck(path, SOCKET_MISSING)
    except NotADirectoryError:
        return SocketCheck(path, SOCKET_MISSING, error="a parent of this path is not a directory")
    except OSError as exc:
        raise _permission_error(path, exc)
    if stat.S_ISDIR(info.st_mode):
        raise NodeProbeError(
            "%s is a directory, not a socket: check kubelet_root_dir and plugin_socket_name" % path, path=path)
    if stat.S_ISREG(info.st_mode):
        return SocketCheck(path, SOCKET_REGULAR_FILE, info.st_mtime,
                           "a regular file (%d bytes) where a socket should be" % info.st_size)
    if not stat.S_ISSOCK(info.st_mode):
        return SocketCheck(path, SOCKET_OTHER, info.st_mtime, "neither a socket nor a regular file")
    state, error = _connect(path, timeout)
    return SocketCheck(path, state, info.st_mtime, error)


# ---------------------------------------------------------------------------------------------
# gRPC


@dataclass(frozen=True)
class RpcFailure:
    """A gRPC call that did not answer: which call, its status code, the peer's message."""

    rpc: str
    code: str
    message: str
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        return {"rpc": self.rpc, "code": self.code, "message": self.message, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class PluginDevice:
    id: str
    health: str
    numa_nodes: Tuple[int, ...] = ()

    @property
    def healthy(self) -> bool:
        return self.health == HEALTHY


@dataclass(frozen=True)
class PluginAnswer:
    """The plugin's answers: GetDevicePluginOptions, then the first ListAndWatch response."""

    options: Optional[Dict[str, bool]] = None
    devices: Optional[Tuple[PluginDevice, ...]] = None
    failure: Optional[RpcFailure] = None
    seconds: float = 0.0

    @property
    def answered(self) -> bool:
        return self.failure is None and self.devices is not None


def _channel(path: str) -> Any:
    return grpc.insecure_channel(
        "unix://" + path,
        options=[("grpc.enable_retries", 0), ("grpc.enable_http_proxy", 0)],
    )


def _failure(rpc: str, exc: Exception, started: float) -> RpcFailure:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else None
    return RpcFailure(
        rpc=rpc,
        code=getattr(code, "name", str(code)) if code is not None else "UNKNOWN",
        message=str(details or exc),
        seconds=time.monotonic() - started,
    )


def _numa_nodes(topology: Any) -> Tuple[int, ...]:
    if topology is None:
        return ()
    return tuple(sorted({int(node.ID) for node in topology.nodes}))


def probe_plugin(path: str, deadline: float) -> PluginAnswer:
    """Ask the plugin for its options and its first device list, each call within ``deadline``.

    The ListAndWatch stream is cancelled after its first response. When GetDevicePluginOptions
    does not answer, ListAndWatch is not tried, so a hung plugin costs one deadline."""
    started = time.monotonic()
    channel = _channel(path)
    try:
        stub = dp.DEVICE_PLUGIN.stub(channel)
        call_started = time.monotonic()
        try:
            reply = stub.GetDevicePluginOptions(dp.Empty(), timeout=deadline)
        except grpc.RpcError as exc:
            return PluginAnswer(failure=_failure("GetDevicePluginOptions", exc, call_started),
                                seconds=time.monotonic() - started)
        options = {
            "pre_start_required": bool(reply.pre_start_required),
            "get_preferred_allocation_available": bool(reply.get_preferred_allocation_available),
        }
        call_started = time.monotonic()
        stream = stub.ListAndWatch(dp.Empty(), timeout=deadline)
        try:
            first = next(stream)
        except StopIteration:
            return PluginAnswer(options=options, failure=RpcFailure(
                "ListAndWatch", "STREAM_ENDED", "the stream ended before its first response",
                time.monotonic() - call_started), seconds=time.monotonic() - started)
        except grpc.RpcError as exc:
            return PluginAnswer(options=options, failure=_failure("ListAndWatch", exc, call_started),
                                seconds=time.monotonic() - started)
        finally:
            stream.cancel()
        # sorted by ID: NVIDIA's plugin sends its devices in Go map order, different on each call
        devices = tuple(
            PluginDevice(id=device.ID, health=device.health,
                         numa_nodes=_numa_nodes(device.topology if device.HasField("topology") else None))
            for device in sorted(first.devices, key=lambda device: device.ID)
        )
        return PluginAnswer(options=options, devices=devices, seconds=time.monotonic() - started)
    finally:
        channel.close()


@dataclass(frozen=True)
class PodDeviceUse:
    """Devices of the resource held by one container (pod-resources List, or the checkpoint)."""

    container: str
    device_ids: Tuple[str, ...]
    namespace: Optional[str] = None
    name: Optional[str] = None  # the pod's name
    pod_uid: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, "pod_uid": self.pod_uid,
                "container": self.container, "device_ids": list(self.device_ids)}


@dataclass(frozen=True)
class PodResourcesAnswer:
    """The kubelet's pod-resources answers: allocatable devices per resource, and device users."""

    allocatable: Optional[Dict[str, Tuple[str, ...]]] = None
    allocatable_failure: Optional[RpcFailure] = None
    pods: Optional[Dict[str, Tuple[PodDeviceUse, ...]]] = None  # by resource name
    list_failure: Optional[RpcFailure] = None


def _merge_ids(target: Dict[str, List[str]], resource: str, ids: Sequence[str]) -> None:
    known = target.setdefault(resource, [])
    for device_id in ids:
        if device_id not in known:
            known.append(device_id)


def probe_pod_resources(path: str, deadline: float) -> PodResourcesAnswer:
    """GetAllocatableResources and List, each within ``deadline``; List is skipped when the
    kubelet did not answer the first call in time."""
    channel = _channel(path)
    try:
        stub = pr.POD_RESOURCES_LISTER.stub(channel)
        allocatable: Optional[Dict[str, Tuple[str, ...]]] = None
        allocatable_failure: Optional[RpcFailure] = None
        started = time.monotonic()
        try:
            reply = stub.GetAllocatableResources(pr.AllocatableResourcesRequest(), timeout=deadline)
        except grpc.RpcError as exc:
            allocatable_failure = _failure("GetAllocatableResources", exc, started)
        else:
            merged: Dict[str, List[str]] = {}
            for devices in reply.devices:
                _merge_ids(merged, devices.resource_name, list(devices.device_ids))
            allocatable = {name: tuple(sorted(ids)) for name, ids in merged.items()}  # the kubelet's order is a map's
        if allocatable_failure is not None and allocatable_failure.code == "DEADLINE_EXCEEDED":
            return PodResourcesAnswer(allocatable_failure=allocatable_failure, list_failure=allocatable_failure)
        started = time.monotonic()
        try:
            listing = stub.List(pr.ListPodResourcesRequest(), timeout=deadline)
        except grpc.RpcError as exc:
            return PodResourcesAnswer(allocatable, allocatable_failure, None, _failure("List", exc, started))
        uses: Dict[str, List[PodDeviceUse]] = {}
        for pod in listing.pod_resources:
            for container in pod.containers:
                held: Dict[str, List[str]] = {}
                for devices in container.devices:
                    _merge_ids(held, devices.resource_name, list(devices.device_ids))
                for resource, ids in held.items():
                    uses.setdefault(resource, []).append(PodDeviceUse(
                        container=container.name, device_ids=tuple(ids),
                        namespace=pod.namespace, name=pod.name))
        return PodResourcesAnswer(allocatable, allocatable_failure,
                                  {name: tuple(items) for name, items in uses.items()}, None)
    finally:
        channel.close()


# ---------------------------------------------------------------------------------------------
# Device IDs and comparison (pure)


@dataclass(frozen=True)
class DeviceId:
    """A device plugin device ID as NVIDIA's plugin forms it.

    ``GPU-<uuid>`` a whole GPU; ``MIG-<uuid>`` a MIG device (``MIG-GPU-<uuid>/<gi>/<ci>`` on
    drivers before R470, which names its parent GPU); ``<id>::<n>`` replica n of a
    time-sliced device. ``base_id`` drops the replica suffix."""

    id: str
    base_id: str
    kind: str  # "gpu", "mig" or "other"
    replica: Optional[int] = None
    parent_gpu: Optional[str] = None


def parse_device_id(device_id: str) -> DeviceId:
    base, replica = device_id, None
    head, sep, tail = device_id.rpartition("::")
    if sep and head and tail.isdigit():
        base, replica = head, int(tail)
    if base.startswith("MIG-GPU-"):
        return DeviceId(device_id, base, "mig", replica, parent_gpu=base[len("MIG-"):].split("/", 1)[0])
    if base.startswith("MIG-"):
        return DeviceId(device_id, base, "mig", replica)
    if base.startswith("GPU-"):
        return DeviceId(device_id, base, "gpu", replica)
    return DeviceId(device_id, base, "other", replica)


@dataclass(frozen=True)
class DeviceComparison:
    """Plugin devices against the expected NVML UUIDs.

    ``missing``: expected IDs no plugin device stands for; ``extra``: plugin devices (base IDs)
    that stand for no expected ID; ``unhealthy``: plugin device IDs not reported Healthy;
    ``replicas``: time-slicing replicas per base ID; ``unverified``: MIG devices that cannot
    be matched because ``expected`` holds no MIG UUIDs (no GPU is then reported missing:
    which GPUs they stand for cannot be told)."""

    compared: bool
    expected: Tuple[str, ...]
    plugin_device_count: int
    missing: Tuple[str, ...] = ()
    extra: Tuple[str, ...] = ()
    unhealthy: Tuple[str, ...] = ()
    unhealthy_base_ids: Tuple[str, ...] = ()
    replicas: Dict[str, int] = field(default_factory=dict)
    unverified: Tuple[str, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        return {
            "compared": self.compared,
            "expected_device_ids": list(self.expected),
            "plugin_device_count": self.plugin_device_count,
            "missing": list(self.missing),
            "extra": list(self.extra),
            "unhealthy": list(self.unhealthy),
            "unhealthy_base_ids": list(self.unhealthy_base_ids),
            "replicas": dict(self.replicas),
            "unverified": list(self.unverified),
        }


def _unique(items: Sequence[str]) -> Tuple[str, ...]:
    """The items without repeats, in their first order."""
    return tuple(dict.fromkeys(items))


def compare_devices(devices: Sequence[PluginDevice], expected: Sequence[str]) -> DeviceComparison:
    """Compare plugin devices with the expected NVML UUIDs (GPU and/or MIG UUIDs)."""
    parsed = [parse_device_id(device.id) for device in devices]
    expected_ids = _unique([device_id.strip() for device_id in expected])
    unhealthy = tuple(device.id for device in devices if not device.healthy)
    unhealthy_bases = _unique([parse_device_id(device_id).base_id for device_id in unhealthy])
    replicas: Dict[str, int] = {}
    for ref in parsed:
        if ref.replica is not None:
            replicas[ref.base_id] = replicas.get(ref.base_id, 0) + 1
    if not expected_ids:
        return DeviceComparison(False, (), len(devices), unhealthy=unhealthy,
                                unhealthy_base_ids=unhealthy_bases, replicas=replicas)

    expected_set = set(expected_ids)
    expects_mig = any(parse_device_id(device_id).kind == "mig" for device_id in expected_ids)
    matched: Set[str] = set()
    extra: List[str] = []
    unverified: List[str] = []
    for ref in parsed:
        if ref.base_id in expected_set:
            matched.add(ref.base_id)
        elif ref.parent_gpu is not None and ref.parent_gpu in expected_set:
            matched.add(ref.parent_gpu)
        elif ref.kind == "mig" and not expects_mig:
            if ref.base_id not in unverified:
                unverified.append(ref.base_id)
        elif ref.base_id not in extra:
            extra.append(ref.base_id)
    missing = [device_id for device_id in expected_ids if device_id not in matched]
    if unverified:
        # GPUs in MIG mode show up as MIG devices whose UUIDs do not name their parent GPU:
        # which expected GPUs they stand for cannot be told, so none is called missing.
        missing = []
    return DeviceComparison(
        compared=True, expected=expected_ids, plugin_device_count=len(devices),
        missing=tuple(missing), extra=tuple(extra), unhealthy=unhealthy,
        unhealthy_base_ids=unhealthy_bases, replicas=replicas, unverified=tuple(unverified),
    )


# ---------------------------------------------------------------------------------------------
# The kubelet's view


@dataclass(frozen=True)
class KubeletView:
    """The kubelet's devices for the resource: from pod-resources, else from the checkpoint.

    ``device_ids`` is None when that source does not list the resource at all."""

    source: str  # "pod_resources", "checkpoint" or "none"
    device_ids: Optional[Tuple[str, ...]] = None
    fallback_reason: Optional[str] = None
    error: Optional[RpcFailure] = None

    @property
    def registered(self) -> bool:
        return bool(self.device_ids)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "source": self.source,
            "registered": self.registered,
            "device_ids": list(self.device_ids) if self.device_ids is not None else None,
            "fallback_reason": self.fallback_reason,
            "error": self.error.to_dict() if self.error else None,
        }


def kubelet_view(resource_name: str, pod_resources_socket: SocketCheck,
                 answer: Optional[PodResourcesAnswer],
                 checkpoint: Callable[[], Optional[KubeletCheckpoint]]) -> KubeletView:
    """Prefer GetAllocatableResources (healthy devices, kubelet >= 1.21 with the feature on);
    fall back to the checkpoint's RegisteredDevices (healthy devices at its last write)."""
    error: Optional[RpcFailure] = None
    if answer is not None and answer.allocatable is not None:
        return KubeletView("pod_resources", answer.allocatable.get(resource_name))
    if answer is not None and answer.allocatable_failure is not None:
        error = answer.allocatable_failure
        if error.code == "UNIMPLEMENTED":
            reason = "the kubelet does not implement pod-resources GetAllocatableResources (older than 1.21)"
        else:
            reason = "pod-resources GetAllocatableResources failed: %s %s" % (error.code, error.message)
    else:
        state = pod_resources_socket.state.replace("_", " ")
        reason = "pod-resources socket %s is %s" % (pod_resources_socket.path, state)
    loaded = checkpoint()
    if loaded is None:
        return KubeletView("none", None, reason + "; no checkpoint file", error)
    return KubeletView("checkpoint", loaded.devices_for(resource_name), reason, error)


@dataclass(frozen=True)
class GpuUsage:
    """Which containers hold devices of the resource, and whether that is known."""

    source: str  # "pod_resources", "checkpoint" or "none"
    pods: Tuple[PodDeviceUse, ...] = ()
    error: Optional[str] = None

    @property
    def in_use(self) -> Optional[bool]:
        """True/False when known; None when no source could tell (treat as busy)."""
        return None if self.source == "none" else bool(self.pods)

    def to_dict(self) -> Dict[str, Any]:
        """The summary; the pods themselves are returned as ``pods_with_devices``."""
        devices = _unique([device_id for use in self.pods for device_id in use.device_ids])
        return {
            "source": self.source,
            "in_use": self.in_use,
            "device_ids_in_use": list(devices),
            "error": self.error,
        }


def gpu_usage(resource_name: str, answer: Optional[PodResourcesAnswer],
              checkpoint: Callable[[], Optional[KubeletCheckpoint]]) -> GpuUsage:
    if answer is not None and answer.pods is not None:
        return GpuUsage("pod_resources", answer.pods.get(resource_name, ()))
    reason = ("pod-resources List failed: %s %s" % (answer.list_failure.code, answer.list_failure.message)
              if answer is not None and answer.list_failure is not None else "pod-resources not reachable")
    loaded = checkpoint()
    if loaded is None:
        return GpuUsage("none", (), reason + "; no checkpoint file")
    uses = tuple(PodDeviceUse(container=entry.container_name, device_ids=entry.device_ids, pod_uid=entry.pod_uid)
                 for entry in loaded.entries_for(resource_name))
    return GpuUsage("checkpoint", uses,
                    reason + "; from the checkpoint, which may still list pods that have ended")


# ---------------------------------------------------------------------------------------------
# Findings (pure)


@dataclass(frozen=True)
class Finding:
    code: str
    message: str
    action: str
    evidence: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"code": self.code, "message": self.message, "action": self.action, "evidence": self.evidence}


@dataclass(frozen=True)
class NodeObservations:
    """Everything the probe saw on one node; :func:`assess` reads only this."""

    request: ProbeRequest
    paths: NodePaths
    plugin_dir_exists: bool
    kubelet_socket: SocketCheck
    plugin_socket: SocketCheck
    pod_resources_socket: SocketCheck
    plugin: Optional[PluginAnswer] = None
    comparison: Optional[DeviceComparison] = None
    kubelet: Optional[KubeletView] = None


def _finding(code: str, message: str, **evidence: Any) -> Finding:
    return Finding(code, message, ACTIONS[code], evidence)


def _plugin_socket_findings(obs: NodeObservations) -> List[Finding]:
    sock = obs.plugin_socket
    if sock.state == SOCKET_MISSING:
        return [_finding(PLUGIN_SOCKET_MISSING,
                         "plugin socket %s does not exist: no device plugin serves %s on this node"
                         % (sock.path, obs.request.resource_name), socket=sock.to_dict())]
    if sock.state == SOCKET_DEAD:
        return [_finding(PLUGIN_SOCKET_MISSING,
                         "plugin socket %s is a dead socket left behind: nothing listens on it "
                         "(connection refused), the plugin that created it has exited" % sock.path,
                         socket=sock.to_dict())]
    if sock.state == SOCKET_REGULAR_FILE:
        return [_finding(PLUGIN_SOCKET_NOT_SOCKET,
                         "plugin socket %s is a regular file, not a socket: a file left behind in "
                         "the socket's place" % sock.path, socket=sock.to_dict())]
    if sock.state == SOCKET_OTHER:
        return [_finding(PLUGIN_SOCKET_NOT_SOCKET, "plugin socket %s is not a socket" % sock.path,
                         socket=sock.to_dict())]
    if sock.state == SOCKET_UNRESPONSIVE:
        return [_finding(PLUGIN_NOT_ANSWERING, "plugin socket %s did not accept a connection: %s"
                         % (sock.path, sock.error), socket=sock.to_dict())]
    plugin = obs.plugin
    if plugin is not None and plugin.failure is not None:
        failure = plugin.failure
        if failure.code == "DEADLINE_EXCEEDED":
            message = ("plugin socket %s accepted the connection but did not answer %s within %gs"
                       % (sock.path, failure.rpc, obs.request.deadline))
        else:
            message = "plugin socket %s: %s failed with %s: %s" % (
                sock.path, failure.rpc, failure.code, failure.message)
        return [_finding(PLUGIN_NOT_ANSWERING, message, rpc=failure.to_dict(), deadline=obs.request.deadline)]
    return []


def _device_findings(obs: NodeObservations) -> List[Finding]:
    plugin, comparison = obs.plugin, obs.comparison
    if plugin is None or not plugin.answered or comparison is None:
        return []
    findings: List[Finding] = []
    where = "plugin socket %s" % obs.paths.plugin_socket
    if comparison.plugin_device_count == 0:
        findings.append(_finding(PLUGIN_DEVICES_MISSING, "%s advertises no devices for %s"
                                 % (where, obs.request.resource_name),
                                 expected=list(comparison.expected), missing=list(comparison.missing)))
    elif comparison.missing:
        findings.append(_finding(
            PLUGIN_DEVICES_MISSING, "%s does not advertise %d of %d expected GPUs: %s"
            % (where, len(comparison.missing), len(comparison.expected), ", ".join(comparison.missing)),
            expected=list(comparison.expected), missing=list(comparison.missing)))
    if comparison.extra:
        findings.append(_finding(
            PLUGIN_DEVICES_EXTRA, "%s advertises %d device(s) NVML does not list: %s"
            % (where, len(comparison.extra), ", ".join(comparison.extra)),
            expected=list(comparison.expected), extra=list(comparison.extra)))
    if comparison.unhealthy:
        findings.append(_finding(
            PLUGIN_DEVICES_UNHEALTHY, "%s reports %d device(s) Unhealthy: %s"
            % (where, len(comparison.unhealthy), ", ".join(comparison.unhealthy)),
            unhealthy=list(comparison.unhealthy), gpus=list(comparison.unhealthy_base_ids)))
    return findings


def _registration_findings(obs: NodeObservations) -> List[Finding]:
    plugin, view = obs.plugin, obs.kubelet
    if plugin is None or not plugin.answered or view is None or not obs.kubelet_socket.listening:
        return []
    plugin_ids = [device.id for device in plugin.devices or ()]
    healthy_ids = [device.id for device in plugin.devices or () if device.healthy]
    kubelet_mtime, plugin_mtime = obs.kubelet_socket.mtime, obs.plugin_socket.mtime
    confirmed_by_kubelet = view.source == "pod_resources" and view.registered
    if (kubelet_mtime is not None and plugin_mtime is not None and kubelet_mtime > plugin_mtime
            and not confirmed_by_kubelet):
        return [_finding(
            REGISTRATION_STALE,
            "kubelet socket %s (%s) is newer than plugin socket %s (%s): the kubelet restarted and "
            "the plugin has not registered again" % (
                obs.paths.kubelet_socket, _iso(kubelet_mtime), obs.paths.plugin_socket, _iso(plugin_mtime)),
            kubelet_socket_mtime=kubelet_mtime, plugin_socket_mtime=plugin_mtime,
            kubelet_source=view.source)]
    if not view.registered:
        if not healthy_ids:
            return []  # nothing healthy to register: the device findings say why
        where = {"pod_resources": "pod-resources GetAllocatableResources",
                 "checkpoint": "checkpoint %s" % obs.paths.checkpoint}.get(view.source, "the kubelet")
        return [_finding(
            NOT_REGISTERED, "the kubelet lists no %s devices (%s) while the plugin advertises %d healthy"
            % (obs.request.resource_name, where, len(healthy_ids)),
            kubelet_source=view.source, plugin_device_ids=plugin_ids, fallback_reason=view.fallback_reason)]
    kubelet_ids = list(view.device_ids or ())
    only_plugin = [device_id for device_id in healthy_ids if device_id not in kubelet_ids]
    only_kubelet = [device_id for device_id in kubelet_ids if device_id not in healthy_ids]
    if only_plugin or only_kubelet:
        return [_finding(
            KUBELET_DEVICES_MISMATCH,
            "the kubelet's %s devices (%d, from %s) differ from the plugin's healthy devices (%d): "
            "%d only at the plugin, %d only at the kubelet" % (
                obs.request.resource_name, len(kubelet_ids), view.source.replace("_", "-"),
                len(healthy_ids), len(only_plugin), len(only_kubelet)),
            kubelet_source=view.source, only_in_plugin=only_plugin, only_in_kubelet=only_kubelet)]
    return []


def _iso(timestamp: float) -> str:
    """UTC with milliseconds: a restart and a registration are often within the same second."""
    return "%s.%03dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)), int(timestamp % 1 * 1000))


def assess(obs: NodeObservations) -> List[Finding]:
    """Findings, bottom of the chain first; a missing device-plugins directory explains the rest."""
    if not obs.plugin_dir_exists:
        return [_finding(PLUGIN_DIR_MISSING, "device plugin directory %s does not exist"
                         % obs.paths.device_plugins_dir, path=obs.paths.device_plugins_dir)]
    findings: List[Finding] = []
    if not obs.kubelet_socket.listening:
        sock = obs.kubelet_socket
        detail = {SOCKET_MISSING: "does not exist", SOCKET_DEAD: "is a dead socket (connection refused)",
                  SOCKET_REGULAR_FILE: "is a regular file", SOCKET_OTHER: "is not a socket",
                  SOCKET_UNRESPONSIVE: "does not accept connections"}.get(sock.state, sock.state)
        findings.append(_finding(KUBELET_SOCKET_MISSING, "kubelet socket %s %s: the kubelet's device "
                                 "manager is not running" % (sock.path, detail), socket=sock.to_dict()))
    findings.extend(_plugin_socket_findings(obs))
    findings.extend(_device_findings(obs))
    findings.extend(_registration_findings(obs))
    return findings


# ---------------------------------------------------------------------------------------------
# The probe


@dataclass(frozen=True)
class ProbeReport:
    observations: NodeObservations
    findings: Tuple[Finding, ...]
    gpu_usage: GpuUsage
    checkpoint: Optional[KubeletCheckpoint]
    seconds: float

    def to_result(self) -> Dict[str, Any]:
        obs = self.observations
        plugin = obs.plugin
        return {
            "changed": False,
            "healthy": not self.findings,
            "findings": [finding.to_dict() for finding in self.findings],
            "finding_codes": [finding.code for finding in self.findings],
            "resource_name": obs.request.resource_name,
            "paths": obs.paths.to_dict(),
            "device_plugins_dir_exists": obs.plugin_dir_exists,
            "sockets": {
                "kubelet": obs.kubelet_socket.to_dict(),
                "plugin": obs.plugin_socket.to_dict(),
                "pod_resources": obs.pod_resources_socket.to_dict(),
            },
            "plugin": {
                "probed": plugin is not None,
                "answered": bool(plugin and plugin.answered),
                "options": plugin.options if plugin else None,
                "devices": [
                    {"id": device.id, "health": device.health, "numa_nodes": list(device.numa_nodes),
                     "base_id": parse_device_id(device.id).base_id, "kind": parse_device_id(device.id).kind,
                     "replica": parse_device_id(device.id).replica}
                    for device in (plugin.devices or ())] if plugin else [],
                "error": plugin.failure.to_dict() if plugin and plugin.failure else None,
                "seconds": round(plugin.seconds, 3) if plugin else None,
            },
            "device_comparison": obs.comparison.to_dict() if obs.comparison else None,
            "kubelet_devices": obs.kubelet.to_dict() if obs.kubelet else None,
            "registration": {
                "kubelet_socket_mtime": obs.kubelet_socket.mtime,
                "plugin_socket_mtime": obs.plugin_socket.mtime,
                "stale": any(finding.code == REGISTRATION_STALE for finding in self.findings),
            },
            "pods_with_devices": [use.to_dict() for use in self.gpu_usage.pods],
            "gpu_usage": self.gpu_usage.to_dict(),
            "checkpoint": self.checkpoint.to_dict() if self.checkpoint else None,
            "seconds": round(self.seconds, 3),
        }


def _dir_exists(path: str) -> bool:
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise _permission_error(path, exc)
    if not stat.S_ISDIR(info.st_mode):
        raise NodeProbeError("%s is not a directory: check node_root and kubelet_root_dir" % path, path=path)
    return True


def probe_node(request: ProbeRequest) -> ProbeReport:
    """Look at one node (``request.node_root``) and report findings; read-only."""
    started = time.monotonic()
    validate_request(request)
    paths = node_paths(request)
    for path, what in ((paths.kubelet_socket, "kubelet socket"), (paths.plugin_socket, "plugin socket"),
                       (paths.pod_resources_socket, "pod-resources socket")):
        check_socket_path_length(path, what)
    deadline = float(request.deadline)

    loaded: List[Optional[KubeletCheckpoint]] = []

    def checkpoint() -> Optional[KubeletCheckpoint]:
        if not loaded:
            loaded.append(read_checkpoint(paths.checkpoint))
        return loaded[0]

    plugin_dir_exists = _dir_exists(paths.device_plugins_dir)
    if plugin_dir_exists:
        kubelet_socket = inspect_socket(paths.kubelet_socket, deadline)
        plugin_socket = inspect_socket(paths.plugin_socket, deadline)
    else:
        kubelet_socket = SocketCheck(paths.kubelet_socket, SOCKET_MISSING)
        plugin_socket = SocketCheck(paths.plugin_socket, SOCKET_MISSING)
    pod_resources_socket = inspect_socket(paths.pod_resources_socket, deadline)

    plugin: Optional[PluginAnswer] = None
    comparison: Optional[DeviceComparison] = None
    if plugin_socket.listening:
        plugin = probe_plugin(paths.plugin_socket, deadline)
        if plugin.answered:
            comparison = compare_devices(plugin.devices or (), request.expected_device_ids)

    pod_resources: Optional[PodResourcesAnswer] = None
    if pod_resources_socket.listening:
        pod_resources = probe_pod_resources(paths.pod_resources_socket, deadline)
    view: Optional[KubeletView] = None
    if plugin_dir_exists:
        view = kubelet_view(request.resource_name, pod_resources_socket, pod_resources, checkpoint)
    usage = gpu_usage(request.resource_name, pod_resources, checkpoint)

    observations = NodeObservations(
        request=request, paths=paths, plugin_dir_exists=plugin_dir_exists,
        kubelet_socket=kubelet_socket, plugin_socket=plugin_socket,
        pod_resources_socket=pod_resources_socket, plugin=plugin, comparison=comparison, kubelet=view,
    )
    return ProbeReport(
        observations=observations,
        findings=tuple(assess(observations)),
        gpu_usage=usage,
        checkpoint=loaded[0] if loaded else None,
        seconds=time.monotonic() - started,
    )
