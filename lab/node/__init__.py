"""The node runtime of the lab: kubelet and NVIDIA device plugin stand-ins for every simulated
node, all in one event loop of the lab daemon. See docs/LAB.md.

``NodeFleet`` (and ``FaultError``) load gRPC and NVML on first use; the fault names and the
node layout do not.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .faults import CRASH_SIGNATURES, NODE_FAULTS, POD_FAULTS, nvml_faults, runtime_fault_names
from .layout import NodeLayout, SocketPathTooLong, max_state_dir_length

if TYPE_CHECKING:  # loaded lazily below; named here for readers and linters
    from .runtime import FaultError, NodeFleet

__all__ = [
    "CRASH_SIGNATURES",
    "FaultError",
    "NODE_FAULTS",
    "NodeFleet",
    "NodeLayout",
    "POD_FAULTS",
    "SocketPathTooLong",
    "max_state_dir_length",
    "nvml_faults",
    "runtime_fault_names",
]


def __getattr__(name: str) -> Any:
    if name in ("NodeFleet", "FaultError"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(name)
