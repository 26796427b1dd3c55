"""The kubelet's device manager on one simulated node: registration, ListAndWatch, allocation,
the checkpoint and the pod-resources API.

It behaves like the kubelet's device manager (pkg/kubelet/cm/devicemanager) as seen from
outside, and NVIDIA's real plugin is its client:

- ``Registration/Register`` on ``device-plugins/kubelet.sock`` validates the request like the
  kubelet (API version ``v1beta1``; an extended resource name; an endpoint it can dial), dials
  the plugin, calls ``GetDevicePluginOptions`` and consumes ``ListAndWatch``.
- Each ListAndWatch update sets the resource's healthy/unhealthy devices and rewrites
  ``kubelet_internal_checkpoint`` (``RegisteredDevices`` lists healthy devices only, as the
  kubelet writes it); the node agent reads capacity (all devices) and allocatable (healthy
  devices) at its next node status update, as the kubelet's status loop does.
- When the stream ends (plugin gone), every device of the resource turns unhealthy: capacity
  stays, allocatable drops to 0. After ``endpoint_grace_s`` (the kubelet's 5 minutes by
  default) without a new registration the resource is dropped from the Node and checkpoint.
- **Allocation** for a container that requests the resource: healthy devices not held by other
  pods, the plugin's ``GetPreferredAllocation`` when it offers one, then ``Allocate``; the
  response (e.g. ``NVIDIA_VISIBLE_DEVICES``) goes to the container; the assignment is kept in
  the checkpoint's ``PodDeviceEntries`` and shown by pod-resources ``List`` until the pod goes.
- ``PodResourcesLister`` (v1) on ``pod-resources/kubelet.sock``: ``List`` (the node's pods and
  their containers' devices), ``GetAllocatableResources`` (healthy devices, one entry per
  device with its NUMA node, as the kubelet answers) and ``Get``.
- A restart removes every socket in the device-plugins directory (the plugin's too; regular
  files and the checkpoint stay), forgets registrations, reads the checkpoint back (its
  resources come back with capacity and allocatable 0 until their plugin registers again) and
  serves a new ``kubelet.sock``. A restart the plugin is meant to miss (the lab fault
  ``plugin_stale``) replaces the directory instead, as when /var/lib/kubelet is recreated under
  a running plugin: the plugin's bind mount keeps the old directory, so its inotify watch never
  sees the new ``kubelet.sock``.

Both kubelet sockets are served by one grpc.aio server per node (the services are distinct;
each socket answers both), all servers of the fleet share one event loop.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import grpc

from ansible_collections.gpunode.bringup.plugins.module_utils._kubelet_api import (
    deviceplugin_v1beta1 as dp,
    podresources_v1 as pr,
)

from .klog import ContainerLog
from .layout import CHECKPOINT_NAME, is_socket, remove_path, write_file_atomic

if TYPE_CHECKING:  # pragma: no cover
    from .agent import SimNode

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
SUPPORTED_VERSIONS = ["v1beta1"]

# The kubelet's own error texts (pkg/kubelet/cm/devicemanager/plugin/v1beta1/api.go).
ERR_UNSUPPORTED_VERSION = "requested API version %s is not supported by kubelet. Supported version is %s"
ERR_INVALID_RESOURCE_NAME = "the ResourceName %s is invalid"
ERR_FAILED_TO_DIAL = "failed to dial device plugin:"

_QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def go_quote(value: str) -> str:
    """Go's %q for plain strings."""
    return json.dumps(value)


def is_extended_resource_name(name: str) -> bool:
    """v1helper.IsExtendedResourceName: ``domain/name``, not a native (kubernetes.io) resource,
    and ``requests.<name>`` must be a qualified name."""
    if "/" not in name or "kubernetes.io/" in name or name.startswith("requests."):
        return False
    prefix, _sep, short = ("requests." + name).rpartition("/")
    if not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix):
        return False
    return 0 < len(short) <= 63 and bool(_QUALIFIED_NAME.match(short))


def checkpoint_checksum(data: Dict[str, Any]) -> int:
    """FNV-1a (32 bit) over the canonical JSON of the checkpoint's Data.

    The kubelet hashes the Go struct with its object printer (pkg/util/hash DeepHashObject),
    which Python cannot reproduce byte for byte; the lab keeps the kubelet's algorithm family
    and field, and is self-consistent (``verify_checkpoint``)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    value = 0x811C9DC5
    for byte in blob:
        value ^= byte
        value = (value * 0x01000193) & 0xFFFFFFFF
    return value


def verify_checkpoint(document: Dict[str, Any]) -> bool:
    return checkpoint_checksum(document.get("Data", {})) == document.get("Checksum")


@dataclass
class DeviceState:
    health: str
    numa_node: Optional[int]


class AllocationError(Exception):
    """The device manager cannot give a container its devices (the kubelet's message)."""


@dataclass
class Assignment:
    """Devices the device manager gave one container of a pod (PodDeviceEntries)."""

    pod_uid: str
    namespace: str
    pod: str
    container: str
    resource: str
    device_ids: List[str]
    response: Any  # ContainerAllocateResponse


@dataclass
class ResourceState:
    name: str
    devices: Dict[str, DeviceState] = field(default_factory=dict)
    connected: bool = False
    stopped_at: Optional[float] = None
    grace_timer: Optional[asyncio.TimerHandle] = None
    stream_task: Optional[asyncio.Task] = None
    channel: Optional[grpc.aio.Channel] = None
    stub: Any = None
    options: Any = None
    endpoint: str = ""

    def healthy_ids(self) -> List[str]:
        return [i for i, d in self.devices.items() if d.health == HEALTHY]


class Kubelet:
    """One node's device manager. All methods run on the fleet's event loop."""

    def __init__(self, node: "SimNode") -> None:
        self.node = node
        self.layout = node.layout
        self.log = ContainerLog()
        self.running = False
        self.resources: Dict[str, ResourceState] = {}
        self.assignments: List[Assignment] = []
        self._server: Optional[grpc.aio.Server] = None
        self.started_at: Optional[float] = None

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        if self.running:
            return
        os.makedirs(self.layout.device_plugin_dir, exist_ok=True)
        self._cleanup_plugin_directory()
        self._read_checkpoint()
        server = grpc.aio.server()
        dp.REGISTRATION.add_to_server(_RegistrationServicer(self), server)
        pr.POD_RESOURCES_LISTER.add_to_server(_PodResourcesServicer(self), server)
        for path in (self.layout.kubelet_socket, self.layout.pod_resources_socket):
            remove_path(path)
            server.add_insecure_port("unix:" + path)
        await server.start()
        self._server = server
        self.running = True
        self.started_at = time.time()
        self.log.info("server.go:105", "Starting device plugin registration server")
        self.node.resources_changed()

    async def stop(self) -> None:
        """Stop serving; sockets removed, connections to plugins closed. The Node keeps what
        it last reported."""
        if not self.running:
            return
        self.running = False
        for resource in self.resources.values():
            await self._disconnect(resource)
            if resource.grace_timer:
                resource.grace_timer.cancel()
                resource.grace_timer = None
        if self._server is not None:
            await self._server.stop(None)
            self._server = None
        remove_path(self.layout.kubelet_socket)
        remove_path(self.layout.pod_resources_socket)

    async def restart(self) -> None:
        await self.stop()
        missed = self.node.plugin_misses_kubelet_restart()
        if missed is not None:
            self._replace_plugin_directory(keep_plugin_sockets=missed == "kept")
        self.resources = {}
        await self.start()

    def _cleanup_plugin_directory(self) -> None:
        """CleanupPluginDirectory: every socket goes, the checkpoint and other files stay."""
        directory = self.layout.device_plugin_dir
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name == CHECKPOINT_NAME or not is_socket(path):
                continue
            if self.node.plugin_misses_kubelet_restart() == "kept" and name != "kubelet.sock":
                continue  # a kubelet that did not clean up (lab fault plugin_stale socket=kept)
            remove_path(path)

    def _replace_plugin_directory(self, keep_plugin_sockets: bool) -> None:
        """The device-plugins directory recreated under the running plugin: its files move to a
        new directory at the same path (plugin sockets only with ``keep_plugin_sockets``, as
        links to the same socket: it still answers); the old one stays where the plugin's
        mount holds it, and goes with the node."""
        directory = self.layout.device_plugin_dir
        old = "%s.replaced-%d" % (directory, time.time_ns())
        os.rename(directory, old)
        os.makedirs(directory)
        for name in os.listdir(old):
            source, target = os.path.join(old, name), os.path.join(directory, name)
            if is_socket(source):
                if keep_plugin_sockets and name != "kubelet.sock":
                    os.link(source, target)
            elif os.path.isfile(source):
                shutil.copy2(source, target)

    def _read_checkpoint(self) -> None:
        """Resources of the last checkpoint come back with zero devices until re-registration."""
        try:
            with open(self.layout.checkpoint, encoding="utf-8") as handle:
                document = json.load(handle)
        except (OSError, ValueError):
            return
        registered = (document.get("Data") or {}).get("RegisteredDevices") or {}
        for name in registered:
            resource = self.resources.setdefault(name, ResourceState(name=name))
            resource.devices = {}
            resource.connected = False
            resource.stopped_at = time.monotonic()
            self._arm_grace(resource)

    # ---- registration -----------------------------------------------------------------

    async def register(self, request: Any) -> Optional[str]:
        """Handle Register; returns the error text the kubelet would return, None on success."""
        name = request.resource_name
        self.log.info("server.go:146", '"Got registration request from device plugin with resource" resourceName="%s"' % name)
        if request.version not in SUPPORTED_VERSIONS:
            err = ERR_UNSUPPORTED_VERSION % (go_quote(request.version), "[%s]" % " ".join(go_quote(v) for v in SUPPORTED_VERSIONS))
            self.log.info("server.go:150", '"Bad registration request from device plugin with resource" resourceName="%s" err="%s"' % (name, err))
            return err
        if not is_extended_resource_name(name):
            err = ERR_INVALID_RESOURCE_NAME % go_quote(name)
            self.log.info("server.go:156", '"Bad registration request from device plugin" err="%s"' % err)
            return err
        socket_path = os.path.join(self.layout.device_plugin_dir, request.endpoint)
        if self.node.rejects_registration() or not is_socket(socket_path):
            # the kubelet blocks 10 s on the dial before giving up; the lab answers at once
            err = "%s context deadline exceeded" % ERR_FAILED_TO_DIAL
            self.log.error("client.go:76", '"Unable to connect to device plugin client with socket path" err="%s" path="%s"' % (err, socket_path))
            return err
        channel = grpc.aio.insecure_channel("unix:" + socket_path)
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=10)
            stub = dp.DEVICE_PLUGIN.stub(channel)
            options = await stub.GetDevicePluginOptions(dp.Empty(), timeout=10)
        except (asyncio.TimeoutError, grpc.RpcError) as exc:
            await channel.close()
            err = "failed to get device plugin options: %s" % rpc_error_text(exc)
            self.log.error("client.go:82", '"Error connecting to device plugin client" err="%s"' % err)
            return err
        resource = self.resources.get(name)
        if resource is None:
            resource = self.resources[name] = ResourceState(name=name)
        else:
            await self._disconnect(resource)
        if resource.grace_timer:
            resource.grace_timer.cancel()
            resource.grace_timer = None
        resource.connected = True
        resource.stopped_at = None
        resource.endpoint = request.endpoint
        resource.channel = channel
        resource.stub = stub
        resource.options = options
        resource.stream_task = asyncio.get_running_loop().create_task(self._consume(resource, stub))
        return None

    async def _consume(self, resource: ResourceState, stub: Any) -> None:
        first = True
        try:
            call = stub.ListAndWatch(dp.Empty())
            async for response in call:
                devices = {}
                for device in response.devices:
                    numa = device.topology.nodes[0].ID if device.HasField("topology") and device.topology.nodes else None
                    devices[device.ID] = DeviceState(health=device.health, numa_node=numa)
                resource.devices = devices
                self.log.info("manager.go:245", '"Processed ListAndWatch update" resourceName="%s" devices=%d healthy=%d'
                              % (resource.name, len(devices), len(resource.healthy_ids())))
                self.write_checkpoint()
                self.node.resources_changed()
                if first:
                    first = False
                    self.node.on_plugin_registered(resource.name)
        except asyncio.CancelledError:
            raise
        except grpc.RpcError as exc:
            self.log.error("client.go:104", '"ListAndWatch ended unexpectedly for device plugin" err="%s" resource="%s"' % (rpc_error_text(exc), resource.name))
        if resource.stream_task is asyncio.current_task():
            self._plugin_disconnected(resource)

    def _plugin_disconnected(self, resource: ResourceState) -> None:
        """PluginDisconnected: all devices unhealthy (capacity kept, allocatable 0), grace starts."""
        resource.stream_task = None
        resource.connected = False
        for device in resource.devices.values():
            device.health = UNHEALTHY
        resource.stopped_at = time.monotonic()
        self._arm_grace(resource)
        if resource.channel is not None:
            asyncio.get_running_loop().create_task(resource.channel.close())
            resource.channel = None
            resource.stub = None
        self.log.info("manager.go:289", '"Endpoint became unhealthy" resourceName="%s"' % resource.name)
        if self.running:
            self.node.resources_changed()

    async def _disconnect(self, resource: ResourceState) -> None:
        task, resource.stream_task = resource.stream_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - a closed stream is fine
                pass
        resource.connected = False
        if resource.channel is not None:
            await resource.channel.close()
            resource.channel = None
            resource.stub = None

    def _arm_grace(self, resource: ResourceState) -> None:
        if resource.grace_timer:
            resource.grace_timer.cancel()
        resource.grace_timer = asyncio.get_running_loop().call_later(
            self.node.endpoint_grace_s, self._grace_expired, resource.name
        )

    def _grace_expired(self, name: str) -> None:
        resource = self.resources.get(name)
        if resource is None or resource.connected:
            return
        del self.resources[name]
        self.log.info("manager.go:565", '"Resource stopped past grace period, removing" resourceName="%s"' % name)
        if self.running:
            self.write_checkpoint()
            self.node.resources_changed()

    # ---- allocation --------------------------------------------------------------------------

    async def allocate(self, pod_uid: str, namespace: str, pod: str, container: str, resource_name: str,
                       count: int) -> Assignment:
        """Devices for one container (devicesToAllocate, then the plugin's Allocate)."""
        for held in self.assignments:
            if (held.pod_uid, held.container, held.resource) == (pod_uid, container, resource_name):
                return held
        resource = self.resources.get(resource_name)
        if resource is None or (not resource.devices and not resource.connected):
            raise AllocationError("cannot allocate unregistered device %s" % resource_name)
        busy = {d for a in self.assignments if a.resource == resource_name for d in a.device_ids}
        available = sorted(d for d in resource.healthy_ids() if d not in busy)
        if len(available) < count:
            raise AllocationError("requested number of devices unavailable for %s. Requested: %d, Available: %d"
                                  % (resource_name, count, len(available)))
        if resource.stub is None:
            raise AllocationError("device plugin for %s is not connected" % resource_name)
        chosen = available[:count]
        if resource.options is not None and resource.options.get_preferred_allocation_available:
            request = dp.PreferredAllocationRequest(container_requests=[dp.ContainerPreferredAllocationRequest(
                available_deviceIDs=available, must_include_deviceIDs=[], allocation_size=count)])
            try:
                answer = await resource.stub.GetPreferredAllocation(request, timeout=10)
                preferred = list(answer.container_responses[0].deviceIDs) if answer.container_responses else []
                if len(preferred) == count and set(preferred) <= set(available):
                    chosen = preferred
            except (grpc.RpcError, asyncio.TimeoutError, IndexError) as exc:
                self.log.error("manager.go:1010", '"Failed to get preferred allocation" err="%s"' % rpc_error_text(exc))
        try:
            response = await resource.stub.Allocate(
                dp.AllocateRequest(container_requests=[dp.ContainerAllocateRequest(devices_ids=chosen)]), timeout=10)
        except (grpc.RpcError, asyncio.TimeoutError) as exc:
            raise AllocationError("%s" % rpc_error_text(exc)) from None
        if len(response.container_responses) != 1:
            raise AllocationError("AllocateResponse has %d container responses, 1 expected"
                                  % len(response.container_responses))
        assignment = Assignment(pod_uid, namespace, pod, container, resource_name, chosen,
                                response.container_responses[0])
        self.assignments.append(assignment)
        self.write_checkpoint()
        return assignment

    def release(self, pod_uid: str) -> None:
        before = len(self.assignments)
        self.assignments = [a for a in self.assignments if a.pod_uid != pod_uid]
        if len(self.assignments) != before and self.running:
            self.write_checkpoint()

    # ---- state out ------------------------------------------------------------------------

    def capacity(self) -> Dict[str, str]:
        return {name: str(len(r.devices)) for name, r in self.resources.items()}

    def allocatable(self) -> Dict[str, str]:
        return {name: str(len(r.healthy_ids())) for name, r in self.resources.items()}

    def numa_of(self, resource_name: str, device_id: str) -> Optional[int]:
        resource = self.resources.get(resource_name)
        device = resource.devices.get(device_id) if resource else None
        return device.numa_node if device else None

    def checkpoint_document(self) -> Dict[str, Any]:
        entries = []
        for held in self.assignments:
            numa: Dict[str, List[str]] = {}
            for device_id in held.device_ids:
                node = self.numa_of(held.resource, device_id)
                numa.setdefault(str(node if node is not None else -1), []).append(device_id)
            entries.append(
                {
                    "PodUID": held.pod_uid,
                    "ContainerName": held.container,
                    "ResourceName": held.resource,
                    "DeviceIDs": numa,
                    "AllocResp": base64.b64encode(held.response.SerializeToString()).decode(),
                }
            )
        data = {
            "PodDeviceEntries": entries or None,
            "RegisteredDevices": {name: r.healthy_ids() for name, r in self.resources.items()},
        }
        return {"Data": data, "Checksum": checkpoint_checksum(data)}

    def write_checkpoint(self) -> None:
        document = self.checkpoint_document()
        write_file_atomic(self.layout.checkpoint, json.dumps(document, separators=(",", ":")), mode=0o600)

    def summary(self) -> Dict[str, Any]:
        return {
            "running": self.running,
            "resources": {
                name: {
                    "registered": r.connected,
                    "capacity": len(r.devices),
                    "allocatable": len(r.healthy_ids()),
                    "unhealthy": sorted(i for i, d in r.devices.items() if d.health != HEALTHY),
                }
                for name, r in self.resources.items()
            },
            "assignments": ["%s/%s %s %s=%s" % (a.namespace, a.pod, a.container, a.resource, ",".join(a.device_ids))
                            for a in self.assignments],
        }


def rpc_error_text(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        name = code.name.title().replace("_", "") if code is not None else "Unknown"
        return "rpc error: code = %s desc = %s" % (name, details)
    if isinstance(exc, asyncio.TimeoutError):
        return "context deadline exceeded"
    return str(exc)


class _RegistrationServicer:
    def __init__(self, kubelet: Kubelet) -> None:
        self.kubelet = kubelet

    async def Register(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        error = await self.kubelet.register(request)
        if error is not None:
            # a Go handler returning a plain error: the client sees code Unknown
            await context.abort(grpc.StatusCode.UNKNOWN, error)
        return dp.Empty()


class _PodResourcesServicer:
    def __init__(self, kubelet: Kubelet) -> None:
        self.kubelet = kubelet

    def _pods(self) -> List[Any]:
        kubelet = self.kubelet
        pods = []
        for namespace, name, uid, containers in kubelet.node.pod_resources_view():
            entries = []
            for container in containers:
                devices = []
                for held in kubelet.assignments:
                    if held.pod_uid != uid or held.container != container:
                        continue
                    for device_id in held.device_ids:
                        devices.append(pr.ContainerDevices(resource_name=held.resource, device_ids=[device_id],
                                                           topology=_topology(kubelet.numa_of(held.resource, device_id))))
                entries.append(pr.ContainerResources(name=container, devices=devices))
            pods.append(pr.PodResources(name=name, namespace=namespace, containers=entries))
        return pods

    async def List(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pr.ListPodResourcesResponse(pod_resources=self._pods())

    async def GetAllocatableResources(self, request: Any, context: Any) -> Any:  # noqa: N802
        devices = []
        for name, resource in sorted(self.kubelet.resources.items()):
            for device_id in resource.healthy_ids():
                devices.append(
                    pr.ContainerDevices(
                        resource_name=name,
                        device_ids=[device_id],
                        topology=_topology(resource.devices[device_id].numa_node),
                    )
                )
        return pr.AllocatableResourcesResponse(devices=devices)

    async def Get(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        for pod in self._pods():
            if pod.name == request.pod_name and pod.namespace == request.pod_namespace:
                return pr.GetPodResourcesResponse(pod_resources=pod)
        await context.abort(
            grpc.StatusCode.UNKNOWN,
            "pod %s in namespace %s not found" % (request.pod_name, request.pod_namespace),
        )


def _topology(numa_node: Optional[int]) -> Any:
    if numa_node is None:
        return None
    return pr.TopologyInfo(nodes=[pr.NUMANode(ID=numa_node)])
