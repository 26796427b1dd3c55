# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The kubelet checkpoint reader on files in the kubelet's JSON shape (encoding/json output of
devicemanager/checkpoint.Data: sorted map keys, no spaces, []byte as base64, nil slices as null)."""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import json
import os

import pytest

from ansible_collections.gpunode.bringup.plugins.module_utils._checkpoint import (
    parse_checkpoint,
    read_checkpoint,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import NodeProbeError

GPU_A = "GPU-5a1c0b7e-2f3d-4c8b-9e6a-0d1f2e3a4b5c"
GPU_B = "GPU-9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
MIG_A = "MIG-0e2f4a6c-8b1d-5e3f-9a7c-2b4d6f8a0c1e"
# A ContainerAllocateResponse with NVIDIA_VISIBLE_DEVICES=GPU-..., protobuf then base64 (as Go writes []byte).
ALLOC_RESP = "CjYKFk5WSURJQV9WSVNJQkxFX0RFVklDRVMSHEdQVS01YTFjMGI3ZS0yZjNkLTRjOGItOWU2YQ=="

# kubelet >= 1.20 (checkpoint v2: DeviceIDs per NUMA node), no BootID.
V2_NO_BOOT_ID = (
    '{"Data":{"PodDeviceEntries":[{"PodUID":"3f6b1c2a-7d4e-4f5a-9b8c-1d2e3f4a5b6c","ContainerName":"trainer",'
    '"ResourceName":"nvidia.com/gpu","DeviceIDs":{"0":["%s"]},"AllocResp":"%s"}],'
    '"RegisteredDevices":{"nvidia.com/gpu":["%s","%s"]}},"Checksum":2262405069}' % (GPU_A, ALLOC_RESP, GPU_A, GPU_B)
)
# The same with the node's BootID recorded next to Data.
V2_BOOT_ID = (
    '{"Data":{"PodDeviceEntries":[{"PodUID":"3f6b1c2a-7d4e-4f5a-9b8c-1d2e3f4a5b6c","ContainerName":"trainer",'
    '"ResourceName":"nvidia.com/gpu","DeviceIDs":{"0":["%s"],"1":["%s"]},"AllocResp":"%s"}],'
    '"RegisteredDevices":{"nvidia.com/gpu":["%s","%s"]}},"BootID":"c1a5f0e2-3b4d-4e6f-8a9b-0c1d2e3f4a5b",'
    '"Checksum":3705114231}' % (GPU_A, GPU_B, ALLOC_RESP, GPU_A, GPU_B)
)
# BootID inside Data.
V2_BOOT_ID_IN_DATA = (
    '{"Data":{"BootID":"c1a5f0e2-3b4d-4e6f-8a9b-0c1d2e3f4a5b","PodDeviceEntries":null,'
    '"RegisteredDevices":{"nvidia.com/gpu":["%s"]}},"Checksum":1}' % GPU_A
)
# Devices without topology are filed under NUMA node -1.
V2_NO_TOPOLOGY = (
    '{"Data":{"PodDeviceEntries":[{"PodUID":"u1","ContainerName":"c","ResourceName":"nvidia.com/gpu",'
    '"DeviceIDs":{"-1":["%s::0","%s::1"]},"AllocResp":"%s"}],'
    '"RegisteredDevices":{"nvidia.com/gpu":["%s::0","%s::1","%s::2"]}},"Checksum":7}'
    % (GPU_A, GPU_A, ALLOC_RESP, GPU_A, GPU_A, GPU_A)
)
# kubelet < 1.20 (checkpoint v1: flat DeviceIDs).
V1 = (
    '{"Data":{"PodDeviceEntries":[{"PodUID":"u1","ContainerName":"c","ResourceName":"nvidia.com/gpu",'
    '"DeviceIDs":["%s"],"AllocResp":"%s"}],"RegisteredDevices":{"nvidia.com/gpu":["%s"]}},"Checksum":42}'
    % (GPU_A, ALLOC_RESP, GPU_A)
)
# A kubelet that has never seen a plugin: nil slice and empty map.
EMPTY = '{"Data":{"PodDeviceEntries":null,"RegisteredDevices":{}},"Checksum":2288203569}'
# Two resources (MIG mixed strategy).
MIXED = (
    '{"Data":{"PodDeviceEntries":null,"RegisteredDevices":{"nvidia.com/gpu":["%s"],'
    '"nvidia.com/mig-1g.10gb":["%s"]}},"Checksum":5}' % (GPU_B, MIG_A)
)


@pytest.mark.parametrize(
    "text, version, registered, entries, boot_id, checksum",
    [
        (V2_NO_BOOT_ID, "v2", {"nvidia.com/gpu": (GPU_A, GPU_B)},
         [("trainer", (GPU_A,), (0,))], None, 2262405069),
        (V2_BOOT_ID, "v2", {"nvidia.com/gpu": (GPU_A, GPU_B)},
         [("trainer", (GPU_A, GPU_B), (0, 1))], "c1a5f0e2-3b4d-4e6f-8a9b-0c1d2e3f4a5b", 3705114231),
        (V2_BOOT_ID_IN_DATA, "v2", {"nvidia.com/gpu": (GPU_A,)}, [], "c1a5f0e2-3b4d-4e6f-8a9b-0c1d2e3f4a5b", 1),
        (V2_NO_TOPOLOGY, "v2", {"nvidia.com/gpu": (GPU_A + "::0", GPU_A + "::1", GPU_A + "::2")},
         [("c", (GPU_A + "::0", GPU_A + "::1"), ())], None, 7),
        (V1, "v1", {"nvidia.com/gpu": (GPU_A,)}, [("c", (GPU_A,), ())], None, 42),
        (EMPTY, "v2", {}, [], None, 2288203569),
        (MIXED, "v2", {"nvidia.com/gpu": (GPU_B,), "nvidia.com/mig-1g.10gb": (MIG_A,)}, [], None, 5),
    ],
    ids=["v2", "v2-boot-id", "v2-boot-id-in-data", "v2-no-topology", "v1", "empty", "mig-mixed"],
)
def test_parse_real_shapes(text, version, registered, entries, boot_id, checksum):
    checkpoint = parse_checkpoint(text, "/n/kubelet_internal_checkpoint")
    assert checkpoint.format_version == version
    assert checkpoint.registered_devices == registered
    assert [(e.container_name, e.device_ids, e.numa_nodes) for e in checkpoint.pod_device_entries] == entries
    assert checkpoint.boot_id == boot_id
    assert checkpoint.checksum == checksum
    # what the probe reads
    assert checkpoint.devices_for("nvidia.com/gpu") == registered.get("nvidia.com/gpu")
    assert checkpoint.devices_for("example.com/fpga") is None
    json.dumps(checkpoint.to_dict())  # returnable as module output


def test_entries_for_resource():
    checkpoint = parse_checkpoint(V2_BOOT_ID, "cp")
    assert [e.pod_uid for e in checkpoint.entries_for("nvidia.com/gpu")] == ["3f6b1c2a-7d4e-4f5a-9b8c-1d2e3f4a5b6c"]
    assert checkpoint.entries_for("nvidia.com/mig-1g.10gb") == []


@pytest.mark.parametrize(
    "text, cause",
    [
        ("{not json", "not valid JSON"),
        ("[]", 'no "Data" object'),
        ('{"Checksum":1}', 'no "Data" object'),
        ('{"Data":{"RegisteredDevices":["GPU-1"]}}', "Data.RegisteredDevices is not an object"),
        ('{"Data":{"RegisteredDevices":{"nvidia.com/gpu":"GPU-1"}}}', "is not a list of strings"),
        ('{"Data":{"PodDeviceEntries":{}}}', "Data.PodDeviceEntries is not a list"),
        ('{"Data":{"PodDeviceEntries":["x"]}}', "Data.PodDeviceEntries[0] is not an object"),
        ('{"Data":{"PodDeviceEntries":[{"DeviceIDs":{"zero":["GPU-1"]}}]}}', "not an integer"),
        ('{"Data":{},"Checksum":"abc"}', "Checksum is not an integer"),
        ('{"Data":{},"BootID":7}', "BootID is not a string"),
    ],
)
def test_parse_rejects_wrong_shapes_naming_the_file(text, cause):
    with pytest.raises(NodeProbeError) as info:
        parse_checkpoint(text, "/node/var/lib/kubelet/device-plugins/kubelet_internal_checkpoint")
    assert cause in info.value.msg
    assert info.value.msg.startswith("kubelet checkpoint /node/var/lib/kubelet/device-plugins/kubelet_internal_checkpoint:")


def test_read_absent_is_none(tmp_path):
    assert read_checkpoint(str(tmp_path / "kubelet_internal_checkpoint")) is None


def test_read_file(tmp_path):
    path = tmp_path / "kubelet_internal_checkpoint"
    path.write_text(V2_BOOT_ID)
    before = path.stat()
    checkpoint = read_checkpoint(str(path))
    assert checkpoint is not None and checkpoint.path == str(path)
    assert checkpoint.devices_for("nvidia.com/gpu") == (GPU_A, GPU_B)
    after = path.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)  # read-only


def test_read_directory_fails_clearly(tmp_path):
    path = tmp_path / "kubelet_internal_checkpoint"
    path.mkdir()
    with pytest.raises(NodeProbeError, match="is a directory"):
        read_checkpoint(str(path))


def test_read_unreadable_fails_clearly(tmp_path, monkeypatch):
    path = tmp_path / "kubelet_internal_checkpoint"
    path.write_text(EMPTY)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(NodeProbeError) as info:
        read_checkpoint(str(path))
    assert "cannot be read (Permission denied)" in info.value.msg and str(path) in info.value.msg


def test_read_binary_garbage_fails_clearly(tmp_path):
    path = tmp_path / "kubelet_internal_checkpoint"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(NodeProbeError, match="not UTF-8"):
        read_checkpoint(str(path))


def test_read_fifo_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "kubelet_internal_checkpoint"
    os.mkfifo(str(path))
    with pytest.raises(NodeProbeError, match="not a regular file"):
        read_checkpoint(str(path))
