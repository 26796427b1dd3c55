#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: device_plugin_restart
short_description: Restart the device plugin on one node and wait until the node advertises its GPUs
version_added: 0.1.0
description:
  - Finds the device plugin pod on O(node) (pods in O(namespace) matching O(label_selector) with
    C(spec.nodeName=<node>), not already being deleted) and deletes it, with its UID as a
    precondition, so that its DaemonSet creates a new one.
  - Then waits, within O(timeout) seconds in total, until a pod with a different UID on that node is
    C(Running) and C(Ready), and then until the Node's C(status.allocatable[resource_name]) equals
    O(expected_count) (without O(expected_count), equals C(status.capacity[resource_name]) and is
    above 0).
  - The waits watch the pods on that node and the Node itself (server-side C(timeoutSeconds)),
    listing again whenever a watch ends; nothing sleeps for a fixed time.
  - Fails when the node has no plugin pod (the DaemonSet does not run there, which the scheduling
    step explains), and at the deadline with what was still missing; no new pod, the new pod's
    waiting reason and restart count, or the allocatable count against the expected one; and the next action.
author:
  - gpunode.bringup contributors (@gpunode)
extends_documentation_fragment:
  - gpunode.bringup.k8s_auth_options
  - gpunode.bringup.attributes
attributes:
  check_mode:
    support: full
    details:
      - Finds the pod and sends its deletion as a server-side dry run (C(dryRun=All)); reports
        C(changed=true) and does not wait.
  diff_mode:
    support: full
    details: Shows the plugin pod's name and UID before and after.
  idempotent:
    support: none
    details: Every run restarts the plugin pod and reports a change; call it only when a check failed.
options:
  node:
    description:
      - Name of the node whose device plugin is restarted.
    type: str
    required: true
  namespace:
    description:
      - Namespace of the device plugin DaemonSet and its pods.
    type: str
    default: kube-system
  label_selector:
    description:
      - Label selector of the device plugin pods, the DaemonSet's C(spec.selector.matchLabels) as
        C(key=value[,key=value]).
      - The NVIDIA static manifest labels its pods C(name=nvidia-device-plugin-ds); the Helm chart
        uses C(app.kubernetes.io/name=nvidia-device-plugin).
    type: str
    default: name=nvidia-device-plugin-ds
  resource_name:
    description:
      - Extended resource the plugin advertises on the Node.
    type: str
    default: nvidia.com/gpu
  expected_count:
    description:
      - How many devices of O(resource_name) the Node must show as allocatable after the restart,
        usually the GPU count NVML reports.
      - Left out, allocatable must equal the Node's capacity and be above 0.
    type: int
  timeout:
    description:
      - Seconds to wait, in total, for the new pod to be Ready and the Node to advertise the devices (1 to 3600).
    type: int
    default: 180
  wait_only:
    description:
      - Delete nothing; wait until a device plugin pod on the node is Running and Ready and the Node
        advertises the devices. For use right after the node was made to match the DaemonSet
        (the plan's scheduling step), when the DaemonSet is creating the pod itself.
      - The result is then C(changed=false).
    type: bool
    default: false
notes:
  - Needs C(list), C(watch) and C(delete) on C(pods) in O(namespace), and C(list) and C(watch) on C(nodes).
  - A waiting task may overrun O(timeout) by up to one second (watch timeouts are whole seconds).
seealso:
  - module: gpunode.bringup.device_plugin_probe
    description: Checks the plugin socket and the kubelet registration on the node.
"""

EXAMPLES = r"""
- name: Restart the device plugin on this node and wait for its 8 GPUs
  gpunode.bringup.device_plugin_restart:
    node: "{{ inventory_hostname }}"
    expected_count: 8
  delegate_to: localhost
  register: gpunode_restart

- name: Show how long the node was without GPUs
  ansible.builtin.debug:
    msg: "{{ gpunode_restart.new_pod.name }} ready, {{ gpunode_restart.advertised.allocatable }} GPUs after {{ gpunode_restart.waited_seconds }}s"

- name: Restart a plugin installed by the Helm chart, with a shorter deadline
  gpunode.bringup.device_plugin_restart:
    node: gpu-07
    namespace: nvidia-device-plugin
    label_selector: app.kubernetes.io/name=nvidia-device-plugin
    timeout: 90
"""

RETURN = r"""
node:
  description: The node.
  returned: always
  type: str
  sample: gpu-07
old_pod:
  description: The plugin pod that was deleted (the oldest, when there were several).
  returned: always
  type: dict
  contains:
    name:
      description: Pod name.
      type: str
    namespace:
      description: Pod namespace.
      type: str
    uid:
      description: Pod UID.
      type: str
    node:
      description: C(spec.nodeName).
      type: str
    phase:
      description: C(status.phase).
      type: str
    ready:
      description: Whether the pod was Running and Ready.
      type: bool
    restart_count:
      description: Highest container restart count.
      type: int
    waiting_reason:
      description: Reason of a waiting container, for example C(CrashLoopBackOff).
      type: str
    created:
      description: C(metadata.creationTimestamp).
      type: str
  sample: {"name": "nvidia-device-plugin-ds-x7k2p", "namespace": "kube-system", "uid": "8c1f...",
           "node": "gpu-07", "phase": "Running", "ready": false, "restart_count": 12,
           "waiting_reason": "CrashLoopBackOff", "created": "2026-01-01T09:00:00Z"}
deleted_pods:
  description: Names of the pods deleted (one, unless the node had several plugin pods).
  returned: always
  type: list
  elements: str
  sample: ["nvidia-device-plugin-ds-x7k2p"]
new_pod:
  description: The replacement pod, Running and Ready, with the keys of RV(old_pod); null in check mode.
  returned: always
  type: dict
  sample: {"name": "nvidia-device-plugin-ds-9qwzd", "namespace": "kube-system", "uid": "41d2...",
           "node": "gpu-07", "phase": "Running", "ready": true, "restart_count": 0,
           "waiting_reason": null, "created": "2026-01-01T10:00:02Z"}
waited_seconds:
  description: Seconds from the deletion until the Node advertised the devices; 0 in check mode.
  returned: always
  type: float
  sample: 6.412
advertised:
  description: The Node's count of O(resource_name) at the end; null in check mode.
  returned: always
  type: dict
  contains:
    capacity:
      description: C(status.capacity[resource_name]).
      type: int
    allocatable:
      description: C(status.allocatable[resource_name]).
      type: int
  sample: {"capacity": 8, "allocatable": 8}
msg:
  description: What was done.
  returned: always
  type: str
  sample: "node gpu-07: device plugin pod nvidia-device-plugin-ds-x7k2p replaced by nvidia-device-plugin-ds-9qwzd; nvidia.com/gpu allocatable 8"
action:
  description: On failure, the next action for the operator.
  returned: failure
  type: str
  sample: "read its log (kubectl -n kube-system logs nvidia-device-plugin-ds-9qwzd) and check the driver and runtime steps"
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_args import auth_argument_spec
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import run_api_module
from ansible_collections.gpunode.bringup.plugins.module_utils._restart import RestartRequest, run_plugin_restart


def main():
    module = AnsibleModule(
        argument_spec=auth_argument_spec(dict(
            node=dict(type="str", required=True),
            namespace=dict(type="str", default="kube-system"),
            label_selector=dict(type="str", default="name=nvidia-device-plugin-ds"),
            resource_name=dict(type="str", default="nvidia.com/gpu"),
            expected_count=dict(type="int"),
            timeout=dict(type="int", default=180),
            wait_only=dict(type="bool", default=False),
        )),
        supports_check_mode=True,
    )
    params = module.params
    request = RestartRequest(
        node=params["node"],
        namespace=params["namespace"],
        label_selector=params["label_selector"],
        resource_name=params["resource_name"],
        expected_count=params["expected_count"],
        timeout=params["timeout"],
        wait_only=params["wait_only"],
    )

    def body(client):
        request.validate()
        return run_plugin_restart(client, request, module.check_mode)

    run_api_module(module, body)


if __name__ == "__main__":
    main()
