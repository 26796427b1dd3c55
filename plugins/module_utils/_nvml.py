# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""NVML adapter and the driver step's verdict (module gpunode.bringup.nvml_info).

Three layers, each testable on its own:

- reading: :func:`read_node` walks a pynvml-shaped module (``pynvml`` on a node, a fake in unit
  tests) and records everything into a :class:`NodeReading`. No NVML error escapes it: a field the
  GPU does not support stays ``None``, any other error is recorded on the reading.
- verdict: :func:`assess` turns a reading and the operator's :class:`Expectations` into
  :class:`Finding` records (code, severity, gpu, message, action). Pure.
- gathering: :func:`gather_nvml_info` validates the module options, finds and preloads the NVML
  library of a containerised driver, runs the reading under a deadline and shapes the result.

Node-side code: runs on Python 3.9 (no ``match``, no ``X | Y`` types at run time).
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import copy
import ctypes
import os
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError

try:
    import pynvml
except ImportError:
    pynvml = None
    HAS_PYNVML = False
    PYNVML_IMPORT_ERROR: Optional[str] = traceback.format_exc()
else:
    HAS_PYNVML = True
    PYNVML_IMPORT_ERROR = None

# ---- NVML constants (nvml.h; the same values as pynvml's, kept here so the verdict logic and
# ---- its tests do not need pynvml) --------------------------------------------------------

NVML_SUCCESS = 0
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_UNKNOWN = 999

MIB = 1024 * 1024

NVML_ERROR_NAMES: Dict[int, str] = {
    1: "UNINITIALIZED", 2: "INVALID_ARGUMENT", 3: "NOT_SUPPORTED", 4: "NO_PERMISSION",
    5: "ALREADY_INITIALIZED", 6: "NOT_FOUND", 7: "INSUFFICIENT_SIZE", 8: "INSUFFICIENT_POWER",
    9: "DRIVER_NOT_LOADED", 10: "TIMEOUT", 11: "IRQ_ISSUE", 12: "LIBRARY_NOT_FOUND",
    13: "FUNCTION_NOT_FOUND", 14: "CORRUPTED_INFOROM", 15: "GPU_IS_LOST", 16: "RESET_REQUIRED",
    17: "OPERATING_SYSTEM", 18: "LIB_RM_VERSION_MISMATCH", 19: "IN_USE", 20: "MEMORY",
    21: "NO_DATA", 22: "VGPU_ECC_NOT_SUPPORTED", 23: "INSUFFICIENT_RESOURCES",
    24: "FREQ_NOT_SUPPORTED", 25: "ARGUMENT_VERSION_MISMATCH", 26: "DEPRECATED",
    27: "NOT_READY", 28: "GPU_NOT_FOUND", 29: "INVALID_STATE", 999: "UNKNOWN",
}

NVML_TEMPERATURE_GPU = 0
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS = 0
NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = 1
NVML_EVENT_TYPE_XID_CRITICAL_ERROR = 0x8

NVML_LIBRARY_NAME = "libnvidia-ml.so.1"

# The XIDs NVIDIA's device plugin treats as application errors and ignores (its default).
DEFAULT_IGNORED_XIDS: Tuple[int, ...] = (13, 31, 43, 45, 68, 109)

# Short descriptions of XIDs an operator meets on data-centre GPUs (NVIDIA's Xid catalog).
XID_DESCRIPTIONS: Dict[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup after previous errors",
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint/warning",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recorded",
    64: "ECC page retirement or row remapping failed",
    68: "video decoder exception",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    109: "context switch timeout",
    119: "GSP RPC timeout",
    120: "GSP error",
}

# Where a driver root (the host's "/", or a driver container's root such as /run/nvidia/driver)
# keeps libnvidia-ml.so.1, in the order the NVIDIA container toolkit's locator tries them.
LIBRARY_DIRS: Tuple[str, ...] = (
    "usr/lib64",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib64",
    "lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "usr/lib",
    "lib",
)
LIBRARY_SEARCH_MAX_DEPTH = 6

SEVERITY_ERROR = "error"
SEVERITY_WARNING = "warning"

PROC_DRIVER_VERSION = "proc/driver/nvidia/version"


# ---- records ------------------------------------------------------------------------------

@dataclass
class Finding:
    """One verdict line in the operator's words; ``gpu`` is the NVML index, None for the node."""

    code: str
    severity: str
    message: str
    action: str
    gpu: Optional[int] = None

    def to_result(self) -> Dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "gpu": self.gpu,
                "message": self.message, "action": self.action}


@dataclass
class XidEvent:
    """A critical XID event NVML delivered during the watch window."""

    xid: int
    gpu: Optional[int]  # None when NVML could not say which GPU raised it
    ignored: bool

    def to_result(self) -> Dict[str, Any]:
        return {"xid": self.xid, "gpu": self.gpu, "ignored": self.ignored,
                "description": XID_DESCRIPTIONS.get(self.xid)}


@dataclass
class GpuReading:
    """Everything read about one GPU; ``None`` where the GPU does not support a field."""

    index: int
    uuid: Optional[str] = None
    name: Optional[str] = None
    pci_bus_id: Optional[str] = None
    serial: Optional[str] = None
    memory_total_mib: Optional[int] = None
    memory_used_mib: Optional[int] = None
    memory_reserved_mib: Optional[int] = None
    persistence_mode: Optional[bool] = None
    mig_mode_current: Optional[bool] = None
    mig_mode_pending: Optional[bool] = None
    ecc_mode_current: Optional[bool] = None
    ecc_mode_pending: Optional[bool] = None
    ecc_volatile_corrected: Optional[int] = None
    ecc_volatile_uncorrected: Optional[int] = None
    ecc_aggregate_corrected: Optional[int] = None
    ecc_aggregate_uncorrected: Optional[int] = None
    retired_pages_single_bit: Optional[int] = None
    retired_pages_double_bit: Optional[int] = None
    retired_pages_pending: Optional[bool] = None
    remapped_rows_correctable: Optional[int] = None
    remapped_rows_uncorrectable: Optional[int] = None
    remapped_rows_pending: Optional[bool] = None
    remapped_rows_failure: Optional[bool] = None
    temperature_c: Optional[int] = None
    power_draw_watts: Optional[float] = None
    lost: bool = False
    # field -> NVML error name, for errors other than "not supported"
    read_errors: Dict[str, str] = field(default_factory=dict)

    def label(self) -> str:
        """How a message names this GPU: ``GPU 3 (GPU-..., 00000000:47:00.0)``."""
        known = [part for part in (self.uuid, self.pci_bus_id) if part]
        return "GPU %d (%s)" % (self.index, ", ".join(known)) if known else "GPU %d" % self.index

    def to_result(self, xid_events: Sequence[XidEvent] = ()) -> Dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "pci_bus_id": self.pci_bus_id,
            "serial": self.serial,
            "memory": {"total_mib": self.memory_total_mib, "used_mib": self.memory_used_mib,
                       "reserved_mib": self.memory_reserved_mib},
            "persistence_mode": self.persistence_mode,
            "mig_mode": {"current": self.mig_mode_current, "pending": self.mig_mode_pending},
            "ecc_mode": {"current": self.ecc_mode_current, "pending": self.ecc_mode_pending},
            "ecc_errors": {
                "volatile": {"corrected": self.ecc_volatile_corrected,
                             "uncorrected": self.ecc_volatile_uncorrected},
                "aggregate": {"corrected": self.ecc_aggregate_corrected,
                              "uncorrected": self.ecc_aggregate_uncorrected},
            },
            "retired_pages": {"single_bit": self.retired_pages_single_bit,
                              "double_bit": self.retired_pages_double_bit,
                              "pending": self.retired_pages_pending},
            "remapped_rows": {"correctable": self.remapped_rows_correctable,
                              "uncorrectable": self.remapped_rows_uncorrectable,
                              "pending": self.remapped_rows_pending,
                              "failure": self.remapped_rows_failure},
            "temperature_c": self.temperature_c,
            "power_draw_watts": self.power_draw_watts,
            "lost": self.lost,
            "xid_events": [event.xid for event in xid_events if event.gpu == self.index],
            "read_errors": dict(self.read_errors),
        }


@dataclass
class NodeReading:
    """What NVML (and /proc) said about the node.

    ``init_error`` is the NVML return code that stopped the reading before any GPU was read
    (library not found, driver not loaded, ...); ``init_call`` names the call that returned it.
    """

    kernel_module_version: Optional[str] = None
    library_path: Optional[str] = None
    library_search_root: Optional[str] = None  # driver root searched for libnvidia-ml.so.1
    init_error: Optional[int] = None
    init_call: Optional[str] = None
    init_detail: Optional[str] = None
    driver_version: Optional[str] = None
    cuda_driver_version: Optional[str] = None
    nvml_version: Optional[str] = None
    gpu_count: Optional[int] = None
    gpus: List[GpuReading] = field(default_factory=list)
    xid_watch_seconds: float = 0.0
    xid_events: List[XidEvent] = field(default_factory=list)
    xid_watch_error: Optional[str] = None
    timed_out: bool = False
    call_in_progress: Optional[str] = None  # the NVML call running when the deadline passed
    timeout_seconds: float = 0.0

    @property
    def library_version(self) -> Optional[str]:
        """The version in the loaded library's file name (libnvidia-ml.so.550.54.15)."""
        return library_version_from_path(self.library_path)


@dataclass
class Expectations:
    """What the operator expects of the node (module options)."""

    expected_gpu_count: Optional[int] = None
    min_driver_version: Optional[str] = None
    require_persistence_mode: bool = False
    ignored_xids: FrozenSet[int] = frozenset(DEFAULT_IGNORED_XIDS)


# ---- small pure helpers ---------------------------------------------------------------------

def nvml_error_name(code: Optional[int]) -> str:
    """``NVML_ERROR_GPU_IS_LOST`` for 15; unknown codes keep their number."""
    if code is None:
        return "NVML_ERROR_UNKNOWN"
    return "NVML_ERROR_%s" % NVML_ERROR_NAMES.get(code, str(code))


def version_tuple(text: str) -> Optional[Tuple[int, ...]]:
    """(550, 54, 15) for "550.54.15"; None when ``text`` is not dotted numbers."""
    if not re.match(r"^\d+(\.\d+)*$", text or ""):
        return None
    return tuple(int(part) for part in text.split("."))


def cuda_version_text(value: Optional[int]) -> Optional[str]:
    """"12.8" for NVML's 12080 (major * 1000 + minor * 10)."""
    if value is None or value <= 0:
        return None
    return "%d.%d" % (value // 1000, (value % 1000) // 10)


def parse_kernel_module_version(text: Optional[str]) -> Optional[str]:
    """The version on the NVRM line of /proc/driver/nvidia/version (proprietary or open module)."""
    for line in (text or "").splitlines():
        if line.startswith("NVRM version:"):
            match = re.search(r"\s(\d+\.\d+(?:\.\d+)?)(?:\s|$)", line)
            return match.group(1) if match else None
    return None


def library_version_from_path(path: Optional[str]) -> Optional[str]:
    """"550.54.15" for .../libnvidia-ml.so.550.54.15; None for libnvidia-ml.so.1 and the like."""
    if not path:
        return None
    match = re.search(r"libnvidia-ml\.so\.(\d+\.\d+(?:\.\d+)?)$", path)
    return match.group(1) if match else None


def loaded_library_from_maps(maps_text: str) -> Optional[str]:
    """The libnvidia-ml file mapped into this process, from /proc/self/maps."""
    for line in maps_text.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and "/libnvidia-ml.so" in parts[5]:
            return parts[5].strip()
    return None


def node_path(node_root: str, path: str) -> str:
    """``path`` (absolute, as on the node) below ``node_root`` on this machine."""
    return os.path.join(node_root, path.lstrip("/")) if node_root != "/" else "/" + path.lstrip("/")


def resolve_in_root(root: str, path: str, max_links: int = 40) -> str:
    """Follow symlinks of ``path`` (a path on this machine below ``root``) keeping absolute
    link targets inside ``root``, as a chroot would; returns the final path (which may not exist).
    """
    root = os.path.abspath(root)
    relative = os.path.relpath(os.path.abspath(path), root).split(os.sep)
    current = root
    pending = [part for part in relative if part not in ("", ".")]
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            current = os.path.dirname(current) if current != root else root
            continue
        candidate = os.path.join(current, part)
        if os.path.islink(candidate) and links < max_links:
            links += 1
            target = os.readlink(candidate)
            if os.path.isabs(target):
                current = root
            pending = [p for p in target.split("/") if p not in ("", ".")] + pending
            continue
        current = candidate
    return current


def find_nvml_library(driver_root: str) -> Optional[str]:
    """libnvidia-ml.so.1 below ``driver_root`` (a path on this machine): the usual library
    directories first, then a bounded walk. Returns the path with symlinks resolved in the root."""
    for directory in LIBRARY_DIRS:
        candidate = resolve_in_root(driver_root, os.path.join(driver_root, directory, NVML_LIBRARY_NAME))
        if os.path.isfile(candidate):
            return candidate
    base_depth = driver_root.rstrip("/").count("/")
    for current, dirs, files in os.walk(driver_root):
        if current.count("/") - base_depth >= LIBRARY_SEARCH_MAX_DEPTH:
            dirs[:] = []
        dirs[:] = sorted(d for d in dirs if d not in ("proc", "sys", "dev", "run", "tmp"))
        if NVML_LIBRARY_NAME in files:
            candidate = resolve_in_root(driver_root, os.path.join(current, NVML_LIBRARY_NAME))
            if os.path.isfile(candidate):
                return candidate
    return None


# ---- option handling ----------------------------------------------------------------------

def build_expectations(params: Dict[str, Any]) -> Expectations:
    """Expectations from the module options; InvalidOptionError names a bad option."""
    count = params.get("expected_gpu_count")
    if count is not None and count < 0:
        raise InvalidOptionError("expected_gpu_count must be 0 or more, got %d" % count)
    minimum = params.get("min_driver_version")
    if minimum is not None and version_tuple(minimum) is None:
        raise InvalidOptionError(
            "min_driver_version must be a dotted driver version such as 550.54.15, got %r" % minimum)
    ignored = params.get("ignored_xids")
    if ignored is None:
        ignored = list(DEFAULT_IGNORED_XIDS)
    bad = [xid for xid in ignored if xid <= 0]
    if bad:
        raise InvalidOptionError("ignored_xids must hold positive XID numbers, got %s" % bad)
    return Expectations(
        expected_gpu_count=count,
        min_driver_version=minimum,
        require_persistence_mode=bool(params.get("require_persistence_mode")),
        ignored_xids=frozenset(ignored),
    )


def check_paths(params: Dict[str, Any]) -> Tuple[str, Optional[str]]:
    """(node root, driver root as a path on this machine or None) from the options."""
    node_root = params.get("node_root") or "/"
    if not os.path.isabs(node_root):
        raise InvalidOptionError("node_root must be an absolute path, got %r" % node_root)
    if not os.path.isdir(node_root):
        raise InvalidOptionError("node_root %s is not a directory on this host" % node_root)
    driver_root = params.get("driver_root")
    if driver_root is None:
        return node_root, None
    if not os.path.isabs(driver_root):
        raise InvalidOptionError(
            "driver_root must be an absolute path on the node (e.g. /run/nvidia/driver), got %r" % driver_root)
    return node_root, node_path(node_root, driver_root)


def check_durations(params: Dict[str, Any], timeout_option: str = "timeout") -> Tuple[float, float]:
    """(xid_watch_seconds, timeout) validated; ``timeout_option`` is the option's name in messages
    (node_info calls it nvml_timeout)."""
    watch = float(params.get("xid_watch_seconds") or 0)
    if watch < 0 or watch > 3600:
        raise InvalidOptionError("xid_watch_seconds must be between 0 and 3600, got %s" % watch)
    timeout = float(params.get("timeout") if params.get("timeout") is not None else 60)
    if timeout <= 0:
        raise InvalidOptionError("%s must be more than 0 seconds, got %s" % (timeout_option, timeout))
    return watch, timeout


# ---- reading ------------------------------------------------------------------------------

class _Abandoned(Exception):
    """The caller stopped waiting (deadline passed): stop reading."""


def _error_code(exc: BaseException) -> int:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else NVML_ERROR_UNKNOWN


def _text(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip("\x00 ") or None


class NvmlReader:
    """Reads a node through a pynvml-shaped module; every NVML error is recorded, none raised."""

    def __init__(self, nvml: Any, reading: NodeReading, clock: Callable[[], float] = time.monotonic) -> None:
        self.nvml = nvml
        self.reading = reading
        self.clock = clock
        self.abandoned = False

    # one guarded NVML call for a GPU field
    def _query(self, gpu: GpuReading, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, or None: a call this GPU, driver or library does not have
        (not supported, no such function, a struct version it does not know) is not an error;
        any other NVML error is recorded in ``read_errors[name]``."""
        if gpu.lost:
            return None
        self._enter("%s(GPU %d)" % (getattr(fn, "__name__", name), gpu.index))
        try:
            return fn(*args, **kwargs)
        except self.nvml.NVMLError as exc:
            code = _error_code(exc)
            if code == NVML_ERROR_GPU_IS_LOST:
                gpu.lost = True
            if code not in (NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND,
                            NVML_ERROR_ARGUMENT_VERSION_MISMATCH):
                gpu.read_errors[name] = nvml_error_name(code)
            return None

    def _enter(self, call: str) -> None:
        if self.abandoned:
            raise _Abandoned()
        self.reading.call_in_progress = call

    def _system(self, fn: Callable[[], Any]) -> Any:
        self._enter(getattr(fn, "__name__", "nvmlSystem"))
        try:
            return fn()
        except self.nvml.NVMLError:
            return None

    def read(self, xid_watch_seconds: float = 0.0, ignored_xids: Iterable[int] = DEFAULT_IGNORED_XIDS) -> NodeReading:
        """Fill and return the node reading; stops early (init_error) when NVML cannot start."""
        nvml = self.nvml
        reading = self.reading
        self._enter("nvmlInit")
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            reading.init_error, reading.init_call = _error_code(exc), "nvmlInit"
            reading.library_path = _loaded_library_path() or reading.library_path
            return reading
        try:
            self._read_initialised(xid_watch_seconds, frozenset(ignored_xids))
        finally:
            if not self.abandoned:
                try:
                    nvml.nvmlShutdown()
                except nvml.NVMLError:
                    pass
        reading.call_in_progress = None
        return reading

    def _read_initialised(self, xid_watch_seconds: float, ignored_xids: FrozenSet[int]) -> None:
        nvml = self.nvml
        reading = self.reading
        reading.library_path = _loaded_library_path() or reading.library_path
        reading.driver_version = _text(self._system(nvml.nvmlSystemGetDriverVersion))
        reading.nvml_version = _text(self._system(nvml.nvmlSystemGetNVMLVersion))
        reading.cuda_driver_version = cuda_version_text(self._system(nvml.nvmlSystemGetCudaDriverVersion))
        self._enter("nvmlDeviceGetCount")
        try:
            reading.gpu_count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            reading.init_error, reading.init_call = _error_code(exc), "nvmlDeviceGetCount"
            return
        reading.gpus = [self.read_gpu(index) for index in range(reading.gpu_count)]
        if xid_watch_seconds > 0:
            self.watch_xids(xid_watch_seconds, ignored_xids)

    def _handle(self, gpu: GpuReading) -> Any:
        self._enter("nvmlDeviceGetHandleByIndex(%d)" % gpu.index)
        try:
            return self.nvml.nvmlDeviceGetHandleByIndex(gpu.index)
        except self.nvml.NVMLError as exc:
            code = _error_code(exc)
            gpu.lost = code == NVML_ERROR_GPU_IS_LOST
            gpu.read_errors["handle"] = nvml_error_name(code)
            return None

    def read_gpu(self, index: int) -> GpuReading:
        """One GPU's identity, memory, modes, error counters and sensors."""
        nvml = self.nvml
        gpu = GpuReading(index=index)
        handle = self._handle(gpu)
        if handle is None:
            return gpu
        q = self._query
        gpu.uuid = _text(q(gpu, "uuid", nvml.nvmlDeviceGetUUID, handle))
        gpu.name = _text(q(gpu, "name", nvml.nvmlDeviceGetName, handle))
        pci = q(gpu, "pci_bus_id", nvml.nvmlDeviceGetPciInfo, handle)
        gpu.pci_bus_id = _text(getattr(pci, "busId", None)) if pci is not None else None
        gpu.serial = _text(q(gpu, "serial", nvml.nvmlDeviceGetSerial, handle))
        self._read_memory(gpu, handle)
        gpu.persistence_mode = _flag(q(gpu, "persistence_mode", nvml.nvmlDeviceGetPersistenceMode, handle))
        gpu.mig_mode_current, gpu.mig_mode_pending = _pair(q(gpu, "mig_mode", nvml.nvmlDeviceGetMigMode, handle))
        gpu.ecc_mode_current, gpu.ecc_mode_pending = _pair(q(gpu, "ecc_mode", nvml.nvmlDeviceGetEccMode, handle))
        self._read_ecc_counters(gpu, handle)
        self._read_retirement(gpu, handle)
        gpu.temperature_c = _int(q(gpu, "temperature", nvml.nvmlDeviceGetTemperature, handle, NVML_TEMPERATURE_GPU))
        power_mw = q(gpu, "power_draw", nvml.nvmlDeviceGetPowerUsage, handle)
        gpu.power_draw_watts = round(power_mw / 1000.0, 3) if power_mw is not None else None
        return gpu

    def _read_memory(self, gpu: GpuReading, handle: Any) -> None:
        """Frame buffer total/used/reserved in MiB.

        nvmlDeviceGetMemoryInfo_v2 (drivers R510 and newer) reports the memory the driver and
        firmware reserve apart, and its ``used`` excludes it, as nvidia-smi's "Used" does (an idle
        H200 on R580: v1 used 615 MiB; v2 used 0 MiB and reserved 615.06 MiB, which nvidia-smi
        shows as 616). Older drivers and older nvidia-ml-py lack it: v1 is read then, ``used``
        includes the reserved memory and ``reserved_mib`` stays null. A v2 call that fails for
        another reason is recorded and not papered over with v1.
        """
        nvml = self.nvml
        version = getattr(nvml, "nvmlMemory_v2", None)
        memory = None
        if version is not None:
            memory = self._query(gpu, "memory", nvml.nvmlDeviceGetMemoryInfo, handle, version=version)
            if gpu.lost or "memory" in gpu.read_errors:
                return
            if memory is not None:
                gpu.memory_reserved_mib = int(memory.reserved) // MIB
        if memory is None:
            memory = self._query(gpu, "memory", nvml.nvmlDeviceGetMemoryInfo, handle)
        if memory is not None:
            gpu.memory_total_mib = int(memory.total) // MIB
            gpu.memory_used_mib = int(memory.used) // MIB

    def _read_ecc_counters(self, gpu: GpuReading, handle: Any) -> None:
        fn = self.nvml.nvmlDeviceGetTotalEccErrors
        for attr, error_type, counter in (
            ("ecc_volatile_corrected", NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_VOLATILE_ECC),
            ("ecc_volatile_uncorrected", NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC),
            ("ecc_aggregate_corrected", NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_AGGREGATE_ECC),
            ("ecc_aggregate_uncorrected", NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_AGGREGATE_ECC),
        ):
            setattr(gpu, attr, _int(self._query(gpu, attr, fn, handle, error_type, counter)))

    def _read_retirement(self, gpu: GpuReading, handle: Any) -> None:
        nvml = self.nvml
        q = self._query
        single = q(gpu, "retired_pages", nvml.nvmlDeviceGetRetiredPages, handle,
                   NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS)
        double = q(gpu, "retired_pages", nvml.nvmlDeviceGetRetiredPages, handle,
                   NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)
        gpu.retired_pages_single_bit = len(single) if single is not None else None
        gpu.retired_pages_double_bit = len(double) if double is not None else None
        gpu.retired_pages_pending = _flag(q(gpu, "retired_pages_pending",
                                            nvml.nvmlDeviceGetRetiredPagesPendingStatus, handle))
        rows = q(gpu, "remapped_rows", nvml.nvmlDeviceGetRemappedRows, handle)
        if rows is not None:
            correctable, uncorrectable, pending, failure = rows
            gpu.remapped_rows_correctable = int(correctable)
            gpu.remapped_rows_uncorrectable = int(uncorrectable)
            gpu.remapped_rows_pending = bool(pending)
            gpu.remapped_rows_failure = bool(failure)

    def watch_xids(self, seconds: float, ignored_xids: FrozenSet[int]) -> None:
        """Register every readable GPU for critical XID events and collect them for ``seconds``."""
        nvml = self.nvml
        reading = self.reading
        reading.xid_watch_seconds = seconds
        self._enter("nvmlEventSetCreate")
        try:
            event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            reading.xid_watch_error = "nvmlEventSetCreate failed: %s" % nvml_error_name(_error_code(exc))
            return
        try:
            registered = self._register_xids(event_set)
            if registered:
                self._collect_xids(event_set, seconds, ignored_xids)
            elif reading.xid_watch_error is None:
                reading.xid_watch_error = "no GPU could be registered for XID events"
        finally:
            if not self.abandoned:
                try:
                    nvml.nvmlEventSetFree(event_set)
                except nvml.NVMLError:
                    pass

    def _register_xids(self, event_set: Any) -> int:
        registered = 0
        failed: List[str] = []
        for gpu in self.reading.gpus:
            if gpu.lost:
                continue
            self._enter("nvmlDeviceRegisterEvents(GPU %d)" % gpu.index)
            try:
                handle = self.nvml.nvmlDeviceGetHandleByIndex(gpu.index)
                self.nvml.nvmlDeviceRegisterEvents(handle, NVML_EVENT_TYPE_XID_CRITICAL_ERROR, event_set)
                registered += 1
            except self.nvml.NVMLError as exc:
                failed.append("GPU %d: %s" % (gpu.index, nvml_error_name(_error_code(exc))))
        if failed:
            self.reading.xid_watch_error = "XID events could not be registered for %s" % "; ".join(failed)
        return registered

    def _collect_xids(self, event_set: Any, seconds: float, ignored_xids: FrozenSet[int]) -> None:
        nvml = self.nvml
        by_uuid = {gpu.uuid: gpu.index for gpu in self.reading.gpus if gpu.uuid}
        deadline = self.clock() + seconds
        while True:
            remaining_ms = int((deadline - self.clock()) * 1000)
            if remaining_ms <= 0:
                return
            self._enter("nvmlEventSetWait")
            try:
                data = nvml.nvmlEventSetWait_v2(event_set, min(remaining_ms, 1000))
            except nvml.NVMLError as exc:
                code = _error_code(exc)
                if code == NVML_ERROR_TIMEOUT:
                    continue
                self.reading.xid_watch_error = "nvmlEventSetWait failed: %s" % nvml_error_name(code)
                return
            if not int(data.eventType) & NVML_EVENT_TYPE_XID_CRITICAL_ERROR:
                continue
            xid = int(data.eventData)
            self.reading.xid_events.append(
                XidEvent(xid=xid, gpu=self._event_gpu(data, by_uuid), ignored=xid in ignored_xids))

    def _event_gpu(self, data: Any, by_uuid: Dict[str, int]) -> Optional[int]:
        try:
            return by_uuid.get(_text(self.nvml.nvmlDeviceGetUUID(data.device)) or "")
        except self.nvml.NVMLError:
            return None


def _flag(value: Any) -> Optional[bool]:
    return None if value is None else bool(value)


def _int(value: Any) -> Optional[int]:
    return None if value is None else int(value)


def _pair(value: Any) -> Tuple[Optional[bool], Optional[bool]]:
    if value is None:
        return None, None
    current, pending = value
    return bool(current), bool(pending)


def _loaded_library_path() -> Optional[str]:
    try:
        with open("/proc/self/maps") as handle:
            return loaded_library_from_maps(handle.read())
    except OSError:
        return None


def run_with_deadline(fn: Callable[[], Any], seconds: float) -> Tuple[bool, Any]:
    """Run ``fn`` in a daemon thread; (True, result) when it returned within ``seconds``,
    (False, None) when it did not (a hung driver call cannot be interrupted; it is left behind)."""
    outcome: Dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fn()
        except _Abandoned:
            pass
        except BaseException as exc:  # re-raised in the caller's thread  # pylint: disable=broad-except
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="nvml-reader", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        return False, None
    if "error" in outcome:
        raise outcome["error"]
    return True, outcome.get("result")


def read_with_deadline(nvml: Any, reading: NodeReading, timeout: float, xid_watch_seconds: float,
                       ignored_xids: Iterable[int]) -> NodeReading:
    """:meth:`NvmlReader.read` bounded by ``timeout`` (plus the XID watch window)."""
    reader = NvmlReader(nvml, reading)
    finished, unused_result = run_with_deadline(lambda: reader.read(xid_watch_seconds, ignored_xids),
                                                timeout + xid_watch_seconds)
    if finished:
        return reading
    reader.abandoned = True
    snapshot = copy.deepcopy(reading)
    snapshot.timed_out = True
    snapshot.timeout_seconds = timeout + xid_watch_seconds
    return snapshot


# ---- verdict ------------------------------------------------------------------------------

_INIT_FAILURES: Dict[int, Tuple[str, str, str]] = {
    NVML_ERROR_LIBRARY_NOT_FOUND: (
        "nvml_library_missing",
        "NVML library libnvidia-ml.so.1 could not be loaded: the NVIDIA driver's user-space "
        "libraries are not installed or not on the loader path",
        "Install the NVIDIA driver on the node (its libnvidia-ml.so.1), or set driver_root to the "
        "driver container's root (e.g. /run/nvidia/driver) when the GPU Operator manages the driver.",
    ),
    NVML_ERROR_DRIVER_NOT_LOADED: (
        "driver_not_loaded",
        "NVML cannot reach the NVIDIA kernel driver: the nvidia kernel module is not loaded",
        "Load the driver with 'modprobe nvidia' and check 'dmesg | grep -i nvrm' if it fails; if "
        "the module is missing for the running kernel, reinstall the driver (DKMS) and reboot.",
    ),
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: (
        "driver_library_mismatch",
        "The NVIDIA user-space library and the loaded kernel module are different versions "
        "(typically a driver upgrade without a reboot)",
        "Reload the NVIDIA kernel modules (stop GPU workloads and nvidia-persistenced, then "
        "'rmmod nvidia_uvm nvidia_drm nvidia_modeset nvidia && modprobe nvidia') or reboot the node.",
    ),
    NVML_ERROR_NO_PERMISSION: (
        "no_permission",
        "NVML was refused access to the GPUs (no permission on /dev/nvidiactl and /dev/nvidia*)",
        "Run the check as root (become: true), or give its user access to /dev/nvidia* "
        "(device file mode and group set by the driver's NVreg_DeviceFileMode/Gid parameters).",
    ),
}


def _init_finding(reading: NodeReading) -> Finding:
    code = reading.init_error if reading.init_error is not None else NVML_ERROR_UNKNOWN
    known = _INIT_FAILURES.get(code)
    if known is None:
        return Finding(
            "nvml_init_failed", SEVERITY_ERROR,
            "NVML could not start: %s returned %s" % (reading.init_call or "nvmlInit", nvml_error_name(code)),
            "Check 'nvidia-smi' and 'dmesg | grep -i nvrm' on the node; reinstall the driver or "
            "reboot if nvidia-smi fails the same way.")
    finding_code, message, action = known
    details: List[str] = []
    if finding_code == "nvml_library_missing":
        if reading.library_search_root:
            message = "NVML library %s was not found under driver root %s" % (
                NVML_LIBRARY_NAME, reading.library_search_root)
        if reading.init_detail:
            details.append(reading.init_detail)
    elif finding_code == "driver_library_mismatch":
        details.append("kernel module %s, library %s" % (
            reading.kernel_module_version or "unknown", reading.library_version or "unknown"))
    elif finding_code == "driver_not_loaded" and reading.kernel_module_version is None:
        details.append("/proc/driver/nvidia/version is absent")
    if reading.init_call and reading.init_call != "nvmlInit":
        details.append("%s returned %s" % (reading.init_call, nvml_error_name(code)))
    if details:
        message = "%s (%s)" % (message, "; ".join(details))
    return Finding(finding_code, SEVERITY_ERROR, message, action)


def _timeout_finding(reading: NodeReading) -> Finding:
    return Finding(
        "nvml_timeout", SEVERITY_ERROR,
        "NVML did not answer within %ss (call in progress: %s): the driver is hung"
        % (_seconds(reading.timeout_seconds), reading.call_in_progress or "unknown"),
        "Check 'dmesg | grep -i xid' for the failing GPU; drain the node and reboot it. "
        "If only one GPU hangs again after the reboot, have it serviced.")


def _seconds(value: float) -> str:
    return ("%g" % value) if value else "0"


def _driver_findings(reading: NodeReading, expect: Expectations) -> List[Finding]:
    findings: List[Finding] = []
    if expect.min_driver_version and reading.driver_version:
        have = version_tuple(reading.driver_version)
        want = version_tuple(expect.min_driver_version)
        if have is not None and want is not None and have < want:
            findings.append(Finding(
                "driver_too_old", SEVERITY_ERROR,
                "NVIDIA driver %s is older than the required %s" % (reading.driver_version, expect.min_driver_version),
                "Upgrade the NVIDIA driver to %s or later, then reboot (or reload the kernel modules)."
                % expect.min_driver_version))
    expected = expect.expected_gpu_count
    if reading.gpu_count is not None and (
            reading.gpu_count != expected if expected is not None else reading.gpu_count == 0):
        fewer = expected is None or reading.gpu_count < expected
        findings.append(Finding(
            "gpu_count_mismatch", SEVERITY_ERROR,
            "NVML sees %d GPU(s), expected %s" % (
                reading.gpu_count, expected if expected is not None else "at least one"),
            "Compare with 'lspci -d 10de:' and look in dmesg for GPUs that failed to initialise or fell "
            "off the bus (Xid 79); reseat or replace the missing GPU and reboot." if fewer else
            "Check that expected_gpu_count matches this node's hardware."))
    return findings


def _gpu_findings(gpu: GpuReading, expect: Expectations) -> List[Finding]:
    label = gpu.label()
    if gpu.lost:
        return [Finding(
            "gpu_lost", SEVERITY_ERROR,
            "%s is lost: NVML answers GPU_IS_LOST, the GPU has fallen off the bus" % label,
            "Drain the node and reboot it; if the GPU is lost again, check dmesg for Xid 79 and have it "
            "reseated or replaced.", gpu.index)]
    findings: List[Finding] = []
    findings.extend(_memory_findings(gpu, label))
    findings.extend(_mode_findings(gpu, label, expect))
    findings.extend(_read_error_findings(gpu, label))
    return findings


def _memory_findings(gpu: GpuReading, label: str) -> List[Finding]:
    findings: List[Finding] = []
    volatile = gpu.ecc_volatile_uncorrected or 0
    aggregate = gpu.ecc_aggregate_uncorrected or 0
    if volatile > 0:
        findings.append(Finding(
            "ecc_uncorrectable", SEVERITY_ERROR,
            "%s had %d uncorrectable ECC error(s) since the driver loaded (%d over its lifetime)"
            % (label, volatile, aggregate),
            "Drain the GPU's workloads and reset it ('nvidia-smi -r -i %d') or reboot the node; if "
            "uncorrectable errors come back, have the GPU replaced." % gpu.index, gpu.index))
    elif aggregate > 0:
        findings.append(Finding(
            "ecc_uncorrectable", SEVERITY_WARNING,
            "%s has %d uncorrectable ECC error(s) over its lifetime, none since the driver loaded"
            % (label, aggregate),
            "No action needed now; if the lifetime count keeps rising, have the GPU replaced.", gpu.index))
    if gpu.retired_pages_pending:
        findings.append(Finding(
            "retired_pages_pending", SEVERITY_WARNING,
            "%s has memory pages waiting to be retired (%s single-bit, %s double-bit pages retired so far)"
            % (label, _count(gpu.retired_pages_single_bit), _count(gpu.retired_pages_double_bit)),
            "Drain the GPU and reset it ('nvidia-smi -r -i %d') or reboot the node so the pending "
            "retirement takes effect." % gpu.index, gpu.index))
    if gpu.remapped_rows_failure:
        findings.append(Finding(
            "remapped_rows_failure", SEVERITY_ERROR,
            "%s failed to remap a memory row (no spare rows left)" % label,
            "Drain the node and have the GPU replaced: it can no longer isolate bad memory rows.", gpu.index))
    if gpu.remapped_rows_pending:
        findings.append(Finding(
            "remapped_rows_pending", SEVERITY_WARNING,
            "%s has a memory row remapping waiting for a GPU reset (%s uncorrectable, %s correctable rows "
            "remapped)" % (label, _count(gpu.remapped_rows_uncorrectable), _count(gpu.remapped_rows_correctable)),
            "Drain the GPU and reset it ('nvidia-smi -r -i %d') or reboot the node so the remapping "
            "takes effect." % gpu.index, gpu.index))
    return findings


def _mode_findings(gpu: GpuReading, label: str, expect: Expectations) -> List[Finding]:
    findings: List[Finding] = []
    if gpu.persistence_mode is False:
        findings.append(Finding(
            "persistence_mode_off",
            SEVERITY_ERROR if expect.require_persistence_mode else SEVERITY_WARNING,
            "%s has persistence mode off: the driver tears the GPU down whenever no client holds it"
            % label,
            "Start the persistence daemon: 'systemctl enable --now nvidia-persistenced' "
            "(or 'nvidia-smi -pm 1' until the next reboot).", gpu.index))
    if gpu.mig_mode_current is not None and gpu.mig_mode_pending is not None \
            and gpu.mig_mode_current != gpu.mig_mode_pending:
        findings.append(Finding(
            "mig_mode_pending", SEVERITY_WARNING,
            "%s has MIG mode %s but %s is pending" % (
                label, _on_off(gpu.mig_mode_current), _on_off(gpu.mig_mode_pending)),
            "Stop the GPU's workloads and reset it ('nvidia-smi -r -i %d') or reboot the node to apply "
            "the MIG mode change." % gpu.index, gpu.index))
    return findings


def _read_error_findings(gpu: GpuReading, label: str) -> List[Finding]:
    if not gpu.read_errors:
        return []
    fields = ", ".join("%s (%s)" % item for item in sorted(gpu.read_errors.items()))
    if any(err == nvml_error_name(NVML_ERROR_NO_PERMISSION) for err in gpu.read_errors.values()):
        return [Finding(
            "no_permission", SEVERITY_WARNING,
            "%s: NVML refused some reads: %s" % (label, fields),
            "Run the check as root (become: true) to read every field.", gpu.index)]
    return [Finding(
        "nvml_query_failed", SEVERITY_WARNING,
        "%s: NVML could not read %s" % (label, fields),
        "Compare with 'nvidia-smi -q -i %d'; if nvidia-smi fails the same way, check dmesg for Xid "
        "errors and reset the GPU or reboot." % gpu.index, gpu.index)]


def _xid_findings(reading: NodeReading, gpus: Dict[int, GpuReading]) -> List[Finding]:
    critical: Dict[Optional[int], List[int]] = {}
    for event in reading.xid_events:
        if not event.ignored:
            critical.setdefault(event.gpu, [])
            if event.xid not in critical[event.gpu]:
                critical[event.gpu].append(event.xid)
    findings: List[Finding] = []
    for index in sorted(critical, key=lambda i: -1 if i is None else i):
        xids = critical[index]
        described = ", ".join(
            "%d (%s)" % (xid, XID_DESCRIPTIONS[xid]) if xid in XID_DESCRIPTIONS else str(xid) for xid in xids)
        where = gpus[index].label() if index in gpus else "an unidentified GPU"
        findings.append(Finding(
            "critical_xid", SEVERITY_ERROR,
            "%s raised critical XID %s during the %ss watch" % (where, described, _seconds(reading.xid_watch_seconds)),
            "Read 'dmesg | grep -i xid' for context; drain the node and reset the GPU or reboot. An XID that "
            "comes back after a reboot (48, 63, 64, 74, 79, 92, 94, 95) means the GPU needs service.", index))
    if reading.xid_watch_error:
        findings.append(Finding(
            "xid_watch_unavailable", SEVERITY_WARNING,
            "The XID watch was incomplete: %s" % reading.xid_watch_error,
            "Check XIDs in the kernel log instead: 'dmesg | grep -i xid'."))
    return findings


def _count(value: Optional[int]) -> str:
    return "unknown" if value is None else str(value)


def _on_off(value: Optional[bool]) -> str:
    return "enabled" if value else "disabled"


def assess(reading: NodeReading, expect: Expectations) -> List[Finding]:
    """The findings for a reading: node-level first, then per GPU in index order."""
    findings: List[Finding] = []
    if reading.timed_out:
        findings.append(_timeout_finding(reading))
    if reading.init_error is not None:
        findings.append(_init_finding(reading))
        return findings
    findings.extend(_driver_findings(reading, expect))
    for gpu in reading.gpus:
        findings.extend(_gpu_findings(gpu, expect))
    findings.extend(_xid_findings(reading, {gpu.index: gpu for gpu in reading.gpus}))
    return findings


def is_healthy(findings: Sequence[Finding]) -> bool:
    """Healthy when no finding is an error; warnings do not make a node unhealthy."""
    return not any(finding.severity == SEVERITY_ERROR for finding in findings)


# ---- gathering (the module's body) --------------------------------------------------------

def read_kernel_module_version(node_root: str) -> Optional[str]:
    try:
        with open(node_path(node_root, PROC_DRIVER_VERSION)) as handle:
            return parse_kernel_module_version(handle.read())
    except (OSError, UnicodeDecodeError):
        return None


def preload_driver_root_library(reading: NodeReading, driver_root: str, display_root: str) -> bool:
    """Find libnvidia-ml.so.1 under ``driver_root`` and load it with RTLD_GLOBAL before pynvml
    does: pynvml's dlopen("libnvidia-ml.so.1") then returns this already-loaded library (the
    loader matches loaded objects by soname). False (and init_error set) when it cannot be loaded."""
    reading.library_search_root = display_root
    if not os.path.isdir(driver_root):
        reading.init_error = NVML_ERROR_LIBRARY_NOT_FOUND
        reading.init_detail = "%s is not a directory: is the driver container running?" % display_root
        return False
    path = find_nvml_library(driver_root)
    if path is None:
        reading.init_error = NVML_ERROR_LIBRARY_NOT_FOUND
        return False
    try:
        ctypes.CDLL(path, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
    except OSError as exc:
        reading.init_error = NVML_ERROR_LIBRARY_NOT_FOUND
        reading.init_detail = "loading %s failed: %s" % (path, exc)
        return False
    reading.library_path = path
    return True


def result_of(reading: NodeReading, findings: Sequence[Finding]) -> Dict[str, Any]:
    """The module's return values."""
    return {
        "changed": False,
        "healthy": is_healthy(findings),
        "findings": [finding.to_result() for finding in findings],
        "driver_version": reading.driver_version,
        "cuda_driver_version": reading.cuda_driver_version,
        "nvml_version": reading.nvml_version,
        "kernel_module_version": reading.kernel_module_version,
        "library_path": reading.library_path,
        "gpu_count": reading.gpu_count,
        "gpus": [gpu.to_result(reading.xid_events) for gpu in reading.gpus],
        "xid_watch": {
            "seconds": reading.xid_watch_seconds,
            "events": [event.to_result() for event in reading.xid_events],
            "error": reading.xid_watch_error,
        },
    }


def gather_nvml_info(params: Dict[str, Any], nvml: Any = None, timeout_option: str = "timeout") -> Dict[str, Any]:
    """Validate the options, read NVML under a deadline and return the module result.

    Raises InvalidOptionError for bad options only; an unhealthy node is reported, not raised.
    """
    expect = build_expectations(params)
    node_root, driver_root = check_paths(params)
    xid_watch_seconds, timeout = check_durations(params, timeout_option)
    reading = NodeReading(kernel_module_version=read_kernel_module_version(node_root))
    nvml = nvml if nvml is not None else pynvml
    if driver_root is None or preload_driver_root_library(reading, driver_root, params["driver_root"]):
        reading = read_with_deadline(nvml, reading, timeout, xid_watch_seconds, expect.ignored_xids)
    return result_of(reading, assess(reading, expect))
