"""gpunode.bringup.node_lease against the real coordination.k8s.io/v1 API of the lab's kube-apiserver.

One playbook (auth from ``module_defaults`` of the ``gpunode.bringup.k8s`` action group) walks a
lease through its life: check mode -> acquire -> acquire again -> check mode again; a second
holder is skipped; release in check mode (a real server-side dry run: the Lease stays), for
real, again; a lapsed lease is taken over; a bad node name fails before any request. Then racing
acquirers: two ``ansible`` processes started together, and six in-process acquirers that all read
the same lease before any of them writes; exactly one wins each race, the others get the real API
server's 409 (AlreadyExists on create, a resourceVersion Conflict on update), read again and see
the winner. Every write is counted from the API server's audit log.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / ".build", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

pytest.importorskip("kubernetes")

from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import K8sClient  # noqa: E402
from ansible_collections.gpunode.bringup.plugins.module_utils._lease import (  # noqa: E402
    LeaseRequest,
    NodeLease,
    format_time,
)
from api_tasks import BIN, PYTHON, ansible_env, run_tasks  # noqa: E402
from lab_fleet import LabFleet  # noqa: E402

NS = "kube-system"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/%s/leases" % NS
NODE_A, NODE_B, NODE_C, NODE_D = "gpu-node-01", "gpu-node-02", "gpu-node-03", "gpu-node-04"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Any]]:
    base = tmp_path_factory.mktemp("lease")
    fleet = LabFleet(nodes=4, gpus=1).up()
    try:
        env = ansible_env(base, fleet.kubeconfig, ANSIBLE_STDOUT_CALLBACK="oneline", ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
        yield {"fleet": fleet, "base": base, "env": env, "kubeconfig": fleet.kubeconfig}
    finally:
        fleet.down()


def lease_of(fleet: LabFleet, node: str) -> Optional[Dict[str, Any]]:
    return fleet.api("%s/gpunode-bringup-%s" % (LEASES, node), missing_ok=True)


def put_lease(fleet: LabFleet, node: str, holder: str, duration: int, renewed: datetime, transitions: int,
              labels: Optional[Dict[str, str]] = None) -> None:
    """A Lease as another (crashed) run left it, created through the API as the administrator."""
    existing = lease_of(fleet, node)
    if existing is not None:
        fleet.api("%s/gpunode-bringup-%s" % (LEASES, node), "DELETE")
    metadata: Dict[str, Any] = {"name": "gpunode-bringup-" + node, "namespace": NS}
    if labels:
        metadata["labels"] = labels
    fleet.api(LEASES, "POST", {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration, "acquireTime": format_time(renewed),
                 "renewTime": format_time(renewed), "leaseTransitions": transitions}})


def lease_writes(fleet: LabFleet) -> Dict[str, Dict[str, int]]:
    """Lease requests of each write verb since the last reset, real and dry run apart (audit log)."""
    counters = fleet.counters()
    real = {verb: counters["write_requests"].get(verb, {}).get("leases", 0)
            for verb in ("create", "update", "delete", "patch")}
    sent = {verb: counters["requests"].get(verb, {}).get("leases", 0) for verb in real}
    return {"real": real, "dry_run": {verb: sent[verb] - real[verb] for verb in real}}


def lease_task(name: str, check_mode: bool = False, **args: Any) -> Dict[str, Any]:
    task: Dict[str, Any] = {"name": name, "gpunode.bringup.node_lease": args, "diff": True}
    if check_mode:
        task["check_mode"] = True
    return task


LIFECYCLE = [
    lease_task("acquire (check)", True, node=NODE_A, holder_identity="run-1"),
    lease_task("acquire", node=NODE_A, holder_identity="run-1", lease_duration_seconds=300),
    lease_task("acquire again", node=NODE_A, holder_identity="run-1", lease_duration_seconds=300),
    lease_task("acquire again (check)", True, node=NODE_A, holder_identity="run-1", lease_duration_seconds=300),
    lease_task("second holder", node=NODE_A, holder_identity="run-2"),
    lease_task("release (check)", True, node=NODE_A, holder_identity="run-1", state="released"),
    lease_task("release", node=NODE_A, holder_identity="run-1", state="released"),
    lease_task("release again", node=NODE_A, holder_identity="run-1", state="released"),
    lease_task("lapsed lease", node=NODE_B, holder_identity="run-1"),
    lease_task("bad node name", node="GPU_B", holder_identity="run-1"),
]


def test_lease_lifecycle(lab: Dict[str, Any]) -> None:
    fleet = lab["fleet"]
    put_lease(fleet, NODE_B, "crashed-run", 600, datetime.now(timezone.utc) - timedelta(hours=2), 1, {"team": "gpu"})
    fleet.reset_counters()
    # auth through the collection's action group; the environment's kubeconfig would not work
    results = run_tasks(lab, LIFECYCLE,
                        play={"module_defaults": {"group/gpunode.bringup.k8s": {"kubeconfig": lab["kubeconfig"]}}},
                        env={"K8S_AUTH_KUBECONFIG": str(lab["base"] / "no-such-kubeconfig")})

    check = results["acquire (check)"]
    assert check["changed"] and check["acquired"] and check["lease"]["holder_identity"] == "run-1"
    assert check["diff"]["after"]["holder_identity"] == "run-1"

    first = results["acquire"]  # created here, so the check mode run before stored nothing
    assert first["changed"] and first["acquired"] and not first["renewed"] and "created" in first["msg"]
    assert first["lease"]["lease_duration_seconds"] == 300 and first["expires_in"] in (299, 300)

    for name in ("acquire again", "acquire again (check)"):
        again = results[name]
        assert not again["changed"] and again["acquired"] and again["renewed"], name
        assert again["lease"]["acquire_time"] == first["lease"]["acquire_time"]

    other = results["second holder"]
    assert not other.get("failed") and not other["changed"] and not other["acquired"]
    assert other["holder"] == "run-1" and 0 < other["expires_in"] <= 300
    assert other["msg"] == "node %s is being remediated by run-1 until %s; skipped" % (NODE_A, other["expires_at"])

    assert results["release (check)"]["changed"] and results["release (check)"]["released"]
    assert results["release"]["changed"] and results["release"]["released"]  # the check mode left it
    assert not results["release again"]["changed"] and "nothing to release" in results["release again"]["msg"]
    assert lease_of(fleet, NODE_A) is None

    lapsed = results["lapsed lease"]
    assert lapsed["changed"] and lapsed["acquired"] and lapsed["taken_over"]
    assert lapsed["diff"]["before"]["holder_identity"] == "crashed-run"
    stored = lease_of(fleet, NODE_B)
    assert stored is not None
    assert stored["spec"]["holderIdentity"] == "run-1" and stored["spec"]["leaseTransitions"] == 2
    assert stored["metadata"]["labels"]["team"] == "gpu"

    bad = results["bad node name"]
    assert bad["failed"] and "name_prefix" in bad["msg"] and "GPU_B" in bad["msg"]
    # write requests (audit log): create (dry run, real), update (renew, renew as a dry run, take
    # over), delete (dry run, real); none for the skipped, foreign, absent and bad cases
    assert lease_writes(fleet) == {"real": {"create": 1, "update": 2, "delete": 1, "patch": 0},
                                   "dry_run": {"create": 1, "update": 1, "delete": 1, "patch": 0}}
    assert fleet.counters()["forbidden"] == []


def run_adhoc(lab: Dict[str, Any], args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "ansible"), "localhost", "-e", "ansible_python_interpreter=" + PYTHON,
                             "-m", "gpunode.bringup.node_lease", "-a", args],
                            env=lab["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def adhoc_result(proc: subprocess.Popen) -> Dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    for line in out.splitlines():  # oneline callback: "localhost | SUCCESS => {...}"
        if line.startswith("localhost | ") and "=> {" in line:
            return json.loads(line.split("=> ", 1)[1])
    raise AssertionError("ansible printed no result:\n%s\n%s" % (out, err))


def test_two_ansible_runs_started_together_one_wins(lab: Dict[str, Any]) -> None:
    procs = [run_adhoc(lab, "node=%s holder_identity=%s" % (NODE_C, holder)) for holder in ("run-x", "run-y")]
    results = [adhoc_result(p) for p in procs]
    winners = [r for r in results if r["acquired"]]
    losers = [r for r in results if not r["acquired"]]
    assert len(winners) == 1 and len(losers) == 1, results
    assert winners[0]["changed"] and not losers[0]["changed"] and not losers[0].get("failed")
    assert losers[0]["holder"] == winners[0]["holder_identity"]
    assert (lease_of(lab["fleet"], NODE_C) or {})["spec"]["holderIdentity"] == winners[0]["holder_identity"]


class ReadThenWait(NodeLease):
    """Reads, then waits until every contender has read, so all of them write the same version."""

    barrier: threading.Barrier

    def read(self):  # type: ignore[no-untyped-def]
        record = super().read()
        if not getattr(self, "_waited", False):
            self._waited = True
            self.barrier.wait(timeout=20)
        return record


@pytest.mark.parametrize("seed", ["absent", "lapsed"])
def test_racing_acquirers_that_read_the_same_version_exactly_one_wins(lab: Dict[str, Any], seed: str) -> None:
    fleet = lab["fleet"]
    node = NODE_D
    if lease_of(fleet, node) is not None:
        fleet.api("%s/gpunode-bringup-%s" % (LEASES, node), "DELETE")
    if seed == "lapsed":
        put_lease(fleet, node, "crashed", 60, datetime.now(timezone.utc) - timedelta(hours=1), 0)
    contenders = 6
    barrier = threading.Barrier(contenders)
    results: List[Dict[str, Any]] = []
    errors: List[BaseException] = []
    lock = threading.Lock()

    def contend(holder: str) -> None:
        try:
            client = K8sClient({"kubeconfig": lab["kubeconfig"]})
            lease = ReadThenWait(client, LeaseRequest(node, NS, "gpunode-bringup-", holder, 60), check_mode=False)
            lease.barrier = barrier
            result = lease.acquire()
            with lock:
                results.append(result)
        except BaseException as exc:  # surfaced below
            with lock:
                errors.append(exc)

    fleet.reset_counters()
    threads = [threading.Thread(target=contend, args=("racer-%d" % i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    winners = [r for r in results if r["acquired"]]
    assert len(winners) == 1, results
    winner = winners[0]["holder_identity"]
    assert all(r["holder"] == winner for r in results)
    stored = lease_of(fleet, node)
    assert stored is not None and stored["spec"]["holderIdentity"] == winner
    assert stored["spec"]["leaseTransitions"] == (1 if seed == "lapsed" else 0)
    verb = "create" if seed == "absent" else "update"
    # every contender wrote what it read; the API server stored one and answered the others 409
    assert fleet.counters()["requests"][verb]["leases"] == contenders
    codes = sorted(int((e.get("responseStatus") or {}).get("code") or 0) for e in fleet.audit.events()
                   if e.get("verb") == verb and (e.get("objectRef") or {}).get("resource") == "leases")
    assert codes == [200 if verb == "update" else 201] + [409] * (contenders - 1), codes
