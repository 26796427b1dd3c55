# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# Apache License 2.0 (see LICENSE)
# Private to the gpunode.bringup collection; not a public API.
"""The kubelet gRPC contracts (device plugin v1beta1, pod-resources v1), generated from plugin_src/."""
