"""Label and field selectors, and the scheduler's node predicates (selector, affinity, taints)."""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

Labels = Dict[str, str]
Matcher = Callable[[Labels], bool]


class SelectorError(ValueError):
    """A selector that does not parse (the server answers 400 BadRequest)."""


_TOKEN = re.compile(r"\s*(\(|\)|,|!=|==|=|!|[^\s(),=!]+)")


def _tokens(text: str) -> List[str]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise SelectorError("unable to parse requirement: %r" % text)
        out.append(m.group(1))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def parse_label_selector(text: Optional[str]) -> Matcher:
    """A label selector string (``a=b,c!=d,e in (x,y),f notin (z),g,!h``) as a predicate."""
    if not text or not text.strip():
        return lambda labels: True
    toks = _tokens(text)
    reqs: List[Matcher] = []
    i = 0

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise SelectorError("unable to parse requirement: %s in %r" % (what, text))

    while i < len(toks):
        if toks[i] == "!":
            need(i + 1 < len(toks), "missing key after '!'")
            key = toks[i + 1]
            reqs.append(lambda l, k=key: k not in l)
            i += 2
        else:
            key = toks[i]
            need(key not in ("(", ")", ",", "=", "==", "!="), "found '%s', expected: identifier" % key)
            i += 1
            op = toks[i] if i < len(toks) else ","
            if op == ",":
                reqs.append(lambda l, k=key: k in l)
            elif op in ("=", "==", "!="):
                need(i + 1 < len(toks) and toks[i + 1] not in (",", "(", ")"), "missing value")
                value = toks[i + 1]
                if op == "!=":
                    reqs.append(lambda l, k=key, v=value: l.get(k) != v)
                else:
                    reqs.append(lambda l, k=key, v=value: l.get(k) == v)
                i += 2
            elif op in ("in", "notin"):
                need(i + 1 < len(toks) and toks[i + 1] == "(", "expected '('")
                j = i + 2
                values = set()
                while j < len(toks) and toks[j] != ")":
                    if toks[j] != ",":
                        values.add(toks[j])
                    j += 1
                need(j < len(toks), "expected ')'")
                if op == "in":
                    reqs.append(lambda l, k=key, vs=frozenset(values): l.get(k) in vs)
                else:
                    reqs.append(lambda l, k=key, vs=frozenset(values): l.get(k) not in vs)
                i = j + 1
            elif op in ("gt", "lt") or op.startswith((">", "<")):
                raise SelectorError("unsupported operator %r in %r" % (op, text))
            else:
                raise SelectorError("unable to parse requirement: found '%s' in %r" % (op, text))
        if i < len(toks):
            need(toks[i] == ",", "expected ','")
            i += 1
    return lambda labels: all(r(labels) for r in reqs)


def parse_field_selector(text: Optional[str], allowed: Sequence[str], kind: str) -> Callable[[dict], bool]:
    """A field selector (``spec.nodeName=n1,status.phase!=Failed``) as a predicate on objects."""
    if not text or not text.strip():
        return lambda obj: True
    reqs = []
    for part in re.split(r"(?<!\\),", text):
        part = part.strip()
        if not part:
            continue
        m = re.match(r"^([^=!]+?)\s*(==|=|!=)\s*(.*)$", part)
        if not m:
            raise SelectorError("invalid selector: '%s'; can't understand '%s'" % (text, part))
        fld, op, value = m.group(1), m.group(2), m.group(3).replace("\\,", ",")
        if fld not in ("metadata.name", "metadata.namespace") and fld not in allowed:
            raise SelectorError('field label not supported: %s' % fld)
        path = fld.split(".")
        reqs.append((path, op == "!=", value))

    def match(obj: dict) -> bool:
        for path, negate, value in reqs:
            cur: Any = obj
            for p in path:
                cur = cur.get(p) if isinstance(cur, dict) else None
            if isinstance(cur, bool):
                cur = "true" if cur else "false"
            actual = "" if cur is None else str(cur)
            if (actual == value) == negate:
                return False
        return True
    return match


def match_label_selector_object(selector: Optional[dict], labels: Labels) -> bool:
    """A ``metav1.LabelSelector`` (matchLabels + matchExpressions). An empty selector matches everything."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        if not _expr(expr, labels.get(expr.get("key")), expr.get("key") in labels):
            return False
    return True


def _expr(expr: dict, value: Optional[str], present: bool) -> bool:
    op = expr.get("operator")
    values = expr.get("values") or []
    if op == "In":
        return present and value in values
    if op == "NotIn":
        return not present or value not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt"):
        try:
            a, b = int(value), int(values[0])  # type: ignore[arg-type]
        except (TypeError, ValueError, IndexError):
            return False
        return a > b if op == "Gt" else a < b
    return False


def node_matches_affinity(pod_spec: dict, node: dict) -> bool:
    """nodeSelector AND requiredDuringSchedulingIgnoredDuringExecution node affinity."""
    labels = node.get("metadata", {}).get("labels") or {}
    for k, v in (pod_spec.get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return False
    required = (((pod_spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if not required:
        return True
    name = node.get("metadata", {}).get("name")
    for term in required.get("nodeSelectorTerms") or []:
        exprs = term.get("matchExpressions") or []
        fields = term.get("matchFields") or []
        if not exprs and not fields:
            continue  # an empty term matches no node
        ok = all(_expr(e, labels.get(e.get("key")), e.get("key") in labels) for e in exprs)
        ok = ok and all(_expr(f, name if f.get("key") == "metadata.name" else None,
                              f.get("key") == "metadata.name") for f in fields)
        if ok:
            return True
    return False


def toleration_tolerates(tol: dict, taint: dict) -> bool:
    """The scheduler's rule (k8s.io/api/core/v1 Toleration.ToleratesTaint)."""
    if tol.get("effect") and tol.get("effect") != taint.get("effect"):
        return False
    if tol.get("key") and tol.get("key") != taint.get("key"):
        return False
    op = tol.get("operator") or "Equal"
    if op == "Exists":
        return True  # an empty key with Exists matches every key (checked above)
    if op == "Equal":
        return (tol.get("value") or "") == (taint.get("value") or "")
    return False


def untolerated_taints(pod_spec: dict, node: dict, effects: Tuple[str, ...] = ("NoSchedule", "NoExecute")
                       ) -> List[dict]:
    tols = pod_spec.get("tolerations") or []
    out = []
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") not in effects:
            continue
        if not any(toleration_tolerates(t, taint) for t in tols):
            out.append(taint)
    return out
