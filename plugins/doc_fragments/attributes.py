# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Attribute descriptions shared by the collection's modules; each module states its support."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # Descriptions only: every module states support for each attribute in its own DOCUMENTATION.
    DOCUMENTATION = r"""
options: {}
attributes:
  check_mode:
    description: Can run in check mode and return the changed status it predicts without modifying the target.
  diff_mode:
    description: Returns details on what has changed (or would change in check mode) when run with C(--diff).
  idempotent:
    description:
      - When run twice in a row outside check mode with the same arguments, the second run reports no change.
"""

    # For read-only modules (*_info, probes).
    INFO_MODULE = r"""
options: {}
attributes:
  check_mode:
    support: full
    details: This module only reads; it runs the same in check mode.
  diff_mode:
    support: N/A
    details: This module only reads and changes nothing.
  idempotent:
    support: full
    details: This module only reads and never reports a change.
"""
