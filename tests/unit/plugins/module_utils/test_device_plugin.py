# -*- coding: utf-8 -*-
"""The device plugin's manifest, config file, option validation, apply flow and rollout wait."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import copy

import pytest

from ansible_collections.gpunode.bringup.plugins.module_utils import _device_plugin as dp
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError, K8sTimeoutError
from ansible_collections.gpunode.bringup.plugins.module_utils._fleet import daemonset_state
from ansible_collections.gpunode.bringup.tests.unit.plugins.module_utils.device_plugin_fakes import (
    FakeClient,
    daemonset_status,
    node,
    pod,
)

try:
    import yaml
except ImportError:  # pragma: no cover
    yaml = None

DS_KEY = ("DaemonSet", "kube-system", "nvidia-device-plugin-daemonset")
CM_KEY = ("ConfigMap", "kube-system", "nvidia-device-plugin-config")


def render(**params):
    spec = dp.spec_from_params(params)
    text = dp.config_text(spec.config)
    return spec, dp.render_daemonset(spec, text), dp.render_config_map(spec, text)


def pod_spec(daemonset):
    return daemonset["spec"]["template"]["spec"]


# --------------------------------------------------------------------------- manifest

def test_defaults_are_nvidias_static_manifest():
    spec, daemonset, config_map = render()
    assert daemonset["metadata"]["name"] == "nvidia-device-plugin-daemonset"
    assert daemonset["metadata"]["namespace"] == "kube-system"
    assert daemonset["spec"]["selector"] == {"matchLabels": {"name": "nvidia-device-plugin-ds"}}
    assert daemonset["spec"]["template"]["metadata"]["labels"] == {"name": "nvidia-device-plugin-ds"}
    assert daemonset["spec"]["updateStrategy"] == {"type": "RollingUpdate"}
    template = pod_spec(daemonset)
    assert template["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert template["priorityClassName"] == "system-node-critical"
    container = template["containers"][0]
    assert container["name"] == "nvidia-device-plugin-ctr"
    assert container["image"] == "nvcr.io/nvidia/k8s-device-plugin:v0.17.4"
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert {"name": "device-plugin", "mountPath": "/var/lib/kubelet/device-plugins"} in container["volumeMounts"]
    assert {"name": "device-plugin", "hostPath": {"path": "/var/lib/kubelet/device-plugins"}} in template["volumes"]
    assert {"name": "CONFIG_FILE", "value": "/etc/nvidia-device-plugin/config.yaml"} in container["env"]
    assert {"name": "plugin-config", "configMap": {"name": "nvidia-device-plugin-config"}} in template["volumes"]
    terms = template["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    keys = [t["matchExpressions"][0]["key"] for t in terms]
    assert keys == ["nvidia.com/gpu.present", "feature.node.kubernetes.io/pci-10de.present"]
    assert "nodeSelector" not in template and "runtimeClassName" not in template and "resources" not in container
    assert config_map["data"]["config.yaml"] == dp.config_text(spec.config)


@pytest.mark.parametrize("params,check", [
    ({"name": "gpu-plugin", "namespace": "gpu-system"},
     lambda ds: ds["metadata"]["name"] == "gpu-plugin" and ds["metadata"]["namespace"] == "gpu-system"),
    ({"image": "registry.example.com:5000/mirror/k8s-device-plugin", "tag": "v0.16.2"},
     lambda ds: pod_spec(ds)["containers"][0]["image"] == "registry.example.com:5000/mirror/k8s-device-plugin:v0.16.2"),
    ({"tag": "sha256:" + "a" * 64},
     lambda ds: pod_spec(ds)["containers"][0]["image"] == "nvcr.io/nvidia/k8s-device-plugin@sha256:" + "a" * 64),
    ({"image_pull_policy": "Always", "image_pull_secrets": ["mirror-creds"]},
     lambda ds: pod_spec(ds)["containers"][0]["imagePullPolicy"] == "Always"
     and pod_spec(ds)["imagePullSecrets"] == [{"name": "mirror-creds"}]),
    ({"node_selector": {"example.com/gpu": True}, "node_affinity": []},
     lambda ds: pod_spec(ds)["nodeSelector"] == {"example.com/gpu": "true"} and "affinity" not in pod_spec(ds)),
    ({"node_affinity": [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": [True]}]}]},
     lambda ds: pod_spec(ds)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
     == {"nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["true"]}]}]}),
    ({"tolerations": [{"operator": "Exists"}]}, lambda ds: pod_spec(ds)["tolerations"] == [{"operator": "Exists"}]),
    ({"tolerations": []}, lambda ds: pod_spec(ds)["tolerations"] == []),
    ({"resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": 128}}},
     lambda ds: pod_spec(ds)["containers"][0]["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"},
                                                               "limits": {"memory": "128"}}),
    ({"runtime_class_name": "nvidia"}, lambda ds: pod_spec(ds)["runtimeClassName"] == "nvidia"),
    ({"priority_class_name": ""}, lambda ds: "priorityClassName" not in pod_spec(ds)),
    ({"env": {"PASS_DEVICE_SPECS": True, "NVIDIA_DRIVER_ROOT": "/run/nvidia/driver"}},
     lambda ds: pod_spec(ds)["containers"][0]["env"][1:] == [
         {"name": "NVIDIA_DRIVER_ROOT", "value": "/run/nvidia/driver"}, {"name": "PASS_DEVICE_SPECS", "value": "true"}]),
    ({"kubelet_root_dir": "/data/kubelet/"},
     lambda ds: {"name": "device-plugin", "hostPath": {"path": "/data/kubelet/device-plugins"}} in pod_spec(ds)["volumes"]
     and {"name": "device-plugin", "mountPath": "/var/lib/kubelet/device-plugins"}
     in pod_spec(ds)["containers"][0]["volumeMounts"]),
    ({"selector_labels": {"app": "nvdp"}},
     lambda ds: ds["spec"]["selector"]["matchLabels"] == {"app": "nvdp"}
     and ds["spec"]["template"]["metadata"]["labels"] == {"app": "nvdp"}),
    ({"config_map_name": "plugin-cfg"},
     lambda ds: {"name": "plugin-config", "configMap": {"name": "plugin-cfg"}} in pod_spec(ds)["volumes"]),
])
def test_every_part_is_overridable(params, check):
    _spec, daemonset, _config_map = render(**params)
    assert check(daemonset)


# --------------------------------------------------------------------------- config file

@pytest.mark.parametrize("config,expected", [
    ({}, {"version": "v1", "flags": {"migStrategy": "none", "failOnInitError": True, "plugin": {
        "deviceListStrategy": "envvar", "deviceIDStrategy": "uuid"}}}),
    ({"mig_strategy": "mixed", "fail_on_init_error": False, "device_id_strategy": "index",
      "device_list_strategy": ["volume-mounts", "cdi-cri"]},
     {"version": "v1", "flags": {"migStrategy": "mixed", "failOnInitError": False, "plugin": {
         "deviceListStrategy": ["volume-mounts", "cdi-cri"], "deviceIDStrategy": "index"}}}),
    ({"time_slicing": {"rename_by_default": True, "fail_requests_greater_than_one": True,
                       "resources": [{"name": "nvidia.com/gpu", "replicas": 4}]}},
     {"sharing": {"timeSlicing": {"renameByDefault": True, "failRequestsGreaterThanOne": True,
                                  "resources": [{"name": "nvidia.com/gpu", "replicas": 4}]}}}),
    ({"mig_strategy": "mixed", "time_slicing": {"resources": [{"name": "nvidia.com/mig-1g.10gb", "replicas": 2}]}},
     {"sharing": {"timeSlicing": {"renameByDefault": False, "failRequestsGreaterThanOne": False,
                                  "resources": [{"name": "nvidia.com/mig-1g.10gb", "replicas": 2}]}}}),
    ({"mps": {"resources": [{"name": "nvidia.com/gpu", "replicas": 10}]}},
     {"sharing": {"mps": {"renameByDefault": False, "resources": [{"name": "nvidia.com/gpu", "replicas": 10}]}}}),
    ({"device_list_strategy": "envvar,cdi-annotations"},
     {"flags": {"migStrategy": "none", "failOnInitError": True, "plugin": {
         "deviceListStrategy": ["envvar", "cdi-annotations"], "deviceIDStrategy": "uuid"}}}),
])
def test_config_renders_nvidias_documented_schema(config, expected):
    rendered = dp.render_config(dp.check_config(config))
    for key, value in expected.items():
        assert rendered[key] == value
    if yaml is not None:
        assert yaml.safe_load(dp.config_text(dp.check_config(config))) == rendered


def test_config_change_changes_the_pod_template_hash_and_nothing_else():
    _s, plain, _c = render()
    _s, sliced, _c = render(config={"time_slicing": {"resources": [{"name": "nvidia.com/gpu", "replicas": 4}]}})
    annotation = "gpunode.bringup/config-sha256"
    assert plain["spec"]["template"]["metadata"]["annotations"][annotation] != \
        sliced["spec"]["template"]["metadata"]["annotations"][annotation]
    del plain["spec"]["template"]["metadata"]["annotations"], sliced["spec"]["template"]["metadata"]["annotations"]
    assert plain == sliced
    assert render()[1] == render()[1]  # stable


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("params,fragment", [
    ({"config": {"time_slicing": {"resources": [{"name": "nvidia.com/gpu", "replicas": 2}]},
                 "mps": {"resources": [{"name": "nvidia.com/gpu", "replicas": 2}]}}},
     "config.time_slicing and config.mps cannot be used together"),
    ({"config": {"time_slicing": {"resources": [{"name": "nvidia.com/gpu", "replicas": 1}]}}},
     "replicas of nvidia.com/gpu must be an integer of at least 2, got 1"),
    ({"config": {"time_slicing": {"resources": [{"name": "nvidia.com/gpu", "replicas": -3}]}}}, "at least 2"),
    ({"config": {"time_slicing": {"resources": [{"name": "nvidia.com/gpu", "replicas": "4"}]}}}, "at least 2"),
    ({"config": {"time_slicing": {"resources": []}}}, "must list at least one resource"),
    ({"config": {"time_slicing": {"resources": [{"name": "nvidia.com/gpu", "replicas": 2},
                                                {"name": "nvidia.com/gpu", "replicas": 3}]}}}, "listed twice"),
    ({"config": {"time_slicing": {"resources": [{"name": "amd.com/gpu", "replicas": 2}]}}}, "not a resource the plugin"),
    ({"config": {"time_slicing": {"resources": [{"name": "nvidia.com/mig-1g.10gb", "replicas": 2}]}}},
     "exists only with config.mig_strategy mixed"),
    ({"config": {"mig_strategy": "single", "mps": {"resources": [{"name": "nvidia.com/gpu", "replicas": 2}]}}},
     "MPS sharing is not supported with MIG"),
    ({"config": {"mig_strategy": "mixed", "mps": {"resources": [{"name": "nvidia.com/mig-1g.10gb", "replicas": 2}]}}},
     "MPS sharing supports only nvidia.com/gpu"),
    ({"config": {"mig_strategy": "auto"}}, "config.mig_strategy 'auto' is not one of none, single, mixed"),
    ({"config": {"device_list_strategy": ["envvar", "tarball"]}}, "config.device_list_strategy 'tarball'"),
    ({"config": {"device_list_strategy": ["envvar", "envvar"]}}, "twice"),
    ({"config": {"device_id_strategy": "serial"}}, "config.device_id_strategy 'serial'"),
    ({"image": "nvcr.io/nvidia/k8s-device-plugin:v0.17.4"}, "carries a tag or digest"),
    ({"image": "nvcr.io/NVIDIA/k8s-device-plugin"}, "not a valid image repository"),
    ({"image": "nvcr.io//k8s-device-plugin"}, "not a valid image repository"),
    ({"image": "nvcr.io/nvidia/k8s device plugin"}, "not a valid image repository"),
    ({"tag": "-v1"}, "not a valid image tag"),
    ({"tag": "v0.17.4 "}, "not a valid image tag"),
    ({"name": "Device_Plugin"}, "name 'Device_Plugin' is not a valid Kubernetes name"),
    ({"namespace": "kube.system"}, "namespace 'kube.system' is not a valid namespace name"),
    ({"image_pull_policy": "Sometimes"}, "image_pull_policy"),
    ({"image_pull_secrets": ["Bad Secret"]}, "image_pull_secrets"),
    ({"selector_labels": {"name": "nvidia device plugin"}}, "selector_labels"),
    ({"node_selector": {"-bad": "x"}}, "node_selector"),
    ({"node_affinity": [{"matchExpressions": [{"key": "gpu", "operator": "Like", "values": ["a"]}]}]},
     "operator 'Like'"),
    ({"node_affinity": [{"matchExpressions": [{"key": "gpu", "operator": "In"}]}]}, "needs a non-empty list of values"),
    ({"node_affinity": [{"matchExpressions": [{"key": "gpu", "operator": "Exists", "values": ["x"]}]}]},
     "takes no values"),
    ({"node_affinity": [{"matchExpressions": [{"key": "gpu", "operator": "Gt", "values": ["x"]}]}]},
     "exactly one integer"),
    ({"node_affinity": [{"matchFields": [{"key": "metadata.labels", "operator": "In", "values": ["x"]}]}]},
     "matchFields supports only"),
    ({"node_affinity": [{}]}, "node_affinity term 1"),
    ({"node_affinity": [{"nodeSelectorTerms": []}]}, "node_affinity term 1"),
    ({"tolerations": [{"key": "a", "operator": "Exists", "value": "b"}]}, "Exists takes no value"),
    ({"tolerations": [{"value": "b"}]}, "without key must use operator Exists"),
    ({"tolerations": [{"key": "a", "effect": "NoRun"}]}, "effect 'NoRun'"),
    ({"tolerations": [{"key": "a", "operator": "Exists", "tolerationSeconds": 30}]}, "needs effect NoExecute"),
    ({"tolerations": [{"key": "a", "colour": "red"}]}, "tolerations[1] must be a dictionary of"),
    ({"resources": {"requests": {"cpu": "lots"}}}, "resources.requests.cpu"),
    ({"resources": {"claims": []}}, "requests and/or limits"),
    ({"env": {"FAIL_ON_INIT_ERROR": "false"}}, "env: FAIL_ON_INIT_ERROR would override the plugin's config file"),
    ({"env": {"1BAD": "x"}}, "not a valid environment variable name"),
    ({"kubelet_root_dir": "var/lib/kubelet"}, "kubelet_root_dir"),
    ({"config_map_name": "Plugin Config"}, "config_map_name"),
    ({"runtime_class_name": "NVIDIA"}, "runtime_class_name"),
])
def test_bad_options_are_rejected_with_the_option_named(params, fragment):
    with pytest.raises(InvalidOptionError) as error:
        dp.spec_from_params(params)
    assert fragment in error.value.msg


@pytest.mark.parametrize("params,fragment", [
    ({"wait_timeout": -1}, "wait_timeout must be a number of seconds, 0 or more, got -1"),
    ({"config": {"mig_strategy": "bogus"}}, "config.mig_strategy"),
    ({"image": "nvcr.io/nvidia/k8s-device-plugin:latest"}, "image"),
    ({"expected_nodes": ["GPU_01"]}, "expected_nodes"),
])
def test_module_body_fails_before_building_a_client(params, fragment):
    def factory(_params):
        raise AssertionError("no client may be built before the options are valid")
    with pytest.raises(InvalidOptionError) as error:
        dp.device_plugin_result(dict({"wait_timeout": 120}, **params), check_mode=False, diff_mode=False,
                                client_factory=factory)
    assert fragment in error.value.msg


# --------------------------------------------------------------------------- apply flow

def run(client, check_mode=False, **params):
    return dp.device_plugin_result(dict({"wait_timeout": 120}, **params), check_mode=check_mode, diff_mode=True,
                                   client_factory=lambda _params: client)


def calls(client):
    return [(c[0], "dry_run" in c[2]) for c in client.calls]


def test_check_mode_on_an_empty_cluster_is_a_dry_run_and_writes_nothing():
    client = FakeClient()
    result = run(client, check_mode=True)
    assert result["changed"] is True
    assert client.objects == {} and client.writes == []
    assert calls(client) == [("read_namespaced_config_map", False), ("patch_namespaced_config_map", True),
                             ("read_namespaced_daemon_set", False), ("patch_namespaced_daemon_set", True)]
    assert [d["before"] for d in result["diff"]] == [{}, {}]
    assert result["diff"][1]["after"]["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":v0.17.4")


def test_apply_creates_then_is_idempotent():
    client = FakeClient()
    first = run(client)
    assert first["changed"] is True and set(client.objects) == {DS_KEY, CM_KEY}
    patch = [c for c in client.calls if c[0] == "patch_namespaced_daemon_set"][0]
    assert patch[2]["field_manager"] == "gpunode-bringup" and patch[2]["force"] is True
    assert patch[2]["_content_type"] == "application/apply-patch+yaml"
    client.calls.clear()
    second = run(client)
    assert second["changed"] is False and second.get("diff") == [] and client.writes == []
    third = run(client, check_mode=True)
    assert third["changed"] is False and client.writes == []


def test_a_config_change_is_applied_with_a_diff():
    client = FakeClient()
    run(client)
    client.calls.clear()
    result = run(client, config={"mig_strategy": "mixed"})
    assert result["changed"] is True
    assert [w[0] for w in client.writes] == ["patch_namespaced_config_map", "patch_namespaced_daemon_set"]
    before, after = result["diff"][0]["before"], result["diff"][0]["after"]
    assert "migStrategy: none" in before["data"]["config.yaml"] and "migStrategy: mixed" in after["data"]["config.yaml"]
    assert result["config"]["flags"]["migStrategy"] == "mixed"


def test_absent_deletes_daemonset_then_config_map_and_is_idempotent():
    client = FakeClient()
    run(client)
    client.calls.clear()
    check = run(client, check_mode=True, state="absent")
    assert check["changed"] is True and set(client.objects) == {DS_KEY, CM_KEY}
    result = run(client, state="absent")
    assert result["changed"] is True and client.objects == {}
    assert [w[0] for w in client.writes] == ["delete_namespaced_daemon_set", "delete_namespaced_config_map"]
    assert run(client, state="absent")["changed"] is False


def test_missing_namespace_is_named():
    client = FakeClient()

    def refuse(*_args, **_kwargs):
        from ansible_collections.gpunode.bringup.plugins.module_utils._errors import K8sError
        raise K8sError('apply ConfigMap gpu/x: HTTP 404: namespaces "gpu" not found', status=404)
    client.hooks["patch_namespaced_config_map"] = refuse
    with pytest.raises(InvalidOptionError) as error:
        run(client, namespace="gpu")
    assert "namespace gpu does not exist" in error.value.msg and client.objects == {}


# --------------------------------------------------------------------------- rollout

@pytest.mark.parametrize("status,allow_empty,expected_nodes,complete,fragment", [
    (dict(), False, None, True, "3 of 3 pods updated and ready"),
    (dict(generation=2, observed=1), False, None, False, "has not observed generation 2"),
    (dict(ready=2), False, None, False, "3 of 3 pods updated, 2 ready"),
    (dict(updated=1), False, None, False, "1 of 3 pods updated"),
    (dict(desired=0, current=0, ready=0, updated=0), False, None, False, "scheduled on zero nodes"),
    (dict(desired=0, current=0, ready=0, updated=0), True, None, True, "as allowed"),
    (dict(desired=0, current=0, ready=0, updated=0), False, [], True, "as allowed"),
    (dict(desired=0, current=0, ready=0, updated=0), False, ["gpu-01"], False, "scheduled on zero nodes"),
])
def test_rollout_verdict(status, allow_empty, expected_nodes, complete, fragment):
    state = daemonset_state(daemonset_status(**status), "ds", "kube-system")
    verdict = dp.rollout_verdict(state, allow_empty, expected_nodes)
    assert verdict.complete is complete and fragment in verdict.reason


def test_rollout_verdict_checks_each_expected_node():
    state = daemonset_state(daemonset_status(desired=2, current=2, ready=2, updated=2), "ds", "kube-system")
    pods = [pod("a", "gpu-01"), pod("b", "gpu-02", ready=False, waiting=("CrashLoopBackOff", "x"))]
    verdict = dp.rollout_verdict(state, False, ["gpu-01", "gpu-02", "gpu-03"], pods)
    assert not verdict.complete and "gpu-02, gpu-03" in verdict.reason
    assert dp.rollout_verdict(state, False, ["gpu-01"], pods).complete


class Clock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def time(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def manager(client, clock, **params):
    spec = dp.spec_from_params(params)
    return dp.DevicePluginManager(client, spec, False, clock=clock.time, sleep=clock.sleep)


def test_wait_watches_and_returns_when_the_rollout_completes():
    clock = Clock()
    states = [daemonset_status(generation=2, observed=1), daemonset_status(ready=1), daemonset_status()]
    client = FakeClient()
    client.hooks["read_namespaced_daemon_set"] = lambda *a, **k: copy.deepcopy(states.pop(0))
    report = manager(client, clock).wait_rollout(30, False, None)
    assert report.verdict.complete and report.state.ready == 3
    # list, watch (the fake server ends it at once), pause 0.2 s, list again...
    assert clock.sleeps == [0.2, 0.2]
    assert [c[0] for c in client.calls].count("list_namespaced_daemon_set") == 5  # 3 lists, 2 watches


def test_wait_timeout_names_each_node_and_its_waiting_reason():
    clock = Clock()
    gpu = {"nvidia.com/gpu.present": "true"}
    spec = dp.spec_from_params({})
    ds = daemonset_status(desired=3, current=3, ready=1, updated=3,
                          pod_spec=dp.render_daemonset(spec, "x")["spec"]["template"]["spec"])
    client = FakeClient(
        objects={DS_KEY: ds},
        nodes=[node("gpu-01", gpu), node("gpu-02", gpu), node("gpu-03", gpu), node("cpu-01", {})],
        pods=[pod("p1", "gpu-01"),
              pod("p2", "gpu-02", ready=False, restarts=6, waiting=("CrashLoopBackOff", "back-off"), last=("Error", 1)),
              pod("p3", "gpu-03", phase="Pending", ready=False, waiting=("ImagePullBackOff", "Back-off pulling"))])
    with pytest.raises(K8sTimeoutError) as error:
        manager(client, clock).wait_rollout(10, False, None)
    message = error.value.msg
    assert "rollout not complete after 10s: 3 of 3 pods updated, 1 ready" in message
    assert "gpu-02: CrashLoopBackOff (last exit: Error, code 1)" in message
    assert "gpu-03: ImagePullBackOff (Back-off pulling)" in message
    assert "gpu-01" not in message and "cpu-01" not in message
    assert clock.now == pytest.approx(10)
    nodes = error.value.details["rollout"]["nodes_not_ready"]
    assert [n["node"] for n in nodes] == ["gpu-02", "gpu-03"]


def test_wait_on_an_empty_daemonset_fails_with_the_hole_named():
    clock = Clock()
    spec = dp.spec_from_params({})
    ds = daemonset_status(desired=0, current=0, ready=0, updated=0,
                          pod_spec=dp.render_daemonset(spec, "x")["spec"]["template"]["spec"])
    client = FakeClient(objects={DS_KEY: ds}, nodes=[node("gpu-01", {})])
    with pytest.raises(K8sTimeoutError) as error:
        manager(client, clock).wait_rollout(5, False, None)
    assert "scheduled on zero nodes" in error.value.msg and "allow_empty" in error.value.action
    assert manager(client, Clock()).wait_rollout(5, True, None).verdict.complete
    assert manager(client, Clock()).wait_rollout(5, False, []).verdict.complete


def test_wait_with_expected_nodes_explains_an_untargeted_node():
    clock = Clock()
    spec = dp.spec_from_params({})
    ds = daemonset_status(desired=1, current=1, ready=1, updated=1,
                          pod_spec=dp.render_daemonset(spec, "x")["spec"]["template"]["spec"])
    client = FakeClient(objects={DS_KEY: ds},
                        nodes=[node("gpu-01", {"nvidia.com/gpu.present": "true"}),
                               node("gpu-02", {"nvidia.com/gpu.present": "true"},
                                    taints=[{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}])],
                        pods=[pod("p1", "gpu-01")])
    with pytest.raises(K8sTimeoutError) as error:
        manager(client, clock).wait_rollout(2, False, ["gpu-01", "gpu-02"])
    assert "gpu-02: not targeted: node taint dedicated=ml:NoSchedule is not tolerated" in error.value.msg


def test_wait_deleted_returns_once_the_daemonset_and_pods_are_gone():
    clock = Clock()
    client = FakeClient(pods=[pod("p1", "gpu-01")])
    pods = [[pod("p1", "gpu-01")], []]
    client.hooks["list_namespaced_pod"] = lambda *a, **k: {"items": pods.pop(0)}
    assert manager(client, clock).wait_deleted(10) is True
    assert clock.sleeps == [0.2]
    client = FakeClient(objects={DS_KEY: daemonset_status()})
    with pytest.raises(K8sTimeoutError) as error:
        manager(client, Clock()).wait_deleted(1)
    assert "still exist after 1s" in error.value.msg


def test_explain_nodes_reports_old_template_pods():
    ds = daemonset_status(generation=3, observed=3)
    explained = dp.explain_nodes(ds, [node("gpu-01")], [pod("p", "gpu-01", template_generation="2")], ["gpu-01"])
    assert explained == [{"node": "gpu-01", "pod": "p", "reason": "runs template generation 2, not 3 yet"}]
    assert dp.explain_nodes(ds, [], [], ["ghost"]) == [{"node": "ghost", "pod": "", "reason": "no such node"}]
