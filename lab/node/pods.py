"""The pods of one simulated node, run as the kubelet runs them.

A :class:`PodWorker` per pod bound to the node (the real scheduler binds them; the real
DaemonSet controller creates the plugin's) does what the kubelet's pod workers do, as far as
the collection and NVIDIA's plugin can see:

- **admission**: extended resources (``nvidia.com/gpu``...) are allocated by the node's device
  manager (lab/node/kubelet.py), which asks the plugin (``Allocate``); too few devices fails the
  pod (``UnexpectedAdmissionError``, the kubelet's message);
- **sandbox**: the RuntimeClass handler or the node's default runtime decides whether the
  nvidia runtime injects the driver; volumes are set up (hostPath from the node root,
  ConfigMap, Secret, emptyDir, projected service account token and downward API);
  a missing ConfigMap keeps the pod in ContainerCreating;
- **containers**: init containers in order, then the containers, each a sandboxed process
  (lab/node/containers.py) with the environment the kubelet builds (env, envFrom, fieldRefs,
  ``$(VAR)`` expansion, service variables); an image that cannot be pulled waits in
  ErrImagePull / ImagePullBackOff;
- **restarts** per restartPolicy with the kubelet's back-off: the first restart at once, then
  10 s doubling to 5 min, reset after 10 min of running; between runs CrashLoopBackOff;
- **status**: phase, conditions, containerStatuses (state, lastState, restartCount, ready,
  started, image, imageID, containerID), IPs and start time, patched on every change;
- **deletion**: SIGTERM, SIGKILL after the grace period, then the final DELETE with grace 0.

Readiness and liveness probes are not run: a running container is ready (NVIDIA's plugin
DaemonSets define none).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import signal
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from .containers import ContainerProcess, ContainerSpec
from .images import Image, ImagePullError, resolve
from .kubeapi import ApiError

if TYPE_CHECKING:  # pragma: no cover
    from .agent import SimNode

LOG = logging.getLogger("lab.node.pods")

BACKOFF_INITIAL = 10.0  # kubelet: backOffPeriod
BACKOFF_MAX = 300.0  # kubelet: MaxContainerBackOff
BACKOFF_RESET_AFTER = 600.0  # a container that ran this long starts its back-off afresh
PULL_BACKOFF_INITIAL = 10.0
DEFAULT_GRACE = 30
VAR_REF = re.compile(r"\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)|\$\$")


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rfc3339(when: Optional[datetime]) -> Optional[str]:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ") if when else None


class SetupError(Exception):
    """A pod that cannot start yet (ContainerCreating with an event), or at all."""

    def __init__(self, reason: str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.fatal = fatal


def expand(value: str, env: Dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: known names replaced, unknown kept, $$ is $."""
    def sub(match: "re.Match[str]") -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return VAR_REF.sub(sub, value)


@dataclass
class ContainerState:
    """What the container status reports about one container."""

    name: str
    image: str
    restart_count: int = 0
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    started_at: Optional[datetime] = None
    finished_at: Optional[datetime] = None
    exit_code: Optional[int] = None
    container_id: str = ""
    image_id: str = ""
    last: Optional[Dict[str, Any]] = None  # lastState.terminated

    def api(self) -> Dict[str, Any]:
        if self.state == "running":
            state: Dict[str, Any] = {"running": {"startedAt": _rfc3339(self.started_at)}}
        elif self.state == "terminated":
            state = {"terminated": self.terminated()}
        else:
            waiting: Dict[str, Any] = {"reason": self.reason}
            if self.message:
                waiting["message"] = self.message
            state = {"waiting": waiting}
        status: Dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": self.image_id,
            "ready": self.state == "running",
            "started": self.state == "running",
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last} if self.last else {},
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status

    def terminated(self) -> Dict[str, Any]:
        reason = "Completed" if self.exit_code == 0 else ("StartError" if self.exit_code == 128 else "Error")
        term: Dict[str, Any] = {"exitCode": self.exit_code, "reason": reason,
                                "startedAt": _rfc3339(self.started_at), "finishedAt": _rfc3339(self.finished_at)}
        if self.container_id:
            term["containerID"] = self.container_id
        if self.message and reason == "StartError":
            term["message"] = self.message
        return term


class PodWorker:
    """One pod on one simulated node."""

    def __init__(self, node: "SimNode", pod: Dict[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        self.node = node
        self.pod = pod
        self.uid: str = meta.get("uid", "")
        self.namespace: str = meta.get("namespace", "default")
        self.name: str = meta.get("name", "")
        self.spec: Dict[str, Any] = pod.get("spec") or {}
        self.containers: Dict[str, ContainerState] = {}
        self.init_containers: Dict[str, ContainerState] = {}
        self.processes: Dict[str, ContainerProcess] = {}
        self.phase = "Pending"
        self.pod_reason = ""
        self.pod_message = ""
        self.initialized = False
        self.sandbox_ready = False
        self.start_time = now_rfc3339()
        self.pod_ip = node.allocate_pod_ip()
        self.nvidia = False
        self.sandbox_env: Dict[str, str] = {}  # what a pod-scoped lab fault adds (the sandbox's NVML view)
        self.sandbox_args: List[str] = []
        self.devices: Dict[str, Dict[str, List[str]]] = {}  # container -> resource -> device ids
        self.device_envs: Dict[str, Dict[str, str]] = {}  # container -> env from Allocate
        self.deleting = False
        self.stopped = asyncio.Event()
        self.wake = asyncio.Event()
        self.task: Optional[asyncio.Task] = None
        self._last_status: Optional[Dict[str, Any]] = None
        self._status_lock = asyncio.Lock()
        self._runners: Dict[str, asyncio.Task] = {}
        self._backoff_next: Dict[str, float] = {}  # container -> the next back-off
        self.dir = os.path.join(node.layout.root, "var", "lib", "kubelet", "pods", self.uid)
        self.volume_paths: Dict[str, str] = {}
        self.config_maps: Dict[str, Dict[str, str]] = {}
        self.secrets: Dict[str, Dict[str, str]] = {}
        for c in self.spec.get("initContainers") or []:
            self.init_containers[c["name"]] = ContainerState(c["name"], c.get("image", ""))
        for c in self.spec.get("containers") or []:
            self.containers[c["name"]] = ContainerState(c["name"], c.get("image", ""))

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    def update(self, pod: Dict[str, Any]) -> None:
        self.pod = pod
        if (pod.get("metadata") or {}).get("deletionTimestamp") and not self.deleting:
            self.deleting = True
            self.wake.set()

    def is_plugin(self) -> bool:
        from .images import is_device_plugin

        return any(is_device_plugin(c.get("image", "")) for c in self.spec.get("containers") or [])

    async def _run(self) -> None:
        try:
            await self._setup()
            if self.phase == "Pending" and not self.deleting:
                await self._run_init_containers()
            if self.phase == "Pending" and not self.deleting:
                self.initialized = True
                self.phase = "Running"
                for container in self.spec.get("containers") or []:
                    self._runners[container["name"]] = asyncio.get_running_loop().create_task(
                        self._run_container(container))
                await self.report()
            while not self.deleting and self._runners and not all(t.done() for t in self._runners.values()):
                await self._wait_wake()
            if not self.deleting and self._runners:
                self._finish_phase()
                await self.report()
            while not self.deleting:
                await self._wait_wake()
        except asyncio.CancelledError:
            raise
        except SetupError as exc:
            self.phase, self.pod_reason, self.pod_message = "Failed", exc.reason, exc.message
            await self.report()
            while not self.deleting:
                await self._wait_wake()
        except Exception:  # noqa: BLE001 - a bug in the lab shows in its log, the pod stays
            LOG.exception("node %s: pod %s/%s", self.node.name, self.namespace, self.name)
            while not self.deleting:
                await self._wait_wake()
        await self._terminate()

    async def _wait_wake(self) -> None:
        self.wake.clear()
        await self.wake.wait()

    def _finish_phase(self) -> None:
        codes = [c.exit_code for c in self.containers.values()]
        self.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"

    async def _setup(self) -> None:
        """Admission and sandbox: devices, runtime, volumes. Retries what may come right."""
        try:
            await self.node.admit(self)
        except SetupError as exc:
            if exc.fatal:
                raise
        delay = 1.0
        while not self.deleting:
            try:
                self.nvidia = await self.node.sandbox_runtime(self)
                await self._prepare_volumes()
                self.sandbox_ready = True
                return
            except SetupError as exc:
                if exc.fatal:
                    raise
                await self.node.event(self, "Warning", exc.reason, exc.message)
                for state in list(self.init_containers.values()) + list(self.containers.values()):
                    state.reason, state.message = "ContainerCreating", ""
                await self.report()
                try:
                    await asyncio.wait_for(self._wait_wake(), timeout=delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, 16.0)

    async def _run_init_containers(self) -> None:
        for container in self.spec.get("initContainers") or []:
            state = self.init_containers[container["name"]]
            while not self.deleting:
                code = await self._run_once(container, state)
                if code == 0:
                    break
                if self.spec.get("restartPolicy", "Always") == "Never":
                    self.phase = "Failed"
                    await self.report()
                    return
                await self._backoff(container, state)
            if self.deleting:
                return

    async def _run_container(self, container: Dict[str, Any]) -> None:
        state = self.containers[container["name"]]
        policy = self.spec.get("restartPolicy", "Always")
        try:
            while not self.deleting:
                await self.node.kubelet_up.wait()  # a stopped kubelet restarts nothing
                if self.deleting:
                    break
                code = await self._run_once(container, state)
                if self.deleting:
                    break
                if policy == "Never" or (policy == "OnFailure" and code == 0):
                    break
                await self._backoff(container, state)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug in the lab must show, not stop the pod silently
            LOG.exception("node %s: container %s of %s/%s", self.node.name, container["name"], self.namespace, self.name)
        finally:
            self.wake.set()

    async def _backoff(self, container: Dict[str, Any], state: ContainerState) -> None:
        """The kubelet's crash back-off: restart at once the first time, then wait."""
        key = container["name"]
        ran_for = (state.finished_at - state.started_at).total_seconds() if state.finished_at and state.started_at else 0.0
        delay, self._backoff_next[key] = backoff_delay(self._backoff_next.get(key), ran_for, self.node.crash_backoff)
        if delay > 0:
            state.state, state.reason = "waiting", "CrashLoopBackOff"
            state.message = "back-off %s restarting failed container=%s pod=%s_%s(%s)" % (
                _go_duration(delay), key, self.name, self.namespace, self.uid)
            self._event("Warning", "BackOff", "Back-off restarting failed container %s in pod %s_%s(%s)"
                        % (key, self.name, self.namespace, self.uid))
            await self.report()
            try:
                await asyncio.wait_for(self._wait_until_deleting(), timeout=delay)
            except asyncio.TimeoutError:
                pass

    async def _wait_until_deleting(self) -> None:
        while not self.deleting:
            await self._wait_wake()

    async def _pull(self, container: Dict[str, Any], state: ContainerState) -> Optional[Image]:
        """The image, or None once deleting; waits in ErrImagePull / ImagePullBackOff."""
        delay = PULL_BACKOFF_INITIAL
        while not self.deleting:
            try:
                return resolve(container.get("image", ""))
            except ImagePullError as exc:
                state.state, state.reason, state.message = "waiting", "ErrImagePull", str(exc)
                await self.node.event(self, "Warning", "Failed", 'Failed to pull image "%s": %s'
                                      % (container.get("image", ""), exc))
                await self.report()
                try:
                    await asyncio.wait_for(self._wait_until_deleting(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
                state.reason = "ImagePullBackOff"
                state.message = 'Back-off pulling image "%s": ErrImagePull: %s' % (container.get("image", ""), exc)
                await self.report()
                try:
                    await asyncio.wait_for(self._wait_until_deleting(), timeout=delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, BACKOFF_MAX)
        return None

    async def _run_once(self, container: Dict[str, Any], state: ContainerState) -> int:
        image = await self._pull(container, state)
        if image is None:
            return 0
        spec = self._container_spec(container, image)
        name = container["name"]
        if state.last is not None:  # it ran before: this is a restart
            state.restart_count += 1
        log_path = self.log_path(name, state.restart_count)
        process = ContainerProcess(spec, os.path.join(self.node.layout.root, "run", "containerd", "lab", self.uid, name),
                                   log_path)
        self._event("Normal", "Pulled", 'Container image "%s" already present on machine' % container.get("image", ""))
        self._event("Normal", "Created", "Created container: %s" % name)
        await process.start()
        self._event("Normal", "Started", "Started container %s" % name)
        self.processes[name] = process
        state.container_id = "containerd://" + uuid.uuid4().hex + uuid.uuid4().hex
        state.image_id = image.image_id
        state.state, state.reason, state.message = "running", "", ""
        state.started_at, state.finished_at, state.exit_code = process.started_at, None, None
        await self.report()
        self.node.container_started(self, name, process)
        code = await process.wait()
        state.exit_code = code
        state.finished_at = process.finished_at
        state.last = state.terminated()
        if code == 128:  # StartError: the runtime's message is the container's stderr
            state.message = self._last_log_line(log_path)
        state.state = "terminated"
        self.node.container_exited(self, name, code, process)
        process.cleanup()
        await self.report()
        return code

    def _event(self, kind: str, reason: str, message: str) -> None:
        """An event of the kubelet's, sent in the background (a pod does not wait for it)."""
        self.node.spawn(self.node.event(self, kind, reason, message))

    def log_path(self, container: str, restart: int) -> str:
        return os.path.join(self.node.layout.root, "var", "log", "pods",
                            "%s_%s_%s" % (self.namespace, self.name, self.uid), container, "%d.log" % restart)

    @staticmethod
    def _last_log_line(path: str) -> str:
        from .containers import read_cri_log

        lines = read_cri_log(path)
        return lines[-1].text if lines else ""

    # ---- the container's environment ------------------------------------------------------------

    def _container_spec(self, container: Dict[str, Any], image: Image) -> ContainerSpec:
        env = dict(image.env)
        env["HOSTNAME"] = self.name
        env.update(self.node.service_env())  # KUBERNETES_SERVICE_*: always, as the kubelet
        for source in container.get("envFrom") or []:
            env.update(self._env_from(source))
        for item in container.get("env") or []:
            env[item["name"]] = self._env_value(item, env)
        env.update(self.device_envs.get(container["name"], {}))
        env.update(self.sandbox_env)
        command = [expand(a, env) for a in container.get("command") or []] or list(image.entrypoint)
        args = [expand(a, env) for a in container.get("args") or []]
        if not container.get("command") and not container.get("args"):
            args = list(image.cmd)
        argv = command + args + (self.sandbox_args if self.is_plugin_container(container) else [])
        if not argv:
            argv = ["/bin/sh"]
        mounts = [{"source": host, "target": target, "file": True, "readonly": True} for host, target in image.files]
        for mount in container.get("volumeMounts") or []:
            source = self.volume_paths.get(mount["name"])
            if source is None:
                continue
            if mount.get("subPath"):
                source = os.path.join(source, mount["subPath"])
            mounts.append({"source": source, "target": mount["mountPath"], "readonly": bool(mount.get("readOnly")),
                           "file": os.path.isfile(source)})
        return ContainerSpec(argv=argv, env=env, cwd=container.get("workingDir") or image.working_dir,
                             mounts=mounts, nvidia=self.nvidia, node_root=self.node.layout.root)

    @staticmethod
    def is_plugin_container(container: Dict[str, Any]) -> bool:
        from .images import is_device_plugin

        return is_device_plugin(container.get("image", ""))

    def _field(self, path: str) -> str:
        meta = self.pod.get("metadata") or {}
        values = {
            "metadata.name": self.name, "metadata.namespace": self.namespace, "metadata.uid": self.uid,
            "spec.nodeName": self.node.name, "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
            "status.podIP": self.pod_ip, "status.hostIP": self.node.address, "status.podIPs": self.pod_ip,
            "status.hostIPs": self.node.address,
        }
        if path in values:
            return values[path]
        match = re.match(r"metadata\.(labels|annotations)\['(.+)'\]$", path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        return ""

    def _env_value(self, item: Dict[str, Any], env: Dict[str, str]) -> str:
        if "value" in item:
            return expand(str(item.get("value") or ""), env)
        source = item.get("valueFrom") or {}
        if "fieldRef" in source:
            return self._field(source["fieldRef"].get("fieldPath", ""))
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            return str((self.config_maps.get(ref.get("name", "")) or {}).get(ref.get("key", ""), ""))
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            return str((self.secrets.get(ref.get("name", "")) or {}).get(ref.get("key", ""), ""))
        return ""

    def _env_from(self, source: Dict[str, Any]) -> Dict[str, str]:
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            data = self.config_maps.get(source["configMapRef"].get("name", "")) or {}
        else:
            data = self.secrets.get((source.get("secretRef") or {}).get("name", "")) or {}
        return {prefix + k: str(v) for k, v in data.items()}

    # ---- volumes --------------------------------------------------------------------------------

    async def _prepare_volumes(self) -> None:
        self.volume_paths, self.config_maps, self.secrets = {}, {}, {}
        for container in (self.spec.get("initContainers") or []) + (self.spec.get("containers") or []):
            for source in container.get("envFrom") or []:
                if "configMapRef" in source:
                    await self._config_map(source["configMapRef"].get("name", ""),
                                           optional=bool(source["configMapRef"].get("optional")))
                if "secretRef" in source:
                    await self._secret(source["secretRef"].get("name", ""), optional=bool(source["secretRef"].get("optional")))
            for item in container.get("env") or []:
                ref = (item.get("valueFrom") or {})
                if "configMapKeyRef" in ref:
                    await self._config_map(ref["configMapKeyRef"].get("name", ""),
                                           optional=bool(ref["configMapKeyRef"].get("optional")))
                if "secretKeyRef" in ref:
                    await self._secret(ref["secretKeyRef"].get("name", ""), optional=bool(ref["secretKeyRef"].get("optional")))
        for volume in self.spec.get("volumes") or []:
            name = volume["name"]
            path = os.path.join(self.dir, "volumes", name)
            if "hostPath" in volume:
                self.volume_paths[name] = self._host_path(name, volume["hostPath"])
            elif "emptyDir" in volume:
                os.makedirs(path, exist_ok=True)
                self.volume_paths[name] = path
            elif "configMap" in volume:
                source = volume["configMap"]
                data = await self._config_map(source.get("name", ""), optional=bool(source.get("optional")), volume=name)
                self._write_items(path, data, source.get("items"))
                self.volume_paths[name] = path
            elif "secret" in volume:
                source = volume["secret"]
                data = await self._secret(source.get("secretName", ""), optional=bool(source.get("optional")), volume=name)
                self._write_items(path, data, source.get("items"))
                self.volume_paths[name] = path
            elif "projected" in volume:
                await self._projected(path, volume["projected"], name)
                self.volume_paths[name] = path
            elif "downwardAPI" in volume:
                self._write_items(path, self._downward(volume["downwardAPI"].get("items") or []), None)
                self.volume_paths[name] = path

    def _host_path(self, name: str, source: Dict[str, Any]) -> str:
        path = source.get("path", "/")
        host = os.path.join(self.node.layout.root, path.lstrip("/"))
        kind = source.get("type") or ""
        if kind == "DirectoryOrCreate":
            os.makedirs(host, exist_ok=True)
        elif kind == "FileOrCreate" and not os.path.exists(host):
            os.makedirs(os.path.dirname(host), exist_ok=True)
            open(host, "a").close()
        elif kind == "Directory" and not os.path.isdir(host):
            raise SetupError("FailedMount", 'MountVolume.SetUp failed for volume "%s" : hostPath type check failed: '
                             '%s is not a directory' % (name, path))
        elif kind == "File" and not os.path.isfile(host):
            raise SetupError("FailedMount", 'MountVolume.SetUp failed for volume "%s" : hostPath type check failed: '
                             '%s is not a file' % (name, path))
        elif kind == "Socket" and not os.path.exists(host):
            raise SetupError("FailedMount", 'MountVolume.SetUp failed for volume "%s" : hostPath type check failed: '
                             '%s is not a socket file' % (name, path))
        elif not kind and not os.path.exists(host):
            os.makedirs(host, exist_ok=True)  # runc creates a missing bind source as a directory
        return host

    @staticmethod
    def _write_items(path: str, data: Dict[str, str], items: Optional[List[Dict[str, Any]]]) -> None:
        os.makedirs(path, exist_ok=True)
        chosen = [(i["key"], i.get("path") or i["key"]) for i in items] if items else [(k, k) for k in data]
        for key, rel in chosen:
            if key not in data:
                continue
            target = os.path.join(path, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w", encoding="utf-8") as handle:
                handle.write(data[key])

    async def _config_map(self, name: str, optional: bool = False, volume: str = "") -> Dict[str, str]:
        if name in self.config_maps:
            return self.config_maps[name]
        try:
            obj = await self.node.api.get("/api/v1/namespaces/%s/configmaps/%s" % (self.namespace, name),
                                          ok_missing=True)
        except ApiError as exc:
            raise SetupError("FailedMount", 'MountVolume.SetUp failed for volume "%s" : %s' % (volume or name, exc.message))
        if obj is None:
            if optional:
                return {}
            raise SetupError("FailedMount", 'MountVolume.SetUp failed for volume "%s" : configmap "%s" not found'
                             % (volume or name, name))
        data = {k: str(v) for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (obj.get("binaryData") or {}).items()})
        self.config_maps[name] = data
        return data

    async def _secret(self, name: str, optional: bool = False, volume: str = "") -> Dict[str, str]:
        if name in self.secrets:
            return self.secrets[name]
        try:
            obj = await self.node.api.get("/api/v1/namespaces/%s/secrets/%s" % (self.namespace, name), ok_missing=True)
        except ApiError as exc:
            raise SetupError("FailedMount", 'MountVolume.SetUp failed for volume "%s" : %s' % (volume or name, exc.message))
        if obj is None:
            if optional:
                return {}
            raise SetupError("FailedMount", 'MountVolume.SetUp failed for volume "%s" : secret "%s" not found'
                             % (volume or name, name))
        data = {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (obj.get("data") or {}).items()}
        self.secrets[name] = data
        return data

    def _downward(self, items: List[Dict[str, Any]]) -> Dict[str, str]:
        data: Dict[str, str] = {}
        meta = self.pod.get("metadata") or {}
        for item in items:
            path = (item.get("fieldRef") or {}).get("fieldPath", "")
            if path in ("metadata.labels", "metadata.annotations"):
                values = meta.get(path.split(".")[1]) or {}
                data[item["path"]] = "".join('%s="%s"\n' % (k, v) for k, v in sorted(values.items()))
            elif path:
                data[item["path"]] = self._field(path)
        return data

    async def _projected(self, path: str, source: Dict[str, Any], volume: str) -> None:
        data: Dict[str, str] = {}
        for part in source.get("sources") or []:
            if "serviceAccountToken" in part:
                token = await self.node.service_account_token(self, part["serviceAccountToken"])
                data[part["serviceAccountToken"].get("path", "token")] = token
            elif "configMap" in part:
                ref = part["configMap"]
                values = await self._config_map(ref.get("name", ""), optional=bool(ref.get("optional")), volume=volume)
                for key, rel in ([(i["key"], i.get("path") or i["key"]) for i in ref["items"]] if ref.get("items")
                                 else [(k, k) for k in values]):
                    if key in values:
                        data[rel] = values[key]
            elif "secret" in part:
                ref = part["secret"]
                values = await self._secret(ref.get("name", ""), optional=bool(ref.get("optional")), volume=volume)
                for key, rel in ([(i["key"], i.get("path") or i["key"]) for i in ref["items"]] if ref.get("items")
                                 else [(k, k) for k in values]):
                    if key in values:
                        data[rel] = values[key]
            elif "downwardAPI" in part:
                data.update(self._downward(part["downwardAPI"].get("items") or []))
        self._write_items(path, data, None)

    # ---- status -------------------------------------------------------------------------------

    def status(self) -> Dict[str, Any]:
        ready = self.phase == "Running" and all(c.state == "running" for c in self.containers.values())
        transition = self.start_time
        conditions = [
            {"type": "PodReadyToStartContainers", "status": "True" if self.sandbox_ready else "False",
             "lastTransitionTime": transition},
            {"type": "Initialized", "status": "True" if self.initialized or not self.init_containers else "False",
             "lastTransitionTime": transition},
            {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": transition},
            {"type": "ContainersReady", "status": "True" if ready else "False", "lastTransitionTime": transition},
        ]
        if not ready:
            not_ready = sorted(c.name for c in self.containers.values() if c.state != "running")
            for condition in conditions[2:]:
                condition["reason"] = "ContainersNotReady"
                condition["message"] = "containers with unready status: [%s]" % " ".join(not_ready)
        status: Dict[str, Any] = {
            "phase": self.phase,
            "conditions": conditions,
            "hostIP": self.node.address,
            "hostIPs": [{"ip": self.node.address}],
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "containerStatuses": [c.api() for c in self.containers.values()],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.api() for c in self.init_containers.values()]
        if self.pod_reason:
            status["reason"] = self.pod_reason
            status["message"] = self.pod_message
        return status

    async def resync_status(self) -> None:
        """A starting kubelet's status manager writes every pod's status again (the node lifecycle
        controller marked them not Ready while the kubelet was gone)."""
        self._last_status = None
        await self.report()

    async def report(self) -> None:
        """Patch the pod's status when it changed (the kubelet's status manager)."""
        if self.node.kubelet_stopped():
            return
        async with self._status_lock:
            status = self.status()
            if status == self._last_status:
                return
            body = {"metadata": {"uid": self.uid}, "status": status}
            try:
                await self.node.api.patch("/api/v1/namespaces/%s/pods/%s/status" % (self.namespace, self.name), body,
                                          ok_missing=True)
                self._last_status = status
            except ApiError as exc:
                LOG.info("node %s: status of pod %s/%s: %s", self.node.name, self.namespace, self.name, exc)
            except Exception as exc:  # noqa: BLE001 - a dropped connection: the next change retries
                LOG.info("node %s: status of pod %s/%s: %r", self.node.name, self.namespace, self.name, exc)

    # ---- termination ----------------------------------------------------------------------------

    async def _terminate(self) -> None:
        grace = (self.pod.get("metadata") or {}).get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE)
        await asyncio.gather(*(p.stop(float(grace)) for p in self.processes.values()), return_exceptions=True)
        for task in self._runners.values():
            task.cancel()
        await asyncio.gather(*self._runners.values(), return_exceptions=True)
        self.node.pod_stopped(self)
        if (self.pod.get("metadata") or {}).get("deletionTimestamp") and not self.node.kubelet_stopped():
            try:
                await self.node.api.delete("/api/v1/namespaces/%s/pods/%s" % (self.namespace, self.name),
                                           {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                                            "preconditions": {"uid": self.uid}})
            except ApiError as exc:
                if exc.status != 409:  # 409: the pod was recreated with another uid meanwhile
                    LOG.info("node %s: final delete of %s/%s: %s", self.node.name, self.namespace, self.name, exc)
            except Exception as exc:  # noqa: BLE001
                LOG.info("node %s: final delete of %s/%s: %r", self.node.name, self.namespace, self.name, exc)
        self.stopped.set()

    async def kill(self) -> None:
        """The pod is gone from the API (or the lab stops): stop everything at once."""
        self.deleting = True
        self.wake.set()
        if self.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.task), timeout=40)
            except asyncio.TimeoutError:
                self.task.cancel()
                for process in self.processes.values():
                    process.send(signal.SIGKILL)

    def container_process(self, name: Optional[str] = None) -> Optional[ContainerProcess]:
        if name is None:
            name = next(iter(self.containers), None)
        return self.processes.get(name) if name else None


def _go_duration(seconds: float) -> str:
    """Go's time.Duration String() for whole seconds: 10s, 1m20s, 5m0s."""
    total = int(seconds)
    if total < 60:
        return "%ds" % total
    return "%dm%ds" % (total // 60, total % 60)


def backoff_delay(previous: Optional[float], ran_for: float,
                  limits: Tuple[float, float] = (BACKOFF_INITIAL, BACKOFF_MAX)) -> Tuple[float, float]:
    """(wait before this restart, the back-off to remember) as the kubelet's: no wait the first
    time, then ``limits[0]`` (10 s) doubling up to ``limits[1]`` (5 min); a container that ran
    for 10 minutes starts afresh."""
    initial, maximum = limits
    if previous is None or ran_for >= BACKOFF_RESET_AFTER:
        return 0.0, initial
    return previous, min(previous * 2, maximum)
