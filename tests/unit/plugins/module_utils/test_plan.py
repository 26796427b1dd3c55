# -*- coding: utf-8 -*-
"""The ordered plan: walking steps, proposing remediations, policy, reports."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os

import pytest
import yaml

from ansible_collections.gpunode.bringup.plugins.module_utils import _plan
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError

DEFAULTS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "roles", "gpu_node", "defaults", "main.yml")


@pytest.fixture(scope="module")
def plan():
    with open(DEFAULTS) as handle:
        return yaml.safe_load(handle)["gpu_node_plan_steps"]


def finding(code, severity="error", action=None):
    return {"code": code, "severity": severity, "message": code.replace("_", " "), "action": action}


def facts(fleet=(), nvml=(), runtime=(), probe=(), workload=None, workload_check=False, pods=()):
    return {
        "node": "gpu-1",
        "expected_gpu_count": 8,
        "options": {"workload_check": workload_check},
        "fleet": {"findings": list(fleet)},
        "nvml": {"findings": list(nvml), "gpu_count": 8, "driver_version": "550.54.15"},
        "runtime": {"findings": list(runtime)},
        "probe": {"findings": list(probe), "pods_with_devices": list(pods),
                  "gpu_usage": {"in_use": bool(pods)}},
        "workload": workload,
    }


def verdicts(evaluation):
    return {s.step: s.verdict for s in evaluation.steps}


def test_healthy_node_is_ok_everywhere_and_workload_skipped(plan):
    evaluation = _plan.evaluate(_plan.parse_steps(plan), facts(), _plan.Policy())
    assert evaluation.failed_step is None and evaluation.proposal is None
    assert set(verdicts(evaluation).values()) == {"ok", "skipped"}
    assert verdicts(evaluation)["workload"] == "skipped"


@pytest.mark.parametrize("source,code,step,action,disruptive", [
    ("fleet", "node_not_ready", "node", "restart_kubelet", True),
    ("fleet", "api_unreachable", "node", None, None),
    ("nvml", "driver_not_loaded", "driver", "load_kernel_modules", False),
    ("nvml", "driver_library_mismatch", "driver", "reboot", True),
    ("nvml", "gpu_lost", "driver", None, None),
    ("nvml", "ecc_uncorrectable", "driver", None, None),
    ("runtime", "nvidia_runtime_missing", "runtime", "configure_runtime", True),
    ("runtime", "nvidia_runtime_binary_missing", "runtime", None, None),
    ("fleet", "daemonset_missing", "daemonset", "apply_daemonset", False),
    ("fleet", "not_targeted_label", "scheduling", "add_node_label", False),
    ("fleet", "not_targeted_taint", "scheduling", None, None),
    ("fleet", "plugin_pod_crashloop", "plugin_pod", "restart_plugin", False),
    ("fleet", "plugin_pod_image_pull", "plugin_pod", None, None),
    ("probe", "plugin_not_answering", "socket", "restart_plugin", False),
    ("probe", "plugin_devices_unhealthy", "socket", None, None),
    ("probe", "registration_stale", "registration", "restart_plugin", False),
    ("probe", "kubelet_socket_missing", "registration", "restart_kubelet", True),
    ("fleet", "resource_not_advertised", "advertised", "restart_plugin", False),
])
def test_first_failing_step_and_its_remediation(plan, source, code, step, action, disruptive):
    evaluation = _plan.evaluate(_plan.parse_steps(plan), facts(**{source: [finding(code)]}), _plan.Policy())
    assert evaluation.failed_step == step
    names = [s.step for s in evaluation.steps]
    after = names[names.index(step) + 1:]
    assert all(verdicts(evaluation)[n] == "skipped" for n in after)
    assert all(verdicts(evaluation)[n] == "ok" for n in names[:names.index(step)])
    if action is None:
        assert evaluation.proposal is None
    else:
        assert evaluation.proposal.action == action and evaluation.proposal.disruptive is disruptive
        assert evaluation.proposal.allowed is (not disruptive)


def test_lowest_break_wins(plan):
    evaluation = _plan.evaluate(_plan.parse_steps(plan), facts(
        nvml=[finding("driver_not_loaded")], probe=[finding("plugin_socket_missing")]), _plan.Policy())
    assert evaluation.failed_step == "driver"
    assert verdicts(evaluation)["socket"] == "skipped"


def test_warnings_do_not_fail_a_step_but_reach_the_report(plan):
    warning = dict(finding("remapped_rows_pending", "warning", action="reset the GPU when idle"), gpu=3)
    evaluation = _plan.evaluate(_plan.parse_steps(plan), facts(nvml=[warning]), _plan.Policy())
    assert evaluation.failed_step is None
    assert evaluation.steps[1].verdict == "ok" and evaluation.steps[1].evidence == [warning]
    report = _plan.summarize("gpu-1", _plan.merge_rounds([evaluation.to_dict()], []), [], None, False)
    assert report["verdict"] == "ok" and [w["code"] for w in report["warnings"]] == ["remapped_rows_pending"]
    lines = _plan.report_table([report], ["node", "driver"])
    assert "gpu-1: warning GPU 3 (remapped_rows_pending): remapped rows pending. Next: reset the GPU when idle" in lines


def test_next_action_comes_from_the_findings(plan):
    evaluation = _plan.evaluate(_plan.parse_steps(plan), facts(nvml=[finding("gpu_lost", action="reseat the GPU")]),
                                _plan.Policy())
    assert evaluation.steps[1].next_action == "reseat the GPU"


@pytest.mark.parametrize("policy,pods,allowed,needle", [
    (_plan.Policy(allow_disruptive=False), [], False, "gpunode_allow_disruptive=true"),
    (_plan.Policy(allow_disruptive=True), [], True, None),
    (_plan.Policy(allow_disruptive=True), [{"namespace": "ml", "name": "train-0"}], False, "ml/train-0"),
    (_plan.Policy(allow_disruptive=True, drain=True), [{"namespace": "ml", "name": "train-0"}], True, None),
    (_plan.Policy(allow_disruptive=True, tried=["driver:reboot"]), [], False, "already tried"),
])
def test_disruptive_policy(plan, policy, pods, allowed, needle):
    evaluation = _plan.evaluate(_plan.parse_steps(plan), facts(nvml=[finding("driver_library_mismatch")], pods=pods),
                                policy)
    assert evaluation.proposal.allowed is allowed
    if needle:
        assert needle in evaluation.proposal.refused


def test_unknown_gpu_usage_counts_as_busy(plan):
    node = facts(nvml=[finding("driver_library_mismatch")])
    node["probe"]["gpu_usage"] = {"in_use": None}
    evaluation = _plan.evaluate(_plan.parse_steps(plan), node, _plan.Policy(allow_disruptive=True))
    assert not evaluation.proposal.allowed and "unknown" in evaluation.proposal.refused


def test_safe_remediation_off_in_verify(plan):
    evaluation = _plan.evaluate(_plan.parse_steps(plan), facts(fleet=[finding("plugin_pod_crashloop")]),
                                _plan.Policy(allow_safe=False))
    assert not evaluation.proposal.allowed
    assert "gpu_node_remediate" in evaluation.proposal.refused


def test_workload_step_when_enabled(plan):
    failed = _plan.evaluate(_plan.parse_steps(plan), facts(workload_check=True, workload={"passed": False}),
                            _plan.Policy())
    assert failed.failed_step == "workload"
    assert "workload.passed" in failed.steps[-1].evidence[0]["message"]
    passed = _plan.evaluate(_plan.parse_steps(plan), facts(workload_check=True, workload={"passed": True}),
                            _plan.Policy())
    assert passed.failed_step is None


def test_site_checks_go_after_their_step(plan):
    site = [{"name": "h100_driver", "after": "driver", "check": "nvml.driver_version >= '560'",
             "next_action": "upgrade the driver"}]
    steps = _plan.parse_steps(plan, site)
    names = [s.name for s in steps]
    assert names[names.index("driver") + 1] == "h100_driver"
    evaluation = _plan.evaluate(steps, facts(), _plan.Policy())
    assert evaluation.failed_step == "h100_driver"
    assert evaluation.steps[names.index("h100_driver")].next_action == "upgrade the driver"


@pytest.mark.parametrize("steps,site,needle", [
    ([{"name": "a", "next_action": "x"}, {"name": "a"}], [], "unique"),
    ([{"name": "a", "source": "nowhere", "codes": ["x"]}], [], "unknown source"),
    ([{"name": "a", "codes": ["x"]}], [], "codes but no source"),
    ([{"name": "a"}], [{"name": "b", "after": "zzz", "check": "`true`"}], "follows unknown step"),
    ([{"name": "a"}], [{"name": "b"}], "needs a jmespath"),
    ([{"name": "a", "remediations": [{"description": "x"}]}], [], "without an action"),
])
def test_bad_plans_are_named(steps, site, needle):
    with pytest.raises(InvalidOptionError) as err:
        _plan.parse_steps(steps, site)
    assert needle in err.value.msg


def test_bad_jmespath_is_named():
    steps = _plan.parse_steps([{"name": "a", "check": "nvml.[["}])
    with pytest.raises(InvalidOptionError) as err:
        _plan.evaluate(steps, {}, _plan.Policy())
    assert "step a" in err.value.msg and "nvml.[[" in err.value.msg


def test_fixed_after_an_action_and_report_table(plan):
    steps = _plan.parse_steps(plan)
    first = _plan.evaluate(steps, facts(fleet=[finding("plugin_pod_crashloop")]), _plan.Policy()).to_dict()
    second = _plan.evaluate(steps, facts(), _plan.Policy()).to_dict()
    actions = [dict(first["proposal"], done=True)]
    report = _plan.summarize("gpu-1", _plan.merge_rounds([first, second], actions), actions, None, False)
    assert report["verdict"] == "fixed"
    assert {s["step"]: s["verdict"] for s in report["steps"]}["plugin_pod"] == "fixed"
    broken = _plan.summarize("gpu-2", _plan.merge_rounds([first], []), [], first["proposal"], True)
    assert broken["verdict"] == "failed" and broken["next_action"].startswith("would delete the plugin pod")
    fleet = _plan.fleet_report([report, broken, _plan.missing_report("gpu-3")])
    assert fleet["counts"] == {"ok": 0, "fixed": 1, "failed": 2, "skipped": 0} and not fleet["healthy"]
    lines = _plan.report_table(fleet["nodes"], [s.name for s in steps])
    assert lines[0].split()[:3] == ["NODE", "NODE", "DRIVER"]
    assert any(line.startswith("gpu-1") and "FIXED" in line for line in lines)
    assert "3 nodes: 0 ok, 1 fixed, 2 failed, 0 skipped" in lines
    assert any(line.startswith("gpu-2: FAILED at step plugin_pod") for line in lines)


def test_an_action_whose_wait_failed_but_the_step_is_ok_now_is_fixed_and_shown(plan):
    steps = _plan.parse_steps(plan)
    first = _plan.evaluate(steps, facts(fleet=[finding("plugin_pod_crashloop")]), _plan.Policy()).to_dict()
    second = _plan.evaluate(steps, facts(), _plan.Policy()).to_dict()
    actions = [dict(first["proposal"], done=False, error="watch pods: HTTP 500")]
    report = _plan.summarize("gpu-1", _plan.merge_rounds([first, second], actions), actions, None, False)
    assert report["verdict"] == "fixed"
    lines = _plan.report_table([report], [s.name for s in steps])
    assert "gpu-1: tried to delete the plugin pod so the DaemonSet recreates it (plugin_pod): watch pods: HTTP 500" in lines


def test_failed_action_is_in_the_next_action(plan):
    steps = _plan.parse_steps(plan)
    first = _plan.evaluate(steps, facts(fleet=[finding("plugin_pod_crashloop")]), _plan.Policy()).to_dict()
    actions = [dict(first["proposal"], done=False, error="timed out after 180 s")]
    report = _plan.summarize("gpu-1", _plan.merge_rounds([first, first], actions), actions, None, False)
    assert report["verdict"] == "failed"
    assert "restart_plugin failed (timed out after 180 s)" in report["next_action"]
