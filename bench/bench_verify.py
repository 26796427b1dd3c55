"""Verify playbook: playbooks/gpu_node_verify.yml on a full 50-node lab fleet against the same
check written the common way (bench/baseline/verify_common.yml: per host, kubectl get node -o
json, kubectl describe node, kubectl get pods --field-selector, test -S on the plugin socket and
a pynvml one-liner with the node's environment, then one assert), same inventory, same forks,
same run, interleaved. Prints figures and the ratio; no pass/fail.

For each repetition, both playbooks run with ``-f 10`` (--forks) and Ansible's default
settings; bench/callback_plugins/bench_timing.py records when each task started and each host's
worker ran, for tasks per host and for the profile (where the collection's playbook spends its
time: per task, per task file, per module, and the time no worker ran at all, i.e. the
controller's own strategy work). API requests come from the lab's counters.

Before the runs: ``python -m lab up --nodes 50``, the plugin DaemonSet deployed with the
device_plugin module (ad hoc) and every node advertising 8 GPUs.

--quick: 20 nodes, one run each, no attribution runs.

Usage: .venv/bin/python bench/bench_verify.py [--nodes 50] [--forks 10] [--reps 3] [--no-profile] [--quick]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

NAME = "verify"
VERIFY = c.ROOT / "playbooks" / "gpu_node_verify.yml"
BASELINE = c.BENCH / "baseline" / "verify_common.yml"
NODE_MODULES = c.BENCH / "playbooks" / "verify_node_modules.yml"


def union_length(intervals: List[Tuple[float, float]]) -> float:
    total, end = 0.0, None
    start = None
    for a, b in sorted(intervals):
        if end is None or a > end:
            if end is not None:
                total += end - start
            start, end = a, b
        else:
            end = max(end, b)
    if end is not None:
        total += end - start
    return total


def profile(doc: Dict[str, Any], gpu_hosts: List[str]) -> Dict[str, Any]:
    """Where a run's time went, from the bench_timing callback's document."""
    tasks = []
    intervals: List[Tuple[float, float]] = []
    by_file: Dict[str, float] = {}
    by_action: Dict[str, float] = {}
    per_host_results: Dict[str, Dict[str, int]] = {h: {"ran": 0, "skipped": 0} for h in gpu_hosts}
    for task in doc["tasks"]:
        spans = [(r["start"], r["end"]) for results in task["hosts"].values() for r in results if r["start"] is not None]
        host_seconds = sum(b - a for a, b in spans)
        intervals += spans
        for host, results in task["hosts"].items():
            if host in per_host_results:
                for r in results:
                    per_host_results[host]["skipped" if r["status"] == "skipped" else "ran"] += 1
        where = (task.get("path") or "").split("/")
        file_key = "/".join(where[-3:]).split(":", maxsplit=1)[0] if where else "?"
        by_file[file_key] = by_file.get(file_key, 0.0) + host_seconds
        by_action[task["action"]] = by_action.get(task["action"], 0.0) + host_seconds
        span = (min(a for a, b in spans), max(b for a, b in spans)) if spans else (task["started"], task["started"])
        tasks.append({"name": task["name"], "action": task["action"], "file": file_key,
                      "hosts": len(task["hosts"]), "results": len(spans), "host_seconds": round(host_seconds, 3),
                      "mean_per_result_s": round(host_seconds / len(spans), 4) if spans else None,
                      "wall_s": round(span[1] - span[0], 3)})
    busy = union_length(intervals)
    ran = [v["ran"] for v in per_host_results.values()]
    skipped = [v["skipped"] for v in per_host_results.values()]
    return {
        "total_s": doc["total"],
        "workers_busy_s": round(busy, 3),
        "no_worker_running_s": round(doc["total"] - busy, 3),
        "host_seconds": round(sum(t["host_seconds"] for t in tasks), 3),
        "task_results_per_host": {"ran": c.median(ran), "skipped": c.median(skipped)},
        "tasks": sorted(tasks, key=lambda t: -t["host_seconds"]),
        "by_file": dict(sorted(((k, round(v, 3)) for k, v in by_file.items()), key=lambda kv: -kv[1])),
        "by_action": dict(sorted(((k, round(v, 3)) for k, v in by_action.items()), key=lambda kv: -kv[1])),
    }


def run_playbook(lab: c.Lab, work: Path, playbook: Path, forks: int, tag: str,
                 settings: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    timing = work / ("timing-%s-%d.json" % (tag, time.monotonic_ns()))
    report = work / ("report-%d.json" % time.monotonic_ns())
    env = c.ansible_env(work, dict(c.timing_callback_env(timing), **(settings or {})))
    api = lab.api
    api.reset_counters()
    server_before = c.process_cpu(lab.daemon_pid())
    run = c.run_cmd([c.ANSIBLE_PLAYBOOK, "-i", lab.inventory, "-f", str(forks), "-e", "gpunode_report_path=%s" % report,
                     str(playbook)], env=env, cwd=work)
    server_cpu = c.process_cpu(lab.daemon_pid()) - server_before
    counters = api.counters()
    if run.rc != 0:
        raise RuntimeError("%s failed (%d):\n%s" % (playbook.name, run.rc, run.tail(6000)))
    recap = run.recap()
    gpu_hosts = lab.node_names
    missing = [h for h in gpu_hosts if h not in recap]
    if missing:
        raise RuntimeError("%s: no recap for %s" % (playbook.name, missing[:5]))
    if tag.startswith("verify"):
        data = json.loads(report.read_text())
        if data.get("counts", {}).get("ok") != len(gpu_hosts):
            raise RuntimeError("verify report: %s" % data.get("counts"))
    prof = profile(json.loads(timing.read_text()), gpu_hosts)
    return {
        "wall_s": run.seconds, "cpu_s": run.cpu_s, "server_cpu_s": server_cpu,
        "requests": counters.get("total"), "non_resource_requests": sum((counters.get("nonResource") or {}).values()),
        "writes": counters.get("writes"), "by_verb": counters.get("requests"),
        "recap_per_gpu_host": {k: c.median([recap[h][k] for h in gpu_hosts])
                               for k in ("ok", "changed", "skipped", "failed")},
        "recap_localhost": recap.get("localhost"),
        "task_headers": run.output.count("\nTASK ["),
        "profile": prof,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--nodes", type=int, default=None, help="lab fleet size (default 50, quick 20)")
    parser.add_argument("--forks", type=int, default=10)
    parser.add_argument("--reps", type=int, default=None, help="runs of each playbook, interleaved (default 3, quick 1)")
    parser.add_argument("--quick", action="store_true", help="one run each, no profile runs")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the attribution runs (node-side modules alone; both playbooks with pipelining)")
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    args.no_profile = args.no_profile or args.quick
    args.nodes = args.nodes or (20 if args.quick else 50)

    machine = c.begin("Verify playbook: gpu_node_verify.yml vs the common-way check (%d-node full lab, -f %d)"
                      % (args.nodes, args.forks), kubectl=True)
    work = c.workdir("bv")
    ours: List[Dict[str, Any]] = []
    base: List[Dict[str, Any]] = []
    extra: Dict[str, Dict[str, Any]] = {}
    try:
        with c.LoadSampler() as load, c.Lab(args.nodes) as lab:
            deploy = c.deploy_plugin(lab, work)
            print("lab up %.1f s; plugin deployed, %d nodes advertising 8 GPUs after %.1f s"
                  % (lab.up_seconds or 0, args.nodes, deploy.seconds), flush=True)
            warm = c.run_cmd([c.KUBECTL, "get", "nodes", "-o", "name"],
                             env=c.ansible_env(work, {"KUBECONFIG": lab.kubeconfig}))  # kubectl discovery cache
            if warm.rc != 0:
                raise RuntimeError(warm.tail())
            for rep in range(reps):
                # alternate which one goes first, so a trend in the machine's load favours neither
                order = [("verify", VERIFY, ours), ("common", BASELINE, base)]
                if rep % 2:
                    order.reverse()
                for tag, path, sink in order:
                    sample = run_playbook(lab, work, path, args.forks, tag)
                    sink.append(sample)
                    print("  #%d %-7s %s (CPU %s), %s API requests (+%s discovery), load %.1f"
                          % (rep + 1, tag, c.fmt_s(sample["wall_s"]), c.fmt_s(sample["cpu_s"]), sample["requests"],
                             sample["non_resource_requests"], c.read_loadavg()[0]), flush=True)
            if not args.no_profile:
                # attribution: the node-side module alone, and both playbooks with pipelining on
                for tag, path, settings in (("modules-only", NODE_MODULES, None),
                                            ("verify-pipelining", VERIFY, {"ANSIBLE_PIPELINING": "1"}),
                                            ("common-pipelining", BASELINE, {"ANSIBLE_PIPELINING": "1"})):
                    sample = run_playbook(lab, work, path, args.forks, tag, settings)
                    extra[tag] = sample
                    print("  profile %-17s %s (CPU %s), load %.1f" % (tag, c.fmt_s(sample["wall_s"]),
                                                                      c.fmt_s(sample["cpu_s"]), c.read_loadavg()[0]),
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def agg(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {"wall_s": c.summarize([s["wall_s"] for s in samples]),
                "cpu_s": c.summarize([s["cpu_s"] for s in samples]),
                "server_cpu_s": c.summarize([s["server_cpu_s"] for s in samples]),
                "requests": c.summarize([s["requests"] for s in samples], 1),
                "non_resource_requests": c.summarize([s["non_resource_requests"] for s in samples], 1),
                "writes": c.summarize([s["writes"] for s in samples], 1),
                "recap_per_gpu_host": samples[-1]["recap_per_gpu_host"],
                "task_results_per_host": samples[-1]["profile"]["task_results_per_host"],
                "task_headers": samples[-1]["task_headers"],
                "no_worker_running_s": c.summarize([s["profile"]["no_worker_running_s"] for s in samples]),
                "host_seconds": c.summarize([s["profile"]["host_seconds"] for s in samples])}

    summary = {"verify": agg(ours), "common": agg(base)}
    wall_ratio = c.ratio(summary["verify"]["wall_s"]["median"], summary["common"]["wall_s"]["median"])
    cpu_ratio = c.ratio(summary["verify"]["cpu_s"]["median"], summary["common"]["cpu_s"]["median"])
    summary.update(ratio_wall=wall_ratio, ratio_cpu=cpu_ratio, goal="wall <= 0.5x the common-way playbook",
                   goal_met=bool(wall_ratio is not None and wall_ratio <= 0.5))
    v, b = summary["verify"], summary["common"]
    print()
    print(c.table([
        ["wall (median)", c.fmt_s(v["wall_s"]["median"]), c.fmt_s(b["wall_s"]["median"]), c.fmt_ratio(wall_ratio)],
        ["wall min / max", "%s / %s" % (c.fmt_s(v["wall_s"]["min"]), c.fmt_s(v["wall_s"]["max"])),
         "%s / %s" % (c.fmt_s(b["wall_s"]["min"]), c.fmt_s(b["wall_s"]["max"])), ""],
        ["CPU of ansible + children (median)", c.fmt_s(v["cpu_s"]["median"]), c.fmt_s(b["cpu_s"]["median"]),
         c.fmt_ratio(cpu_ratio)],
        ["lab API server CPU", c.fmt_s(v["server_cpu_s"]["median"]), c.fmt_s(b["server_cpu_s"]["median"]), ""],
        ["tasks per GPU host (recap ok / skipped)", "%s / %s" % (v["recap_per_gpu_host"]["ok"], v["recap_per_gpu_host"]["skipped"]),
         "%s / %s" % (b["recap_per_gpu_host"]["ok"], b["recap_per_gpu_host"]["skipped"]), ""],
        ["task headers in the output", v["task_headers"], b["task_headers"], ""],
        ["API requests (+ discovery)", "%s (+%s)" % (v["requests"]["median"], v["non_resource_requests"]["median"]),
         "%s (+%s)" % (b["requests"]["median"], b["non_resource_requests"]["median"]), ""],
        ["API writes", v["writes"]["median"], b["writes"]["median"], ""],
        ["time with no worker running (controller)", c.fmt_s(v["no_worker_running_s"]["median"]),
         c.fmt_s(b["no_worker_running_s"]["median"]), ""],
    ], ["%d nodes, -f %d, %d run(s) each" % (args.nodes, args.forks, reps), "gpu_node_verify.yml",
        "verify_common.yml", "ratio"]))
    print("goal wall <= 0.5x: %s (%s)" % ("met" if summary["goal_met"] else "missed", c.fmt_ratio(wall_ratio)))
    prof = ours[-1]["profile"]
    print("\nprofile of the last gpu_node_verify.yml run (host-seconds = sum over hosts of worker start -> result):")
    print("  total %.1f s, a worker running %.1f s, no worker running %.1f s; %.1f host-seconds in tasks"
          % (prof["total_s"], prof["workers_busy_s"], prof["no_worker_running_s"], prof["host_seconds"]))
    print("  by module/action: " + ", ".join("%s %.1f" % kv for kv in list(prof["by_action"].items())[:10]))
    print("  by task file: " + ", ".join("%s %.1f" % kv for kv in list(prof["by_file"].items())[:8]))
    print(c.table([[t["name"][:60], t["action"].replace("gpunode.bringup.", "")[:28], t["results"],
                    "%.1f" % t["host_seconds"], c.fmt_s(t["mean_per_result_s"]), c.fmt_s(t["wall_s"])]
                   for t in prof["tasks"][:15]],
                  ["task (top 15 by host-seconds)", "action", "results", "host-s", "per result", "wall span"]))
    if extra:
        mod = extra["modules-only"]
        vp, cp = extra["verify-pipelining"], extra["common-pipelining"]
        summary["attribution"] = {
            "modules_only": {"wall_s": mod["wall_s"], "cpu_s": mod["cpu_s"],
                             "ratio_wall_vs_common": c.ratio(mod["wall_s"], b["wall_s"]["median"])},
            "pipelining": {"verify_wall_s": vp["wall_s"], "verify_cpu_s": vp["cpu_s"], "common_wall_s": cp["wall_s"],
                           "common_cpu_s": cp["cpu_s"], "ratio_wall": c.ratio(vp["wall_s"], cp["wall_s"]),
                           "ratio_cpu": c.ratio(vp["cpu_s"], cp["cpu_s"])},
        }
        print("\nattribution (one run each, same lab):")
        print("  the node-side module task alone (bench/playbooks/verify_node_modules.yml): %s, CPU %s "
              "= %s of the common way's wall" % (c.fmt_s(mod["wall_s"]), c.fmt_s(mod["cpu_s"]),
                                                 c.fmt_ratio(c.ratio(mod["wall_s"], b["wall_s"]["median"]))))
        print("  with ANSIBLE_PIPELINING=1: verify %s (CPU %s), common way %s (CPU %s): ratio %s"
              % (c.fmt_s(vp["wall_s"]), c.fmt_s(vp["cpu_s"]), c.fmt_s(cp["wall_s"]), c.fmt_s(cp["cpu_s"]),
                 c.fmt_ratio(c.ratio(vp["wall_s"], cp["wall_s"]))))
    print(load.line())
    path = c.write_result(NAME, {"machine": machine, "load": load.summary(), "quick": args.quick,
                                 "settings": {"nodes": args.nodes, "forks": args.forks, "reps": reps},
                                 "summary": summary, "runs": {"verify": ours, "common": base}, "profile_runs": extra})
    print("result: %s" % path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
