"""Fleet reads: gpunode.bringup.device_plugin_info over N API-only lab nodes (N = 10, 100, 1000)
against the by-hand check, per node ``kubectl get node <n> -o json`` and ``kubectl get pods -A
--field-selector spec.nodeName=<n>``, in the same lab and the same run. Prints figures and
ratios; no pass/fail.

For each N, one ``python -m lab up --api-only --nodes N`` fleet (a separate daemon process), the
plugin DaemonSet deployed with the collection's device_plugin module (ad hoc, ``wait: true``),
then, each as the median of several repetitions:

- ``ansible localhost -m gpunode.bringup.device_plugin_info`` (ad hoc, the result printed by the
  default callback), end to end, with the node names as the role passes them;
- the same module in a playbook task that registers the result (as the gpu_node role uses it);
- in process: ``device_plugin_info_result(params)`` from the collection's module_utils (client
  built, 3 API requests, reports, the result serialized to JSON) in this warm Python process,
  and the API part alone (``FleetReader.snapshot``, the three requests, client reused); so
  Ansible's start-up and result handling are visible separately; for context, Ansible's own
  floor, ``ansible localhost -m ansible.builtin.ping``, and the kubernetes client's, a fresh
  Python that imports it and builds an ApiClient;
- baseline: the two kubectl commands per node, one after the other (the kubectl discovery cache
  warmed first). For N above --sample the baseline runs on --sample nodes spread over the
  fleet and is extrapolated linearly to N (marked "sampled").

API requests come from the lab API server's counters (/lab/counters, reset before each run):
resource requests (get/list/watch/...) and non-resource ones (discovery) separately.

Usage: .venv/bin/python bench/bench_fleet_reads.py [--sizes 10,100,1000] [--reps 5] [--sample 100] [--quick]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

NAME = "fleet_reads"
PLAYBOOK = c.BENCH / "playbooks" / "fleet_read.yml"


def counted(counters: Dict[str, Any]) -> Dict[str, Any]:
    requests = counters.get("requests") or {}
    non_resource = counters.get("nonResource") or {}
    return {"requests": int(counters.get("total") or sum(sum(v.values()) for v in requests.values())),
            "by_verb": dict(requests, nonResource=non_resource), "non_resource": sum(non_resource.values()),
            "writes": counters.get("writes")}


def module_params(lab: c.Lab, nodes: List[str]) -> Dict[str, Any]:
    return {"kubeconfig": lab.kubeconfig, "nodes": nodes, "expected_gpu_count": 8}


def ansible_adhoc(lab: c.Lab, work: Path, nodes: List[str]) -> c.Run:
    return c.run_cmd([c.ANSIBLE, "localhost", "-m", "gpunode.bringup.device_plugin_info",
                      "-a", json.dumps(module_params(lab, nodes)), "-e", "ansible_python_interpreter=%s" % c.PYTHON],
                     env=c.ansible_env(work), cwd=work)


def ansible_playbook(lab: c.Lab, work: Path, nodes: List[str]) -> c.Run:
    vars_file = work / "fleet-vars.json"
    vars_file.write_text(json.dumps({"bench_kubeconfig": lab.kubeconfig, "bench_nodes": nodes}))
    return c.run_cmd([c.ANSIBLE_PLAYBOOK, "-i", "localhost,", "-c", "local", "-e", "ansible_python_interpreter=%s" % c.PYTHON,
                      "-e", "@%s" % vars_file, str(PLAYBOOK)], env=c.ansible_env(work), cwd=work)


def healthy_count(run: c.Run, how: str) -> int:
    """The healthy node count the run reported (ad hoc: the printed result; playbook: its summary line)."""
    if how == "adhoc":
        text = run.output.split("=>", 1)[1] if "=>" in run.output else "{}"
        return int(json.loads(text).get("summary", {}).get("healthy", -1))
    match = re.search(r"BENCH healthy=(\d+)", run.output)
    return int(match.group(1)) if match else -1


def one_ping(work: Path) -> Dict[str, Any]:
    """Ansible's own floor: ``ansible localhost -m ansible.builtin.ping`` (start-up, one trivial module)."""
    run = c.run_cmd([c.ANSIBLE, "localhost", "-m", "ansible.builtin.ping", "-e", "ansible_python_interpreter=%s" % c.PYTHON],
                    env=c.ansible_env(work), cwd=work)
    if run.rc != 0:
        raise RuntimeError("ansible ping failed:\n%s" % run.tail())
    return {"wall_s": run.seconds, "cpu_s": run.cpu_s, "server_cpu_s": 0.0, "requests": 0, "non_resource_requests": 0}


def one_import(work: Path) -> Dict[str, Any]:
    """The kubernetes client's own start: a fresh Python that imports it and builds an ApiClient
    (what device_plugin_info pays before its first request, besides Ansible)."""
    run = c.run_cmd([c.PYTHON, "-c", "import kubernetes.config, kubernetes.client; kubernetes.client.ApiClient()"],
                    env=c.ansible_env(work), cwd=work)
    if run.rc != 0:
        raise RuntimeError("import kubernetes failed:\n%s" % run.tail())
    return {"wall_s": run.seconds, "cpu_s": run.cpu_s, "server_cpu_s": 0.0, "requests": 0, "non_resource_requests": 0}


def one_ansible(lab: c.Lab, work: Path, nodes: List[str], how: str) -> Dict[str, Any]:
    api = lab.api
    api.reset_counters()
    server_before = c.process_cpu(lab.daemon_pid())
    run = (ansible_adhoc if how == "adhoc" else ansible_playbook)(lab, work, nodes)
    server_cpu = c.process_cpu(lab.daemon_pid()) - server_before
    counts = counted(api.counters())
    if run.rc != 0 or healthy_count(run, how) != len(nodes):
        raise RuntimeError("device_plugin_info (%s) failed or found unhealthy nodes:\n%s" % (how, run.tail()))
    return {"wall_s": run.seconds, "cpu_s": run.cpu_s, "server_cpu_s": server_cpu, "requests": counts["requests"],
            "non_resource_requests": counts["non_resource"], "by_verb": counts["by_verb"]}


def collect(samples: List[Dict[str, Any]], **extra: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {key: c.summarize([s[key] for s in samples], 1 if "requests" in key else 4)
                           for key in ("wall_s", "cpu_s", "server_cpu_s", "requests", "non_resource_requests")}
    if samples and "by_verb" in samples[-1]:
        out["by_verb_last"] = samples[-1]["by_verb"]
    out.update(extra)
    return out


def measure_in_process(lab: c.Lab, nodes: List[str], reps: int) -> Dict[str, Any]:
    from ansible_collections.gpunode.bringup.plugins.module_utils._fleet import (
        FleetQuery, FleetReader, device_plugin_info_result)
    from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import K8sClient

    params = module_params(lab, nodes)
    api = lab.api
    api.reset_counters()
    start = time.perf_counter()
    result = device_plugin_info_result(params)
    json.dumps(result)
    first = time.perf_counter() - start
    if result["summary"]["healthy"] != len(nodes):
        raise RuntimeError("in-process read: %s" % result["summary"])
    totals, cpus, sizes = [], [], []
    for unused_rep in range(reps):
        cpu0 = time.process_time()
        start = time.perf_counter()
        result = device_plugin_info_result(params)
        text = json.dumps(result)
        totals.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu0)
        sizes.append(len(text))
    per_call = counted(api.counters())["requests"] / (reps + 1)
    client = K8sClient(params)
    query = FleetQuery(daemonset_name="nvidia-device-plugin-daemonset", namespace="kube-system", nodes=nodes,
                       pod_selector={"name": "nvidia-device-plugin-ds"}, expected_gpu_count=8)
    reader = FleetReader(client)
    reader.snapshot(query)
    snaps = []
    for unused_rep in range(reps):
        start = time.perf_counter()
        reader.snapshot(query)
        snaps.append(time.perf_counter() - start)
    return {"first_call_s": round(first, 4), "wall_s": c.summarize(totals), "cpu_s": c.summarize(cpus), "api_part_s": c.summarize(snaps),
            "requests_per_call": per_call, "module_api_requests": result["api_requests"],
            "result_json_bytes": int(c.median(sizes) or 0)}


def kubectl(lab: c.Lab, work: Path, *args: str) -> c.Run:
    env = c.ansible_env(work, {"KUBECONFIG": lab.kubeconfig})
    return c.run_cmd([c.KUBECTL, *args], env=env, cwd=work)


def kubectl_sample(nodes: List[str], sample: int) -> List[str]:
    if len(nodes) <= sample:
        return list(nodes)
    step = len(nodes) / float(sample)
    return [nodes[int(i * step)] for i in range(sample)]


def one_kubectl(lab: c.Lab, work: Path, nodes: List[str], picked: List[str]) -> Dict[str, Any]:
    """The by-hand check on the picked nodes, scaled to all nodes."""
    api = lab.api
    scale = len(nodes) / float(len(picked))
    api.reset_counters()
    server_before = c.process_cpu(lab.daemon_pid())
    cpu = 0.0
    per_node = []
    start = time.perf_counter()
    for node in picked:
        t0 = time.perf_counter()
        a = kubectl(lab, work, "get", "node", node, "-o", "json")
        b = kubectl(lab, work, "get", "pods", "-A", "--field-selector", "spec.nodeName=%s" % node)
        if a.rc != 0 or b.rc != 0 or "nvidia-device-plugin" not in b.output:
            raise RuntimeError("kubectl baseline on %s: %s %s" % (node, a.tail(500), b.tail(500)))
        per_node.append(time.perf_counter() - t0)
        cpu += a.cpu_s + b.cpu_s
    wall = time.perf_counter() - start
    server_cpu = c.process_cpu(lab.daemon_pid()) - server_before
    counts = counted(api.counters())
    return {"wall_s": wall * scale, "cpu_s": cpu * scale, "server_cpu_s": server_cpu * scale,
            "requests": counts["requests"] * scale, "non_resource_requests": counts["non_resource"] * scale,
            "per_node": per_node}


def measure_size(size: int, reps: int, kubectl_reps: int, sample: int) -> Dict[str, Any]:
    work = c.workdir("bf")
    try:
        with c.Lab(size, api_only=True) as lab:
            deploy = c.deploy_plugin(lab, work)
            nodes = lab.node_names
            entry: Dict[str, Any] = {"nodes": size, "lab_up_s": round(lab.up_seconds or 0, 2),
                                     "deploy_s": round(deploy.seconds, 2)}
            print("N=%d: lab up %.1f s, DaemonSet deployed and every node advertising in %.1f s"
                  % (size, lab.up_seconds or 0, deploy.seconds), flush=True)
            entry["in_process"] = measure_in_process(lab, nodes, max(reps, 5))
            warm = kubectl(lab, work, "get", "nodes", "-o", "name")  # fills kubectl's discovery cache
            if warm.rc != 0:
                raise RuntimeError("kubectl: %s" % warm.tail())
            picked = kubectl_sample(nodes, sample)
            adhoc, playbook, kube, ping, imports = [], [], [], [], []
            # interleaved, so that a change in the machine's load hits every way alike
            for rep in range(max(reps, kubectl_reps)):
                if rep < reps:
                    adhoc.append(one_ansible(lab, work, nodes, "adhoc"))
                    playbook.append(one_ansible(lab, work, nodes, "playbook"))
                    ping.append(one_ping(work))
                    imports.append(one_import(work))
                if rep < kubectl_reps:
                    kube.append(one_kubectl(lab, work, nodes, picked))
            entry["ansible_adhoc"] = collect(adhoc)
            entry["ansible_playbook"] = collect(playbook)
            entry["ansible_ping"] = collect(ping)
            entry["import_kubernetes"] = collect(imports)
            entry["kubectl"] = collect(kube, sampled_nodes=len(picked), extrapolated=len(picked) != len(nodes),
                                       scale=len(nodes) / float(len(picked)),
                                       per_node_s=c.summarize([t for k in kube for t in k["per_node"]]))
            base = entry["kubectl"]["wall_s"]["median"]
            entry["ratio_adhoc_vs_kubectl"] = c.ratio(entry["ansible_adhoc"]["wall_s"]["median"], base)
            entry["ratio_playbook_vs_kubectl"] = c.ratio(entry["ansible_playbook"]["wall_s"]["median"], base)
            entry["ratio_in_process_vs_kubectl"] = c.ratio(entry["in_process"]["wall_s"]["median"], base)
            base_cpu = entry["kubectl"]["cpu_s"]["median"]
            entry["cpu_ratio_adhoc_vs_kubectl"] = c.ratio(entry["ansible_adhoc"]["cpu_s"]["median"], base_cpu)
            entry["cpu_ratio_playbook_vs_kubectl"] = c.ratio(entry["ansible_playbook"]["cpu_s"]["median"], base_cpu)
            entry["request_ratio_vs_kubectl"] = c.ratio(entry["ansible_adhoc"]["requests"]["median"],
                                                        entry["kubectl"]["requests"]["median"])
            return entry
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_size(entry: Dict[str, Any]) -> None:
    k = entry["kubectl"]
    base_wall, base_cpu = k["wall_s"]["median"], k["cpu_s"]["median"]

    def row(label: str, m: Dict[str, Any], requests: Any, discovery: Any) -> List[Any]:
        wall = m["wall_s"]["median"]
        cpu = m["cpu_s"]["median"]
        return [label, c.fmt_s(wall), c.fmt_s(cpu), requests, discovery, c.fmt_ratio(c.ratio(wall, base_wall)),
                c.fmt_ratio(c.ratio(cpu, base_cpu))]

    sampled = " (sampled %d, x%.0f)" % (k["sampled_nodes"], k["scale"]) if k["extrapolated"] else ""
    rows = [
        row("device_plugin_info, ansible ad hoc", entry["ansible_adhoc"], entry["ansible_adhoc"]["requests"]["median"],
            entry["ansible_adhoc"]["non_resource_requests"]["median"]),
        row("device_plugin_info, ansible-playbook task", entry["ansible_playbook"],
            entry["ansible_playbook"]["requests"]["median"], entry["ansible_playbook"]["non_resource_requests"]["median"]),
        row("module_utils in process (whole body)", entry["in_process"], entry["in_process"]["requests_per_call"], 0),
        row("  context: ansible localhost -m ping", entry["ansible_ping"], 0, 0),
        row("  context: python -c 'import kubernetes ...'", entry["import_kubernetes"], 0, 0),
        ["  of which the 3 API requests", c.fmt_s(entry["in_process"]["api_part_s"]["median"]), "", 3, 0, "", ""],
        row("baseline: kubectl x2 per node" + sampled, k, int(k["requests"]["median"]),
            int(k["non_resource_requests"]["median"])),
    ]
    print(c.table(rows, ["N=%d" % entry["nodes"], "wall", "CPU (client)", "API requests", "discovery",
                         "wall / baseline", "CPU / baseline"]), flush=True)
    print("  (medians; in process: first call %s; kubectl per node %s; lab server CPU per run: ad hoc %s, kubectl %s)"
          % (c.fmt_s(entry["in_process"]["first_call_s"]), c.fmt_s(k["per_node_s"].get("median")),
             c.fmt_s(entry["ansible_adhoc"]["server_cpu_s"]["median"]), c.fmt_s(k["server_cpu_s"]["median"])))


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--sizes", default=None, help="comma-separated fleet sizes (default 10,100,1000)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of the module runs (default 5, quick 3)")
    parser.add_argument("--kubectl-reps", type=int, default=None, help="repetitions of the kubectl loop (default 3, quick 1)")
    parser.add_argument("--sample", type=int, default=None,
                        help="nodes the kubectl baseline runs on when N is larger (default 100, quick 20)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and a smaller kubectl sample")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or "10,100,1000").split(",") if s.strip()]
    reps = args.reps or (3 if args.quick else 5)
    kubectl_reps = args.kubectl_reps or (1 if args.quick else 3)
    sample = args.sample or (20 if args.quick else 100)

    machine = c.begin("Fleet reads: device_plugin_info vs per-node kubectl (API-only lab fleets)", kubectl=True)
    print("repetitions: module %d, kubectl loop %d; kubectl sample %d nodes above that size" % (reps, kubectl_reps, sample),
          flush=True)
    entries = []
    with c.LoadSampler() as load:
        for size in sizes:
            entry = measure_size(size, reps, kubectl_reps, sample)
            entries.append(entry)
            print_size(entry)
            print()
    goal_entry = next((e for e in entries if e["nodes"] == 100), None)
    requests = {e["nodes"]: e["ansible_adhoc"]["requests"]["median"] for e in entries}
    summary = {
        "requests_by_size": requests,
        "requests_constant": len(set(requests.values())) == 1,
        "ratio_at_100": goal_entry["ratio_adhoc_vs_kubectl"] if goal_entry else None,
        "ratio_at_100_playbook": goal_entry["ratio_playbook_vs_kubectl"] if goal_entry else None,
        "goal": "requests constant in N; wall <= 0.1x the kubectl baseline at N=100",
    }
    summary["goal_met"] = bool(summary["requests_constant"] and summary["ratio_at_100"] is not None
                               and summary["ratio_at_100"] <= 0.1)
    print("requests per device_plugin_info run by N: %s (constant: %s)" % (requests, summary["requests_constant"]))
    if goal_entry:
        print("wall at N=100: ad hoc %s of the kubectl baseline, playbook task %s (goal <= 0.1x): %s"
              % (c.fmt_ratio(summary["ratio_at_100"]), c.fmt_ratio(summary["ratio_at_100_playbook"]),
                 "met" if summary["goal_met"] else "missed"))
    print(load.line())
    path = c.write_result(NAME, {"machine": machine, "load": load.summary(), "quick": args.quick,
                                 "settings": {"reps": reps, "kubectl_reps": kubectl_reps, "sample": sample},
                                 "sizes": entries, "summary": summary})
    print("result: %s" % path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
