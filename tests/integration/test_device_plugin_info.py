"""gpunode.bringup.device_plugin_info through ansible-playbook against the real lab.

The request count is read from the real API server's audit log: one DaemonSet read, one LIST of
nodes and one LIST of plugin pods, whatever the fleet size: 10 nodes of a full fleet (NVIDIA's
plugin running on each) and 200 nodes of an --api-only fleet (light agents, the same API objects:
Nodes, Leases, plugin pods Running, nvidia.com/gpu advertised), plus one pods/log read per
unhealthy node.

Then each scheduling cause and each log signature NVIDIA's real plugin produces is made on its own
node of the full fleet by the lab's real-mechanism faults, and named in its entry:

=============  ===========================================  ============================================
node           fault (mechanism)                            what device_plugin_info must name
=============  ===========================================  ============================================
gpu-node-01    none                                         healthy; read anyway: ``registered``
gpu-node-02    plugin_crash (nvmlInit fails in the sandbox)  CrashLoopBackOff, ``nvml_init_failed``
gpu-node-03    plugin_crash incompatible_strategy (no       CrashLoopBackOff, ``incompatible_strategy``
               nvidia runtime injection)
gpu-node-04    plugin_no_devices (NVIDIA_VISIBLE_DEVICES=    ``no_devices``: Running, nothing registered
               void)
gpu-node-05    plugin_crash registration_failed (the        ``registration_failed``
               kubelet refuses Register)
gpu-node-06    critical_xid (NVML event, XID 79)            ``xid_unhealthy``, one unhealthy device
gpu-node-07    kubelet_restart (kubelet.sock re-created)    the restart line seen, then ``registered``
gpu-node-08    label_missing (GPU label removed)            not targeted: unmet affinity
gpu-node-09    taint_untolerated (NoSchedule taint)         not targeted: untolerated taint
gpu-node-10    example.com/pool=cpu (node selector)         not targeted: label mismatch
=============  ===========================================  ============================================

What the real plugin never logs is not tested here: a log with no known line (``unknown``) and a
log that ends with the kubelet-restart line (``kubelet_restart_seen``: NVIDIA's plugin logs its
registration result right after that line, so it is the state of a few milliseconds); the unit
tests of the classifier cover both (tests/unit/plugins/module_utils/test_fleet.py). So is an image
that cannot be pulled (one DaemonSet has one image for every node).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from device_plugin_lab import (
    GPU,
    TARGETS,
    deploy_plugin,
    lab_fleet,
    patch_node,
    plugin_pods,
    plugin_spec,
    pod_ready,
    pods_on,
    run_playbook,
    wait_until,
)
from lab_fleet import LabFleet

PLAYBOOK = TARGETS / "device_plugin_info" / "fleet.yml"
CONSTANT_CALLS = {"get": {"daemonsets": 1}, "list": {"nodes": 1, "pods": 1}}
POOL = {"example.com/pool": "gpu"}
FULL_NODES = 10
GPUS = 2
SIGNATURES = {"gpu-node-02": "nvml_init_failed", "gpu-node-03": "incompatible_strategy", "gpu-node-04": "no_devices",
              "gpu-node-05": "registration_failed", "gpu-node-06": "xid_unhealthy"}
HEALTHY, KUBELET_RESTARTED = "gpu-node-01", "gpu-node-07"
NO_LABEL, TAINTED, NOT_SELECTED = "gpu-node-08", "gpu-node-09", "gpu-node-10"


@pytest.fixture(scope="module")
def fleet() -> Iterator[LabFleet]:
    """Ten full nodes in pool gpu, the plugin DaemonSet (node selector example.com/pool=gpu) on
    each of them, every node advertising its GPUs. node_status_update_frequency=2: the kubelet
    reports Node status every 10 s by default, and the tests wait on capacity changes."""
    with lab_fleet(nodes=FULL_NODES, gpus=GPUS, node_status_update_frequency=2) as fleet:
        for node in fleet.node_names:
            patch_node(fleet, node, {"metadata": {"labels": POOL}})
        deploy_plugin(fleet, plugin_spec(node_selector=POOL))
        fleet.wait_advertising(fleet.node_names, timeout=240)
        yield fleet


def read_fleet(fleet: LabFleet, work: Path, **extra: Any) -> Dict[str, Any]:
    proc, results = run_playbook(PLAYBOOK, work, dict(extra, kubeconfig=fleet.kubeconfig))
    assert proc.returncode == 0, proc.stdout[-4000:]
    return results


def check_constant_read(fleet: LabFleet, work: Path, count: int, gpus: int) -> None:
    fleet.reset_counters()
    results = read_fleet(fleet, work, expected_gpu_count=gpus)
    counters = fleet.counters()
    assert counters["requests"] == CONSTANT_CALLS, counters
    info = results["fleet"]
    assert info["api_requests"] == 3
    assert info["summary"] == {"nodes": count, "healthy": count, "unhealthy": [], "findings": {}}
    for entry in info["nodes"]:
        assert entry["scheduling"] == {"targeted": True, "reasons": []}, entry["name"]
        assert entry["plugin_pod"]["phase"] == "Running" and entry["plugin_pod"]["ready"], entry["name"]
        assert entry["resources"]["capacity"] == {GPU: gpus} and entry["resources"]["unhealthy_devices"] == {GPU: 0}
        assert entry["log"] == {"read": False}
    print("device_plugin_info at N=%d: %d requests %s" % (count, info["api_requests"], counters["requests"]))


def test_fleet_read_is_three_requests_at_10_full_nodes(fleet: LabFleet, tmp_path: Path) -> None:
    check_constant_read(fleet, tmp_path, FULL_NODES, GPUS)


def test_fleet_read_is_three_requests_at_200_api_only_nodes(tmp_path: Path) -> None:
    # light agents: pods Running at once, the Node advertises once its plugin pod runs (within a
    # status period: 2 s here instead of the kubelet's 10 s)
    with lab_fleet(nodes=200, api_only=True, node_status_update_frequency=2) as light:
        deploy_plugin(light)

        def settled() -> bool:
            pods = [p for p in plugin_pods(light) if pod_ready(p)]
            return len(pods) == 200 and all(str(n.get("allocatable")) == "8" for n in light.nodes_status().values())

        wait_until("200 plugin pods Running and 200 nodes advertising", settled, 300, pause=1.0)
        check_constant_read(light, tmp_path, 200, 8)


def container_status(fleet: LabFleet, node: str) -> Dict[str, Any]:
    pods = pods_on(plugin_pods(fleet), node)
    return ((pods[0].get("status") or {}).get("containerStatuses") or [{}])[0] if pods else {}


def crash_looping(fleet: LabFleet, node: str) -> bool:
    """CrashLoopBackOff after the third failure: the kubelet's back-off is then 20 s or more."""
    status = container_status(fleet, node)
    waiting = (status.get("state") or {}).get("waiting") or {}
    return waiting.get("reason") == "CrashLoopBackOff" and status.get("restartCount", 0) >= 2


def break_the_fleet(fleet: LabFleet) -> None:
    fleet.break_("gpu-node-02", "plugin_crash", signature="nvml_init_failed")
    fleet.break_("gpu-node-03", "plugin_crash", signature="incompatible_strategy")
    fleet.break_("gpu-node-04", "plugin_no_devices")
    fleet.break_("gpu-node-05", "plugin_crash", signature="registration_failed")
    fleet.break_("gpu-node-06", "critical_xid", gpu="1")
    fleet.break_(KUBELET_RESTARTED, "kubelet_restart")
    fleet.break_(NO_LABEL, "label_missing")
    fleet.break_(TAINTED, "taint_untolerated")
    patch_node(fleet, NOT_SELECTED, {"metadata": {"labels": {"example.com/pool": "cpu"}}})
    # a NoSchedule taint keeps a running DaemonSet pod (only NoExecute evicts): the pod is deleted,
    # and the DaemonSet controller does not create another one on the tainted node
    for pod in pods_on(plugin_pods(fleet), TAINTED):
        fleet.api("/api/v1/namespaces/kube-system/pods/%s" % pod["metadata"]["name"], "DELETE", missing_ok=True)

    def settled(nodes: Dict[str, Any]) -> bool:
        return (str(nodes["gpu-node-04"]["allocatable"]) == "0" and str(nodes["gpu-node-05"]["allocatable"]) == "0"
                and str(nodes["gpu-node-06"]["allocatable"]) == str(GPUS - 1)
                and str(nodes[KUBELET_RESTARTED]["allocatable"]) == str(GPUS)
                and all(nodes[n]["plugin_pod"] is None for n in (NO_LABEL, TAINTED, NOT_SELECTED)))

    fleet.wait_for("the faults to show", settled, timeout=180)
    wait_until("the plugins of gpu-node-02 and -03 crash-looping",
               lambda: crash_looping(fleet, "gpu-node-02") and crash_looping(fleet, "gpu-node-03"), 180)


def test_each_scheduling_cause_and_log_signature_is_named(fleet: LabFleet, tmp_path: Path) -> None:
    break_the_fleet(fleet)
    names = fleet.node_names + ["no-such-node"]
    fleet.reset_counters()
    results = read_fleet(fleet, tmp_path, nodes=names, check_too=True, always_nodes=[HEALTHY, KUBELET_RESTARTED])
    counters = fleet.counters()
    info = results["fleet"]
    by_name = {entry["name"]: entry for entry in info["nodes"]}
    assert [e["name"] for e in info["nodes"]] == names
    assert by_name["no-such-node"]["found"] is False

    # scheduling: each cause, with its key / value / effect
    def causes(name: str) -> List[Any]:
        return [(r["reason"], r.get("key"), r.get("value"), r.get("effect"))
                for r in by_name[name]["scheduling"]["reasons"]]

    assert causes(NO_LABEL) == [("unmet_affinity", "nvidia.com/gpu.present", "true", None),
                                ("unmet_affinity", "feature.node.kubernetes.io/pci-10de.present", "true", None)]
    assert [f["code"] for f in by_name[NO_LABEL]["findings"]] == ["not_targeted_affinity"] * 2
    assert causes(TAINTED) == [("untolerated_taint", "gpu-maintenance", "true", "NoSchedule")]
    assert [f["code"] for f in by_name[TAINTED]["findings"]] == ["not_targeted_taint"]
    assert causes(NOT_SELECTED) == [("label_mismatch", "example.com/pool", "gpu", None)]
    assert by_name[NOT_SELECTED]["scheduling"]["reasons"][0]["actual"] == "cpu"
    assert [f["code"] for f in by_name[NOT_SELECTED]["findings"]] == ["not_targeted_label"]
    assert "label the node example.com/pool=gpu" in by_name[NOT_SELECTED]["findings"][0]["action"]
    for name in (NO_LABEL, TAINTED, NOT_SELECTED):
        assert by_name[name]["plugin_pod"] == {"found": False}, name

    # logs: each signature, with NVIDIA's line that decided it; healthy nodes are not read
    for name, signature in SIGNATURES.items():
        log = by_name[name]["log"]
        assert log["read"] is True and log["signature"] == signature, (name, json.dumps(log)[:2000])
        assert by_name[name]["healthy"] is False, name
    lines = {name: by_name[name]["log"]["line"] for name in SIGNATURES}
    assert "Failed to initialize NVML: Unknown Error." in lines["gpu-node-02"]
    assert "Incompatible strategy detected auto" in lines["gpu-node-03"]
    assert "No devices found. Waiting indefinitely." in lines["gpu-node-04"]
    assert "Could not register device plugin" in lines["gpu-node-05"]
    assert "XidCriticalError: Xid=79 on Device=GPU-" in lines["gpu-node-06"]
    for name in ("gpu-node-02", "gpu-node-03"):
        pod = by_name[name]["plugin_pod"]
        assert (pod["waiting_reason"], pod["last_exit_code"], pod["last_termination_reason"]) == (
            "CrashLoopBackOff", 1, "Error"), name
        assert [f["code"] for f in by_name[name]["findings"]][:1] == ["plugin_pod_crashloop"], name
    assert "plugin_nvml_init_failed" in [f["code"] for f in by_name["gpu-node-02"]["findings"]]
    assert "plugin_incompatible_platform" in [f["code"] for f in by_name["gpu-node-03"]["findings"]]
    assert "plugin_no_devices" in [f["code"] for f in by_name["gpu-node-04"]["findings"]]
    assert by_name["gpu-node-04"]["resources"]["allocatable"] == {GPU: 0}  # its old registration's capacity is kept
    assert "plugin_registration_failed" in [f["code"] for f in by_name["gpu-node-05"]["findings"]]
    assert by_name["gpu-node-05"]["plugin_pod"]["healthy"] is True  # Running: NVIDIA's plugin retries every 30 s
    assert by_name["gpu-node-06"]["resources"]["unhealthy_devices"] == {GPU: 1}
    assert {"unhealthy_devices", "plugin_xid_unhealthy"} <= {f["code"] for f in by_name["gpu-node-06"]["findings"]}
    for name in (HEALTHY, KUBELET_RESTARTED):
        assert by_name[name]["healthy"] is True and by_name[name]["log"] == {"read": False}, name

    # the healthy nodes' logs, read on request: registered; gpu-node-07's saw the kubelet restart first
    always = {entry["name"]: entry for entry in results["always"]["nodes"]}
    assert always[HEALTHY]["log"]["signature"] == "registered"
    assert always[HEALTHY]["log"]["line"].endswith("Registered device plugin for 'nvidia.com/gpu' with Kubelet")
    restarted = always[KUBELET_RESTARTED]["log"]
    assert restarted["signature"] == "registered"
    assert [m["signature"] for m in restarted["matches"]] == ["kubelet_restart_seen", "registered"]
    assert restarted["matches"][0]["line"].endswith(
        "inotify: /var/lib/kubelet/device-plugins/kubelet.sock created, restarting.")

    # requests: the constant three per run (the info run, the check-mode run with read_logs never,
    # the run over two nodes with read_logs always), one log read per unhealthy node with a pod, two more
    unhealthy_with_pod = [e["name"] for e in info["nodes"] if e["log"]["read"] or e["log"].get("error")]
    assert sorted(unhealthy_with_pod) == sorted(SIGNATURES)
    assert counters["requests"] == {"get": {"daemonsets": 3, "pods/log": len(SIGNATURES) + 2},
                                    "list": {"nodes": 3, "pods": 3}}, counters["requests"]
    assert info["api_requests"] == 3 + len(SIGNATURES)
