# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""Objects as plain dicts, server-side apply with a dry-run comparison, and before/after diffs.

Every call goes through :meth:`K8sClient.call` (timeouts, retries, one error family).
Responses are decoded straight from JSON (``_preload_content=False``) so callers work with the
API's own camelCase dicts, exactly what ``kubectl get -o json`` shows, and a LIST of 200 Nodes
does not pay for the client's model deserialisation.

``apply_object`` is the read -> compare -> write step of the API modules: it reads the live
object, asks the API server what an apply would store (``dryRun=All``), and writes only when that
differs from the live object. In check mode the dry run is the last call: nothing is written.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import copy
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import K8sError
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import is_not_found

FIELD_MANAGER = "gpunode-bringup"
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"

# Metadata the server maintains; two objects that differ only here hold the same configuration.
SERVER_METADATA = ("resourceVersion", "generation", "managedFields", "uid", "creationTimestamp", "selfLink")


def decode_response(response: Any) -> Any:
    """The JSON body of a raw (``_preload_content=False``) response; plain data passes through."""
    data = getattr(response, "data", response)
    if isinstance(data, (bytes, bytearray)):
        data = data.decode("utf-8")
    if isinstance(data, str):
        return json.loads(data) if data.strip() else {}
    return data


def call_json(client: Any, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``client.call`` returning the decoded JSON body (the body is read inside the retried call)."""

    def fetch(*fetch_args: Any, **fetch_kwargs: Any) -> Any:
        response = fn(*fetch_args, _preload_content=False, **fetch_kwargs)
        try:
            return decode_response(response)
        except ValueError as exc:
            raise K8sError("%s: the API answered something that is not JSON: %s" % (what, exc))

    return client.call(what, fetch, *args, **kwargs)


def comparable(obj: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The object without status and server-maintained metadata: what a configuration is."""
    if obj is None:
        return None
    result = copy.deepcopy(obj)
    result.pop("status", None)
    metadata = result.get("metadata") or {}
    for key in SERVER_METADATA:
        metadata.pop(key, None)
    annotations = metadata.get("annotations")
    if isinstance(annotations, dict):
        annotations.pop("kubectl.kubernetes.io/last-applied-configuration", None)
        if not annotations:
            metadata.pop("annotations", None)
    return result


def object_ref(obj: Dict[str, Any]) -> str:
    """``DaemonSet kube-system/nvidia-device-plugin-daemonset``: how messages name an object."""
    metadata = obj.get("metadata") or {}
    name = metadata.get("name", "?")
    if metadata.get("namespace"):
        name = "%s/%s" % (metadata["namespace"], name)
    return "%s %s" % (obj.get("kind", "object"), name)


@dataclass
class ObjectApi:
    """The typed API calls for one namespaced kind."""

    kind: str
    read: Callable[..., Any]
    patch: Callable[..., Any]
    delete: Callable[..., Any]


@dataclass
class ApplyResult:
    """What an apply or delete did (or would do, in check mode) to one object."""

    ref: str
    before: Optional[Dict[str, Any]]
    after: Optional[Dict[str, Any]]
    changed: bool

    @property
    def diff(self) -> Dict[str, Any]:
        return {"before": self.before or {}, "after": self.after or {},
                "before_header": self.ref, "after_header": self.ref}


def _unless_not_found(fetch: Callable[[], Any]) -> Optional[Dict[str, Any]]:
    try:
        return fetch()
    except K8sError as exc:
        if is_not_found(exc):
            return None
        raise


def read_object(client: Any, api: ObjectApi, name: str, namespace: str) -> Optional[Dict[str, Any]]:
    """The live object, or None when it does not exist."""
    return _unless_not_found(lambda: call_json(client, "get %s %s/%s" % (api.kind, namespace, name), api.read,
                                               name, namespace))


def read_path(client: Any, what: str, path: str) -> Optional[Dict[str, Any]]:
    """The object at an API path (GET through ``client.request``, no typed API class), or None
    when it does not exist."""
    return _unless_not_found(lambda: call_json(client, what, client.request, "GET", path))


def server_side_apply(client: Any, api: ObjectApi, desired: Dict[str, Any], dry_run: bool) -> Dict[str, Any]:
    """One server-side apply of ``desired`` as field manager ``gpunode-bringup``."""
    metadata = desired["metadata"]
    what = "%s %s" % ("apply (dry run)" if dry_run else "apply", object_ref(desired))
    kwargs: Dict[str, Any] = {"field_manager": FIELD_MANAGER, "force": True, "_content_type": APPLY_PATCH}
    if dry_run:
        kwargs["dry_run"] = "All"
    return call_json(client, what, api.patch, metadata["name"], metadata["namespace"], desired, **kwargs)


def apply_object(client: Any, api: ObjectApi, desired: Dict[str, Any], check_mode: bool) -> ApplyResult:
    """Read, compare with what an apply would store, write only on a difference."""
    metadata = desired["metadata"]
    ref = object_ref(desired)
    existing = read_object(client, api, metadata["name"], metadata["namespace"])
    before = comparable(existing)
    if existing is None and not check_mode:
        return ApplyResult(ref, None, comparable(server_side_apply(client, api, desired, dry_run=False)), True)
    preview = comparable(server_side_apply(client, api, desired, dry_run=True))
    if before == preview:
        return ApplyResult(ref, before, before, False)
    if check_mode:
        return ApplyResult(ref, before, preview, True)
    return ApplyResult(ref, before, comparable(server_side_apply(client, api, desired, dry_run=False)), True)


def delete_object(client: Any, api: ObjectApi, kind: str, name: str, namespace: str,
                  check_mode: bool) -> ApplyResult:
    """Delete the object when it exists (a server-side dry run in check mode)."""
    ref = "%s %s/%s" % (kind, namespace, name)
    existing = read_object(client, api, name, namespace)
    if existing is None:
        return ApplyResult(ref, None, None, False)
    kwargs: Dict[str, Any] = {"propagation_policy": "Background"}
    if check_mode:
        kwargs["dry_run"] = "All"
    try:
        call_json(client, "delete %s" % ref, api.delete, name, namespace, **kwargs)
    except K8sError as exc:
        if not is_not_found(exc):
            raise
    return ApplyResult(ref, comparable(existing), None, True)
