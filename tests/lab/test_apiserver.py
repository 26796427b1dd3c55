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


def holds(value: Any, predicate: Callable[[Any], Any]) -> Any:
    """``value`` when ``predicate(value)`` holds, else None: a wait_for condition."""
    return value if value is not None and predicate(value) else None


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
    proc = subprocess.run([KUBECTL, *args], capture_output=True, text=True, timeout=30, env=env, check=False)
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
    st = wait_for(lambda: holds(ds_status(apps, "dsl", "plugin"), lambda s: s.number_ready == 3))
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
    # the controller's Events on the DaemonSet, like daemonset-controller's
    evs = core.list_namespaced_event("dsl", field_selector="involvedObject.kind=DaemonSet,involvedObject.name=plugin")
    created = [e.message for e in evs.items if e.reason == "SuccessfulCreate"]
    assert sorted(created) == sorted("Created pod: %s" % p for p in list(pods.values()) + [
        ds_pods(core, "dsl", "plugin")["dsl-cpu-0"]])
    deleted = [e for e in evs.items if e.reason == "SuccessfulDelete"]
    assert [e.message for e in deleted] == ["Deleted pod: %s" % victim]
    ev = deleted[0]
    assert (ev.type, ev.source.component, ev.involved_object.api_version, ev.involved_object.namespace) == (
        "Normal", "daemonset-controller", "apps/v1", "dsl")
    assert ev.involved_object.uid == apps.read_namespaced_daemon_set("plugin", "dsl").metadata.uid


def test_daemonset_zero_matching_nodes(lab: Any, core: Any, apps: Any) -> None:
    ensure_ns(core, "dsz")
    apps.create_namespaced_daemon_set("dsz", daemonset("nothing", {"lab/case": "no-such-node"}))
    st = wait_for(lambda: holds(ds_status(apps, "dsz", "nothing"), lambda s: s.observed_generation == 1))
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
    new = wait_for(lambda: holds(ds_pods(core, "dsr", "rec").get("dsr-0"), lambda n: n and n != old))
    assert new.startswith("rec-")
    calls = [c for c in runtime.calls if c[2] in (old, new)]
    assert calls == [("start", "dsr-0", old), ("stop", "dsr-0", old), ("start", "dsr-0", new)]
    wait_for(lambda: ds_status(apps, "dsr", "rec").number_ready == 1)
    # a template change rolls the pod; deleting the DaemonSet removes (and stops) its pods
    apps.patch_namespaced_daemon_set("rec", "dsr", {"spec": {"template": {"metadata": {
        "annotations": {"kubectl.kubernetes.io/restartedAt": "now"}}}}})
    rolled = wait_for(lambda: holds(ds_pods(core, "dsr", "rec").get("dsr-0"), lambda n: n and n != new))
    pod = core.read_namespaced_pod(rolled, "dsr")
    assert pod.metadata.labels["pod-template-generation"] == "2"
    wait_for(lambda: holds(ds_status(apps, "dsr", "rec"),
                           lambda s: s.updated_number_scheduled == 1 and s.observed_generation == 2),
             what="rollout status")
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
    wait_for(lambda: holds(ds_status(apps, "dsu", "roll"),
                           lambda s: s.updated_number_scheduled == 3 and s.number_available == 3),
             what="rollout complete")
    # OnDelete: a template change does not replace running pods
    on_delete = {"spec": {"updateStrategy": {"type": "OnDelete", "rollingUpdate": None}}}
    apps.patch_namespaced_daemon_set("roll", "dsu", on_delete)
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
    wait_for(lambda: holds(ds_status(apps, "dsm", "map"), lambda s: s.current_number_scheduled == 1
                           and s.number_ready == 0 and s.number_unavailable == 1))
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
    for _round in range(2):
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


# --- ordinary pods: scheduler and kubelet (workloads=True) -------------------------------------------
GPU = "nvidia.com/gpu"


class WorkloadRuntime:
    """Only ``run_workload_pod`` (the optional NodeRuntime method): by the pod's command."""

    def __init__(self) -> None:
        self.calls: List[tuple] = []

    def start_plugin_pod(self, node: str, pod: Dict[str, Any]) -> None:
        pass

    def stop_plugin_pod(self, node: str, pod_name: str) -> None:
        pass

    def pod_log(self, node: str, pod_name: str, tail_lines: Optional[int] = None) -> str:
        return ""

    def run_workload_pod(self, node: str, pod: Dict[str, Any]) -> tuple:
        self.calls.append((node, pod["metadata"]["name"], pod["status"]["phase"]))
        command = pod["spec"]["containers"][0].get("command") or []
        if command[:1] == ["crash"]:
            raise RuntimeError("the runtime fell over")
        if command[:1] == ["exit"]:
            return int(command[1]), "failing on %s\n" % node
        return 0, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0) on %s\n" % node


@pytest.fixture(scope="module")
def wl(tmp_path_factory: Any) -> Any:
    """A second server with the scheduler and kubelet stand-in for ordinary pods, API-only nodes."""
    state = tmp_path_factory.mktemp("workloads")
    with LabApiServer(str(state), workloads=True) as server:
        server.kubeconfig = server.write_kubeconfig(str(state / "kubeconfig"))
        server.store.add_nodes([NodeSpec(name="cpu-%d" % i, root="/", gpu_count=0) for i in range(2)])
        yield server


@pytest.fixture(scope="module")
def wcore(wl: Any) -> Any:
    return k8s.CoreV1Api(make_api_client(wl.kubeconfig))


def gpu_node(lab: Any, name: str, capacity: int, allocatable: Optional[int] = None,
             labels: Optional[Dict[str, str]] = None) -> str:
    lab.store.add_node(NodeSpec(name=name, root="/", labels=dict(labels or {})))
    if capacity:
        lab.store.update_node_status(name, {GPU: str(capacity)}, {GPU: str(capacity if allocatable is None
                                                                           else allocatable)})
    return name


def smoke_pod(name: str, node: Optional[str] = None, pin: str = "nodeName", command: Optional[list] = None,
              restart: str = "Never", selector: Optional[Dict[str, str]] = None, gpus: int = 1) -> dict:
    """The collection's GPU smoke pod shape: pinned, tolerations, one GPU, restartPolicy Never."""
    spec: Dict[str, Any] = {
        "restartPolicy": restart, "tolerations": [{"key": GPU, "operator": "Exists"}],
        "containers": [{"name": "smoke", "image": "nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04",
                        "command": command or ["nvidia-smi", "-L"], "resources": {"limits": {GPU: str(gpus)}}}]}
    if node and pin == "nodeName":
        spec["nodeName"] = node
    elif node:
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]}}}
    if selector:
        spec["nodeSelector"] = selector
    return {"metadata": {"name": name, "labels": {"app.kubernetes.io/name": "gpunode-smoke-test"}}, "spec": spec}


def phase(core: Any, name: str, ns: str = "default") -> str:
    return core.read_namespaced_pod(name, ns).status.phase


def pod_events(core: Any, name: str, ns: str = "default") -> List[Any]:
    evs = core.list_namespaced_event(ns, field_selector="involvedObject.name=%s" % name).items
    return sorted(evs, key=lambda e: e.metadata.name)


def scheduled_condition(pod: Any) -> Any:
    return next(c for c in pod.status.conditions or [] if c.type == "PodScheduled")


def test_pinned_smoke_pod_succeeds_with_events_and_log(wl: Any, wcore: Any) -> None:
    node = gpu_node(wl, "gpu-pin", 2)
    t0 = time.monotonic()
    wcore.create_namespaced_pod("default", smoke_pod("smoke-pin", node))
    wait_for(lambda: phase(wcore, "smoke-pin") == "Succeeded", what="Succeeded")
    assert time.monotonic() - t0 >= 0.2  # Running for a while first
    pod = wcore.read_namespaced_pod("smoke-pin", "default")
    cs = pod.status.container_statuses[0]
    assert (cs.state.terminated.exit_code, cs.state.terminated.reason, cs.ready) == (0, "Completed", False)
    assert pod.status.pod_ip and pod.status.host_ip and pod.status.start_time
    conds = {c.type: (c.status, c.reason) for c in pod.status.conditions}
    assert conds["Ready"] == ("False", "PodCompleted") and conds["PodScheduled"] == ("True", None)
    evs = pod_events(wcore, "smoke-pin")
    assert [e.reason for e in evs] == ["Pulled", "Created", "Started"]  # nodeName set: no scheduler
    assert evs[1].message == "Created container: smoke" and evs[2].message == "Started container smoke"
    assert evs[0].message == 'Container image "nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04" already present on machine'
    ev = evs[2]
    seen = (ev.type, ev.source.component, ev.source.host, ev.involved_object.kind, ev.involved_object.uid,
            ev.involved_object.field_path)
    assert seen == ("Normal", "kubelet", node, "Pod", pod.metadata.uid, "spec.containers{smoke}")
    log = wcore.read_namespaced_pod_log("smoke-pin", "default", container="smoke")
    assert log.startswith("GPU 0: lab GPU (UUID: GPU-") and log.endswith("(lab, no runtime)\n")
    assert len(log.splitlines()) == 1
    # through kubectl too
    if KUBECTL:
        out = kubectl(wl, "get", "pod", "smoke-pin").stdout
        assert "Completed" in out
        assert kubectl(wl, "logs", "smoke-pin").stdout == log
    wcore.delete_namespaced_pod("smoke-pin", "default")


def test_smoke_pod_through_the_scheduler(wl: Any, wcore: Any) -> None:
    node = gpu_node(wl, "gpu-aff", 4)
    body = smoke_pod("", node, pin="affinity")
    body["metadata"] = {"generateName": "gpunode-smoke-", "labels": body["metadata"]["labels"]}
    name = wcore.create_namespaced_pod("default", body).metadata.name
    wait_for(lambda: phase(wcore, name) == "Succeeded", what="Succeeded")
    pod = wcore.read_namespaced_pod(name, "default")
    assert pod.spec.node_name == node
    evs = pod_events(wcore, name)
    assert [e.reason for e in evs] == ["Scheduled", "Pulled", "Created", "Started"]
    assert evs[0].message == "Successfully assigned default/%s to %s" % (name, node)
    assert evs[0].source.component == "default-scheduler"
    # the pod list by node, as the kubelet would see it
    assert [p.metadata.name for p in wcore.list_pod_for_all_namespaces(
        field_selector="spec.nodeName=%s" % node).items] == [name]
    wcore.delete_namespaced_pod(name, "default")


def test_pinned_pod_rejected_at_admission(wl: Any, wcore: Any) -> None:
    gpu_node(wl, "gpu-zero", 8, allocatable=0)  # the plugin registered, all devices unhealthy
    wcore.create_namespaced_pod("default", smoke_pod("smoke-zero", "gpu-zero"))
    wait_for(lambda: phase(wcore, "smoke-zero") == "Failed", what="rejected")
    pod = wcore.read_namespaced_pod("smoke-zero", "default")
    message = ("Allocate failed due to requested number of devices unavailable for nvidia.com/gpu. "
               "Requested: 1, Available: 0, which is unexpected")
    assert pod.status.reason == "UnexpectedAdmissionError"
    assert pod.status.message == "Pod was rejected: " + message
    assert not pod.status.container_statuses
    evs = pod_events(wcore, "smoke-zero")
    assert [(e.type, e.reason, e.message, e.source.component) for e in evs] == [
        ("Warning", "UnexpectedAdmissionError", message, "kubelet")]
    # a node where no device plugin ever registered the resource
    wcore.create_namespaced_pod("default", smoke_pod("smoke-cpu", "cpu-0"))
    wait_for(lambda: phase(wcore, "smoke-cpu") == "Failed", what="rejected")
    assert wcore.read_namespaced_pod("smoke-cpu", "default").status.message == (
        "Pod was rejected: Allocate failed due to cannot allocate unregistered device nvidia.com/gpu, which is "
        "unexpected")
    if KUBECTL:
        assert "UnexpectedAdmissionError" in kubectl(wl, "get", "pod", "smoke-zero").stdout
    # a pod without GPU requests on a node without GPUs runs
    plain = smoke_pod("plain", "cpu-0", command=["echo", "hi"], gpus=0)
    plain["spec"]["containers"][0].pop("resources")
    wcore.create_namespaced_pod("default", plain)
    wait_for(lambda: phase(wcore, "plain") == "Succeeded", what="plain pod")
    assert wcore.read_namespaced_pod_log("plain", "default") == ""
    for name in ("smoke-zero", "smoke-cpu", "plain"):
        wcore.delete_namespaced_pod(name, "default")


def test_unschedulable_then_scheduled_when_a_node_fits(wl: Any, wcore: Any) -> None:
    wcore.create_namespaced_pod("default", smoke_pod("smoke-late", selector={"lab/pool": "late"}))
    pod = wait_for(lambda: holds(wcore.read_namespaced_pod("smoke-late", "default"), lambda p: p.status.conditions),
                   what="PodScheduled condition")
    cond = scheduled_condition(pod)
    total = len(wcore.list_node().items)
    assert pod.status.phase == "Pending" and (cond.status, cond.reason) == ("False", "Unschedulable")
    assert cond.message == (
        "0/{n} nodes are available: {n} node(s) didn't match Pod's node affinity/selector. preemption: 0/{n} nodes "
        "are available: {n} Preemption is not helpful for scheduling.".format(n=total))
    evs = pod_events(wcore, "smoke-late")
    assert [(e.type, e.reason, e.source.component, e.message) for e in evs] == [
        ("Warning", "FailedScheduling", "default-scheduler", cond.message)]
    # a matching node without GPUs: re-evaluated, another reason, the same Event counted again
    gpu_node(wl, "late-0", 0, labels={"lab/pool": "late"})
    want = ("0/{n} nodes are available: 1 Insufficient nvidia.com/gpu, {m} node(s) didn't match Pod's node "
            "affinity/selector. preemption: 0/{n} nodes are available: 1 No preemption victims found for incoming "
            "pod, {m} Preemption is not helpful for scheduling.").format(n=total + 1, m=total)
    wait_for(lambda: scheduled_condition(wcore.read_namespaced_pod("smoke-late", "default")).message == want,
             what="new scheduling message")
    evs = pod_events(wcore, "smoke-late")
    assert [(e.reason, e.count, e.message) for e in evs] == [("FailedScheduling", 2, want)]
    # a tainted node that matches, then the GPUs appear on late-0
    gpu_node(wl, "late-1", 1, labels={"lab/pool": "late"})
    wl.store.patch_object("v1", "Node", None, "late-1", {"spec": {"taints": [
        {"key": "maintenance", "value": "yes", "effect": "NoSchedule"}]}})
    wait_for(lambda: "1 node(s) had untolerated taint {maintenance: yes}" in scheduled_condition(
        wcore.read_namespaced_pod("smoke-late", "default")).message, what="taint reason")
    assert phase(wcore, "smoke-late") == "Pending"
    wl.store.update_node_status("late-0", {GPU: "1"}, {GPU: "1"})
    wait_for(lambda: phase(wcore, "smoke-late") == "Succeeded", what="scheduled after the node got GPUs")
    pod = wcore.read_namespaced_pod("smoke-late", "default")
    assert pod.spec.node_name == "late-0" and scheduled_condition(pod).status == "True"
    assert [e.reason for e in pod_events(wcore, "smoke-late")] == [
        "FailedScheduling", "Scheduled", "Pulled", "Created", "Started"]
    wcore.delete_namespaced_pod("smoke-late", "default")


def test_deleting_a_pod_frees_its_gpu(wl: Any, wcore: Any) -> None:
    node = gpu_node(wl, "gpu-one", 1)
    # restartPolicy Always: the container keeps running and holds the GPU
    wcore.create_namespaced_pod("default", smoke_pod("holder", node, pin="affinity", restart="Always"))
    wait_for(lambda: phase(wcore, "holder") == "Running", what="holder running")
    wcore.create_namespaced_pod("default", smoke_pod("waiter", node, pin="affinity"))
    total = len(wcore.list_node().items)
    want = ("0/{n} nodes are available: 1 Insufficient nvidia.com/gpu, {m} node(s) didn't satisfy plugin(s) "
            "[NodeAffinity]. preemption: 0/{n} nodes are available: 1 No preemption victims found for incoming pod, "
            "{m} Preemption is not helpful for scheduling.").format(n=total, m=total - 1)
    wait_for(lambda: (scheduled_condition(wcore.read_namespaced_pod("waiter", "default")).message == want),
             what="waiter unschedulable")
    # nodeName bypasses the scheduler: the kubelet rejects it
    wcore.create_namespaced_pod("default", smoke_pod("pinned", node))
    wait_for(lambda: phase(wcore, "pinned") == "Failed")
    assert "Requested: 1, Available: 0" in wcore.read_namespaced_pod("pinned", "default").status.message
    time.sleep(0.3)
    holder = wcore.read_namespaced_pod("holder", "default")
    assert holder.status.phase == "Running" and holder.status.container_statuses[0].ready
    assert "GPU 0:" in wcore.read_namespaced_pod_log("holder", "default")
    wcore.delete_namespaced_pod("holder", "default")
    wait_for(lambda: phase(wcore, "waiter") == "Succeeded", what="waiter ran after the holder was deleted")
    assert wcore.read_namespaced_pod_log("waiter", "default").startswith("GPU 0: lab GPU")
    # a finished pod holds nothing: the next one fits
    wcore.create_namespaced_pod("default", smoke_pod("next", node, pin="affinity"))
    wait_for(lambda: phase(wcore, "next") == "Succeeded", what="next pod")
    for name in ("waiter", "pinned", "next"):
        wcore.delete_namespaced_pod(name, "default")


def test_runtime_runs_workload_pods(wl: Any, wcore: Any) -> None:
    rt = WorkloadRuntime()
    wl.attach_runtime(rt)
    try:
        node = gpu_node(wl, "gpu-rt", 2)
        wcore.create_namespaced_pod("default", smoke_pod("rt-ok", node))
        wcore.create_namespaced_pod("default", smoke_pod("rt-fail", node, command=["exit", "3"]))
        wcore.create_namespaced_pod("default", smoke_pod("rt-crash", node, pin="affinity", command=["crash"]))
        wait_for(lambda: {phase(wcore, n) for n in ("rt-ok", "rt-fail")} == {"Succeeded", "Failed"})
        assert wcore.read_namespaced_pod_log("rt-ok", "default") == (
            "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0) on %s\n" % node)
        failed = wcore.read_namespaced_pod("rt-fail", "default")
        term = failed.status.container_statuses[0].state.terminated
        assert (failed.status.phase, failed.status.reason, term.exit_code, term.reason) == ("Failed", None, 3, "Error")
        assert wcore.read_namespaced_pod_log("rt-fail", "default") == "failing on %s\n" % node
        wait_for(lambda: phase(wcore, "rt-crash") == "Failed", what="crash -> exit 1")  # a GPU was free again
        crash = wcore.read_namespaced_pod("rt-crash", "default")
        assert crash.status.container_statuses[0].state.terminated.exit_code == 1
        assert "the runtime fell over" in wcore.read_namespaced_pod_log("rt-crash", "default")
        assert sorted(rt.calls) == sorted([(node, "rt-ok", "Running"), (node, "rt-fail", "Running"),
                                           (node, "rt-crash", "Running")])
    finally:
        wl.attach_runtime(None)
    for name in ("rt-ok", "rt-fail", "rt-crash"):
        wcore.delete_namespaced_pod(name, "default")


def test_workloads_off_by_default_and_switchable(lab: Any, core: Any) -> None:
    ensure_ns(core, "wloff")
    lab.store.update_node_status("node-2", {GPU: "1"}, {GPU: "1"})
    core.create_namespaced_pod("wloff", smoke_pod("idle", "node-2"))
    time.sleep(0.3)
    assert phase(core, "idle", "wloff") == "Pending" and not pod_events(core, "idle", "wloff")
    lab.enable_workloads()
    try:
        wait_for(lambda: phase(core, "idle", "wloff") == "Succeeded", what="runs once switched on")
    finally:
        lab.enable_workloads(False)
    core.delete_namespace("wloff")
    lab.store.update_node_status("node-2", {}, {})


# --- RBAC ---------------------------------------------------------------------------------------------
RULES = [
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"], "namespace": "rbac-a"},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get", "list", "watch", "delete"],
     "namespace": "rbac-a"},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"], "namespace": "rbac-a"},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "update"],
     "resourceNames": ["allowed"], "namespace": "rbac-a"},
    {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["*"], "namespace": "rbac-a"},
]


def forbidden_body(exc: ApiException) -> Dict[str, Any]:
    assert exc.status == 403, exc
    body = status_body(exc)
    assert (body["kind"], body["apiVersion"], body["status"], body["reason"], body["code"]) == (
        "Status", "v1", "Failure", "Forbidden", 403)
    return body


def denied(call: Callable[..., Any], *args: Any, **kw: Any) -> Dict[str, Any]:
    with pytest.raises(ApiException) as err:
        call(*args, **kw)
    return forbidden_body(err.value)


@pytest.fixture(scope="module")
def restricted(lab: Any, core: Any, tmp_path_factory: Any) -> Any:
    for ns in ("rbac-a", "rbac-b"):
        ensure_ns(core, ns)
    token = lab.add_token(rules=RULES, user="system:serviceaccount:rbac-a:bringup")
    path = lab.write_kubeconfig(str(tmp_path_factory.mktemp("rbac") / "kubeconfig"), token=token)
    client = make_api_client(path)
    client.kubeconfig = path
    return client


def test_rbac_verbs_resources_subresources_namespaces(lab: Any, core: Any, restricted: Any) -> None:
    rcore, rapps = k8s.CoreV1Api(restricted), k8s.AppsV1Api(restricted)
    user = "system:serviceaccount:rbac-a:bringup"
    lab.reset_counters()
    # cluster-wide rules
    assert rcore.list_node().items and rcore.read_node("node-0").metadata.name == "node-0"
    rcore.patch_node_status("node-0", {"metadata": {}})
    body = denied(rcore.patch_node, "node-0", {"metadata": {"labels": {"x": "y"}}})
    assert body["message"] == ('nodes "node-0" is forbidden: User "%s" cannot patch resource "nodes" in API group "" '
                               "at the cluster scope" % user)
    assert body["details"] == {"name": "node-0", "kind": "nodes"}
    body = denied(rcore.delete_node, "node-0")
    assert 'cannot delete resource "nodes"' in body["message"]
    # namespaced rules apply in their namespace only
    rcore.create_namespaced_pod("rbac-a", {"metadata": {"name": "p"}, "spec": {
        "containers": [{"name": "c", "image": "busybox:1.36"}]}})
    assert [p.metadata.name for p in rcore.list_namespaced_pod("rbac-a").items] == ["p"]
    body = denied(rcore.create_namespaced_pod, "rbac-b", {"metadata": {"name": "p"}, "spec": {
        "containers": [{"name": "c", "image": "busybox:1.36"}]}})
    assert body["message"] == ('pods is forbidden: User "%s" cannot create resource "pods" in API group "" in the '
                               'namespace "rbac-b"' % user)
    assert body["details"] == {"kind": "pods"}
    body = denied(rcore.list_pod_for_all_namespaces)
    assert body["message"].endswith('cannot list resource "pods" in API group "" at the cluster scope')
    assert rcore.read_namespace("rbac-a").metadata.name == "rbac-a"  # a namespace's own namespace is itself
    assert 'cannot get resource "namespaces" in API group "" in the namespace "rbac-b"' in denied(
        rcore.read_namespace, "rbac-b")["message"]
    # subresources are separate resources
    assert rcore.read_namespaced_pod_log("p", "rbac-a") == ""
    body = denied(rcore.read_namespaced_pod_status, "p", "rbac-a")
    assert body["message"] == ('pods "p" is forbidden: User "%s" cannot get resource "pods/status" in API group "" '
                               'in the namespace "rbac-a"' % user)
    assert body["details"] == {"name": "p", "kind": "pods"}
    denied(rcore.delete_collection_namespaced_pod, "rbac-a")  # deletecollection is its own verb
    # resourceNames: only the named object; a list is allowed only when it names it
    with pytest.raises(ApiException) as err:
        rcore.read_namespaced_config_map("allowed", "rbac-a")
    assert err.value.status == 404  # allowed, and absent
    core.create_namespaced_config_map("rbac-a", {"metadata": {"name": "allowed"}, "data": {"k": "v"}})
    core.create_namespaced_config_map("rbac-a", {"metadata": {"name": "other"}})
    assert rcore.read_namespaced_config_map("allowed", "rbac-a").data == {"k": "v"}
    body = denied(rcore.read_namespaced_config_map, "other", "rbac-a")
    assert body["details"] == {"name": "other", "kind": "configmaps"}
    denied(rcore.patch_namespaced_config_map, "allowed", "rbac-a", {"data": {"k": "w"}})  # patch not granted
    denied(rcore.list_namespaced_config_map, "rbac-a")
    named = rcore.list_namespaced_config_map("rbac-a", field_selector="metadata.name=allowed")
    assert [c.metadata.name for c in named.items] == ["allowed"]
    body = denied(rcore.create_namespaced_config_map, "rbac-a", {"metadata": {"name": "allowed"}})
    assert body["message"].startswith("configmaps is forbidden:")  # create has no name to match
    # API groups and wildcards
    rapps.create_namespaced_daemon_set("rbac-a", daemonset("rbac-ds", {"lab/none": "x"}))
    rapps.patch_namespaced_daemon_set("rbac-ds", "rbac-a", {"metadata": {"labels": {"a": "b"}}})
    body = denied(rapps.read_namespaced_daemon_set_status, "rbac-ds", "rbac-a")
    assert body["message"] == ('daemonsets.apps "rbac-ds" is forbidden: User "%s" cannot get resource '
                               '"daemonsets/status" in API group "apps" in the namespace "rbac-a"' % user)
    assert body["details"] == {"name": "rbac-ds", "group": "apps", "kind": "daemonsets"}
    denied(rapps.list_namespaced_daemon_set, "rbac-b")
    # discovery is open to every authenticated user
    assert k8s.VersionApi(restricted).get_code().major == "1"
    assert k8s.CoreApi(restricted).get_api_versions().versions == ["v1"]
    # the side channel counts denials apart from the served requests
    assert lab.forbidden_count("patch", "nodes") == 1 and lab.forbidden_count("get", "pods/status") == 1
    assert lab.forbidden_count("list", "configmaps") == 1 and lab.count("list", "configmaps") == 1
    assert lab.count("patch", "nodes") == 0 and lab.count("patch", "nodes/status") == 1
    code, doc = raw_get(lab, "/lab/counters", token=None)
    assert doc["forbidden"]["create"] == {"configmaps": 1, "pods": 1}
    assert doc["forbiddenRequests"][0] == {"user": user, "verb": "patch", "resource": "nodes", "namespace": "",
                                           "name": "node-0", "message": (
                                               'nodes "node-0" is forbidden: User "%s" cannot patch resource "nodes" '
                                               'in API group "" at the cluster scope' % user)}
    # the admin token still may do everything
    core.patch_node("node-0", {"metadata": {"labels": {"x": "y"}}})
    apps = k8s.AppsV1Api(make_api_client(lab.kubeconfig))
    assert apps.read_namespaced_daemon_set_status("rbac-ds", "rbac-a").metadata.name == "rbac-ds"


def test_rbac_wildcards_and_token_management(lab: Any, tmp_path: Any) -> None:
    token = lab.add_token(rules=[{"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["get"]},
                                 {"apiGroups": [""], "resources": ["*"], "verbs": ["list"], "namespace": "rbac-a"}])
    c = k8s.CoreV1Api(make_api_client(lab.write_kubeconfig(str(tmp_path / "kc"), token=token)))
    assert c.read_node_status("node-0").metadata.name == "node-0"
    body = denied(c.read_node, "node-0")
    assert 'User "lab-user" cannot get resource "nodes"' in body["message"]
    c.list_namespaced_config_map("rbac-a")
    c.list_namespaced_pod("rbac-a")
    denied(c.read_namespaced_pod_log, "p", "rbac-a")  # "*" in a namespace rule; pods/log needs get
    assert lab.token_rules(token)[0]["resources"] == ["*/status"] and lab.token_rules(lab.token) is None
    lab.remove_token(token)
    with pytest.raises(ApiException) as err:
        c.list_namespaced_pod("rbac-a")
    assert err.value.status == 401
    with pytest.raises(ValueError):
        lab.add_token(rules=[{"apiGroup": [""], "resources": ["pods"], "verbs": ["get"]}])  # typo
    with pytest.raises(ValueError):
        lab.add_token(rules=[{"resources": ["pods"], "verbs": ["get"]}])  # apiGroups required
    with pytest.raises(ValueError):
        lab.add_token(rules=[{"apiGroups": [""], "resources": "pods", "verbs": ["get"]}])  # not a list
    server = LabApiServer(str(tmp_path / "unstarted"), rbac={
        "t1": RULES, "t2": {"user": "alice", "rules": []}, "t3": None})
    assert server._identity("t1").user == "lab-user" and server._identity("t2").user == "alice"
    assert server._identity("t3").admin and server._identity("nope") is None


@needs_kubectl
def test_rbac_forbidden_through_kubectl(lab: Any, restricted: Any) -> None:
    user = "system:serviceaccount:rbac-a:bringup"
    proc = kubectl(lab, "get", "pods", "-n", "rbac-b", check=False, kubeconfig=restricted.kubeconfig)
    assert proc.returncode == 1
    assert ('Error from server (Forbidden): pods is forbidden: User "%s" cannot list resource "pods" in API group "" '
            'in the namespace "rbac-b"' % user) in proc.stderr
    proc = kubectl(lab, "label", "node", "node-1", "x=y", check=False, kubeconfig=restricted.kubeconfig)
    assert proc.returncode == 1
    assert ('Error from server (Forbidden): nodes "node-1" is forbidden: User "%s" cannot patch resource "nodes" in '
            'API group "" at the cluster scope' % user) in proc.stderr
    out = kubectl(lab, "get", "nodes", kubeconfig=restricted.kubeconfig).stdout
    assert "node-0" in out
    assert "p" in kubectl(lab, "get", "pods", "-n", "rbac-a", kubeconfig=restricted.kubeconfig).stdout


RBAC_YAML = """\
apiVersion: v1
kind: ServiceAccount
metadata: {name: bringup, namespace: gpu-ops}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: gpunode-bringup}
rules:
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch, patch]
- apiGroups: [""]
  resources: [nodes/status]
  verbs: [patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: gpunode-bringup}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: gpunode-bringup}
subjects:
- {kind: ServiceAccount, name: bringup, namespace: gpu-ops}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: plugin-admin, namespace: kube-system}
rules:
- apiGroups: [apps]
  resources: [daemonsets]
  verbs: [get, list, watch, patch]
- apiGroups: [""]
  resources: [pods, pods/log]
  verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: plugin-admin, namespace: kube-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: plugin-admin}
subjects:
- {kind: ServiceAccount, name: bringup, namespace: gpu-ops}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: smoke-runner}
rules:
- apiGroups: [""]
  resources: [pods]
  verbs: [create, delete, get, list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: smoke-runner, namespace: gpu-ops}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: smoke-runner}
subjects:
- {kind: ServiceAccount, name: bringup}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: someone-else}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: smoke-runner}
subjects:
- {kind: ServiceAccount, name: other, namespace: gpu-ops}
"""


def test_rules_from_rbac_manifest(lab: Any, core: Any, tmp_path: Any) -> None:
    from lab.apiserver import rules_from_rbac_yaml
    path = tmp_path / "rbac.yaml"
    path.write_text(RBAC_YAML)
    rules = rules_from_rbac_yaml(str(path), "gpu-ops:bringup")
    assert rules == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
        {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get", "list", "watch", "patch"],
         "namespace": "kube-system"},
        {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"], "namespace": "kube-system"},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "delete", "get", "list", "watch"],
         "namespace": "gpu-ops"},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list"], "namespace": "gpu-ops"},
    ]
    assert rules_from_rbac_yaml(str(path), "gpu-ops:nobody") == []
    assert len(rules_from_rbac_yaml(str(path), "system:serviceaccount:gpu-ops:other")) == 2
    ensure_ns(core, "gpu-ops")
    token = lab.add_service_account_token("gpu-ops:bringup", rbac_yaml=str(path))
    c = k8s.CoreV1Api(make_api_client(lab.write_kubeconfig(str(tmp_path / "kc"), token=token)))
    c.patch_node("node-0", {"metadata": {"labels": {"rbac": "yes"}}})
    c.list_namespaced_pod("kube-system")
    c.list_namespaced_event("gpu-ops")
    body = denied(c.list_namespaced_event, "kube-system")
    assert body["message"] == ('events is forbidden: User "system:serviceaccount:gpu-ops:bringup" cannot list '
                               'resource "events" in API group "" in the namespace "kube-system"')
    denied(c.create_namespaced_pod, "kube-system", {"metadata": {"name": "x"}, "spec": {
        "containers": [{"name": "c", "image": "busybox:1.36"}]}})
    # a binding to a role the manifest lacks is an error, not silently nothing
    path.write_text(RBAC_YAML.replace("kind: Role, name: plugin-admin", "kind: Role, name: missing"))
    with pytest.raises(ValueError, match='role.rbac.authorization.k8s.io "missing"'):
        rules_from_rbac_yaml(str(path), "gpu-ops:bringup")
    with pytest.raises(ValueError):
        rules_from_rbac_yaml(str(path), "bringup")


# --- scale ----------------------------------------------------------------------------------------
def test_thousand_node_api_only_fleet(tmp_path: Any) -> None:
    with LabApiServer(str(tmp_path / "big")) as big:
        t0 = time.perf_counter()
        big.store.add_nodes([NodeSpec(name="gpu-%04d" % i, root="/", labels={"nvidia.com/gpu.present": "true"})
                             for i in range(1000)])
        created = time.perf_counter() - t0
        assert created < 3.0
        times = []
        for _attempt in range(3):
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
