# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""GPU smoke test: the pod it creates, how a pod's status is classified, events, and cleanup."""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import pytest

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError, K8sError
from ansible_collections.gpunode.bringup.plugins.module_utils._smoke import (
    CONTAINER,
    DEFAULT_COMMAND,
    DEFAULT_IMAGE,
    SmokeOutcome,
    SmokeRequest,
    SmokeTest,
    classify_pod,
    pod_manifest,
    summarize_events,
    timed_out,
)


def request(**overrides):
    values = dict(node="gpu-07", namespace="default", image=DEFAULT_IMAGE, command=list(DEFAULT_COMMAND),
                  resource_name="nvidia.com/gpu", name_prefix="gpunode-smoke-", timeout=300)
    values.update(overrides)
    return SmokeRequest(**values)


def smoke_pod(phase="Pending", state=None, conditions=None, reason=None, message=None, name="gpunode-smoke-abcde"):
    status = {"phase": phase}
    if state is not None:
        status["containerStatuses"] = [{"name": CONTAINER, "state": state}]
    if conditions is not None:
        status["conditions"] = conditions
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    return {"metadata": {"name": name, "namespace": "default"}, "spec": {"nodeName": "gpu-07"}, "status": status}


def test_the_pod_requests_one_gpu_on_the_node_and_never_restarts():
    pod = pod_manifest(request())
    spec = pod["spec"]
    assert pod["metadata"]["generateName"] == "gpunode-smoke-" and "name" not in pod["metadata"]
    assert spec["restartPolicy"] == "Never"
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-07"]}]}]
    assert "nodeName" not in spec  # through the scheduler, so "unschedulable" can be seen
    container = spec["containers"][0]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert container["command"] == ["nvidia-smi", "-L"] and container["image"] == DEFAULT_IMAGE
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]


def test_given_tolerations_replace_the_default():
    tolerations = [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]
    pod = pod_manifest(request(tolerations=tolerations, resource_name="nvidia.com/mig-1g.10gb"))
    assert pod["spec"]["tolerations"] == tolerations
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/mig-1g.10gb": "1"}


@pytest.mark.parametrize("pod,state,final,passed,reason", [
    (smoke_pod("Succeeded", {"terminated": {"exitCode": 0, "reason": "Completed"}}), "succeeded", True, True,
     "Completed"),
    (smoke_pod("Failed", {"terminated": {"exitCode": 9, "reason": "Error"}}), "failed", True, False, "Error"),
    (smoke_pod("Failed", reason="OutOfnvidia.com/gpu", message="Pod was rejected: Node didn't have enough resource"),
     "failed", True, False, "OutOfnvidia.com/gpu"),
    (smoke_pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                            "message": "0/4 nodes are available: 1 Insufficient nvidia.com/gpu."}]),
     "unschedulable", True, False, "Unschedulable"),
    (smoke_pod(state={"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}),
     "container_error", True, False, "ImagePullBackOff"),
    (smoke_pod(state={"waiting": {"reason": "CreateContainerError"}}), "container_error", True, False,
     "CreateContainerError"),
    (smoke_pod(state={"waiting": {"reason": "ErrImagePull"}}), "pending", False, False, "ErrImagePull"),  # retried
    (smoke_pod(state={"waiting": {"reason": "ContainerCreating"}}), "pending", False, False, "ContainerCreating"),
    (smoke_pod(conditions=[{"type": "PodScheduled", "status": "True"}]), "pending", False, False, None),
    (smoke_pod("Running", {"running": {"startedAt": "2026-01-01T10:00:00Z"}}), "running", False, False, None),
    (None, "failed", True, False, "Deleted"),
])
def test_classify_pod(pod, state, final, passed, reason):
    outcome = classify_pod(pod)
    assert (outcome.state, outcome.final, outcome.passed, outcome.reason) == (state, final, passed, reason)


def test_a_failed_container_reports_its_exit_code():
    outcome = classify_pod(smoke_pod("Failed", {"terminated": {"exitCode": 127, "reason": "Error",
                                                               "message": "nvidia-smi: not found"}}))
    assert outcome.message == "exit code 127; nvidia-smi: not found"
    assert outcome.describe() == "failed (phase Failed, Error: exit code 127; nvidia-smi: not found)"


@pytest.mark.parametrize("pod,message", [
    (smoke_pod(), "no final state within 30s"),
    (smoke_pod(state={"waiting": {"reason": "ContainerCreating"}}), "no final state within 30s; ContainerCreating"),
    (smoke_pod(state={"waiting": {"reason": "ErrImagePull", "message": "503"}}),
     "no final state within 30s; ErrImagePull: 503"),
])
def test_a_timeout_names_what_the_pod_was_waiting_for(pod, message):
    outcome = timed_out(pod, 30)
    assert (outcome.state, outcome.reason, outcome.message, outcome.final) == ("timeout", "Timeout", message, False)


def test_events_are_listed_oldest_first():
    events = [
        {"type": "Warning", "reason": "FailedScheduling", "message": "Insufficient nvidia.com/gpu", "count": 3,
         "lastTimestamp": "2026-01-01T10:00:09Z", "source": {"component": "default-scheduler"}},
        {"type": "Normal", "reason": "Scheduled", "message": "assigned", "eventTime": "2026-01-01T10:00:01.000000Z",
         "reportingComponent": "default-scheduler"},
    ]
    summary = summarize_events(events)
    assert [e["reason"] for e in summary] == ["Scheduled", "FailedScheduling"]
    assert summary[1] == {"type": "Warning", "reason": "FailedScheduling", "message": "Insufficient nvidia.com/gpu",
                          "count": 3, "time": "2026-01-01T10:00:09Z", "source": "default-scheduler"}
    assert summary[0]["count"] == 1 and summary[0]["source"] == "default-scheduler"


@pytest.mark.parametrize("overrides,word", [
    ({"node": ""}, "node"),
    ({"namespace": "Default"}, "namespace"),
    ({"image": " "}, "image"),
    ({"command": []}, "command"),
    ({"command": [""]}, "command"),
    ({"resource_name": "gpu"}, "resource_name"),
    ({"name_prefix": "Smoke-"}, "name_prefix"),
    ({"name_prefix": "x" * 59}, "name_prefix"),
    ({"timeout": 0}, "timeout"),
    ({"tolerations": [{"effect": "NoSchedule"}]}, r"tolerations\[0\]"),
    ({"tolerations": ["nvidia.com/gpu"]}, r"tolerations\[0\]"),
])
def test_bad_options_fail_naming_the_option(overrides, word):
    with pytest.raises(InvalidOptionError, match=word):
        request(**overrides).validate()


# --- the flow: the pod is always deleted -----------------------------------------------------

class FakeStream:
    """A watch that ends at once without an event."""

    def stream(self, amt=None, decode_content=False):
        return iter(())

    def close(self):
        pass

    def release_conn(self):
        pass


class FakeCore:
    def __init__(self, final_pod=None, list_error=None, pods=None):
        self.final_pod = final_pod
        self.list_error = list_error
        self.pods = list(pods or [])  # what successive LISTs answer (then final_pod)
        self.created = []
        self.deleted = []
        self.lists = 0

    def create_namespaced_pod(self, namespace, body, dry_run=None, **_):
        self.created.append((body, dry_run))
        return {"metadata": {"name": "gpunode-smoke-abcde", "namespace": namespace}}

    def list_namespaced_pod(self, namespace, **kwargs):
        if self.list_error:
            raise self.list_error
        if kwargs.get("watch"):
            return FakeStream()
        self.lists += 1
        pod = self.pods.pop(0) if self.pods else self.final_pod
        return {"metadata": {"resourceVersion": "9"}, "items": [pod]}

    def list_namespaced_event(self, namespace, field_selector=None, **_):
        assert field_selector == "involvedObject.kind=Pod,involvedObject.name=gpunode-smoke-abcde"
        return {"items": [{"type": "Normal", "reason": "Started", "message": "Started container smoke"}]}

    def read_namespaced_pod_log(self, name, namespace, container=None, tail_lines=None, **_):
        return "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n"

    def delete_namespaced_pod(self, name, namespace, **kwargs):
        self.deleted.append(name)
        return {}


class FakeClient:
    request_timeout = 5.0

    def __init__(self, core):
        self.core = core

    def call(self, what, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def test_a_passing_pod_returns_its_evidence_and_is_deleted():
    core = FakeCore(smoke_pod("Succeeded", {"terminated": {"exitCode": 0, "reason": "Completed"}}))
    result = SmokeTest(FakeClient(core), request()).run(check_mode=False)
    assert result["passed"] is True and result["changed"] is False and result["outcome"] == "succeeded"
    assert result["log"].startswith("GPU 0:") and result["events"][0]["reason"] == "Started"
    assert result["deleted"] is True and core.deleted == ["gpunode-smoke-abcde"]


class FakeClock:
    """Monotonic time that moves ``step`` seconds at each reading."""

    def __init__(self, step=3.0):
        self.now = 0.0
        self.step = step

    def __call__(self):
        self.now += self.step
        return self.now


UNSCHEDULABLE_POD = smoke_pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                           "message": "0/1 nodes are available"}])


def test_a_pod_that_never_started_has_no_log_and_is_deleted():
    core = FakeCore(UNSCHEDULABLE_POD)
    result = SmokeTest(FakeClient(core), request(), clock=FakeClock()).run(check_mode=False)
    assert result["passed"] is False and result["outcome"] == "unschedulable" and result["log"] is None
    assert "did not succeed: unschedulable" in result["msg"]
    assert core.deleted == ["gpunode-smoke-abcde"]


def test_unschedulable_for_a_moment_is_not_final():
    """The scheduler's first try may miss the node's GPU (its view lags the Node by an update);
    the pod it schedules at its next try is what counts."""
    core = FakeCore(smoke_pod("Succeeded", {"terminated": {"exitCode": 0, "reason": "Completed"}}),
                    pods=[UNSCHEDULABLE_POD])
    result = SmokeTest(FakeClient(core), request(), clock=FakeClock(step=1.0)).run(check_mode=False)
    assert result["passed"] is True and result["outcome"] == "succeeded", result
    assert core.lists >= 2


def test_the_pod_is_deleted_when_the_wait_itself_fails():
    core = FakeCore(list_error=K8sError("list smoke pod: forbidden", status=403))
    with pytest.raises(K8sError, match="forbidden"):
        SmokeTest(FakeClient(core), request()).run(check_mode=False)
    assert core.deleted == ["gpunode-smoke-abcde"]


def test_check_mode_validates_with_a_dry_run_and_skips():
    core = FakeCore()
    result = SmokeTest(FakeClient(core), request()).run(check_mode=True)
    assert result["skipped"] is True and result["changed"] is False and result["passed"] is None
    assert [dry_run for _body, dry_run in core.created] == ["All"]
    assert core.deleted == []


def test_outcome_describe_is_one_line():
    assert SmokeOutcome("succeeded", "Succeeded", "Completed").describe() == "succeeded (phase Succeeded, Completed)"
