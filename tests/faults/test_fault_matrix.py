"""The fault matrix: every node-level lab fault, one per node of one lab fleet, through
playbooks/gpu_node_remediate.yml.

One fleet, one fault per node, and few playbook runs (each costs 30-90 s on a shared 2-core
machine): the DaemonSet is deployed by a bring-up limited to one node, the faults are injected,
then

1. remediate (safe fixes only) on the whole fleet: per node the first failing step, the verdict,
   the action taken or the next action; node roots and API writes exactly what the fixes need;
2. remediate again: changed=0 everywhere, no API write, no file touched;
3. remediate with -e gpunode_allow_disruptive=true limited to the nodes whose fix is disruptive;
4. the same again: changed=0.

docs/RELIABILITY.md has the table these tests check.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from faultlab import FaultFleet

Status = Dict[str, Any]


def _pod(entry: Status) -> Status:
    return entry.get("plugin_pod") or {}


def _crashing(entry: Status) -> bool:
    return _pod(entry).get("running") is False


def _allocatable(value: int) -> Callable[[Status], bool]:
    return lambda entry: str(entry.get("allocatable")) == str(value)


@dataclass
class Row:
    """One fault on one node and what the first remediate run must make of it."""

    id: str
    fault: Optional[str]  # the lab fault (None: a healthy control node)
    args: Dict[str, str] = field(default_factory=dict)
    verdict: str = "failed"  # ok | fixed | failed
    step: Optional[str] = None  # first failing step (fixed or failed)
    action: Optional[str] = None  # safe action run in the first run
    code: Optional[str] = None  # finding code in the failed step's evidence
    next_action: Optional[str] = None  # text the next action must contain
    # files under the node root the fix rewrites (node-side actions only)
    files: Tuple[str, ...] = ()
    before_deploy: bool = False  # inject before the plugin DaemonSet exists
    extra: Tuple[Tuple[str, Dict[str, str]], ...] = ()  # faults injected right after this one
    host_vars: Dict[str, Any] = field(default_factory=dict)
    settled: Optional[Callable[[Status], bool]] = None  # the fault is visible in the lab status
    gpu_model: Optional[str] = None  # rewrite the node's NVML state for this model before deploy
    warning: Optional[str] = None  # a finding that passes its step and is reported as a warning


DISRUPTIVE = "is disruptive: rerun with gpunode_allow_disruptive=true"

ROWS: List[Row] = [
    Row("healthy", None, verdict="ok"),
    Row("driver_not_loaded", "driver_not_loaded", verdict="fixed", step="driver", action="load_kernel_modules",
        files=("nvml.state", "proc/driver/nvidia/version")),
    Row("driver_library_mismatch", "driver_library_mismatch", step="driver", code="driver_library_mismatch",
        next_action="reboot " + DISRUPTIVE),
    Row("driver_library_mismatch+gpu_in_use", "driver_library_mismatch", step="driver", code="driver_library_mismatch",
        next_action="reboot " + DISRUPTIVE, extra=(("gpu_in_use", {"pod": "train-0", "namespace": "ml", "count": "2"}),)),
    Row("library_missing", "library_missing", step="driver", code="nvml_library_missing",
        next_action="Install the NVIDIA driver"),
    Row("gpu_lost", "gpu_lost", step="driver", code="gpu_lost", next_action="reboot"),
    Row("gpu_count_low", "gpu_count_low", step="driver", code="gpu_count_mismatch", next_action="reseat or replace"),
    Row("ecc_uncorrectable", "ecc_uncorrectable", step="driver", code="ecc_uncorrectable", next_action="reset"),
    Row("retired_pages_pending (V100)", "retired_pages_pending", verdict="ok", gpu_model="V100",
        warning="retired_pages_pending"),
    Row("remapped_rows_pending", "remapped_rows_pending", verdict="ok", warning="remapped_rows_pending"),
    Row("remapped_rows_failure", "remapped_rows_failure", step="driver", code="remapped_rows_failure",
        next_action="replaced"),
    Row("critical_xid", "critical_xid", step="socket", code="plugin_devices_unhealthy", next_action="XID",
        settled=_allocatable(7)),
    Row("persistence_off", "persistence_off", verdict="ok", warning="persistence_mode_off"),
    Row("persistence_off (require_persistence_mode)", "persistence_off", verdict="fixed", step="driver",
        action="start_persistenced", files=("nvml.state",), host_vars={"gpunode_require_persistence_mode": True}),
    Row("no_permission", "no_permission", step="driver", code="no_permission", next_action="/dev/nvidia"),
    Row("mig_pending", "mig_pending", verdict="ok", warning="mig_mode_pending"),
    Row("runtime_missing_nvidia", "runtime_missing_nvidia", step="runtime", code="nvidia_runtime_missing",
        next_action="configure_runtime " + DISRUPTIVE),
    Row("label_missing", "label_missing", verdict="fixed", step="scheduling", action="add_node_label",
        settled=_allocatable(0)),
    Row("taint_untolerated", "taint_untolerated", step="scheduling", code="not_targeted_taint",
        next_action="taints are never removed"),
    Row("plugin_crash nvml_init_failed", "plugin_crash", {"signature": "nvml_init_failed"}, verdict="fixed",
        step="plugin_pod", action="restart_plugin", settled=_crashing),
    Row("plugin_crash incompatible_strategy", "plugin_crash", {"signature": "incompatible_strategy"},
        verdict="fixed", step="plugin_pod", action="restart_plugin", settled=_crashing),
    Row("plugin_crash registration_failed", "plugin_crash", {"signature": "registration_failed"}, verdict="fixed",
        step="plugin_pod", action="restart_plugin", settled=_crashing),
    Row("plugin_hang", "plugin_hang", verdict="fixed", step="socket", action="restart_plugin"),
    Row("plugin_stale socket=removed", "plugin_stale", {"socket": "removed"}, verdict="fixed", step="socket",
        action="restart_plugin", extra=(("kubelet_restart", {}),), settled=_allocatable(0)),
    Row("plugin_stale socket=kept", "plugin_stale", {"socket": "kept"}, verdict="fixed", step="registration",
        action="restart_plugin", extra=(("kubelet_restart", {}),), settled=_allocatable(0)),
    Row("plugin_no_devices", "plugin_no_devices", verdict="fixed", step="plugin_pod", action="restart_plugin",
        settled=_allocatable(0)),
    Row("kubelet_restart after=register", "kubelet_restart", {"after": "register"}, verdict="ok",
        before_deploy=True, settled=lambda e: "kubelet_restart" not in (e.get("faults") or {})
        and str(e.get("allocatable")) == "8"),
    Row("kubelet_down", "kubelet_down", step="node", code="node_not_ready", next_action="restart_kubelet " + DISRUPTIVE,
        settled=lambda e: not e.get("ready")),
    Row("stale_socket_file", "stale_socket_file", verdict="fixed", step="socket", action="restart_plugin",
        settled=_allocatable(0)),
]
ROW_IDS = [row.id for row in ROWS]


class Matrix:
    """The fleet and what each run left behind."""

    def __init__(self, fleet: FaultFleet) -> None:
        self.fleet = fleet
        self.node = {row.id: name for row, name in zip(ROWS, fleet.node_names)}
        self.row = {row.id: row for row in ROWS}
        self.runs: Dict[str, Any] = {}
        self.snapshots: Dict[str, Dict[str, str]] = {}
        self.pods: Dict[str, Dict[str, Optional[str]]] = {}
        self.writes: Dict[str, Dict[str, Dict[str, int]]] = {}
        self.status: Dict[str, Status] = {}

    def observe(self, tag: str) -> None:
        self.snapshots[tag] = self.fleet.snapshot()
        self.pods[tag] = self.fleet.plugin_pods()
        self.status[tag] = self.fleet.nodes_status()

    def run(self, tag: str, *extra: str, limit: Optional[str] = None) -> Any:
        self.fleet.reset_counters()
        result = self.fleet.run("gpu_node_remediate.yml", *extra, limit=limit, tag="matrix-" + tag)
        self.runs[tag] = result
        self.writes[tag] = self.fleet.write_requests()
        print("fault matrix: run %s %.1f s" % (tag, result.seconds))
        self.observe(tag)
        return result

    def changed_files(self, before: str, after: str) -> Dict[str, List[str]]:
        """Node -> paths (relative to its root) that differ between two snapshots."""
        a, b = self.snapshots[before], self.snapshots[after]
        result: Dict[str, List[str]] = {}
        for name in self.fleet.node_names:
            root = str(self.fleet.node_root(name)) + "/"
            paths = sorted(p[len(root):] for p in set(a) | set(b) if p.startswith(root) and a.get(p) != b.get(p))
            if paths:
                result[name] = paths
        return result


@pytest.fixture(scope="module")
def fleet():
    fleet = FaultFleet(nodes=len(ROWS)).up()
    try:
        yield fleet
    finally:
        fleet.down()


@pytest.fixture(scope="module")
def matrix(fleet):
    from lab import nvml_state

    m = Matrix(fleet)
    for row in ROWS:
        node = m.node[row.id]
        if row.gpu_model:  # a pre-Ampere node: the lab's fleets are A100s
            state = nvml_state.default_node_state(node, gpu_count=8, model=row.gpu_model)
            nvml_state.write_state(str(fleet.node_root(node) / "nvml.state"), state)
        if row.host_vars:
            fleet.set_host_vars(node, **row.host_vars)
        if row.before_deploy:
            fleet.break_(node, row.fault, **row.args)
    # the DaemonSet, deployed by a bring-up of one node (the plan on every node is the test's job)
    first = fleet.node_names[0]
    deploy = fleet.run("gpu_node_bringup.yml", limit="%s,localhost" % first)
    assert deploy.rc == 0, deploy.output[-4000:]
    fleet.wait_advertising(fleet.node_names)
    for row in ROWS:
        if row.fault and not row.before_deploy:
            fleet.break_(m.node[row.id], row.fault, **row.args)
        for fault, args in row.extra:
            fleet.break_(m.node[row.id], fault, **args)
    settled = {m.node[row.id]: row.settled for row in ROWS if row.settled}
    fleet.wait_for("faults visible", lambda status: all(check(status[n]) for n, check in settled.items()))
    m.observe("broken")
    m.run("first")
    m.run("rerun")
    return m


@pytest.mark.parametrize("row_id", ROW_IDS)
def test_first_run(matrix, row_id):
    row = matrix.row[row_id]
    node = matrix.node[row_id]
    run = matrix.runs["first"]
    report = run.node_report(node)
    steps = run.steps(node)
    context = "%s on %s: %s" % (row.id, node, report)
    assert report["verdict"] == row.verdict, context
    if row.verdict == "ok":
        assert report["actions"] == [] and run.changed(node) == 0, context
        assert all(v in ("ok", "skipped") for v in steps.values()), context
        return
    # the steps below the first failing one are ok: the walk stopped where it had to
    order = list(steps)
    index = order.index(row.step)
    assert all(steps[s] == "ok" for s in order[:index]), context
    if row.verdict == "fixed":
        assert report["failed_step"] is None and steps[row.step] == "fixed", context
        assert [(a["action"], a["done"]) for a in report["actions"]] == [(row.action, True)], context
        assert run.changed(node) > 0, context
        return
    assert report["failed_step"] == row.step, context
    assert steps[row.step] == "failed", context
    assert report["actions"] == [] and run.changed(node) == 0, context
    failed = next(s for s in report["steps"] if s["step"] == row.step)
    assert row.code in [e.get("code") for e in failed["evidence"]], context
    assert row.next_action in (report["next_action"] or ""), context


@pytest.mark.parametrize("row_id", ROW_IDS)
def test_rerun_changes_nothing(matrix, row_id):
    row = matrix.row[row_id]
    node = matrix.node[row_id]
    run = matrix.runs["rerun"]
    report = run.node_report(node)
    assert run.changed(node) == 0, report
    assert report["actions"] == [], report
    if row.verdict == "failed":
        assert report["verdict"] == "failed" and report["failed_step"] == row.step, report
    else:
        assert report["verdict"] == "ok", report


def test_first_run_touches_only_what_the_fixes_need(matrix):
    fleet, run = matrix.fleet, matrix.runs["first"]
    fixed = [row for row in ROWS if row.verdict == "fixed"]
    # node roots: only the files of node-side actions, on their nodes
    expected_files = {matrix.node[row.id]: sorted(row.files) for row in fixed if row.files}
    changed = matrix.changed_files("broken", "first")
    stale_file = matrix.node["stale_socket_file"]
    # the regular file squatting on the plugin socket's path is replaced by the new plugin's socket
    assert changed.pop(stale_file, None) == ["var/lib/kubelet/device-plugins/nvidia-gpu.sock"]
    assert changed == expected_files
    # plugin pods: recreated exactly where a restart (or the label) was the fix
    before, after = matrix.pods["broken"], matrix.pods["first"]
    recreated = sorted(n for n in fleet.node_names if before[n] != after[n])
    assert recreated == sorted(matrix.node[row.id] for row in fixed if row.action in ("restart_plugin", "add_node_label"))
    # API writes: a Lease per node acted on, one pod delete per plugin restart, one node patch per label
    acted = len(fixed)
    restarts = sum(1 for row in fixed if row.action == "restart_plugin")
    labels = sum(1 for row in fixed if row.action == "add_node_label")
    assert matrix.writes["first"] == {"create": {"leases": acted}, "delete": {"leases": acted, "pods": restarts},
                                      "patch": {"nodes": labels}}, matrix.writes["first"]
    assert fleet.leases() == []
    # the taint is reported, never removed; the nodes the run could not fix keep their faults
    assert matrix.status["first"][matrix.node["taint_untolerated"]]["taints"] == ["gpu-maintenance=true:NoSchedule"]
    assert run.rc != 0 and run.report["counts"] == {
        "ok": sum(1 for row in ROWS if row.verdict == "ok"), "fixed": acted,
        "failed": sum(1 for row in ROWS if row.verdict == "failed"), "skipped": 0}


def test_rerun_writes_nothing(matrix):
    assert matrix.writes["rerun"] == {}
    assert matrix.changed_files("first", "rerun") == {}
    assert matrix.pods["first"] == matrix.pods["rerun"]
    assert all(matrix.runs["rerun"].changed(h) == 0 for h in matrix.runs["rerun"].recap)


@pytest.mark.parametrize("row_id", [row.id for row in ROWS if row.warning])
def test_warnings_pass_the_step_and_are_reported(matrix, row_id):
    row = matrix.row[row_id]
    for tag in ("first", "rerun"):
        report = matrix.runs[tag].node_report(matrix.node[row_id])
        assert report["verdict"] == "ok", report
        assert row.warning in {w.get("code") for w in report.get("warnings") or []}, report
        assert "%s: warning" % matrix.node[row_id] in matrix.runs[tag].output
    healthy = matrix.runs["first"].node_report(matrix.node["healthy"])
    assert healthy.get("warnings") == []


# ---- disruptive remediation, allowed -------------------------------------------------------------
DISRUPTIVE_ROWS = {
    # row id: (verdict, step, action done or text of the next action)
    "driver_library_mismatch": ("fixed", "driver", "reboot"),
    "runtime_missing_nvidia": ("fixed", "runtime", "configure_runtime"),
    "driver_library_mismatch+gpu_in_use": ("failed", "driver", "GPUs are in use by ml/train-0"),
    "kubelet_down": ("fixed", "node", "restart_kubelet"),
}


@pytest.fixture(scope="module")
def disruptive(matrix):
    limit = ",".join(matrix.node[r] for r in DISRUPTIVE_ROWS)
    matrix.run("disruptive", "-e", "gpunode_allow_disruptive=true", limit=limit)
    matrix.run("disruptive-rerun", "-e", "gpunode_allow_disruptive=true", limit=limit)
    return matrix


@pytest.mark.parametrize("row_id", list(DISRUPTIVE_ROWS))
def test_disruptive_allowed(disruptive, row_id):
    verdict, step, what = DISRUPTIVE_ROWS[row_id]
    node = disruptive.node[row_id]
    run = disruptive.runs["disruptive"]
    report = run.node_report(node)
    assert report["verdict"] == verdict, report
    if verdict == "fixed":
        assert run.steps(node)[step] == "fixed", report
        assert [a["action"] for a in report["actions"] if a["done"]][:1] == [what], report
        assert run.changed(node) > 0
    else:
        assert report["failed_step"] == step and what in report["next_action"], report
        assert report["actions"] == [] and run.changed(node) == 0, report


def test_disruptive_rerun_changes_nothing(disruptive):
    run = disruptive.runs["disruptive-rerun"]
    assert all(run.changed(h) == 0 for h in run.recap), run.recap
    assert disruptive.writes["disruptive-rerun"] == {}
    assert disruptive.changed_files("disruptive", "disruptive-rerun") == {}


def test_disruptive_touches_only_its_nodes(disruptive):
    targets = {disruptive.node[r] for r in DISRUPTIVE_ROWS}
    changed = disruptive.changed_files("rerun", "disruptive")
    assert set(changed) <= targets, changed
    before, after = disruptive.pods["rerun"], disruptive.pods["disruptive"]
    assert {n for n in before if before[n] != after[n]} <= targets
    # the disruptive actions run on the nodes (lab node-action): in the API only their Leases
    acted = sum(1 for verdict, _s, _w in DISRUPTIVE_ROWS.values() if verdict == "fixed")
    assert disruptive.writes["disruptive"] == {"create": {"leases": acted}, "delete": {"leases": acted}}
    assert disruptive.fleet.leases() == []
