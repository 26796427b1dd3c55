"""The kubelet gRPC contracts: plugin_src vs upstream, stubs vs plugin_src, stubs at work."""
from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from typing import Dict, List, Tuple

import grpc
import pytest
from google.protobuf import descriptor_pb2

from ansible_collections.gpunode.bringup.plugins.module_utils._kubelet_api import (
    deviceplugin_v1beta1 as dp,
    podresources_v1 as pr,
)

import upstream_fields as up

ROOT = Path(__file__).resolve().parents[2]
F = descriptor_pb2.FieldDescriptorProto
LABELS = {F.LABEL_OPTIONAL: "optional", F.LABEL_REPEATED: "repeated", F.LABEL_REQUIRED: "required"}
SCALARS = {v: k[len("TYPE_"):].lower() for k, v in F.Type.items()}

CONTRACTS = [
    ("deviceplugin/v1beta1/api.proto", dp, up.DEVICEPLUGIN_V1BETA1, up.DEVICEPLUGIN_V1BETA1_EMPTY,
     up.DEVICEPLUGIN_V1BETA1_SERVICES),
    ("podresources/v1/api.proto", pr, up.PODRESOURCES_V1, up.PODRESOURCES_V1_EMPTY, up.PODRESOURCES_V1_SERVICES),
]


def field_table(fdp: descriptor_pb2.FileDescriptorProto) -> Tuple[List[str], List[str]]:
    rows, empty = [], []
    for msg in fdp.message_type:
        if not msg.field:
            empty.append(msg.name)
        for f in msg.field:
            kind = f.type_name.rsplit(".", 1)[-1] if f.type_name else SCALARS[f.type]
            rows.append("%s.%s %d %s %s" % (msg.name, f.name, f.number, LABELS[f.label], kind))
    return rows, empty


def service_table(fdp: descriptor_pb2.FileDescriptorProto) -> Dict[str, Dict[str, tuple]]:
    return {
        s.name: {m.name: (m.input_type.rsplit(".", 1)[-1], m.output_type.rsplit(".", 1)[-1], m.server_streaming)
                 for m in s.method}
        for s in fdp.service
    }


def compile_proto(proto: str, tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    assert protoc.main(["protoc", "-I%s" % (ROOT / "plugin_src"), "--descriptor_set_out=%s" % out,
                        str(ROOT / "plugin_src" / proto)]) == 0
    (fdp,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return fdp


@pytest.mark.parametrize("proto,module,table,empty,services", CONTRACTS, ids=["deviceplugin", "podresources"])
def test_plugin_src_matches_upstream_field_table(tmp_path, proto, module, table, empty, services):
    fdp = compile_proto(proto, tmp_path)
    rows, empty_msgs = field_table(fdp)
    assert sorted(rows) == sorted(table.split("\n")[1:-1])
    assert sorted(empty_msgs) == sorted(empty)
    assert service_table(fdp) == services


@pytest.mark.parametrize("proto,module,table,empty,services", CONTRACTS, ids=["deviceplugin", "podresources"])
def test_embedded_descriptor_matches_upstream_field_table(proto, module, table, empty, services):
    fdp = descriptor_pb2.FileDescriptorProto.FromString(module.SERIALIZED_FILE_DESCRIPTOR)
    assert fdp.name == proto == module.PROTO_PATH
    rows, empty_msgs = field_table(fdp)
    assert sorted(rows) == sorted(table.split("\n")[1:-1])
    assert service_table(fdp) == services


def test_field_table_check_catches_a_renumbered_field(tmp_path):
    src = tmp_path / "plugin_src"
    shutil.copytree(ROOT / "plugin_src", src)
    proto = src / "deviceplugin" / "v1beta1" / "api.proto"
    proto.write_text(proto.read_text().replace("string resource_name = 3;", "string resource_name = 5;"))
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    assert protoc.main(["protoc", "-I%s" % src, "--descriptor_set_out=%s" % out, str(proto)]) == 0
    (fdp,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    rows = field_table(fdp)[0]
    assert sorted(rows) != sorted(up.DEVICEPLUGIN_V1BETA1.split("\n")[1:-1])
    assert "RegisterRequest.resource_name 5 optional string" in rows


def test_regeneration_check_fails_on_a_hand_edited_stub(tmp_path):
    tree = tmp_path / "repo"
    shutil.copytree(ROOT / "plugin_src", tree / "plugin_src")
    shutil.copytree(ROOT / "plugins" / "module_utils" / "_kubelet_api", tree / "plugins" / "module_utils" / "_kubelet_api")
    generate = [sys.executable, str(tree / "plugin_src" / "generate"), "--check"]
    assert subprocess.run(generate, capture_output=True, check=False).returncode == 0
    stub = tree / "plugins" / "module_utils" / "_kubelet_api" / "podresources_v1.py"
    stub.write_text(stub.read_text().replace('GetPodResourcesRequest = _MESSAGES.get("GetPodResourcesRequest")',
                                             'GetPodResourcesRequest = None'))
    proc = subprocess.run(generate, capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "STALE: plugins/module_utils/_kubelet_api/podresources_v1.py" in proc.stderr


def test_both_contracts_load_in_one_process_and_round_trip():
    assert dp.PACKAGE == "v1beta1" and pr.PACKAGE == "v1"
    assert dp.NUMANode is not pr.NUMANode  # same message name in both files, distinct types
    device = dp.Device(ID="GPU-1", health="Healthy", topology=dp.TopologyInfo(nodes=[dp.NUMANode(ID=1)]))
    resp = dp.ListAndWatchResponse.FromString(dp.ListAndWatchResponse(devices=[device]).SerializeToString())
    assert resp.devices[0].ID == "GPU-1" and resp.devices[0].topology.nodes[0].ID == 1
    alloc = dp.ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": "GPU-1"})
    assert dp.ContainerAllocateResponse.FromString(alloc.SerializeToString()).envs["NVIDIA_VISIBLE_DEVICES"] == "GPU-1"
    pods = pr.ListPodResourcesResponse(pod_resources=[pr.PodResources(name="p", namespace="n", containers=[
        pr.ContainerResources(name="c", devices=[pr.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=["GPU-1"])])])])
    again = pr.ListPodResourcesResponse.FromString(pods.SerializeToString())
    assert again.pod_resources[0].containers[0].devices[0].device_ids == ["GPU-1"]


class _Kubelet:
    def __init__(self):
        self.registered = []

    def Register(self, request, context):
        self.registered.append((request.version, request.endpoint, request.resource_name))
        return dp.Empty()


class _PodResources:
    def GetAllocatableResources(self, request, context):
        return pr.AllocatableResourcesResponse(devices=[pr.ContainerDevices(resource_name="nvidia.com/gpu",
                                                                            device_ids=["GPU-a", "GPU-b"])])


def test_services_serve_and_call_over_a_unix_socket(tmp_path):
    kubelet = _Kubelet()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    dp.REGISTRATION.add_to_server(kubelet, server)
    pr.POD_RESOURCES_LISTER.add_to_server(_PodResources(), server)
    socket = tmp_path / "kubelet.sock"
    server.add_insecure_port("unix://%s" % socket)
    server.start()
    try:
        with grpc.insecure_channel("unix://%s" % socket) as channel:
            dp.REGISTRATION.stub(channel).Register(
                dp.RegisterRequest(version="v1beta1", endpoint="nvidia-gpu.sock", resource_name="nvidia.com/gpu"),
                timeout=5)
            lister = pr.POD_RESOURCES_LISTER.stub(channel)
            alloc = lister.GetAllocatableResources(pr.AllocatableResourcesRequest(), timeout=5)
            with pytest.raises(grpc.RpcError) as err:
                lister.List(pr.ListPodResourcesRequest(), timeout=5)
        assert kubelet.registered == [("v1beta1", "nvidia-gpu.sock", "nvidia.com/gpu")]
        assert list(alloc.devices[0].device_ids) == ["GPU-a", "GPU-b"]
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert dp.DEVICE_PLUGIN.path("ListAndWatch") == "/v1beta1.DevicePlugin/ListAndWatch"
    finally:
        server.stop(None)
