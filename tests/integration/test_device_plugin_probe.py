"""gpunode.bringup.device_plugin_probe against the real lab: one node per case, the module run by
``ansible`` over the lab's node roots (``gpunode_node_root`` of the lab inventory), exactly as it
runs on real nodes, where NVIDIA's real plugin serves the socket it probes and the simulated
kubelet serves kubelet.sock, pod-resources and the checkpoint.

The fleet is a LabFleet with one node per case: three DaemonSets as the collection renders them
(the default config, time-slicing four ways, time-slicing renamed to nvidia.com/gpu.shared), each
on its own pool of nodes. Each case breaks its own node with the lab's faults (real mechanisms:
SIGSTOP, a kubelet restart under a stale plugin, the node's NVML state, the pod's sandbox...);
one ``ansible all`` run probes every node in parallel; then every fault is fixed as an operator
(or the plan) would, NVIDIA's plugin registers again, and two more runs (normal and check mode)
must find every node healthy. node_status_update_frequency=2: the kubelet reports Node status
every 10 s by default, and the fixture waits on the advertised counts many times.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

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
from device_plugin_lab import (  # noqa: E402
    DevicePluginSpec,
    deploy_plugin,
    lab_fleet,
    node_object,
    nothing_listens,
    patch_node,
    plugin_spec,
    pods_on,
    plugin_pods,
    wait_until,
)
from lab import nvml_state  # noqa: E402
from lab_fleet import LabFleet  # noqa: E402

PYTHON = sys.executable
ANSIBLE = str(Path(PYTHON).parent / "ansible")
GPUS = 4
REPLICAS = 4
DEADLINE = 2.0
MARGIN = 1.0  # a hung plugin is reported within DEADLINE + MARGIN (14 module runs share 2 cores)
POOL = "example.com/pool"


def time_sliced(pool: str, rename: bool) -> DevicePluginSpec:
    return plugin_spec(name="nvidia-device-plugin-" + pool, config_map_name="nvidia-device-plugin-" + pool,
                       selector_labels={"name": "nvidia-device-plugin-" + pool}, node_selector={POOL: pool},
                       config={"time_slicing": {"rename_by_default": rename,
                                                "resources": [{"name": "nvidia.com/gpu", "replicas": REPLICAS}]}})


SPECS = {"plain": plugin_spec(node_selector={POOL: "plain"}), "ts": time_sliced("ts", False),
         "ts-renamed": time_sliced("ts-renamed", True)}


class Case:
    """A node of the fleet, its pool (which DaemonSet runs there), the codes the probe must name."""

    def __init__(self, name: str, codes: List[str], pool: str = "plain") -> None:
        self.name = name
        self.codes = codes
        self.pool = pool
        self.resource = "nvidia.com/gpu.shared" if pool == "ts-renamed" else "nvidia.com/gpu"
        self.socket = "nvidia-%s.sock" % self.resource.split("/", 1)[1]
        self.node = ""

    @property
    def spec(self) -> DevicePluginSpec:
        return SPECS[self.pool]

    @property
    def advertised(self) -> int:
        return GPUS if self.pool == "plain" else GPUS * REPLICAS


CASES = [
    Case("healthy", []),
    Case("plugin-missing", ["plugin_socket_missing"]),  # the node lost its label: the DaemonSet removed the pod
    Case("plugin-crash", ["plugin_socket_missing"]),  # NVML init fails in the sandbox: the plugin exits, crash loop
    Case("plugin-hang", ["plugin_not_answering"]),  # SIGSTOP
    Case("plugin-stale", ["registration_stale"]),  # kubelet restarted, the plugin kept its old socket
    Case("plugin-stale-gone", ["plugin_socket_missing"]),  # kubelet restarted and removed the socket
    Case("kubelet-down", ["kubelet_socket_missing"]),
    Case("socket-file", ["plugin_socket_not_socket"]),
    Case("critical-xid", ["plugin_devices_unhealthy"]),
    Case("count-missing", ["plugin_devices_missing"]),  # a GPU came back, the plugin was not restarted
    Case("count-extra", ["plugin_devices_extra"]),  # a GPU vanished from NVML, the plugin still lists it
    Case("no-devices", ["plugin_socket_missing"]),  # "No devices found. Waiting indefinitely."
    Case("time-slicing", [], pool="ts"),
    Case("time-slicing-renamed", [], pool="ts-renamed"),
]
BY_NAME = {case.name: case for case in CASES}


class Lab:
    def __init__(self, fleet: LabFleet) -> None:
        self.fleet = fleet
        for case, node in zip(CASES, fleet.node_names):
            case.node = node
        self.ansible_home = fleet.state_dir / "ansible-probe"
        (self.ansible_home / "tmp").mkdir(parents=True, exist_ok=True)

    def root(self, case: Case) -> str:
        return str(self.fleet.node_root(case.node))

    def uuids(self, case: Case) -> List[str]:
        """The GPUs NVML lists now (what nvml_info would report)."""
        return [gpu["uuid"] for gpu in nvml_state.read_state(os.path.join(self.root(case), "nvml.state"))["gpus"]]

    def plugin_socket(self, case: Case) -> str:
        return os.path.join(self.root(case), "var/lib/kubelet/device-plugins", case.socket)

    def advertised(self, case: Case) -> Tuple[Optional[str], Optional[str]]:
        status = node_object(self.fleet, case.node).get("status") or {}
        return (status.get("capacity") or {}).get(case.resource), (status.get("allocatable") or {}).get(case.resource)

    def wait_advertised(self, case: Case, count: int, capacity: Optional[int] = None) -> None:
        want = (str(count if capacity is None else capacity), str(count))
        wait_until("%s to advertise %s %s" % (case.node, want, case.resource),
                   lambda: self.advertised(case) == want, 180)

    def plugin_running(self, case: Case) -> Dict[str, Any]:
        return self.fleet.nodes_status()[case.node].get("plugin_pod") or {}

    def delete_plugin_pod(self, case: Case) -> None:
        """The collection's remediation: delete the node's plugin pod; its DaemonSet makes another."""
        for pod in pods_on(plugin_pods(self.fleet, case.spec), case.node):
            self.fleet.api("/api/v1/namespaces/%s/pods/%s" % (case.spec.namespace, pod["metadata"]["name"]), "DELETE",
                           missing_ok=True)

    def inventory(self, path: Path) -> str:
        """The lab's own inventory (its hosts carry gpunode_node_root) with each case's probe options."""
        document = yaml.safe_load(Path(self.fleet.inventory).read_text())
        hosts = document["all"]["children"]["gpu_nodes"]["hosts"]
        for case in CASES:
            hosts[case.node].update(probe_expected=self.uuids(case), probe_resource=case.resource,
                                    probe_socket=case.socket)
        path.write_text(yaml.safe_dump(document))
        return str(path)

    def run_module(self, *extra: str) -> Dict[str, Dict[str, Any]]:
        """One `ansible gpu_nodes` run of the module over every node; {case name: result}.

        ansible-core 2.19 ships no ``json`` stdout callback (it moved to ansible.posix) and
        deprecates ``tree``: the minimal callback (ad-hoc default) prints each host's result as
        ``<host> | <STATUS> => <JSON>``, which is read back here."""
        inventory = self.inventory(self.fleet.state_dir / "probe-inventory.yml")
        env = dict(os.environ)
        env.update({
            "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.minimal",
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
            "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
            "ANSIBLE_COLLECTIONS_PATH": str(BUILD),
            "ANSIBLE_HOME": str(self.ansible_home),
            "ANSIBLE_REMOTE_TMP": str(self.ansible_home / "tmp"),
            "ANSIBLE_LOCAL_TEMP": str(self.ansible_home / "tmp"),
            "ANSIBLE_FORKS": str(len(CASES)),
            "ANSIBLE_NOCOLOR": "1",
        })
        env.pop("PYTHONPATH", None)
        args = json.dumps({
            "node_root": "{{ gpunode_node_root }}",
            "expected_device_ids": "{{ probe_expected }}",
            "resource_name": "{{ probe_resource }}",
            "plugin_socket_name": "{{ probe_socket }}",
            "deadline": DEADLINE,
        })
        command = [ANSIBLE, "gpu_nodes", "-i", inventory, "-m", "gpunode.bringup.device_plugin_probe", "-a", args] \
            + list(extra)
        proc = subprocess.run(command, env=env, cwd=str(self.fleet.state_dir), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=180, check=False)
        by_node = parse_adhoc_output(proc.stdout)
        missing = [case.name for case in CASES if case.node not in by_node]
        if missing:
            raise AssertionError("ansible (rc %d) printed no result for %s:\n%s\n%s"
                                 % (proc.returncode, ", ".join(missing), proc.stdout, proc.stderr))
        return {case.name: by_node[case.node] for case in CASES}


_RESULT_HEADER = re.compile(r"^(\S+) \| [A-Z!]+ => ", re.M)


def parse_adhoc_output(text: str) -> Dict[str, Dict[str, Any]]:
    """{host: result} from the minimal callback's ``<host> | <STATUS> => <JSON>`` blocks."""
    decoder = json.JSONDecoder()
    results = {}
    for match in _RESULT_HEADER.finditer(text):
        results[match.group(1)], _end = decoder.raw_decode(text, match.end())
    return results


def break_node(lab: Lab, case: Case) -> None:
    """Apply the case's fault."""
    fleet, node = lab.fleet, case.node
    if case.name == "plugin-missing":
        fleet.break_(node, "label_missing")
    elif case.name == "plugin-crash":
        fleet.break_(node, "plugin_crash", signature="nvml_init_failed")
    elif case.name == "plugin-hang":
        fleet.break_(node, "plugin_hang")
    elif case.name in ("plugin-stale", "plugin-stale-gone"):
        fleet.break_(node, "plugin_stale", socket="kept" if case.name == "plugin-stale" else "removed")
        time.sleep(0.02)  # kubelet.sock gets a visibly newer mtime
        fleet.break_(node, "kubelet_restart")
    elif case.name == "kubelet-down":
        fleet.break_(node, "kubelet_down")
    elif case.name == "socket-file":
        fleet.break_(node, "stale_socket_file")
    elif case.name == "critical-xid":
        fleet.break_(node, "critical_xid", gpu="1")
    elif case.name == "count-missing":
        # set up before the plugin started (see the fixture): here NVML gets its GPU back
        fleet.fix(node, "gpu_count_low")
    elif case.name == "count-extra":
        fleet.break_(node, "gpu_count_low")
    elif case.name == "no-devices":
        fleet.break_(node, "plugin_no_devices")


def broken_shows(lab: Lab, case: Case) -> bool:
    """Whether the fault has taken effect as the real components make it show."""
    if case.name in ("plugin-missing", "plugin-crash", "plugin-stale-gone", "no-devices"):
        gone = nothing_listens(lab.plugin_socket(case))
        if case.name == "no-devices":
            return gone and bool(lab.plugin_running(case).get("running")) and lab.advertised(case)[1] == "0"
        return gone
    if case.name == "plugin-stale":
        return lab.advertised(case) == ("0", "0")
    if case.name == "critical-xid":
        return lab.advertised(case) == (str(GPUS), str(GPUS - 1))
    if case.name == "plugin-hang":
        return bool(lab.plugin_running(case).get("stopped"))
    return True


def fix_node(lab: Lab, case: Case) -> None:
    """Undo the case's fault the way an operator (or the plan) would."""
    fleet, node = lab.fleet, case.node
    if case.name == "plugin-missing":
        fleet.fix(node, "label_missing")  # the DaemonSet controller creates the pod again
    elif case.name == "plugin-crash":
        fleet.fix(node, "plugin_crash")
        lab.delete_plugin_pod(case)  # not waiting out the kubelet's back-off
    elif case.name == "plugin-hang":
        fleet.fix(node, "plugin_hang")
    elif case.name in ("plugin-stale", "plugin-stale-gone"):
        lab.delete_plugin_pod(case)  # the documented remediation: a new pod, a fresh mount
    elif case.name == "kubelet-down":
        fleet.fix(node, "kubelet_down")  # kubelet.sock re-created: NVIDIA's plugin registers again
    elif case.name == "socket-file":
        fleet.fix(node, "stale_socket_file")
    elif case.name == "critical-xid":
        fleet.fix(node, "critical_xid")
        lab.delete_plugin_pod(case)  # the plugin keeps a device unhealthy until it restarts
    elif case.name in ("count-missing", "count-extra"):
        fleet.fix(node, "gpu_count_low")
        lab.delete_plugin_pod(case)
    elif case.name == "no-devices":
        fleet.fix(node, "plugin_no_devices")
        lab.delete_plugin_pod(case)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_fleet(nodes=len(CASES), gpus=GPUS, node_status_update_frequency=2) as fleet:
        lab = Lab(fleet)
        for case in CASES:
            patch_node(fleet, case.node, {"metadata": {"labels": {POOL: case.pool}}})
        fleet.break_(BY_NAME["count-missing"].node, "gpu_count_low")  # before its plugin starts
        for spec in SPECS.values():
            deploy_plugin(fleet, spec)
        for case in CASES:
            lab.wait_advertised(case, case.advertised - (1 if case.name == "count-missing" else 0))
        yield lab


@pytest.fixture(scope="module")
def broken(lab: Lab) -> Dict[str, Dict[str, Any]]:
    for case in CASES:
        break_node(lab, case)

    def pending() -> List[str]:
        return [c.name for c in CASES if not broken_shows(lab, c)]

    try:
        wait_until("every fault to show", lambda: not pending(), 120)
    except AssertionError:
        raise AssertionError("faults that did not show: %s; lab: %s"
                             % (pending(), json.dumps(lab.fleet.nodes_status())[:3000])) from None
    return lab.run_module()


@pytest.fixture(scope="module")
def fixed(lab: Lab, broken: Dict[str, Dict[str, Any]]) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict[str, Any]]]:
    for case in CASES:
        fix_node(lab, case)
    for case in CASES:
        lab.wait_advertised(case, case.advertised)
        wait_until("%s: a Running plugin pod serving its socket" % case.node,
                   lambda: lab.plugin_running(case).get("running") and not lab.plugin_running(case).get("stopped")
                   and os.path.exists(lab.plugin_socket(case)), 120)
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


def test_evidence_of_the_cases(lab: Lab, broken: Dict[str, Dict[str, Any]]) -> None:
    healthy = broken["healthy"]
    assert [d["health"] for d in healthy["plugin"]["devices"]] == ["Healthy"] * GPUS
    assert sorted(d["id"] for d in healthy["plugin"]["devices"]) == sorted(lab.uuids(BY_NAME["healthy"]))
    # no NUMA topology: NVIDIA's plugin reads it from /sys/bus/pci/devices/<bus id>/numa_node, and the
    # simulated GPUs' PCI addresses do not exist in this machine's sysfs (tests/unit cover the parsing)
    assert all(d["numa_nodes"] == [] for d in healthy["plugin"]["devices"])
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
    assert xid["device_comparison"]["unhealthy"][0] == lab.uuids(BY_NAME["critical-xid"])[1]  # the GPU of the XID
    assert xid["device_comparison"]["unhealthy"][0] not in xid["kubelet_devices"]["device_ids"]

    assert len(broken["count-missing"]["device_comparison"]["missing"]) == 1
    assert len(broken["count-extra"]["device_comparison"]["extra"]) == 1

    for name in ("time-slicing", "time-slicing-renamed"):
        sliced = broken[name]
        assert sliced["resource_name"] == BY_NAME[name].resource
        assert len(sliced["plugin"]["devices"]) == GPUS * REPLICAS
        assert sorted(sliced["device_comparison"]["replicas"].values()) == [REPLICAS] * GPUS


def test_every_node_healthy_after_the_fixes(fixed: Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict[str, Any]]]) -> None:
    applied, checked = fixed
    for case in CASES:
        for run in (applied, checked):
            result = run[case.name]
            assert result["finding_codes"] == [], (case.name, result["findings"])
            assert result["changed"] is False
