"""Shared by the integration tests of device_plugin, device_plugin_info and gpu_node: an in-process
lab API server (optionally with a scripted node runtime that stands in for the plugin process:
pod status, advertised resources, log text), and ansible-playbook runs against it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / ".build", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from lab.apiserver import LabApiServer  # noqa: E402
from lab.contracts import NodeSpec, PluginPodStatus  # noqa: E402

VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
ANSIBLE_PLAYBOOK = str(Path(PYTHON).parent / "ansible-playbook")
TARGETS = ROOT / "tests" / "integration" / "targets"
GPU_LABELS = {"nvidia.com/gpu.present": "true"}
GPU = "nvidia.com/gpu"


def klog(severity: str, source: str, message: str) -> str:
    return "%s0110 11:59:00.000000       1 %s] %s" % (severity, source, message)


# The plugin's own lines (NVIDIA/k8s-device-plugin), per situation.
START = [klog("I", "main.go:235", "Starting FS watcher."), klog("I", "main.go:257", "Starting Plugins."),
         klog("I", "main.go:314", "Loading configuration.")]
REGISTERED = START + [
    klog("I", "server.go:110", "Starting to serve 'nvidia.com/gpu' on /var/lib/kubelet/device-plugins/nvidia-gpu.sock"),
    klog("I", "server.go:117", "Registered device plugin for 'nvidia.com/gpu' with Kubelet")]
LOGS = {
    "registered": REGISTERED,
    "nvml_init_failed": START + [klog("E", "main.go:132", "error starting plugins: error creating plugin manager: "
                                      "unable to create plugin manager: failed to initialize NVML: "
                                      "ERROR_DRIVER_NOT_LOADED")],
    "incompatible_strategy": START + [klog("E", "factory.go:135", "Incompatible strategy detected auto"),
                                      klog("I", "main.go:346", "No devices found. Waiting indefinitely.")],
    "no_devices": START + [klog("I", "main.go:346", "No devices found. Waiting indefinitely.")],
    "registration_failed": START + [
        klog("E", "server.go:121", "Could not register device plugin: rpc error: code = Unavailable desc = "
             "dial unix /var/lib/kubelet/device-plugins/kubelet.sock: connect: no such file or directory"),
        klog("I", "main.go:268", "Failed to start one or more plugins. Retrying in 30s...")],
    "xid_unhealthy": REGISTERED + [klog("I", "health.go:159", "XidCriticalError: Xid=79 on Device=GPU-0000; "
                                        "marking device as unhealthy.")],
    "kubelet_restart_seen": REGISTERED + [klog("I", "main.go:283", "inotify: /var/lib/kubelet/device-plugins/"
                                               "kubelet.sock created, restarting.")],
    "unknown": [klog("I", "main.go:100", "something else entirely")],
}


@dataclass
class NodeScript:
    """What the scripted runtime makes of a plugin pod on one node."""

    status: PluginPodStatus = field(default_factory=lambda: PluginPodStatus(running=True, ready=True))
    log: List[str] = field(default_factory=lambda: list(REGISTERED))
    capacity: Optional[Dict[str, str]] = None  # None: the node's gpu_count, healthy
    allocatable: Optional[Dict[str, str]] = None


def crash_loop(exit_code: int = 1, restarts: int = 4) -> PluginPodStatus:
    return PluginPodStatus(running=False, ready=False, restart_count=restarts, waiting_reason="CrashLoopBackOff",
                           last_exit_code=exit_code, last_reason="Error")


class ScriptedRuntime:
    """A lab NodeRuntime without processes: each started plugin pod gets its node's scripted
    status, resources and log at once."""

    def __init__(self, scripts: Optional[Dict[str, NodeScript]] = None) -> None:
        self.scripts = dict(scripts or {})
        self.store: Any = None
        self.logs: Dict[str, str] = {}

    def start_plugin_pod(self, node: str, pod: Dict[str, Any]) -> None:
        script = self.scripts.get(node, NodeScript())
        meta = pod["metadata"]
        self.logs[meta["name"]] = "\n".join(script.log) + "\n"
        spec = self.store.node_specs.get(node)
        count = str(spec.gpu_count if spec else 8)
        capacity = {GPU: count} if script.capacity is None else script.capacity
        allocatable = capacity if script.allocatable is None else script.allocatable
        self.store.update_node_status(node, capacity, allocatable)
        self.store.update_pod_status(meta["namespace"], meta["name"], script.status)

    def stop_plugin_pod(self, node: str, pod_name: str) -> None:
        self.logs.pop(pod_name, None)

    def pod_log(self, node: str, pod_name: str, tail_lines: Optional[int] = None) -> str:
        return self.logs.get(pod_name, "")


@contextmanager
def lab_cluster(state_dir: Path, nodes: List[NodeSpec], runtime: Optional[ScriptedRuntime] = None,
                namespaces: Tuple[str, ...] = ()) -> Iterator[Tuple[LabApiServer, str]]:
    """A started lab API server with the nodes (and extra namespaces) and a kubeconfig for it."""
    server = LabApiServer(str(state_dir / "apiserver"), runtime=runtime)
    if runtime is not None:
        runtime.store = server.store
    server.start()
    try:
        server.store.add_nodes(nodes)
        for namespace in namespaces:
            server.store.create_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        kubeconfig = server.write_kubeconfig(str(state_dir / "kubeconfig"))
        yield server, kubeconfig
    finally:
        server.stop()


def gpu_nodes(count: int, root: Path, prefix: str = "gpu") -> List[NodeSpec]:
    return [NodeSpec(name="%s-%03d" % (prefix, i), root=str(root), gpu_count=8, labels=dict(GPU_LABELS))
            for i in range(count)]


def ansible_env(work: Path) -> Dict[str, str]:
    link = ROOT / ".build" / "ansible_collections" / "gpunode" / "bringup"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("../../..", str(link))
    env = dict(os.environ)
    for name in ("home", "tmp"):
        (work / name).mkdir(parents=True, exist_ok=True)
    env.update(ANSIBLE_HOME=str(work / "home"), ANSIBLE_REMOTE_TMP=str(work / "tmp"),
               ANSIBLE_LOCAL_TEMP=str(work / "tmp"), ANSIBLE_COLLECTIONS_PATH=str(ROOT / ".build"),
               ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
               ANSIBLE_DEPRECATION_WARNINGS="false", ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="false",
               ANSIBLE_PIPELINING="true")
    env.pop("K8S_AUTH_KUBECONFIG", None)
    return env


def run_playbook(playbook: Path, work: Path, extra_vars: Dict[str, Any], timeout: float = 240
                 ) -> Tuple[subprocess.CompletedProcess, Dict[str, Any]]:
    """Run a playbook on localhost; it writes its registered results to ``results_file``."""
    results_file = work / ("%s.results.json" % playbook.stem)
    vars_file = work / ("%s.vars.json" % playbook.stem)
    vars_file.write_text(json.dumps(dict(extra_vars, results_file=str(results_file))))
    proc = subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", "localhost,", "-c", "local", "-e", "ansible_python_interpreter=" + PYTHON,
         "-e", "@" + str(vars_file), str(playbook)],
        cwd=str(work), env=ansible_env(work), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        timeout=timeout, check=False)
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    return proc, results
