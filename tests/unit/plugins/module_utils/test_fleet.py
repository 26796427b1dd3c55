# -*- coding: utf-8 -*-
"""Fleet reads: scheduling match, pod and log classification, resources, findings, request count."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

from datetime import datetime, timezone

import pytest

from ansible_collections.gpunode.bringup.plugins.module_utils import _fleet as fleet
from ansible_collections.gpunode.bringup.plugins.module_utils._device_plugin import (
    DevicePluginSpec,
    config_text,
    render_daemonset,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError
from ansible_collections.gpunode.bringup.tests.unit.plugins.module_utils.device_plugin_fakes import (
    FakeClient,
    daemonset_status,
    node,
    pod,
)

NOW = datetime(2026, 1, 10, 12, 0, 0, tzinfo=timezone.utc)
POD_SPEC = render_daemonset(DevicePluginSpec(), config_text(DevicePluginSpec().config))["spec"]["template"]["spec"]
GPU = {"nvidia.com/gpu.present": "true"}


def klog(severity, source, message):
    return "%s0110 11:59:%02d.000000       1 %s] %s" % (severity, len(message) % 60, source, message)


STARTUP = [
    klog("I", "main.go:235", "Starting FS watcher."),
    klog("I", "main.go:242", "Starting OS watcher."),
    klog("I", "main.go:257", "Starting Plugins."),
    klog("I", "main.go:314", "Loading configuration."),
]
REGISTERED = [
    klog("I", "server.go:176", "Starting GRPC server for 'nvidia.com/gpu'"),
    klog("I", "server.go:110", "Starting to serve 'nvidia.com/gpu' on /var/lib/kubelet/device-plugins/nvidia-gpu.sock"),
    klog("I", "server.go:117", "Registered device plugin for 'nvidia.com/gpu' with Kubelet"),
]
NVML_FAILED = [
    klog("E", "factory.go:112", "Incompatible platform detected"),
    klog("E", "main.go:132", "error starting plugins: error creating plugin manager: unable to create plugin manager: "
         "failed to initialize NVML: ERROR_DRIVER_NOT_LOADED"),
]
INCOMPATIBLE = [
    klog("E", "factory.go:135", "Incompatible strategy detected auto"),
    klog("E", "factory.go:136", "If this is a GPU node, did you configure the NVIDIA Container Toolkit?"),
    klog("I", "main.go:346", "No devices found. Waiting indefinitely."),
]
KUBELET_RESTART = klog("I", "main.go:283", "inotify: /var/lib/kubelet/device-plugins/kubelet.sock created, restarting.")
XID = klog("I", "health.go:159", "XidCriticalError: Xid=79 on Device=GPU-5d0c5c5e-4c8f-3c34-7a4e-19f1a0c4b8b2; "
           "marking device as unhealthy.")
REGISTER_FAILED = [
    klog("I", "server.go:110", "Starting to serve 'nvidia.com/gpu' on /var/lib/kubelet/device-plugins/nvidia-gpu.sock"),
    klog("E", "server.go:121", "Could not register device plugin: rpc error: code = Unavailable desc = connection "
         "error: desc = \"transport: Error while dialing: dial unix /var/lib/kubelet/device-plugins/kubelet.sock: "
         "connect: no such file or directory\""),
    klog("E", "main.go:328", "Could not contact Kubelet. Did you enable the device plugin feature gate?"),
    klog("I", "main.go:268", "Failed to start one or more plugins. Retrying in 30s..."),
]


# --------------------------------------------------------------------------- tolerations and selectors

@pytest.mark.parametrize("toleration,taint,expected", [
    ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
     {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}, True),
    ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
     {"key": "nvidia.com/gpu", "effect": "NoExecute"}, False),
    ({"key": "nvidia.com/gpu", "operator": "Exists"}, {"key": "nvidia.com/gpu", "effect": "NoExecute"}, True),
    ({"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"},
     {"key": "dedicated", "value": "training", "effect": "NoSchedule"}, True),
    ({"key": "dedicated", "value": "training"}, {"key": "dedicated", "value": "inference", "effect": "NoSchedule"},
     False),
    ({"key": "dedicated", "operator": "Equal", "value": "training"},
     {"key": "dedicated", "value": "training", "effect": "NoExecute"}, True),
    ({"operator": "Exists"}, {"key": "anything", "value": "x", "effect": "NoExecute"}, True),
    ({"key": "", "operator": "Equal", "value": "x"}, {"key": "anything", "value": "x", "effect": "NoSchedule"}, False),
    ({"key": "other", "operator": "Exists"}, {"key": "dedicated", "effect": "NoSchedule"}, False),
])
def test_tolerates_follows_the_scheduler_rule(toleration, taint, expected):
    assert fleet.tolerates(toleration, taint) is expected


@pytest.mark.parametrize("requirement,labels,expected", [
    ({"key": "a", "operator": "In", "values": ["x", "y"]}, {"a": "y"}, True),
    ({"key": "a", "operator": "In", "values": ["x"]}, {"a": "z"}, False),
    ({"key": "a", "operator": "In", "values": ["x"]}, {}, False),
    ({"key": "a", "operator": "NotIn", "values": ["x"]}, {}, True),
    ({"key": "a", "operator": "NotIn", "values": ["x"]}, {"a": "x"}, False),
    ({"key": "a", "operator": "Exists"}, {"a": ""}, True),
    ({"key": "a", "operator": "DoesNotExist"}, {"a": "1"}, False),
    ({"key": "a", "operator": "Gt", "values": ["4"]}, {"a": "8"}, True),
    ({"key": "a", "operator": "Lt", "values": ["4"]}, {"a": "8"}, False),
    ({"key": "a", "operator": "Gt", "values": ["4"]}, {"a": "eight"}, False),
    ({"key": "a", "operator": "Bogus", "values": ["4"]}, {"a": "4"}, False),
])
def test_node_selector_requirements(requirement, labels, expected):
    assert fleet.requirement_matches(requirement, labels) is expected


# --------------------------------------------------------------------------- scheduling

def reasons(match):
    return [(r.reason, r.key, r.value, r.effect) for r in match.reasons]


def test_default_daemonset_targets_a_labelled_gpu_node():
    match = fleet.scheduling_match(POD_SPEC, node("gpu-01", GPU, taints=[
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]))
    assert match.targeted and match.reasons == []


def test_node_feature_discovery_label_is_the_second_term():
    assert fleet.scheduling_match(POD_SPEC, node("gpu-01", {"feature.node.kubernetes.io/pci-10de.present": "true"}))\
        .targeted


def test_unlabelled_node_names_each_unmet_affinity_term():
    match = fleet.scheduling_match(POD_SPEC, node("gpu-01", {}))
    assert not match.targeted
    assert reasons(match) == [("unmet_affinity", "nvidia.com/gpu.present", "true", None),
                              ("unmet_affinity", "feature.node.kubernetes.io/pci-10de.present", "true", None)]
    assert [r.term for r in match.reasons] == [1, 2]
    assert "label absent" in match.reasons[0].message


def test_label_with_another_value_is_reported_with_the_actual_value():
    match = fleet.scheduling_match(POD_SPEC, node("gpu-01", {"nvidia.com/gpu.present": "false"}))
    assert match.reasons[0].actual == "false"
    assert "node has nvidia.com/gpu.present=false" in match.reasons[0].message


@pytest.mark.parametrize("node_labels,expected", [
    ({}, [("missing_label", "example.com/gpu", "a100", None)]),
    ({"example.com/gpu": "h100"}, [("label_mismatch", "example.com/gpu", "a100", None)]),
    ({"example.com/gpu": "a100"}, []),
])
def test_node_selector_reasons(node_labels, expected):
    spec = {"nodeSelector": {"example.com/gpu": "a100"}}
    match = fleet.scheduling_match(spec, node("gpu-01", node_labels))
    assert reasons(match) == expected
    assert match.targeted is (not expected)


@pytest.mark.parametrize("taint,targeted", [
    ({"key": "dedicated", "value": "training", "effect": "NoSchedule"}, False),
    ({"key": "dedicated", "value": "training", "effect": "NoExecute"}, False),
    ({"key": "dedicated", "value": "training", "effect": "PreferNoSchedule"}, True),
    ({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}, True),
    ({"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}, True),
    ({"key": "node.kubernetes.io/network-unavailable", "effect": "NoSchedule"}, False),
])
def test_taints(taint, targeted):
    match = fleet.scheduling_match(POD_SPEC, node("gpu-01", GPU, taints=[taint]))
    assert match.targeted is targeted
    if not targeted:
        assert reasons(match) == [("untolerated_taint", taint["key"], taint.get("value"), taint["effect"])]


def test_host_network_pods_tolerate_network_unavailable():
    spec = dict(POD_SPEC, hostNetwork=True)
    assert fleet.scheduling_match(spec, node("gpu-01", GPU, taints=[
        {"key": "node.kubernetes.io/network-unavailable", "effect": "NoSchedule"}])).targeted


def test_every_cause_is_reported_at_once():
    spec = dict(POD_SPEC, nodeSelector={"pool": "gpu"})
    match = fleet.scheduling_match(spec, node("gpu-01", {}, taints=[{"key": "a", "value": "b", "effect": "NoSchedule"}]))
    assert [r.reason for r in match.reasons] == ["missing_label", "unmet_affinity", "unmet_affinity",
                                                 "untolerated_taint"]
    as_dict = match.to_dict()
    assert as_dict["reasons"][3] == {"reason": "untolerated_taint", "key": "a", "value": "b", "effect": "NoSchedule",
                                     "message": "node taint a=b:NoSchedule is not tolerated by the DaemonSet"}


@pytest.mark.parametrize("terms,targeted", [
    ([], False),
    ([{}], False),
    ([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-01"]}]}], True),
    ([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-02"]}]}], False),
    ([{"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "Exists"},
                            {"key": "pool", "operator": "In", "values": ["a"]}]}], False),
])
def test_affinity_term_edge_cases(terms, targeted):
    spec = {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": terms}}}}
    match = fleet.scheduling_match(spec, node("gpu-01", GPU))
    assert match.targeted is targeted
    if not targeted:
        assert match.reasons and all(r.reason == "unmet_affinity" for r in match.reasons)


def test_no_affinity_and_no_selector_targets_every_node():
    assert fleet.scheduling_match({}, node("cpu-01", {})).targeted


# --------------------------------------------------------------------------- pods

@pytest.mark.parametrize("pod_object,expected", [
    (pod("p1", "gpu-01"), {"phase": "Running", "ready": True, "healthy": True, "restarts": 0, "age_seconds": 3600}),
    (pod("p2", "gpu-01", ready=False, restarts=5, waiting=("CrashLoopBackOff", "back-off 5m0s restarting failed"),
         last=("Error", 1)),
     {"waiting_reason": "CrashLoopBackOff", "last_termination_reason": "Error", "last_exit_code": 1, "restarts": 5,
      "healthy": False}),
    (pod("p3", "gpu-01", phase="Pending", ready=False, waiting=("ImagePullBackOff", "Back-off pulling image")),
     {"phase": "Pending", "waiting_reason": "ImagePullBackOff", "healthy": False}),
    (pod("p4", "gpu-01", deleting=True), {"deleting": True, "healthy": False}),
    (pod("p5", "gpu-01", ready=False), {"ready": False, "healthy": False}),
])
def test_classify_pod(pod_object, expected):
    result = fleet.classify_pod(pod_object, NOW).to_dict()
    for key, value in expected.items():
        assert result[key] == value, key


@pytest.mark.parametrize("pod_object,phrase", [
    (pod("p", "n", ready=False, restarts=5, waiting=("CrashLoopBackOff", "back-off"), last=("Error", 1)),
     "CrashLoopBackOff (last exit: Error, code 1)"),
    (pod("p", "n", phase="Pending", ready=False, waiting=("ImagePullBackOff", "Back-off pulling image \"x\"")),
     "ImagePullBackOff (Back-off pulling image \"x\")"),
    (pod("p", "n", ready=False), "Running but not Ready"),
    (pod("p", "n", deleting=True), "pod p is terminating"),
])
def test_why_not_ready(pod_object, phrase):
    assert fleet.classify_pod(pod_object, NOW).why_not_ready() == phrase


def test_current_pod_prefers_the_newest_live_pod():
    old = pod("old", "gpu-01", created="2026-01-10T10:00:00Z", deleting=True)
    new = pod("new", "gpu-01", created="2026-01-10T11:30:00Z")
    assert fleet.current_pod([old, new])["metadata"]["name"] == "new"
    assert fleet.current_pod([new, pod("newer-but-deleting", "gpu-01", created="2026-01-10T11:40:00Z",
                                       deleting=True)])["metadata"]["name"] == "new"
    assert fleet.current_pod([]) is None


# --------------------------------------------------------------------------- logs

@pytest.mark.parametrize("lines,signature,line_fragment", [
    (STARTUP + REGISTERED, "registered", "Registered device plugin for 'nvidia.com/gpu'"),
    (STARTUP + NVML_FAILED, "nvml_init_failed", "failed to initialize NVML: ERROR_DRIVER_NOT_LOADED"),
    (STARTUP + INCOMPATIBLE, "incompatible_strategy", "Incompatible strategy detected auto"),
    (STARTUP + [klog("I", "main.go:346", "No devices found. Waiting indefinitely.")], "no_devices", "No devices"),
    (STARTUP + REGISTER_FAILED, "registration_failed", "Could not register device plugin"),
    (STARTUP + REGISTERED + [XID], "xid_unhealthy", "Xid=79"),
    (STARTUP + REGISTERED + [KUBELET_RESTART], "kubelet_restart_seen", "kubelet.sock created, restarting"),
    (STARTUP + REGISTERED + [KUBELET_RESTART, klog("I", "main.go:257", "Starting Plugins.")],
     "kubelet_restart_seen", "kubelet.sock created, restarting"),
    (STARTUP + REGISTERED + [KUBELET_RESTART] + STARTUP[2:] + REGISTERED, "registered", "Registered"),
    (STARTUP + REGISTER_FAILED + STARTUP[2:] + REGISTERED, "registered", "Registered"),
    (STARTUP + REGISTERED + [XID, KUBELET_RESTART] + STARTUP[2:] + REGISTERED, "registered", "Registered"),
    (STARTUP, "unknown", None),
    ([], "unknown", None),
    (["Could not load NVML library: libnvidia-ml.so.1: cannot open shared object file"], "nvml_init_failed",
     "libnvidia-ml.so.1"),
])
def test_classify_log(lines, signature, line_fragment):
    verdict = fleet.classify_log("\n".join(lines) + "\n")
    assert verdict.signature == signature
    if line_fragment is None:
        assert verdict.line is None
    else:
        assert line_fragment in verdict.line
    assert verdict.meaning


def test_classify_log_keeps_the_last_line_of_each_signature_in_order():
    verdict = fleet.classify_log("\n".join(STARTUP + REGISTERED + [KUBELET_RESTART] + STARTUP[2:] + REGISTERED))
    assert [m.signature for m in verdict.matches] == ["kubelet_restart_seen", "registered"]
    assert verdict.matches[1].line_number == len(STARTUP + REGISTERED) + 1 + 2 + 3


def test_log_signature_names_are_the_documented_ones():
    assert set(fleet.LOG_SIGNATURE_NAMES) == {"registered", "nvml_init_failed", "incompatible_strategy", "no_devices",
                                              "registration_failed", "xid_unhealthy", "kubelet_restart_seen", "unknown"}


# --------------------------------------------------------------------------- resources and node

@pytest.mark.parametrize("quantity,count", [("8", 8), (8, 8), ("0", 0), ("2k", 2000), ("1.5", None), (None, None)])
def test_parse_count(quantity, count):
    assert fleet.parse_count(quantity) == count


def test_node_resources_and_unhealthy_devices():
    obj = node("gpu-01", GPU, gpus=8, allocatable=6)
    obj["status"]["capacity"]["nvidia.com/mig-1g.10gb"] = "7"
    obj["status"]["allocatable"]["nvidia.com/mig-1g.10gb"] = "7"
    resources = fleet.node_resources(obj)
    assert resources.capacity == {"nvidia.com/gpu": 8, "nvidia.com/mig-1g.10gb": 7}
    assert resources.unhealthy_devices == {"nvidia.com/gpu": 2, "nvidia.com/mig-1g.10gb": 0}
    assert "cpu" not in resources.capacity


def test_node_state_keeps_gpu_labels_and_those_the_daemonset_selects_on():
    obj = node("gpu-01", {"nvidia.com/gpu.present": "true", "pool": "a", "unrelated": "x"}, unschedulable=True,
               ready="False", taints=[{"key": "k", "effect": "NoSchedule"}])
    state = fleet.node_state(obj, ["pool"])
    assert state.labels == {"nvidia.com/gpu.present": "true", "pool": "a"}
    assert (state.ready, state.ready_reason, state.unschedulable) == (False, "KubeletNotReady", True)
    assert state.taints == [{"key": "k", "effect": "NoSchedule"}]


# --------------------------------------------------------------------------- findings

def report_for(node_object, pod_object=None, log_lines=None, daemonset=True, pod_spec=None):
    ds = daemonset_status(pod_spec=POD_SPEC if pod_spec is None else pod_spec) if daemonset else None
    state = fleet.daemonset_state(ds, "nvidia-device-plugin-daemonset", "kube-system")
    snapshot = fleet.FleetSnapshot(ds, [node_object] if node_object else [], [pod_object] if pod_object else [])
    query = fleet.FleetQuery("nvidia-device-plugin-daemonset", "kube-system", nodes=["gpu-01"])
    report = fleet.build_reports(query, snapshot, NOW)[0]
    if log_lines is not None:
        report.log = fleet.classify_log("\n".join(log_lines))
    report.findings = fleet.node_findings(report, state, expected_count=8)
    return report


@pytest.mark.parametrize("case,codes", [
    (dict(node_object=None), ["node_not_found"]),
    (dict(node_object=node("gpu-01", GPU), pod_object=pod("p", "gpu-01")), []),
    (dict(node_object=node("gpu-01", GPU, ready="False"), pod_object=pod("p", "gpu-01")), ["node_not_ready"]),
    (dict(node_object=node("gpu-01", GPU, unschedulable=True), pod_object=pod("p", "gpu-01")), ["node_cordoned"]),
    (dict(node_object=node("gpu-01", GPU), daemonset=False), ["daemonset_missing"]),
    (dict(node_object=node("gpu-01", {})), ["not_targeted_affinity", "not_targeted_affinity"]),
    (dict(node_object=node("gpu-01", {}), pod_spec={"nodeSelector": {"pool": "gpu"}}), ["not_targeted_label"]),
    (dict(node_object=node("gpu-01", GPU, taints=[{"key": "dedicated", "value": "x", "effect": "NoSchedule"}])),
     ["not_targeted_taint"]),
    (dict(node_object=node("gpu-01", GPU)), ["plugin_pod_missing"]),
    (dict(node_object=node("gpu-01", GPU), pod_object=pod("p", "gpu-01", phase="Pending", ready=False,
                                                          waiting=("ImagePullBackOff", "Back-off"))),
     ["plugin_pod_image_pull"]),
    (dict(node_object=node("gpu-01", GPU, gpus=None),
          pod_object=pod("p", "gpu-01", ready=False, restarts=4, waiting=("CrashLoopBackOff", "b"), last=("Error", 1)),
          log_lines=STARTUP + NVML_FAILED),
     ["plugin_pod_crashloop", "plugin_nvml_init_failed"]),
    (dict(node_object=node("gpu-01", GPU, gpus=None), pod_object=pod("p", "gpu-01"), log_lines=STARTUP + INCOMPATIBLE),
     ["plugin_incompatible_platform", "resource_not_advertised"]),
    (dict(node_object=node("gpu-01", GPU, allocatable=7), pod_object=pod("p", "gpu-01"),
          log_lines=STARTUP + REGISTERED + [XID]),
     ["plugin_xid_unhealthy", "unhealthy_devices"]),
    (dict(node_object=node("gpu-01", GPU, gpus=4), pod_object=pod("p", "gpu-01")), ["gpu_count_mismatch"]),
    (dict(node_object=node("gpu-01", GPU), pod_object=pod("p", "gpu-01", restarts=2)), ["plugin_pod_restarted"]),
    (dict(node_object=node("gpu-01", GPU, gpus=None), pod_object=pod("p", "gpu-01"),
          log_lines=STARTUP + REGISTERED + [KUBELET_RESTART]),
     ["plugin_stale_after_kubelet_restart", "resource_not_advertised"]),
])
def test_node_findings(case, codes):
    report = report_for(**case)
    assert [f.code for f in report.findings] == codes
    assert report.healthy is all(f.severity != "error" for f in report.findings)
    for finding in report.findings:
        assert finding.message and finding.action and finding.severity in ("error", "warning")


def test_crashloop_finding_quotes_the_log_line_and_the_log_action():
    report = report_for(node("gpu-01", GPU, gpus=None),
                        pod("p", "gpu-01", ready=False, restarts=4, waiting=("CrashLoopBackOff", "b"), last=("Error", 1)),
                        STARTUP + NVML_FAILED)
    crash = report.findings[0]
    assert "ERROR_DRIVER_NOT_LOADED" in crash.message and "nvml_info" in crash.action


@pytest.mark.parametrize("mode,pod_object,gpus,expected", [
    ("when_unhealthy", pod("p", "gpu-01"), 8, False),
    ("when_unhealthy", pod("p", "gpu-01", ready=False, waiting=("CrashLoopBackOff", "x")), 8, True),
    ("when_unhealthy", pod("p", "gpu-01"), None, True),
    ("when_unhealthy", pod("p", "gpu-01"), 4, True),
    ("always", pod("p", "gpu-01"), 8, True),
    ("never", pod("p", "gpu-01", ready=False), None, False),
    ("always", None, 8, False),
])
def test_logs_are_read_only_where_they_explain_something(mode, pod_object, gpus, expected):
    report = report_for(node("gpu-01", GPU, gpus=gpus), pod_object)
    assert fleet.needs_log(report, mode, "nvidia.com/gpu", 8) is expected


# --------------------------------------------------------------------------- reading the fleet

def fleet_client(count, broken=()):
    nodes = [node("gpu-%03d" % i, GPU) for i in range(count)]
    pods, logs = [], {}
    for i in range(count):
        name = "nvidia-device-plugin-daemonset-%05d" % i
        if i in broken:
            pods.append(pod(name, "gpu-%03d" % i, ready=False, restarts=3, waiting=("CrashLoopBackOff", "b"),
                            last=("Error", 1)))
            logs[name] = "\n".join(STARTUP + NVML_FAILED)
        else:
            pods.append(pod(name, "gpu-%03d" % i))
            logs[name] = "\n".join(STARTUP + REGISTERED)
    ds = daemonset_status(desired=count, current=count, ready=count - len(broken), updated=count, pod_spec=POD_SPEC)
    return FakeClient(objects={("DaemonSet", "kube-system", "nvidia-device-plugin-daemonset"): ds},
                      nodes=nodes, pods=pods, logs=logs)


@pytest.mark.parametrize("count,broken,read_logs,expected_requests", [
    (10, (), "when_unhealthy", 3),
    (200, (), "when_unhealthy", 3),
    (200, (3, 150), "when_unhealthy", 5),
    (10, (), "always", 13),
    (10, (1,), "never", 3),
])
def test_fleet_read_uses_a_constant_number_of_calls(count, broken, read_logs, expected_requests):
    client = fleet_client(count, broken)
    result = fleet.device_plugin_info_result({"read_logs": read_logs}, client_factory=lambda params: client, now=NOW)
    assert client.requests == result["api_requests"] == expected_requests
    assert [c[0] for c in client.calls][:3] == ["read_namespaced_daemon_set", "list_node", "list_namespaced_pod"]
    assert result["summary"]["nodes"] == count
    assert result["summary"]["unhealthy"] == (["gpu-%03d" % i for i in broken] if read_logs != "never" or broken
                                              else [])
    for index in broken:
        entry = result["nodes"][index]
        assert entry["log"]["read"] is (read_logs != "never")
        if read_logs != "never":
            assert entry["log"]["signature"] == "nvml_init_failed"


def test_fleet_read_keeps_the_order_asked_and_reports_unknown_nodes():
    client = fleet_client(3)
    result = fleet.device_plugin_info_result({"nodes": ["gpu-002", "nope", "gpu-000"]},
                                             client_factory=lambda params: client, now=NOW)
    found = [(n["name"], n["found"]) for n in result["nodes"]]
    assert found == [("gpu-002", True), ("nope", False), ("gpu-000", True)]
    assert result["nodes"][1]["findings"][0]["code"] == "node_not_found"


def test_fleet_read_passes_the_label_selector_and_the_pod_selector():
    client = fleet_client(2)
    fleet.device_plugin_info_result({"label_selector": "nvidia.com/gpu.present=true"},
                                    client_factory=lambda params: client, now=NOW)
    assert client.calls[1][2]["label_selector"] == "nvidia.com/gpu.present=true"
    assert client.calls[2][2]["label_selector"] == "name=nvidia-device-plugin-ds"


def test_a_log_that_cannot_be_read_is_reported_not_raised():
    client = fleet_client(1, broken=(0,))
    client.logs.clear()
    result = fleet.device_plugin_info_result({}, client_factory=lambda params: client, now=NOW)
    log = result["nodes"][0]["log"]
    assert log["read"] is False and "waiting to start" in log["error"]


@pytest.mark.parametrize("params,fragment", [
    ({"read_logs": "sometimes"}, "read_logs"),
    ({"log_tail_lines": 0}, "log_tail_lines"),
    ({"expected_gpu_count": -1}, "expected_gpu_count"),
    ({"nodes": ["Bad_Name"]}, "nodes"),
    ({"namespace": "Kube-System"}, "namespace"),
])
def test_info_rejects_bad_options_before_any_call(params, fragment):
    def factory(_params):
        raise AssertionError("no client may be built")
    with pytest.raises(InvalidOptionError) as error:
        fleet.device_plugin_info_result(params, client_factory=factory)
    assert fragment in error.value.msg
