"""NVML as the simulated device plugins see it: unmodified pynvml over the lab's libnvidia-ml.so.1.

One daemon process serves every node, so the lab library's process-wide state path is switched
with ``gpunodeLabSetStatePath`` before each handle-less call (init, shutdown, count, handle by
index, event set creation), under one lock. Calls on a device handle or an event set are bound
to the node they came from and need no switch.
"""
from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pynvml

_ERROR_NAMES: Dict[int, str] = {
    getattr(pynvml, name): name[len("NVML_"):]
    for name in dir(pynvml)
    if name.startswith("NVML_ERROR_") and isinstance(getattr(pynvml, name), int)
}


def error_name(err: BaseException) -> str:
    """Go-NVML's spelling of an NVML return code (``ERROR_DRIVER_NOT_LOADED``)."""
    code = getattr(err, "value", None)
    if isinstance(code, int):
        return _ERROR_NAMES.get(code, "ERROR_UNKNOWN")
    return "ERROR_UNKNOWN"


def default_library_path() -> str:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo, ".build", "lab", "lib", "libnvidia-ml.so.1")


@dataclass
class GpuDevice:
    index: int
    uuid: str
    numa_node: Optional[int]
    minor_number: Optional[int] = None
    pci_bus_id: str = ""
    name: str = ""


@dataclass
class NvmlProbe:
    """What the plugin learns from NVML at start."""

    init_error: Optional[str] = None  # ERROR_* when nvmlInit failed
    enumerate_error: Optional[str] = None  # a device could not be read (lost GPU, ...)
    driver_version: str = ""
    devices: List[GpuDevice] = field(default_factory=list)


@dataclass
class EventWatch:
    """An NVML event set registered for XID events on one node's GPUs (holds an nvmlInit)."""

    state_path: str
    event_set: object
    closed: bool = False


class NvmlGateway:
    """Process-wide access to the lab NVML for all simulated nodes."""

    def __init__(self, library_path: Optional[str] = None) -> None:
        path = library_path or default_library_path()
        if not os.path.exists(path):
            raise FileNotFoundError(
                "lab NVML library %s is missing: build it with `make lab-nvml`" % path
            )
        # Load by absolute path; pynvml's dlopen("libnvidia-ml.so.1") then finds it by soname.
        self._lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        if pynvml.nvmlLib is None:
            pynvml.nvmlLib = self._lib
        self._set_state_path = self._lib.gpunodeLabSetStatePath
        self._set_state_path.argtypes = [ctypes.c_char_p]
        self._set_state_path.restype = ctypes.c_int
        self.library_path = path
        self._lock = threading.Lock()

    def _bind(self) -> None:
        if pynvml.nvmlLib is not self._lib:
            # another user of pynvml in this process (a test) bound another library: rebind
            pynvml.nvmlLib = self._lib
            pynvml._nvmlGetFunctionPointer_cache.clear()

    def _select(self, state_path: str) -> None:
        self._bind()
        self._set_state_path(state_path.encode())

    def probe(self, state_path: str) -> NvmlProbe:
        """nvmlInit, the driver version and every GPU's UUID, then nvmlShutdown."""
        result = NvmlProbe()
        with self._lock:
            self._select(state_path)
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as err:
                result.init_error = error_name(err)
                return result
            try:
                result.driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
                count = pynvml.nvmlDeviceGetCount()
                for index in range(count):
                    try:
                        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                        uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
                    except pynvml.NVMLError as err:
                        result.enumerate_error = "error getting device handle for index '%d': %s" % (
                            index,
                            error_name(err),
                        )
                        result.devices = []
                        return result
                    result.devices.append(
                        GpuDevice(
                            index=index,
                            uuid=uuid,
                            numa_node=_numa_node(index, count),
                            minor_number=_optional(pynvml.nvmlDeviceGetMinorNumber, handle),
                            pci_bus_id=_text(_optional(lambda h: pynvml.nvmlDeviceGetPciInfo(h).busId, handle) or ""),
                            name=_text(_optional(pynvml.nvmlDeviceGetName, handle) or ""),
                        )
                    )
            except pynvml.NVMLError as err:
                result.enumerate_error = "error getting device count: %s" % error_name(err)
                result.devices = []
            finally:
                self._select(state_path)
                try:
                    pynvml.nvmlShutdown()
                except pynvml.NVMLError:
                    pass
        return result

    def open_events(self, state_path: str, uuids: List[str]) -> Tuple[Optional[EventWatch], List[str]]:
        """An event set for XIDs on ``uuids``; returns it and the UUIDs that could not register."""
        failed: List[str] = []
        with self._lock:
            self._select(state_path)
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError:
                return None, list(uuids)
            try:
                event_set = pynvml.nvmlEventSetCreate()
            except pynvml.NVMLError:
                pynvml.nvmlShutdown()
                return None, list(uuids)
            for uuid in uuids:
                try:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
                    supported = pynvml.nvmlDeviceGetSupportedEventTypes(handle)
                    wanted = pynvml.nvmlEventTypeXidCriticalError & supported
                    pynvml.nvmlDeviceRegisterEvents(handle, wanted, event_set)
                except pynvml.NVMLError:
                    failed.append(uuid)
        return EventWatch(state_path=state_path, event_set=event_set), failed

    def poll_events(self, watch: EventWatch) -> List[Tuple[str, int]]:
        """Every XID event queued for this set since the last poll: (GPU UUID, XID)."""
        events: List[Tuple[str, int]] = []
        if watch.closed:
            return events
        self._bind()
        while True:
            try:
                data = pynvml.nvmlEventSetWait_v2(watch.event_set, 0)
            except pynvml.NVMLError_Timeout:
                return events
            if data.eventType != pynvml.nvmlEventTypeXidCriticalError:
                continue
            try:
                uuid = _text(pynvml.nvmlDeviceGetUUID(data.device))
            except pynvml.NVMLError:
                uuid = ""
            events.append((uuid, int(data.eventData)))

    def close_events(self, watch: Optional[EventWatch]) -> None:
        if watch is None or watch.closed:
            return
        watch.closed = True
        with self._lock:
            try:
                pynvml.nvmlEventSetFree(watch.event_set)
            except pynvml.NVMLError:
                pass
            self._select(watch.state_path)
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional(call, handle):  # type: ignore[no-untyped-def]
    try:
        return call(handle)
    except pynvml.NVMLError:
        return None


def _numa_node(index: int, count: int) -> int:
    """Two sockets, GPUs split evenly between them (as on a DGX/HGX board)."""
    return 0 if count < 2 else (index * 2) // count
