"""Fault names of the node runtime (kept free of heavy imports: the CLI and an API-only daemon
read them without loading gRPC or NVML)."""
from __future__ import annotations

from typing import List

# Faults of the plugin container; they belong to the node's plugin pod (the current one, or the
# next one started) and go away with it when it is deleted, unless set with sticky=true.
POD_FAULTS = ("plugin_crash", "plugin_hang", "plugin_stale", "plugin_no_devices", "stale_socket_file")
CRASH_SIGNATURES = ("nvml_init_failed", "incompatible_strategy", "registration_failed")
NODE_FAULTS = POD_FAULTS + ("kubelet_restart", "kubelet_down", "runtime_missing_nvidia", "gpu_in_use")


def nvml_faults() -> List[str]:
    """The NVML faults of lab/nvml_state.py, passed through to the node's NVML state file."""
    from lab import nvml_state

    return list(nvml_state.FAULTS)


def runtime_fault_names() -> List[str]:
    return list(NODE_FAULTS) + nvml_faults()
