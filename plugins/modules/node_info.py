#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: node_info
short_description: Read a GPU node's driver, container runtime and device plugin link in one pass
version_added: 0.1.0
description:
  - Runs on the GPU node and does, in one Python process, what M(gpunode.bringup.nvml_info),
    M(gpunode.bringup.container_runtime_info) and M(gpunode.bringup.device_plugin_probe) do one
    by one. Each part's result is the result that module returns (RV(nvml), RV(runtime),
    RV(probe)), so anything written against one of them reads the same here.
  - One module run per node instead of three is what a fleet-wide check costs less with (each
    module run starts a Python on the node). The roles of this collection gather evidence with
    this module.
  - The probe compares the plugin's devices with the GPU UUIDs NVML listed in the same run,
    unless O(expected_device_ids) is given.
  - Options have the names and meaning they have in the three modules. An unhealthy node is data
    (RV(healthy), RV(findings)); the module fails only for a bad option or a Python library a
    selected check needs and the node lacks, and the message then names the check.
author:
  - gpunode.bringup contributors (@gpunode)
requirements:
  - nvidia-ml-py on the node (check C(nvml))
  - tomli on Python 3.9 and 3.10 (check C(runtime); Python 3.11 has tomllib)
  - grpcio >= 1.59.0 and protobuf >= 4.25.0 on the node (check C(probe))
extends_documentation_fragment:
  - gpunode.bringup.attributes
  - gpunode.bringup.attributes.info_module
options:
  checks:
    description:
      - Which checks to run, always in the order C(nvml), C(runtime), C(probe). A check left out
        returns V(null).
    type: list
    elements: str
    choices: [nvml, runtime, probe]
    default: [nvml, runtime, probe]
  node_root:
    description:
      - Directory that stands for the node's C(/) for every check. V(/) on a real node; a
        simulated node's root in the lab.
    type: path
    default: /
  driver_root:
    description: As O(gpunode.bringup.nvml_info#module:driver_root).
    type: path
  expected_gpu_count:
    description: As O(gpunode.bringup.nvml_info#module:expected_gpu_count).
    type: int
  min_driver_version:
    description: As O(gpunode.bringup.nvml_info#module:min_driver_version).
    type: str
  require_persistence_mode:
    description: As O(gpunode.bringup.nvml_info#module:require_persistence_mode).
    type: bool
    default: false
  xid_watch_seconds:
    description: As O(gpunode.bringup.nvml_info#module:xid_watch_seconds).
    type: float
    default: 0
  ignored_xids:
    description: As O(gpunode.bringup.nvml_info#module:ignored_xids).
    type: list
    elements: int
    default: [13, 31, 43, 45, 68, 109]
  nvml_timeout:
    description: As O(gpunode.bringup.nvml_info#module:timeout) (seconds the NVML read may take).
    type: float
    default: 60
  runtime:
    description: As O(gpunode.bringup.container_runtime_info#module:runtime).
    type: str
    choices: [auto, containerd, k3s, rke2, crio]
    default: auto
  runtime_config_path:
    description: As O(gpunode.bringup.container_runtime_info#module:config_path).
    type: path
  handler_name:
    description: As O(gpunode.bringup.container_runtime_info#module:handler_name).
    type: str
    default: nvidia
  require_default_runtime:
    description: As O(gpunode.bringup.container_runtime_info#module:require_default_runtime).
    type: bool
    default: true
  kubelet_root_dir:
    description: As O(gpunode.bringup.device_plugin_probe#module:kubelet_root_dir).
    type: path
    default: /var/lib/kubelet
  resource_name:
    description: As O(gpunode.bringup.device_plugin_probe#module:resource_name).
    type: str
    default: nvidia.com/gpu
  plugin_socket_name:
    description: As O(gpunode.bringup.device_plugin_probe#module:plugin_socket_name).
    type: str
    default: nvidia-gpu.sock
  expected_device_ids:
    description:
      - As O(gpunode.bringup.device_plugin_probe#module:expected_device_ids).
      - Unset, the GPU UUIDs the C(nvml) check read in this run (none when it did not run or
        NVML could not be read, which skips the comparison).
    type: list
    elements: str
  deadline:
    description: As O(gpunode.bringup.device_plugin_probe#module:deadline).
    type: float
    default: 5.0
attributes:
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: posix
notes:
  - Needs read access to the kubelet's directories and the runtime's configuration, root-only on
    most nodes (C(become=true)).
seealso:
  - module: gpunode.bringup.nvml_info
  - module: gpunode.bringup.container_runtime_info
  - module: gpunode.bringup.device_plugin_probe
"""

EXAMPLES = r"""
- name: Read everything the node side knows, in one module run
  gpunode.bringup.node_info:
  become: true
  register: node

- name: Say what is wrong, check by check
  ansible.builtin.debug:
    msg: "{{ node.findings | map(attribute='source') | zip(node.findings | map(attribute='message')) | list }}"
  when: not node.healthy

- name: A MicroK8s node with a GPU Operator driver, no runtime check
  gpunode.bringup.node_info:
    checks: [nvml, probe]
    driver_root: /run/nvidia/driver
    kubelet_root_dir: /var/snap/microk8s/common/var/lib/kubelet
    expected_gpu_count: 8
  become: true
"""

RETURN = r"""
healthy:
  description: True when every check that ran is healthy.
  returned: always
  type: bool
  sample: true
findings:
  description:
    - The findings of every check that ran, in check order, each with C(source) (C(nvml),
      C(runtime) or C(probe)) added to the fields that check gives its findings.
  returned: always
  type: list
  elements: dict
  sample:
    - source: probe
      code: plugin_socket_missing
      message: plugin socket /var/lib/kubelet/device-plugins/nvidia-gpu.sock does not exist
      action: check the device plugin pod on this node
      evidence: {}
checks:
  description: The checks that ran, in order.
  returned: always
  type: list
  elements: str
  sample: [nvml, runtime, probe]
nvml:
  description: What M(gpunode.bringup.nvml_info) returns (C(healthy), C(findings), C(gpus), ...); null when not run.
  returned: always
  type: dict
runtime:
  description: What M(gpunode.bringup.container_runtime_info) returns; null when not run.
  returned: always
  type: dict
probe:
  description: What M(gpunode.bringup.device_plugin_probe) returns; null when not run.
  returned: always
  type: dict
seconds:
  description: Time each check took, and the total.
  returned: always
  type: dict
  sample: {"nvml": 0.031, "runtime": 0.004, "probe": 0.012, "total": 0.047}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpunode.bringup.plugins.module_utils._node_info import (
    CHECKS,
    gather_node_info,
    missing_libraries,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._module import require_library, run_module
from ansible_collections.gpunode.bringup.plugins.module_utils._node_args import node_info_spec


def main():
    module = AnsibleModule(
        argument_spec=node_info_spec(CHECKS),
        supports_check_mode=True,
    )
    for check, library, error in missing_libraries(module.params["checks"]):
        require_library(module, "%s (needed by check %s)" % (library, check), False, error)
    run_module(module, lambda: gather_node_info(module.params))


if __name__ == "__main__":
    main()
