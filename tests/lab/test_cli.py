"""``python -m lab``: up (the real control plane, simulated kubelets) -> the kubeconfig works with
the real kubectl -> NVIDIA's static manifest deploys NVIDIA's real plugin -> break/fix through
the CLI -> down leaves no process, also after the daemon was SIGKILLed; an API-only fleet of 200
nodes; the clear failures of ``up``.

The main lab runs the collection's DaemonSet and ConfigMap as plugins/module_utils/_device_plugin.py
renders them with their defaults (NVIDIA's static manifest plus the collection's config,
``failOnInitError: true``, a node affinity on ``nvidia.com/gpu.present``); the killed-daemon lab
and the API-only fleet run NVIDIA's static manifest (deployments/static/nvidia-device-plugin.yml
of NVIDIA/k8s-device-plugin, unchanged). The main lab reports Node status every 2 s
(``--node-status-update-frequency 2``; the kubelet's nodeStatusUpdateFrequency is 10 s): the
tests wait on several capacity changes.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / ".build", ROOT, ROOT / "tests" / "integration"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from lab.pins import KUBE_LAB, device_plugin_binary, device_plugin_versions, pins  # noqa: E402

PLUGIN_TAG = device_plugin_versions()[0]
if not os.access(KUBE_LAB, os.X_OK) or not os.access(device_plugin_binary(PLUGIN_TAG), os.X_OK):
    pytest.skip("the lab's real parts are not built (make lab)", allow_module_level=True)
if not (ROOT / ".build" / "lab" / "lib" / "libnvidia-ml.so.1").exists():
    pytest.skip("lab NVML library not built (make lab-nvml)", allow_module_level=True)

from ansible_collections.gpunode.bringup.plugins.module_utils import _device_plugin as collection  # noqa: E402
from lab.cli import _alive, _group_members  # noqa: E402
from lab.node.layout import max_state_dir_length  # noqa: E402
from lab_fleet import KUBECTL, PYTHON, LabFleet  # noqa: E402

VERSION = pins()["KUBERNETES_VERSION"]
GOMODCACHE = os.environ.get("GOMODCACHE") or os.path.join(os.path.expanduser("~"), "go", "pkg", "mod")
STATIC_MANIFEST = os.path.join(GOMODCACHE, "github.com", "!n!v!i!d!i!a", "k8s-device-plugin@%s" % PLUGIN_TAG,
                               "deployments", "static", "nvidia-device-plugin.yml")
REGISTERED = "Registered device plugin for 'nvidia.com/gpu' with Kubelet"
NODES = ["gpu-node-01", "gpu-node-02", "gpu-node-03"]


def lab_cli(state_dir: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / ".build"), str(ROOT)]))
    return subprocess.run([PYTHON, "-m", "lab", "--state-dir", state_dir, *args], cwd=str(ROOT), env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ds waiting for %s" % (timeout, what))
        time.sleep(0.3)


def cmdline(pid: int) -> str:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def static_manifest() -> Dict[str, Any]:
    if not os.path.exists(STATIC_MANIFEST):
        pytest.skip("NVIDIA's static manifest is not in the Go module cache (%s)" % STATIC_MANIFEST)
    with open(STATIC_MANIFEST, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="module")
def fleet() -> Iterator[LabFleet]:
    lab = LabFleet(nodes=3, node_status_update_frequency=2).up()
    try:
        yield lab
    finally:
        lab.down()


def node_gpus(fleet: LabFleet, node: str) -> Any:
    status = fleet.api("/api/v1/nodes/%s" % node)["status"]
    return status["capacity"].get("nvidia.com/gpu"), status["allocatable"].get("nvidia.com/gpu")


def plugin_pods(fleet: LabFleet) -> Dict[str, Dict[str, Any]]:
    pods = fleet.api("/api/v1/namespaces/kube-system/pods?labelSelector=name%3Dnvidia-device-plugin-ds")["items"]
    return {p["spec"].get("nodeName"): p for p in pods if not p["metadata"].get("deletionTimestamp")}


# ---- up ----------------------------------------------------------------------------------------

def test_up_writes_kubeconfig_inventory_and_lab_json(fleet: LabFleet) -> None:
    info = json.loads((fleet.state_dir / "lab.json").read_text())
    state_dir = str(fleet.state_dir)
    assert info["ready"] is True and info["state_dir"] == state_dir
    assert info["nodes"] == NODES and info["scenario"] == "healthy" and info["api_only"] is False
    assert info["gpus_per_node"] == 8
    assert info["url"] == info["apiserver_url"] and info["fault_proxy"] is False
    assert re.fullmatch(r"https://127\.0\.0\.1:\d+", info["url"])
    assert info["kubernetes_version"] == VERSION
    assert info["token"] and info["ca"] == os.path.join(state_dir, "cluster", "pki", "ca.crt")
    assert info["audit_log"] == os.path.join(state_dir, "cluster", "audit.log") and os.path.exists(info["audit_log"])
    assert info["kubeconfig"] == os.path.join(state_dir, "kubeconfig")
    assert info["inventory"] == os.path.join(state_dir, "inventory.yml")
    assert info["control_socket"] == os.path.join(state_dir, "control.sock")
    assert sorted(info["pids"]) == ["daemon", "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"]
    assert all(_alive(pid) for pid in info["pids"].values())
    assert info["pgid"] == info["pids"]["daemon"] == os.getpgid(info["pids"]["daemon"])
    assert sorted(info["timings"]) == ["control_plane", "nodes"]
    assert info["node_roots"] == {n: os.path.join(state_dir, "nodes", n) for n in NODES}
    assert info["up_seconds"] > 0
    # the kubeconfig: the administrator's token, the lab CA
    kubeconfig = yaml.safe_load(Path(info["kubeconfig"]).read_text())
    assert kubeconfig["clusters"][0]["cluster"] == {"server": info["url"], "certificate-authority": info["ca"]}
    assert kubeconfig["users"][0] == {"name": "lab-admin", "user": {"token": info["token"]}}
    # the inventory
    inventory = yaml.safe_load(Path(info["inventory"]).read_text())
    hosts = inventory["all"]["children"]["gpu_nodes"]["hosts"]
    assert sorted(hosts) == NODES
    host = hosts["gpu-node-01"]
    assert host["ansible_connection"] == "local"
    assert inventory["all"]["vars"]["gpunode_kubeconfig"] == info["kubeconfig"]  # localhost plays need it too
    root = host["gpunode_node_root"]
    assert root == info["node_roots"]["gpu-node-01"]
    assert os.path.isdir(os.path.join(root, "var/lib/kubelet/device-plugins"))
    assert host["gpunode_node_environment"] == {"LD_LIBRARY_PATH": str(ROOT / ".build" / "lab" / "lib"),
                                                "GPUNODE_LAB_NVML_STATE": os.path.join(root, "nvml.state")}
    assert os.path.exists(host["gpunode_node_environment"]["GPUNODE_LAB_NVML_STATE"])
    assert inventory["all"]["children"]["gpu_nodes"]["vars"]["gpunode_expected_gpu_count"] == 8
    # a second up on a running state dir is refused
    again = fleet.lab("up", "--nodes", "1", check=False)
    assert again.returncode == 1
    assert again.stderr == ("lab up: a lab is already running from %s (pid %d); run `python -m lab down` first\n"
                            % (state_dir, info["pids"]["daemon"]))


def test_kubectl_talks_to_the_real_api_server(fleet: LabFleet) -> None:
    version = fleet.kubectl("version")
    assert "Client Version: %s" % VERSION in version.stdout
    assert "Server Version: %s" % VERSION in version.stdout
    metrics = fleet.kubectl("get", "--raw", "/metrics").stdout
    assert re.search(r'^apiserver_request_total\{.*verb="GET".*\} \d+$', metrics, re.M)
    resources = json.loads(fleet.kubectl("get", "--raw", "/apis/resource.k8s.io/v1").stdout)
    assert resources["kind"] == "APIResourceList" and resources["groupVersion"] == "resource.k8s.io/v1"
    assert {"deviceclasses", "resourceclaims", "resourceslices"} <= {r["name"] for r in resources["resources"]}
    nodes = json.loads(fleet.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    assert [n["metadata"]["name"] for n in nodes] == NODES
    for node in nodes:
        ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True"
        assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
        assert node["status"]["nodeInfo"]["kubeletVersion"] == VERSION


def test_the_collection_daemonset_runs_nvidia_plugin_on_every_node(fleet: LabFleet) -> None:
    spec = collection.spec_from_params({})
    text = collection.config_text(spec.config)
    manifest = fleet.state_dir / "device-plugin.yml"
    manifest.write_text(yaml.safe_dump_all([collection.render_config_map(spec, text),
                                            collection.render_daemonset(spec, text)]))
    applied = fleet.kubectl("apply", "-f", str(manifest))
    assert applied.stdout.splitlines() == ["configmap/nvidia-device-plugin-config created",
                                           "daemonset.apps/nvidia-device-plugin-daemonset created"]
    fleet.wait_advertising(NODES, 8)
    out = fleet.kubectl("logs", "-n", "kube-system", "-l", "name=nvidia-device-plugin-ds")
    assert out.stdout.count(REGISTERED) == 3
    assert sorted(plugin_pods(fleet)) == NODES
    for node in NODES:
        assert node_gpus(fleet, node) == ("8", "8")


def test_break_and_fix_through_the_cli(fleet: LabFleet) -> None:
    fleet.wait_advertising(NODES, 8)
    state_dir = str(fleet.state_dir)
    # plugin_crash on gpu-node-01: NVIDIA's plugin (failOnInitError: true) exits, CrashLoopBackOff
    broke = lab_cli(state_dir, "break", "gpu-node-01", "plugin_crash", "--arg", "signature=nvml_init_failed")
    assert broke.returncode == 0 and broke.stdout == "lab break: gpu-node-01 plugin_crash\n", broke.stderr
    pod = plugin_pods(fleet)["gpu-node-01"]["metadata"]["name"]

    def waiting_reason() -> Any:
        statuses = fleet.api("/api/v1/namespaces/kube-system/pods/%s" % pod)["status"]["containerStatuses"]
        return (statuses[0]["state"].get("waiting") or {}).get("reason")

    wait_for(lambda: waiting_reason() == "CrashLoopBackOff", 60, "CrashLoopBackOff")
    logs = fleet.kubectl("logs", "-n", "kube-system", pod).stdout
    assert "Failed to initialize NVML: Unknown Error." in logs and REGISTERED not in logs
    wait_for(lambda: node_gpus(fleet, "gpu-node-01") == ("8", "0"), 60, "gpu-node-01 allocatable 0")
    status = fleet.status()
    assert status["nodes"]["gpu-node-01"]["faults"] == {"plugin_crash": {"signature": "nvml_init_failed"}}
    assert status["nodes"]["gpu-node-01"]["plugin_pod"]["restart_count"] == 1
    assert status["nodes"]["gpu-node-01"]["plugin_pod"]["waiting_reason"] == "CrashLoopBackOff"
    table = lab_cli(state_dir, "status")
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if line.startswith("gpu-node-01 "))
    assert row.split()[-2:] == ["8/0", "plugin_crash"] and "CrashLoopBackOff" in row.split()
    fixed = lab_cli(state_dir, "fix", "gpu-node-01", "plugin_crash")
    assert fixed.returncode == 0 and fixed.stdout == "lab fix: gpu-node-01 plugin_crash\n"
    assert fleet.status()["nodes"]["gpu-node-01"]["faults"] == {}
    # the restart after the kubelet's back-off is healthy
    fleet.wait_advertising(["gpu-node-01"], 8)
    assert REGISTERED in fleet.kubectl("logs", "-n", "kube-system", pod).stdout

    # label_missing: the real DaemonSet controller takes the plugin pod off gpu-node-02
    assert lab_cli(state_dir, "break", "gpu-node-02", "label_missing").returncode == 0
    assert "nvidia.com/gpu.present" not in fleet.api("/api/v1/nodes/gpu-node-02")["metadata"]["labels"]
    wait_for(lambda: "gpu-node-02" not in plugin_pods(fleet), 60, "the plugin pod to leave gpu-node-02")
    assert lab_cli(state_dir, "fix", "gpu-node-02", "label_missing").returncode == 0
    assert fleet.api("/api/v1/nodes/gpu-node-02")["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
    fleet.wait_advertising(["gpu-node-02"], 8)

    # taint_untolerated
    assert lab_cli(state_dir, "break", "gpu-node-03", "taint_untolerated").returncode == 0
    taints = fleet.api("/api/v1/nodes/gpu-node-03")["spec"]["taints"]
    assert [(t["key"], t["value"], t["effect"]) for t in taints] == [("gpu-maintenance", "true", "NoSchedule")]
    assert fleet.status()["nodes"]["gpu-node-03"]["taints"] == ["gpu-maintenance=true:NoSchedule"]
    assert lab_cli(state_dir, "fix", "gpu-node-03", "taint_untolerated").returncode == 0
    assert not fleet.api("/api/v1/nodes/gpu-node-03")["spec"].get("taints")

    # daemonset_missing: the DaemonSet deleted, the garbage collector removes its pods
    assert lab_cli(state_dir, "break", "cluster", "daemonset_missing").returncode == 0
    assert fleet.api("/apis/apps/v1/namespaces/kube-system/daemonsets")["items"] == []
    wait_for(lambda: plugin_pods(fleet) == {}, 90, "the garbage collector to remove the plugin pods")
    assert fleet.status()["cluster_faults"] == ["daemonset_missing"]
    assert lab_cli(state_dir, "fix", "cluster", "daemonset_missing").returncode == 0
    names = [d["metadata"]["name"] for d in fleet.api("/apis/apps/v1/namespaces/kube-system/daemonsets")["items"]]
    assert names == ["nvidia-device-plugin-daemonset"]
    fleet.wait_advertising(NODES, 8)

    # what the CLI refuses, and how
    unknown = lab_cli(state_dir, "break", "gpu-node-01", "no_such_fault")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("lab break: unknown fault 'no_such_fault' (known: plugin_crash, plugin_hang, ")
    missing = lab_cli(state_dir, "break", "gpu-node-99", "plugin_hang")
    assert missing.returncode == 1
    assert missing.stderr == "lab break: no node 'gpu-node-99' in this lab (nodes: %s)\n" % ", ".join(NODES)
    nameless = lab_cli(state_dir, "break", "cluster", "plugin_hang")
    assert nameless.returncode == 1 and nameless.stderr == "lab break: fault plugin_hang needs a node name\n"
    bad_arg = lab_cli(state_dir, "break", "gpu-node-01", "plugin_crash", "--arg", "signature")
    assert bad_arg.returncode != 0 and "--arg wants KEY=VALUE, got 'signature'" in bad_arg.stderr
    faults = lab_cli(state_dir, "faults").stdout.split()
    assert faults[:3] == ["plugin_crash", "plugin_hang", "plugin_stale"]
    assert {"critical_xid", "daemonset_missing", "label_missing", "taint_untolerated"} <= set(faults)


def test_api_faults_need_the_fault_proxy(fleet: LabFleet) -> None:
    out = lab_cli(str(fleet.state_dir), "api-faults", "list")
    assert out.returncode == 1
    assert out.stderr == "lab api-faults: API faults need the fault proxy: start the lab with `up --fault-proxy`\n"


def test_down_leaves_no_process(fleet: LabFleet) -> None:
    info = fleet.info
    pgid = info["pgid"]
    plugins = [n["plugin_pod"]["pid"] for n in fleet.nodes_status().values()]
    assert len(plugins) == 3 and all(plugins)
    members = _group_members(pgid)
    # the whole fleet is one process group: the daemon, kube-lab's components, NVIDIA's plugins
    assert set(info["pids"].values()) <= set(members)
    assert set(plugins) <= set(members)
    assert all("nvidia-device-plugin" in cmdline(pid) for pid in plugins)
    assert sum(cmdline(pid).startswith(KUBE_LAB + " ") for pid in members) == 4
    down = fleet.lab("down")
    assert down.stdout == "lab down: stopped pid %d, no process left in group %d\n" % (info["pids"]["daemon"], pgid)
    assert _group_members(pgid) == []
    assert not any(_alive(pid) for pid in members)
    for name in ("lab.json", "control.sock", "daemon.pid"):
        assert not (fleet.state_dir / name).exists()
    assert fleet.lab("status", check=False).returncode == 3
    again = fleet.lab("down", check=False)
    assert again.returncode == 0 and again.stdout == "lab down: no lab in %s\n" % fleet.state_dir


# ---- a killed daemon, the fault proxy ----------------------------------------------------------------

def test_down_after_the_daemon_was_killed_and_api_faults() -> None:
    static_manifest()
    lab = LabFleet(nodes=1, gpus=2, fault_proxy=True, node_status_update_frequency=2).up()
    try:
        info = lab.info
        assert info["fault_proxy"] is True and info["url"] != info["apiserver_url"]
        state_dir = str(lab.state_dir)
        # API faults through the CLI: a 500 on the next list of nodes, answered by the proxy
        added = lab_cli(state_dir, "api-faults", "add", "--verb", "list", "--resource", "nodes", "--kind", "500")
        assert added.returncode == 0 and added.stdout == "list nodes: 500, 0 of 1 fired (0: until cleared)\n"
        first = lab.kubectl("get", "nodes", check=False)
        assert first.returncode == 1 and "Error from server (InternalError)" in first.stderr, first.stderr
        second = lab.kubectl("get", "nodes", "-o", "name")
        assert second.stdout == "node/gpu-node-01\n"
        listed = lab_cli(state_dir, "api-faults", "list")
        assert listed.stdout == "list nodes: 500, 1 of 1 fired (0: until cleared)\n"
        bad = lab_cli(state_dir, "api-faults", "add", "--verb", "fetch", "--resource", "nodes", "--kind", "500")
        assert bad.returncode == 1 and "verb must be one of get, list, watch" in bad.stderr
        assert lab_cli(state_dir, "api-faults", "clear").returncode == 0
        assert lab_cli(state_dir, "api-faults", "list").stdout == ""
        # NVIDIA's static manifest: a plugin process in the group too
        lab.kubectl("apply", "-f", STATIC_MANIFEST)
        lab.wait_advertising(["gpu-node-01"], 2)
        plugin = lab.nodes_status()["gpu-node-01"]["plugin_pod"]["pid"]
        pgid = info["pgid"]
        members = _group_members(pgid)
        assert set(info["pids"].values()) | {plugin} <= set(members)
        os.kill(info["pids"]["daemon"], signal.SIGKILL)
        # every process the daemon started dies with it (PR_SET_PDEATHSIG), before any down
        wait_for(lambda: not any(_alive(pid) for pid in members), 30, "the daemon's processes to die with it")
        assert _group_members(pgid) == []
        down = lab.lab("down")
        assert down.stdout == "lab down: stopped pid %d, no process left in group %d\n" % (info["pids"]["daemon"], pgid)
        assert _group_members(pgid) == []
        assert not any(_alive(pid) for pid in members)
    finally:
        lab.down()


# ---- API-only fleets ----------------------------------------------------------------------------

def test_api_only_fleet_of_200_nodes() -> None:
    lab = LabFleet(nodes=200, api_only=True, node_status_update_frequency=2).up()
    try:
        names = ["gpu-node-%03d" % i for i in range(1, 201)]
        assert lab.node_names == names
        assert not (lab.state_dir / "nodes").exists()
        hosts = yaml.safe_load(Path(lab.inventory).read_text())["all"]["children"]["gpu_nodes"]["hosts"]
        assert sorted(hosts) == names and "gpunode_node_root" not in hosts["gpu-node-001"]

        def ready() -> List[str]:
            nodes = lab.api("/api/v1/nodes")["items"]
            return sorted(n["metadata"]["name"] for n in nodes
                          if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"]))

        assert ready() == names
        # NVIDIA's static manifest: the DaemonSet controller and the scheduler place a pod on each
        manifest = static_manifest()
        lab.apply(manifest)

        def advertising() -> bool:
            nodes = lab.api("/api/v1/nodes")["items"]
            return len(nodes) == 200 and all(n["status"]["capacity"].get("nvidia.com/gpu") == "8"
                                             and n["status"]["allocatable"].get("nvidia.com/gpu") == "8"
                                             for n in nodes)

        wait_for(advertising, 240, "200 nodes advertising nvidia.com/gpu")
        daemonset = lab.api("/apis/apps/v1/namespaces/kube-system/daemonsets/nvidia-device-plugin-daemonset")
        assert daemonset["status"]["desiredNumberScheduled"] == 200
        wait_for(lambda: lab.api("/apis/apps/v1/namespaces/kube-system/daemonsets/nvidia-device-plugin-daemonset")
                 ["status"].get("numberReady") == 200, 120, "200 ready plugin pods")
        refused = lab.lab("break", "gpu-node-001", "plugin_hang", check=False)
        assert refused.returncode == 1
        assert refused.stderr.startswith("lab break: fault plugin_hang needs the node runtime; this lab is --api-only")
    finally:
        lab.down()


# ---- clear failures of up ----------------------------------------------------------------------

def test_state_dir_too_long_fails_clearly() -> None:
    base = tempfile.mkdtemp(prefix="gll", dir="/tmp")
    try:
        limit = max_state_dir_length(len("gpu-node-01"))
        long_dir = os.path.join(base, "d" * (limit - len(base)))
        assert len(long_dir) == limit + 1
        up = lab_cli(long_dir, "up", "--nodes", "1")
        assert up.returncode == 2
        assert up.stderr == ("lab up: state dir %s is %d bytes; node sockets need it at most %d (unix socket paths are "
                             "limited to 107 bytes): use e.g. --state-dir /tmp/gpunode-lab\n" % (long_dir, limit + 1, limit))
        assert not os.path.exists(long_dir)  # nothing was created, nothing started
    finally:
        os.rmdir(base)


def test_commands_without_a_lab() -> None:
    base = tempfile.mkdtemp(prefix="gln", dir="/tmp")
    try:
        for args in (("status",), ("break", "gpu-node-01", "plugin_hang"), ("api-faults", "list")):
            out = lab_cli(base, *args)
            assert out.returncode == 3
            assert out.stderr == "lab: no lab running from %s (start one with `python -m lab up`)\n" % base
        assert lab_cli(base, "down").stdout == "lab down: no lab in %s\n" % base
        assert lab_cli(base, "up", "--scenario", "demo", "--nodes", "3").stderr == \
            "lab up: scenario demo has exactly 4 nodes\n"
    finally:
        os.rmdir(base)


def test_kubectl_binary_is_the_pinned_release() -> None:
    out = subprocess.run([KUBECTL, "version", "--client", "-o", "json"], text=True, capture_output=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["clientVersion"]["gitVersion"] == VERSION
