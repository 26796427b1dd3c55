"""MIG in the lab NVML library: lab/nvml_state.py's MIG layouts, the NVML MIG calls as pynvml sees
them, and NVIDIA's real device plugin (v0.17.4) advertising nvidia.com/mig-<profile> resources
from them (skipped when .build/lab/bin/device-plugin-v0.17.4/nvidia-device-plugin is absent).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / ".build", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from lab import nvml_state  # noqa: E402

PLUGIN = ROOT / ".build" / "lab" / "bin" / "device-plugin-v0.17.4" / "nvidia-device-plugin"
MIB = 1024 * 1024

PRELUDE = textwrap.dedent(
    """
    import ctypes, json, os, sys
    import pynvml as N
    from lab import nvml_state as S

    def err(fn, *args):
        try:
            fn(*args)
        except N.NVMLError as exc:
            return type(exc).__name__
        return None

    def done(result):
        print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def lib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to build the lab NVML library")
    assert gcc is not None
    out = tmp_path_factory.mktemp("lab-nvml-mig")
    sources = sorted(str(p) for p in (ROOT / "lab" / "nvml").glob("*.c") if p.name != "nvidia_smi.c")
    subprocess.run([gcc, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-pthread",
                    "-Wl,-soname,libnvidia-ml.so.1", "-o", str(out / "libnvidia-ml.so.1"), *sources], check=True)
    return out


def child_env(lib: Path, state: Path, **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NVIDIA_VISIBLE_DEVICES", nvml_state.ENV_INIT_ERROR)}
    env.update(LD_LIBRARY_PATH=str(lib), PYTHONPATH=str(ROOT), GPUNODE_LAB_NVML_STATE=str(state))
    env.update(extra)
    return env


def run_child(lib: Path, code: str, state: Path, **env: str) -> Any:
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=child_env(lib, state, **env),
                          cwd=str(ROOT), capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, "child failed (rc=%d)\n%s%s" % (proc.returncode, proc.stdout, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# A100-80GB node: GPU 0 mixed layout, GPU 1 one 7g, GPU 2 MIG disabled, GPU 3 MIG enabled but empty.
LAYOUT = {0: ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"], 1: ["7g.80gb"], 3: []}


@pytest.fixture
def mig_node(tmp_path: Path) -> Path:
    path = tmp_path / "nvml.state"
    nvml_state.write_state(str(path), nvml_state.default_node_state("mig-node", gpu_count=4))
    nvml_state.configure_mig(str(path), LAYOUT)
    return path


# ---- lab/nvml_state.py ------------------------------------------------------------------------

def go_nvlib_gb(device_total_bytes: int, mig_memory_mib: int) -> int:
    """go-nvlib v0.7.4 getMigMemorySizeGB: how NVIDIA's plugin names a profile's memory."""
    fraction = math.ceil(mig_memory_mib * MIB / device_total_bytes * 8) / 8
    total_gb = (device_total_bytes + 1024 ** 3 - 1) // 1024 ** 3
    return int(round(fraction * total_gb))


@pytest.mark.parametrize("model", ["A100", "A100-40GB", "H100"])
def test_profile_names_are_what_go_nvlib_derives(model: str) -> None:
    kind = nvml_state.GPU_MODELS[model]
    assert [p.index for p in kind.mig_profiles] == [0, 7, 9, 1, 2, 3, 4]
    for profile in kind.mig_profiles:
        suffix = "+me" if profile.index == 7 else ""
        expected = "%dg.%dgb%s" % (profile.slices, go_nvlib_gb(kind.memory_total_mib * MIB, profile.memory_mib), suffix)
        assert profile.name == expected


def test_plan_places_like_the_driver() -> None:
    gpu = nvml_state.make_gpu("n", 0, "A100")
    plan = nvml_state.plan_mig(gpu, ["3g.40gb", "4g.40gb"])
    assert [(d["profile"], d["gi"], d["ci"], d["placement"]) for d in plan] == [("4g.40gb", 1, 0, 0), ("3g.40gb", 2, 0, 4)]
    assert [d["gi"] for d in nvml_state.plan_mig(gpu, ["1g.10gb"] * 7)] == [7, 8, 9, 10, 11, 12, 13]
    plan = nvml_state.plan_mig(gpu, ["2g.20gb", "2g.20gb", "2g.20gb", "1g.10gb"])
    assert [(d["gi"], d["placement"]) for d in plan] == [(3, 0), (4, 2), (5, 4), (13, 6)]
    plan = nvml_state.plan_mig(gpu, ["1g.20gb"] * 4)
    assert [(d["gi"], d["placement"]) for d in plan] == [(3, 0), (4, 2), (5, 4), (6, 6)]
    assert [d["gi"] for d in nvml_state.plan_mig(gpu, ["7g.80gb"])] == [0]
    assert nvml_state.plan_mig(gpu, []) == []
    for device in nvml_state.plan_mig(gpu, ["1g.10gb+me", "1g.10gb", "2g.20gb", "3g.40gb"]):
        assert re.fullmatch(r"MIG-[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", device["uuid"])
    h100 = nvml_state.make_gpu("n", 1, "H100")
    assert [d["profile"] for d in nvml_state.plan_mig(h100, ["1g.20gb", "3g.40gb"])] == ["3g.40gb", "1g.20gb"]
    small = nvml_state.make_gpu("n", 2, "A100-40GB")
    assert [d["profile"] for d in nvml_state.plan_mig(small, ["1g.5gb", "3g.20gb"])] == ["3g.20gb", "1g.5gb"]


@pytest.mark.parametrize(
    ("model", "layout", "match"),
    [
        ("A100", ["1g.5gb"], "no MIG profile '1g.5gb'"),                 # an A100-40GB profile
        ("A100-40GB", ["1g.10gb+me"], "no MIG profile"),
        ("A100", ["3g.40gb"] * 3, "allows 2 instance"),
        ("A100", ["1g.10gb+me", "1g.10gb+me"], "allows 1 instance"),
        ("A100", ["4g.40gb", "4g.40gb"], "allows 1 instance"),
        ("A100", ["4g.40gb", "2g.20gb", "2g.20gb"], "needs 8 compute slices"),
        ("A100", ["3g.40gb", "3g.40gb", "1g.10gb"], "does not fit"),     # 7 slices, all 8 memory slices taken
        ("A100", ["7g.80gb", "1g.10gb"], "needs 8 compute slices"),
        ("A100", ["1g.10gb"] * 8, "at most 7"),
        ("A100", "1g.10gb", "list of profile names"),
        ("V100", ["1g.10gb"], "does not support MIG"),
    ],
)
def test_invalid_layouts_raise(model: str, layout: Any, match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        nvml_state.plan_mig(nvml_state.make_gpu("n", 0, model), layout)


def test_set_mig_is_pure_and_round_trips(tmp_path: Path) -> None:
    healthy = nvml_state.default_node_state("n", gpu_count=3)
    snapshot = json.dumps(healthy, sort_keys=True)
    state = nvml_state.set_mig(healthy, {0: ["1g.10gb"] * 7, "2": ["7g.80gb"]})
    assert json.dumps(healthy, sort_keys=True) == snapshot
    assert [g["mig_current"] for g in state["gpus"]] == [1, 0, 1]
    assert [g["mig_pending"] for g in state["gpus"]] == [1, 0, 1]
    assert [len(g.get("mig_devices", [])) for g in state["gpus"]] == [7, 0, 1]
    path = tmp_path / "nvml.state"
    nvml_state.write_state(str(path), state)
    assert nvml_state.read_state(str(path)) == state
    text = path.read_text()
    assert "gpu.0.mig_profile.0=1g.10gb 19 1 7 14 1 0 0 0 0 9728 1\n" in text
    assert "gpu.2.mig.0.profile=7g.80gb\ngpu.2.mig.0.uuid=%s\ngpu.2.mig.0.gi=0\ngpu.2.mig.0.ci=0\n" \
           "gpu.2.mig.0.placement=0\n" % state["gpus"][2]["mig_devices"][0]["uuid"] in text
    everywhere = nvml_state.set_mig(healthy, ["2g.20gb"])
    assert [len(g["mig_devices"]) for g in everywhere["gpus"]] == [1, 1, 1]
    disabled = nvml_state.set_mig(state, {0: [], 2: []}, mode=0)
    assert disabled == healthy
    with pytest.raises(ValueError, match="takes no MIG devices"):
        nvml_state.set_mig(state, {0: ["1g.10gb"]}, mode=0)
    with pytest.raises(ValueError, match="MIG mode must be 0"):
        nvml_state.set_mig(state, {0: []}, mode=2)
    with pytest.raises(ValueError, match="out of range"):
        nvml_state.set_mig(state, {5: []})
    # the mig_pending fault and its clearing work on a MIG node too
    pending = nvml_state.inject(state, "mig_pending", gpu=0)
    assert (pending["gpus"][0]["mig_current"], pending["gpus"][0]["mig_pending"]) == (1, 0)
    assert nvml_state.clear(pending, "mig_pending") == state


def test_configure_mig_writes_the_file(mig_node: Path) -> None:
    state = nvml_state.read_state(str(mig_node))
    assert [d["profile"] for d in state["gpus"][0]["mig_devices"]] == ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]
    assert [(d["gi"], d["placement"]) for d in state["gpus"][0]["mig_devices"]] == [(2, 4), (3, 0), (9, 2), (10, 3)]
    assert "mig_devices" not in state["gpus"][3] and state["gpus"][3]["mig_current"] == 1
    assert state["gpus"][2]["mig_current"] == 0


def test_mig_minors_file() -> None:
    lines = nvml_state.mig_minors_text(nvml_state.default_node_state("n", gpu_count=2)).splitlines()
    assert lines[:4] == ["config 1", "monitor 2", "gpu0/gi0/access 3", "gpu0/gi0/ci0/access 4"]
    assert len(lines) == 2 + 2 * 15 * 9
    assert "gpu1/gi13/access 255" in lines and "gpu1/gi13/ci0/access 256" in lines  # 3 + 135 + 13 * 9
    assert lines[-1] == "gpu1/gi14/ci7/access 272"


def test_xid_of_a_mig_device_round_trips(tmp_path: Path) -> None:
    state = nvml_state.queue_xid(nvml_state.default_node_state("n", gpu_count=2), 1, 31, gi=9)
    assert state["xid_events"] == [{"seq": 1, "gpu": 1, "xid": 31, "gi": 9, "ci": 0}]
    assert "xid=1 1 31 9 0\n" in nvml_state.render_state(state)
    assert nvml_state.parse_state(nvml_state.render_state(state)) == state


# ---- the NVML MIG calls (pynvml) ----------------------------------------------------------------

ENUMERATE = """
    N.nvmlInit()
    out = []
    for i in range(N.nvmlDeviceGetCount()):
        h = N.nvmlDeviceGetHandleByIndex(i)
        gpu = {"mode": list(N.nvmlDeviceGetMigMode(h)), "max": N.nvmlDeviceGetMaxMigDeviceCount(h),
               "is_mig": N.nvmlDeviceIsMigDeviceHandle(h).value, "migs": []}
        for j in range(gpu["max"]):
            try:
                m = N.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
            except N.NVMLError as exc:
                gpu["migs"].append(type(exc).__name__)
                continue
            a = N.nvmlDeviceGetAttributes(m)
            mem = N.nvmlDeviceGetMemoryInfo(m)
            parent = N.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(m)
            by_uuid = N.nvmlDeviceGetHandleByUUID(N.nvmlDeviceGetUUID(m))
            gpu["migs"].append({
                "uuid": N.nvmlDeviceGetUUID(m), "name": N.nvmlDeviceGetName(m), "is_mig": N.nvmlDeviceIsMigDeviceHandle(m).value,
                "gi": N.nvmlDeviceGetGpuInstanceId(m), "ci": N.nvmlDeviceGetComputeInstanceId(m),
                "parent": N.nvmlDeviceGetUUID(parent), "by_uuid_gi": N.nvmlDeviceGetGpuInstanceId(by_uuid),
                "attrs": [a.multiprocessorCount, a.sharedCopyEngineCount, a.sharedDecoderCount, a.sharedEncoderCount,
                          a.sharedJpegCount, a.sharedOfaCount, a.gpuInstanceSliceCount, a.computeInstanceSliceCount,
                          a.memorySizeMB],
                "memory": [mem.total, mem.used, mem.free],
                "cc": list(N.nvmlDeviceGetCudaComputeCapability(m)),
                "unsupported": [err(N.nvmlDeviceGetMinorNumber, m), err(N.nvmlDeviceGetPciInfo, m),
                                err(N.nvmlDeviceGetMigMode, m), err(N.nvmlDeviceGetTemperature, m, 0)],
            })
        out.append(gpu)
    done(out)
"""


def test_mig_devices_as_nvml_reports_them(lib_dir: Path, mig_node: Path) -> None:
    state = nvml_state.read_state(str(mig_node))
    got = run_child(lib_dir, ENUMERATE, mig_node)
    profiles = {p.name: p for p in nvml_state.MIG_PROFILES_A100_80GB}
    assert [g["mode"] for g in got] == [[1, 1], [1, 1], [0, 0], [1, 1]]
    assert [g["max"] for g in got] == [7, 7, 0, 7]
    assert [g["is_mig"] for g in got] == [0, 0, 0, 0]
    assert got[3]["migs"] == ["NVMLError_NotFound"] * 7
    assert got[1]["migs"][1:] == ["NVMLError_NotFound"] * 6
    for gpu, read in zip(state["gpus"][:2], got[:2]):
        migs = [m for m in read["migs"] if isinstance(m, dict)]
        assert len(migs) == len(gpu["mig_devices"])
        for want, m in zip(gpu["mig_devices"], migs):
            p = profiles[want["profile"]]
            assert m == {
                "uuid": want["uuid"], "name": "NVIDIA A100-SXM4-80GB MIG " + want["profile"], "is_mig": 1,
                "gi": want["gi"], "ci": 0, "parent": gpu["uuid"], "by_uuid_gi": want["gi"],
                "attrs": [p.sm, p.ce, p.dec, p.enc, p.jpeg, p.ofa, p.slices, p.slices, p.memory_mib],
                "memory": [p.memory_mib * MIB, 0, p.memory_mib * MIB], "cc": [8, 0],
                "unsupported": ["NVMLError_NotSupported"] * 4,
            }


def test_instance_profiles_and_instances(lib_dir: Path, mig_node: Path) -> None:
    got = run_child(lib_dir, """
        N.nvmlInit()
        h = N.nvmlDeviceGetHandleByIndex(0)
        out = {"gip": {}, "gip_v2": {}, "gi": {}, "cip": {}, "ci": {}}
        for k in range(18):
            try:
                p = N.nvmlDeviceGetGpuInstanceProfileInfo(h, k, 1)
                out["gip"][k] = [p.id, p.sliceCount, p.instanceCount, p.multiprocessorCount, p.copyEngineCount,
                                 p.decoderCount, p.encoderCount, p.jpegCount, p.ofaCount, p.memorySizeMB]
                v2 = N.nvmlDeviceGetGpuInstanceProfileInfo(h, k)
                out["gip_v2"][k] = [v2.id, v2.memorySizeMB, v2.name.decode() if isinstance(v2.name, bytes) else v2.name]
            except N.NVMLError as exc:
                out["gip"][k] = type(exc).__name__
        for gi_id in (2, 3, 9, 10, 0, 1):
            try:
                gi = N.nvmlDeviceGetGpuInstanceById(h, gi_id)
            except N.NVMLError as exc:
                out["gi"][gi_id] = type(exc).__name__
                continue
            info = N.nvmlGpuInstanceGetInfo(gi)
            ci = N.nvmlGpuInstanceGetComputeInstanceById(gi, 0)
            cinfo = N.nvmlComputeInstanceGetInfo(ci)
            out["gi"][gi_id] = [info.id, info.profileId, info.placement.start, info.placement.size,
                                N.nvmlDeviceGetUUID(info.device), err(N.nvmlGpuInstanceGetComputeInstanceById, gi, 1),
                                [cinfo.id, cinfo.profileId, cinfo.placement.start, cinfo.placement.size,
                                 N.nvmlDeviceGetUUID(cinfo.device), N.nvmlGpuInstanceGetInfo(cinfo.gpuInstance).id]]
            if gi_id == 2:
                for j in range(9):
                    try:
                        c = N.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, j, 0, 1)
                        out["cip"][j] = [c.id, c.sliceCount, c.instanceCount, c.multiprocessorCount,
                                         c.sharedCopyEngineCount, c.sharedDecoderCount]
                        c2 = N.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, j, 0)
                        out["cip"][j].append(c2.name.decode() if isinstance(c2.name, bytes) else c2.name)
                    except N.NVMLError as exc:
                        out["cip"][j] = type(exc).__name__
                out["cip"]["engine1"] = err(N.nvmlGpuInstanceGetComputeInstanceProfileInfo, gi, 0, 1, 1)
        disabled = N.nvmlDeviceGetHandleByIndex(2)
        out["disabled"] = [err(N.nvmlDeviceGetGpuInstanceProfileInfo, disabled, 0, 1),
                           err(N.nvmlDeviceGetGpuInstanceById, disabled, 0),
                           err(N.nvmlDeviceGetMigDeviceHandleByIndex, disabled, 0),
                           err(N.nvmlDeviceGetAttributes, disabled), err(N.nvmlDeviceGetGpuInstanceId, disabled)]
        done(out)
    """, mig_node)
    nss = "NVMLError_NotSupported"
    assert got["gip"] == {
        "0": [19, 1, 7, 14, 1, 0, 0, 0, 0, 9728], "1": [14, 2, 3, 28, 2, 1, 0, 0, 0, 19968],
        "2": [9, 3, 2, 42, 3, 2, 0, 0, 0, 40192], "3": [5, 4, 1, 56, 4, 2, 0, 0, 0, 40192],
        "4": [0, 7, 1, 98, 7, 5, 0, 1, 1, 80640], "5": nss, "6": nss, "7": [20, 1, 1, 14, 1, 1, 0, 1, 1, 9728],
        "8": nss, "9": [15, 1, 4, 14, 1, 1, 0, 0, 0, 19968], "10": nss, "11": nss, "12": nss, "13": nss, "14": nss,
        "15": nss, "16": nss, "17": "NVMLError_InvalidArgument",
    }
    assert got["gip_v2"]["0"] == [19, 9728, "MIG 1g.10gb"] and got["gip_v2"]["7"] == [20, 9728, "MIG 1g.10gb+me"]
    state = nvml_state.read_state(str(mig_node))
    gpu0 = state["gpus"][0]["uuid"]
    assert got["gi"] == {
        "2": [2, 9, 4, 4, gpu0, "NVMLError_NotFound", [0, 2, 0, 3, gpu0, 2]],
        "3": [3, 14, 0, 2, gpu0, "NVMLError_NotFound", [0, 1, 0, 2, gpu0, 3]],
        "9": [9, 19, 2, 1, gpu0, "NVMLError_NotFound", [0, 0, 0, 1, gpu0, 9]],
        "10": [10, 19, 3, 1, gpu0, "NVMLError_NotFound", [0, 0, 0, 1, gpu0, 10]],
        "0": "NVMLError_NotFound", "1": "NVMLError_NotFound",
    }
    # a 3-slice GPU instance offers 1c, 2c and 3c compute instances
    assert got["cip"] == {
        "0": [0, 1, 3, 14, 3, 2, "MIG 1c.3g.40gb"], "1": [1, 2, 1, 28, 3, 2, "MIG 2c.3g.40gb"],
        "2": [2, 3, 1, 42, 3, 2, "MIG 3g.40gb"], "3": nss, "4": nss, "5": nss, "6": nss, "7": nss,
        "8": "NVMLError_InvalidArgument", "engine1": "NVMLError_InvalidArgument",
    }
    assert got["disabled"] == [nss, nss, nss, nss, "NVMLError_InvalidArgument"]


def test_mig_changes_are_seen_by_a_running_process(lib_dir: Path, mig_node: Path) -> None:
    got = run_child(lib_dir, """
        path = os.environ["GPUNODE_LAB_NVML_STATE"]
        N.nvmlInit()
        h = N.nvmlDeviceGetHandleByIndex(1)
        m = N.nvmlDeviceGetMigDeviceHandleByIndex(h, 0)
        out = {"before": N.nvmlDeviceGetName(m)}
        S.configure_mig(path, {1: ["4g.40gb", "3g.40gb"]})        # the 7g is destroyed
        out["old_handle"] = err(N.nvmlDeviceGetUUID, m)
        out["after"] = [N.nvmlDeviceGetName(N.nvmlDeviceGetMigDeviceHandleByIndex(h, j)) for j in range(2)]
        es = N.nvmlEventSetCreate()
        N.nvmlDeviceRegisterEvents(h, N.nvmlEventTypeXidCriticalError, es)
        out["mig_events"] = err(N.nvmlDeviceRegisterEvents, N.nvmlDeviceGetMigDeviceHandleByIndex(h, 0), 8, es)
        S.update_state(path, lambda st: S.queue_xid(st, 1, 31, gi=2))
        d = N.nvmlEventSetWait_v2(es, 1000)
        out["event"] = [d.eventData, d.gpuInstanceId, d.computeInstanceId, N.nvmlDeviceGetIndex(d.device)]
        S.configure_mig(path, {1: []}, mode=0)
        out["disabled"] = [N.nvmlDeviceGetMaxMigDeviceCount(h), err(N.nvmlDeviceGetMigDeviceHandleByIndex, h, 0)]
        S.apply_fault(path, "gpu_lost", gpu=0)
        m0 = N.nvmlDeviceGetHandleByUUID  # a lost parent: its MIG devices are lost too
        out["lost"] = err(N.nvmlDeviceGetHandleByUUID, S.read_state(path)["gpus"][0]["mig_devices"][0]["uuid"])
        done(out)
    """, mig_node)
    assert got == {
        "before": "NVIDIA A100-SXM4-80GB MIG 7g.80gb",
        "old_handle": "NVMLError_InvalidArgument",
        "after": ["NVIDIA A100-SXM4-80GB MIG 4g.40gb", "NVIDIA A100-SXM4-80GB MIG 3g.40gb"],
        "mig_events": "NVMLError_NotSupported",
        "event": [31, 2, 0, 1],
        "disabled": [0, "NVMLError_NotSupported"],
        "lost": "NVMLError_GpuIsLost",
    }


def test_container_view_of_mig_devices(lib_dir: Path, mig_node: Path) -> None:
    state = nvml_state.read_state(str(mig_node))
    g0, g1 = state["gpus"][0], state["gpus"][1]
    code = """
        N.nvmlInit()
        out = []
        for i in range(N.nvmlDeviceGetCount()):
            h = N.nvmlDeviceGetHandleByIndex(i)
            migs = []
            for j in range(N.nvmlDeviceGetMaxMigDeviceCount(h)):
                try:
                    migs.append(N.nvmlDeviceGetUUID(N.nvmlDeviceGetMigDeviceHandleByIndex(h, j)))
                except N.NVMLError:
                    pass
            out.append([N.nvmlDeviceGetUUID(h), migs])
        hidden = %r
        out.append(err(N.nvmlDeviceGetHandleByUUID, hidden))
        done(out)
    """
    uuids0 = [d["uuid"] for d in g0["mig_devices"]]
    cases = [
        (uuids0[2], [[g0["uuid"], [uuids0[2]]]], uuids0[0]),
        ("%s,%s" % (uuids0[3], uuids0[1]), [[g0["uuid"], [uuids0[1], uuids0[3]]]], uuids0[0]),
        ("MIG-%s/9/0" % g0["uuid"], [[g0["uuid"], [uuids0[2]]]], uuids0[3]),               # pre-R470 names
        ("0:0,1", [[g0["uuid"], [uuids0[0]]], [g1["uuid"], [g1["mig_devices"][0]["uuid"]]]], uuids0[1]),
        ("%s,%s" % (uuids0[0], g0["uuid"]), [[g0["uuid"], uuids0]], g1["mig_devices"][0]["uuid"]),
    ]
    for visible, expected, hidden in cases:
        got = run_child(lib_dir, code % hidden, mig_node, NVIDIA_VISIBLE_DEVICES=visible)
        assert got == expected + ["NVMLError_NotFound"], visible


def test_a_broken_mig_entry_makes_the_state_invalid(lib_dir: Path, mig_node: Path) -> None:
    text = mig_node.read_text()
    for broken in (text.replace("gpu.0.mig.1.profile=2g.20gb", "gpu.0.mig.1.profile=5g.50gb"),
                   text.replace("gpu.0.mig.1.gi=3", "gpu.0.mig.1.gi=2"),            # two devices on one GI
                   text.replace("gpu.0.mig.3.", "gpu.0.mig.5.")):                    # a gap in the indexes
        assert broken != text
        mig_node.write_text(broken)
        assert run_child(lib_dir, "done(err(N.nvmlInit))", mig_node) == "NVMLError_LibraryNotFound"


# ---- NVIDIA's device plugin (v0.17.4) --------------------------------------------------------

def _sandbox_problem() -> Optional[str]:
    if not PLUGIN.exists():
        return "NVIDIA's device plugin binary is absent (%s); it is built by the lab's setup" % PLUGIN
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "running the plugin needs root on Linux (a private mount namespace for its fixed socket dir)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is needed to run the plugin in a private mount namespace"
    try:
        import grpc  # noqa: F401
        from ansible_collections.gpunode.bringup.plugins.module_utils._kubelet_api import (  # noqa: F401
            deviceplugin_v1beta1,
        )
    except ImportError as exc:
        return "grpc or the collection's kubelet API classes are not importable: %s" % exc
    probe_dir = tempfile.mkdtemp(prefix="nvml-mig-probe-")
    try:
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               "mount --bind %s /proc/driver" % probe_dir], capture_output=True, text=True, check=False)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    if proc.returncode != 0:
        return "cannot bind-mount over /proc/driver in a private mount namespace: %s" % proc.stderr.strip()
    return None


SANDBOX_PROBLEM = _sandbox_problem()
needs_plugin = pytest.mark.skipif(SANDBOX_PROBLEM is not None, reason=SANDBOX_PROBLEM or "")

# The plugin's socket dir is fixed; inside the private namespace it is our directory. Where the
# host has no /var/lib/kubelet/device-plugins, a tmpfs over /var/lib (in the namespace only) gives
# the mount point. /proc/driver/nvidia-caps/mig-minors maps MIG instances to device nodes.
SANDBOX_SCRIPT = """set -e
if [ ! -d /var/lib/kubelet/device-plugins ]; then
    mount -t tmpfs lab-kubelet /var/lib
    mkdir -p /var/lib/kubelet/device-plugins
fi
mount --bind "$LAB_SOCKETS" /var/lib/kubelet/device-plugins
mount --bind "$LAB_PROC_DRIVER" /proc/driver
exec "$LAB_PLUGIN" "$@"
"""


class Kubelet:
    """The kubelet's Registration service on <dir>/kubelet.sock, recording each Register."""

    def __init__(self, socket_dir: Path) -> None:
        import grpc
        from ansible_collections.gpunode.bringup.plugins.module_utils._kubelet_api import (
            deviceplugin_v1beta1 as dp,
        )

        self.dp = dp
        self.grpc = grpc
        self.socket_dir = socket_dir
        self.registered: List[Any] = []
        self.changed = threading.Condition()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        dp.REGISTRATION.add_to_server(self, self.server)
        self.server.add_insecure_port("unix:" + str(socket_dir / "kubelet.sock"))
        self.server.start()

    def Register(self, request: Any, context: Any) -> Any:  # noqa: N802
        with self.changed:
            self.registered.append(request)
            self.changed.notify_all()
        return self.dp.Empty()

    def wait_for(self, count: int, timeout: float = 30.0) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.registered) < count and time.monotonic() < deadline:
                self.changed.wait(0.2)
            return {r.resource_name: r for r in self.registered}

    def plugin(self, endpoint: str) -> Any:
        channel = self.grpc.insecure_channel("unix:" + str(self.socket_dir / endpoint))
        return self.dp.DEVICE_PLUGIN.stub(channel)

    def stop(self) -> None:
        self.server.stop(0)


class Plugin:
    """NVIDIA's device plugin in a private mount namespace, over the lab NVML library."""

    def __init__(self, work: Path, lib: Path, state: Path, strategy: str, **env: str) -> None:
        self.sockets = work / "device-plugins"
        self.proc_driver = work / "proc-driver"
        (self.proc_driver / "nvidia-caps").mkdir(parents=True)
        self.sockets.mkdir()
        (self.proc_driver / "nvidia-caps" / "mig-minors").write_text(
            nvml_state.mig_minors_text(nvml_state.read_state(str(state))))
        self.log_path = work / "plugin.log"
        self.kubelet = Kubelet(self.sockets)
        environment = child_env(lib, state, LAB_SOCKETS=str(self.sockets), LAB_PROC_DRIVER=str(self.proc_driver),
                                LAB_PLUGIN=str(PLUGIN), **env)
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", SANDBOX_SCRIPT, "lab-plugin",
             "--mig-strategy=" + strategy, "--fail-on-init-error=true", "--device-list-strategy=envvar",
             "--kubelet-socket=/var/lib/kubelet/device-plugins/kubelet.sock"],
            env=environment, stdout=self.log, stderr=subprocess.STDOUT)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        self.kubelet.stop()


@pytest.fixture
def plugin_factory(lib_dir: Path) -> Iterator[Any]:
    started: List[Plugin] = []
    work_dirs: List[str] = []

    def start(state: Path, strategy: str, **env: str) -> Plugin:
        work = Path(tempfile.mkdtemp(prefix="nvml-mig-"))  # short: unix socket paths are limited
        work_dirs.append(str(work))
        plugin = Plugin(work, lib_dir, state, strategy, **env)
        started.append(plugin)
        return plugin

    yield start
    for plugin in started:
        plugin.stop()
    for work in work_dirs:
        shutil.rmtree(work, ignore_errors=True)


def _devices(kubelet: Kubelet, endpoint: str) -> Tuple[Any, Iterator[Any]]:
    stream = kubelet.plugin(endpoint).ListAndWatch(kubelet.dp.Empty(), timeout=60)
    first = next(stream)
    return {d.ID: d.health for d in first.devices}, stream


@needs_plugin
def test_plugin_mixed_strategy_advertises_mig_resources(plugin_factory: Any, mig_node: Path) -> None:
    state = nvml_state.read_state(str(mig_node))
    migs = {d["profile"]: [] for g in state["gpus"] for d in g.get("mig_devices", [])}
    for gpu in state["gpus"]:
        for device in gpu.get("mig_devices", []):
            migs[device["profile"]].append(device["uuid"])
    plugin = plugin_factory(mig_node, "mixed")
    registered = plugin.kubelet.wait_for(5)
    log = plugin.log_text()
    assert sorted(registered) == ["nvidia.com/gpu", "nvidia.com/mig-1g.10gb", "nvidia.com/mig-2g.20gb",
                                  "nvidia.com/mig-3g.40gb", "nvidia.com/mig-7g.80gb"], log
    streams = {}
    for name in ("1g.10gb", "2g.20gb", "3g.40gb", "7g.80gb"):
        assert "Starting GRPC server for 'nvidia.com/mig-%s'" % name in log
        request = registered["nvidia.com/mig-" + name]
        assert (request.version, request.endpoint) == ("v1beta1", "nvidia-mig-%s.sock" % name)
        devices, streams[name] = _devices(plugin.kubelet, request.endpoint)
        assert devices == {uuid: "Healthy" for uuid in migs[name]}
    # GPU 2 has MIG disabled and GPU 3 has none configured: only GPU 2 is a whole-GPU resource
    gpus, stream = _devices(plugin.kubelet, registered["nvidia.com/gpu"].endpoint)
    stream.cancel()
    assert gpus == {state["gpus"][2]["uuid"]: "Healthy"}
    assert "device 3 has no MIG devices configured" in log

    dp = plugin.kubelet.dp
    stub = plugin.kubelet.plugin("nvidia-mig-1g.10gb.sock")
    response = stub.Allocate(dp.AllocateRequest(container_requests=[
        dp.ContainerAllocateRequest(devices_ids=[migs["1g.10gb"][1]])]), timeout=30)
    assert dict(response.container_responses[0].envs)["NVIDIA_VISIBLE_DEVICES"] == migs["1g.10gb"][1]

    # an XID on GPU 1 (its one MIG device) marks that MIG device unhealthy; the update goes to the
    # resource's ListAndWatch stream (the plugin serves one consumer per resource, like the kubelet's)
    nvml_state.apply_fault(str(mig_node), "critical_xid", gpu=1, xid=79)
    update = next(streams["7g.80gb"])
    for stream in streams.values():
        stream.cancel()
    assert {d.ID: d.health for d in update.devices} == {migs["7g.80gb"][0]: "Unhealthy"}
    assert "XidCriticalError: Xid=79 on Device=%s; marking device as unhealthy." % migs["7g.80gb"][0] in plugin.log_text()


@needs_plugin
def test_plugin_single_strategy_serves_mig_devices_as_gpus(plugin_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "nvml.state"
    nvml_state.write_state(str(path), nvml_state.set_mig(
        nvml_state.default_node_state("single", gpu_count=2, model="A100-40GB"), ["1g.5gb"] * 7))
    state = nvml_state.read_state(str(path))
    plugin = plugin_factory(path, "single")
    registered = plugin.kubelet.wait_for(1)
    assert list(registered) == ["nvidia.com/gpu"], plugin.log_text()
    devices, stream = _devices(plugin.kubelet, registered["nvidia.com/gpu"].endpoint)
    stream.cancel()
    assert devices == {d["uuid"]: "Healthy" for g in state["gpus"] for d in g["mig_devices"]}
    assert len(devices) == 14


@needs_plugin
@pytest.mark.parametrize(("layout", "message"), [
    ({0: ["1g.10gb"] * 7, 1: ["3g.40gb"]}, "more than one MIG device type present on node"),
    ({0: ["1g.10gb"] * 7, 1: []}, "device 1 has no MIG devices configured"),
    ({0: ["1g.10gb"] * 7}, "all devices on the node must be configured with the same migEnabled value"),
])
def test_plugin_single_strategy_rejects_non_uniform_nodes(plugin_factory: Any, tmp_path: Path,
                                                          layout: Dict[int, List[str]], message: str) -> None:
    path = tmp_path / "nvml.state"
    nvml_state.write_state(str(path), nvml_state.set_mig(nvml_state.default_node_state("n", gpu_count=2), layout))
    plugin = plugin_factory(path, "single")
    assert plugin.process.wait(timeout=30) != 0
    assert message in plugin.log_text()
    assert plugin.kubelet.registered == []


@needs_plugin
def test_plugin_in_a_container_view_and_with_broken_injection(plugin_factory: Any, mig_node: Path, tmp_path: Path) -> None:
    state = nvml_state.read_state(str(mig_node))
    one_mig = state["gpus"][0]["mig_devices"][1]
    plugin = plugin_factory(mig_node, "mixed", NVIDIA_VISIBLE_DEVICES=one_mig["uuid"])
    registered = plugin.kubelet.wait_for(1)
    assert list(registered) == ["nvidia.com/mig-2g.20gb"], plugin.log_text()
    devices, stream = _devices(plugin.kubelet, registered["nvidia.com/mig-2g.20gb"].endpoint)
    stream.cancel()
    assert devices == {one_mig["uuid"]: "Healthy"}

    broken = plugin_factory(mig_node, "mixed", GPUNODE_LAB_NVML_INIT_ERROR="999")
    assert broken.process.wait(timeout=30) != 0
    assert "failed to initialize NVML: Unknown Error" in broken.log_text()


@needs_plugin
def test_plugin_whole_gpus_preferred_allocation(plugin_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "nvml.state"
    nvml_state.write_state(str(path), nvml_state.default_node_state("whole", gpu_count=8))
    uuids = [g["uuid"] for g in nvml_state.read_state(str(path))["gpus"]]
    plugin = plugin_factory(path, "none")
    registered = plugin.kubelet.wait_for(1)
    assert list(registered) == ["nvidia.com/gpu"], plugin.log_text()
    assert registered["nvidia.com/gpu"].options.get_preferred_allocation_available
    dp = plugin.kubelet.dp
    stub = plugin.kubelet.plugin(registered["nvidia.com/gpu"].endpoint)
    response = stub.GetPreferredAllocation(dp.PreferredAllocationRequest(container_requests=[
        dp.ContainerPreferredAllocationRequest(available_deviceIDs=uuids[1:], must_include_deviceIDs=[],
                                               allocation_size=2)]), timeout=30)
    chosen = list(response.container_responses[0].deviceIDs)
    assert len(chosen) == 2 and set(chosen) <= set(uuids[1:])
    assert plugin.process.poll() is None  # the allocator's NVML calls are all there


def test_render_refuses_mig_devices_the_library_would_reject() -> None:
    state = nvml_state.set_mig(nvml_state.default_node_state("n", gpu_count=1), {0: ["1g.10gb", "2g.20gb"]})
    wrong = json.loads(json.dumps(state))
    wrong["gpus"][0]["mig_devices"][0]["profile"] = "1g.5gb"
    with pytest.raises(ValueError, match="unknown to GPU model 'A100'"):
        nvml_state.render_state(wrong)
    shared = json.loads(json.dumps(state))
    shared["gpus"][0]["mig_devices"][1]["gi"] = shared["gpus"][0]["mig_devices"][0]["gi"]
    with pytest.raises(ValueError, match="share a GPU instance id"):
        nvml_state.render_state(shared)
    incomplete = json.loads(json.dumps(state))
    del incomplete["gpus"][0]["mig_devices"][0]["uuid"]
    with pytest.raises(ValueError, match="has no uuid"):
        nvml_state.render_state(incomplete)
