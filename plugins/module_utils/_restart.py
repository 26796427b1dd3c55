# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""Restart the device plugin on one node and wait until the node advertises its GPUs again.

Restart = delete the plugin pod on the node (UID precondition) so its DaemonSet creates a new
one; then wait, within one deadline, for (1) a pod with a different UID on that node to be
Running and Ready, and (2) the Node's ``status.allocatable[resource]`` to reach the expected
count. Both waits are LIST + WATCH (:mod:`._wait`). The evaluations of pod and Node objects are
pure functions.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import (
    GpuNodeError,
    InvalidOptionError,
    K8sError,
    K8sTimeoutError,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_apply import call_json
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import is_not_found
from ansible_collections.gpunode.bringup.plugins.module_utils._wait import Deadline, ListWatch, Objects, wait_until

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
RESOURCE_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                           r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
MAX_TIMEOUT_S = 3600


def parse_count(quantity: Any) -> Optional[int]:
    """An extended resource quantity (``"8"``, ``8``) as an int; None when absent or not a count."""
    if isinstance(quantity, bool) or quantity is None:
        return None
    if isinstance(quantity, int):
        return quantity
    text = str(quantity).strip()
    return int(text) if text.isdigit() else None


@dataclass(frozen=True)
class PodView:
    """The parts of a plugin pod that say whether it works."""

    name: str
    namespace: str
    uid: str
    node: Optional[str]
    phase: str
    ready: bool
    restart_count: int
    waiting_reason: Optional[str]
    waiting_message: Optional[str]
    last_exit_code: Optional[int]
    terminating: bool
    created: Optional[str]

    @classmethod
    def from_object(cls, pod: Dict[str, Any]) -> "PodView":
        metadata = pod.get("metadata") or {}
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        restarts = 0
        waiting_reason = waiting_message = None
        last_exit = None
        for container in status.get("containerStatuses") or []:
            restarts = max(restarts, int(container.get("restartCount") or 0))
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting and waiting_reason is None:
                waiting_reason, waiting_message = waiting.get("reason"), waiting.get("message")
            terminated = (container.get("lastState") or {}).get("terminated") or {}
            if terminated and last_exit is None:
                last_exit = terminated.get("exitCode")
        return cls(
            name=str(metadata.get("name", "")),
            namespace=str(metadata.get("namespace", "")),
            uid=str(metadata.get("uid", "")),
            node=(pod.get("spec") or {}).get("nodeName"),
            phase=str(status.get("phase") or "Unknown"),
            ready=ready and status.get("phase") == "Running",
            restart_count=restarts,
            waiting_reason=waiting_reason,
            waiting_message=waiting_message,
            last_exit_code=last_exit,
            terminating=bool(metadata.get("deletionTimestamp")),
            created=metadata.get("creationTimestamp"),
        )

    def problem(self) -> Optional[str]:
        """Why the pod is not serving ("phase Pending, waiting: ContainerCreating"); None when Ready."""
        if self.ready and not self.terminating:
            return None
        parts = ["phase %s" % self.phase]
        if self.terminating:
            parts.append("terminating")
        if self.waiting_reason:
            detail = " (%s)" % self.waiting_message if self.waiting_message else ""
            parts.append("waiting: %s%s" % (self.waiting_reason, detail))
        elif not self.ready:
            parts.append("not Ready")
        if self.restart_count:
            parts.append("%d restarts" % self.restart_count)
        if self.last_exit_code is not None:
            parts.append("last exit code %s" % self.last_exit_code)
        return ", ".join(parts)

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "namespace": self.namespace, "uid": self.uid, "node": self.node,
                "phase": self.phase, "ready": self.ready, "restart_count": self.restart_count,
                "waiting_reason": self.waiting_reason, "created": self.created}


def live_pods(pods: Iterable[Dict[str, Any]]) -> List[PodView]:
    """The pods that are not being deleted, oldest first."""
    views = [PodView.from_object(pod) for pod in pods]
    return sorted((v for v in views if not v.terminating), key=lambda v: (v.created or "", v.name))


def replacement_pod(pods: Iterable[Dict[str, Any]], old_uids: Set[str]) -> Optional[PodView]:
    """The newest live pod whose UID is not one of ``old_uids`` (Ready or not)."""
    fresh = [v for v in live_pods(pods) if v.uid not in old_uids]
    return fresh[-1] if fresh else None


def ready_replacement(pods: Iterable[Dict[str, Any]], old_uids: Set[str]) -> Optional[PodView]:
    """A new pod that is Running and Ready; None while there is none."""
    fresh = [v for v in live_pods(pods) if v.uid not in old_uids and v.ready]
    return fresh[-1] if fresh else None


@dataclass(frozen=True)
class Advertised:
    """What the Node advertises for one resource."""

    capacity: Optional[int]
    allocatable: Optional[int]

    @classmethod
    def from_node(cls, node: Optional[Dict[str, Any]], resource: str) -> "Advertised":
        status = (node or {}).get("status") or {}
        return cls(parse_count((status.get("capacity") or {}).get(resource)),
                   parse_count((status.get("allocatable") or {}).get(resource)))

    def to_dict(self) -> Dict[str, Optional[int]]:
        return {"capacity": self.capacity, "allocatable": self.allocatable}


def advertised_problem(advertised: Advertised, resource: str, expected: Optional[int]) -> Optional[str]:
    """None when allocatable is the expected count (or, without one, equals a capacity above 0)."""
    allocatable = advertised.allocatable or 0
    if expected is not None:
        if allocatable == expected:
            return None
        return "allocatable %s %d of expected %d (capacity %d)" % (resource, allocatable, expected,
                                                                   advertised.capacity or 0)
    capacity = advertised.capacity or 0
    if capacity > 0 and allocatable == capacity:
        return None
    if capacity == 0:
        return "capacity %s is 0: the node advertises no GPUs" % resource
    return "allocatable %s %d of capacity %d (unhealthy devices)" % (resource, allocatable, capacity)


@dataclass(frozen=True)
class RestartRequest:
    """The module's options."""

    node: str
    namespace: str
    label_selector: str
    resource_name: str
    expected_count: Optional[int]
    timeout: int
    wait_only: bool = False  # delete nothing: wait for a Ready pod and the advertised count

    def validate(self) -> None:
        if not self.node:
            raise InvalidOptionError("node must be a node name, got an empty string")
        if not DNS_LABEL.match(self.namespace or "") or len(self.namespace) > 63:
            raise InvalidOptionError("namespace %r is not a valid namespace name" % self.namespace)
        if not (self.label_selector or "").strip():
            raise InvalidOptionError("label_selector must not be empty: it selects the device plugin pods "
                                     "(for example name=nvidia-device-plugin-ds)")
        if not RESOURCE_NAME.match(self.resource_name or ""):
            raise InvalidOptionError("resource_name %r is not a resource name (for example nvidia.com/gpu)"
                                     % self.resource_name)
        if self.expected_count is not None and self.expected_count < 1:
            raise InvalidOptionError("expected_count must be 1 or more, got %d; leave it out to expect the "
                                     "node's capacity" % self.expected_count)
        if not 1 <= self.timeout <= MAX_TIMEOUT_S:
            raise InvalidOptionError("timeout must be between 1 and %d seconds, got %d" % (MAX_TIMEOUT_S, self.timeout))

    @property
    def field_selector(self) -> str:
        return "spec.nodeName=%s" % self.node


class PluginRestart:
    """Delete the plugin pod on one node, then wait for its replacement and the advertised count."""

    def __init__(self, client: Any, request: RestartRequest, clock: Callable[[], float] = time.monotonic) -> None:
        request.validate()
        self.client = client
        self.request = request
        self.clock = clock
        self.pods_what = "device plugin pods (%s) in %s on node %s" % (request.label_selector, request.namespace,
                                                                       request.node)

    def _pods(self) -> ListWatch:
        request = self.request
        return ListWatch(self.client, self.pods_what, self.client.core.list_namespaced_pod, request.namespace,
                         label_selector=request.label_selector, field_selector=request.field_selector)

    def _node(self) -> ListWatch:
        return ListWatch(self.client, "node %s" % self.request.node, self.client.core.list_node,
                         field_selector="metadata.name=%s" % self.request.node)

    def _require_node(self) -> None:
        """Fail naming the node when it does not exist (the likelier cause of "no plugin pod")."""
        try:
            call_json(self.client, "get node %s" % self.request.node, self.client.core.read_node, self.request.node)
        except K8sError as exc:
            if is_not_found(exc):
                raise GpuNodeError("node %s does not exist" % self.request.node,
                                   action="check the node name (kubectl get nodes)")
            raise

    def _delete(self, pod: PodView, dry_run: bool) -> None:
        # A DELETE with a body takes its DeleteOptions from the body alone: the API server ignores
        # the query parameters then, so dryRun goes into the body beside the precondition (and on
        # the URL too, where the audit log shows it).
        body: Dict[str, Any] = {"preconditions": {"uid": pod.uid}}
        kwargs: Dict[str, Any] = {"body": body}
        if dry_run:
            body["dryRun"] = ["All"]
            kwargs["dry_run"] = "All"
        try:
            call_json(self.client, "delete pod %s/%s" % (pod.namespace, pod.name),
                      self.client.core.delete_namespaced_pod, pod.name, pod.namespace, **kwargs)
        except K8sError as exc:
            if not is_not_found(exc):  # already gone: its DaemonSet replaces it all the same
                raise

    def wait(self, check_mode: bool) -> Dict[str, Any]:
        """wait_only: the DaemonSet is about to (re)create the pod (e.g. a label was just added)."""
        request = self.request
        result: Dict[str, Any] = {"changed": False, "node": request.node, "old_pod": None, "deleted_pods": [],
                                  "new_pod": None, "waited_seconds": 0.0, "advertised": None}
        if check_mode:
            result["msg"] = "node %s: would wait for a Ready device plugin pod" % request.node
            return result
        deadline = Deadline(request.timeout, self.clock)
        pods = wait_until(self._pods(), lambda objects: ready_replacement(objects.values(), set()), deadline)
        if pods.value is None:
            current = live_pods(pods.objects.values())
            if not current:
                self._require_node()
            raise K8sTimeoutError(
                "node %s: no Ready device plugin pod after %ds (%s)" % (
                    request.node, request.timeout,
                    "; ".join("%s: %s" % (p.name, p.problem()) for p in current) or "no pod was created"),
                action="check the scheduling step (labels, affinity, taints) and the plugin pod's log",
                node=request.node, waited_seconds=round(deadline.elapsed, 3))
        new_pod = pods.value
        node = wait_until(self._node(), self._advertised_ok, deadline)
        advertised = Advertised.from_node(self._only(node.objects), request.resource_name)
        result.update(new_pod=new_pod.to_dict(), waited_seconds=round(deadline.elapsed, 3),
                      advertised=advertised.to_dict())
        if node.value is None:
            raise self._not_ready_after_all(new_pod, result) or self._advertised_timeout(node.objects, advertised,
                                                                                         result)
        result["msg"] = "node %s: device plugin pod %s Ready; %s allocatable %s" % (
            request.node, new_pod.name, request.resource_name, advertised.allocatable)
        return result

    def run(self, check_mode: bool) -> Dict[str, Any]:
        request = self.request
        if request.wait_only:
            return self.wait(check_mode)
        items, _version = self._pods().list()
        old = live_pods(items)
        if not old:
            self._require_node()
            raise GpuNodeError(
                "node %s has no device plugin pod (label selector %s in namespace %s)"
                % (request.node, request.label_selector, request.namespace),
                action="check the scheduling step: the DaemonSet's nodeSelector/affinity labels and the "
                       "node's taints")
        old_uids = {pod.uid for pod in old}
        for pod in old:
            self._delete(pod, dry_run=check_mode)
        result: Dict[str, Any] = {
            "changed": True,
            "node": request.node,
            "old_pod": old[0].to_dict(),
            "deleted_pods": [pod.name for pod in old],
            "new_pod": None,
            "waited_seconds": 0.0,
            "advertised": None,
            "diff": {"before": {"pod": old[0].name, "uid": old[0].uid}, "after": {"pod": "(recreated by the DaemonSet)"},
                     "before_header": "plugin pod on node %s" % request.node,
                     "after_header": "plugin pod on node %s" % request.node},
        }
        if check_mode:
            result["msg"] = "node %s: device plugin pod %s would be deleted and recreated" % (request.node, old[0].name)
            return result
        deadline = Deadline(request.timeout, self.clock)
        pods = wait_until(self._pods(), lambda objects: ready_replacement(objects.values(), old_uids), deadline)
        if pods.value is None:
            raise self._pod_timeout(pods.objects, old_uids, old[0], deadline)
        new_pod = pods.value
        node = wait_until(self._node(), self._advertised_ok, deadline)
        advertised = Advertised.from_node(self._only(node.objects), request.resource_name)
        result.update(new_pod=new_pod.to_dict(), waited_seconds=round(deadline.elapsed, 3),
                      advertised=advertised.to_dict())
        result["diff"]["after"] = {"pod": new_pod.name, "uid": new_pod.uid}
        if node.value is None:
            raise self._not_ready_after_all(new_pod, result) or self._advertised_timeout(node.objects, advertised,
                                                                                         result)
        result["msg"] = ("node %s: device plugin pod %s replaced by %s; %s allocatable %s"
                         % (request.node, old[0].name, new_pod.name, request.resource_name, advertised.allocatable))
        return result

    @staticmethod
    def _only(objects: Objects) -> Optional[Dict[str, Any]]:
        return next(iter(objects.values()), None)

    def _advertised_ok(self, objects: Objects) -> Optional[Advertised]:
        node = self._only(objects)
        if node is None:
            return None
        advertised = Advertised.from_node(node, self.request.resource_name)
        problem = advertised_problem(advertised, self.request.resource_name, self.request.expected_count)
        return advertised if problem is None else None

    def _pod_timeout(self, objects: Objects, old_uids: Set[str], old: PodView, deadline: Deadline) -> GpuNodeError:
        request = self.request
        new = replacement_pod(objects.values(), old_uids)
        if new is None:
            return K8sTimeoutError(
                "node %s: no new device plugin pod appeared within %ds after deleting %s"
                % (request.node, request.timeout, old.name),
                action="check that the DaemonSet still targets the node (scheduling step) and that its "
                       "controller runs (kubectl -n %s get ds,pods -o wide)" % request.namespace,
                node=request.node, old_pod=old.to_dict(), new_pod=None, waited_seconds=round(deadline.elapsed, 3))
        return K8sTimeoutError(
            "node %s: new device plugin pod %s is not Ready after %ds: %s"
            % (request.node, new.name, request.timeout, new.problem()),
            action="read its log (kubectl -n %s logs %s) and check the driver and runtime steps"
                   % (request.namespace, new.name),
            node=request.node, old_pod=old.to_dict(), new_pod=new.to_dict(), waited_seconds=round(deadline.elapsed, 3))

    def _not_ready_after_all(self, new_pod: PodView, result: Dict[str, Any]) -> Optional[GpuNodeError]:
        """When the Node never advertised: the replacement as the API shows it now. A container
        that starts and exits (a plugin that cannot initialise NVML) makes its pod Ready for a
        moment before the kubelet reports the exit and the back-off: then the pod is the cause,
        not the Node. None when the pod is still Ready."""
        request = self.request
        items, _version = self._pods().list()
        now = next((view for view in (PodView.from_object(pod) for pod in items) if view.uid == new_pod.uid), None)
        problem = "it was deleted" if now is None else now.problem()
        if problem is None:
            return None
        result["new_pod"] = now.to_dict() if now is not None else result["new_pod"]
        details = {k: v for k, v in result.items() if k in ("node", "old_pod", "new_pod", "waited_seconds", "advertised")}
        return K8sTimeoutError(
            "node %s: new device plugin pod %s is not Ready after %ds (it was Ready for a moment): %s"
            % (request.node, new_pod.name, request.timeout, problem),
            action="read its log (kubectl -n %s logs %s --previous) and check the driver and runtime steps"
                   % (request.namespace, new_pod.name),
            **details)

    def _advertised_timeout(self, objects: Objects, advertised: Advertised, result: Dict[str, Any]) -> GpuNodeError:
        request = self.request
        details = {k: v for k, v in result.items() if k in ("node", "old_pod", "new_pod", "waited_seconds", "advertised")}
        if self._only(objects) is None:
            return K8sTimeoutError("node %s no longer exists (waiting for it to advertise %s)"
                                   % (request.node, request.resource_name), **details)
        problem = advertised_problem(advertised, request.resource_name, request.expected_count)
        return K8sTimeoutError(
            "node %s: device plugin pod %s is Ready but after %ds the node shows %s"
            % (request.node, result["new_pod"]["name"], request.timeout, problem),
            action="probe the plugin socket and its kubelet registration on the node "
                   "(gpunode.bringup.device_plugin_probe); compare with the GPUs NVML lists",
            **details)


def run_plugin_restart(client: Any, request: RestartRequest, check_mode: bool) -> Dict[str, Any]:
    """The module's body."""
    return PluginRestart(client, request).run(check_mode)
