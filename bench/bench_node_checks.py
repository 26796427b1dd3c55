"""Node-side checks: nvml_info + device_plugin_probe per node on a full lab fleet, in process
(the collection's module_utils), in a fresh Python process, and through Ansible, against the
node-side commands of the common-way check (``test -S <plugin socket>`` and a pynvml one-liner
that counts the GPUs) measured the same ways in the same run. Prints figures and ratios; no
pass/fail. For nvml_info alone over 1-64 GPUs, see bench/bench_nvml_info.py.

On ``python -m lab up --nodes N`` (plugin deployed with the device_plugin module), for each of
the first --hosts nodes, with the node's environment (LD_LIBRARY_PATH to the lab NVML,
GPUNODE_LAB_NVML_STATE):

- in process: one child Python per node imports the module_utils, calls ``gather_nvml_info``
  and ``probe_node(...).to_result()`` once (cold: NVML loaded and initialised, gRPC channel
  set up) and then --calls times (warm); medians of the warm calls, and the cold first call;
- fresh process: a new ``python -c`` per node that imports both and runs both checks once
  (what a node pays per run without Ansible), against a new process per baseline command
  (``test -S`` and the pynvml one-liner);
- through Ansible: bench/playbooks/node_checks.yml (the two module tasks, and the one node_info
  task with checks nvml and probe that the gpu_node role's form of them is, measured apart)
  against bench/playbooks/node_checks_common.yml (the two command tasks), both
  with ``-f 1``; per-node task times come from bench/callback_plugins/bench_timing.py (worker
  start to result, per host and task), and the playbook wall divided by the hosts is shown too.

Usage: .venv/bin/python bench/bench_node_checks.py [--nodes 4] [--reps 5] [--calls 20] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

NAME = "node_checks"
PLAYBOOK = c.BENCH / "playbooks" / "node_checks.yml"
BASELINE_PLAYBOOK = c.BENCH / "playbooks" / "node_checks_common.yml"

NVML_PARAMS = ("{'node_root': %(root)r, 'driver_root': None, 'expected_gpu_count': 8, 'min_driver_version': None, "
               "'require_persistence_mode': False, 'xid_watch_seconds': 0.0, 'timeout': 60.0}")

IN_PROCESS = """
import json, statistics, time
t0 = time.perf_counter()
from ansible_collections.gpunode.bringup.plugins.module_utils._nvml import gather_nvml_info, DEFAULT_IGNORED_XIDS
from ansible_collections.gpunode.bringup.plugins.module_utils._probe import ProbeRequest, probe_node
imported = time.perf_counter() - t0
params = dict(%(params)s, ignored_xids=list(DEFAULT_IGNORED_XIDS))

def nvml():
    r = gather_nvml_info(params)
    assert r['healthy'] and r['gpu_count'] == 8, r.get('findings')
    return [g['uuid'] for g in r['gpus']]

def probe(ids):
    r = probe_node(ProbeRequest(node_root=%(root)r, expected_device_ids=tuple(ids))).to_result()
    assert r['healthy'], r['findings']
    json.dumps(r)

t = time.perf_counter(); ids = nvml(); nvml_cold = time.perf_counter() - t
t = time.perf_counter(); probe(ids); probe_cold = time.perf_counter() - t
nv, pr = [], []
for _ in range(%(calls)d):
    t = time.perf_counter(); nvml(); nv.append(time.perf_counter() - t)
    t = time.perf_counter(); probe(ids); pr.append(time.perf_counter() - t)
print(json.dumps({'import_s': imported, 'nvml_cold_s': nvml_cold, 'probe_cold_s': probe_cold,
                  'nvml_s': statistics.median(nv), 'probe_s': statistics.median(pr)}))
"""

FRESH = """
from ansible_collections.gpunode.bringup.plugins.module_utils._nvml import gather_nvml_info, DEFAULT_IGNORED_XIDS
from ansible_collections.gpunode.bringup.plugins.module_utils._probe import ProbeRequest, probe_node
r = gather_nvml_info(dict(%(params)s, ignored_xids=list(DEFAULT_IGNORED_XIDS)))
p = probe_node(ProbeRequest(node_root=%(root)r, expected_device_ids=tuple(g['uuid'] for g in r['gpus']))).to_result()
assert r['healthy'] and p['healthy'], (r['findings'], p['findings'])
"""

ONE_LINER = "import pynvml; pynvml.nvmlInit(); print(pynvml.nvmlDeviceGetCount())"


def node_env(lab: c.Lab, node: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update({"LD_LIBRARY_PATH": str(c.LAB_LIB_DIR), "GPUNODE_LAB_NVML_STATE": "%s/nvml.state" % lab.node_root(node),
                "PYTHONPATH": str(c.BUILD)})
    return env


def checked(run: c.Run, what: str) -> c.Run:
    if run.rc != 0:
        raise RuntimeError("%s failed (%d):\n%s" % (what, run.rc, run.tail()))
    return run


def in_process(lab: c.Lab, node: str, calls: int) -> Dict[str, Any]:
    root = lab.node_root(node)
    code = IN_PROCESS % {"params": NVML_PARAMS % {"root": root}, "root": root, "calls": calls}
    run = checked(c.run_cmd([c.PYTHON, "-c", code], env=node_env(lab, node)), "in-process checks on %s" % node)
    return json.loads(run.output.strip().splitlines()[-1])


def fresh(lab: c.Lab, node: str) -> Dict[str, float]:
    root = lab.node_root(node)
    env = node_env(lab, node)
    module = checked(c.run_cmd([c.PYTHON, "-c", FRESH % {"params": NVML_PARAMS % {"root": root}, "root": root}], env=env),
                     "fresh-process checks on %s" % node)
    sock = checked(c.run_cmd(["test", "-S", "%s/var/lib/kubelet/device-plugins/nvidia-gpu.sock" % root], env=env),
                   "test -S on %s" % node)
    one = checked(c.run_cmd([c.PYTHON, "-c", ONE_LINER], env=env), "pynvml one-liner on %s" % node)
    if one.output.strip() != "8":
        raise RuntimeError("pynvml one-liner on %s printed %r" % (node, one.output))
    return {"module_s": module.seconds, "module_cpu_s": module.cpu_s, "baseline_s": sock.seconds + one.seconds,
            "baseline_cpu_s": sock.cpu_s + one.cpu_s, "one_liner_s": one.seconds, "test_s": sock.seconds}


def playbook(lab: c.Lab, work: Path, path: Path, hosts: List[str], tag: str) -> Dict[str, Any]:
    timing = work / ("timing-%s-%d.json" % (tag, time.monotonic_ns()))
    env = c.ansible_env(work, c.timing_callback_env(timing))
    run = checked(c.run_cmd([c.ANSIBLE_PLAYBOOK, "-i", lab.inventory, "-f", "1", "-e", "bench_hosts=%s" % ",".join(hosts),
                             str(path)], env=env, cwd=work), "playbook %s" % path.name)
    doc = json.loads(timing.read_text())
    per_task: Dict[str, List[float]] = {}
    per_host: Dict[str, float] = {}
    node_info: List[float] = []
    for task in doc["tasks"]:
        if task["action"] == "ansible.builtin.debug":
            continue
        for host, results in task["hosts"].items():
            for res in results:
                if res["start"] is None:
                    continue
                per_task.setdefault(task["name"], []).append(res["end"] - res["start"])
                if task["action"] == "gpunode.bringup.node_info":
                    node_info.append(res["end"] - res["start"])  # the one-run form, measured apart
                else:
                    per_host[host] = per_host.get(host, 0.0) + res["end"] - res["start"]
    if tag == "collection" and run.output.count("nvml_healthy=True probe_healthy=True node_info_healthy=True") != len(hosts):
        raise RuntimeError("node checks not healthy:\n%s" % run.tail())
    return {"wall_s": run.seconds, "cpu_s": run.cpu_s, "per_host_task_s": c.median(list(per_host.values())),
            "node_info_task_s": c.median(node_info) if node_info else None,
            "per_task_s": {name: c.median(values) for name, values in per_task.items()}}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--nodes", type=int, default=4, help="lab fleet size; every node is measured")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of each way (default 5, quick 2)")
    parser.add_argument("--calls", type=int, default=20, help="warm calls per in-process child")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)

    machine = c.begin("Node-side checks: nvml_info + device_plugin_probe vs test -S + a pynvml one-liner (full lab)")
    work = c.workdir("bn")
    inproc: List[Dict[str, Any]] = []
    fresh_runs: List[Dict[str, float]] = []
    ours: List[Dict[str, Any]] = []
    base: List[Dict[str, Any]] = []
    try:
        with c.LoadSampler() as load, c.Lab(args.nodes) as lab:
            c.deploy_plugin(lab, work)
            nodes = lab.node_names
            for rep in range(reps):
                for node in nodes:
                    inproc.append(in_process(lab, node, args.calls))
                    fresh_runs.append(fresh(lab, node))
                ours.append(playbook(lab, work, PLAYBOOK, nodes, "collection"))
                base.append(playbook(lab, work, BASELINE_PLAYBOOK, nodes, "common"))
                print("  repetition %d of %d done" % (rep + 1, reps), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(samples: List[Dict[str, Any]], key: str) -> Optional[float]:
        return c.median([s[key] for s in samples])

    hosts = args.nodes
    result = {
        "in_process": {key: c.summarize([s[key] for s in inproc])
                       for key in ("import_s", "nvml_cold_s", "probe_cold_s", "nvml_s", "probe_s")},
        "fresh_process": {key: c.summarize([s[key] for s in fresh_runs])
                          for key in ("module_s", "module_cpu_s", "baseline_s", "baseline_cpu_s", "one_liner_s", "test_s")},
        "ansible": {
            "collection": {"wall_s": c.summarize([r["wall_s"] for r in ours]),
                           "cpu_s": c.summarize([r["cpu_s"] for r in ours]),
                           "per_host_task_s": c.summarize([r["per_host_task_s"] for r in ours]),
                           "node_info_task_s": c.summarize([r["node_info_task_s"] for r in ours]),
                           "per_task_s": {k: c.median([r["per_task_s"][k] for r in ours]) for k in ours[0]["per_task_s"]}},
            "common": {"wall_s": c.summarize([r["wall_s"] for r in base]),
                       "cpu_s": c.summarize([r["cpu_s"] for r in base]),
                       "per_host_task_s": c.summarize([r["per_host_task_s"] for r in base]),
                       "per_task_s": {k: c.median([r["per_task_s"][k] for r in base]) for k in base[0]["per_task_s"]}},
            "hosts": hosts, "forks": 1,
        },
    }
    ip, fr, an = result["in_process"], result["fresh_process"], result["ansible"]
    in_proc_total = (ip["nvml_s"]["median"] or 0) + (ip["probe_s"]["median"] or 0)
    result["ratios"] = {
        "fresh_module_vs_fresh_baseline": c.ratio(fr["module_s"]["median"], fr["baseline_s"]["median"]),
        "in_process_vs_fresh_baseline": c.ratio(in_proc_total, fr["baseline_s"]["median"]),
        "ansible_per_host_vs_baseline": c.ratio(an["collection"]["per_host_task_s"]["median"],
                                                an["common"]["per_host_task_s"]["median"]),
        "ansible_node_info_vs_baseline": c.ratio(an["collection"]["node_info_task_s"]["median"],
                                                 an["common"]["per_host_task_s"]["median"]),
        "ansible_wall_vs_baseline": c.ratio(an["collection"]["wall_s"]["median"], an["common"]["wall_s"]["median"]),
    }
    r = result["ratios"]
    print()
    print(c.table([
        ["in process, warm: nvml_info", c.fmt_s(ip["nvml_s"]["median"]), "", ""],
        ["in process, warm: device_plugin_probe", c.fmt_s(ip["probe_s"]["median"]), "", ""],
        ["in process, warm: both", c.fmt_s(in_proc_total), "-", c.fmt_ratio(r["in_process_vs_fresh_baseline"])],
        ["in process, first call: nvml_info / probe", "%s / %s" % (c.fmt_s(ip["nvml_cold_s"]["median"]),
                                                                   c.fmt_s(ip["probe_cold_s"]["median"])), "", ""],
        ["in process: import of both module_utils", c.fmt_s(ip["import_s"]["median"]), "", ""],
        ["fresh process: import + both checks", c.fmt_s(fr["module_s"]["median"]), c.fmt_s(fr["module_cpu_s"]["median"]),
         c.fmt_ratio(r["fresh_module_vs_fresh_baseline"])],
        ["baseline, fresh processes: test -S + one-liner", c.fmt_s(fr["baseline_s"]["median"]),
         c.fmt_s(fr["baseline_cpu_s"]["median"]), "1.000x"],
        ["ansible -f 1: both module tasks, per host", c.fmt_s(an["collection"]["per_host_task_s"]["median"]), "",
         c.fmt_ratio(r["ansible_per_host_vs_baseline"])],
        ["ansible -f 1: node_info (nvml + probe), one task, per host",
         c.fmt_s(an["collection"]["node_info_task_s"]["median"]), "", c.fmt_ratio(r["ansible_node_info_vs_baseline"])],
        ["ansible -f 1: both command tasks, per host (baseline)", c.fmt_s(an["common"]["per_host_task_s"]["median"]), "",
         "1.000x"],
        ["ansible -f 1: playbook wall / %d hosts (the two tasks + node_info)" % hosts, c.fmt_s((an["collection"]["wall_s"]["median"] or 0) / hosts),
         c.fmt_s((an["collection"]["cpu_s"]["median"] or 0) / hosts), c.fmt_ratio(r["ansible_wall_vs_baseline"])],
        ["ansible -f 1: baseline playbook wall / %d hosts" % hosts, c.fmt_s((an["common"]["wall_s"]["median"] or 0) / hosts),
         c.fmt_s((an["common"]["cpu_s"]["median"] or 0) / hosts), "1.000x"],
    ], ["per node (medians of %d repetitions x %d nodes)" % (reps, hosts), "wall", "CPU", "vs baseline"]))
    print("per task through ansible (median per host): %s" % ", ".join(
        "%s %s" % (k, c.fmt_s(v)) for k, v in list(an["collection"]["per_task_s"].items()) + list(an["common"]["per_task_s"].items())))
    print(load.line())
    path = c.write_result(NAME, {"machine": machine, "load": load.summary(), "quick": args.quick,
                                 "settings": {"reps": reps, "nodes": args.nodes, "calls": args.calls}, **result})
    print("result: %s" % path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
