"""gpunode.bringup.gpu_smoke_test against the real lab: the real API server and scheduler, a
simulated kubelet whose device manager allocates the GPU through NVIDIA's real plugin
(GetPreferredAllocation, Allocate), and a container that runs the image's command with what the
nvidia runtime injects (the lab's nvidia-smi on the lab NVML, honouring NVIDIA_VISIBLE_DEVICES).

gpu-node-01 runs the plugin and advertises its GPU; gpu-node-02 has no plugin pod (the lab's
label_missing fault), so a pod that asks for a GPU there is Unschedulable for the real scheduler.
The module's default pod (``nvidia-smi -L`` in nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04) must
reach Succeeded and list the GPU the plugin allocated; with the node's driver broken (the NVML
fault driver_library_mismatch) nvidia-smi fails and the test does not pass; a pod that runs past
the timeout is reported as such; a ServiceAccount without the right to create pods is refused by
the real RBAC authorizer. Every pod the module creates must be gone when the task ends (counted
from the API server's audit log).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / ".build", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

pytest.importorskip("kubernetes")

from api_tasks import ansible_env, run_tasks  # noqa: E402
from device_plugin_lab import deploy_plugin, lab_fleet, stored_writes  # noqa: E402
from lab import nvml_state  # noqa: E402

NS = "default"
NODE, NO_GPU_NODE = "gpu-node-01", "gpu-node-02"
SMOKE_LABEL = "app.kubernetes.io/name=gpunode-smoke-test"
# what the module may do in the namespace, less "create pods": the RBAC refusal case
NO_CREATE_ROLE = {
    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
    "metadata": {"name": "smoke-no-create", "namespace": NS},
    "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete"]},
              {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
              {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]}]}
NO_CREATE_BINDING = {
    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
    "metadata": {"name": "smoke-no-create", "namespace": NS},
    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "smoke-no-create"},
    "subjects": [{"kind": "ServiceAccount", "name": "smoke-no-create", "namespace": NS}]}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Any]]:
    base = tmp_path_factory.mktemp("smoke")
    with lab_fleet(nodes=2, gpus=1) as fleet:
        fleet.break_(NO_GPU_NODE, "label_missing")
        deploy_plugin(fleet)
        fleet.wait_advertising([NODE], timeout=180)
        yield {"fleet": fleet, "base": base, "env": ansible_env(base, fleet.kubeconfig)}


def smoke_task(name: str, check_mode: bool = False, **args: Any) -> Dict[str, Any]:
    task: Dict[str, Any] = {"name": name, "gpunode.bringup.gpu_smoke_test": dict({"node": NODE}, **args)}
    if check_mode:
        task["check_mode"] = True
    return task


def smoke_pods(fleet: Any) -> list:
    return fleet.api("/api/v1/namespaces/%s/pods?labelSelector=%s" % (NS, SMOKE_LABEL))["items"]


def test_smoke_outcomes_and_the_pod_is_always_deleted(lab: Dict[str, Any]) -> None:
    fleet = lab["fleet"]
    gpu_uuid = nvml_state.read_state(str(fleet.node_root(NODE) / "nvml.state"))["gpus"][0]["uuid"]
    fleet.reset_counters()
    results = run_tasks(lab, [
        smoke_task("check", True),
        smoke_task("passes", timeout=120),
        smoke_task("unschedulable", node=NO_GPU_NODE, timeout=120),
        smoke_task("hangs", command=["sleep", "60"], timeout=3),
        smoke_task("bad toleration", tolerations=[{"key": "x", "tolerationSeconds": "soon"}]),
    ])

    check = results["check"]
    assert check["skipped"] and not check["changed"] and check["passed"] is None

    passed = results["passes"]
    assert not passed.get("failed"), passed.get("msg")
    assert passed["passed"] is True and passed["changed"] is False and passed["outcome"] == "succeeded"
    assert passed["phase"] == "Succeeded" and passed["container_state"]["terminated"]["exitCode"] == 0
    assert passed["pod"]["node"] == NODE and passed["pod"]["name"].startswith("gpunode-smoke-")
    assert "Scheduled" in [e["reason"] for e in passed["events"]]  # the real scheduler bound it
    # nvidia-smi -L in the container lists the GPU NVIDIA's plugin allocated to it
    assert passed["log"].startswith("GPU 0: ") and "(UUID: %s)" % gpu_uuid in passed["log"], passed["log"]
    assert passed["deleted"] is True

    unschedulable = results["unschedulable"]
    assert unschedulable["passed"] is False and unschedulable["outcome"] == "unschedulable"
    assert "Insufficient nvidia.com/gpu" in unschedulable["message"] and unschedulable["log"] is None
    assert unschedulable["events"][-1]["reason"] == "FailedScheduling" and unschedulable["pod"]["node"] is None

    hung = results["hangs"]
    assert hung["passed"] is False and hung["outcome"] == "timeout" and hung["phase"] == "Running"
    assert hung["message"].startswith("no final state within 3s")
    assert "running" in hung["container_state"]

    bad = results["bad toleration"]
    assert bad["failed"] and "tolerationSeconds" in bad["msg"] and "tolerations" in bad["action"]

    # the audit log: three pods created (one more as check mode's dry run), three deleted, none left
    counters = fleet.counters()
    assert counters["write_requests"] == {"create": {"pods": 3}, "delete": {"pods": 3}}, counters["write_requests"]
    assert counters["dry_run_writes"] == 1
    assert smoke_pods(fleet) == []


def test_a_broken_driver_fails_the_smoke_test_and_the_pod_is_deleted(lab: Dict[str, Any]) -> None:
    fleet = lab["fleet"]
    # the node's driver and NVML library disagree: nvidia-smi in the container cannot initialise NVML
    fleet.break_(NODE, "driver_library_mismatch")
    try:
        fleet.reset_counters()
        results = run_tasks(lab, [smoke_task("fails", timeout=120)])
    finally:
        fleet.fix(NODE, "driver_library_mismatch")
    failed = results["fails"]
    assert not failed.get("failed"), failed.get("msg")  # a test that does not pass is reported, not raised
    assert failed["passed"] is False and failed["outcome"] == "failed" and failed["reason"] == "Error"
    assert failed["message"].startswith("exit code ") and failed["message"] != "exit code 0"
    assert "did not succeed: failed" in failed["msg"]
    assert "Driver/library version mismatch" in failed["log"], failed["log"]
    assert failed["deleted"] is True
    assert [w[:2] for w in stored_writes(fleet)] == [("create", "pods"), ("delete", "pods")]
    assert smoke_pods(fleet) == []


def test_without_the_right_to_create_pods_the_module_fails_and_creates_nothing(lab: Dict[str, Any]) -> None:
    fleet = lab["fleet"]
    kubeconfig = fleet.service_account_kubeconfig("smoke-no-create", NS, [NO_CREATE_ROLE, NO_CREATE_BINDING])
    fleet.reset_counters()
    results = run_tasks(lab, [smoke_task("forbidden", timeout=30), smoke_task("forbidden (check)", True)],
                        env={"K8S_AUTH_KUBECONFIG": kubeconfig})
    for name in ("forbidden", "forbidden (check)"):
        refused = results[name]
        assert refused["failed"] and "forbidden" in refused["msg"], refused
        assert "cannot create resource \"pods\"" in refused["msg"]
        assert "rbac" in refused["action"].lower()
    forbidden = fleet.counters()["forbidden"]
    assert [(f["user"], f["verb"], f["resource"]) for f in forbidden] == [
        ("system:serviceaccount:default:smoke-no-create", "create", "pods")] * 2
    assert stored_writes(fleet) == [] and smoke_pods(fleet) == []
