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
        "gpus": [{...}, ...],         # index = position; keys: GPU_FIELDS, and "mig_devices"
        "xid_events": [{"seq": 1, "gpu": 0, "xid": 79}, ...],  # + "gi"/"ci" for a MIG device
        "xid_next_seq": 2,            # never decreases, so cleared events are not re-delivered
        "removed_gpus": [{...}],      # GPUs hidden by the gpu_count_low fault
    }

A GPU with MIG enabled may carry ``"mig_devices"``: ``[{"profile": "3g.40gb", "uuid": "MIG-...",
"gi": 2, "ci": 0, "placement": 4}, ...]`` in GPU instance id order (``set_mig`` /
``configure_mig`` make them). The GPU instance profiles NVML reports come from the GPU's model
(``GpuModel.mig_profiles``) and are written to the file, not kept in the dict.

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
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

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
NVML_ERROR_UNKNOWN = 999

# NVML return codes by name (nvml.h's NVML_ERROR_* without the prefix), e.g. for
# GPUNODE_LAB_NVML_INIT_ERROR=<code>.
NVML_ERRORS: Dict[str, int] = {
    "ERROR_UNINITIALIZED": 1, "ERROR_INVALID_ARGUMENT": 2, "ERROR_NOT_SUPPORTED": 3,
    "ERROR_NO_PERMISSION": 4, "ERROR_ALREADY_INITIALIZED": 5, "ERROR_NOT_FOUND": 6,
    "ERROR_INSUFFICIENT_SIZE": 7, "ERROR_INSUFFICIENT_POWER": 8, "ERROR_DRIVER_NOT_LOADED": 9,
    "ERROR_TIMEOUT": 10, "ERROR_IRQ_ISSUE": 11, "ERROR_LIBRARY_NOT_FOUND": 12,
    "ERROR_FUNCTION_NOT_FOUND": 13, "ERROR_CORRUPTED_INFOROM": 14, "ERROR_GPU_IS_LOST": 15,
    "ERROR_RESET_REQUIRED": 16, "ERROR_OPERATING_SYSTEM": 17, "ERROR_LIB_RM_VERSION_MISMATCH": 18,
    "ERROR_IN_USE": 19, "ERROR_MEMORY": 20, "ERROR_NO_DATA": 21, "ERROR_UNKNOWN": 999,
}
ENV_INIT_ERROR = "GPUNODE_LAB_NVML_INIT_ERROR"  # per process: nvmlInit returns this code

NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
MAX_MIG_DEVICES = 7  # LAB_MAX_MIG: nvmlDeviceGetMaxMigDeviceCount of an A100/H100

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
class MigProfile:
    """A GPU instance profile as ``nvmlDeviceGetGpuInstanceProfileInfo`` reports it (values of
    ``nvidia-smi mig -lgip`` on a real board) and where its instances can be placed."""

    name: str  # "1g.10gb", what go-nvlib derives from the slices and memory
    index: int  # NVML_GPU_INSTANCE_PROFILE_* (0 = 1_SLICE, 7 = 1_SLICE_REV1, 9 = 1_SLICE_REV2...)
    id: int  # the profile id (nvidia-smi's "ID" column, e.g. 19 for 1g.10gb)
    slices: int
    instances: int
    sm: int
    ce: int
    dec: int
    enc: int
    jpeg: int
    ofa: int
    memory_mib: int
    placements: Tuple[int, ...]  # first memory slice of each possible placement
    placement_size: int  # memory slices one placement spans (of 8)

    def line(self) -> str:
        """The value of a ``gpu.N.mig_profile.<index>=`` line (lab/nvml/README.md)."""
        return " ".join(str(v) for v in (
            self.name, self.id, self.slices, self.instances, self.sm, self.ce, self.dec, self.enc,
            self.jpeg, self.ofa, self.memory_mib, self.placement_size))


_ALL_1G = (0, 1, 2, 3, 4, 5, 6)


def _mig_table(names: Tuple[str, ...], memory: Tuple[int, ...], engines: Tuple[Tuple[int, ...], ...]) -> Tuple[MigProfile, ...]:
    """Profiles 1g, 1g+me, 1g (2 memory slices), 2g, 3g, 4g, 7g: NVML index, id, slices, instances
    and placements are the same on A100 and H100; names, memory and engines differ."""
    layout = (  # index, id, slices, instances, placements, placement size
        (0, 19, 1, 7, _ALL_1G, 1), (7, 20, 1, 1, _ALL_1G, 1), (9, 15, 1, 4, (0, 2, 4, 6), 2),
        (1, 14, 2, 3, (0, 2, 4), 2), (2, 9, 3, 2, (0, 4), 4), (3, 5, 4, 1, (0,), 4), (4, 0, 7, 1, (0,), 8),
    )
    return tuple(
        MigProfile(name, index, pid, slices, instances, *engine, memory_mib=mem, placements=places,
                   placement_size=size)
        for name, mem, engine, (index, pid, slices, instances, places, size) in zip(names, memory, engines, layout)
    )


# engines: sm, ce, dec, enc, jpeg, ofa (nvidia-smi mig -lgip: SM, CE, DEC, ENC, JPEG, OFA)
_A100_ENGINES = ((14, 1, 0, 0, 0, 0), (14, 1, 1, 0, 1, 1), (14, 1, 1, 0, 0, 0), (28, 2, 1, 0, 0, 0),
                 (42, 3, 2, 0, 0, 0), (56, 4, 2, 0, 0, 0), (98, 7, 5, 0, 1, 1))
MIG_PROFILES_A100_80GB = _mig_table(
    ("1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"),
    (9728, 9728, 19968, 19968, 40192, 40192, 80640), _A100_ENGINES)
MIG_PROFILES_A100_40GB = _mig_table(
    ("1g.5gb", "1g.5gb+me", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"),
    (4864, 4864, 9856, 9856, 19968, 19968, 40192), _A100_ENGINES)
MIG_PROFILES_H100_80GB = _mig_table(
    ("1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"),
    (9984, 9984, 20096, 20096, 40448, 40448, 81152),
    ((16, 1, 1, 0, 1, 0), (16, 1, 1, 0, 1, 1), (26, 1, 1, 0, 1, 0), (32, 2, 2, 0, 2, 0),
     (60, 3, 3, 0, 3, 0), (64, 4, 4, 0, 4, 0), (132, 8, 7, 0, 7, 1)))


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
    power_limit_w: int = 0
    mig_profiles: Tuple[MigProfile, ...] = ()

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
                 0x20B210DE, 0x147F10DE, 62000, 31, True, 400, MIG_PROFILES_A100_80GB),
        GpuModel("A100-40GB", "NVIDIA A100-SXM4-40GB", NVML_DEVICE_ARCH_AMPERE, (8, 0), 40960, 421,
                 0x20B010DE, 0x134F10DE, 55000, 30, True, 400, MIG_PROFILES_A100_40GB),
        GpuModel("H100", "NVIDIA H100 80GB HBM3", NVML_DEVICE_ARCH_HOPPER, (9, 0), 81559, 523,
                 0x233010DE, 0x16C110DE, 71000, 33, True, 700, MIG_PROFILES_H100_80GB),
        GpuModel("V100", "Tesla V100-SXM2-32GB", NVML_DEVICE_ARCH_VOLTA, (7, 0), 32768, 258,
                 0x1DB510DE, 0x124910DE, 43000, 35, False, 300),
        GpuModel("T4", "Tesla T4", NVML_DEVICE_ARCH_TURING, (7, 5), 15360, 255,
                 0x1EB810DE, 0x12A210DE, 9000, 38, False, 70),
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
    "power_limit_mw": int,  # nvmlDeviceGetEnforcedPowerLimit (0: not reported)
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
        "power_limit_mw": kind.power_limit_w * 1000,
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


# Keys of a MIG device dict, in file order (int values decimal).
MIG_FIELDS: Dict[str, type] = {
    "profile": str, "uuid": str, "gi": int, "ci": int, "placement": int, "memory_used": int,
}


def _uint(prefix: str, key: str, value: Any, bits: int) -> None:
    if not 0 <= int(value) < 2 ** bits:
        raise ValueError("%s.%s must be an unsigned %d-bit integer, got %r" % (prefix, key, bits, value))


def _mig_lines(prefix: str, gpu: Gpu, check_profiles: bool) -> List[str]:
    lines = []
    devices = gpu.get("mig_devices") or []
    if len(devices) > MAX_MIG_DEVICES:
        raise ValueError("%s: at most %d MIG devices per GPU, got %d" % (prefix, MAX_MIG_DEVICES, len(devices)))
    if devices and check_profiles:  # what the C library would reject the whole file for
        kind = GPU_MODELS.get(str(gpu.get("model")))
        known = {p.name for p in kind.mig_profiles} if kind else set()
        unknown = sorted({str(d.get("profile")) for d in devices} - known)
        if unknown:
            raise ValueError("%s: MIG profile(s) %s unknown to GPU model %r" % (prefix, unknown, gpu.get("model")))
        gis = [d.get("gi") for d in devices]
        if len(set(gis)) != len(gis):
            raise ValueError("%s: two MIG devices share a GPU instance id: %s" % (prefix, gis))
    for index, device in enumerate(devices):
        mig_prefix = "%s.mig.%d" % (prefix, index)
        for key in ("profile", "uuid", "gi"):
            if key not in device:
                raise ValueError("%s has no %s" % (mig_prefix, key))
        keys = [key for key in MIG_FIELDS if key in device] + sorted(key for key in device if key not in MIG_FIELDS)
        for key in keys:
            if MIG_FIELDS.get(key) is int:
                _uint(mig_prefix, key, device[key], 64 if key == "memory_used" else 32)
            lines.append("%s.%s=%s" % (mig_prefix, key, _text(key, device[key])))
    return lines


def _gpu_lines(prefix: str, gpu: Gpu, profiles: bool = False) -> List[str]:
    for key, kind in GPU_FIELDS.items():
        if kind is int and key in gpu:
            _uint(prefix, key, gpu[key], 64 if key in _U64_FIELDS else 32)
    keys = [key for key in GPU_FIELDS if key in gpu] + sorted(
        key for key in gpu if key not in GPU_FIELDS and key != "mig_devices")
    lines = ["%s.%s=%s" % (prefix, key, _text(key, gpu[key])) for key in keys]
    if profiles:  # derived from the model, for the C library; parse_state skips them
        kind = GPU_MODELS.get(str(gpu.get("model")))
        for profile in kind.mig_profiles if kind else ():
            lines.append("%s.mig_profile.%d=%s" % (prefix, profile.index, profile.line()))
    return lines + _mig_lines(prefix, gpu, check_profiles=profiles)


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
        lines.extend(_gpu_lines("gpu.%d" % index, gpu, profiles=True))
    for event in state.get("xid_events", []):
        line = "xid=%d %d %d" % (int(event["seq"]), int(event["gpu"]), int(event["xid"]))
        if event.get("gi") is not None:
            line += " %d %d" % (int(event["gi"]), int(event.get("ci") or 0))
        lines.append(line)
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
            gpu_dict = target.setdefault(int(index_text), {})
            if field.startswith("mig_profile."):
                continue  # derived from the model by render_state
            if field.startswith("mig."):
                mig_index, mig_field = field.split(".", 2)[1:]
                devices = gpu_dict.setdefault("mig_devices", {})
                devices.setdefault(int(mig_index), {})[mig_field] = (
                    int(value, 0) if MIG_FIELDS.get(mig_field) is int else value)
                continue
            gpu_dict[field] = _gpu_value(field, value)
        elif key == "xid":
            parts = [int(part) for part in value.split()]
            if len(parts) not in (3, 5):
                raise ValueError("line %d: xid= takes 3 or 5 numbers, got %r" % (number, value))
            event = {"seq": parts[0], "gpu": parts[1], "xid": parts[2]}
            if len(parts) == 5:
                event.update(gi=parts[3], ci=parts[4])
            state["xid_events"].append(event)
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
    for gpu in list(gpus.values()) + list(removed.values()):
        if "mig_devices" in gpu:
            devices = gpu["mig_devices"]
            if sorted(devices) != list(range(len(devices))):
                raise ValueError("MIG device indexes %s are not 0..%d" % (sorted(devices), len(devices) - 1))
            gpu["mig_devices"] = [devices[index] for index in range(len(devices))]
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


# ---- MIG -----------------------------------------------------------------------------------

Layout = Union[Sequence[str], Mapping[int, Sequence[str]]]


def mig_profiles(gpu: Gpu) -> Dict[str, MigProfile]:
    """The MIG profiles of a GPU dict's model by name; ValueError for a GPU without MIG."""
    kind = GPU_MODELS.get(str(gpu.get("model")))
    if kind is None or not kind.mig_profiles or "mig" in gpu.get("unsupported", []):
        raise ValueError("GPU %s does not support MIG" % _model(gpu))
    return {profile.name: profile for profile in kind.mig_profiles}


def mig_gpu_instance_id(placement: int, placement_size: int) -> int:
    """The GPU instance id the driver gives a placement (start, size in memory slices of 8):
    0 for the whole GPU, 1-2 for halves, 3-6 for quarters, 7-14 for eighths."""
    if placement_size == 8:
        return 0
    if placement_size == 4:
        return 1 + placement // 4
    if placement_size == 2:
        return 3 + placement // 2
    return 7 + placement


def mig_uuid(gpu_uuid_text: str, gi: int, ci: int) -> str:
    """Deterministic ``MIG-xxxxxxxx-xxxx-5xxx-xxxx-xxxxxxxxxxxx`` (a v5-style UUID, like the
    driver's) for compute instance ``ci`` of GPU instance ``gi`` on GPU ``gpu_uuid_text``."""
    h = _digest("mig", gpu_uuid_text, gi, ci)
    variant = "89ab"[int(h[16], 16) % 4]
    return "MIG-%s-%s-5%s-%s%s-%s" % (h[0:8], h[8:12], h[13:16], variant, h[17:20], h[20:32])


def plan_mig(gpu: Gpu, profiles: Sequence[str]) -> List[Dict[str, Any]]:
    """The MIG devices ``profiles`` (names, e.g. ``["3g.40gb", "2g.20gb", "1g.10gb"]``) make on
    ``gpu``: each a GPU instance with one compute instance over all its slices, placed where the
    driver can place it (no two instances share a memory slice). ValueError for an unknown
    profile, more instances of a profile than it allows, or a layout that does not fit."""
    known = mig_profiles(gpu)
    if isinstance(profiles, str):
        raise ValueError("a MIG layout is a list of profile names, got the string %r" % profiles)
    wanted = []
    for name in profiles:
        if name not in known:
            raise ValueError("GPU %s has no MIG profile %r (known: %s)" % (_model(gpu), name, ", ".join(known)))
        wanted.append(known[name])
    if len(wanted) > MAX_MIG_DEVICES:
        raise ValueError("at most %d MIG devices per GPU, got %d" % (MAX_MIG_DEVICES, len(wanted)))
    for profile in known.values():
        count = sum(1 for p in wanted if p is profile)
        if count > profile.instances:
            raise ValueError("MIG %s allows %d instance(s) per GPU, got %d" % (profile.name, profile.instances, count))
    if sum(p.slices for p in wanted) > 7:
        raise ValueError("MIG layout %s needs %d compute slices, a GPU has 7"
                         % (list(profiles), sum(p.slices for p in wanted)))

    def place(i: int, used: int) -> Optional[List[int]]:
        if i == len(wanted):
            return []
        profile = wanted[i]
        for start in profile.placements:
            mask = ((1 << profile.placement_size) - 1) << start
            if used & mask:
                continue
            rest = place(i + 1, used | mask)
            if rest is not None:
                return [start] + rest
        return None

    starts = place(0, 0)
    if starts is None:
        raise ValueError("MIG layout %s does not fit on one GPU (memory slice placements overlap)" % list(profiles))
    devices = []
    for profile, start in zip(wanted, starts):
        gi = mig_gpu_instance_id(start, profile.placement_size)
        devices.append({"profile": profile.name, "uuid": mig_uuid(gpu["uuid"], gi, 0), "gi": gi, "ci": 0,
                        "placement": start})
    return sorted(devices, key=lambda device: device["gi"])  # NVML enumerates them by GPU instance id


def set_mig(state: State, layout: Layout, mode: int = NVML_DEVICE_MIG_ENABLE) -> State:
    """``state`` with MIG configured; pure.

    ``layout``: ``{gpu index: [profile name, ...]}`` for those GPUs, or one list for every GPU.
    ``mode`` 1: MIG enabled (current and pending) with those MIG devices (an empty list: enabled,
    no MIG devices yet); 0: MIG disabled, the list must be empty. GPUs not in ``layout`` keep theirs.
    """
    if mode not in (NVML_DEVICE_MIG_DISABLE, NVML_DEVICE_MIG_ENABLE):
        raise ValueError("MIG mode must be 0 (disabled) or 1 (enabled), got %r" % (mode,))
    new = copy.deepcopy(state)
    if isinstance(layout, Mapping):
        items = [(int(index), list(profiles)) for index, profiles in layout.items()]
    else:
        items = [(index, list(layout)) for index in range(len(new["gpus"]))]
    for index, profiles in items:
        gpu = new["gpus"][_gpu_index(new, index)]
        mig_profiles(gpu)
        if mode == NVML_DEVICE_MIG_DISABLE:
            if profiles:
                raise ValueError("GPU %d: MIG disabled (mode 0) takes no MIG devices, got %s" % (index, profiles))
            devices: List[Dict[str, Any]] = []
        else:
            devices = plan_mig(gpu, profiles)
        gpu["mig_current"] = gpu["mig_pending"] = mode
        if devices:
            gpu["mig_devices"] = devices
        else:
            gpu.pop("mig_devices", None)
    return new


def configure_mig(path: str, layout: Layout, mode: int = NVML_DEVICE_MIG_ENABLE) -> State:
    """``set_mig`` on the state file at ``path``; returns the new state. Example::

        configure_mig(path, {0: ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"], 1: ["7g.80gb"]})
    """
    return update_state(path, lambda state: set_mig(state, layout, mode))


def mig_minors_text(state: State) -> str:
    """``/proc/driver/nvidia-caps/mig-minors`` as the driver writes it for ``state``'s GPUs
    (by minor number): NVIDIA's device plugin maps each MIG device's GPU/compute instance to its
    ``/dev/nvidia-caps/nvidia-cap<N>`` device node through this file."""
    lines = ["config 1", "monitor 2"]
    for minor in sorted({int(gpu["minor_number"]) for gpu in state["gpus"]}):
        base = 3 + minor * 135
        for gi in range(15):
            lines.append("gpu%d/gi%d/access %d" % (minor, gi, base + gi * 9))
            for ci in range(8):
                lines.append("gpu%d/gi%d/ci%d/access %d" % (minor, gi, ci, base + gi * 9 + 1 + ci))
    return "\n".join(lines) + "\n"


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


def queue_xid(state: State, gpu: int, xid: int, gi: Optional[int] = None, ci: Optional[int] = None) -> State:
    """Queue one XID event on GPU ``gpu``; each NVML event set delivers it once, in order.

    ``gi``/``ci``: the event names that MIG device (GPU / compute instance id, ``ci`` default 0),
    as the driver reports an XID inside a MIG device; otherwise both are 0xFFFFFFFF.
    """
    index = _gpu_index(state, gpu)
    new = copy.deepcopy(state)
    seq = int(new.get("xid_next_seq", 1))
    event = {"seq": seq, "gpu": index, "xid": int(xid)}
    if gi is not None:
        event.update(gi=int(gi), ci=int(ci or 0))
    new.setdefault("xid_events", []).append(event)
    new["xid_next_seq"] = seq + 1
    return new


def critical_xid(state: State, gpu: Optional[int] = None, xid: int = XID_GPU_FALLEN_OFF_BUS,
                 gi: Optional[int] = None, ci: Optional[int] = None) -> State:
    """Queue a critical XID (default 79, GPU fallen off the bus) on ``gpu`` (default: the last)."""
    return queue_xid(state, _gpu_index(state, gpu), xid, gi=gi, ci=ci)


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
