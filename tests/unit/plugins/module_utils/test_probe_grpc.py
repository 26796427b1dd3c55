# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The probe against in-process gRPC servers on unix sockets, built from the generated contracts:
a healthy plugin, hanging plugins (a raw socket that accepts and never answers; handlers that
outlive the deadline), a dead socket, a kubelet with and without GetAllocatableResources."""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from concurrent import futures

import pytest

grpc = pytest.importorskip("grpc")

from ansible_collections.gpunode.bringup.plugins.module_utils import _probe as probe  # noqa: E402
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import (  # noqa: E402
    InvalidOptionError,
    NodeProbeError,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._kubelet_api import (  # noqa: E402
    deviceplugin_v1beta1 as dp,
    podresources_v1 as pr,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._probe import (  # noqa: E402
    ProbeRequest,
    inspect_socket,
    probe_node,
    probe_plugin,
    probe_pod_resources,
)

G1 = "GPU-11111111-1111-4111-8111-111111111111"
G2 = "GPU-22222222-2222-4222-8222-222222222222"
G3 = "GPU-33333333-3333-4333-8333-333333333333"
DEADLINE = 1.0
# Time a hung peer may take beyond one deadline (channel setup, teardown, a loaded CI machine).
MARGIN = 0.75


# ------------------------------------------------------------------ stand-ins

class Plugin:
    """DevicePlugin servicer. ``mode``: ok, hang_options, hang_stream, end_stream."""

    def __init__(self, devices, mode="ok"):
        self.devices = devices  # [(id, health, numa)]
        self.mode = mode
        self.release = threading.Event()
        self.streams_open = 0
        self.streams_cancelled = 0

    def GetDevicePluginOptions(self, request, context):
        if self.mode == "hang_options":
            self.release.wait(30)
        return dp.DevicePluginOptions(get_preferred_allocation_available=True)

    def ListAndWatch(self, request, context):
        if self.mode == "hang_stream":
            self.release.wait(30)
            return
        if self.mode == "end_stream":
            return
        self.streams_open += 1
        context.add_callback(self._stream_closed)  # runs when the client cancels the stream
        response = dp.ListAndWatchResponse()
        for device_id, health, numa in self.devices:
            device = response.devices.add(ID=device_id, health=health)
            if numa is not None:
                device.topology.nodes.add(ID=numa)
        yield response
        while context.is_active() and not self.release.is_set():  # a real plugin keeps the stream open
            time.sleep(0.01)

    def _stream_closed(self):
        self.streams_cancelled += 1


class Registration:
    def __init__(self):
        self.calls = 0

    def Register(self, request, context):
        self.calls += 1
        return dp.Empty()


class OldPodResources:
    """pod-resources v1 of a kubelet before GetAllocatableResources (the server answers
    UNIMPLEMENTED for it). ``pods``: [(namespace, pod, container, resource, ids)]."""

    def __init__(self, allocatable, pods=()):
        self.allocatable = allocatable
        self.pods = pods

    def List(self, request, context):
        reply = pr.ListPodResourcesResponse()
        for namespace, pod, container, resource, ids in self.pods:
            item = reply.pod_resources.add(name=pod, namespace=namespace)
            item.containers.add(name=container).devices.add(resource_name=resource, device_ids=ids)
        reply.pod_resources.add(name="no-gpu", namespace="default").containers.add(name="app")
        return reply


class PodResources(OldPodResources):
    """pod-resources v1 with GetAllocatableResources. ``allocatable``: {resource: [ids]}."""

    def GetAllocatableResources(self, request, context):
        reply = pr.AllocatableResourcesResponse()
        for resource, ids in self.allocatable.items():
            for device_id in ids:  # the kubelet sends one entry per device (and NUMA node)
                entry = reply.devices.add(resource_name=resource, device_ids=[device_id])
                entry.topology.nodes.add(ID=0)
        return reply


def _serve(path, *services):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    for service, servicer in services:
        service.add_to_server(servicer, server)
    if os.path.exists(path):
        os.unlink(path)
    server.add_insecure_port("unix:" + path)
    server.start()
    return server


class FakeNode:
    """A node root with a kubelet and a plugin stand-in, under a short /tmp directory."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="dpp-", dir="/tmp" if os.path.isdir("/tmp") else None)
        self.paths = probe.node_paths(ProbeRequest(node_root=self.root))
        os.makedirs(self.paths.device_plugins_dir)
        os.makedirs(os.path.dirname(self.paths.pod_resources_socket))
        self.servers = {}
        self.plugins = []
        self.raw_sockets = []
        self.registration = Registration()

    # kubelet
    def start_kubelet(self, allocatable=None, pods=(), old=False):
        self.servers["kubelet"] = _serve(self.paths.kubelet_socket, (dp.REGISTRATION, self.registration))
        servicer = (OldPodResources if old else PodResources)(allocatable or {}, pods)
        self.servers["pod_resources"] = _serve(self.paths.pod_resources_socket, (pr.POD_RESOURCES_LISTER, servicer))

    def stop_kubelet(self):
        for name in ("kubelet", "pod_resources"):
            self.servers.pop(name).stop(None)
        for path in (self.paths.kubelet_socket, self.paths.pod_resources_socket):
            if os.path.exists(path):
                os.unlink(path)

    # plugin
    def start_plugin(self, devices, mode="ok"):
        plugin = Plugin(devices, mode)
        self.plugins.append(plugin)
        self.servers["plugin"] = _serve(self.paths.plugin_socket, (dp.DEVICE_PLUGIN, plugin))
        return plugin

    def hang_plugin(self):
        """Accepts connections (the kernel completes them) and never says a word."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.paths.plugin_socket)
        sock.listen(16)
        self.raw_sockets.append(sock)

    def leave_dead_plugin_socket(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.paths.plugin_socket)
        sock.close()  # the file stays, nobody listens

    def write_checkpoint(self, registered, entries=()):
        data = {"Data": {"PodDeviceEntries": list(entries) or None, "RegisteredDevices": registered},
                "Checksum": 12345}
        with open(self.paths.checkpoint, "w") as handle:
            json.dump(data, handle, separators=(",", ":"))

    def age(self, path, seconds):
        now = time.time()
        os.utime(path, (now - seconds, now - seconds))

    def request(self, **kwargs):
        kwargs.setdefault("deadline", DEADLINE)
        return ProbeRequest(node_root=self.root, **kwargs)

    def close(self):
        for plugin in self.plugins:
            plugin.release.set()
        for server in self.servers.values():
            server.stop(None)
        for sock in self.raw_sockets:
            sock.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def node():
    fake = FakeNode()
    yield fake
    fake.close()


def healthy_devices(*ids):
    return [(device_id, "Healthy", 0) for device_id in ids]


def codes(report):
    return [finding.code for finding in report.findings]


# ------------------------------------------------------------------ sockets

def test_inspect_socket_states(node):
    assert inspect_socket(node.paths.kubelet_socket, DEADLINE).state == "missing"
    node.start_kubelet()
    check = inspect_socket(node.paths.kubelet_socket, DEADLINE)
    assert check.state == "listening" and check.mtime is not None
    node.leave_dead_plugin_socket()
    assert inspect_socket(node.paths.plugin_socket, DEADLINE).state == "dead_socket"
    os.unlink(node.paths.plugin_socket)
    node.hang_plugin()
    assert inspect_socket(node.paths.plugin_socket, DEADLINE).state == "listening"  # accepts; the gRPC call tells
    regular = os.path.join(node.paths.device_plugins_dir, "file.sock")
    with open(regular, "w") as handle:
        handle.write("x")
    assert inspect_socket(regular, DEADLINE).state == "regular_file"
    fifo = os.path.join(node.paths.device_plugins_dir, "fifo.sock")
    os.mkfifo(fifo)
    assert inspect_socket(fifo, DEADLINE).state == "not_a_socket"
    link = os.path.join(node.paths.device_plugins_dir, "link.sock")
    os.symlink("/nonexistent/x.sock", link)
    check = inspect_socket(link, DEADLINE)
    assert check.state == "missing" and "dangling symlink" in check.error


def test_socket_path_that_is_a_directory_fails_naming_it(node):
    os.mkdir(node.paths.plugin_socket)
    with pytest.raises(NodeProbeError) as info:
        inspect_socket(node.paths.plugin_socket, DEADLINE)
    assert info.value.msg.startswith(node.paths.plugin_socket + " is a directory, not a socket")


# ------------------------------------------------------------------ plugin calls

def test_probe_plugin_healthy_and_stream_cancelled(node):
    plugin = node.start_plugin([(G1, "Healthy", 0), (G2, "Unhealthy", 1), (G3, "Healthy", None)])
    answer = probe_plugin(node.paths.plugin_socket, DEADLINE)
    assert answer.answered
    assert answer.options == {"pre_start_required": False, "get_preferred_allocation_available": True}
    assert [(d.id, d.health, d.numa_nodes) for d in answer.devices] == [
        (G1, "Healthy", (0,)), (G2, "Unhealthy", (1,)), (G3, "Healthy", ())]
    assert answer.seconds < DEADLINE
    waited = 0.0
    while not plugin.streams_cancelled and waited < 2.0:  # the server sees the cancellation shortly after
        time.sleep(0.01)
        waited += 0.01
    assert (plugin.streams_open, plugin.streams_cancelled) == (1, 1)


def test_probe_plugin_devices_are_sorted_by_id(node):
    # NVIDIA's plugin lists its devices in Go map order, another one on each ListAndWatch
    node.start_plugin([(G3, "Healthy", 0), (G1, "Healthy", 0), (G2, "Unhealthy", 0)])
    answer = probe_plugin(node.paths.plugin_socket, DEADLINE)
    assert [d.id for d in answer.devices] == [G1, G2, G3]


@pytest.mark.parametrize("hang", ["raw_socket", "hang_options"])
def test_probe_plugin_hung_reported_within_one_deadline(node, hang):
    if hang == "raw_socket":
        node.hang_plugin()
    else:
        node.start_plugin(healthy_devices(G1), mode=hang)
    started = time.monotonic()
    answer = probe_plugin(node.paths.plugin_socket, DEADLINE)
    elapsed = time.monotonic() - started
    assert not answer.answered
    assert (answer.failure.rpc, answer.failure.code) == ("GetDevicePluginOptions", "DEADLINE_EXCEEDED")
    assert DEADLINE * 0.9 <= elapsed < DEADLINE + MARGIN  # ListAndWatch was not tried


def test_probe_plugin_stream_never_answers(node):
    node.start_plugin(healthy_devices(G1), mode="hang_stream")
    answer = probe_plugin(node.paths.plugin_socket, DEADLINE)
    assert answer.options is not None
    assert (answer.failure.rpc, answer.failure.code) == ("ListAndWatch", "DEADLINE_EXCEEDED")
    assert answer.seconds < DEADLINE + MARGIN


def test_probe_plugin_stream_ends_without_response(node):
    node.start_plugin(healthy_devices(G1), mode="end_stream")
    answer = probe_plugin(node.paths.plugin_socket, DEADLINE)
    assert (answer.failure.rpc, answer.failure.code) == ("ListAndWatch", "STREAM_ENDED")


def test_probe_plugin_dead_socket_is_unavailable_fast(node):
    node.leave_dead_plugin_socket()
    answer = probe_plugin(node.paths.plugin_socket, DEADLINE)
    assert answer.failure.code == "UNAVAILABLE"
    assert answer.seconds < DEADLINE


# ------------------------------------------------------------------ pod-resources

def test_probe_pod_resources(node):
    node.start_kubelet(allocatable={"nvidia.com/gpu": [G1, G2], "example.com/nic": ["n0"]},
                       pods=[("ml", "train-0", "main", "nvidia.com/gpu", [G1]),
                             ("net", "router", "c", "example.com/nic", ["n0"])])
    answer = probe_pod_resources(node.paths.pod_resources_socket, DEADLINE)
    assert answer.allocatable == {"nvidia.com/gpu": (G1, G2), "example.com/nic": ("n0",)}
    assert [(u.namespace, u.name, u.container, u.device_ids) for u in answer.pods["nvidia.com/gpu"]] == [
        ("ml", "train-0", "main", (G1,))]


def test_probe_pod_resources_old_kubelet_unimplemented(node):
    node.start_kubelet(pods=[("ml", "train-0", "main", "nvidia.com/gpu", [G1])], old=True)
    answer = probe_pod_resources(node.paths.pod_resources_socket, DEADLINE)
    assert answer.allocatable is None and answer.allocatable_failure.code == "UNIMPLEMENTED"
    assert answer.pods["nvidia.com/gpu"][0].name == "train-0"


# ------------------------------------------------------------------ whole node (each lab case)

def test_healthy_node(node):
    node.start_kubelet(allocatable={"nvidia.com/gpu": [G1, G2]})
    node.start_plugin(healthy_devices(G1, G2))
    report = probe_node(node.request(expected_device_ids=(G1, G2)))
    assert codes(report) == []
    result = report.to_result()
    json.dumps(result)
    assert result["healthy"] and not result["changed"]
    assert result["kubelet_devices"]["source"] == "pod_resources"
    assert result["gpu_usage"] == {"source": "pod_resources", "in_use": False, "device_ids_in_use": [], "error": None}
    assert result["pods_with_devices"] == []
    assert result["checkpoint"] is None  # not needed, not read
    assert node.registration.calls == 0  # never registers anything


def test_plugin_missing(node):
    node.start_kubelet()
    assert codes(probe_node(node.request(expected_device_ids=(G1,)))) == ["plugin_socket_missing"]


def test_plugin_crashed_dead_socket(node):
    node.start_kubelet()
    node.leave_dead_plugin_socket()
    report = probe_node(node.request())
    assert codes(report) == ["plugin_socket_missing"]
    assert report.to_result()["sockets"]["plugin"]["state"] == "dead_socket"


@pytest.mark.parametrize("hang", ["raw_socket", "hang_options"])
def test_plugin_hung_reported_within_deadline_plus_margin(node, hang):
    node.start_kubelet(allocatable={"nvidia.com/gpu": [G1]})
    if hang == "raw_socket":
        node.hang_plugin()
    else:
        node.start_plugin(healthy_devices(G1), mode=hang)
    started = time.monotonic()
    report = probe_node(node.request(expected_device_ids=(G1,)))
    elapsed = time.monotonic() - started
    assert codes(report) == ["plugin_not_answering"]
    assert elapsed < DEADLINE + MARGIN, "hung plugin took %.2fs with a %.1fs deadline" % (elapsed, DEADLINE)


def test_stale_registration_after_kubelet_restart(node):
    node.start_plugin(healthy_devices(G1, G2))
    node.age(node.paths.plugin_socket, 60)
    node.write_checkpoint({"nvidia.com/gpu": [G1, G2]})
    node.start_kubelet(allocatable={})  # restarted: kubelet.sock new, no devices until the plugin registers
    report = probe_node(node.request(expected_device_ids=(G1, G2)))
    assert codes(report) == ["registration_stale"]
    result = report.to_result()
    assert result["registration"]["stale"] is True
    assert result["registration"]["kubelet_socket_mtime"] > result["registration"]["plugin_socket_mtime"]


def test_kubelet_down(node):
    node.start_plugin(healthy_devices(G1))
    node.write_checkpoint({"nvidia.com/gpu": [G1]}, [
        {"PodUID": "u-1", "ContainerName": "main", "ResourceName": "nvidia.com/gpu", "DeviceIDs": {"0": [G1]},
         "AllocResp": ""}])
    report = probe_node(node.request(expected_device_ids=(G1,)))
    assert codes(report) == ["kubelet_socket_missing"]
    result = report.to_result()
    assert result["sockets"]["pod_resources"]["state"] == "missing"
    # who holds GPUs comes from the checkpoint then, by pod UID
    assert result["gpu_usage"]["source"] == "checkpoint" and result["gpu_usage"]["in_use"] is True
    assert result["pods_with_devices"] == [
        {"namespace": None, "name": None, "pod_uid": "u-1", "container": "main", "device_ids": [G1]}]


def test_kubelet_down_and_no_checkpoint_means_busy_unknown(node):
    node.start_plugin(healthy_devices(G1))
    result = probe_node(node.request()).to_result()
    assert result["gpu_usage"]["source"] == "none" and result["gpu_usage"]["in_use"] is None


def test_plugin_socket_left_as_regular_file(node):
    node.start_kubelet()
    with open(node.paths.plugin_socket, "w") as handle:
        handle.write("")
    assert codes(probe_node(node.request())) == ["plugin_socket_not_socket"]


def test_unhealthy_device_after_critical_xid(node):
    node.start_kubelet(allocatable={"nvidia.com/gpu": [G1]})  # the kubelet drops unhealthy devices
    node.start_plugin([(G1, "Healthy", 0), (G2, "Unhealthy", 0)])
    report = probe_node(node.request(expected_device_ids=(G1, G2)))
    assert codes(report) == ["plugin_devices_unhealthy"]
    assert report.findings[0].evidence["unhealthy"] == [G2]


@pytest.mark.parametrize(
    "advertised, expected_code",
    [([G1], "plugin_devices_missing"), ([G1, G2, G3], "plugin_devices_extra"), ([], "plugin_devices_missing")],
)
def test_device_count_mismatch(node, advertised, expected_code):
    node.start_kubelet(allocatable={"nvidia.com/gpu": advertised})
    node.start_plugin(healthy_devices(*advertised))
    assert codes(probe_node(node.request(expected_device_ids=(G1, G2)))) == [expected_code]


def test_time_slicing_replicas(node):
    replicas = ["%s::%d" % (gpu, n) for gpu in (G1, G2) for n in range(4)]
    node.start_kubelet(allocatable={"nvidia.com/gpu": replicas},
                       pods=[("ml", "a", "c", "nvidia.com/gpu", [G1 + "::0"]),
                             ("ml", "b", "c", "nvidia.com/gpu", [G1 + "::1"])])
    node.start_plugin(healthy_devices(*replicas))
    report = probe_node(node.request(expected_device_ids=(G1, G2)))
    assert codes(report) == []
    result = report.to_result()
    assert result["device_comparison"]["replicas"] == {G1: 4, G2: 4}
    assert result["gpu_usage"]["in_use"] is True
    assert result["gpu_usage"]["device_ids_in_use"] == [G1 + "::0", G1 + "::1"]
    assert [(p["namespace"], p["name"], p["container"]) for p in result["pods_with_devices"]] == [
        ("ml", "a", "c"), ("ml", "b", "c")]


def test_time_slicing_replicas_of_a_missing_gpu(node):
    replicas = ["%s::%d" % (G1, n) for n in range(4)]
    node.start_kubelet(allocatable={"nvidia.com/gpu": replicas})
    node.start_plugin(healthy_devices(*replicas))
    report = probe_node(node.request(expected_device_ids=(G1, G2)))
    assert codes(report) == ["plugin_devices_missing"]
    assert report.findings[0].evidence["missing"] == [G2]


def test_not_registered(node):
    node.start_kubelet(allocatable={})
    node.start_plugin(healthy_devices(G1))
    assert codes(probe_node(node.request(expected_device_ids=(G1,)))) == ["not_registered"]


def test_kubelet_devices_mismatch(node):
    node.start_kubelet(allocatable={"nvidia.com/gpu": [G1, G3]})
    node.start_plugin(healthy_devices(G1, G2))
    report = probe_node(node.request(expected_device_ids=(G1, G2)))
    assert codes(report) == ["kubelet_devices_mismatch"]
    assert report.findings[0].evidence["only_in_kubelet"] == [G3]


@pytest.mark.parametrize(
    "registered, expected_codes",
    [({"nvidia.com/gpu": [G1, G2]}, []), ({}, ["not_registered"]), ({"nvidia.com/gpu": [G1]},
                                                                    ["kubelet_devices_mismatch"])],
)
def test_old_kubelet_falls_back_to_checkpoint(node, registered, expected_codes):
    node.start_kubelet(old=True)
    node.start_plugin(healthy_devices(G1, G2))
    node.write_checkpoint(registered)
    report = probe_node(node.request(expected_device_ids=(G1, G2)))
    assert codes(report) == expected_codes
    view = report.to_result()["kubelet_devices"]
    assert view["source"] == "checkpoint"
    assert "GetAllocatableResources" in view["fallback_reason"] and view["error"]["code"] == "UNIMPLEMENTED"
    assert report.to_result()["checkpoint"]["registered_devices"] == registered


def test_old_kubelet_without_checkpoint(node):
    node.start_kubelet(old=True)
    node.start_plugin(healthy_devices(G1))
    report = probe_node(node.request())
    assert codes(report) == ["not_registered"]
    assert report.to_result()["kubelet_devices"]["source"] == "none"


def test_plugin_dir_missing(node):
    shutil.rmtree(node.paths.device_plugins_dir)
    report = probe_node(node.request())
    assert codes(report) == ["plugin_dir_missing"]
    json.dumps(report.to_result())


def test_other_resource_and_socket_name(node):
    node.paths = probe.node_paths(ProbeRequest(node_root=node.root, plugin_socket_name="nvidia-gpu.shared.sock"))
    node.start_kubelet(allocatable={"nvidia.com/gpu.shared": [G1 + "::0"]})
    node.start_plugin(healthy_devices(G1 + "::0"))
    report = probe_node(node.request(resource_name="nvidia.com/gpu.shared",
                                     plugin_socket_name="nvidia-gpu.shared.sock", expected_device_ids=(G1,)))
    assert codes(report) == []


# ------------------------------------------------------------------ bad input

def test_socket_path_too_long_is_named():
    root = "/tmp/" + "d" * 80
    with pytest.raises(InvalidOptionError) as info:
        probe_node(ProbeRequest(node_root=root))
    assert "unix socket paths are limited to 107 bytes" in info.value.msg
    assert root in info.value.msg


def test_plugin_socket_directory_fails(node):
    node.start_kubelet()
    os.mkdir(node.paths.plugin_socket)
    with pytest.raises(NodeProbeError, match="is a directory, not a socket"):
        probe_node(node.request())


def test_kubelet_root_is_a_file_fails(node):
    shutil.rmtree(node.paths.device_plugins_dir)
    with open(node.paths.device_plugins_dir, "w") as handle:
        handle.write("")
    with pytest.raises(NodeProbeError, match="is not a directory"):
        probe_node(node.request())


def test_unreadable_checkpoint_fails_when_needed(node):
    node.start_kubelet(old=True)
    node.start_plugin(healthy_devices(G1))
    with open(node.paths.checkpoint, "w") as handle:
        handle.write("{truncated")
    with pytest.raises(NodeProbeError, match="kubelet checkpoint .* not valid JSON"):
        probe_node(node.request())


def test_negative_deadline_fails(node):
    with pytest.raises(InvalidOptionError, match="deadline must be more than 0"):
        probe_node(node.request(deadline=-1))
