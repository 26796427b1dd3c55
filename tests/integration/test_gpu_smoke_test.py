"""gpunode.bringup.gpu_smoke_test against the lab API server with its scheduler and kubelet
stand-in for ordinary pods (``workloads=True``).

gpu-a advertises one GPU; gpu-b advertises none, so a pod pinned there is Unschedulable
(Insufficient nvidia.com/gpu). A small runtime runs the admitted smoke pods by image: lab/ok
exits 0 with an nvidia-smi-like line, lab/fail exits 4, lab/hang outlives the module's timeout.
Every pod the module creates must be gone when the task ends, whatever the outcome.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / ".build", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

pytest.importorskip("kubernetes")

from api_tasks import ansible_env, run_tasks  # noqa: E402
from lab.apiserver import LabApiServer  # noqa: E402
from lab.contracts import NodeSpec  # noqa: E402

NS = "default"
GPU = "nvidia.com/gpu"
SMOKE_LABEL = "app.kubernetes.io/name=gpunode-smoke-test"
HANG_S = 3.0


class WorkloadStub:
    """The node runtime for workload pods: runs the smoke container by its image."""

    def __init__(self) -> None:
        self.ran: List[str] = []

    def run_workload_pod(self, node: str, pod: Dict[str, Any]) -> Tuple[int, str]:
        self.ran.append(pod["metadata"]["name"])
        image = pod["spec"]["containers"][0]["image"]
        if image == "lab/fail":
            return 4, "Failed to initialize NVML: Driver/library version mismatch\n"
        if image == "lab/hang":
            time.sleep(HANG_S)
        return 0, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5d2c1f3e-0000-4000-8000-000000000001)\n"

    # DaemonSet hooks (no DaemonSet in this test)
    def start_plugin_pod(self, node: str, pod: Dict[str, Any]) -> None:
        pass

    def stop_plugin_pod(self, node: str, pod_name: str) -> None:
        pass

    def pod_log(self, node: str, pod_name: str, tail_lines: Any = None) -> str:
        return ""


class SmokePods:
    """Records the smoke pods created and deleted (store listener)."""

    def __init__(self, server: LabApiServer) -> None:
        self.created: List[str] = []
        self.deleted: List[str] = []
        self.lock = threading.Lock()
        server.store.add_listener(self.on_change)

    def on_change(self, res: Any, etype: str, old: Any, new: Dict[str, Any]) -> None:
        meta = new.get("metadata") or {}
        if res.kind != "Pod" or (meta.get("labels") or {}).get("app.kubernetes.io/name") != "gpunode-smoke-test":
            return
        with self.lock:
            if etype == "ADDED":
                self.created.append(meta["name"])
            elif etype == "DELETED":
                self.deleted.append(meta["name"])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("smoke")
    runtime = WorkloadStub()
    server = LabApiServer(str(base / "api"), runtime=runtime, workloads=True).start()
    server.store.add_nodes([NodeSpec(name="gpu-a", root="", gpu_count=1), NodeSpec(name="gpu-b", root="", gpu_count=0)])
    server.store.update_node_status("gpu-a", {GPU: "1"}, {GPU: "1"})  # the plugin registered one GPU
    pods = SmokePods(server)
    kubeconfig = server.write_kubeconfig(str(base / "kubeconfig"))
    env = ansible_env(base, kubeconfig)
    yield {"server": server, "runtime": runtime, "pods": pods, "base": base, "env": env}
    server.stop()


def smoke_task(name: str, check_mode: bool = False, **args: Any) -> Dict[str, Any]:
    task: Dict[str, Any] = {"name": name, "gpunode.bringup.gpu_smoke_test": dict({"node": "gpu-a"}, **args)}
    if check_mode:
        task["check_mode"] = True
    return task


def test_smoke_outcomes_and_the_pod_is_always_deleted(lab: Dict[str, Any]) -> None:
    server, pods = lab["server"], lab["pods"]
    server.reset_counters()
    results = run_tasks(lab, [
        smoke_task("check", True, image="lab/ok"),
        smoke_task("passes", image="lab/ok"),
        smoke_task("fails", image="lab/fail"),
        smoke_task("unschedulable", node="gpu-b", image="lab/ok"),
        smoke_task("hangs", image="lab/hang", timeout=1),
        smoke_task("bad toleration", image="lab/ok", tolerations=[{"key": "x", "tolerationSeconds": "soon"}]),
    ])

    check = results["check"]
    assert check["skipped"] and not check["changed"] and check["passed"] is None

    passed = results["passes"]
    assert not passed.get("failed"), passed.get("msg")
    assert passed["passed"] is True and passed["changed"] is False and passed["outcome"] == "succeeded"
    assert passed["phase"] == "Succeeded" and passed["container_state"]["terminated"]["exitCode"] == 0
    assert passed["pod"]["node"] == "gpu-a" and passed["pod"]["name"].startswith("gpunode-smoke-")
    assert [e["reason"] for e in passed["events"]] == ["Scheduled", "Pulled", "Created", "Started"]
    assert passed["log"].startswith("GPU 0: NVIDIA H100") and passed["deleted"] is True

    failed = results["fails"]
    assert not failed.get("failed")  # a test that does not pass is reported, not raised
    assert failed["passed"] is False and failed["outcome"] == "failed" and failed["reason"] == "Error"
    assert failed["message"] == "exit code 4" and "did not succeed: failed" in failed["msg"]
    assert "Driver/library version mismatch" in failed["log"]

    unschedulable = results["unschedulable"]
    assert unschedulable["passed"] is False and unschedulable["outcome"] == "unschedulable"
    assert "Insufficient nvidia.com/gpu" in unschedulable["message"] and unschedulable["log"] is None
    assert unschedulable["events"][-1]["reason"] == "FailedScheduling" and unschedulable["pod"]["node"] is None

    hung = results["hangs"]
    assert hung["passed"] is False and hung["outcome"] == "timeout" and hung["phase"] == "Running"
    assert hung["message"] == "no final state within 1s" and 1 <= hung["duration"] < HANG_S
    assert "running" in hung["container_state"]

    bad = results["bad toleration"]
    assert bad["failed"] and "tolerationSeconds" in bad["msg"] and "tolerations" in bad["action"]

    ran = [results[name]["pod"]["name"] for name in ("passes", "fails", "unschedulable", "hangs")]
    assert sorted(pods.created) == sorted(ran)  # check mode and bad input created nothing
    assert sorted(pods.deleted) == sorted(ran)
    assert server.store.list_objects("v1", "Pod", NS, SMOKE_LABEL) == []
    assert server.count("create", "pods") == 4 and server.count("dryrun-create", "pods") == 1  # four real, one dry run
    assert sorted(lab["runtime"].ran) == sorted(results[name]["pod"]["name"] for name in ("passes", "fails", "hangs"))
