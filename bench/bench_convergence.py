"""Convergence: how long device_plugin_restart takes to notice that a node advertises its GPUs
again, after the lab's kubelet updated the Node (the waiting overhead of its watch-based wait).
Prints figures; no pass/fail.

On a full lab fleet (``python -m lab up --nodes 4``, plugin deployed with the device_plugin
module), each repetition picks the next node and:

1. starts two watches of its own on the lab API (plain HTTPS streams in threads of this
   process): the Node, and the plugin pods on the node; every event is stamped with
   ``time.monotonic()`` when its line arrives;
2. runs the module's body in process: ``PluginRestart(K8sClient(params), RestartRequest(...,
   expected_count=8)).run(False)`` from the collection's module_utils (delete the pod, wait for
   a Ready replacement, wait for the Node's allocatable), and stamps its return;
3. finds, in the Node events after the deletion, the update that brought ``allocatable
   nvidia.com/gpu`` back to 8 after it had dropped (the kubelet marks the devices unhealthy when
   the old plugin's stream ends, then advertises them when the new plugin registers).

overhead = module return - that Node update (both on this process's monotonic clock; the
watcher's own receive latency is the same as the module's, so this is the time the wait adds
after the information reached the controller). Also reported: deletion -> new pod Ready,
deletion -> Node advertised, and the same measured through ``ansible localhost -m
gpunode.bringup.device_plugin_restart`` (overhead = the ansible process's exit - the Node
update, so it includes Ansible's result handling and exit).

Both watches receive the same event, and whichever thread the GIL lets run first stamps first,
so small negative overheads (tenths of a millisecond) are delivery order, not early returns.
Whether the module waited for the right update is checked exactly instead: in process, the
module's class is subclassed only to note the Node resourceVersion its condition accepted; an
accepted version older than the update that brought the GPUs back (a stale Node) is counted as
an anomaly and shown. Through ansible, a return more than JITTER_S (50 ms) before the update is.

Usage: .venv/bin/python bench/bench_convergence.py [--reps 20] [--ansible-reps 5] [--quick]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

NAME = "convergence"
RESOURCE = "nvidia.com/gpu"
EXPECTED = 8
NAMESPACE = "kube-system"
SELECTOR = "name=nvidia-device-plugin-ds"
# The module's watch and ours receive the same event; whichever thread runs first stamps first, so
# a return up to this much before our stamp is delivery order, not a stale read.
JITTER_S = 0.05


class Watcher:
    """One watch stream in a thread, events stamped with time.monotonic()."""

    def __init__(self, api: c.LabApi, path: str) -> None:
        self.api = api
        self.path = path
        self.events: List[Tuple[float, Dict[str, Any]]] = []
        self.stop = threading.Event()
        self.connected = threading.Event()
        self.first_event = threading.Event()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _on_event(self, when: float, event: Dict[str, Any]) -> None:
        self.events.append((when, event))
        self.first_event.set()

    def _run(self) -> None:
        try:
            self.api.watch(self.path, self._on_event, self.stop, self.connected, timeout_s=120)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            if not self.stop.is_set():
                self.error = exc
        finally:
            self.first_event.set()

    def start(self) -> "Watcher":
        self.thread.start()
        if not self.first_event.wait(30) or self.error:
            raise RuntimeError("watch %s did not start: %s" % (self.path, self.error))
        return self

    def close(self, settle: float = 0.3) -> None:
        time.sleep(settle)  # let trailing events arrive
        self.stop.set()
        self.thread.join(0.5)  # the stream ends at timeoutSeconds at the latest; the thread is a daemon


def allocatable(node: Dict[str, Any]) -> Optional[int]:
    value = ((node.get("status") or {}).get("allocatable") or {}).get(RESOURCE)
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def pod_ready(pod: Dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        cond.get("type") == "Ready" and cond.get("status") == "True" for cond in status.get("conditions") or [])


def rv(obj: Dict[str, Any]) -> int:
    return int((obj.get("metadata") or {}).get("resourceVersion") or 0)


def analyze(t0: float, t_ret: float, node_events: List[Tuple[float, Dict[str, Any]]],
            pod_events: List[Tuple[float, Dict[str, Any]]], old_uid: Optional[str],
            accepted: Optional[Tuple[float, int]] = None) -> Dict[str, Any]:
    """Times relative to the module's start; the Node update that brought the GPUs back.

    ``accepted``: when the module's own Node condition turned true, and the Node's
    resourceVersion it saw then (in-process runs only)."""
    dropped_at = advertised_at = None
    advertised_rv = None
    timeline = []
    for when, event in node_events:
        if when < t0:
            continue
        value = allocatable(event["object"])
        timeline.append((round(when - t0, 4), event["type"], value, rv(event["object"])))
        if value is not None and value < EXPECTED and dropped_at is None:
            dropped_at = when
        if dropped_at is not None and advertised_at is None and value == EXPECTED:
            advertised_at = when
            advertised_rv = rv(event["object"])
    ready_at = None
    for when, event in pod_events:
        obj = event["object"]
        if when >= t0 and (obj.get("metadata") or {}).get("uid") != old_uid and event["type"] != "DELETED" \
                and pod_ready(obj):
            ready_at = when
            break
    out: Dict[str, Any] = {
        "module_s": round(t_ret - t0, 4),
        "node_dropped_s": round(dropped_at - t0, 4) if dropped_at else None,
        "pod_ready_s": round(ready_at - t0, 4) if ready_at else None,
        "node_advertised_s": round(advertised_at - t0, 4) if advertised_at else None,
        "node_timeline": timeline,
    }
    out["overhead_s"] = round(t_ret - advertised_at, 4) if advertised_at else None
    out["accepted_s"] = round(accepted[0] - t0, 4) if accepted else None
    out["accepted_rv"] = accepted[1] if accepted else None
    out["condition_after_update_s"] = round(accepted[0] - advertised_at, 4) if accepted and advertised_at else None
    out["return_after_condition_s"] = round(t_ret - accepted[0], 4) if accepted else None
    out["advertised_rv"] = advertised_rv
    out["anomaly"] = None
    if advertised_at is None:
        out["anomaly"] = "no Node update bringing %s back to %d after a drop was seen" % (RESOURCE, EXPECTED)
    elif accepted is not None and accepted[1] < advertised_rv:
        out["anomaly"] = "the module accepted a stale Node (resourceVersion %d, the update is %d)" % (
            accepted[1], advertised_rv)
    elif accepted is None and t_ret < advertised_at - JITTER_S:
        out["anomaly"] = "the module returned %.3f s before the Node update" % (advertised_at - t_ret)
    return out


def current_pod(api: c.LabApi, node: str) -> Optional[Dict[str, Any]]:
    pods = api.request("/api/v1/namespaces/%s/pods?labelSelector=%s&fieldSelector=spec.nodeName%%3D%s"
                       % (NAMESPACE, SELECTOR.replace("=", "%3D"), node)).get("items") or []
    return pods[0] if len(pods) == 1 else None


def settle(api: c.LabApi, node: str, timeout: float = 60) -> Dict[str, Any]:
    """Wait until the node's one plugin pod is Ready and the Node advertises every GPU."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pod = current_pod(api, node)
        obj = api.request("/api/v1/nodes/%s" % node)
        if pod is not None and pod_ready(pod) and allocatable(obj) == EXPECTED:
            return pod
        time.sleep(0.1)
    raise RuntimeError("node %s did not settle (pod Ready, %s=%d) in %ds" % (node, RESOURCE, EXPECTED, timeout))


def watchers(api: c.LabApi, node: str) -> Tuple[Watcher, Watcher]:
    node_w = Watcher(api, "/api/v1/nodes?fieldSelector=metadata.name%%3D%s" % node).start()
    pod_w = Watcher(api, "/api/v1/namespaces/%s/pods?labelSelector=%s&fieldSelector=spec.nodeName%%3D%s"
                    % (NAMESPACE, SELECTOR.replace("=", "%3D"), node)).start()
    return node_w, pod_w


def one_in_process(lab: c.Lab, node: str) -> Dict[str, Any]:
    from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import K8sClient
    from ansible_collections.gpunode.bringup.plugins.module_utils._restart import PluginRestart, RestartRequest

    class Recording(PluginRestart):
        """The module's class, noting when its Node condition turned true and on which version."""

        accepted: Optional[Tuple[float, int]] = None

        def _advertised_ok(self, objects):
            value = super()._advertised_ok(objects)
            if value is not None and self.accepted is None:
                self.accepted = (time.monotonic(), rv(self._only(objects) or {}))
            return value

    api = lab.api
    old = settle(api, node)
    node_w, pod_w = watchers(api, node)
    try:
        client = K8sClient({"kubeconfig": lab.kubeconfig})
        request = RestartRequest(node=node, namespace=NAMESPACE, label_selector=SELECTOR, resource_name=RESOURCE,
                                 expected_count=EXPECTED, timeout=120)
        restart = Recording(client, request)
        t0 = time.monotonic()
        result = restart.run(False)
        t_ret = time.monotonic()
    finally:
        node_w.close()
        pod_w.close()
    out = analyze(t0, t_ret, node_w.events, pod_w.events, old["metadata"]["uid"], restart.accepted)
    out.update(node=node, waited_seconds=result.get("waited_seconds"), advertised=result.get("advertised"),
               api_requests=client.requests)
    return out


def one_ansible(lab: c.Lab, work: Path, node: str) -> Dict[str, Any]:
    api = lab.api
    old = settle(api, node)
    node_w, pod_w = watchers(api, node)
    args = {"kubeconfig": lab.kubeconfig, "node": node, "expected_count": EXPECTED, "timeout": 120}
    cmd = [c.ANSIBLE, "localhost", "-m", "gpunode.bringup.device_plugin_restart", "-a", json.dumps(args),
           "-e", "ansible_python_interpreter=%s" % c.PYTHON]
    env = c.ansible_env(work)
    try:
        t0 = time.monotonic()
        run = c.run_cmd(cmd, env=env, cwd=work)
        t_ret = time.monotonic()
    finally:
        node_w.close()
        pod_w.close()
    if run.rc != 0:
        raise RuntimeError("device_plugin_restart failed: %s" % run.tail())
    out = analyze(t0, t_ret, node_w.events, pod_w.events, old["metadata"]["uid"])
    out["node"] = node
    return out


def stats(samples: List[Dict[str, Any]], key: str) -> Dict[str, Any]:
    return c.summarize([s[key] for s in samples if s.get(key) is not None])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--reps", type=int, default=None, help="in-process repetitions (default 20, quick 10)")
    parser.add_argument("--ansible-reps", type=int, default=None, help="repetitions through ansible (default 5, quick 3)")
    parser.add_argument("--nodes", type=int, default=4, help="lab fleet size (the node changes every repetition)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    reps = args.reps or (10 if args.quick else 20)
    ansible_reps = args.ansible_reps if args.ansible_reps is not None else (3 if args.quick else 5)

    machine = c.begin("Convergence: plugin pod deleted -> device_plugin_restart sees the node advertised again")
    work = c.workdir("bc")
    samples: List[Dict[str, Any]] = []
    through_ansible: List[Dict[str, Any]] = []
    try:
        with c.LoadSampler() as load, c.Lab(args.nodes) as lab:
            c.deploy_plugin(lab, work)
            nodes = lab.node_names
            for i in range(reps):
                sample = one_in_process(lab, nodes[i % len(nodes)])
                samples.append(sample)
                print("  in process #%2d %s: pod Ready %s, Node advertised %s, module returned %s, overhead %s%s"
                      % (i + 1, sample["node"], c.fmt_s(sample["pod_ready_s"]), c.fmt_s(sample["node_advertised_s"]),
                         c.fmt_s(sample["module_s"]), c.fmt_s(sample["overhead_s"]),
                         "  ANOMALY: %s %s" % (sample["anomaly"], sample["node_timeline"]) if sample["anomaly"] else ""),
                      flush=True)
            for i in range(ansible_reps):
                sample = one_ansible(lab, work, nodes[(reps + i) % len(nodes)])
                through_ansible.append(sample)
                print("  ansible    #%2d %s: Node advertised %s, ansible exited %s, overhead %s%s"
                      % (i + 1, sample["node"], c.fmt_s(sample["node_advertised_s"]), c.fmt_s(sample["module_s"]),
                         c.fmt_s(sample["overhead_s"]), "  ANOMALY: %s" % sample["anomaly"] if sample["anomaly"] else ""),
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    overhead = stats(samples, "overhead_s")
    summary = {
        "overhead_s": overhead,
        "pod_ready_s": stats(samples, "pod_ready_s"),
        "node_advertised_s": stats(samples, "node_advertised_s"),
        "module_s": stats(samples, "module_s"),
        "condition_after_update_s": stats(samples, "condition_after_update_s"),
        "return_after_condition_s": stats(samples, "return_after_condition_s"),
        "api_requests": c.summarize([s["api_requests"] for s in samples], 1),
        "anomalies": [s for s in samples if s["anomaly"]],
        "ansible_overhead_s": stats(through_ansible, "overhead_s"),
        "ansible_total_s": stats(through_ansible, "module_s"),
        "goal": "overhead (module return - Node update) <= 1 s",
    }
    summary["goal_met"] = bool(overhead.get("n") and overhead["max"] <= 1.0 and not summary["anomalies"])
    print()
    print(c.table([
        ["deletion -> new plugin pod Ready", c.fmt_s(summary["pod_ready_s"].get("median")),
         c.fmt_s(summary["pod_ready_s"].get("max"))],
        ["deletion -> Node advertises %d again" % EXPECTED, c.fmt_s(summary["node_advertised_s"].get("median")),
         c.fmt_s(summary["node_advertised_s"].get("max"))],
        ["deletion -> module returned (in process)", c.fmt_s(summary["module_s"].get("median")),
         c.fmt_s(summary["module_s"].get("max"))],
        ["overhead: module return - Node update", c.fmt_s(overhead.get("median")), c.fmt_s(overhead.get("max"))],
        ["  module's Node condition true - Node update", c.fmt_s(summary["condition_after_update_s"].get("median")),
         c.fmt_s(summary["condition_after_update_s"].get("max"))],
        ["  module return - its condition true", c.fmt_s(summary["return_after_condition_s"].get("median")),
         c.fmt_s(summary["return_after_condition_s"].get("max"))],
        ["through ansible: exit - Node update", c.fmt_s(summary["ansible_overhead_s"].get("median")),
         c.fmt_s(summary["ansible_overhead_s"].get("max"))],
        ["through ansible: whole command", c.fmt_s(summary["ansible_total_s"].get("median")),
         c.fmt_s(summary["ansible_total_s"].get("max"))],
    ], ["%d in process, %d through ansible" % (len(samples), len(through_ansible)), "median", "max"]))
    print("API requests per restart (in process): median %s" % summary["api_requests"].get("median"))
    print("goal: overhead <= 1 s (median and max): %s%s" % (
        "met" if summary["goal_met"] else "missed",
        "; %d anomalies" % len(summary["anomalies"]) if summary["anomalies"] else ""))
    print(load.line())
    path = c.write_result(NAME, {"machine": machine, "load": load.summary(), "quick": args.quick,
                                 "settings": {"reps": reps, "ansible_reps": ansible_reps, "nodes": args.nodes},
                                 "samples": samples, "through_ansible": through_ansible, "summary": summary})
    print("result: %s" % path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
