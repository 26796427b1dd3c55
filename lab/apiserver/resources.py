"""The resource types the lab API server serves, and its discovery documents."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
SERVER_VERSION = {
    "major": "1", "minor": "32", "gitVersion": "v1.32.0-lab", "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean", "buildDate": "2024-12-11T00:00:00Z", "goVersion": "go1.23.3",
    "compiler": "gc", "platform": "linux/amd64",
}


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core group
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: Tuple[str, ...] = ()
    subresources: Tuple[str, ...] = ()  # "status", "log"
    categories: Tuple[str, ...] = ()
    generation: bool = False  # metadata.generation bumps on spec changes
    # extra field selector labels beyond metadata.name / metadata.namespace
    field_labels: Tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return "%s/%s" % (self.group, self.version) if self.group else self.version

    @property
    def qualified(self) -> str:
        """``pods`` or ``daemonsets.apps``: how error messages name the resource."""
        return "%s.%s" % (self.plural, self.group) if self.group else self.plural

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources


RESOURCES: List[Resource] = [
    Resource("", "v1", "namespaces", "namespace", "Namespace", False, ("ns",), ("status",),
             field_labels=("status.phase",)),
    Resource("", "v1", "nodes", "node", "Node", False, ("no",), ("status",), field_labels=("spec.unschedulable",)),
    Resource("", "v1", "pods", "pod", "Pod", True, ("po",), ("status", "log"), ("all",),
             field_labels=("spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
                           "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName")),
    Resource("", "v1", "configmaps", "configmap", "ConfigMap", True, ("cm",)),
    Resource("", "v1", "secrets", "secret", "Secret", True, (), field_labels=("type",)),
    Resource("", "v1", "serviceaccounts", "serviceaccount", "ServiceAccount", True, ("sa",)),
    Resource("", "v1", "services", "service", "Service", True, ("svc",), ("status",), ("all",)),
    Resource("", "v1", "events", "event", "Event", True, ("ev",),
             field_labels=("involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                           "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
                           "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type")),
    Resource("apps", "v1", "daemonsets", "daemonset", "DaemonSet", True, ("ds",), ("status",), ("all",),
             generation=True),
    Resource("coordination.k8s.io", "v1", "leases", "lease", "Lease", True),
    Resource("node.k8s.io", "v1", "runtimeclasses", "runtimeclass", "RuntimeClass", False),
]

BY_PATH: Dict[Tuple[str, str, str], Resource] = {(r.group, r.version, r.plural): r for r in RESOURCES}
BY_KIND: Dict[Tuple[str, str], Resource] = {(r.api_version, r.kind): r for r in RESOURCES}
GROUPS: Dict[str, List[str]] = {}
for _r in RESOURCES:
    if _r.group and _r.version not in GROUPS.setdefault(_r.group, []):
        GROUPS[_r.group].append(_r.version)


def lookup(api_version: str, kind: str) -> Optional[Resource]:
    return BY_KIND.get((api_version, kind))


def api_versions(server_address: str) -> dict:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]}


def _group_doc(name: str) -> dict:
    versions = [{"groupVersion": "%s/%s" % (name, v), "version": v} for v in GROUPS[name]]
    return {"name": name, "versions": versions, "preferredVersion": versions[0]}


def api_group_list() -> dict:
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group_doc(g) for g in GROUPS]}


def api_group(name: str) -> Optional[dict]:
    if name not in GROUPS:
        return None
    return dict(_group_doc(name), kind="APIGroup", apiVersion="v1")


def api_resource_list(group: str, version: str) -> Optional[dict]:
    members = [r for r in RESOURCES if r.group == group and r.version == version]
    if not members:
        return None
    resources = []
    for r in members:
        entry = {"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind,
                 "verbs": list(ALL_VERBS)}
        if r.short_names:
            entry["shortNames"] = list(r.short_names)
        if r.categories:
            entry["categories"] = list(r.categories)
        resources.append(entry)
        for sub in r.subresources:
            verbs = ["get"] if sub == "log" else ["get", "patch", "update"]
            resources.append({"name": "%s/%s" % (r.plural, sub), "singularName": "", "namespaced": r.namespaced,
                              "kind": r.kind, "verbs": verbs})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "%s/%s" % (group, version) if group
            else version, "resources": resources}


def openapi_v3_root() -> dict:
    """The /openapi/v3 index: one document per group-version."""
    paths = {}
    for gv in sorted({(r.group, r.version) for r in RESOURCES}):
        key = "apis/%s/%s" % gv if gv[0] else "api/%s" % gv[1]
        paths[key] = {"serverRelativeURL": "/openapi/v3/%s?hash=lab0" % key}
    return {"paths": paths}


def openapi_v3_doc(group: str, version: str) -> Optional[dict]:
    """A minimal OpenAPI v3 document for one group-version: the item paths with their verbs and
    the query parameters the server honours (enough for kubectl to see that the server validates
    fields itself and to skip client-side schema validation); no schemas."""
    members = [r for r in RESOURCES if r.group == group and r.version == version]
    if not members:
        return None
    prefix = "/apis/%s/%s" % (group, version) if group else "/api/%s" % version

    def param(name: str) -> dict:
        return {"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
    write_params = [param("dryRun"), param("fieldManager"), param("fieldValidation")]
    paths = {}
    for r in members:
        gvk = {"group": r.group, "version": r.version, "kind": r.kind}
        base = prefix + ("/namespaces/{namespace}/" if r.namespaced else "/") + r.plural
        ok = {"200": {"description": "OK"}}
        paths[base] = {
            "get": {"x-kubernetes-action": "list", "x-kubernetes-group-version-kind": gvk, "responses": ok,
                    "parameters": [param("labelSelector"), param("fieldSelector"), param("limit"),
                                   param("continue"), param("watch"), param("timeoutSeconds")]},
            "post": {"x-kubernetes-action": "post", "x-kubernetes-group-version-kind": gvk, "responses": ok,
                     "parameters": write_params},
        }
        item = {
            "get": {"x-kubernetes-action": "get", "x-kubernetes-group-version-kind": gvk, "responses": ok},
            "put": {"x-kubernetes-action": "put", "x-kubernetes-group-version-kind": gvk, "responses": ok,
                    "parameters": write_params},
            "patch": {"x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": gvk, "responses": ok,
                      "parameters": write_params + [param("force")]},
            "delete": {"x-kubernetes-action": "delete", "x-kubernetes-group-version-kind": gvk, "responses": ok,
                       "parameters": [param("dryRun")]},
        }
        paths[base + "/{name}"] = item
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes (lab)", "version": "v1.32.0-lab"}, "paths": paths,
            "components": {"schemas": {}}}
