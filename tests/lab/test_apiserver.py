"""The lab Kubernetes API server, through the official Python client (typed and dynamic) and kubectl."""
from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, List, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client as k8s  # noqa: E402
from kubernetes import watch as k8s_watch  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402
from kubernetes.dynamic import DynamicClient  # noqa: E402

from lab.apiserver import LabApiServer  # noqa: E402
from lab.contracts import NodeSpec, PluginPodStatus  # noqa: E402

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


def wait_for(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.02)


class FakeRuntime:
    """Records start/stop calls; reports each started pod Running+Ready (unless told otherwise)."""

    def __init__(self) -> None:
        self.calls: List[tuple] = []
        self.lock = threading.Lock()
        self.store: Any = None
        self.auto_ready = True

    def start_plugin_pod(self, node: str, pod: Dict[str, Any]) -> None:
        meta = pod["metadata"]
        with self.lock:
            self.calls.append(("start", node, meta["name"]))
        if self.auto_ready:
            self.store.update_pod_status(meta["namespace"], meta["name"],
                                         PluginPodStatus(running=True, ready=True, started_at="2026-01-01T00:00:00Z"))

    def stop_plugin_pod(self, node: str, pod_name: str) -> None:
        with self.lock:
            self.calls.append(("stop", node, pod_name))

    def pod_log(self, node: str, pod_name: str, tail_lines: Optional[int] = None) -> str:
        lines = ["%s line %d\n" % (pod_name, i) for i in range(10)]
        return "".join(lines[-tail_lines:] if tail_lines else lines)

    def started(self, node: Optional[str] = None) -> List[str]:
        with self.lock:
            return [c[2] for c in self.calls if c[0] == "start" and (node is None or c[1] == node)]

    def stopped(self) -> List[str]:
        with self.lock:
            return [c[2] for c in self.calls if c[0] == "stop"]


@pytest.fixture(scope="module")
def runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: Any, runtime: FakeRuntime) -> Any:
    state = tmp_path_factory.mktemp("apiserver")
    server = LabApiServer(str(state))
    runtime.store = server.store
    server.attach_runtime(runtime)
    server.store.add_nodes([NodeSpec(name="node-%d" % i, root=str(state), labels={"lab/pool": "base"})
                            for i in range(3)])
    server.start()
    server.kubeconfig = server.write_kubeconfig(str(state / "kubeconfig"))
    yield server
    server.stop()


def make_api_client(kubeconfig: str, retries: Any = None) -> Any:
    cfg = k8s.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    if retries is not None:
        cfg.retries = retries
    return k8s.ApiClient(cfg)


@pytest.fixture(scope="module")
def api(lab: Any) -> Any:
    return make_api_client(lab.kubeconfig)


@pytest.fixture(scope="module")
def core(api: Any) -> Any:
    return k8s.CoreV1Api(api)


@pytest.fixture(scope="module")
def apps(api: Any) -> Any:
    return k8s.AppsV1Api(api)


@pytest.fixture(scope="module")
def dyn(api: Any, tmp_path_factory: Any) -> Any:
    return DynamicClient(api, cache_file=str(tmp_path_factory.mktemp("dyn") / "discovery.json"))


def kubectl(lab: Any, *args: str, check: bool = True, kubeconfig: Optional[str] = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, KUBECONFIG=kubeconfig or lab.kubeconfig, HOME=os.path.dirname(lab.kubeconfig))
    proc = subprocess.run([KUBECTL, *args], capture_output=True, text=True, timeout=30, env=env)
    if check and proc.returncode != 0:
        raise AssertionError("kubectl %s failed (%d): %s" % (" ".join(args), proc.returncode, proc.stderr))
    return proc


def status_body(exc: ApiException) -> Dict[str, Any]:
    return json.loads(exc.body)


def raw_get(lab: Any, path: str, token: Optional[str] = "lab", method: str = "GET", body: Any = None) -> Any:
    ctx = ssl.create_default_context(cafile=lab.ca_file)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + (lab.token if token == "lab" else token)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(lab.url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def ensure_ns(core: Any, name: str) -> None:
    try:
        core.create_namespace({"metadata": {"name": name}})
    except ApiException as exc:
        if exc.status != 409:
            raise


def daemonset(name: str, node_selector: Dict[str, str], tolerations: Optional[list] = None,
              affinity: Optional[dict] = None, image: str = "nvcr.io/nvidia/k8s-device-plugin:v0.17.0") -> dict:
    spec: Dict[str, Any] = {"nodeSelector": node_selector,
                            "containers": [{"name": "nvidia-device-plugin-ctr", "image": image}]}
    if tolerations is not None:
        spec["tolerations"] = tolerations
    if affinity is not None:
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": affinity}}
    return {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": spec}}}


def ds_pods(core: Any, ns: str, name: str) -> Dict[str, str]:
    """node -> pod name for the DaemonSet's pods."""
    pods = core.list_namespaced_pod(ns, label_selector="app=%s" % name).items
    return {p.spec.node_name: p.metadata.name for p in pods}


def ds_status(apps: Any, ns: str, name: str) -> Any:
    return apps.read_namespaced_daemon_set(name, ns).status


def add_nodes(lab: Any, prefix: str, count: int, labels: Dict[str, str],
              taints: Optional[List[Dict[str, str]]] = None) -> List[str]:
    specs = [NodeSpec(name="%s-%d" % (prefix, i), root="/nonexistent", labels=dict(labels),
                      taints=list(taints or [])) for i in range(count)]
    lab.store.add_nodes(specs)
    return [s.name for s in specs]


# --- auth and discovery -------------------------------------------------------------------------
def test_missing_or_wrong_token_is_401_with_status(lab: Any, tmp_path: Any) -> None:
    code, body = raw_get(lab, "/api/v1/nodes", token=None)
    assert code == 401
    assert body == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
    bad = lab.write_kubeconfig(str(tmp_path / "bad"), token="wrong")
    with pytest.raises(ApiException) as err:
        k8s.CoreV1Api(make_api_client(bad)).list_node()
    assert err.value.status == 401 and status_body(err.value)["reason"] == "Unauthorized"


@needs_kubectl
def test_kubectl_wrong_token(lab: Any, tmp_path: Any) -> None:
    bad = lab.write_kubeconfig(str(tmp_path / "bad"), token="wrong")
    proc = kubectl(lab, "get", "nodes", check=False, kubeconfig=bad)
    assert proc.returncode != 0 and "You must be logged in to the server" in proc.stderr


def test_discovery_documents(lab: Any, api: Any, dyn: Any) -> None:
    assert k8s.VersionApi(api).get_code().git_version.startswith("v1.32")
    groups = {g.name for g in k8s.ApisApi(api).get_api_versions().groups}
    assert {"apps", "coordination.k8s.io", "node.k8s.io"} <= groups
    for api_version, kind in (("v1", "Node"), ("v1", "Pod"), ("apps/v1", "DaemonSet"), ("v1", "ConfigMap"),
                              ("coordination.k8s.io/v1", "Lease"), ("v1", "Event"), ("v1", "Namespace"),
                              ("node.k8s.io/v1", "RuntimeClass")):
        assert dyn.resources.get(api_version=api_version, kind=kind).kind == kind
    code, doc = raw_get(lab, "/apis/apps/v1")
    names = {r["name"] for r in doc["resources"]}
    assert code == 200 and {"daemonsets", "daemonsets/status"} <= names
    code, doc = raw_get(lab, "/api/v1")
    assert {"pods/log", "pods/status", "nodes/status"} <= {r["name"] for r in doc["resources"]}
    assert raw_get(lab, "/apis/nope/v1")[0] == 404


# --- CRUD and errors ------------------------------------------------------------------------------
def test_crud_and_status_bodies(core: Any) -> None:
    ensure_ns(core, "crud")
    cm = core.create_namespaced_config_map("crud", {"metadata": {"name": "cfg", "labels": {"a": "1"}},
                                                    "data": {"k": "v"}})
    assert cm.metadata.uid and cm.metadata.resource_version and cm.metadata.creation_timestamp
    got = core.read_namespaced_config_map("cfg", "crud")
    assert got.data == {"k": "v"} and got.kind == "ConfigMap" and got.api_version == "v1"
    # AlreadyExists
    with pytest.raises(ApiException) as err:
        core.create_namespaced_config_map("crud", {"metadata": {"name": "cfg"}})
    body = status_body(err.value)
    assert err.value.status == 409 and body["reason"] == "AlreadyExists"
    assert body["details"] == {"name": "cfg", "kind": "configmaps"}
    assert body["message"] == 'configmaps "cfg" already exists'
    # NotFound
    with pytest.raises(ApiException) as err:
        core.read_namespaced_config_map("nope", "crud")
    body = status_body(err.value)
    assert err.value.status == 404 and body["reason"] == "NotFound" and body["kind"] == "Status"
    assert body["status"] == "Failure" and body["details"]["name"] == "nope" and body["code"] == 404
    # PUT with the current resourceVersion, then a stale one -> Conflict
    got.data = {"k": "v2"}
    updated = core.replace_namespaced_config_map("cfg", "crud", got)
    assert int(updated.metadata.resource_version) > int(got.metadata.resource_version)
    got.data = {"k": "v3"}
    with pytest.raises(ApiException) as err:
        core.replace_namespaced_config_map("cfg", "crud", got)
    body = status_body(err.value)
    assert err.value.status == 409 and body["reason"] == "Conflict" and "has been modified" in body["message"]
    # a PUT that changes nothing keeps the resourceVersion
    same = core.replace_namespaced_config_map("cfg", "crud", updated)
    assert same.metadata.resource_version == updated.metadata.resource_version
    # patches: strategic (default for dict bodies), merge, json
    p1 = core.patch_namespaced_config_map("cfg", "crud", {"metadata": {"labels": {"b": "2"}}})
    assert p1.metadata.labels == {"a": "1", "b": "2"}
    p2 = core.patch_namespaced_config_map("cfg", "crud", {"data": {"k": None, "n": "x"}},
                                          _content_type="application/merge-patch+json")
    assert p2.data == {"n": "x"}
    p3 = core.patch_namespaced_config_map("cfg", "crud", [{"op": "add", "path": "/data/j", "value": "y"},
                                                          {"op": "remove", "path": "/metadata/labels/a"}])
    assert p3.data == {"n": "x", "j": "y"} and p3.metadata.labels == {"b": "2"}
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_config_map("cfg", "crud", [{"op": "remove", "path": "/data/missing"}])
    assert err.value.status == 422
    # Invalid: a pod without containers; a bad name
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod("crud", {"metadata": {"name": "p"}, "spec": {"containers": []}})
    body = status_body(err.value)
    assert err.value.status == 422 and body["reason"] == "Invalid"
    assert body["details"]["kind"] == "Pod" and body["details"]["causes"][0]["field"] == "spec.containers"
    assert body["message"] == 'Pod "p" is invalid: spec.containers: Required value'
    with pytest.raises(ApiException) as err:
        core.create_namespaced_config_map("crud", {"metadata": {"name": "Bad_Name"}})
    assert err.value.status == 422
    # namespace must exist
    with pytest.raises(ApiException) as err:
        core.create_namespaced_config_map("missing-ns", {"metadata": {"name": "x"}})
    assert err.value.status == 404 and status_body(err.value)["message"] == 'namespaces "missing-ns" not found'
    # delete: Status Success for configmaps, 404 afterwards
    st = core.delete_namespaced_config_map("cfg", "crud")
    assert st["status"] == "Success" and st["details"]["name"] == "cfg"
    with pytest.raises(ApiException) as err:
        core.delete_namespaced_config_map("cfg", "crud")
    assert err.value.status == 404


def test_lists_kinds_and_pagination(lab: Any, core: Any) -> None:
    ensure_ns(core, "lists")
    for i in range(5):
        core.create_namespaced_config_map("lists", {"metadata": {"name": "c%d" % i}})
    code, doc = raw_get(lab, "/api/v1/namespaces/lists/configmaps")
    assert doc["kind"] == "ConfigMapList" and doc["apiVersion"] == "v1" and len(doc["items"]) == 5
    assert doc["metadata"]["resourceVersion"]
    code, doc = raw_get(lab, "/api/v1/nodes")
    assert doc["kind"] == "NodeList"
    page = core.list_namespaced_config_map("lists", limit=2)
    names = [c.metadata.name for c in page.items]
    while page.metadata._continue:
        page = core.list_namespaced_config_map("lists", limit=2, _continue=page.metadata._continue)
        names += [c.metadata.name for c in page.items]
    assert names == ["c0", "c1", "c2", "c3", "c4"]
    # cluster-wide list of a namespaced resource
    all_cms = core.list_config_map_for_all_namespaces()
    assert {"lists"} <= {c.metadata.namespace for c in all_cms.items}
    # the namespace carries the well-known label; deleting it removes its objects
    core.delete_namespace("lists")
    assert core.list_namespaced_config_map("lists").items == []


def test_label_and_field_selectors(lab: Any, core: Any) -> None:
    ensure_ns(core, "sel")
    for name, labels in (("a", {"tier": "gpu", "zone": "z1"}), ("b", {"tier": "cpu", "zone": "z2"}),
                         ("c", {"tier": "gpu"})):
        core.create_namespaced_config_map("sel", {"metadata": {"name": name, "labels": labels}})

    def names(**kw: Any) -> List[str]:
        return sorted(c.metadata.name for c in core.list_namespaced_config_map("sel", **kw).items)
    assert names(label_selector="tier=gpu") == ["a", "c"]
    assert names(label_selector="tier==gpu,zone=z1") == ["a"]
    assert names(label_selector="tier!=gpu") == ["b"]
    assert names(label_selector="zone in (z1, z2)") == ["a", "b"]
    assert names(label_selector="zone notin (z1)") == ["b", "c"]
    assert names(label_selector="zone") == ["a", "b"]
    assert names(label_selector="!zone") == ["c"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.name!=b") == ["a", "c"]
    allns = core.list_config_map_for_all_namespaces(field_selector="metadata.namespace=sel")
    assert len(allns.items) == 3
    with pytest.raises(ApiException) as err:
        core.list_namespaced_config_map("sel", label_selector="zone in (z1")
    assert err.value.status == 400
    with pytest.raises(ApiException) as err:
        core.list_namespaced_config_map("sel", field_selector="data.k=x")
    assert err.value.status == 400 and "field label not supported" in status_body(err.value)["message"]
    # pods by spec.nodeName and status.phase
    core.create_namespaced_pod("sel", {"metadata": {"name": "bound"}, "spec": {
        "nodeName": "node-1", "containers": [{"name": "c", "image": "busybox:1.36"}]}})
    pods = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-1,status.phase=Pending")
    assert [p.metadata.name for p in pods.items] == ["bound"]
    assert core.list_namespaced_pod("sel", field_selector="status.phase=Running").items == []


# --- server-side apply ----------------------------------------------------------------------------
def test_server_side_apply(lab: Any, core: Any, dyn: Any) -> None:
    ensure_ns(core, "ssa")
    cms = dyn.resources.get(api_version="v1", kind="ConfigMap")
    manifest = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "plugin-config", "namespace": "ssa", "labels": {"app": "x"}},
                "data": {"config.yaml": "version: v1\n", "other": "1"}}
    # dryRun=All: answered, not stored
    dry = cms.server_side_apply(body=manifest, name="plugin-config", namespace="ssa", field_manager="bringup",
                                dry_run="All")
    assert dry.data["other"] == "1"
    with pytest.raises(ApiException) as err:
        core.read_namespaced_config_map("plugin-config", "ssa")
    assert err.value.status == 404
    first = cms.server_side_apply(body=manifest, name="plugin-config", namespace="ssa", field_manager="bringup")
    mf = first.to_dict()["metadata"]["managedFields"]
    assert [(m["manager"], m["operation"]) for m in mf] == [("bringup", "Apply")]
    assert "f:config.yaml" in mf[0]["fieldsV1"]["f:data"]
    second = cms.server_side_apply(body=manifest, name="plugin-config", namespace="ssa", field_manager="bringup")
    assert second.metadata.resourceVersion == first.metadata.resourceVersion
    # another manager's change survives a re-apply; a field dropped from the config is removed
    core.patch_namespaced_config_map("plugin-config", "ssa", {"data": {"extra": "e"}})
    smaller = json.loads(json.dumps(manifest))
    del smaller["data"]["other"]
    third = cms.server_side_apply(body=smaller, name="plugin-config", namespace="ssa", field_manager="bringup")
    assert dict(third.data) == {"config.yaml": "version: v1\n", "extra": "e"}
    # a dry-run change is not stored
    changed = json.loads(json.dumps(smaller))
    changed["data"]["config.yaml"] = "version: v2\n"
    cms.server_side_apply(body=changed, name="plugin-config", namespace="ssa", field_manager="bringup",
                          dry_run="All")
    assert core.read_namespaced_config_map("plugin-config", "ssa").data["config.yaml"] == "version: v1\n"
    # typed client apply without fieldManager: 400
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_config_map("plugin-config", "ssa", manifest,
                                         _content_type="application/apply-patch+yaml")
    assert err.value.status == 400 and "fieldManager is required" in status_body(err.value)["message"]


def test_daemonset_apply_twice_is_noop_and_generation(lab: Any, core: Any, apps: Any) -> None:
    ensure_ns(core, "gen")
    body = daemonset("gen-ds", {"lab/none": "x"})
    first = apps.patch_namespaced_daemon_set("gen-ds", "gen", body, field_manager="bringup",
                                             _content_type="application/apply-patch+yaml")
    assert first.metadata.generation == 1
    # the controller writes the status once (observedGeneration); then applies are no-ops
    wait_for(lambda: ds_status(apps, "gen", "gen-ds").observed_generation == 1, what="observedGeneration")
    before = apps.read_namespaced_daemon_set("gen-ds", "gen").metadata.resource_version
    second = apps.patch_namespaced_daemon_set("gen-ds", "gen", body, field_manager="bringup",
                                              _content_type="application/apply-patch+yaml")
    assert second.metadata.resource_version == before
    assert second.spec.update_strategy.type == "RollingUpdate"  # defaulted like the real server
    body["spec"]["template"]["spec"]["containers"][0]["image"] = "nvcr.io/nvidia/k8s-device-plugin:v0.17.1"
    third = apps.patch_namespaced_daemon_set("gen-ds", "gen", body, field_manager="bringup",
                                             _content_type="application/apply-patch+yaml")
    assert third.metadata.generation == 2
    # labels change -> no generation bump; status writes -> no generation bump
    fourth = apps.patch_namespaced_daemon_set("gen-ds", "gen", {"metadata": {"labels": {"x": "y"}}})
    assert fourth.metadata.generation == 2
    wait_for(lambda: ds_status(apps, "gen", "gen-ds").observed_generation == 2, what="observedGeneration")
    # selector is immutable
    with pytest.raises(ApiException) as err:
        apps.patch_namespaced_daemon_set("gen-ds", "gen", {"spec": {"selector": {"matchLabels": {"app": "z"}}}},
                                         _content_type="application/merge-patch+json")
    assert err.value.status == 422


# --- DaemonSet controller -------------------------------------------------------------------------
def test_daemonset_label_matching_and_status(lab: Any, core: Any, apps: Any, runtime: FakeRuntime) -> None:
    ensure_ns(core, "dsl")
    gpu = add_nodes(lab, "dsl-gpu", 3, {"lab/case": "dsl", "nvidia.com/gpu.present": "true"})
    add_nodes(lab, "dsl-cpu", 2, {"lab/case": "dsl"})
    apps.create_namespaced_daemon_set("dsl", daemonset("plugin", {"lab/case": "dsl",
                                                                  "nvidia.com/gpu.present": "true"}))
    pods = wait_for(lambda: len(ds_pods(core, "dsl", "plugin")) == 3 and ds_pods(core, "dsl", "plugin"))
    assert sorted(pods) == sorted(gpu)
    st = wait_for(lambda: (lambda s: s.number_ready == 3 and s)(ds_status(apps, "dsl", "plugin")))
    assert (st.desired_number_scheduled, st.current_number_scheduled, st.updated_number_scheduled,
            st.number_available, st.number_misscheduled, st.number_unavailable) == (3, 3, 3, 3, 0, None)
    pod = core.read_namespaced_pod(pods[gpu[0]], "dsl")
    assert pod.metadata.name.startswith("plugin-") and len(pod.metadata.name) == len("plugin-") + 5
    ref = pod.metadata.owner_references[0]
    assert (ref.kind, ref.name, ref.controller) == ("DaemonSet", "plugin", True)
    assert pod.metadata.labels["app"] == "plugin" and pod.spec.node_name == gpu[0]
    assert pod.status.phase == "Running" and pod.status.container_statuses[0].ready
    assert all(n in runtime.started() for n in pods.values())
    # a node gains the label -> a pod; loses it -> pod deleted and stopped
    core.patch_node("dsl-cpu-0", {"metadata": {"labels": {"nvidia.com/gpu.present": "true"}}})
    wait_for(lambda: "dsl-cpu-0" in ds_pods(core, "dsl", "plugin"), what="pod on newly labelled node")
    victim = ds_pods(core, "dsl", "plugin")["dsl-gpu-2"]
    core.patch_node("dsl-gpu-2", {"metadata": {"labels": {"nvidia.com/gpu.present": None}}})
    wait_for(lambda: "dsl-gpu-2" not in ds_pods(core, "dsl", "plugin"), what="pod removed")
    wait_for(lambda: victim in runtime.stopped(), what="runtime stop")
    wait_for(lambda: ds_status(apps, "dsl", "plugin").desired_number_scheduled == 3)


def test_daemonset_zero_matching_nodes(lab: Any, core: Any, apps: Any) -> None:
    ensure_ns(core, "dsz")
    apps.create_namespaced_daemon_set("dsz", daemonset("nothing", {"lab/case": "no-such-node"}))
    st = wait_for(lambda: (lambda s: s.observed_generation == 1 and s)(ds_status(apps, "dsz", "nothing")))
    assert (st.desired_number_scheduled, st.current_number_scheduled, st.number_ready,
            st.number_misscheduled) == (0, 0, 0, 0)
    assert st.number_available is None and st.updated_number_scheduled is None  # omitempty, like the real API
    assert core.list_namespaced_pod("dsz").items == []


def test_daemonset_node_affinity(lab: Any, core: Any, apps: Any) -> None:
    ensure_ns(core, "dsa")
    add_nodes(lab, "dsa-a", 1, {"lab/case": "dsa", "gpu.model": "h100"})
    add_nodes(lab, "dsa-b", 1, {"lab/case": "dsa", "gpu.model": "a100"})
    add_nodes(lab, "dsa-c", 1, {"lab/case": "dsa"})
    add_nodes(lab, "dsa-d", 1, {"lab/case": "dsa", "gpu.model": "t4", "skip": "yes"})
    cases = {
        "in": ({"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "gpu.model", "operator": "In", "values": ["h100", "a100"]}]}]}, {"dsa-a-0", "dsa-b-0"}),
        "notin": ({"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "gpu.model", "operator": "NotIn", "values": ["h100"]}]}]}, {"dsa-b-0", "dsa-c-0", "dsa-d-0"}),
        "exists": ({"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "gpu.model", "operator": "Exists"}, {"key": "skip", "operator": "DoesNotExist"}]}]},
            {"dsa-a-0", "dsa-b-0"}),
        "ored": ({"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "gpu.model", "operator": "DoesNotExist"}]},
            {"matchExpressions": [{"key": "gpu.model", "operator": "In", "values": ["t4"]}]}]},
            {"dsa-c-0", "dsa-d-0"}),
    }
    for name, (affinity, _want) in cases.items():
        apps.create_namespaced_daemon_set("dsa", daemonset("aff-" + name, {"lab/case": "dsa"}, affinity=affinity))
    for name, (_affinity, want) in cases.items():
        wait_for(lambda: set(ds_pods(core, "dsa", "aff-" + name)) == want, what="affinity case %s" % name)
        wait_for(lambda: ds_status(apps, "dsa", "aff-" + name).desired_number_scheduled == len(want))


def test_daemonset_taints_and_tolerations(lab: Any, core: Any, apps: Any, runtime: FakeRuntime) -> None:
    ensure_ns(core, "dst")
    add_nodes(lab, "dst-plain", 1, {"lab/case": "dst"})
    add_nodes(lab, "dst-gpu", 1, {"lab/case": "dst"}, [{"key": "nvidia.com/gpu", "value": "present",
                                                        "effect": "NoSchedule"}])
    add_nodes(lab, "dst-other", 1, {"lab/case": "dst"}, [{"key": "dedicated", "value": "infer",
                                                          "effect": "NoSchedule"}])
    add_nodes(lab, "dst-soft", 1, {"lab/case": "dst"}, [{"key": "soft", "effect": "PreferNoSchedule"}])
    sel = {"lab/case": "dst"}
    cases = {
        "none": (None, {"dst-plain-0", "dst-soft-0"}),
        "exists-key": ([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                       {"dst-plain-0", "dst-soft-0", "dst-gpu-0"}),
        "equal": ([{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present"}],
                  {"dst-plain-0", "dst-soft-0", "dst-gpu-0"}),
        "equal-wrong": ([{"key": "nvidia.com/gpu", "operator": "Equal", "value": "absent"}],
                        {"dst-plain-0", "dst-soft-0"}),
        "wrong-effect": ([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}],
                         {"dst-plain-0", "dst-soft-0"}),
        "all": ([{"operator": "Exists"}], {"dst-plain-0", "dst-soft-0", "dst-gpu-0", "dst-other-0"}),
    }
    for name, (tols, _want) in cases.items():
        apps.create_namespaced_daemon_set("dst", daemonset("tol-" + name, sel, tolerations=tols))
    for name, (_tols, want) in cases.items():
        wait_for(lambda: set(ds_pods(core, "dst", "tol-" + name)) == want, what="toleration case %s" % name)
    # the controller's own tolerations: a cordoned node keeps and gets daemon pods
    core.patch_node("dst-plain-0", {"spec": {"unschedulable": True}})
    time.sleep(0.1)
    assert "dst-plain-0" in ds_pods(core, "dst", "tol-none")
    # a new NoSchedule taint: the running pod stays (misscheduled); NoExecute evicts it
    core.patch_node("dst-plain-0", {"spec": {"taints": [{"key": "late", "effect": "NoSchedule"}]}})
    wait_for(lambda: ds_status(apps, "dst", "tol-none").number_misscheduled == 1, what="misscheduled")
    assert "dst-plain-0" in ds_pods(core, "dst", "tol-none")
    assert ds_status(apps, "dst", "tol-none").desired_number_scheduled == 1
    pod = ds_pods(core, "dst", "tol-none")["dst-plain-0"]
    core.patch_node("dst-plain-0", {"spec": {"taints": [{"key": "late", "effect": "NoExecute"}]}})
    wait_for(lambda: "dst-plain-0" not in ds_pods(core, "dst", "tol-none"), what="eviction by NoExecute")
    wait_for(lambda: pod in runtime.stopped(), what="runtime stop after eviction")
    wait_for(lambda: ds_status(apps, "dst", "tol-none").number_misscheduled == 0)


def test_daemonset_pod_recreated_after_delete(lab: Any, core: Any, apps: Any, runtime: FakeRuntime) -> None:
    ensure_ns(core, "dsr")
    add_nodes(lab, "dsr", 1, {"lab/case": "dsr"})
    apps.create_namespaced_daemon_set("dsr", daemonset("rec", {"lab/case": "dsr"}))
    old = wait_for(lambda: ds_pods(core, "dsr", "rec").get("dsr-0"))
    core.delete_namespaced_pod(old, "dsr")
    new = wait_for(lambda: (lambda n: n if n and n != old else None)(ds_pods(core, "dsr", "rec").get("dsr-0")))
    assert new.startswith("rec-")
    calls = [c for c in runtime.calls if c[2] in (old, new)]
    assert calls == [("start", "dsr-0", old), ("stop", "dsr-0", old), ("start", "dsr-0", new)]
    wait_for(lambda: ds_status(apps, "dsr", "rec").number_ready == 1)
    # a template change rolls the pod; deleting the DaemonSet removes (and stops) its pods
    apps.patch_namespaced_daemon_set("rec", "dsr", {"spec": {"template": {"metadata": {
        "annotations": {"kubectl.kubernetes.io/restartedAt": "now"}}}}})
    rolled = wait_for(lambda: (lambda n: n if n and n != new else None)(ds_pods(core, "dsr", "rec").get("dsr-0")))
    pod = core.read_namespaced_pod(rolled, "dsr")
    assert pod.metadata.labels["pod-template-generation"] == "2"
    wait_for(lambda: (lambda s: s.updated_number_scheduled == 1 and s.observed_generation == 2)(
        ds_status(apps, "dsr", "rec")), what="rollout status")
    assert new in runtime.stopped()
    apps.delete_namespaced_daemon_set("rec", "dsr")
    wait_for(lambda: not ds_pods(core, "dsr", "rec"), what="garbage collection")
    wait_for(lambda: rolled in runtime.stopped())


def test_daemonset_rolling_update_honours_max_unavailable(lab: Any, core: Any, apps: Any,
                                                          runtime: FakeRuntime) -> None:
    ensure_ns(core, "dsu")
    add_nodes(lab, "dsu", 3, {"lab/case": "dsu"})
    apps.create_namespaced_daemon_set("dsu", daemonset("roll", {"lab/case": "dsu"}))
    wait_for(lambda: ds_status(apps, "dsu", "roll").number_ready == 3)
    before = ds_pods(core, "dsu", "roll")
    runtime.auto_ready = False  # new pods stay unready until the test says so
    try:
        apps.patch_namespaced_daemon_set("roll", "dsu", {"spec": {"template": {"spec": {"containers": [
            {"name": "nvidia-device-plugin-ctr", "image": "nvcr.io/nvidia/k8s-device-plugin:v0.17.1"}]}}}})
        for step in range(1, 4):
            wait_for(lambda: sum(1 for n, p in ds_pods(core, "dsu", "roll").items() if p != before[n]) == step,
                     what="rolled %d" % step)
            time.sleep(0.1)  # the next pod must wait for this one to be ready (maxUnavailable 1)
            now = ds_pods(core, "dsu", "roll")
            fresh = [p for n, p in now.items() if p != before[n]]
            assert len(fresh) == step
            st = ds_status(apps, "dsu", "roll")
            assert st.updated_number_scheduled == step and st.number_unavailable == 1
            for name in fresh:
                lab.store.update_pod_status("dsu", name, PluginPodStatus(running=True, ready=True))
    finally:
        runtime.auto_ready = True
    wait_for(lambda: (lambda s: s.updated_number_scheduled == 3 and s.number_available == 3)(
        ds_status(apps, "dsu", "roll")), what="rollout complete")
    # OnDelete: a template change does not replace running pods
    apps.patch_namespaced_daemon_set("roll", "dsu", {"spec": {"updateStrategy": {"type": "OnDelete",
                                                                                "rollingUpdate": None}}})
    pods = ds_pods(core, "dsu", "roll")
    apps.patch_namespaced_daemon_set("roll", "dsu", {"spec": {"template": {"metadata": {"labels": {"v": "3"}}}}})
    wait_for(lambda: ds_status(apps, "dsu", "roll").observed_generation == 4)
    time.sleep(0.1)
    assert ds_pods(core, "dsu", "roll") == pods
    assert ds_status(apps, "dsu", "roll").updated_number_scheduled is None


def test_runtime_status_mapping_and_node_status(lab: Any, core: Any, apps: Any, runtime: FakeRuntime) -> None:
    ensure_ns(core, "dsm")
    add_nodes(lab, "dsm", 1, {"lab/case": "dsm"})
    runtime.auto_ready = False
    try:
        apps.create_namespaced_daemon_set("dsm", daemonset("map", {"lab/case": "dsm"}))
        name = wait_for(lambda: ds_pods(core, "dsm", "map").get("dsm-0"))
    finally:
        runtime.auto_ready = True
    pod = core.read_namespaced_pod(name, "dsm")
    assert pod.status.phase == "Pending"
    assert pod.status.container_statuses[0].state.waiting.reason == "ContainerCreating"
    with pytest.raises(ApiException) as err:  # like the real server: no logs before the container starts
        core.read_namespaced_pod_log(name, "dsm")
    assert err.value.status == 400 and "waiting to start" in status_body(err.value)["message"]
    lab.store.update_pod_status("dsm", name, PluginPodStatus(
        running=False, ready=False, restart_count=3, waiting_reason="CrashLoopBackOff", last_exit_code=1,
        last_reason="Error"))
    pod = core.read_namespaced_pod(name, "dsm")
    cs = pod.status.container_statuses[0]
    assert pod.status.phase == "Running"  # restartPolicy Always: a crash-looping pod stays Running
    assert (cs.ready, cs.restart_count, cs.state.waiting.reason) == (False, 3, "CrashLoopBackOff")
    assert (cs.last_state.terminated.exit_code, cs.last_state.terminated.reason) == (1, "Error")
    assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "False"
    wait_for(lambda: (lambda s: s.current_number_scheduled == 1 and s.number_ready == 0
                      and s.number_unavailable == 1)(ds_status(apps, "dsm", "map")))
    lab.store.update_pod_status("dsm", name, PluginPodStatus(running=True, ready=True, restart_count=3))
    wait_for(lambda: ds_status(apps, "dsm", "map").number_ready == 1)
    assert core.read_namespaced_pod_log(name, "dsm", tail_lines=2) == "%s line 8\n%s line 9\n" % (name, name)
    # node status: extended resources merged and removed, Ready condition
    lab.store.update_node_status("dsm-0", {"nvidia.com/gpu": "8"}, {"nvidia.com/gpu": "8"})
    node = core.read_node("dsm-0")
    assert node.status.capacity["nvidia.com/gpu"] == "8" and node.status.allocatable["nvidia.com/gpu"] == "8"
    assert node.status.capacity["cpu"] == "64"
    lab.store.update_node_status("dsm-0", {}, {}, ready=False)
    node = core.read_node("dsm-0")
    assert "nvidia.com/gpu" not in node.status.capacity and "nvidia.com/gpu" not in node.status.allocatable
    assert {c.type: c.status for c in node.status.conditions}["Ready"] == "False"
    assert lab.store.get_object("v1", "Node", None, "dsm-0")["metadata"]["name"] == "dsm-0"
    assert lab.store.get_object("v1", "ConfigMap", "default", "absent") is None


# --- watches --------------------------------------------------------------------------------------
def test_watch_nodes_and_pods(lab: Any, core: Any) -> None:
    add_nodes(lab, "wn", 1, {"lab/case": "watch"})
    events: List[tuple] = []

    def run() -> None:
        w = k8s_watch.Watch()
        for ev in w.stream(core.list_node, label_selector="lab/case=watch", timeout_seconds=2):
            events.append((ev["type"], ev["object"].metadata.name, ev["object"].metadata.labels.get("step")))
    t = threading.Thread(target=run)
    t.start()
    wait_for(lambda: events, what="initial ADDED event")
    core.patch_node("wn-0", {"metadata": {"labels": {"step": "1"}}})
    add_nodes(lab, "wn2", 1, {"lab/case": "watch"})
    core.patch_node("wn-0", {"metadata": {"labels": {"lab/case": "gone"}}})  # leaves the selector
    t.join(timeout=5)
    assert not t.is_alive()
    assert events == [("ADDED", "wn-0", None), ("MODIFIED", "wn-0", "1"), ("ADDED", "wn2-0", None),
                      ("DELETED", "wn-0", "1")]
    # resume from a resourceVersion
    rv = core.list_namespaced_pod("default").metadata.resource_version
    core.create_namespaced_pod("default", {"metadata": {"name": "watched"}, "spec": {
        "containers": [{"name": "c", "image": "busybox:1.36"}]}})
    core.delete_namespaced_pod("watched", "default")
    seen = [(e["type"], e["object"].metadata.name) for e in k8s_watch.Watch().stream(
        core.list_namespaced_pod, "default", resource_version=rv, timeout_seconds=1)]
    assert seen == [("ADDED", "watched"), ("DELETED", "watched")]


# --- kubectl --------------------------------------------------------------------------------------
@needs_kubectl
def test_kubectl_reads_and_deletes(lab: Any, core: Any, apps: Any, runtime: FakeRuntime, tmp_path: Any) -> None:
    ensure_ns(core, "kc")
    add_nodes(lab, "kc", 2, {"lab/case": "kc"})
    manifest = daemonset("kc-plugin", {"lab/case": "kc"})
    manifest["metadata"]["namespace"] = "kc"
    path = tmp_path / "ds.yaml"
    path.write_text(json.dumps(manifest))
    out = kubectl(lab, "apply", "--server-side", "-f", str(path)).stdout
    assert "serverside-applied" in out
    pods = wait_for(lambda: len(ds_pods(core, "kc", "kc-plugin")) == 2 and ds_pods(core, "kc", "kc-plugin"))
    wait_for(lambda: ds_status(apps, "kc", "kc-plugin").number_ready == 2)
    rv = apps.read_namespaced_daemon_set("kc-plugin", "kc").metadata.resource_version
    kubectl(lab, "apply", "--server-side", "-f", str(path))
    assert apps.read_namespaced_daemon_set("kc-plugin", "kc").metadata.resource_version == rv
    out = kubectl(lab, "get", "nodes,pods", "-A").stdout
    assert "node/kc-0" in out and "pod/%s" % pods["kc-0"] in out and "Running" in out
    out = kubectl(lab, "get", "pods", "-A", "--field-selector", "spec.nodeName=kc-1").stdout
    assert pods["kc-1"] in out and pods["kc-0"] not in out
    node = json.loads(kubectl(lab, "get", "node", "kc-0", "-o", "json").stdout)
    assert node["kind"] == "Node" and node["status"]["nodeInfo"]["kubeletVersion"]
    assert node["metadata"]["labels"]["kubernetes.io/hostname"] == "kc-0"
    assert kubectl(lab, "logs", "-n", "kc", pods["kc-0"], "--tail=1").stdout == "%s line 9\n" % pods["kc-0"]
    out = kubectl(lab, "describe", "node", "kc-0").stdout
    assert "Name:               kc-0" in out and pods["kc-0"] in out and "KubeletReady" in out
    out = kubectl(lab, "get", "ds", "-n", "kc").stdout.splitlines()
    assert out[1].split()[:6] == ["kc-plugin", "2", "2", "2", "2", "2"]
    out = kubectl(lab, "delete", "pod", "-n", "kc", pods["kc-0"]).stdout
    assert "deleted" in out
    wait_for(lambda: pods["kc-0"] in runtime.stopped())
    wait_for(lambda: ds_pods(core, "kc", "kc-plugin").get("kc-0") not in (None, pods["kc-0"]))
    kubectl(lab, "rollout", "status", "ds/kc-plugin", "-n", "kc", "--timeout=10s")
    proc = kubectl(lab, "get", "pod", "-n", "kc", "nope", check=False)
    assert proc.returncode != 0 and 'pods "nope" not found' in proc.stderr


# --- counters and faults --------------------------------------------------------------------------
def test_counters(lab: Any, core: Any) -> None:
    lab.reset_counters()
    core.list_node()
    core.list_node()
    core.read_node("node-0")
    core.patch_node("node-0", {"metadata": {"labels": {"counted": "yes"}}})
    assert lab.count("list", "nodes") == 2 and lab.count("get", "nodes") == 1 and lab.count("patch", "nodes") == 1
    assert lab.write_count == 1
    code, doc = raw_get(lab, "/lab/counters", token=None)
    assert code == 200 and doc["requests"]["list"]["nodes"] == 2 and doc["writes"] == 1 and doc["total"] == 4
    code, doc = raw_get(lab, "/lab/counters/reset", token=None, method="POST", body={})
    assert code == 200 and doc["total"] == 0 and lab.counters() == {}


def test_fault_429_and_500(lab: Any, core: Any) -> None:
    # urllib3's default Retry honours Retry-After on 429: a client without retries sees the 429
    no_retry = k8s.CoreV1Api(make_api_client(lab.kubeconfig, retries=False))
    lab.add_fault(verb="list", resource="nodes", kind="429")
    with pytest.raises(ApiException) as err:
        no_retry.list_node()
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "1"
    assert status_body(err.value)["reason"] == "TooManyRequests"
    no_retry.list_node()  # count defaults to 1
    code, doc = raw_get(lab, "/lab/faults", token=None, method="POST",
                        body={"verb": "get", "resource": "pods", "kind": "500", "count": 2})
    assert code == 201 and doc["faults"][0]["remaining"] == 2
    for _ in range(2):
        with pytest.raises(ApiException) as err:
            core.read_namespaced_pod("anything", "default")
        assert err.value.status == 500 and status_body(err.value)["reason"] == "InternalError"
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod("anything", "default")
    assert err.value.status == 404
    lab.add_fault(resource="nodes", kind="500", count=0)  # until cleared
    assert raw_get(lab, "/lab/faults", token=None, method="DELETE")[0] == 200
    core.list_node()


def test_fault_slow_and_drop(lab: Any, core: Any) -> None:
    code, _doc = raw_get(lab, "/lab/faults", token=None, method="POST",
                         body={"verb": "list", "resource": "nodes", "kind": "slow", "delay_s": 0.4})
    assert code == 201
    t0 = time.monotonic()
    core.list_node()
    assert time.monotonic() - t0 >= 0.4
    t0 = time.monotonic()
    core.list_node()
    assert time.monotonic() - t0 < 0.4
    lab.add_fault(verb="get", resource="nodes", kind="drop")
    no_retry = k8s.CoreV1Api(make_api_client(lab.kubeconfig, retries=False))
    import urllib3
    with pytest.raises(urllib3.exceptions.HTTPError):
        no_retry.read_node("node-0")
    assert no_retry.read_node("node-0").metadata.name == "node-0"
    lab.clear_faults()
    assert raw_get(lab, "/lab/faults", token=None, method="POST", body={"kind": "bogus"})[0] == 400


# --- scale ----------------------------------------------------------------------------------------
def test_thousand_node_api_only_fleet(tmp_path: Any) -> None:
    with LabApiServer(str(tmp_path / "big")) as big:
        t0 = time.perf_counter()
        big.store.add_nodes([NodeSpec(name="gpu-%04d" % i, root="/", labels={"nvidia.com/gpu.present": "true"})
                             for i in range(1000)])
        created = time.perf_counter() - t0
        assert created < 3.0
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            code, doc = raw_get(big, "/api/v1/nodes")
            times.append(time.perf_counter() - t0)
        assert code == 200 and len(doc["items"]) == 1000
        assert min(times) < 1.0
        node = doc["items"][0]
        assert node["status"]["capacity"]["pods"] == "110" and node["status"]["nodeInfo"]["kubeletVersion"]
        assert {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"] == "True"
        # API-only: pods become Running+Ready at once and nodes advertise their GPUs
        big.store.create_object(dict(daemonset("plugin", {"nvidia.com/gpu.present": "true"}),
                                     metadata={"name": "plugin", "namespace": "kube-system"}))
        wait_for(lambda: (big.store.get_object("apps/v1", "DaemonSet", "kube-system", "plugin")["status"]
                          .get("numberReady") == 1000), timeout=20, what="1000 ready pods")
        node = big.store.get_object("v1", "Node", None, "gpu-0999")
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
