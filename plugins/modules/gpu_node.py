#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: gpu_node
short_description: Set or remove a GPU node's labels and annotations, cordon or uncordon it
version_added: 0.1.0
description:
  - Runs on the controller and talks to the Kubernetes API.
  - Makes the named labels and annotations of a Node present (with the given values) or absent, and cordons or
    uncordons it. Other labels and annotations are left alone.
  - Reads the Node, compares, and sends one JSON merge patch of only the keys that differ; a node that already
    matches is not written and C(changed) is false.
  - The plan's scheduling step uses it to add the label the device plugin DaemonSet selects on (such as
    C(nvidia.com/gpu.present=true)). Taints are never changed.
author:
  - gpunode.bringup contributors (@gpunode)
extends_documentation_fragment:
  - gpunode.bringup.k8s_auth_options
  - gpunode.bringup.attributes
attributes:
  check_mode:
    support: full
    details: Check mode sends the patch as a server-side dry run (C(dryRun=All)); nothing is written.
  diff_mode:
    support: full
    details: Returns the node's labels, annotations and C(unschedulable) before and after.
  idempotent:
    support: full
options:
  name:
    description:
      - Name of the Node.
    type: str
    required: true
    aliases: [node]
  state:
    description:
      - V(present) sets O(labels) and O(annotations) to the given values; V(absent) removes those keys.
      - O(cordon) applies in both states.
    type: str
    choices: [present, absent]
    default: present
  labels:
    description:
      - With O(state=present), a dictionary of label keys and values (YAML V(true) becomes the label value
        C("true")).
      - With O(state=absent), the keys to remove, as a list (or a dictionary whose values are ignored).
    type: raw
  annotations:
    description:
      - Annotations, as O(labels).
    type: raw
  cordon:
    description:
      - V(true) marks the node unschedulable (C(kubectl cordon)), V(false) schedulable again (C(kubectl uncordon)).
        Unset, left as it is.
      - A cordon does not keep the device plugin away; DaemonSet pods tolerate it.
    type: bool
seealso:
  - module: gpunode.bringup.device_plugin_info
"""

EXAMPLES = r"""
- name: Label a GPU node so the device plugin DaemonSet targets it
  gpunode.bringup.gpu_node:
    name: gpu-07
    labels:
      nvidia.com/gpu.present: true

- name: Cordon a node for GPU maintenance and note why
  gpunode.bringup.gpu_node:
    name: gpu-07
    cordon: true
    annotations:
      gpunode.bringup/maintenance: "XID 79 on GPU 3, ticket OPS-1234"

- name: End the maintenance
  gpunode.bringup.gpu_node:
    name: gpu-07
    state: absent
    annotations: [gpunode.bringup/maintenance]
    cordon: false
"""

RETURN = r"""
node:
  description: The node after the change (in check mode, as the API server's dry run answered).
  returned: always
  type: dict
  contains:
    name:
      description: The node's name.
      type: str
    labels:
      description: All its labels.
      type: dict
    annotations:
      description: All its annotations.
      type: dict
    unschedulable:
      description: Whether it is cordoned.
      type: bool
actions:
  description: What was changed (or would be, in check mode), in words.
  returned: always
  type: list
  elements: str
  sample: ["label nvidia.com/gpu.present=true", "cordon"]
api_requests:
  description: API requests the task made, retries included.
  returned: always
  type: int
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_args import auth_argument_spec
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import HAS_KUBERNETES, KUBERNETES_IMPORT_ERROR
from ansible_collections.gpunode.bringup.plugins.module_utils._module import require_library, run_module
from ansible_collections.gpunode.bringup.plugins.module_utils._node_labels import gpu_node_result


def main():
    argument_spec = auth_argument_spec(dict(
        name=dict(type="str", required=True, aliases=["node"]),
        state=dict(type="str", default="present", choices=["present", "absent"]),
        labels=dict(type="raw"),
        annotations=dict(type="raw"),
        cordon=dict(type="bool"),
    ))
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True,
                           required_one_of=[("labels", "annotations", "cordon")])
    require_library(module, "kubernetes", HAS_KUBERNETES, KUBERNETES_IMPORT_ERROR)
    run_module(module, lambda: gpu_node_result(module.params, module.check_mode, module._diff))


if __name__ == "__main__":
    main()
