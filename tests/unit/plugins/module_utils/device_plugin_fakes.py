# -*- coding: utf-8 -*-
"""Recorded API objects (as the API serves them) and an in-memory client with the K8sClient surface,
for the unit tests of _device_plugin, _fleet and _node_labels."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import copy
import re

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import K8sError

NOW = "2026-01-10T12:00:00Z"


def node(name, labels=None, taints=None, unschedulable=False, ready="True", gpus=8, allocatable=None):
    """A Node as the API serves it (trimmed to the fields the collection reads)."""
    obj = {
        "metadata": {"name": name, "uid": "uid-" + name, "resourceVersion": "100",
                     "creationTimestamp": "2026-01-01T00:00:00Z",
                     "labels": dict({"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}, **(labels or {})),
                     "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
        "spec": {},
        "status": {
            "capacity": {"cpu": "64", "memory": "527938396Ki", "pods": "110"},
            "allocatable": {"cpu": "63", "memory": "527323996Ki", "pods": "110"},
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
                {"type": "Ready", "status": ready,
                 "reason": "KubeletReady" if ready == "True" else "KubeletNotReady",
                 "message": "kubelet is posting ready status" if ready == "True" else "PLEG is not healthy"},
            ],
        },
    }
    if gpus is not None:
        obj["status"]["capacity"]["nvidia.com/gpu"] = str(gpus)
        obj["status"]["allocatable"]["nvidia.com/gpu"] = str(gpus if allocatable is None else allocatable)
    if taints:
        obj["spec"]["taints"] = taints
    if unschedulable:
        obj["spec"]["unschedulable"] = True
    return obj


def pod(name, node_name, phase="Running", ready=True, restarts=0, waiting=None, last=None,
        created="2026-01-10T11:00:00Z", deleting=False, template_generation="1"):
    """A plugin pod as the API serves it; ``waiting`` is (reason, message), ``last`` is (reason, exit code)."""
    state = {"running": {"startedAt": created}} if waiting is None else \
        {"waiting": {"reason": waiting[0], "message": waiting[1]}}
    status = {
        "name": "nvidia-device-plugin-ctr", "ready": ready, "restartCount": restarts, "state": state,
        "image": "nvcr.io/nvidia/k8s-device-plugin:v0.17.4", "started": waiting is None,
    }
    if last is not None:
        status["lastState"] = {"terminated": {"reason": last[0], "exitCode": last[1],
                                              "finishedAt": "2026-01-10T11:59:00Z"}}
    obj = {
        "metadata": {"name": name, "namespace": "kube-system", "creationTimestamp": created,
                     "labels": {"name": "nvidia-device-plugin-ds", "pod-template-generation": template_generation}},
        "spec": {"nodeName": node_name, "containers": [{"name": "nvidia-device-plugin-ctr"}]},
        "status": {"phase": phase, "startTime": created, "containerStatuses": [status],
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }
    if deleting:
        obj["metadata"]["deletionTimestamp"] = NOW
    return obj


def daemonset_status(generation=1, observed=1, desired=3, current=3, ready=3, updated=3, available=None,
                     pod_spec=None):
    return {
        "metadata": {"name": "nvidia-device-plugin-daemonset", "namespace": "kube-system", "generation": generation},
        "spec": {"selector": {"matchLabels": {"name": "nvidia-device-plugin-ds"}},
                 "template": {"metadata": {"labels": {"name": "nvidia-device-plugin-ds"}},
                              "spec": pod_spec or {}}},
        "status": {"observedGeneration": observed, "desiredNumberScheduled": desired,
                   "currentNumberScheduled": current, "numberReady": ready, "updatedNumberScheduled": updated,
                   "numberAvailable": ready if available is None else available, "numberMisscheduled": 0},
    }


class _EndedWatch:
    """A watch response that the server ended at once without an event."""

    def stream(self, amt=None, decode_content=False):
        return iter(())

    def close(self):
        pass

    def release_conn(self):
        pass


class _Api:
    """Typed-API stand-in: every method records its call and answers from the fake's store."""

    def __init__(self, fake):
        self._fake = fake

    def __getattr__(self, method):
        def call(*args, **kwargs):
            self._fake.calls.append((method, args, kwargs))
            return self._fake.answer(method, args, kwargs)
        return call


class FakeClient:
    """The K8sClient surface (``core``, ``apps``, ``call``, ``requests``) over an in-memory store.

    ``objects`` maps (kind, namespace, name) to objects. Applies merge into the store unless dry run;
    ``dry_run_changes`` makes a dry run report what the store would hold. ``logs`` maps pod name to text.
    """

    def __init__(self, objects=None, nodes=None, pods=None, logs=None):
        self.objects = dict(objects or {})
        self.nodes = list(nodes or [])
        self.pods = list(pods or [])
        self.logs = dict(logs or {})
        self.calls = []
        self.requests = 0
        self.request_timeout = 20.0
        self.core = _Api(self)
        self.apps = _Api(self)
        self.hooks = {}

    # K8sClient.request paths -> the typed call they stand for (recorded and answered as that call)
    _RAW = (
        (re.compile(r"^/api/v1/nodes$"), "list_node", ()),
        (re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/daemonsets/([^/]+)$"), "read_namespaced_daemon_set", (1, 0)),
        (re.compile(r"^/api/v1/namespaces/([^/]+)/pods$"), "list_namespaced_pod", (0,)),
        (re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$"), "read_namespaced_pod_log", (1, 0)),
    )
    _QUERY = {"labelSelector": "label_selector", "fieldSelector": "field_selector", "tailLines": "tail_lines",
              "container": "container"}

    def request(self, method, path, query=None, _request_timeout=None, _preload_content=False):
        for pattern, typed, order in self._RAW:
            match = pattern.match(path)
            if match and method == "GET":
                args = tuple(match.groups()[i] for i in order)
                kwargs = {self._QUERY[k]: v for k, v in (query or ()) if v is not None}
                self.calls.append((typed, args, kwargs))
                return self.answer(typed, args, kwargs)
        raise AssertionError("unexpected request %s %s" % (method, path))

    def call(self, what, fn, *args, **kwargs):
        self.requests += 1
        kwargs.pop("_request_timeout", None)
        return fn(*args, **kwargs)

    @property
    def writes(self):
        return [c for c in self.calls if c[0].startswith(("patch", "delete", "create")) and "dry_run" not in c[2]]

    def _not_found(self, what):
        return K8sError("%s: HTTP 404: not found" % what, status=404)

    def answer(self, method, args, kwargs):
        if kwargs.get("watch"):
            return _EndedWatch()
        if method in self.hooks:
            return self.hooks[method](*args, **kwargs)
        kind = {"daemon_set": "DaemonSet", "config_map": "ConfigMap"}
        if method.startswith("read_namespaced_") and not method.endswith("_log"):
            key = (kind[method[len("read_namespaced_"):]], args[1], args[0])
            if key not in self.objects:
                raise self._not_found(method)
            return copy.deepcopy(self.objects[key])
        if method.startswith("patch_namespaced_"):
            key = (kind[method[len("patch_namespaced_"):]], args[1], args[0])
            body = copy.deepcopy(args[2])
            stored = dict(body, metadata=dict(body["metadata"], resourceVersion="1", generation=1,
                                              uid="uid", managedFields=[{"manager": kwargs.get("field_manager")}]))
            if key in self.objects:
                stored["status"] = self.objects[key].get("status")
            if "dry_run" not in kwargs:
                self.objects[key] = stored
            return copy.deepcopy(stored)
        if method.startswith("delete_namespaced_"):
            key = (kind[method[len("delete_namespaced_"):]], args[1], args[0])
            if key not in self.objects:
                raise self._not_found(method)
            if "dry_run" not in kwargs:
                del self.objects[key]
            return {"kind": "Status", "status": "Success"}
        if method == "list_namespaced_daemon_set":
            name = kwargs["field_selector"].split("=", 1)[1]
            found = self.objects.get(("DaemonSet", args[0], name))
            if "read_namespaced_daemon_set" in self.hooks:
                found = self.hooks["read_namespaced_daemon_set"](name, args[0])
            return {"metadata": {"resourceVersion": "7"}, "items": [copy.deepcopy(found)] if found else []}
        if method == "list_node":
            return {"items": copy.deepcopy(self.nodes)}
        if method == "list_namespaced_pod":
            return {"items": copy.deepcopy(self.pods)}
        if method == "read_namespaced_pod_log":
            if args[0] not in self.logs:
                raise K8sError("read log: HTTP 400: container is waiting to start", status=400)
            return self.logs[args[0]]
        if method == "read_node":
            for item in self.nodes:
                if item["metadata"]["name"] == args[0]:
                    return copy.deepcopy(item)
            raise self._not_found(method)
        if method == "patch_node":
            target = [n for n in self.nodes if n["metadata"]["name"] == args[0]][0]
            result = copy.deepcopy(target)
            patch = args[1]
            for part in ("labels", "annotations"):
                for key, value in ((patch.get("metadata") or {}).get(part) or {}).items():
                    values = result["metadata"].setdefault(part, {})
                    if value is None:
                        values.pop(key, None)
                    else:
                        values[key] = value
            if "spec" in patch:
                result["spec"]["unschedulable"] = patch["spec"]["unschedulable"]
            if "dry_run" not in kwargs:
                self.nodes[self.nodes.index(target)] = result
            return copy.deepcopy(result)
        raise AssertionError("unexpected call %s" % method)
