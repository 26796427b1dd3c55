"""The versions of the real parts the lab runs (lab/pins.env) and where ``make lab`` puts them."""
from __future__ import annotations

import functools
import os
from typing import Dict, List

LAB_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(LAB_DIR)
PINS_FILE = os.path.join(LAB_DIR, "pins.env")
CONTROLPLANE_SRC = os.path.join(LAB_DIR, "controlplane")
BIN_DIR = os.path.join(REPO, ".build", "lab", "bin")
KUBE_LAB = os.path.join(BIN_DIR, "kube-lab")
KUBECTL = os.path.join(BIN_DIR, "kubectl")  # kube-lab answering as kubectl (lab.build links it)
DEVICE_PLUGIN_IMAGE = "nvcr.io/nvidia/k8s-device-plugin"
DEVICE_PLUGIN_MODULE = "github.com/NVIDIA/k8s-device-plugin"


@functools.lru_cache(maxsize=None)
def pins() -> Dict[str, str]:
    values: Dict[str, str] = {}
    with open(PINS_FILE, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _sep, value = line.partition("=")
                values[key.strip()] = value.strip()
    return values


def device_plugin_versions() -> List[str]:
    return pins()["DEVICE_PLUGIN_VERSIONS"].split()


def device_plugin_binary(tag: str) -> str:
    """Where the plugin built for image tag ``tag`` lives (it may not exist)."""
    return os.path.join(BIN_DIR, "device-plugin-%s" % tag, "nvidia-device-plugin")


def staging_version(kubernetes_version: str) -> str:
    """The k8s.io/* staging modules' version of a Kubernetes release: v1.37.2 -> v0.37.2."""
    major, minor, patch = kubernetes_version.lstrip("v").split(".")[:3]
    if major != "1":
        raise ValueError("unexpected Kubernetes version %s" % kubernetes_version)
    return "v0.%s.%s" % (minor, patch)
