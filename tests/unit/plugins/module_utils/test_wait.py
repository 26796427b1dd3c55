# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The list + watch wait loop, with a fake collection and a fixed clock."""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import json

import pytest

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import K8sError

from ansible_collections.gpunode.bringup.plugins.module_utils._wait import (
    MAX_WATCH_S,
    POLL_S,
    Deadline,
    Lister,
    ListWatch,
    apply_event,
    iter_lines,
    object_key,
    parse_event,
    wait_until,
    watch_timeout_seconds,
)


class Clock:
    def __init__(self, start=100.0):
        self.now = start

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def pod(name, rv, ready=False, namespace="ns"):
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": str(rv)},
            "status": {"ready": ready}}


class FakeCollection(Lister):
    """Lists ``objects``; each watch plays the next script: a list of events, then the server
    ends it after ``timeout_s`` (the clock advances) unless ``ends_at_once``."""

    def __init__(self, clock, objects, scripts=(), ends_at_once=False, event_cost=0.0):
        self.clock = clock
        self.objects = list(objects)
        self.scripts = list(scripts)
        self.ends_at_once = ends_at_once
        self.event_cost = event_cost
        self.watch_calls = []
        self.list_calls = 0
        self.closed = 0

    def list(self):
        self.list_calls += 1
        return list(self.objects), "10"

    def watch(self, resource_version, timeout_s):
        self.watch_calls.append((resource_version, timeout_s))
        script = self.scripts.pop(0) if self.scripts else []
        try:
            for event in script:
                self.clock.advance(self.event_cost)
                yield event
            if not self.ends_at_once:
                self.clock.advance(timeout_s)
        finally:
            self.closed += 1


def is_ready(objects):
    ready = [o["metadata"]["name"] for o in objects.values() if o["status"]["ready"]]
    return ready[0] if ready else None


@pytest.mark.parametrize("remaining,expected", [
    (0.0, 1), (0.2, 1), (1.0, 1), (1.01, 2), (59.5, 60), (180.0, MAX_WATCH_S), (10_000, MAX_WATCH_S),
])
def test_watch_timeout_is_the_time_left_rounded_up_between_1_and_the_cap(remaining, expected):
    assert watch_timeout_seconds(remaining) == expected


def test_deadline_counts_from_creation_on_the_given_clock():
    clock = Clock()
    deadline = Deadline(10, clock)
    assert (deadline.elapsed, deadline.remaining, deadline.expired) == (0.0, 10.0, False)
    clock.advance(9.5)
    assert deadline.remaining == pytest.approx(0.5) and not deadline.expired
    clock.advance(1)
    assert deadline.remaining == 0.0 and deadline.expired


@pytest.mark.parametrize("chunks,lines", [
    ([b'{"a":1}\n{"b":2}\n'], ['{"a":1}', '{"b":2}']),
    ([b'{"a"', b':1}\n{"b', b'":2}\n'], ['{"a":1}', '{"b":2}']),
    (['{"a":1}\n', '\n', '{"b":2}'], ['{"a":1}', '{"b":2}']),  # str chunks, blank line, no final newline
    ([b"", b"\n\n"], []),
    ([u'{"m":"\u00e9"}\n'.encode("utf-8")[:7], u'{"m":"\u00e9"}\n'.encode("utf-8")[7:]], [u'{"m":"\u00e9"}']),
])
def test_iter_lines_splits_a_stream_at_newlines_wherever_chunks_end(chunks, lines):
    assert list(iter_lines(chunks)) == lines


@pytest.mark.parametrize("line,expected", [
    ('{"type":"ADDED","object":{"metadata":{"name":"a"}}}', "ADDED"),
    ('{"type":"ERROR","object":{"code":410}}', "ERROR"),
    ('not json', None),
    ('["ADDED"]', None),
    ('{"type":"ADDED"}', None),
    ('{"object":{}}', None),
])
def test_parse_event_accepts_only_watch_events(line, expected):
    event = parse_event(line)
    assert (event or {}).get("type") == expected


@pytest.mark.parametrize("obj,key", [
    ({"metadata": {"name": "p", "namespace": "kube-system"}}, "kube-system/p"),
    ({"metadata": {"name": "gpu-07"}}, "gpu-07"),
])
def test_object_key_is_namespace_and_name(obj, key):
    assert object_key(obj) == key


def test_apply_event_adds_modifies_and_deletes():
    objects = {}
    assert apply_event(objects, "ADDED", pod("a", 11)) == "11"
    assert apply_event(objects, "MODIFIED", pod("a", 12, ready=True)) == "12"
    assert objects["ns/a"]["status"]["ready"] is True
    assert apply_event(objects, "DELETED", pod("a", 13)) == "13"
    assert objects == {}
    assert apply_event(objects, "DELETED", {"metadata": {"name": "gone", "namespace": "ns"}}) is None


def test_a_condition_that_holds_at_the_first_list_needs_no_watch():
    clock = Clock()
    fake = FakeCollection(clock, [pod("a", 5, ready=True)])
    result = wait_until(fake, is_ready, Deadline(30, clock))
    assert result.value == "a" and result.met
    assert (result.lists, result.watches, fake.watch_calls) == (1, 0, [])


def test_the_condition_is_evaluated_after_each_event_and_the_watch_closed_when_met():
    clock = Clock()
    fake = FakeCollection(clock, [pod("a", 5)], scripts=[[
        {"type": "MODIFIED", "object": pod("a", 11)},
        {"type": "ADDED", "object": pod("b", 12, ready=True)},
        {"type": "MODIFIED", "object": pod("a", 13, ready=True)},  # never read: the wait is over
    ]], event_cost=0.5)
    result = wait_until(fake, is_ready, Deadline(30, clock))
    assert result.value == "b"
    assert fake.watch_calls == [("10", 30)]  # from the list's resourceVersion, for the time left
    assert fake.closed == 1
    assert result.waited_s == pytest.approx(1.0)


def test_an_error_event_lists_again_and_watches_from_the_new_list():
    clock = Clock()
    fake = FakeCollection(clock, [pod("a", 5)], scripts=[
        [{"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}],
    ], ends_at_once=True)

    def ready_after_relist(objects):
        return "relisted" if fake.list_calls >= 2 else None

    result = wait_until(fake, ready_after_relist, Deadline(30, clock), pause=clock.advance)
    assert result.value == "relisted"
    assert (result.lists, result.watches) == (2, 1)


def test_bookmarks_move_the_resource_version_without_touching_objects():
    clock = Clock()
    fake = FakeCollection(clock, [pod("a", 5)], scripts=[
        [{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "99"}}}],
        [{"type": "MODIFIED", "object": pod("a", 100, ready=True)}],
    ])
    result = wait_until(fake, is_ready, Deadline(300, clock))
    assert result.value == "a"
    assert [call[0] for call in fake.watch_calls] == ["10", "10"]  # each watch follows a fresh list
    assert (result.lists, result.watches) == (2, 2)


def test_at_the_deadline_the_wait_returns_nothing_with_the_last_objects():
    clock = Clock()
    fake = FakeCollection(clock, [pod("a", 5)], scripts=[[{"type": "MODIFIED", "object": pod("a", 6)}]])
    result = wait_until(fake, is_ready, Deadline(100, clock))
    assert result.value is None and not result.met
    assert result.objects["ns/a"]["metadata"]["resourceVersion"] == "5"  # listed again after the watch
    timeouts = [call[1] for call in fake.watch_calls]
    assert timeouts == [60, 40]  # capped, then the rest of the deadline
    assert result.waited_s == pytest.approx(100.0)


def test_a_deadline_already_past_still_reports_a_state_that_holds():
    clock = Clock()
    deadline = Deadline(1, clock)
    clock.advance(5)
    result = wait_until(FakeCollection(clock, [pod("a", 1, ready=True)]), is_ready, deadline)
    assert result.value == "a"
    result = wait_until(FakeCollection(clock, [pod("a", 1)]), is_ready, deadline)
    assert result.value is None and result.watches == 0


def test_a_watch_that_ends_at_once_is_polled_at_most_every_poll_interval():
    clock = Clock()
    pauses = []

    def pause(seconds):
        pauses.append(seconds)
        clock.advance(seconds)

    fake = FakeCollection(clock, [pod("a", 1)], ends_at_once=True)
    result = wait_until(fake, is_ready, Deadline(1, clock), pause=pause)
    assert result.value is None
    assert pauses and all(0 < p <= POLL_S for p in pauses)
    assert len(pauses) == pytest.approx(1 / POLL_S, abs=1)


class FakeResponse:
    def __init__(self, chunks, fail=None):
        self.chunks = chunks
        self.fail = fail
        self.closed = self.released = False

    def stream(self, amt=None, decode_content=False):
        yield from self.chunks
        if self.fail:
            raise self.fail

    def close(self):
        self.closed = True

    def release_conn(self):
        self.released = True


class FakeClient:
    request_timeout = 20.0

    def __init__(self, response=None, body=None):
        self.response = response
        self.body = body
        self.calls = []

    def call(self, what, fn, *args, **kwargs):
        self.calls.append((what, args, kwargs))
        return fn(*args, **kwargs)


def test_list_watch_lists_with_the_selectors_and_reads_the_resource_version():
    client = FakeClient()

    def list_pods(namespace, **kwargs):
        return {"metadata": {"resourceVersion": "42"}, "items": [pod("a", 40)]}

    lister = ListWatch(client, "pods", list_pods, "ns", label_selector="name=x")
    items, version = lister.list()
    assert version == "42" and [i["metadata"]["name"] for i in items] == ["a"]
    what, args, kwargs = client.calls[0]
    assert what == "list pods" and args == ("ns",) and kwargs["label_selector"] == "name=x"


@pytest.mark.parametrize("fail", [None, OSError("connection reset")])
def test_list_watch_streams_events_and_always_closes_the_response(fail):
    events = [{"type": "ADDED", "object": pod("a", 41)}, {"type": "MODIFIED", "object": pod("a", 42)}]
    data = ("\n".join(json.dumps(e) for e in events) + "\n").encode()
    response = FakeResponse([data[:30], data[30:]], fail=fail)
    client = FakeClient()
    seen_kwargs = {}

    def list_pods(namespace, **kwargs):
        seen_kwargs.update(kwargs)
        return response

    lister = ListWatch(client, "pods", list_pods, "ns", field_selector="spec.nodeName=n1")
    assert [e["type"] for e in lister.watch("40", 7)] == ["ADDED", "MODIFIED"]
    assert response.closed and response.released
    assert seen_kwargs["watch"] is True and seen_kwargs["timeout_seconds"] == 7
    assert seen_kwargs["resource_version"] == "40" and seen_kwargs["field_selector"] == "spec.nodeName=n1"
    assert seen_kwargs["_request_timeout"] == (20.0, 27.0)  # the read outlives the server's timeout
    assert client.calls[0][0] == "watch pods"


@pytest.mark.parametrize("status,raised", [(410, False), (403, True), (500, True)])
def test_a_watch_refused_as_gone_ends_quietly_other_refusals_are_raised(status, raised):
    def refuse(namespace, **kwargs):
        raise K8sError("watch pods: HTTP %d" % status, status=status)

    lister = ListWatch(FakeClient(), "pods", refuse, "ns")
    if raised:
        with pytest.raises(K8sError):
            list(lister.watch("40", 5))
    else:
        assert list(lister.watch("40", 5)) == []
