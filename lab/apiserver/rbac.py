"""RBAC for the lab API server: tokens bound to PolicyRules, evaluated like the RBAC authorizer.

A rule is a Kubernetes ``PolicyRule`` (``apiGroups``, ``resources``, ``verbs``, optional
``resourceNames``) plus the lab's ``namespace`` key: absent, the rule applies cluster-wide (a
ClusterRole bound by a ClusterRoleBinding); set, it applies only to requests in that namespace
(a Role, or a ClusterRole, bound by a RoleBinding there).

Evaluation follows k8s.io/kubernetes/pkg/apis/rbac/v1/evaluation_helpers.go: a request is allowed
when one rule matches its verb (``*`` matches all), API group (``*``), resource (``*``, the exact
``resource`` or ``resource/subresource``, or ``*/subresource``) and, when the rule lists
``resourceNames``, its object name (requests without a name, such as create or an unfiltered
list, never match such a rule; list/watch with ``fieldSelector=metadata.name=<n>`` have the name
``<n>``, like the real request-info). Non-resource requests (discovery, ``/version``, OpenAPI)
are allowed to every authenticated user, as the built-in ``system:discovery`` role does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Tuple

import yaml

from .store import ApiError

RULE_KEYS = ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs", "namespace")
RBAC_GROUP = "rbac.authorization.k8s.io"


@dataclass(frozen=True)
class Rule:
    verbs: FrozenSet[str]
    groups: FrozenSet[str]
    resources: FrozenSet[str]
    names: FrozenSet[str]
    namespace: Optional[str]

    def allows(self, verb: str, group: str, resource: str, subresource: str, name: str, namespace: str) -> bool:
        if self.namespace is not None and self.namespace != namespace:
            return False
        if "*" not in self.verbs and verb not in self.verbs:
            return False
        if "*" not in self.groups and group not in self.groups:
            return False
        combined = "%s/%s" % (resource, subresource) if subresource else resource
        if not ("*" in self.resources or combined in self.resources
                or (subresource and "*/" + subresource in self.resources)):
            return False
        return not self.names or name in self.names


def _strings(rule: Dict[str, Any], key: str, index: int) -> FrozenSet[str]:
    value = rule.get(key)
    if value is None:
        return frozenset()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("rules[%d].%s must be a list of strings, got %r" % (index, key, value))
    return frozenset(value)


def compile_rules(rules: Iterable[Dict[str, Any]]) -> Tuple[Rule, ...]:
    """Check rules in PolicyRule shape (plus ``namespace``) and compile them for evaluation."""
    out = []
    for index, rule in enumerate(rules):
        if not isinstance(rule, dict):
            raise ValueError("rules[%d] must be a mapping, got %r" % (index, rule))
        unknown = sorted(set(rule) - set(RULE_KEYS))
        if unknown:
            raise ValueError("rules[%d] has unknown keys %s (known: %s)" % (index, unknown, ", ".join(RULE_KEYS)))
        verbs = _strings(rule, "verbs", index)
        if not verbs:
            raise ValueError("rules[%d].verbs: Required value" % index)
        namespace = rule.get("namespace")
        if namespace is not None and (not isinstance(namespace, str) or not namespace):
            raise ValueError("rules[%d].namespace must be a namespace name, got %r" % (index, namespace))
        resources = _strings(rule, "resources", index)
        if resources and "apiGroups" not in rule:
            raise ValueError("rules[%d].apiGroups: Required value (use [\"\"] for the core group)" % index)
        if not resources and not rule.get("nonResourceURLs"):
            raise ValueError("rules[%d]: resource rules must supply at least one resource" % index)
        out.append(Rule(verbs=verbs, groups=_strings(rule, "apiGroups", index), resources=resources,
                        names=_strings(rule, "resourceNames", index), namespace=namespace))
    return tuple(out)


class Identity:
    """Who a bearer token authenticates as, and what it may do (``rules`` None: everything)."""

    def __init__(self, user: str, rules: Optional[Iterable[Dict[str, Any]]] = None) -> None:
        self.user = user
        self.rule_dicts = None if rules is None else [dict(r) for r in rules]
        self.rules = None if rules is None else compile_rules(self.rule_dicts or [])

    @property
    def admin(self) -> bool:
        return self.rules is None

    def allows(self, verb: str, group: str, resource: str, subresource: str, name: str, namespace: str) -> bool:
        if self.rules is None:
            return True
        return any(r.allows(verb, group, resource, subresource, name, namespace) for r in self.rules)


def forbidden(user: str, verb: str, group: str, resource: str, qualified: str, subresource: str, name: str,
              namespace: str) -> ApiError:
    """The real server's 403 (responsewriters.Forbidden + apierrors.NewForbidden)."""
    what = "%s/%s" % (resource, subresource) if subresource else resource
    if namespace:
        why = 'User "%s" cannot %s resource "%s" in API group "%s" in the namespace "%s"' % (
            user, verb, what, group, namespace)
    else:
        why = 'User "%s" cannot %s resource "%s" in API group "%s" at the cluster scope' % (user, verb, what, group)
    if name:
        message = '%s "%s" is forbidden: %s' % (qualified, name, why)
    else:
        message = "%s is forbidden: %s" % (qualified, why)
    details: Dict[str, Any] = {}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    details["kind"] = resource
    return ApiError(403, "Forbidden", message, details)


_NAME_TERM = re.compile(r"^\s*metadata\.name\s*==?\s*(.*?)\s*$")


def name_from_field_selector(selector: Optional[str]) -> str:
    """``metadata.name=<n>`` (or ``==``) in a field selector: the name list/watch are authorized for."""
    if not selector:
        return ""
    for term in re.split(r"(?<!\\),", selector):
        m = _NAME_TERM.match(term)
        if m and m.group(1) and "/" not in m.group(1) and m.group(1) not in (".", ".."):
            return m.group(1)
    return ""


# --- RBAC manifests ----------------------------------------------------------------------------
def _split_account(service_account: str) -> Tuple[str, str]:
    text = service_account
    if text.startswith("system:serviceaccount:"):
        text = text[len("system:serviceaccount:"):]
    parts = text.split(":")
    if len(parts) != 2 or not all(parts):
        raise ValueError("service_account must be 'namespace:name' (or system:serviceaccount:namespace:name), "
                         "got %r" % service_account)
    return parts[0], parts[1]


def service_account_user(service_account: str) -> str:
    """``system:serviceaccount:<namespace>:<name>``: the user name a ServiceAccount token carries."""
    ns, name = _split_account(service_account)
    return "system:serviceaccount:%s:%s" % (ns, name)


def load_documents(path: str) -> List[Dict[str, Any]]:
    """The documents of a (multi-document) YAML file, ``kind: List`` expanded."""
    with open(path, encoding="utf-8") as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    out: List[Dict[str, Any]] = []
    for doc in docs:
        if not isinstance(doc, dict):
            raise ValueError("%s: every document must be a mapping, got %r" % (path, type(doc).__name__))
        if doc.get("kind") == "List" or (doc.get("kind", "").endswith("List") and "items" in doc):
            out.extend(i for i in doc.get("items") or [] if isinstance(i, dict))
        else:
            out.append(doc)
    return out


def _subject_matches(subject: Dict[str, Any], binding_ns: str, sa_ns: str, sa_name: str) -> bool:
    kind = subject.get("kind")
    name = subject.get("name")
    if kind == "ServiceAccount":
        # an empty subject namespace means the binding's own (k8s rbac appliesToUser)
        return name == sa_name and (subject.get("namespace") or binding_ns) == sa_ns
    if kind == "User":
        return name == "system:serviceaccount:%s:%s" % (sa_ns, sa_name)
    if kind == "Group":
        return name in ("system:serviceaccounts", "system:serviceaccounts:%s" % sa_ns, "system:authenticated")
    return False


def rules_from_rbac_documents(docs: Iterable[Dict[str, Any]], service_account: str) -> List[Dict[str, Any]]:
    """The rules bound to ``service_account`` ("namespace:name") by the ClusterRoleBindings and
    RoleBindings among ``docs``: rules of a ClusterRoleBinding's role apply cluster-wide (no
    ``namespace`` key); rules of a RoleBinding's role (Role or ClusterRole) apply in the binding's
    namespace (``namespace`` set). A binding that names a role missing from ``docs`` raises
    ``ValueError`` (the lab has no built-in roles)."""
    sa_ns, sa_name = _split_account(service_account)
    docs = list(docs)
    roles: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    for doc in docs:
        kind = doc.get("kind")
        meta = doc.get("metadata") or {}
        if kind == "ClusterRole":
            roles[("ClusterRole", "", meta.get("name", ""))] = doc
        elif kind == "Role":
            roles[("Role", meta.get("namespace") or "default", meta.get("name", ""))] = doc
    out: List[Dict[str, Any]] = []
    for doc in docs:
        kind = doc.get("kind")
        if kind not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        meta = doc.get("metadata") or {}
        binding_ns = "" if kind == "ClusterRoleBinding" else (meta.get("namespace") or "default")
        if not any(_subject_matches(s, binding_ns, sa_ns, sa_name) for s in doc.get("subjects") or []
                   if isinstance(s, dict)):
            continue
        ref = doc.get("roleRef") or {}
        ref_kind, ref_name = ref.get("kind"), ref.get("name")
        if ref_kind not in ("ClusterRole", "Role") or (kind == "ClusterRoleBinding" and ref_kind == "Role"):
            raise ValueError("%s %s: roleRef.kind must be ClusterRole%s, got %r"
                             % (kind, meta.get("name"), "" if kind == "ClusterRoleBinding" else " or Role", ref_kind))
        role = roles.get((ref_kind, binding_ns if ref_kind == "Role" else "", ref_name))
        if role is None:
            where = ' in namespace "%s"' % binding_ns if ref_kind == "Role" else ""
            raise ValueError('%s %s refers to %s.%s "%s"%s, which is not in the manifest'
                             % (kind, meta.get("name"), ref_kind.lower(), RBAC_GROUP, ref_name, where))
        if role.get("aggregationRule") and not role.get("rules"):
            raise ValueError('ClusterRole "%s" is aggregated: the lab does not aggregate roles' % ref_name)
        for rule in role.get("rules") or []:
            rule = {k: v for k, v in rule.items() if k in RULE_KEYS and k != "namespace"}
            if binding_ns:
                rule["namespace"] = binding_ns
            out.append(rule)
    compile_rules(out)  # fail early on a malformed rule
    return out


def rules_from_rbac_yaml(path: str, service_account: str) -> List[Dict[str, Any]]:
    """``rules_from_rbac_documents`` for a (multi-document) YAML file such as docs/rbac.yaml."""
    return rules_from_rbac_documents(load_documents(path), service_account)
