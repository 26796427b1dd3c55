"""Server-side printing: the ``meta.k8s.io/v1`` Table answers kubectl asks for (``as=Table``)."""
from __future__ import annotations

import datetime
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import objects
from .resources import Resource

Column = Tuple[str, str, int, str]  # name, type, priority, format


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration."""
    if seconds < -1:
        return "<invalid>"
    if seconds < 0:
        return "0s"
    s = int(seconds)
    if s < 120:
        return "%ds" % s
    m = s // 60
    if m < 10:
        return "%dm%ds" % (m, s % 60) if s % 60 else "%dm" % m
    if m < 180:
        return "%dm" % m
    h = s // 3600
    if h < 8:
        return "%dh%dm" % (h, m % 60) if m % 60 else "%dh" % h
    if h < 48:
        return "%dh" % h
    if h < 24 * 8:
        return "%dd%dh" % (h // 24, h % 24) if h % 24 else "%dd" % (h // 24)
    if h < 24 * 365 * 2:
        return "%dd" % (h // 24)
    if h < 24 * 365 * 8:
        d = h // 24
        return "%dy%dd" % (d // 365, d % 365) if d % 365 else "%dy" % (d // 365)
    return "%dy" % (h // 24 // 365)


def age(ts: Optional[str]) -> str:
    t = objects.parse_time(ts)
    if t is None:
        return "<unknown>"
    return human_duration((datetime.datetime.now(datetime.timezone.utc) - t).total_seconds())


def _node_row(o: dict) -> List[Any]:
    status = o.get("status") or {}
    ready = "Unknown"
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready":
            ready = "Ready" if c.get("status") == "True" else "NotReady"
    if (o.get("spec") or {}).get("unschedulable"):
        ready += ",SchedulingDisabled"
    labels = o["metadata"].get("labels") or {}
    roles = sorted({k.split("/", 1)[1] for k in labels if k.startswith("node-role.kubernetes.io/")} |
                   ({labels["kubernetes.io/role"]} if labels.get("kubernetes.io/role") else set()))
    info = status.get("nodeInfo") or {}
    ext = next((a.get("address") for a in status.get("addresses") or [] if a.get("type") == "ExternalIP"), "<none>")
    return [o["metadata"]["name"], ready, ",".join(roles) or "<none>", age(o["metadata"].get("creationTimestamp")),
            info.get("kubeletVersion", ""), objects.node_internal_ip(o) or "<none>", ext, info.get("osImage", ""),
            info.get("kernelVersion", ""), info.get("containerRuntimeVersion", "")]


def _pod_row(o: dict) -> List[Any]:
    status = o.get("status") or {}
    spec = o.get("spec") or {}
    reason = status.get("reason") or status.get("phase") or "Unknown"
    css = status.get("containerStatuses") or []
    ready = sum(1 for c in css if c.get("ready"))
    restarts = sum(int(c.get("restartCount") or 0) for c in css)
    last_restart = None
    for c in reversed(css):
        state = c.get("state") or {}
        if "waiting" in state and state["waiting"].get("reason"):
            reason = state["waiting"]["reason"]
        elif "terminated" in state:
            reason = state["terminated"].get("reason") or "Terminated"
        finished = ((c.get("lastState") or {}).get("terminated") or {}).get("finishedAt")
        if finished and (last_restart is None or finished > last_restart):
            last_restart = finished
    if o["metadata"].get("deletionTimestamp"):
        reason = "Terminating"
    restart_cell: Any = restarts if not last_restart else "%d (%s ago)" % (restarts, age(last_restart))
    return [o["metadata"]["name"], "%d/%d" % (ready, len(spec.get("containers") or [])), reason, restart_cell,
            age(o["metadata"].get("creationTimestamp")), status.get("podIP") or "<none>",
            spec.get("nodeName") or "<none>", status.get("nominatedNodeName") or "<none>", "<none>"]


def _ds_row(o: dict) -> List[Any]:
    st = o.get("status") or {}
    spec = o.get("spec") or {}
    tspec = (spec.get("template") or {}).get("spec") or {}
    sel = ",".join("%s=%s" % kv for kv in sorted((tspec.get("nodeSelector") or {}).items())) or "<none>"
    containers = tspec.get("containers") or []
    match = (spec.get("selector") or {}).get("matchLabels") or {}
    return [o["metadata"]["name"], st.get("desiredNumberScheduled", 0), st.get("currentNumberScheduled", 0),
            st.get("numberReady", 0), st.get("updatedNumberScheduled", 0), st.get("numberAvailable", 0), sel,
            age(o["metadata"].get("creationTimestamp")), ",".join(c.get("name", "") for c in containers),
            ",".join(c.get("image", "") for c in containers),
            ",".join("%s=%s" % kv for kv in sorted(match.items())) or "<none>"]


def _event_row(o: dict) -> List[Any]:
    inv = o.get("involvedObject") or {}
    last = o.get("lastTimestamp") or o.get("eventTime") or (o.get("metadata") or {}).get("creationTimestamp")
    src = o.get("source") or {}
    return [age(last), o.get("type", ""), o.get("reason", ""),
            "%s/%s" % ((inv.get("kind") or "").lower(), inv.get("name", "")), inv.get("fieldPath", ""),
            ", ".join(v for v in (src.get("component"), src.get("host")) if v), o.get("message", ""),
            age(o.get("firstTimestamp") or last), o.get("count", 1), o["metadata"]["name"]]


def _name_age(extra: Callable[[dict], List[Any]]) -> Callable[[dict], List[Any]]:
    return lambda o: [o["metadata"]["name"]] + extra(o) + [age(o["metadata"].get("creationTimestamp"))]


TABLES: Dict[str, Tuple[List[Column], Callable[[dict], List[Any]]]] = {
    "Node": ([("Name", "string", 0, "name"), ("Status", "string", 0, ""), ("Roles", "string", 0, ""),
              ("Age", "string", 0, ""), ("Version", "string", 0, ""), ("Internal-IP", "string", 1, ""),
              ("External-IP", "string", 1, ""), ("OS-Image", "string", 1, ""), ("Kernel-Version", "string", 1, ""),
              ("Container-Runtime", "string", 1, "")], _node_row),
    "Pod": ([("Name", "string", 0, "name"), ("Ready", "string", 0, ""), ("Status", "string", 0, ""),
             ("Restarts", "string", 0, ""), ("Age", "string", 0, ""), ("IP", "string", 1, ""),
             ("Node", "string", 1, ""), ("Nominated Node", "string", 1, ""), ("Readiness Gates", "string", 1, "")],
            _pod_row),
    "DaemonSet": ([("Name", "string", 0, "name"), ("Desired", "integer", 0, ""), ("Current", "integer", 0, ""),
                   ("Ready", "integer", 0, ""), ("Up-to-date", "integer", 0, ""), ("Available", "integer", 0, ""),
                   ("Node Selector", "string", 0, ""), ("Age", "string", 0, ""), ("Containers", "string", 1, ""),
                   ("Images", "string", 1, ""), ("Selector", "string", 1, "")], _ds_row),
    "Event": ([("Last Seen", "string", 0, ""), ("Type", "string", 0, ""), ("Reason", "string", 0, ""),
               ("Object", "string", 0, ""), ("Subobject", "string", 1, ""), ("Source", "string", 1, ""),
               ("Message", "string", 0, ""), ("First Seen", "string", 1, ""), ("Count", "string", 1, ""),
               ("Name", "string", 1, "name")], _event_row),
    "Namespace": ([("Name", "string", 0, "name"), ("Status", "string", 0, ""), ("Age", "string", 0, "")],
                  _name_age(lambda o: [(o.get("status") or {}).get("phase", "")])),
    "ConfigMap": ([("Name", "string", 0, "name"), ("Data", "integer", 0, ""), ("Age", "string", 0, "")],
                  _name_age(lambda o: [len(o.get("data") or {}) + len(o.get("binaryData") or {})])),
    "Secret": ([("Name", "string", 0, "name"), ("Type", "string", 0, ""), ("Data", "integer", 0, ""),
                ("Age", "string", 0, "")], _name_age(lambda o: [o.get("type", ""), len(o.get("data") or {})])),
    "Lease": ([("Name", "string", 0, "name"), ("Holder", "string", 0, ""), ("Age", "string", 0, "")],
              _name_age(lambda o: [(o.get("spec") or {}).get("holderIdentity", "")])),
    "RuntimeClass": ([("Name", "string", 0, "name"), ("Handler", "string", 0, ""), ("Age", "string", 0, "")],
                     _name_age(lambda o: [o.get("handler", "")])),
}
DEFAULT_TABLE: Tuple[List[Column], Callable[[dict], List[Any]]] = (
    [("Name", "string", 0, "name"), ("Created At", "date", 0, "")],
    lambda o: [o["metadata"]["name"], o["metadata"].get("creationTimestamp")])


def column_definitions(res: Resource) -> List[dict]:
    cols, _fn = TABLES.get(res.kind, DEFAULT_TABLE)
    return [{"name": n, "type": t, "format": f, "description": n, "priority": p} for n, t, p, f in cols]


def table(res: Resource, items: List[dict], resource_version: str, include_object: str = "Metadata",
          with_columns: bool = True, continue_token: Optional[str] = None) -> dict:
    _cols, fn = TABLES.get(res.kind, DEFAULT_TABLE)
    rows = []
    for o in items:
        row: Dict[str, Any] = {"cells": fn(o)}
        if include_object == "Object":
            row["object"] = dict({"apiVersion": res.api_version, "kind": res.kind}, **o)
        elif include_object != "None":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": {k: v for k, v in o["metadata"].items() if k != "managedFields"}}
        rows.append(row)
    meta: Dict[str, Any] = {"resourceVersion": resource_version}
    if continue_token:
        meta["continue"] = continue_token
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
            "columnDefinitions": column_definitions(res) if with_columns else [], "rows": rows}
