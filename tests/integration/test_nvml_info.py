"""gpunode.bringup.nvml_info against the lab NVML library, through ansible-playbook.

One inventory host per scenario (a healthy node, each NVML fault the lab injects, a driver root,
bad options, no pynvml), each with its own NVML state file through the inventory variable
``gpunode_node_environment`` used as the task's ``environment:``, as a fleet inventory does. Two
more hosts are the nodes of a running LabFleet, with their ``gpunode_node_root`` and
``gpunode_node_environment`` from the lab's own inventory, while NVIDIA's real plugin uses the
same NVML state on each of them (one of them with the lab's ecc_uncorrectable fault, set through
the lab). The playbook runs the module and then the same module in check mode; every host's
result is asserted: finding code, severity, GPU and action per fault; the same result and
changed=false in check mode.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / ".build", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from device_plugin_lab import deploy_plugin, lab_fleet  # noqa: E402
from lab import nvml_state  # noqa: E402

LAB_LIB_DIR = ROOT / ".build" / "lab" / "lib"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
ANSIBLE_PLAYBOOK = str(Path(PYTHON).parent / "ansible-playbook")
GPUS = 2
LAST = GPUS - 1
KERNEL_MODULE = "550.54.15"

PLAYBOOK = """
- name: Read NVML on every simulated node
  hosts: all
  gather_facts: false
  tasks:
    - name: Read NVML
      gpunode.bringup.nvml_info:
        node_root: "{{ node_root }}"
        driver_root: "{{ driver_root | default(omit) }}"
        expected_gpu_count: "{{ expected_gpu_count }}"
        require_persistence_mode: "{{ require_persistence_mode | default(false) }}"
        xid_watch_seconds: "{{ xid_watch_seconds | default(0) }}"
      environment: "{{ gpunode_node_environment }}"
      register: nvml
      ignore_errors: true

    - name: Read NVML in check mode
      gpunode.bringup.nvml_info:
        node_root: "{{ node_root }}"
        driver_root: "{{ driver_root | default(omit) }}"
        expected_gpu_count: "{{ expected_gpu_count }}"
        require_persistence_mode: "{{ require_persistence_mode | default(false) }}"
        xid_watch_seconds: "{{ xid_watch_seconds | default(0) }}"
      environment: "{{ gpunode_node_environment }}"
      check_mode: true
      register: nvml_check
      ignore_errors: true

- name: Save every host's results for the test
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Write results.json
      ansible.builtin.copy:
        content: >-
          {{ {'run': dict(groups['all'] | zip(groups['all'] | map('extract', hostvars, 'nvml'))),
              'check': dict(groups['all'] | zip(groups['all'] | map('extract', hostvars, 'nvml_check')))} | to_json }}
        dest: "{{ results_file }}"
        mode: "0644"
"""

# fault (or scenario) -> (expected findings as (code, severity, gpu), words the first action holds)
Expected = List[Tuple[str, str, Optional[int]]]
FAULT_FINDINGS: Dict[str, Tuple[Expected, str]] = {
    "driver_not_loaded": ([("driver_not_loaded", "error", None)], "modprobe nvidia"),
    "driver_library_mismatch": ([("driver_library_mismatch", "error", None)], "reboot the node"),
    "no_permission": ([("no_permission", "error", None)], "root"),
    "library_missing": ([("nvml_library_missing", "error", None)], "driver_root"),
    "gpu_lost": ([("gpu_lost", "error", LAST)], "reboot"),
    "gpu_count_low": ([("gpu_count_mismatch", "error", None)], "lspci"),
    "ecc_uncorrectable": ([("ecc_uncorrectable", "error", LAST)], "nvidia-smi -r -i %d" % LAST),
    "retired_pages_pending": ([("retired_pages_pending", "warning", LAST)], "nvidia-smi -r -i %d" % LAST),
    "remapped_rows_pending": ([("remapped_rows_pending", "warning", LAST)], "nvidia-smi -r -i %d" % LAST),
    "remapped_rows_failure": ([("remapped_rows_failure", "error", LAST)], "replaced"),
    "critical_xid": ([("critical_xid", "error", LAST)], "dmesg"),
    "persistence_off": ([("persistence_mode_off", "warning", i) for i in range(GPUS)], "nvidia-persistenced"),
    "mig_pending": ([("mig_mode_pending", "warning", i) for i in range(GPUS)], "nvidia-smi -r"),
}
# Faults that need something other than the default A100 node, and per-host options.
FAULT_MODEL = {"retired_pages_pending": "V100"}
FAULT_VARS: Dict[str, Dict[str, Any]] = {"critical_xid": {"xid_watch_seconds": 0.5}}


LAB_HEALTHY, LAB_ECC = "gpu-node-01", "gpu-node-02"


@pytest.fixture(scope="module")
def lab_nodes() -> Iterator[Dict[str, Dict[str, Any]]]:
    """Two nodes of a running lab fleet, the device plugin on both; gpu-node-02 with an
    uncorrectable ECC error on its last GPU. Their hosts as the lab inventory has them."""
    with lab_fleet(nodes=2, gpus=GPUS) as lab:
        deploy_plugin(lab)
        lab.wait_advertising(lab.node_names, timeout=180)
        lab.break_(LAB_ECC, "ecc_uncorrectable", gpu=str(LAST))
        inventory = yaml.safe_load(Path(lab.inventory).read_text())
        hosts = inventory["all"]["children"]["gpu_nodes"]["hosts"]
        yield {name: dict(hosts[name], node_root=hosts[name]["gpunode_node_root"], expected_gpu_count=GPUS)
               for name in (LAB_HEALTHY, LAB_ECC)}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, lab_nodes: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Build the lab library and the collection path, write one state per host, run the playbook
    once; returns {host: {"run": result, "check": check-mode result, "node_root": path}}."""
    subprocess.run(["make", "-s", "lab-nvml", "collection"], cwd=str(ROOT), check=True)
    base = tmp_path_factory.mktemp("nvml-info")
    hosts: Dict[str, Dict[str, Any]] = dict(lab_nodes)

    def add_host(name: str, model: str = "A100", fault: Optional[str] = None, **host_vars: Any) -> Path:
        node_root = base / name
        proc = node_root / "proc" / "driver" / "nvidia"
        proc.mkdir(parents=True)
        (proc / "version").write_text(
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  %s  Tue Mar  5 22:23:56 UTC 2024\n" % KERNEL_MODULE)
        state = node_root / "nvml.state"
        nvml_state.write_state(str(state), nvml_state.default_node_state(name, GPUS, model))
        if fault:
            nvml_state.apply_fault(str(state), fault)
        environment = {"GPUNODE_LAB_NVML_STATE": str(state), "LD_LIBRARY_PATH": str(LAB_LIB_DIR)}
        environment.update(host_vars.pop("environment", {}))
        hosts[name] = dict(node_root=str(node_root), expected_gpu_count=GPUS, gpunode_node_environment=environment)
        hosts[name].update(host_vars)
        return node_root

    add_host("healthy")
    for fault in FAULT_FINDINGS:
        add_host(fault, FAULT_MODEL.get(fault, "A100"), fault, **FAULT_VARS.get(fault, {}))
    add_host("persistence_required", fault="persistence_off", require_persistence_mode=True)
    add_host("ignored_xid", xid_watch_seconds=0.5)
    nvml_state.update_state(str(base / "ignored_xid" / "nvml.state"), lambda s: nvml_state.queue_xid(s, 0, 13))
    # The driver in a container: libnvidia-ml.so.1 only under the driver root, no LD_LIBRARY_PATH.
    driver_root = add_host("driver_root", driver_root="/run/nvidia/driver", environment={"LD_LIBRARY_PATH": ""})
    lib_dir = driver_root / "run/nvidia/driver/usr/lib/x86_64-linux-gnu"
    lib_dir.mkdir(parents=True)
    shutil.copy2(str(LAB_LIB_DIR / "libnvidia-ml.so.1"), str(lib_dir / "libnvidia-ml.so.550.54.15"))
    os.symlink("libnvidia-ml.so.550.54.15", str(lib_dir / "libnvidia-ml.so.1"))
    add_host("driver_root_missing", driver_root="/run/nvidia/driver", environment={"LD_LIBRARY_PATH": ""})
    add_host("bad_option", expected_gpu_count=-1)
    # A node without nvidia-ml-py: a pynvml that cannot be imported comes first on the path.
    no_pynvml = base / "no-pynvml"
    no_pynvml.mkdir()
    (no_pynvml / "pynvml.py").write_text("raise ImportError('No module named pynvml (test stand-in)')\n")
    add_host("no_pynvml", environment={"PYTHONPATH": str(no_pynvml)})

    results_file = base / "results.json"
    inventory = {"all": {"hosts": hosts, "vars": {"ansible_connection": "local", "ansible_python_interpreter": PYTHON,
                                                  "results_file": str(results_file)}}}
    (base / "inventory.json").write_text(json.dumps(inventory))
    (base / "playbook.yml").write_text(PLAYBOOK)
    env = dict(os.environ)
    env.update({
        "ANSIBLE_HOME": str(base / "ansible-home"),
        "ANSIBLE_COLLECTIONS_PATH": str(ROOT / ".build"),
        "ANSIBLE_REMOTE_TMP": str(base / "tmp"),
        "ANSIBLE_LOCAL_TEMP": str(base / "tmp"),
        "ANSIBLE_FORKS": "8",
        "ANSIBLE_HOST_KEY_CHECKING": "0",
        "ANSIBLE_PIPELINING": "1",
    })
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(base / "inventory.json"), str(base / "playbook.yml")],
                          env=env, cwd=str(base), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0, "ansible-playbook failed:\n%s\n%s" % (proc.stdout[-4000:], proc.stderr[-4000:])
    saved = json.loads(results_file.read_text())
    return {host: {"run": saved["run"][host], "check": saved["check"][host], "node_root": host_vars["node_root"]}
            for host, host_vars in hosts.items()}


def findings(result: Dict[str, Any]) -> Expected:
    return [(f["code"], f["severity"], f["gpu"]) for f in result["findings"]]


def comparable(result: Dict[str, Any]) -> Dict[str, Any]:
    """A result without Ansible's per-run keys (invocation, warnings)."""
    return {key: value for key, value in result.items()
            if key not in ("invocation", "_ansible_no_log", "warnings", "deprecations", "action")}


def test_healthy_node(fleet: Dict[str, Dict[str, Any]]) -> None:
    result = fleet["healthy"]["run"]
    assert result.get("failed") is not True, result.get("msg")
    assert (result["healthy"], result["findings"], result["changed"]) == (True, [], False)
    assert (result["driver_version"], result["cuda_driver_version"], result["nvml_version"]) == (
        "550.54.15", "12.4", "12.550.54.15")
    assert result["kernel_module_version"] == KERNEL_MODULE
    assert result["gpu_count"] == GPUS and [g["index"] for g in result["gpus"]] == list(range(GPUS))
    expected_state = nvml_state.default_node_state("healthy", GPUS, "A100")
    for entry, state_gpu in zip(result["gpus"], expected_state["gpus"]):
        assert (entry["uuid"], entry["name"], entry["pci_bus_id"], entry["serial"]) == (
            state_gpu["uuid"], state_gpu["name"], state_gpu["pci_bus_id"], state_gpu["serial"])
        # v2, as nvidia-smi: used excludes the memory the driver reserves, which shows apart
        assert entry["memory"] == {
            "total_mib": state_gpu["memory_total"] // 1048576,
            "used_mib": (state_gpu["memory_used"] - state_gpu["memory_reserved"]) // 1048576,
            "reserved_mib": state_gpu["memory_reserved"] // 1048576}
        assert entry["memory"]["reserved_mib"] > 0
        assert entry["retired_pages"] == {"single_bit": None, "double_bit": None, "pending": None}  # A100: rows
        assert entry["remapped_rows"]["pending"] is False and entry["mig_mode"]["pending"] is False
        assert entry["power_draw_watts"] == 62.0 and entry["temperature_c"] == 31


@pytest.mark.parametrize("fault", sorted(FAULT_FINDINGS))
def test_each_lab_fault_gives_its_finding(fleet: Dict[str, Dict[str, Any]], fault: str) -> None:
    result = fleet[fault]["run"]
    assert result.get("failed") is not True, result.get("msg")
    expected, action_words = FAULT_FINDINGS[fault]
    assert findings(result) == expected
    assert action_words in result["findings"][0]["action"]
    assert result["healthy"] is (not any(severity == "error" for unused_code, severity, unused_gpu in expected))
    assert result["changed"] is False


def test_fault_details(fleet: Dict[str, Dict[str, Any]]) -> None:
    mismatch = fleet["driver_library_mismatch"]["run"]["findings"][0]
    assert "kernel module %s" % KERNEL_MODULE in mismatch["message"]
    lost = fleet["gpu_lost"]["run"]
    assert lost["gpus"][LAST]["lost"] is True and lost["gpus"][LAST]["uuid"] is None
    assert lost["gpus"][0]["lost"] is False
    assert fleet["gpu_count_low"]["run"]["gpu_count"] == GPUS - 1
    ecc = fleet["ecc_uncorrectable"]["run"]["gpus"][LAST]["ecc_errors"]
    assert ecc["volatile"]["uncorrected"] == 1 and ecc["aggregate"]["uncorrected"] == 1
    xid = fleet["critical_xid"]["run"]
    assert xid["xid_watch"]["events"] == [
        {"xid": 79, "gpu": LAST, "ignored": False, "description": "GPU has fallen off the bus"}]
    assert xid["gpus"][LAST]["xid_events"] == [79]


def test_required_persistence_is_an_error(fleet: Dict[str, Dict[str, Any]]) -> None:
    result = fleet["persistence_required"]["run"]
    assert findings(result) == [("persistence_mode_off", "error", i) for i in range(GPUS)]
    assert result["healthy"] is False


def test_ignored_xid_is_reported_but_not_a_finding(fleet: Dict[str, Dict[str, Any]]) -> None:
    result = fleet["ignored_xid"]["run"]
    assert result["findings"] == [] and result["healthy"] is True
    assert [(e["xid"], e["gpu"], e["ignored"]) for e in result["xid_watch"]["events"]] == [(13, 0, True)]


def test_driver_root_library_is_the_one_loaded(fleet: Dict[str, Dict[str, Any]]) -> None:
    result = fleet["driver_root"]["run"]
    assert result.get("failed") is not True, result.get("msg")
    assert result["findings"] == [] and result["gpu_count"] == GPUS
    # /proc/self/maps of the module process: the driver root's copy, not the lab's library dir.
    assert result["library_path"] == os.path.join(
        fleet["driver_root"]["node_root"], "run/nvidia/driver/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.550.54.15")
    missing = fleet["driver_root_missing"]["run"]
    assert findings(missing) == [("nvml_library_missing", "error", None)]
    assert "/run/nvidia/driver" in missing["findings"][0]["message"]


def test_bad_option_fails_naming_the_option(fleet: Dict[str, Dict[str, Any]]) -> None:
    result = fleet["bad_option"]["run"]
    assert result["failed"] is True
    assert "expected_gpu_count must be 0 or more" in result["msg"]
    assert "Traceback" not in json.dumps(result)


def test_missing_pynvml_fails_with_the_library_name(fleet: Dict[str, Dict[str, Any]]) -> None:
    result = fleet["no_pynvml"]["run"]
    assert result["failed"] is True
    assert "nvidia-ml-py" in result["msg"]


@pytest.mark.parametrize("host", ["healthy", "persistence_required", "driver_root"] + sorted(FAULT_FINDINGS))
def test_check_mode_gives_the_same_result(fleet: Dict[str, Dict[str, Any]], host: str) -> None:
    run, check = fleet[host]["run"], fleet[host]["check"]
    assert check is not None and check["changed"] is False
    assert comparable(check) == comparable(run)


def test_lab_nodes_with_the_plugin_running(fleet: Dict[str, Dict[str, Any]]) -> None:
    """The nodes of a running lab fleet, read through the lab inventory's node root and environment."""
    healthy = fleet[LAB_HEALTHY]["run"]
    assert healthy.get("failed") is not True, healthy.get("msg")
    assert (healthy["healthy"], healthy["findings"], healthy["gpu_count"]) == (True, [], GPUS)
    state = nvml_state.read_state(os.path.join(fleet[LAB_HEALTHY]["node_root"], "nvml.state"))
    assert [g["uuid"] for g in healthy["gpus"]] == [g["uuid"] for g in state["gpus"]]
    assert healthy["driver_version"] == state["driver_version"] == healthy["kernel_module_version"]
    assert healthy["library_path"] == str(LAB_LIB_DIR / "libnvidia-ml.so.1")
    ecc = fleet[LAB_ECC]["run"]
    assert findings(ecc) == [("ecc_uncorrectable", "error", LAST)] and ecc["healthy"] is False
    for host in (LAB_HEALTHY, LAB_ECC):
        assert comparable(fleet[host]["check"]) == comparable(fleet[host]["run"]) and not fleet[host]["check"]["changed"]
