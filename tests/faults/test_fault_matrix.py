"""The fault matrix: every node-level lab fault, one per node of one lab fleet (the real control
plane, NVIDIA's real device plugin v0.17.4 in every plugin pod), through
playbooks/gpu_node_verify.yml and playbooks/gpu_node_remediate.yml.

One fleet, one fault per node, and few playbook runs (each costs 20-90 s on a shared 2-core
machine): the DaemonSet is deployed by a bring-up limited to one node, the faults are injected
(through their real mechanisms: docs/LAB.md, "Faults") and the tests wait until the kubelet, the
plugin and the controllers show each one, then

0. verify (read-only): per node the first failing step, the finding code and its evidence
   (NVIDIA's own log line where the plugin's log is the evidence); no API write, no file;
1. remediate (safe fixes only) on the whole fleet: per node the first failing step, the verdict,
   the actions taken or the next action; node roots and API writes (the API server's audit log)
   exactly what the fixes need;
2. remediate again: changed=0 everywhere, no API write, no file touched;
3. remediate with -e gpunode_allow_disruptive=true limited to the nodes whose fix is disruptive;
4. the same again: changed=0.

docs/RELIABILITY.md has the table these tests check.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from faultlab import FaultFleet

Status = Dict[str, Any]
GPU = "nvidia.com/gpu"
PLUGIN_SOCKET = "var/lib/kubelet/device-plugins/nvidia-gpu.sock"
# the kubelet's nodeStatusUpdateFrequency for this fleet (10 s by default): the fixture waits on
# many capacity changes (a crash-looping plugin's GPUs going to 0, an XID's 7 of 8)
STATUS_PERIOD = 2
# kubelet_down: the real node lifecycle controller marks the Node Unknown after its grace period
# (50 s) and taints it; leave room for a loaded machine
SETTLE_TIMEOUT = 150.0


def _pod(entry: Status) -> Status:
    return entry.get("plugin_pod") or {}


def _crash_looping(entry: Status) -> bool:
    """The plugin container exits (failOnInitError: true) and the kubelet backs off; nothing is
    registered (a plugin that never registered leaves no nvidia.com/gpu on the Node at all)."""
    return _pod(entry).get("waiting_reason") == "CrashLoopBackOff" and not _registered(entry) \
        and str(entry.get("allocatable") or "0") == "0"


def _advertises(value: int) -> Callable[[Status], bool]:
    return lambda entry: str(entry.get("allocatable")) == str(value)


def _registered(entry: Status) -> bool:
    return bool((((entry.get("kubelet") or {}).get("resources") or {}).get(GPU) or {}).get("registered"))


def _running_unregistered(entry: Status) -> bool:
    """registration_failed: the plugin retries every 30 s and stays Running; the kubelet holds no
    stream of it (allocatable 0; the capacity of its first registration stays for the kubelet's
    5 min grace)."""
    return bool(_pod(entry).get("running")) and not _registered(entry) and str(entry.get("allocatable")) == "0"


def _socket_path_is_a_file(entry: Status) -> bool:
    """stale_socket_file: a regular file in the socket's place, while the kubelet's open
    ListAndWatch stream keeps the Node advertising all 8."""
    path = os.path.join(entry["root"], PLUGIN_SOCKET)
    return os.path.isfile(path) and _registered(entry) and str(entry.get("allocatable")) == "8"


@dataclass
class Row:
    """One fault on one node and what the runs must make of it."""

    id: str
    fault: Optional[str]  # the lab fault (None: a healthy control node)
    args: Dict[str, str] = field(default_factory=dict)
    verdict: str = "failed"  # of the first remediate run: ok | fixed | failed
    step: Optional[str] = None  # first failing step (fixed or failed)
    code: Optional[str] = None  # finding code in the failing step's evidence (verify, and failed rows)
    evidence: Optional[str] = None  # text of that finding's message (verify)
    actions: Tuple[str, ...] = ()  # safe actions the first run did, in order
    next_action: Optional[str] = None  # text the next action must contain (failed rows)
    # files under the node root the fix rewrites (node-side actions only)
    files: Tuple[str, ...] = ()
    before_deploy: bool = False  # inject before the plugin DaemonSet exists: its pod starts on the fault
    extra: Tuple[Tuple[str, Dict[str, str]], ...] = ()  # faults injected right after this one
    host_vars: Dict[str, Any] = field(default_factory=dict)
    settled: Optional[Callable[[Status], bool]] = None  # the fault is visible in the lab status
    gpu_model: Optional[str] = None  # rewrite the node's NVML state for this model before deploy
    warning: Optional[str] = None  # a finding that passes its step and is reported as a warning


DISRUPTIVE = "is disruptive: rerun with gpunode_allow_disruptive=true"

ROWS: List[Row] = [
    Row("healthy", None, verdict="ok"),
    # A node that came up without the kernel module: the plugin's nvmlInit fails, it exits
    # (failOnInitError) and crash-loops. load_kernel_modules fixes the driver; the plan then reads
    # the node again, finds the pod in CrashLoopBackOff and deletes it (safe) rather than wait up
    # to the kubelet's 5 min back-off: right for an operator, the node serves its GPUs at once.
    Row("driver_not_loaded", "driver_not_loaded", verdict="fixed", step="driver", code="driver_not_loaded",
        evidence="the nvidia kernel module is not loaded (/proc/driver/nvidia/version is absent)",
        actions=("load_kernel_modules", "restart_plugin"), files=("nvml.state", "proc/driver/nvidia/version"),
        before_deploy=True, settled=_crash_looping),
    # a driver upgraded under a running node: the running plugin keeps the library it loaded and
    # goes on serving (only a new process meets the mismatch), as on a real node
    Row("driver_library_mismatch", "driver_library_mismatch", step="driver", code="driver_library_mismatch",
        evidence="kernel module 535.154.05", next_action="reboot " + DISRUPTIVE),
    Row("driver_library_mismatch+gpu_in_use", "driver_library_mismatch", step="driver", code="driver_library_mismatch",
        evidence="typically a driver upgrade without a reboot", next_action="reboot " + DISRUPTIVE,
        extra=(("gpu_in_use", {"pod": "train-0", "namespace": "ml", "count": "2"}),)),
    # a node without the driver's user-space library: the plugin crash-loops from its first start
    Row("library_missing", "library_missing", step="driver", code="nvml_library_missing",
        evidence="libnvidia-ml.so.1 could not be loaded", next_action="Install the NVIDIA driver",
        before_deploy=True, settled=_crash_looping),
    Row("gpu_lost", "gpu_lost", step="driver", code="gpu_lost", evidence="GPU_IS_LOST", next_action="reboot",
        before_deploy=True, settled=_crash_looping),
    # one GPU did not come up: NVML and NVIDIA's plugin see 7, the Node advertises 7
    Row("gpu_count_low", "gpu_count_low", step="driver", code="gpu_count_mismatch", evidence="NVML sees 7 GPU(s), expected 8",
        next_action="reseat or replace", before_deploy=True, settled=_advertises(7)),
    Row("ecc_uncorrectable", "ecc_uncorrectable", step="driver", code="ecc_uncorrectable",
        evidence="uncorrectable ECC error", next_action="reset"),
    Row("retired_pages_pending (V100)", "retired_pages_pending", verdict="ok", gpu_model="V100",
        warning="retired_pages_pending"),
    Row("remapped_rows_pending", "remapped_rows_pending", verdict="ok", warning="remapped_rows_pending"),
    Row("remapped_rows_failure", "remapped_rows_failure", step="driver", code="remapped_rows_failure",
        evidence="failed to remap a memory row", next_action="replaced"),
    # NVIDIA's health check reads the XID event: "XidCriticalError: Xid=79 ...; marking device as
    # unhealthy", ListAndWatch reports the GPU Unhealthy, allocatable 7 of 8
    Row("critical_xid", "critical_xid", step="socket", code="plugin_devices_unhealthy", evidence="1 device(s) Unhealthy",
        next_action="XID", settled=_advertises(7)),
    Row("persistence_off", "persistence_off", verdict="ok", warning="persistence_mode_off"),
    Row("persistence_off (require_persistence_mode)", "persistence_off", verdict="fixed", step="driver",
        code="persistence_mode_off", evidence="has persistence mode off", actions=("start_persistenced",), files=("nvml.state",),
        host_vars={"gpunode_require_persistence_mode": True}),
    # the check's user may not open /dev/nvidia*; the plugin (root in its container) keeps serving
    Row("no_permission", "no_permission", step="driver", code="no_permission", evidence="no permission on /dev/nvidiactl",
        next_action="/dev/nvidia"),
    Row("mig_pending", "mig_pending", verdict="ok", warning="mig_mode_pending"),
    # containerd lost its nvidia handler; the running plugin pod keeps its sandbox (and its GPUs)
    Row("runtime_missing_nvidia", "runtime_missing_nvidia", step="runtime", code="nvidia_runtime_missing",
        evidence="containerd has no 'nvidia' runtime handler", next_action="configure_runtime " + DISRUPTIVE),
    # the DaemonSet controller deletes the node's plugin pod; its stream ends (allocatable 0). The
    # collection's DaemonSet selects GPU nodes by required node affinity, not a nodeSelector
    Row("label_missing", "label_missing", verdict="fixed", step="scheduling", code="not_targeted_affinity",
        evidence="nvidia.com/gpu.present In [true] (label absent)", actions=("add_node_label",),
        settled=_advertises(0)),
    Row("taint_untolerated", "taint_untolerated", step="scheduling", code="not_targeted_taint",
        evidence="gpu-maintenance=true:NoSchedule is not tolerated", next_action="taints are never removed"),
    Row("plugin_crash nvml_init_failed", "plugin_crash", {"signature": "nvml_init_failed"}, verdict="fixed",
        step="plugin_pod", code="plugin_nvml_init_failed", evidence="Failed to initialize NVML: Unknown Error.",
        actions=("restart_plugin",), settled=_crash_looping),
    Row("plugin_crash incompatible_strategy", "plugin_crash", {"signature": "incompatible_strategy"},
        verdict="fixed", step="plugin_pod", code="plugin_incompatible_platform",
        evidence="Incompatible strategy detected auto", actions=("restart_plugin",), settled=_crash_looping),
    # the kubelet refuses Register: the plugin logs it and "Retrying in 30s...", the pod stays Running
    Row("plugin_crash registration_failed", "plugin_crash", {"signature": "registration_failed"}, verdict="fixed",
        step="plugin_pod", code="plugin_registration_failed",
        evidence="Could not register device plugin: rpc error: code = Unknown desc = failed to dial device plugin: "
                 "context deadline exceeded", actions=("restart_plugin",), settled=_running_unregistered),
    # SIGSTOP: the socket accepts, nothing answers; the kubelet's stream stays open (8 advertised)
    Row("plugin_hang", "plugin_hang", verdict="fixed", step="socket", code="plugin_not_answering",
        evidence="did not answer GetDevicePluginOptions within 5s", actions=("restart_plugin",),
        settled=lambda e: bool(_pod(e).get("stopped"))),
    Row("plugin_stale socket=removed", "plugin_stale", {"socket": "removed"}, verdict="fixed", step="socket",
        code="plugin_socket_missing", evidence="does not exist", actions=("restart_plugin",),
        extra=(("kubelet_restart", {}),), settled=_advertises(0)),
    Row("plugin_stale socket=kept", "plugin_stale", {"socket": "kept"}, verdict="fixed", step="registration",
        code="registration_stale", evidence="the kubelet restarted and the plugin has not registered",
        actions=("restart_plugin",), extra=(("kubelet_restart", {}),), settled=_advertises(0)),
    Row("plugin_no_devices", "plugin_no_devices", verdict="fixed", step="plugin_pod", code="plugin_no_devices",
        evidence="No devices found. Waiting indefinitely.", actions=("restart_plugin",), settled=_advertises(0)),
    # the plugin sees kubelet.sock re-created (inotify) and registers again by itself
    Row("kubelet_restart after=register", "kubelet_restart", {"after": "register"}, verdict="ok",
        before_deploy=True, settled=lambda e: "kubelet_restart" not in (e.get("faults") or {}) and _registered(e)
        and str(e.get("allocatable")) == "8"),
    Row("kubelet_down", "kubelet_down", step="node", code="node_not_ready", evidence="Ready is Unknown (NodeStatusUnknown)",
        next_action="restart_kubelet " + DISRUPTIVE, settled=lambda e: not e.get("ready")),
    Row("stale_socket_file", "stale_socket_file", verdict="fixed", step="socket", code="plugin_socket_not_socket",
        evidence="is a regular file, not a socket", actions=("restart_plugin",), settled=_socket_path_is_a_file),
]
ROW_IDS = [row.id for row in ROWS]
NOT_OK = [row.id for row in ROWS if row.verdict != "ok"]
# the kubelet's back-off may restart driver_not_loaded's crash-looping container itself between
# load_kernel_modules and the plan's second read of the node, which comes after the whole batch's
# first actions (the plugin restarts on the other nodes wait for their GPUs: 10-20 s here, in a
# back-off of 80-300 s by then; seen in 1 of 4 full runs): the container then runs with the same
# pod, and the first action is the only one needed
BACK_OFF_RESTART = {"driver_not_loaded": ("load_kernel_modules",)}


class Matrix:
    """The fleet and what each run left behind."""

    def __init__(self, fleet: FaultFleet) -> None:
        self.fleet = fleet
        self.node = {row.id: name for row, name in zip(ROWS, fleet.node_names)}
        self.row = {row.id: row for row in ROWS}
        self.runs: Dict[str, Any] = {}
        self.snapshots: Dict[str, Dict[str, str]] = {}
        self.pods: Dict[str, Dict[str, Optional[str]]] = {}
        self.counters: Dict[str, Dict[str, Any]] = {}
        self.status: Dict[str, Status] = {}

    def observe(self, tag: str) -> None:
        self.snapshots[tag] = self.fleet.snapshot()
        self.pods[tag] = self.fleet.plugin_pods()
        self.status[tag] = self.fleet.nodes_status()

    def run(self, tag: str, playbook: str, *extra: str, limit: Optional[str] = None) -> Any:
        self.fleet.reset_counters()
        result = self.fleet.run(playbook, *extra, limit=limit, tag="matrix-" + tag)
        self.runs[tag] = result
        self.counters[tag] = self.fleet.counters()
        print("fault matrix: run %s %.1f s" % (tag, result.seconds))
        self.observe(tag)
        return result

    def writes(self, tag: str) -> Dict[str, Dict[str, int]]:
        return self.counters[tag]["write_requests"]

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

    def actions(self, row: Row) -> Tuple[str, ...]:
        """The actions the first run must have done on the row's node."""
        node = self.node[row.id]
        if row.id in BACK_OFF_RESTART and self.pods["broken"][node] == self.pods["first"][node]:
            return BACK_OFF_RESTART[row.id]
        return row.actions


@pytest.fixture(scope="module")
def fleet() -> Iterator[FaultFleet]:
    fleet = FaultFleet(nodes=len(ROWS), node_status_update_frequency=STATUS_PERIOD).up()
    try:
        yield fleet
    finally:
        fleet.down()


@pytest.fixture(scope="module")
def matrix(fleet: FaultFleet) -> Matrix:
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
    # the DaemonSet, deployed by a bring-up of one node (the plan on every node is the test's job);
    # its rollout wait gives up on the crash-looping nodes after gpunode_rollout_timeout (10 s)
    first = fleet.node_names[0]
    deploy = fleet.run("gpu_node_bringup.yml", limit="%s,localhost" % first)
    assert deploy.rc == 0, deploy.output[-4000:]
    fleet.wait_advertising([m.node[row.id] for row in ROWS if not (row.before_deploy and row.settled)])
    for row in ROWS:
        if row.fault and not row.before_deploy:
            fleet.break_(m.node[row.id], row.fault, **row.args)
        for fault, args in row.extra:
            fleet.break_(m.node[row.id], fault, **args)
    fleet.wait_settled({m.node[row.id]: row.settled for row in ROWS if row.settled}, timeout=SETTLE_TIMEOUT)
    m.observe("broken")
    m.run("verify", "gpu_node_verify.yml")
    m.run("first", "gpu_node_remediate.yml")
    m.run("rerun", "gpu_node_remediate.yml")
    return m


def _finding(report: Dict[str, Any], step: str, code: Optional[str]) -> Dict[str, Any]:
    failed = next(s for s in report["steps"] if s["step"] == step)
    found = [e for e in failed["evidence"] if e.get("code") == code]
    assert found, failed
    return found[0]


# ---- run 0: verify, read-only ------------------------------------------------------------------
@pytest.mark.parametrize("row_id", ROW_IDS)
def test_verify_reports_the_first_failing_step(matrix: Matrix, row_id: str) -> None:
    row = matrix.row[row_id]
    report = matrix.runs["verify"].node_report(matrix.node[row_id])
    context = "%s: %s" % (row.id, report)
    assert report["actions"] == [], context
    if row.verdict == "ok":
        assert report["verdict"] == "ok" and report["failed_step"] is None, context
        return
    assert report["verdict"] == "failed" and report["failed_step"] == row.step, context
    finding = _finding(report, row.step, row.code)
    if row.evidence:
        assert row.evidence in finding["message"], context


def test_verify_writes_nothing(matrix: Matrix) -> None:
    counters = matrix.counters["verify"]
    assert counters["writes"] == 0 and counters["dry_run_writes"] == 0, counters["write_requests"]
    assert matrix.changed_files("broken", "verify") == {}
    assert matrix.pods["broken"] == matrix.pods["verify"]
    assert all(matrix.runs["verify"].changed(h) == 0 for h in matrix.runs["verify"].recap)
    assert matrix.runs["verify"].rc != 0 and matrix.runs["verify"].report["counts"] == {
        "ok": sum(1 for row in ROWS if row.verdict == "ok"), "fixed": 0, "failed": len(NOT_OK), "skipped": 0}


# ---- run 1: remediate, safe fixes ---------------------------------------------------------------
@pytest.mark.parametrize("row_id", ROW_IDS)
def test_first_run(matrix: Matrix, row_id: str) -> None:
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
        assert [(a["action"], a["done"]) for a in report["actions"]] == [(a, True) for a in matrix.actions(row)], context
        assert report["actions"][0]["step"] == row.step, context
        assert all(v in ("ok", "fixed", "skipped") for v in steps.values()), context
        assert run.changed(node) > 0, context
        # the lab's record: the fault is gone (node-side actions clear it, a deleted pod takes
        # its pod-scoped fault with it)
        assert matrix.status["first"][node]["faults"] == {}, matrix.status["first"][node]
        return
    assert report["failed_step"] == row.step, context
    assert steps[row.step] == "failed", context
    assert report["actions"] == [] and run.changed(node) == 0, context
    _finding(report, row.step, row.code)
    assert row.next_action in (report["next_action"] or ""), context


def test_back_off_restart_branch_is_what_happened(matrix: Matrix) -> None:
    """driver_not_loaded: either the plan replaced the crash-looping pod, or (rarely) the kubelet's
    back-off restarted its container after the fix and it runs with the same pod."""
    node = matrix.node["driver_not_loaded"]
    before, after = matrix.status["broken"][node], matrix.status["first"][node]
    assert _pod(after)["running"] and str(after["allocatable"]) == "8", after
    if matrix.pods["broken"][node] == matrix.pods["first"][node]:
        assert _pod(after)["restart_count"] > _pod(before)["restart_count"], (before, after)


def test_first_run_touches_only_what_the_fixes_need(matrix: Matrix) -> None:
    fleet, run = matrix.fleet, matrix.runs["first"]
    fixed = [row for row in ROWS if row.verdict == "fixed"]
    # node roots: only the files of node-side actions, on their nodes
    expected_files = {matrix.node[row.id]: sorted(row.files) for row in fixed if row.files}
    changed = matrix.changed_files("broken", "first")
    stale_file = matrix.node["stale_socket_file"]
    # the regular file squatting on the plugin socket's path: the new plugin removes it and binds
    # its socket there (sockets are not in the snapshot)
    assert changed.pop(stale_file, None) == [PLUGIN_SOCKET]
    assert changed == expected_files
    # plugin pods: recreated exactly where a restart (or the label) was the fix
    before, after = matrix.pods["broken"], matrix.pods["first"]
    recreated = sorted(n for n in fleet.node_names if before[n] != after[n])
    restarts = [row for row in fixed if "restart_plugin" in matrix.actions(row)]
    labels = [row for row in fixed if "add_node_label" in matrix.actions(row)]
    assert recreated == sorted(matrix.node[row.id] for row in restarts + labels)
    # API writes (audit log): a Lease per node acted on, one pod delete per plugin restart, one
    # node patch per label
    assert matrix.writes("first") == {"create": {"leases": len(fixed)},
                                      "delete": {"leases": len(fixed), "pods": len(restarts)},
                                      "patch": {"nodes": len(labels)}}, matrix.writes("first")
    assert matrix.counters["first"]["dry_run_writes"] == 0
    assert fleet.leases() == []
    # the fixed nodes advertise their 8 GPUs again
    status = matrix.status["first"]
    assert {row.id: status[matrix.node[row.id]]["allocatable"] for row in fixed} == {row.id: "8" for row in fixed}
    # the taint is reported, never removed; the nodes the run could not fix keep their faults
    assert status[matrix.node["taint_untolerated"]]["taints"] == ["gpu-maintenance=true:NoSchedule"]
    for row in ROWS:
        if row.verdict == "failed" and row.fault not in ("taint_untolerated",):
            assert row.fault in status[matrix.node[row.id]]["faults"], (row.id, status[matrix.node[row.id]])
    assert run.rc != 0 and run.report["counts"] == {
        "ok": sum(1 for row in ROWS if row.verdict == "ok"), "fixed": len(fixed),
        "failed": sum(1 for row in ROWS if row.verdict == "failed"), "skipped": 0}


# ---- run 2: the rerun -------------------------------------------------------------------------
@pytest.mark.parametrize("row_id", ROW_IDS)
def test_rerun_changes_nothing(matrix: Matrix, row_id: str) -> None:
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


def test_rerun_writes_nothing(matrix: Matrix) -> None:
    assert matrix.writes("rerun") == {}
    assert matrix.counters["rerun"]["dry_run_writes"] == 0
    assert matrix.changed_files("first", "rerun") == {}
    assert matrix.pods["first"] == matrix.pods["rerun"]
    assert all(matrix.runs["rerun"].changed(h) == 0 for h in matrix.runs["rerun"].recap)


@pytest.mark.parametrize("row_id", [row.id for row in ROWS if row.warning])
def test_warnings_pass_the_step_and_are_reported(matrix: Matrix, row_id: str) -> None:
    row = matrix.row[row_id]
    for tag in ("verify", "first", "rerun"):
        report = matrix.runs[tag].node_report(matrix.node[row_id])
        assert report["verdict"] == "ok", report
        assert row.warning in {w.get("code") for w in report.get("warnings") or []}, report
        assert "%s: warning" % matrix.node[row_id] in matrix.runs[tag].output
    healthy = matrix.runs["first"].node_report(matrix.node["healthy"])
    assert healthy.get("warnings") == []


# ---- runs 3 and 4: disruptive remediation, allowed ------------------------------------------------
DISRUPTIVE_ROWS = {
    # row id: (verdict, step, action done or text of the next action, files the action rewrites)
    "driver_library_mismatch": ("fixed", "driver", "reboot", ("nvml.state", "proc/driver/nvidia/version")),
    "runtime_missing_nvidia": ("fixed", "runtime", "configure_runtime", ("etc/containerd/config.toml",)),
    "driver_library_mismatch+gpu_in_use": ("failed", "driver", "GPUs are in use by ml/train-0", ()),
    "kubelet_down": ("fixed", "node", "restart_kubelet", ()),
}


@pytest.fixture(scope="module")
def disruptive(matrix: Matrix) -> Matrix:
    limit = ",".join(matrix.node[r] for r in DISRUPTIVE_ROWS)
    matrix.run("disruptive", "gpu_node_remediate.yml", "-e", "gpunode_allow_disruptive=true", limit=limit)
    matrix.run("disruptive-rerun", "gpu_node_remediate.yml", "-e", "gpunode_allow_disruptive=true", limit=limit)
    return matrix


@pytest.mark.parametrize("row_id", list(DISRUPTIVE_ROWS))
def test_disruptive_allowed(disruptive: Matrix, row_id: str) -> None:
    verdict, step, what, _files = DISRUPTIVE_ROWS[row_id]
    node = disruptive.node[row_id]
    run = disruptive.runs["disruptive"]
    report = run.node_report(node)
    assert report["verdict"] == verdict, report
    if verdict == "fixed":
        # the one disruptive action, nothing after it: the running plugin re-registers by itself
        # after the kubelet's restart (a reboot or restart_kubelet here), and the action waits for
        # that before the plan looks again (the restarted kubelet reports 0 GPUs until then)
        assert run.steps(node)[step] == "fixed", report
        assert [(a["action"], a["done"]) for a in report["actions"]] == [(what, True)], report
        assert run.changed(node) > 0
        assert disruptive.status["disruptive"][node]["faults"] == {}, disruptive.status["disruptive"][node]
    else:
        assert report["failed_step"] == step and what in report["next_action"], report
        assert report["actions"] == [] and run.changed(node) == 0, report


def test_kubelet_back_the_controller_lifts_the_taints(disruptive: Matrix) -> None:
    """After restart_kubelet the Node is Ready; the node lifecycle controller removes its
    unreachable taints by itself."""
    node = disruptive.node["kubelet_down"]
    disruptive.fleet.wait_for("%s Ready and untainted" % node,
                              lambda status: status[node]["ready"] and status[node]["taints"] == [], timeout=60)


def test_disruptive_rerun_changes_nothing(disruptive: Matrix) -> None:
    run = disruptive.runs["disruptive-rerun"]
    assert all(run.changed(h) == 0 for h in run.recap), run.recap
    assert disruptive.writes("disruptive-rerun") == {}
    assert disruptive.changed_files("disruptive", "disruptive-rerun") == {}
    assert disruptive.pods["disruptive"] == disruptive.pods["disruptive-rerun"]


def test_disruptive_touches_only_its_nodes(disruptive: Matrix) -> None:
    changed = disruptive.changed_files("rerun", "disruptive")
    assert changed == {disruptive.node[r]: sorted(files) for r, (_v, _s, _w, files) in DISRUPTIVE_ROWS.items()
                       if files}
    # no plugin pod replaced: the reboot and the kubelet restart leave the pods to the kubelet
    assert disruptive.pods["rerun"] == disruptive.pods["disruptive"]
    # the disruptive actions run on the nodes (lab node-action): in the API only their Leases
    # (the busy node is refused before a Lease is taken)
    acted = sum(1 for verdict, _s, _w, _f in DISRUPTIVE_ROWS.values() if verdict == "fixed")
    assert disruptive.writes("disruptive") == {"create": {"leases": acted}, "delete": {"leases": acted}}
    assert disruptive.fleet.leases() == []
