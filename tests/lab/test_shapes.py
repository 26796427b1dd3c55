"""The deployment shapes of lab/shapes.py on the real control plane, with NVIDIA's real plugin:
what each leaves in the cluster (owners, labels, names), and what the plugin and the Node make of
the GPU shapes (MIG mixed and single, two plugins on one node, DRA ResourceSlices)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / "tests" / "integration", ROOT / ".build", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from lab_fleet import LabFleet  # noqa: E402

from lab import nvml_state  # noqa: E402

pytestmark = pytest.mark.skipif(not (ROOT / ".build" / "lab" / "bin" / "kube-lab").exists(),
                                reason="the lab's control plane is not built (make lab)")


def node(fleet: LabFleet, name: str = "gpu-node-01") -> Dict[str, Any]:
    return fleet.api("/api/v1/nodes/%s" % name)


def wait_allocatable(fleet: LabFleet, want: Dict[str, str], timeout: float = 90.0) -> Dict[str, str]:
    """The Node's extended resources once they equal ``want`` (the kubelet's status period is
    2 s in these fleets)."""
    deadline = time.monotonic() + timeout
    while True:
        status = node(fleet)["status"]
        extended = {k: v for k, v in status["allocatable"].items() if "/" in k}
        if extended == want and {k: v for k, v in status["capacity"].items() if "/" in k} == want:
            return extended
        if time.monotonic() > deadline:
            raise AssertionError("allocatable %s, want %s; pods: %s" % (
                extended, want, fleet.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout))
        time.sleep(0.5)


def shape(name: str, gpus: int = 2) -> Iterator[LabFleet]:
    # the kubelet's nodeStatusUpdateFrequency at 2 s: the tests wait on the Node several times
    fleet = LabFleet(nodes=1, gpus=gpus, scenario=name, node_status_update_frequency=2).up()
    try:
        yield fleet
    finally:
        fleet.down()


@pytest.fixture(scope="module")
def operator() -> Iterator[LabFleet]:
    yield from shape("operator")


@pytest.fixture(scope="module")
def helm() -> Iterator[LabFleet]:
    yield from shape("helm")


def test_operator_shape_owns_the_plugin_through_its_cluster_policy(operator: LabFleet) -> None:
    policy = operator.api("/apis/nvidia.com/v1/clusterpolicies/cluster-policy")
    assert policy["status"] == {"state": "ready", "namespace": "gpu-operator"}
    ds = operator.api("/apis/apps/v1/namespaces/gpu-operator/daemonsets/nvidia-device-plugin-daemonset")
    owners = ds["metadata"]["ownerReferences"]
    assert owners == [{"apiVersion": "nvidia.com/v1", "kind": "ClusterPolicy", "name": "cluster-policy",
                       "uid": policy["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    template = ds["spec"]["template"]["spec"]
    assert template["nodeSelector"] == {"nvidia.com/gpu.deploy.device-plugin": "true"}
    assert template["runtimeClassName"] == "nvidia"
    labels = node(operator)["metadata"]["labels"]
    assert labels["nvidia.com/gpu.deploy.device-plugin"] == "true" and labels["nvidia.com/gpu.present"] == "true"
    # the real plugin runs under the RuntimeClass's nvidia handler and registers
    assert wait_allocatable(operator, {"nvidia.com/gpu": "2"}) == {"nvidia.com/gpu": "2"}
    logs = operator.kubectl("logs", "-n", "gpu-operator", "-l", "app=nvidia-device-plugin-daemonset").stdout
    assert "Registered device plugin for 'nvidia.com/gpu' with Kubelet" in logs
    validator = operator.kubectl("logs", "-n", "gpu-operator", "-l", "app=nvidia-operator-validator").stdout
    assert "all validations are successful" in validator
    # the containerized driver's root on the node: the driver library under /run/nvidia/driver
    root = operator.node_root("gpu-node-01")
    assert (root / "run/nvidia/driver/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1").exists()


def test_operator_shape_the_garbage_collector_follows_the_owner(operator: LabFleet) -> None:
    """The ownerReference is real: the ClusterPolicy's deletion takes its DaemonSets with it
    (the last test of the module: it dismantles the shape)."""
    operator.api("/apis/nvidia.com/v1/clusterpolicies/cluster-policy", "DELETE",
                 {"propagationPolicy": "Foreground"})
    deadline = time.monotonic() + 60
    while operator.api("/apis/apps/v1/namespaces/gpu-operator/daemonsets", "GET")["items"]:
        assert time.monotonic() < deadline, "the DaemonSets outlived their ClusterPolicy"
        time.sleep(0.5)


def test_helm_shape_has_helms_names_labels_and_annotations(helm: LabFleet) -> None:
    ds = helm.api("/apis/apps/v1/namespaces/nvidia-device-plugin/daemonsets/nvdp-nvidia-device-plugin")
    meta = ds["metadata"]
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert meta["labels"]["helm.sh/chart"] == "nvidia-device-plugin-0.17.4"
    assert meta["annotations"]["meta.helm.sh/release-name"] == "nvdp"
    assert meta["annotations"]["meta.helm.sh/release-namespace"] == "nvidia-device-plugin"
    assert wait_allocatable(helm, {"nvidia.com/gpu": "2"}) == {"nvidia.com/gpu": "2"}


def test_two_plugins_run_two_processes_on_one_node() -> None:
    for fleet in shape("two-plugins"):
        wait_allocatable(fleet, {"nvidia.com/gpu": "2"})
        pods = fleet.api("/api/v1/pods?fieldSelector=spec.nodeName%3Dgpu-node-01")["items"]
        plugins = sorted("%s/%s" % (p["metadata"]["namespace"], p["metadata"]["labels"].get("app") or
                                    p["metadata"]["labels"].get("name")) for p in pods)
        assert plugins == ["gpu-plugins-b/gpu-plugin-b", "kube-system/nvidia-device-plugin-ds"]
        pids = {p["metadata"]["name"]: p for p in pods}
        assert all(p["status"]["phase"] == "Running" for p in pids.values())
        # both are NVIDIA's plugin, each its own process, registering the same resource
        for pod in pods:
            log = fleet.kubectl("logs", "-n", pod["metadata"]["namespace"], pod["metadata"]["name"]).stdout
            assert "Registered device plugin for 'nvidia.com/gpu' with Kubelet" in log, log


def deploy_collection_plugin(fleet: LabFleet, config: Dict[str, Any]) -> None:
    """The ConfigMap and DaemonSet the collection's device_plugin module renders for ``config``."""
    from ansible_collections.gpunode.bringup.plugins.module_utils._device_plugin import (
        config_text,
        render_config_map,
        render_daemonset,
        spec_from_params,
    )

    spec = spec_from_params({"config": config})
    text = config_text(spec.config)
    fleet.apply(render_config_map(spec, text))
    fleet.apply(render_daemonset(spec, text))


def test_mig_mixed_advertises_each_profile() -> None:
    for fleet in shape("mig-mixed"):
        deploy_collection_plugin(fleet, {"mig_strategy": "mixed"})
        # 2 A100s, each 3g.40gb + 2g.20gb + 2 x 1g.10gb: NVIDIA's plugin names each profile
        assert wait_allocatable(fleet, {"nvidia.com/mig-3g.40gb": "2", "nvidia.com/mig-2g.20gb": "2",
                                        "nvidia.com/mig-1g.10gb": "4"})
        state = nvml_state.read_state(str(fleet.node_root("gpu-node-01") / "nvml.state"))
        profiles = sorted(m["profile"] for g in state["gpus"] for m in g["mig_devices"])
        assert profiles == ["1g.10gb"] * 4 + ["2g.20gb"] * 2 + ["3g.40gb"] * 2


def test_mig_single_serves_mig_devices_as_gpus() -> None:
    for fleet in shape("mig-single"):
        deploy_collection_plugin(fleet, {"mig_strategy": "single"})
        # 2 A100s, 7 x 1g.10gb each, all served as nvidia.com/gpu
        assert wait_allocatable(fleet, {"nvidia.com/gpu": "14"})


def test_dra_shape_publishes_resource_slices_and_no_capacity() -> None:
    for fleet in shape("dra", gpus=4):
        slices = fleet.api("/apis/resource.k8s.io/v1/resourceslices")["items"]
        assert [s["spec"]["nodeName"] for s in slices] == ["gpu-node-01"]
        state = nvml_state.read_state(str(fleet.node_root("gpu-node-01") / "nvml.state"))
        uuids = [d["attributes"]["uuid"]["string"] for d in slices[0]["spec"]["devices"]]
        assert uuids == [g["uuid"] for g in state["gpus"]]
        assert slices[0]["spec"]["driver"] == "gpu.nvidia.com"
        assert fleet.api("/apis/resource.k8s.io/v1/deviceclasses/gpu.nvidia.com")["metadata"]["name"] == "gpu.nvidia.com"
        # no device plugin: the Node advertises no GPU, which is right under DRA
        assert {k for k in node(fleet)["status"]["capacity"] if "/" in k} == set()


def test_shapes_are_listed_by_the_cli() -> None:
    text = (ROOT / "docs" / "LAB.md").read_text()
    from lab.shapes import SHAPES

    for name in SHAPES:
        assert "`%s`" % name in text, "docs/LAB.md does not describe the shape %s" % name
