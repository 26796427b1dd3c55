"""``python -m lab``: up -> the kubeconfig works -> break/fix -> down leaves no process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT / ".build", ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

if not (ROOT / "lab" / "apiserver" / "__init__.py").exists():
    pytest.skip("lab/apiserver is not there yet: the CLI needs the lab API server", allow_module_level=True)
if not (ROOT / ".build" / "lab" / "lib" / "libnvidia-ml.so.1").exists():
    pytest.skip("lab NVML library not built (make lab-nvml)", allow_module_level=True)

from kubernetes import client, config  # noqa: E402

from lab.cli import _alive, _group_members  # noqa: E402

DAEMONSET = {
    "apiVersion": "apps/v1",
    "kind": "DaemonSet",
    "metadata": {"name": "nvidia-device-plugin-daemonset", "namespace": "kube-system"},
    "spec": {
        "selector": {"matchLabels": {"name": "nvidia-device-plugin-ds"}},
        "template": {
            "metadata": {"labels": {"name": "nvidia-device-plugin-ds"}},
            "spec": {
                "nodeSelector": {"nvidia.com/gpu.present": "true"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [{"name": "nvidia-device-plugin-ctr", "image": "nvcr.io/nvidia/k8s-device-plugin:v0.17.1"}],
            },
        },
    },
}


def lab(state_dir: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / ".build"), str(ROOT)]))
    return subprocess.run([sys.executable, "-m", "lab", "--state-dir", state_dir, *args], cwd=str(ROOT), env=env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, check=False)


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting for %s" % what)


@pytest.fixture(scope="module")
def running_lab() -> Iterator[Dict[str, Any]]:
    state_dir = tempfile.mkdtemp(prefix="glc", dir="/tmp")
    up = lab(state_dir, "up", "--nodes", "3")
    assert up.returncode == 0, up.stdout
    with open(os.path.join(state_dir, "lab.json"), encoding="utf-8") as handle:
        info = json.load(handle)
    yield info
    if os.path.exists(os.path.join(state_dir, "lab.json")):
        lab(state_dir, "down")
    shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def api(running_lab: Dict[str, Any]) -> client.ApiClient:
    return config.new_client_from_config(config_file=running_lab["kubeconfig"])


def test_up_writes_kubeconfig_inventory_and_lab_json(running_lab: Dict[str, Any]) -> None:
    info = running_lab
    assert info["nodes"] == ["gpu-node-01", "gpu-node-02", "gpu-node-03"]
    assert info["url"].startswith("https://127.0.0.1:") and info["token"]
    assert _alive(info["pids"]["daemon"])
    with open(info["inventory"], encoding="utf-8") as handle:
        inventory = yaml.safe_load(handle)
    hosts = inventory["all"]["children"]["gpu_nodes"]["hosts"]
    assert sorted(hosts) == info["nodes"]
    host = hosts["gpu-node-01"]
    assert host["ansible_connection"] == "local"
    assert host["ansible_python_interpreter"] == sys.executable
    assert inventory["all"]["vars"]["gpunode_kubeconfig"] == info["kubeconfig"]  # localhost plays need it too
    root = host["gpunode_node_root"]
    assert os.path.isdir(os.path.join(root, "var/lib/kubelet/device-plugins"))
    assert host["gpunode_node_environment"] == {
        "LD_LIBRARY_PATH": str(ROOT / ".build" / "lab" / "lib"),
        "GPUNODE_LAB_NVML_STATE": os.path.join(root, "nvml.state"),
    }
    assert os.path.exists(host["gpunode_node_environment"]["GPUNODE_LAB_NVML_STATE"])


def test_kubectl_get_nodes(running_lab: Dict[str, Any]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run([kubectl, "--kubeconfig", running_lab["kubeconfig"], "get", "nodes", "-o", "json"],
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60, check=False)
    assert out.returncode == 0, out.stdout
    nodes = json.loads(out.stdout)["items"]
    assert [n["metadata"]["name"] for n in nodes] == running_lab["nodes"]
    for node in nodes:
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"][0]
        assert ready["status"] == "True"
        assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"


def _allocatable(core: client.CoreV1Api, node: str) -> Any:
    return (core.read_node(node).status.allocatable or {}).get("nvidia.com/gpu")


def _plugin_pod(core: client.CoreV1Api, node: str) -> Any:
    pods = core.list_namespaced_pod("kube-system", field_selector="spec.nodeName=%s" % node).items
    return pods[0] if pods else None


def _waiting_reason(pod: Any) -> Any:
    statuses = (pod.status.container_statuses or []) if pod else []
    return statuses[0].state.waiting.reason if statuses and statuses[0].state.waiting else None


def test_plugin_daemonset_and_break_fix(running_lab: Dict[str, Any], api: client.ApiClient) -> None:
    state_dir = running_lab["state_dir"]
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    apps.create_namespaced_daemon_set("kube-system", DAEMONSET)
    for node in running_lab["nodes"]:
        wait_for(lambda: _allocatable(core, node) == "8", what="%s to advertise 8 GPUs" % node)

    broke = lab(state_dir, "break", "gpu-node-01", "plugin_crash", "--arg", "signature=nvml_init_failed", "--sticky")
    assert broke.returncode == 0, broke.stdout
    wait_for(lambda: _waiting_reason(_plugin_pod(core, "gpu-node-01")) == "CrashLoopBackOff", what="CrashLoopBackOff")
    pod = _plugin_pod(core, "gpu-node-01")
    wait_for(lambda: "Failed to initialize NVML: ERROR_UNKNOWN." in core.read_namespaced_pod_log(pod.metadata.name, "kube-system"),
             what="the NVML signature in the pod log")
    assert lab(state_dir, "fix", "gpu-node-01", "plugin_crash").returncode == 0
    wait_for(lambda: _plugin_pod(core, "gpu-node-01").status.phase == "Running"
             and _waiting_reason(_plugin_pod(core, "gpu-node-01")) is None
             and _allocatable(core, "gpu-node-01") == "8", what="gpu-node-01 healthy again")

    assert lab(state_dir, "break", "gpu-node-02", "label_missing").returncode == 0
    assert "nvidia.com/gpu.present" not in core.read_node("gpu-node-02").metadata.labels
    assert lab(state_dir, "fix", "gpu-node-02", "label_missing").returncode == 0
    assert core.read_node("gpu-node-02").metadata.labels["nvidia.com/gpu.present"] == "true"

    assert lab(state_dir, "break", "gpu-node-03", "taint_untolerated").returncode == 0
    taints = core.read_node("gpu-node-03").spec.taints
    assert [(t.key, t.value, t.effect) for t in taints] == [("gpu-maintenance", "true", "NoSchedule")]
    assert lab(state_dir, "fix", "gpu-node-03", "taint_untolerated").returncode == 0
    assert not core.read_node("gpu-node-03").spec.taints

    assert lab(state_dir, "break", "cluster", "daemonset_missing").returncode == 0
    assert not apps.list_namespaced_daemon_set("kube-system").items
    assert lab(state_dir, "fix", "cluster", "daemonset_missing").returncode == 0
    assert [d.metadata.name for d in apps.list_namespaced_daemon_set("kube-system").items] == ["nvidia-device-plugin-daemonset"]

    status = lab(state_dir, "status", "--json")
    assert status.returncode == 0, status.stdout
    document = json.loads(status.stdout)
    assert sorted(document["nodes"]) == running_lab["nodes"]
    assert lab(state_dir, "status").returncode == 0

    unknown = lab(state_dir, "break", "gpu-node-01", "no_such_fault")
    assert unknown.returncode == 1 and "unknown fault" in unknown.stdout


def test_down_leaves_no_process(running_lab: Dict[str, Any]) -> None:
    state_dir = running_lab["state_dir"]
    pid, pgid = running_lab["pids"]["daemon"], running_lab["pgid"]
    down = lab(state_dir, "down")
    assert down.returncode == 0, down.stdout
    assert not _alive(pid)
    assert _group_members(pgid) == []
    assert not os.path.exists(os.path.join(state_dir, "lab.json"))
    assert not os.path.exists(os.path.join(state_dir, "control.sock"))
    assert lab(state_dir, "status").returncode == 3
    assert lab(state_dir, "down").returncode == 0  # idempotent


def test_api_only_fleet_has_no_node_runtime() -> None:
    state_dir = tempfile.mkdtemp(prefix="gla", dir="/tmp")
    try:
        up = lab(state_dir, "up", "--api-only", "--nodes", "200")
        assert up.returncode == 0, up.stdout
        with open(os.path.join(state_dir, "lab.json"), encoding="utf-8") as handle:
            info = json.load(handle)
        core = client.CoreV1Api(config.new_client_from_config(config_file=info["kubeconfig"]))
        assert len(core.list_node().items) == 200
        assert not os.path.exists(os.path.join(state_dir, "nodes"))
        with open(info["inventory"], encoding="utf-8") as handle:
            hosts = yaml.safe_load(handle)["all"]["children"]["gpu_nodes"]["hosts"]
        assert "gpunode_node_root" not in hosts["gpu-node-001"]
        refused = lab(state_dir, "break", "gpu-node-001", "plugin_hang")
        assert refused.returncode == 1 and "--api-only" in refused.stdout
    finally:
        assert lab(state_dir, "down").returncode == 0
        shutil.rmtree(state_dir, ignore_errors=True)


def test_state_dir_too_long_fails_clearly(tmp_path: Path) -> None:
    long_dir = str(tmp_path / ("d" * 70))
    up = lab(long_dir, "up", "--nodes", "1")
    assert up.returncode == 2
    assert "107 bytes" in up.stdout
