# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Device plugin restart: pod readiness, replacement choice and the Node's advertised count."""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import pytest

from ansible_collections.gpunode.bringup.plugins.module_utils import _restart
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import (
    GpuNodeError,
    InvalidOptionError,
    K8sError,
    K8sTimeoutError,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._restart import (
    Advertised,
    PluginRestart,
    PodView,
    RestartRequest,
    advertised_problem,
    live_pods,
    parse_count,
    ready_replacement,
    replacement_pod,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._wait import WaitResult

GPU = "nvidia.com/gpu"


def plugin_pod(name, uid, phase="Running", ready=True, restarts=0, waiting=None, message=None, created="2026-01-01T10:00:00Z",
               deleting=False, last_exit=None):
    container = {"name": "nvidia-device-plugin-ctr", "restartCount": restarts, "ready": ready,
                 "state": {"waiting": {"reason": waiting, "message": message}} if waiting else {"running": {}}}
    if last_exit is not None:
        container["lastState"] = {"terminated": {"exitCode": last_exit}}
    metadata = {"name": name, "namespace": "kube-system", "uid": uid, "creationTimestamp": created}
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T10:00:05Z"
    return {"metadata": metadata, "spec": {"nodeName": "gpu-07"},
            "status": {"phase": phase, "containerStatuses": [container],
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def node(capacity=None, allocatable=None):
    status = {"capacity": {"cpu": "64"}, "allocatable": {"cpu": "63"}}
    if capacity is not None:
        status["capacity"][GPU] = capacity
    if allocatable is not None:
        status["allocatable"][GPU] = allocatable
    return {"metadata": {"name": "gpu-07"}, "status": status}


@pytest.mark.parametrize("quantity,count", [
    ("8", 8), (8, 8), ("0", 0), (" 4 ", 4), (None, None), ("", None), ("1k", None), ("-1", None), (True, None),
])
def test_parse_count_reads_extended_resource_counts(quantity, count):
    assert parse_count(quantity) == count


@pytest.mark.parametrize("pod,ready,problem", [
    (plugin_pod("p", "1"), True, None),
    (plugin_pod("p", "1", ready=False, restarts=7, waiting="CrashLoopBackOff", message="back-off 5m0s", last_exit=1),
     False, "phase Running, waiting: CrashLoopBackOff (back-off 5m0s), 7 restarts, last exit code 1"),
    (plugin_pod("p", "1", phase="Pending", ready=False, waiting="ContainerCreating"), False,
     "phase Pending, waiting: ContainerCreating"),
    (plugin_pod("p", "1", ready=False), False, "phase Running, not Ready"),
    (plugin_pod("p", "1", deleting=True), True, "phase Running, terminating"),
    (plugin_pod("p", "1", phase="Pending", ready=True), False, "phase Pending, not Ready"),  # Ready needs Running
    ({"metadata": {"name": "p", "uid": "1"}}, False, "phase Unknown, not Ready"),
])
def test_pod_view_says_whether_and_why_a_plugin_pod_is_not_serving(pod, ready, problem):
    view = PodView.from_object(pod)
    assert view.ready is ready
    assert view.problem() == problem


def test_live_pods_skip_terminating_ones_oldest_first():
    pods = [plugin_pod("b", "2", created="2026-01-01T10:00:02Z"), plugin_pod("a", "1", created="2026-01-01T10:00:01Z"),
            plugin_pod("c", "3", deleting=True)]
    assert [v.name for v in live_pods(pods)] == ["a", "b"]


@pytest.mark.parametrize("pods,old,replacement,ready", [
    ([plugin_pod("old", "1")], {"1"}, None, None),  # only the old pod: nothing yet
    ([plugin_pod("old", "1", deleting=True), plugin_pod("new", "2", phase="Pending", ready=False)], {"1"}, "new", None),
    ([plugin_pod("old", "1", deleting=True), plugin_pod("new", "2")], {"1"}, "new", "new"),
    ([plugin_pod("new", "2", ready=False, waiting="CrashLoopBackOff", restarts=3)], {"1"}, "new", None),
    ([plugin_pod("n1", "2", created="2026-01-01T10:00:01Z", ready=False),
      plugin_pod("n2", "3", created="2026-01-01T10:00:02Z")], {"1"}, "n2", "n2"),
])
def test_the_replacement_is_a_new_uid_and_counts_only_when_ready(pods, old, replacement, ready):
    found = replacement_pod(pods, old)
    assert (found.name if found else None) == replacement
    found_ready = ready_replacement(pods, old)
    assert (found_ready.name if found_ready else None) == ready


@pytest.mark.parametrize("obj,capacity,allocatable", [
    (node("8", "8"), 8, 8),
    (node("8", "6"), 8, 6),
    (node(), None, None),
    (None, None, None),
])
def test_advertised_reads_capacity_and_allocatable(obj, capacity, allocatable):
    assert Advertised.from_node(obj, GPU) == Advertised(capacity, allocatable)


@pytest.mark.parametrize("capacity,allocatable,expected,problem", [
    (8, 8, 8, None),
    (8, 8, None, None),
    (8, 7, 7, None),  # the operator expects 7: one GPU known bad
    (8, 6, 8, "allocatable nvidia.com/gpu 6 of expected 8 (capacity 8)"),
    (None, None, 8, "allocatable nvidia.com/gpu 0 of expected 8 (capacity 0)"),
    (8, 6, None, "allocatable nvidia.com/gpu 6 of capacity 8 (unhealthy devices)"),
    (0, 0, None, "capacity nvidia.com/gpu is 0: the node advertises no GPUs"),
    (None, None, None, "capacity nvidia.com/gpu is 0: the node advertises no GPUs"),
])
def test_advertised_problem_compares_allocatable_with_the_expected_count(capacity, allocatable, expected, problem):
    assert advertised_problem(Advertised(capacity, allocatable), GPU, expected) == problem


def request(**overrides):
    values = dict(node="gpu-07", namespace="kube-system", label_selector="name=nvidia-device-plugin-ds",
                  resource_name=GPU, expected_count=None, timeout=180)
    values.update(overrides)
    return RestartRequest(**values)


@pytest.mark.parametrize("overrides,word", [
    ({"node": ""}, "node"),
    ({"namespace": "Kube-System"}, "namespace"),
    ({"label_selector": " "}, "label_selector"),
    ({"resource_name": "nvidia.com/"}, "resource_name"),
    ({"expected_count": 0}, "expected_count"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": 7200}, "timeout"),
])
def test_bad_options_fail_naming_the_option(overrides, word):
    with pytest.raises(InvalidOptionError, match=word):
        request(**overrides).validate()


def test_good_options_pass_and_select_the_node():
    req = request(resource_name="nvidia.com/gpu.shared", expected_count=4)
    req.validate()
    assert req.field_selector == "spec.nodeName=gpu-07"


class FakeCore:
    def __init__(self, pods, node_exists=True):
        self.pods = pods
        self.node_exists = node_exists
        self.deleted = []

    def list_namespaced_pod(self, namespace, **kwargs):
        return {"metadata": {"resourceVersion": "5"}, "items": self.pods}

    def list_node(self, **kwargs):
        return {"metadata": {"resourceVersion": "5"}, "items": [node("8", "8")]}

    def read_node(self, name, **kwargs):
        if not self.node_exists:
            raise K8sError("get node: not found", status=404)
        return node("8", "8")

    def delete_namespaced_pod(self, name, namespace, **kwargs):
        # as the real API server: a DELETE with a body reads its DeleteOptions (dryRun included)
        # from the body and ignores the query parameters
        body = kwargs.get("body")
        dry_run = "All" if (body.get("dryRun") if body else kwargs.get("dry_run")) else None
        self.deleted.append((name, (body or {}).get("preconditions"), dry_run))
        return {}


class FakeClient:
    request_timeout = 5.0

    def __init__(self, core):
        self.core = core

    def call(self, what, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def test_check_mode_deletes_as_a_dry_run_and_does_not_wait():
    core = FakeCore([plugin_pod("old", "uid-1")])
    result = PluginRestart(FakeClient(core), request()).run(check_mode=True)
    assert result["changed"] and result["new_pod"] is None and result["old_pod"]["name"] == "old"
    assert core.deleted == [("old", {"uid": "uid-1"}, "All")]


def test_the_dry_run_of_check_mode_is_in_the_delete_options_body():
    # the API server ignores a dryRun query parameter when the DELETE has a body (the UID
    # precondition): a check-mode run that put it only on the URL deleted the pod on a real cluster
    calls = []

    class Recording(FakeCore):
        def delete_namespaced_pod(self, name, namespace, **kwargs):
            calls.append(kwargs)
            return super().delete_namespaced_pod(name, namespace, **kwargs)

    PluginRestart(FakeClient(Recording([plugin_pod("old", "uid-1")])), request()).run(check_mode=True)
    assert calls[0]["body"] == {"preconditions": {"uid": "uid-1"}, "dryRun": ["All"]}


@pytest.mark.parametrize("node_exists,word", [(True, "has no device plugin pod"), (False, "does not exist")])
def test_a_node_without_a_plugin_pod_fails_before_deleting_anything(node_exists, word):
    core = FakeCore([plugin_pod("going", "uid-1", deleting=True)], node_exists=node_exists)
    with pytest.raises(GpuNodeError, match=word) as info:
        PluginRestart(FakeClient(core), request()).run(check_mode=False)
    assert core.deleted == []
    assert info.value.action


@pytest.mark.parametrize("now_ready", [False, True])
def test_a_replacement_ready_for_a_moment_is_named_when_the_node_never_advertises(monkeypatch, now_ready):
    # a plugin that exits at once (NVML init fails) is Running and Ready for a moment: the pod
    # wait ends there, the Node never advertises; by the deadline the kubelet reports the exit
    # and the back-off, and that is the cause the module reports (not the Node)
    core = FakeCore([plugin_pod("old", "uid-1")])
    crashing = plugin_pod("new", "uid-2", ready=False, restarts=2, waiting="CrashLoopBackOff",
                          message="back-off 10s restarting failed container", last_exit=1)
    waits = iter([WaitResult(PodView.from_object(plugin_pod("new", "uid-2"))), WaitResult(None, {"gpu-07": node("8", "0")})])

    def fake_wait(lister, condition, deadline, **kwargs):
        core.pods = [plugin_pod("new", "uid-2") if now_ready else crashing]
        return next(waits)

    monkeypatch.setattr(_restart, "wait_until", fake_wait)
    with pytest.raises(K8sTimeoutError) as info:
        PluginRestart(FakeClient(core), request(timeout=15)).run(check_mode=False)
    if now_ready:
        assert "device plugin pod new is Ready but after 15s the node shows allocatable nvidia.com/gpu 0" in info.value.msg
    else:
        assert info.value.msg == (
            "node gpu-07: new device plugin pod new is not Ready after 15s (it was Ready for a moment): phase Running, "
            "waiting: CrashLoopBackOff (back-off 10s restarting failed container), 2 restarts, last exit code 1")
        assert info.value.details["new_pod"]["waiting_reason"] == "CrashLoopBackOff"
        assert "logs new --previous" in info.value.action
