"""The default scheduler and the kubelet's pod lifecycle for ordinary pods (not owned by a DaemonSet).

Scheduler: a pod without ``spec.nodeName`` (and with ``schedulerName`` default-scheduler) is bound
to a node that passes the default filters, in the real plugin order (first failure counts):
NodeAffinity's PreFilter (``matchFields metadata.name In``), NodeUnschedulable (cordoned),
TaintToleration (NoSchedule/NoExecute; a NotReady node carries ``node.kubernetes.io/not-ready``),
NodeAffinity (nodeSelector, required terms) and NodeResourcesFit on extended resources
(``status.allocatable`` minus the requests of the non-terminated pods bound to the node). Among
the nodes that fit, the one with the most free requested resources wins (ties: by name). A pod
that fits nowhere stays Pending with ``PodScheduled=False/Unschedulable`` and one
``FailedScheduling`` Event in the real wording; it is retried whenever a node or pod changes.

Kubelet: a bound pod on a Ready node is admitted against the node's free extended resources
(device-manager semantics: a shortfall rejects it, phase Failed, reason
``UnexpectedAdmissionError``), then runs: Running, and at least ``run_s`` later its containers
exit with the code ``runtime.run_workload_pod(node, pod)`` returns (optional; called in a worker
thread), or 0. Events: Scheduled, Pulled, Created, Started; the log is served by ``/log``.

Event driven (store listener + condition variable); the writes are made from one thread,
outside the store lock.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from lab.contracts import PluginPodStatus

from . import events, objects
from .patch import copy
from .resources import BY_PATH, Resource
from .selectors import node_matches_affinity, toleration_tolerates
from .store import GPU_RESOURCE, ApiError, Store, conflict

LOG = logging.getLogger("lab.apiserver.workloads")
PODS = BY_PATH[("", "v1", "pods")]
NODES = BY_PATH[("", "v1", "nodes")]
SCHEDULER = "default-scheduler"
RUN_S = 0.2
WORKERS = 4
Key = Tuple[str, str]

NOT_READY_TAINT = {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}
UNSCHEDULABLE_TAINT = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
REASON_PREFILTER = "node(s) didn't satisfy plugin(s) [NodeAffinity]"
REASON_UNSCHEDULABLE = "node(s) were unschedulable"
REASON_AFFINITY = "node(s) didn't match Pod's node affinity/selector"
NO_VICTIMS = "No preemption victims found for incoming pod"
NOT_HELPFUL = "Preemption is not helpful for scheduling"


# --- pod and node helpers ------------------------------------------------------------------------
def is_daemon_pod(pod: Dict[str, Any]) -> bool:
    return any(ref.get("controller") and ref.get("kind") == "DaemonSet"
               for ref in (pod.get("metadata") or {}).get("ownerReferences") or [])


def is_terminated(pod: Dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _int(value: Any) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return 0


def pod_requests(spec: Dict[str, Any]) -> Dict[str, int]:
    """Extended-resource requests: the containers' sum, at least any init container's (limits
    stand in for missing requests, as defaulting does)."""
    def of(container: Any) -> Dict[str, int]:
        res = container.get("resources") if isinstance(container, dict) else None
        if not isinstance(res, dict):
            return {}
        merged = dict(res.get("limits") or {})
        merged.update(res.get("requests") or {})
        return {k: _int(v) for k, v in merged.items() if objects.is_extended(k) and _int(v) > 0}
    total: Dict[str, int] = collections.Counter()
    for c in spec.get("containers") or []:
        total.update(of(c))
    for c in spec.get("initContainers") or []:
        for k, v in of(c).items():
            total[k] = max(total.get(k, 0), v)
    return dict(total)


def _node_amount(node: Dict[str, Any], field: str, resource: str) -> Optional[int]:
    value = ((node.get("status") or {}).get(field) or {}).get(resource)
    return None if value is None else _int(value)


def prefilter_node_names(spec: Dict[str, Any]) -> Optional[Set[str]]:
    """NodeAffinity PreFilter: the node names when every required term pins ``metadata.name``."""
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = required.get("nodeSelectorTerms") or []
    if not terms:
        return None
    names: Set[str] = set()
    for term in terms:
        term_names: Optional[Set[str]] = None
        for f in term.get("matchFields") or []:
            if f.get("key") == "metadata.name" and f.get("operator") == "In":
                values = set(f.get("values") or [])
                term_names = values if term_names is None else term_names & values
        if term_names is None:
            return None
        names |= term_names
    return names


def _tolerates(spec: Dict[str, Any], taint: Dict[str, Any]) -> bool:
    return any(isinstance(t, dict) and toleration_tolerates(t, taint) for t in spec.get("tolerations") or [])


def filter_node(spec: Dict[str, Any], node: Dict[str, Any], requests: Dict[str, int],
                used: Dict[str, int]) -> Tuple[List[str], bool]:
    """(reasons the node does not fit, resolvable by preemption); no reasons: it fits."""
    if (node.get("spec") or {}).get("unschedulable") and not _tolerates(spec, UNSCHEDULABLE_TAINT):
        return [REASON_UNSCHEDULABLE], False
    taints = [t for t in (node.get("spec") or {}).get("taints") or [] if isinstance(t, dict)]
    if not objects.node_ready(node) and not any(t.get("key") == NOT_READY_TAINT["key"] for t in taints):
        taints.append(NOT_READY_TAINT)
    for taint in taints:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(spec, taint):
            return ["node(s) had untolerated taint {%s: %s}" % (taint.get("key", ""), taint.get("value") or "")], False
    if not node_matches_affinity(spec, node):
        return [REASON_AFFINITY], False
    short = ["Insufficient %s" % r for r, q in sorted(requests.items())
             if (_node_amount(node, "allocatable", r) or 0) - used.get(r, 0) < q]
    return short, True


def fit_error(total: int, statuses: Dict[str, Tuple[List[str], bool]], filtered_out: int = 0) -> str:
    """FitError.Error() plus the preemption PostFilter's message; ``filtered_out``: nodes the
    NodeAffinity PreFilter left out."""
    if total == 0:
        return "no nodes available to schedule pods"
    reasons: Dict[str, int] = collections.Counter()
    preemption: Dict[str, int] = collections.Counter()
    if filtered_out:
        reasons[REASON_PREFILTER] = filtered_out
        preemption[NOT_HELPFUL] = filtered_out
    for node_reasons, resolvable in statuses.values():
        for r in node_reasons:
            reasons[r] += 1
        preemption[NO_VICTIMS if resolvable else NOT_HELPFUL] += 1
    text = "0/%d nodes are available: %s." % (total, ", ".join(sorted("%d %s" % (n, r) for r, n in reasons.items())))
    return text + " preemption: 0/%d nodes are available: %s." % (
        total, ", ".join(sorted("%d %s" % (n, r) for r, n in preemption.items())))


def default_log(node: str, devices: List[int]) -> str:
    lines = []
    for i in devices:
        gpu_uuid = uuid.uuid5(uuid.NAMESPACE_URL, "lab:%s/%d" % (node, i))
        lines.append("GPU %d: lab GPU (UUID: GPU-%s) (lab, no runtime)\n" % (i, gpu_uuid))
    return "".join(lines)


def _condition(ctype: str, status: bool, ts: str, reason: Optional[str] = None,
               message: Optional[str] = None) -> Dict[str, Any]:
    c: Dict[str, Any] = {"type": ctype, "status": "True" if status else "False", "lastProbeTime": None,
                         "lastTransitionTime": ts}
    if reason:
        c["reason"] = reason
    if message:
        c["message"] = message
    return c


def _set_condition(status: Dict[str, Any], cond: Dict[str, Any]) -> None:
    conds = [c for c in status.get("conditions") or [] if c.get("type") != cond["type"]]
    old = next((c for c in status.get("conditions") or [] if c.get("type") == cond["type"]), None)
    if old is not None and old.get("status") == cond["status"] and old.get("lastTransitionTime"):
        cond["lastTransitionTime"] = old["lastTransitionTime"]
    conds.append(cond)
    status["conditions"] = conds


def terminated_status(pod: Dict[str, Any], exit_code: int) -> Dict[str, Any]:
    """The kubelet's status of a pod whose containers all exited with ``exit_code``."""
    ts = objects.now()
    st = copy(pod.get("status") or {})
    done = exit_code == 0
    st["phase"] = "Succeeded" if done else "Failed"
    why = "PodCompleted" if done else "PodFailed"
    by_type = {c.get("type"): c for c in st.get("conditions") or []}
    conds = []
    for ctype, value, reason in (("PodReadyToStartContainers", False, None), ("Initialized", True, None),
                                 ("Ready", False, why), ("ContainersReady", False, why),
                                 ("PodScheduled", True, None)):
        c = _condition(ctype, value, ts, reason)
        old = by_type.get(ctype)
        if old is not None and old.get("status") == c["status"]:
            c["lastTransitionTime"] = old.get("lastTransitionTime") or ts
        conds.append(c)
    st["conditions"] = conds
    statuses = []
    for cs in st.get("containerStatuses") or []:
        running = (cs.get("state") or {}).get("running") or {}
        term = {"exitCode": exit_code, "reason": "Completed" if done else "Error",
                "startedAt": running.get("startedAt") or ts, "finishedAt": ts}
        if cs.get("containerID"):
            term["containerID"] = cs["containerID"]
        statuses.append(dict(cs, ready=False, started=False, state={"terminated": term}, lastState={}))
    st["containerStatuses"] = statuses
    return st


@dataclass
class _Run:
    uid: str
    namespace: str
    name: str
    node: str
    due: float
    result: Optional[Tuple[int, str]] = None
    terminal: bool = False  # Succeeded/Failed written: its resources are free
    done: bool = False  # the outcome is written


class WorkloadController:
    """Scheduler and kubelet stand-in for ordinary pods; ``enabled`` switches it on."""

    def __init__(self, store: Store, runtime: Any = None, enabled: bool = False, run_s: float = RUN_S) -> None:
        self.store = store
        self.runtime = runtime
        self.enabled = enabled
        self.run_s = run_s
        self._cond = threading.Condition()
        self._dirty = True
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._ordinary: Dict[Key, str] = {}  # (namespace, name) -> uid of every non-DaemonSet pod
        self._runs: Dict[str, _Run] = {}  # uid -> admitted pod
        self._devices: Dict[str, Tuple[str, List[int]]] = {}  # uid -> (node, GPU indices)
        self._logs: Dict[Key, Tuple[str, str]] = {}  # (namespace, name) -> (uid, log)
        self._unschedulable: Dict[str, Tuple[str, str]] = {}  # uid -> (FailedScheduling event, message)
        self._next_due: Optional[float] = None
        self.passes = 0
        store.add_listener(self._on_change)

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            self._stopping = False
            self._dirty = True
        self._thread = threading.Thread(target=self._run, name="lab-workloads", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout=10)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def set_enabled(self, enabled: bool) -> None:
        with self._cond:
            self.enabled = enabled
            self._dirty = True
            self._cond.notify()

    def pod_log(self, namespace: str, name: str, uid: Optional[str]) -> str:
        """The log of an ordinary pod's containers ('' until they exited)."""
        with self._cond:
            entry = self._logs.get((namespace, name))
        return entry[1] if entry and (uid is None or entry[0] == uid) else ""

    # --- events from the store (under its lock) --------------------------------------------------
    def _on_change(self, res: Resource, etype: str, old: Optional[dict], new: dict) -> None:
        if res is NODES:
            if self._ordinary and self.enabled:
                self._wake()
            return
        if res is not PODS:
            return
        if is_daemon_pod(new):
            if etype == "DELETED" and self._ordinary and self.enabled:
                self._wake()  # its resources are free
            return
        meta = new["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        with self._cond:
            if etype == "DELETED":
                self._ordinary.pop(key, None)
                self._logs.pop(key, None)
                uid = meta.get("uid", "")
                self._runs.pop(uid, None)
                self._devices.pop(uid, None)
                self._unschedulable.pop(uid, None)
            else:
                self._ordinary[key] = meta.get("uid", "")
            if self.enabled:
                self._dirty = True
                self._cond.notify()

    def _wake(self) -> None:
        with self._cond:
            self._dirty = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._dirty and not self._stopping:
                    timeout = None if self._next_due is None else self._next_due - time.monotonic()
                    if timeout is not None and timeout <= 0:
                        break
                    self._cond.wait(timeout)
                if self._stopping:
                    return
                self._dirty = False
            try:
                self.reconcile()
            except Exception:
                LOG.exception("workload reconcile failed")
            self.passes += 1

    # --- one pass ------------------------------------------------------------------------------
    def reconcile(self) -> None:
        if not self.enabled:
            self._next_due = None
            return
        self._finish_due()
        store = self.store
        with store.lock:
            with self._cond:
                keys = list(self._ordinary.items())
                runs = dict(self._runs)
            if not keys:
                self._next_due = None
                return
            objs = store._objs[PODS]
            nodes = {k[1]: o for k, o in store._objs[NODES].items()}
            mine = [p for k, uid in keys for p in (objs.get(k),) if p is not None and p["metadata"].get("uid") == uid]
            # resources held on each node: admitted (and DaemonSet) pods; the scheduler also counts
            # pods bound but not admitted yet
            held: Dict[str, Dict[str, int]] = collections.defaultdict(collections.Counter)
            assigned: Dict[str, Dict[str, int]] = collections.defaultdict(collections.Counter)
            for p in objs.values():
                spec = p.get("spec") or {}
                node = spec.get("nodeName")
                if not node or is_terminated(p):
                    continue
                run = runs.get(p["metadata"].get("uid", ""))
                if run is not None and run.terminal:
                    continue
                req = pod_requests(spec)
                if not req:
                    continue
                assigned[node].update(req)
                if run is not None or is_daemon_pod(p):
                    held[node].update(req)
        mine.sort(key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]))
        for pod in mine:
            spec = pod.get("spec") or {}
            if spec.get("nodeName") and not is_terminated(pod) and pod["metadata"]["uid"] not in runs \
                    and (pod.get("status") or {}).get("phase", "Pending") == "Pending":
                self._admit(pod, nodes.get(spec["nodeName"]), held, assigned)
        for pod in mine:
            spec = pod.get("spec") or {}
            if not spec.get("nodeName") and not is_terminated(pod) \
                    and (spec.get("schedulerName") or SCHEDULER) == SCHEDULER:
                self._schedule(pod, nodes, assigned)
        with self._cond:
            dues = [r.due for r in self._runs.values() if r.result is not None and not r.done]
            self._next_due = min(dues) if dues else None

    # --- scheduler -----------------------------------------------------------------------------
    def _schedule(self, pod: dict, nodes: Dict[str, dict], assigned: Dict[str, Dict[str, int]]) -> None:
        spec = pod.get("spec") or {}
        meta = pod["metadata"]
        requests = pod_requests(spec)
        prefilter = prefilter_node_names(spec)
        statuses: Dict[str, Tuple[List[str], bool]] = {}
        fits: List[Tuple[int, str]] = []
        candidates = sorted(nodes) if prefilter is None else sorted(n for n in prefilter if n in nodes)
        for name in candidates:
            reasons, resolvable = filter_node(spec, nodes[name], requests, assigned.get(name, {}))
            if reasons:
                statuses[name] = (reasons, resolvable)
            else:
                free = sum((_node_amount(nodes[name], "allocatable", r) or 0) - assigned.get(name, {}).get(r, 0)
                           for r in requests)
                fits.append((-free, name))
        if fits:
            node = min(fits)[1]
            if self._bind(pod, node):
                assigned[node].update(requests)
                with self._cond:
                    self._unschedulable.pop(meta["uid"], None)
                events.record(self.store, PODS, pod, "Normal", "Scheduled", "Successfully assigned %s/%s to %s"
                              % (meta.get("namespace"), meta["name"], node), SCHEDULER)
            return
        message = fit_error(len(nodes), statuses, len(nodes) - len(candidates))
        with self._cond:
            previous = self._unschedulable.get(meta["uid"])
        if previous is not None and previous[1] == message:
            return
        ts = objects.now()

        def mutate(p: dict) -> dict:
            if p["metadata"].get("uid") != meta["uid"] or (p.get("spec") or {}).get("nodeName"):
                return p
            st = p.setdefault("status", {})
            st["phase"] = st.get("phase") or "Pending"
            _set_condition(st, _condition("PodScheduled", False, ts, "Unschedulable", message))
            return p
        try:
            self.store.update(PODS, meta.get("namespace"), meta["name"], mutate, manager=SCHEDULER,
                              subresource="status")
        except ApiError:
            return
        ev = None
        if previous is not None:
            ev = events.repeat(self.store, meta.get("namespace", ""), previous[0], message)
        if ev is None:
            ev = events.record(self.store, PODS, pod, "Warning", "FailedScheduling", message, SCHEDULER)
        if ev is not None:
            with self._cond:
                if self._ordinary.get((meta.get("namespace", ""), meta["name"])) == meta["uid"]:
                    self._unschedulable[meta["uid"]] = (ev["metadata"]["name"], message)

    def _bind(self, pod: dict, node: str) -> bool:
        meta = pod["metadata"]
        ts = objects.now()

        def mutate(p: dict) -> dict:
            if p["metadata"].get("uid") != meta["uid"] or (p.get("spec") or {}).get("nodeName"):
                raise conflict(PODS, meta["name"], "pod %s is already assigned to node \"%s\""
                               % (meta["name"], (p.get("spec") or {}).get("nodeName")))
            p.setdefault("spec", {})["nodeName"] = node
            st = p.setdefault("status", {})
            _set_condition(st, _condition("PodScheduled", True, ts))
            return p
        try:
            self.store.update(PODS, meta.get("namespace"), meta["name"], mutate, manager=SCHEDULER,
                              subresource="binding", managed_fields=False)
            return True
        except ApiError as exc:
            LOG.debug("binding %s to %s failed: %s", meta["name"], node, exc.message)
            return False

    # --- kubelet -------------------------------------------------------------------------------
    def _admit(self, pod: dict, node: Optional[dict], held: Dict[str, Dict[str, int]],
               assigned: Dict[str, Dict[str, int]]) -> None:
        if node is None or not objects.node_ready(node):
            return  # no kubelet to run it: stays Pending
        spec = pod.get("spec") or {}
        meta = pod["metadata"]
        node_name = node["metadata"]["name"]
        requests = pod_requests(spec)
        error = None
        for r, q in sorted(requests.items()):
            alloc = _node_amount(node, "allocatable", r)
            if alloc is None and _node_amount(node, "capacity", r) is None:
                error = "cannot allocate unregistered device %s" % r
                break
            available = max((alloc or 0) - held[node_name].get(r, 0), 0)
            if available < q:
                error = "requested number of devices unavailable for %s. Requested: %d, Available: %d" % (
                    r, q, available)
                break
        if error is not None:
            self._reject(pod, node_name, "Allocate failed due to %s, which is unexpected" % error)
            for r, q in requests.items():
                assigned[node_name][r] -= q
            return
        held[node_name].update(requests)
        devices = self._pick_devices(meta["uid"], node, requests.get(GPU_RESOURCE, 0))
        for c in spec.get("containers") or []:
            where = "spec.containers{%s}" % c.get("name")
            events.record(self.store, PODS, pod, "Normal", "Pulled", 'Container image "%s" already present on '
                          "machine" % c.get("image"), "kubelet", node_name, where)
            events.record(self.store, PODS, pod, "Normal", "Created", "Created container: %s" % c.get("name"),
                          "kubelet", node_name, where)
            events.record(self.store, PODS, pod, "Normal", "Started", "Started container %s" % c.get("name"),
                          "kubelet", node_name, where)
        started = objects.now()
        try:
            running = self.store.update(PODS, meta.get("namespace"), meta["name"], lambda p: dict(
                p, status=self.store.pod_status_for(p, PluginPodStatus(running=True, ready=True, started_at=started))),
                manager="kubelet", subresource="status")
        except ApiError:
            return
        run = _Run(meta["uid"], meta.get("namespace", ""), meta["name"], node_name, time.monotonic() + self.run_s)
        fn = getattr(self.runtime, "run_workload_pod", None) if self.runtime is not None else None
        if fn is None:
            run.result = (0, default_log(node_name, devices))
        with self._cond:
            if self._ordinary.get((run.namespace, run.name)) != run.uid:
                return  # deleted meanwhile
            self._runs[run.uid] = run
        if fn is not None:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="lab-workload")
            self._pool.submit(self._work, run, fn, copy(running))

    def _pick_devices(self, uid: str, node: dict, count: int) -> List[int]:
        if count <= 0:
            return []
        name = node["metadata"]["name"]
        total = _node_amount(node, "capacity", GPU_RESOURCE) or _node_amount(node, "allocatable", GPU_RESOURCE) or 0
        with self._cond:
            busy = {i for n, ids in self._devices.values() if n == name for i in ids}
            free = [i for i in range(max(total, count)) if i not in busy][:count]
            self._devices[uid] = (name, free)
        return free

    def _work(self, run: _Run, fn: Callable[[str, dict], Tuple[int, str]], pod: dict) -> None:
        try:
            code, log = fn(run.node, pod)
            result = (int(code), "" if log is None else str(log))
        except Exception as exc:
            LOG.warning("runtime.run_workload_pod(%s, %s) failed: %s", run.node, run.name, exc)
            result = (1, "lab: run_workload_pod failed: %s\n" % exc)
        with self._cond:
            if self._runs.get(run.uid) is run:
                run.result = result
                self._dirty = True
                self._cond.notify()

    def _reject(self, pod: dict, node: str, message: str) -> None:
        meta = pod["metadata"]
        events.record(self.store, PODS, pod, "Warning", "UnexpectedAdmissionError", message, "kubelet", node)
        ts = objects.now()

        def mutate(p: dict) -> dict:
            old = p.get("status") or {}
            st: Dict[str, Any] = {"phase": "Failed", "conditions": old.get("conditions") or [],
                                  "message": "Pod was rejected: " + message, "reason": "UnexpectedAdmissionError",
                                  "startTime": old.get("startTime") or ts,
                                  "qosClass": old.get("qosClass") or objects.qos_class(p.get("spec") or {})}
            if not st["conditions"]:
                del st["conditions"]
            return dict(p, status=st)
        try:
            self.store.update(PODS, meta.get("namespace"), meta["name"], mutate, manager="kubelet",
                              subresource="status")
        except ApiError:
            pass

    def _finish_due(self) -> None:
        now = time.monotonic()
        with self._cond:
            runs = list(self._runs.values())
        for run in runs:
            if run.result is None or run.done or now < run.due:
                continue
            code, log = run.result
            with self._cond:
                if self._runs.get(run.uid) is not run:
                    continue
                self._logs[(run.namespace, run.name)] = (run.uid, log)
            pod = self.store.get_raw(PODS, run.namespace, run.name)
            if pod is None or pod["metadata"].get("uid") != run.uid:
                continue
            policy = (pod.get("spec") or {}).get("restartPolicy") or "Always"
            if code == 0 and policy == "Always":
                run.done = True  # a long-running container: stays Running
                continue
            if code != 0 and policy in ("Always", "OnFailure"):
                status = self.store.pod_status_for(pod, PluginPodStatus(
                    running=False, ready=False, restart_count=1, waiting_reason="CrashLoopBackOff",
                    last_exit_code=code, last_reason="Error"))
                terminal = False
            else:
                status = terminated_status(pod, code)
                terminal = True
            try:
                self.store.update(PODS, run.namespace, run.name,
                                  lambda p, s=status: dict(p, status=s) if p["metadata"].get("uid") == run.uid else p,
                                  manager="kubelet", subresource="status")
            except ApiError:
                continue
            if not terminal:
                c = ((pod.get("spec") or {}).get("containers") or [{}])[0]
                events.record(self.store, PODS, pod, "Warning", "BackOff", "Back-off restarting failed container %s "
                              "in pod %s_%s(%s)" % (c.get("name"), run.name, run.namespace, run.uid), "kubelet",
                              run.node, "spec.containers{%s}" % c.get("name"))
            with self._cond:
                run.done = True
                run.terminal = terminal
                if terminal:
                    self._devices.pop(run.uid, None)
