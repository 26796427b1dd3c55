#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: gpu_smoke_test
short_description: Run a pod that requests one GPU on a node and report whether it succeeds
version_added: 0.1.0
description:
  - The last step of the node plan; proves that a workload can get a GPU on O(node).
  - Creates a pod (name O(name_prefix) plus a random suffix, in O(namespace)) that requests one
    O(resource_name) in C(resources.limits), runs O(command) in O(image) with C(restartPolicy=Never),
    tolerates O(tolerations), and is pinned to the node by a required node affinity on
    C(metadata.name), so it goes through the scheduler like any workload.
  - Watches the pod until it reaches a final state, within O(timeout) seconds. C(Succeeded) passes.
    C(Failed), C(Unschedulable) (for example no free GPU on the node), and a container stuck in
    C(ImagePullBackOff), C(InvalidImageName), C(ErrImageNeverPull), C(CreateContainerConfigError),
    C(CreateContainerError) or C(RunContainerError) do not pass; neither does reaching the deadline.
  - Collects the pod's events and the last lines of its log, then deletes the pod, in every case,
    also when the wait fails.
  - A smoke test that does not pass is reported, not raised; the task fails only when the module
    cannot run the test at all (bad options, API errors, missing rights). Use RV(passed) to decide.
author:
  - gpunode.bringup contributors (@gpunode)
extends_documentation_fragment:
  - gpunode.bringup.k8s_auth_options
  - gpunode.bringup.attributes
attributes:
  check_mode:
    support: partial
    details:
      - The pod is sent as a server-side dry run (C(dryRun=All)), which checks the manifest and the
        right to create it; the test itself is not run and the task returns C(skipped=true).
  diff_mode:
    support: none
    details: The pod exists only while the test runs; nothing is left to diff.
  idempotent:
    support: full
    details:
      - Always reports C(changed=false), since the pod it creates is deleted before the task ends and the
        cluster is left as it was (apart from the pod's events, which expire on their own).
options:
  node:
    description:
      - Name of the node to test.
    type: str
    required: true
  namespace:
    description:
      - Namespace to run the pod in.
    type: str
    default: default
  image:
    description:
      - Container image of the test. It must contain O(command); the NVIDIA container toolkit
        mounts C(nvidia-smi) into containers that get a GPU.
    type: str
    default: nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04
  command:
    description:
      - Command the container runs; exit code 0 passes.
    type: list
    elements: str
    default: [nvidia-smi, -L]
  resource_name:
    description:
      - Extended resource the pod requests one of.
    type: str
    default: nvidia.com/gpu
  tolerations:
    description:
      - Tolerations of the pod, as in a pod spec (C(key), C(operator), C(value), C(effect)).
      - Left out, the pod tolerates every taint with the key O(resource_name), which GPU node pools often carry.
    type: list
    elements: dict
  name_prefix:
    description:
      - Prefix of the pod's generated name (lowercase letters, digits and C(-), at most 58 characters).
    type: str
    default: gpunode-smoke-
  timeout:
    description:
      - Seconds to wait for the pod to reach a final state (1 to 3600), image pull included.
    type: int
    default: 300
notes:
  - Needs C(create), C(delete), C(list) and C(watch) on C(pods), C(get) on C(pods/log) and C(list) on
    C(events) in O(namespace).
  - The pod is deleted with a grace period of 0 seconds.
  - A waiting task may overrun O(timeout) by up to one second (watch timeouts are whole seconds).
"""

EXAMPLES = r"""
- name: Run one GPU pod on this node
  gpunode.bringup.gpu_smoke_test:
    node: "{{ inventory_hostname }}"
  delegate_to: localhost
  register: gpunode_smoke

- name: Fail with the evidence when it did not pass
  ansible.builtin.assert:
    that: gpunode_smoke.passed
    fail_msg: "{{ gpunode_smoke.msg }}; events: {{ gpunode_smoke.events | map(attribute='message') | list }}"

- name: Air-gapped cluster, image from a local registry, a tainted node pool
  gpunode.bringup.gpu_smoke_test:
    node: gpu-07
    namespace: gpu-ops
    image: registry.local/nvidia/cuda:12.4.1-base-ubuntu22.04
    command: [nvidia-smi, "--query-gpu=name,uuid", --format=csv]
    tolerations:
      - key: nvidia.com/gpu
        operator: Exists
      - key: dedicated
        value: gpu
        effect: NoSchedule
    timeout: 600
"""

RETURN = r"""
passed:
  description: Whether the pod reached C(Succeeded); null in check mode.
  returned: always
  type: bool
  sample: true
skipped:
  description: True in check mode, where the test is not run.
  returned: check mode
  type: bool
  sample: true
outcome:
  description:
    - C(succeeded), C(failed), C(unschedulable), C(container_error) or C(timeout).
  returned: when the test ran
  type: str
  sample: unschedulable
phase:
  description: The pod's last C(status.phase).
  returned: when the test ran
  type: str
  sample: Pending
reason:
  description:
    - Why the pod ended as it did, for example C(Completed), C(Error), C(Unschedulable),
      C(ImagePullBackOff), C(OutOfnvidia.com/gpu), C(Timeout).
  returned: when the test ran
  type: str
  sample: Unschedulable
message:
  description: The message that goes with RV(reason) (scheduler message, exit code, ...).
  returned: when the test ran
  type: str
  sample: "0/4 nodes are available: 1 Insufficient nvidia.com/gpu, 3 node(s) didn't match Pod's node affinity/selector."
pod:
  description: The pod that ran (it no longer exists).
  returned: when the test ran
  type: dict
  contains:
    name:
      description: Generated pod name.
      type: str
    namespace:
      description: Pod namespace.
      type: str
    node:
      description: Node the pod was bound to; null when it was never scheduled.
      type: str
  sample: {"name": "gpunode-smoke-4xk9z", "namespace": "default", "node": "gpu-07"}
container_state:
  description: The container's last C(state) as the API reported it (C(waiting), C(running) or C(terminated)).
  returned: when the test ran
  type: dict
  sample: {"terminated": {"exitCode": 0, "reason": "Completed"}}
events:
  description: The pod's events, oldest first.
  returned: when the test ran
  type: list
  elements: dict
  contains:
    type:
      description: C(Normal) or C(Warning).
      type: str
    reason:
      description: Event reason, for example C(FailedScheduling).
      type: str
    message:
      description: Event message.
      type: str
    count:
      description: How many times it happened.
      type: int
    time:
      description: When it last happened.
      type: str
    source:
      description: Component that reported it.
      type: str
  sample: [{"type": "Normal", "reason": "Pulled", "message": "Container image already present on machine",
            "count": 1, "time": "2026-01-01T10:00:01Z", "source": "kubelet"}]
log:
  description: The last 20 lines of the container's output; null when the container never started.
  returned: when the test ran
  type: str
  sample: "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5d2c...)"
duration:
  description: Seconds from creating the pod until the evidence was collected.
  returned: when the test ran
  type: float
  sample: 7.204
deleted:
  description: Whether the pod was deleted after the test (always true when the task succeeds).
  returned: when the test ran
  type: bool
  sample: true
node:
  description: The node tested.
  returned: always
  type: str
  sample: gpu-07
msg:
  description: The result in one line.
  returned: always
  type: str
  sample: "node gpu-07: smoke pod gpunode-smoke-4xk9z succeeded in 7.2s"
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_args import auth_argument_spec
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import run_api_module
from ansible_collections.gpunode.bringup.plugins.module_utils._smoke import (
    DEFAULT_COMMAND,
    DEFAULT_IMAGE,
    SmokeRequest,
    run_smoke_test,
)


def main():
    module = AnsibleModule(
        argument_spec=auth_argument_spec(dict(
            node=dict(type="str", required=True),
            namespace=dict(type="str", default="default"),
            image=dict(type="str", default=DEFAULT_IMAGE),
            command=dict(type="list", elements="str", default=list(DEFAULT_COMMAND)),
            resource_name=dict(type="str", default="nvidia.com/gpu"),
            tolerations=dict(type="list", elements="dict"),
            name_prefix=dict(type="str", default="gpunode-smoke-"),
            timeout=dict(type="int", default=300),
        )),
        supports_check_mode=True,
    )
    params = module.params
    request = SmokeRequest(
        node=params["node"],
        namespace=params["namespace"],
        image=params["image"],
        command=params["command"],
        resource_name=params["resource_name"],
        name_prefix=params["name_prefix"],
        timeout=params["timeout"],
        tolerations=params["tolerations"],
    )

    def body(client):
        request.validate()
        return run_smoke_test(client, request, module.check_mode)

    run_api_module(module, body)


if __name__ == "__main__":
    main()
