# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""A GPU node's labels, annotations and cordon: read, compare, patch only the difference.

The write is one JSON merge patch of the keys that differ (a label another controller owns is
never touched unless named); check mode sends the same patch as a server-side dry run.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_names import (
    check_dns_subdomain,
    check_label_key,
    check_label_value,
    label_text,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError, K8sError
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_apply import MERGE_PATCH, call_json
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import K8sClient, is_not_found

STATES = ("present", "absent")


@dataclass
class GpuNodeSpec:
    name: str
    state: str = "present"
    labels: Dict[str, Optional[str]] = field(default_factory=dict)  # absent: values are None
    annotations: Dict[str, Optional[str]] = field(default_factory=dict)
    cordon: Optional[bool] = None


@dataclass
class NodeView:
    """The part of a Node this module manages."""

    labels: Dict[str, str]
    annotations: Dict[str, str]
    unschedulable: bool

    def to_dict(self) -> Dict[str, Any]:
        return {"labels": dict(sorted(self.labels.items())), "annotations": dict(sorted(self.annotations.items())),
                "unschedulable": self.unschedulable}


def _keys(option: str, raw: Any) -> Dict[str, Optional[str]]:
    """state=absent: a list of keys, or a dictionary whose values are ignored."""
    if raw is None:
        return {}
    if isinstance(raw, dict):
        raw = list(raw)
    if not isinstance(raw, list):
        raise InvalidOptionError("%s must be a list of keys (or a dictionary) with state=absent" % option)
    return {check_label_key(option, key): None for key in raw}


def _annotations(raw: Any) -> Dict[str, Optional[str]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidOptionError("annotations must be a dictionary of keys and values with state=present")
    result: Dict[str, Optional[str]] = {}
    for key, value in raw.items():
        check_label_key("annotations", key)
        if value is None:
            raise InvalidOptionError("annotations: %s has no value; to remove it use state=absent" % key)
        result[key] = label_text(value)
    return result


def spec_from_params(params: Dict[str, Any]) -> GpuNodeSpec:
    """The module's options, validated before any API call."""
    name = params.get("name")
    if not name:
        raise InvalidOptionError("name (the node) is required")
    check_dns_subdomain("name", name)
    state = params.get("state") or "present"
    if state not in STATES:
        raise InvalidOptionError("state %r is not one of present, absent" % (state,))
    raw_labels = params.get("labels")
    if state == "present":
        if raw_labels is not None and not isinstance(raw_labels, dict):
            raise InvalidOptionError("labels must be a dictionary of keys and values with state=present")
        labels: Dict[str, Optional[str]] = {}
        for key, value in (raw_labels or {}).items():
            check_label_key("labels", key)
            if value is None:
                raise InvalidOptionError("labels: %s has no value; to remove a label use state=absent" % key)
            labels[key] = check_label_value("labels", key, value)
        annotations = _annotations(params.get("annotations"))
    else:
        labels = _keys("labels", raw_labels)
        annotations = _keys("annotations", params.get("annotations"))
    cordon = params.get("cordon")
    if not labels and not annotations and cordon is None:
        raise InvalidOptionError("nothing to do: give labels, annotations or cordon")
    return GpuNodeSpec(name=name, state=state, labels=labels, annotations=annotations, cordon=cordon)


def node_view(node: Dict[str, Any]) -> NodeView:
    metadata = node.get("metadata") or {}
    return NodeView(labels={k: str(v) for k, v in (metadata.get("labels") or {}).items()},
                    annotations={k: str(v) for k, v in (metadata.get("annotations") or {}).items()},
                    unschedulable=bool((node.get("spec") or {}).get("unschedulable")))


def _map_changes(current: Dict[str, str], wanted: Dict[str, Optional[str]], state: str) -> Dict[str, Optional[str]]:
    if state == "present":
        return {k: v for k, v in wanted.items() if current.get(k) != v}
    return {k: None for k in wanted if k in current}


def compute_patch(node: Dict[str, Any], spec: GpuNodeSpec) -> Optional[Dict[str, Any]]:
    """The merge patch that brings the node to the spec; None when it already matches."""
    view = node_view(node)
    patch: Dict[str, Any] = {}
    metadata: Dict[str, Any] = {}
    labels = _map_changes(view.labels, spec.labels, spec.state)
    annotations = _map_changes(view.annotations, spec.annotations, spec.state)
    if labels:
        metadata["labels"] = labels
    if annotations:
        metadata["annotations"] = annotations
    if metadata:
        patch["metadata"] = metadata
    if spec.cordon is not None and spec.cordon != view.unschedulable:
        patch["spec"] = {"unschedulable": spec.cordon}
    return patch or None


def describe_patch(patch: Dict[str, Any]) -> List[str]:
    """The patch in words, for the result: ``label nvidia.com/gpu.present=true``, ``cordon``."""
    words: List[str] = []
    for kind in ("labels", "annotations"):
        for key, value in sorted(((patch.get("metadata") or {}).get(kind) or {}).items()):
            noun = kind[:-1]
            words.append("remove %s %s" % (noun, key) if value is None else "%s %s=%s" % (noun, key, value))
    if "spec" in patch:
        words.append("cordon" if patch["spec"]["unschedulable"] else "uncordon")
    return words


@dataclass
class NodeChange:
    before: NodeView
    after: NodeView
    changed: bool
    actions: List[str]


class GpuNodeManager:
    """Labels, annotations and cordon of one node."""

    def __init__(self, client: Any, spec: GpuNodeSpec, check_mode: bool) -> None:
        self.client = client
        self.spec = spec
        self.check_mode = check_mode

    def get_existing(self) -> Dict[str, Any]:
        try:
            return call_json(self.client, "get node %s" % self.spec.name, self.client.core.read_node, self.spec.name)
        except K8sError as exc:
            if is_not_found(exc):
                raise K8sError("node %s does not exist in the API" % self.spec.name,
                               action="check the node name (kubectl get nodes)", status=404)
            raise

    def has_different_config(self, node: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        return compute_patch(node, self.spec)

    def apply(self) -> NodeChange:
        node = self.get_existing()
        before = node_view(node)
        patch = self.has_different_config(node)
        if patch is None:
            return NodeChange(before, before, False, [])
        kwargs: Dict[str, Any] = {"_content_type": MERGE_PATCH}
        if self.check_mode:
            kwargs["dry_run"] = "All"
        what = "%s node %s (%s)" % ("patch (dry run)" if self.check_mode else "patch", self.spec.name,
                                    ", ".join(describe_patch(patch)))
        result = call_json(self.client, what, self.client.core.patch_node, self.spec.name, patch, **kwargs)
        return NodeChange(before, node_view(result), True, describe_patch(patch))


def gpu_node_result(params: Dict[str, Any], check_mode: bool, diff_mode: bool,
                    client_factory: Optional[Any] = None) -> Dict[str, Any]:
    """gpu_node's result: the node's labels, annotations and cordon after the change."""
    spec = spec_from_params(params)
    client = (client_factory or K8sClient)(params)
    change = GpuNodeManager(client, spec, check_mode).apply()
    result: Dict[str, Any] = {"changed": change.changed, "node": dict(change.after.to_dict(), name=spec.name),
                              "actions": change.actions, "api_requests": client.requests}
    if diff_mode and change.changed:
        result["diff"] = {"before": change.before.to_dict(), "after": change.after.to_dict(),
                          "before_header": "node %s" % spec.name, "after_header": "node %s" % spec.name}
    return result
