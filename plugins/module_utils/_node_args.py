# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""The argument specs of the node-side modules, in one place.

nvml_info, container_runtime_info and device_plugin_probe each take one of them; node_info takes
all three, with the two names that would be ambiguous there prefixed (``nvml_timeout``,
``runtime_config_path``) and ``expected_device_ids`` without a default (unset: NVML's UUIDs).
Node-side code: runs on Python 3.9.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import copy
from typing import Any, Dict

NODE_ROOT: Dict[str, Any] = dict(node_root=dict(type="path", default="/"))

NVML_ARGS: Dict[str, Any] = dict(
    NODE_ROOT,
    driver_root=dict(type="path"),
    expected_gpu_count=dict(type="int"),
    min_driver_version=dict(type="str"),
    require_persistence_mode=dict(type="bool", default=False),
    xid_watch_seconds=dict(type="float", default=0),
    ignored_xids=dict(type="list", elements="int", default=[13, 31, 43, 45, 68, 109]),
    timeout=dict(type="float", default=60),
)

RUNTIME_ARGS: Dict[str, Any] = dict(
    NODE_ROOT,
    runtime=dict(type="str", default="auto", choices=["auto", "containerd", "k3s", "rke2", "crio"]),
    config_path=dict(type="path"),
    handler_name=dict(type="str", default="nvidia"),
    require_default_runtime=dict(type="bool", default=True),
)

PROBE_ARGS: Dict[str, Any] = dict(
    NODE_ROOT,
    kubelet_root_dir=dict(type="path", default="/var/lib/kubelet"),
    resource_name=dict(type="str", default="nvidia.com/gpu"),
    plugin_socket_name=dict(type="str", default="nvidia-gpu.sock"),
    expected_device_ids=dict(type="list", elements="str", default=[]),
    deadline=dict(type="float", default=5.0),
)

# node_info's name for an option of one check, where the plain name would be ambiguous
NODE_INFO_RENAMED: Dict[str, str] = {"timeout": "nvml_timeout", "config_path": "runtime_config_path"}


def spec(args: Dict[str, Any]) -> Dict[str, Any]:
    """A fresh copy (AnsibleModule may write into the spec it gets)."""
    return copy.deepcopy(args)


def node_info_spec(checks: Any) -> Dict[str, Any]:
    """node_info's spec: ``checks`` plus every option of the three checks."""
    result: Dict[str, Any] = dict(checks=dict(type="list", elements="str", choices=list(checks), default=list(checks)))
    for args in (NVML_ARGS, RUNTIME_ARGS, PROBE_ARGS):
        for name, option in args.items():
            result[NODE_INFO_RENAMED.get(name, name)] = copy.deepcopy(option)
    result["expected_device_ids"] = dict(type="list", elements="str")
    return result
