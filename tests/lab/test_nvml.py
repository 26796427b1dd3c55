"""The lab NVML library (lab/nvml/) as unmodified pynvml sees it, and lab/nvml_state.py.

pynvml binds the library once per process, so every NVML check runs in a child Python process
with LD_LIBRARY_PATH pointing at a freshly built libnvidia-ml.so.1. The child prints one JSON
line that the test asserts on.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lab import nvml_state  # noqa: E402

# Runs before every child snippet: helpers the snippets use.
CHILD_PRELUDE = textwrap.dedent(
    """
    import ctypes, json, os, sys, threading, time
    import pynvml as N
    from lab import nvml_state as S

    def err(fn, *args):
        try:
            fn(*args)
        except N.NVMLError as exc:
            return type(exc).__name__
        return None

    def call(fn, *args):
        try:
            return fn(*args)
        except N.NVMLError as exc:
            return type(exc).__name__

    def done(result):
        print(json.dumps(result))
    """
)


@pytest.fixture(scope="session")
def nvml_lib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builds lab/nvml/*.c but nvidia_smi.c into a private libnvidia-ml.so.1 (the README's command)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to build the lab NVML library")
    assert gcc is not None
    out_dir = tmp_path_factory.mktemp("lab-nvml-lib")
    sources = sorted(str(path) for path in (ROOT / "lab" / "nvml").glob("*.c") if path.name != "nvidia_smi.c")
    subprocess.run(
        [gcc, "-std=c99", "-O2", "-Wall", "-Wextra", "-shared", "-fPIC", "-pthread",
         "-Wl,-soname,libnvidia-ml.so.1", "-o", str(out_dir / "libnvidia-ml.so.1"), *sources],
        check=True,
    )
    return out_dir


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    path = tmp_path / "node-a" / "nvml.state"
    nvml_state.write_state(str(path), nvml_state.default_node_state("node-a"))
    return path


# The per-process container view the library reads at nvmlInit: never inherited by a child.
CONTAINER_ENV = ("NVIDIA_VISIBLE_DEVICES", nvml_state.ENV_INIT_ERROR)


def run_child(lib_dir: Path, code: str, state: Optional[Path], timeout: float = 15.0,
              env_extra: Optional[Dict[str, str]] = None) -> Any:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(lib_dir)
    env["PYTHONPATH"] = str(ROOT)
    env.pop(nvml_state.ENV_STATE_PATH, None)
    for name in CONTAINER_ENV:
        env.pop(name, None)
    env.update(env_extra or {})
    if state is not None:
        env[nvml_state.ENV_STATE_PATH] = str(state)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code)],
        env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert proc.returncode == 0, "child failed (rc=%d)\n%s%s" % (proc.returncode, proc.stdout, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


READ_ALL_GPUS = """
N.nvmlInit()
gpus = []
for i in range(N.nvmlDeviceGetCount()):
    h = N.nvmlDeviceGetHandleByIndex(i)
    pci = N.nvmlDeviceGetPciInfo(h)
    mem = N.nvmlDeviceGetMemoryInfo(h)
    mem2 = N.nvmlDeviceGetMemoryInfo(h, N.nvmlMemory_v2)
    ecc = {}
    for counter, cname in ((N.NVML_VOLATILE_ECC, "volatile"), (N.NVML_AGGREGATE_ECC, "aggregate")):
        for etype, ename in ((N.NVML_MEMORY_ERROR_TYPE_CORRECTED, "corrected"),
                             (N.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, "uncorrected")):
            ecc["ecc_%s_%s" % (cname, ename)] = call(N.nvmlDeviceGetTotalEccErrors, h, etype, counter)
    gpus.append(dict(
        index=N.nvmlDeviceGetIndex(h),
        uuid=N.nvmlDeviceGetUUID(h),
        name=N.nvmlDeviceGetName(h),
        serial=N.nvmlDeviceGetSerial(h),
        pci_bus_id=pci.busId, pci_bus_id_legacy=pci.busIdLegacy, pci_bus=pci.bus,
        pci_device_id=pci.pciDeviceId, pci_subsystem_id=pci.pciSubSystemId,
        memory=[mem.total, mem.used, mem.free],
        memory_v2=[mem2.total, mem2.reserved, mem2.used, mem2.free],
        persistence=N.nvmlDeviceGetPersistenceMode(h),
        mig=call(N.nvmlDeviceGetMigMode, h),
        ecc_mode=call(N.nvmlDeviceGetEccMode, h),
        remapped_rows=call(N.nvmlDeviceGetRemappedRows, h),
        retired_sbe=call(N.nvmlDeviceGetRetiredPages, h, N.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS),
        retired_dbe=call(N.nvmlDeviceGetRetiredPages, h, N.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR),
        retired_pending=call(N.nvmlDeviceGetRetiredPagesPendingStatus, h),
        temperature=N.nvmlDeviceGetTemperature(h, N.NVML_TEMPERATURE_GPU),
        power=N.nvmlDeviceGetPowerUsage(h),
        minor=N.nvmlDeviceGetMinorNumber(h),
        arch=N.nvmlDeviceGetArchitecture(h),
        cc=list(N.nvmlDeviceGetCudaComputeCapability(h)),
        events=N.nvmlDeviceGetSupportedEventTypes(h),
        by_uuid_index=N.nvmlDeviceGetIndex(N.nvmlDeviceGetHandleByUUID(N.nvmlDeviceGetUUID(h))),
        by_pci_index=N.nvmlDeviceGetIndex(N.nvmlDeviceGetHandleByPciBusId(pci.busId)),
        **ecc))
done(dict(
    driver=N.nvmlSystemGetDriverVersion(),
    cuda=N.nvmlSystemGetCudaDriverVersion(),
    cuda_v2=N.nvmlSystemGetCudaDriverVersion_v2(),
    nvml=N.nvmlSystemGetNVMLVersion(),
    gpus=gpus,
))
"""


# ---- healthy nodes read back as written ------------------------------------------------------

@pytest.mark.parametrize("model", ["A100", "H100", "V100"])
def test_healthy_node_reads_back_as_written(nvml_lib_dir: Path, tmp_path: Path, model: str) -> None:
    path = tmp_path / "nvml.state"
    state = nvml_state.default_node_state("gpu-node-07", gpu_count=8, model=model)
    state["gpus"][2]["ecc_volatile_corrected"] = 3
    state["gpus"][2]["ecc_aggregate_corrected"] = 11
    state["gpus"][5]["temperature"] = 71
    state["gpus"][5]["power_usage_mw"] = 351234
    state["gpus"][5]["memory_used"] = state["gpus"][5]["memory_total"] // 2
    state["gpus"][5]["memory_free"] = state["gpus"][5]["memory_total"] - state["gpus"][5]["memory_used"]
    if model == "V100":
        state["gpus"][1]["retired_pages_sbe"] = 2
    else:
        state["gpus"][1]["remapped_rows_correctable"] = 4
    nvml_state.write_state(str(path), state)

    got = run_child(nvml_lib_dir, READ_ALL_GPUS, path)

    assert got["driver"] == "550.54.15"
    assert got["cuda"] == got["cuda_v2"] == 12040
    assert got["nvml"] == "12.550.54.15"
    assert len(got["gpus"]) == 8
    for index, (want, read) in enumerate(zip(state["gpus"], got["gpus"])):
        assert read["index"] == read["minor"] == read["by_uuid_index"] == read["by_pci_index"] == index
        assert re.fullmatch(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", read["uuid"])
        assert read["uuid"] == want["uuid"]
        assert read["name"] == want["name"]
        assert read["serial"] == want["serial"]
        assert read["pci_bus_id"] == want["pci_bus_id"]
        assert read["pci_bus_id_legacy"] == want["pci_bus_id"][4:]
        assert read["pci_bus"] == int(want["pci_bus_id"].split(":")[1], 16)
        assert read["pci_device_id"] == want["pci_device_id"]
        assert read["pci_subsystem_id"] == want["pci_subsystem_id"]
        assert read["memory"] == [want["memory_total"], want["memory_used"], want["memory_free"]]
        assert read["memory_v2"] == [want["memory_total"], want["memory_reserved"],
                                     want["memory_used"] - want["memory_reserved"], want["memory_free"]]
        assert read["persistence"] == 1
        assert read["ecc_mode"] == [1, 1]
        for key in ("ecc_volatile_corrected", "ecc_volatile_uncorrected",
                    "ecc_aggregate_corrected", "ecc_aggregate_uncorrected"):
            assert read[key] == want[key], key
        assert read["temperature"] == want["temperature"]
        assert read["power"] == want["power_usage_mw"]
        assert read["arch"] == want["arch"]
        assert read["cc"] == [want["cuda_cc_major"], want["cuda_cc_minor"]]
        assert read["events"] & 0x8  # nvmlEventTypeXidCriticalError
        if model == "V100":  # Volta: page retirement, no row remapping, no MIG
            assert read["mig"] == "NVMLError_NotSupported"
            assert read["remapped_rows"] == "NVMLError_NotSupported"
            assert len(read["retired_sbe"]) == want["retired_pages_sbe"]
            assert read["retired_dbe"] == []
            assert read["retired_pending"] == 0
        else:  # Ampere/Hopper: row remapping replaces page retirement; MIG capable
            assert read["mig"] == [0, 0]
            assert read["remapped_rows"] == [want["remapped_rows_correctable"], 0, 0, 0]
            assert read["retired_sbe"] == read["retired_dbe"] == "NVMLError_NotSupported"
            assert read["retired_pending"] == "NVMLError_NotSupported"
    assert got["gpus"][1]["name"] == {"A100": "NVIDIA A100-SXM4-80GB", "H100": "NVIDIA H100 80GB HBM3",
                                      "V100": "Tesla V100-SXM2-32GB"}[model]


def test_listed_unsupported_features_answer_not_supported(nvml_lib_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "nvml.state"
    state = nvml_state.default_node_state("n", gpu_count=2)
    state["gpus"][0]["unsupported"] += ["ecc", "serial", "power_usage"]
    nvml_state.write_state(str(path), state)
    got = run_child(nvml_lib_dir, """
        N.nvmlInit()
        out = []
        for i in range(2):
            h = N.nvmlDeviceGetHandleByIndex(i)
            out.append([err(N.nvmlDeviceGetEccMode, h), err(N.nvmlDeviceGetTotalEccErrors, h, 1, 0),
                        err(N.nvmlDeviceGetSerial, h), err(N.nvmlDeviceGetPowerUsage, h),
                        err(N.nvmlDeviceGetUUID, h)])
        done(out)
    """, path)
    assert got[0] == ["NVMLError_NotSupported"] * 4 + [None]
    assert got[1] == [None] * 5


# ---- init errors ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("driver_not_loaded", "NVMLError_DriverNotLoaded"),
        ("driver_library_mismatch", "NVMLError_LibRmVersionMismatch"),
        ("no_permission", "NVMLError_NoPermission"),
        ("library_missing", "NVMLError_LibraryNotFound"),
    ],
)
def test_init_faults_fail_nvml_init_until_cleared(nvml_lib_dir: Path, state_path: Path, fault: str, error: str) -> None:
    nvml_state.apply_fault(str(state_path), fault)
    got = run_child(nvml_lib_dir, """
        first = err(N.nvmlInit)
        count_after_failed_init = err(N.nvmlDeviceGetCount)
        S.clear_fault(os.environ["GPUNODE_LAB_NVML_STATE"], %r)
        second = err(N.nvmlInit)
        done([first, count_after_failed_init, second, N.nvmlDeviceGetCount()])
    """ % fault, state_path)
    assert got == [error, "NVMLError_Uninitialized", None, 8]


def test_missing_unset_or_broken_state_fails_init_without_crashing(nvml_lib_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "nvml.state"
    text = nvml_state.render_state(nvml_state.default_node_state("n", gpu_count=2))
    got = run_child(nvml_lib_dir, """
        path = os.environ["GPUNODE_LAB_NVML_STATE"]
        text = %r
        out = {"missing": err(N.nvmlInit)}
        for name, body in (("truncated", text[: len(text) // 2]), ("no_end", text.replace("end=1\\n", "")),
                           ("garbage", "\\x00\\x01 not a state file"), ("empty", ""),
                           ("bad_number", text.replace("gpu.1.temperature=31", "gpu.1.temperature=hot")),
                           ("count_too_high", text.replace("gpu_count=2", "gpu_count=3"))):
            with open(path, "w") as handle:
                handle.write(body)
            out[name] = err(N.nvmlInit)
        os.mkdir(path + ".d")
        os.environ["GPUNODE_LAB_NVML_STATE"] = path + ".d"
        out["directory"] = err(N.nvmlInit)
        del os.environ["GPUNODE_LAB_NVML_STATE"]
        out["unset"] = err(N.nvmlInit)
        os.environ["GPUNODE_LAB_NVML_STATE"] = path
        with open(path, "w") as handle:
            handle.write(text)
        out["valid"] = err(N.nvmlInit)
        done(out)
    """ % text, path)
    assert got.pop("valid") is None
    assert got == {key: "NVMLError_LibraryNotFound" for key in got}
    assert len(got) == 9


def test_calls_before_init_and_refcounting(nvml_lib_dir: Path, state_path: Path) -> None:
    got = run_child(nvml_lib_dir, """
        N.nvmlInit(); N.nvmlShutdown()                      # loads the library, refcount back to 0
        out = [err(N.nvmlDeviceGetCount), err(N.nvmlSystemGetDriverVersion), err(N.nvmlShutdown)]
        N.nvmlInit(); N.nvmlInit()
        h = N.nvmlDeviceGetHandleByIndex(0)
        N.nvmlShutdown()
        out += [N.nvmlDeviceGetCount(), err(N.nvmlDeviceGetUUID, h)]
        N.nvmlShutdown()
        out += [err(N.nvmlDeviceGetCount), err(N.nvmlDeviceGetUUID, h), err(N.nvmlShutdown)]
        out.append(N.nvmlErrorString(N.NVML_ERROR_GPU_IS_LOST))
        done(out)
    """, state_path)
    assert got == ["NVMLError_Uninitialized"] * 3 + [8, None] + ["NVMLError_Uninitialized"] * 3 + ["GPU is lost"]


# ---- per-GPU faults ------------------------------------------------------------------------

def test_gpu_lost_only_on_the_lost_gpu(nvml_lib_dir: Path, state_path: Path) -> None:
    got = run_child(nvml_lib_dir, """
        N.nvmlInit()
        path = os.environ["GPUNODE_LAB_NVML_STATE"]
        handles = [N.nvmlDeviceGetHandleByIndex(i) for i in range(8)]
        lost_uuid = N.nvmlDeviceGetUUID(handles[7])
        S.apply_fault(path, "gpu_lost")                      # default: the last GPU
        calls = [N.nvmlDeviceGetUUID, N.nvmlDeviceGetName, N.nvmlDeviceGetPciInfo, N.nvmlDeviceGetMemoryInfo,
                 N.nvmlDeviceGetIndex, N.nvmlDeviceGetPersistenceMode, N.nvmlDeviceGetRemappedRows,
                 N.nvmlDeviceGetMigMode, N.nvmlDeviceGetPowerUsage, N.nvmlDeviceGetSerial,
                 N.nvmlDeviceGetMinorNumber, N.nvmlDeviceGetArchitecture, N.nvmlDeviceGetEccMode]
        out = dict(
            count=N.nvmlDeviceGetCount(),
            by_index=[err(N.nvmlDeviceGetHandleByIndex, i) for i in range(8)],
            by_uuid=err(N.nvmlDeviceGetHandleByUUID, lost_uuid),
            old_handle=sorted({str(err(fn, handles[7])) for fn in calls}),
            other_handle=sorted({str(err(fn, handles[6])) for fn in calls}),
            temperature=err(N.nvmlDeviceGetTemperature, handles[7], 0),
        )
        S.clear_fault(path, "gpu_lost")
        out["after_clear"] = N.nvmlDeviceGetUUID(N.nvmlDeviceGetHandleByIndex(7)) == lost_uuid
        done(out)
    """, state_path)
    assert got["count"] == 8  # a lost GPU is still enumerated
    assert got["by_index"] == [None] * 7 + ["NVMLError_GpuIsLost"]
    assert got["by_uuid"] == "NVMLError_GpuIsLost"
    assert got["old_handle"] == ["NVMLError_GpuIsLost"]
    assert got["other_handle"] == ["None"]
    assert got["temperature"] == "NVMLError_GpuIsLost"
    assert got["after_clear"] is True


def test_gpu_count_low_drops_the_last_gpu(nvml_lib_dir: Path, state_path: Path) -> None:
    state = nvml_state.apply_fault(str(state_path), "gpu_count_low")
    assert len(state["gpus"]) == 7 and len(state["removed_gpus"]) == 1
    got = run_child(nvml_lib_dir, """
        N.nvmlInit()
        last = N.nvmlDeviceGetHandleByIndex(6)
        out = [N.nvmlDeviceGetCount(), err(N.nvmlDeviceGetHandleByIndex, 7)]
        S.clear_fault(os.environ["GPUNODE_LAB_NVML_STATE"], "gpu_count_low")
        out += [N.nvmlDeviceGetCount(), N.nvmlDeviceGetIndex(N.nvmlDeviceGetHandleByIndex(7))]
        h = N.nvmlDeviceGetHandleByIndex(7)
        S.apply_fault(os.environ["GPUNODE_LAB_NVML_STATE"], "gpu_count_low")
        out += [err(N.nvmlDeviceGetUUID, h), err(N.nvmlDeviceGetUUID, last)]
        done(out)
    """, state_path)
    assert got == [7, "NVMLError_InvalidArgument", 8, 7, "NVMLError_GpuIsLost", None]


def test_health_faults_are_seen_by_a_running_process(nvml_lib_dir: Path, state_path: Path) -> None:
    got = run_child(nvml_lib_dir, """
        N.nvmlInit()
        path = os.environ["GPUNODE_LAB_NVML_STATE"]
        h = [N.nvmlDeviceGetHandleByIndex(i) for i in range(8)]

        def health(i):
            return dict(
                ecc_vol_unc=N.nvmlDeviceGetTotalEccErrors(h[i], 1, 0),
                ecc_agg_unc=N.nvmlDeviceGetTotalEccErrors(h[i], 1, 1),
                remapped=list(N.nvmlDeviceGetRemappedRows(h[i])),
                persistence=N.nvmlDeviceGetPersistenceMode(h[i]),
                mig=N.nvmlDeviceGetMigMode(h[i]),
            )

        out = {"before": health(3)}
        S.apply_fault(path, "ecc_uncorrectable", gpu=3, count=2)
        out["ecc"] = health(3)
        S.apply_fault(path, "remapped_rows_pending", gpu=3)
        out["remap_pending"] = health(3)
        S.apply_fault(path, "remapped_rows_failure", gpu=3)
        out["remap_failure"] = health(3)
        S.apply_fault(path, "persistence_off")
        out["persistence"] = [N.nvmlDeviceGetPersistenceMode(x) for x in h]
        S.apply_fault(path, "mig_pending")
        out["mig"] = [N.nvmlDeviceGetMigMode(x) for x in h]
        for fault in ("ecc_uncorrectable", "remapped_rows_pending", "remapped_rows_failure",
                      "persistence_off", "mig_pending"):
            S.clear_fault(path, fault)
        out["cleared"] = health(3)
        done(out)
    """, state_path)
    healthy = {"ecc_vol_unc": 0, "ecc_agg_unc": 0, "remapped": [0, 0, 0, 0], "persistence": 1, "mig": [0, 0]}
    assert got["before"] == healthy
    assert got["ecc"] == dict(healthy, ecc_vol_unc=2, ecc_agg_unc=2)
    assert got["remap_pending"] == dict(healthy, ecc_vol_unc=2, ecc_agg_unc=2, remapped=[0, 1, 1, 0])
    assert got["remap_failure"]["remapped"] == [0, 1, 1, 1]
    assert got["persistence"] == [0] * 8
    assert got["mig"] == [[0, 1]] * 8
    assert got["cleared"] == healthy
    assert nvml_state.read_state(str(state_path)) == nvml_state.default_node_state("node-a")


def test_retired_pages_pending_on_a_volta_node(nvml_lib_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "nvml.state"
    nvml_state.write_state(str(path), nvml_state.default_node_state("v", gpu_count=4, model="V100"))
    got = run_child(nvml_lib_dir, """
        N.nvmlInit()
        h = N.nvmlDeviceGetHandleByIndex(1)
        out = [N.nvmlDeviceGetRetiredPagesPendingStatus(h)]
        S.apply_fault(os.environ["GPUNODE_LAB_NVML_STATE"], "retired_pages_pending", gpu=1)
        out += [N.nvmlDeviceGetRetiredPagesPendingStatus(h),
                len(N.nvmlDeviceGetRetiredPages(h, N.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)),
                len(N.nvmlDeviceGetRetiredPages_v2(h, N.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)),
                N.nvmlDeviceGetRetiredPagesPendingStatus(N.nvmlDeviceGetHandleByIndex(0))]
        done(out)
    """, path)
    assert got == [0, 1, 1, 1, 0]
    a100 = nvml_state.default_node_state("a")
    with pytest.raises(ValueError, match="row remapping"):
        nvml_state.retired_pages_pending(a100)
    with pytest.raises(ValueError, match="no row remapping"):
        nvml_state.remapped_rows_pending(nvml_state.default_node_state("v", model="V100"))
    with pytest.raises(ValueError, match="MIG"):
        nvml_state.mig_pending(nvml_state.default_node_state("v", model="V100"))


def test_back_to_back_same_size_writes_are_all_seen(nvml_lib_dir: Path, state_path: Path) -> None:
    got = run_child(nvml_lib_dir, """
        N.nvmlInit()
        path = os.environ["GPUNODE_LAB_NVML_STATE"]
        h = N.nvmlDeviceGetHandleByIndex(0)
        seen = []
        for i in range(40):                      # persistence 1 <-> 0: same file size every time
            S.apply_fault(path, "persistence_off") if i % 2 == 0 else S.clear_fault(path, "persistence_off")
            seen.append(N.nvmlDeviceGetPersistenceMode(h))
        done(seen)
    """, state_path)
    assert got == [0, 1] * 20


# ---- XID events ----------------------------------------------------------------------------

def test_xid_events_are_delivered_once_in_order(nvml_lib_dir: Path, state_path: Path) -> None:
    got = run_child(nvml_lib_dir, """
        N.nvmlInit()
        path = os.environ["GPUNODE_LAB_NVML_STATE"]
        handles = [N.nvmlDeviceGetHandleByIndex(i) for i in range(8)]

        def new_set():
            es = N.nvmlEventSetCreate()
            for x in handles:
                N.nvmlDeviceRegisterEvents(x, N.nvmlEventTypeXidCriticalError, es)
            return es

        def wait(es, ms):
            try:
                d = N.nvmlEventSetWait_v2(es, ms)
            except N.NVMLError as exc:
                return type(exc).__name__
            return [d.eventType, d.eventData, N.nvmlDeviceGetIndex(d.device), N.nvmlDeviceGetUUID(d.device),
                    d.gpuInstanceId, d.computeInstanceId]

        es = new_set()
        out = {"empty": wait(es, 0)}
        S.apply_fault(path, "critical_xid", gpu=3)
        S.apply_fault(path, "critical_xid", gpu=1, xid=48)
        out["first"] = wait(es, 0)
        out["second"] = wait(es, 0)
        out["drained"] = wait(es, 0)
        es2 = new_set()                                  # a new set starts at the queue's beginning
        out["new_set"] = [wait(es2, 0)[1], wait(es2, 0)[1], wait(es2, 0)]
        unregistered = N.nvmlEventSetCreate()            # nothing registered: nothing delivered
        out["unregistered"] = wait(unregistered, 0)
        out["supported"] = N.nvmlDeviceGetSupportedEventTypes(handles[0])
        out["bad_mask"] = err(N.nvmlDeviceRegisterEvents, handles[0], 1 << 40, es)
        out["uuid3"] = N.nvmlDeviceGetUUID(handles[3])
        for x in (es, es2, unregistered):
            N.nvmlEventSetFree(x)

        # a waiter blocked in nvmlEventSetWait sees an event queued while it waits
        es3 = new_set()
        for _ in range(2):
            wait(es3, 0)
        result = {}
        def waiter():
            start = time.monotonic()
            result["event"] = wait(es3, 5000)
            result["elapsed"] = time.monotonic() - start
        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.15)
        S.apply_fault(path, "critical_xid", gpu=5, xid=79)
        t.join()
        out["waited"] = result
        done(out)
    """, state_path)
    assert got["empty"] == "NVMLError_Timeout"
    invalid = 0xFFFFFFFF
    assert got["first"] == [0x8, 79, 3, got["uuid3"], invalid, invalid]
    assert got["second"][:3] == [0x8, 48, 1]
    assert got["drained"] == "NVMLError_Timeout"
    assert got["new_set"] == [79, 48, "NVMLError_Timeout"]
    assert got["unregistered"] == "NVMLError_Timeout"
    assert got["supported"] & 0x8 and got["supported"] & 0x2
    assert got["bad_mask"] == "NVMLError_NotSupported"
    assert got["waited"]["event"][:3] == [0x8, 79, 5]
    assert 0.1 < got["waited"]["elapsed"] < 3.0


def test_event_wait_times_out_after_the_timeout(nvml_lib_dir: Path, state_path: Path) -> None:
    got = run_child(nvml_lib_dir, """
        N.nvmlInit()
        es = N.nvmlEventSetCreate()
        N.nvmlDeviceRegisterEvents(N.nvmlDeviceGetHandleByIndex(0), N.nvmlEventTypeXidCriticalError, es)
        start = time.monotonic()
        outcome = err(N.nvmlEventSetWait, es, 300)
        done([outcome, time.monotonic() - start])
    """, state_path)
    assert got[0] == "NVMLError_Timeout"
    assert 0.29 <= got[1] < 2.0  # generous upper bound for loaded CI machines


# ---- one process, many nodes ---------------------------------------------------------------

def test_state_path_override_switches_nodes_in_one_process(nvml_lib_dir: Path, tmp_path: Path) -> None:
    node_a, node_b = tmp_path / "a.state", tmp_path / "b.state"
    nvml_state.write_state(str(node_a), nvml_state.default_node_state("node-a", gpu_count=2))
    nvml_state.write_state(str(node_b), nvml_state.default_node_state("node-b", gpu_count=4, model="H100"))
    got = run_child(nvml_lib_dir, """
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        lib.gpunodeLabSetStatePath.argtypes = [ctypes.c_char_p]
        node_b = %r
        N.nvmlInit()                                     # node-a, from the environment
        a0 = N.nvmlDeviceGetHandleByIndex(0)
        out = {"a": [N.nvmlDeviceGetCount(), N.nvmlDeviceGetUUID(a0)]}
        lib.gpunodeLabSetStatePath(node_b.encode())
        out["b_before_init"] = err(N.nvmlDeviceGetCount)  # each node is initialized on its own
        N.nvmlInit()
        b0 = N.nvmlDeviceGetHandleByIndex(0)
        out["b"] = [N.nvmlDeviceGetCount(), N.nvmlDeviceGetUUID(b0), N.nvmlDeviceGetName(b0)]
        out["a_handle_under_b"] = N.nvmlDeviceGetUUID(a0)  # handles stay bound to their node
        S.apply_fault(node_b, "driver_not_loaded")
        out["b_reinit"] = err(N.nvmlInit)
        lib.gpunodeLabSetStatePath(None)
        out["a_again"] = [N.nvmlDeviceGetCount(), err(N.nvmlInit)]
        done(out)
    """ % str(node_b), node_a)
    uuid_a = nvml_state.gpu_uuid("node-a", 0)
    uuid_b = nvml_state.gpu_uuid("node-b", 0)
    assert uuid_a != uuid_b
    assert got["a"] == [2, uuid_a]
    assert got["b_before_init"] == "NVMLError_Uninitialized"
    assert got["b"] == [4, uuid_b, "NVIDIA H100 80GB HBM3"]
    assert got["a_handle_under_b"] == uuid_a
    assert got["b_reinit"] == "NVMLError_DriverNotLoaded"
    assert got["a_again"] == [2, None]


def test_concurrent_readers_never_see_a_partial_state(nvml_lib_dir: Path, state_path: Path) -> None:
    got = run_child(nvml_lib_dir, """
        N.nvmlInit()
        path = os.environ["GPUNODE_LAB_NVML_STATE"]
        stop = threading.Event()
        seen, errors = set(), []
        def reader():
            h = N.nvmlDeviceGetHandleByIndex(0)
            while not stop.is_set():
                try:
                    seen.add((N.nvmlDeviceGetCount(), N.nvmlDeviceGetPersistenceMode(h)))
                except N.NVMLError as exc:
                    errors.append(type(exc).__name__)
        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        for i in range(30):
            S.apply_fault(path, "persistence_off")
            S.clear_fault(path, "persistence_off")
        stop.set()
        for t in threads:
            t.join()
        done([sorted(seen), errors])
    """, state_path)
    assert got[1] == []
    assert set(map(tuple, got[0])) <= {(8, 0), (8, 1)}


# ---- lab/nvml_state.py on its own ------------------------------------------------------------

def test_default_state_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    one = nvml_state.default_node_state("gpu-node-01")
    assert one == nvml_state.default_node_state("gpu-node-01")
    other = nvml_state.default_node_state("gpu-node-02")
    uuids = {gpu["uuid"] for gpu in one["gpus"]} | {gpu["uuid"] for gpu in other["gpus"]}
    assert len(uuids) == 16
    assert len({gpu["pci_bus_id"] for gpu in nvml_state.default_node_state("x", gpu_count=64)["gpus"]}) == 64
    path = tmp_path / "deep" / "nvml.state"
    nvml_state.write_state(str(path), one)
    assert nvml_state.read_state(str(path)) == one
    assert [p.name for p in path.parent.iterdir()] == ["nvml.state"]  # no temp file left behind
    with pytest.raises(ValueError):
        nvml_state.default_node_state("x", model="Z9000")


def test_writes_are_atomic_and_move_mtime_forward(tmp_path: Path) -> None:
    path = tmp_path / "nvml.state"
    state = nvml_state.default_node_state("n")
    nvml_state.write_state(str(path), state)
    mtimes = []
    for _attempt in range(5):
        nvml_state.write_state(str(path), state)
        mtimes.append(os.stat(path).st_mtime_ns)
    assert mtimes == sorted(set(mtimes))
    text = path.read_text()
    with pytest.raises(ValueError):
        nvml_state.parse_state(text[: len(text) // 2])
    bad = dict(state, driver_version="550\n54")
    with pytest.raises(ValueError):
        nvml_state.write_state(str(path), bad)
    assert nvml_state.read_state(str(path)) == state


@pytest.mark.parametrize("fault", nvml_state.FAULTS)
def test_each_fault_is_pure_and_clears_back_to_healthy(fault: str) -> None:
    model = "V100" if fault == "retired_pages_pending" else "A100"
    healthy = nvml_state.default_node_state("n", gpu_count=4, model=model)
    snapshot = json.dumps(healthy, sort_keys=True)
    assert nvml_state.fault_applies(healthy, fault)
    faulty = nvml_state.inject(healthy, fault)
    assert getattr(nvml_state, fault)(healthy) == faulty  # helper by name == dispatcher
    assert json.dumps(healthy, sort_keys=True) == snapshot  # input untouched
    assert faulty != healthy
    cleared = nvml_state.clear(faulty, fault)
    if fault == "critical_xid":  # the sequence counter never goes back
        assert cleared == dict(healthy, xid_next_seq=2)
    else:
        assert cleared == healthy


def test_fault_names() -> None:
    assert nvml_state.FAULTS == [
        "driver_not_loaded", "driver_library_mismatch", "no_permission", "library_missing",
        "gpu_lost", "gpu_count_low", "ecc_uncorrectable", "retired_pages_pending",
        "remapped_rows_pending", "remapped_rows_failure", "critical_xid", "persistence_off",
        "mig_pending",
    ]
    with pytest.raises(ValueError, match="unknown NVML fault"):
        nvml_state.inject(nvml_state.default_node_state("n"), "gpu_on_fire")
    assert not nvml_state.fault_applies(nvml_state.default_node_state("n"), "retired_pages_pending")


def test_apply_fault_serializes_concurrent_writers(tmp_path: Path) -> None:
    path = str(tmp_path / "nvml.state")
    nvml_state.write_state(path, nvml_state.default_node_state("n", gpu_count=2))

    def add_events() -> None:
        for _event in range(10):
            nvml_state.apply_fault(path, "critical_xid", gpu=0)

    threads = [threading.Thread(target=add_events) for _thread in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = nvml_state.read_state(path)
    assert [event["seq"] for event in state["xid_events"]] == list(range(1, 41))
    assert state["xid_next_seq"] == 41


# ---- the container view: GPUNODE_LAB_NVML_INIT_ERROR and NVIDIA_VISIBLE_DEVICES -------------

VIEW_SNIPPET = """
    N.nvmlInit()
    out = []
    for i in range(N.nvmlDeviceGetCount()):
        h = N.nvmlDeviceGetHandleByIndex(i)
        out.append([N.nvmlDeviceGetIndex(h), N.nvmlDeviceGetUUID(h), N.nvmlDeviceGetMinorNumber(h),
                    N.nvmlDeviceGetPciInfo(h).busId])
    done(out)
"""


def _view(gpus: list, *hosts: int) -> list:
    return [[index, gpus[host]["uuid"], host, gpus[host]["pci_bus_id"]] for index, host in enumerate(hosts)]


@pytest.mark.parametrize(
    ("visible", "hosts"),
    [
        (None, (0, 1, 2, 3, 4, 5, 6, 7)),
        ("all", (0, 1, 2, 3, 4, 5, 6, 7)),
        ("none", ()),
        ("void", ()),
        ("", ()),
        ("5", (5,)),
        ("6,2", (2, 6)),                      # host (PCI) order, renumbered 0..k-1
        (" 3 , 3,1 ", (1, 3)),                # blanks and repeats
        ("uuid:7,1", (1, 7)),                 # a GPU UUID and an index
        ("1,99,GPU-00000000-0000-0000-0000-000000000000,MIG-nope,x:y,", (1,)),  # unknown entries ignored
    ],
)
def test_nvidia_visible_devices_is_the_containers_view(nvml_lib_dir: Path, state_path: Path,
                                                       visible: Optional[str], hosts: tuple) -> None:
    gpus = nvml_state.read_state(str(state_path))["gpus"]
    env = {}
    if visible is not None:
        env["NVIDIA_VISIBLE_DEVICES"] = visible.replace("uuid:7", gpus[7]["uuid"])
    got = run_child(nvml_lib_dir, VIEW_SNIPPET, state_path, env_extra=env)
    assert got == _view(gpus, *hosts)


def test_hidden_gpus_are_not_found_and_get_no_events(nvml_lib_dir: Path, state_path: Path) -> None:
    gpus = nvml_state.read_state(str(state_path))["gpus"]
    got = run_child(nvml_lib_dir, """
        path = os.environ["GPUNODE_LAB_NVML_STATE"]
        hidden, shown = %r, %r
        N.nvmlInit()
        out = {
            "count": N.nvmlDeviceGetCount(),
            "hidden_uuid": err(N.nvmlDeviceGetHandleByUUID, hidden[0]),
            "hidden_pci": err(N.nvmlDeviceGetHandleByPciBusId, hidden[1]),
            "shown_uuid": N.nvmlDeviceGetIndex(N.nvmlDeviceGetHandleByUUID(shown[0])),
            "shown_pci": N.nvmlDeviceGetIndex(N.nvmlDeviceGetHandleByPciBusId(shown[1])),
            "past_count": err(N.nvmlDeviceGetHandleByIndex, 2),
        }
        es = N.nvmlEventSetCreate()
        for i in range(2):
            N.nvmlDeviceRegisterEvents(N.nvmlDeviceGetHandleByIndex(i), N.nvmlEventTypeXidCriticalError, es)
        S.apply_fault(path, "critical_xid", gpu=0, xid=48)     # host GPU 0: not in this container
        S.apply_fault(path, "critical_xid", gpu=4, xid=79)     # host GPU 4: the container's GPU 1
        d = N.nvmlEventSetWait_v2(es, 1000)
        out["event"] = [d.eventData, N.nvmlDeviceGetIndex(d.device), N.nvmlDeviceGetUUID(d.device)]
        out["then"] = err(N.nvmlEventSetWait_v2, es, 0)
        S.apply_fault(path, "gpu_lost", gpu=4)                 # a lost visible GPU still counts
        out["lost"] = [N.nvmlDeviceGetCount(), err(N.nvmlDeviceGetHandleByIndex, 1)]
        done(out)
    """ % ([gpus[0]["uuid"], gpus[0]["pci_bus_id"]], [gpus[4]["uuid"], gpus[4]["pci_bus_id"]]),
        state_path, env_extra={"NVIDIA_VISIBLE_DEVICES": "4,2"})
    assert got == {
        "count": 2,
        "hidden_uuid": "NVMLError_NotFound",
        "hidden_pci": "NVMLError_NotFound",
        "shown_uuid": 1,
        "shown_pci": 1,
        "past_count": "NVMLError_InvalidArgument",
        "event": [79, 1, gpus[4]["uuid"]],
        "then": "NVMLError_Timeout",
        "lost": [2, "NVMLError_GpuIsLost"],
    }


@pytest.mark.parametrize(("value", "error"), [
    ("999", "NVMLError_Unknown"), ("9", "NVMLError_DriverNotLoaded"), ("18", "NVMLError_LibRmVersionMismatch"),
    ("0", None), ("not-a-number", None)])
def test_init_error_from_the_environment(nvml_lib_dir: Path, state_path: Path, value: str,
                                         error: Optional[str]) -> None:
    got = run_child(nvml_lib_dir, """
        done([err(N.nvmlInit), err(N.nvmlInitWithFlags, 0), err(N.nvmlDeviceGetCount)])
    """, state_path, env_extra={nvml_state.ENV_INIT_ERROR: value})
    if error is None:
        assert got == [None, None, None]
    else:
        assert got == [error, error, "NVMLError_Uninitialized"]


def test_init_error_wins_over_any_state_and_is_read_at_each_init(nvml_lib_dir: Path, tmp_path: Path) -> None:
    node_a, node_b = tmp_path / "a.state", tmp_path / "b.state"
    nvml_state.write_state(str(node_a), nvml_state.default_node_state("node-a", gpu_count=2))
    nvml_state.write_state(str(node_b), nvml_state.default_node_state("node-b", gpu_count=4))
    got = run_child(nvml_lib_dir, """
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        lib.gpunodeLabSetStatePath.argtypes = [ctypes.c_char_p]
        out = {"first": err(N.nvmlInit)}                       # GPUNODE_LAB_NVML_INIT_ERROR=999
        lib.gpunodeLabSetStatePath(%r.encode())                # the override does not escape it
        out["override"] = err(N.nvmlInit)
        lib.gpunodeLabSetStatePath(b"/nonexistent/state")      # nor does a missing state file
        out["missing"] = err(N.nvmlInit)
        del os.environ["GPUNODE_LAB_NVML_INIT_ERROR"]
        lib.gpunodeLabSetStatePath(None)
        out["cleared"] = [err(N.nvmlInit), N.nvmlDeviceGetCount()]
        os.environ["GPUNODE_LAB_NVML_INIT_ERROR"] = "4"
        out["again"] = [err(N.nvmlInit), N.nvmlDeviceGetCount()]  # the initialized node keeps working
        done(out)
    """ % str(node_b), node_a, env_extra={nvml_state.ENV_INIT_ERROR: "999"})
    assert got == {"first": "NVMLError_Unknown", "override": "NVMLError_Unknown", "missing": "NVMLError_Unknown",
                   "cleared": [None, 2], "again": ["NVMLError_NoPermission", 2]}


def test_the_view_applies_to_every_node_of_the_override(nvml_lib_dir: Path, tmp_path: Path) -> None:
    node_a, node_b = tmp_path / "a.state", tmp_path / "b.state"
    nvml_state.write_state(str(node_a), nvml_state.default_node_state("node-a", gpu_count=2))
    state_b = nvml_state.default_node_state("node-b", gpu_count=4, model="H100")
    nvml_state.write_state(str(node_b), state_b)
    got = run_child(nvml_lib_dir, """
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        lib.gpunodeLabSetStatePath.argtypes = [ctypes.c_char_p]
        N.nvmlInit()
        out = {"a": N.nvmlDeviceGetCount()}
        lib.gpunodeLabSetStatePath(%r.encode())
        N.nvmlInit()
        out["b"] = [N.nvmlDeviceGetCount(), N.nvmlDeviceGetUUID(N.nvmlDeviceGetHandleByIndex(0))]
        os.environ["NVIDIA_VISIBLE_DEVICES"] = "all"           # re-read at the next nvmlInit
        N.nvmlInit()
        out["all"] = N.nvmlDeviceGetCount()
        done(out)
    """ % str(node_b), node_a, env_extra={"NVIDIA_VISIBLE_DEVICES": "3"})
    assert got == {"a": 0, "b": [1, state_b["gpus"][3]["uuid"]], "all": 4}


def test_nvml_version_is_readable_before_init(nvml_lib_dir: Path, state_path: Path) -> None:
    nvml_state.apply_fault(str(state_path), "driver_library_mismatch")
    got = run_child(nvml_lib_dir, """
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        buf = ctypes.create_string_buffer(80)
        done([lib.nvmlSystemGetNVMLVersion(buf, 80), buf.value.decode(), err(N.nvmlInit),
              lib.nvmlSystemGetDriverVersion(buf, 80)])
    """, state_path)
    assert got == [0, "12.550.54.15", "NVMLError_LibRmVersionMismatch", 1]


def test_power_limit_and_topology(nvml_lib_dir: Path, state_path: Path) -> None:
    got = run_child(nvml_lib_dir, """
        N.nvmlInit()
        h = [N.nvmlDeviceGetHandleByIndex(i) for i in range(8)]
        done([N.nvmlDeviceGetEnforcedPowerLimit(h[0]), N.nvmlDeviceGetPowerManagementLimit(h[7]),
              [N.nvmlDeviceGetTopologyCommonAncestor(h[0], h[i]) for i in (1, 2, 3, 4, 7)],
              err(N.nvmlDeviceGetNvLinkState, h[0], 0), err(N.nvmlDeviceGetTopologyCommonAncestor, h[0], h[0])])
    """, state_path)
    assert got == [400000, 400000, [20, 40, 40, 50, 50], "NVMLError_NotSupported", "NVMLError_InvalidArgument"]
