# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""The one place where the collection's errors become ``fail_json``."""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

from typing import Any, Callable, Dict

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import GpuNodeError


def run_module(module: Any, body: Callable[[], Dict[str, Any]]) -> None:
    """Run ``body()``; exit with its result, or fail with a GpuNodeError's message and details."""
    try:
        result = body()
    except GpuNodeError as exc:
        module.fail_json(**exc.to_result())
    else:
        module.exit_json(**result)


def require_library(module: Any, library: str, present: bool, import_error: Any) -> None:
    """Fail with Ansible's standard message when a Python library is missing on the target."""
    if not present:
        module.fail_json(msg=missing_required_lib(library), exception=import_error)
