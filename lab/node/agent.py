"""The simulated nodes of a lab fleet: one agent per node, a real client of the real API server.

Each :class:`SimNode` is what the cluster sees as a kubelet, with its node's own client
certificate (``system:node:<name>``, held to the Node authorizer and NodeRestriction):

- registers its Node (labels, taints, capacity, addresses, ``daemonEndpoints``, ``nodeInfo``,
  conditions) and updates its status every ``node_status_update_frequency`` seconds when it
  changed (the kubelet's 10 s loop; extended resources come from the device manager at that
  moment, so a registration shows on the Node within one period) and at least every 5 minutes;
- renews its Lease in ``kube-node-lease`` every ``lease_renew_interval`` seconds (10 s):
  the real node lifecycle controller marks it NotReady when the renewals stop;
- LISTs and WATCHes the pods bound to it and runs them (lab/node/pods.py), the device plugin's
  with NVIDIA's real binary;
- serves the device manager's gRPC sockets under its node root (lab/node/kubelet.py) and the
  kubelet's HTTPS endpoint (lab/node/server.py).

``--api-only`` fleets (:class:`LightNode`) keep only what the API sees: a Node that advertises
its GPUs once a device plugin pod runs on it, a Lease, and pods that are Running at once (no
processes), all through one client, as kwok does.

Every node of a fleet lives in one asyncio loop in a thread of the lab daemon; the control
methods of :class:`NodeFleet` are called from other threads and block until done.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import platform
import shutil
import signal
import ssl
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple, TypeVar

from lab.contracts import NodeSpec
from lab.pins import pins

from .containers import ContainerProcess
from .faults import CRASH_SIGNATURES, NODE_FAULTS, POD_FAULTS, nvml_faults
from .images import is_device_plugin
from .kubeapi import ApiError, KubeApi
from .kubelet import AllocationError, Kubelet
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
from .pods import PodWorker, SetupError
from .server import KubeletServer

LOG = logging.getLogger("lab.node")
T = TypeVar("T")

NODE_ADDRESS = "127.0.0.1"
NODE_CPU = "64"
NODE_MEMORY = "528157892Ki"
NODE_PODS = "110"
NODE_EPHEMERAL = "1921725468Ki"
STATUS_REPORT_FREQUENCY = 300.0  # nodeStatusReportFrequency
LEASE_DURATION = 40
GPU_RESOURCE = "nvidia.com/gpu"
POD_IP_PREFIX = "10.244"


def micro_time(when: Optional[float] = None) -> str:
    moment = datetime.fromtimestamp(when if when is not None else time.time(), timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339(when: Optional[float] = None) -> str:
    moment = datetime.fromtimestamp(when if when is not None else time.time(), timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class FaultError(ValueError):
    """A fault name or argument the fleet does not know."""


@dataclass
class Fault:
    name: str
    args: Dict[str, Any] = field(default_factory=dict)
    sticky: bool = False
    pod_uid: Optional[str] = None  # pod-scoped faults: the plugin pod they belong to


def _as_bool(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _as_number(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


def extended_requests(container: Dict[str, Any]) -> Dict[str, int]:
    """Extended resources a container asks for (limits, which must equal requests)."""
    resources = container.get("resources") or {}
    wanted: Dict[str, int] = {}
    for source in (resources.get("requests") or {}, resources.get("limits") or {}):
        for name, value in source.items():
            if "/" in name and not name.startswith(("kubernetes.io/", "hugepages-")):
                try:
                    wanted[name] = int(str(value))
                except ValueError:
                    continue
    return wanted


class BaseNode:
    """What a full and a light node share: the Node object, its status and its Lease."""

    def __init__(self, fleet: "NodeFleet", spec: NodeSpec, index: int) -> None:
        self.fleet = fleet
        self.spec = spec
        self.name = spec.name
        self.index = index
        self.address = NODE_ADDRESS
        self.kubelet_port = 0
        self.api: KubeApi = fleet.api_for(spec.name)
        self.boot_id = str(uuidlib.uuid4())
        self.machine_id = uuidlib.uuid5(uuidlib.NAMESPACE_DNS, "lab/" + spec.name).hex
        self._status_sent: Optional[Dict[str, Any]] = None
        self._status_sent_at = 0.0
        self._reported_extended: set = set()
        self._status_dirty = asyncio.Event()
        self._tasks: List[asyncio.Task] = []
        self._next_ip = 2
        self.workers: Dict[str, Any] = {}
        self.heartbeats = True
        self.node_uid = ""
        self._transitions: Dict[Tuple[str, str], str] = {}

    # ---- API objects ---------------------------------------------------------------------

    def node_object(self) -> Dict[str, Any]:
        labels = {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64"}
        labels.update(self.spec.labels)
        spec: Dict[str, Any] = {}
        if self.spec.taints:
            spec["taints"] = [dict(t) for t in self.spec.taints]
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, "labels": labels}, "spec": spec}

    async def register(self) -> None:
        try:
            created = await self.api.create("/api/v1/nodes", self.node_object())
        except ApiError as exc:
            if exc.status != 409:
                raise
            created = await self.api.get("/api/v1/nodes/%s" % self.name)
        self.node_uid = str(((created or {}).get("metadata") or {}).get("uid", ""))
        await self.push_status(force=True)

    def extended_capacity(self) -> Tuple[Dict[str, str], Dict[str, str]]:
        return {}, {}

    def ready(self) -> bool:
        return True

    def status_object(self, ready: bool) -> Dict[str, Any]:
        extended_capacity, extended_allocatable = self.extended_capacity()
        capacity = {"cpu": NODE_CPU, "memory": NODE_MEMORY, "pods": NODE_PODS, "ephemeral-storage": NODE_EPHEMERAL,
                    "hugepages-1Gi": "0", "hugepages-2Mi": "0"}
        allocatable = dict(capacity)
        capacity.update(extended_capacity)
        allocatable.update(extended_allocatable)
        gone = self._reported_extended - set(extended_capacity)
        for name in gone:  # a resource the device manager dropped leaves the Node
            capacity[name] = None  # type: ignore[assignment]
            allocatable[name] = None  # type: ignore[assignment]
        conditions = [
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            ("Ready", "True" if ready else "False", "KubeletReady" if ready else "KubeletNotReady",
             "kubelet is posting ready status" if ready else "container runtime status check may not have completed yet"),
        ]
        return {
            "capacity": capacity,
            "allocatable": allocatable,
            "conditions": [{"type": t, "status": s, "reason": r, "message": m} for t, s, r, m in conditions],
            "addresses": [{"type": "InternalIP", "address": self.address}, {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {
                "machineID": self.machine_id, "systemUUID": self.machine_id, "bootID": self.boot_id,
                "kernelVersion": platform.release(), "osImage": "Ubuntu 22.04.5 LTS",
                "containerRuntimeVersion": "containerd://1.7.27", "kubeletVersion": pins()["KUBERNETES_VERSION"],
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
            },
        }

    async def push_status(self, force: bool = False) -> None:
        status = self.status_object(self.ready())
        unchanged = status == self._status_sent
        if unchanged and not force and time.monotonic() - self._status_sent_at < STATUS_REPORT_FREQUENCY:
            return
        now = rfc3339()
        body_status = dict(status)
        body_status["conditions"] = [dict(c, lastHeartbeatTime=now, lastTransitionTime=self._transition(c))
                                     for c in status["conditions"]]
        await self.api.patch("/api/v1/nodes/%s/status" % self.name, {"status": body_status})
        self._status_sent = status
        self._status_sent_at = time.monotonic()
        self._reported_extended = {k for k, v in status["capacity"].items() if "/" in k and v is not None}

    def _transition(self, condition: Dict[str, Any]) -> str:
        key = (condition["type"], condition["status"])
        previous = next((s for (t, s) in self._transitions if t == condition["type"]), None)
        if previous != condition["status"]:
            self._transitions = {k: v for k, v in self._transitions.items() if k[0] != condition["type"]}
            self._transitions[key] = rfc3339()
        return self._transitions[key]

    def resources_changed(self) -> None:
        self._status_dirty.set()

    async def status_loop(self) -> None:
        """The kubelet's node status loop: every period, a patch when something changed."""
        interval = self.fleet.node_status_update_frequency
        while True:
            try:
                await asyncio.wait_for(self._status_dirty.wait(), timeout=interval)
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - self._status_sent_at)))
            except asyncio.TimeoutError:
                pass
            self._status_dirty.clear()
            if not self.heartbeats:
                continue
            try:
                await self.push_status()
            except Exception as exc:  # noqa: BLE001 - the next period retries, as the kubelet
                LOG.info("node %s: status update failed: %r", self.name, exc)

    async def lease_loop(self) -> None:
        path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/%s" % self.name
        while True:
            if self.heartbeats:
                try:
                    await self.renew_lease(path)
                except Exception as exc:  # noqa: BLE001
                    LOG.info("node %s: lease renewal failed: %r", self.name, exc)
            await asyncio.sleep(self.fleet.lease_renew_interval)

    async def renew_lease(self, path: str) -> None:
        lease = await self.api.get(path, ok_missing=True)
        now = micro_time()
        if lease is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": "kube-node-lease",
                                 "ownerReferences": self._lease_owner()},
                    "spec": {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_DURATION, "renewTime": now}}
            try:
                await self.api.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", body)
            except ApiError as exc:
                if exc.status != 409:
                    raise
            return
        lease.setdefault("spec", {})["renewTime"] = now
        lease["spec"]["holderIdentity"] = self.name
        lease["spec"]["leaseDurationSeconds"] = LEASE_DURATION
        await self.api.put(path, lease)

    def _lease_owner(self) -> List[Dict[str, Any]]:
        if not self.node_uid:
            return []
        return [{"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self.node_uid}]

    def allocate_pod_ip(self) -> str:
        ip = "%s.%d.%d" % (POD_IP_PREFIX, self.index % 256, self._next_ip)
        self._next_ip = self._next_ip + 1 if self._next_ip < 254 else 2
        return ip

    def service_env(self) -> Dict[str, str]:
        port = self.fleet.api_port
        return {"KUBERNETES_SERVICE_HOST": NODE_ADDRESS, "KUBERNETES_SERVICE_PORT": str(port),
                "KUBERNETES_SERVICE_PORT_HTTPS": str(port), "KUBERNETES_PORT": "tcp://%s:%d" % (NODE_ADDRESS, port),
                "KUBERNETES_PORT_443_TCP": "tcp://%s:%d" % (NODE_ADDRESS, port),
                "KUBERNETES_PORT_443_TCP_PROTO": "tcp", "KUBERNETES_PORT_443_TCP_PORT": str(port),
                "KUBERNETES_PORT_443_TCP_ADDR": NODE_ADDRESS}

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.append(task)
        task.add_done_callback(lambda done: self._tasks.remove(done) if done in self._tasks else None)
        return task


class SimNode(BaseNode):
    """A full simulated node: device manager, kubelet endpoint, real containers."""

    def __init__(self, fleet: "NodeFleet", spec: NodeSpec, index: int) -> None:
        super().__init__(fleet, spec, index)
        self.layout = NodeLayout(spec.name, spec.root)
        self.kubelet = Kubelet(self)
        self.server = KubeletServer(self, fleet.kubelet_ssl_context())
        self.faults: Dict[str, Fault] = {}
        self.workers: Dict[str, PodWorker] = {}
        self.kubelet_up = asyncio.Event()
        self.endpoint_grace_s = fleet.endpoint_grace_s
        self.crash_backoff = fleet.crash_backoff
        self._watch_task: Optional[asyncio.Task] = None
        self._events_sent: Dict[Tuple[str, str, str], float] = {}

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.kubelet.start()
        self.kubelet_port = await self.server.start()
        await self.register()
        self.kubelet_up.set()
        self.spawn(self.status_loop())
        self.spawn(self.lease_loop())
        self._watch_task = self.spawn(self.watch_pods())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await asyncio.gather(*(w.kill() for w in list(self.workers.values())), return_exceptions=True)
        await self.kubelet.stop()
        await self.server.stop()
        await self.api.close()

    def ready(self) -> bool:
        return self.kubelet.running

    def kubelet_stopped(self) -> bool:
        return not self.kubelet_up.is_set()

    def extended_capacity(self) -> Tuple[Dict[str, str], Dict[str, str]]:
        return self.kubelet.capacity(), self.kubelet.allocatable()

    # ---- pods -------------------------------------------------------------------------------

    async def watch_pods(self) -> None:
        query = {"fieldSelector": "spec.nodeName=%s" % self.name}
        async for kind, obj in self.api.list_and_watch("/api/v1/pods", query):
            if kind == "SYNC":
                seen = set()
                for pod in obj["items"]:
                    seen.add(pod["metadata"]["uid"])
                    self.pod_event(pod)
                for uid in [u for u in self.workers if u not in seen]:
                    self.spawn(self.workers[uid].kill())
            elif kind == "DELETED":
                worker = self.workers.get(obj["metadata"]["uid"])
                if worker is not None:
                    self.spawn(worker.kill())
            else:
                self.pod_event(obj)

    def pod_event(self, pod: Dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if worker is not None:
            worker.update(pod)
            return
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            return
        if pod["metadata"].get("deletionTimestamp"):
            self.spawn(self._finalize_unknown(pod))
            return
        worker = PodWorker(self, pod)
        self.workers[uid] = worker
        if worker.is_plugin():
            for fault in self.faults.values():
                if fault.name in POD_FAULTS and fault.pod_uid is None:
                    fault.pod_uid = uid
        worker.start()

    async def _finalize_unknown(self, pod: Dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            await self.api.delete("/api/v1/namespaces/%s/pods/%s" % (meta["namespace"], meta["name"]),
                                  {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}})
        except ApiError:
            pass

    def pod_worker(self, namespace: str, name: str) -> Optional[PodWorker]:
        for worker in self.workers.values():
            if worker.namespace == namespace and worker.name == name:
                return worker
        return None

    def plugin_worker(self) -> Optional[PodWorker]:
        for worker in self.workers.values():
            if worker.is_plugin() and not worker.deleting:
                return worker
        return None

    def pod_stopped(self, worker: PodWorker) -> None:
        self.kubelet.release(worker.uid)
        self.workers.pop(worker.uid, None)
        for name, fault in list(self.faults.items()):
            if name in POD_FAULTS and fault.pod_uid == worker.uid:
                if fault.sticky:
                    fault.pod_uid = None
                else:
                    del self.faults[name]
        shutil.rmtree(worker.dir, ignore_errors=True)
        shutil.rmtree(os.path.join(self.layout.root, "run", "containerd", "lab", worker.uid), ignore_errors=True)
        if worker.is_plugin():
            # a device-plugins directory replaced under this plugin (plugin_stale) goes with it
            parent, base = os.path.split(self.layout.device_plugin_dir)
            for name in os.listdir(parent):
                if name.startswith(base + ".replaced-"):
                    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)

    def pod_resources_view(self) -> List[Tuple[str, str, str, List[str]]]:
        return [(w.namespace, w.name, w.uid, list(w.containers)) for w in self.workers.values()
                if w.phase in ("Pending", "Running")]

    async def admit(self, worker: PodWorker) -> None:
        for container in (worker.spec.get("initContainers") or []) + (worker.spec.get("containers") or []):
            for resource, count in extended_requests(container).items():
                if resource not in self.kubelet.resources or count <= 0:
                    continue  # not a device plugin resource: the kubelet leaves it to the scheduler
                try:
                    held = await self.kubelet.allocate(worker.uid, worker.namespace, worker.name, container["name"],
                                                       resource, count)
                except AllocationError as exc:
                    raise SetupError("UnexpectedAdmissionError", "Allocate failed due to %s, which is unexpected" % exc,
                                     fatal=True)
                worker.devices.setdefault(container["name"], {})[resource] = list(held.device_ids)
                worker.device_envs.setdefault(container["name"], {}).update(dict(held.response.envs))

    async def sandbox_runtime(self, worker: PodWorker) -> bool:
        """Does the pod's sandbox get the nvidia runtime? Its RuntimeClass handler, else the
        node's default runtime (containerd config). Pod-scoped lab faults shape the plugin's."""
        has_handler, is_default = containerd_has_nvidia(self.layout)
        class_name = worker.spec.get("runtimeClassName")
        nvidia = is_default
        if class_name:
            runtime_class = None
            try:
                runtime_class = await self.api.get("/apis/node.k8s.io/v1/runtimeclasses/%s" % class_name,
                                                   ok_missing=True)
            except ApiError as exc:
                raise SetupError("FailedCreatePodSandBox", "Failed to create pod sandbox: %s" % exc.message)
            if runtime_class is None:
                raise SetupError("FailedCreatePodSandBox", 'Failed to create pod sandbox: RuntimeClass "%s" not found'
                                 % class_name)
            handler = runtime_class.get("handler", "")
            if handler == "nvidia" and not has_handler:
                raise SetupError("FailedCreatePodSandBox", 'Failed to create pod sandbox: rpc error: code = Unknown desc '
                                 '= failed to get sandbox runtime: no runtime for "nvidia" is configured')
            nvidia = handler == "nvidia"
        if worker.is_plugin():
            crash = self._pod_fault("plugin_crash", worker)
            if crash is not None:
                signature = crash.args.get("signature", "nvml_init_failed")
                if signature == "incompatible_strategy":
                    nvidia = False
                elif signature == "nvml_init_failed":
                    worker.sandbox_env["GPUNODE_LAB_NVML_INIT_ERROR"] = str(nvml_code(crash.args.get("error", "ERROR_UNKNOWN")))
            if self._pod_fault("plugin_no_devices", worker) is not None:
                worker.sandbox_env["NVIDIA_VISIBLE_DEVICES"] = "void"
        return nvidia

    def container_started(self, worker: PodWorker, name: str, process: ContainerProcess) -> None:
        hang = self._pod_fault("plugin_hang", worker)
        if hang is not None and worker.is_plugin():
            # give the plugin the time to bind its socket, then wedge it
            asyncio.get_running_loop().call_later(float(hang.args.get("after", 2.0)), process.send, signal.SIGSTOP)

    def container_exited(self, worker: PodWorker, name: str, code: int, process: ContainerProcess) -> None:
        LOG.info("node %s: container %s of %s/%s exited %d", self.name, name, worker.namespace, worker.name, code)

    async def event(self, worker: PodWorker, kind: str, reason: str, message: str) -> None:
        key = (worker.uid, reason, message)
        if key in self._events_sent:
            return
        self._events_sent[key] = time.time()
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": worker.name + ".", "namespace": worker.namespace},
            "involvedObject": {"kind": "Pod", "namespace": worker.namespace, "name": worker.name, "uid": worker.uid,
                               "apiVersion": "v1"},
            "reason": reason, "message": message, "type": kind, "source": {"component": "kubelet", "host": self.name},
            "firstTimestamp": rfc3339(), "lastTimestamp": rfc3339(), "count": 1,
            "reportingComponent": "kubelet", "reportingInstance": self.name,
        }
        try:
            await self.api.create("/api/v1/namespaces/%s/events" % worker.namespace, body)
        except Exception as exc:  # noqa: BLE001 - events are best effort, as the kubelet's
            LOG.info("node %s: event %s: %r", self.name, reason, exc)

    async def service_account_token(self, worker: PodWorker, source: Dict[str, Any]) -> str:
        account = worker.spec.get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [source["audience"]] if source.get("audience") else None,
                         "expirationSeconds": int(source.get("expirationSeconds") or 3607),
                         "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": worker.name, "uid": worker.uid}}}
        try:
            answer = await self.api.create("/api/v1/namespaces/%s/serviceaccounts/%s/token" % (worker.namespace, account),
                                           body)
        except ApiError as exc:
            raise SetupError("FailedMount", 'MountVolume.SetUp failed for volume "kube-api-access": %s' % exc.message)
        return str(((answer or {}).get("status") or {}).get("token", ""))

    # ---- what the device manager asks of its node ------------------------------------------------

    def _pod_fault(self, name: str, worker: PodWorker) -> Optional[Fault]:
        fault = self.faults.get(name)
        if fault is None:
            return None
        if fault.pod_uid in (None, worker.uid):
            fault.pod_uid = worker.uid
            return fault
        return None

    def rejects_registration(self) -> bool:
        crash = self.faults.get("plugin_crash")
        return bool(crash and crash.args.get("signature") == "registration_failed")

    def plugin_misses_kubelet_restart(self) -> Optional[str]:
        stale = self.faults.get("plugin_stale")
        return str(stale.args.get("socket", "removed")) if stale else None

    def on_plugin_registered(self, resource: str) -> None:
        armed = self.faults.get("kubelet_restart")
        if armed and armed.args.get("after") == "register":
            del self.faults["kubelet_restart"]
            asyncio.get_running_loop().create_task(self.restart_kubelet())

    # ---- kubelet restarts --------------------------------------------------------------------

    async def restart_kubelet(self) -> None:
        await self.kubelet.restart()
        if self.heartbeats:  # a starting kubelet syncs its Node status at once (the checkpoint's zeros)
            await self.push_status(force=True)

    async def stop_kubelet(self) -> None:
        """The kubelet stops: no gRPC sockets, no HTTPS endpoint, no heartbeats, no pod sync;
        the containers keep running (they are the runtime's)."""
        self.kubelet_up.clear()
        self.heartbeats = False
        if self._watch_task is not None:
            self._watch_task.cancel()
            self._watch_task = None
        await self.kubelet.stop()
        await self.server.stop()

    async def start_kubelet(self) -> None:
        if self.kubelet_up.is_set():
            return
        await self.kubelet.start()
        self.kubelet_port = await self.server.start()
        self.heartbeats = True
        self.kubelet_up.set()
        await self.push_status(force=True)
        self._watch_task = self.spawn(self.watch_pods())
        for worker in self.workers.values():
            self.spawn(worker.resync_status())
            worker.wake.set()

    # ---- faults -------------------------------------------------------------------------------

    async def break_fault(self, name: str, args: Dict[str, Any]) -> Dict[str, Any]:
        sticky = _as_bool(args.pop("sticky", False))
        worker = self.plugin_worker()
        if name in POD_FAULTS:
            fault = Fault(name, args, sticky, worker.uid if worker is not None else None)
        else:
            fault = Fault(name, args)
        process = worker.container_process() if worker is not None else None
        if name == "plugin_crash":
            signature = args.setdefault("signature", "nvml_init_failed")
            if signature not in CRASH_SIGNATURES:
                raise FaultError("plugin_crash signature must be one of %s, got %r" % (", ".join(CRASH_SIGNATURES), signature))
            nvml_code(args.get("error", "ERROR_UNKNOWN"))
            self.faults[name] = fault
            if worker is not None:
                await self._reset_plugin_sandbox(worker)
            if process is not None and signature != "registration_failed":
                process.send(signal.SIGKILL)  # the running container dies; its restarts meet the fault
            elif process is not None:
                process.send(signal.SIGHUP)  # the plugin restarts its plugins and registers again: refused
        elif name == "plugin_hang":
            self.faults[name] = fault
            if process is not None:
                process.send(signal.SIGSTOP)
        elif name == "plugin_stale":
            if args.setdefault("socket", "removed") not in ("removed", "kept"):
                raise FaultError("plugin_stale socket must be 'removed' or 'kept'")
            self.faults[name] = fault
        elif name == "plugin_no_devices":
            self.faults[name] = fault
            if worker is not None:
                await self._reset_plugin_sandbox(worker)
            if process is not None:
                process.send(signal.SIGKILL)
        elif name == "stale_socket_file":
            self.faults[name] = fault
            path = self.layout.plugin_socket()
            remove_path(path)
            write_file_atomic(path, "")
        elif name == "kubelet_restart":
            if args.get("after") == "register":
                self.faults[name] = fault
            elif args.get("after") not in (None, ""):
                raise FaultError("kubelet_restart after= only knows 'register'")
            else:
                await self.restart_kubelet()
        elif name == "kubelet_down":
            self.faults[name] = fault
            await self.stop_kubelet()
        elif name == "runtime_missing_nvidia":
            self.faults[name] = fault
            write_file_atomic(self.layout.containerd_config, containerd_config_text(self.layout, with_nvidia=False))
        elif name == "gpu_in_use":
            return await self._hold_gpus(args)
        elif name in nvml_faults():
            await self.fleet.in_thread(self._apply_nvml_fault, name, args)
            self.faults[name] = fault
        else:
            raise FaultError("unknown fault %r (known: %s)" % (name, ", ".join(self.fleet.fault_names())))
        return {}

    async def _reset_plugin_sandbox(self, worker: PodWorker) -> None:
        """A pod-scoped fault shapes the sandbox of the pod it belongs to: what the pod's next
        container start sees (the pod keeps its sandbox across restarts, as with containerd)."""
        worker.sandbox_env = {}
        worker.nvidia = await self.sandbox_runtime(worker)

    async def fix_fault(self, name: str, args: Dict[str, Any]) -> Dict[str, Any]:
        fault = self.faults.pop(name, None)
        worker = self.plugin_worker()
        process = worker.container_process() if worker is not None else None
        if name == "plugin_hang":
            if process is not None and fault is not None:
                process.send(signal.SIGCONT)
        elif name in ("plugin_crash", "plugin_no_devices"):
            if worker is not None and fault is not None:
                await self._reset_plugin_sandbox(worker)  # the next restart is healthy
        elif name == "plugin_stale":
            if process is not None and fault is not None:
                process.send(signal.SIGKILL)  # a new container gets a fresh mount and registers
        elif name == "stale_socket_file":
            path = self.layout.plugin_socket()
            if os.path.lexists(path) and not is_socket(path):
                remove_path(path)
            if process is not None and fault is not None:
                process.send(signal.SIGHUP)  # the plugin serves its socket anew
        elif name == "kubelet_down":
            await self.start_kubelet()
        elif name == "runtime_missing_nvidia":
            write_file_atomic(self.layout.containerd_config, containerd_config_text(self.layout, with_nvidia=True))
        elif name == "gpu_in_use":
            return await self._release_gpus(args)
        elif name in nvml_faults():
            await self.fleet.in_thread(self._clear_nvml_fault, name, args)
        elif name not in self.fleet.fault_names():
            raise FaultError("unknown fault %r (known: %s)" % (name, ", ".join(self.fleet.fault_names())))
        return {}

    async def _hold_gpus(self, args: Dict[str, Any]) -> Dict[str, Any]:
        """A workload pod on this node that holds GPUs: a real pod, bound here, admitted by the
        device manager (the plugin's Allocate), running ``sleep``."""
        namespace = str(args.get("namespace", "default"))
        name = str(args.get("pod", "gpu-workload-%d" % (len(self.workers) + 1)))
        resource = str(args.get("resource", GPU_RESOURCE))
        count = int(args.get("count", 1))
        await self.fleet.ensure_namespace(namespace)
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"gpunode.lab/workload": "gpu-in-use"}},
            "spec": {"nodeName": self.name, "restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": str(args.get("container", "main")), "image": "nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04",
                                     "command": ["sleep", "infinity"],
                                     "resources": {"limits": {resource: str(count)}}}]},
        }
        created = await self.fleet.lab_api.create("/api/v1/namespaces/%s/pods" % namespace, pod)
        uid = (created or {}).get("metadata", {}).get("uid", "")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            worker = self.workers.get(uid)
            if worker is not None and (worker.phase == "Running" or worker.pod_reason):
                if worker.pod_reason:
                    raise FaultError("node %s: %s/%s was not admitted: %s" % (self.name, namespace, name, worker.pod_message))
                devices = [d for per in worker.devices.values() for ids in per.values() for d in ids]
                self.faults["gpu_in_use"] = Fault("gpu_in_use", {"pods": sorted(self._workload_pods() | {"%s/%s" % (namespace, name)})})
                return {"workload": {"namespace": namespace, "name": name, "devices": devices}}
            await asyncio.sleep(0.1)
        raise FaultError("node %s: workload pod %s/%s did not start within 30s" % (self.name, namespace, name))

    def _workload_pods(self) -> set:
        return {"%s/%s" % (w.namespace, w.name) for w in self.workers.values()
                if (w.pod.get("metadata") or {}).get("labels", {}).get("gpunode.lab/workload") == "gpu-in-use"}

    async def _release_gpus(self, args: Dict[str, Any]) -> Dict[str, Any]:
        wanted = args.get("pod")
        removed = []
        for worker in list(self.workers.values()):
            labels = (worker.pod.get("metadata") or {}).get("labels") or {}
            if labels.get("gpunode.lab/workload") != "gpu-in-use":
                continue
            if wanted not in (None, "", worker.name, "%s/%s" % (worker.namespace, worker.name)):
                continue
            await self.fleet.lab_api.delete("/api/v1/namespaces/%s/pods/%s" % (worker.namespace, worker.name),
                                            {"gracePeriodSeconds": 0})
            removed.append("%s/%s" % (worker.namespace, worker.name))
            await asyncio.wait_for(worker.stopped.wait(), timeout=30)
        left = self._workload_pods() - set(removed)
        if left:
            self.faults["gpu_in_use"] = Fault("gpu_in_use", {"pods": sorted(left)})
        return {"removed": removed}

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
        worker = self.plugin_worker()
        plugin = None
        if worker is not None:
            state = next(iter(worker.containers.values()), None)
            process = worker.container_process()
            plugin = {
                "namespace": worker.namespace,
                "name": worker.name,
                "uid": worker.uid,
                "running": bool(state and state.state == "running"),
                "waiting_reason": state.reason if state and state.state == "waiting" else None,
                "restart_count": state.restart_count if state else 0,
                "pid": process.pid if process is not None and process.running() else None,
                "stopped": bool(process and process.stopped),
                "image": state.image if state else None,
            }
        return {
            "root": self.layout.root,
            "kubelet": self.kubelet.summary(),
            "kubelet_port": self.kubelet_port,
            "plugin_pod": plugin,
            "pods": ["%s/%s" % (w.namespace, w.name) for w in self.workers.values()],
            "faults": {name: dict(f.args, **({"sticky": True} if f.sticky else {})) for name, f in self.faults.items()},
            "workloads": sorted(self._workload_pods()),
        }


def nvml_code(error: Any) -> int:
    """An NVML return code from a name (ERROR_UNKNOWN, NVML_ERROR_UNKNOWN) or a number."""
    text = str(error).strip().upper()
    if text.lstrip("-").isdigit():
        return int(text)
    from lab import nvml_state

    codes = getattr(nvml_state, "NVML_ERRORS", None) or {
        "ERROR_UNINITIALIZED": 1, "ERROR_INVALID_ARGUMENT": 2, "ERROR_NOT_SUPPORTED": 3, "ERROR_NO_PERMISSION": 4,
        "ERROR_DRIVER_NOT_LOADED": 9, "ERROR_LIBRARY_NOT_FOUND": 12, "ERROR_GPU_IS_LOST": 15,
        "ERROR_LIB_RM_VERSION_MISMATCH": 18, "ERROR_UNKNOWN": 999}
    name = text[len("NVML_"):] if text.startswith("NVML_") else text
    if name not in codes:
        raise FaultError("unknown NVML error %r (known: %s)" % (error, ", ".join(sorted(codes))))
    return int(codes[name])


class LightNode(BaseNode):
    """An --api-only node: the Node, its Lease and its pods as the API sees them, no processes."""

    def __init__(self, fleet: "NodeFleet", spec: NodeSpec, index: int) -> None:
        super().__init__(fleet, spec, index)
        self.plugin_pods: Dict[str, Dict[str, Any]] = {}

    async def start(self) -> None:
        await self.register()
        self.spawn(self.status_loop())
        self.spawn(self.lease_loop())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def kubelet_stopped(self) -> bool:
        return False

    def extended_capacity(self) -> Tuple[Dict[str, str], Dict[str, str]]:
        if not self.plugin_pods:
            return {}, {}
        count = str(self.spec.gpu_count)
        return {GPU_RESOURCE: count}, {GPU_RESOURCE: count}

    async def pod_event(self, kind: str, pod: Dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        plugin = any(is_device_plugin(c.get("image", "")) for c in (pod.get("spec") or {}).get("containers") or [])
        if kind == "DELETED":
            if self.plugin_pods.pop(uid, None) is not None:
                self.resources_changed()
            return
        if meta.get("deletionTimestamp"):
            self.plugin_pods.pop(uid, None)
            self.resources_changed()
            await self.api.delete("/api/v1/namespaces/%s/pods/%s" % (meta["namespace"], meta["name"]),
                                  {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}})
            return
        if (pod.get("status") or {}).get("phase") == "Running":
            return
        now = rfc3339()
        statuses = [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": True, "started": True,
                     "restartCount": 0, "state": {"running": {"startedAt": now}}, "lastState": {}}
                    for c in (pod.get("spec") or {}).get("containers") or []]
        status = {"phase": "Running", "hostIP": self.address, "podIP": self.allocate_pod_ip(), "startTime": now,
                  "conditions": [{"type": t, "status": "True", "lastTransitionTime": now}
                                 for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady")],
                  "containerStatuses": statuses}
        await self.api.patch("/api/v1/namespaces/%s/pods/%s/status" % (meta["namespace"], meta["name"]),
                             {"status": status}, ok_missing=True)
        if plugin:
            self.plugin_pods[uid] = pod
            self.resources_changed()

    def summary(self) -> Dict[str, Any]:
        return {"kubelet": {"running": True, "resources": {}}, "plugin_pod": None, "faults": {}, "light": True}


class NodeFleet:
    """All simulated nodes of a lab fleet, in one event loop thread."""

    def __init__(
        self,
        state_dir: str,
        cluster: Any,
        *,
        light: bool = False,
        gpu_model: str = "A100",
        crash_backoff: Tuple[float, float] = (10.0, 300.0),
        endpoint_grace_s: float = 300.0,
        node_status_update_frequency: float = 10.0,
        lease_renew_interval: float = 10.0,
    ) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.cluster = cluster  # lab.cluster.ControlPlane
        self.light = light
        self.gpu_model = gpu_model
        self.crash_backoff = crash_backoff
        self.endpoint_grace_s = endpoint_grace_s
        self.node_status_update_frequency = node_status_update_frequency
        self.lease_renew_interval = lease_renew_interval
        self.api_port = int(cluster.url.rsplit(":", 1)[1]) if cluster is not None else 0
        self.nodes: Dict[str, Any] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="lab-io")
        self._kubelet_ssl: Optional[ssl.SSLContext] = None
        self._light_api: Optional[KubeApi] = None
        self._light_watch: Optional[asyncio.Task] = None
        self.lab_api: KubeApi = None  # type: ignore[assignment]
        self._namespaces: set = set()

    # ---- identities ----------------------------------------------------------------------

    def _client_context(self, cert: Any) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.cluster.ca_file)
        context.load_cert_chain(cert.cert, cert.key)
        return context

    def api_for(self, node: str) -> KubeApi:
        if self.light:
            if self._light_api is None:
                cert = self.cluster.pki.issue("light-kubelet", "system:lab:light-kubelet", ("system:masters",))
                self._light_api = KubeApi(self.cluster.url, self._client_context(cert), "lab-light-kubelet", limit=16)
            return self._light_api
        cert = self.cluster.pki.node_client(node)
        return KubeApi(self.cluster.url, self._client_context(cert), "kubelet/%s (lab; %s)"
                       % (pins()["KUBERNETES_VERSION"], node), limit=4)

    def kubelet_ssl_context(self) -> ssl.SSLContext:
        if self._kubelet_ssl is None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.cluster.ca_file)
            pair = self.cluster.kubelet_serving
            context.load_cert_chain(pair.cert, pair.key)
            context.verify_mode = ssl.CERT_REQUIRED
            self._kubelet_ssl = context
        return self._kubelet_ssl

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
        from lab.cluster import LAB_USER

        lab_cert = self.cluster.pki.issue("lab-client", LAB_USER, ("system:masters",))
        self.lab_api = KubeApi(self.cluster.url, self._client_context(lab_cert), "gpunode-lab", limit=8)
        return self

    def run(self, coro: Awaitable[T], timeout: float = 120.0) -> T:
        """Run a coroutine on the loop from another thread and wait for its result."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("NodeFleet is not started")
        if threading.current_thread() is self._thread:
            raise RuntimeError("blocking NodeFleet call from its own loop thread")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)  # type: ignore[arg-type]

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args))

    async def ensure_namespace(self, namespace: str) -> None:
        if namespace in self._namespaces:
            return
        try:
            await self.lab_api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                             "metadata": {"name": namespace}})
        except ApiError as exc:
            if exc.status != 409:
                raise
        self._namespaces.add(namespace)

    # ---- nodes ----------------------------------------------------------------------------

    def node_root(self, name: str) -> str:
        return os.path.join(self.state_dir, "nodes", name)

    def add_nodes(self, specs: List[NodeSpec]) -> None:
        """Create the nodes' trees and NVML state, register them and start their agents."""
        from lab import nvml_state

        for spec in specs:
            if spec.name in self.nodes:
                raise ValueError("node %s exists already" % spec.name)
            if self.light:
                continue
            if not spec.root:
                spec.root = self.node_root(spec.name)
            layout = NodeLayout(spec.name, spec.root)
            state = nvml_state.default_node_state(spec.name, gpu_count=spec.gpu_count, model=self.gpu_model)
            create_node_tree(layout, state.get("driver_version", ""))
            nvml_state.write_state(layout.nvml_state, state)
            caps = os.path.join(layout.root, "proc", "driver", "nvidia-caps")
            os.makedirs(caps, exist_ok=True)
            write_file_atomic(os.path.join(caps, "mig-minors"), nvml_state.mig_minors_text(state))
        self.run(self._add_nodes(specs), timeout=max(120.0, len(specs) * 0.5))

    async def _add_nodes(self, specs: List[NodeSpec]) -> None:
        start = len(self.nodes)
        kind = LightNode if self.light else SimNode
        nodes = [kind(self, spec, start + i + 1) for i, spec in enumerate(specs)]
        for node in nodes:
            self.nodes[node.name] = node
        semaphore = asyncio.Semaphore(32)

        async def start_one(node: Any) -> None:
            async with semaphore:
                await node.start()

        await asyncio.gather(*(start_one(n) for n in nodes))
        if self.light and self._light_watch is None:
            self._light_watch = asyncio.get_running_loop().create_task(self._watch_light_pods())

    async def _watch_light_pods(self) -> None:
        assert self._light_api is not None
        async for kind, obj in self._light_api.list_and_watch("/api/v1/pods", {"fieldSelector": "spec.nodeName!="}):
            pods = obj["items"] if kind == "SYNC" else [obj]
            for pod in pods:
                node = self.nodes.get((pod.get("spec") or {}).get("nodeName", ""))
                if node is not None:
                    try:
                        await node.pod_event("ADDED" if kind == "SYNC" else kind, pod)
                    except Exception as exc:  # noqa: BLE001
                        LOG.info("light node %s: %r", node.name, exc)

    def _node(self, name: str) -> Any:
        try:
            return self.nodes[name]
        except KeyError:
            raise FaultError("no node %r in this lab (nodes: %s)" % (name, ", ".join(sorted(self.nodes)) or "none")) from None

    def layout(self, name: str) -> NodeLayout:
        node = self._node(name)
        if self.light:
            raise FaultError("node %s is API-only: it has no node root" % name)
        return node.layout

    # ---- control (blocking; from any thread but the loop's) ------------------------------------

    def restart_kubelet(self, node: str) -> None:
        self.run(self._node(node).restart_kubelet())

    def stop_kubelet(self, node: str) -> None:
        self.run(self._node(node).stop_kubelet())

    def start_kubelet(self, node: str) -> None:
        self.run(self._node(node).start_kubelet())

    def fault_names(self) -> List[str]:
        return list(NODE_FAULTS) + nvml_faults()

    def break_fault(self, node: str, fault: str, **args: Any) -> Dict[str, Any]:
        target = self._node(node)
        if self.light:
            raise FaultError("fault %s needs the node runtime; this lab is --api-only" % fault)
        return self.run(target.break_fault(fault, dict(args)))

    def fix_fault(self, node: str, fault: str, **args: Any) -> Dict[str, Any]:
        target = self._node(node)
        if self.light:
            raise FaultError("fault %s needs the node runtime; this lab is --api-only" % fault)
        return self.run(target.fix_fault(fault, dict(args)))

    def status(self) -> Dict[str, Any]:
        async def collect() -> Dict[str, Any]:
            return {name: node.summary() for name, node in sorted(self.nodes.items())}

        return self.run(collect())

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            if self._light_watch is not None:
                self._light_watch.cancel()
            await asyncio.gather(*(n.stop() for n in self.nodes.values()), return_exceptions=True)
            for api in (self._light_api, self.lab_api):
                if api is not None:
                    await api.close()

        try:
            self.run(shutdown(), timeout=90)
        except Exception as exc:  # noqa: BLE001 - stop what can be stopped
            LOG.warning("fleet shutdown: %r", exc)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            loop.close()
            self._loop = None
            self._pool.shutdown(wait=True)
