# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""One exception family for the collection; modules turn it into fail_json in one place
(see _module.run_module)."""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

from typing import Any, Dict, Optional


class GpuNodeError(Exception):
    """A failure the operator can act on: ``msg`` names the object and the cause."""

    def __init__(self, msg: str, action: Optional[str] = None, **details: Any) -> None:
        super().__init__(msg)
        self.msg = msg
        self.action = action
        self.details: Dict[str, Any] = details

    def to_result(self) -> Dict[str, Any]:
        result: Dict[str, Any] = dict(self.details)
        result["msg"] = self.msg if not self.action else "%s. Next: %s" % (self.msg.rstrip("."), self.action)
        if self.action:
            result["action"] = self.action
        return result


class InvalidOptionError(GpuNodeError):
    """An option value the module cannot use; raised before anything is written."""


class K8sError(GpuNodeError):
    """The Kubernetes API refused or could not be reached."""


class K8sForbiddenError(K8sError):
    """The identity lacks an RBAC rule ("forbidden: <verb> <resource>")."""


class K8sTimeoutError(K8sError):
    """A wait reached its deadline."""


class NodeProbeError(GpuNodeError):
    """A node-side check could not run at all (bad path, unreadable file)."""
