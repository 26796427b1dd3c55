"""The lab's simulated nodes (lab/node/) against the real control plane and NVIDIA's real device
plugin.

One control plane per module (lab.cluster.ControlPlane: the real etcd, kube-apiserver,
kube-controller-manager and kube-scheduler) and an in-process lab.node.agent.NodeFleet, so a test
can reach node internals (the node root, the kubelet's sockets, a second fleet with a short
endpoint grace). Each test adds its own nodes and they are removed afterwards; every plugin pod is
made by the real DaemonSet controller, bound by the real scheduler and runs NVIDIA's real
binary (v0.17.4). Node pools (a node label each DaemonSet selects):

- ``static``: NVIDIA's static manifest (deployments/static/nvidia-device-plugin.yml of
  NVIDIA/k8s-device-plugin v0.17.4, ``FAIL_ON_INIT_ERROR=false``), unchanged but for a
  ``nodeSelector`` on the pool;
- ``fail``, ``ts``, ``badtag``: the collection's DaemonSet and ConfigMap as
  plugins/module_utils/_device_plugin.py renders them (render_daemonset, config_text,
  spec_from_params): its default config (``failOnInitError: true``), time-slicing with 4
  replicas, and an image tag that was never built.

The fleet reports Node status every 2 s (the kubelet's nodeStatusUpdateFrequency; 10 s by
default) and renews Leases every 2 s (the kubelet's 10 s): the tests wait on many capacity
changes. Crash back-off is the kubelet's (10 s doubling).
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import yaml

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / ".build", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from lab.pins import KUBE_LAB, KUBECTL, device_plugin_binary, device_plugin_versions, pins  # noqa: E402

PLUGIN_TAG = device_plugin_versions()[0]
if not os.access(KUBE_LAB, os.X_OK) or not os.access(device_plugin_binary(PLUGIN_TAG), os.X_OK):
    pytest.skip("the lab's real parts are not built (make lab)", allow_module_level=True)
if not (ROOT / ".build" / "lab" / "lib" / "libnvidia-ml.so.1").exists():
    pytest.skip("lab NVML library not built (make lab-nvml)", allow_module_level=True)

import grpc  # noqa: E402

from ansible_collections.gpunode.bringup.plugins.module_utils import _device_plugin as collection  # noqa: E402
from ansible_collections.gpunode.bringup.plugins.module_utils._kubelet_api import (  # noqa: E402
    deviceplugin_v1beta1 as dp,
    podresources_v1 as pr,
)
from lab import nvml_state  # noqa: E402
from lab.cluster import ControlPlane  # noqa: E402
from lab.contracts import NodeSpec  # noqa: E402
from lab.node.agent import FaultError, NodeFleet  # noqa: E402
from lab.node.kubelet import checkpoint_checksum, is_extended_resource_name, verify_checkpoint  # noqa: E402
from lab.node.layout import (  # noqa: E402
    UNIX_SOCKET_PATH_MAX,
    NodeLayout,
    SocketPathTooLong,
    containerd_has_nvidia,
    create_node_tree,
    max_state_dir_length,
)

GPU_LABEL = "nvidia.com/gpu.present"
POOL_LABEL = "lab-test/pool"
GPU = "nvidia.com/gpu"
CONTAINER = "nvidia-device-plugin-ctr"
CUDA_IMAGE = "nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04"
MISSING_TAG = "v0.17.99"  # a tag the lab never built: the registry does not have it
GOMODCACHE = os.environ.get("GOMODCACHE") or os.path.join(os.path.expanduser("~"), "go", "pkg", "mod")
STATIC_MANIFEST = os.path.join(GOMODCACHE, "github.com", "!n!v!i!d!i!a", "k8s-device-plugin@%s" % PLUGIN_TAG,
                               "deployments", "static", "nvidia-device-plugin.yml")
KLOG = re.compile(r"^[IWEF]\d{4} \d{2}:\d{2}:\d{2}\.\d{6}\s+\d+ [\w.-]+\.go:\d+\] (.*)$")
REGISTERED = "Registered device plugin for 'nvidia.com/gpu' with Kubelet"
INOTIFY_RESTART = "inotify: /var/lib/kubelet/device-plugins/kubelet.sock created, restarting."
WAITING = "No devices found. Waiting indefinitely."


# ---- the lab of this module ------------------------------------------------------------------

class ApiFailure(AssertionError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__("HTTP %d: %s" % (status, message))
        self.status = status
        self.message = message


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition", step: float = 0.25) -> Any:
    """Poll until ``predicate()`` is truthy (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ds waiting for %s" % (timeout, what))
        time.sleep(step)


def waiting_reason(status: Dict[str, Any]) -> Optional[str]:
    return ((status.get("state") or {}).get("waiting") or {}).get("reason")


def messages(log: str) -> List[str]:
    """klog messages of a log, without their headers (continuation lines left out)."""
    return [m.group(1) for m in map(KLOG.match, log.splitlines()) if m]


@dataclass
class Lab:
    directory: str
    cluster: ControlPlane
    fleet: NodeFleet
    kubeconfig: str
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    added: List[Tuple[NodeFleet, str]] = field(default_factory=list)
    extra_fleets: List[NodeFleet] = field(default_factory=list)

    # ---- the API as the administrator ----------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, query: Optional[Dict[str, Any]] = None,
                content_type: str = "application/json", raw: bool = False) -> Any:
        url = self.cluster.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, method=method, data=data, headers={
            "Authorization": "Bearer " + self.cluster.admin_token, "Content-Type": content_type})
        context = ssl.create_default_context(cafile=self.cluster.ca_file)
        try:
            with urllib.request.urlopen(request, context=context, timeout=60) as answer:
                text = answer.read().decode()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                message = json.loads(text).get("message", text)
            except ValueError:
                message = text
            raise ApiFailure(exc.code, message) from None
        if raw:
            return text
        return json.loads(text) if text else {}

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query or None)

    def create(self, path: str, body: Dict[str, Any]) -> Any:
        return self.request("POST", path, body)

    def kubectl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([KUBECTL, "--kubeconfig", self.kubeconfig, *args], text=True, capture_output=True,
                              timeout=120, check=False)

    # ---- nodes ---------------------------------------------------------------------------------
    def add_node(self, pool: str, gpus: int = 2, fleet: Optional[NodeFleet] = None) -> str:
        fleet = fleet or self.fleet
        name = "n%02d-%s" % (next(self.counter), pool)
        fleet.add_nodes([NodeSpec(name=name, root="", gpu_count=gpus, labels={GPU_LABEL: "true", POOL_LABEL: pool})])
        self.added.append((fleet, name))
        return name

    def remove_added_nodes(self) -> None:
        """Stop the nodes a test added and delete them (and their pods) from the API."""
        while self.added:
            fleet, name = self.added.pop()
            node = fleet.nodes.get(name)
            if node is not None:
                fleet.run(node.stop(), timeout=120)
                del fleet.nodes[name]
            for pod in self.get("/api/v1/pods", fieldSelector="spec.nodeName=%s" % name)["items"]:
                meta = pod["metadata"]
                self.request("DELETE", "/api/v1/namespaces/%s/pods/%s" % (meta["namespace"], meta["name"]),
                             {"gracePeriodSeconds": 0})
            self.request("DELETE", "/api/v1/nodes/%s" % name)

    def layout(self, node: str, fleet: Optional[NodeFleet] = None) -> NodeLayout:
        return (fleet or self.fleet).layout(node)

    def node(self, name: str) -> Dict[str, Any]:
        return self.get("/api/v1/nodes/%s" % name)

    def gpus(self, name: str) -> Tuple[Optional[str], Optional[str]]:
        """(capacity, allocatable) of nvidia.com/gpu on the Node, as the API has them."""
        status = self.node(name).get("status") or {}
        return (status.get("capacity") or {}).get(GPU), (status.get("allocatable") or {}).get(GPU)

    def wait_gpus(self, name: str, capacity: Optional[str], allocatable: Optional[str], timeout: float = 60.0) -> None:
        seen: List[Tuple[Optional[str], Optional[str]]] = []

        def shows() -> bool:
            seen.append(self.gpus(name))
            return seen[-1] == (capacity, allocatable)

        try:
            wait_for(shows, timeout, "%s to show %s capacity %s, allocatable %s" % (name, GPU, capacity, allocatable))
        except AssertionError as exc:
            raise AssertionError("%s; it shows %s" % (exc, seen[-1])) from None

    def uuids(self, name: str, fleet: Optional[NodeFleet] = None) -> List[str]:
        return [gpu["uuid"] for gpu in nvml_state.read_state(self.layout(name, fleet).nvml_state)["gpus"]]

    def checkpoint(self, name: str, fleet: Optional[NodeFleet] = None) -> Dict[str, Any]:
        with open(self.layout(name, fleet).checkpoint, encoding="utf-8") as handle:
            return json.load(handle)

    # ---- pods ----------------------------------------------------------------------------------
    def pods_on(self, node: str, namespace: str = "kube-system") -> List[Dict[str, Any]]:
        pods = self.get("/api/v1/namespaces/%s/pods" % namespace, fieldSelector="spec.nodeName=%s" % node)["items"]
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    def plugin_pod(self, node: str, timeout: float = 60.0, not_uid: str = "") -> Dict[str, Any]:
        """The node's plugin pod (the DaemonSet's), once it exists (a new one: ``not_uid``)."""
        def find() -> Optional[Dict[str, Any]]:
            pods = [p for p in self.pods_on(node) if p["metadata"]["uid"] != not_uid]
            return pods[0] if pods else None

        return wait_for(find, timeout, "a plugin pod on %s" % node)

    def pod(self, namespace: str, name: str) -> Dict[str, Any]:
        return self.get("/api/v1/namespaces/%s/pods/%s" % (namespace, name))

    def container_status(self, namespace: str, name: str) -> Dict[str, Any]:
        statuses = (self.pod(namespace, name).get("status") or {}).get("containerStatuses") or [{}]
        return statuses[0]

    def wait_container(self, namespace: str, name: str, holds: Callable[[Dict[str, Any]], bool], what: str,
                       timeout: float = 60.0) -> Dict[str, Any]:
        """The pod's (first) container status, once ``holds(status)``."""
        def check() -> Optional[Dict[str, Any]]:
            status = self.container_status(namespace, name)
            return status if holds(status) else None

        return wait_for(check, timeout, what)

    def log(self, namespace: str, name: str, **query: Any) -> str:
        """``pods/log`` through the API server (it proxies the node's kubelet endpoint)."""
        return self.request("GET", "/api/v1/namespaces/%s/pods/%s/log" % (namespace, name), query=query or None,
                            raw=True)

    def plugin_log(self, node: str, **query: Any) -> str:
        pod = self.plugin_pod(node)
        return self.log("kube-system", pod["metadata"]["name"], **query)

    def wait_log(self, namespace: str, name: str, text: str, timeout: float = 60.0, **query: Any) -> str:
        def has() -> Optional[str]:
            try:
                log = self.log(namespace, name, **query)
            except ApiFailure:
                return None
            return log if text in log else None

        return wait_for(has, timeout, "%r in the log of %s/%s" % (text, namespace, name))

    def wait_registered(self, node: str, count: int = 2, fleet: Optional[NodeFleet] = None,
                        timeout: float = 90.0) -> Dict[str, Any]:
        """The node's plugin pod runs NVIDIA's plugin, registered, and the Node advertises it."""
        pod = self.plugin_pod(node, timeout)
        self.wait_log("kube-system", pod["metadata"]["name"], REGISTERED, timeout)
        self.wait_gpus(node, str(count), str(count), timeout)
        return self.plugin_pod(node)

    def fault(self, node: str, name: str, fleet: Optional[NodeFleet] = None, **args: Any) -> Dict[str, Any]:
        return (fleet or self.fleet).break_fault(node, name, **args)

    def fix(self, node: str, name: str, fleet: Optional[NodeFleet] = None, **args: Any) -> Dict[str, Any]:
        return (fleet or self.fleet).fix_fault(node, name, **args)

    def summary(self, node: str, fleet: Optional[NodeFleet] = None) -> Dict[str, Any]:
        return (fleet or self.fleet).status()[node]


def static_daemonset() -> Dict[str, Any]:
    """NVIDIA's static manifest, with a nodeSelector on the ``static`` pool."""
    with open(STATIC_MANIFEST, encoding="utf-8") as handle:
        daemonset = yaml.safe_load(handle)
    daemonset["spec"]["template"]["spec"]["nodeSelector"] = {POOL_LABEL: "static"}
    return daemonset


def collection_objects(pool: str, **params: Any) -> List[Dict[str, Any]]:
    """The collection's ConfigMap and DaemonSet (its own rendering), on one pool."""
    spec = collection.spec_from_params(dict({
        "name": "nvdp-%s" % pool, "selector_labels": {"name": "nvdp-%s" % pool},
        "config_map_name": "nvdp-%s-config" % pool, "node_selector": {POOL_LABEL: pool}}, **params))
    text = collection.config_text(spec.config)
    return [collection.render_config_map(spec, text), collection.render_daemonset(spec, text)]


def create_object(lab: Lab, body: Dict[str, Any]) -> None:
    namespace = body["metadata"]["namespace"]
    kind = body["kind"]
    path = ("/api/v1/namespaces/%s/configmaps" if kind == "ConfigMap" else "/apis/apps/v1/namespaces/%s/daemonsets")
    lab.create(path % namespace, body)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    directory = tempfile.mkdtemp(prefix="gln", dir="/tmp")
    cluster = ControlPlane(os.path.join(directory, "cluster"))
    fleet: Optional[NodeFleet] = None
    try:
        cluster.start()
        fleet = NodeFleet(directory, cluster, node_status_update_frequency=2, lease_renew_interval=2).start()
        the_lab = Lab(directory, cluster, fleet, cluster.admin_kubeconfig(os.path.join(directory, "kubeconfig")))
        if os.path.exists(STATIC_MANIFEST):
            create_object(the_lab, static_daemonset())
        for body in collection_objects("fail") + collection_objects(
                "ts", config={"time_slicing": {"resources": [{"name": GPU, "replicas": 4}]}}) + collection_objects(
                "badtag", tag=MISSING_TAG):
            create_object(the_lab, body)
        yield the_lab
        for extra in the_lab.extra_fleets:
            extra.stop()
    finally:
        if fleet is not None:
            fleet.stop()
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(autouse=True)
def _own_nodes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Nodes a test adds are removed after it (the fleet stays small on a 2-core machine)."""
    yield
    if "lab" in request.fixturenames:
        request.getfixturevalue("lab").remove_added_nodes()


needs_static = pytest.mark.skipif(not os.path.exists(STATIC_MANIFEST),
                                  reason="NVIDIA's static manifest is not in the Go module cache (%s)" % STATIC_MANIFEST)


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A temporary directory short enough for node sockets under it (pytest's tmp_path is not)."""
    path = tempfile.mkdtemp(prefix="gls", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def grpc_channel(path: str) -> grpc.Channel:
    """A channel of its own (gRPC's global subchannel pool would hand a new channel the back-off
    of an earlier failed one to the same socket)."""
    return grpc.insecure_channel("unix:" + path, options=[("grpc.use_local_subchannel_pool", 1)])


# ---- the node tree ---------------------------------------------------------------------------

def test_node_tree_containerd_config_and_proc_version(lab: Lab) -> None:
    node = lab.add_node("bare")
    layout = lab.layout(node)
    assert layout.root == os.path.join(lab.directory, "nodes", node)
    with open(layout.containerd_config, "rb") as handle:
        config = tomllib.load(handle)
    containerd = config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert config["version"] == 2
    assert containerd["default_runtime_name"] == "nvidia"
    assert sorted(containerd["runtimes"]) == ["nvidia", "runc"]
    # the config names the binary as the node sees it; the file lives under the node root
    binary = containerd["runtimes"]["nvidia"]["options"]["BinaryName"]
    assert binary == "/usr/bin/nvidia-container-runtime"
    assert os.access(os.path.join(layout.root, binary.lstrip("/")), os.X_OK)
    assert containerd_has_nvidia(layout) == (True, True)
    driver = nvml_state.read_state(layout.nvml_state)["driver_version"]
    with open(layout.proc_driver_version, encoding="utf-8") as handle:
        first = handle.readline()
    assert first.startswith("NVRM version: NVIDIA UNIX x86_64 Kernel Module  %s  " % driver)
    # the kubelet's sockets: registration and pod-resources
    assert stat.S_ISSOCK(os.lstat(layout.kubelet_socket).st_mode)
    assert stat.S_ISSOCK(os.lstat(layout.pod_resources_socket).st_mode)
    assert layout.kubelet_socket == os.path.join(layout.root, "var/lib/kubelet/device-plugins/kubelet.sock")
    assert layout.pod_resources_socket == os.path.join(layout.root, "var/lib/kubelet/pod-resources/kubelet.sock")


def test_socket_path_limit(short_tmp: str) -> None:
    name = "gpu-node-01"
    limit = max_state_dir_length(len(name))
    # a state dir exactly at the limit fits; one byte more does not
    base = short_tmp
    fits = base + "/" + "x" * (limit - len(base) - 1)
    assert len(fits) == limit
    create_node_tree(NodeLayout(name, os.path.join(fits, "nodes", name)), "550.54.15")
    longest = os.path.join(fits, "nodes", name, "var/lib/kubelet/device-plugins/nvidia-gpu.shared.sock")
    assert len(longest.encode()) == UNIX_SOCKET_PATH_MAX
    too_long = fits + "y"
    layout = NodeLayout(name, os.path.join(too_long, "nodes", name))
    with pytest.raises(SocketPathTooLong) as raised:
        create_node_tree(layout, "550.54.15")
    assert str(raised.value) == (
        "node %s: socket path %s/nodes/%s/var/lib/kubelet/device-plugins/nvidia-gpu.shared.sock is %d bytes, unix "
        "sockets allow 107; use a shorter lab state dir (e.g. --state-dir /tmp/gl)" % (name, too_long, name, 108))
    assert not os.path.exists(too_long)  # nothing was created


def test_socket_path_limit_in_a_fleet(lab: Lab, tmp_path: Path) -> None:
    """A NodeFleet whose state dir is too deep refuses the node before it registers anything."""
    deep = str(tmp_path / ("d" * 80))
    fleet = NodeFleet(deep, lab.cluster).start()
    try:
        with pytest.raises(SocketPathTooLong, match="unix sockets allow 107"):
            fleet.add_nodes([NodeSpec(name="too-deep", root="", gpu_count=1)])
        assert fleet.nodes == {}
    finally:
        fleet.stop()
    with pytest.raises(ApiFailure) as missing:
        lab.node("too-deep")
    assert missing.value.status == 404


def test_extended_resource_names() -> None:
    for good in ("nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/mig-1g.10gb", "example.com/foo_bar"):
        assert is_extended_resource_name(good), good
    for bad in ("gpu", "kubernetes.io/gpu", "requests.nvidia.com/gpu", "Nvidia.com/gpu", "nvidia.com/-gpu",
                "nvidia.com/", "/gpu", "nvidia.com/" + "g" * 64, "nvidia_com/gpu"):
        assert not is_extended_resource_name(bad), bad


# ---- registration, checkpoint, Node status, Lease ---------------------------------------------

@needs_static
def test_registration_checkpoint_node_status_and_lease(lab: Lab) -> None:
    node = lab.add_node("static")
    pod = lab.wait_registered(node)
    uuids = lab.uuids(node)
    checkpoint = lab.checkpoint(node)
    # RegisteredDevices: the NVML UUIDs, in the order of the plugin's ListAndWatch (a Go map's)
    assert sorted(checkpoint["Data"]) == ["PodDeviceEntries", "RegisteredDevices"]
    assert checkpoint["Data"]["PodDeviceEntries"] is None
    assert list(checkpoint["Data"]["RegisteredDevices"]) == [GPU]
    assert sorted(checkpoint["Data"]["RegisteredDevices"][GPU]) == sorted(uuids)
    assert checkpoint["Checksum"] == checkpoint_checksum(checkpoint["Data"])
    assert verify_checkpoint(checkpoint)
    tampered = json.loads(json.dumps(checkpoint))
    tampered["Data"]["RegisteredDevices"][GPU] = uuids[:1]
    assert not verify_checkpoint(tampered)
    # the plugin's log, as NVIDIA's plugin writes it
    log = messages(lab.log("kube-system", pod["metadata"]["name"]))
    assert "Starting to serve 'nvidia.com/gpu' on /var/lib/kubelet/device-plugins/nvidia-gpu.sock" in log
    assert log.count(REGISTERED) == 1
    assert pod["spec"]["containers"][0]["image"] == "nvcr.io/nvidia/k8s-device-plugin:%s" % PLUGIN_TAG
    # the Node, as the API server has it
    api_node = lab.node(node)
    status = api_node["status"]
    assert status["capacity"][GPU] == "2" and status["allocatable"][GPU] == "2"
    assert status["addresses"] == [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": node}]
    port = status["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    assert port == lab.fleet.nodes[node].kubelet_port and port > 0
    info = status["nodeInfo"]
    assert info["kubeletVersion"] == pins()["KUBERNETES_VERSION"]
    assert info["containerRuntimeVersion"] == "containerd://1.7.27"
    assert (info["operatingSystem"], info["architecture"]) == ("linux", "amd64")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "KubeletReady")
    labels = api_node["metadata"]["labels"]
    assert labels["kubernetes.io/hostname"] == node and labels[GPU_LABEL] == "true"
    # the kubelet endpoint answers clients with a lab CA certificate (the API server's)
    context = ssl.create_default_context(cafile=lab.cluster.ca_file)
    context.load_cert_chain(lab.cluster.kubelet_client.cert, lab.cluster.kubelet_client.key)
    with urllib.request.urlopen("https://127.0.0.1:%d/healthz" % port, context=context, timeout=10) as answer:
        assert answer.read() == b"ok"
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        bare = ssl.create_default_context(cafile=lab.cluster.ca_file)
        with urllib.request.urlopen("https://127.0.0.1:%d/healthz" % port, context=bare, timeout=10) as answer:
            answer.read()
    # the Lease in kube-node-lease, owned by the Node
    lease = lab.get("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/%s" % node)
    assert lease["spec"]["holderIdentity"] == node
    assert lease["spec"]["leaseDurationSeconds"] == 40
    assert lease["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": node, "uid": api_node["metadata"]["uid"]}]
    renewed = lease["spec"]["renewTime"]
    wait_for(lambda: lab.get("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/%s" % node)
             ["spec"]["renewTime"] != renewed, 30, "the Lease to be renewed")


# ---- pod-resources ---------------------------------------------------------------------------

@needs_static
def test_pod_resources_list_allocatable_and_get(lab: Lab) -> None:
    node = lab.add_node("static")
    plugin = lab.wait_registered(node)
    held = lab.fault(node, "gpu_in_use", pod="holder", count=1)["workload"]
    assert held["namespace"] == "default" and held["name"] == "holder"
    uuids = lab.uuids(node)
    assert len(held["devices"]) == 1 and held["devices"][0] in uuids
    pod = lab.pod("default", "holder")
    assert pod["status"]["phase"] == "Running"
    assert pod["spec"]["nodeName"] == node
    lister = pr.POD_RESOURCES_LISTER.stub(grpc_channel(lab.layout(node).pod_resources_socket))
    listed = {(p.namespace, p.name): p for p in lister.List(pr.ListPodResourcesRequest(), timeout=10).pod_resources}
    assert set(listed) == {("default", "holder"), ("kube-system", plugin["metadata"]["name"])}
    containers = listed[("default", "holder")].containers
    assert [c.name for c in containers] == ["main"]
    assert [(d.resource_name, list(d.device_ids)) for d in containers[0].devices] == [(GPU, held["devices"])]
    plugin_containers = listed[("kube-system", plugin["metadata"]["name"])].containers
    assert [(c.name, len(c.devices)) for c in plugin_containers] == [(CONTAINER, 0)]
    allocatable = lister.GetAllocatableResources(pr.AllocatableResourcesRequest(), timeout=10)
    assert sorted((d.resource_name, tuple(d.device_ids)) for d in allocatable.devices) == \
        sorted((GPU, (u,)) for u in uuids)
    got = lister.Get(pr.GetPodResourcesRequest(pod_name="holder", pod_namespace="default"), timeout=10)
    assert got.pod_resources.name == "holder"
    assert [list(d.device_ids) for d in got.pod_resources.containers[0].devices] == [held["devices"]]
    with pytest.raises(grpc.RpcError) as unknown:
        lister.Get(pr.GetPodResourcesRequest(pod_name="nope", pod_namespace="default"), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.UNKNOWN
    assert unknown.value.details() == "pod nope in namespace default not found"
    # the device manager's checkpoint holds the allocation
    entries = lab.checkpoint(node)["Data"]["PodDeviceEntries"]
    assert [(e["PodUID"], e["ContainerName"], e["ResourceName"]) for e in entries] == \
        [(pod["metadata"]["uid"], "main", GPU)]
    assert list(entries[0]["DeviceIDs"].values()) == [held["devices"]]
    # the kubelet does not count allocations in allocatable: the Node still shows 2
    assert lab.gpus(node) == ("2", "2")
    assert lab.fix(node, "gpu_in_use") == {"removed": ["default/holder"]}
    with pytest.raises(ApiFailure) as gone:
        lab.pod("default", "holder")
    assert gone.value.status == 404
    listed_after = {(p.namespace, p.name) for p in lister.List(pr.ListPodResourcesRequest(), timeout=10).pod_resources}
    assert listed_after == {("kube-system", plugin["metadata"]["name"])}
    assert lab.checkpoint(node)["Data"]["PodDeviceEntries"] is None


# ---- Register validation like the kubelet --------------------------------------------------------

def test_register_validation_like_the_kubelet(lab: Lab) -> None:
    node = lab.add_node("bare")
    layout = lab.layout(node)
    registration = dp.REGISTRATION.stub(grpc_channel(layout.kubelet_socket))

    def register(version: str, endpoint: str, resource: str) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as refused:
            registration.Register(dp.RegisterRequest(version=version, endpoint=endpoint, resource_name=resource),
                                  timeout=20)
        assert refused.value.code() == grpc.StatusCode.UNKNOWN
        return refused.value

    assert register("v1beta2", "x.sock", "example.com/foo").details() == \
        'requested API version "v1beta2" is not supported by kubelet. Supported version is ["v1beta1"]'
    assert register("v1beta1", "x.sock", "foo").details() == 'the ResourceName "foo" is invalid'
    assert register("v1beta1", "x.sock", "kubernetes.io/foo").details() == 'the ResourceName "kubernetes.io/foo" is invalid'
    assert register("v1beta1", "missing.sock", "example.com/foo").details() == \
        "failed to dial device plugin: context deadline exceeded"
    # a regular file at the endpoint cannot be dialled either
    Path(layout.device_plugin_dir, "file.sock").write_text("")
    assert register("v1beta1", "file.sock", "example.com/foo").details() == \
        "failed to dial device plugin: context deadline exceeded"
    assert lab.summary(node)["kubelet"]["resources"] == {}
    time.sleep(2.5)  # one status period: nothing registered, nothing reported
    assert lab.gpus(node) == (None, None)


# ---- NVIDIA's plugin and the node's faults --------------------------------------------------------

@needs_static
def test_critical_xid_marks_the_device_unhealthy(lab: Lab) -> None:
    node = lab.add_node("static")
    pod = lab.wait_registered(node)
    uuids = lab.uuids(node)
    lab.fault(node, "critical_xid")  # default: the last GPU, Xid 79
    line = "XidCriticalError: Xid=79 on Device=%s; marking device as unhealthy." % uuids[-1]

    def in_kubectl_logs() -> bool:
        out = lab.kubectl("logs", "-n", "kube-system", pod["metadata"]["name"])
        return out.returncode == 0 and line in messages(out.stdout)

    wait_for(in_kubectl_logs, 60, "NVIDIA's XID line in kubectl logs")
    lab.wait_gpus(node, "2", "1")
    assert lab.checkpoint(node)["Data"]["RegisteredDevices"] == {GPU: uuids[:-1]}  # healthy devices only
    assert lab.summary(node)["kubelet"]["resources"][GPU]["unhealthy"] == [uuids[-1]]


@needs_static
def test_kubelet_restart_plugin_reregisters(lab: Lab) -> None:
    node = lab.add_node("static")
    pod = lab.wait_registered(node)
    name = pod["metadata"]["name"]
    started = lab.summary(node)["kubelet"]
    lab.fault(node, "kubelet_restart")
    log = lab.wait_log("kube-system", name, INOTIFY_RESTART)
    wait_for(lambda: messages(lab.log("kube-system", name)).count(REGISTERED) == 2, 60, "the second registration")
    log = messages(lab.log("kube-system", name))
    assert log.index(INOTIFY_RESTART) < len(log) - 1 - log[::-1].index(REGISTERED)
    lab.wait_gpus(node, "2", "2")
    assert lab.container_status("kube-system", name)["restartCount"] == 0  # the plugin restarted its servers, not its container
    assert lab.summary(node)["kubelet"]["running"] and started["running"]


@needs_static
@pytest.mark.parametrize("socket", ["removed", "kept"])
def test_plugin_stale_after_kubelet_restart(lab: Lab, socket: str) -> None:
    node = lab.add_node("static")
    pod = lab.wait_registered(node)
    name = pod["metadata"]["name"]
    layout = lab.layout(node)
    lab.fault(node, "plugin_stale", socket=socket)
    lab.fault(node, "kubelet_restart")
    # the checkpoint is read back: the resource is there with no devices until its plugin registers
    lab.wait_gpus(node, "0", "0")
    plugin_socket = layout.plugin_socket()
    if socket == "removed":
        assert not os.path.lexists(plugin_socket)
    else:
        assert stat.S_ISSOCK(os.lstat(plugin_socket).st_mode)
        assert os.stat(plugin_socket).st_mtime < os.stat(layout.kubelet_socket).st_mtime
        options = dp.DEVICE_PLUGIN.stub(grpc_channel(plugin_socket)).GetDevicePluginOptions(dp.Empty(), timeout=10)
        assert options.get_preferred_allocation_available  # NVIDIA's plugin answers on its old socket
    time.sleep(5)  # two status periods: the plugin never sees the new kubelet.sock
    assert lab.gpus(node) == ("0", "0")
    log = messages(lab.log("kube-system", name))
    assert INOTIFY_RESTART not in log and log.count(REGISTERED) == 1
    assert lab.pod("kube-system", name)["status"]["phase"] == "Running"
    assert lab.summary(node)["kubelet"]["resources"][GPU] == {
        "registered": False, "capacity": 0, "allocatable": 0, "unhealthy": []}
    # the fix restarts the container: a fresh mount of the new directory, and it registers
    lab.fix(node, "plugin_stale")
    lab.wait_gpus(node, "2", "2")
    assert lab.container_status("kube-system", name)["restartCount"] == 1
    assert REGISTERED in messages(lab.log("kube-system", name))


@needs_static
def test_kubelet_down_and_up(lab: Lab) -> None:
    node = lab.add_node("static")
    pod = lab.wait_registered(node)
    name = pod["metadata"]["name"]
    layout = lab.layout(node)
    pid = lab.summary(node)["plugin_pod"]["pid"]
    lease_path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/%s" % node
    lab.fault(node, "kubelet_down")
    assert not os.path.lexists(layout.kubelet_socket)
    assert not os.path.lexists(layout.pod_resources_socket)
    summary = lab.summary(node)
    assert summary["kubelet"]["running"] is False
    assert summary["plugin_pod"]["pid"] == pid and os.path.exists("/proc/%d" % pid)  # containers keep running
    renewed = lab.get(lease_path)["spec"]["renewTime"]
    time.sleep(5)  # more than two renew intervals of this fleet (2 s)
    assert lab.get(lease_path)["spec"]["renewTime"] == renewed
    with pytest.raises(ApiFailure) as unreachable:
        lab.log("kube-system", name)
    assert "connection refused" in unreachable.value.message
    lab.fix(node, "kubelet_down")
    assert stat.S_ISSOCK(os.lstat(layout.kubelet_socket).st_mode)
    wait_for(lambda: lab.get(lease_path)["spec"]["renewTime"] != renewed, 30, "the Lease renewed again")
    # the new kubelet.sock: NVIDIA's plugin sees it through inotify and registers again
    lab.wait_log("kube-system", name, INOTIFY_RESTART)
    wait_for(lambda: messages(lab.log("kube-system", name)).count(REGISTERED) == 2, 60, "the plugin registered again")
    lab.wait_gpus(node, "2", "2")
    ready = next(c for c in lab.node(node)["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


@needs_static
def test_kubelet_restart_after_register_is_one_shot(lab: Lab) -> None:
    node = lab.add_node("static")
    old = lab.wait_registered(node)
    lab.fault(node, "kubelet_restart", after="register")
    assert "kubelet_restart" in lab.summary(node)["faults"]
    # the next registration is that of a new plugin pod (the DaemonSet's replacement)
    lab.request("DELETE", "/api/v1/namespaces/kube-system/pods/%s" % old["metadata"]["name"])
    new = lab.plugin_pod(node, not_uid=old["metadata"]["uid"])
    name = new["metadata"]["name"]
    lab.wait_log("kube-system", name, INOTIFY_RESTART)
    wait_for(lambda: messages(lab.log("kube-system", name)).count(REGISTERED) == 2, 60, "the second registration")
    lab.wait_gpus(node, "2", "2")
    assert "kubelet_restart" not in lab.summary(node)["faults"]
    time.sleep(4)  # two status periods: no third restart
    log = messages(lab.log("kube-system", name))
    assert log.count(INOTIFY_RESTART) == 1 and log.count(REGISTERED) == 2


@needs_static
def test_plugin_stream_end_keeps_capacity_then_grace_removes_it(lab: Lab) -> None:
    """A plugin that stops serving: capacity stays, allocatable 0; the resource goes after the
    endpoint grace (5 min on a kubelet; 10 s on this fleet)."""
    grace_fleet = NodeFleet(os.path.join(lab.directory, "grace"), lab.cluster, node_status_update_frequency=2,
                            endpoint_grace_s=10.0).start()
    lab.extra_fleets.append(grace_fleet)
    node = lab.add_node("static", fleet=grace_fleet)
    pod = lab.wait_registered(node, fleet=grace_fleet)
    lab.fault(node, "plugin_no_devices", fleet=grace_fleet)  # the container is killed; its restart finds no GPU
    lab.wait_log("kube-system", pod["metadata"]["name"], WAITING)
    started = time.monotonic()
    lab.wait_gpus(node, "2", "0", timeout=10)
    resource = lab.summary(node, grace_fleet)["kubelet"]["resources"][GPU]
    assert resource["registered"] is False and resource["capacity"] == 2 and resource["allocatable"] == 0
    lab.wait_gpus(node, None, None, timeout=30)
    assert time.monotonic() - started >= 6  # not before the grace (10 s after the stream ended)
    assert GPU not in lab.node(node)["status"]["capacity"]
    assert lab.checkpoint(node, grace_fleet)["Data"]["RegisteredDevices"] == {}


@needs_static
def test_plugin_hang_rpcs_hit_their_deadline(lab: Lab) -> None:
    node = lab.add_node("static")
    lab.wait_registered(node)
    socket = lab.layout(node).plugin_socket()
    lab.fault(node, "plugin_hang")
    assert lab.summary(node)["plugin_pod"]["stopped"] is True
    plugin = dp.DEVICE_PLUGIN.stub(grpc_channel(socket))
    with pytest.raises(grpc.RpcError) as hung:
        plugin.GetDevicePluginOptions(dp.Empty(), timeout=2)
    assert hung.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(2.5)  # the kubelet's stream stays open: the Node keeps advertising
    assert lab.gpus(node) == ("2", "2")
    lab.fix(node, "plugin_hang")
    options = dp.DEVICE_PLUGIN.stub(grpc_channel(socket)).GetDevicePluginOptions(dp.Empty(), timeout=10)
    assert options.get_preferred_allocation_available


CRASHES = {
    "nvml_init_failed": "Failed to initialize NVML: Unknown Error.",
    "incompatible_strategy": "Incompatible strategy detected auto",
}


@pytest.mark.parametrize("signature", sorted(CRASHES))
def test_plugin_crash_with_fail_on_init_error(lab: Lab, signature: str) -> None:
    """The collection's config (failOnInitError: true): NVIDIA's plugin exits 1, the kubelet
    restarts it at once, then after its 10 s back-off: CrashLoopBackOff in between."""
    node = lab.add_node("fail")
    pod = lab.wait_registered(node)
    name = pod["metadata"]["name"]
    assert "failOnInitError: true" in lab.get("/api/v1/namespaces/kube-system/configmaps/nvdp-fail-config")["data"]["config.yaml"]
    lab.fault(node, "plugin_crash", signature=signature)
    status = lab.wait_container("kube-system", name, lambda s: s["restartCount"] >= 2
                                and waiting_reason(s) == "CrashLoopBackOff", "two restarts, CrashLoopBackOff")
    assert status["state"]["waiting"]["message"].startswith(
        "back-off 20s restarting failed container=%s pod=%s_kube-system(" % (CONTAINER, name))
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert status["lastState"]["terminated"]["reason"] == "Error"
    previous = lab.log("kube-system", name, container=CONTAINER, previous="true")
    assert CRASHES[signature] in messages(previous)
    assert REGISTERED not in messages(previous)
    # waiting in CrashLoopBackOff, the log is that of the run that just ended: previous's (lastState)
    assert lab.log("kube-system", name) == previous
    lab.wait_gpus(node, "2", "0")  # the stream ended: capacity kept, allocatable 0


def test_plugin_crash_fix_clears_it(lab: Lab) -> None:
    """fix: the next start of the crash-looping container is healthy."""
    node = lab.add_node("fail")
    name = lab.wait_registered(node)["metadata"]["name"]
    lab.fault(node, "plugin_crash", signature="nvml_init_failed")
    lab.wait_container("kube-system", name, lambda s: s["restartCount"] >= 1 and waiting_reason(s) == "CrashLoopBackOff",
                       "CrashLoopBackOff")
    lab.wait_gpus(node, "2", "0")
    lab.fix(node, "plugin_crash")
    # the restart after the 10 s back-off
    status = lab.wait_container("kube-system", name, lambda s: "running" in s["state"], "the container running again")
    assert status["restartCount"] == 2
    lab.wait_log("kube-system", name, REGISTERED)
    lab.wait_gpus(node, "2", "2")
    assert "plugin_crash" not in lab.summary(node)["faults"]


def test_plugin_crash_registration_failed(lab: Lab) -> None:
    """The kubelet refuses the plugin's Register: NVIDIA's plugin logs it and retries every 30 s,
    it does not exit (failOnInitError covers NVML only), so the pod stays Running."""
    node = lab.add_node("fail")
    pod = lab.wait_registered(node)
    name = pod["metadata"]["name"]
    lab.fault(node, "plugin_crash", signature="registration_failed")
    log = lab.wait_log("kube-system", name, "Failed to start one or more plugins. Retrying in 30s...")
    lines = messages(log)
    assert any(line.startswith("Could not register device plugin: rpc error: code = Unknown desc = "
                               "failed to dial device plugin: context deadline exceeded") for line in lines), lines
    lab.wait_gpus(node, "2", "0")  # its stream ended when it restarted its servers
    status = lab.container_status("kube-system", name)
    assert "running" in status["state"] and status["restartCount"] == 0
    # the collection's safe remediation: delete the plugin pod; the fault goes with it
    lab.request("DELETE", "/api/v1/namespaces/kube-system/pods/%s" % name)
    lab.plugin_pod(node, not_uid=pod["metadata"]["uid"])
    lab.wait_gpus(node, "2", "2", timeout=90)
    assert "plugin_crash" not in lab.summary(node)["faults"]


@needs_static
def test_plugin_crash_without_fail_on_init_error_waits(lab: Lab) -> None:
    """NVIDIA's static manifest (FAIL_ON_INIT_ERROR=false): the restarted plugin waits."""
    node = lab.add_node("static")
    name = lab.wait_registered(node)["metadata"]["name"]
    lab.fault(node, "plugin_crash", signature="nvml_init_failed")
    log = messages(lab.wait_log("kube-system", name, WAITING))
    assert "Failed to initialize NVML: Unknown Error." in log
    assert log.index("Failed to initialize NVML: Unknown Error.") < log.index(WAITING)
    lab.wait_gpus(node, "2", "0")
    time.sleep(2)
    status = lab.container_status("kube-system", name)
    assert "running" in status["state"] and status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 137  # the fault killed the running container


@needs_static
def test_plugin_no_devices(lab: Lab) -> None:
    node = lab.add_node("static")
    name = lab.wait_registered(node)["metadata"]["name"]
    lab.fault(node, "plugin_no_devices")
    log = messages(lab.wait_log("kube-system", name, WAITING))
    assert "Failed to initialize NVML: Unknown Error." not in log
    lab.wait_gpus(node, "2", "0")
    assert lab.container_status("kube-system", name)["restartCount"] == 1
    # a pod-scoped fault: the plugin pod's replacement is healthy
    uid = lab.pod("kube-system", name)["metadata"]["uid"]
    lab.request("DELETE", "/api/v1/namespaces/kube-system/pods/%s" % name)
    lab.plugin_pod(node, not_uid=uid)
    lab.wait_gpus(node, "2", "2", timeout=90)
    assert lab.summary(node)["faults"] == {}


@needs_static
def test_stale_socket_file(lab: Lab) -> None:
    node = lab.add_node("static")
    name = lab.wait_registered(node)["metadata"]["name"]
    socket = lab.layout(node).plugin_socket()
    lab.fault(node, "stale_socket_file")
    assert os.path.isfile(socket) and not stat.S_ISSOCK(os.lstat(socket).st_mode)
    with pytest.raises(grpc.RpcError) as refused:
        dp.DEVICE_PLUGIN.stub(grpc_channel(socket)).GetDevicePluginOptions(dp.Empty(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    time.sleep(2.5)  # the kubelet's open stream keeps the Node advertising
    assert lab.gpus(node) == ("2", "2")
    lab.fix(node, "stale_socket_file")
    wait_for(lambda: messages(lab.log("kube-system", name)).count(REGISTERED) == 2, 60, "the plugin serving anew")
    assert stat.S_ISSOCK(os.lstat(socket).st_mode)
    options = dp.DEVICE_PLUGIN.stub(grpc_channel(socket)).GetDevicePluginOptions(dp.Empty(), timeout=10)
    assert options.get_preferred_allocation_available
    lab.wait_gpus(node, "2", "2")


def test_runtime_missing_nvidia_and_the_pod_sandbox(lab: Lab) -> None:
    node = lab.add_node("fail")
    old = lab.wait_registered(node)
    layout = lab.layout(node)
    lab.fault(node, "runtime_missing_nvidia")
    assert containerd_has_nvidia(layout) == (False, False)
    time.sleep(2.5)  # the running plugin keeps the sandbox it has: still registered
    assert lab.gpus(node) == ("2", "2")
    # a new pod's sandbox gets no injection
    lab.request("DELETE", "/api/v1/namespaces/kube-system/pods/%s" % old["metadata"]["name"])
    new = lab.plugin_pod(node, not_uid=old["metadata"]["uid"])
    name = new["metadata"]["name"]
    lab.wait_log("kube-system", name, "Incompatible strategy detected auto")
    lab.wait_container("kube-system", name, lambda s: s["restartCount"] >= 1, "a restart")
    lab.fix(node, "runtime_missing_nvidia")
    assert containerd_has_nvidia(layout) == (True, True)
    # the crash-looping pod keeps its sandbox: its next run, after the fix, still has no driver
    restarts = lab.container_status("kube-system", name)["restartCount"]
    status = lab.wait_container("kube-system", name, lambda s: s["restartCount"] > restarts
                                and waiting_reason(s) == "CrashLoopBackOff", "the next run to crash", timeout=90)
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert "Incompatible strategy detected auto" in messages(lab.log("kube-system", name, previous="true"))
    assert lab.gpus(node) == ("2", "0")
    # until it is deleted: its replacement registers
    uid = new["metadata"]["uid"]
    lab.request("DELETE", "/api/v1/namespaces/kube-system/pods/%s" % name)
    replacement = lab.plugin_pod(node, not_uid=uid)
    lab.wait_log("kube-system", replacement["metadata"]["name"], REGISTERED)
    lab.wait_gpus(node, "2", "2")


def test_time_slicing_config_in_a_config_map(lab: Lab) -> None:
    node = lab.add_node("ts")
    pod = lab.wait_registered(node, count=8)  # 2 GPUs x 4 replicas
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["plugin-config"]["configMap"]["name"] == "nvdp-ts-config"
    uuids = lab.uuids(node)
    replicas = ["%s::%d" % (u, n) for u in uuids for n in range(4)]
    assert sorted(lab.checkpoint(node)["Data"]["RegisteredDevices"][GPU]) == sorted(replicas)
    lister = pr.POD_RESOURCES_LISTER.stub(grpc_channel(lab.layout(node).pod_resources_socket))
    allocatable = lister.GetAllocatableResources(pr.AllocatableResourcesRequest(), timeout=10)
    assert sorted(i for d in allocatable.devices for i in d.device_ids) == sorted(replicas)
    log = lab.log("kube-system", pod["metadata"]["name"])
    assert '"replicas": 4' in log  # NVIDIA's plugin prints the config it runs with


def test_unknown_image_tag_cannot_be_pulled(lab: Lab) -> None:
    node = lab.add_node("badtag")
    pod = lab.plugin_pod(node)
    name = pod["metadata"]["name"]
    reference = "nvcr.io/nvidia/k8s-device-plugin:%s" % MISSING_TAG
    not_found = ('rpc error: code = NotFound desc = failed to pull and unpack image "%s": failed to resolve reference '
                 '"%s": %s: not found' % (reference, reference, reference))
    seen: List[str] = []

    def reasons() -> bool:
        waiting = lab.container_status("kube-system", name).get("state", {}).get("waiting") or {}
        if waiting.get("reason") and (not seen or seen[-1] != waiting["reason"]):
            seen.append(waiting["reason"])
            if waiting["reason"] == "ErrImagePull":
                assert waiting["message"] == not_found
            if waiting["reason"] == "ImagePullBackOff":
                assert waiting["message"] == 'Back-off pulling image "%s": ErrImagePull: %s' % (reference, not_found)
        return "ImagePullBackOff" in seen

    wait_for(reasons, 60, "ImagePullBackOff", step=0.1)
    assert "ErrImagePull" in seen and seen.index("ErrImagePull") < seen.index("ImagePullBackOff")
    events = lab.get("/api/v1/namespaces/kube-system/events", fieldSelector="involvedObject.uid=%s" % pod["metadata"]["uid"])
    assert 'Failed to pull image "%s": %s' % (reference, not_found) in [e["message"] for e in events["items"]]
    # the kubelet's log endpoint for a container that never ran (its texts per waiting reason)
    why = {"ErrImagePull": "image can't be pulled", "ImagePullBackOff": "trying and failing to pull image"}

    def answer() -> Optional[Tuple[str, ApiFailure]]:
        before = lab.container_status("kube-system", name)["state"]["waiting"]["reason"]
        with pytest.raises(ApiFailure) as waiting:
            lab.log("kube-system", name)
        after = lab.container_status("kube-system", name)["state"]["waiting"]["reason"]
        return (before, waiting.value) if before == after else None

    reason, failure = wait_for(answer, 30, "a log answer while the reason holds")
    assert failure.status == 400
    assert failure.message == 'container "%s" in pod "%s" is waiting to start: %s' % (CONTAINER, name, why[reason])
    assert lab.gpus(node) == (None, None)


@needs_static
def test_kubelet_log_endpoint(lab: Lab) -> None:
    node = lab.add_node("static")
    name = lab.wait_registered(node)["metadata"]["name"]
    full = lab.log("kube-system", name)
    lines = full.splitlines()
    assert lab.log("kube-system", name, tailLines=2) == "\n".join(lines[-2:]) + "\n"
    assert lab.log("kube-system", name, limitBytes=10) == full[:10]
    stamped = lab.log("kube-system", name, timestamps="true", tailLines=1).rstrip("\n")
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z %s$" % re.escape(lines[-1]), stamped), stamped
    with pytest.raises(ApiFailure) as no_previous:
        lab.log("kube-system", name, previous="true")
    assert no_previous.value.status == 400
    assert no_previous.value.message == 'previous terminated container "%s" in pod "%s" not found' % (CONTAINER, name)
    # after a restart, previous is the first run's log
    lab.fault(node, "plugin_no_devices")
    lab.wait_log("kube-system", name, WAITING)
    previous = lab.log("kube-system", name, previous="true")
    assert previous == full or previous.startswith(full)
    assert REGISTERED in messages(previous) and WAITING not in messages(previous)
    assert REGISTERED not in messages(lab.log("kube-system", name))
    with pytest.raises(ApiFailure) as unknown:
        lab.log("kube-system", name, container="nope")
    assert unknown.value.status == 400
    assert "container nope is not valid for pod %s" % name in unknown.value.message


@needs_static
def test_smoke_pod_sees_exactly_its_gpu(lab: Lab) -> None:
    node = lab.add_node("static")
    lab.wait_registered(node)
    pod = lab.create("/api/v1/namespaces/default/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "smoke-%s" % node, "namespace": "default"},
        "spec": {"restartPolicy": "Never", "nodeSelector": {"kubernetes.io/hostname": node},
                 "containers": [{"name": "smoke", "image": CUDA_IMAGE, "command": ["nvidia-smi", "-L"],
                                 "resources": {"limits": {GPU: "1"}}}]}})
    name = pod["metadata"]["name"]
    wait_for(lambda: lab.pod("default", name)["status"].get("phase") in ("Succeeded", "Failed"), 90, "the smoke pod to end")
    done = lab.pod("default", name)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["spec"]["nodeName"] == node  # bound by the scheduler
    entries = lab.checkpoint(node)["Data"]["PodDeviceEntries"]
    entry = next(e for e in entries if e["PodUID"] == done["metadata"]["uid"])
    allocated = [d for ids in entry["DeviceIDs"].values() for d in ids]
    assert len(allocated) == 1 and allocated[0] in lab.uuids(node)
    response = dp.ContainerAllocateResponse.FromString(base64.b64decode(entry["AllocResp"]))
    assert response.envs["NVIDIA_VISIBLE_DEVICES"] == allocated[0]  # NVIDIA's Allocate, deviceListStrategy envvar
    gpu = next(g for g in nvml_state.read_state(lab.layout(node).nvml_state)["gpus"] if g["uuid"] == allocated[0])
    assert lab.log("default", name) == "GPU 0: %s (UUID: %s)\n" % (gpu["name"], allocated[0])
    # the kubelet's events, as kubectl describe shows them
    events = lab.request("GET", "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%%3D%s" % name)
    kubelet = {(e["reason"], e["message"]) for e in events["items"] if (e.get("source") or {}).get("component") == "kubelet"}
    assert kubelet >= {("Pulled", 'Container image "%s" already present on machine' % CUDA_IMAGE),
                       ("Created", "Created container: smoke"), ("Started", "Started container smoke")}, kubelet
    lab.request("DELETE", "/api/v1/namespaces/default/pods/%s" % name, {"gracePeriodSeconds": 0})


def test_unknown_fault_node_and_arguments(lab: Lab) -> None:
    node = lab.add_node("bare")
    with pytest.raises(FaultError, match=r"^no node 'nope' in this lab \(nodes: "):
        lab.fault("nope", "plugin_hang")
    with pytest.raises(FaultError, match=r"^unknown fault 'no_such_fault' \(known: plugin_crash, "):
        lab.fault(node, "no_such_fault")
    with pytest.raises(FaultError, match=r"^unknown fault 'no_such_fault'"):
        lab.fix(node, "no_such_fault")
    with pytest.raises(FaultError, match=r"^plugin_crash signature must be one of nvml_init_failed, "
                                         r"incompatible_strategy, registration_failed, got 'bogus'$"):
        lab.fault(node, "plugin_crash", signature="bogus")
    with pytest.raises(FaultError, match=r"^unknown NVML error 'ERROR_BOGUS'"):
        lab.fault(node, "plugin_crash", error="ERROR_BOGUS")
    with pytest.raises(FaultError, match=r"^plugin_stale socket must be 'removed' or 'kept'$"):
        lab.fault(node, "plugin_stale", socket="bogus")
    with pytest.raises(FaultError, match=r"^kubelet_restart after= only knows 'register'$"):
        lab.fault(node, "kubelet_restart", after="bogus")
    assert lab.summary(node)["faults"] == {}
