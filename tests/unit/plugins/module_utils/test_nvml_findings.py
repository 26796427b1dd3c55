# -*- coding: utf-8 -*-
"""nvml_info's logic: the verdict over recorded NVML readings, the reader over a fake pynvml,
option validation, library lookup under a driver root, and the deadline."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import threading
import time
from dataclasses import replace

import pytest

from ansible_collections.gpunode.bringup.plugins.module_utils import _nvml as nv
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError

# ---- recorded readings ------------------------------------------------------------------------

# One healthy A100 as NVML reports it (values recorded from the lab library, which copies a real board).
A100 = dict(
    name="NVIDIA A100-SXM4-80GB", serial="1932547385581", memory_total_mib=81920, memory_used_mib=591,
    persistence_mode=True, mig_mode_current=False, mig_mode_pending=False, ecc_mode_current=True,
    ecc_mode_pending=True, ecc_volatile_corrected=0, ecc_volatile_uncorrected=0, ecc_aggregate_corrected=0,
    ecc_aggregate_uncorrected=0, retired_pages_single_bit=None, retired_pages_double_bit=None,
    retired_pages_pending=None, remapped_rows_correctable=0, remapped_rows_uncorrectable=0,
    remapped_rows_pending=False, remapped_rows_failure=False, temperature_c=31, power_draw_watts=62.0,
)
# A V100 retires pages and has no row remapping and no MIG.
V100 = dict(A100, name="Tesla V100-SXM2-32GB", memory_total_mib=32768, mig_mode_current=None,
            mig_mode_pending=None, retired_pages_single_bit=0, retired_pages_double_bit=0,
            retired_pages_pending=False, remapped_rows_correctable=None, remapped_rows_uncorrectable=None,
            remapped_rows_pending=None, remapped_rows_failure=None)


def gpu(index, model=None, **fields):
    values = dict(model or A100)
    values.update(fields)
    return nv.GpuReading(index=index, uuid="GPU-%08d-0000-0000-0000-000000000000" % index,
                         pci_bus_id="00000000:%02X:00.0" % (7 + index), **values)


def node(gpus=None, **fields):
    gpus = [gpu(i) for i in range(2)] if gpus is None else gpus
    values = dict(kernel_module_version="550.54.15", driver_version="550.54.15", cuda_driver_version="12.4",
                  nvml_version="12.550.54.15", gpu_count=len(gpus), gpus=gpus,
                  library_path="/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.550.54.15")
    values.update(fields)
    return nv.NodeReading(**values)


def codes(findings):
    return [(f.code, f.severity, f.gpu) for f in findings]


EXPECT = nv.Expectations(expected_gpu_count=2)


def test_healthy_node_has_no_findings():
    findings = nv.assess(node(), EXPECT)
    assert findings == []
    assert nv.is_healthy(findings)


@pytest.mark.parametrize("init_error, code, action_words", [
    (nv.NVML_ERROR_LIBRARY_NOT_FOUND, "nvml_library_missing", "driver_root"),
    (nv.NVML_ERROR_DRIVER_NOT_LOADED, "driver_not_loaded", "modprobe nvidia"),
    (nv.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "driver_library_mismatch", "reboot the node"),
    (nv.NVML_ERROR_NO_PERMISSION, "no_permission", "root"),
    (nv.NVML_ERROR_UNKNOWN, "nvml_init_failed", "nvidia-smi"),
    (nv.NVML_ERROR_FUNCTION_NOT_FOUND, "nvml_init_failed", "nvidia-smi"),
])
def test_init_failure_gives_one_node_finding(init_error, code, action_words):
    reading = nv.NodeReading(init_error=init_error, init_call="nvmlInit")
    findings = nv.assess(reading, EXPECT)
    assert codes(findings) == [(code, "error", None)]
    assert action_words in findings[0].action
    assert not nv.is_healthy(findings)


def test_mismatch_names_both_versions():
    reading = nv.NodeReading(init_error=nv.NVML_ERROR_LIB_RM_VERSION_MISMATCH, init_call="nvmlInit",
                             kernel_module_version="535.129.03",
                             library_path="/usr/lib64/libnvidia-ml.so.550.54.15")
    (finding,) = nv.assess(reading, EXPECT)
    assert "kernel module 535.129.03, library 550.54.15" in finding.message
    assert "rmmod" in finding.action and "reboot" in finding.action


def test_driver_not_loaded_says_proc_file_is_absent():
    (finding,) = nv.assess(nv.NodeReading(init_error=nv.NVML_ERROR_DRIVER_NOT_LOADED), EXPECT)
    assert "/proc/driver/nvidia/version is absent" in finding.message


def test_library_missing_under_driver_root_names_the_root():
    reading = nv.NodeReading(init_error=nv.NVML_ERROR_LIBRARY_NOT_FOUND, library_search_root="/run/nvidia/driver")
    (finding,) = nv.assess(reading, EXPECT)
    assert "under driver root /run/nvidia/driver" in finding.message


def test_count_failure_after_init_names_the_call():
    reading = nv.NodeReading(init_error=nv.NVML_ERROR_NO_PERMISSION, init_call="nvmlDeviceGetCount")
    (finding,) = nv.assess(reading, EXPECT)
    assert finding.code == "no_permission"
    assert "nvmlDeviceGetCount returned NVML_ERROR_NO_PERMISSION" in finding.message


@pytest.mark.parametrize("driver, minimum, too_old", [
    ("550.54.15", "550.54.15", False),
    ("550.54.15", "550", False),
    ("550.54.15", "550.54.16", True),
    ("535.129.03", "550", True),
    ("560.28.03", "550.54.15", False),
])
def test_driver_version_floor(driver, minimum, too_old):
    findings = nv.assess(node(driver_version=driver), replace(EXPECT, min_driver_version=minimum))
    assert (codes(findings) == [("driver_too_old", "error", None)]) is too_old
    assert too_old or findings == []


@pytest.mark.parametrize("count, expected, mismatch, words", [
    (2, 2, False, None),
    (1, 2, True, "lspci"),
    (3, 2, True, "expected_gpu_count"),
    (0, None, True, "lspci"),
    (0, 0, False, None),
    (4, None, False, None),
])
def test_gpu_count(count, expected, mismatch, words):
    reading = node(gpus=[gpu(i) for i in range(count)])
    findings = nv.assess(reading, nv.Expectations(expected_gpu_count=expected))
    assert [f.code for f in findings] == (["gpu_count_mismatch"] if mismatch else [])
    if words:
        assert words in findings[0].action


@pytest.mark.parametrize("fields, expected", [
    (dict(lost=True), [("gpu_lost", "error", 1)]),
    (dict(lost=True, ecc_volatile_uncorrected=5, persistence_mode=False), [("gpu_lost", "error", 1)]),
    (dict(ecc_volatile_uncorrected=2, ecc_aggregate_uncorrected=7), [("ecc_uncorrectable", "error", 1)]),
    (dict(ecc_aggregate_uncorrected=3), [("ecc_uncorrectable", "warning", 1)]),
    (dict(ecc_volatile_corrected=120, ecc_aggregate_corrected=4000), []),
    (dict(remapped_rows_pending=True, remapped_rows_uncorrectable=1), [("remapped_rows_pending", "warning", 1)]),
    (dict(remapped_rows_failure=True), [("remapped_rows_failure", "error", 1)]),
    (dict(persistence_mode=False), [("persistence_mode_off", "warning", 1)]),
    (dict(persistence_mode=None), []),
    (dict(mig_mode_current=False, mig_mode_pending=True), [("mig_mode_pending", "warning", 1)]),
    (dict(mig_mode_current=True, mig_mode_pending=False), [("mig_mode_pending", "warning", 1)]),
    (dict(mig_mode_current=None, mig_mode_pending=None), []),
    (dict(read_errors={"power_draw": "NVML_ERROR_NO_PERMISSION"}), [("no_permission", "warning", 1)]),
    (dict(read_errors={"temperature": "NVML_ERROR_UNKNOWN"}), [("nvml_query_failed", "warning", 1)]),
])
def test_per_gpu_findings(fields, expected):
    reading = node(gpus=[gpu(0), gpu(1, **fields)])
    findings = nv.assess(reading, EXPECT)
    assert codes(findings) == expected
    for finding in findings:
        assert "GPU 1 (GPU-00000001" in finding.message and finding.action


@pytest.mark.parametrize("fields, expected", [
    (dict(retired_pages_pending=True, retired_pages_double_bit=1), [("retired_pages_pending", "warning", 0)]),
    (dict(retired_pages_single_bit=3), []),
])
def test_page_retirement_on_pre_ampere(fields, expected):
    reading = node(gpus=[gpu(0, V100, **fields)], gpu_count=1)
    assert codes(nv.assess(reading, nv.Expectations(expected_gpu_count=1))) == expected


def test_persistence_required_is_an_error():
    reading = node(gpus=[gpu(0, persistence_mode=False), gpu(1)])
    findings = nv.assess(reading, replace(EXPECT, require_persistence_mode=True))
    assert codes(findings) == [("persistence_mode_off", "error", 0)]
    assert "nvidia-persistenced" in findings[0].action


def test_warnings_alone_keep_the_node_healthy():
    reading = node(gpus=[gpu(0, persistence_mode=False), gpu(1, mig_mode_pending=True)])
    findings = nv.assess(reading, EXPECT)
    assert [f.severity for f in findings] == ["warning", "warning"]
    assert nv.is_healthy(findings)


@pytest.mark.parametrize("events, ignored, expected", [
    ([nv.XidEvent(79, 1, False)], (), [("critical_xid", "error", 1)]),
    ([nv.XidEvent(13, 0, True), nv.XidEvent(31, 1, True)], (), []),
    ([nv.XidEvent(48, 0, False), nv.XidEvent(48, 0, False), nv.XidEvent(94, 0, False)], (),
     [("critical_xid", "error", 0)]),
    ([nv.XidEvent(79, None, False), nv.XidEvent(74, 1, False)], (),
     [("critical_xid", "error", None), ("critical_xid", "error", 1)]),
])
def test_xid_findings(events, ignored, expected):
    reading = node(xid_events=events, xid_watch_seconds=5.0)
    findings = nv.assess(reading, EXPECT)
    assert codes(findings) == expected


def test_xid_message_describes_each_xid_once():
    reading = node(xid_events=[nv.XidEvent(48, 0, False), nv.XidEvent(48, 0, False), nv.XidEvent(94, 0, False)],
                   xid_watch_seconds=2.5)
    (finding,) = nv.assess(reading, EXPECT)
    assert "48 (double-bit ECC error), 94 (contained ECC error)" in finding.message
    assert "2.5s watch" in finding.message


def test_xid_watch_error_is_a_warning():
    reading = node(xid_watch_error="nvmlEventSetCreate failed: NVML_ERROR_NOT_SUPPORTED", xid_watch_seconds=1)
    assert codes(nv.assess(reading, EXPECT)) == [("xid_watch_unavailable", "warning", None)]


def test_timeout_comes_first_and_names_the_call():
    reading = node(gpus=[gpu(0)], gpu_count=2, timed_out=True, timeout_seconds=30,
                   call_in_progress="nvmlDeviceGetHandleByIndex(1)")
    findings = nv.assess(reading, EXPECT)
    assert findings[0].code == "nvml_timeout"
    assert "30s" in findings[0].message and "nvmlDeviceGetHandleByIndex(1)" in findings[0].message


def test_findings_are_ordered_node_then_gpu_index():
    reading = node(gpus=[gpu(0, persistence_mode=False), gpu(1, lost=True), gpu(2, remapped_rows_failure=True)],
                   driver_version="470.1", xid_events=[nv.XidEvent(79, 2, False)], xid_watch_seconds=1)
    findings = nv.assess(reading, nv.Expectations(expected_gpu_count=4, min_driver_version="535"))
    assert [f.code for f in findings] == ["driver_too_old", "gpu_count_mismatch", "persistence_mode_off", "gpu_lost",
                                          "remapped_rows_failure", "critical_xid"]


def test_result_shape_has_null_for_unsupported_fields():
    reading = node(gpus=[gpu(0, V100)], gpu_count=1, xid_events=[nv.XidEvent(13, 0, True)], xid_watch_seconds=1)
    result = nv.result_of(reading, nv.assess(reading, nv.Expectations()))
    (entry,) = result["gpus"]
    assert entry["mig_mode"] == {"current": None, "pending": None}
    assert entry["remapped_rows"]["pending"] is None
    assert entry["retired_pages"] == {"single_bit": 0, "double_bit": 0, "pending": False}
    assert entry["memory"] == {"total_mib": 32768, "used_mib": 591, "reserved_mib": None}
    assert entry["xid_events"] == [13]
    assert result["xid_watch"]["events"] == [
        {"xid": 13, "gpu": 0, "ignored": True, "description": "graphics engine exception"}]
    assert result["healthy"] is True and result["changed"] is False


# ---- pure helpers -----------------------------------------------------------------------------

@pytest.mark.parametrize("value, text", [(12080, "12.8"), (12040, "12.4"), (11020, "11.2"), (0, None), (None, None)])
def test_cuda_version_text(value, text):
    assert nv.cuda_version_text(value) == text


@pytest.mark.parametrize("text, version", [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
     "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n", "550.54.15"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  "
     "(dvs-builder@U16-I3-B03-4-3)  Thu Jan 23 23:24:36 UTC 2025\n", "570.86.15"),
    ("NVRM version: NVIDIA UNIX aarch64 Kernel Module  535.129.03  Thu Oct 19 18:42:12 UTC 2023\n", "535.129.03"),
    ("GCC version:  gcc version 12.3.0\n", None),
    ("", None),
])
def test_parse_kernel_module_version(text, version):
    assert nv.parse_kernel_module_version(text) == version


@pytest.mark.parametrize("text, parsed", [("550.54.15", (550, 54, 15)), ("535", (535,)), ("5.x", None), ("", None)])
def test_version_tuple(text, parsed):
    assert nv.version_tuple(text) == parsed


@pytest.mark.parametrize("path, version", [
    ("/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.550.54.15", "550.54.15"),
    ("/work/.build/lab/lib/libnvidia-ml.so.1", None),
    (None, None),
])
def test_library_version_from_path(path, version):
    assert nv.library_version_from_path(path) == version


def test_loaded_library_from_maps():
    maps = ("7f0000000000-7f0000001000 r--p 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
            "7f0000002000-7f0000003000 r-xp 00001000 08:01 456 "
            "/run/nvidia/driver/usr/lib64/libnvidia-ml.so.550.54.15\n")
    assert nv.loaded_library_from_maps(maps) == "/run/nvidia/driver/usr/lib64/libnvidia-ml.so.550.54.15"
    assert nv.loaded_library_from_maps("7f00-7f01 r--p 0 0:0 0 [heap]\n") is None


@pytest.mark.parametrize("code, name", [(15, "NVML_ERROR_GPU_IS_LOST"), (18, "NVML_ERROR_LIB_RM_VERSION_MISMATCH"),
                                        (77, "NVML_ERROR_77"), (None, "NVML_ERROR_UNKNOWN")])
def test_nvml_error_name(code, name):
    assert nv.nvml_error_name(code) == name


# ---- options ------------------------------------------------------------------------------

@pytest.mark.parametrize("params, option", [
    ({"expected_gpu_count": -1}, "expected_gpu_count"),
    ({"min_driver_version": "latest"}, "min_driver_version"),
    ({"ignored_xids": [13, 0]}, "ignored_xids"),
])
def test_bad_expectations_name_the_option(params, option):
    with pytest.raises(InvalidOptionError, match=option):
        nv.build_expectations(params)


def test_default_ignored_xids_are_the_device_plugins():
    assert nv.build_expectations({}).ignored_xids == frozenset([13, 31, 43, 45, 68, 109])


@pytest.mark.parametrize("params, option", [
    ({"node_root": "relative/root"}, "node_root"),
    ({"node_root": "/does/not/exist"}, "node_root"),
    ({"node_root": "/", "driver_root": "run/nvidia/driver"}, "driver_root"),
])
def test_bad_paths_name_the_option(params, option):
    with pytest.raises(InvalidOptionError, match=option):
        nv.check_paths(params)


@pytest.mark.parametrize("params, option", [
    ({"xid_watch_seconds": -1}, "xid_watch_seconds"),
    ({"xid_watch_seconds": 7200}, "xid_watch_seconds"),
    ({"timeout": 0}, "timeout"),
])
def test_bad_durations_name_the_option(params, option):
    with pytest.raises(InvalidOptionError, match=option):
        nv.check_durations(params)


def test_driver_root_is_read_below_node_root(tmp_path):
    assert nv.check_paths({"node_root": str(tmp_path), "driver_root": "/run/nvidia/driver"}) == (
        str(tmp_path), os.path.join(str(tmp_path), "run/nvidia/driver"))
    assert nv.check_paths({"node_root": "/", "driver_root": "/run/nvidia/driver"}) == ("/", "/run/nvidia/driver")


# ---- library lookup under a driver root -----------------------------------------------------

def _library(root, directory, version="550.54.15"):
    lib_dir = root / directory
    lib_dir.mkdir(parents=True)
    (lib_dir / ("libnvidia-ml.so." + version)).write_bytes(b"\x7fELF")
    return lib_dir


@pytest.mark.parametrize("directory", ["usr/lib64", "usr/lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu",
                                       "opt/nvidia/lib"])
def test_find_library_follows_relative_soname_link(tmp_path, directory):
    lib_dir = _library(tmp_path, directory)
    os.symlink("libnvidia-ml.so.550.54.15", str(lib_dir / "libnvidia-ml.so.1"))
    assert nv.find_nvml_library(str(tmp_path)) == str(lib_dir / "libnvidia-ml.so.550.54.15")


def test_find_library_keeps_absolute_links_inside_the_root(tmp_path):
    lib_dir = _library(tmp_path, "usr/lib64")
    os.symlink("/usr/lib64/libnvidia-ml.so.550.54.15", str(lib_dir / "libnvidia-ml.so.1"))
    assert nv.find_nvml_library(str(tmp_path)) == str(lib_dir / "libnvidia-ml.so.550.54.15")


def test_find_library_absent(tmp_path):
    (tmp_path / "usr/lib64").mkdir(parents=True)
    os.symlink("libnvidia-ml.so.550.54.15", str(tmp_path / "usr/lib64/libnvidia-ml.so.1"))  # dangling
    assert nv.find_nvml_library(str(tmp_path)) is None


def test_resolve_in_root_stops_dotdot_at_the_root(tmp_path):
    (tmp_path / "etc").mkdir()
    os.symlink("../../../../etc", str(tmp_path / "escape"))
    assert nv.resolve_in_root(str(tmp_path), str(tmp_path / "escape")) == str(tmp_path / "etc")


def test_missing_driver_root_is_a_finding_not_a_failure(tmp_path):
    result = nv.gather_nvml_info({"node_root": str(tmp_path), "driver_root": "/run/nvidia/driver"}, nvml=FakeNvml([]))
    assert [f["code"] for f in result["findings"]] == ["nvml_library_missing"]
    assert "is the driver container running" in result["findings"][0]["message"]


# ---- the reader over a fake pynvml ------------------------------------------------------------

class FakeNvmlError(Exception):
    def __init__(self, value):
        super(FakeNvmlError, self).__init__(value)
        self.value = value


class Obj(object):
    def __init__(self, **kw):
        self.__dict__.update(kw)


class FakeNvml(object):
    """The pynvml calls nvml_info makes, over a list of GPU dicts; ``fail`` maps a call name (or
    (name, gpu index)) to the NVML error it returns."""

    NVMLError = FakeNvmlError

    def __init__(self, gpus, fail=None, events=(), hang=None):
        self.gpus = gpus
        self.fail = dict(fail or {})
        self.events = list(events)
        self.hang = hang
        self.calls = []
        self.shutdown = False

    def _check(self, name, index=None):
        self.calls.append(name)
        if self.hang == name:
            time.sleep(5)
        code = self.fail.get((name, index), self.fail.get(name))
        if code is None and index is not None and self.gpus[index].get("lost"):
            code = nv.NVML_ERROR_GPU_IS_LOST
        if code is not None:
            raise FakeNvmlError(code)

    def _gpu(self, name, handle):
        if handle is None:  # an event that names no device
            raise FakeNvmlError(2)
        self._check(name, handle)
        value = self.gpus[handle].get(name)
        if value is None:
            raise FakeNvmlError(nv.NVML_ERROR_NOT_SUPPORTED)
        return value

    def nvmlInit(self):
        self._check("nvmlInit")

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlSystemGetDriverVersion(self):
        self._check("nvmlSystemGetDriverVersion")
        return "550.54.15"

    def nvmlSystemGetNVMLVersion(self):
        return b"12.550.54.15"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12040

    def nvmlDeviceGetCount(self):
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._check("nvmlDeviceGetHandleByIndex", index)
        return index

    def nvmlDeviceGetUUID(self, handle):
        return self._gpu("uuid", handle)

    def nvmlDeviceGetName(self, handle):
        return self._gpu("name", handle)

    def nvmlDeviceGetPciInfo(self, handle):
        return Obj(busId=self._gpu("bus", handle))

    def nvmlDeviceGetSerial(self, handle):
        return self._gpu("serial", handle)

    def nvmlDeviceGetMemoryInfo(self, handle):
        total, used = self._gpu("memory", handle)
        return Obj(total=total, used=used, free=total - used)

    def nvmlDeviceGetPersistenceMode(self, handle):
        return self._gpu("persistence", handle)

    def nvmlDeviceGetMigMode(self, handle):
        return self._gpu("mig", handle)

    def nvmlDeviceGetEccMode(self, handle):
        return self._gpu("ecc", handle)

    def nvmlDeviceGetTotalEccErrors(self, handle, error_type, counter):
        return self._gpu("ecc_counts", handle)[(error_type, counter)]

    def nvmlDeviceGetRetiredPages(self, handle, cause):
        return self._gpu("retired", handle)[cause]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle):
        return self._gpu("retired_pending", handle)

    def nvmlDeviceGetRemappedRows(self, handle):
        return self._gpu("rows", handle)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return self._gpu("temperature", handle)

    def nvmlDeviceGetPowerUsage(self, handle):
        return self._gpu("power", handle)

    def nvmlEventSetCreate(self):
        self._check("nvmlEventSetCreate")
        return "set"

    def nvmlDeviceRegisterEvents(self, handle, types, event_set):
        self._check("nvmlDeviceRegisterEvents", handle)

    def nvmlEventSetFree(self, event_set):
        self.calls.append("nvmlEventSetFree")

    def nvmlEventSetWait_v2(self, event_set, timeout_ms):
        self._check("nvmlEventSetWait_v2")
        if not self.events:
            time.sleep(min(timeout_ms, 20) / 1000.0)  # NVML blocks until an event or the timeout
            raise FakeNvmlError(nv.NVML_ERROR_TIMEOUT)
        index, xid = self.events.pop(0)
        return Obj(device=index, eventType=nv.NVML_EVENT_TYPE_XID_CRITICAL_ERROR, eventData=xid)


def fake_gpu(index, **overrides):
    values = {
        "uuid": "GPU-%d" % index, "name": b"NVIDIA H100 80GB HBM3", "bus": b"00000000:%02X:00.0" % (7 + index),
        "serial": "1650000000000", "memory": (81559 * 1048576, 523 * 1048576), "persistence": 1,
        "mig": [0, 0], "ecc": [1, 1], "ecc_counts": {(0, 0): 3, (1, 0): 0, (0, 1): 40, (1, 1): 0},
        "retired": None, "retired_pending": None, "rows": (0, 0, 0, 0), "temperature": 33, "power": 71234,
    }
    values.update(overrides)
    return values


def read(fake, watch=0.0):
    return nv.NvmlReader(fake, nv.NodeReading()).read(watch, nv.DEFAULT_IGNORED_XIDS)


class FakeNvmlV2(FakeNvml):
    """A pynvml that knows nvmlMemory_v2: ``memory`` is (total, used by allocations, reserved)."""

    nvmlMemory_v2 = 0x02000028

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        total, used, reserved = self._gpu("memory", handle)
        if version is None:  # v1: used counts the reserved memory
            return Obj(total=total, used=used + reserved, free=total - used - reserved)
        assert version == self.nvmlMemory_v2
        self._check("memory_v2", handle)
        return Obj(total=total, used=used, reserved=reserved, free=total - used - reserved, version=version)


def test_reader_memory_v2_reports_reserved_apart_like_nvidia_smi():
    # an idle H200 on R580: nvidia-smi Used 0 MiB, Reserved 616 MiB; v1 said used 615
    gpu = fake_gpu(0, memory=(143771 * 1048576, 0, 616 * 1048576))
    (g,) = read(FakeNvmlV2([gpu])).gpus
    assert (g.memory_total_mib, g.memory_used_mib, g.memory_reserved_mib) == (143771, 0, 616)
    assert g.read_errors == {}
    assert g.to_result()["memory"] == {"total_mib": 143771, "used_mib": 0, "reserved_mib": 616}


@pytest.mark.parametrize("code", [nv.NVML_ERROR_FUNCTION_NOT_FOUND, nv.NVML_ERROR_NOT_SUPPORTED,
                                  nv.NVML_ERROR_ARGUMENT_VERSION_MISMATCH])
def test_reader_memory_falls_back_to_v1_on_an_older_driver(code):
    gpu = fake_gpu(0, memory=(81559 * 1048576, 100 * 1048576, 523 * 1048576))
    fake = FakeNvmlV2([gpu], fail={"memory_v2": code})
    (g,) = read(fake).gpus
    assert (g.memory_total_mib, g.memory_used_mib, g.memory_reserved_mib) == (81559, 623, None)
    assert g.read_errors == {}


def test_reader_memory_v2_failure_is_recorded_not_hidden_by_v1():
    fake = FakeNvmlV2([fake_gpu(0, memory=(1048576, 0, 0))], fail={"memory_v2": nv.NVML_ERROR_NO_PERMISSION})
    (g,) = read(fake).gpus
    assert g.read_errors == {"memory": "NVML_ERROR_NO_PERMISSION"}
    assert (g.memory_total_mib, g.memory_used_mib, g.memory_reserved_mib) == (None, None, None)


def test_reader_memory_v2_gpu_lost_marks_the_gpu_lost():
    fake = FakeNvmlV2([fake_gpu(0, memory=(1048576, 0, 0))], fail={"memory_v2": nv.NVML_ERROR_GPU_IS_LOST})
    (g,) = read(fake).gpus
    assert g.lost and g.memory_total_mib is None


def test_reader_records_every_field():
    reading = read(FakeNvml([fake_gpu(0)]))
    (g,) = reading.gpus
    assert (reading.driver_version, reading.nvml_version, reading.cuda_driver_version, reading.gpu_count) == (
        "550.54.15", "12.550.54.15", "12.4", 1)
    assert (g.uuid, g.name, g.pci_bus_id) == ("GPU-0", "NVIDIA H100 80GB HBM3", "00000000:07:00.0")
    assert (g.memory_total_mib, g.memory_used_mib, g.persistence_mode) == (81559, 523, True)
    assert (g.mig_mode_current, g.mig_mode_pending, g.ecc_mode_current, g.ecc_mode_pending) == (False, False, True, True)
    assert (g.ecc_volatile_corrected, g.ecc_volatile_uncorrected, g.ecc_aggregate_corrected,
            g.ecc_aggregate_uncorrected) == (3, 0, 40, 0)
    assert (g.remapped_rows_pending, g.remapped_rows_failure, g.temperature_c, g.power_draw_watts) == (
        False, False, 33, 71.234)
    assert g.retired_pages_single_bit is None and g.retired_pages_pending is None
    assert g.read_errors == {} and not g.lost


def test_reader_counts_retired_pages():
    gpu_values = fake_gpu(0, retired={0: [0x1000, 0x2000], 1: [0x3000]}, retired_pending=1, rows=None, mig=None)
    (g,) = read(FakeNvml([gpu_values])).gpus
    assert (g.retired_pages_single_bit, g.retired_pages_double_bit, g.retired_pages_pending) == (2, 1, True)
    assert g.remapped_rows_pending is None and g.mig_mode_current is None


@pytest.mark.parametrize("fail, init_error, call", [
    ({"nvmlInit": nv.NVML_ERROR_DRIVER_NOT_LOADED}, nv.NVML_ERROR_DRIVER_NOT_LOADED, "nvmlInit"),
    ({"nvmlInit": nv.NVML_ERROR_LIB_RM_VERSION_MISMATCH}, nv.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "nvmlInit"),
    ({"nvmlDeviceGetCount": nv.NVML_ERROR_NO_PERMISSION}, nv.NVML_ERROR_NO_PERMISSION, "nvmlDeviceGetCount"),
])
def test_reader_stops_at_init_errors(fail, init_error, call):
    reading = read(FakeNvml([fake_gpu(0)], fail=fail))
    assert (reading.init_error, reading.init_call, reading.gpus) == (init_error, call, [])


def test_reader_marks_a_gpu_lost_at_its_handle():
    fake = FakeNvml([fake_gpu(0), fake_gpu(1, lost=True)])
    reading = read(fake)
    assert [g.lost for g in reading.gpus] == [False, True]
    assert reading.gpus[1].uuid is None
    assert reading.gpus[1].read_errors == {"handle": "NVML_ERROR_GPU_IS_LOST"}
    assert fake.shutdown


def test_reader_stops_querying_a_gpu_lost_midway():
    fake = FakeNvml([fake_gpu(0)], fail={("uuid", 0): nv.NVML_ERROR_GPU_IS_LOST})
    (g,) = read(fake).gpus
    assert g.lost and g.name is None and g.temperature_c is None
    assert "temperature" not in fake.calls


def test_reader_records_errors_other_than_not_supported():
    fake = FakeNvml([fake_gpu(0, serial=None)], fail={("power", 0): nv.NVML_ERROR_NO_PERMISSION,
                                                      ("temperature", 0): nv.NVML_ERROR_FUNCTION_NOT_FOUND})
    (g,) = read(fake).gpus
    assert g.serial is None and g.power_draw_watts is None and g.temperature_c is None
    assert g.read_errors == {"power_draw": "NVML_ERROR_NO_PERMISSION"}


def test_xid_watch_collects_events_until_its_deadline():
    fake = FakeNvml([fake_gpu(0), fake_gpu(1)], events=[(1, 79), (0, 13), (None, 48)])
    started = time.monotonic()
    reading = read(fake, watch=0.3)
    assert 0.25 < time.monotonic() - started < 3
    assert [(e.xid, e.gpu, e.ignored) for e in reading.xid_events] == [(79, 1, False), (13, 0, True), (48, None, False)]
    assert "nvmlEventSetFree" in fake.calls and reading.xid_watch_error is None


@pytest.mark.parametrize("fail, message", [
    ({"nvmlEventSetCreate": nv.NVML_ERROR_NOT_SUPPORTED}, "nvmlEventSetCreate failed: NVML_ERROR_NOT_SUPPORTED"),
    ({("nvmlDeviceRegisterEvents", 1): nv.NVML_ERROR_NOT_SUPPORTED}, "GPU 1: NVML_ERROR_NOT_SUPPORTED"),
    ({"nvmlEventSetWait_v2": nv.NVML_ERROR_UNKNOWN}, "nvmlEventSetWait failed: NVML_ERROR_UNKNOWN"),
])
def test_xid_watch_problems_are_recorded(fail, message):
    reading = read(FakeNvml([fake_gpu(0), fake_gpu(1)], fail=fail), watch=0.05)
    assert message in reading.xid_watch_error


def test_a_hung_call_ends_at_the_deadline():
    fake = FakeNvml([fake_gpu(0)], hang="nvmlDeviceGetHandleByIndex")
    started = time.monotonic()
    reading = nv.read_with_deadline(fake, nv.NodeReading(), 0.2, 0.0, ())
    assert time.monotonic() - started < 2
    assert reading.timed_out and reading.call_in_progress == "nvmlDeviceGetHandleByIndex(0)"
    assert reading.driver_version == "550.54.15"
    assert [f.code for f in nv.assess(reading, nv.Expectations(expected_gpu_count=1))][0] == "nvml_timeout"


def test_run_with_deadline_reraises_unexpected_errors():
    def boom():
        raise RuntimeError("bug")
    with pytest.raises(RuntimeError):
        nv.run_with_deadline(boom, 1)
    assert nv.run_with_deadline(lambda: 7, 1) == (True, 7)
    assert threading.active_count() >= 1


def test_gather_reports_an_unhealthy_node_without_failing(tmp_path):
    proc = tmp_path / "proc/driver/nvidia"
    proc.mkdir(parents=True)
    (proc / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar 5 2024\n")
    fake = FakeNvml([fake_gpu(0), fake_gpu(1, rows=(0, 1, 1, 0), persistence=0)])
    result = nv.gather_nvml_info({"node_root": str(tmp_path), "expected_gpu_count": 2,
                                  "require_persistence_mode": True}, nvml=fake)
    assert result["kernel_module_version"] == "550.54.15"
    assert [(f["code"], f["severity"], f["gpu"]) for f in result["findings"]] == [
        ("remapped_rows_pending", "warning", 1), ("persistence_mode_off", "error", 1)]
    assert result["healthy"] is False and result["changed"] is False
    assert result["gpus"][1]["remapped_rows"] == {"correctable": 0, "uncorrectable": 1, "pending": True,
                                                  "failure": False}
