"""The lab's node runtime (lab/node/): kubelet and device plugin stand-ins, over their real
gRPC sockets, with a fake ClusterHooks in place of the API server."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT / ".build", ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

LIBRARY = ROOT / ".build" / "lab" / "lib" / "libnvidia-ml.so.1"
if not LIBRARY.exists():
    pytest.skip("lab NVML library not built (make lab-nvml)", allow_module_level=True)

import grpc  # noqa: E402

from ansible_collections.gpunode.bringup.plugins.module_utils._kubelet_api import (  # noqa: E402
    deviceplugin_v1beta1 as dp,
    podresources_v1 as pr,
)
from lab import nvml_state  # noqa: E402
from lab.contracts import NodeSpec, PluginPodStatus  # noqa: E402
from lab.node import NodeFleet, SocketPathTooLong  # noqa: E402
from lab.node.kubelet import is_extended_resource_name, verify_checkpoint  # noqa: E402
from lab.node.layout import NodeLayout, containerd_has_nvidia, create_node_tree  # noqa: E402

GRACE_S = 1.5
KLOG = re.compile(r"^[IWEF]\d{4} \d{2}:\d{2}:\d{2}\.\d{6} +1 [a-z_]+\.go:\d+\] ")
HEALTHY_SEQUENCE = [
    "Starting FS watcher for /var/lib/kubelet/device-plugins",
    "Starting OS watcher.",
    "Starting Plugins.",
    "Loading configuration.",
    "Retrieving plugins.",
    "Starting GRPC server for 'nvidia.com/gpu'",
    "Starting to serve 'nvidia.com/gpu' on /var/lib/kubelet/device-plugins/nvidia-gpu.sock",
    "Registered device plugin for 'nvidia.com/gpu' with Kubelet",
]


class FakeHooks:
    """ClusterHooks that records what the runtime reports."""

    def __init__(self) -> None:
        self.node_status: Dict[str, Tuple[Dict[str, str], Dict[str, str], Optional[bool]]] = {}
        self.pod_status: Dict[Tuple[str, str], PluginPodStatus] = {}
        self.pod_history: Dict[Tuple[str, str], List[PluginPodStatus]] = {}
        self.objects: Dict[Tuple[str, Optional[str], str], Dict[str, Any]] = {}

    def update_pod_status(self, namespace: str, name: str, status: PluginPodStatus) -> None:
        self.pod_status[(namespace, name)] = status
        self.pod_history.setdefault((namespace, name), []).append(status)

    def update_node_status(self, node: str, capacity: Dict[str, str], allocatable: Dict[str, str],
                           ready: Optional[bool] = None) -> None:
        self.node_status[node] = (dict(capacity), dict(allocatable), ready)

    def get_object(self, api_version: str, kind: str, namespace: Optional[str], name: str) -> Optional[Dict[str, Any]]:
        return self.objects.get((kind, namespace, name))


def wait_for(predicate: Callable[[], Any], timeout: float = 8.0, what: str = "condition") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting for %s" % what)


@pytest.fixture(scope="module")
def hooks() -> FakeHooks:
    return FakeHooks()


@pytest.fixture(scope="module")
def fleet(hooks: FakeHooks) -> Iterator[NodeFleet]:
    state_dir = tempfile.mkdtemp(prefix="gln", dir="/tmp")
    fleet = NodeFleet(state_dir, hooks, crash_backoff=(0.05, 0.2), endpoint_grace_s=GRACE_S,
                      plugin_retry_s=0.5, watch_interval_s=0.05).start()
    yield fleet
    fleet.stop()
    shutil.rmtree(state_dir, ignore_errors=True)


_counter = iter(range(1, 10_000))


def new_node(fleet: NodeFleet, gpus: int = 8) -> str:
    name = "n%d" % next(_counter)
    fleet.add_node(NodeSpec(name=name, root="", gpu_count=gpus))
    return name


def plugin_pod(name: str, **spec: Any) -> Dict[str, Any]:
    container = {"name": "nvidia-device-plugin-ctr", "image": "nvcr.io/nvidia/k8s-device-plugin:v0.17.1"}
    container.update(spec.pop("container", {}))
    return {
        "metadata": {"name": name, "namespace": "kube-system", "uid": "uid-" + name},
        "spec": dict({"containers": [container]}, **spec),
    }


def gpu_status(hooks: FakeHooks, node: str) -> Tuple[Optional[str], Optional[str]]:
    capacity, allocatable, _ready = hooks.node_status.get(node, ({}, {}, None))
    return capacity.get("nvidia.com/gpu"), allocatable.get("nvidia.com/gpu")


def start_registered(fleet: NodeFleet, hooks: FakeHooks, node: str, pod: str = "") -> str:
    pod = pod or "nvdp-" + node
    fleet.start_plugin_pod(node, plugin_pod(pod))
    wait_for(lambda: gpu_status(hooks, node) == ("8", "8"), what="%s to advertise 8 GPUs" % node)
    return pod


def uuids(fleet: NodeFleet, node: str) -> List[str]:
    return [gpu["uuid"] for gpu in nvml_state.read_state(fleet.layout(node).nvml_state)["gpus"]]


def log_messages(fleet: NodeFleet, node: str, pod: str) -> List[str]:
    return [KLOG.sub("", line) for line in fleet.pod_log(node, pod).splitlines() if KLOG.match(line)]


def stub(path: str, service: Any) -> Any:
    return service.stub(grpc.insecure_channel("unix:" + path))


def read_checkpoint(fleet: NodeFleet, node: str) -> Dict[str, Any]:
    with open(fleet.layout(node).checkpoint, encoding="utf-8") as handle:
        return json.load(handle)


def crash_looping(hooks: FakeHooks, pod: str, restarts: int = 2) -> bool:
    status = hooks.pod_status.get(("kube-system", pod))
    return bool(status and status.restart_count >= restarts)


def in_order(messages: List[str], expected: List[str]) -> bool:
    position = 0
    for message in messages:
        if position < len(expected) and message == expected[position]:
            position += 1
    return position == len(expected)


# ---- node layout ------------------------------------------------------------------------------

def test_node_tree_containerd_config_and_proc_version(fleet: NodeFleet) -> None:
    node = new_node(fleet)
    layout = fleet.layout(node)
    with open(layout.containerd_config, "rb") as handle:
        config = tomllib.load(handle)
    containerd = config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert config["version"] == 2
    assert containerd["default_runtime_name"] == "nvidia"
    # the config names the binary as the node sees it; the file lives under the node root
    binary = containerd["runtimes"]["nvidia"]["options"]["BinaryName"]
    assert binary == "/usr/bin/nvidia-container-runtime"
    assert layout.nvidia_runtime_binary == os.path.join(layout.root, binary.lstrip("/"))
    assert os.access(layout.nvidia_runtime_binary, os.X_OK)
    assert containerd_has_nvidia(layout) == (True, True)
    with open(layout.proc_driver_version, encoding="utf-8") as handle:
        assert re.match(r"NVRM version: NVIDIA UNIX x86_64 Kernel Module  550\.54\.15  ", handle.read())
    assert stat.S_ISSOCK(os.lstat(layout.kubelet_socket).st_mode)
    assert stat.S_ISSOCK(os.lstat(layout.pod_resources_socket).st_mode)


def test_socket_path_limit_fails_clearly(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 60)
    with pytest.raises(SocketPathTooLong, match="107"):
        create_node_tree(NodeLayout("gpu-node-01", str(deep / "nodes" / "gpu-node-01")), "550.54.15")


def test_extended_resource_names() -> None:
    assert is_extended_resource_name("nvidia.com/gpu")
    assert is_extended_resource_name("nvidia.com/gpu.shared")
    for bad in ("gpu", "kubernetes.io/gpu", "requests.nvidia.com/gpu", "Nvidia.com/gpu", "nvidia.com/-gpu"):
        assert not is_extended_resource_name(bad), bad


# ---- registration, checkpoint, pod-resources, node status ------------------------------------

def test_registration_checkpoint_and_node_status(fleet: NodeFleet, hooks: FakeHooks) -> None:
    node = new_node(fleet)
    pod = start_registered(fleet, hooks, node)
    layout = fleet.layout(node)
    assert stat.S_ISSOCK(os.lstat(layout.plugin_socket()).st_mode)
    assert hooks.node_status[node][2] is True

    document = read_checkpoint(fleet, node)
    assert set(document) == {"Data", "Checksum"}
    assert isinstance(document["Checksum"], int) and verify_checkpoint(document)
    assert document["Data"]["RegisteredDevices"] == {"nvidia.com/gpu": uuids(fleet, node)}
    assert document["Data"]["PodDeviceEntries"] is None

    status = hooks.pod_status[("kube-system", pod)]
    assert status.running and status.ready and status.restart_count == 0 and status.started_at

    lines = fleet.pod_log(node, pod).splitlines()
    assert lines[0].endswith('"Starting NVIDIA Device Plugin" version=<')
    assert in_order(log_messages(fleet, node, pod), HEALTHY_SEQUENCE)
    assert layout.root not in fleet.pod_log(node, pod)  # paths as the container sees them
    assert fleet.pod_log(node, pod, tail_lines=1).count("\n") == 1


def test_pod_resources_list_allocatable_and_get(fleet: NodeFleet, hooks: FakeHooks) -> None:
    node = new_node(fleet)
    pod = start_registered(fleet, hooks, node)
    lister = stub(fleet.layout(node).pod_resources_socket, pr.POD_RESOURCES_LISTER)

    allocatable = lister.GetAllocatableResources(pr.AllocatableResourcesRequest(), timeout=5)
    assert [d.device_ids[0] for d in allocatable.devices] == uuids(fleet, node)
    assert {d.resource_name for d in allocatable.devices} == {"nvidia.com/gpu"}
    assert [d.topology.nodes[0].ID for d in allocatable.devices] == [0, 0, 0, 0, 1, 1, 1, 1]

    listed = lister.List(pr.ListPodResourcesRequest(), timeout=5)
    assert [(p.name, [len(c.devices) for c in p.containers]) for p in listed.pod_resources] == [(pod, [0])]

    result = fleet.break_fault(node, "gpu_in_use", pod="train-0", count="2")
    assert result["workload"]["devices"] == uuids(fleet, node)[:2]
    listed = lister.List(pr.ListPodResourcesRequest(), timeout=5)
    workload = [p for p in listed.pod_resources if p.name == "train-0"][0]
    assert workload.namespace == "default"
    assert [d.device_ids[0] for d in workload.containers[0].devices] == uuids(fleet, node)[:2]
    got = lister.Get(pr.GetPodResourcesRequest(pod_name="train-0", pod_namespace="default"), timeout=5)
    assert got.pod_resources.name == "train-0"
    with pytest.raises(grpc.RpcError) as missing:
        lister.Get(pr.GetPodResourcesRequest(pod_name="nope", pod_namespace="default"), timeout=5)
    assert "pod nope in namespace default not found" in missing.value.details()

    entries = read_checkpoint(fleet, node)["Data"]["PodDeviceEntries"]
    assert [(e["ContainerName"], e["ResourceName"], e["DeviceIDs"]) for e in entries] == [
        ("main", "nvidia.com/gpu", {"0": uuids(fleet, node)[:2]})
    ]
    fleet.fix_fault(node, "gpu_in_use")
    assert len(lister.List(pr.ListPodResourcesRequest(), timeout=5).pod_resources) == 1


def test_device_plugin_rpcs(fleet: NodeFleet, hooks: FakeHooks) -> None:
    node = new_node(fleet)
    start_registered(fleet, hooks, node)
    plugin = stub(fleet.layout(node).plugin_socket(), dp.DEVICE_PLUGIN)
    assert plugin.GetDevicePluginOptions(dp.Empty(), timeout=5).get_preferred_allocation_available
    first = next(plugin.ListAndWatch(dp.Empty(), timeout=5))
    assert [d.ID for d in first.devices] == uuids(fleet, node)
    assert {d.health for d in first.devices} == {"Healthy"}
    assert [d.topology.nodes[0].ID for d in first.devices] == [0, 0, 0, 0, 1, 1, 1, 1]

    ids = uuids(fleet, node)
    request = dp.AllocateRequest(container_requests=[dp.ContainerAllocateRequest(devices_ids=ids[:2])])
    response = plugin.Allocate(request, timeout=5)
    assert response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(ids[:2])
    with pytest.raises(grpc.RpcError) as unknown:
        plugin.Allocate(dp.AllocateRequest(container_requests=[dp.ContainerAllocateRequest(devices_ids=["GPU-x"])]), timeout=5)
    assert "unknown device: GPU-x" in unknown.value.details()
    preferred = plugin.GetPreferredAllocation(dp.PreferredAllocationRequest(container_requests=[
        dp.ContainerPreferredAllocationRequest(available_deviceIDs=ids, must_include_deviceIDs=[ids[5]], allocation_size=2)
    ]), timeout=5)
    assert list(preferred.container_responses[0].deviceIDs)[0] == ids[5]
    assert len(preferred.container_responses[0].deviceIDs) == 2


def test_register_validation_like_the_kubelet(fleet: NodeFleet) -> None:
    node = new_node(fleet)
    registration = stub(fleet.layout(node).kubelet_socket, dp.REGISTRATION)

    def register(**fields: Any) -> str:
        request = dict(version="v1beta1", endpoint="nvidia-gpu.sock", resource_name="nvidia.com/gpu")
        request.update(fields)
        with pytest.raises(grpc.RpcError) as failed:
            registration.Register(dp.RegisterRequest(**request), timeout=5)
        assert failed.value.code() == grpc.StatusCode.UNKNOWN
        return failed.value.details()

    assert register(version="v1alpha") == (
        'requested API version "v1alpha" is not supported by kubelet. Supported version is ["v1beta1"]'
    )
    assert register(resource_name="gpu") == 'the ResourceName "gpu" is invalid'
    assert register(resource_name="kubernetes.io/gpu") == 'the ResourceName "kubernetes.io/gpu" is invalid'
    assert register() == "failed to dial device plugin: context deadline exceeded"


# ---- health -------------------------------------------------------------------------------------

def test_critical_xid_marks_the_device_unhealthy(fleet: NodeFleet, hooks: FakeHooks) -> None:
    node = new_node(fleet)
    pod = start_registered(fleet, hooks, node)
    plugin = stub(fleet.layout(node).plugin_socket(), dp.DEVICE_PLUGIN)
    stream = plugin.ListAndWatch(dp.Empty(), timeout=10)
    assert {d.health for d in next(stream).devices} == {"Healthy"}

    nvml_state.apply_fault(fleet.layout(node).nvml_state, "critical_xid", gpu=1, xid=43)  # ignored XID
    fleet.break_fault(node, "critical_xid", gpu="3")
    update = next(stream)
    lost = uuids(fleet, node)[3]
    assert [d.ID for d in update.devices if d.health == "Unhealthy"] == [lost]
    wait_for(lambda: gpu_status(hooks, node) == ("8", "7"), what="allocatable 7")
    assert lost not in read_checkpoint(fleet, node)["Data"]["RegisteredDevices"]["nvidia.com/gpu"]
    lister = stub(fleet.layout(node).pod_resources_socket, pr.POD_RESOURCES_LISTER)
    assert len(lister.GetAllocatableResources(pr.AllocatableResourcesRequest(), timeout=5).devices) == 7
    messages = log_messages(fleet, node, pod)
    assert "XidCriticalError: Xid=79 on Device=%s, the device will go unhealthy." % lost in messages
    assert not any("Xid=43" in m for m in messages)
    stream.cancel()


# ---- kubelet restart and stop ----------------------------------------------------------------------

def test_kubelet_restart_plugin_reregisters(fleet: NodeFleet, hooks: FakeHooks) -> None:
    node = new_node(fleet)
    pod = start_registered(fleet, hooks, node)
    layout = fleet.layout(node)
    before = os.lstat(layout.kubelet_socket)
    time.sleep(0.01)
    fleet.restart_kubelet(node)
    after = os.lstat(layout.kubelet_socket)
    assert (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)
    assert after.st_mtime_ns > before.st_mtime_ns
    wait_for(lambda: "inotify: /var/lib/kubelet/device-plugins/kubelet.sock created, restarting." in log_messages(fleet, node, pod),
             what="the inotify line")
    wait_for(lambda: gpu_status(hooks, node) == ("8", "8") and fleet.status()[node]["kubelet"]["resources"]["nvidia.com/gpu"]["registered"],
             what="re-registration")
    assert os.lstat(layout.plugin_socket()).st_mtime_ns >= after.st_mtime_ns
    assert log_messages(fleet, node, pod).count("Registered device plugin for 'nvidia.com/gpu' with Kubelet") == 2


def test_stale_plugin_after_kubelet_restart(fleet: NodeFleet, hooks: FakeHooks) -> None:
    node = new_node(fleet)
    pod = start_registered(fleet, hooks, node)
    layout = fleet.layout(node)
    fleet.break_fault(node, "plugin_stale")
    fleet.restart_kubelet(node)
    time.sleep(0.5)
    # the kubelet removed the plugin's socket; the stale plugin never noticed
    assert not os.path.lexists(layout.plugin_socket())
    assert gpu_status(hooks, node) == ("0", "0")
    assert not any(m.startswith("inotify:") for m in log_messages(fleet, node, pod))
    assert hooks.pod_status[("kube-system", pod)].running
    lister = stub(layout.pod_resources_socket, pr.POD_RESOURCES_LISTER)
    assert not lister.GetAllocatableResources(pr.AllocatableResourcesRequest(), timeout=5).devices
    wait_for(lambda: gpu_status(hooks, node) == (None, None), timeout=GRACE_S + 3, what="the grace period to drop the resource")

    # deleting the pod clears the (non-sticky) fault: the next pod registers
    fleet.stop_plugin_pod(node, pod)
    start_registered(fleet, hooks, node, pod="nvdp-%s-2" % node)
    assert fleet.status()[node]["faults"] == {}


def test_stale_plugin_keeping_its_old_socket(fleet: NodeFleet, hooks: FakeHooks) -> None:
    node = new_node(fleet)
    start_registered(fleet, hooks, node)
    layout = fleet.layout(node)
    fleet.break_fault(node, "plugin_stale", socket="kept")
    fleet.restart_kubelet(node)
    time.sleep(0.3)
    plugin_socket, kubelet_socket = os.lstat(layout.plugin_socket()), os.lstat(layout.kubelet_socket)
    assert stat.S_ISSOCK(plugin_socket.st_mode) and plugin_socket.st_mtime_ns < kubelet_socket.st_mtime_ns
    plugin = stub(layout.plugin_socket(), dp.DEVICE_PLUGIN)
    assert plugin.GetDevicePluginOptions(dp.Empty(), timeout=2).get_preferred_allocation_available
    assert gpu_status(hooks, node) == ("0", "0")
    fleet.fix_fault(node, "plugin_stale")
    wait_for(lambda: gpu_status(hooks, node) == ("8", "8"), what="re-registration after fix")


def test_kubelet_down_and_up(fleet: NodeFleet, hooks: FakeHooks) -> None:
    node = new_node(fleet)
    pod = start_registered(fleet, hooks, node)
    layout = fleet.layout(node)
    fleet.break_fault(node, "kubelet_down")
    assert not os.path.exists(layout.kubelet_socket) and not os.path.exists(layout.pod_resources_socket)
    wait_for(lambda: hooks.node_status[node][2] is False, what="NotReady")
    assert gpu_status(hooks, node) == ("8", "8")  # capacity kept
    fleet.fix_fault(node, "kubelet_down")
    wait_for(lambda: hooks.node_status[node][2] is True and gpu_status(hooks, node) == ("8", "8"), what="Ready with GPUs")
    assert "inotify: /var/lib/kubelet/device-plugins/kubelet.sock created, restarting." in log_messages(fleet, node, pod)


def test_kubelet_restart_after_registration_is_one_shot(fleet: NodeFleet, hooks: FakeHooks) -> None:
    node = new_node(fleet)
    fleet.break_fault(node, "plugin_stale")
    fleet.break_fault(node, "kubelet_restart", after="register")
    fleet.start_plugin_pod(node, plugin_pod("nvdp-" + node))
    wait_for(lambda: gpu_status(hooks, node) == ("0", "0"), what="the restart right after registration")
    assert "kubelet_restart" not in fleet.status()[node]["faults"]


def test_plugin_stream_end_keeps_capacity_then_grace(fleet: NodeFleet, hooks: FakeHooks) -> None:
    node = new_node(fleet)
    pod = start_registered(fleet, hooks, node)
    fleet.stop_plugin_pod(node, pod)
    wait_for(lambda: gpu_status(hooks, node) == ("8", "0"), what="capacity 8, allocatable 0")
    assert not os.path.lexists(fleet.layout(node).plugin_socket())
    assert fleet.pod_log(node, pod) == ""  # the pod is gone
    wait_for(lambda: gpu_status(hooks, node) == (None, None), timeout=GRACE_S + 3, what="resource dropped")


# ---- plugin faults ---------------------------------------------------------------------------------

def test_plugin_hang_rpcs_time_out(fleet: NodeFleet, hooks: FakeHooks) -> None:
    node = new_node(fleet)
    start_registered(fleet, hooks, node)
    fleet.break_fault(node, "plugin_hang")
    plugin = stub(fleet.layout(node).plugin_socket(), dp.DEVICE_PLUGIN)
    with pytest.raises(grpc.RpcError) as hung:
        plugin.GetDevicePluginOptions(dp.Empty(), timeout=1)
    assert hung.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    fresh = new_node(fleet)
    fleet.break_fault(fresh, "plugin_hang")
    pod = "nvdp-" + fresh
    fleet.start_plugin_pod(fresh, plugin_pod(pod))
    wait_for(lambda: os.path.exists(fleet.layout(fresh).plugin_socket()), what="the hung plugin's socket")
    with pytest.raises(grpc.RpcError) as never:
        next(stub(fleet.layout(fresh).plugin_socket(), dp.DEVICE_PLUGIN).ListAndWatch(dp.Empty(), timeout=1))
    assert never.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert log_messages(fleet, fresh, pod)[-1].startswith("Starting to serve 'nvidia.com/gpu'")
    assert gpu_status(hooks, fresh) == (None, None)
    assert hooks.pod_status[("kube-system", pod)].running


@pytest.mark.parametrize(
    "signature, expected",
    [
        ("nvml_init_failed", "Failed to initialize NVML: ERROR_UNKNOWN."),
        ("incompatible_strategy", "Incompatible strategy detected auto"),
        ("registration_failed", "Could not register device plugin: rpc error: code = Unknown desc = "
                                "failed to dial device plugin: context deadline exceeded"),
    ],
)
def test_plugin_crash_signatures(fleet: NodeFleet, hooks: FakeHooks, signature: str, expected: str) -> None:
    node = new_node(fleet)
    fleet.break_fault(node, "plugin_crash", signature=signature)
    pod = "nvdp-" + node
    fleet.start_plugin_pod(node, plugin_pod(pod))
    wait_for(lambda: crash_looping(hooks, pod), what="a crash loop")
    history = hooks.pod_history[("kube-system", pod)]
    crashed = [s for s in history if not s.running]
    assert crashed and all(s.waiting_reason == "CrashLoopBackOff" and s.last_exit_code == 1 and s.last_reason == "Error" for s in crashed)
    # the log is the latest container's: wait for a run that got as far as its signature
    wait_for(lambda: expected in log_messages(fleet, node, pod), what="the signature in the log")
    assert gpu_status(hooks, node) == (None, None)

    # the fault lives with the pod: the DaemonSet's next pod is healthy
    fleet.stop_plugin_pod(node, pod)
    start_registered(fleet, hooks, node, pod=pod + "-2")


def test_nvml_fault_passes_through_and_fail_on_init_error_false(fleet: NodeFleet, hooks: FakeHooks) -> None:
    node = new_node(fleet)
    fleet.break_fault(node, "driver_not_loaded")
    assert not os.path.exists(fleet.layout(node).proc_driver_version)
    pod = "nvdp-" + node
    fleet.start_plugin_pod(node, plugin_pod(pod))
    wait_for(lambda: crash_looping(hooks, pod, 1), what="a crash loop")
    wait_for(lambda: "Failed to initialize NVML: ERROR_DRIVER_NOT_LOADED." in log_messages(fleet, node, pod), what="the signature")
    fleet.stop_plugin_pod(node, pod)

    hooks.objects[("ConfigMap", "kube-system", "plugin-config")] = {
        "data": {"config.yaml": "version: v1\nflags:\n  failOnInitError: false\n"}
    }
    tolerant = plugin_pod(
        pod + "-2",
        volumes=[{"name": "config", "configMap": {"name": "plugin-config"}}],
        container={"volumeMounts": [{"name": "config", "mountPath": "/config"}],
                   "env": [{"name": "CONFIG_FILE", "value": "/config/config.yaml"}]},
    )
    fleet.start_plugin_pod(node, tolerant)
    wait_for(lambda: "No devices found. Waiting indefinitely." in log_messages(fleet, node, pod + "-2"), what="waiting")
    time.sleep(0.3)
    status = hooks.pod_status[("kube-system", pod + "-2")]
    assert status.running and status.restart_count == 0
    fleet.fix_fault(node, "driver_not_loaded")
    assert os.path.exists(fleet.layout(node).proc_driver_version)


def test_plugin_no_devices(fleet: NodeFleet, hooks: FakeHooks) -> None:
    node = new_node(fleet)
    pod = start_registered(fleet, hooks, node)
    fleet.break_fault(node, "plugin_no_devices")
    wait_for(lambda: "No devices found. Waiting indefinitely." in log_messages(fleet, node, pod), what="no devices")
    assert "Received SIGHUP, restarting." in log_messages(fleet, node, pod)
    wait_for(lambda: gpu_status(hooks, node) == ("8", "0"), what="allocatable 0")
    assert not os.path.lexists(fleet.layout(node).plugin_socket())


def test_stale_socket_file(fleet: NodeFleet, hooks: FakeHooks) -> None:
    node = new_node(fleet)
    start_registered(fleet, hooks, node)
    path = fleet.layout(node).plugin_socket()
    fleet.break_fault(node, "stale_socket_file")
    assert stat.S_ISREG(os.lstat(path).st_mode)
    wait_for(lambda: gpu_status(hooks, node) == ("8", "0"), what="allocatable 0")
    with pytest.raises(grpc.RpcError):
        stub(path, dp.DEVICE_PLUGIN).GetDevicePluginOptions(dp.Empty(), timeout=1)
    fleet.fix_fault(node, "stale_socket_file")
    wait_for(lambda: gpu_status(hooks, node) == ("8", "8"), what="serving again")
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_runtime_missing_nvidia_keeps_the_pod_sandbox(fleet: NodeFleet, hooks: FakeHooks) -> None:
    node = new_node(fleet)
    fleet.break_fault(node, "runtime_missing_nvidia")
    assert containerd_has_nvidia(fleet.layout(node)) == (False, False)
    pod = "nvdp-" + node
    fleet.start_plugin_pod(node, plugin_pod(pod))
    wait_for(lambda: crash_looping(hooks, pod, 1), what="a crash loop")
    wait_for(lambda: "Incompatible strategy detected auto" in log_messages(fleet, node, pod), what="the signature")
    fleet.fix_fault(node, "runtime_missing_nvidia")
    assert containerd_has_nvidia(fleet.layout(node)) == (True, True)
    restarts = hooks.pod_status[("kube-system", pod)].restart_count
    wait_for(lambda: crash_looping(hooks, pod, restarts + 1), what="the old sandbox to keep crashing")
    fleet.stop_plugin_pod(node, pod)
    start_registered(fleet, hooks, node, pod=pod + "-2")


def test_time_slicing_config(fleet: NodeFleet, hooks: FakeHooks) -> None:
    node = new_node(fleet, gpus=2)
    hooks.objects[("ConfigMap", "kube-system", "ts-config")] = {"data": {"any.yaml": (
        "version: v1\nsharing:\n  timeSlicing:\n    renameByDefault: true\n"
        "    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n")}}
    pod = "nvdp-" + node
    fleet.start_plugin_pod(node, plugin_pod(pod, volumes=[{"name": "c", "configMap": {"name": "ts-config"}}]))
    wait_for(lambda: hooks.node_status.get(node, ({}, {}, None))[1].get("nvidia.com/gpu.shared") == "8", what="8 shared GPUs")
    layout = fleet.layout(node)
    assert stat.S_ISSOCK(os.lstat(layout.plugin_socket("nvidia.com/gpu.shared")).st_mode)
    devices = next(stub(layout.plugin_socket("nvidia.com/gpu.shared"), dp.DEVICE_PLUGIN).ListAndWatch(dp.Empty(), timeout=5)).devices
    first = uuids(fleet, node)[0]
    assert [d.ID for d in devices][:4] == ["%s::%d" % (first, i) for i in range(4)]
    assert "Registered device plugin for 'nvidia.com/gpu.shared' with Kubelet" in log_messages(fleet, node, pod)


def test_unknown_fault_and_node(fleet: NodeFleet) -> None:
    node = new_node(fleet)
    with pytest.raises(ValueError, match="unknown fault"):
        fleet.break_fault(node, "no_such_fault")
    with pytest.raises(ValueError, match="no node"):
        fleet.break_fault("nowhere", "plugin_hang")
    with pytest.raises(ValueError, match="signature"):
        fleet.break_fault(node, "plugin_crash", signature="bogus")
