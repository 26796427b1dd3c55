"""gpunode.bringup.device_plugin_probe against the lab: one node per case, the module run by
``ansible`` over an inventory of the lab's node roots, exactly as it runs on real nodes.

The fleet is the lab's node runtime (lab/node: kubelet and device plugin stand-ins serving the
real gRPC contracts on each node root's sockets), started once for this module through its
Python API with a minimal ClusterHooks (no API server is needed to probe a node). Each case
breaks its own node with the lab's fault names; one ``ansible all`` run probes every node in
parallel; then every fault is fixed and two more runs (normal and check mode) must find every
node healthy.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import yaml

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / ".build"
for path in (BUILD, ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

if not (BUILD / "lab" / "lib" / "libnvidia-ml.so.1").exists():
    pytest.skip("lab NVML library not built (make lab-nvml)", allow_module_level=True)
if not (BUILD / "ansible_collections" / "gpunode" / "bringup").exists():
    pytest.skip("collection not linked under .build (make collection)", allow_module_level=True)

from ansible_collections.gpunode.bringup.plugins.module_utils._probe import ProbeRequest, probe_node  # noqa: E402
from lab import nvml_state  # noqa: E402
from lab.contracts import NodeSpec  # noqa: E402
from lab.node import NodeFleet  # noqa: E402

PYTHON = sys.executable
ANSIBLE = str(Path(PYTHON).parent / "ansible")
GPUS = 4
DEADLINE = 2.0
MARGIN = 1.0  # a hung plugin is reported within DEADLINE + MARGIN (14 module runs share 2 cores)
TIME_SLICING = ("version: v1\nsharing:\n  timeSlicing:\n    renameByDefault: %s\n"
                "    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n")


class Hooks:
    """ClusterHooks without an API server: keeps node status and serves ConfigMaps."""

    def __init__(self) -> None:
        self.node_status: Dict[str, Tuple[Dict[str, str], Dict[str, str], Optional[bool]]] = {}
        self.objects: Dict[Tuple[str, Optional[str], str], Dict[str, Any]] = {}

    def update_pod_status(self, namespace: str, name: str, status: Any) -> None:
        pass

    def update_node_status(self, node: str, capacity: Dict[str, str], allocatable: Dict[str, str],
                           ready: Optional[bool] = None) -> None:
        self.node_status[node] = (dict(capacity), dict(allocatable), ready)

    def get_object(self, api_version: str, kind: str, namespace: Optional[str], name: str) -> Optional[Dict[str, Any]]:
        return self.objects.get((kind, namespace, name))

    def allocatable(self, node: str, resource: str = "nvidia.com/gpu") -> Optional[str]:
        return self.node_status.get(node, ({}, {}, None))[1].get(resource)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("lab: timed out waiting for %s" % what)


def plugin_pod(name: str, config_map: Optional[str] = None) -> Dict[str, Any]:
    spec: Dict[str, Any] = {"containers": [{"name": "nvidia-device-plugin-ctr",
                                            "image": "nvcr.io/nvidia/k8s-device-plugin:v0.17.1"}]}
    if config_map:
        spec["volumes"] = [{"name": "config", "configMap": {"name": config_map}}]
    return {"metadata": {"name": name, "namespace": "kube-system", "uid": "uid-" + name}, "spec": spec}


class Case:
    """A node of the fleet, what breaks it, how to see the break took effect, the expected codes."""

    def __init__(self, name: str, codes: List[str], resource: str = "nvidia.com/gpu",
                 replicas: Optional[str] = None) -> None:
        self.name = name
        self.codes = codes
        self.resource = resource
        self.socket = "nvidia-%s.sock" % resource.split("/", 1)[1]
        self.replicas = replicas  # time-slicing renameByDefault ("false"/"true"), None: no time-slicing
        self.pod_generation = 0

    @property
    def pod(self) -> str:
        return "nvdp-%s-%d" % (self.name, self.pod_generation)


CASES = [
    Case("healthy", []),
    Case("plugin-missing", ["plugin_socket_missing"]),  # the plugin pod was deleted
    Case("plugin-crash", ["plugin_socket_missing"]),
    Case("plugin-hang", ["plugin_not_answering"]),
    Case("plugin-stale", ["registration_stale"]),  # kubelet restarted, the plugin kept its old socket
    Case("plugin-stale-gone", ["plugin_socket_missing"]),  # kubelet restarted and removed the socket
    Case("kubelet-down", ["kubelet_socket_missing"]),
    Case("socket-file", ["plugin_socket_not_socket"]),
    Case("critical-xid", ["plugin_devices_unhealthy"]),
    Case("count-missing", ["plugin_devices_missing"]),  # a GPU came back, the plugin was not restarted
    Case("count-extra", ["plugin_devices_extra"]),  # a GPU vanished from NVML, the plugin still lists it
    Case("no-devices", ["plugin_socket_missing"]),  # "No devices found. Waiting indefinitely."
    Case("time-slicing", [], replicas="false"),
    Case("time-slicing-renamed", [], resource="nvidia.com/gpu.shared", replicas="true"),
]
BY_NAME = {case.name: case for case in CASES}


class Lab:
    def __init__(self) -> None:
        self.state_dir = tempfile.mkdtemp(prefix="dpi-", dir="/tmp" if os.path.isdir("/tmp") else None)
        self.hooks = Hooks()
        self.fleet = NodeFleet(self.state_dir, self.hooks, crash_backoff=(0.05, 0.2), plugin_retry_s=0.5,
                               watch_interval_s=0.05)
        self.ansible_home = os.path.join(self.state_dir, "ansible")
        os.makedirs(os.path.join(self.ansible_home, "tmp"))

    def root(self, case: Case) -> str:
        return self.fleet.layout(case.name).root

    def uuids(self, case: Case) -> List[str]:
        """The GPUs NVML lists now (what nvml_info would report)."""
        return [gpu["uuid"] for gpu in nvml_state.read_state(self.fleet.layout(case.name).nvml_state)["gpus"]]

    def start_pod(self, case: Case) -> None:
        case.pod_generation += 1
        config = None
        if case.replicas is not None:
            config = "ts-" + case.name
            self.hooks.objects[("ConfigMap", "kube-system", config)] = {"data": {"config.yaml": TIME_SLICING % case.replicas}}
        self.fleet.start_plugin_pod(case.name, plugin_pod(case.pod, config))

    def restart_pod(self, case: Case) -> None:
        self.fleet.stop_plugin_pod(case.name, case.pod)
        self.start_pod(case)

    def advertised(self, case: Case) -> str:
        return str(GPUS * 4 if case.replicas is not None else GPUS)

    def wait_registered(self, case: Case, count: Optional[str] = None) -> None:
        count = count or self.advertised(case)
        wait_for(lambda: self.hooks.allocatable(case.name, case.resource) == count,
                 "%s to advertise %s %s" % (case.name, count, case.resource))

    def plugin_socket(self, case: Case) -> str:
        return os.path.join(self.fleet.layout(case.name).device_plugin_dir, case.socket)

    def inventory(self, path: str) -> str:
        hosts = {}
        for case in CASES:
            hosts[case.name] = {
                "ansible_connection": "local",
                "probe_node_root": self.root(case),
                "probe_expected": self.uuids(case),
                "probe_resource": case.resource,
                "probe_socket": case.socket,
            }
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump({"all": {"hosts": hosts}}, handle)
        return path

    def run_module(self, *extra: str) -> Dict[str, Dict[str, Any]]:
        """One `ansible all` run of the module over every node; {host: result}.

        ansible-core 2.19 ships no ``json`` stdout callback (it moved to ansible.posix) and
        deprecates ``tree``: the minimal callback (ad-hoc default) prints each host's result as
        ``<host> | <STATUS> => <JSON>``, which is read back here."""
        inventory = self.inventory(os.path.join(self.state_dir, "inventory.yml"))
        env = dict(os.environ)
        env.update({
            "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.minimal",
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
            "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
            "ANSIBLE_COLLECTIONS_PATH": str(BUILD),
            "ANSIBLE_HOME": self.ansible_home,
            "ANSIBLE_REMOTE_TMP": os.path.join(self.ansible_home, "tmp"),
            "ANSIBLE_LOCAL_TEMP": os.path.join(self.ansible_home, "tmp"),
            "ANSIBLE_FORKS": str(len(CASES)),
            "ANSIBLE_NOCOLOR": "1",
        })
        args = json.dumps({
            "node_root": "{{ probe_node_root }}",
            "expected_device_ids": "{{ probe_expected }}",
            "resource_name": "{{ probe_resource }}",
            "plugin_socket_name": "{{ probe_socket }}",
            "deadline": DEADLINE,
        })
        command = [ANSIBLE, "all", "-i", inventory, "-m", "gpunode.bringup.device_plugin_probe", "-a", args,
                   "-e", "ansible_python_interpreter=%s" % PYTHON] + list(extra)
        proc = subprocess.run(command, env=env, cwd=self.state_dir, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=120, check=False)
        results = parse_adhoc_output(proc.stdout)
        missing = [case.name for case in CASES if case.name not in results]
        if missing:
            raise AssertionError("ansible (rc %d) printed no result for %s:\n%s\n%s"
                                 % (proc.returncode, ", ".join(missing), proc.stdout, proc.stderr))
        return results

    def close(self) -> None:
        self.fleet.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)


_RESULT_HEADER = re.compile(r"^(\S+) \| [A-Z!]+ => ", re.M)


def parse_adhoc_output(text: str) -> Dict[str, Dict[str, Any]]:
    """{host: result} from the minimal callback's ``<host> | <STATUS> => <JSON>`` blocks."""
    decoder = json.JSONDecoder()
    results = {}
    for match in _RESULT_HEADER.finditer(text):
        results[match.group(1)], _end = decoder.raw_decode(text, match.end())
    return results


def break_node(lab: Lab, case: Case) -> None:
    """Apply the case's fault and wait until it shows."""
    fleet, name = lab.fleet, case.name
    if name == "plugin-missing":
        fleet.stop_plugin_pod(name, case.pod)
        wait_for(lambda: not os.path.lexists(lab.plugin_socket(case)), "the deleted pod's socket to go")
    elif name == "plugin-crash":
        fleet.break_fault(name, "plugin_crash")
        wait_for(lambda: not os.path.lexists(lab.plugin_socket(case)), "the crashed plugin's socket to go")
    elif name == "plugin-hang":
        fleet.break_fault(name, "plugin_hang")
    elif name in ("plugin-stale", "plugin-stale-gone"):
        fleet.break_fault(name, "plugin_stale", socket="kept" if name == "plugin-stale" else "removed")
        time.sleep(0.02)  # kubelet.sock gets a visibly newer mtime
        fleet.break_fault(name, "kubelet_restart")
        wait_for(lambda: lab.hooks.allocatable(name) == "0", "the restarted kubelet to hold 0 devices")
    elif name == "kubelet-down":
        fleet.break_fault(name, "kubelet_down")
    elif name == "socket-file":
        fleet.break_fault(name, "stale_socket_file")
    elif name == "critical-xid":
        fleet.break_fault(name, "critical_xid", gpu="1")
        wait_for(lambda: lab.hooks.allocatable(name) == str(GPUS - 1), "the XID to make a GPU unhealthy")
    elif name == "count-missing":
        # set up before the plugin starts (see the fixture): here NVML gets its GPU back
        fleet.fix_fault(name, "gpu_count_low")
    elif name == "count-extra":
        fleet.break_fault(name, "gpu_count_low")
    elif name == "no-devices":
        fleet.break_fault(name, "plugin_no_devices")
        wait_for(lambda: not os.path.lexists(lab.plugin_socket(case)), "the plugin to stop serving")


def fix_node(lab: Lab, case: Case) -> None:
    """Undo the case's fault the way an operator (or the plan) would, and wait until healthy."""
    fleet, name = lab.fleet, case.name
    if name == "plugin-missing":
        lab.start_pod(case)
    elif name == "plugin-crash":
        fleet.fix_fault(name, "plugin_crash")  # the crash loop's next start is healthy
    elif name == "plugin-hang":
        fleet.fix_fault(name, "plugin_hang")
    elif name in ("plugin-stale", "plugin-stale-gone"):
        lab.restart_pod(case)  # the documented remediation: restart the plugin pod
    elif name == "kubelet-down":
        fleet.fix_fault(name, "kubelet_down")
    elif name == "socket-file":
        fleet.fix_fault(name, "stale_socket_file")
    elif name == "critical-xid":
        fleet.fix_fault(name, "critical_xid")
        lab.restart_pod(case)  # the plugin keeps a device unhealthy until it restarts
    elif name in ("count-missing", "count-extra"):
        fleet.fix_fault(name, "gpu_count_low")
        lab.restart_pod(case)
    elif name == "no-devices":
        fleet.fix_fault(name, "plugin_no_devices")
    lab.wait_registered(case)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab()
    lab.fleet.start()
    try:
        for case in CASES:
            lab.fleet.add_node(NodeSpec(name=case.name, root="", gpu_count=GPUS))
            if case.name == "count-missing":
                lab.fleet.break_fault(case.name, "gpu_count_low")
            lab.start_pod(case)
        for case in CASES:
            lab.wait_registered(case, str(GPUS - 1) if case.name == "count-missing" else None)
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def broken(lab: Lab) -> Dict[str, Dict[str, Any]]:
    for case in CASES:
        break_node(lab, case)
    return lab.run_module()


@pytest.fixture(scope="module")
def fixed(lab: Lab, broken: Dict[str, Dict[str, Any]]) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict[str, Any]]]:
    for case in CASES:
        fix_node(lab, case)
    return lab.run_module(), lab.run_module("--check")


@pytest.mark.parametrize("case", [case.name for case in CASES])
def test_each_case_is_named_by_its_code(broken: Dict[str, Dict[str, Any]], case: str) -> None:
    result = broken[case]
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is False
    assert result["finding_codes"] == BY_NAME[case].codes, json.dumps(result["findings"], indent=1)
    assert result["healthy"] is (not BY_NAME[case].codes)
    for finding in result["findings"]:
        assert finding["message"] and finding["action"] and isinstance(finding["evidence"], dict)


def test_hung_plugin_within_deadline(broken: Dict[str, Dict[str, Any]]) -> None:
    result = broken["plugin-hang"]
    error = result["plugin"]["error"]
    assert (error["rpc"], error["code"]) == ("GetDevicePluginOptions", "DEADLINE_EXCEEDED")
    assert DEADLINE <= error["seconds"] < DEADLINE + MARGIN
    assert result["seconds"] < DEADLINE + MARGIN


def test_hung_plugin_wall_clock(lab: Lab, broken: Dict[str, Dict[str, Any]]) -> None:
    """The same lab node probed in-process: wall clock of the whole probe against the deadline."""
    started = time.monotonic()
    report = probe_node(ProbeRequest(node_root=lab.root(BY_NAME["plugin-hang"]), deadline=DEADLINE))
    elapsed = time.monotonic() - started
    assert [finding.code for finding in report.findings] == ["plugin_not_answering"]
    assert elapsed < DEADLINE + MARGIN, "hung plugin took %.2fs with a %.1fs deadline" % (elapsed, DEADLINE)


def test_evidence_of_the_cases(broken: Dict[str, Dict[str, Any]]) -> None:
    healthy = broken["healthy"]
    assert [d["health"] for d in healthy["plugin"]["devices"]] == ["Healthy"] * GPUS
    assert all(d["numa_nodes"] for d in healthy["plugin"]["devices"])
    assert healthy["kubelet_devices"]["source"] == "pod_resources"
    assert sorted(healthy["kubelet_devices"]["device_ids"]) == sorted(d["id"] for d in healthy["plugin"]["devices"])
    assert healthy["gpu_usage"]["in_use"] is False

    stale = broken["plugin-stale"]
    assert stale["registration"]["stale"] is True
    assert stale["registration"]["kubelet_socket_mtime"] > stale["registration"]["plugin_socket_mtime"]

    assert broken["socket-file"]["sockets"]["plugin"]["state"] == "regular_file"
    assert broken["kubelet-down"]["sockets"]["pod_resources"]["state"] == "missing"
    assert broken["kubelet-down"]["plugin"]["answered"] is True  # the plugin itself is fine

    xid = broken["critical-xid"]
    assert len(xid["device_comparison"]["unhealthy"]) == 1
    assert xid["device_comparison"]["unhealthy"][0] not in xid["kubelet_devices"]["device_ids"]

    assert len(broken["count-missing"]["device_comparison"]["missing"]) == 1
    assert len(broken["count-extra"]["device_comparison"]["extra"]) == 1

    for name in ("time-slicing", "time-slicing-renamed"):
        sliced = broken[name]
        assert sliced["resource_name"] == BY_NAME[name].resource
        assert len(sliced["plugin"]["devices"]) == GPUS * 4
        assert sorted(sliced["device_comparison"]["replicas"].values()) == [4] * GPUS


def test_every_node_healthy_after_the_fixes(fixed: Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict[str, Any]]]) -> None:
    applied, checked = fixed
    for case in CASES:
        for run in (applied, checked):
            result = run[case.name]
            assert result["finding_codes"] == [], (case.name, result["findings"])
            assert result["changed"] is False
