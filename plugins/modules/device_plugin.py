#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: device_plugin
short_description: Deploy NVIDIA's device plugin DaemonSet and its configuration
version_added: 0.1.0
description:
  - Runs on the controller and talks to the Kubernetes API.
  - Deploys NVIDIA's device plugin as NVIDIA's static manifest (C(deployments/static/nvidia-device-plugin.yml))
    does - a DaemonSet named V(nvidia-device-plugin-daemonset) in V(kube-system) with the selector label
    C(name=nvidia-device-plugin-ds), a toleration for C(nvidia.com/gpu:NoSchedule), priority class
    V(system-node-critical), a container that drops all capabilities and cannot escalate privileges, and the
    kubelet's C(device-plugins) directory mounted from the host. Every part is an option.
  - The plugin's configuration (O(config)) is rendered into a ConfigMap (O(config_map_name)), mounted into the
    container and named by the C(CONFIG_FILE) environment variable. A hash of it in the pod template
    (annotation C(gpunode.bringup/config-sha256)) rolls the pods when the configuration changes.
  - Writes with server-side apply as field manager C(gpunode-bringup). Each object is read first and compared
    with what the API server would store (a server-side dry run); it is written only when they differ, so
    C(changed) is true only when the live objects change.
  - Every option is validated before anything is written; a bad value fails naming the option and the cause.
  - With O(wait), waits for the rollout and, unlike C(kubernetes.core.k8s)'s wait, does not count a DaemonSet
    scheduled on zero nodes as ready (see O(allow_empty)).
author:
  - gpunode.bringup contributors (@gpunode)
extends_documentation_fragment:
  - gpunode.bringup.k8s_auth_options
  - gpunode.bringup.attributes
attributes:
  check_mode:
    support: full
    details: Check mode sends the apply (or delete) as a server-side dry run (C(dryRun=All)) and writes nothing;
      C(changed) and the diff come from the API server's answer. O(wait) is skipped.
  diff_mode:
    support: full
    details: Returns the ConfigMap and the DaemonSet before and after, without status and server-maintained metadata.
  idempotent:
    support: full
options:
  state:
    description:
      - V(present) applies the ConfigMap and the DaemonSet; V(absent) deletes both.
    type: str
    choices: [present, absent]
    default: present
  name:
    description:
      - Name of the DaemonSet.
    type: str
    default: nvidia-device-plugin-daemonset
  namespace:
    description:
      - Namespace of the DaemonSet and the ConfigMap. It must exist; a missing namespace fails before anything is
        written.
    type: str
    default: kube-system
  image:
    description:
      - Image repository, without tag or digest (those go in O(tag)).
    type: str
    default: nvcr.io/nvidia/k8s-device-plugin
  tag:
    description:
      - Image tag, or a digest C(sha256:<64 hex digits>) (then the image is referenced as C(repository@digest)).
      - The default is the version NVIDIA's static manifest pins.
    type: str
    default: v0.17.4
  image_pull_policy:
    description:
      - The container's C(imagePullPolicy). Unset, the API server's default applies (V(IfNotPresent) for a tag
        other than C(latest)).
    type: str
    choices: [Always, IfNotPresent, Never]
  image_pull_secrets:
    description:
      - Names of Secrets in O(namespace) used to pull the image.
    type: list
    elements: str
    default: []
  selector_labels:
    description:
      - The DaemonSet's selector, also the pod template's labels.
      - Kubernetes does not allow changing the selector of an existing DaemonSet; delete it first (O(state=absent)).
    type: dict
    default:
      name: nvidia-device-plugin-ds
  node_selector:
    description:
      - The pod's C(nodeSelector) (labels a node must carry). Empty, none is set.
    type: dict
    default: {}
  node_affinity:
    description:
      - The pod's required node affinity - a list of Kubernetes C(NodeSelectorTerm) dictionaries, ORed, each with
        C(matchExpressions) and/or C(matchFields) (C(key), C(operator) among V(In), V(NotIn), V(Exists),
        V(DoesNotExist), V(Gt), V(Lt), and C(values)).
      - Unset, nodes labelled C(nvidia.com/gpu.present=true) (GPU Feature Discovery) or
        C(feature.node.kubernetes.io/pci-10de.present=true) (Node Feature Discovery, NVIDIA's PCI vendor id).
      - An empty list sets no node affinity; the DaemonSet then targets every node it tolerates.
    type: list
    elements: dict
  tolerations:
    description:
      - The pod's tolerations, as Kubernetes C(Toleration) dictionaries (C(key), C(operator), C(value),
        C(effect), C(tolerationSeconds)).
      - Unset, C(nvidia.com/gpu) with operator V(Exists) and effect V(NoSchedule), as NVIDIA's manifest.
      - The DaemonSet controller adds its own (C(node.kubernetes.io/unschedulable) and the node condition taints).
    type: list
    elements: dict
  priority_class_name:
    description:
      - The pod's priority class. An empty string sets none.
    type: str
    default: system-node-critical
  resources:
    description:
      - The container's C(resources), a dictionary with C(requests) and/or C(limits), each a dictionary of
        quantities by resource name (for example C(cpu) V(50m) and C(memory) V(64Mi)). Unset, none.
    type: dict
  runtime_class_name:
    description:
      - The pod's C(runtimeClassName), for example V(nvidia) where the NVIDIA runtime is not the container
        runtime's default.
    type: str
  env:
    description:
      - Extra environment variables of the container, as names and values.
      - Variables the plugin would read instead of its config file (C(CONFIG_FILE), C(MIG_STRATEGY),
        C(FAIL_ON_INIT_ERROR), C(DEVICE_LIST_STRATEGY), C(DEVICE_ID_STRATEGY)) are refused; use O(config).
    type: dict
    default: {}
  kubelet_root_dir:
    description:
      - The kubelet's root directory on the nodes; its C(device-plugins) subdirectory is mounted into the
        container at C(/var/lib/kubelet/device-plugins), where the plugin looks for it.
    type: str
    default: /var/lib/kubelet
  config_map_name:
    description:
      - Name of the ConfigMap that holds the plugin's config file (key C(config.yaml)).
    type: str
    default: nvidia-device-plugin-config
  config:
    description:
      - "The plugin's configuration, rendered as its config file (C(version: v1))."
      - Rendered and checked before anything is written; an invalid combination (time-slicing with MPS, fewer than
        2 replicas, a MIG resource without O(config.mig_strategy=mixed)) fails naming the option.
    type: dict
    default: {}
    suboptions:
      mig_strategy:
        description:
          - C(flags.migStrategy) - how MIG devices are exposed.
        type: str
        choices: [none, single, mixed]
        default: none
      fail_on_init_error:
        description:
          - C(flags.failOnInitError) - exit when initialisation fails (the plugin's default). V(false) makes the
            plugin wait forever instead, which hides a broken node as a Running pod.
        type: bool
        default: true
      device_list_strategy:
        description:
          - C(flags.plugin.deviceListStrategy) - how allocated devices are passed to the container runtime.
        type: list
        elements: str
        choices: [envvar, volume-mounts, cdi-annotations, cdi-cri]
        default: [envvar]
      device_id_strategy:
        description:
          - C(flags.plugin.deviceIDStrategy) - whether devices are passed by UUID or index.
        type: str
        choices: [uuid, index]
        default: uuid
      time_slicing:
        description:
          - C(sharing.timeSlicing) - share each GPU between pods by CUDA time-slicing. Cannot be combined with
            O(config.mps).
        type: dict
        suboptions:
          rename_by_default:
            description:
              - Advertise each shared resource as C(<name>.shared).
            type: bool
            default: false
          fail_requests_greater_than_one:
            description:
              - Refuse a request for more than one replica of a shared resource.
            type: bool
            default: false
          resources:
            description:
              - The resources to share - C(name) (V(nvidia.com/gpu), or a MIG resource such as
                V(nvidia.com/mig-1g.10gb) with O(config.mig_strategy=mixed)) and C(replicas) (at least 2).
            type: list
            elements: dict
            required: true
      mps:
        description:
          - C(sharing.mps) - share each GPU through CUDA MPS (NVIDIA marks it experimental). Cannot be combined with
            O(config.time_slicing), supports only V(nvidia.com/gpu) and needs O(config.mig_strategy=none).
        type: dict
        suboptions:
          rename_by_default:
            description:
              - Advertise each shared resource as C(<name>.shared).
            type: bool
            default: false
          resources:
            description:
              - The resources to share - C(name) and C(replicas) (at least 2).
            type: list
            elements: dict
            required: true
  wait:
    description:
      - Wait until the rollout is complete - the controller has observed the DaemonSet's generation and the
        numbers of updated, ready and desired pods are equal (and, with O(expected_nodes), each of those nodes
        has a Ready plugin pod). With O(state=absent), wait until the DaemonSet and its pods are gone.
      - Zero desired pods is not complete unless O(allow_empty) is set or O(expected_nodes) is an empty list.
      - The wait watches the DaemonSet (a LIST, then a WATCH of its events) until O(wait_timeout). On timeout the
        task fails naming each node whose plugin pod is not ready and why (its waiting reason, or why the DaemonSet
        does not target it).
    type: bool
    default: false
  wait_timeout:
    description:
      - Seconds to wait with O(wait). 0 checks once.
    type: float
    default: 120
  allow_empty:
    description:
      - Count a DaemonSet scheduled on zero nodes as rolled out (a cluster without GPU nodes yet).
    type: bool
    default: false
  expected_nodes:
    description:
      - Nodes that must run a Ready plugin pod for the rollout to be complete.
      - An empty list declares that no node is expected, so zero desired pods is complete.
    type: list
    elements: str
notes:
  - The ConfigMap is applied before the DaemonSet that mounts it; O(state=absent) deletes the DaemonSet first.
  - Changing O(selector_labels) of an existing DaemonSet fails (the API server refuses a selector change).
seealso:
  - module: gpunode.bringup.device_plugin_info
  - module: gpunode.bringup.gpu_node
  - name: NVIDIA device plugin
    description: NVIDIA's device plugin for Kubernetes, its static manifest and configuration file.
    link: https://github.com/NVIDIA/k8s-device-plugin
"""

EXAMPLES = r"""
- name: Deploy the device plugin as NVIDIA's static manifest, and wait for it on the GPU nodes
  gpunode.bringup.device_plugin:
    kubeconfig: ~/.kube/config
    wait: true
    wait_timeout: 300

- name: Time-slice each GPU four ways on nodes that need the nvidia runtime class
  gpunode.bringup.device_plugin:
    runtime_class_name: nvidia
    config:
      time_slicing:
        fail_requests_greater_than_one: true
        resources:
          - name: nvidia.com/gpu
            replicas: 4

- name: Expose MIG devices per profile, from a mirror, on nodes labelled by hand
  gpunode.bringup.device_plugin:
    image: registry.example.com/nvidia/k8s-device-plugin
    image_pull_secrets: [registry-example]
    node_affinity: []
    node_selector:
      example.com/gpu: "true"
    config:
      mig_strategy: mixed
    wait: true
    expected_nodes: [gpu-01, gpu-02]

- name: Remove the device plugin
  gpunode.bringup.device_plugin:
    state: absent
    wait: true
"""

RETURN = r"""
daemonset:
  description: The DaemonSet after the change (in check mode, as the API server's dry run would store it), without
    C(status) and server-maintained metadata. Empty after O(state=absent).
  returned: always
  type: dict
config_map:
  description: The ConfigMap after the change, as RV(daemonset). Empty after O(state=absent).
  returned: always
  type: dict
config:
  description: The plugin's configuration as rendered into the ConfigMap's C(config.yaml).
  returned: always
  type: dict
  sample:
    version: v1
    flags:
      migStrategy: none
      failOnInitError: true
      plugin:
        deviceListStrategy: envvar
        deviceIDStrategy: uuid
image:
  description: The container image reference.
  returned: always
  type: str
  sample: nvcr.io/nvidia/k8s-device-plugin:v0.17.4
rollout:
  description: The rollout as the wait saw it last.
  returned: when O(wait) is true, O(state=present) and not in check mode
  type: dict
  contains:
    complete:
      description: Whether the rollout completed.
      type: bool
    reason:
      description: The rollout's state in words.
      type: str
      sample: 3 of 3 pods updated and ready
    generation:
      description: The DaemonSet's C(metadata.generation).
      type: int
    observed_generation:
      description: The controller's C(status.observedGeneration).
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
    waited_s:
      description: Seconds the wait took.
      type: float
    nodes_not_ready:
      description: Each node whose plugin pod was not ready, with C(node), C(pod) and C(reason) (filled on timeout).
      type: list
      elements: dict
api_requests:
  description: API requests the task made, retries included.
  returned: always
  type: int
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpunode.bringup.plugins.module_utils._device_plugin import (
    DEFAULT_CONFIG_MAP,
    DEFAULT_IMAGE,
    DEFAULT_KUBELET_ROOT,
    DEFAULT_NAME,
    DEFAULT_NAMESPACE,
    DEFAULT_PRIORITY_CLASS,
    DEFAULT_SELECTOR_LABELS,
    DEFAULT_TAG,
    DEVICE_ID_STRATEGIES,
    DEVICE_LIST_STRATEGIES,
    MIG_STRATEGIES,
    PULL_POLICIES,
    device_plugin_result,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_args import auth_argument_spec
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import HAS_KUBERNETES, KUBERNETES_IMPORT_ERROR
from ansible_collections.gpunode.bringup.plugins.module_utils._module import require_library, run_module


def sharing_spec(time_slicing):
    spec = dict(
        rename_by_default=dict(type="bool", default=False),
        resources=dict(type="list", elements="dict", required=True),
    )
    if time_slicing:
        spec["fail_requests_greater_than_one"] = dict(type="bool", default=False)
    return spec


def main():
    argument_spec = auth_argument_spec(dict(
        state=dict(type="str", default="present", choices=["present", "absent"]),
        name=dict(type="str", default=DEFAULT_NAME),
        namespace=dict(type="str", default=DEFAULT_NAMESPACE),
        image=dict(type="str", default=DEFAULT_IMAGE),
        tag=dict(type="str", default=DEFAULT_TAG),
        image_pull_policy=dict(type="str", choices=list(PULL_POLICIES)),
        image_pull_secrets=dict(type="list", elements="str", default=[], no_log=False),
        selector_labels=dict(type="dict", default=dict(DEFAULT_SELECTOR_LABELS)),
        node_selector=dict(type="dict", default={}),
        node_affinity=dict(type="list", elements="dict"),
        tolerations=dict(type="list", elements="dict"),
        priority_class_name=dict(type="str", default=DEFAULT_PRIORITY_CLASS),
        resources=dict(type="dict"),
        runtime_class_name=dict(type="str"),
        env=dict(type="dict", default={}),
        kubelet_root_dir=dict(type="str", default=DEFAULT_KUBELET_ROOT),
        config_map_name=dict(type="str", default=DEFAULT_CONFIG_MAP),
        config=dict(type="dict", default={}, options=dict(
            mig_strategy=dict(type="str", default="none", choices=list(MIG_STRATEGIES)),
            fail_on_init_error=dict(type="bool", default=True),
            device_list_strategy=dict(type="list", elements="str", default=["envvar"],
                                      choices=list(DEVICE_LIST_STRATEGIES)),
            device_id_strategy=dict(type="str", default="uuid", choices=list(DEVICE_ID_STRATEGIES)),
            time_slicing=dict(type="dict", options=sharing_spec(True)),
            mps=dict(type="dict", options=sharing_spec(False)),
        )),
        wait=dict(type="bool", default=False),
        wait_timeout=dict(type="float", default=120),
        allow_empty=dict(type="bool", default=False),
        expected_nodes=dict(type="list", elements="str"),
    ))
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    require_library(module, "kubernetes", HAS_KUBERNETES, KUBERNETES_IMPORT_ERROR)
    run_module(module, lambda: device_plugin_result(module.params, module.check_mode, module._diff))


if __name__ == "__main__":
    main()
