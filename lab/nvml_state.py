"""State files of the lab NVML library (lab/nvml/fake_nvml.c), and the faults the lab injects.

Each simulated node has one state file; the C library behind ``libnvidia-ml.so.1`` re-reads it
whenever it changes, so a fault written here is seen by the next NVML call of a running
process. This module is the only writer. The format is described in lab/nvml/README.md.

A state is a plain dict (JSON-shaped)::

    {
        "format": 1,
        "node": "gpu-node-01",
        "driver_version": "550.54.15",
        "cuda_driver_version": 12040,
        "nvml_version": "12.550.54.15",
        "init_error": 0,              # NVML return code of nvmlInit (0 = works)
        "gpus": [{...}, ...],         # index = position; keys: GPU_FIELDS
        "xid_events": [{"seq": 1, "gpu": 0, "xid": 79}, ...],
        "xid_next_seq": 2,            # never decreases, so cleared events are not re-delivered
        "removed_gpus": [{...}],      # GPUs hidden by the gpu_count_low fault
    }

Fault helpers are pure: each takes a state and returns a new one. ``apply_fault`` /
``clear_fault`` do read -> change -> atomic write under a lock file (``<path>.lock``).
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

State = Dict[str, Any]
Gpu = Dict[str, Any]

STATE_FORMAT = 1
ENV_STATE_PATH = "GPUNODE_LAB_NVML_STATE"

NVML_SUCCESS = 0
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18

NVML_DEVICE_ARCH_VOLTA = 5
NVML_DEVICE_ARCH_TURING = 6
NVML_DEVICE_ARCH_AMPERE = 7
NVML_DEVICE_ARCH_HOPPER = 9

XID_GPU_FALLEN_OFF_BUS = 79

DEFAULT_DRIVER_VERSION = "550.54.15"
DEFAULT_CUDA_DRIVER_VERSION = 12040

MIB = 1024 * 1024

# Features the C library answers NVML_ERROR_NOT_SUPPORTED for when listed in a GPU's
# "unsupported" (lab/nvml/fake_nvml.c, lab_features).
FEATURES = (
    "ecc", "retired_pages", "remapped_rows", "mig", "persistence_mode", "temperature",
    "power_usage", "serial", "events", "minor_number", "memory", "cuda_compute_capability",
)


@dataclass(frozen=True)
class GpuModel:
    """A GPU kind as NVML reports it (values of a real board, idle)."""

    key: str
    name: str
    arch: int
    cuda_cc: Tuple[int, int]
    memory_total_mib: int
    memory_reserved_mib: int
    pci_device_id: int  # (device id << 16) | vendor id, as nvmlPciInfo_t.pciDeviceId
    pci_subsystem_id: int
    idle_power_mw: int
    idle_temperature: int
    mig: bool

    @property
    def uses_row_remapping(self) -> bool:
        """Ampere and later remap rows; earlier GPUs retire pages instead."""
        return self.arch >= NVML_DEVICE_ARCH_AMPERE

    @property
    def unsupported(self) -> List[str]:
        features = ["retired_pages"] if self.uses_row_remapping else ["remapped_rows"]
        if not self.mig:
            features.append("mig")
        return features


GPU_MODELS: Dict[str, GpuModel] = {
    model.key: model
    for model in (
        GpuModel("A100", "NVIDIA A100-SXM4-80GB", NVML_DEVICE_ARCH_AMPERE, (8, 0), 81920, 591,
                 0x20B210DE, 0x147F10DE, 62000, 31, True),
        GpuModel("H100", "NVIDIA H100 80GB HBM3", NVML_DEVICE_ARCH_HOPPER, (9, 0), 81559, 523,
                 0x233010DE, 0x16C110DE, 71000, 33, True),
        GpuModel("V100", "Tesla V100-SXM2-32GB", NVML_DEVICE_ARCH_VOLTA, (7, 0), 32768, 258,
                 0x1DB510DE, 0x124910DE, 43000, 35, False),
        GpuModel("T4", "Tesla T4", NVML_DEVICE_ARCH_TURING, (7, 5), 15360, 255,
                 0x1EB810DE, 0x12A210DE, 9000, 38, False),
    )
}

# PCI buses of a DGX A100's GPUs; further GPUs take free bus numbers in order.
_DGX_BUSES = (0x07, 0x0F, 0x47, 0x4E, 0x87, 0x90, 0xB7, 0xBD)
MAX_GPUS = 64  # LAB_MAX_GPUS in the C library

# Keys of a GPU dict, in file order, with their types (int values: decimal, or hex for PCI ids).
GPU_FIELDS: Dict[str, type] = {
    "model": str,
    "uuid": str,
    "name": str,
    "serial": str,
    "pci_bus_id": str,
    "arch": int,
    "pci_device_id": int,
    "pci_subsystem_id": int,
    "minor_number": int,
    "memory_total": int,
    "memory_reserved": int,
    "memory_used": int,  # nvmlMemory_t.used: reserved + allocated
    "memory_free": int,
    "persistence_mode": int,
    "mig_current": int,
    "mig_pending": int,
    "ecc_current": int,
    "ecc_pending": int,
    "ecc_volatile_corrected": int,
    "ecc_volatile_uncorrected": int,
    "ecc_aggregate_corrected": int,
    "ecc_aggregate_uncorrected": int,
    "retired_pages_sbe": int,
    "retired_pages_dbe": int,
    "retired_pages_pending": int,
    "remapped_rows_correctable": int,
    "remapped_rows_uncorrectable": int,
    "remapped_rows_pending": int,
    "remapped_rows_failure": int,
    "temperature": int,
    "power_usage_mw": int,
    "cuda_cc_major": int,
    "cuda_cc_minor": int,
    "lost": int,
    "unsupported": list,
}
_HEX_FIELDS = ("pci_device_id", "pci_subsystem_id")
_U64_FIELDS = tuple(key for key in GPU_FIELDS if key.startswith(("memory_", "ecc_volatile_", "ecc_aggregate_")))
_NODE_INT_KEYS = ("format", "cuda_driver_version", "init_error", "xid_next_seq")
_NODE_STR_KEYS = ("node", "driver_version", "nvml_version")


# ---- building states -------------------------------------------------------------------

def _digest(*parts: object) -> str:
    return hashlib.sha256("/".join(str(part) for part in parts).encode()).hexdigest()


def gpu_uuid(node_name: str, index: int) -> str:
    """Deterministic ``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`` for a node's GPU index."""
    h = _digest("uuid", node_name, index)
    return "GPU-%s-%s-%s-%s-%s" % (h[0:8], h[8:12], h[12:16], h[16:20], h[20:32])


def _pci_bus(index: int) -> int:
    if index < len(_DGX_BUSES):
        return _DGX_BUSES[index]
    spare = [bus for bus in range(0x10, 0x100) if bus not in _DGX_BUSES]
    return spare[index - len(_DGX_BUSES)]


def make_gpu(node_name: str, index: int, model: str = "A100") -> Gpu:
    """One healthy, idle GPU of ``model`` (a key of GPU_MODELS) at ``index`` on ``node_name``."""
    try:
        kind = GPU_MODELS[model]
    except KeyError:
        raise ValueError("unknown GPU model %r (known: %s)" % (model, ", ".join(GPU_MODELS))) from None
    total = kind.memory_total_mib * MIB
    reserved = kind.memory_reserved_mib * MIB
    return {
        "model": kind.key,
        "uuid": gpu_uuid(node_name, index),
        "name": kind.name,
        "serial": "1%012d" % (int(_digest("serial", node_name, index), 16) % 10**12),
        "pci_bus_id": "00000000:%02X:00.0" % _pci_bus(index),
        "arch": kind.arch,
        "pci_device_id": kind.pci_device_id,
        "pci_subsystem_id": kind.pci_subsystem_id,
        "minor_number": index,
        "memory_total": total,
        "memory_reserved": reserved,
        "memory_used": reserved,
        "memory_free": total - reserved,
        "persistence_mode": 1,
        "mig_current": 0,
        "mig_pending": 0,
        "ecc_current": 1,
        "ecc_pending": 1,
        "ecc_volatile_corrected": 0,
        "ecc_volatile_uncorrected": 0,
        "ecc_aggregate_corrected": 0,
        "ecc_aggregate_uncorrected": 0,
        "retired_pages_sbe": 0,
        "retired_pages_dbe": 0,
        "retired_pages_pending": 0,
        "remapped_rows_correctable": 0,
        "remapped_rows_uncorrectable": 0,
        "remapped_rows_pending": 0,
        "remapped_rows_failure": 0,
        "temperature": kind.idle_temperature,
        "power_usage_mw": kind.idle_power_mw,
        "cuda_cc_major": kind.cuda_cc[0],
        "cuda_cc_minor": kind.cuda_cc[1],
        "lost": 0,
        "unsupported": list(kind.unsupported),
    }


def default_node_state(
    node_name: str,
    gpu_count: int = 8,
    model: str = "A100",
    driver_version: str = DEFAULT_DRIVER_VERSION,
    cuda_driver_version: int = DEFAULT_CUDA_DRIVER_VERSION,
) -> State:
    """A healthy node: ``gpu_count`` idle GPUs of ``model``, UUIDs derived from the node name."""
    if not 0 <= gpu_count <= MAX_GPUS:
        raise ValueError("gpu_count must be between 0 and %d, got %d" % (MAX_GPUS, gpu_count))
    return {
        "format": STATE_FORMAT,
        "node": node_name,
        "driver_version": driver_version,
        "cuda_driver_version": cuda_driver_version,
        "nvml_version": "%d.%s" % (cuda_driver_version // 1000, driver_version),
        "init_error": NVML_SUCCESS,
        "gpus": [make_gpu(node_name, index, model) for index in range(gpu_count)],
        "xid_events": [],
        "xid_next_seq": 1,
        "removed_gpus": [],
    }


# ---- serialization -----------------------------------------------------------------------

def _text(key: str, value: Any) -> str:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        return "0x%08X" % value if key in _HEX_FIELDS else str(value)
    if isinstance(value, (list, tuple)):
        value = ",".join(str(item) for item in value)
    text = str(value)
    if any(char in text for char in "\n\r\0"):
        raise ValueError("state value for %s contains a line break or NUL: %r" % (key, text))
    return text


def _gpu_lines(prefix: str, gpu: Gpu) -> List[str]:
    for key, kind in GPU_FIELDS.items():
        if kind is int and key in gpu:
            bits = 64 if key in _U64_FIELDS else 32
            if not 0 <= int(gpu[key]) < 2 ** bits:
                raise ValueError("%s.%s must be an unsigned %d-bit integer, got %r" % (prefix, key, bits, gpu[key]))
    keys = [key for key in GPU_FIELDS if key in gpu] + sorted(key for key in gpu if key not in GPU_FIELDS)
    return ["%s.%s=%s" % (prefix, key, _text(key, gpu[key])) for key in keys]


def render_state(state: State) -> str:
    """The state file's text for ``state``."""
    gpus = state.get("gpus", [])
    if len(gpus) > MAX_GPUS:
        raise ValueError("at most %d GPUs per node, got %d" % (MAX_GPUS, len(gpus)))
    lines = ["# gpunode lab NVML state; written by lab/nvml_state.py, read by lab/nvml/fake_nvml.c"]
    lines.append("format=%d" % STATE_FORMAT)
    for key in _NODE_STR_KEYS + _NODE_INT_KEYS[1:]:
        if key in state:
            lines.append("%s=%s" % (key, _text(key, state[key])))
    known = set(_NODE_STR_KEYS + _NODE_INT_KEYS) | {"gpus", "xid_events", "removed_gpus", "gpu_count"}
    for key in sorted(key for key in state if key not in known):
        lines.append("%s=%s" % (key, _text(key, state[key])))
    lines.append("gpu_count=%d" % len(gpus))
    for index, gpu in enumerate(gpus):
        if not gpu.get("uuid"):
            raise ValueError("GPU %d has no uuid" % index)
        lines.extend(_gpu_lines("gpu.%d" % index, gpu))
    for event in state.get("xid_events", []):
        lines.append("xid=%d %d %d" % (int(event["seq"]), int(event["gpu"]), int(event["xid"])))
    for index, gpu in enumerate(state.get("removed_gpus", [])):
        lines.extend(_gpu_lines("removed.%d" % index, gpu))
    lines.append("end=1")
    return "\n".join(lines) + "\n"


def _gpu_value(key: str, text: str) -> Any:
    kind = GPU_FIELDS.get(key, str)
    if kind is int:
        return int(text, 0)
    if kind is list:
        return [item for item in text.split(",") if item]
    return text


def parse_state(text: str) -> State:
    """The state dict of a state file's text; ValueError when it is malformed or truncated."""
    state: State = {"xid_events": [], "removed_gpus": []}
    gpus: Dict[int, Gpu] = {}
    removed: Dict[int, Gpu] = {}
    gpu_count = None
    ended = False
    if text and not text.endswith("\n"):
        raise ValueError("state file is truncated (no final newline)")
    for number, line in enumerate(text.splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        if ended:
            raise ValueError("line %d: content after end=" % number)
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError("line %d: expected key=value, got %r" % (number, line))
        if key.startswith(("gpu.", "removed.")):
            group, index_text, field = key.split(".", 2)
            target = gpus if group == "gpu" else removed
            target.setdefault(int(index_text), {})[field] = _gpu_value(field, value)
        elif key == "xid":
            seq, gpu, xid = (int(part) for part in value.split())
            state["xid_events"].append({"seq": seq, "gpu": gpu, "xid": xid})
        elif key == "gpu_count":
            gpu_count = int(value)
        elif key == "end":
            ended = True
        elif key in _NODE_INT_KEYS:
            state[key] = int(value, 0)
        else:
            state[key] = value
    if not ended or gpu_count is None or state.get("format") != STATE_FORMAT:
        raise ValueError("state file is incomplete (missing format=%d, gpu_count= or end=)" % STATE_FORMAT)
    if sorted(gpus) != list(range(gpu_count)):
        raise ValueError("gpu_count=%d but GPU indexes %s" % (gpu_count, sorted(gpus)))
    state["gpus"] = [gpus[index] for index in range(gpu_count)]
    state["removed_gpus"] = [removed[index] for index in sorted(removed)]
    state.setdefault("xid_next_seq", max([e["seq"] for e in state["xid_events"]] + [0]) + 1)
    return state


def read_state(path: str) -> State:
    """Read a state file (FileNotFoundError when absent, ValueError when malformed)."""
    with open(path, encoding="utf-8") as handle:
        return parse_state(handle.read())


def write_state(path: str, state: State) -> None:
    """Write ``state`` atomically: a reader sees the old file or the new one, never a part.

    The new file gets an mtime strictly after the old one's, so the C library's
    (inode, size, mtime, ctime) cache notices even two same-size writes within a clock tick.
    """
    text = render_state(state)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        previous_mtime_ns = os.stat(path).st_mtime_ns
    except FileNotFoundError:
        previous_mtime_ns = 0
    fd, tmp_path = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            os.fchmod(handle.fileno(), 0o644)
        mtime_ns = max(time.time_ns(), previous_mtime_ns + 1)
        os.utime(tmp_path, ns=(mtime_ns, mtime_ns))
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        raise


@contextmanager
def _locked(path: str) -> Iterator[None]:
    """Serialize read-modify-write of one state file across threads and processes."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def update_state(path: str, change: Callable[[State], State]) -> State:
    """Read the state at ``path``, apply the pure function ``change``, write the result."""
    with _locked(path):
        state = change(read_state(path))
        write_state(path, state)
        return state


# ---- faults ------------------------------------------------------------------------------

def _gpu_index(state: State, gpu: Optional[int]) -> int:
    count = len(state["gpus"])
    if count == 0:
        raise ValueError("node %s has no GPUs" % state.get("node"))
    index = count - 1 if gpu is None else gpu
    if not 0 <= index < count:
        raise ValueError("GPU index %d out of range (node has %d GPUs)" % (index, count))
    return index


def _targets(state: State, gpu: Optional[int], default_all: bool) -> List[int]:
    if gpu is None and default_all:
        return list(range(len(state["gpus"])))
    return [_gpu_index(state, gpu)]


def _model(gpu: Gpu) -> str:
    return "%s (%s)" % (gpu.get("name"), gpu.get("uuid"))


def _init_error(code: int) -> Tuple[Callable[..., State], Callable[..., State]]:
    def inject(state: State) -> State:
        new = copy.deepcopy(state)
        new["init_error"] = code
        return new

    def clear(state: State) -> State:
        new = copy.deepcopy(state)
        if new.get("init_error") == code:
            new["init_error"] = NVML_SUCCESS
        return new

    return inject, clear


def _set_fields(state: State, indexes: List[int], **fields: int) -> State:
    new = copy.deepcopy(state)
    for index in indexes:
        new["gpus"][index].update(fields)
    return new


def driver_not_loaded(state: State) -> State:
    """nvmlInit fails with NVML_ERROR_DRIVER_NOT_LOADED (kernel module not loaded)."""
    return _init_error(NVML_ERROR_DRIVER_NOT_LOADED)[0](state)


def driver_library_mismatch(state: State) -> State:
    """nvmlInit fails with NVML_ERROR_LIB_RM_VERSION_MISMATCH (driver upgraded, no reboot)."""
    return _init_error(NVML_ERROR_LIB_RM_VERSION_MISMATCH)[0](state)


def no_permission(state: State) -> State:
    """nvmlInit fails with NVML_ERROR_NO_PERMISSION (/dev/nvidia* not accessible)."""
    return _init_error(NVML_ERROR_NO_PERMISSION)[0](state)


def library_missing(state: State) -> State:
    """nvmlInit fails with NVML_ERROR_LIBRARY_NOT_FOUND, what pynvml raises with no driver
    userspace installed. The state is kept (only marked), so clear_fault restores it."""
    return _init_error(NVML_ERROR_LIBRARY_NOT_FOUND)[0](state)


def gpu_lost(state: State, gpu: Optional[int] = None) -> State:
    """GPU ``gpu`` (default: the last) fell off the bus: every call on it is GPU_IS_LOST."""
    return _set_fields(state, [_gpu_index(state, gpu)], lost=1)


def _clear_gpu_lost(state: State, gpu: Optional[int] = None) -> State:
    return _set_fields(state, _targets(state, gpu, default_all=True), lost=0)


def gpu_count_low(state: State) -> State:
    """The last GPU is gone from the node (not enumerated at all): the count is one short."""
    new = copy.deepcopy(state)
    if not new["gpus"]:
        raise ValueError("node %s has no GPU left to remove" % new.get("node"))
    new.setdefault("removed_gpus", []).append(new["gpus"].pop())
    return new


def _clear_gpu_count_low(state: State) -> State:
    new = copy.deepcopy(state)
    removed = new.get("removed_gpus", [])
    while removed:
        new["gpus"].append(removed.pop())
    return new


def ecc_uncorrectable(state: State, gpu: Optional[int] = None, count: int = 1) -> State:
    """``count`` uncorrectable (double-bit) ECC errors on ``gpu`` (default: the last),
    added to the volatile and aggregate counters."""
    index = _gpu_index(state, gpu)
    target = state["gpus"][index]
    if "ecc" in target.get("unsupported", []) or not target.get("ecc_current"):
        raise ValueError("GPU %d %s has no ECC enabled" % (index, _model(target)))
    return _set_fields(
        state, [index],
        ecc_volatile_uncorrected=target["ecc_volatile_uncorrected"] + count,
        ecc_aggregate_uncorrected=target["ecc_aggregate_uncorrected"] + count,
    )


def _clear_ecc_uncorrectable(state: State, gpu: Optional[int] = None) -> State:
    return _set_fields(state, _targets(state, gpu, default_all=True),
                       ecc_volatile_uncorrected=0, ecc_aggregate_uncorrected=0)


def _uses_row_remapping(gpu: Gpu) -> bool:
    return int(gpu.get("arch", 0)) >= NVML_DEVICE_ARCH_AMPERE


def retired_pages_pending(state: State, gpu: Optional[int] = None) -> State:
    """A double-bit ECC error retired a page that takes effect at the next reboot.

    Only GPUs before Ampere retire pages (e.g. a V100 node: ``default_node_state(n, model="V100")``);
    an A100/H100 remaps rows instead and NVML answers NOT_SUPPORTED for retired pages, so this
    fault raises ValueError there: use ``remapped_rows_pending``.
    """
    index = _gpu_index(state, gpu)
    target = state["gpus"][index]
    if _uses_row_remapping(target) or "retired_pages" in target.get("unsupported", []):
        raise ValueError("GPU %d %s uses row remapping, not page retirement: use remapped_rows_pending"
                         % (index, _model(target)))
    return _set_fields(state, [index], retired_pages_dbe=target["retired_pages_dbe"] + 1,
                       retired_pages_pending=1)


def _clear_retired_pages_pending(state: State, gpu: Optional[int] = None) -> State:
    indexes = [i for i in _targets(state, gpu, default_all=True) if not _uses_row_remapping(state["gpus"][i])]
    return _set_fields(state, indexes, retired_pages_dbe=0, retired_pages_pending=0)


def _require_row_remapping(state: State, gpu: Optional[int]) -> int:
    index = _gpu_index(state, gpu)
    target = state["gpus"][index]
    if not _uses_row_remapping(target) or "remapped_rows" in target.get("unsupported", []):
        raise ValueError("GPU %d %s retires pages, it has no row remapping: use retired_pages_pending"
                         % (index, _model(target)))
    return index


def remapped_rows_pending(state: State, gpu: Optional[int] = None) -> State:
    """An uncorrectable error remapped a row; the remap takes effect at the next GPU reset."""
    index = _require_row_remapping(state, gpu)
    target = state["gpus"][index]
    return _set_fields(state, [index], remapped_rows_uncorrectable=target["remapped_rows_uncorrectable"] + 1,
                       remapped_rows_pending=1)


def _clear_remapped_rows_pending(state: State, gpu: Optional[int] = None) -> State:
    indexes = [i for i in _targets(state, gpu, default_all=True) if _uses_row_remapping(state["gpus"][i])]
    return _set_fields(state, indexes, remapped_rows_uncorrectable=0, remapped_rows_pending=0)


def remapped_rows_failure(state: State, gpu: Optional[int] = None) -> State:
    """A row remap failed (no spare rows left): the GPU needs service."""
    index = _require_row_remapping(state, gpu)
    return _set_fields(state, [index], remapped_rows_failure=1)


def _clear_remapped_rows_failure(state: State, gpu: Optional[int] = None) -> State:
    indexes = [i for i in _targets(state, gpu, default_all=True) if _uses_row_remapping(state["gpus"][i])]
    return _set_fields(state, indexes, remapped_rows_failure=0)


def queue_xid(state: State, gpu: int, xid: int) -> State:
    """Queue one XID event on GPU ``gpu``; each NVML event set delivers it once, in order."""
    index = _gpu_index(state, gpu)
    new = copy.deepcopy(state)
    seq = int(new.get("xid_next_seq", 1))
    new.setdefault("xid_events", []).append({"seq": seq, "gpu": index, "xid": int(xid)})
    new["xid_next_seq"] = seq + 1
    return new


def critical_xid(state: State, gpu: Optional[int] = None, xid: int = XID_GPU_FALLEN_OFF_BUS) -> State:
    """Queue a critical XID (default 79, GPU fallen off the bus) on ``gpu`` (default: the last)."""
    return queue_xid(state, _gpu_index(state, gpu), xid)


def _clear_critical_xid(state: State, gpu: Optional[int] = None) -> State:
    new = copy.deepcopy(state)
    new["xid_events"] = [e for e in new.get("xid_events", []) if gpu is not None and e["gpu"] != gpu]
    return new


def persistence_off(state: State, gpu: Optional[int] = None) -> State:
    """Persistence mode disabled (nvidia-persistenced not running): all GPUs unless ``gpu``."""
    return _set_fields(state, _targets(state, gpu, default_all=True), persistence_mode=0)


def _clear_persistence_off(state: State, gpu: Optional[int] = None) -> State:
    return _set_fields(state, _targets(state, gpu, default_all=True), persistence_mode=1)


def _mig_capable(state: State, gpu: Optional[int]) -> List[int]:
    indexes = [i for i in _targets(state, gpu, default_all=True)
               if "mig" not in state["gpus"][i].get("unsupported", [])]
    if not indexes:
        raise ValueError("node %s: no MIG-capable GPU among the targets" % state.get("node"))
    return indexes


def mig_pending(state: State, gpu: Optional[int] = None) -> State:
    """A MIG mode change awaits a GPU reset (pending != current), on every MIG-capable GPU
    unless ``gpu``."""
    new = copy.deepcopy(state)
    for index in _mig_capable(state, gpu):
        target = new["gpus"][index]
        target["mig_pending"] = 0 if target["mig_current"] else 1
    return new


def _clear_mig_pending(state: State, gpu: Optional[int] = None) -> State:
    new = copy.deepcopy(state)
    for index in _targets(state, gpu, default_all=True):
        target = new["gpus"][index]
        target["mig_pending"] = target["mig_current"]
    return new


_REGISTRY: Dict[str, Tuple[Callable[..., State], Callable[..., State]]] = {
    "driver_not_loaded": _init_error(NVML_ERROR_DRIVER_NOT_LOADED),
    "driver_library_mismatch": _init_error(NVML_ERROR_LIB_RM_VERSION_MISMATCH),
    "no_permission": _init_error(NVML_ERROR_NO_PERMISSION),
    "library_missing": _init_error(NVML_ERROR_LIBRARY_NOT_FOUND),
    "gpu_lost": (gpu_lost, _clear_gpu_lost),
    "gpu_count_low": (gpu_count_low, _clear_gpu_count_low),
    "ecc_uncorrectable": (ecc_uncorrectable, _clear_ecc_uncorrectable),
    "retired_pages_pending": (retired_pages_pending, _clear_retired_pages_pending),
    "remapped_rows_pending": (remapped_rows_pending, _clear_remapped_rows_pending),
    "remapped_rows_failure": (remapped_rows_failure, _clear_remapped_rows_failure),
    "critical_xid": (critical_xid, _clear_critical_xid),
    "persistence_off": (persistence_off, _clear_persistence_off),
    "mig_pending": (mig_pending, _clear_mig_pending),
}

FAULTS: List[str] = list(_REGISTRY)


def _lookup(fault: str) -> Tuple[Callable[..., State], Callable[..., State]]:
    try:
        return _REGISTRY[fault]
    except KeyError:
        raise ValueError("unknown NVML fault %r (known: %s)" % (fault, ", ".join(FAULTS))) from None


def inject(state: State, fault: str, **kw: Any) -> State:
    """``state`` with ``fault`` (a name in FAULTS) injected; pure."""
    return _lookup(fault)[0](state, **kw)


def clear(state: State, fault: str, **kw: Any) -> State:
    """``state`` with the fields ``fault`` touches back at their healthy values; pure.

    Per-GPU faults clear every GPU unless ``gpu`` is given; counters go back to 0.
    """
    return _lookup(fault)[1](state, **kw)


def fault_applies(state: State, fault: str, **kw: Any) -> bool:
    """Whether ``fault`` can be injected into ``state`` (e.g. retired pages need a pre-Ampere GPU)."""
    try:
        inject(state, fault, **kw)
    except ValueError:
        return False
    return True


def apply_fault(path: str, fault: str, **kw: Any) -> State:
    """Inject ``fault`` into the state file at ``path``; returns the new state."""
    inject_fn = _lookup(fault)[0]
    return update_state(path, lambda state: inject_fn(state, **kw))


def clear_fault(path: str, fault: str, **kw: Any) -> State:
    """Clear ``fault`` in the state file at ``path``; returns the new state."""
    clear_fn = _lookup(fault)[1]
    return update_state(path, lambda state: clear_fn(state, **kw))
