#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: container_runtime_info
short_description: Check that a node's container runtime injects the NVIDIA driver
version_added: 0.1.0
description:
  - Runs on the GPU node. Reads the container runtime's configuration files and reports whether an
    C(nvidia) runtime handler exists, the binary it runs and whether that binary exists, whether it
    is the default runtime (or a RuntimeClass is needed), and the CDI specs on the node.
  - "containerd: C(/etc/containerd/config.toml) and the files its C(imports) pull in (globs expanded
    in name order, relative to the importing file, imports of imports followed). Config version 3
    (containerd 2.x) merges imported keys deeply; versions 1 and 2 (containerd 1.x) let an imported
    file that configures the CRI plugin replace that plugin's whole section, as containerd does.
    Files in C(/etc/containerd/conf.d) that nothing imports are reported as ignored."
  - "k3s and RKE2: the containerd config they generate at start under
    C(/var/lib/rancher/k3s/agent/etc/containerd/) or C(/var/lib/rancher/rke2/agent/etc/containerd/);
    their C(config.toml.tmpl) and C(config-v3.toml.tmpl) templates are listed, and read only when no
    generated config exists and the template is plain TOML."
  - "CRI-O: C(/etc/crio/crio.conf), then each file in C(/etc/crio/crio.conf.d) in name order."
  - "CDI: spec files under C(/etc/cdi) and C(/var/run/cdi), with their C(kind)."
  - A misconfigured runtime is data (RV(healthy), RV(findings)), not a failure; the module fails only for
    bad options or when no TOML library is available.
author:
  - gpunode.bringup contributors (@gpunode)
requirements:
  - Python 3.11 or later (tomllib), or C(tomli) on Python 3.9 and 3.10
extends_documentation_fragment:
  - gpunode.bringup.attributes
  - gpunode.bringup.attributes.info_module
options:
  node_root:
    description:
      - Directory that stands for the node's C(/); every configuration path is read below it.
        V(/) on a real node; a simulated node's root in the lab.
    type: path
    default: /
  runtime:
    description:
      - Which runtime's configuration to read. V(auto) takes the first one present in the order
        k3s, RKE2, containerd, CRI-O (configuration files first, then the containerd and CRI-O sockets).
    type: str
    choices: [auto, containerd, k3s, rke2, crio]
    default: auto
  config_path:
    description:
      - The runtime's main configuration file as a path on the node, when it is not at the usual place
        (for example k3s with another C(--data-dir)). Needs O(runtime) other than V(auto).
    type: path
  handler_name:
    description:
      - Name of the runtime handler that runs the NVIDIA container runtime (the C(handler) of its
        RuntimeClass).
    type: str
    default: nvidia
  require_default_runtime:
    description:
      - Whether the handler must be the default runtime. NVIDIA's device plugin manifest sets no
        C(runtimeClassName), so it needs the NVIDIA runtime as default; set V(false) when the plugin
        runs with C(runtimeClassName) (RV(runtime_class_needed) then says so, without a finding).
    type: bool
    default: true
attributes:
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: posix
notes:
  - "Findings (all errors): C(container_runtime_not_found), C(runtime_config_invalid),
    C(nvidia_runtime_missing), C(nvidia_runtime_binary_missing), C(nvidia_runtime_not_default)
    (only with O(require_default_runtime))."
seealso:
  - module: gpunode.bringup.nvml_info
  - name: NVIDIA Container Toolkit, configuring containerd and CRI-O
    description: The C(nvidia-ctk runtime configure) command the actions refer to.
    link: https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html
"""

EXAMPLES = r"""
- name: Check the node's container runtime
  gpunode.bringup.container_runtime_info:
  become: true
  register: runtime

- name: Report what to fix
  ansible.builtin.debug:
    msg: "{{ runtime.findings | map(attribute='action') | list }}"
  when: not runtime.healthy

- name: A k3s node whose device plugin uses runtimeClassName nvidia
  gpunode.bringup.container_runtime_info:
    runtime: k3s
    require_default_runtime: false
  become: true
  register: runtime
"""

RETURN = r"""
healthy:
  description: True when no finding has severity C(error).
  returned: always
  type: bool
  sample: false
findings:
  description: What is wrong, each with C(code), C(severity), C(gpu) (always null here), C(message) and C(action).
  returned: always
  type: list
  elements: dict
  sample:
    - code: nvidia_runtime_not_default
      severity: error
      gpu: null
      message: "The default runtime is runc, not 'nvidia': pods without runtimeClassName (such as NVIDIA's
        device plugin manifest) start without the GPU driver"
      action: "Run 'nvidia-ctk runtime configure --runtime=containerd --set-as-default' and systemctl restart
        containerd, or run the device plugin with runtimeClassName: nvidia (a RuntimeClass whose handler is nvidia)."
runtime:
  description: The runtime whose configuration was read (C(containerd), C(k3s), C(rke2), C(crio)); null when none was found.
  returned: always
  type: str
  sample: containerd
detected_runtimes:
  description: Every runtime whose configuration or socket is present, in the order V(auto) tries them.
  returned: always
  type: list
  elements: str
  sample: [containerd]
config_path:
  description: The main configuration file (a node path).
  returned: always
  type: str
  sample: /etc/containerd/config.toml
config_version:
  description: The containerd config schema version (1, 2 or 3); null for CRI-O or when no file was read.
  returned: always
  type: int
  sample: 2
config_files:
  description: Every file considered, in merge order, with C(path), C(role) (main, import, drop-in, template),
    C(loaded) and C(error) (why it was not used, or null).
  returned: always
  type: list
  elements: dict
  sample:
    - path: /etc/containerd/config.toml
      role: main
      loaded: true
      error: null
ignored_dropins:
  description: Files in C(/etc/containerd/conf.d) that no import pulls in (containerd does not read them).
  returned: always
  type: list
  elements: str
  sample: []
handler_name:
  description: The handler looked for (option O(handler_name)).
  returned: always
  type: str
  sample: nvidia
handlers:
  description: All runtime handlers in the effective configuration.
  returned: always
  type: list
  elements: str
  sample: [nvidia, runc]
nvidia_runtime:
  description: The NVIDIA handler.
  returned: always
  type: dict
  contains:
    present:
      description: Whether the handler exists in the effective configuration.
      type: bool
    name:
      description: The handler name.
      type: str
    runtime_type:
      description: Its runtime type, for example C(io.containerd.runc.v2) or C(oci) (CRI-O).
      type: str
    binary:
      description: The binary it runs as configured (C(BinaryName), C(runtime_path)), or the runtime's default.
      type: str
      sample: /usr/bin/nvidia-container-runtime
    binary_path:
      description: Where that binary was found on the node (a bare name is looked up in the usual PATH).
      type: str
    binary_exists:
      description: Whether the binary exists and is executable.
      type: bool
    defined_in:
      description: The file that defines the handler.
      type: str
default_runtime:
  description: The default runtime handler (containerd's C(default_runtime_name), C(runc) when unset;
    CRI-O's C(default_runtime), null when unset).
  returned: always
  type: str
  sample: nvidia
nvidia_is_default:
  description: Whether the default runtime is the NVIDIA handler (or another handler running nvidia-container-runtime).
  returned: always
  type: bool
runtime_class_needed:
  description: Whether pods reach the NVIDIA handler only through a RuntimeClass (it exists but is not the default).
  returned: always
  type: bool
cdi:
  description: Container Device Interface state.
  returned: always
  type: dict
  contains:
    enabled:
      description: Whether the runtime reads CDI specs (containerd C(enable_cdi), its default by config version; always for CRI-O).
      type: bool
    spec_dirs:
      description: The directories searched.
      type: list
      elements: str
    specs:
      description: Spec files found, with C(path) and C(kind).
      type: list
      elements: dict
    nvidia_gpu_spec:
      description: Whether a spec of kind C(nvidia.com/gpu) exists.
      type: bool
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.gpunode.bringup.plugins.module_utils._module import require_library, run_module
from ansible_collections.gpunode.bringup.plugins.module_utils._node_args import RUNTIME_ARGS, spec
from ansible_collections.gpunode.bringup.plugins.module_utils._runtime_config import (
    HAS_TOML,
    TOML_IMPORT_ERROR,
    gather_runtime_info,
)


def main():
    module = AnsibleModule(
        argument_spec=spec(RUNTIME_ARGS),
        supports_check_mode=True,
    )
    require_library(module, "tomli", HAS_TOML, TOML_IMPORT_ERROR)
    run_module(module, lambda: gather_runtime_info(module.params))


if __name__ == "__main__":
    main()
