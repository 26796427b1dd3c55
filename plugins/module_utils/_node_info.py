# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""One node-side pass: NVML, the container runtime and the device plugin probe (module node_info).

Each part returns exactly what its own module returns (nvml_info, container_runtime_info,
device_plugin_probe); this module only validates every option first, runs the parts in order and
feeds the NVML UUIDs to the probe. Node-side code: runs on Python 3.9.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ansible_collections.gpunode.bringup.plugins.module_utils import _nvml, _probe, _runtime_config
from ansible_collections.gpunode.bringup.plugins.module_utils._kubelet_api import _runtime as _grpc_runtime

CHECKS: Tuple[str, ...] = ("nvml", "runtime", "probe")


def missing_libraries(checks: Sequence[str]) -> List[Tuple[str, str, Optional[str]]]:
    """(check, library, import error) for each Python library a selected check needs and lacks."""
    missing: List[Tuple[str, str, Optional[str]]] = []
    if "nvml" in checks and not _nvml.HAS_PYNVML:
        missing.append(("nvml", "nvidia-ml-py", _nvml.PYNVML_IMPORT_ERROR))
    if "runtime" in checks and not _runtime_config.HAS_TOML:
        missing.append(("runtime", "tomli", _runtime_config.TOML_IMPORT_ERROR))
    if "probe" in checks:
        if not _grpc_runtime.HAS_PROTOBUF:
            missing.append(("probe", "protobuf", _grpc_runtime.PROTOBUF_IMPORT_ERROR))
        if not _grpc_runtime.HAS_GRPC:
            missing.append(("probe", "grpcio", _grpc_runtime.GRPC_IMPORT_ERROR))
    return missing


def nvml_params(params: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "node_root": params.get("node_root") or "/",
        "driver_root": params.get("driver_root"),
        "expected_gpu_count": params.get("expected_gpu_count"),
        "min_driver_version": params.get("min_driver_version"),
        "require_persistence_mode": bool(params.get("require_persistence_mode")),
        "xid_watch_seconds": params.get("xid_watch_seconds") or 0,
        "ignored_xids": params.get("ignored_xids"),
        "timeout": params.get("nvml_timeout"),
    }


def runtime_params(params: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "node_root": params.get("node_root") or "/",
        "runtime": params.get("runtime") or "auto",
        "config_path": params.get("runtime_config_path"),
        "handler_name": params.get("handler_name") or "nvidia",
        "require_default_runtime": params.get("require_default_runtime", True) is not False,
    }


def probe_request(params: Dict[str, Any], expected_device_ids: Sequence[str]) -> _probe.ProbeRequest:
    return _probe.ProbeRequest(
        node_root=params.get("node_root") or "/",
        kubelet_root_dir=params.get("kubelet_root_dir") or "/var/lib/kubelet",
        resource_name=params.get("resource_name") or "nvidia.com/gpu",
        plugin_socket_name=params.get("plugin_socket_name") or "nvidia-gpu.sock",
        expected_device_ids=tuple(expected_device_ids),
        deadline=float(params["deadline"]) if params.get("deadline") is not None else 5.0,
    )


def validate(params: Dict[str, Any], checks: Sequence[str]) -> None:
    """Every selected check's options, before any check reads anything (InvalidOptionError)."""
    if "nvml" in checks:
        values = nvml_params(params)
        _nvml.build_expectations(values)
        _nvml.check_paths(values)
        _nvml.check_durations(values, "nvml_timeout")
    if "runtime" in checks:
        _runtime_config.check_options(runtime_params(params), "runtime_config_path")
    if "probe" in checks:
        request = probe_request(params, params.get("expected_device_ids") or ())
        _probe.validate_request(request)
        paths = _probe.node_paths(request)
        for path, what in ((paths.kubelet_socket, "kubelet socket"), (paths.plugin_socket, "plugin socket"),
                           (paths.pod_resources_socket, "pod-resources socket")):
            _probe.check_socket_path_length(path, what)


def nvml_device_ids(nvml: Optional[Dict[str, Any]]) -> List[str]:
    """The GPU UUIDs NVML listed (what the probe compares the plugin's devices with)."""
    if not nvml:
        return []
    return [str(gpu["uuid"]) for gpu in nvml.get("gpus") or [] if isinstance(gpu, dict) and gpu.get("uuid")]


def _timed(seconds: Dict[str, float], name: str, body: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    started = time.monotonic()
    try:
        return body()
    finally:
        seconds[name] = round(time.monotonic() - started, 3)


def gather_node_info(params: Dict[str, Any], nvml_library: Any = None) -> Dict[str, Any]:
    """The module's result: each selected check's own result, their findings with ``source``."""
    started = time.monotonic()
    checks = [name for name in CHECKS if name in (params.get("checks") or CHECKS)]
    validate(params, checks)
    seconds: Dict[str, float] = {}
    parts: Dict[str, Optional[Dict[str, Any]]] = {name: None for name in CHECKS}
    if "nvml" in checks:
        parts["nvml"] = _timed(seconds, "nvml", lambda: _nvml.gather_nvml_info(
            nvml_params(params), nvml_library, timeout_option="nvml_timeout"))
    if "runtime" in checks:
        parts["runtime"] = _timed(seconds, "runtime", lambda: _runtime_config.gather_runtime_info(
            runtime_params(params), "runtime_config_path"))
    if "probe" in checks:
        expected = params.get("expected_device_ids")
        if expected is None:
            expected = nvml_device_ids(parts["nvml"])
        request = probe_request(params, expected)
        parts["probe"] = _timed(seconds, "probe", lambda: _probe.probe_node(request).to_result())
    findings: List[Dict[str, Any]] = []
    for name in checks:
        part = parts[name] or {}
        part.pop("changed", None)
        findings.extend(dict(finding, source=name) for finding in part.get("findings") or [])
    seconds["total"] = round(time.monotonic() - started, 3)
    return {
        "changed": False,
        "healthy": all((parts[name] or {}).get("healthy") is True for name in checks),
        "findings": findings,
        "checks": checks,
        "nvml": parts["nvml"],
        "runtime": parts["runtime"],
        "probe": parts["probe"],
        "seconds": seconds,
    }
