# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""The kubelet gRPC contracts (device plugin v1beta1, pod-resources v1), generated from plugin_src/."""
