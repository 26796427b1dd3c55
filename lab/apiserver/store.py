"""The object store of the lab API server: resourceVersions, writes, selectors, watches.

Stored objects are never changed in place: every write builds a new dict, so readers may
serialize what they got outside the lock.  Objects are stored without ``apiVersion``/``kind``
(like list items of the real server) and get them back on single reads and watch events.
"""
from __future__ import annotations

import base64
import collections
import json
import logging
import random
import threading
import zlib
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

from lab.contracts import NodeSpec, PluginPodStatus

from . import objects
from .patch import (PatchError, apply_merge, changed_fieldset, copy, fieldset, fs_contains, fs_leaves,
                    fs_subtract, fs_union, json_patch, merge_patch, remove_path, strategic_merge)
from .resources import BY_PATH, RESOURCES, Resource, lookup
from .selectors import SelectorError, parse_field_selector, parse_label_selector

LOG = logging.getLogger("lab.apiserver")
NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand alphabet
WATCH_LOG_SIZE = 4096
GPU_RESOURCE = "nvidia.com/gpu"
Key = Tuple[str, str]


def random_suffix(n: int = 5) -> str:
    return "".join(random.choice(NAME_CHARS) for _char in range(n))


class ApiError(Exception):
    """An API failure, answered as a ``Status`` body like the real server's."""

    def __init__(self, code: int, reason: str, message: str, details: Optional[dict] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details, self.headers = details, headers or {}

    def body(self) -> dict:
        out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason}
        if self.details is not None:
            out["details"] = self.details
        out["code"] = self.code
        return out


def _details(res: Resource, name: str, kind: Optional[str] = None) -> dict:
    out = {"name": name}
    if res.group:
        out["group"] = res.group
    out["kind"] = kind or res.plural
    return out


def not_found(res: Resource, name: str) -> ApiError:
    return ApiError(404, "NotFound", '%s "%s" not found' % (res.qualified, name), _details(res, name))


def already_exists(res: Resource, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", '%s "%s" already exists' % (res.qualified, name), _details(res, name))


STALE_OBJECT = "the object has been modified; please apply your changes to the latest version and try again"


def conflict(res: Resource, name: str, why: str = STALE_OBJECT) -> ApiError:
    return ApiError(409, "Conflict", 'Operation cannot be fulfilled on %s "%s": %s' % (res.qualified, name, why),
                    _details(res, name))


def invalid(res: Resource, name: str, causes: List[Tuple[str, str, str]]) -> ApiError:
    parts = ["%s: %s" % (f, m) for f, _r, m in causes]
    text = parts[0] if len(parts) == 1 else "[%s]" % ", ".join(parts)
    details = _details(res, name, res.kind)
    details["causes"] = [{"reason": r, "message": m, "field": f} for f, r, m in causes]
    return ApiError(422, "Invalid", '%s "%s" is invalid: %s' % (res.kind, name, text), details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def typed(res: Resource, obj: dict) -> dict:
    out = {"apiVersion": res.api_version, "kind": res.kind}
    out.update(obj)
    return out


def _without_mf_time(obj: dict) -> dict:
    meta = obj.get("metadata") or {}
    mf = meta.get("managedFields")
    if not mf:
        return obj
    out = dict(obj)
    out["metadata"] = dict(meta, managedFields=[{k: v for k, v in e.items() if k != "time"} for e in mf])
    return out


class Watcher:
    """One watch: filters the store's events and queues them for the HTTP handler."""

    def __init__(self, store: "Store", res: Resource, namespace: Optional[str],
                 label_match: Callable[[dict], bool], field_match: Callable[[dict], bool]) -> None:
        self.store, self.res, self.namespace = store, res, namespace
        self._lmatch, self._fmatch = label_match, field_match
        self._cond = threading.Condition()
        self._queue: Deque[Tuple[str, dict]] = collections.deque()
        self.closed = False

    def _match(self, obj: Optional[dict]) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace and meta.get("namespace") != self.namespace:
            return False
        return self._lmatch(meta.get("labels") or {}) and self._fmatch(obj)

    def offer(self, etype: str, old: Optional[dict], new: dict) -> None:
        if etype == "ADDED":
            out = "ADDED" if self._match(new) else None
        elif etype == "DELETED":
            out = "DELETED" if self._match(old if old is not None else new) else None
        else:
            was, now_ = self._match(old), self._match(new)
            out = "MODIFIED" if was and now_ else "ADDED" if now_ else "DELETED" if was else None
        if out:
            self.push(out, typed(self.res, new))

    def push(self, etype: str, obj: dict) -> None:
        with self._cond:
            self._queue.append((etype, obj))
            self._cond.notify()

    def get(self, timeout: float) -> List[Tuple[str, dict]]:
        with self._cond:
            if not self._queue and not self.closed:
                self._cond.wait(timeout)
            out = list(self._queue)
            self._queue.clear()
            return out

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self.store._remove_watcher(self)


class Store:
    """The cluster's objects; implements :class:`lab.contracts.ClusterHooks` for the node runtime."""

    def __init__(self, runtime: Any = None) -> None:
        self.lock = threading.RLock()
        self.runtime = runtime
        self._objs: Dict[Resource, Dict[Key, dict]] = {r: {} for r in RESOURCES}
        self._sorted: Dict[Resource, Optional[List[Key]]] = {r: None for r in RESOURCES}
        self._rv = 0
        self._log: Deque[Tuple[int, Resource, str, Optional[dict], dict]] = collections.deque(maxlen=WATCH_LOG_SIZE)
        self._log_floor = 0  # events with rv <= floor are no longer replayable
        self._watchers: Dict[Resource, List[Watcher]] = {r: [] for r in RESOURCES}
        self._listeners: List[Callable[[Resource, str, Optional[dict], dict], None]] = []
        self.node_specs: Dict[str, NodeSpec] = {}
        self._node_index = 0
        self.writes = 0  # objects written (created, changed, deleted) by anyone
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.create(BY_PATH[("", "v1", "namespaces")], None, {"metadata": {"name": ns}},
                        manager="kube-apiserver")

    # --- bookkeeping ------------------------------------------------------------------------
    @property
    def resource_version(self) -> int:
        return self._rv

    def add_listener(self, fn: Callable[[Resource, str, Optional[dict], dict], None]) -> None:
        """``fn(resource, event_type, old, new)`` runs under the store lock after every write."""
        self._listeners.append(fn)

    def _emit(self, res: Resource, etype: str, old: Optional[dict], new: dict) -> None:
        if len(self._log) == self._log.maxlen:
            self._log_floor = self._log[0][0]
        self._log.append((self._rv, res, etype, old, new))
        self.writes += 1
        for w in self._watchers[res]:
            w.offer(etype, old, new)
        for fn in self._listeners:
            try:
                fn(res, etype, old, new)
            except Exception:  # a listener must never break a write
                LOG.exception("store listener failed")

    def _remove_watcher(self, w: Watcher) -> None:
        with self.lock:
            if w in self._watchers[w.res]:
                self._watchers[w.res].remove(w)

    def close_watchers(self) -> None:
        with self.lock:
            watchers = [w for ws in self._watchers.values() for w in ws]
        for w in watchers:
            w.close()

    @staticmethod
    def resource(api_version: str, kind: str) -> Resource:
        res = lookup(api_version, kind)
        if res is None:
            raise bad_request("no kind %r is registered for version %r" % (kind, api_version))
        return res

    # --- reads ------------------------------------------------------------------------------
    def get_raw(self, res: Resource, namespace: Optional[str], name: str) -> Optional[dict]:
        return self._objs[res].get((namespace or "" if res.namespaced else "", name))

    def get(self, res: Resource, namespace: Optional[str], name: str) -> dict:
        obj = self.get_raw(res, namespace, name)
        if obj is None:
            raise not_found(res, name)
        return obj

    def _sorted_keys(self, res: Resource) -> List[Key]:
        keys = self._sorted[res]
        if keys is None:
            keys = self._sorted[res] = sorted(self._objs[res])
        return keys

    def list(self, res: Resource, namespace: Optional[str] = None, label_selector: Optional[str] = None,
             field_selector: Optional[str] = None, limit: Optional[int] = None,
             continue_token: Optional[str] = None) -> Tuple[List[dict], int, Optional[str], Optional[int]]:
        """(items, resourceVersion, continue token, remainingItemCount)."""
        lmatch, fmatch = self._matchers(res, label_selector, field_selector)
        start: Optional[Key] = None
        if continue_token:
            try:
                start = tuple(json.loads(base64.urlsafe_b64decode(continue_token.encode()))["start"])  # type: ignore
            except (ValueError, KeyError, TypeError):
                raise ApiError(410, "Expired", "The provided continue parameter is too old to display a "
                                               "consistent list result. You can start a new list without the "
                                               "continue parameter.")
        with self.lock:
            rv = self._rv
            objs = self._objs[res]
            keys = self._sorted_keys(res)
            items: List[dict] = []
            token = None
            remaining = None
            for i, key in enumerate(keys):
                if namespace and key[0] != namespace:
                    continue
                if start is not None and key <= start:
                    continue
                obj = objs[key]
                if lmatch((obj.get("metadata") or {}).get("labels") or {}) and fmatch(obj):
                    if limit and len(items) >= limit:
                        last = (items[-1]["metadata"].get("namespace", ""), items[-1]["metadata"]["name"])
                        token = base64.urlsafe_b64encode(json.dumps({"rv": rv, "start": last}).encode()).decode()
                        remaining = sum(1 for k in keys[i:] if (not namespace or k[0] == namespace)
                                        and lmatch((objs[k].get("metadata") or {}).get("labels") or {})
                                        and fmatch(objs[k]))
                        break
                    items.append(obj)
        return items, rv, token, remaining

    def _matchers(self, res: Resource, label_selector: Optional[str], field_selector: Optional[str]
                  ) -> Tuple[Callable[[dict], bool], Callable[[dict], bool]]:
        try:
            return (parse_label_selector(label_selector),
                    parse_field_selector(field_selector, res.field_labels, res.kind))
        except SelectorError as exc:
            raise bad_request(str(exc))

    def watch(self, res: Resource, namespace: Optional[str] = None, label_selector: Optional[str] = None,
              field_selector: Optional[str] = None, resource_version: Optional[str] = None) -> Watcher:
        lmatch, fmatch = self._matchers(res, label_selector, field_selector)
        w = Watcher(self, res, namespace, lmatch, fmatch)
        with self.lock:
            if resource_version and resource_version != "0":
                try:
                    since = int(resource_version)
                except ValueError:
                    raise bad_request('invalid resource version "%s"' % resource_version)
                if since < self._log_floor:
                    w.push("ERROR", {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                     "message": "too old resource version: %d (%d)" % (since, self._log_floor + 1),
                                     "reason": "Expired", "code": 410})
                    w.closed = True
                    return w
                for rv, r, etype, old, new in self._log:
                    if r is res and rv > since:
                        w.offer(etype, old, new)
            else:
                for key in self._sorted_keys(res):
                    obj = self._objs[res][key]
                    if w._match(obj):
                        w.push("ADDED", typed(res, obj))
            self._watchers[res].append(w)
        return w

    # --- writes -----------------------------------------------------------------------------
    def _check_type(self, res: Resource, body: Any) -> None:
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if api_version and api_version != res.api_version:
            raise bad_request("the API version in the data (%s) does not match the expected API version (%s)"
                              % (api_version, res.api_version))
        if kind and kind != res.kind:
            raise bad_request("the kind in the data (%s) does not match the expected kind (%s)" % (kind, res.kind))
        if not isinstance(body.get("metadata", {}), dict):
            raise bad_request("metadata must be an object")

    def _namespace_of(self, res: Resource, namespace: Optional[str], meta: dict) -> str:
        if not res.namespaced:
            meta.pop("namespace", None)
            return ""
        body_ns = meta.get("namespace")
        if namespace and body_ns and body_ns != namespace:
            raise bad_request("the namespace of the provided object does not match the namespace sent on the "
                              "request")
        ns = namespace or body_ns or "default"
        meta["namespace"] = ns
        return ns

    def create(self, res: Resource, namespace: Optional[str], body: dict, *, manager: str = "unknown",
               dry_run: bool = False, keep_status: bool = False, managed_fields: bool = True,
               applied: Optional[dict] = None) -> dict:
        """Create an object. ``applied``: the object comes from a server-side apply of this
        configuration (the manager's entry is an Apply one)."""
        self._check_type(res, body)
        obj = copy(body)
        obj.pop("apiVersion", None)
        obj.pop("kind", None)
        meta = obj.setdefault("metadata", {})
        for field in ("uid", "resourceVersion", "creationTimestamp", "managedFields", "generation", "selfLink",
                      "deletionTimestamp"):
            meta.pop(field, None)
        ns = self._namespace_of(res, namespace, meta)
        objects.default_object(res.kind, obj)
        if res.has_status or res.kind in ("Namespace",):
            status = objects.initial_status(res.kind, obj)
            if status is not None and not keep_status:
                obj["status"] = status
        if res.generation:
            meta["generation"] = 1
        meta["uid"] = objects.new_uid()
        meta["creationTimestamp"] = objects.now()
        if applied is not None:
            meta["managedFields"] = [self._mf_entry(manager, "Apply", res, fieldset(applied))]
        elif managed_fields:
            fs = fieldset(body)
            if fs:
                meta["managedFields"] = [self._mf_entry(manager, "Update", res, fs)]
        with self.lock:
            if not meta.get("name") and meta.get("generateName"):
                for _attempt in range(10):
                    candidate = meta["generateName"] + random_suffix()
                    if (ns, candidate) not in self._objs[res]:
                        meta["name"] = candidate
                        break
            name = meta.get("name")
            if not name:
                raise invalid(res, "", [("metadata.name", "FieldValueRequired",
                                         "Required value: name or generateName is required")])
            causes = objects.validate(res.kind, obj, None)
            if causes:
                raise invalid(res, name, causes)
            if res.namespaced and ("", ns) not in self._objs[BY_PATH[("", "v1", "namespaces")]]:
                raise ApiError(404, "NotFound", 'namespaces "%s" not found' % ns, {"name": ns, "kind": "namespaces"})
            if (ns, name) in self._objs[res]:
                raise already_exists(res, name)
            if dry_run:
                return typed(res, obj)
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            self._objs[res][(ns, name)] = obj
            self._sorted[res] = None
            self._emit(res, "ADDED", None, obj)
            return typed(res, obj)

    @staticmethod
    def _mf_entry(manager: str, operation: str, res: Resource, fs: dict, subresource: Optional[str] = None) -> dict:
        entry = {"manager": manager, "operation": operation, "apiVersion": res.api_version, "time": objects.now(),
                 "fieldsType": "FieldsV1", "fieldsV1": fs}
        if subresource:
            entry["subresource"] = subresource
        return entry

    def update(self, res: Resource, namespace: Optional[str], name: str, mutate: Callable[[dict], dict], *,
               manager: str = "unknown", operation: str = "Update", subresource: Optional[str] = None,
               dry_run: bool = False, applied: Optional[dict] = None, create: Optional[Callable[[], dict]] = None,
               managed_fields: bool = True) -> dict:
        """Read-modify-write one object under the lock. ``mutate(old)`` returns the new object
        (it may be the same dict as ``old``'s copy). ``applied``: the apply configuration (for
        managedFields ownership and field removal). ``create``: called when the object is missing."""
        ns = (namespace or "default") if res.namespaced else ""
        with self.lock:
            old = self._objs[res].get((ns, name))
            if old is None:
                if create is None:
                    raise not_found(res, name)
                return create()
            try:
                new = mutate(copy(old))
            except PatchError as exc:
                raise ApiError(422, "Invalid", str(exc), _details(res, name, res.kind))
            if not isinstance(new, dict):
                raise bad_request("the patched object is not a JSON object")
            self._check_type(res, new)
            new.pop("apiVersion", None)
            new.pop("kind", None)
            meta = new.get("metadata")
            if not isinstance(meta, dict):
                meta = new["metadata"] = {}
            old_meta = old["metadata"]
            want_rv = meta.get("resourceVersion")
            if want_rv and want_rv != old_meta.get("resourceVersion"):
                raise conflict(res, name)
            if meta.get("name", name) != name:
                raise bad_request("the name of the object (%s) does not match the name on the URL (%s)"
                                  % (meta.get("name"), name))
            if res.namespaced and meta.get("namespace", ns) != ns:
                raise bad_request("the namespace of the provided object does not match the namespace sent on "
                                  "the request")
            if subresource == "status":
                status = new.get("status")
                new = {k: v for k, v in old.items() if k != "status"}
                if status is not None:
                    new["status"] = status
                new["metadata"] = meta = dict(old_meta)
            elif res.has_status and subresource != "binding":  # binding (scheduler): nodeName + status
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)
            for field in ("name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion",
                          "generateName"):
                if field in old_meta:
                    meta[field] = old_meta[field]
                else:
                    meta.pop(field, None)
            meta["managedFields"] = old_meta.get("managedFields") or []
            if subresource != "status":
                objects.default_object(res.kind, new)
            if res.generation and subresource != "status" and new.get("spec") != old.get("spec"):
                meta["generation"] = int(old_meta.get("generation") or 1) + 1
            if operation == "Apply" and applied is not None:
                self._apply_ownership(res, new, meta, manager, applied, subresource)
            elif managed_fields:
                changed = changed_fieldset(old, new)
                if subresource == "status":
                    changed = {k: v for k, v in changed.items() if k == "f:status"}
                if changed:
                    meta["managedFields"] = self._own(res, meta["managedFields"], manager, "Update", changed,
                                                      subresource)
            if not meta["managedFields"]:
                meta.pop("managedFields")
            if _without_mf_time(new) == _without_mf_time(old):
                return typed(res, old)
            if subresource not in ("status", "binding"):
                causes = objects.validate(res.kind, new, old)
                if causes:
                    raise invalid(res, name, causes)
            if dry_run:
                return typed(res, new)
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            self._objs[res][(ns, name)] = new
            self._emit(res, "MODIFIED", old, new)
            return typed(res, new)

    def _own(self, res: Resource, entries: List[dict], manager: str, operation: str, fs: dict,
             subresource: Optional[str], replace: bool = False) -> List[dict]:
        """Give ``manager`` the fields in ``fs``; an Update takes them away from the others."""
        out = []
        found = False
        for e in entries:
            same = (e.get("manager") == manager and e.get("operation") == operation
                    and e.get("subresource") == subresource)
            if same:
                found = True
                merged = fs if replace else fs_union(e.get("fieldsV1") or {}, fs)
                out.append(self._mf_entry(manager, operation, res, merged, subresource))
            elif operation == "Update":
                rest = fs_subtract(e.get("fieldsV1") or {}, fs)
                if rest:
                    out.append(dict(e, fieldsV1=rest))
            else:
                out.append(e)
        if not found:
            out.append(self._mf_entry(manager, operation, res, fs, subresource))
        return out

    def _apply_ownership(self, res: Resource, new: dict, meta: dict, manager: str, applied: dict,
                         subresource: Optional[str]) -> None:
        new_fs = fieldset(applied)
        if subresource == "status":
            new_fs = {"f:status": fieldset(applied.get("status"), "status", False)} if applied.get("status") else {}
        entries = meta["managedFields"]
        previous = next((e.get("fieldsV1") or {} for e in entries if e.get("manager") == manager
                         and e.get("operation") == "Apply" and e.get("subresource") == subresource), {})
        others = [e.get("fieldsV1") or {} for e in entries if not (
            e.get("manager") == manager and e.get("operation") == "Apply" and e.get("subresource") == subresource)]
        for path in fs_leaves(fs_subtract(previous, new_fs)):
            if not any(fs_contains(o, path) for o in others):
                remove_path(new, path)
        meta["managedFields"] = self._own(res, entries, manager, "Apply", new_fs, subresource, replace=True)

    def replace(self, res: Resource, namespace: Optional[str], name: str, body: dict, *, manager: str = "unknown",
                subresource: Optional[str] = None, dry_run: bool = False) -> dict:
        self._check_type(res, body)
        return self.update(res, namespace, name, lambda old: copy(body), manager=manager,
                           subresource=subresource, dry_run=dry_run)

    def patch(self, res: Resource, namespace: Optional[str], name: str, patch_type: str, patch: Any, *,
              manager: str = "unknown", subresource: Optional[str] = None, dry_run: bool = False,
              force: bool = False) -> dict:
        """``patch_type``: json, merge, strategic or apply (the Content-Type's short name)."""
        if patch_type == "apply":
            self._check_type(res, patch)
            if not patch.get("apiVersion") or not patch.get("kind"):
                raise bad_request("apiVersion and kind must be set in an apply configuration")
            pname = (patch.get("metadata") or {}).get("name")
            if pname and pname != name:
                raise bad_request("the name of the object (%s) does not match the name on the URL (%s)"
                                  % (pname, name))
            applied = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}

            def create() -> dict:
                if subresource:
                    raise not_found(res, name)
                body = copy(patch)
                body.setdefault("metadata", {})["name"] = name
                return self._create_applied(res, namespace, body, manager, applied, dry_run)
            return self.update(res, namespace, name, lambda old: apply_merge(old, applied), manager=manager,
                               operation="Apply", subresource=subresource, dry_run=dry_run, applied=applied,
                               create=create)
        if patch_type in ("merge", "strategic") and not isinstance(patch, dict):
            raise bad_request("a %s patch must be a JSON object" % ("merge" if patch_type == "merge" else "strategic merge"))
        appliers: Dict[str, Callable[[dict], dict]] = {
            "json": lambda old: json_patch(typed(res, old), patch),
            "merge": lambda old: merge_patch(old, patch),
            "strategic": lambda old: strategic_merge(old, patch),
        }
        if patch_type not in appliers:
            raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                           "accepted media types include: application/json-patch+json, "
                           "application/merge-patch+json, application/apply-patch+yaml, "
                           "application/strategic-merge-patch+json")
        fn = appliers[patch_type]
        return self.update(res, namespace, name, fn, manager=manager, subresource=subresource, dry_run=dry_run)

    def _create_applied(self, res: Resource, namespace: Optional[str], body: dict, manager: str, applied: dict,
                        dry_run: bool) -> dict:
        return self.create(res, namespace, body, manager=manager, dry_run=dry_run, applied=applied)

    def delete(self, res: Resource, namespace: Optional[str], name: str, *, dry_run: bool = False,
               preconditions: Optional[dict] = None) -> dict:
        ns = (namespace or "default") if res.namespaced else ""
        with self.lock:
            old = self._objs[res].get((ns, name))
            if old is None:
                raise not_found(res, name)
            pre = preconditions or {}
            if pre.get("uid") and pre["uid"] != old["metadata"].get("uid"):
                raise conflict(res, name, "Precondition failed: UID in precondition: %s, UID in object meta: %s"
                               % (pre["uid"], old["metadata"].get("uid")))
            if pre.get("resourceVersion") and pre["resourceVersion"] != old["metadata"].get("resourceVersion"):
                raise conflict(res, name, "Precondition failed: ResourceVersion in precondition: %s, "
                                          "ResourceVersion in object meta: %s"
                               % (pre["resourceVersion"], old["metadata"].get("resourceVersion")))
            if dry_run:
                return typed(res, old)
            if res.plural == "namespaces":
                for r in RESOURCES:
                    if r.namespaced:
                        for key in [k for k in self._objs[r] if k[0] == name]:
                            self.delete(r, name, key[1])
            del self._objs[res][(ns, name)]
            self._sorted[res] = None
            self._rv += 1
            gone = dict(old, metadata=dict(old["metadata"], resourceVersion=str(self._rv)))
            self._emit(res, "DELETED", old, gone)
            return typed(res, gone)

    # --- Python API by apiVersion/kind (for lab code and tests) ------------------------------
    def create_object(self, obj: dict, manager: str = "lab") -> dict:
        res = self.resource(obj.get("apiVersion", ""), obj.get("kind", ""))
        return self.create(res, (obj.get("metadata") or {}).get("namespace"), obj, manager=manager)

    def get_object(self, api_version: str, kind: str, namespace: Optional[str], name: str) -> Optional[dict]:
        """ClusterHooks: a copy of the object, or None when absent."""
        res = self.resource(api_version, kind)
        with self.lock:
            obj = self.get_raw(res, namespace, name)
        return None if obj is None else copy(typed(res, obj))

    def list_objects(self, api_version: str, kind: str, namespace: Optional[str] = None,
                     label_selector: Optional[str] = None, field_selector: Optional[str] = None) -> List[dict]:
        res = self.resource(api_version, kind)
        items, _rv, _t, _r = self.list(res, namespace, label_selector, field_selector)
        return [copy(typed(res, o)) for o in items]

    def patch_object(self, api_version: str, kind: str, namespace: Optional[str], name: str, patch: Any,
                     patch_type: str = "merge", subresource: Optional[str] = None, manager: str = "lab") -> dict:
        res = self.resource(api_version, kind)
        return self.patch(res, namespace, name, patch_type, patch, manager=manager, subresource=subresource)

    def delete_object(self, api_version: str, kind: str, namespace: Optional[str], name: str) -> None:
        self.delete(self.resource(api_version, kind), namespace, name)

    # --- simulated nodes ---------------------------------------------------------------------
    def add_node(self, spec: NodeSpec) -> dict:
        """Register a simulated node (Ready, with capacity and nodeInfo), like its kubelet would."""
        return self.add_nodes([spec])[0]

    def add_nodes(self, specs: Iterable[NodeSpec]) -> List[dict]:
        res = BY_PATH[("", "v1", "nodes")]
        out = []
        with self.lock:
            created = objects.now()
            for spec in specs:
                body = objects.node_object(spec, self._node_index, created)
                self._node_index += 1
                node = self.create(res, None, body, manager="kubelet", keep_status=True)
                out.append(node)
                self.node_specs[spec.name] = spec
                self._node_lease(node)
        return out

    def _node_lease(self, node: dict) -> None:
        """The kubelet's heartbeat Lease in kube-node-lease (kubectl describe node shows it)."""
        meta = node["metadata"]
        owner = {"apiVersion": "v1", "kind": "Node", "name": meta["name"], "uid": meta["uid"]}
        body = {"metadata": {"name": meta["name"], "namespace": "kube-node-lease", "ownerReferences": [owner]},
                "spec": {"holderIdentity": meta["name"], "leaseDurationSeconds": 40,
                         "renewTime": meta["creationTimestamp"].replace("Z", ".000000Z")}}
        leases = BY_PATH[("coordination.k8s.io", "v1", "leases")]
        if self.get_raw(leases, "kube-node-lease", meta["name"]) is None:
            self.create(leases, "kube-node-lease", body, manager="kubelet", managed_fields=False)

    def remove_node(self, name: str) -> None:
        self.delete(BY_PATH[("", "v1", "nodes")], None, name)
        self.node_specs.pop(name, None)
        try:
            self.delete(BY_PATH[("coordination.k8s.io", "v1", "leases")], "kube-node-lease", name)
        except ApiError:
            pass

    # --- ClusterHooks --------------------------------------------------------------------------
    def update_pod_status(self, namespace: str, name: str, status: PluginPodStatus) -> None:
        res = BY_PATH[("", "v1", "pods")]
        try:
            self.update(res, namespace, name, lambda pod: dict(pod, status=self.pod_status_for(pod, status)),
                        manager="kubelet", subresource="status")
        except ApiError as exc:
            if exc.code != 404:
                raise

    def pod_status_for(self, pod: dict, st: PluginPodStatus) -> dict:
        node = self.get_raw(BY_PATH[("", "v1", "nodes")], None, (pod.get("spec") or {}).get("nodeName") or "")
        host_ip = objects.node_internal_ip(node) if node else ""
        if (pod.get("spec") or {}).get("hostNetwork"):
            pod_ip = host_ip
        else:
            meta = pod["metadata"]
            h = zlib.crc32(("%s/%s" % (meta.get("namespace"), meta.get("name"))).encode()) & 0xFFFFFF
            pod_ip = "10.244.%d.%d" % ((h >> 8) % 256, h % 254 + 1)
        return objects.pod_status(pod, host_ip, pod_ip, running=st.running, ready=st.ready,
                                  restart_count=st.restart_count, waiting_reason=st.waiting_reason,
                                  last_exit_code=st.last_exit_code, last_reason=st.last_reason,
                                  started_at=st.started_at)

    def update_node_status(self, node: str, capacity: Dict[str, str], allocatable: Dict[str, str],
                           ready: Optional[bool] = None) -> None:
        res = BY_PATH[("", "v1", "nodes")]

        def mutate(obj: dict) -> dict:
            status = obj.setdefault("status", {})
            cap = {k: v for k, v in (status.get("capacity") or {}).items() if not objects.is_extended(k)}
            alloc = {k: v for k, v in (status.get("allocatable") or {}).items() if not objects.is_extended(k)}
            cap.update(capacity)
            alloc.update({k: v for k, v in allocatable.items() if k in capacity or not objects.is_extended(k)})
            status["capacity"], status["allocatable"] = cap, alloc
            if ready is not None:
                ts = objects.now()
                conds = []
                for c in status.get("conditions") or []:
                    if c.get("type") == "Ready":
                        value = "True" if ready else "False"
                        changed = c.get("status") != value
                        c = dict(c, status=value, lastHeartbeatTime=ts,
                                 reason="KubeletReady" if ready else "KubeletNotReady",
                                 message="kubelet is posting ready status" if ready
                                 else "container runtime status check may not have completed yet")
                        if changed or c.get("lastTransitionTime") is None:
                            c["lastTransitionTime"] = ts
                    conds.append(c)
                status["conditions"] = conds
            return obj
        self.update(res, None, node, mutate, manager="kubelet", subresource="status")
