#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: nvml_info
short_description: Read the NVIDIA driver and GPU health of a node through NVML
version_added: 0.1.0
description:
  - Runs on the GPU node. Loads NVML (C(libnvidia-ml.so.1)) through pynvml and reports the
    driver, CUDA and NVML versions, the kernel module version from C(/proc/driver/nvidia/version),
    and per GPU its identity, memory, persistence, MIG and ECC modes, ECC error counters, retired
    pages, remapped rows, temperature and power draw.
  - Gives a verdict, RV(healthy) and RV(findings), in the operator's words, each finding with the next
    action. Checks the GPU count and driver version against O(expected_gpu_count) and
    O(min_driver_version), and optionally watches for critical XID events for O(xid_watch_seconds).
  - An unhealthy node is data, not a failure; the module fails only for bad options or when the
    C(nvidia-ml-py) Python library is missing. No NVML error becomes a traceback.
  - A field the GPU does not support is V(null).
author:
  - gpunode.bringup contributors (@gpunode)
requirements:
  - nvidia-ml-py (the C(pynvml) module) on the node's Python
  - the NVIDIA driver's C(libnvidia-ml.so.1) on the node (on the loader path, or under O(driver_root))
extends_documentation_fragment:
  - gpunode.bringup.attributes
  - gpunode.bringup.attributes.info_module
options:
  node_root:
    description:
      - Directory that stands for the node's C(/) when reading node files such as
        C(/proc/driver/nvidia/version). V(/) on a real node; a simulated node's root in the lab.
      - Does not change where NVML comes from; see O(driver_root).
    type: path
    default: /
  driver_root:
    description:
      - Root of a containerised driver, as the device plugin's C(--driver-root), for example
        V(/run/nvidia/driver) with the GPU Operator. An absolute path on the node (below O(node_root)).
      - The module finds C(libnvidia-ml.so.1) under it (C(usr/lib64), C(usr/lib/x86_64-linux-gnu), ...,
        then a bounded search) and loads that library instead of the one on the loader path.
      - A missing directory or library gives the finding C(nvml_library_missing), not a failure.
      - Unset, NVML is loaded by name from the loader path.
    type: path
  expected_gpu_count:
    description:
      - Number of GPUs the node should have. A different count gives C(gpu_count_mismatch).
      - Unset, only a node with no GPU at all gives C(gpu_count_mismatch).
    type: int
  min_driver_version:
    description:
      - Oldest acceptable driver version, such as V(550.54.15) or V(535). An older driver gives C(driver_too_old).
    type: str
  require_persistence_mode:
    description:
      - Whether persistence mode off is an error (V(true)) or a warning (V(false)) in C(persistence_mode_off).
    type: bool
    default: false
  xid_watch_seconds:
    description:
      - Register every GPU for critical XID events and collect those NVML delivers during this many
        seconds. Non-ignored XIDs give C(critical_xid). V(0) does not watch.
      - The module then runs at least this long.
    type: float
    default: 0
  ignored_xids:
    description:
      - XIDs reported but not counted as critical; the default is the list NVIDIA's device plugin
        ignores as application errors.
    type: list
    elements: int
    default: [13, 31, 43, 45, 68, 109]
  timeout:
    description:
      - Seconds to wait for NVML to answer (the XID watch window comes on top). A driver that does
        not answer in time gives the finding C(nvml_timeout) with the call that hung.
    type: float
    default: 60
attributes:
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: posix
    details: Linux nodes with an NVIDIA driver.
notes:
  - Findings and their severity. Errors make RV(healthy) false, warnings do not.
  - "Node: C(nvml_library_missing), C(driver_not_loaded), C(driver_library_mismatch), C(no_permission),
    C(nvml_init_failed), C(nvml_timeout), C(driver_too_old), C(gpu_count_mismatch): error."
  - "Per GPU: C(gpu_lost), C(ecc_uncorrectable) (volatile count), C(remapped_rows_failure), C(critical_xid):
    error. C(ecc_uncorrectable) (lifetime count only), C(retired_pages_pending), C(remapped_rows_pending),
    C(mig_mode_pending), C(no_permission) (some fields), C(nvml_query_failed), C(xid_watch_unavailable):
    warning. C(persistence_mode_off): warning, error with O(require_persistence_mode)."
seealso:
  - module: gpunode.bringup.container_runtime_info
  - name: NVML API reference
    description: The NVIDIA Management Library that this module reads.
    link: https://docs.nvidia.com/deploy/nvml-api/
  - name: Xid errors
    description: NVIDIA's catalog of XID events.
    link: https://docs.nvidia.com/deploy/xid-errors/
"""

EXAMPLES = r"""
- name: Check the driver and GPUs of every GPU node
  gpunode.bringup.nvml_info:
    expected_gpu_count: 8
    min_driver_version: "550.54.15"
  become: true
  register: nvml

- name: Stop on an unhealthy node, naming the first problem and its fix
  ansible.builtin.assert:
    that: nvml.healthy
    fail_msg: "{{ nvml.findings[0].message }}. Next: {{ nvml.findings[0].action }}"

- name: Read the driver the GPU Operator runs in a container, and watch XIDs for 10 seconds
  gpunode.bringup.nvml_info:
    driver_root: /run/nvidia/driver
    xid_watch_seconds: 10
    require_persistence_mode: true
  become: true
  register: nvml

- name: List the GPUs with uncorrectable ECC errors
  ansible.builtin.debug:
    msg: "{{ nvml.gpus | selectattr('ecc_errors.volatile.uncorrected') | map(attribute='uuid') | list }}"
"""

RETURN = r"""
healthy:
  description: True when no finding has severity C(error).
  returned: always
  type: bool
  sample: true
findings:
  description: What is wrong, worst first per scope (node, then each GPU by index).
  returned: always
  type: list
  elements: dict
  contains:
    code:
      description: Stable identifier, for example C(driver_library_mismatch) or C(gpu_lost).
      type: str
      sample: gpu_lost
    severity:
      description: C(error) or C(warning).
      type: str
      sample: error
    gpu:
      description: NVML index of the GPU concerned; null for the node.
      type: int
      sample: 3
    message:
      description: What was found, naming the GPU by index, UUID and PCI bus id.
      type: str
      sample: "GPU 3 (GPU-5d0c..., 00000000:4E:00.0) is lost: NVML answers GPU_IS_LOST, the GPU has fallen off the bus"
    action:
      description: The next thing to do.
      type: str
      sample: Drain the node and reboot it; if the GPU is lost again, check dmesg for Xid 79 and have it reseated or replaced.
driver_version:
  description: Driver version NVML reports; null when NVML could not start.
  returned: always
  type: str
  sample: "550.54.15"
cuda_driver_version:
  description: Highest CUDA version the driver supports, as C(major.minor).
  returned: always
  type: str
  sample: "12.4"
nvml_version:
  description: NVML library version.
  returned: always
  type: str
  sample: "12.550.54.15"
kernel_module_version:
  description: Version of the loaded kernel module from C(/proc/driver/nvidia/version); null when absent.
  returned: always
  type: str
  sample: "550.54.15"
library_path:
  description: The C(libnvidia-ml) file the module loaded, when known.
  returned: always
  type: str
  sample: /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.550.54.15
gpu_count:
  description: Number of GPUs NVML enumerates (a lost GPU still counts); null when NVML could not start.
  returned: always
  type: int
  sample: 8
gpus:
  description: One entry per GPU, by NVML index. A field the GPU does not support is null.
  returned: always
  type: list
  elements: dict
  contains:
    index:
      description: NVML index.
      type: int
    uuid:
      description: GPU UUID, as the device plugin advertises it.
      type: str
      sample: GPU-5d0c5c5e-4c8f-3c34-7a4e-19f1a0c4b8b2
    name:
      description: Product name.
      type: str
      sample: NVIDIA A100-SXM4-80GB
    pci_bus_id:
      description: PCI bus id.
      type: str
      sample: "00000000:07:00.0"
    serial:
      description: Board serial number.
      type: str
    memory:
      description:
        - Frame buffer C(total_mib), C(used_mib) and C(reserved_mib), in MiB.
        - With drivers and nvidia-ml-py that have C(nvmlDeviceGetMemoryInfo_v2) (R510 and newer),
          C(used_mib) excludes the memory the driver and firmware reserve, as nvidia-smi's "Used"
          does, and C(reserved_mib) reports that memory. On older ones C(used_mib) includes it and
          C(reserved_mib) is null.
        - Whole MiB, rounded down (nvidia-smi rounds up, so its figures can be 1 MiB higher).
      type: dict
    persistence_mode:
      description: Whether persistence mode is on.
      type: bool
    mig_mode:
      description: MIG mode C(current) and C(pending) (booleans; null on GPUs without MIG).
      type: dict
    ecc_mode:
      description: ECC mode C(current) and C(pending) (booleans).
      type: dict
    ecc_errors:
      description: ECC error counts, C(volatile) (since the driver loaded) and C(aggregate) (lifetime),
        each with C(corrected) and C(uncorrected).
      type: dict
    retired_pages:
      description: Retired page counts C(single_bit) and C(double_bit), and C(pending) (pre-Ampere GPUs).
      type: dict
    remapped_rows:
      description: Row remapping C(correctable), C(uncorrectable) counts, C(pending) and C(failure) (Ampere and later).
      type: dict
    temperature_c:
      description: GPU core temperature in degrees Celsius.
      type: int
    power_draw_watts:
      description: Power draw in watts.
      type: float
    lost:
      description: Whether NVML answered GPU_IS_LOST for this GPU.
      type: bool
    xid_events:
      description: XIDs this GPU raised during the watch, ignored ones included.
      type: list
      elements: int
    read_errors:
      description: Fields NVML failed to read (other than unsupported ones), with the NVML error name.
      type: dict
xid_watch:
  description: The XID watch.
  returned: always
  type: dict
  contains:
    seconds:
      description: Length of the watch window; 0 when not watched.
      type: float
    events:
      description: Each critical XID event seen, with C(xid), C(gpu) (index or null), C(ignored) and C(description).
      type: list
      elements: dict
    error:
      description: Why the watch was incomplete, or null.
      type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpunode.bringup.plugins.module_utils._module import require_library, run_module
from ansible_collections.gpunode.bringup.plugins.module_utils._node_args import NVML_ARGS, spec
from ansible_collections.gpunode.bringup.plugins.module_utils._nvml import (
    HAS_PYNVML,
    PYNVML_IMPORT_ERROR,
    gather_nvml_info,
)


def main():
    module = AnsibleModule(
        argument_spec=spec(NVML_ARGS),
        supports_check_mode=True,
    )
    require_library(module, "nvidia-ml-py", HAS_PYNVML, PYNVML_IMPORT_ERROR)
    run_module(module, lambda: gather_nvml_info(module.params))


if __name__ == "__main__":
    main()
