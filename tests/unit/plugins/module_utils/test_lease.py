# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node lease: time parsing, holder and expiry decisions on a fixed clock, and the
read -> decide -> write flow against an in-memory Lease API (conflicts, check mode)."""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import copy
from datetime import datetime, timedelta, timezone

import pytest

from ansible_collections.gpunode.bringup.plugins.module_utils import _lease as lease
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError, K8sError
from ansible_collections.gpunode.bringup.plugins.module_utils._lease import (
    ABSENT,
    CREATE,
    DELETE,
    HELD,
    NOT_OURS,
    RENEW,
    TAKE_OVER,
    LeaseRecord,
    LeaseRequest,
    decide_acquire,
    decide_release,
    format_time,
    lease_body,
    lease_name,
    lease_spec,
    parse_time,
    run_node_lease,
)

NOW = datetime(2026, 1, 1, 10, 0, 0, tzinfo=timezone.utc)
ME = "ctl-01-run-1"
OTHER = "ctl-02-run-9"


def at(seconds):
    return format_time(NOW + timedelta(seconds=seconds))


def lease_object(holder=OTHER, renew=-10, acquire=-100, duration=600, transitions=2, rv="7", labels=None):
    spec = {"leaseTransitions": transitions}
    if holder is not None:
        spec["holderIdentity"] = holder
    if renew is not None:
        spec["renewTime"] = at(renew)
    if acquire is not None:
        spec["acquireTime"] = at(acquire)
    if duration is not None:
        spec["leaseDurationSeconds"] = duration
    metadata = {"name": "gpunode-bringup-gpu-07", "namespace": "kube-system", "resourceVersion": rv}
    if labels:
        metadata["labels"] = labels
    return {"metadata": metadata, "spec": spec}


def record(**kwargs):
    return LeaseRecord.from_object(lease_object(**kwargs))


@pytest.mark.parametrize("text,expected", [
    ("2026-01-01T10:00:00.000000Z", NOW),
    ("2026-01-01T10:00:00Z", NOW),
    ("2026-01-01T10:00:00.5Z", NOW + timedelta(microseconds=500000)),
    ("2026-01-01T10:00:00.123456789Z", NOW + timedelta(microseconds=123456)),
    ("2026-01-01T10:00:00.000000+00:00", NOW),
    ("2026-01-01T12:00:00+02:00", NOW),
    ("2026-01-01T09:30:00-0030", NOW),
    ("2026-01-01T10:00:00", NOW),
    ("", None),
    (None, None),
    ("yesterday", None),
    ("2026-13-01T10:00:00Z", None),
])
def test_parse_time_reads_rfc3339_as_the_api_and_the_python_client_write_it(text, expected):
    assert parse_time(text) == expected


def test_format_time_writes_a_microtime_that_parses_back():
    moment = NOW + timedelta(microseconds=42)
    assert format_time(moment) == "2026-01-01T10:00:00.000042Z"
    assert parse_time(format_time(moment)) == moment


@pytest.mark.parametrize("prefix,node,name", [
    ("gpunode-bringup-", "gpu-07", "gpunode-bringup-gpu-07"),
    ("", "ip-10-0-0-1.ec2.internal", "ip-10-0-0-1.ec2.internal"),
])
def test_lease_name_is_prefix_and_node(prefix, node, name):
    assert lease_name(prefix, node) == name


@pytest.mark.parametrize("prefix,node,word", [
    ("gpunode-bringup-", "", "node"),
    ("GPU-", "gpu-07", "name_prefix"),
    ("gpunode_", "gpu-07", "name_prefix"),
    ("x-", "a" * 252, "253"),
])
def test_a_lease_name_the_api_would_reject_fails_naming_the_option(prefix, node, word):
    with pytest.raises(InvalidOptionError, match=word):
        lease_name(prefix, node)


@pytest.mark.parametrize("namespace,holder,duration,word", [
    ("Kube_System", ME, 60, "namespace"),
    ("", ME, 60, "namespace"),
    ("kube-system", " ", 60, "holder_identity"),
    ("kube-system", ME, 0, "lease_duration_seconds"),
    ("kube-system", ME, 2 ** 31, "lease_duration_seconds"),
])
def test_bad_options_fail_before_any_call(namespace, holder, duration, word):
    request = LeaseRequest("gpu-07", namespace, "gpunode-bringup-", holder, duration)
    with pytest.raises(InvalidOptionError, match=word):
        request.validate()


@pytest.mark.parametrize("kwargs,default,expires", [
    ({"renew": -10, "acquire": -100, "duration": 600}, 60, 590),
    ({"renew": None, "acquire": -100, "duration": 600}, 60, 500),  # never renewed: acquisition counts
    ({"renew": -10, "acquire": -100, "duration": None}, 60, 50),  # no duration: ours counts
    ({"renew": None, "acquire": None}, 60, None),  # no time at all: cannot prove it is held
])
def test_expiry_is_last_renewal_plus_duration(kwargs, default, expires):
    got = record(**kwargs).expires_at(default)
    assert got == (None if expires is None else NOW + timedelta(seconds=expires))


@pytest.mark.parametrize("current,decision", [
    (None, CREATE),
    ({"holder": ME}, RENEW),
    ({"holder": ME, "renew": -7200}, RENEW),  # ours, lapsed: still ours to renew
    ({"holder": OTHER}, HELD),
    ({"holder": OTHER, "renew": -599}, HELD),
    ({"holder": OTHER, "renew": -600}, TAKE_OVER),  # renewTime + duration == now: lapsed
    ({"holder": OTHER, "renew": -7200}, TAKE_OVER),
    ({"holder": None}, TAKE_OVER),  # released by clearing holderIdentity
    ({"holder": ""}, TAKE_OVER),
    ({"holder": OTHER, "renew": None, "acquire": None}, TAKE_OVER),
    ({"holder": OTHER, "renew": 30}, HELD),  # renewed by a controller whose clock is ahead
])
def test_acquire_decision_on_a_fixed_clock(current, decision):
    current_record = None if current is None else record(**current)
    assert decide_acquire(current_record, ME, NOW, 600) == decision


@pytest.mark.parametrize("current,decision", [
    (None, ABSENT),
    ({"holder": ME}, DELETE),
    ({"holder": ME, "renew": -7200}, DELETE),
    ({"holder": OTHER}, NOT_OURS),
    ({"holder": OTHER, "renew": -7200}, NOT_OURS),  # lapsed, but not ours to delete
    ({"holder": None}, NOT_OURS),
])
def test_release_decision(current, decision):
    current_record = None if current is None else record(**current)
    assert decide_release(current_record, ME) == decision


def test_create_starts_a_fresh_lease():
    assert lease_spec(CREATE, None, ME, 300, NOW) == {
        "holderIdentity": ME, "leaseDurationSeconds": 300, "acquireTime": at(0), "renewTime": at(0),
        "leaseTransitions": 0}


def test_renew_moves_only_renew_time_and_duration():
    spec = lease_spec(RENEW, record(holder=ME, acquire=-100, transitions=3), ME, 900, NOW)
    assert spec == {"holderIdentity": ME, "leaseDurationSeconds": 900, "acquireTime": at(-100),
                    "renewTime": at(0), "leaseTransitions": 3}


def test_take_over_counts_a_transition_and_restarts_acquisition():
    spec = lease_spec(TAKE_OVER, record(holder=OTHER, renew=-7200, transitions=3), ME, 600, NOW)
    assert spec["holderIdentity"] == ME and spec["leaseTransitions"] == 4
    assert spec["acquireTime"] == spec["renewTime"] == at(0)


def test_a_replace_carries_the_resource_version_read_and_keeps_foreign_labels():
    current = record(labels={"team": "gpu"})
    body = lease_body("gpunode-bringup-gpu-07", "kube-system", {"holderIdentity": ME}, current,
                      {"app.kubernetes.io/managed-by": "gpunode.bringup"})
    assert body["metadata"]["resourceVersion"] == "7"
    assert body["metadata"]["labels"] == {"team": "gpu", "app.kubernetes.io/managed-by": "gpunode.bringup"}
    assert body["apiVersion"] == "coordination.k8s.io/v1" and body["kind"] == "Lease"


def test_summary_reports_expiry_only_while_held():
    held = record(holder=OTHER, renew=-10).summary(NOW, 600)
    assert held["held"] and held["expires_in"] == 590 and held["expires_at"] == at(590)
    lapsed = record(holder=OTHER, renew=-7200).summary(NOW, 600)
    assert not lapsed["held"] and lapsed["expires_in"] is None and lapsed["holder_identity"] == OTHER


# --- the flow, against an in-memory Lease API ------------------------------------------------

class FakeLeaseApi:
    """Stores one namespace's leases; honours resourceVersion guards and dry runs like the API."""

    def __init__(self):
        self.leases = {}
        self.rv = 100
        self.writes = []
        self.before_write = None  # a hook to let a competitor write between our read and write

    def _error(self, status, text):
        return K8sError(text, status=status)

    def read_namespaced_lease(self, name, namespace, **_):
        if name not in self.leases:
            raise self._error(404, "not found")
        return copy.deepcopy(self.leases[name])

    def _store(self, name, body, dry_run):
        obj = copy.deepcopy(body)
        if dry_run:
            obj["metadata"].pop("resourceVersion", None)
            return obj
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.leases[name] = obj
        return copy.deepcopy(obj)

    def _hook(self):
        if self.before_write:
            hook, self.before_write = self.before_write, None
            hook(self)

    def create_namespaced_lease(self, namespace, body, dry_run=None, **_):
        self._hook()
        name = body["metadata"]["name"]
        self.writes.append(("create", name, dry_run))
        if name in self.leases:
            raise self._error(409, "already exists")
        return self._store(name, body, dry_run)

    def replace_namespaced_lease(self, name, namespace, body, dry_run=None, **_):
        self._hook()
        self.writes.append(("replace", name, dry_run))
        current = self.leases.get(name)
        if current is None:
            raise self._error(404, "not found")
        if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise self._error(409, "the object has been modified")
        return self._store(name, body, dry_run)

    def delete_namespaced_lease(self, name, namespace, body=None, dry_run=None, **_):
        self._hook()
        self.writes.append(("delete", name, dry_run))
        current = self.leases.get(name)
        if current is None:
            raise self._error(404, "not found")
        wanted = ((body or {}).get("preconditions") or {}).get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise self._error(409, "precondition failed")
        if not dry_run:
            del self.leases[name]
        return {"kind": "Status", "status": "Success"}


class FakeClient:
    """K8sClient.request over FakeLeaseApi: the Lease paths map to the typed calls they stand for."""

    PREFIX = "/apis/coordination.k8s.io/v1/namespaces/"

    def __init__(self, api):
        self.api = api
        self.requests = []

    def request(self, method, path, query=None, body=None, _request_timeout=None, _preload_content=False):
        self.requests.append((method, path, list(query or []), body))
        assert path.startswith(self.PREFIX), path
        namespace, rest = path[len(self.PREFIX):].split("/", 1)
        dry_run = dict(query or []).get("dryRun")
        if rest == "leases" and method == "POST":
            return self.api.create_namespaced_lease(namespace, body, dry_run=dry_run)
        name = rest[len("leases/"):]
        if method == "GET":
            return self.api.read_namespaced_lease(name, namespace)
        if method == "PUT":
            return self.api.replace_namespaced_lease(name, namespace, body, dry_run=dry_run)
        if method == "DELETE":
            # as the real API server: a DELETE with a body takes its DeleteOptions from the body
            # alone, the query's dryRun is then ignored
            if body:
                dry_run = "All" if body.get("dryRun") else None
            return self.api.delete_namespaced_lease(name, namespace, body=body, dry_run=dry_run)
        raise AssertionError("unexpected request %s %s" % (method, path))

    def call(self, what, fn, *args, **kwargs):
        return fn(*args, **kwargs)


NAME = "gpunode-bringup-gpu-07"


def request(holder=ME, duration=600):
    return LeaseRequest("gpu-07", "kube-system", "gpunode-bringup-", holder, duration)


def seeded(**kwargs):
    api = FakeLeaseApi()
    if kwargs.pop("absent", False):
        return api
    obj = lease_object(**kwargs)
    api.leases[NAME] = obj
    return api


def run(api, state="acquired", holder=ME, check_mode=False, duration=600):
    return run_node_lease(FakeClient(api), request(holder, duration), state, check_mode, clock=lambda: NOW)


@pytest.mark.parametrize("check_mode", [True, False])
def test_acquire_creates_a_missing_lease(check_mode):
    api = seeded(absent=True)
    result = run(api, check_mode=check_mode)
    assert result["changed"] and result["acquired"] and not result["renewed"] and not result["taken_over"]
    assert result["holder"] == ME and result["expires_in"] == 600
    assert result["diff"]["before"] == {} and result["diff"]["after"]["holder_identity"] == ME
    assert api.writes == [("create", NAME, "All" if check_mode else None)]
    assert (NAME in api.leases) is not check_mode


def test_acquire_again_renews_without_reporting_a_change():
    api = seeded(holder=ME, renew=-300, transitions=1)
    result = run(api)
    assert result["acquired"] and result["renewed"] and not result["changed"]
    assert "diff" not in result
    assert api.leases[NAME]["spec"]["renewTime"] == at(0)
    assert api.leases[NAME]["spec"]["leaseTransitions"] == 1


def test_a_lease_held_by_another_run_is_left_alone_and_reported():
    api = seeded(holder=OTHER, renew=-10)
    result = run(api)
    assert not result["changed"] and not result["acquired"]
    assert result["holder"] == OTHER and result["expires_in"] == 590
    assert result["msg"] == "node gpu-07 is being remediated by %s until %s; skipped" % (OTHER, at(590))
    assert api.writes == []


@pytest.mark.parametrize("check_mode", [True, False])
def test_a_lapsed_lease_is_taken_over(check_mode):
    api = seeded(holder=OTHER, renew=-7200, transitions=2)
    result = run(api, check_mode=check_mode)
    assert result["changed"] and result["acquired"] and result["taken_over"]
    assert result["lease"]["lease_transitions"] == 3 and result["lease"]["acquire_time"] == at(0)
    assert result["diff"]["before"]["holder_identity"] == OTHER
    assert api.writes == [("replace", NAME, "All" if check_mode else None)]
    assert api.leases[NAME]["spec"]["holderIdentity"] == (OTHER if check_mode else ME)


def test_losing_a_race_rereads_and_reports_the_winner():
    api = seeded(holder=OTHER, renew=-7200)

    def competitor_wins(fake):
        won = lease_object(holder="ctl-03-run-2", renew=0, acquire=0, rv="500")
        fake.leases[NAME] = won

    api.before_write = competitor_wins
    result = run(api)
    assert not result["acquired"] and not result["changed"]
    assert result["holder"] == "ctl-03-run-2"
    assert api.writes == [("replace", NAME, None)]  # the one write that lost; none after the re-read


def test_losing_a_create_race_rereads_and_reports_the_winner():
    api = seeded(absent=True)
    api.before_write = lambda fake: fake.leases.__setitem__(NAME, lease_object(holder=OTHER, renew=0))
    result = run(api)
    assert not result["acquired"] and result["holder"] == OTHER


def test_a_lease_that_keeps_changing_fails_after_bounded_attempts():
    api = seeded(holder=OTHER, renew=-7200)

    def bump(fake):
        fake.leases[NAME]["metadata"]["resourceVersion"] = str(int(fake.leases[NAME]["metadata"]["resourceVersion"]) + 1)
        fake.before_write = bump

    api.before_write = bump
    with pytest.raises(K8sError, match="changed 3 times"):
        run(api)
    assert len(api.writes) == lease.MAX_ATTEMPTS


@pytest.mark.parametrize("check_mode", [True, False])
def test_release_deletes_our_lease_guarded_by_its_resource_version(check_mode):
    api = seeded(holder=ME, renew=-10, rv="7")
    result = run(api, state="released", check_mode=check_mode)
    assert result["changed"] and result["released"] and not result["acquired"]
    assert result["diff"]["before"]["holder_identity"] == ME and result["diff"]["after"] == {}
    assert api.writes == [("delete", NAME, "All" if check_mode else None)]
    assert (NAME in api.leases) is check_mode


@pytest.mark.parametrize("kwargs,word", [
    ({"absent": True}, "nothing to release"),
    ({"holder": OTHER}, "held by %s" % OTHER),
    ({"holder": OTHER, "renew": -7200}, "held by %s" % OTHER),
])
def test_release_leaves_absent_and_foreign_leases_alone(kwargs, word):
    api = seeded(**kwargs)
    result = run(api, state="released")
    assert not result["changed"] and not result["released"] and word in result["msg"]
    assert api.writes == []


def test_release_after_a_take_over_does_not_delete_the_new_holders_lease():
    api = seeded(holder=ME, renew=-7200, rv="7")
    api.before_write = lambda fake: fake.leases.__setitem__(NAME, lease_object(holder=OTHER, renew=0, rv="8"))
    result = run(api, state="released")
    assert not result["changed"] and not result["released"]
    assert api.leases[NAME]["spec"]["holderIdentity"] == OTHER


def test_other_api_errors_are_raised():
    api = seeded(absent=True)

    def forbidden(*args, **kwargs):
        raise K8sError("create lease: forbidden", status=403)

    api.create_namespaced_lease = forbidden
    with pytest.raises(K8sError, match="forbidden"):
        run(api)


@pytest.mark.parametrize("check_mode", [True, False])
def test_requests_on_the_wire(check_mode):
    # create (POST to the collection), then release (GET, DELETE with the resourceVersion
    # precondition); check mode sends every write as a server-side dry run
    api = seeded(absent=True)
    client = FakeClient(api)
    run_node_lease(client, request(), "acquired", check_mode, clock=lambda: NOW)
    run_node_lease(client, request(), "released", False, clock=lambda: NOW)
    path = FakeClient.PREFIX + "kube-system/leases"
    writes = [(m, p, q) for m, p, q, _b in client.requests if m != "GET"]
    dry = [("dryRun", "All")] if check_mode else []
    assert writes[0] == ("POST", path, dry)
    create_body = [b for m, _p, _q, b in client.requests if m == "POST"][0]
    assert create_body["kind"] == "Lease" and create_body["metadata"]["name"] == NAME
    if not check_mode:
        method, where, query, body = [r for r in client.requests if r[0] == "DELETE"][0]
        assert (where, query) == (path + "/" + NAME, [])
        assert body == {"preconditions": {"resourceVersion": "101"}}


def test_a_check_mode_release_sends_its_dry_run_in_the_delete_options_body():
    # the API server reads a DELETE's options from its body when it has one (the resourceVersion
    # precondition) and ignores the query: a dryRun only on the URL really deleted the lease
    api = seeded(holder=ME, renew=-10, rv="7")
    client = FakeClient(api)
    run_node_lease(client, request(), "released", True, clock=lambda: NOW)
    method, _where, query, body = [r for r in client.requests if r[0] == "DELETE"][0]
    assert body == {"preconditions": {"resourceVersion": "7"}, "dryRun": ["All"]}
    assert query == [("dryRun", "All")] and NAME in api.leases
