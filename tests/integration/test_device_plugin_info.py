"""gpunode.bringup.device_plugin_info through ansible-playbook against the lab API server.

The request count is read from the lab server's counters: a DaemonSet read, one LIST of nodes and one
LIST of plugin pods, whatever the fleet size (10 and 200 nodes), plus one log read per unhealthy node.
Each scheduling cause and each log signature is produced on its own node and named in its entry.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest

from ansible_collections.gpunode.bringup.plugins.module_utils._device_plugin import (
    DevicePluginSpec,
    config_text,
    render_daemonset,
    spec_from_params,
)
from ansible_collections.gpunode.bringup.tests.integration.device_plugin_lab import (
    GPU,
    GPU_LABELS,
    LOGS,
    TARGETS,
    NodeScript,
    ScriptedRuntime,
    crash_loop,
    gpu_nodes,
    lab_cluster,
    run_playbook,
)
from lab.contracts import NodeSpec, PluginPodStatus

PLAYBOOK = TARGETS / "device_plugin_info" / "fleet.yml"
CONSTANT_CALLS = {("get", "daemonsets"): 1, ("list", "nodes"): 1, ("list", "pods"): 1}


def deploy(server, spec: DevicePluginSpec) -> None:
    server.store.create_object(render_daemonset(spec, config_text(spec.config)))


def wait_for_pods(server, count: int) -> None:
    """The lab's DaemonSet controller creates the pods asynchronously."""
    import time
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pods = server.store.list_objects("v1", "Pod", "kube-system", "name=nvidia-device-plugin-ds")
        ready = [p for p in pods if (p.get("status") or {}).get("phase") in ("Running", "Pending")
                 and (p.get("status") or {}).get("containerStatuses")]
        if len(ready) >= count:
            return
        time.sleep(0.05)
    raise AssertionError("the lab did not create %d plugin pods" % count)


@pytest.mark.parametrize("count", [10, 200])
def test_fleet_read_uses_three_requests_at_any_size(tmp_path: Path, count: int) -> None:
    with lab_cluster(tmp_path, gpu_nodes(count, tmp_path)) as (server, kubeconfig):
        deploy(server, DevicePluginSpec())
        wait_for_pods(server, count)
        server.reset_counters()
        proc, fleet = run_playbook(PLAYBOOK, tmp_path, {"kubeconfig": kubeconfig, "expected_gpu_count": 8})
        assert proc.returncode == 0, proc.stdout[-4000:]
        assert server.counters() == CONSTANT_CALLS
    assert fleet["api_requests"] == 3
    assert fleet["summary"] == {"nodes": count, "healthy": count, "unhealthy": [], "findings": {}}
    entry = fleet["nodes"][0]
    assert entry["scheduling"] == {"targeted": True, "reasons": []}
    assert entry["plugin_pod"]["phase"] == "Running" and entry["plugin_pod"]["ready"]
    assert entry["resources"]["capacity"] == {GPU: 8} and entry["resources"]["unhealthy_devices"] == {GPU: 0}
    assert entry["log"] == {"read": False}
    print("device_plugin_info at N=%d: %d requests %s" % (count, fleet["api_requests"], server.counters()))


def scripts() -> Dict[str, NodeScript]:
    running = PluginPodStatus(running=True, ready=True)
    no_gpus: Dict[str, str] = {}
    return {
        "sig-registered": NodeScript(running, LOGS["registered"]),
        "sig-nvml": NodeScript(crash_loop(), LOGS["nvml_init_failed"], no_gpus),
        "sig-incompatible": NodeScript(running, LOGS["incompatible_strategy"], no_gpus),
        "sig-nodevices": NodeScript(running, LOGS["no_devices"], no_gpus),
        "sig-regfail": NodeScript(running, LOGS["registration_failed"], no_gpus),
        "sig-xid": NodeScript(running, LOGS["xid_unhealthy"], {GPU: "8"}, {GPU: "7"}),
        "sig-kubelet": NodeScript(running, LOGS["kubelet_restart_seen"], {GPU: "0"}),
        "sig-unknown": NodeScript(PluginPodStatus(running=True, ready=False), LOGS["unknown"], no_gpus),
        "pod-imagepull": NodeScript(PluginPodStatus(running=False, ready=False, waiting_reason="ImagePullBackOff"),
                                    [], no_gpus),
    }


SIGNATURES = {"sig-registered": "registered", "sig-nvml": "nvml_init_failed", "sig-incompatible": "incompatible_strategy",
              "sig-nodevices": "no_devices", "sig-regfail": "registration_failed", "sig-xid": "xid_unhealthy",
              "sig-kubelet": "kubelet_restart_seen", "sig-unknown": "unknown"}
POOL = {"example.com/pool": "gpu"}


def test_each_scheduling_cause_and_log_signature_is_named(tmp_path: Path) -> None:
    nodes = [NodeSpec(name=name, root=str(tmp_path), gpu_count=8, labels=dict(GPU_LABELS, **POOL)) for name in scripts()]
    nodes += [
        NodeSpec(name="sched-nolabel", root=str(tmp_path), labels=dict(GPU_LABELS)),
        NodeSpec(name="sched-mismatch", root=str(tmp_path), labels=dict(GPU_LABELS, **{"example.com/pool": "cpu"})),
        NodeSpec(name="sched-affinity", root=str(tmp_path), labels=dict(POOL)),
        NodeSpec(name="sched-taint", root=str(tmp_path), labels=dict(GPU_LABELS, **POOL),
                 taints=[{"key": "dedicated", "value": "training", "effect": "NoSchedule"}]),
        NodeSpec(name="sched-cordoned-ok", root=str(tmp_path), labels=dict(GPU_LABELS, **POOL),
                 taints=[{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
                         {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]),
    ]
    runtime = ScriptedRuntime(scripts())
    with lab_cluster(tmp_path, nodes, runtime=runtime) as (server, kubeconfig):
        deploy(server, spec_from_params({"node_selector": POOL}))
        wait_for_pods(server, len(scripts()) + 1)
        server.reset_counters()
        names = [n.name for n in nodes] + ["no-such-node"]
        proc, fleet = run_playbook(PLAYBOOK, tmp_path, {"kubeconfig": kubeconfig, "nodes": names,
                                                        "check_too": True})
        assert proc.returncode == 0, proc.stdout[-4000:]
        counters = server.counters()
    by_name = {entry["name"]: entry for entry in fleet["nodes"]}
    assert [e["name"] for e in fleet["nodes"]] == names

    # scheduling: each cause, with its key / value / effect
    def causes(name):
        return [(r["reason"], r.get("key"), r.get("value"), r.get("effect"))
                for r in by_name[name]["scheduling"]["reasons"]]
    assert causes("sched-nolabel") == [("missing_label", "example.com/pool", "gpu", None)]
    assert causes("sched-mismatch") == [("label_mismatch", "example.com/pool", "gpu", None)]
    assert by_name["sched-mismatch"]["scheduling"]["reasons"][0]["actual"] == "cpu"
    assert causes("sched-affinity") == [("unmet_affinity", "nvidia.com/gpu.present", "true", None),
                                        ("unmet_affinity", "feature.node.kubernetes.io/pci-10de.present", "true", None)]
    assert causes("sched-taint") == [("untolerated_taint", "dedicated", "training", "NoSchedule")]
    assert by_name["sched-cordoned-ok"]["scheduling"]["targeted"] is True
    assert by_name["sched-taint"]["findings"][0]["code"] == "not_targeted_taint"
    assert by_name["sched-nolabel"]["findings"][0]["code"] == "not_targeted_label"
    assert "label the node example.com/pool=gpu" in by_name["sched-nolabel"]["findings"][0]["action"]
    assert by_name["no-such-node"]["found"] is False

    # logs: each signature, with the line that decided it; healthy nodes are not read
    for name, signature in SIGNATURES.items():
        log = by_name[name]["log"]
        if signature == "registered":
            assert log == {"read": False}, name
            continue
        assert log["read"] is True and log["signature"] == signature, (name, log)
        if signature != "unknown":
            assert log["line"] in LOGS[signature], name
    assert by_name["sig-nvml"]["plugin_pod"]["waiting_reason"] == "CrashLoopBackOff"
    assert by_name["sig-nvml"]["plugin_pod"]["last_exit_code"] == 1
    assert [f["code"] for f in by_name["sig-nvml"]["findings"]] == ["plugin_pod_crashloop", "plugin_nvml_init_failed"]
    assert by_name["sig-xid"]["resources"]["unhealthy_devices"] == {GPU: 1}
    assert "unhealthy_devices" in [f["code"] for f in by_name["sig-xid"]["findings"]]
    assert by_name["pod-imagepull"]["plugin_pod"]["waiting_reason"] == "ImagePullBackOff"
    assert by_name["pod-imagepull"]["findings"][0]["code"] == "plugin_pod_image_pull"
    assert by_name["sig-registered"]["healthy"] is True

    # requests: the constant three, plus one log read per unhealthy node with a pod (the info run),
    # and the check-mode run (read_logs: never) adds three more
    log_reads = sum(1 for e in fleet["nodes"] if e["log"]["read"] or e["log"].get("error"))
    assert log_reads == len(SIGNATURES) - 1 + 1  # every scripted node but the healthy one, and the image pull
    assert counters == {("get", "daemonsets"): 2, ("list", "nodes"): 2, ("list", "pods"): 2,
                        ("get", "pods/log"): log_reads}
