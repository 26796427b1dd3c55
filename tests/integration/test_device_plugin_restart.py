"""gpunode.bringup.device_plugin_restart against the real lab: the real API server and DaemonSet
controller, simulated kubelets running NVIDIA's real plugin.

Three nodes: gpu-node-01 and gpu-node-02 run the plugin DaemonSet as the collection renders it;
gpu-node-03 has no plugin pod (the lab's label_missing fault: the GPU label removed). A restart
deletes the node's pod; the DaemonSet controller creates the replacement, the kubelet starts
NVIDIA's plugin, which registers, and the kubelet then reports the GPUs in the Node's status:
the module waits for both (watches). The fleet runs with node_status_update_frequency=2: the
kubelet's nodeStatusUpdateFrequency is 10 s by default, and every restart here waits for the
Node's status, so the shorter period keeps the test fast (the module waits the same way).
A replacement whose plugin crash-loops (plugin_crash, sticky: it outlives the deleted pod) ends
the wait with the kubelet's real waiting reason.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List

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
from device_plugin_lab import deploy_plugin, lab_fleet, plugin_pods, pods_on  # noqa: E402
from lab_fleet import LabFleet  # noqa: E402

NS = "kube-system"
GPU = "nvidia.com/gpu"
GPUS = 2
SELECTOR = "name=nvidia-device-plugin-ds"
NODE_A, NODE_B, NODE_C = "gpu-node-01", "gpu-node-02", "gpu-node-03"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Any]]:
    base = tmp_path_factory.mktemp("restart")
    with lab_fleet(nodes=3, gpus=GPUS, node_status_update_frequency=2) as fleet:
        fleet.break_(NODE_C, "label_missing")
        deploy_plugin(fleet)
        fleet.wait_advertising([NODE_A, NODE_B], timeout=180)
        yield {"fleet": fleet, "base": base, "env": ansible_env(base, fleet.kubeconfig),
               "kubeconfig": fleet.kubeconfig}


def uids(fleet: LabFleet, node: str) -> List[str]:
    return [p["metadata"]["uid"] for p in pods_on(plugin_pods(fleet), node) if not p["metadata"].get("deletionTimestamp")]


def restart_task(name: str, check_mode: bool = False, **args: Any) -> Dict[str, Any]:
    task: Dict[str, Any] = {"name": name, "gpunode.bringup.device_plugin_restart": args, "diff": True}
    if check_mode:
        task["check_mode"] = True
    return task


def test_restart_waits_for_the_new_pod_and_the_gpus_and_reports_what_is_missing(lab: Dict[str, Any]) -> None:
    fleet = lab["fleet"]
    before = uids(fleet, NODE_A)
    assert len(before) == 1
    fleet.reset_counters()
    results = run_tasks(lab, [
        restart_task("check", True, node=NODE_A),
        restart_task("restart", node=NODE_A, expected_count=GPUS, timeout=120),
        restart_task("too few GPUs", node=NODE_A, expected_count=GPUS + 1, timeout=5),
        restart_task("no plugin pod", node=NODE_C),
        restart_task("bad timeout", node=NODE_A, timeout=0),
    ])
    counters = fleet.counters()

    check = results["check"]
    assert check["changed"] and check["new_pod"] is None and check["waited_seconds"] == 0
    assert check["old_pod"]["uid"] == before[0]

    done = results["restart"]
    assert not done.get("failed"), done.get("msg")
    assert done["changed"] and done["old_pod"]["uid"] == before[0]  # check mode deleted nothing
    assert done["new_pod"]["uid"] != before[0] and done["new_pod"]["ready"] and done["new_pod"]["node"] == NODE_A
    assert done["advertised"] == {"capacity": GPUS, "allocatable": GPUS}
    assert done["diff"]["before"]["uid"] == before[0] and done["diff"]["after"]["uid"] == done["new_pod"]["uid"]

    few = results["too few GPUs"]
    assert few["failed"] and few["advertised"] == {"capacity": GPUS, "allocatable": GPUS}
    assert "allocatable nvidia.com/gpu %d of expected %d" % (GPUS, GPUS + 1) in few["msg"]
    assert "device_plugin_probe" in few["action"]

    missing = results["no plugin pod"]
    assert missing["failed"] and "node %s has no device plugin pod" % NODE_C in missing["msg"]
    assert "scheduling step" in missing["msg"] or "scheduling step" in missing["action"]

    bad = results["bad timeout"]
    assert bad["failed"] and "timeout must be between 1 and 3600 seconds, got 0" in bad["msg"]

    # the audit log: check mode's delete was a dry run; two real deletes (restart, too few GPUs)
    assert fleet.write_requests() == {"delete": {"pods": 2}}, counters
    assert counters["dry_run_writes"] == 1
    assert uids(fleet, NODE_A) == [few["new_pod"]["uid"]]  # the replacement of the last restart runs
    assert few["new_pod"]["uid"] not in (before[0], done["new_pod"]["uid"])


def test_the_waits_are_watches_not_polls(lab: Dict[str, Any]) -> None:
    fleet = lab["fleet"]
    fleet.wait_advertising([NODE_A], timeout=120)
    fleet.reset_counters()
    request = RestartRequest(node=NODE_A, namespace=NS, label_selector=SELECTOR, resource_name=GPU,
                             expected_count=None, timeout=120)
    result = run_plugin_restart(K8sClient({"kubeconfig": lab["kubeconfig"]}), request, check_mode=False)
    assert result["advertised"] == {"capacity": GPUS, "allocatable": GPUS}
    assert result["waited_seconds"] > 0
    requests = fleet.counters()["requests"]
    # the pod list before the delete, one or two lists while waiting; the node: one list, one watch
    assert requests.get("delete") == {"pods": 1}
    assert requests["list"].get("pods", 0) <= 3 and requests.get("watch", {}).get("pods", 0) <= 2
    assert requests["list"].get("nodes") == 1 and requests["watch"].get("nodes") == 1
    assert fleet.counters()["total"] <= 9, requests


def test_a_crash_looping_replacement_ends_the_wait_with_its_reason(lab: Dict[str, Any]) -> None:
    fleet = lab["fleet"]
    # sticky: the fault outlives the pod the restart deletes, so the replacement crashes as well
    fleet.break_(NODE_B, "plugin_crash", signature="nvml_init_failed", sticky="true")
    try:
        # 20 s: the replacement starts, fails, is restarted at once, fails, waits 10 s, fails
        # again and waits 20 s (the kubelet's back-off): the deadline falls in that wait
        results = run_tasks(lab, [restart_task("crash loop", node=NODE_B, timeout=20)])
        crash = results["crash loop"]
        print("crash loop:", crash["msg"])
        assert crash["failed"] and crash["new_pod"]["uid"] in uids(fleet, NODE_B)
        # whichever wait the momentary Ready of a starting container ended, the pod is named the cause
        assert "node %s: new device plugin pod %s is not Ready after 20s" % (NODE_B, crash["new_pod"]["name"]) \
            in crash["msg"], crash["msg"]
        status = (pods_on(plugin_pods(fleet), NODE_B)[0]["status"]["containerStatuses"])[0]
        assert status["lastState"]["terminated"]["exitCode"] == 1  # NVIDIA's plugin exits 1 on NVML init failure
        assert "waiting: CrashLoopBackOff (back-off " in crash["msg"], crash["msg"]
        assert "last exit code 1" in crash["msg"] and "restarts" in crash["msg"]
        assert crash["new_pod"]["waiting_reason"] == "CrashLoopBackOff"
        assert "logs %s" % crash["new_pod"]["name"] in crash["action"]
    finally:
        fleet.fix(NODE_B, "plugin_crash")
    # fixed: the next pod is healthy; the restart waits until NVIDIA's plugin registered again
    results = run_tasks(lab, [restart_task("after the fix", node=NODE_B, expected_count=GPUS, timeout=120)])
    assert not results["after the fix"].get("failed"), results["after the fix"]["msg"]
    assert results["after the fix"]["advertised"] == {"capacity": GPUS, "allocatable": GPUS}


def test_wait_only_for_a_newly_targeted_node(lab: Dict[str, Any]) -> None:
    fleet = lab["fleet"]
    results = run_tasks(lab, [restart_task("wait (check)", True, node=NODE_C, wait_only=True)])
    assert results["wait (check)"]["changed"] is False and results["wait (check)"]["new_pod"] is None
    fleet.fix(NODE_C, "label_missing")  # the label is back: the DaemonSet controller creates the pod now
    results = run_tasks(lab, [restart_task("wait", node=NODE_C, wait_only=True, expected_count=GPUS, timeout=120)])
    waited = results["wait"]
    assert not waited.get("failed"), waited.get("msg")
    assert waited["changed"] is False and waited["deleted_pods"] == []
    assert waited["new_pod"]["node"] == NODE_C and waited["new_pod"]["ready"]
    assert waited["advertised"] == {"capacity": GPUS, "allocatable": GPUS}
    assert uids(fleet, NODE_C) == [waited["new_pod"]["uid"]]
    assert str(fleet.nodes_status()[NODE_C]["allocatable"]) == str(GPUS)
