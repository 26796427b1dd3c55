"""gpunode.bringup.device_plugin through ansible-playbook against the lab API server.

round_trip.yml: check mode -> apply -> apply again (changed == false) -> check mode again, the MIG
mixed and time-slicing ConfigMaps, the rollout wait, removal. failures.yml: bad options fail
naming the option and write nothing, a DaemonSet scheduled on zero nodes is not "ready" unless
allowed, a rollout timeout names the crash-looping node and its waiting reason.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from ansible_collections.gpunode.bringup.tests.integration.device_plugin_lab import (
    TARGETS,
    NodeScript,
    ScriptedRuntime,
    crash_loop,
    gpu_nodes,
    lab_cluster,
    run_playbook,
)
from lab.contracts import NodeSpec

DS = ("apps/v1", "DaemonSet")
CM = ("v1", "ConfigMap")


def test_round_trip_check_apply_again_check_variants_remove(tmp_path: Path) -> None:
    nodes = gpu_nodes(3, tmp_path) + [NodeSpec(name="cpu-000", root=str(tmp_path), gpu_count=0)]
    with lab_cluster(tmp_path, nodes) as (server, kubeconfig):
        proc, results = run_playbook(TARGETS / "device_plugin" / "round_trip.yml", tmp_path,
                                     {"kubeconfig": kubeconfig, "expected_nodes": [n.name for n in nodes[:3]]})
        assert proc.returncode == 0, proc.stdout[-6000:]
        store = server.store
        assert store.get_object(*DS, "kube-system", "nvidia-device-plugin-daemonset") is None
        assert store.get_object(*CM, "kube-system", "nvidia-device-plugin-config") is None

    applied = results["apply_first"]["daemonset"]
    template = applied["spec"]["template"]["spec"]
    assert template["tolerations"][0] == {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert template["priorityClassName"] == "system-node-critical"
    assert template["containers"][0]["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert results["apply_first"]["rollout"]["ready"] == 3
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


def test_failures_are_clear_and_write_nothing(tmp_path: Path) -> None:
    runtime = ScriptedRuntime({"crash-000": NodeScript(status=crash_loop(), log=[])})
    nodes = gpu_nodes(2, tmp_path) + [NodeSpec(name="crash-000", root=str(tmp_path), gpu_count=8,
                                               labels={"nvidia.com/gpu.present": "true", "example.com/pool": "crash"})]
    with lab_cluster(tmp_path, nodes, runtime=runtime, namespaces=("gpu-empty", "gpu-crash")) as (server, kubeconfig):
        server.reset_counters()
        proc, results = run_playbook(TARGETS / "device_plugin" / "failures.yml", tmp_path, {
            "kubeconfig": kubeconfig, "empty_namespace": "gpu-empty", "crash_namespace": "gpu-crash",
            "crash_node": "crash-000"})
        assert proc.returncode == 0, proc.stdout[-6000:]
        store = server.store
        for namespace in ("kube-system", "no-such-namespace"):
            assert store.get_object(*DS, namespace, "nvidia-device-plugin-daemonset") is None
            assert store.get_object(*CM, namespace, "nvidia-device-plugin-config") is None
    by_case = {r["item"]["case"]: r for r in results["bad"]}
    assert set(by_case) == {"image", "mig_strategy", "wait_timeout", "request_timeout", "replicas",
                            "sharing", "namespace"}
    assert all(r["failed"] and "Traceback" not in r["msg"] for r in by_case.values())
    assert results["crash_wait"]["rollout"]["nodes_not_ready"] == [
        {"node": "crash-000", "pod": results["crash_wait"]["rollout"]["nodes_not_ready"][0]["pod"],
         "reason": "CrashLoopBackOff (last exit: Error, code 1)"}]


def test_requests_of_check_mode_apply_and_no_change(tmp_path: Path) -> None:
    """The lab's counters: check mode reads and dry-runs; an apply writes as the field manager
    gpunode-bringup; an apply with nothing to change reads and dry-runs, and writes nothing."""
    from ansible_collections.gpunode.bringup.plugins.module_utils._device_plugin import device_plugin_result

    params = {"kubeconfig": str(tmp_path / "kubeconfig"), "wait_timeout": 120}
    reads_and_dry_runs = {("get", "configmaps"): 1, ("dryrun-patch", "configmaps"): 1,
                          ("get", "daemonsets"): 1, ("dryrun-patch", "daemonsets"): 1}
    with lab_cluster(tmp_path, gpu_nodes(3, tmp_path)) as (server, _kubeconfig):
        server.reset_counters()
        assert device_plugin_result(params, check_mode=True, diff_mode=False)["changed"] is True
        assert server.store.get_object(*DS, "kube-system", "nvidia-device-plugin-daemonset") is None
        assert server.counters() == reads_and_dry_runs
        assert device_plugin_result(params, check_mode=False, diff_mode=False)["changed"] is True
        live = server.store.get_object(*DS, "kube-system", "nvidia-device-plugin-daemonset")
        assert [(m["manager"], m["operation"]) for m in live["metadata"]["managedFields"]
                if m["manager"] == "gpunode-bringup"] == [("gpunode-bringup", "Apply")]
        server.reset_counters()
        assert device_plugin_result(params, check_mode=False, diff_mode=False)["changed"] is False
        assert server.counters() == reads_and_dry_runs  # one patch each: the dry run, no write after it
