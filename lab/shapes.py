"""Deployment shapes real GPU clusters have, set up in a lab cluster (``python -m lab up
--scenario <shape>``): who deployed the device plugin, how the node's GPUs are exposed.

Each shape is API objects written by the lab's own identity (the way an operator, a Helm release
or an administrator would have written them) and, for the GPU shapes, the nodes' NVML state. The
controllers, the scheduler and NVIDIA's plugin then do what they do with them. Nothing here
stands in for the GPU Operator's or Helm's logic: no operator reconciles, no chart renders; the
objects are what they leave in a cluster, so the collection can find them and must leave them
alone.

- ``operator``: a namespace shaped like the NVIDIA GPU Operator's: ``gpu-operator``, a
  ``ClusterPolicy`` (``nvidia.com/v1``, cluster-scoped, with a status; the CRD is the lab's
  own, with the fields the collection reads), the plugin DaemonSet
  ``nvidia-device-plugin-daemonset`` owned by it (``ownerReferences``, controller), selecting
  ``nvidia.com/gpu.deploy.device-plugin=true``, ``runtimeClassName: nvidia``, the operator's
  validator DaemonSet, its ServiceAccount, and the operand labels and containerized-driver root
  (``/run/nvidia/driver``) on every node.
- ``helm``: NVIDIA's Helm chart's shape: release ``nvdp`` in namespace ``nvidia-device-plugin``,
  DaemonSet ``nvdp-nvidia-device-plugin`` with Helm's labels and annotations.
- ``two-plugins``: NVIDIA's static manifest in ``kube-system`` and a second plugin DaemonSet
  (another namespace, the same resource) on the same nodes: two plugin processes per node.
- ``mig-single`` / ``mig-mixed``: MIG devices on every GPU of every node (A100 80GB:
  ``1g.10gb`` x7 for single; ``3g.40gb`` + ``2g.20gb`` + ``1g.10gb`` x2 for mixed), nothing
  deployed: the collection deploys the plugin with the matching ``migStrategy``.
- ``time-slicing``: nothing deployed; the plugin config the shape is about is the collection's
  own (``sharing.timeSlicing``).
- ``dra``: the DRA shape: DeviceClass ``gpu.nvidia.com`` and one ResourceSlice per node listing
  its GPUs (driver ``gpu.nvidia.com``), as NVIDIA's DRA driver publishes them, served by the real
  API server's ``resource.k8s.io/v1``; no device plugin, Node capacity 0. (The DRA driver's
  kubelet plugin is not run: the lab publishes the slices in its place.)
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Tuple

OPERATOR_NAMESPACE = "gpu-operator"
HELM_NAMESPACE = "nvidia-device-plugin"
HELM_RELEASE = "nvdp"
SECOND_NAMESPACE = "gpu-plugins-b"
DRA_DRIVER = "gpu.nvidia.com"
DEFAULT_PLUGIN_IMAGE = "nvcr.io/nvidia/k8s-device-plugin:v0.17.4"
OPERATOR_LABELS = {
    "nvidia.com/gpu.present": "true",
    "nvidia.com/gpu.deploy.driver": "true",
    "nvidia.com/gpu.deploy.container-toolkit": "true",
    "nvidia.com/gpu.deploy.device-plugin": "true",
    "nvidia.com/gpu.deploy.gpu-feature-discovery": "true",
    "nvidia.com/gpu.deploy.dcgm-exporter": "true",
    "nvidia.com/gpu.deploy.operator-validator": "true",
}
MIG_LAYOUTS = {
    "mig-single": ["1g.10gb"] * 7,
    "mig-mixed": ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"],
}
SHAPES = ("operator", "helm", "two-plugins", "mig-single", "mig-mixed", "time-slicing", "dra")

Api = Callable[..., Any]  # (method, path, body=None, content_type=..., ok_missing=...) -> answer

DEVICE_PLUGIN_DIR_VOLUME = {"name": "device-plugin", "hostPath": {"path": "/var/lib/kubelet/device-plugins"}}


def node_labels(shape: str) -> Dict[str, str]:
    """Labels the shape's nodes carry (beyond the lab's GPU label)."""
    return dict(OPERATOR_LABELS) if shape == "operator" else {}


CLUSTER_POLICY_CRD: Dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "clusterpolicies.nvidia.com"},
    "spec": {
        "group": "nvidia.com",
        "scope": "Cluster",
        "names": {"plural": "clusterpolicies", "singular": "clusterpolicy", "kind": "ClusterPolicy",
                  "listKind": "ClusterPolicyList"},
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
                    "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {
                        "devicePlugin": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {
                            "enabled": {"type": "boolean"}, "repository": {"type": "string"},
                            "image": {"type": "string"}, "version": {"type": "string"},
                            "config": {"type": "object", "properties": {
                                "name": {"type": "string"}, "default": {"type": "string"}}}}},
                        "driver": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {
                            "enabled": {"type": "boolean"}}},
                        "toolkit": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {
                            "enabled": {"type": "boolean"}}},
                        "mig": {"type": "object", "properties": {"strategy": {"type": "string",
                                                                              "enum": ["none", "single", "mixed"]}}},
                        "operator": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    }},
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {
                        "state": {"type": "string"}, "namespace": {"type": "string"}}},
                },
            }},
        }],
    },
}


# where the lab creates each kind it writes (plural, namespaced)
KINDS: Dict[str, Tuple[str, bool]] = {
    "Namespace": ("namespaces", False), "ServiceAccount": ("serviceaccounts", True),
    "DaemonSet": ("daemonsets", True), "CustomResourceDefinition": ("customresourcedefinitions", False),
    "ClusterPolicy": ("clusterpolicies", False), "DeviceClass": ("deviceclasses", False),
    "ResourceSlice": ("resourceslices", False),
}


def collection_path(obj: Dict[str, Any]) -> str:
    """The collection URL to POST ``obj`` to."""
    plural, namespaced = KINDS[obj["kind"]]
    version = obj["apiVersion"]
    base = "/api/v1" if version == "v1" else "/apis/" + version
    if namespaced:
        base += "/namespaces/%s" % obj["metadata"]["namespace"]
    return "%s/%s" % (base, plural)


def _namespace(name: str) -> Dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def plugin_daemonset(name: str, namespace: str, labels: Dict[str, str], selector: Dict[str, str],
                     container: str = "nvidia-device-plugin-ctr", image: str = DEFAULT_PLUGIN_IMAGE,
                     env: Tuple[Tuple[str, str], ...] = (("FAIL_ON_INIT_ERROR", "false"),),
                     node_selector: Dict[str, str] = None, affinity: Dict[str, Any] = None,
                     extra_pod: Dict[str, Any] = None, metadata: Dict[str, Any] = None) -> Dict[str, Any]:
    pod_spec: Dict[str, Any] = {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "system-node-critical",
        "containers": [{
            "name": container, "image": image,
            "env": [{"name": k, "value": v} for k, v in env],
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "device-plugin", "mountPath": "/var/lib/kubelet/device-plugins"}],
        }],
        "volumes": [DEVICE_PLUGIN_DIR_VOLUME],
    }
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if affinity:
        pod_spec["affinity"] = affinity
    pod_spec.update(extra_pod or {})
    meta: Dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    meta.update(metadata or {})
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta,
        "spec": {"selector": {"matchLabels": dict(selector)}, "updateStrategy": {"type": "RollingUpdate"},
                 "template": {"metadata": {"labels": dict(selector)}, "spec": pod_spec}},
    }


def operator_objects(owner_uid: str) -> List[Dict[str, Any]]:
    """The operator's operands in its namespace, owned by the ClusterPolicy ``owner_uid``."""
    owner = [{"apiVersion": "nvidia.com/v1", "kind": "ClusterPolicy", "name": "cluster-policy", "uid": owner_uid,
              "controller": True, "blockOwnerDeletion": True}]
    plugin = plugin_daemonset(
        "nvidia-device-plugin-daemonset", OPERATOR_NAMESPACE,
        labels={"app": "nvidia-device-plugin-daemonset", "app.kubernetes.io/part-of": "nvidia-gpu",
                "app.kubernetes.io/managed-by": "gpu-operator"},
        selector={"app": "nvidia-device-plugin-daemonset"}, container="nvidia-device-plugin",
        env=(("PASS_DEVICE_SPECS", "true"), ("FAIL_ON_INIT_ERROR", "true"), ("DEVICE_LIST_STRATEGY", "envvar"),
             ("DEVICE_ID_STRATEGY", "uuid"), ("NVIDIA_VISIBLE_DEVICES", "all"),
             ("NVIDIA_DRIVER_CAPABILITIES", "all"), ("MIG_STRATEGY", "single")),
        node_selector={"nvidia.com/gpu.deploy.device-plugin": "true"},
        extra_pod={"runtimeClassName": "nvidia", "serviceAccountName": "nvidia-device-plugin"},
        metadata={"ownerReferences": owner})
    plugin["spec"]["template"]["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "run-nvidia", "mountPath": "/run/nvidia", "mountPropagation": "HostToContainer"})
    plugin["spec"]["template"]["spec"]["volumes"].append({"name": "run-nvidia", "hostPath": {"path": "/run/nvidia",
                                                                                             "type": "Directory"}})
    validator = {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "nvidia-operator-validator", "namespace": OPERATOR_NAMESPACE,
                     "labels": {"app": "nvidia-operator-validator", "app.kubernetes.io/part-of": "gpu-operator"},
                     "ownerReferences": owner},
        "spec": {"selector": {"matchLabels": {"app": "nvidia-operator-validator"}},
                 "template": {"metadata": {"labels": {"app": "nvidia-operator-validator",
                                                      "app.kubernetes.io/part-of": "gpu-operator"}},
                              "spec": {"nodeSelector": {"nvidia.com/gpu.deploy.operator-validator": "true"},
                                       "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                        "effect": "NoSchedule"}],
                                       "priorityClassName": "system-node-critical", "runtimeClassName": "nvidia",
                                       "serviceAccountName": "nvidia-operator-validator",
                                       "containers": [{"name": "nvidia-operator-validator",
                                                       "image": "nvcr.io/nvidia/cloud-native/gpu-operator-validator:v25.3.1",
                                                       "command": ["sh", "-c"],
                                                       "args": ["echo all validations are successful; exec sleep infinity"]}]}}},
    }
    accounts = [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": n, "namespace": OPERATOR_NAMESPACE}}
                for n in ("nvidia-device-plugin", "nvidia-operator-validator")]
    return accounts + [plugin, validator]


def helm_objects() -> List[Dict[str, Any]]:
    labels = {"app.kubernetes.io/name": "nvidia-device-plugin", "app.kubernetes.io/instance": HELM_RELEASE,
              "app.kubernetes.io/version": "0.17.4", "app.kubernetes.io/managed-by": "Helm",
              "helm.sh/chart": "nvidia-device-plugin-0.17.4"}
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "feature.node.kubernetes.io/pci-10de.present", "operator": "In", "values": ["true"]}]},
        {"matchExpressions": [{"key": "feature.node.kubernetes.io/cpu-model.vendor_id", "operator": "In",
                               "values": ["NVIDIA"]}]},
        {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]}]}}}
    daemonset = plugin_daemonset(
        "%s-nvidia-device-plugin" % HELM_RELEASE, HELM_NAMESPACE, labels=labels,
        selector={"app.kubernetes.io/name": "nvidia-device-plugin", "app.kubernetes.io/instance": HELM_RELEASE},
        env=(("MPS_ROOT", "/run/nvidia/mps"), ("NVIDIA_MIG_MONITOR_DEVICES", "all"), ("NVIDIA_VISIBLE_DEVICES", "all"),
             ("NVIDIA_DRIVER_CAPABILITIES", "compute,utility")),
        affinity=affinity,
        metadata={"annotations": {"meta.helm.sh/release-name": HELM_RELEASE,
                                  "meta.helm.sh/release-namespace": HELM_NAMESPACE}})
    return [daemonset]


def second_plugin_objects() -> List[Dict[str, Any]]:
    first = plugin_daemonset("nvidia-device-plugin-daemonset", "kube-system", labels={},
                             selector={"name": "nvidia-device-plugin-ds"})
    second = plugin_daemonset("gpu-plugin-b", SECOND_NAMESPACE, labels={"app": "gpu-plugin-b"},
                              selector={"app": "gpu-plugin-b"})
    return [first, second]


def dra_objects(nodes: List[Tuple[str, List[Dict[str, Any]]]]) -> List[Dict[str, Any]]:
    """DeviceClass and one ResourceSlice per node (``nodes``: name and its NVML GPUs)."""
    objects: List[Dict[str, Any]] = [{
        "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass", "metadata": {"name": DRA_DRIVER},
        "spec": {"selectors": [{"cel": {"expression": "device.driver == '%s'" % DRA_DRIVER}}]}}]
    for node, gpus in nodes:
        devices = []
        for index, gpu in enumerate(gpus):
            devices.append({
                "name": "gpu-%d" % index,
                "attributes": {
                    "type": {"string": "gpu"}, "uuid": {"string": gpu.get("uuid", "")},
                    "productName": {"string": gpu.get("name", "")}, "index": {"int": index},
                    "driverVersion": {"version": "550.54.15"},
                },
                "capacity": {"memory": {"value": "%dMi" % (int(gpu.get("memory_total", 0)) // (1024 * 1024))}},
            })
        objects.append({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "metadata": {"name": "%s-%s" % (node, DRA_DRIVER.replace(".", "-"))},
            "spec": {"driver": DRA_DRIVER, "nodeName": node,
                     "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
                     "devices": devices}})
    return objects


def apply_shape(shape: str, api: Api, nodes: List[Tuple[str, List[Dict[str, Any]]]],
                wait: Callable[[str, Callable[[], bool], float], None]) -> List[str]:
    """Write the shape's API objects; the names of what was created. ``api(method, path, body,
    ok_missing=...)`` is the lab's client; ``wait(what, predicate, timeout)`` polls."""
    created: List[str] = []

    def create(obj: Dict[str, Any]) -> Dict[str, Any]:
        answer = api("POST", collection_path(obj), obj)
        meta = obj["metadata"]
        created.append("%s %s%s" % (obj["kind"], meta.get("namespace", "") + "/" if meta.get("namespace") else "",
                                    meta["name"]))
        return answer or {}

    if shape == "operator":
        create(_namespace(OPERATOR_NAMESPACE))
        create(CLUSTER_POLICY_CRD)

        def established() -> bool:
            crd = api("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/clusterpolicies.nvidia.com",
                      ok_missing=True) or {}
            return any(c.get("type") == "Established" and c.get("status") == "True"
                       for c in (crd.get("status") or {}).get("conditions") or [])

        wait("the ClusterPolicy CRD established", established, 30.0)

        def served() -> bool:
            try:
                return api("GET", "/apis/nvidia.com/v1/clusterpolicies", ok_missing=True) is not None
            except Exception:  # noqa: BLE001 - 429 "storage is (re)initializing" right after the CRD
                return False

        wait("the nvidia.com/v1 API served", served, 30.0)
        policy = create({"apiVersion": "nvidia.com/v1", "kind": "ClusterPolicy", "metadata": {"name": "cluster-policy"},
                         "spec": {"operator": {"defaultRuntime": "containerd"},
                                  "driver": {"enabled": True}, "toolkit": {"enabled": True},
                                  "devicePlugin": {"enabled": True, "repository": "nvcr.io/nvidia",
                                                   "image": "k8s-device-plugin", "version": "v0.17.4"},
                                  "mig": {"strategy": "single"}}})
        api("PATCH", "/apis/nvidia.com/v1/clusterpolicies/cluster-policy/status",
            {"status": {"state": "ready", "namespace": OPERATOR_NAMESPACE}}, content_type="application/merge-patch+json")
        for obj in operator_objects(policy["metadata"]["uid"]):
            create(obj)
    elif shape == "helm":
        create(_namespace(HELM_NAMESPACE))
        for obj in helm_objects():
            create(obj)
    elif shape == "two-plugins":
        create(_namespace(SECOND_NAMESPACE))
        for obj in second_plugin_objects():
            create(obj)
    elif shape == "dra":
        for obj in dra_objects(nodes):
            create(obj)
    return created


def prepare_node_root(shape: str, root: str, lab_nvml: str) -> None:
    """What the shape puts on a node's disk: the operator's containerized driver root."""
    if shape != "operator":
        return
    lib_dir = os.path.join(root, "run", "nvidia", "driver", "usr", "lib", "x86_64-linux-gnu")
    os.makedirs(lib_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "run", "nvidia", "validations"), exist_ok=True)
    target = os.path.join(lib_dir, "libnvidia-ml.so.1")
    if not os.path.lexists(target):
        os.symlink(lab_nvml, target)
    for name in ("driver-ready", "toolkit-ready", "cuda-ready", "plugin-ready"):
        open(os.path.join(root, "run", "nvidia", "validations", name), "a").close()
