"""gpunode.bringup.device_plugin through ansible-playbook against the real lab: the real API server
(server-side apply, dry run, the audit log), the real DaemonSet controller and scheduler, and
NVIDIA's real plugin in every pod it creates.

One fleet for the module: four nodes, gpu-node-04 without the GPU label (the lab's label_missing
fault), so the DaemonSet targets three. round_trip.yml: check mode -> apply -> apply again
(changed == false) -> check mode again, the MIG mixed and time-slicing ConfigMaps (each rolls the
real pods), the rollout wait, removal. failures.yml: bad options fail naming the option and write
nothing; a DaemonSet scheduled on zero nodes is not "ready" unless allowed; a rollout timeout names
the node whose real plugin crash-loops (the plugin_crash fault: NVML init fails in its sandbox, the
container exits 1) and the kubelet's real waiting reason. The request test counts from the audit
log what check mode, an apply and an apply with nothing to change send.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
import yaml

from device_plugin_lab import (
    GPU,
    NS,
    TARGETS,
    config_map,
    create_namespace,
    daemonset,
    lab_fleet,
    patch_node,
    plugin_spec,
    pods_on,
    plugin_pods,
    remove_plugin,
    run_playbook,
    stored_writes,
    wait_until,
)
from lab_fleet import LabFleet

GPU_NODES = ["gpu-node-01", "gpu-node-02", "gpu-node-03"]
CPU_NODE = "gpu-node-04"
CRASH_NODE = "gpu-node-03"


@pytest.fixture(scope="module")
def fleet() -> Iterator[LabFleet]:
    with lab_fleet(nodes=4, gpus=2) as fleet:
        fleet.break_(CPU_NODE, "label_missing")  # the GPU label removed from the Node: a node not targeted
        yield fleet


def test_round_trip_check_apply_again_check_variants_remove(fleet: LabFleet, tmp_path: Path) -> None:
    proc, results = run_playbook(TARGETS / "device_plugin" / "round_trip.yml", tmp_path,
                                 {"kubeconfig": fleet.kubeconfig, "expected_nodes": GPU_NODES})
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert daemonset(fleet) is None and config_map(fleet) is None
    assert plugin_pods(fleet) == []  # the removal waited for the pods too

    applied = results["apply_first"]["daemonset"]
    template = applied["spec"]["template"]["spec"]
    assert template["tolerations"][0] == {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert template["priorityClassName"] == "system-node-critical"
    assert template["containers"][0]["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # defaults the real API server filled in are part of what an apply stores (and compares)
    assert template["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    assert applied["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    rollout = results["apply_first"]["rollout"]
    assert rollout["ready"] == rollout["desired"] == rollout["updated"] == 3
    assert yaml.safe_load(results["mig_apply"]["config_map"]["data"]["config.yaml"]) == {
        "version": "v1",
        "flags": {"migStrategy": "mixed", "failOnInitError": True,
                  "plugin": {"deviceListStrategy": "envvar", "deviceIDStrategy": "uuid"}},
    }
    assert yaml.safe_load(results["sliced"]["config_map"]["data"]["config.yaml"])["sharing"] == {
        "timeSlicing": {"renameByDefault": False, "failRequestsGreaterThanOne": True,
                        "resources": [{"name": "nvidia.com/gpu", "replicas": 4}]}}
    hashes = {results[k]["daemonset"]["spec"]["template"]["metadata"]["annotations"]["gpunode.bringup/config-sha256"]
              for k in ("apply_first", "mig_apply", "sliced")}
    assert len(hashes) == 3  # each config change rolls the pods
    # the real DaemonSet controller bumped the generation on each template change and rolled every pod
    assert results["sliced"]["rollout"]["generation"] == 3 and results["sliced"]["rollout"]["ready"] == 3
    # NVIDIA's plugin read the time-slicing config: every targeted node advertised 2 GPUs x 4 replicas
    assert results["sliced_nodes"] == {node: {"capacity": {GPU: 8}, "allocatable": {GPU: 8}, "unhealthy_devices": {GPU: 0}}
                                       for node in GPU_NODES}, results["sliced_nodes"]


def test_failures_are_clear_and_write_nothing(fleet: LabFleet, tmp_path: Path) -> None:
    playbook = TARGETS / "device_plugin" / "failures.yml"
    base = {"kubeconfig": fleet.kubeconfig, "empty_namespace": "gpu-empty", "crash_namespace": "gpu-crash",
            "crash_node": CRASH_NODE}
    fleet.reset_counters()
    proc, results = run_playbook(playbook, tmp_path, dict(base, part="options"))
    assert proc.returncode == 0, proc.stdout[-6000:]
    # nothing stored: the bad options fail before any request; the missing namespace fails on the
    # ConfigMap's apply, which the API server refuses (404) before the DaemonSet is tried
    assert stored_writes(fleet) == []
    assert fleet.counters()["requests"] == {"get": {"configmaps": 1}, "patch": {"configmaps": 1}}
    for namespace in (NS, "no-such-namespace"):
        assert daemonset(fleet, namespace) is None and config_map(fleet, namespace) is None
    by_case = {r["item"]["case"]: r for r in results["bad"]}
    assert set(by_case) == {"image", "mig_strategy", "wait_timeout", "request_timeout", "replicas",
                            "sharing", "namespace"}
    assert all(r["failed"] and "Traceback" not in r["msg"] for r in by_case.values())

    for namespace in ("gpu-empty", "gpu-crash"):
        create_namespace(fleet, namespace)
    patch_node(fleet, CRASH_NODE, {"metadata": {"labels": {"example.com/pool": "crash"}}})
    # NVML init fails in the sandbox of the node's next plugin pod: failOnInitError makes it exit 1
    fleet.break_(CRASH_NODE, "plugin_crash", signature="nvml_init_failed", sticky="true")
    spec = plugin_spec(namespace="gpu-crash", node_selector={"example.com/pool": "crash"})
    try:
        proc, results = run_playbook(playbook, tmp_path, dict(base, part="empty"))
        assert proc.returncode == 0, proc.stdout[-6000:]
        assert "scheduled on zero nodes" in results["empty_wait"]["msg"]

        # the kubelet's back-off: the first restart at once, then 10 s, then 20 s; once the
        # container has failed a third time the pod waits 20 s in CrashLoopBackOff
        def crash_looping() -> Any:
            pods = pods_on(plugin_pods(fleet, spec), CRASH_NODE)
            status = (pods[0].get("status") or {}).get("containerStatuses") or [{}] if pods else [{}]
            waiting = (status[0].get("state") or {}).get("waiting") or {}
            return waiting.get("reason") == "CrashLoopBackOff" and status[0].get("restartCount", 0) >= 2 and status[0]

        status = wait_until("the plugin pod on %s crash-looping" % CRASH_NODE, crash_looping, 120)
        assert status["lastState"]["terminated"]["exitCode"] == 1
        proc, results = run_playbook(playbook, tmp_path, dict(base, part="crash"))
        assert proc.returncode == 0, proc.stdout[-6000:]
        not_ready = results["crash_wait"]["rollout"]["nodes_not_ready"]
        assert [(n["node"], n["reason"]) for n in not_ready] == [(CRASH_NODE, "CrashLoopBackOff (last exit: Error, code 1)")]
        assert not_ready[0]["pod"] == pods_on(plugin_pods(fleet, spec), CRASH_NODE)[0]["metadata"]["name"]
    finally:
        fleet.fix(CRASH_NODE, "plugin_crash")
        remove_plugin(fleet, spec)
        remove_plugin(fleet, plugin_spec(namespace="gpu-empty", node_selector={"example.com/no-such-pool": "true"}))
        patch_node(fleet, CRASH_NODE, {"metadata": {"labels": {"example.com/pool": None}}})


def test_requests_of_check_mode_apply_and_no_change(fleet: LabFleet, tmp_path: Path) -> None:
    """From the audit log: check mode reads and dry-runs; an apply writes as field manager
    gpunode-bringup (the real managedFields); an apply with nothing to change reads and dry-runs,
    and writes nothing."""
    from ansible_collections.gpunode.bringup.plugins.module_utils._device_plugin import device_plugin_result

    params: Dict[str, Any] = {"kubeconfig": fleet.kubeconfig, "wait_timeout": 120}
    reads_and_dry_runs = {"get": {"configmaps": 1, "daemonsets": 1}, "patch": {"configmaps": 1, "daemonsets": 1}}
    try:
        fleet.reset_counters()
        check = device_plugin_result(params, check_mode=True, diff_mode=True)
        assert check["changed"] is True
        counters = fleet.counters()
        assert counters["requests"] == reads_and_dry_runs and counters["writes"] == 0
        assert counters["dry_run_writes"] == 2
        assert daemonset(fleet) is None and config_map(fleet) is None

        fleet.reset_counters()
        applied = device_plugin_result(params, check_mode=False, diff_mode=True)
        assert applied["changed"] is True
        # nothing to compare with: one apply each, no dry run first
        assert fleet.write_requests() == {"patch": {"configmaps": 1, "daemonsets": 1}}
        assert fleet.counters()["dry_run_writes"] == 0
        assert check["daemonset"]["spec"] == applied["daemonset"]["spec"]  # the dry run showed what was stored
        live = daemonset(fleet)
        assert live is not None
        managers = [(m["manager"], m["operation"], m.get("subresource")) for m in live["metadata"]["managedFields"]]
        assert ("gpunode-bringup", "Apply", None) in managers
        assert all(manager != "gpunode-bringup" or operation == "Apply" for manager, operation, _sub in managers)
        owned = next(m for m in live["metadata"]["managedFields"] if m["manager"] == "gpunode-bringup")
        assert "f:template" in owned["fieldsV1"]["f:spec"]  # the fields the collection set are its own

        fleet.reset_counters()
        again = device_plugin_result(params, check_mode=False, diff_mode=True)
        assert again["changed"] is False
        counters = fleet.counters()
        assert counters["requests"] == reads_and_dry_runs  # one patch each: the dry run, no write after it
        assert counters["writes"] == 0 and counters["dry_run_writes"] == 2
        assert daemonset(fleet)["metadata"]["generation"] == live["metadata"]["generation"]
    finally:
        remove_plugin(fleet, plugin_spec())
