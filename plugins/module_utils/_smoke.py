# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""The GPU smoke workload: one pod, pinned to the node, that requests one GPU and must succeed.

The pod goes through the scheduler (required node affinity on ``metadata.name``, the way the
DaemonSet controller pins its pods), so an unschedulable pod, for example one the node has no
free GPU for, is reported as such once that has held for ``UNSCHEDULABLE_SETTLE_S`` (the
scheduler's view of the Node may lag an update, and it tries again). The wait is LIST + WATCH of that one pod (:mod:`._wait`)
until the pod reaches a final outcome (:func:`classify_pod`) or the deadline passes. The pod is
deleted afterwards in every case, also when the wait fails.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import (
    InvalidOptionError,
    K8sError,
    K8sForbiddenError,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_apply import call_json
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import is_not_found
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_names import (
    check_dns_subdomain,
    check_image_reference,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._wait import Deadline, ListWatch, Objects, wait_until

DEFAULT_IMAGE = "nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04"
DEFAULT_COMMAND = ("nvidia-smi", "-L")
CONTAINER = "smoke"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
NAME_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*)?$")
MAX_TIMEOUT_S = 3600
LOG_TAIL_LINES = 20
# Container waiting reasons that do not resolve without an operator (the pod never restarts).
STUCK_REASONS = ("ErrImageNeverPull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError", "RunContainerError")

PENDING = "pending"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
UNSCHEDULABLE = "unschedulable"
CONTAINER_ERROR = "container_error"
TIMEOUT = "timeout"
FINAL = (SUCCEEDED, FAILED, UNSCHEDULABLE, CONTAINER_ERROR)
# The scheduler may find the node without a free GPU for a moment (its view of the Node lags the
# API by an update) and schedules the pod at its next try: "Unschedulable" counts as final only
# when it still holds after this long.
UNSCHEDULABLE_SETTLE_S = 10.0


@dataclass(frozen=True)
class SmokeRequest:
    """The module's options."""

    node: str
    namespace: str
    image: str
    command: List[str]
    resource_name: str
    name_prefix: str
    timeout: int
    tolerations: Optional[List[Dict[str, Any]]] = None

    def validate(self) -> None:
        check_dns_subdomain("node", self.node)
        if not DNS_LABEL.match(self.namespace or "") or len(self.namespace) > 63:
            raise InvalidOptionError("namespace %r is not a valid namespace name" % self.namespace)
        check_image_reference("image", self.image)
        if not self.command or not all(isinstance(arg, str) for arg in self.command) or not self.command[0]:
            raise InvalidOptionError("command must be a non-empty list, for example ['nvidia-smi', '-L']")
        if not self.resource_name or "/" not in self.resource_name:
            raise InvalidOptionError("resource_name %r is not an extended resource name (for example nvidia.com/gpu)"
                                     % self.resource_name)
        if not NAME_PREFIX.match(self.name_prefix or "") or len(self.name_prefix) > 58:
            raise InvalidOptionError("name_prefix %r must be lowercase letters, digits and '-', start with a "
                                     "letter or digit, and be at most 58 characters" % self.name_prefix)
        if not 1 <= self.timeout <= MAX_TIMEOUT_S:
            raise InvalidOptionError("timeout must be between 1 and %d seconds, got %d" % (MAX_TIMEOUT_S, self.timeout))
        for index, toleration in enumerate(self.tolerations or []):
            if not isinstance(toleration, dict) or not (toleration.get("key") or toleration.get("operator") == "Exists"):
                raise InvalidOptionError("tolerations[%d] must be a toleration with a key (or operator Exists), got %r"
                                         % (index, toleration))


def pod_manifest(request: SmokeRequest) -> Dict[str, Any]:
    """The smoke pod: pinned to the node by required affinity, one GPU, never restarted."""
    tolerations = request.tolerations
    if tolerations is None:
        tolerations = [{"key": request.resource_name, "operator": "Exists"}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": request.name_prefix,
            "namespace": request.namespace,
            "labels": {"app.kubernetes.io/name": "gpunode-smoke-test",
                       "app.kubernetes.io/managed-by": "gpunode.bringup"},
            "annotations": {"gpunode.bringup/node": request.node},
        },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 5,
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [request.node]}]}]}}},
            "tolerations": [dict(t) for t in tolerations],
            "containers": [{
                "name": CONTAINER,
                "image": request.image,
                "command": list(request.command),
                "resources": {"limits": {request.resource_name: "1"}},
            }],
        },
    }


@dataclass(frozen=True)
class SmokeOutcome:
    """Where a smoke pod stands: ``state`` is one of pending, running, succeeded, failed,
    unschedulable, container_error (the last four are final) or timeout."""

    state: str
    phase: str
    reason: Optional[str] = None
    message: Optional[str] = None

    @property
    def final(self) -> bool:
        return self.state in FINAL

    @property
    def passed(self) -> bool:
        return self.state == SUCCEEDED

    def describe(self) -> str:
        text = "%s (phase %s" % (self.state, self.phase)
        if self.reason:
            text += ", %s" % self.reason
        if self.message:
            text += ": %s" % self.message
        return text + ")"


def container_state(pod: Dict[str, Any]) -> Dict[str, Any]:
    """The smoke container's ``state`` (``{"terminated": {...}}``, ...); empty before it exists."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            return dict(status.get("state") or {})
    return {}


def classify_pod(pod: Optional[Dict[str, Any]]) -> SmokeOutcome:
    """The smoke pod's outcome from its status alone."""
    if pod is None:
        return SmokeOutcome(FAILED, "Unknown", "Deleted", "the pod was deleted before it finished")
    status = pod.get("status") or {}
    phase = str(status.get("phase") or "Pending")
    state = container_state(pod)
    terminated = state.get("terminated") or {}
    if phase == "Succeeded":
        return SmokeOutcome(SUCCEEDED, phase, terminated.get("reason") or "Completed")
    if phase == "Failed":
        reason = status.get("reason") or terminated.get("reason") or "Failed"
        message = status.get("message") or terminated.get("message")
        if terminated.get("exitCode") is not None:
            message = "exit code %s%s" % (terminated["exitCode"], "; " + message if message else "")
        return SmokeOutcome(FAILED, phase, reason, message)
    for condition in status.get("conditions") or []:
        if (condition.get("type") == "PodScheduled" and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"):
            return SmokeOutcome(UNSCHEDULABLE, phase, "Unschedulable", condition.get("message"))
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in STUCK_REASONS:
        return SmokeOutcome(CONTAINER_ERROR, phase, waiting["reason"], waiting.get("message"))
    if phase == "Running":
        return SmokeOutcome(RUNNING, phase)
    return SmokeOutcome(PENDING, phase, waiting.get("reason"), waiting.get("message"))


def timed_out(pod: Optional[Dict[str, Any]], timeout: int) -> SmokeOutcome:
    """The outcome of a pod that reached no final state within ``timeout`` seconds."""
    last = classify_pod(pod)
    message = "no final state within %ds" % timeout
    if last.reason:
        message += "; %s%s" % (last.reason, ": " + last.message if last.message else "")
    return SmokeOutcome(TIMEOUT, last.phase, "Timeout", message)


def event_time(event: Dict[str, Any]) -> str:
    return str(event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
               or (event.get("metadata") or {}).get("creationTimestamp") or "")


def summarize_events(events: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The pod's events, oldest first, as ``kubectl describe`` shows them."""
    return [{"type": e.get("type"), "reason": e.get("reason"), "message": e.get("message"),
             "count": e.get("count") or 1, "time": event_time(e) or None,
             "source": (e.get("source") or {}).get("component") or e.get("reportingComponent")}
            for e in sorted(events, key=event_time)]


class SmokeTest:
    """Create the pod, watch it to a final outcome or the deadline, collect evidence, delete it."""

    def __init__(self, client: Any, request: SmokeRequest, clock: Callable[[], float] = time.monotonic) -> None:
        request.validate()
        self.client = client
        self.request = request
        self.clock = clock

    def create(self, dry_run: bool) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {"dry_run": "All"} if dry_run else {}
        what = "create smoke pod %s* in %s" % (self.request.name_prefix, self.request.namespace)
        try:
            return call_json(self.client, what, self.client.core.create_namespaced_pod, self.request.namespace,
                             pod_manifest(self.request), **kwargs)
        except ValueError as exc:  # the client's model validation of the manifest (a field of the wrong type)
            detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:]
                               if line.strip() and not line.strip().startswith("For further information"))
            raise InvalidOptionError("the smoke pod built from the options is not a valid Pod: %s" % detail,
                                     action="check the options tolerations, command and image")

    def delete(self, name: str) -> None:
        try:
            call_json(self.client, "delete smoke pod %s/%s" % (self.request.namespace, name),
                      self.client.core.delete_namespaced_pod, name, self.request.namespace,
                      grace_period_seconds=0, propagation_policy="Background")
        except K8sError as exc:
            if not is_not_found(exc):
                raise

    def events(self, name: str) -> List[Dict[str, Any]]:
        body = call_json(self.client, "list events of pod %s/%s" % (self.request.namespace, name),
                         self.client.core.list_namespaced_event, self.request.namespace,
                         field_selector="involvedObject.kind=Pod,involvedObject.name=%s" % name)
        return summarize_events(list(body.get("items") or []))

    def log(self, name: str) -> Optional[str]:
        """The container's last lines; None when it never started (the API refuses the read)."""
        try:
            text = self.client.call("read log of pod %s/%s" % (self.request.namespace, name),
                                    self.client.core.read_namespaced_pod_log, name, self.request.namespace,
                                    container=CONTAINER, tail_lines=LOG_TAIL_LINES)
        except K8sForbiddenError:
            raise  # a missing RBAC rule is the operator's to fix, not an empty log
        except K8sError:
            return None
        return text if isinstance(text, str) else None

    def run(self, check_mode: bool) -> Dict[str, Any]:
        request = self.request
        if check_mode:
            self.create(dry_run=True)  # the API validates the pod and our rights to create it
            return {"changed": False, "skipped": True, "passed": None, "node": request.node,
                    "msg": "node %s: check mode: smoke pod validated by a server-side dry run, not run" % request.node}
        started = self.clock()
        pod = self.create(dry_run=False)
        name = pod["metadata"]["name"]
        try:
            result = self._observe(name, started)
        except BaseException:
            try:
                self.delete(name)
            except K8sError:
                pass  # the first failure is the one to report
            raise
        self.delete(name)
        result["deleted"] = True
        return result

    def _observe(self, name: str, started: float) -> Dict[str, Any]:
        request = self.request
        deadline = Deadline(request.timeout, self.clock)
        pods = ListWatch(self.client, "smoke pod %s/%s" % (request.namespace, name),
                         self.client.core.list_namespaced_pod, request.namespace,
                         field_selector="metadata.name=%s" % name)
        settle = Deadline(min(UNSCHEDULABLE_SETTLE_S, request.timeout), self.clock)
        waited = wait_until(pods, self._final_once_scheduled, settle)
        if waited.value is None and not deadline.expired:
            waited = wait_until(pods, self._final, deadline)
        pod = waited.objects.get("%s/%s" % (request.namespace, name))
        outcome = waited.value or timed_out(pod, request.timeout)
        events = self.events(name)
        state = container_state(pod or {})
        log = self.log(name) if ("running" in state or "terminated" in state) else None
        duration = round(self.clock() - started, 3)
        if outcome.passed:
            msg = "node %s: smoke pod %s succeeded in %.1fs" % (request.node, name, duration)
        else:
            msg = "node %s: smoke pod %s did not succeed: %s" % (request.node, name, outcome.describe())
        return {
            "changed": False,
            "passed": outcome.passed,
            "outcome": outcome.state,
            "phase": outcome.phase,
            "reason": outcome.reason,
            "message": outcome.message,
            "node": request.node,
            "pod": {"name": name, "namespace": request.namespace, "node": ((pod or {}).get("spec") or {}).get("nodeName")},
            "container_state": state,
            "events": events,
            "log": log,
            "duration": duration,
            "msg": msg,
        }

    def _final(self, objects: Objects) -> Optional[SmokeOutcome]:
        pod = next(iter(objects.values()), None)
        outcome = classify_pod(pod)
        return outcome if outcome.final else None

    def _final_once_scheduled(self, objects: Objects) -> Optional[SmokeOutcome]:
        """Final outcomes but "Unschedulable", which may be the scheduler's passing view."""
        outcome = self._final(objects)
        return outcome if outcome is not None and outcome.state != UNSCHEDULABLE else None


def run_smoke_test(client: Any, request: SmokeRequest, check_mode: bool) -> Dict[str, Any]:
    """The module's body."""
    return SmokeTest(client, request).run(check_mode)
