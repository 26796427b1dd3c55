"""The node runtime: every simulated node of a fleet in one event loop.

:class:`NodeFleet` implements :class:`lab.contracts.NodeRuntime` (the API server's DaemonSet
controller starts and stops plugin pods through it) and reports back through
:class:`lab.contracts.ClusterHooks`. It owns, per node: the directory tree, the NVML state
file, the kubelet stand-in (:mod:`lab.node.kubelet`), the plugin pod and its container
(:mod:`lab.node.plugin`) and the node's faults.

Threads: one asyncio loop thread runs every gRPC server, client and container; one worker
thread calls NVML (the lab library's state path is process-wide); one worker thread calls the
ClusterHooks in order (so a status update never waits on, nor blocks, the loop). Public
methods are thread-safe; the NodeRuntime ones never block (the API server may call them while
holding its own locks).

Crash model: a container that exits is restarted by the "kubelet" after a back-off of
``crash_backoff[0]`` seconds doubling up to ``crash_backoff[1]`` (0.3 s .. 2 s; the real
kubelet uses 10 s .. 5 min), reset after 10 s of running; between runs the pod reports
``CrashLoopBackOff``, and each restart adds one to ``restart_count``. Containers are not
restarted while the node's kubelet is down.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import sys
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple, TypeVar

from lab.contracts import NodeSpec, PluginPodStatus

from .faults import CRASH_SIGNATURES, NODE_FAULTS, POD_FAULTS, nvml_faults
from .klog import ContainerLog
from .kubelet import Kubelet, Workload
from .layout import (
    NodeLayout,
    containerd_config_text,
    containerd_has_nvidia,
    create_node_tree,
    is_socket,
    proc_version_text,
    remove_path,
    write_file_atomic,
)
from .nvml_gateway import NvmlGateway
from .plugin import PluginContainer, socket_identity
from .plugin_config import PluginConfig, load_config, plugin_container, runtime_class

LOG = logging.getLogger("lab.node")
T = TypeVar("T")


def rfc3339(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FaultError(ValueError):
    """A fault name or argument the runtime does not know."""


@dataclass
class Fault:
    name: str
    args: Dict[str, Any] = field(default_factory=dict)
    sticky: bool = False


class PodRecord:
    """The node's plugin pod as the kubelet sees it."""

    def __init__(self, pod: Dict[str, Any], sandbox_has_nvidia: bool) -> None:
        meta = pod.get("metadata") or {}
        self.pod = pod
        self.namespace: str = meta.get("namespace", "default")
        self.name: str = meta.get("name", "")
        self.uid: str = meta.get("uid", "")
        self.container_name: str = plugin_container(pod).get("name") or "nvidia-device-plugin-ctr"
        # A pod keeps its sandbox (and runtime) across container restarts, like containerd.
        self.sandbox_has_nvidia = sandbox_has_nvidia
        self.restart_count = 0
        self.deleted = False
        self.deleted_event = asyncio.Event()
        self.container: Optional[PluginContainer] = None
        self.logs: List[ContainerLog] = []
        self.task: Optional[asyncio.Task] = None
        self.status = PluginPodStatus(running=False, ready=False)

    def log_text(self, tail_lines: Optional[int] = None) -> str:
        return self.logs[-1].text(tail_lines) if self.logs else ""


class SimNode:
    """One simulated node. Its methods run on the fleet's loop unless noted."""

    def __init__(self, fleet: "NodeFleet", spec: NodeSpec) -> None:
        self.fleet = fleet
        self.spec = spec
        self.name = spec.name
        self.layout = NodeLayout(spec.name, spec.root)
        self.kubelet = Kubelet(self)
        self.faults: Dict[str, Fault] = {}
        self.workloads: Dict[Tuple[str, str], Workload] = {}
        self.plugin_pod: Optional[PodRecord] = None
        self.kubelet_up = asyncio.Event()
        self.lifecycle = asyncio.Lock()
        self.health_checking = False

    # ---- queries used by the kubelet and the plugin --------------------------------------

    def fault(self, name: str) -> Optional[Fault]:
        return self.faults.get(name)

    def rejects_registration(self) -> bool:
        crash = self.faults.get("plugin_crash")
        return bool(crash and crash.args.get("signature") == "registration_failed")

    def keeps_plugin_socket_on_kubelet_restart(self) -> bool:
        stale = self.faults.get("plugin_stale")
        return bool(stale and stale.args.get("socket") == "kept")

    def on_plugin_registered(self, resource: str) -> None:
        armed = self.faults.get("kubelet_restart")
        if armed and armed.args.get("after") == "register":
            del self.faults["kubelet_restart"]
            asyncio.get_running_loop().create_task(self.restart_kubelet())

    @property
    def container(self) -> Optional[PluginContainer]:
        pod = self.plugin_pod
        return pod.container if pod is not None and not pod.deleted else None

    # ---- kubelet --------------------------------------------------------------------------

    async def start_kubelet(self) -> None:
        await self.kubelet.start()
        self.kubelet_up.set()

    async def stop_kubelet(self) -> None:
        self.kubelet_up.clear()
        await self.kubelet.stop(ready_after=False)

    async def restart_kubelet(self) -> None:
        self.kubelet_up.clear()
        await self.kubelet.restart()
        self.kubelet_up.set()

    # ---- the plugin pod -----------------------------------------------------------------------

    def _sandbox_has_nvidia(self, pod: Dict[str, Any]) -> bool:
        has_handler, is_default = containerd_has_nvidia(self.layout)
        return is_default or (has_handler and runtime_class(pod) == "nvidia")

    async def start_pod(self, pod: Dict[str, Any]) -> None:
        async with self.lifecycle:
            name = (pod.get("metadata") or {}).get("name", "")
            current = self.plugin_pod
            if current is not None and not current.deleted:
                if current.name == name:
                    return
                await self._stop_pod_locked(current)
            record = PodRecord(pod, self._sandbox_has_nvidia(pod))
            self.plugin_pod = record
            record.task = asyncio.get_running_loop().create_task(self._supervise(record))

    async def stop_pod(self, pod_name: str) -> None:
        async with self.lifecycle:
            current = self.plugin_pod
            if current is None or current.name != pod_name or current.deleted:
                return
            await self._stop_pod_locked(current)

    async def _stop_pod_locked(self, record: PodRecord) -> None:
        record.deleted = True
        record.deleted_event.set()
        if record.container is not None:
            record.container.request_stop()
        if record.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(record.task), timeout=10)
            except asyncio.TimeoutError:
                record.task.cancel()
        for name in POD_FAULTS:
            fault = self.faults.get(name)
            if fault is not None and not fault.sticky:
                del self.faults[name]  # a stale file stays until a plugin starts and replaces it

    def _report(self, record: PodRecord) -> None:
        if not record.deleted:
            self.fleet.call_hook("update_pod_status", record.namespace, record.name, record.status)

    async def _supervise(self, record: PodRecord) -> None:
        fleet = self.fleet
        backoff = fleet.crash_backoff[0]
        first = True
        while not record.deleted:
            await self._wait_either(self.kubelet_up.wait(), record.deleted_event.wait())
            if record.deleted:
                break
            if not first:
                record.restart_count += 1
            first = False
            container = PluginContainer(self, record)
            record.container = container
            record.logs = (record.logs + [container.log])[-2:]
            started = time.time()
            previous = record.status
            record.status = PluginPodStatus(
                running=True,
                ready=True,
                restart_count=record.restart_count,
                last_exit_code=previous.last_exit_code,
                last_reason=previous.last_reason,
                started_at=rfc3339(started),
            )
            self._report(record)
            try:
                exit_code = await container.run()
            except Exception:  # noqa: BLE001 - a bug in the stand-in shows as a crash, not a hang
                LOG.exception("node %s: plugin container failed", self.name)
                exit_code = 2
            if record.deleted:
                break
            record.status = PluginPodStatus(
                running=False,
                ready=False,
                restart_count=record.restart_count,
                waiting_reason="CrashLoopBackOff",
                last_exit_code=exit_code,
                last_reason="Error" if exit_code else "Completed",
            )
            self._report(record)
            if time.time() - started >= 10:
                backoff = fleet.crash_backoff[0]
            await self._wait_either(asyncio.sleep(backoff), record.deleted_event.wait())
            backoff = min(backoff * 2, fleet.crash_backoff[1])

    @staticmethod
    async def _wait_either(*awaitables: Awaitable[Any]) -> None:
        tasks = [asyncio.ensure_future(a) for a in awaitables]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()

    # ---- faults ------------------------------------------------------------------------------

    def _remove_stale_file(self) -> None:
        path = self.layout.plugin_socket()
        if os.path.lexists(path) and not is_socket(path):
            remove_path(path)

    async def break_fault(self, name: str, args: Dict[str, Any]) -> Dict[str, Any]:
        sticky = _as_bool(args.pop("sticky", False))
        container = self.container
        if name == "plugin_crash":
            signature = args.setdefault("signature", "nvml_init_failed")
            if signature not in CRASH_SIGNATURES:
                raise FaultError("plugin_crash signature must be one of %s, got %r" % (", ".join(CRASH_SIGNATURES), signature))
            self.faults[name] = Fault(name, args, sticky)
            if container is not None:
                container.request_crash()
        elif name == "plugin_hang":
            self.faults[name] = Fault(name, args, sticky)
            if container is not None:
                container.hang()
        elif name == "plugin_stale":
            if args.setdefault("socket", "removed") not in ("removed", "kept"):
                raise FaultError("plugin_stale socket must be 'removed' or 'kept'")
            self.faults[name] = Fault(name, args, sticky)
        elif name == "plugin_no_devices":
            self.faults[name] = Fault(name, args, sticky)
            if container is not None:
                container.request_restart()
        elif name == "stale_socket_file":
            self.faults[name] = Fault(name, args, sticky)
            if container is not None:
                await container.stop_serving()
            path = self.layout.plugin_socket()
            remove_path(path)
            write_file_atomic(path, "")
        elif name == "kubelet_restart":
            if args.get("after") == "register":
                self.faults[name] = Fault(name, args)
            elif args.get("after") not in (None, ""):
                raise FaultError("kubelet_restart after= only knows 'register'")
            else:
                await self.restart_kubelet()
        elif name == "kubelet_down":
            self.faults[name] = Fault(name, args)
            await self.stop_kubelet()
        elif name == "runtime_missing_nvidia":
            self.faults[name] = Fault(name, args)
            write_file_atomic(self.layout.containerd_config, containerd_config_text(self.layout, with_nvidia=False))
        elif name == "gpu_in_use":
            workload = self._add_workload(args)
            self.faults[name] = Fault(name, {"pods": sorted("%s/%s" % k for k in self.workloads)})
            return {"workload": {"namespace": workload.namespace, "name": workload.name, "devices": workload.device_ids}}
        elif name in nvml_faults():
            await self.fleet.nvml(self._apply_nvml_fault, name, args)
            self.faults[name] = Fault(name, args)
        else:
            raise FaultError("unknown fault %r (known: %s)" % (name, ", ".join(self.fleet.fault_names())))
        return {}

    async def fix_fault(self, name: str, args: Dict[str, Any]) -> Dict[str, Any]:
        fault = self.faults.pop(name, None)
        container = self.container
        if name in ("plugin_hang", "plugin_no_devices", "plugin_stale"):
            if container is not None and fault is not None:
                container.request_restart()
        elif name == "plugin_crash":
            pass  # the crash loop's next start is healthy
        elif name == "stale_socket_file":
            self._remove_stale_file()
            if container is not None and fault is not None:
                container.request_restart()
        elif name == "kubelet_restart":
            pass
        elif name == "kubelet_down":
            if not self.kubelet.running:
                await self.start_kubelet()
        elif name == "runtime_missing_nvidia":
            write_file_atomic(self.layout.containerd_config, containerd_config_text(self.layout, with_nvidia=True))
        elif name == "gpu_in_use":
            pod = args.get("pod")
            for key in list(self.workloads):
                if pod in (None, "", key[1], "%s/%s" % key):
                    del self.workloads[key]
            if self.workloads:
                self.faults[name] = Fault(name, {"pods": sorted("%s/%s" % k for k in self.workloads)})
            if self.kubelet.running:
                self.kubelet.write_checkpoint()
        elif name in nvml_faults():
            await self.fleet.nvml(self._clear_nvml_fault, name, args)
        elif name not in self.fleet.fault_names():
            raise FaultError("unknown fault %r (known: %s)" % (name, ", ".join(self.fleet.fault_names())))
        return {}

    def _add_workload(self, args: Dict[str, Any]) -> Workload:
        namespace = str(args.get("namespace", "default"))
        name = str(args.get("pod", "gpu-workload-%d" % (len(self.workloads) + 1)))
        resource_name = str(args.get("resource", "nvidia.com/gpu"))
        resource = self.kubelet.resources.get(resource_name)
        if args.get("devices"):
            device_ids = [d for d in str(args["devices"]).split(",") if d]
        else:
            count = int(args.get("count", 1))
            busy = {d for w in self.workloads.values() for d in w.device_ids}
            free = [d for d in (resource.healthy_ids() if resource else []) if d not in busy]
            if len(free) < count:
                raise FaultError(
                    "node %s: %d free healthy %s device(s), %d asked (is the plugin registered?)"
                    % (self.name, len(free), resource_name, count)
                )
            device_ids = free[:count]
        workload = Workload(
            namespace=namespace,
            name=name,
            uid=str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, "lab/%s/%s/%s" % (self.name, namespace, name))),
            container=str(args.get("container", "main")),
            resource=resource_name,
            device_ids=device_ids,
        )
        self.workloads[(namespace, name)] = workload
        if self.kubelet.running:
            self.kubelet.write_checkpoint()
        return workload

    def _apply_nvml_fault(self, name: str, args: Dict[str, Any]) -> None:
        from lab import nvml_state

        kwargs = {k: _as_number(v) for k, v in args.items() if k != "kernel_module_version"}
        nvml_state.apply_fault(self.layout.nvml_state, name, **kwargs)
        if name == "driver_not_loaded":
            remove_path(self.layout.proc_driver_version)
        elif name == "driver_library_mismatch":
            version = str(args.get("kernel_module_version", "535.154.05"))
            write_file_atomic(self.layout.proc_driver_version, proc_version_text(version))

    def _clear_nvml_fault(self, name: str, args: Dict[str, Any]) -> None:
        from lab import nvml_state

        kwargs = {k: _as_number(v) for k, v in args.items() if k != "kernel_module_version"}
        state = nvml_state.clear_fault(self.layout.nvml_state, name, **kwargs)
        if name in ("driver_not_loaded", "driver_library_mismatch"):
            write_file_atomic(self.layout.proc_driver_version, proc_version_text(state.get("driver_version", "")))

    def summary(self) -> Dict[str, Any]:
        pod = self.plugin_pod
        container = self.container
        return {
            "root": self.layout.root,
            "kubelet": self.kubelet.summary(),
            "plugin_pod": None
            if pod is None
            else {
                "namespace": pod.namespace,
                "name": pod.name,
                "running": pod.status.running,
                "waiting_reason": pod.status.waiting_reason,
                "restart_count": pod.restart_count,
                "container": container.summary() if container is not None else None,
            },
            "faults": {name: dict(f.args, **({"sticky": True} if f.sticky else {})) for name, f in self.faults.items()},
            "workloads": ["%s/%s" % key for key in self.workloads],
        }


def _as_bool(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _as_number(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


class NodeFleet:
    """All simulated nodes of a lab fleet (implements lab.contracts.NodeRuntime)."""

    def __init__(
        self,
        state_dir: str,
        hooks: Any = None,
        *,
        nvml_library: Optional[str] = None,
        gpu_model: str = "A100",
        crash_backoff: Tuple[float, float] = (0.3, 2.0),
        endpoint_grace_s: float = 300.0,
        plugin_retry_s: float = 30.0,
        watch_interval_s: float = 0.2,
    ) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.hooks = hooks
        self.gpu_model = gpu_model
        self.crash_backoff = crash_backoff
        self.endpoint_grace_s = endpoint_grace_s
        self.plugin_retry_s = plugin_retry_s
        self.watch_interval_s = watch_interval_s
        self.gateway = NvmlGateway(nvml_library)
        self.nodes: Dict[str, SimNode] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._nvml_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lab-nvml")
        self._hook_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lab-hooks")
        self._watch_task: Optional[asyncio.Task] = None

    # ---- loop plumbing ------------------------------------------------------------------

    def start(self) -> "NodeFleet":
        if self._loop is not None:
            return self
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="lab-node-loop", daemon=True)
        self._thread.start()
        ready.wait()
        self._run(self._start_watch())
        return self

    async def _start_watch(self) -> None:
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_loop())

    def _run(self, coro: Awaitable[T], timeout: float = 60.0) -> T:
        """Run a coroutine on the loop from another thread and wait for its result."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("NodeFleet is not started")
        if threading.current_thread() is self._thread:
            raise RuntimeError("blocking NodeFleet call from its own loop thread")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)  # type: ignore[arg-type]

    def _submit(self, coro: Awaitable[Any]) -> None:
        """Schedule a coroutine on the loop without waiting (safe from any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(coro, loop)  # type: ignore[arg-type]
        future.add_done_callback(_log_failure)

    async def nvml(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._nvml_pool, functools.partial(fn, *args))

    def call_hook(self, name: str, *args: Any) -> None:
        """Call a ClusterHooks method in order, off the loop; failures are logged."""
        hooks = self.hooks
        if hooks is None:
            return

        def call() -> None:
            try:
                getattr(hooks, name)(*args)
            except Exception:  # noqa: BLE001 - the API server's problem must not kill a node
                LOG.exception("ClusterHooks.%s%r failed", name, args[:2])

        try:
            self._hook_pool.submit(call)
        except RuntimeError:  # pool shut down
            pass

    async def load_plugin_config(self, pod: Dict[str, Any]) -> PluginConfig:
        hooks = self.hooks

        def get_object(api_version: str, kind: str, namespace: Optional[str], name: str) -> Optional[Dict[str, Any]]:
            return hooks.get_object(api_version, kind, namespace, name) if hooks is not None else None

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._hook_pool, load_config, pod, get_object)

    @staticmethod
    def state_key(path: str) -> Optional[Tuple[int, int, int]]:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    async def _watch_loop(self) -> None:
        """The plugins' FS watch on kubelet.sock, and their NVML health polling."""
        while True:
            await asyncio.sleep(self.watch_interval_s)
            for node in list(self.nodes.values()):
                container = node.container
                if container is None:
                    continue
                if container.watching:
                    identity = socket_identity(node.layout.kubelet_socket)
                    if identity != container.kubelet_socket_seen:
                        container.kubelet_socket_seen = identity
                        if identity is not None and node.fault("plugin_stale") is None:
                            container.kubelet_socket_created()
                if container.event_watch is not None and not node.health_checking:
                    key = self.state_key(node.layout.nvml_state)
                    if key != container.health_key:
                        container.health_key = key
                        node.health_checking = True
                        asyncio.get_running_loop().create_task(self._check_health(node, container))

    @staticmethod
    async def _check_health(node: SimNode, container: PluginContainer) -> None:
        try:
            await container.check_health()
        finally:
            node.health_checking = False

    # ---- nodes ----------------------------------------------------------------------------

    def node_root(self, name: str) -> str:
        return os.path.join(self.state_dir, "nodes", name)

    def add_nodes(self, specs: List[NodeSpec]) -> List[NodeLayout]:
        """Create the nodes' trees and NVML state, and start their kubelets."""
        from lab import nvml_state

        layouts = []
        new_nodes = []
        for spec in specs:
            if not spec.root:
                spec.root = self.node_root(spec.name)
            if spec.name in self.nodes:
                raise ValueError("node %s exists already" % spec.name)
            layout = NodeLayout(spec.name, spec.root)
            state = nvml_state.default_node_state(spec.name, gpu_count=spec.gpu_count, model=self.gpu_model)
            create_node_tree(layout, state.get("driver_version", ""))
            nvml_state.write_state(layout.nvml_state, state)
            layouts.append(layout)
            new_nodes.append(spec)
        self._run(self._add_nodes(new_nodes), timeout=max(60.0, len(new_nodes) * 0.5))
        return layouts

    def add_node(self, spec: NodeSpec) -> NodeLayout:
        return self.add_nodes([spec])[0]

    async def _add_nodes(self, specs: List[NodeSpec]) -> None:
        nodes = [SimNode(self, spec) for spec in specs]
        for node in nodes:
            self.nodes[node.name] = node
        await asyncio.gather(*(node.start_kubelet() for node in nodes))

    def _node(self, name: str) -> SimNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise FaultError("no node %r in this lab (nodes: %s)" % (name, ", ".join(sorted(self.nodes)) or "none")) from None

    def layout(self, name: str) -> NodeLayout:
        return self._node(name).layout

    # ---- NodeRuntime ---------------------------------------------------------------------

    def start_plugin_pod(self, node: str, pod: Dict[str, Any]) -> None:
        target = self.nodes.get(node)
        if target is None:
            LOG.warning("start_plugin_pod: no simulated node %s", node)
            return
        self._submit(target.start_pod(pod))

    def stop_plugin_pod(self, node: str, pod_name: str) -> None:
        target = self.nodes.get(node)
        if target is not None:
            self._submit(target.stop_pod(pod_name))

    def run_workload_pod(self, node: str, pod: Dict[str, Any]) -> Tuple[int, str]:
        """An ordinary pod (the collection's GPU smoke test) on this node: what `nvidia-smi -L`
        prints there, read through NVML like the real container would (WorkloadRunner)."""
        target = self.nodes.get(node)
        if target is None:
            return 1, "lab: no simulated node %s\n" % node
        probe = self.gateway.probe(target.layout.nvml_state)
        if probe.init_error:
            return 9, "Failed to initialize NVML: %s\n" % probe.init_error.replace("ERROR_", "").replace("_", " ").title()
        if probe.enumerate_error:
            return 15, "Unable to determine the device handle for GPU: %s\n" % probe.enumerate_error
        return 0, "".join("GPU %d: %s (UUID: %s)\n" % (d.index, d.name or "NVIDIA GPU", d.uuid) for d in probe.devices)

    def pod_log(self, node: str, pod_name: str, tail_lines: Optional[int] = None) -> str:
        target = self.nodes.get(node)
        pod = target.plugin_pod if target is not None else None
        if pod is None or pod.name != pod_name or pod.deleted:
            return ""
        return pod.log_text(tail_lines)

    # ---- control (blocking; from any thread but the loop's) ------------------------------------

    def restart_kubelet(self, node: str) -> None:
        self._run(self._node(node).restart_kubelet())

    def stop_kubelet(self, node: str) -> None:
        self._run(self._node(node).stop_kubelet())

    def start_kubelet(self, node: str) -> None:
        self._run(self._node(node).start_kubelet())

    def fault_names(self) -> List[str]:
        return list(NODE_FAULTS) + nvml_faults()

    def break_fault(self, node: str, fault: str, **args: Any) -> Dict[str, Any]:
        return self._run(self._node(node).break_fault(fault, dict(args)))

    def fix_fault(self, node: str, fault: str, **args: Any) -> Dict[str, Any]:
        return self._run(self._node(node).fix_fault(fault, dict(args)))

    def status(self) -> Dict[str, Any]:
        async def collect() -> Dict[str, Any]:
            return {name: node.summary() for name, node in sorted(self.nodes.items())}

        return self._run(collect())

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        self.hooks = None  # nothing more goes to the API server

        async def shutdown() -> None:
            if self._watch_task is not None:
                self._watch_task.cancel()
            nodes = list(self.nodes.values())

            async def stop_node(node: SimNode) -> None:
                if node.plugin_pod is not None:
                    async with node.lifecycle:
                        await node._stop_pod_locked(node.plugin_pod)
                node.kubelet_up.clear()
                await node.kubelet.stop(ready_after=None)

            await asyncio.gather(*(stop_node(n) for n in nodes), return_exceptions=True)

        try:
            self._run(shutdown(), timeout=60)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            loop.close()
            self._loop = None
            self._nvml_pool.shutdown(wait=True)
            self._hook_pool.shutdown(wait=True)


def _log_failure(future: "concurrent.futures.Future[Any]") -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        print("lab.node: background task failed: %r" % (exc,), file=sys.stderr)
