"""gpunode.bringup.device_plugin_restart against the lab API server and its DaemonSet controller.

A small runtime stub stands in for each node's kubelet and plugin: a started plugin pod turns
Running and Ready, and REGISTER_S later the Node advertises its GPUs (the plugin registered);
a stopped plugin takes them away (allocatable 0). Node gpu-b's plugin crash-loops after a
restart; gpu-c has no plugin pod (it lacks the DaemonSet's node label).
"""
from __future__ import annotations

import collections
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / ".build", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

pytest.importorskip("kubernetes")

from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import K8sClient  # noqa: E402
from ansible_collections.gpunode.bringup.plugins.module_utils._restart import (  # noqa: E402
    RestartRequest,
    run_plugin_restart,
)
from api_tasks import ansible_env, run_tasks  # noqa: E402
from lab.apiserver import LabApiServer  # noqa: E402
from lab.contracts import NodeSpec, PluginPodStatus  # noqa: E402

NS = "kube-system"
GPU = "nvidia.com/gpu"
GPUS = "4"
REGISTER_S = 0.5
SELECTOR = "name=nvidia-device-plugin-ds"
DAEMONSET = {
    "apiVersion": "apps/v1", "kind": "DaemonSet",
    "metadata": {"name": "nvidia-device-plugin-daemonset", "namespace": NS},
    "spec": {"selector": {"matchLabels": {"name": "nvidia-device-plugin-ds"}},
             "template": {"metadata": {"labels": {"name": "nvidia-device-plugin-ds"}},
                          "spec": {"nodeSelector": {"nvidia.com/gpu.present": "true"},
                                   "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
                                   "containers": [{"name": "nvidia-device-plugin-ctr",
                                                   "image": "nvcr.io/nvidia/k8s-device-plugin:v0.17.0"}]}}}}


class StubRuntime:
    """Kubelet and plugin of every node, reduced to pod readiness and the advertised count."""

    def __init__(self) -> None:
        self.store: Any = None
        self.crash_after_restart = {"gpu-b"}
        self.starts: Dict[str, int] = collections.Counter()
        self.timers: List[threading.Timer] = []

    def start_plugin_pod(self, node: str, pod: Dict[str, Any]) -> None:
        meta = pod["metadata"]
        self.starts[node] += 1
        if node in self.crash_after_restart and self.starts[node] > 1:
            self.store.update_pod_status(meta["namespace"], meta["name"], PluginPodStatus(
                running=False, ready=False, restart_count=3, waiting_reason="CrashLoopBackOff",
                last_exit_code=1, last_reason="Error"))
            return
        self.store.update_pod_status(meta["namespace"], meta["name"], PluginPodStatus(running=True, ready=True))
        timer = threading.Timer(REGISTER_S, self.store.update_node_status, (node, {GPU: GPUS}, {GPU: GPUS}))
        timer.daemon = True
        self.timers.append(timer)
        timer.start()

    def stop_plugin_pod(self, node: str, pod_name: str) -> None:
        self.store.update_node_status(node, {GPU: GPUS}, {GPU: "0"})  # the kubelet lost the plugin

    def pod_log(self, node: str, pod_name: str, tail_lines: Any = None) -> str:
        return ""


def plugin_pods(server: LabApiServer, node: str) -> List[Dict[str, Any]]:
    return server.store.list_objects("v1", "Pod", NS, SELECTOR, "spec.nodeName=" + node)


def allocatable(server: LabApiServer, node: str) -> Any:
    return ((server.store.get_object("v1", "Node", None, node) or {}).get("status") or {}).get("allocatable", {}).get(GPU)


def settle(server: LabApiServer, nodes: List[str], timeout: float = 10.0) -> None:
    """Wait (test side) until each node has a Ready plugin pod and advertises its GPUs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(allocatable(server, n) == GPUS and len(plugin_pods(server, n)) == 1 for n in nodes):
            return
        time.sleep(0.05)
    raise AssertionError("the lab fleet did not settle")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("restart")
    server = LabApiServer(str(base / "api"))
    runtime = StubRuntime()
    runtime.store = server.store
    server.attach_runtime(runtime)
    server.start()
    server.store.add_nodes([NodeSpec(name="gpu-a", root="", gpu_count=4, labels={"nvidia.com/gpu.present": "true"}),
                            NodeSpec(name="gpu-b", root="", gpu_count=4, labels={"nvidia.com/gpu.present": "true"}),
                            NodeSpec(name="gpu-c", root="", gpu_count=4)])
    server.store.create_object(DAEMONSET)
    settle(server, ["gpu-a", "gpu-b"])
    kubeconfig = server.write_kubeconfig(str(base / "kubeconfig"))
    env = ansible_env(base, kubeconfig)
    yield {"server": server, "runtime": runtime, "base": base, "env": env, "kubeconfig": kubeconfig}
    server.stop()
    for timer in runtime.timers:
        timer.cancel()


def restart_task(name: str, check_mode: bool = False, **args: Any) -> Dict[str, Any]:
    task: Dict[str, Any] = {"name": name, "gpunode.bringup.device_plugin_restart": args, "diff": True}
    if check_mode:
        task["check_mode"] = True
    return task


def test_restart_waits_for_the_new_pod_and_the_gpus_and_reports_what_is_missing(lab: Dict[str, Any]) -> None:
    server = lab["server"]
    before = plugin_pods(server, "gpu-a")[0]["metadata"]["uid"]
    results = run_tasks(lab, [
        restart_task("check", True, node="gpu-a"),
        restart_task("restart", node="gpu-a", expected_count=4),
        restart_task("crash loop", node="gpu-b", timeout=1),
        restart_task("too few GPUs", node="gpu-a", expected_count=5, timeout=1),
        restart_task("no plugin pod", node="gpu-c"),
        restart_task("bad timeout", node="gpu-a", timeout=0),
    ])

    check = results["check"]
    assert check["changed"] and check["new_pod"] is None and check["waited_seconds"] == 0
    assert check["old_pod"]["uid"] == before

    done = results["restart"]
    assert not done.get("failed"), done.get("msg")
    assert done["changed"] and done["old_pod"]["uid"] == before  # check mode deleted nothing
    assert done["new_pod"]["uid"] != before and done["new_pod"]["ready"] and done["new_pod"]["node"] == "gpu-a"
    assert done["advertised"] == {"capacity": 4, "allocatable": 4}
    assert done["waited_seconds"] >= REGISTER_S  # it waited for the registration, not just the pod
    assert done["diff"]["before"]["uid"] == before and done["diff"]["after"]["uid"] == done["new_pod"]["uid"]

    crash = results["crash loop"]
    assert crash["failed"] and crash["new_pod"]["waiting_reason"] == "CrashLoopBackOff"
    assert "node gpu-b: new device plugin pod %s is not Ready after 1s" % crash["new_pod"]["name"] in crash["msg"]
    assert "CrashLoopBackOff" in crash["msg"] and "3 restarts" in crash["msg"]
    assert "logs %s" % crash["new_pod"]["name"] in crash["action"]

    few = results["too few GPUs"]
    assert few["failed"] and few["advertised"] == {"capacity": 4, "allocatable": 4}
    assert "allocatable nvidia.com/gpu 4 of expected 5" in few["msg"] and "device_plugin_probe" in few["action"]
    assert 1 <= few["waited_seconds"] < 4

    missing = results["no plugin pod"]
    assert missing["failed"] and "node gpu-c has no device plugin pod" in missing["msg"]
    assert "scheduling step" in missing["msg"]

    bad = results["bad timeout"]
    assert bad["failed"] and "timeout must be between 1 and 3600 seconds, got 0" in bad["msg"]
    assert plugin_pods(server, "gpu-a")[0]["metadata"]["uid"] == few["new_pod"]["uid"]  # nothing deleted


def test_the_waits_are_watches_not_polls(lab: Dict[str, Any]) -> None:
    server = lab["server"]
    settle(server, ["gpu-a"])
    server.reset_counters()
    request = RestartRequest(node="gpu-a", namespace=NS, label_selector=SELECTOR, resource_name=GPU,
                             expected_count=None, timeout=30)
    result = run_plugin_restart(K8sClient({"kubeconfig": lab["kubeconfig"]}), request, check_mode=False)
    assert result["advertised"] == {"capacity": 4, "allocatable": 4}
    assert REGISTER_S <= result["waited_seconds"] < REGISTER_S + 5
    counts = server.counters()
    # the pod list before the delete, one or two lists while waiting; the node: one list, one watch
    assert counts.get(("delete", "pods")) == 1
    assert counts.get(("list", "pods"), 0) <= 3 and counts.get(("watch", "pods"), 0) <= 1
    assert counts.get(("list", "nodes")) == 1 and counts.get(("watch", "nodes")) == 1
    assert sum(counts.values()) <= 8
