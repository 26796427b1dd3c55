# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action gpu_plan_check: node_info on the node, then the ordered plan walked on the controller.

One task per node per round: what took three module runs and four set_fact tasks per host.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.plugins.action import ActionBase
from ansible_collections.gpunode.bringup.plugins.module_utils import _plan
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import GpuNodeError

NODE_INFO = "gpunode.bringup.node_info"

ARGUMENT_SPEC = dict(
    node=dict(type="str", required=True),
    fleet=dict(type="dict"),
    workload=dict(type="dict"),
    workload_check=dict(type="bool", default=False),
    expected_gpu_count=dict(type="int"),
    node_info=dict(type="dict", default={}),
    steps=dict(type="list", elements="dict", required=True),
    site_checks=dict(type="list", elements="dict", default=[]),
    policy=dict(type="dict", default={}),
    rounds=dict(type="list", elements="dict", default=[]),
    python=dict(type="str"),
)


def node_evidence(args, node_info):
    """The facts the plan's checks read (the same keys the filter gpu_plan_evaluate documents)."""
    nvml = node_info.get("nvml")
    expected = args["expected_gpu_count"]
    if expected is None and isinstance(nvml, dict):
        expected = nvml.get("gpu_count")
    return {
        "node": args["node"],
        "expected_gpu_count": expected,
        "options": {"workload_check": args["workload_check"]},
        "fleet": args["fleet"],
        "nvml": nvml,
        "runtime": node_info.get("runtime"),
        "probe": node_info.get("probe"),
        "workload": args["workload"] if args["workload_check"] else None,
    }


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = True

    def run(self, tmp=None, task_vars=None):
        result = super(ActionModule, self).run(tmp, task_vars)
        del tmp
        validation, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        del validation
        # the batch's fleet read lists every node of the batch: keep only this node's entry
        # before copying anything, so a host's cost does not grow with the batch
        fleet = args.pop("fleet")
        args = _plan.plain(args)
        args["fleet"] = _plan.plain(_plan.fleet_entry(fleet, str(args["node"])))
        if not str(args["node"]).strip():
            result.update(failed=True, msg="node must be the Node's name, got an empty string")
            return result
        try:
            # the plan's own errors (a bad step, a bad jmespath) before anything runs on the node
            parsed = _plan.parse_steps(args["steps"], args["site_checks"])
        except GpuNodeError as exc:
            result.update(failed=True, msg="gpu_plan_check: %s" % exc.msg)
            return result

        module_vars = dict(task_vars or {})
        if args["python"]:
            module_vars["ansible_python_interpreter"] = args["python"]
        node_info = self._execute_module(module_name=NODE_INFO, module_args=args["node_info"], task_vars=module_vars)
        node_info = _plan.plain(node_info)
        if node_info.get("failed"):
            result.update(failed=True, node_info=node_info,
                          msg="node-side checks (%s) failed on node %s: %s"
                              % (NODE_INFO, args["node"], node_info.get("msg") or node_info.get("module_stderr", "")))
            return result

        evidence = node_evidence(args, node_info)
        try:
            evaluation = _plan.evaluate(parsed, evidence, _plan.policy_from(args["policy"])).to_dict()
        except GpuNodeError as exc:
            result.update(failed=True, evidence=evidence, msg="gpu_plan_check: %s" % exc.msg)
            return result
        result.update(
            changed=False,
            evidence=evidence,
            evaluation=evaluation,
            rounds=list(args["rounds"]) + [evaluation],
            healthy=evaluation["failed_step"] is None,
        )
        if node_info.get("warnings"):
            result["warnings"] = list(node_info["warnings"])
        return result
