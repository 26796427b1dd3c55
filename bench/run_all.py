"""Run the benchmarks in bench/ (``make bench``): each prints its figures and ratios against a
baseline measured in the same run and writes a JSON result under bench/results/. Benchmarks
never pass or fail; this script exits non-zero only when a benchmark could not run (an error,
not a slow figure). See docs/BENCHMARKS.md for what each one measures and the last figures.

    .venv/bin/python bench/run_all.py                       # all of them (about 25-40 minutes)
    .venv/bin/python bench/run_all.py --quick               # smaller N and fewer repetitions (a few minutes)
    .venv/bin/python bench/run_all.py --only verify         # one (or a comma-separated list)
    .venv/bin/python bench/run_all.py --only fleet_reads -- --sizes 10,100   # extra arguments for it
    .venv/bin/python bench/run_all.py --list
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

# name -> (script, what it measures, arguments added by --quick)
BENCHMARKS: Dict[str, Any] = {
    "fleet_reads": ("bench_fleet_reads.py", "device_plugin_info over 10/100/1000 API-only nodes vs per-node kubectl",
                    ["--quick"]),
    "verify": ("bench_verify.py", "gpu_node_verify.yml vs a common-way playbook on a 50-node full lab", ["--quick"]),
    "convergence": ("bench_convergence.py", "device_plugin_restart: module return - Node update", ["--quick"]),
    "node_checks": ("bench_node_checks.py", "nvml_info + device_plugin_probe per node vs test -S + a pynvml one-liner",
                    ["--quick"]),
    "nvml_info": ("bench_nvml_info.py", "nvml_info's full report for 1/8/64 GPUs vs one process per GPU/field "
                  "(existing benchmark, run as is)", ["--gpus", "1,8", "--trials", "3"]),
}


def check_prerequisites() -> List[str]:
    problems = []
    if not (c.LAB_LIB_DIR / "libnvidia-ml.so.1").exists():
        problems.append("the lab NVML library is missing: make lab-nvml")
    if not (c.BUILD / "ansible_collections" / "gpunode" / "bringup").exists():
        problems.append("the collection is not linked under %s: make collection" % c.BUILD)
    if not Path(c.KUBECTL).exists():
        problems.append("kubectl not found (the kubectl baselines need it)")
    if not Path(c.ANSIBLE_PLAYBOOK).exists():
        problems.append("ansible-playbook not found next to %s: make venv" % c.PYTHON)
    return problems


def parse_nvml_output(text: str) -> List[Dict[str, Any]]:
    """The rows of bench_nvml_info.py's table: times in seconds and the ratios it prints."""
    rows = []
    for line in text.splitlines():
        match = re.match(r"^\s*(\d+)\s{2}", line)
        if not match or ("ms" not in line and " s " not in line):
            continue
        times: List[Optional[float]] = []
        for value, unit, not_run in re.findall(r"(\d+(?:\.\d+)?) (ms|s)(?=\s|$)|(not run)", line):
            times.append(None if not_run else float(value) / (1000.0 if unit == "ms" else 1.0))
        ratios = [float(r) if r else None for r in re.findall(r"(\d+(?:\.\d+)?)x|n/a", line)]
        keys = ["module_in_process_s", "module_fresh_process_s", "baseline_process_per_gpu_s",
                "baseline_process_per_field_s"]
        row: Dict[str, Any] = {"gpus": int(match.group(1))}
        row.update(dict(zip(keys, times)))
        row.update(dict(zip(["per_gpu_over_fresh", "per_gpu_over_in_process", "per_field_over_fresh"], ratios)))
        rows.append(row)
    return rows


def run_one(name: str, quick: bool, extra: List[str]) -> Dict[str, Any]:
    script, _what, quick_args = BENCHMARKS[name]
    cmd = [c.PYTHON, str(c.BENCH / script)] + (quick_args if quick else []) + extra
    print("\n$ %s" % " ".join(cmd), flush=True)
    start = time.perf_counter()
    load_before = c.read_loadavg()
    if name != "nvml_info":
        rc = subprocess.call(cmd, cwd=str(c.ROOT))
        return {"name": name, "rc": rc, "seconds": round(time.perf_counter() - start, 1), "load_before": load_before,
                "load_after": c.read_loadavg()}
    # the colleague's benchmark prints only: keep its output as its JSON result
    with c.LoadSampler() as load:
        proc = subprocess.Popen(cmd, cwd=str(c.ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)
        rc = proc.wait()
    print(load.line())
    output = "".join(lines)
    if rc == 0:
        path = c.write_result("nvml_info", {"machine": c.machine_info(), "load": load.summary(), "quick": quick,
                                            "command": cmd, "rows": parse_nvml_output(output), "output": output})
        print("result: %s" % path)
    return {"name": name, "rc": rc, "seconds": round(time.perf_counter() - start, 1), "load_before": load_before,
            "load_after": c.read_loadavg()}


def headline(name: str, since: float) -> str:
    """One line from the benchmark's latest result, when it was written by this run."""
    path = c.RESULTS / ("%s-latest.json" % name)
    if not path.exists() or path.stat().st_mtime < since:
        return "no result written"
    data = json.loads(path.read_text())
    if name == "fleet_reads":
        s = data["summary"]
        return "requests by N %s; wall at N=100 %s of kubectl (goal <= 0.1x): %s" % (
            s["requests_by_size"], c.fmt_ratio(s["ratio_at_100"]), "met" if s["goal_met"] else "missed")
    if name == "verify":
        s = data["summary"]
        return "wall %s vs %s: %s (goal <= 0.5x): %s" % (
            c.fmt_s(s["verify"]["wall_s"]["median"]), c.fmt_s(s["common"]["wall_s"]["median"]),
            c.fmt_ratio(s["ratio_wall"]), "met" if s["goal_met"] else "missed")
    if name == "convergence":
        s = data["summary"]
        return "overhead median %s, max %s (goal <= 1 s): %s" % (
            c.fmt_s(s["overhead_s"].get("median")), c.fmt_s(s["overhead_s"].get("max")),
            "met" if s["goal_met"] else "missed")
    if name == "node_checks":
        r = data["ratios"]
        return "fresh process %s of the baseline, through ansible per host %s" % (
            c.fmt_ratio(r["fresh_module_vs_fresh_baseline"]), c.fmt_ratio(r["ansible_per_host_vs_baseline"]))
    if name == "nvml_info":
        rows = data.get("rows") or []
        return "; ".join("%d GPUs: in-process %s, fresh %s" % (r["gpus"], c.fmt_s(r.get("module_in_process_s")),
                                                               c.fmt_s(r.get("module_fresh_process_s"))) for r in rows)
    return ""


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all); same as --only")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--skip", default="", help="comma-separated benchmark names to leave out")
    parser.add_argument("--quick", action="store_true", help="smaller N and fewer repetitions (a few minutes)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (script, what, _quick) in BENCHMARKS.items():
            print("%-12s bench/%-22s %s" % (name, script, what))
        return 0
    names = args.names + [x for x in args.only.split(",") if x] or list(BENCHMARKS)
    skip = {x for x in args.skip.split(",") if x}
    unknown = [n for n in names + list(skip) if n not in BENCHMARKS]
    if unknown:
        print("unknown benchmark(s) %s; known: %s" % (", ".join(unknown), ", ".join(BENCHMARKS)), file=sys.stderr)
        return 2
    if extra and len(names) != 1:
        print("arguments after -- go to one benchmark: name exactly one with --only", file=sys.stderr)
        return 2
    problems = check_prerequisites()
    if problems:
        print("cannot run the benchmarks:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    names = [n for n in names if n not in skip]
    machine = c.machine_info()
    c.banner("gpunode.bringup benchmarks%s: %s" % (" (quick)" if args.quick else "", ", ".join(names)))
    print("machine: %(nproc)s cores, %(memory_gib)s GiB, %(cpu_model)s, kernel %(kernel)s; Python %(python)s, "
          "ansible-core %(ansible_core)s, kubernetes client %(kubernetes_client)s, kubectl %(kubectl)s" % machine)
    print("load average at start: %s" % " ".join("%.2f" % x for x in machine["loadavg_at_start"]), flush=True)
    started = time.time()
    runs = []
    with c.LoadSampler() as load:
        for name in names:
            runs.append(run_one(name, args.quick, extra))
    c.banner("summary")
    for run in runs:
        state = "ok" if run["rc"] == 0 else "ERROR (exit %d)" % run["rc"]
        print("%-12s %-6s %7.1f s  %s" % (run["name"], state, run["seconds"],
                                          headline(run["name"], started) if run["rc"] == 0 else ""))
    print(load.line())
    path = c.write_result("run_all", {"machine": machine, "load": load.summary(), "quick": args.quick, "runs": runs,
                                      "headlines": {r["name"]: headline(r["name"], started) for r in runs}})
    print("results: %s (this summary: %s)" % (c.RESULTS, path.name))
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    if os.environ.get("BENCH_COLLECTIONS_PATH"):
        print("note: benchmarking the collection under %s" % os.environ["BENCH_COLLECTIONS_PATH"])
    sys.exit(main())
