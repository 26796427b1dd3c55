"""Cluster-wide and API faults on a small lab fleet (3 nodes: the real control plane, NVIDIA's real
plugin).

- daemonset_missing (cluster-wide): the lab deletes the plugin DaemonSet through the API, the real
  garbage collector removes its pods; remediate re-applies the DaemonSet, the rerun changes nothing.
- The fault proxy (lab/faultproxy.py, ``lab up --fault-proxy``) between the collection and
  kube-apiserver answers chosen requests itself (429 with Retry-After, 500, a dropped connection)
  or delays them, by verb and resource: on the reads of the verify playbook (list nodes, list
  pods, get daemonsets) and on the writes of the remediate playbook (delete pods, patch nodes,
  create/delete leases; and the watches of the restart's wait). A few faults are absorbed by the
  client's retries (api_retries: 4, so 5 attempts) and the run reports as without them; a fault
  that outlasts the retries fails the run naming the call and "after 5 attempts", and leaves
  nothing half done.

Two counts, two places: what the collection sent on the wire is the proxy's (``wire_counts()
["seen"]``, by "verb resource"); what reached the cluster is the API server's audit log
(``write_requests()``). A request the proxy answered itself never reached the API server: a
faulted write is on the wire, not in the audit log.

Scenarios run once each (memoized), in the order of the tests that need them.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from faultlab import FaultFleet

CONTROL, CRASH, LABEL = "gpu-node-01", "gpu-node-02", "gpu-node-03"
ATTEMPTS = 5  # api_retries default 4, plus the first attempt
# the kubelet's nodeStatusUpdateFrequency for this fleet (10 s by default): every write scenario
# re-breaks the targets and waits for the Node to show it (the label's plugin pod gone: 0 GPUs)
STATUS_PERIOD = 2


def fault(verb: str, resource: str, kind: str, count: int = 1, delay_s: float = 1.0) -> Dict[str, Any]:
    return {"verb": verb, "resource": resource, "kind": kind, "count": count, "delay_s": delay_s}


class Outcome:
    """One playbook run under API faults and what the wire, the API and the lab looked like after it."""

    def __init__(self, fleet: FaultFleet, run: Any, before: Dict[str, Any]) -> None:
        self.run = run
        self.counters = fleet.counters()
        self.writes = fleet.write_requests()
        self.wire: Dict[str, int] = fleet.wire_counts()["seen"]
        self.answered: Dict[str, int] = fleet.wire_counts()["answered"]
        self.faults_left = fleet.api_faults()
        fleet.clear_api_faults()
        self.leases = fleet.leases()
        self.status = fleet.nodes_status()
        self.pods_before = before["pods"]
        self.pods = fleet.plugin_pods()

    def on_wire(self, verb: str, resource: str) -> int:
        """Requests the collection sent (the proxy saw them, whether it answered or forwarded)."""
        return int(self.wire.get("%s %s" % (verb, resource), 0))

    def fired(self) -> List[Tuple[str, str, str, int]]:
        return [(f["verb"], f["resource"], f["kind"], f["fired"]) for f in self.faults_left]

    def report(self, node: str) -> Dict[str, Any]:
        return self.run.node_report(node)


class Scenarios:
    def __init__(self, fleet: FaultFleet) -> None:
        self.fleet = fleet
        self.done: Dict[str, Outcome] = {}

    def _break_targets(self, sticky_crash: bool = False) -> None:
        """gpu-node-02: the plugin crash-loops on "Failed to initialize NVML: Unknown Error." (fix:
        delete the pod; with ``sticky_crash`` its replacement crashes too); gpu-node-03: GPU label
        missing (the DaemonSet controller deletes its plugin pod; fix: label the node)."""
        status = self.fleet.nodes_status()
        if sticky_crash:
            self.fleet.break_(CRASH, "plugin_crash", signature="nvml_init_failed", sticky="true")
        elif "plugin_crash" not in (status[CRASH].get("faults") or {}):
            self.fleet.break_(CRASH, "plugin_crash", signature="nvml_init_failed")
        if status[LABEL].get("gpu_label") is not None:
            self.fleet.break_(LABEL, "label_missing")
        self.fleet.wait_for("faults visible", lambda s: (s[CRASH].get("plugin_pod") or {}).get("running") is False
                            and not s[LABEL].get("plugin_pod") and s[LABEL].get("allocatable") == "0", timeout=60)

    def get(self, name: str) -> Outcome:
        if name not in self.done:
            playbook, faults, targets = SCENARIOS[name]
            if name == "daemonset_missing":
                self._drop_daemonset()
            # the failed-wait scenario needs the wait to watch: a healthy replacement that is Ready
            # and advertised at the wait's first LISTs would never watch
            sticky = name == "watch pods: 500 until cleared"
            if targets:
                self._break_targets(sticky_crash=sticky)
            try:
                self.done[name] = self.play(name, playbook, faults)
            finally:
                if sticky:
                    self.fleet.clear_api_faults()
                    self.fleet.fix(CRASH, "plugin_crash")
        return self.done[name]

    def _drop_daemonset(self) -> None:
        self.fleet.control("break", node="cluster", fault="daemonset_missing", args={})
        # the garbage collector deletes the pods; the kubelets end their streams (0 allocatable)
        self.fleet.wait_for("plugin pods gone", lambda status: all(not e.get("plugin_pod") and e.get("allocatable") == "0"
                                                                   for e in status.values()), timeout=60)
        assert self.fleet.status()["daemonsets"] == []

    def play(self, name: str, playbook: str, faults: List[Dict[str, Any]]) -> Outcome:
        before = {"pods": self.fleet.plugin_pods()}
        self.fleet.clear_api_faults()
        self.fleet.reset_counters()
        self.fleet.reset_wire_counts()
        if faults:
            self.fleet.add_api_faults(*faults)
        run = self.fleet.run(playbook, tag="api-" + name)
        print("api faults: %s (%s) %.1f s" % (name, playbook, run.seconds))
        return Outcome(self.fleet, run, before)


VERIFY, REMEDIATE = "gpu_node_verify.yml", "gpu_node_remediate.yml"
# name: (playbook, API faults armed for the run, break gpu-node-02 and gpu-node-03 first)
SCENARIOS: Dict[str, Tuple[str, List[Dict[str, Any]], bool]] = {
    "daemonset_missing": (REMEDIATE, [], False),
    # the rerun, with a few failures on each read of the plan: absorbed, nothing to do
    "daemonset_missing rerun, few read faults": (REMEDIATE, [
        fault("get", "daemonsets", "500", 2), fault("list", "nodes", "429", 2), fault("list", "pods", "drop", 2)],
        False),
    # the verify playbook, a few failures on each read: absorbed (a slow answer too)
    "verify, few read faults": (VERIFY, [
        fault("list", "nodes", "500", 2), fault("list", "nodes", "slow", 1, delay_s=2.0),
        fault("list", "pods", "429", 2), fault("get", "daemonsets", "drop", 2)], False),
    # reads that never succeed
    "list pods: 429 until cleared": (VERIFY, [fault("list", "pods", "429", 0)], False),
    "get daemonsets: dropped until cleared": (VERIFY, [fault("get", "daemonsets", "drop", 0)], False),
    # writes of the remediate playbook
    "writes, few faults": (REMEDIATE, [
        fault("delete", "pods", "500", 2), fault("patch", "nodes", "429", 1), fault("create", "leases", "drop", 1),
        fault("delete", "leases", "500", 1)], True),
    "delete pods and patch nodes: 500 until cleared": (REMEDIATE, [
        fault("delete", "pods", "500", 0), fault("patch", "nodes", "500", 0)], True),
    "create leases: 500 until cleared": (REMEDIATE, [fault("create", "leases", "500", 0)], True),
    # the restart's wait watches the pods until a replacement is Ready, then the Node until it
    # advertises; the replacement crash-loops (see Scenarios.get), so whichever it watches fails
    "watch pods: 500 until cleared": (REMEDIATE, [fault("watch", "pods", "500", 0), fault("watch", "nodes", "500", 0)],
                                      True),
}


@pytest.fixture(scope="module")
def scenarios() -> Iterator[Scenarios]:
    fleet = FaultFleet(nodes=3, fault_proxy=True, node_status_update_frequency=STATUS_PERIOD).up()
    try:
        # the DaemonSet, by a bring-up whose plan runs on one node only
        deploy = fleet.run("gpu_node_bringup.yml", limit=CONTROL + ",localhost")
        assert deploy.rc == 0, deploy.output[-4000:]
        fleet.wait_advertising(fleet.node_names)
        yield Scenarios(fleet)
    finally:
        fleet.down()


# ---- daemonset_missing ----------------------------------------------------------------------------
def test_daemonset_missing_is_reapplied(scenarios: Scenarios) -> None:
    out = scenarios.get("daemonset_missing")
    assert out.run.rc == 0, out.run.output[-4000:]
    for node in (CONTROL, CRASH, LABEL):
        report = out.report(node)
        assert report["verdict"] == "fixed", report
        assert out.run.steps(node)["daemonset"] == "fixed"
        assert [a["action"] for a in report["actions"]] == ["apply_daemonset"], report
    # the DaemonSet controller made a pod per node, NVIDIA's plugin registered on each
    assert all(e["allocatable"] == "8" for e in out.status.values()), out.status
    assert all(out.pods[n] and out.pods[n] != out.pods_before[n] for n in out.pods), (out.pods_before, out.pods)
    assert out.leases == []
    # the fix: the DaemonSet applied again (its ConfigMap is still there: not rewritten), a Lease per
    # node, nothing else. Every node of the batch runs the action; the module reads before it applies,
    # so the nodes that read after the first apply write nothing: 1 to 3 applies, by timing.
    writes = dict(out.writes)
    patches = writes.pop("patch")
    assert writes == {"create": {"leases": 3}, "delete": {"leases": 3}}, out.writes
    assert list(patches) == ["daemonsets"] and 1 <= patches["daemonsets"] <= 3, out.writes
    assert out.answered == {}


def test_daemonset_missing_rerun_absorbs_read_faults_and_changes_nothing(scenarios: Scenarios) -> None:
    scenarios.get("daemonset_missing")
    out = scenarios.get("daemonset_missing rerun, few read faults")
    assert out.run.rc == 0, out.run.output[-4000:]
    assert out.run.report["counts"] == {"ok": 3, "fixed": 0, "failed": 0, "skipped": 0}
    assert all(out.run.changed(h) == 0 for h in out.run.recap), out.run.recap
    assert out.writes == {}
    # on the wire: each faulted read, then the one that answered
    assert (out.on_wire("get", "daemonsets"), out.on_wire("list", "nodes"), out.on_wire("list", "pods")) == (3, 3, 3)
    assert out.answered == {"get daemonsets": 2, "list nodes": 2, "list pods": 2}
    # the cluster saw the one that answered
    requests = out.counters["requests"]
    assert (requests["get"]["daemonsets"], requests["list"]["nodes"], requests["list"]["pods"]) == (1, 1, 1), requests
    assert out.fired() == [("get", "daemonsets", "500", 2), ("list", "nodes", "429", 2), ("list", "pods", "drop", 2)]


# ---- reads ---------------------------------------------------------------------------------------
def test_read_faults_within_the_retries_are_absorbed(scenarios: Scenarios) -> None:
    out = scenarios.get("verify, few read faults")
    assert out.run.rc == 0, out.run.output[-4000:]
    assert out.run.report["counts"] == {"ok": 3, "fixed": 0, "failed": 0, "skipped": 0}
    # each faulted read, then the one that answered (the slow one is forwarded after 2 s)
    assert (out.on_wire("list", "nodes"), out.on_wire("list", "pods"), out.on_wire("get", "daemonsets")) == (3, 3, 3)
    assert out.answered == {"list nodes": 2, "list pods": 2, "get daemonsets": 2}
    assert out.counters["writes"] == 0 and out.counters["dry_run_writes"] == 0
    assert out.fired() == [("list", "nodes", "500", 2), ("list", "nodes", "slow", 1), ("list", "pods", "429", 2),
                           ("get", "daemonsets", "drop", 2)]


READ_OUTAGES = {
    # scenario: (the call named in the error, how it failed)
    "list pods: 429 until cleared": ("list plugin pods in kube-system (name=nvidia-device-plugin-ds)",
                                     "the API answered HTTP 429 after %d attempts" % ATTEMPTS),
    "get daemonsets: dropped until cleared": ("get DaemonSet kube-system/nvidia-device-plugin-daemonset",
                                              "cannot reach the Kubernetes API at"),
}


@pytest.mark.parametrize("name", list(READ_OUTAGES))
def test_read_faults_beyond_the_retries_fail_clearly(scenarios: Scenarios, name: str) -> None:
    call, how = READ_OUTAGES[name]
    out = scenarios.get(name)
    assert out.run.rc != 0
    assert out.counters["writes"] == 0
    # the report is still written: the node step fails with the API error, naming the call
    report = out.report(CONTROL)
    assert report["verdict"] == "failed" and report["failed_step"] == "node", report
    node_step = next(s for s in report["steps"] if s["step"] == "node")
    messages = [e["message"] for e in node_step["evidence"] if e.get("code") == "api_unreachable"]
    assert messages and messages[0].startswith(call + ": ") and how in messages[0], node_step
    assert "after %d attempts" % ATTEMPTS in messages[0]


@pytest.mark.parametrize("name", list(READ_OUTAGES))
def test_an_api_outage_is_reported_on_every_node_of_the_batch(scenarios: Scenarios, name: str) -> None:
    out = scenarios.get(name)
    for node in (CONTROL, CRASH, LABEL):
        report = out.report(node)
        assert report["failed_step"] == "node", report
        assert out.run.recap[node]["failed"] == 1, out.run.recap


@pytest.mark.parametrize("name,verb,resource", [
    ("list pods: 429 until cleared", "list", "pods"),
    ("get daemonsets: dropped until cleared", "get", "daemonsets"),
    ("delete pods and patch nodes: 500 until cleared", "delete", "pods"),
    ("delete pods and patch nodes: 500 until cleared", "patch", "nodes"),
])
def test_api_retries_bound_the_requests_on_the_wire(scenarios: Scenarios, name: str, verb: str, resource: str) -> None:
    """api_retries (4) bounds what the collection sends: urllib3's own retries (429 with
    Retry-After, dropped connections on idempotent requests) are off in K8sClient. The proxy
    answered every one of them: none reached the API server."""
    out = scenarios.get(name)
    key = "%s %s" % (verb, resource)
    assert out.on_wire(verb, resource) == ATTEMPTS, out.wire
    assert out.answered[key] == ATTEMPTS, out.answered
    assert out.counters["requests"].get(verb, {}).get(resource, 0) == 0, out.counters["requests"]


# ---- writes --------------------------------------------------------------------------------------
def test_write_faults_within_the_retries_are_absorbed(scenarios: Scenarios) -> None:
    out = scenarios.get("writes, few faults")
    assert out.run.rc == 0, out.run.output[-4000:]
    assert out.report(CONTROL)["verdict"] == "ok" and out.run.changed(CONTROL) == 0
    assert [(a["action"], a["done"]) for a in out.report(CRASH)["actions"]] == [("restart_plugin", True)]
    assert [(a["action"], a["done"]) for a in out.report(LABEL)["actions"]] == [("add_node_label", True)]
    assert out.report(CRASH)["verdict"] == out.report(LABEL)["verdict"] == "fixed"
    # on the wire: the faulted writes and the ones that went through
    assert {k: out.wire.get(k, 0) for k in ("create leases", "delete leases", "delete pods", "patch nodes")} == {
        "create leases": 3, "delete leases": 3, "delete pods": 3, "patch nodes": 2}, out.wire
    # in the cluster only those that went through: 2 Leases taken and given back, 1 pod delete,
    # 1 label patch (the dropped Lease create never reached the API server: its retry finds no Lease)
    assert out.writes == {"create": {"leases": 2}, "delete": {"leases": 2, "pods": 1}, "patch": {"nodes": 1}}, out.writes
    assert out.leases == []
    assert out.pods[CONTROL] == out.pods_before[CONTROL] and out.pods[CRASH] != out.pods_before[CRASH]
    assert out.status[LABEL]["gpu_label"] == "true" and out.status[LABEL]["allocatable"] == "8"
    assert out.status[CRASH]["allocatable"] == "8"


def test_write_faults_beyond_the_retries_fail_clearly_and_undo_nothing_half(scenarios: Scenarios) -> None:
    out = scenarios.get("delete pods and patch nodes: 500 until cleared")
    assert out.run.rc != 0
    crash, label = out.report(CRASH), out.report(LABEL)
    assert crash["verdict"] == "failed" and crash["failed_step"] == "plugin_pod", crash
    assert label["verdict"] == "failed" and label["failed_step"] == "scheduling", label
    old_pod = out.pods_before[CRASH]
    assert ("delete pod kube-system/%s: the API answered HTTP 500 after %d attempts" % (old_pod, ATTEMPTS)
            in crash["next_action"]), crash
    assert ("patch node %s (label nvidia.com/gpu.present=true): the API answered HTTP 500 after %d attempts"
            % (LABEL, ATTEMPTS) in label["next_action"]), label
    assert [(a["action"], a["done"]) for a in crash["actions"]] == [("restart_plugin", False)]
    assert [(a["action"], a["done"]) for a in label["actions"]] == [("add_node_label", False)]
    # nothing half done: the pod and the label as they were, each Lease taken and given back;
    # the proxy answered every delete and patch, so the cluster saw none
    assert out.pods == out.pods_before
    assert out.status[LABEL]["gpu_label"] is None
    assert out.writes == {"create": {"leases": 2}, "delete": {"leases": 2}}, out.writes
    assert out.leases == []
    assert out.report(CONTROL)["verdict"] == "ok" and out.run.changed(CONTROL) == 0


def test_lease_create_beyond_the_retries_changes_nothing(scenarios: Scenarios) -> None:
    out = scenarios.get("create leases: 500 until cleared")
    assert out.run.rc != 0
    for node, step in ((CRASH, "plugin_pod"), (LABEL, "scheduling")):
        report = out.report(node)
        assert report["verdict"] == "skipped" and report["failed_step"] == step, report
        assert report["next_action"].startswith(
            "could not take the node's Lease, nothing was changed: create lease kube-system/gpunode-bringup-%s: "
            "the API answered HTTP 500 after %d attempts" % (node, ATTEMPTS)), report
        assert report["actions"] == [] and out.run.changed(node) == 0
    assert out.report(CONTROL)["verdict"] == "ok"
    # 5 attempts per node on the wire, all answered by the proxy: no write reached the cluster
    assert out.on_wire("create", "leases") == out.answered["create leases"] == 2 * ATTEMPTS
    assert out.writes == {}
    assert out.leases == [] and out.pods == out.pods_before and out.status[LABEL]["gpu_label"] is None


def test_a_failed_wait_after_a_delete_is_in_the_json_report(scenarios: Scenarios) -> None:
    out = scenarios.get("watch pods: 500 until cleared")
    crash = out.report(CRASH)
    restart = [a for a in crash["actions"] if a["action"] == "restart_plugin"]
    # the pod was deleted, the wait for its (crashing) replacement failed: the action says so, and why
    assert out.pods[CRASH] != out.pods_before[CRASH]
    assert restart and restart[0]["done"] is False, crash
    # a crash-looping pod can look Ready for a moment: the wait then watches the Node instead
    assert re.search(r"^watch (device plugin pods|node %s)\b.* after %d attempts" % (CRASH, ATTEMPTS),
                     restart[0]["error"]), restart[0]["error"]
    # in the cluster: the one pod delete, the label patch, the two Leases taken and given back
    assert out.writes == {"create": {"leases": 2}, "delete": {"leases": 2, "pods": 1}, "patch": {"nodes": 1}}, out.writes
    assert out.leases == []
    # gpu-node-03's label went through (its wait usually finds the new pod Ready and the Node
    # advertising at its first LISTs; had it to watch, it would fail as gpu-node-02's did)
    assert out.status[LABEL]["gpu_label"] == "true"


def test_a_failed_wait_after_a_delete_is_in_the_table(scenarios: Scenarios) -> None:
    out = scenarios.get("watch pods: 500 until cleared")
    assert out.report(CRASH)["verdict"] != "ok"
    assert re.search(r'"%s: .*(restart|plugin pod)' % CRASH, out.run.output)
