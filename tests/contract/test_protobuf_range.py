"""The generated stubs import and round-trip under the lowest and highest protobuf that
requirements.txt admits (installed with pip into a cache under .build, reused across runs)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".build" / "protobuf-range"

SCRIPT = r"""
import google.protobuf, sys
from ansible_collections.gpunode.bringup.plugins.module_utils._kubelet_api import deviceplugin_v1beta1 as dp, podresources_v1 as pr
r = dp.RegisterRequest(version="v1beta1", endpoint="nvidia-gpu.sock", resource_name="nvidia.com/gpu")
assert dp.RegisterRequest.FromString(r.SerializeToString()).resource_name == "nvidia.com/gpu"
a = dp.ContainerAllocateResponse(envs={"K": "V"})
assert dp.ContainerAllocateResponse.FromString(a.SerializeToString()).envs["K"] == "V"
p = pr.GetPodResourcesResponse(pod_resources=pr.PodResources(name="x"))
assert pr.GetPodResourcesResponse.FromString(p.SerializeToString()).pod_resources.name == "x"
print(google.protobuf.__version__)
"""


def protobuf_bounds() -> tuple:
    line = next(l for l in (ROOT / "requirements.txt").read_text().splitlines() if l.startswith("protobuf"))
    floor = re.search(r">=\s*([\d.]+)", line).group(1)
    ceiling = re.search(r"<\s*([\d.]+)", line).group(1)
    return floor, ceiling


@pytest.mark.parametrize("bound", ["floor", "ceiling"])
def test_stubs_under_protobuf_bound(bound):
    floor, ceiling = protobuf_bounds()
    spec = "protobuf==%s" % floor if bound == "floor" else "protobuf<%s" % ceiling
    target = CACHE / bound / re.sub(r"[^\w.]", "_", spec)
    if not (target / "google" / "protobuf").is_dir():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               "--no-deps", "--target", str(target), spec], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
    env = {"PYTHONPATH": "%s:%s" % (target, ROOT / ".build"), "PATH": "/usr/bin:/bin"}
    # -S: no site-packages, so only the protobuf under test is importable
    proc = subprocess.run([sys.executable, "-S", "-c", SCRIPT], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    version = proc.stdout.strip()
    if bound == "floor":
        assert version == floor
    else:
        assert int(version.split(".")[0]) < int(ceiling.split(".")[0])
