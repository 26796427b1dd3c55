"""The device plugin stand-in: one "container" of NVIDIA's k8s-device-plugin on one node.

Seen from outside it behaves like the real plugin (v0.17): the same start-up sequence and log
lines (klog format, paths shown as the container sees them), the same socket
(``nvidia-gpu.sock``; ``nvidia-gpu.shared.sock`` for renamed time-slicing) and resource names,
device IDs = NVML UUIDs (``<UUID>::<n>`` replicas with time-slicing), NUMA topology per device,
a DevicePlugin server (GetDevicePluginOptions, ListAndWatch re-sent on every health change,
Allocate with NVIDIA_VISIBLE_DEVICES, GetPreferredAllocation), registration with the kubelet,
an FS watch on ``kubelet.sock`` (a new socket: "inotify: ... created, restarting." and
re-registration) and XID health checks (XIDs 13, 31, 43, 45, 68, 109 ignored).

Failure paths, each with the real plugin's log signature:
- NVML init fails (an NVML fault, or ``plugin_crash signature=nvml_init_failed``):
  "Failed to initialize NVML: ERROR_..." then exit 1, or "No devices found. Waiting
  indefinitely." with failOnInitError=false;
- no usable runtime / no NVML library: "Incompatible strategy detected auto", same exits;
- registration refused: "Could not register device plugin: ..." (the real plugin retries every
  30 s; with ``plugin_crash signature=registration_failed`` the lab container exits 1 instead
  so the signature shows as a crash loop);
- a GPU that cannot be read (lost GPU): "error building device map" and exit 1.
"""
from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple

import grpc

from ansible_collections.gpunode.bringup.plugins.module_utils._kubelet_api import (
    deviceplugin_v1beta1 as dp,
)

from .klog import ContainerLog
from .kubelet import HEALTHY, UNHEALTHY, rpc_error_text
from .layout import CONTAINER_DEVICE_PLUGIN_DIR, KUBELET_SOCKET_NAME, is_socket, plugin_socket_name, remove_path
from .nvml_gateway import GpuDevice
from .plugin_config import ConfigError, PluginConfig

if TYPE_CHECKING:  # pragma: no cover
    from .runtime import PodRecord, SimNode

PLUGIN_VERSION = "e0a461e1"
PLUGIN_COMMIT = "e0a461e1e7ad1d239d4708c954f08c3038e2654a"
# Application XIDs the real plugin ignores: the GPU stays healthy.
IGNORED_XIDS = frozenset({13, 31, 43, 45, 68, 109})

CONTAINER_KUBELET_SOCKET = CONTAINER_DEVICE_PLUGIN_DIR + "/" + KUBELET_SOCKET_NAME

_PREREQUISITES = "You can check the prerequisites at: https://github.com/NVIDIA/k8s-device-plugin#prerequisites"
_QUICK_START = "You can learn how to set the runtime at: https://github.com/NVIDIA/k8s-device-plugin#quick-start"
_NOT_A_GPU_NODE = (
    "If this is not a GPU node, you should set up a toleration or nodeSelector to only deploy "
    "this plugin on GPU nodes"
)

EXIT, RUNNING, IDLE, RETRY = "exit", "running", "idle", "retry"


@dataclass
class PluginDevice:
    id: str
    uuid: str  # the physical GPU behind a replica
    numa_node: Optional[int]
    health: str = HEALTHY

    def api(self) -> Any:
        topology = None
        if self.numa_node is not None:
            topology = dp.TopologyInfo(nodes=[dp.NUMANode(ID=self.numa_node)])
        return dp.Device(ID=self.id, health=self.health, topology=topology)


def build_devices(gpus: List[GpuDevice], config: PluginConfig) -> List[PluginDevice]:
    devices = []
    for gpu in gpus:
        if config.replicas > 1:
            for replica in range(config.replicas):
                devices.append(PluginDevice("%s::%d" % (gpu.uuid, replica), gpu.uuid, gpu.numa_node))
        else:
            devices.append(PluginDevice(gpu.uuid, gpu.uuid, gpu.numa_node))
    return devices


async def _forever() -> None:
    await asyncio.Event().wait()


class ResourceServer:
    """The DevicePlugin gRPC server for one resource (one socket)."""

    def __init__(self, container: "PluginContainer", resource: str, devices: List[PluginDevice]) -> None:
        self.container = container
        self.resource = resource
        self.devices: Dict[str, PluginDevice] = {d.id: d for d in devices}
        self.socket_path = container.node.layout.plugin_socket(resource)
        self.container_socket_path = CONTAINER_DEVICE_PLUGIN_DIR + "/" + plugin_socket_name(resource)
        self.stopped = False
        self._changed = asyncio.Event()
        self._server: Optional[grpc.aio.Server] = None
        self._inode: Optional[int] = None

    async def start(self) -> None:
        remove_path(self.socket_path)  # the real plugin removes whatever is there first
        server = grpc.aio.server()
        dp.DEVICE_PLUGIN.add_to_server(_DevicePluginServicer(self), server)
        server.add_insecure_port("unix:" + self.socket_path)
        await server.start()
        self._server = server
        try:
            self._inode = os.lstat(self.socket_path).st_ino
        except OSError:
            self._inode = None

    async def stop(self, log: bool = True) -> None:
        if self.stopped:
            return
        if log:
            self.container.log.info("server.go:185", "Stopping to serve '%s' on %s" % (self.resource, self.container_socket_path))
        self.stopped = True
        self._notify()
        if self._server is not None:
            await self._server.stop(None)
            self._server = None
        try:
            if self._inode is not None and os.lstat(self.socket_path).st_ino == self._inode:
                remove_path(self.socket_path)
        except OSError:
            pass

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def mark_unhealthy(self, uuid: Optional[str]) -> List[str]:
        """Every device on GPU ``uuid`` (all devices when None) turns Unhealthy."""
        changed = []
        for device in self.devices.values():
            if (uuid is None or device.uuid == uuid) and device.health != UNHEALTHY:
                device.health = UNHEALTHY
                changed.append(device.id)
        for device_id in changed:
            self.container.log.info("server.go:262", "'%s' device marked unhealthy: %s" % (self.resource, device_id))
        if changed:
            self._notify()
        return changed

    def response(self) -> Any:
        return dp.ListAndWatchResponse(devices=[d.api() for d in self.devices.values()])

    async def list_and_watch(self) -> Any:
        while not self.stopped:
            changed = self._changed
            yield self.response()
            await changed.wait()
            if self.container.hung:
                await _forever()


class _DevicePluginServicer:
    def __init__(self, server: ResourceServer) -> None:
        self.server = server

    async def _gate(self) -> None:
        if self.server.container.hung:
            await _forever()

    async def GetDevicePluginOptions(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._gate()
        return dp.DevicePluginOptions(get_preferred_allocation_available=True)

    async def ListAndWatch(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._gate()
        async for response in self.server.list_and_watch():
            yield response

    async def GetPreferredAllocation(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._gate()
        response = dp.PreferredAllocationResponse()
        for req in request.container_requests:
            chosen = list(req.must_include_deviceIDs)
            for device_id in sorted(req.available_deviceIDs):
                if len(chosen) >= req.allocation_size:
                    break
                if device_id not in chosen:
                    chosen.append(device_id)
            response.container_responses.append(dp.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        return response

    async def Allocate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self._gate()
        server = self.server
        config = server.container.config or PluginConfig()
        response = dp.AllocateResponse()
        for req in request.container_requests:
            ids = list(req.devices_ids)
            if config.fail_requests_greater_than_one and any("::" in i for i in ids) and len(ids) > 1:
                await context.abort(
                    grpc.StatusCode.UNKNOWN,
                    "request for '%s: %d' too large: maximum request size for shared resources is 1" % (server.resource, len(ids)),
                )
            for device_id in ids:
                if device_id not in server.devices:
                    await context.abort(
                        grpc.StatusCode.UNKNOWN,
                        "invalid allocation request for '%s': unknown device: %s" % (server.resource, device_id),
                    )
            uuids: List[str] = []
            for device_id in ids:
                uuid = server.devices[device_id].uuid
                if uuid not in uuids:
                    uuids.append(uuid)
            response.container_responses.append(
                dp.ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": ",".join(uuids)})
            )
        return response

    async def PreStartContainer(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._gate()
        return dp.PreStartContainerResponse()


def socket_identity(path: str) -> Optional[Tuple[int, int]]:
    """What the FS watcher compares: a new socket file has a new inode or change time."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino, st.st_ctime_ns


class PluginContainer:
    """One run of the plugin container; ``run()`` returns its exit code."""

    def __init__(self, node: "SimNode", pod: "PodRecord") -> None:
        self.node = node
        self.pod = pod
        self.log = ContainerLog()
        self.servers: List[ResourceServer] = []
        self.config: Optional[PluginConfig] = None
        self.state = "starting"
        self.hung = False
        self.watching = False
        self.kubelet_socket_seen: Optional[Tuple[int, int]] = None
        self.event_watch: Any = None
        self.health_key: Optional[Tuple[int, int, int]] = None
        self.ignored_xids: Set[int] = set(IGNORED_XIDS)
        self._wake = asyncio.Event()
        self._flags: Set[str] = set()

    # ---- signals from outside -----------------------------------------------------------

    def _signal(self, flag: str) -> None:
        self._flags.add(flag)
        self._wake.set()

    def request_stop(self) -> None:
        """SIGTERM: the pod is being deleted."""
        self._signal("stop")

    def request_crash(self) -> None:
        """The process dies (exit 1)."""
        self._signal("crash")

    def request_restart(self) -> None:
        """SIGHUP: stop and start the plugins again without exiting."""
        self._signal("sighup")

    def kubelet_socket_created(self) -> None:
        self._signal("kubelet")

    def hang(self) -> None:
        """Wedge the process: every RPC (and any further stream update) blocks forever."""
        self.hung = True
        self.state = "hung"

    async def stop_serving(self) -> None:
        """The process stays up but serves nothing any more (its socket goes, the kubelet's
        stream ends); it idles until restarted."""
        await self._stop_servers(log=False)
        await self._close_health()
        self.state = "idle"

    # ---- the program ----------------------------------------------------------------------

    async def run(self) -> int:
        try:
            return await self._main()
        finally:
            self.watching = False
            await self._stop_servers(log=False)
            await self._close_health()
            self.state = "exited"

    async def _main(self) -> int:
        log = self.log
        log.info("main.go:235", '"Starting NVIDIA Device Plugin" version=<\n\t%s\n\tcommit: %s\n >' % (PLUGIN_VERSION, PLUGIN_COMMIT))
        log.info("main.go:238", "Starting FS watcher for %s" % CONTAINER_DEVICE_PLUGIN_DIR)
        self.kubelet_socket_seen = socket_identity(self.node.layout.kubelet_socket)
        self.watching = True
        log.info("main.go:245", "Starting OS watcher.")
        while True:
            log.info("main.go:260", "Starting Plugins.")
            outcome, retry_after = await self._start_plugins()
            if outcome == EXIT:
                return 1
            loop = asyncio.get_running_loop()
            deadline = loop.time() + retry_after if retry_after is not None else None
            reason = await self._next_event(deadline)
            if reason == "stop":
                log.info("main.go:301", 'Received signal "terminated", shutting down.')
                log.info("main.go:353", "Stopping plugins.")
                await self._stop_servers(log=True)
                return 0
            if reason == "crash":
                return 1
            if reason == "kubelet":
                log.info("main.go:282", "inotify: %s created, restarting." % CONTAINER_KUBELET_SOCKET)
            elif reason == "sighup":
                log.info("main.go:293", "Received SIGHUP, restarting.")
            log.info("main.go:353", "Stopping plugins.")
            await self._stop_servers(log=True)
            await self._close_health()

    async def _next_event(self, deadline: Optional[float]) -> str:
        loop = asyncio.get_running_loop()
        while True:
            for flag in ("stop", "crash", "kubelet", "sighup"):
                if flag in self._flags:
                    self._flags.discard(flag)
                    return flag
            self._wake.clear()
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            if timeout == 0.0:
                return "retry"
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                return "retry"

    async def _start_plugins(self) -> Tuple[str, Optional[float]]:
        log = self.log
        fleet = self.node.fleet
        self.state = "starting"
        self.hung = False
        log.info("main.go:317", "Loading configuration.")
        try:
            config = await fleet.load_plugin_config(self.pod.pod)
        except ConfigError as exc:
            log.error("main.go:173", "error starting plugins: %s" % exc)
            return EXIT, None
        self.config = config
        self.ignored_xids = set(IGNORED_XIDS) | set(config.disabled_xids)
        log.info("main.go:342", "Updating config with default resource matching patterns.")
        log.info("main.go:353", "\nRunning with config:\n%s" % json.dumps(config.as_json(), indent=2))
        log.info("main.go:356", "Retrieving plugins.")

        crash = self.node.fault("plugin_crash")
        signature = crash.args.get("signature", "nvml_init_failed") if crash else None
        if self.node.fault("stale_socket_file"):
            self.state = "idle"  # wedged before serving; the leftover file stays
            return IDLE, None
        if signature == "incompatible_strategy" or not self.pod.sandbox_has_nvidia:
            return self._incompatible(config)
        probe = await fleet.nvml(fleet.gateway.probe, self.node.layout.nvml_state)
        init_error = probe.init_error
        if signature == "nvml_init_failed":
            init_error = init_error or crash.args.get("error", "ERROR_UNKNOWN")
        if init_error == "ERROR_LIBRARY_NOT_FOUND":
            return self._incompatible(config)
        log.info("factory.go:104", "Detected NVML platform: found NVML library")
        log.info("factory.go:104", "Detected non-Tegra platform: /sys/devices/soc0/family file not found")
        if init_error:
            return self._nvml_failed(config, init_error)
        if probe.enumerate_error:
            log.error(
                "main.go:173",
                "error starting plugins: error getting plugins: unable to create plugins: failed to construct "
                "resource managers: failed to construct NVML resource managers: error building device map: "
                "error building device map from config.resources: error visiting devices: %s" % probe.enumerate_error,
            )
            return EXIT, None
        gpus = [] if self.node.fault("plugin_no_devices") else probe.devices
        if not gpus:
            return self._waiting_indefinitely()

        server = ResourceServer(self, config.resource_name, build_devices(gpus, config))
        await server.start()
        self.servers.append(server)
        log.info("server.go:216", "Starting GRPC server for '%s'" % server.resource)
        log.info("server.go:147", "Starting to serve '%s' on %s" % (server.resource, server.container_socket_path))
        if self.node.fault("plugin_hang"):
            self.hang()  # Register never returns: the process is wedged from here on
            return RUNNING, None
        error = await self._register(server)
        if error is not None:
            log.info("server.go:151", "Could not register device plugin: %s" % error)
            await server.stop()
            self.servers.remove(server)
            log.error("main.go:272", "Could not contact Kubelet. Did you enable the device plugin feature gate?")
            log.error("main.go:273", _PREREQUISITES)
            log.error("main.go:274", _QUICK_START)
            if signature == "registration_failed":
                return EXIT, None
            log.info("main.go:278", "Failed to start one or more plugins. Retrying in 30s...")
            self.state = "retrying"
            return RETRY, fleet.plugin_retry_s
        log.info("server.go:154", "Registered device plugin for '%s' with Kubelet" % server.resource)
        self.state = "serving"
        if not config.health_checks_disabled:
            await self._open_health(server)
        return RUNNING, None

    def _incompatible(self, config: PluginConfig) -> Tuple[str, Optional[float]]:
        log = self.log
        log.error("factory.go:112", "Incompatible strategy detected auto")
        log.error("factory.go:113", "If this is a GPU node, did you configure the NVIDIA Container Toolkit?")
        log.error("factory.go:114", _PREREQUISITES)
        log.error("factory.go:115", _QUICK_START)
        log.error("factory.go:116", _NOT_A_GPU_NODE)
        if config.fail_on_init_error:
            log.error(
                "main.go:173",
                "error starting plugins: error getting plugins: unable to create plugins: failed to construct "
                "resource managers: invalid device discovery strategy",
            )
            return EXIT, None
        return self._waiting_indefinitely()

    def _nvml_failed(self, config: PluginConfig, error: str) -> Tuple[str, Optional[float]]:
        log = self.log
        log.error("factory.go:79", "Failed to initialize NVML: %s." % error)
        log.error("factory.go:80", "If this is a GPU node, did you set the docker default runtime to `nvidia`?")
        log.error("factory.go:81", _PREREQUISITES)
        log.error("factory.go:82", _QUICK_START)
        log.error("factory.go:83", _NOT_A_GPU_NODE)
        if config.fail_on_init_error:
            log.error(
                "main.go:173",
                "error starting plugins: error getting plugins: unable to create plugins: failed to construct "
                "resource managers: failed to initialize NVML: %s" % error,
            )
            return EXIT, None
        return self._waiting_indefinitely()

    def _waiting_indefinitely(self) -> Tuple[str, Optional[float]]:
        self.log.info("main.go:366", "No devices found. Waiting indefinitely.")
        self.state = "idle"
        return IDLE, None

    async def _register(self, server: ResourceServer) -> Optional[str]:
        """Register with the kubelet; the error text the real plugin logs, or None."""
        socket_path = self.node.layout.kubelet_socket
        if not is_socket(socket_path):
            return "context deadline exceeded"  # the plugin's 5 s blocking dial
        channel = grpc.aio.insecure_channel("unix:" + socket_path)
        try:
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout=5)
            except asyncio.TimeoutError:
                return "context deadline exceeded"
            request = dp.RegisterRequest(
                version="v1beta1",
                endpoint=os.path.basename(server.socket_path),
                resource_name=server.resource,
                options=dp.DevicePluginOptions(get_preferred_allocation_available=True),
            )
            try:
                await dp.REGISTRATION.stub(channel).Register(request, timeout=15)
            except grpc.RpcError as exc:
                return rpc_error_text(exc)
            return None
        finally:
            await channel.close()

    async def _stop_servers(self, log: bool) -> None:
        servers, self.servers = self.servers, []
        for server in servers:
            await server.stop(log=log)

    # ---- health -----------------------------------------------------------------------------

    async def _open_health(self, server: ResourceServer) -> None:
        fleet = self.node.fleet
        uuids = sorted({d.uuid for d in server.devices.values()})
        watch, failed = await fleet.nvml(fleet.gateway.open_events, self.node.layout.nvml_state, uuids)
        for uuid in failed:
            self.log.info("health.go:127", "Marking device %s as unhealthy: could not register for events" % uuid)
            server.mark_unhealthy(uuid)
        if watch is not None:
            # an event set only sees events raised after it was created
            await fleet.nvml(fleet.gateway.poll_events, watch)
        self.event_watch = watch
        self.health_key = fleet.state_key(self.node.layout.nvml_state)

    async def _close_health(self) -> None:
        watch, self.event_watch = self.event_watch, None
        if watch is not None:
            fleet = self.node.fleet
            await fleet.nvml(fleet.gateway.close_events, watch)

    async def check_health(self) -> None:
        """Deliver the XID events NVML queued since the last check (the fleet calls this when
        the node's NVML state changed)."""
        watch = self.event_watch
        if watch is None or self.hung:
            return
        fleet = self.node.fleet
        try:
            events = await fleet.nvml(fleet.gateway.poll_events, watch)
        except Exception as exc:  # noqa: BLE001 - any NVML error: the plugin marks all unhealthy
            self.log.info("health.go:141", "Error waiting for event: %s; marking all devices as unhealthy" % exc)
            for server in self.servers:
                server.mark_unhealthy(None)
            return
        for uuid, xid in events:
            if xid in self.ignored_xids:
                continue
            if not uuid:
                self.log.info("health.go:153", "XidCriticalError: Xid=%d, All devices will go unhealthy." % xid)
                for server in self.servers:
                    server.mark_unhealthy(None)
                continue
            self.log.info("health.go:159", "XidCriticalError: Xid=%d on Device=%s, the device will go unhealthy." % (xid, uuid))
            for server in self.servers:
                server.mark_unhealthy(uuid)

    def summary(self) -> Dict[str, Any]:
        devices = {}
        for server in self.servers:
            devices[server.resource] = {
                "socket": server.socket_path,
                "devices": len(server.devices),
                "unhealthy": sorted(d.id for d in server.devices.values() if d.health != HEALTHY),
            }
        return {"state": self.state, "resources": devices}
