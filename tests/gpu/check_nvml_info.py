"""Check gpunode.bringup.nvml_info against nvidia-smi on a machine with real NVIDIA GPUs.

Runs ``ansible localhost -m gpunode.bringup.nvml_info`` and ``nvidia-smi --query-gpu=...
--format=csv,noheader,nounits`` and compares, GPU by GPU (matched by UUID), every value both
report: UUID, name, PCI bus id, serial, total and reserved memory, driver version, persistence
mode, ECC mode (current and pending), MIG mode (current and pending), ECC error counters, retired
pages, remapped rows; also the GPU count, the CUDA version from nvidia-smi's banner and the kernel module version
from /proc/driver/nvidia/version. Temperature, power draw and used memory move between the two
reads, so they are compared within a tolerance; reserved memory within 1 MiB (the module rounds
down to whole MiB, nvidia-smi up). Every comparison is printed; the exit status is 1
when any differs, 2 when a tool could not run.

An nvidia-smi field this driver does not know is reported as skipped, not as a mismatch.

Run from a checkout of the collection, on the GPU machine (no cluster needed):

    make venv collection
    .venv/bin/python tests/gpu/check_nvml_info.py            # add --become when not root

Options: --python (the interpreter the module runs with; needs nvidia-ml-py), --driver-root
(a containerised driver, passed to the module), --nvidia-smi (path), --module-json FILE (use a
saved module result instead of running Ansible).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / ".build"

# nvidia-smi field -> (path into the module's GPU entry, how to read nvidia-smi's text)
Reader = Callable[[str], Any]


def _na(text: str) -> bool:
    return text.strip() in ("", "[N/A]", "N/A", "[Not Supported]", "Not Supported", "[Unknown Error]")


def as_text(text: str) -> Optional[str]:
    return None if _na(text) else text.strip()


def as_int(text: str) -> Optional[int]:
    return None if _na(text) else int(float(text.strip()))


def as_float(text: str) -> Optional[float]:
    return None if _na(text) else float(text.strip())


def as_enabled(text: str) -> Optional[bool]:
    value = text.strip().lower()
    if _na(text):
        return None
    if value in ("enabled", "yes", "1", "true"):
        return True
    if value in ("disabled", "no", "0", "false"):
        return False
    raise ValueError("not an on/off value: %r" % text)


def as_bus_id(text: str) -> Optional[str]:
    return None if _na(text) else text.strip()


# Compared exactly (must match).
EXACT_FIELDS: List[Tuple[str, Tuple[str, ...], Reader]] = [
    ("name", ("name",), as_text),
    ("pci.bus_id", ("pci_bus_id",), as_bus_id),
    ("serial", ("serial",), as_text),
    ("memory.total", ("memory", "total_mib"), as_int),
    ("persistence_mode", ("persistence_mode",), as_enabled),
    ("ecc.mode.current", ("ecc_mode", "current"), as_enabled),
    ("ecc.mode.pending", ("ecc_mode", "pending"), as_enabled),
    ("mig.mode.current", ("mig_mode", "current"), as_enabled),
    ("mig.mode.pending", ("mig_mode", "pending"), as_enabled),
    ("ecc.errors.corrected.volatile.total", ("ecc_errors", "volatile", "corrected"), as_int),
    ("ecc.errors.uncorrected.volatile.total", ("ecc_errors", "volatile", "uncorrected"), as_int),
    ("ecc.errors.corrected.aggregate.total", ("ecc_errors", "aggregate", "corrected"), as_int),
    ("ecc.errors.uncorrected.aggregate.total", ("ecc_errors", "aggregate", "uncorrected"), as_int),
    ("retired_pages.single_bit_ecc.count", ("retired_pages", "single_bit"), as_int),
    ("retired_pages.double_bit.count", ("retired_pages", "double_bit"), as_int),
    ("retired_pages.pending", ("retired_pages", "pending"), as_enabled),
]
# Compared within a tolerance (they move between the two reads): (field, path, reader, tolerance).
LOOSE_FIELDS: List[Tuple[str, Tuple[str, ...], Reader, Callable[[float], float]]] = [
    ("temperature.gpu", ("temperature_c",), as_int, lambda value: 5.0),
    ("power.draw", ("power_draw_watts",), as_float, lambda value: max(25.0, 0.25 * value)),
    ("memory.used", ("memory", "used_mib"), as_int, lambda value: max(512.0, 0.1 * value)),
    # fixed, but rounded differently: the module rounds bytes down to whole MiB, nvidia-smi up
    # (H200, driver 580.159.04: 644939776 bytes = 615.06 MiB, module 615, nvidia-smi 616)
    ("memory.reserved", ("memory", "reserved_mib"), as_int, lambda value: 1.0),
]
REMAPPED_ROWS = [
    ("remapped_rows.correctable", ("remapped_rows", "correctable"), as_int),
    ("remapped_rows.uncorrectable", ("remapped_rows", "uncorrectable"), as_int),
    ("remapped_rows.pending", ("remapped_rows", "pending"), as_enabled),
    ("remapped_rows.failure", ("remapped_rows", "failure"), as_enabled),
]


class Checker:
    """Prints each comparison and counts mismatches."""

    def __init__(self) -> None:
        self.mismatches = 0
        self.compared = 0
        self.skipped = 0

    def same(self, what: str, module_value: Any, smi_value: Any) -> None:
        self.compared += 1
        ok = module_value == smi_value
        self.mismatches += 0 if ok else 1
        print("%-9s %-52s module=%-28s nvidia-smi=%s" % ("ok" if ok else "MISMATCH", what, json.dumps(module_value),
                                                         json.dumps(smi_value)))

    def near(self, what: str, module_value: Optional[float], smi_value: Optional[float], tolerance: float) -> None:
        self.compared += 1
        if module_value is None or smi_value is None:
            ok = module_value is None and smi_value is None
        else:
            ok = abs(module_value - smi_value) <= tolerance
        self.mismatches += 0 if ok else 1
        print("%-9s %-52s module=%-28s nvidia-smi=%s (within %g)" % (
            "ok" if ok else "MISMATCH", what, json.dumps(module_value), json.dumps(smi_value), tolerance))

    def skip(self, what: str, why: str) -> None:
        self.skipped += 1
        print("%-9s %-52s %s" % ("skipped", what, why))


def dig(entry: Dict[str, Any], path: Tuple[str, ...]) -> Any:
    for key in path:
        entry = entry.get(key) if isinstance(entry, dict) else None
    return entry


def run_module(args: argparse.Namespace) -> Dict[str, Any]:
    """The module's result, through `ansible localhost -m` (or a saved JSON file)."""
    if args.module_json:
        return json.loads(Path(args.module_json).read_text())
    module_args: Dict[str, Any] = {}
    if args.driver_root:
        module_args["driver_root"] = args.driver_root
    env = dict(os.environ)
    env.setdefault("ANSIBLE_COLLECTIONS_PATH", str(BUILD))
    env.setdefault("ANSIBLE_HOME", str(BUILD / "ansible-home"))
    env.setdefault("ANSIBLE_LOCALHOST_WARNING", "0")
    env.setdefault("ANSIBLE_NOCOLOR", "1")
    ansible = str(Path(sys.executable).parent / "ansible")
    if not Path(ansible).exists():
        ansible = "ansible"
    cmd = [ansible, "localhost", "-m", "gpunode.bringup.nvml_info", "-e", "ansible_python_interpreter=%s" % args.python]
    if module_args:
        cmd += ["-a", json.dumps(module_args)]
    if args.become:
        cmd.append("--become")
    print("+ " + " ".join(cmd))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300,
                          check=False)
    marker = proc.stdout.find("=>")
    if marker < 0:
        raise RuntimeError("ansible printed no result (exit %d):\n%s\n%s"
                           % (proc.returncode, proc.stdout, proc.stderr))
    result = json.loads(proc.stdout[marker + 2:])
    if "| SUCCESS" not in proc.stdout[:marker] or "healthy" not in result:
        raise RuntimeError("nvml_info failed: %s" % result.get("msg", result))
    return result


def nvidia_smi_query(smi: str, fields: List[str], option: str = "--query-gpu") -> Optional[List[List[str]]]:
    """Rows of nvidia-smi CSV for ``fields``; None when nvidia-smi does not know one of them."""
    proc = subprocess.run([smi, "%s=%s" % (option, ",".join(fields)), "--format=csv,noheader,nounits"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        if "not a valid field" in (proc.stdout + proc.stderr).lower():
            return None
        raise RuntimeError("nvidia-smi %s failed (exit %d): %s"
                           % (option, proc.returncode, (proc.stdout + proc.stderr).strip()))
    return [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(proc.stdout)) if row]


def by_uuid(rows: List[List[str]]) -> Dict[str, List[str]]:
    return {row[0]: row[1:] for row in rows}


def in_gpu_order(rows: List[List[str]], gpus: Dict[str, Dict[str, Any]]) -> List[Tuple[str, List[str]]]:
    """(uuid, values) of the rows for GPUs the module reported, by the module's GPU index."""
    return sorted(((uuid, values) for uuid, values in by_uuid(rows).items() if uuid in gpus),
                  key=lambda item: gpus[item[0]]["index"])


def cuda_version_from_banner(smi: str) -> Optional[str]:
    proc = subprocess.run([smi], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    match = re.search(r"CUDA Version:\s*(\d+\.\d+)", proc.stdout)
    return match.group(1) if match else None


def kernel_module_version() -> Optional[str]:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"^NVRM version:.*?\s(\d+\.\d+(?:\.\d+)?)(?:\s|$)", text, re.M)
    return match.group(1) if match else None


def compare_node(check: Checker, module: Dict[str, Any], smi: str) -> Optional[Dict[str, List[str]]]:
    core = nvidia_smi_query(smi, ["uuid", "index", "driver_version"])
    if core is None:
        raise RuntimeError("nvidia-smi does not know uuid/index/driver_version")
    rows = by_uuid(core)
    check.same("gpu_count", module["gpu_count"], len(rows))
    drivers = sorted({row[1] for row in rows.values()})
    check.same("driver_version", module["driver_version"], drivers[0] if len(drivers) == 1 else drivers)
    cuda = cuda_version_from_banner(smi)
    if cuda is None:
        check.skip("cuda_driver_version", "nvidia-smi's banner shows no CUDA Version")
    else:
        check.same("cuda_driver_version", module["cuda_driver_version"], cuda)
    check.same("kernel_module_version", module["kernel_module_version"], kernel_module_version())
    module_uuids = sorted(g["uuid"] for g in module["gpus"] if g.get("uuid"))
    check.same("GPU UUIDs", module_uuids, sorted(rows))
    for gpu in module["gpus"]:
        if gpu.get("uuid") in rows:
            check.same("GPU %s index" % gpu["uuid"], gpu["index"], int(rows[gpu["uuid"]][0]))
    return rows


def compare_fields(check: Checker, module: Dict[str, Any], smi: str) -> None:
    gpus = {g["uuid"]: g for g in module["gpus"] if g.get("uuid")}
    for field, path, reader in EXACT_FIELDS:
        rows = nvidia_smi_query(smi, ["uuid", field])
        if rows is None:
            check.skip(field, "this nvidia-smi does not know the field")
            continue
        for uuid, (text,) in in_gpu_order(rows, gpus):
            if uuid in gpus:
                check.same("GPU %d %s" % (gpus[uuid]["index"], field), dig(gpus[uuid], path), reader(text))
    for field, path, reader, tolerance in LOOSE_FIELDS:
        rows = nvidia_smi_query(smi, ["uuid", field])
        if rows is None:
            check.skip(field, "this nvidia-smi does not know the field")
            continue
        for uuid, (text,) in in_gpu_order(rows, gpus):
            if uuid in gpus:
                smi_value = reader(text)
                check.near("GPU %d %s" % (gpus[uuid]["index"], field), dig(gpus[uuid], path), smi_value,
                           tolerance(smi_value or 0.0))
    rows = nvidia_smi_query(smi, ["gpu_uuid"] + [field for field, _path, _reader in REMAPPED_ROWS],
                            option="--query-remapped-rows")
    if rows is None:
        check.skip("remapped_rows.*", "this nvidia-smi has no --query-remapped-rows")
        return
    for uuid, values in in_gpu_order(rows, gpus):
        for (field, path, reader), text in zip(REMAPPED_ROWS, values):
            check.same("GPU %d %s" % (gpus[uuid]["index"], field), dig(gpus[uuid], path), reader(text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter the module runs with (needs nvidia-ml-py); default: this one")
    parser.add_argument("--driver-root", help="driver_root option for the module (e.g. /run/nvidia/driver)")
    parser.add_argument("--nvidia-smi", default="nvidia-smi", help="nvidia-smi to compare with")
    parser.add_argument("--become", action="store_true", help="run the module with --become")
    parser.add_argument("--module-json", help="compare a saved module result instead of running Ansible")
    args = parser.parse_args()
    check = Checker()
    try:
        module = run_module(args)
        print("nvml_info: healthy=%s, %d finding(s)" % (module["healthy"], len(module["findings"])))
        for finding in module["findings"]:
            print("  finding %s (%s, gpu %s): %s" % (finding["code"], finding["severity"], finding["gpu"],
                                                     finding["message"]))
        compare_node(check, module, args.nvidia_smi)
        compare_fields(check, module, args.nvidia_smi)
    except (OSError, RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        print("ERROR: %s" % exc, file=sys.stderr)
        return 2
    print("%d compared, %d mismatch(es), %d skipped" % (check.compared, check.mismatches, check.skipped))
    return 1 if check.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
