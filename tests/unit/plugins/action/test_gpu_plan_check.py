# -*- coding: utf-8 -*-
"""The gpu_plan_check action: the node-side module runs once with the node_info options and the
interpreter asked for, the evidence is what the plan reads, a failed fleet read becomes the
finding api_unreachable, a bad plan or a failed node-side module fails the task with its message."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

from unittest.mock import MagicMock

import pytest

from ansible.errors import AnsibleActionFail
from ansible.playbook.task import Task
from ansible_collections.gpunode.bringup.plugins.action import gpu_plan_check as action

STEPS = [
    {"name": "node", "source": "fleet", "codes": ["api_unreachable", "node_not_ready"], "next_action": "fix the API"},
    {"name": "driver", "source": "nvml", "codes": ["gpu_lost"], "next_action": "reset the GPU"},
    {"name": "count", "check": "nvml.gpu_count == expected_gpu_count", "next_action": "check the GPUs"},
    {"name": "plugin", "source": "probe", "codes": ["plugin_socket_missing"], "next_action": "restart",
     "remediations": [{"action": "restart_plugin", "codes": ["plugin_socket_missing"]}]},
]
NODE_INFO = {
    "changed": False, "healthy": True, "findings": [], "checks": ["nvml", "runtime", "probe"],
    "nvml": {"healthy": True, "findings": [], "gpu_count": 2, "gpus": []},
    "runtime": {"healthy": True, "findings": []},
    "probe": {"healthy": True, "findings": []},
}
FLEET = {"changed": False, "nodes": [{"name": "gpu-1", "findings": []}, {"name": "gpu-2", "findings": [
    {"code": "node_not_ready", "severity": "error", "message": "gpu-2 is NotReady"}]}]}


def run(args, node_info=None, task_vars=None):
    task = Task()
    task.args = dict(args)
    plugin = action.ActionModule(task, MagicMock(), MagicMock(), loader=None, templar=None, shared_loader_obj=None)
    plugin._execute_module = MagicMock(return_value=dict(node_info if node_info is not None else NODE_INFO))
    return plugin, plugin.run(task_vars=dict(task_vars or {"inventory_hostname": "gpu-1"}))


def test_healthy_node_one_module_run_and_the_plan_walked():
    plugin, result = run({"node": "gpu-1", "fleet": FLEET, "steps": STEPS, "node_info": {"node_root": "/n"}})
    assert plugin._execute_module.call_count == 1
    call = plugin._execute_module.call_args.kwargs
    assert call["module_name"] == "gpunode.bringup.node_info" and call["module_args"] == {"node_root": "/n"}
    assert "ansible_python_interpreter" not in call["task_vars"]
    assert result.get("failed") is not True, result
    assert result["healthy"] is True and result["changed"] is False
    assert [s["verdict"] for s in result["evaluation"]["steps"]] == ["ok", "ok", "ok", "ok"]
    assert result["rounds"] == [result["evaluation"]]
    assert result["evidence"]["fleet"] == {"name": "gpu-1", "findings": []}
    assert result["evidence"]["expected_gpu_count"] == 2  # NVML's count stands in when none is set
    assert result["evidence"]["workload"] is None


def test_python_option_sets_the_interpreter_of_the_node_side_module():
    plugin, _result = run({"node": "gpu-1", "fleet": FLEET, "steps": STEPS, "python": "/opt/gpunode/venv/bin/python"})
    assert plugin._execute_module.call_args.kwargs["task_vars"]["ansible_python_interpreter"] == "/opt/gpunode/venv/bin/python"


def test_first_failing_step_and_rounds_accumulate():
    info = dict(NODE_INFO, probe={"healthy": False, "findings": [{"code": "plugin_socket_missing", "action": "restart it"}]})
    prior = {"steps": [], "failed_step": "plugin", "proposal": None}
    _plugin, result = run({"node": "gpu-1", "fleet": FLEET, "steps": STEPS, "rounds": [prior],
                           "policy": {"allow_safe": True}}, node_info=info)
    assert result["evaluation"]["failed_step"] == "plugin"
    assert result["evaluation"]["proposal"]["action"] == "restart_plugin"
    assert result["evaluation"]["proposal"]["allowed"] is True
    assert result["rounds"] == [prior, result["evaluation"]] and result["healthy"] is False


def test_expected_gpu_count_is_checked():
    _plugin, result = run({"node": "gpu-1", "fleet": FLEET, "steps": STEPS, "expected_gpu_count": 8})
    assert result["evaluation"]["failed_step"] == "count"


def test_node_not_in_fleet_read_and_node_fleet_findings():
    _plugin, result = run({"node": "gpu-2", "fleet": FLEET, "steps": STEPS})
    assert result["evaluation"]["failed_step"] == "node"
    _plugin, result = run({"node": "gpu-9", "fleet": FLEET, "steps": STEPS})
    assert result["evidence"]["fleet"] == {}


def test_failed_fleet_read_becomes_api_unreachable():
    fleet = {"failed": True, "msg": "cannot reach the Kubernetes API at https://10.0.0.1:6443"}
    _plugin, result = run({"node": "gpu-1", "fleet": fleet, "steps": STEPS})
    (finding,) = result["evidence"]["fleet"]["findings"]
    assert finding["code"] == "api_unreachable" and "10.0.0.1:6443" in finding["message"]
    assert "rbac" in finding["action"].lower()
    assert result["evaluation"]["failed_step"] == "node"


def test_workload_result_is_evidence_only_when_the_check_is_on():
    workload = {"passed": True, "findings": []}
    _plugin, result = run({"node": "gpu-1", "fleet": FLEET, "steps": STEPS, "workload": workload,
                           "workload_check": True})
    assert result["evidence"]["workload"] == workload and result["evidence"]["options"] == {"workload_check": True}
    _plugin, result = run({"node": "gpu-1", "fleet": FLEET, "steps": STEPS, "workload": workload})
    assert result["evidence"]["workload"] is None


def test_failed_node_side_module_fails_the_task_with_its_message():
    failed = {"failed": True, "msg": "Failed to import the required Python library (nvidia-ml-py (needed by check nvml))"}
    _plugin, result = run({"node": "gpu-1", "fleet": FLEET, "steps": STEPS}, node_info=failed)
    assert result["failed"] is True
    assert "gpu-1" in result["msg"] and "nvidia-ml-py" in result["msg"] and "node_info" in result["msg"]


def test_bad_plan_fails_before_the_node_is_touched():
    plugin, result = run({"node": "gpu-1", "fleet": FLEET, "steps": [{"name": "x", "source": "nope", "codes": ["a"]}]})
    assert result["failed"] is True and "unknown source 'nope'" in result["msg"]
    assert plugin._execute_module.call_count == 0


def test_bad_jmespath_in_a_check_names_the_step():
    steps = STEPS + [{"name": "site", "check": "nvml.[[", "next_action": "x"}]
    _plugin, result = run({"node": "gpu-1", "fleet": FLEET, "steps": steps})
    assert result["failed"] is True and "step site" in result["msg"] and "jmespath" in result["msg"]


@pytest.mark.parametrize("args, words", [
    ({"fleet": FLEET, "steps": STEPS}, "node"),
    ({"node": "gpu-1", "fleet": FLEET, "steps": "not a list"}, "steps"),
    ({"node": "gpu-1", "fleet": FLEET, "steps": STEPS, "policy": "yes"}, "policy"),
])
def test_bad_arguments_name_the_argument(args, words):
    with pytest.raises(AnsibleActionFail) as err:
        run(args)
    assert words in str(err.value)


def test_empty_node_name():
    _plugin, result = run({"node": " ", "fleet": FLEET, "steps": STEPS})
    assert result["failed"] is True and "node must be" in result["msg"]
