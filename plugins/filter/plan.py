# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters of the ordered plan: evaluate a node's evidence, summarize it, render the fleet table."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.errors import AnsibleFilterError
from ansible_collections.gpunode.bringup.plugins.module_utils import _plan
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import GpuNodeError

_plain = _plan.plain


def gpu_plan_evaluate(facts, steps, site_checks=None, policy=None):
    try:
        return _plan.evaluate_data(_plain(facts), _plain(steps), _plain(site_checks), _plain(policy))
    except GpuNodeError as exc:
        raise AnsibleFilterError("gpu_plan_evaluate: %s" % exc.msg)


def gpu_plan_summary(rounds, node, actions=None, check_mode=False, skipped_reason=None):
    rounds = _plain(list(rounds or []))
    actions = _plain(list(actions or []))
    steps = _plan.merge_rounds(rounds, actions)
    proposal = rounds[-1].get("proposal") if rounds else None
    return _plan.summarize(str(node), steps, actions, proposal, bool(check_mode), skipped_reason)


def gpu_plan_step_names(steps, site_checks=None):
    try:
        return [s.name for s in _plan.parse_steps(_plain(list(steps or [])), _plain(list(site_checks or [])))]
    except GpuNodeError as exc:
        raise AnsibleFilterError("gpu_plan_step_names: %s" % exc.msg)


def gpu_report_table(reports, step_names):
    return _plan.report_table([r for r in _plain(list(reports or [])) if isinstance(r, dict) and r.get("node")],
                              list(step_names))


def gpu_report_collect(hosts, hostvars, node_var="gpu_node__node"):
    reports = []
    for host in hosts or []:
        facts = hostvars[host] if host in hostvars else {}
        report = _plain(facts.get("gpu_node_report"))
        if isinstance(report, dict) and report.get("node"):
            reports.append(report)
        else:
            reports.append(_plan.missing_report(str(facts.get(node_var) or host)))
    return _plan.fleet_report(reports)


class FilterModule(object):
    def filters(self):
        return {
            "gpu_plan_evaluate": gpu_plan_evaluate,
            "gpu_plan_summary": gpu_plan_summary,
            "gpu_plan_step_names": gpu_plan_step_names,
            "gpu_report_table": gpu_report_table,
            "gpu_report_collect": gpu_report_collect,
        }
