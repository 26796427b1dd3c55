"""The lab's simulated nodes: a kubelet per node (a real API client of the real API server)
that runs NVIDIA's real device plugin in its pods, all in one event loop of the lab daemon.
See docs/LAB.md.

``NodeFleet`` (and ``FaultError``) load gRPC and aiohttp on first use; the fault names and the
node layout do not.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .faults import CRASH_SIGNATURES, NODE_FAULTS, POD_FAULTS, nvml_faults, runtime_fault_names
from .layout import NodeLayout, SocketPathTooLong, max_state_dir_length

if TYPE_CHECKING:  # loaded lazily below; named here for readers and linters
    from .agent import FaultError, NodeFleet

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
        from . import agent

        return getattr(agent, name)
    raise AttributeError(name)
