"""core/v1 Events written by the lab's controllers, scheduler and kubelet stand-ins."""
from __future__ import annotations

import threading
import time
from typing import Any, Dict, Optional

from . import objects
from .resources import BY_PATH, Resource
from .store import ApiError, Store

EVENTS = BY_PATH[("", "v1", "events")]
_lock = threading.Lock()
_last_ns = 0


def _stamp() -> int:
    """A strictly increasing UnixNano (event names sort in creation order)."""
    global _last_ns
    with _lock:
        _last_ns = max(_last_ns + 1, time.time_ns())
        return _last_ns


def involved_object(res: Resource, obj: Dict[str, Any], field_path: Optional[str] = None) -> Dict[str, Any]:
    meta = obj.get("metadata") or {}
    ref: Dict[str, Any] = {"kind": res.kind}
    if meta.get("namespace"):
        ref["namespace"] = meta["namespace"]
    ref.update(name=meta.get("name"), uid=meta.get("uid"), apiVersion=res.api_version)
    if meta.get("resourceVersion"):
        ref["resourceVersion"] = meta["resourceVersion"]
    if field_path:
        ref["fieldPath"] = field_path
    return ref


def record(store: Store, res: Resource, obj: Dict[str, Any], etype: str, reason: str, message: str,
           component: str, host: Optional[str] = None, field_path: Optional[str] = None) -> Optional[dict]:
    """Create an Event about ``obj`` (named ``<obj>.<hex UnixNano>`` like client-go's recorder);
    None when it cannot be written (e.g. the namespace is gone)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace") or "default"
    ts = objects.now()
    source: Dict[str, Any] = {"component": component}
    if host:
        source["host"] = host
    body = {"metadata": {"name": "%s.%x" % (meta.get("name"), _stamp()), "namespace": ns},
            "involvedObject": involved_object(res, obj, field_path), "reason": reason, "message": message,
            "source": source, "firstTimestamp": ts, "lastTimestamp": ts, "count": 1, "type": etype,
            "eventTime": None, "reportingComponent": component, "reportingInstance": host or ""}
    try:
        return store.create(EVENTS, ns, body, manager=component, managed_fields=False)
    except ApiError:
        return None


def repeat(store: Store, namespace: str, name: str, message: str) -> Optional[dict]:
    """Count another occurrence of an Event (new message, ``count`` + 1, ``lastTimestamp`` now)."""
    try:
        return store.update(EVENTS, namespace, name,
                            lambda ev: dict(ev, message=message, count=int(ev.get("count") or 1) + 1,
                                            lastTimestamp=objects.now()),
                            manager="lab", managed_fields=False)
    except ApiError:
        return None
