#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: device_plugin_probe
short_description: Check on a GPU node that the device plugin serves its GPUs and the kubelet has them
version_added: 0.1.0
description:
  - Runs on the node. Looks at the device plugin link from the node itself, over the kubelet's
    real gRPC contracts, and reports what it sees with evidence; it never changes anything.
  - Checks that the device plugin directory exists; that C(kubelet.sock) exists, is a socket
    and accepts a connection; that the plugin socket exists and is a socket (a regular file or
    a dead socket left behind is named as such).
  - Calls the plugin's C(GetDevicePluginOptions), then waits for the first C(ListAndWatch)
    response and cancels the stream. Every call has a deadline (O(deadline)); a plugin that
    accepts the connection and never answers is reported after one deadline.
  - Compares the plugin's devices with O(expected_device_ids) (missing, extra, unhealthy).
    Time-slicing replica IDs (C(<UUID>::<n>)) count for their GPU; MIG device IDs (C(MIG-...))
    are matched when MIG UUIDs are expected.
  - Reads the kubelet's view of the resource from the pod-resources API
    (C(GetAllocatableResources), healthy devices only); on a kubelet that answers
    C(UNIMPLEMENTED) or has no pod-resources socket it falls back to C(Data.RegisteredDevices)
    of C(device-plugins/kubelet_internal_checkpoint), read-only.
  - Detects a stale registration (C(kubelet.sock) newer than the plugin socket, so the kubelet
    restarted and the plugin has not registered again), and lists the pods holding the
    resource's devices (pod-resources C(List)) so a plan can refuse disruptive actions on busy nodes.
  - An unhealthy node is not a module failure. Problems come back in RV(findings), each with
    a code, a message naming the object, an action and evidence. The module fails only on
    input it cannot use (relative paths, a socket path that is a directory or longer than the
    107 bytes a unix socket path allows, a deadline out of range, an unreadable checkpoint,
    missing permissions).
author:
  - gpunode.bringup contributors (@gpunode)
requirements:
  - grpcio >= 1.59.0 on the node
  - protobuf >= 4.25.0 on the node
extends_documentation_fragment:
  - gpunode.bringup.attributes
  - gpunode.bringup.attributes.info_module
options:
  node_root:
    description:
      - Directory that stands for the node's C(/); prefixed to O(kubelet_root_dir).
      - Leave at C(/) on a real node; a lab node root is a directory such as C(/tmp/lab/nodes/gpu-1).
    type: path
    default: /
  kubelet_root_dir:
    description:
      - The kubelet's C(--root-dir). The probe reads C(<kubelet_root_dir>/device-plugins/) and
        C(<kubelet_root_dir>/pod-resources/kubelet.sock).
      - MicroK8s uses C(/var/snap/microk8s/common/var/lib/kubelet).
    type: path
    default: /var/lib/kubelet
  resource_name:
    description:
      - Extended resource the plugin advertises, as in the pod's C(resources.limits).
    type: str
    default: nvidia.com/gpu
  plugin_socket_name:
    description:
      - File name of the plugin's socket in the device plugin directory.
      - NVIDIA's plugin names it C(nvidia-<resource without the nvidia.com/ prefix>.sock),
        for example C(nvidia-gpu.shared.sock) for a renamed time-slicing resource.
    type: str
    default: nvidia-gpu.sock
  expected_device_ids:
    description:
      - The device UUIDs NVML lists on this node as M(gpunode.bringup.nvml_info) reports them, C(GPU-...)
        UUIDs and, for GPUs in MIG mode, C(MIG-...) UUIDs.
      - Empty skips the missing and extra comparison; a plugin with no devices is still reported.
    type: list
    elements: str
    default: []
  deadline:
    description:
      - Seconds each gRPC call and each socket connection may take (more than 0, at most 300).
    type: float
    default: 5.0
notes:
  - Needs read access to the kubelet's directories, which are root-only on most nodes
    (C(become=true)).
  - The kubelet's C(Registration) service is only connected to, never called, because calling
    C(Register) would register a plugin.
  - Unhealthy devices are absent from the kubelet's view by design (both sources list healthy
    devices only); the comparison with the kubelet uses the plugin's healthy devices.
seealso:
  - name: Kubernetes device plugins
    description: The device plugin registration and ListAndWatch protocol.
    link: https://kubernetes.io/docs/concepts/extend-kubernetes/compute-storage-net/device-plugins/
  - name: Monitoring device plugin resources
    description: The kubelet's pod-resources API (List, GetAllocatableResources).
    link: https://kubernetes.io/docs/concepts/extend-kubernetes/compute-storage-net/device-plugins/#monitoring-device-plugin-resources
"""

EXAMPLES = r"""
- name: Read the GPUs NVML sees
  gpunode.bringup.nvml_info:
  register: nvml
  become: true

- name: Probe the device plugin and its kubelet registration
  gpunode.bringup.device_plugin_probe:
    expected_device_ids: "{{ nvml.gpus | map(attribute='uuid') | list }}"
    deadline: 5
  register: probe
  become: true

- name: Stop when the plugin or the kubelet does not have the GPUs
  ansible.builtin.assert:
    that: probe.healthy
    fail_msg: "{{ probe.findings | map(attribute='message') | join('; ') }}"

- name: Refuse disruptive work while pods hold GPUs (unknown counts as busy)
  ansible.builtin.fail:
    msg: "GPUs in use by {{ probe.pods_with_devices | map(attribute='name') | join(', ') }}"
  when: probe.gpu_usage.in_use is not false

- name: Probe a MicroK8s node with a time-slicing resource
  gpunode.bringup.device_plugin_probe:
    kubelet_root_dir: /var/snap/microk8s/common/var/lib/kubelet
    resource_name: nvidia.com/gpu.shared
    plugin_socket_name: nvidia-gpu.shared.sock
  become: true

- name: Probe a lab node root
  gpunode.bringup.device_plugin_probe:
    node_root: "{{ gpunode_node_root }}"
"""

RETURN = r"""
healthy:
  description: True when there are no findings.
  returned: always
  type: bool
  sample: false
findings:
  description:
    - What is wrong, bottom of the chain first. Empty on a healthy node.
    - Codes are C(plugin_dir_missing), C(kubelet_socket_missing), C(plugin_socket_missing)
      (also a dead socket nobody listens on), C(plugin_socket_not_socket), C(plugin_not_answering)
      (accepted the connection, no answer within the deadline, or the call failed),
      C(plugin_devices_missing), C(plugin_devices_extra), C(plugin_devices_unhealthy),
      C(not_registered), C(registration_stale), C(kubelet_devices_mismatch).
  returned: always
  type: list
  elements: dict
  contains:
    code:
      description: Machine-readable name of the problem.
      type: str
      sample: plugin_not_answering
    message:
      description: The problem, naming the object and the cause.
      type: str
      sample: >-
        plugin socket /var/lib/kubelet/device-plugins/nvidia-gpu.sock accepted the connection
        but did not answer GetDevicePluginOptions within 5s
    action:
      description: The next action for an operator (or the remediation a plan may take).
      type: str
      sample: restart the device plugin pod on this node; if it hangs again, read its log
    evidence:
      description: What was observed (socket states, RPC status codes and timings, device ID lists).
      type: dict
      sample: {"rpc": {"rpc": "GetDevicePluginOptions", "code": "DEADLINE_EXCEEDED", "seconds": 5.002}}
finding_codes:
  description: The codes of RV(findings), in the same order.
  returned: always
  type: list
  elements: str
  sample: ["plugin_devices_unhealthy"]
resource_name:
  description: The resource probed.
  returned: always
  type: str
  sample: nvidia.com/gpu
paths:
  description: The paths probed, under O(node_root).
  returned: always
  type: dict
  contains:
    kubelet_root:
      description: O(node_root) joined with O(kubelet_root_dir).
      type: str
    device_plugins_dir:
      description: The device plugin directory.
      type: str
    kubelet_socket:
      description: The kubelet's registration socket.
      type: str
    plugin_socket:
      description: The plugin's socket.
      type: str
    pod_resources_socket:
      description: The kubelet's pod-resources socket.
      type: str
    checkpoint:
      description: The kubelet's device manager checkpoint.
      type: str
  sample:
    kubelet_root: /var/lib/kubelet
    device_plugins_dir: /var/lib/kubelet/device-plugins
    kubelet_socket: /var/lib/kubelet/device-plugins/kubelet.sock
    plugin_socket: /var/lib/kubelet/device-plugins/nvidia-gpu.sock
    pod_resources_socket: /var/lib/kubelet/pod-resources/kubelet.sock
    checkpoint: /var/lib/kubelet/device-plugins/kubelet_internal_checkpoint
device_plugins_dir_exists:
  description: Whether the device plugin directory exists.
  returned: always
  type: bool
  sample: true
sockets:
  description:
    - The kubelet, plugin and pod-resources sockets. Each has C(path), C(state)
      (C(listening), C(missing), C(dead_socket), C(unresponsive), C(regular_file),
      C(not_a_socket)), C(listening), C(mtime) (seconds since the epoch) and C(error).
  returned: always
  type: dict
  sample:
    kubelet: {"path": "/var/lib/kubelet/device-plugins/kubelet.sock", "state": "listening",
              "listening": true, "mtime": 1767225600.25, "error": null}
    plugin: {"path": "/var/lib/kubelet/device-plugins/nvidia-gpu.sock", "state": "dead_socket",
             "listening": false, "mtime": 1767225500.5,
             "error": "connection refused: nothing listens on this socket"}
    pod_resources: {"path": "/var/lib/kubelet/pod-resources/kubelet.sock", "state": "listening",
                    "listening": true, "mtime": 1767225600.3, "error": null}
plugin:
  description: The plugin's answers.
  returned: always
  type: dict
  contains:
    probed:
      description: Whether the plugin was called (its socket accepted a connection).
      type: bool
    answered:
      description: Whether both GetDevicePluginOptions and the first ListAndWatch response arrived.
      type: bool
    options:
      description: The plugin's options (C(pre_start_required), C(get_preferred_allocation_available)); null when not answered.
      type: dict
    devices:
      description:
        - The devices of the first ListAndWatch response, with C(id), C(health), C(numa_nodes)
          (NUMA topology), C(base_id) (the ID without a C(::<n>) replica suffix), C(kind)
          (C(gpu), C(mig) or C(other)) and C(replica).
      type: list
      elements: dict
    error:
      description: The call that failed, with C(rpc), C(code) (gRPC status), C(message), C(seconds).
      type: dict
    seconds:
      description: Time the plugin calls took.
      type: float
  sample:
    probed: true
    answered: true
    options: {"pre_start_required": false, "get_preferred_allocation_available": true}
    devices:
      - {"id": "GPU-8d3f0c1e-...::0", "health": "Healthy", "numa_nodes": [0],
         "base_id": "GPU-8d3f0c1e-...", "kind": "gpu", "replica": 0}
    error: null
    seconds: 0.004
device_comparison:
  description:
    - The plugin's devices against O(expected_device_ids); null when the plugin did not answer.
    - C(compared) is false when O(expected_device_ids) is empty. C(missing) are expected IDs no
      plugin device stands for, C(extra) plugin base IDs NVML does not list, C(unhealthy) plugin
      device IDs not Healthy and C(unhealthy_base_ids) their GPUs, C(replicas) the time-slicing
      replica count per GPU, C(unverified) MIG devices that could not be matched because no MIG
      UUID was expected (no GPU is then reported missing).
  returned: always
  type: dict
  sample:
    compared: true
    expected_device_ids: ["GPU-1", "GPU-2"]
    plugin_device_count: 8
    missing: []
    extra: []
    unhealthy: ["GPU-2::0", "GPU-2::1", "GPU-2::2", "GPU-2::3"]
    unhealthy_base_ids: ["GPU-2"]
    replicas: {"GPU-1": 4, "GPU-2": 4}
    unverified: []
kubelet_devices:
  description:
    - The kubelet's devices for the resource; null when the device plugin directory is missing.
    - C(source) is C(pod_resources) (GetAllocatableResources), C(checkpoint)
      (Data.RegisteredDevices) or C(none). C(device_ids) is null when the source does not list
      the resource. C(fallback_reason) says why pod-resources was not used.
  returned: always
  type: dict
  sample:
    source: checkpoint
    registered: true
    device_ids: ["GPU-1", "GPU-2"]
    fallback_reason: the kubelet does not implement pod-resources GetAllocatableResources (older than 1.21)
    error: {"rpc": "GetAllocatableResources", "code": "UNIMPLEMENTED", "message": "Method not found!", "seconds": 0.001}
registration:
  description: The socket times used for the stale-registration check and its verdict.
  returned: always
  type: dict
  sample: {"kubelet_socket_mtime": 1767225600.25, "plugin_socket_mtime": 1767225500.5, "stale": true}
pods_with_devices:
  description:
    - Containers holding devices of the resource, from pod-resources C(List); from the
      checkpoint (pod UID only, and possibly pods that have ended) when pod-resources cannot answer.
  returned: always
  type: list
  elements: dict
  contains:
    namespace:
      description: The pod's namespace; null when read from the checkpoint.
      type: str
    name:
      description: The pod's name; null when read from the checkpoint.
      type: str
    pod_uid:
      description: The pod's UID; set only when read from the checkpoint.
      type: str
    container:
      description: The container holding the devices.
      type: str
    device_ids:
      description: The device IDs it holds.
      type: list
      elements: str
  sample: [{"namespace": "ml", "name": "train-0", "pod_uid": null, "container": "main", "device_ids": ["GPU-1"]}]
gpu_usage:
  description:
    - Whether devices of the resource are in use. C(source) is C(pod_resources), C(checkpoint)
      or C(none); C(in_use) is null when no source could tell (treat that as busy);
      C(device_ids_in_use) lists the held device IDs; C(error) says why pod-resources was not used.
  returned: always
  type: dict
  sample: {"source": "pod_resources", "in_use": true, "device_ids_in_use": ["GPU-1"], "error": null}
checkpoint:
  description:
    - The kubelet checkpoint as read, when it was needed (pod-resources unavailable); else null.
    - C(registered_devices) per resource, C(pod_device_entries), C(checksum), C(boot_id) (null
      when the kubelet does not record it) and C(format_version) (C(v2) per-NUMA device IDs, C(v1) flat).
  returned: always
  type: dict
  sample: null
seconds:
  description: Time the whole probe took.
  returned: always
  type: float
  sample: 0.021
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpunode.bringup.plugins.module_utils._kubelet_api import _runtime
from ansible_collections.gpunode.bringup.plugins.module_utils._module import require_library, run_module
from ansible_collections.gpunode.bringup.plugins.module_utils._node_args import PROBE_ARGS, spec
from ansible_collections.gpunode.bringup.plugins.module_utils._probe import ProbeRequest, probe_node


def main():
    module = AnsibleModule(
        argument_spec=spec(PROBE_ARGS),
        supports_check_mode=True,
    )
    require_library(module, "protobuf", _runtime.HAS_PROTOBUF, _runtime.PROTOBUF_IMPORT_ERROR)
    require_library(module, "grpcio", _runtime.HAS_GRPC, _runtime.GRPC_IMPORT_ERROR)
    params = module.params
    request = ProbeRequest(
        node_root=params["node_root"],
        kubelet_root_dir=params["kubelet_root_dir"],
        resource_name=params["resource_name"],
        plugin_socket_name=params["plugin_socket_name"],
        expected_device_ids=tuple(params["expected_device_ids"]),
        deadline=params["deadline"],
    )
    run_module(module, lambda: probe_node(request).to_result())


if __name__ == "__main__":
    main()
