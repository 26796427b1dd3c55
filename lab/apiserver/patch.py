"""PATCH semantics: JSON patch, JSON merge patch, strategic merge patch, server-side apply.

The strategic-merge and apply rules use a table of list merge keys (the patchMergeKey /
listMapKey markers of the Kubernetes API types the lab serves), keyed by field name.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

# field name -> merge keys of its list items (associative lists); "finalizers" is a set.
MERGE_KEYS: Dict[str, Tuple[str, ...]] = {
    "containers": ("name",), "initContainers": ("name",), "ephemeralContainers": ("name",),
    "env": ("name",), "volumes": ("name",), "volumeMounts": ("mountPath",), "volumeDevices": ("devicePath",),
    "ports": ("containerPort",), "imagePullSecrets": ("name",), "conditions": ("type",),
    "ownerReferences": ("uid",), "hostAliases": ("ip",), "resourceClaims": ("name",),
}
SET_LISTS = ("finalizers",)


class PatchError(ValueError):
    """A patch that cannot be applied (the server answers 422 or 400)."""


def copy(value: Any) -> Any:
    """A deep copy of JSON-like data (faster than copy.deepcopy)."""
    if isinstance(value, dict):
        return {k: copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy(v) for v in value]
    return value


def _keys_for(field: Optional[str], items: List[Any]) -> Optional[Tuple[str, ...]]:
    keys = MERGE_KEYS.get(field or "")
    if not keys or not all(isinstance(i, dict) for i in items):
        return None
    if field == "ports" and items and all("containerPort" not in i and "port" in i for i in items):
        return ("port",)
    return keys


def _item_key(item: dict, keys: Tuple[str, ...]) -> Tuple[Any, ...]:
    return tuple(item.get(k) for k in keys)


# --- RFC 7386 JSON merge patch -------------------------------------------------------------
def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


# --- RFC 6902 JSON patch --------------------------------------------------------------------
def _pointer(path: str) -> List[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError("invalid JSON pointer %r" % path)
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: List[str], path: str) -> Any:
    cur = doc
    for p in parts:
        if isinstance(cur, dict):
            if p not in cur:
                raise PatchError("doc is missing path: %s" % path)
            cur = cur[p]
        elif isinstance(cur, list):
            try:
                cur = cur[int(p)]
            except (ValueError, IndexError):
                raise PatchError("doc is missing path: %s" % path)
        else:
            raise PatchError("doc is missing path: %s" % path)
    return cur


def json_patch(doc: Any, ops: Any) -> Any:
    if not isinstance(ops, list):
        raise PatchError("a JSON patch must be a list of operations")
    doc = copy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError("invalid JSON patch operation %r" % (op,))
        kind, path = op["op"], op["path"]
        parts = _pointer(path)
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError("missing value for %s at %s" % (kind, path))
        if kind == "test":
            if _walk(doc, parts, path) != op["value"]:
                raise PatchError("testing value %s failed" % path)
            continue
        if kind in ("move", "copy"):
            src = _pointer(op.get("from", ""))
            value = copy(_walk(doc, src, op.get("from", "")))
            if kind == "move":
                doc = _remove(doc, src, op.get("from", ""))
            doc = _add(doc, parts, value, path, replace=False)
        elif kind == "add":
            doc = _add(doc, parts, copy(op["value"]), path, replace=False)
        elif kind == "replace":
            _walk(doc, parts, path)
            doc = _add(doc, parts, copy(op["value"]), path, replace=True)
        elif kind == "remove":
            doc = _remove(doc, parts, path)
        else:
            raise PatchError("unknown JSON patch operation %r" % kind)
    return doc


def _add(doc: Any, parts: List[str], value: Any, path: str, replace: bool) -> Any:
    if not parts:
        return value
    parent = _walk(doc, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        else:
            try:
                idx = int(last)
            except ValueError:
                raise PatchError("invalid index in %s" % path)
            if idx < 0 or idx > len(parent) or (replace and idx == len(parent)):
                raise PatchError("index out of range: %s" % path)
            if replace:
                parent[idx] = value
            else:
                parent.insert(idx, value)
    else:
        raise PatchError("doc is missing path: %s" % path)
    return doc


def _remove(doc: Any, parts: List[str], path: str) -> Any:
    if not parts:
        raise PatchError("cannot remove the whole document")
    parent = _walk(doc, parts[:-1], path)
    last = parts[-1]
    try:
        if isinstance(parent, dict):
            del parent[last]
        elif isinstance(parent, list):
            del parent[int(last)]
        else:
            raise KeyError(last)
    except (KeyError, ValueError, IndexError):
        raise PatchError("unable to remove nonexistent key: %s" % path)
    return doc


# --- strategic merge patch --------------------------------------------------------------------
def strategic_merge(orig: Any, patch: Any, field: Optional[str] = None) -> Any:
    if not isinstance(patch, dict):
        return copy(patch)
    if not isinstance(orig, dict):
        orig = {}
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy(v) for k, v in patch.items() if k != "$patch"}
    result = dict(orig)
    retain = patch.get("$retainKeys")
    for k, v in patch.items():
        if k in ("$patch", "$retainKeys") or k.startswith("$setElementOrder/"):
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            name = k.split("/", 1)[1]
            if isinstance(result.get(name), list):
                result[name] = [x for x in result[name] if x not in (v or [])]
            continue
        if v is None:
            result.pop(k, None)
        elif isinstance(v, dict):
            if v.get("$patch") == "delete":
                result.pop(k, None)
            else:
                result[k] = strategic_merge(result.get(k), v, k)
        elif isinstance(v, list):
            result[k] = _merge_list(result.get(k), v, k)
        else:
            result[k] = v
    if isinstance(retain, list):
        result = {k: val for k, val in result.items() if k in retain}
    return result


def _merge_list(orig: Any, patch: List[Any], field: str) -> List[Any]:
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in patch):
        return [copy(i) for i in patch if not (isinstance(i, dict) and i.get("$patch") == "replace")]
    if field in SET_LISTS and isinstance(orig, list):
        return list(orig) + [copy(x) for x in patch if x not in orig]
    keys = _keys_for(field, list(patch))
    if keys is None or not isinstance(orig, list):
        return [copy(i) for i in patch if not (isinstance(i, dict) and i.get("$patch") == "delete")]
    result = list(orig)
    for item in patch:
        key = _item_key(item, keys)
        idx = next((n for n, cur in enumerate(result) if isinstance(cur, dict) and _item_key(cur, keys) == key), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                del result[idx]
        elif idx is None:
            result.append(strategic_merge({}, item))
        else:
            result[idx] = strategic_merge(result[idx], item)
    return result


# --- server-side apply ------------------------------------------------------------------------
IGNORED_META = ("name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
                "managedFields", "selfLink", "deletionTimestamp", "deletionGracePeriodSeconds")


def _key_str(item: dict, keys: Tuple[str, ...]) -> str:
    return "k:" + json.dumps({k: item[k] for k in keys if k in item}, separators=(",", ":"), sort_keys=True)


def fieldset(value: Any, field: Optional[str] = None, top: bool = True) -> Dict[str, Any]:
    """The fieldsV1 set of the fields a configuration names."""
    if isinstance(value, dict):
        out: Dict[str, Any] = {}
        for k, v in value.items():
            if top and k in ("apiVersion", "kind", "status"):
                continue
            if top and k == "metadata" and isinstance(v, dict):
                meta = {mk: mv for mk, mv in v.items() if mk not in IGNORED_META}
                if meta:
                    out["f:metadata"] = fieldset(meta, "metadata", False)
                continue
            if v is None:
                continue
            out["f:" + k] = fieldset(v, k, False)
        return out
    if isinstance(value, list):
        keys = _keys_for(field, value)
        if keys is not None:
            return {_key_str(i, keys): dict({".": {}}, **fieldset(i, None, False)) for i in value}
        if field in SET_LISTS:
            return {"v:" + json.dumps(x, separators=(",", ":")): {} for x in value}
    return {}


def changed_fieldset(old: Any, new: Any, field: Optional[str] = None, top: bool = True) -> Dict[str, Any]:
    """The fieldsV1 set of the fields whose value differs between ``old`` and ``new``."""
    if isinstance(new, dict) and isinstance(old, dict):
        out: Dict[str, Any] = {}
        for k, v in new.items():
            if top and k in ("apiVersion", "kind"):
                continue
            if top and k == "metadata":
                o = {mk: mv for mk, mv in (old.get(k) or {}).items() if mk not in IGNORED_META}
                n = {mk: mv for mk, mv in (v or {}).items() if mk not in IGNORED_META}
                sub = changed_fieldset(o, n, "metadata", False)
                if sub:
                    out["f:metadata"] = sub
                continue
            if k not in old:
                out["f:" + k] = fieldset(v, k, False)
            elif old[k] != v:
                sub = changed_fieldset(old[k], v, k, False)
                out["f:" + k] = sub
        return out
    if isinstance(new, list) and isinstance(old, list):
        keys = _keys_for(field, new)
        if keys is not None and all(isinstance(i, dict) for i in old):
            olds = {_key_str(i, keys): i for i in old}
            out = {}
            for item in new:
                ks = _key_str(item, keys)
                if ks not in olds:
                    out[ks] = dict({".": {}}, **fieldset(item, None, False))
                elif olds[ks] != item:
                    out[ks] = changed_fieldset(olds[ks], item, None, False)
            return out
    return fieldset(new, field, False) if isinstance(new, (dict, list)) else {}


def fs_union(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = fs_union(out[k], v) if k in out else v
    return out


def fs_subtract(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    """Paths of ``a`` that ``b`` does not name (a leaf in ``b`` removes the whole subtree)."""
    out: Dict[str, Any] = {}
    for k, v in a.items():
        if k not in b:
            out[k] = v
        elif v and b[k]:
            sub = fs_subtract(v, b[k])
            if sub:
                out[k] = sub
    return out


def fs_leaves(fs: Dict[str, Any], prefix: Tuple[str, ...] = ()) -> List[Tuple[str, ...]]:
    out: List[Tuple[str, ...]] = []
    for k, v in fs.items():
        if k == ".":
            continue
        path = prefix + (k,)
        children = {ck: cv for ck, cv in v.items() if ck != "."} if v else {}
        if children:
            out.extend(fs_leaves(children, path))
        else:
            out.append(path)
    return out


def fs_contains(fs: Dict[str, Any], path: Tuple[str, ...]) -> bool:
    cur = fs
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return False
        cur = cur[p]
    return True


def remove_path(obj: Any, path: Tuple[str, ...]) -> None:
    """Remove the field a fieldsV1 path names from ``obj`` (in place), pruning emptied maps."""
    if not path or obj is None:
        return
    head, rest = path[0], path[1:]
    if head.startswith("f:") and isinstance(obj, dict):
        name = head[2:]
        if name not in obj:
            return
        if rest:
            remove_path(obj[name], rest)
            if obj[name] in ({}, []):
                del obj[name]
        else:
            del obj[name]
    elif head.startswith("k:") and isinstance(obj, list):
        want = json.loads(head[2:])
        for idx, item in enumerate(obj):
            if isinstance(item, dict) and all(item.get(k) == v for k, v in want.items()):
                if rest:
                    remove_path(item, rest)
                else:
                    del obj[idx]
                return
    elif head.startswith("v:") and isinstance(obj, list):
        value = json.loads(head[2:])
        if value in obj:
            obj.remove(value)


def apply_merge(live: Any, applied: Any, field: Optional[str] = None) -> Any:
    """Merge an applied configuration into the live object (maps and associative lists merge,
    anything else the configuration names replaces the live value)."""
    if isinstance(applied, dict):
        out = dict(live) if isinstance(live, dict) else {}
        for k, v in applied.items():
            if v is None:
                continue
            out[k] = apply_merge(out.get(k), v, k)
        return out
    if isinstance(applied, list) and isinstance(live, list):
        keys = _keys_for(field, applied)
        if keys is not None and all(isinstance(i, dict) for i in live):
            result = list(live)
            for item in applied:
                key = _item_key(item, keys)
                idx = next((n for n, cur in enumerate(result) if _item_key(cur, keys) == key), None)
                if idx is None:
                    result.append(apply_merge({}, item))
                else:
                    result[idx] = apply_merge(result[idx], item)
            return result
        if field in SET_LISTS:
            return list(live) + [copy(x) for x in applied if x not in live]
    return copy(applied)
