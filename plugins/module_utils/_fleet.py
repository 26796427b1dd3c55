# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""The device plugin as the fleet sees it: which nodes its DaemonSet targets and why not,
each node's plugin pod, its classified log, the nvidia.com/* resources the node advertises,
and findings with actions.

The pure functions take API objects as the API serves them (camelCase dicts) and are unit
tested with recorded objects. :class:`FleetReader` reads a whole fleet with a constant number of
calls (the DaemonSet, one LIST of nodes, one LIST of plugin pods) plus one log read per node
whose plugin is not healthy.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError, K8sError
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_apply import call_json, read_path
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import K8sClient, is_not_found
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_names import (
    check_dns_subdomain,
    check_labels,
    check_namespace,
)

RESOURCE_PREFIX = "nvidia.com/"
GPU_RESOURCE = "nvidia.com/gpu"
PLUGIN_CONTAINER = "nvidia-device-plugin-ctr"
BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")
# Labels that decide GPU scheduling, reported for every node (plus those the DaemonSet selects on).
GPU_LABEL_PREFIXES = ("nvidia.com/", "feature.node.kubernetes.io/pci-10de")

# The DaemonSet controller adds these tolerations to every daemon pod
# (k8s.io/kubernetes/pkg/controller/daemon/util.AddOrUpdateDaemonPodTolerations); a node's own
# condition taints and a cordon therefore never keep a DaemonSet pod away.
DAEMONSET_AUTO_TOLERATIONS: Tuple[Dict[str, str], ...] = (
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/pid-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"},
)
HOST_NETWORK_TOLERATION = {"key": "node.kubernetes.io/network-unavailable", "operator": "Exists",
                           "effect": "NoSchedule"}

LOG_READ_CHOICES = ("when_unhealthy", "always", "never")


# --------------------------------------------------------------------------- scheduling

@dataclass
class SchedulingReason:
    """One reason the DaemonSet does not target a node."""

    reason: str  # missing_label | label_mismatch | unmet_affinity | untolerated_taint
    message: str
    key: Optional[str] = None
    value: Optional[str] = None  # the label value wanted, or the taint's value
    effect: Optional[str] = None  # taints only
    actual: Optional[str] = None  # the node's label value, when it has one
    term: Optional[int] = None  # affinity: 1-based index of the unmet term
    operator: Optional[str] = None  # affinity: the failed expression's operator
    values: Optional[List[str]] = None  # affinity: the failed expression's values


@dataclass
class SchedulingMatch:
    targeted: bool
    reasons: List[SchedulingReason] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"targeted": self.targeted,
                "reasons": [{k: v for k, v in asdict(r).items() if v is not None} for r in self.reasons]}


def tolerates(toleration: Dict[str, Any], taint: Dict[str, Any]) -> bool:
    """Whether one toleration tolerates one taint (the scheduler's rule)."""
    effect = toleration.get("effect") or ""
    if effect and effect != taint.get("effect"):
        return False
    operator = toleration.get("operator") or "Equal"
    key = toleration.get("key") or ""
    if not key:
        return operator == "Exists"
    if key != taint.get("key"):
        return False
    if operator == "Exists":
        return True
    return operator == "Equal" and (toleration.get("value") or "") == (taint.get("value") or "")


def daemon_pod_tolerations(pod_spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The pod's own tolerations plus those the DaemonSet controller adds."""
    tolerations = list(pod_spec.get("tolerations") or [])
    tolerations.extend(DAEMONSET_AUTO_TOLERATIONS)
    if pod_spec.get("hostNetwork"):
        tolerations.append(HOST_NETWORK_TOLERATION)
    return tolerations


def _int_or_none(text: Optional[str]) -> Optional[int]:
    try:
        return int(str(text))
    except (TypeError, ValueError):
        return None


def requirement_matches(requirement: Dict[str, Any], values_by_key: Dict[str, str]) -> bool:
    """A NodeSelectorRequirement against a node's labels (or fields)."""
    key = requirement.get("key")
    operator = requirement.get("operator")
    values = [str(v) for v in requirement.get("values") or []]
    present = key in values_by_key
    actual = values_by_key.get(key) if key is not None else None
    if operator == "In":
        return present and actual in values
    if operator == "NotIn":
        return not present or actual not in values
    if operator == "Exists":
        return present
    if operator == "DoesNotExist":
        return not present
    if operator in ("Gt", "Lt") and present and len(values) == 1:
        left, right = _int_or_none(actual), _int_or_none(values[0])
        if left is None or right is None:
            return False
        return left > right if operator == "Gt" else left < right
    return False


def _term_failures(term: Dict[str, Any], labels: Dict[str, str], name: str) -> Optional[List[Dict[str, Any]]]:
    """The failed requirements of one NodeSelectorTerm; None when the term is empty (matches nothing)."""
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not expressions and not fields:
        return None
    failed = [r for r in expressions if not requirement_matches(r, labels)]
    failed.extend(r for r in fields if not requirement_matches(r, {"metadata.name": name}))
    return failed


def _describe_requirement(requirement: Dict[str, Any], labels: Dict[str, str]) -> str:
    key = requirement.get("key")
    values = requirement.get("values") or []
    wanted = "%s %s %s" % (key, requirement.get("operator"), "[%s]" % ", ".join(str(v) for v in values) if values else "")
    if key in labels:
        return "%s (node has %s=%s)" % (wanted.strip(), key, labels[key])
    return "%s (label absent)" % wanted.strip()


def required_node_affinity_terms(pod_spec: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
    """The required node affinity's terms, or None when the pod has no required node affinity."""
    affinity = (pod_spec.get("affinity") or {}).get("nodeAffinity") or {}
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        return None
    return list(required.get("nodeSelectorTerms") or [])


def scheduling_match(pod_spec: Dict[str, Any], node: Dict[str, Any]) -> SchedulingMatch:
    """Whether a DaemonSet with this pod template targets the node, and each reason when not:
    every nodeSelector label missing or different, every required affinity term unmet (when none
    matches), every NoSchedule/NoExecute taint not tolerated."""
    metadata = node.get("metadata") or {}
    name = metadata.get("name", "")
    labels: Dict[str, str] = {k: str(v) for k, v in (metadata.get("labels") or {}).items()}
    reasons: List[SchedulingReason] = []

    for key, value in sorted((pod_spec.get("nodeSelector") or {}).items()):
        value = str(value)
        if key not in labels:
            reasons.append(SchedulingReason(
                "missing_label", "node has no label %s (the DaemonSet's nodeSelector wants %s=%s)" % (key, key, value),
                key=key, value=value))
        elif labels[key] != value:
            reasons.append(SchedulingReason(
                "label_mismatch", "node label %s=%s, the DaemonSet's nodeSelector wants %s=%s"
                % (key, labels[key], key, value), key=key, value=value, actual=labels[key]))

    terms = required_node_affinity_terms(pod_spec)
    if terms is not None:
        term_failures = [_term_failures(term, labels, name) for term in terms]
        if not any(failures == [] for failures in term_failures):
            if not terms:
                reasons.append(SchedulingReason(
                    "unmet_affinity", "the DaemonSet's required node affinity has no terms, so it matches no node"))
            for index, failures in enumerate(term_failures, start=1):
                if failures is None:
                    reasons.append(SchedulingReason(
                        "unmet_affinity", "required node affinity term %d is empty and matches no node" % index,
                        term=index))
                    continue
                first = failures[0]
                values = [str(v) for v in first.get("values") or []]
                reasons.append(SchedulingReason(
                    "unmet_affinity",
                    "required node affinity term %d not met: %s" % (
                        index, "; ".join(_describe_requirement(r, labels) for r in failures)),
                    key=first.get("key"), operator=first.get("operator"), values=values,
                    value=values[0] if first.get("operator") == "In" and len(values) == 1 else None,
                    actual=labels.get(first.get("key") or ""), term=index))

    tolerations = daemon_pod_tolerations(pod_spec)
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") not in BLOCKING_EFFECTS:
            continue
        if not any(tolerates(t, taint) for t in tolerations):
            shown = "%s=%s:%s" % (taint.get("key"), taint.get("value"), taint.get("effect")) if taint.get("value") \
                else "%s:%s" % (taint.get("key"), taint.get("effect"))
            reasons.append(SchedulingReason(
                "untolerated_taint", "node taint %s is not tolerated by the DaemonSet" % shown,
                key=taint.get("key"), value=taint.get("value"), effect=taint.get("effect")))
    return SchedulingMatch(not reasons, reasons)


# --------------------------------------------------------------------------- pods

def parse_time(text: Optional[str]) -> Optional[datetime]:
    """An RFC 3339 timestamp as the API writes it, as an aware datetime."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass
class PluginPod:
    """The plugin pod on one node, in the operator's words."""

    name: str
    node: Optional[str]
    phase: Optional[str]
    ready: bool
    restarts: int = 0
    waiting_reason: Optional[str] = None
    waiting_message: Optional[str] = None
    terminated_reason: Optional[str] = None
    last_termination_reason: Optional[str] = None
    last_exit_code: Optional[int] = None
    started_at: Optional[str] = None
    age_seconds: Optional[int] = None
    deleting: bool = False
    container: Optional[str] = None

    @property
    def healthy(self) -> bool:
        return self.phase == "Running" and self.ready and not self.deleting and not self.waiting_reason

    def why_not_ready(self) -> str:
        """One phrase for a failure message: the waiting reason first, it is what kubectl shows."""
        if self.deleting:
            return "pod %s is terminating" % self.name
        if self.waiting_reason:
            text = self.waiting_reason
            if self.last_termination_reason or self.last_exit_code is not None:
                text += " (last exit: %s, code %s)" % (self.last_termination_reason, self.last_exit_code)
            elif self.waiting_message:
                text += " (%s)" % self.waiting_message
            return text
        if self.terminated_reason:
            return "container terminated: %s" % self.terminated_reason
        if self.phase != "Running":
            return "pod phase %s" % (self.phase or "unknown")
        return "Running but not Ready"

    def to_dict(self) -> Dict[str, Any]:
        result = asdict(self)
        result["healthy"] = self.healthy
        return result


def _container_status(pod: Dict[str, Any], container: str = PLUGIN_CONTAINER) -> Dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == container:
            return status
    return statuses[0] if statuses else {}


def classify_pod(pod: Dict[str, Any], now: Optional[datetime] = None) -> PluginPod:
    """The plugin pod's state from its status: phase, readiness, restarts, waiting and last
    termination reasons, age."""
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    container = _container_status(pod)
    state = container.get("state") or {}
    last = (container.get("lastState") or {}).get("terminated") or {}
    ready_condition = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    ready = bool(container.get("ready")) if container else bool(
        ready_condition and ready_condition[0].get("status") == "True")
    created = parse_time(metadata.get("creationTimestamp"))
    now = now or datetime.now(timezone.utc)
    running_since = (state.get("running") or {}).get("startedAt")
    exit_code = last.get("exitCode")
    return PluginPod(
        name=metadata.get("name", ""),
        node=(pod.get("spec") or {}).get("nodeName"),
        phase=status.get("phase"),
        ready=ready,
        restarts=int(container.get("restartCount") or 0),
        waiting_reason=(state.get("waiting") or {}).get("reason"),
        waiting_message=(state.get("waiting") or {}).get("message"),
        terminated_reason=(state.get("terminated") or {}).get("reason"),
        last_termination_reason=last.get("reason"),
        last_exit_code=int(exit_code) if exit_code is not None else None,
        started_at=running_since or status.get("startTime"),
        age_seconds=max(0, int((now - created).total_seconds())) if created else None,
        deleting=bool(metadata.get("deletionTimestamp")),
        container=container.get("name"),
    )


def pods_by_node(pods: Iterable[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    result: Dict[str, List[Dict[str, Any]]] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            result.setdefault(node, []).append(pod)
    return result


def current_pod(pods: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Of a node's plugin pods (two during a rolling update), the newest one not being deleted."""
    if not pods:
        return None
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")] or list(pods)
    return max(live, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")


# --------------------------------------------------------------------------- log

@dataclass(frozen=True)
class LogSignature:
    name: str
    pattern: str
    meaning: str


# The plugin's own log lines (NVIDIA/k8s-device-plugin, klog). Order is the precedence within
# the plugin's last start: a root cause before its consequences (an incompatible platform also
# logs "No devices found"; an XID comes after a successful registration).
LOG_SIGNATURES: Tuple[LogSignature, ...] = (
    LogSignature("incompatible_strategy", r"Incompatible strategy detected|invalid device discovery strategy",
                 "the container cannot see NVML or /dev/nvidia*: it does not run under the NVIDIA runtime"),
    LogSignature("nvml_init_failed",
                 r"(?i)failed to initialize NVML|could not load NVML library|nvml init failed|"
                 r"error creating nvml|NVML library not found",
                 "NVML could not initialise in the plugin container: driver not loaded, or library/driver mismatch"),
    LogSignature("registration_failed", r"Could not register device plugin|Could not contact Kubelet",
                 "the plugin could not register with the kubelet (kubelet.sock missing or refusing)"),
    LogSignature("xid_unhealthy", r"XidCriticalError: Xid=\d+|device marked unhealthy",
                 "a GPU reported a critical XID and the plugin marked it unhealthy"),
    LogSignature("no_devices", r"No devices found\. Waiting indefinitely",
                 "the plugin found no GPUs to serve and waits"),
    LogSignature("registered", r"Registered device plugin for '[^']*' with Kubelet",
                 "the plugin registered its resource with the kubelet"),
)
KUBELET_RESTART = LogSignature(
    "kubelet_restart_seen", r"inotify: \S*kubelet\.sock created, restarting",
    "the plugin saw kubelet.sock re-created (a kubelet restart) and restarted its plugins")
# A new run of the plugin's plugins: "Starting Plugins." (start, kubelet restart, SIGHUP, retry).
PLUGIN_START = re.compile(r"Starting Plugins\.")
_COMPILED = tuple((s, re.compile(s.pattern)) for s in LOG_SIGNATURES + (KUBELET_RESTART,))
LOG_SIGNATURE_NAMES = tuple(s.name for s in LOG_SIGNATURES) + (KUBELET_RESTART.name, "unknown")


@dataclass
class LogMatch:
    signature: str
    line: str
    line_number: int  # 1-based, in the text read


@dataclass
class LogVerdict:
    """The log classified: one signature for the plugin's current state, with its line."""

    signature: str
    line: Optional[str]
    meaning: str
    matches: List[LogMatch] = field(default_factory=list)  # the last line of each signature seen

    def to_dict(self) -> Dict[str, Any]:
        return {"signature": self.signature, "line": self.line, "meaning": self.meaning,
                "matches": [asdict(m) for m in self.matches]}


def _meaning(name: str) -> str:
    for signature in LOG_SIGNATURES + (KUBELET_RESTART,):
        if signature.name == name:
            return signature.meaning
    return "no known signature in the log"


def classify_log(text: str) -> LogVerdict:
    """Classify a plugin log to the signature of its current state.

    The state is decided by the plugin's last start ("Starting Plugins."): its highest-precedence
    signature wins. When the last signature line of the whole log is a kubelet restart, the
    plugin saw the kubelet come back and has not registered since: ``kubelet_restart_seen``.
    """
    lines = text.splitlines()
    found: List[LogMatch] = []
    last_start = 0
    for number, line in enumerate(lines, start=1):
        if PLUGIN_START.search(line):
            last_start = number
        for signature, regex in _COMPILED:
            if regex.search(line):
                found.append(LogMatch(signature.name, line.strip(), number))
                break
    last_of_each: Dict[str, LogMatch] = {}
    for match in found:
        last_of_each[match.signature] = match
    matches = sorted(last_of_each.values(), key=lambda m: m.line_number)
    if not found:
        return LogVerdict("unknown", None, _meaning("unknown"), matches)
    if found[-1].signature == KUBELET_RESTART.name:
        return LogVerdict(KUBELET_RESTART.name, found[-1].line, KUBELET_RESTART.meaning, matches)
    current = [m for m in found if m.line_number >= last_start and m.signature != KUBELET_RESTART.name]
    if not current:
        restarts = [m for m in found if m.signature == KUBELET_RESTART.name]
        if restarts:
            return LogVerdict(KUBELET_RESTART.name, restarts[-1].line, KUBELET_RESTART.meaning, matches)
        current = found
    for signature in LOG_SIGNATURES:
        hits = [m for m in current if m.signature == signature.name]
        if hits:  # the first line of it in this start: the cause, before its echoes
            return LogVerdict(signature.name, hits[0].line, signature.meaning, matches)
    return LogVerdict("unknown", None, _meaning("unknown"), matches)  # pragma: no cover - unreachable


# --------------------------------------------------------------------------- node

def parse_count(quantity: Any) -> Optional[int]:
    """An extended resource quantity ("8", 8, "1k") as an integer; None when it is not one."""
    if quantity is None:
        return None
    if isinstance(quantity, int):
        return quantity
    match = re.fullmatch(r"\s*(\d+)([kMGTPE]?)\s*", str(quantity))
    if not match:
        return None
    scale = {"": 1, "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "P": 10 ** 15, "E": 10 ** 18}
    return int(match.group(1)) * scale[match.group(2)]


@dataclass
class NodeResources:
    capacity: Dict[str, int]
    allocatable: Dict[str, int]
    unhealthy_devices: Dict[str, int]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def node_resources(node: Dict[str, Any], prefix: str = RESOURCE_PREFIX) -> NodeResources:
    """Capacity and allocatable of every nvidia.com/* resource; unhealthy = capacity - allocatable."""
    status = node.get("status") or {}
    capacity = {k: parse_count(v) for k, v in (status.get("capacity") or {}).items() if k.startswith(prefix)}
    allocatable = {k: parse_count(v) for k, v in (status.get("allocatable") or {}).items() if k.startswith(prefix)}
    capacity_counts = {k: v for k, v in capacity.items() if v is not None}
    allocatable_counts = {k: v for k, v in allocatable.items() if v is not None}
    unhealthy = {k: max(0, v - allocatable_counts.get(k, 0)) for k, v in capacity_counts.items()}
    return NodeResources(capacity_counts, allocatable_counts, unhealthy)


@dataclass
class NodeState:
    name: str
    ready: Optional[bool]
    ready_reason: Optional[str]
    ready_message: Optional[str]
    unschedulable: bool
    labels: Dict[str, str]
    taints: List[Dict[str, Any]]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def scheduling_label_keys(pod_spec: Dict[str, Any]) -> List[str]:
    """Every label key the pod template selects nodes by."""
    keys = list((pod_spec.get("nodeSelector") or {}).keys())
    for term in required_node_affinity_terms(pod_spec) or []:
        keys.extend(r.get("key") for r in term.get("matchExpressions") or [] if r.get("key"))
    return keys


def node_state(node: Dict[str, Any], label_keys: Iterable[str] = ()) -> NodeState:
    """The Ready condition, cordon, taints and the labels relevant to GPU scheduling."""
    metadata = node.get("metadata") or {}
    labels = metadata.get("labels") or {}
    wanted = set(label_keys)
    relevant = {k: str(v) for k, v in labels.items() if k in wanted or k.startswith(GPU_LABEL_PREFIXES)}
    ready = [c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"]
    condition = ready[0] if ready else {}
    status = condition.get("status")
    return NodeState(
        name=metadata.get("name", ""),
        ready=True if status == "True" else False if status == "False" else None,
        ready_reason=condition.get("reason"),
        ready_message=condition.get("message"),
        unschedulable=bool((node.get("spec") or {}).get("unschedulable")),
        labels=dict(sorted(relevant.items())),
        taints=list((node.get("spec") or {}).get("taints") or []),
    )


# --------------------------------------------------------------------------- DaemonSet

@dataclass
class DaemonSetState:
    found: bool
    name: str
    namespace: str
    generation: Optional[int] = None
    observed_generation: Optional[int] = None
    desired: int = 0
    current: int = 0
    ready: int = 0
    updated: int = 0
    available: int = 0
    unavailable: int = 0
    misscheduled: int = 0

    @property
    def observed(self) -> bool:
        return self.generation is not None and (self.observed_generation or 0) >= self.generation

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def daemonset_state(daemonset: Optional[Dict[str, Any]], name: str, namespace: str) -> DaemonSetState:
    if daemonset is None:
        return DaemonSetState(False, name, namespace)
    status = daemonset.get("status") or {}
    return DaemonSetState(
        True, name, namespace,
        generation=(daemonset.get("metadata") or {}).get("generation"),
        observed_generation=status.get("observedGeneration"),
        desired=int(status.get("desiredNumberScheduled") or 0),
        current=int(status.get("currentNumberScheduled") or 0),
        ready=int(status.get("numberReady") or 0),
        updated=int(status.get("updatedNumberScheduled") or 0),
        available=int(status.get("numberAvailable") or 0),
        unavailable=int(status.get("numberUnavailable") or 0),
        misscheduled=int(status.get("numberMisscheduled") or 0),
    )


def selector_string(match_labels: Dict[str, Any]) -> str:
    return ",".join("%s=%s" % (k, v) for k, v in sorted(match_labels.items()))


# --------------------------------------------------------------------------- findings

@dataclass
class Finding:
    code: str
    severity: str  # error | warning | info
    message: str
    action: str

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


LOG_FINDINGS: Dict[str, Tuple[str, str, str]] = {
    # signature: (code, severity, action)
    "incompatible_strategy": (
        "plugin_incompatible_platform", "error",
        "configure the nvidia runtime on the node (nvidia-ctk runtime configure, as default runtime) or set "
        "runtime_class_name: nvidia on the DaemonSet, then delete the plugin pod"),
    "nvml_init_failed": (
        "plugin_nvml_init_failed", "error",
        "check the driver on the node (gpunode.bringup.nvml_info): kernel module loaded, library and driver "
        "versions match; then delete the plugin pod"),
    "registration_failed": (
        "plugin_registration_failed", "error",
        "check that the kubelet runs and kubelet.sock exists under kubelet_root_dir/device-plugins on the node, "
        "and that the DaemonSet's hostPath points there; then delete the plugin pod"),
    "xid_unhealthy": (
        "plugin_xid_unhealthy", "error",
        "inspect the GPU's XID (gpunode.bringup.nvml_info); drain the node and reset or replace the GPU"),
    "no_devices": (
        "plugin_no_devices", "error",
        "check that NVML sees the GPUs (gpunode.bringup.nvml_info) and that config.mig_strategy fits the "
        "node's MIG mode"),
    "kubelet_restart_seen": (
        "plugin_stale_after_kubelet_restart", "error",
        "the plugin saw the kubelet restart and has not registered again: delete the plugin pod"),
}


@dataclass
class NodeReport:
    """Everything device_plugin_info knows about one node."""

    name: str
    found: bool
    node: Optional[NodeState]
    scheduling: Optional[SchedulingMatch]
    plugin_pod: Optional[PluginPod]
    other_pods: int
    resources: Optional[NodeResources]
    log: Optional[LogVerdict] = None
    log_read: bool = False
    log_error: Optional[str] = None
    findings: List[Finding] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def to_dict(self, daemonset: DaemonSetState) -> Dict[str, Any]:
        log: Dict[str, Any] = {"read": self.log_read}
        if self.log is not None:
            log.update(self.log.to_dict())
        if self.log_error:
            log["error"] = self.log_error
        return {
            "name": self.name,
            "found": self.found,
            "healthy": self.healthy,
            "daemonset": daemonset.to_dict(),
            "node": self.node.to_dict() if self.node else None,
            "scheduling": self.scheduling.to_dict() if self.scheduling else None,
            "plugin_pod": dict(self.plugin_pod.to_dict(), found=True, other_pods=self.other_pods)
            if self.plugin_pod else {"found": False},
            "log": log,
            "resources": self.resources.to_dict() if self.resources else None,
            "findings": [f.to_dict() for f in self.findings],
        }


def capacity_problem(resources: Optional[NodeResources], resource_name: str,
                     expected_count: Optional[int]) -> bool:
    """Whether the node advertises too few healthy devices of the resource."""
    if resources is None:
        return True
    capacity = resources.capacity.get(resource_name, 0)
    if capacity == 0 or resources.unhealthy_devices.get(resource_name, 0) > 0:
        return True
    return expected_count is not None and capacity != expected_count


def needs_log(report: NodeReport, mode: str, resource_name: str, expected_count: Optional[int]) -> bool:
    """Logs are read only where they can explain something (or always, when asked)."""
    if report.plugin_pod is None or mode == "never":
        return False
    if mode == "always":
        return True
    return not report.plugin_pod.healthy or capacity_problem(report.resources, resource_name, expected_count)


def node_findings(report: NodeReport, daemonset: DaemonSetState, resource_name: str = GPU_RESOURCE,
                  expected_count: Optional[int] = None) -> List[Finding]:
    """Findings for one node, bottom of the chain first, each with the next action."""
    name = report.name
    findings: List[Finding] = []
    if not report.found or report.node is None:
        return [Finding("node_not_found", "error", "node %s: no such Node in the API" % name,
                        "check the node name, or whether its kubelet registered with the cluster")]
    node = report.node
    if node.ready is not True:
        ready = "False" if node.ready is False else "Unknown"
        findings.append(Finding(
            "node_not_ready", "error",
            "node %s: Ready is %s (%s)" % (name, ready, node.ready_reason or "no reason given"),
            "check the kubelet and the container runtime on the node"))
    if node.unschedulable:
        findings.append(Finding(
            "node_cordoned", "error",
            "node %s is cordoned (spec.unschedulable): no new GPU pod can start there; the plugin pod still runs"
            % name,
            "uncordon it when the maintenance is over (gpunode.bringup.gpu_node cordon: false), if whoever "
            "cordoned it agrees"))
    if not daemonset.found:
        findings.append(Finding(
            "daemonset_missing", "error",
            "DaemonSet %s/%s does not exist" % (daemonset.namespace, daemonset.name),
            "deploy the device plugin (gpunode.bringup.device_plugin)"))
        return findings
    if report.scheduling is not None and not report.scheduling.targeted:
        for reason in report.scheduling.reasons:
            if reason.reason in ("missing_label", "label_mismatch"):
                findings.append(Finding(
                    "not_targeted_label", "error", "node %s: %s" % (name, reason.message),
                    "label the node %s=%s (gpunode.bringup.gpu_node)" % (reason.key, reason.value)))
            elif reason.reason == "unmet_affinity":
                action = "label the node %s=%s (gpunode.bringup.gpu_node), or widen the DaemonSet's node_affinity" \
                    % (reason.key, reason.value) if reason.value is not None \
                    else "change the node's labels or the DaemonSet's node_affinity"
                findings.append(Finding("not_targeted_affinity", "error", "node %s: %s" % (name, reason.message),
                                        action))
            elif reason.reason == "untolerated_taint":
                findings.append(Finding(
                    "not_targeted_taint", "error", "node %s: %s" % (name, reason.message),
                    "add a toleration for %s to the DaemonSet (gpunode.bringup.device_plugin tolerations) if GPU "
                    "work belongs on this node; taints are never removed automatically" % reason.key))
        return findings
    pod = report.plugin_pod
    if pod is None:
        findings.append(Finding(
            "plugin_pod_missing", "error",
            "node %s: the DaemonSet targets the node but no plugin pod exists on it" % name,
            "check the DaemonSet's events (kubectl -n %s describe ds %s)" % (daemonset.namespace, daemonset.name)))
        return findings
    log_finding = LOG_FINDINGS.get(report.log.signature) if report.log is not None else None
    log_text = " Log: %s" % report.log.line if report.log is not None and report.log.line else ""
    if not pod.healthy:
        if pod.waiting_reason in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName"):
            findings.append(Finding(
                "plugin_pod_image_pull", "error",
                "node %s: plugin pod %s cannot pull its image: %s" % (name, pod.name, pod.why_not_ready()),
                "check the image reference and tag, the registry's reachability from the node and "
                "image_pull_secrets"))
        elif pod.waiting_reason == "CrashLoopBackOff":
            findings.append(Finding(
                "plugin_pod_crashloop", "error",
                "node %s: plugin pod %s is crash-looping: %s, %d restarts.%s"
                % (name, pod.name, pod.why_not_ready(), pod.restarts, log_text),
                log_finding[2] if log_finding else "read the pod's log (kubectl -n %s logs %s --previous)"
                % (daemonset.namespace, pod.name)))
        else:
            findings.append(Finding(
                "plugin_pod_not_ready", "error",
                "node %s: plugin pod %s is not ready: %s.%s" % (name, pod.name, pod.why_not_ready(), log_text),
                log_finding[2] if log_finding else "describe the pod (kubectl -n %s describe pod %s)"
                % (daemonset.namespace, pod.name)))
    elif pod.restarts > 0:
        findings.append(Finding(
            "plugin_pod_restarted", "warning",
            "node %s: plugin pod %s is Ready after %d restarts" % (name, pod.name, pod.restarts),
            "read the previous log if the restarts continue"))
    if log_finding is not None and report.log is not None:
        code, severity, action = log_finding
        findings.append(Finding(code, severity, "node %s: plugin log: %s: %s" % (
            name, report.log.meaning, report.log.line), action))
    resources = report.resources or NodeResources({}, {}, {})
    capacity = resources.capacity.get(resource_name, 0)
    if pod.healthy and capacity == 0:
        findings.append(Finding(
            "resource_not_advertised", "error",
            "node %s: plugin pod is Ready but the node advertises no %s" % (name, resource_name),
            "delete the plugin pod so it registers again (gpunode.bringup.device_plugin_probe shows the socket)"))
    unhealthy = resources.unhealthy_devices.get(resource_name, 0)
    if unhealthy > 0:
        findings.append(Finding(
            "unhealthy_devices", "error",
            "node %s: %d of %d %s devices are unhealthy (capacity %d, allocatable %d)" % (
                name, unhealthy, capacity, resource_name, capacity, resources.allocatable.get(resource_name, 0)),
            "inspect the GPUs (gpunode.bringup.nvml_info); drain the node and reset or replace the failed GPU"))
    if expected_count is not None and capacity and capacity != expected_count:
        findings.append(Finding(
            "gpu_count_mismatch", "error",
            "node %s advertises %d %s, expected %d" % (name, capacity, resource_name, expected_count),
            "compare with the GPUs NVML sees (gpunode.bringup.nvml_info) and the sharing/MIG configuration"))
    return findings


# --------------------------------------------------------------------------- reading the fleet

@dataclass
class FleetQuery:
    daemonset_name: str
    namespace: str
    nodes: Optional[List[str]] = None  # node names, in the order wanted; None: every node listed
    label_selector: Optional[str] = None
    pod_selector: Optional[Dict[str, str]] = None  # used when the DaemonSet does not exist
    read_logs: str = "when_unhealthy"
    log_tail_lines: int = 200
    resource_name: str = GPU_RESOURCE
    expected_gpu_count: Optional[int] = None


@dataclass
class FleetSnapshot:
    daemonset: Optional[Dict[str, Any]]
    nodes: List[Dict[str, Any]]
    pods: List[Dict[str, Any]]


def pod_template_spec(daemonset: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    return (((daemonset or {}).get("spec") or {}).get("template") or {}).get("spec") or {}


def build_reports(query: FleetQuery, snapshot: FleetSnapshot, now: Optional[datetime] = None) -> List[NodeReport]:
    """One report per node asked for (or listed), without findings and logs yet."""
    nodes_by_name = {(n.get("metadata") or {}).get("name"): n for n in snapshot.nodes}
    names = list(query.nodes) if query.nodes is not None else sorted(k for k in nodes_by_name if k)
    pod_spec = pod_template_spec(snapshot.daemonset)
    label_keys = scheduling_label_keys(pod_spec)
    by_node = pods_by_node(snapshot.pods)
    reports: List[NodeReport] = []
    for name in names:
        node = nodes_by_name.get(name)
        if node is None:
            reports.append(NodeReport(name, False, None, None, None, 0, None))
            continue
        node_pods = by_node.get(name, [])
        pod = current_pod(node_pods)
        reports.append(NodeReport(
            name=name, found=True, node=node_state(node, label_keys),
            scheduling=scheduling_match(pod_spec, node) if snapshot.daemonset is not None else None,
            plugin_pod=classify_pod(pod, now) if pod is not None else None,
            other_pods=max(0, len(node_pods) - 1),
            resources=node_resources(node)))
    return reports


class FleetReader:
    """Reads the fleet's device plugin state with a constant number of API calls."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def snapshot(self, query: FleetQuery) -> FleetSnapshot:
        # three GETs through client.request: no typed API class is imported (see K8sClient.request)
        get = self.client.request
        daemonset = read_path(self.client, "get DaemonSet %s/%s" % (query.namespace, query.daemonset_name),
                              "/apis/apps/v1/namespaces/%s/daemonsets/%s" % (query.namespace, query.daemonset_name))
        match_labels = (((daemonset or {}).get("spec") or {}).get("selector") or {}).get("matchLabels") \
            or query.pod_selector or {}
        nodes = call_json(self.client, "list nodes", get, "GET", "/api/v1/nodes",
                          [("labelSelector", query.label_selector or None)]).get("items") or []
        pods = call_json(self.client, "list plugin pods in %s (%s)" % (query.namespace, selector_string(match_labels)),
                         get, "GET", "/api/v1/namespaces/%s/pods" % query.namespace,
                         [("labelSelector", selector_string(match_labels) or None)]).get("items") or []
        return FleetSnapshot(daemonset, nodes, pods)

    def read_log(self, namespace: str, pod: PluginPod, tail_lines: int) -> Tuple[Optional[str], Optional[str]]:
        """The pod's recent log, or the reason it could not be read (a container still waiting)."""
        query = [("tailLines", tail_lines), ("container", pod.container or None)]
        try:
            response = self.client.call("read log of pod %s/%s" % (namespace, pod.name), self.client.request, "GET",
                                        "/api/v1/namespaces/%s/pods/%s/log" % (namespace, pod.name), query)
        except K8sError as exc:
            if is_not_found(exc) or exc.details.get("status") == 400:
                return None, exc.msg
            raise
        text = getattr(response, "data", response)
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8", "replace")
        return str(text or ""), None

    def read(self, query: FleetQuery, now: Optional[datetime] = None) -> Tuple[DaemonSetState, List[NodeReport]]:
        snapshot = self.snapshot(query)
        state = daemonset_state(snapshot.daemonset, query.daemonset_name, query.namespace)
        reports = build_reports(query, snapshot, now)
        for report in reports:
            if report.plugin_pod is not None and needs_log(report, query.read_logs, query.resource_name,
                                                           query.expected_gpu_count):
                text, error = self.read_log(query.namespace, report.plugin_pod, query.log_tail_lines)
                report.log_read = text is not None
                report.log_error = error
                if text is not None:
                    report.log = classify_log(text)
            report.findings = node_findings(report, state, query.resource_name, query.expected_gpu_count)
        return state, reports


def summarize(reports: Sequence[NodeReport]) -> Dict[str, Any]:
    codes: Dict[str, int] = {}
    for report in reports:
        for finding in report.findings:
            codes[finding.code] = codes.get(finding.code, 0) + 1
    return {
        "nodes": len(reports),
        "healthy": sum(1 for r in reports if r.healthy),
        "unhealthy": [r.name for r in reports if not r.healthy],
        "findings": dict(sorted(codes.items())),
    }


def device_plugin_info_result(params: Dict[str, Any], client_factory: Optional[Any] = None,
                              now: Optional[datetime] = None) -> Dict[str, Any]:
    """device_plugin_info's result: one entry per node, the DaemonSet, a summary."""
    read_logs = params.get("read_logs") or "when_unhealthy"
    if read_logs not in LOG_READ_CHOICES:
        raise InvalidOptionError("read_logs %r is not one of %s" % (read_logs, ", ".join(LOG_READ_CHOICES)))
    tail = params.get("log_tail_lines")
    tail = 200 if tail is None else tail
    if isinstance(tail, bool) or not isinstance(tail, int) or tail < 1:
        raise InvalidOptionError("log_tail_lines must be an integer of at least 1, got %r" % (tail,))
    expected = params.get("expected_gpu_count")
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int) or expected < 0):
        raise InvalidOptionError("expected_gpu_count must be 0 or more, got %r" % (expected,))
    nodes = params.get("nodes")
    query = FleetQuery(
        daemonset_name=check_dns_subdomain("name", params.get("name") or "nvidia-device-plugin-daemonset"),
        namespace=check_namespace("namespace", params.get("namespace") or "kube-system"),
        nodes=[check_dns_subdomain("nodes", n) for n in nodes] if nodes is not None else None,
        label_selector=params.get("label_selector") or None,
        pod_selector=check_labels("selector_labels", params.get("selector_labels") or {"name": "nvidia-device-plugin-ds"}),
        read_logs=read_logs,
        log_tail_lines=tail,
        resource_name=params.get("resource_name") or GPU_RESOURCE,
        expected_gpu_count=expected,
    )
    client = (client_factory or K8sClient)(params)
    state, reports = FleetReader(client).read(query, now)
    return {
        "changed": False,
        "daemonset": state.to_dict(),
        "nodes": [r.to_dict(state) for r in reports],
        "summary": summarize(reports),
        "api_requests": client.requests,
    }
