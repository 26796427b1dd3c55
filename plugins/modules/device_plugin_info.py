#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: device_plugin_info
short_description: Explain, node by node, the NVIDIA device plugin's state in a cluster
version_added: 0.1.0
description:
  - Runs on the controller and reads the Kubernetes API. For each node asked for, reports whether the device plugin
    DaemonSet targets it (and if not, every reason - the missing label, the unmet node affinity term, the untolerated
    taint), the plugin pod on it, the pod's log classified to the plugin's known signatures, the C(nvidia.com/*)
    resources the node advertises, the node's Ready condition and cordon, and findings with the next action.
  - Reads the whole fleet with a constant number of requests - one read of the DaemonSet, one LIST of the nodes and
    one LIST of the plugin pods - never one request per node. A pod's log is read only for a node whose plugin pod is
    not healthy or whose advertised resources are short (O(read_logs) changes that), one request per such node.
  - An unhealthy node is data, not a failure; the module fails only for bad options or when the API cannot be read.
author:
  - gpunode.bringup contributors (@gpunode)
extends_documentation_fragment:
  - gpunode.bringup.k8s_auth_options
  - gpunode.bringup.attributes
  - gpunode.bringup.attributes.info_module
options:
  nodes:
    description:
      - Names of the nodes to report on, in this order. A name the API does not know gets an entry with
        RV(nodes[].found=false) and the finding C(node_not_found).
      - Unset, every node the LIST returns (see O(label_selector)).
    type: list
    elements: str
  label_selector:
    description:
      - Label selector for the LIST of nodes, for example V(nvidia.com/gpu.present=true).
      - With O(nodes) as well, a named node outside the selector is reported as not found.
    type: str
  name:
    description:
      - Name of the device plugin DaemonSet.
    type: str
    default: nvidia-device-plugin-daemonset
  namespace:
    description:
      - Namespace of the DaemonSet and its pods.
    type: str
    default: kube-system
  selector_labels:
    description:
      - Labels of the plugin pods, used when the DaemonSet does not exist (otherwise its selector is used).
    type: dict
    default:
      name: nvidia-device-plugin-ds
  read_logs:
    description:
      - Which plugin pod logs to read and classify. V(when_unhealthy) - only where the pod is not Running and Ready
        or the node's advertised O(resource_name) is missing, short of O(expected_gpu_count) or has unhealthy
        devices; V(always) - every node with a plugin pod; V(never).
    type: str
    choices: [when_unhealthy, always, never]
    default: when_unhealthy
  log_tail_lines:
    description:
      - How many of the log's last lines to read.
    type: int
    default: 200
  resource_name:
    description:
      - The extended resource the plugin advertises.
    type: str
    default: nvidia.com/gpu
  expected_gpu_count:
    description:
      - How many of O(resource_name) each node should advertise. A different capacity gives the finding
        C(gpu_count_mismatch).
    type: int
notes:
  - "Log signatures (C(signature) of RV(nodes[].log)) - V(registered) (C(Registered device plugin for ... with Kubelet)),
    V(nvml_init_failed) (C(failed to initialize NVML), C(could not load NVML library)), V(incompatible_strategy)
    (C(Incompatible strategy detected)), V(no_devices) (C(No devices found. Waiting indefinitely.)),
    V(registration_failed) (C(Could not register device plugin)), V(xid_unhealthy) (C(XidCriticalError ...
    marking device as unhealthy)), V(kubelet_restart_seen) (C(inotify: ... kubelet.sock created, restarting.) with no
    registration after it), V(unknown)."
  - The state is decided by the plugin's last start (its last C(Starting Plugins.) line); within it a root cause wins
    over its consequences.
seealso:
  - module: gpunode.bringup.device_plugin
  - module: gpunode.bringup.gpu_node
"""

EXAMPLES = r"""
- name: Why do these nodes advertise no GPU?
  gpunode.bringup.device_plugin_info:
    nodes: [gpu-01, gpu-02, gpu-03]
    expected_gpu_count: 8
  register: fleet

- name: Show the nodes that need attention, with the first finding of each
  ansible.builtin.debug:
    msg: "{{ item.name }}: {{ item.findings[0].message }} -> {{ item.findings[0].action }}"
  loop: "{{ fleet.nodes | rejectattr('healthy') }}"
  loop_control:
    label: "{{ item.name }}"

- name: Every labelled GPU node, logs classified everywhere
  gpunode.bringup.device_plugin_info:
    label_selector: nvidia.com/gpu.present=true
    read_logs: always
"""

RETURN = r"""
daemonset:
  description: The DaemonSet's rollout counters.
  returned: always
  type: dict
  contains:
    found:
      description: Whether the DaemonSet exists.
      type: bool
    name:
      description: Its name.
      type: str
    namespace:
      description: Its namespace.
      type: str
    generation:
      description: C(metadata.generation).
      type: int
    observed_generation:
      description: C(status.observedGeneration).
      type: int
    desired:
      description: C(status.desiredNumberScheduled).
      type: int
    current:
      description: C(status.currentNumberScheduled).
      type: int
    ready:
      description: C(status.numberReady).
      type: int
    updated:
      description: C(status.updatedNumberScheduled).
      type: int
    available:
      description: C(status.numberAvailable).
      type: int
    unavailable:
      description: C(status.numberUnavailable).
      type: int
    misscheduled:
      description: C(status.numberMisscheduled).
      type: int
nodes:
  description: One entry per node, in the order of O(nodes) (else by name).
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The node's name.
      type: str
    found:
      description: Whether the node exists in the API.
      type: bool
    healthy:
      description: Whether no finding of severity C(error) applies.
      type: bool
    daemonset:
      description: The DaemonSet's counters, as RV(daemonset).
      type: dict
    node:
      description: The node - C(ready) (true, false, or null when unknown), C(ready_reason), C(ready_message),
        C(unschedulable), C(labels) (those relevant to GPU scheduling - C(nvidia.com/*),
        C(feature.node.kubernetes.io/pci-10de*), and every key the DaemonSet selects on) and C(taints).
      type: dict
    scheduling:
      description: Whether the DaemonSet targets the node (C(targeted)) and each reason it does not (C(reasons)) -
        C(reason) (V(missing_label), V(label_mismatch), V(unmet_affinity), V(untolerated_taint)), C(message), and
        as they apply C(key), C(value) (the label value wanted, or the taint's value), C(effect), C(actual),
        C(term) (1-based), C(operator), C(values). Null when the DaemonSet does not exist.
      type: dict
      sample:
        targeted: false
        reasons:
          - reason: untolerated_taint
            key: dedicated
            value: training
            effect: NoSchedule
            message: node taint dedicated=training:NoSchedule is not tolerated by the DaemonSet
    plugin_pod:
      description: The plugin pod on the node - C(found), C(name), C(phase), C(ready), C(healthy), C(restarts),
        C(waiting_reason) (such as V(CrashLoopBackOff), V(ImagePullBackOff)), C(waiting_message),
        C(terminated_reason), C(last_termination_reason), C(last_exit_code), C(started_at), C(age_seconds),
        C(deleting), C(container) and C(other_pods) (more pods on the node, during a rolling update).
      type: dict
    log:
      description: The pod's log classified - C(read) (whether it was read), C(signature), C(line) (the line that
        decided it), C(meaning), C(matches) (the last line of each signature seen, with C(line_number)) and
        C(error) (why it could not be read).
      type: dict
      sample:
        read: true
        signature: nvml_init_failed
        line: "E1127 01:02:03.000000       1 main.go:132] failed to initialize NVML: ERROR_LIBRARY_NOT_FOUND"
    resources:
      description: C(capacity) and C(allocatable) of every C(nvidia.com/*) resource, and C(unhealthy_devices)
        (capacity minus allocatable).
      type: dict
      sample:
        capacity: {nvidia.com/gpu: 8}
        allocatable: {nvidia.com/gpu: 7}
        unhealthy_devices: {nvidia.com/gpu: 1}
    findings:
      description:
        - What is wrong, bottom of the chain first - C(code), C(severity) (V(error) or V(warning)), C(message) and
          C(action).
        - "Codes: node_not_found, node_not_ready, node_cordoned, daemonset_missing, not_targeted_label,
          not_targeted_affinity, not_targeted_taint, plugin_pod_missing, plugin_pod_image_pull, plugin_pod_crashloop,
          plugin_pod_not_ready, plugin_pod_restarted, plugin_incompatible_platform, plugin_nvml_init_failed,
          plugin_registration_failed, plugin_xid_unhealthy, plugin_no_devices, plugin_stale_after_kubelet_restart,
          resource_not_advertised, unhealthy_devices, gpu_count_mismatch."
      type: list
      elements: dict
summary:
  description: C(nodes) (count), C(healthy) (count), C(unhealthy) (names) and C(findings) (count per code).
  returned: always
  type: dict
api_requests:
  description: API requests the task made, retries included (3 plus one per log read).
  returned: always
  type: int
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpunode.bringup.plugins.module_utils._fleet import LOG_READ_CHOICES, device_plugin_info_result
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_args import auth_argument_spec
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import HAS_KUBERNETES, KUBERNETES_IMPORT_ERROR
from ansible_collections.gpunode.bringup.plugins.module_utils._module import require_library, run_module


def main():
    argument_spec = auth_argument_spec(dict(
        nodes=dict(type="list", elements="str"),
        label_selector=dict(type="str"),
        name=dict(type="str", default="nvidia-device-plugin-daemonset"),
        namespace=dict(type="str", default="kube-system"),
        selector_labels=dict(type="dict", default={"name": "nvidia-device-plugin-ds"}),
        read_logs=dict(type="str", default="when_unhealthy", choices=list(LOG_READ_CHOICES)),
        log_tail_lines=dict(type="int", default=200),
        resource_name=dict(type="str", default="nvidia.com/gpu"),
        expected_gpu_count=dict(type="int"),
    ))
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    require_library(module, "kubernetes", HAS_KUBERNETES, KUBERNETES_IMPORT_ERROR)
    run_module(module, lambda: device_plugin_info_result(module.params))


if __name__ == "__main__":
    main()
