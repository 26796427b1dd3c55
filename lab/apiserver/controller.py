"""The DaemonSet controller of the lab: one pod per eligible node, rolled on template changes.

Event driven: the store's listener sets a dirty flag and wakes the controller thread, which
reconciles every DaemonSet.  Runtime calls (start/stop of the simulated plugin) are made from
this one thread, outside the store lock, in order: a pod's stop always precedes the start of
its replacement on the same node.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
from typing import Any, Deque, Dict, List, Optional, Tuple

from lab.contracts import PluginPodStatus

from . import events, objects
from .patch import copy
from .resources import BY_PATH, Resource
from .selectors import node_matches_affinity, untolerated_taints
from .store import GPU_RESOURCE, ApiError, Store, random_suffix

LOG = logging.getLogger("lab.apiserver.controller")
PODS = BY_PATH[("", "v1", "pods")]
NODES = BY_PATH[("", "v1", "nodes")]
DAEMONSETS = BY_PATH[("apps", "v1", "daemonsets")]
MANAGER = "kube-controller-manager"
COMPONENT = "daemonset-controller"

# k8s.io/kubernetes/pkg/controller/daemon/util.AddOrUpdateDaemonPodTolerations
DS_TOLERATIONS = [
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/pid-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"},
]
HOST_NETWORK_TOLERATION = {"key": "node.kubernetes.io/network-unavailable", "operator": "Exists",
                           "effect": "NoSchedule"}


def daemon_pod_spec(template_spec: Dict[str, Any]) -> Dict[str, Any]:
    """The template's pod spec with the tolerations the DaemonSet controller adds."""
    spec = copy(template_spec)
    tols = spec.setdefault("tolerations", [])
    extra = DS_TOLERATIONS + ([HOST_NETWORK_TOLERATION] if spec.get("hostNetwork") else [])
    for t in extra:
        if not any(isinstance(x, dict) and x.get("key") == t["key"] and x.get("effect") == t["effect"]
                   for x in tols):
            tols.append(dict(t))
    return spec


def should_run(spec: Dict[str, Any], node: Dict[str, Any]) -> Tuple[bool, bool]:
    """(shouldRun, shouldContinueRunning), as NodeShouldRunDaemonPod decides."""
    if not node_matches_affinity(spec, node):
        return False, False
    if untolerated_taints(spec, node):
        return False, not untolerated_taints(spec, node, ("NoExecute",))
    return True, True


def _is_ready(pod: Dict[str, Any]) -> bool:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def _owner_uid(pod: Dict[str, Any]) -> Optional[str]:
    for ref in pod.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == "DaemonSet":
            return ref.get("uid")
    return None


class DaemonSetController:
    def __init__(self, store: Store, runtime: Any = None) -> None:
        self.store = store
        self.runtime = runtime
        self._cond = threading.Condition()
        self._dirty = True
        self._stopping = False
        self._stops: Deque[Tuple[str, str]] = collections.deque()
        self._started: Dict[Tuple[str, str], str] = {}  # (namespace, pod) -> node, plugin started
        self._thread: Optional[threading.Thread] = None
        self.passes = 0
        store.add_listener(self._on_change)

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            self._stopping = False
            self._dirty = True
        self._thread = threading.Thread(target=self._run, name="lab-daemonset-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout=10)

    def _on_change(self, res: Resource, etype: str, old: Optional[dict], new: dict) -> None:
        if res not in (PODS, NODES, DAEMONSETS):
            return
        if res is PODS:
            if etype == "MODIFIED" and not _owner_uid(new):
                return
            if etype == "DELETED":
                key = (new["metadata"].get("namespace", ""), new["metadata"]["name"])
                with self._cond:
                    node = self._started.pop(key, None)
                    if node is not None:
                        self._stops.append((node, key[1]))
        with self._cond:
            self._dirty = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._dirty and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                self._dirty = False
                stops = list(self._stops)
                self._stops.clear()
            for node, pod_name in stops:
                self._runtime_stop(node, pod_name)
            try:
                self.reconcile()
            except Exception:
                LOG.exception("DaemonSet reconcile failed")
            self.passes += 1

    def _runtime_stop(self, node: str, pod_name: str) -> None:
        if self.runtime is not None:
            try:
                self.runtime.stop_plugin_pod(node, pod_name)
            except Exception:
                LOG.exception("runtime.stop_plugin_pod(%s, %s) failed", node, pod_name)

    # --- reconcile -----------------------------------------------------------------------------
    def reconcile(self) -> None:
        store = self.store
        with store.lock:
            nodes = {k[1]: o for k, o in store._objs[NODES].items()}
            dss = list(store._objs[DAEMONSETS].values())
            pods = [p for p in store._objs[PODS].values() if _owner_uid(p)]
        ds_by_uid = {ds["metadata"]["uid"]: ds for ds in dss}
        by_owner: Dict[str, Dict[str, List[dict]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        deletes: List[dict] = []
        for p in pods:
            uid = _owner_uid(p)
            if uid not in ds_by_uid:
                deletes.append(p)  # garbage collection: the owner is gone
            else:
                by_owner[uid][(p.get("spec") or {}).get("nodeName") or ""].append(p)
        creates: List[Tuple[dict, str, str, Dict[str, Any]]] = []
        plans: Dict[str, Dict[str, Tuple[bool, bool]]] = {}
        for ds in dss:
            uid = ds["metadata"]["uid"]
            tmpl = (ds.get("spec") or {}).get("template") or {}
            spec = daemon_pod_spec(tmpl.get("spec") or {})
            h = objects.template_hash(tmpl)
            plan = plans[uid] = {}
            mine = by_owner.get(uid, {})
            current: Dict[str, dict] = {}
            for node_name, node in nodes.items():
                run, keep = plan[node_name] = should_run(spec, node)
                existing = sorted(mine.get(node_name, []), key=lambda p: p["metadata"].get("creationTimestamp", ""))
                if not existing:
                    if run:
                        creates.append((ds, node_name, h, spec))
                    continue
                if not keep:
                    deletes.extend(existing)
                    continue
                deletes.extend(existing[1:])  # at most one daemon pod per node
                if run:
                    current[node_name] = existing[0]
            strategy = (ds.get("spec") or {}).get("updateStrategy") or {}
            if strategy.get("type") != "OnDelete":
                self._roll(ds, h, spec, plan, current, strategy, creates, deletes)
            for node_name, ps in mine.items():
                if node_name not in nodes:
                    deletes.extend(ps)
        stops: List[Tuple[str, str]] = []
        for p in deletes:
            key = (p["metadata"].get("namespace", ""), p["metadata"]["name"])
            with self._cond:
                node = self._started.pop(key, None)
            try:
                store.delete(PODS, key[0], key[1])
            except ApiError:
                continue
            owner = ds_by_uid.get(_owner_uid(p) or "")
            if owner is not None:
                events.record(store, DAEMONSETS, owner, "Normal", "SuccessfulDelete", "Deleted pod: %s" % key[1],
                              COMPONENT)
            if node is not None:
                stops.append((node, key[1]))
        starts: List[Tuple[str, dict]] = []
        for ds, node_name, h, spec in creates:
            pod = self._create_pod(ds, node_name, h, spec)
            if pod is not None:
                starts.append((node_name, pod))
                events.record(store, DAEMONSETS, ds, "Normal", "SuccessfulCreate",
                              "Created pod: %s" % pod["metadata"]["name"], COMPONENT)
        for node_name, pod_name in stops:
            self._runtime_stop(node_name, pod_name)
        for node_name, pod in starts:
            key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
            with self._cond:
                self._started[key] = node_name
            if self.runtime is not None:
                try:
                    self.runtime.start_plugin_pod(node_name, copy(pod))
                except Exception:
                    LOG.exception("runtime.start_plugin_pod(%s, %s) failed", node_name, key[1])
            else:
                self._advertise_gpus(node_name)
        self._update_statuses(dss, plans)

    @staticmethod
    def _max_unavailable(strategy: Dict[str, Any], desired: int) -> int:
        value = (strategy.get("rollingUpdate") or {}).get("maxUnavailable", 1)
        if isinstance(value, str) and value.endswith("%"):
            try:
                value = math.ceil(desired * float(value[:-1]) / 100.0)
            except ValueError:
                value = 1
        try:
            return max(int(value), 1)  # maxSurge is not simulated: at least one pod at a time
        except (TypeError, ValueError):
            return 1

    def _roll(self, ds: dict, h: str, spec: Dict[str, Any], plan: Dict[str, Tuple[bool, bool]],
              current: Dict[str, dict], strategy: Dict[str, Any], creates: list, deletes: list) -> None:
        """RollingUpdate: replace outdated pods, at most maxUnavailable unavailable at a time
        (outdated pods that are not ready are replaced at once, like the real controller)."""
        desired = sum(1 for run, _keep in plan.values() if run)
        unavailable = sum(1 for node_name, (run, _keep) in plan.items()
                          if run and (node_name not in current or not _is_ready(current[node_name])))
        budget = self._max_unavailable(strategy, desired) - unavailable
        outdated = [(n, p) for n, p in sorted(current.items())
                    if (p["metadata"].get("labels") or {}).get("controller-revision-hash") != h]
        for node_name, pod in sorted(outdated, key=lambda np: _is_ready(np[1])):
            if _is_ready(pod):
                if budget <= 0:
                    break
                budget -= 1
            deletes.append(pod)
            creates.append((ds, node_name, h, spec))

    def _create_pod(self, ds: dict, node_name: str, h: str, spec: Dict[str, Any]) -> Optional[dict]:
        meta = ds["metadata"]
        tmpl = (ds.get("spec") or {}).get("template") or {}
        tmeta = tmpl.get("metadata") or {}
        labels = dict(tmeta.get("labels") or {})
        labels["controller-revision-hash"] = h
        labels["pod-template-generation"] = str(meta.get("generation", 1))
        pod_spec = copy(spec)
        pod_spec["nodeName"] = node_name
        affinity = pod_spec.setdefault("affinity", {})
        node_aff = affinity.setdefault("nodeAffinity", {})
        node_aff["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": [{"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": [node_name]}]}]}
        pod_meta: Dict[str, Any] = {
            "generateName": meta["name"] + "-", "namespace": meta["namespace"], "labels": labels,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": meta["name"],
                                 "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]}
        if tmeta.get("annotations"):
            pod_meta["annotations"] = dict(tmeta["annotations"])
        body = {"metadata": pod_meta, "spec": pod_spec}
        for _attempt in range(5):
            pod_meta["name"] = "%s-%s" % (meta["name"], random_suffix())
            if self.runtime is None:
                st = PluginPodStatus(running=True, ready=True, started_at=objects.now())
            else:
                st = PluginPodStatus(running=False, ready=False, waiting_reason="ContainerCreating")
            body["status"] = self.store.pod_status_for(body, st)
            try:
                return self.store.create(PODS, meta["namespace"], body, manager=MANAGER, keep_status=True)
            except ApiError as exc:
                if exc.reason == "AlreadyExists":
                    continue
                LOG.warning("cannot create a pod for DaemonSet %s on %s: %s", meta["name"], node_name, exc.message)
                return None
        return None

    def _advertise_gpus(self, node_name: str) -> None:
        """API-only fleets: the plugin 'registers' at once, so the node advertises its GPUs."""
        spec = self.store.node_specs.get(node_name)
        if spec is None or not spec.gpu_count:
            return
        node = self.store.get_raw(NODES, None, node_name)
        if node is None or GPU_RESOURCE in ((node.get("status") or {}).get("capacity") or {}):
            return
        try:
            self.store.update_node_status(node_name, {GPU_RESOURCE: str(spec.gpu_count)},
                                          {GPU_RESOURCE: str(spec.gpu_count)})
        except ApiError:
            pass

    def _update_statuses(self, dss: List[dict], plans: Dict[str, Dict[str, Tuple[bool, bool]]]) -> None:
        store = self.store
        with store.lock:
            pods = [p for p in store._objs[PODS].values() if _owner_uid(p)]
        by_owner: Dict[str, Dict[str, List[dict]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        for p in pods:
            by_owner[_owner_uid(p)][(p.get("spec") or {}).get("nodeName") or ""].append(p)
        for ds in dss:
            uid = ds["metadata"]["uid"]
            h = objects.template_hash((ds.get("spec") or {}).get("template") or {})
            desired = current = ready = updated = available = misscheduled = 0
            mine = by_owner.get(uid, {})
            for node_name, (run, _keep) in plans[uid].items():
                ps = mine.get(node_name, [])
                if run:
                    desired += 1
                    if ps:
                        current += 1
                        pod = ps[0]
                        is_ready = _is_ready(pod)
                        ready += is_ready
                        available += is_ready
                        if (pod["metadata"].get("labels") or {}).get("controller-revision-hash") == h:
                            updated += 1
                elif ps:
                    misscheduled += 1
            status: Dict[str, Any] = {"currentNumberScheduled": current, "numberMisscheduled": misscheduled,
                                      "desiredNumberScheduled": desired, "numberReady": ready,
                                      "observedGeneration": ds["metadata"].get("generation", 1)}
            # omitempty fields, as the real API serializes them
            for key, value in (("updatedNumberScheduled", updated), ("numberAvailable", available),
                               ("numberUnavailable", desired - available)):
                if value:
                    status[key] = value
            if status == ds.get("status"):
                continue
            try:
                store.update(DAEMONSETS, ds["metadata"]["namespace"], ds["metadata"]["name"],
                             lambda obj, s=status: dict(obj, status=s), manager=MANAGER, subresource="status")
            except ApiError:
                pass
