# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""The per-node remediation lease (``coordination.k8s.io/v1`` Lease) behind ``node_lease``.

A lease is held while ``renewTime + leaseDurationSeconds > now`` and its ``holderIdentity`` is
set; an empty holder or a lapsed renewal makes it free. Every write carries the
resourceVersion that was read (create: the name must not exist; replace and delete:
``metadata.resourceVersion`` / a precondition), so of two runs that read the same lease only one
write succeeds; the other gets HTTP 409, reads again and sees the winner.

The decisions (:func:`decide_acquire`, :func:`decide_release`, :func:`lease_spec`) are pure
functions of the lease as read, the caller's identity and a clock reading.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import math
import os
import re
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, List, Optional, Tuple

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError, K8sError
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_apply import call_json, read_path

API_VERSION = "coordination.k8s.io/v1"
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_INT32 = 2 ** 31 - 1
MAX_ATTEMPTS = 3  # reads after a 409 before giving up
_TIME = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|z|[+-]\d{2}:?\d{2})?$")

# decisions
CREATE = "create"  # no lease: create it, held by us
RENEW = "renew"  # held by us: move renewTime
TAKE_OVER = "take_over"  # free or lapsed: hold it, one more transition
HELD = "held"  # held by someone else and not lapsed: leave it, skip the node
DELETE = "delete"  # release: the lease is ours
ABSENT = "absent"  # release: no lease
NOT_OURS = "not_ours"  # release: held by someone else (or nobody): leave it


def default_holder_identity() -> str:
    """``<controller hostname>-<pid>``: unique to one module run."""
    return "%s-%d" % (socket.gethostname(), os.getpid())


def format_time(moment: datetime) -> str:
    """A Kubernetes MicroTime: ``2026-01-01T10:00:00.000000Z``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: Any) -> Optional[datetime]:
    """An RFC 3339 time (``Z`` or an offset, with or without fraction); None when absent or malformed."""
    match = _TIME.match(str(text).strip()) if text else None
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    offset = timedelta(0)
    if zone and zone not in ("Z", "z"):
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    try:
        return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro,
                        tzinfo=timezone(offset)).astimezone(timezone.utc)
    except ValueError:
        return None


def lease_name(name_prefix: str, node: str) -> str:
    """The lease's name (``<name_prefix><node>``), checked to be a valid object name."""
    if not node:
        raise InvalidOptionError("node must be a node name, got an empty string")
    name = name_prefix + node
    if len(name) > 253 or not DNS_SUBDOMAIN.match(name):
        raise InvalidOptionError(
            "name_prefix %r with node %r gives the lease name %r, which is not a valid object name "
            "(lowercase letters, digits, '-' and '.', at most 253 characters)" % (name_prefix, node, name))
    return name


def validate_options(namespace: str, holder_identity: str, lease_duration_seconds: int) -> None:
    """Fail on values the API would reject, before anything is read or written."""
    if not namespace or len(namespace) > 63 or not DNS_LABEL.match(namespace):
        raise InvalidOptionError("namespace %r is not a valid namespace name" % namespace)
    if not holder_identity or not holder_identity.strip():
        raise InvalidOptionError("holder_identity must not be empty")
    if not 1 <= lease_duration_seconds <= MAX_INT32:
        raise InvalidOptionError("lease_duration_seconds must be between 1 and %d, got %d"
                                 % (MAX_INT32, lease_duration_seconds))


@dataclass(frozen=True)
class LeaseRecord:
    """A Lease as read from the API."""

    name: str
    namespace: str
    holder: Optional[str]
    duration_s: Optional[int]
    acquire_time: Optional[datetime]
    renew_time: Optional[datetime]
    transitions: int
    resource_version: Optional[str]
    labels: Dict[str, str] = field(default_factory=dict)
    annotations: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_object(cls, obj: Dict[str, Any]) -> "LeaseRecord":
        metadata = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        duration = spec.get("leaseDurationSeconds")
        return cls(
            name=str(metadata.get("name", "")),
            namespace=str(metadata.get("namespace", "")),
            holder=spec.get("holderIdentity") or None,
            duration_s=int(duration) if isinstance(duration, int) and duration > 0 else None,
            acquire_time=parse_time(spec.get("acquireTime")),
            renew_time=parse_time(spec.get("renewTime")),
            transitions=int(spec.get("leaseTransitions") or 0),
            resource_version=metadata.get("resourceVersion"),
            labels=dict(metadata.get("labels") or {}),
            annotations=dict(metadata.get("annotations") or {}),
        )

    def expires_at(self, default_duration_s: int) -> Optional[datetime]:
        """When the lease lapses: last renewal (else acquisition) plus its duration (else ours).

        None when the lease records neither time: it cannot prove it is held.
        """
        since = self.renew_time or self.acquire_time
        if since is None:
            return None
        return since + timedelta(seconds=self.duration_s or default_duration_s)

    def held_at(self, now: datetime, default_duration_s: int) -> bool:
        """Whether someone holds the lease at ``now``."""
        expires = self.expires_at(default_duration_s)
        return bool(self.holder) and expires is not None and expires > now

    def summary(self, now: datetime, default_duration_s: int) -> Dict[str, Any]:
        """The lease as the module returns it."""
        expires = self.expires_at(default_duration_s)
        held = self.held_at(now, default_duration_s)
        return {
            "name": self.name,
            "namespace": self.namespace,
            "holder_identity": self.holder,
            "lease_duration_seconds": self.duration_s,
            "acquire_time": format_time(self.acquire_time) if self.acquire_time else None,
            "renew_time": format_time(self.renew_time) if self.renew_time else None,
            "lease_transitions": self.transitions,
            "expires_at": format_time(expires) if expires and self.holder else None,
            "expires_in": seconds_until(expires, now) if held and expires else None,
            "held": held,
        }


def seconds_until(moment: datetime, now: datetime) -> int:
    """Whole seconds from ``now`` to ``moment``, rounded up, never negative."""
    return max(0, int(math.ceil((moment - now).total_seconds())))


def decide_acquire(record: Optional[LeaseRecord], me: str, now: datetime, default_duration_s: int) -> str:
    """CREATE, RENEW (ours, lapsed or not), TAKE_OVER (free or lapsed) or HELD (someone else's)."""
    if record is None:
        return CREATE
    if record.holder == me:
        return RENEW
    if record.held_at(now, default_duration_s):
        return HELD
    return TAKE_OVER


def decide_release(record: Optional[LeaseRecord], me: str) -> str:
    """DELETE when the lease is ours; ABSENT or NOT_OURS leave everything as it is."""
    if record is None:
        return ABSENT
    return DELETE if record.holder == me else NOT_OURS


def lease_spec(decision: str, record: Optional[LeaseRecord], me: str, duration_s: int,
               now: datetime) -> Dict[str, Any]:
    """The spec to write for CREATE, RENEW or TAKE_OVER."""
    stamp = format_time(now)
    if decision == RENEW and record is not None:
        acquired = format_time(record.acquire_time) if record.acquire_time else stamp
        transitions = record.transitions
    elif decision == TAKE_OVER and record is not None:
        acquired = stamp
        transitions = record.transitions + 1
    else:
        acquired = stamp
        transitions = 0
    return {"holderIdentity": me, "leaseDurationSeconds": duration_s, "acquireTime": acquired,
            "renewTime": stamp, "leaseTransitions": transitions}


def lease_body(name: str, namespace: str, spec: Dict[str, Any], record: Optional[LeaseRecord],
               labels: Dict[str, str]) -> Dict[str, Any]:
    """The whole Lease object to create, or to replace ``record`` (guarded by its resourceVersion,
    keeping its labels and annotations)."""
    metadata: Dict[str, Any] = {"name": name, "namespace": namespace}
    merged = dict(record.labels) if record is not None else {}
    merged.update(labels)
    metadata["labels"] = merged
    if record is not None and record.annotations:
        metadata["annotations"] = dict(record.annotations)
    if record is not None and record.resource_version:
        metadata["resourceVersion"] = record.resource_version
    return {"apiVersion": API_VERSION, "kind": "Lease", "metadata": metadata, "spec": spec}


def holder_view(record: Optional[LeaseRecord], now: datetime, default_duration_s: int) -> Dict[str, Any]:
    """The part of a lease the operator cares about, for ``diff``."""
    if record is None:
        return {}
    expires = record.expires_at(default_duration_s)
    return {"holder_identity": record.holder,
            "expires_at": format_time(expires) if expires and record.holder else None}


@dataclass(frozen=True)
class LeaseRequest:
    """The module's options."""

    node: str
    namespace: str
    name_prefix: str
    holder_identity: str
    lease_duration_seconds: int

    @property
    def name(self) -> str:
        return lease_name(self.name_prefix, self.node)

    def validate(self) -> None:
        lease_name(self.name_prefix, self.node)
        validate_options(self.namespace, self.holder_identity, self.lease_duration_seconds)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class NodeLease:
    """Read -> decide -> write (resourceVersion-guarded) for one node's lease."""

    LABELS = {"app.kubernetes.io/managed-by": "gpunode.bringup"}

    def __init__(self, client: Any, request: LeaseRequest, check_mode: bool,
                 clock: Callable[[], datetime] = _utcnow) -> None:
        request.validate()
        self.client = client
        self.request = request
        self.check_mode = check_mode
        self.clock = clock
        self.name = request.name
        self.ref = "lease %s/%s" % (request.namespace, self.name)
        self.collection = "/apis/coordination.k8s.io/v1/namespaces/%s/leases" % request.namespace
        self.path = "%s/%s" % (self.collection, self.name)

    # --- API calls (K8sClient.request: no typed API class to import) -----------------------
    def read(self) -> Optional[LeaseRecord]:
        obj = read_path(self.client, "get " + self.ref, self.path)
        return LeaseRecord.from_object(obj) if obj is not None else None

    def _dry_run(self) -> List[Tuple[str, str]]:
        return [("dryRun", "All")] if self.check_mode else []

    def write(self, decision: str, record: Optional[LeaseRecord], now: datetime) -> LeaseRecord:
        request = self.request
        spec = lease_spec(decision, record, request.holder_identity, request.lease_duration_seconds, now)
        if decision == CREATE:
            body = lease_body(self.name, request.namespace, spec, None, self.LABELS)
            obj = call_json(self.client, "create " + self.ref, self.client.request, "POST", self.collection,
                            self._dry_run(), body)
        else:
            body = lease_body(self.name, request.namespace, spec, record, self.LABELS)
            obj = call_json(self.client, "replace " + self.ref, self.client.request, "PUT", self.path,
                            self._dry_run(), body)
        # a dry run may not echo every field back: report what would be stored
        return LeaseRecord.from_object(dict(obj, spec=spec) if self.check_mode else obj)

    def delete(self, record: LeaseRecord) -> None:
        # A DELETE with a body takes its DeleteOptions from the body alone (the API server then
        # ignores the query's dryRun): check mode's dryRun goes into the body too.
        body: Dict[str, Any] = {}
        if record.resource_version:
            body["preconditions"] = {"resourceVersion": record.resource_version}
        if self.check_mode:
            body["dryRun"] = ["All"]
        call_json(self.client, "delete " + self.ref, self.client.request, "DELETE", self.path, self._dry_run(),
                  body or None)

    # --- states ------------------------------------------------------------------------------
    def acquire(self) -> Dict[str, Any]:
        request = self.request
        for _attempt in range(MAX_ATTEMPTS):
            record = self.read()
            now = self.clock()
            decision = decide_acquire(record, request.holder_identity, now, request.lease_duration_seconds)
            if decision == HELD and record is not None:
                return self._held_result(record, now)
            try:
                written = self.write(decision, record, now)
            except K8sError as exc:
                if exc.details.get("status") == 409:  # someone wrote first: read again and decide again
                    continue
                raise
            return self._acquired_result(decision, record, written, now)
        raise K8sError("%s: changed %d times while acquiring it for node %s"
                       % (self.ref, MAX_ATTEMPTS, request.node),
                       action="another client rewrites this lease continuously; find it (managedFields) and stop it")

    def release(self) -> Dict[str, Any]:
        request = self.request
        for _attempt in range(MAX_ATTEMPTS):
            record = self.read()
            now = self.clock()
            decision = decide_release(record, request.holder_identity)
            if decision == ABSENT or record is None:
                return self._result(False, None, now, released=False,
                                    msg="node %s: no %s; nothing to release" % (request.node, self.ref))
            if decision == NOT_OURS:
                return self._result(False, record, now, released=False,
                                    msg="node %s: %s is held by %s, not by %s; left as it is"
                                    % (request.node, self.ref, record.holder or "nobody", request.holder_identity))
            try:
                self.delete(record)
            except K8sError as exc:
                status = exc.details.get("status")
                if status == 409:
                    continue
                if status == 404:
                    return self._result(False, None, now, released=False,
                                        msg="node %s: %s is already gone" % (request.node, self.ref))
                raise
            result = self._result(True, None, now, released=True,
                                  msg="node %s: %s %s" % (request.node, self.ref,
                                                          "would be released" if self.check_mode else "released"))
            result["diff"] = {"before": holder_view(record, now, request.lease_duration_seconds), "after": {},
                              "before_header": self.ref, "after_header": self.ref}
            return result
        raise K8sError("%s: changed %d times while releasing it for node %s" % (self.ref, MAX_ATTEMPTS, request.node))

    # --- results -----------------------------------------------------------------------------
    def _result(self, changed: bool, record: Optional[LeaseRecord], now: datetime, **extra: Any) -> Dict[str, Any]:
        duration = self.request.lease_duration_seconds
        summary = record.summary(now, duration) if record is not None else {}
        result: Dict[str, Any] = {
            "changed": changed,
            "holder_identity": self.request.holder_identity,
            "holder": summary.get("holder_identity") if summary.get("held") else None,
            "expires_at": summary.get("expires_at") if summary.get("held") else None,
            "expires_in": summary.get("expires_in"),
            "lease": summary,
            "acquired": False,
            "renewed": False,
            "taken_over": False,
        }
        result.update(extra)
        return result

    def _held_result(self, record: LeaseRecord, now: datetime) -> Dict[str, Any]:
        expires = record.expires_at(self.request.lease_duration_seconds)
        until = format_time(expires) if expires else "unknown"
        return self._result(False, record, now, msg="node %s is being remediated by %s until %s; skipped"
                            % (self.request.node, record.holder, until))

    def _acquired_result(self, decision: str, before: Optional[LeaseRecord], after: LeaseRecord,
                         now: datetime) -> Dict[str, Any]:
        node = self.request.node
        would = "would be " if self.check_mode else ""
        if decision == CREATE:
            msg = "node %s: %s %screated, held by %s" % (node, self.ref, would, self.request.holder_identity)
        elif decision == RENEW:
            msg = "node %s: %s %srenewed by %s" % (node, self.ref, would, self.request.holder_identity)
        else:
            previous = before.holder if before and before.holder else "nobody"
            msg = "node %s: %s %staken over from %s (lapsed)" % (node, self.ref, would, previous)
        changed = decision != RENEW
        result = self._result(changed, after, now, acquired=True, renewed=decision == RENEW,
                              taken_over=decision == TAKE_OVER, msg=msg)
        if changed:
            duration = self.request.lease_duration_seconds
            result["diff"] = {"before": holder_view(before, now, duration), "after": holder_view(after, now, duration),
                              "before_header": self.ref, "after_header": self.ref}
        return result


def run_node_lease(client: Any, request: LeaseRequest, state: str, check_mode: bool,
                   clock: Callable[[], datetime] = _utcnow) -> Dict[str, Any]:
    """The module's body: acquire or release, and the result to return."""
    lease = NodeLease(client, request, check_mode, clock)
    result = lease.acquire() if state == "acquired" else lease.release()
    result.setdefault("released", False)
    return result
