# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""The ordered plan as data, and the pure functions that evaluate it.

A node's evidence is one dictionary (``facts``): ``fleet`` (its device_plugin_info entry),
``nvml`` (nvml_info), ``runtime`` (container_runtime_info), ``probe`` (device_plugin_probe),
``workload`` (gpu_smoke_test, optional) and scalars such as ``expected_gpu_count``.
Each step of the plan names the finding codes it owns in one of those sources and/or a
jmespath ``check`` that must be truthy; the first failing step stops the walk, because a
break low in the chain explains every symptom above it. A failing step proposes the first of
its remediations whose codes match, and the policy (safe/disruptive, busy GPUs, actions
already tried) says whether it may run.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import json
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

try:
    import jmespath
except ImportError:
    HAS_JMESPATH = False
    JMESPATH_IMPORT_ERROR: Optional[str] = traceback.format_exc()
else:
    HAS_JMESPATH = True
    JMESPATH_IMPORT_ERROR = None

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError

VERDICTS = ("ok", "fixed", "failed", "skipped")
SOURCES = ("fleet", "nvml", "runtime", "probe", "workload")
PASSING_SEVERITIES = ("warning", "info")


@dataclass
class Remediation:
    action: str
    description: str
    codes: List[str] = field(default_factory=list)  # empty: any failure of the step
    disruptive: bool = False


@dataclass
class Step:
    name: str
    next_action: str  # the manual action when the step stays failed
    source: Optional[str] = None
    codes: List[str] = field(default_factory=list)
    check: Optional[str] = None  # jmespath over facts; truthy = ok
    enabled: Optional[str] = None  # jmespath over facts; falsy = step skipped
    description: str = ""
    remediations: List[Remediation] = field(default_factory=list)
    after: Optional[str] = None  # site checks: the step they follow


@dataclass
class Policy:
    allow_safe: bool = True
    allow_disruptive: bool = False
    drain: bool = False
    tried: List[str] = field(default_factory=list)  # "step:action" already run in this run


@dataclass
class StepResult:
    step: str
    verdict: str
    evidence: List[Dict[str, Any]] = field(default_factory=list)
    next_action: Optional[str] = None


@dataclass
class Proposal:
    step: str
    action: str
    description: str
    disruptive: bool
    allowed: bool
    refused: Optional[str] = None  # why an action exists but may not run


@dataclass
class Evaluation:
    steps: List[StepResult]
    failed_step: Optional[str] = None
    proposal: Optional[Proposal] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _require_jmespath() -> None:
    if not HAS_JMESPATH:
        raise InvalidOptionError("the plan's checks need the Python library jmespath on the controller",
                                 action="pip install jmespath (see requirements.txt)")


def search(expression: str, facts: Dict[str, Any], where: str) -> Any:
    _require_jmespath()
    try:
        return jmespath.search(expression, facts)
    except jmespath.exceptions.JMESPathError as exc:
        raise InvalidOptionError("%s: jmespath expression %r is invalid: %s" % (where, expression, exc))


def parse_steps(raw_steps: List[Dict[str, Any]], site_checks: Optional[List[Dict[str, Any]]] = None) -> List[Step]:
    """Steps from role variables (plan + site checks inserted after the step they name)."""
    steps = [_parse_step(raw, "gpunode_plan_steps") for raw in raw_steps]
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise InvalidOptionError("gpunode_plan_steps: step names must be unique, got %s" % names)
    for raw in site_checks or []:
        check = _parse_step(raw, "gpunode_site_checks")
        if not check.check and not check.codes:
            raise InvalidOptionError("gpunode_site_checks: check %r needs a jmespath 'check'" % check.name)
        if check.name in names:
            raise InvalidOptionError("gpunode_site_checks: %r is already a step name" % check.name)
        anchor = check.after or names[-1]
        if anchor not in names:
            raise InvalidOptionError("gpunode_site_checks: %r follows unknown step %r (steps: %s)"
                                     % (check.name, anchor, ", ".join(names)))
        index = names.index(anchor) + 1
        while index < len(steps) and steps[index].after == anchor:
            index += 1  # several site checks after one step keep their order
        steps.insert(index, check)
        names.insert(index, check.name)
    return steps


def _parse_step(raw: Dict[str, Any], where: str) -> Step:
    if not isinstance(raw, dict) or not raw.get("name"):
        raise InvalidOptionError("%s: every entry needs a name, got %r" % (where, raw))
    name = str(raw["name"])
    source = raw.get("source")
    if source is not None and source not in SOURCES:
        raise InvalidOptionError("%s: step %s has unknown source %r (one of %s)" % (where, name, source, ", ".join(SOURCES)))
    if raw.get("codes") and not source:
        raise InvalidOptionError("%s: step %s lists codes but no source" % (where, name))
    remediations = []
    for item in raw.get("remediations") or []:
        if not isinstance(item, dict) or not item.get("action"):
            raise InvalidOptionError("%s: step %s has a remediation without an action: %r" % (where, name, item))
        remediations.append(Remediation(action=str(item["action"]), description=str(item.get("description", item["action"])),
                                        codes=list(item.get("codes") or []), disruptive=bool(item.get("disruptive", False))))
    return Step(name=name, next_action=str(raw.get("next_action") or "investigate step %s" % name), source=source,
                codes=list(raw.get("codes") or []), check=raw.get("check"), enabled=raw.get("enabled"),
                description=str(raw.get("description", "")), remediations=remediations, after=raw.get("after"))


def _owned_findings(step: Step, facts: Dict[str, Any]) -> List[Dict[str, Any]]:
    if not step.source or not step.codes:
        return []
    source = facts.get(step.source) or {}
    findings = source.get("findings") or [] if isinstance(source, dict) else []
    return [f for f in findings if isinstance(f, dict) and f.get("code") in step.codes]


def step_findings(step: Step, facts: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The failing findings (not warnings) of the step's source that carry one of its codes."""
    return [f for f in _owned_findings(step, facts) if f.get("severity") not in PASSING_SEVERITIES]


def step_warnings(step: Step, facts: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Findings of the step that do not fail it (a pending row remap, persistence off): the step
    is ok, and the report still tells the operator."""
    return [f for f in _owned_findings(step, facts) if f.get("severity") in PASSING_SEVERITIES]


def evaluate(steps: List[Step], facts: Dict[str, Any], policy: Policy) -> Evaluation:
    """Walk the steps bottom-up; stop at the first failing one and propose its remediation."""
    results: List[StepResult] = []
    failed: Optional[Step] = None
    failed_evidence: List[Dict[str, Any]] = []
    for step in steps:
        if failed is not None:
            results.append(StepResult(step.name, "skipped", [{"message": "blocked by step %s" % failed.name}]))
            continue
        if step.enabled and not search(step.enabled, facts, "step %s (enabled)" % step.name):
            results.append(StepResult(step.name, "skipped", [{"message": "not enabled"}]))
            continue
        evidence = step_findings(step, facts)
        ok = not evidence
        if step.check:
            value = search(step.check, facts, "step %s" % step.name)
            if not value:
                ok = False
                evidence = evidence + [{"code": "check_failed", "message": "%s is %s" % (
                    step.check, json.dumps(value, default=str))}]
        if ok:
            results.append(StepResult(step.name, "ok", step_warnings(step, facts)))
            continue
        failed = step
        failed_evidence = evidence
        next_action = "; ".join(dict.fromkeys(f.get("action") for f in evidence if f.get("action"))) or step.next_action
        results.append(StepResult(step.name, "failed", evidence, next_action))
    proposal = propose(failed, failed_evidence, facts, policy) if failed else None
    return Evaluation(results, failed.name if failed else None, proposal)


def plain(value: Any) -> Any:
    """Plain dicts and lists (templated containers are lazy in ansible-core 2.19 and cannot be
    rebuilt by type, as dataclasses.asdict does)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def policy_from(raw: Optional[Dict[str, Any]]) -> Policy:
    raw = dict(raw or {})
    return Policy(
        allow_safe=bool(raw.get("allow_safe", True)),
        allow_disruptive=bool(raw.get("allow_disruptive", False)),
        drain=bool(raw.get("drain", False)),
        tried=[str(t) for t in raw.get("tried") or []],
    )


def evaluate_data(facts: Dict[str, Any], steps: List[Dict[str, Any]], site_checks: Optional[List[Dict[str, Any]]],
                  policy: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """evaluate() over plain data (role variables), as a dictionary."""
    parsed = parse_steps(list(steps or []), list(site_checks or []))
    return evaluate(parsed, dict(facts or {}), policy_from(policy)).to_dict()


API_UNREACHABLE_ACTION = ("check the kubeconfig, the network path to the API server and the automation identity's "
                          "RBAC rules (docs/rbac.yaml)")


def fleet_entry(fleet_read: Optional[Dict[str, Any]], node: str) -> Dict[str, Any]:
    """The node's entry of a device_plugin_info result. A read that failed is evidence too: the
    node gets it as an ``api_unreachable`` finding of the node step."""
    if isinstance(fleet_read, Mapping) and isinstance(fleet_read.get("nodes"), (list, tuple)):
        return next((entry for entry in fleet_read["nodes"] if isinstance(entry, Mapping) and entry.get("name") == node), {})
    fleet_read = fleet_read if isinstance(fleet_read, Mapping) else {}
    return {"findings": [{"code": "api_unreachable", "severity": "error",
                          "message": fleet_read.get("msg") or "the Kubernetes API could not be read",
                          "action": fleet_read.get("action") or API_UNREACHABLE_ACTION}]}


def busy_pods(facts: Dict[str, Any]) -> List[str]:
    """Pods holding GPUs on the node (from the probe's pod-resources List). When the probe could
    not tell (pod-resources unreachable, no checkpoint), the node counts as busy: a disruptive
    action is never taken on a guess."""
    probe = facts.get("probe") or {}
    usage = probe.get("gpu_usage")
    if not probe or (isinstance(usage, dict) and usage.get("in_use") is None):
        return ["(unknown: the kubelet's pod-resources API could not be read)"]
    pods = probe.get("pods_with_devices") or []
    names = []
    for pod in pods:
        if isinstance(pod, dict):
            names.append("%s/%s" % (pod.get("namespace", "?"), pod.get("name", "?")))
        else:
            names.append(str(pod))
    return names


def propose(step: Step, evidence: List[Dict[str, Any]], facts: Dict[str, Any], policy: Policy) -> Optional[Proposal]:
    codes = {f.get("code") for f in evidence}
    for rem in step.remediations:
        if rem.codes and not codes & set(rem.codes):
            continue
        proposal = Proposal(step.name, rem.action, rem.description, rem.disruptive, allowed=True)
        key = "%s:%s" % (step.name, rem.action)
        if key in policy.tried:
            proposal.allowed = False
            proposal.refused = "%s was already tried in this run and the step still fails" % rem.action
        elif rem.disruptive and not policy.allow_disruptive:
            proposal.allowed = False
            proposal.refused = "%s is disruptive: rerun with gpunode_allow_disruptive=true to allow it" % rem.action
        elif rem.disruptive and busy_pods(facts) and not policy.drain:
            proposal.allowed = False
            proposal.refused = ("%s is disruptive and GPUs are in use by %s: drain the node first "
                                "(gpunode_drain=true) or wait for them to finish" % (rem.action, ", ".join(busy_pods(facts))))
        elif not rem.disruptive and not policy.allow_safe:
            proposal.allowed = False
            proposal.refused = "remediation is off here: run gpunode.bringup.gpu_node_remediate to %s" % rem.description
        return proposal
    return None


def merge_rounds(rounds: List[Dict[str, Any]], actions: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Final per-step verdicts: a step that failed in an earlier round, got an action and is ok
    now is ``fixed``."""
    if not rounds:
        return []
    final = [dict(s) for s in rounds[-1]["steps"]]
    acted = {}
    for action in actions:
        acted.setdefault(action["step"], []).append(action)
    for result in final:
        done = acted.get(result["step"], [])
        result["actions"] = [a["action"] for a in done]
        # an action that ran (even one whose wait then failed) and a step that is ok now: fixed
        if result["verdict"] == "ok" and done:
            result["verdict"] = "fixed"
    return final


def summarize(node: str, steps: List[Dict[str, Any]], actions: List[Dict[str, Any]],
              proposal: Optional[Dict[str, Any]], check_mode: bool, skipped_reason: Optional[str] = None) -> Dict[str, Any]:
    """One node's report entry."""
    failed = [s for s in steps if s["verdict"] == "failed"]
    verdict = "skipped" if skipped_reason else ("failed" if failed else (
        "fixed" if any(s["verdict"] == "fixed" for s in steps) else "ok"))
    next_action = None
    if failed:
        next_action = failed[0].get("next_action")
        errors = [a for a in actions if a.get("step") == failed[0]["step"] and a.get("error")]
        if errors:
            next_action = "%s failed (%s); then: %s" % (errors[-1]["action"], errors[-1]["error"], next_action)
        elif proposal and proposal.get("refused"):
            next_action = "%s (%s)" % (proposal["description"], proposal["refused"])
        elif proposal and check_mode:
            next_action = "would %s" % proposal["description"]
    warnings = [dict(w, step=s["step"]) for s in steps if s["verdict"] in ("ok", "fixed")
                for w in s.get("evidence") or [] if w.get("severity") in PASSING_SEVERITIES]
    return {
        "node": node,
        "verdict": verdict,
        "failed_step": failed[0]["step"] if failed else None,
        "steps": steps,
        "warnings": warnings,
        "actions": actions,
        "next_action": skipped_reason or next_action,
        "check_mode": check_mode,
    }


def missing_report(node: str) -> Dict[str, Any]:
    """The entry of a host whose plan did not finish (unreachable, or a task failed)."""
    return {"node": node, "verdict": "failed", "failed_step": None, "steps": [], "actions": [],
            "next_action": "the plan did not finish on this host: see the task error or unreachable host above",
            "check_mode": False}


def fleet_report(reports: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The run's report: entries sorted by node, counts per verdict."""
    nodes = sorted(reports, key=lambda r: r["node"])
    counts = {v: sum(1 for r in nodes if r["verdict"] == v) for v in VERDICTS}
    return {"nodes": nodes, "counts": counts, "healthy": counts["failed"] == 0 and counts["skipped"] == 0}


SYMBOLS = {"ok": "ok", "fixed": "FIXED", "failed": "FAIL", "skipped": "-"}


def report_table(reports: List[Dict[str, Any]], step_names: List[str]) -> List[str]:
    """Nodes x steps as fixed-width text lines, readable at 50 nodes, then one line per problem."""
    rows = sorted(reports, key=lambda r: r.get("node", ""))
    node_width = max([4] + [len(r["node"]) for r in rows])
    widths = [max(len(name), 5) for name in step_names]
    header = "%-*s  " % (node_width, "NODE") + "  ".join("%-*s" % (w, n.upper()) for n, w in zip(step_names, widths))
    lines = [header + "  RESULT", "-" * (len(header) + 8)]
    for report in rows:
        by_step = {s["step"]: s["verdict"] for s in report.get("steps", [])}
        cells = ["%-*s" % (w, SYMBOLS.get(by_step.get(n, "skipped"), "?")) for n, w in zip(step_names, widths)]
        lines.append("%-*s  %s  %s" % (node_width, report["node"], "  ".join(cells), report["verdict"].upper()))
    counts = {v: sum(1 for r in rows if r["verdict"] == v) for v in VERDICTS}
    lines.append("")
    lines.append("%d nodes: %d ok, %d fixed, %d failed, %d skipped" % (
        len(rows), counts["ok"], counts["fixed"], counts["failed"], counts["skipped"]))
    for report in rows:
        done = [a for a in report.get("actions", []) if a.get("done")]
        if done:
            lines.append("%s: did %s" % (report["node"], ", ".join("%s (%s)" % (a["description"], a["step"]) for a in done)))
        for action in report.get("actions", []):
            if not action.get("done"):
                error = action.get("error") or "failed"
                lines.append("%s: tried to %s (%s): %s" % (report["node"], action["description"], action["step"], error))
        for warning in report.get("warnings", []):
            gpu = " GPU %s" % warning["gpu"] if warning.get("gpu") is not None else ""
            lines.append("%s: warning%s (%s): %s%s" % (report["node"], gpu, warning.get("code"), warning.get("message"),
                                                       ". Next: %s" % warning["action"] if warning.get("action") else ""))
        if report["verdict"] in ("failed", "skipped") and report.get("next_action"):
            where = " at step %s" % report["failed_step"] if report.get("failed_step") else ""
            lines.append("%s: %s%s. Next: %s" % (report["node"], report["verdict"].upper(), where, report["next_action"]))
    return lines
