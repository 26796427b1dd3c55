"""gpunode.bringup.node_lease against the lab API server.

One playbook (auth from ``module_defaults`` of the ``gpunode.bringup.k8s`` action group) walks a
lease through its life: check mode -> acquire -> acquire again -> check mode again; a second
holder is skipped; release in check mode, for real, again; a lapsed lease is taken over; a bad
node name fails before any request. Then racing acquirers: two ``ansible`` processes started
together, and six in-process acquirers that all read the same lease before any of them writes;
exactly one wins each race.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, List

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
from lab.apiserver import LabApiServer  # noqa: E402
from lab.contracts import NodeSpec  # noqa: E402

NS = "kube-system"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("lease")
    server = LabApiServer(str(base / "api")).start()
    server.store.add_nodes([NodeSpec(name=n, root="", gpu_count=0) for n in ("gpu-a", "gpu-b", "gpu-c", "gpu-d")])
    kubeconfig = server.write_kubeconfig(str(base / "kubeconfig"))
    env = ansible_env(base, kubeconfig, ANSIBLE_STDOUT_CALLBACK="oneline", ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
    yield {"server": server, "base": base, "env": env, "kubeconfig": kubeconfig}
    server.stop()


def lease_of(server: LabApiServer, node: str) -> Any:
    return server.store.get_object("coordination.k8s.io/v1", "Lease", NS, "gpunode-bringup-" + node)


def lease_task(name: str, check_mode: bool = False, **args: Any) -> Dict[str, Any]:
    task: Dict[str, Any] = {"name": name, "gpunode.bringup.node_lease": args, "diff": True}
    if check_mode:
        task["check_mode"] = True
    return task


LIFECYCLE = [
    lease_task("acquire (check)", True, node="gpu-a", holder_identity="run-1"),
    lease_task("acquire", node="gpu-a", holder_identity="run-1", lease_duration_seconds=300),
    lease_task("acquire again", node="gpu-a", holder_identity="run-1", lease_duration_seconds=300),
    lease_task("acquire again (check)", True, node="gpu-a", holder_identity="run-1", lease_duration_seconds=300),
    lease_task("second holder", node="gpu-a", holder_identity="run-2"),
    lease_task("release (check)", True, node="gpu-a", holder_identity="run-1", state="released"),
    lease_task("release", node="gpu-a", holder_identity="run-1", state="released"),
    lease_task("release again", node="gpu-a", holder_identity="run-1", state="released"),
    lease_task("lapsed lease", node="gpu-b", holder_identity="run-1"),
    lease_task("bad node name", node="GPU_B", holder_identity="run-1"),
]


def test_lease_lifecycle(lab: Dict[str, Any]) -> None:
    server = lab["server"]
    long_ago = datetime.now(timezone.utc) - timedelta(hours=2)
    server.store.create_object({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "gpunode-bringup-gpu-b", "namespace": NS, "labels": {"team": "gpu"}},
        "spec": {"holderIdentity": "crashed-run", "leaseDurationSeconds": 600, "acquireTime": format_time(long_ago),
                 "renewTime": format_time(long_ago), "leaseTransitions": 1}})
    server.reset_counters()
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
    assert other["msg"] == "node gpu-a is being remediated by run-1 until %s; skipped" % other["expires_at"]

    assert results["release (check)"]["changed"] and results["release (check)"]["released"]
    assert results["release"]["changed"] and results["release"]["released"]  # the check mode left it
    assert not results["release again"]["changed"] and "nothing to release" in results["release again"]["msg"]
    assert lease_of(server, "gpu-a") is None

    lapsed = results["lapsed lease"]
    assert lapsed["changed"] and lapsed["acquired"] and lapsed["taken_over"]
    assert lapsed["diff"]["before"]["holder_identity"] == "crashed-run"
    stored = lease_of(server, "gpu-b")
    assert stored["spec"]["holderIdentity"] == "run-1" and stored["spec"]["leaseTransitions"] == 2
    assert stored["metadata"]["labels"]["team"] == "gpu"

    bad = results["bad node name"]
    assert bad["failed"] and "name_prefix" in bad["msg"] and "GPU_B" in bad["msg"]
    # write requests: create (dry run, real), replace (renew, renew as a dry run, take over),
    # delete (dry run, real); none for the skipped, foreign, absent and bad cases
    writes = {verb: server.count(verb, "leases") for verb in ("create", "update", "delete", "patch")}
    dry_runs = {verb: server.count("dryrun-" + verb, "leases") for verb in ("create", "update", "delete", "patch")}
    assert writes == {"create": 1, "update": 2, "delete": 1, "patch": 0}
    assert dry_runs == {"create": 1, "update": 1, "delete": 1, "patch": 0}


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
    procs = [run_adhoc(lab, "node=gpu-c holder_identity=%s" % holder) for holder in ("run-x", "run-y")]
    results = [adhoc_result(p) for p in procs]
    winners = [r for r in results if r["acquired"]]
    losers = [r for r in results if not r["acquired"]]
    assert len(winners) == 1 and len(losers) == 1, results
    assert winners[0]["changed"] and not losers[0]["changed"] and not losers[0].get("failed")
    assert losers[0]["holder"] == winners[0]["holder_identity"]
    assert lease_of(lab["server"], "gpu-c")["spec"]["holderIdentity"] == winners[0]["holder_identity"]


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
    server = lab["server"]
    node = "gpu-d"
    existing = lease_of(server, node)
    if existing is not None:
        server.store.delete_object("coordination.k8s.io/v1", "Lease", NS, "gpunode-bringup-" + node)
    if seed == "lapsed":
        long_ago = format_time(datetime.now(timezone.utc) - timedelta(hours=1))
        server.store.create_object({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "gpunode-bringup-" + node, "namespace": NS},
            "spec": {"holderIdentity": "crashed", "leaseDurationSeconds": 60, "renewTime": long_ago,
                     "acquireTime": long_ago, "leaseTransitions": 0}})
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

    server.reset_counters()
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
    stored = lease_of(server, node)
    assert stored["spec"]["holderIdentity"] == winner
    assert stored["spec"]["leaseTransitions"] == (1 if seed == "lapsed" else 0)
    verb = "create" if seed == "absent" else "update"
    assert server.count(verb, "leases") == contenders  # every contender wrote; five got 409 and re-read
