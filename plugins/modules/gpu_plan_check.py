#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: gpu_plan_check
short_description: Gather a GPU node's evidence and walk the ordered plan over it, in one task
version_added: 0.1.0
description:
  - An action. On the node it runs M(gpunode.bringup.node_info) once (NVML, container runtime,
    device plugin probe); on the controller it adds the node's entry of a
    M(gpunode.bringup.device_plugin_info) read and, when enabled, a M(gpunode.bringup.gpu_smoke_test)
    result, and walks the plan's steps bottom-up over that evidence, as the filter
    P(gpunode.bringup.gpu_plan_evaluate#filter) does.
  - The role M(gpunode.bringup.gpu_node) checks each node with it, once per round; that one task
    replaces three module runs on the node and the tasks that assembled and evaluated their results.
  - A failing step is data (RV(evaluation)); the task fails only for a bad plan or option, or when
    the node-side module fails (a Python library missing on the node, a bad path), with that
    module's message.
author:
  - gpunode.bringup contributors (@gpunode)
extends_documentation_fragment:
  - gpunode.bringup.attributes
attributes:
  check_mode:
    support: full
    details: The node-side module only reads and the plan is evaluated on the controller; it runs the same in check mode.
  diff_mode:
    support: N/A
    details: Nothing is changed.
  idempotent:
    support: full
    details: Only reads; never reports a change.
  action:
    description: Indicates this has a corresponding action plugin so some parts of the options can be executed on the controller.
    support: full
options:
  node:
    description: The node's name in Kubernetes.
    type: str
    required: true
  fleet:
    description:
      - The registered result of M(gpunode.bringup.device_plugin_info) for a batch that includes O(node).
      - A failed read (no C(nodes) in it) becomes the finding C(api_unreachable) of the fleet source,
        with the read's message; the node-side checks still run.
    type: dict
  workload:
    description: The registered result of M(gpunode.bringup.gpu_smoke_test) for this node.
    type: dict
  workload_check:
    description: Whether O(workload) is part of the evidence (the role's C(gpu_node_workload_check)).
    type: bool
    default: false
  expected_gpu_count:
    description: GPUs the node should have; unset, the count NVML reads stands for it in the evidence.
    type: int
  node_info:
    description: Options for M(gpunode.bringup.node_info), which runs on the node with the task's
      interpreter, environment and become settings.
    type: dict
    default: {}
  python:
    description:
      - The Python interpreter on the node that runs M(gpunode.bringup.node_info) (such as role
        C(node_env)'s virtualenv). Unset, the host's C(ansible_python_interpreter) or discovery.
    type: str
  steps:
    description: The plan (role variable C(gpunode_plan_steps)); see the role's documentation.
    type: list
    elements: dict
    required: true
  site_checks:
    description: Extra checks, each with C(name), C(check) (jmespath), C(after) (a step name), C(next_action).
    type: list
    elements: dict
    default: []
  policy:
    description: C(allow_safe), C(allow_disruptive), C(drain), C(tried) (list of C(step:action)).
    type: dict
    default: {}
  rounds:
    description: The evaluations of earlier rounds for this node; RV(rounds) is this list plus this round's.
    type: list
    elements: dict
    default: []
notes:
  - Runs the node-side module like any module of the task's host (connection, C(become),
    C(environment), C(ansible_python_interpreter)); the plan is evaluated on the controller, which
    needs jmespath.
seealso:
  - module: gpunode.bringup.node_info
  - module: gpunode.bringup.device_plugin_info
  - plugin: gpunode.bringup.gpu_plan_evaluate
    plugin_type: filter
"""

EXAMPLES = r"""
- name: Read the fleet once for the batch
  gpunode.bringup.device_plugin_info:
    nodes: "{{ ansible_play_batch }}"
  delegate_to: localhost
  run_once: true
  register: fleet

- name: Check this node against the collection's plan
  gpunode.bringup.gpu_plan_check:
    node: "{{ inventory_hostname }}"
    fleet: "{{ fleet }}"
    steps: "{{ gpunode_plan_steps }}"
    node_info:
      expected_gpu_count: 8
  become: true
  register: check

- name: Stop at the first failing step
  ansible.builtin.fail:
    msg: "step {{ check.evaluation.failed_step }} failed"
  when: check.evaluation.failed_step is not none
"""

RETURN = r"""
healthy:
  description: True when no step failed.
  returned: success
  type: bool
  sample: true
evidence:
  description:
    - What the plan's checks read, C(node), C(expected_gpu_count), C(options), C(fleet) (the node's
      entry of the fleet read), C(nvml), C(runtime) and C(probe) (the parts of
      M(gpunode.bringup.node_info)) and C(workload).
  returned: success
  type: dict
evaluation:
  description: The plan walked over the evidence, as the filter P(gpunode.bringup.gpu_plan_evaluate#filter) returns it.
  returned: success
  type: dict
  contains:
    steps:
      description: Each step with C(step), C(verdict) (C(ok), C(failed), C(skipped)), C(evidence) and C(next_action).
      type: list
      elements: dict
    failed_step:
      description: The first failing step; null when none failed.
      type: str
    proposal:
      description: The remediation proposed for the failing step (C(step), C(action), C(description),
        C(disruptive), C(allowed), C(refused)); null when none applies.
      type: dict
  sample:
    steps:
      - {"step": "driver", "verdict": "ok", "evidence": [], "next_action": null}
    failed_step: null
    proposal: null
rounds:
  description: O(rounds) plus RV(evaluation).
  returned: success
  type: list
  elements: dict
node_info:
  description: The node-side module's result, when it failed.
  returned: failure
  type: dict
"""
