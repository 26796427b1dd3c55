"""Time to gather nvml_info's full report for N GPUs on the lab NVML library (N = 1, 8, 64),
against baselines measured in the same run. Prints figures and ratios; no pass/fail.

Measured, each as the median of several trials:

- module body, in process: ``gather_nvml_info`` called repeatedly in one warm process
  (what the module itself costs once Python is up and NVML is loaded).
- module body, fresh process: one new Python process that imports the collection and gathers
  the full report (what a node pays per run, minus Ansible's own transfer and start-up).
- baseline, one process per GPU: a ``python -c`` one-liner per GPU reading the same fields
  (how such checks are often scripted: ``for i in ...; do python -c ...; done``).
- baseline, one process per field: a fresh process per (GPU, field) pair; run for the small N
  only (it grows as N x fields processes).
- for context, once: ``ansible localhost -m gpunode.bringup.nvml_info`` end to end for 8 GPUs.

Ratios are baseline time / module time (above 1: the module is faster).

Usage: .venv/bin/python bench/bench_nvml_info.py [--gpus 1,8,64] [--trials 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / ".build"
LAB_LIB_DIR = BUILD / "lab" / "lib"
for _path in (BUILD, ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from lab import nvml_state  # noqa: E402

PYTHON = sys.executable

# The fields the report holds, as (label, pynvml expression on handle h).
FIELDS = [
    ("uuid", "n.nvmlDeviceGetUUID(h)"),
    ("name", "n.nvmlDeviceGetName(h)"),
    ("pci_bus_id", "n.nvmlDeviceGetPciInfo(h).busId"),
    ("serial", "n.nvmlDeviceGetSerial(h)"),
    ("memory", "n.nvmlDeviceGetMemoryInfo(h).total"),
    ("persistence_mode", "n.nvmlDeviceGetPersistenceMode(h)"),
    ("mig_mode", "n.nvmlDeviceGetMigMode(h)"),
    ("ecc_mode", "n.nvmlDeviceGetEccMode(h)"),
    ("ecc_volatile_corrected", "n.nvmlDeviceGetTotalEccErrors(h, 0, 0)"),
    ("ecc_volatile_uncorrected", "n.nvmlDeviceGetTotalEccErrors(h, 1, 0)"),
    ("ecc_aggregate_corrected", "n.nvmlDeviceGetTotalEccErrors(h, 0, 1)"),
    ("ecc_aggregate_uncorrected", "n.nvmlDeviceGetTotalEccErrors(h, 1, 1)"),
    ("retired_single_bit", "len(n.nvmlDeviceGetRetiredPages(h, 0))"),
    ("retired_double_bit", "len(n.nvmlDeviceGetRetiredPages(h, 1))"),
    ("retired_pending", "n.nvmlDeviceGetRetiredPagesPendingStatus(h)"),
    ("remapped_rows", "n.nvmlDeviceGetRemappedRows(h)"),
    ("temperature", "n.nvmlDeviceGetTemperature(h, 0)"),
    ("power", "n.nvmlDeviceGetPowerUsage(h)"),
]

# One GPU, every field, errors tolerated: what a careful one-liner per GPU does.
PER_GPU_SNIPPET = (
    "import pynvml as n\n"
    "n.nvmlInit()\n"
    "h = n.nvmlDeviceGetHandleByIndex({index})\n"
    "out = {{}}\n"
    + "".join("try:\n    out[%r] = %s\nexcept n.NVMLError:\n    out[%r] = None\n" % (label, expr, label)
              for label, expr in FIELDS)
    + "n.nvmlShutdown()\nprint(out)\n"
)

PER_FIELD_SNIPPET = (
    "import pynvml as n\n"
    "n.nvmlInit()\n"
    "h = n.nvmlDeviceGetHandleByIndex({index})\n"
    "try:\n    print({expr})\nexcept n.NVMLError:\n    print(None)\n"
    "n.nvmlShutdown()\n"
)

GATHER_ONCE = (
    "from ansible_collections.gpunode.bringup.plugins.module_utils._nvml import gather_nvml_info\n"
    "r = gather_nvml_info({{'node_root': {root!r}, 'expected_gpu_count': {gpus}}})\n"
    "assert r['gpu_count'] == {gpus} and r['healthy'], r['findings']\n"
)

GATHER_REPEATED = (
    "import json, statistics, time\n"
    "from ansible_collections.gpunode.bringup.plugins.module_utils._nvml import gather_nvml_info\n"
    "params = {{'node_root': {root!r}, 'expected_gpu_count': {gpus}}}\n"
    "gather_nvml_info(params)\n"
    "times = []\n"
    "for _ in range({trials}):\n"
    "    start = time.perf_counter()\n"
    "    r = gather_nvml_info(params)\n"
    "    times.append(time.perf_counter() - start)\n"
    "assert r['gpu_count'] == {gpus} and r['healthy'], r['findings']\n"
    "print(json.dumps(statistics.median(times)))\n"
)


def child_env(state: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["GPUNODE_LAB_NVML_STATE"] = str(state)
    env["LD_LIBRARY_PATH"] = str(LAB_LIB_DIR)
    env["PYTHONPATH"] = str(BUILD)
    return env


def run_python(code: str, env: Dict[str, str]) -> str:
    proc = subprocess.run([PYTHON, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError("child failed:\n%s" % proc.stderr[-2000:])
    return proc.stdout


def timed(fn, trials: int) -> float:
    times: List[float] = []
    for unused_trial in range(trials):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(gpus: int, trials: int, workdir: Path, per_field_max: int) -> Dict[str, Optional[float]]:
    node_root = workdir / ("node-%d" % gpus)
    (node_root / "proc/driver/nvidia").mkdir(parents=True)
    (node_root / "proc/driver/nvidia/version").write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n")
    state = node_root / "nvml.state"
    nvml_state.write_state(str(state), nvml_state.default_node_state("bench-%d" % gpus, gpus, "A100"))
    env = child_env(state)
    results: Dict[str, Optional[float]] = {}
    results["module_in_process"] = float(run_python(
        GATHER_REPEATED.format(root=str(node_root), gpus=gpus, trials=max(trials * 4, 20)), env))
    results["module_fresh_process"] = timed(
        lambda: run_python(GATHER_ONCE.format(root=str(node_root), gpus=gpus), env), trials)
    results["baseline_process_per_gpu"] = timed(
        lambda: [run_python(PER_GPU_SNIPPET.format(index=i), env) for i in range(gpus)], max(1, trials // 2))
    if gpus <= per_field_max:
        results["baseline_process_per_field"] = timed(
            lambda: [run_python(PER_FIELD_SNIPPET.format(index=i, expr=expr), env)
                     for i in range(gpus) for unused_label, expr in FIELDS], 1)
    else:
        results["baseline_process_per_field"] = None
    return results


def ansible_end_to_end(workdir: Path, gpus: int = 8) -> float:
    node_root = workdir / "ansible-node"
    (node_root / "proc/driver/nvidia").mkdir(parents=True)
    state = node_root / "nvml.state"
    nvml_state.write_state(str(state), nvml_state.default_node_state("bench-ansible", gpus, "A100"))
    env = child_env(state)
    env.update({"ANSIBLE_HOME": str(workdir / "ansible-home"), "ANSIBLE_COLLECTIONS_PATH": str(BUILD),
                "ANSIBLE_REMOTE_TMP": str(workdir / "tmp"), "ANSIBLE_LOCAL_TEMP": str(workdir / "tmp"),
                "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_PIPELINING": "1"})
    env.pop("PYTHONPATH", None)
    ansible = str(Path(PYTHON).parent / "ansible")
    cmd = [ansible, "localhost", "-m", "gpunode.bringup.nvml_info", "-a",
           json.dumps({"node_root": str(node_root), "expected_gpu_count": gpus}),
           "-e", "ansible_python_interpreter=%s" % PYTHON]

    def once() -> None:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120,
                              check=False)
        if proc.returncode != 0 or '"healthy": true' not in proc.stdout.replace('\n', ' '):
            raise RuntimeError("ansible run failed:\n%s\n%s" % (proc.stdout[-2000:], proc.stderr[-2000:]))
    return timed(once, 3)


def fmt(seconds: Optional[float]) -> str:
    if seconds is None:
        return "   not run"
    return "%8.1f ms" % (seconds * 1000) if seconds < 10 else "%8.2f s " % seconds


def ratio(baseline: Optional[float], ours: Optional[float]) -> str:
    return "  n/a" if baseline is None or not ours else "%6.1fx" % (baseline / ours)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--gpus", default="1,8,64", help="comma-separated GPU counts (at most 64)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--per-field-max", type=int, default=8,
                        help="largest N for the one-process-per-field baseline")
    parser.add_argument("--no-ansible", action="store_true", help="skip the ansible end-to-end figure")
    args = parser.parse_args()
    if not (LAB_LIB_DIR / "libnvidia-ml.so.1").exists():
        print("build the lab NVML library first: make lab-nvml collection", file=sys.stderr)
        return 2
    counts = [int(part) for part in args.gpus.split(",") if part.strip()]
    print("nvml_info: full report (identity, memory, modes, ECC, retired pages, remapped rows, sensors)")
    print("lab NVML library %s, Python %s, %d CPU(s); median of %d trials"
          % (LAB_LIB_DIR / "libnvidia-ml.so.1", sys.version.split()[0], os.cpu_count() or 0, args.trials))
    header = "%5s  %11s  %11s  %11s  %11s  %9s  %9s  %9s" % (
        "GPUs", "in-process", "fresh proc", "per-GPU", "per-field", "per-GPU/", "per-GPU/", "per-field/")
    print(header)
    print("%5s  %11s  %11s  %11s  %11s  %9s  %9s  %9s" % (
        "", "(module)", "(module)", "baseline", "baseline", "fresh", "in-proc", "fresh"))
    with tempfile.TemporaryDirectory(prefix="bench-nvml-") as tmp:
        workdir = Path(tmp)
        for gpus in counts:
            r = measure(gpus, args.trials, workdir, args.per_field_max)
            print("%5d  %11s  %11s  %11s  %11s  %9s  %9s  %9s" % (
                gpus, fmt(r["module_in_process"]), fmt(r["module_fresh_process"]),
                fmt(r["baseline_process_per_gpu"]), fmt(r["baseline_process_per_field"]),
                ratio(r["baseline_process_per_gpu"], r["module_fresh_process"]),
                ratio(r["baseline_process_per_gpu"], r["module_in_process"]),
                ratio(r["baseline_process_per_field"], r["module_fresh_process"])), flush=True)
        if not args.no_ansible:
            print("context: 'ansible localhost -m gpunode.bringup.nvml_info' for 8 GPUs, end to end: %s"
                  % fmt(ansible_end_to_end(workdir)).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
