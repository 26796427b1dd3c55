"""gpunode.bringup.node_info on a lab fleet with the device plugin deployed: on every node it says
what nvml_info, container_runtime_info and device_plugin_probe say one by one (same findings, same
GPUs, same plugin devices), in check mode too; a node without nvidia-ml-py fails naming the library
and the check, and runs without the nvml check."""
from __future__ import annotations

import json
from typing import Any, Dict

import pytest

from device_plugin_lab import nothing_listens
from lab_fleet import LabFleet

DEPLOY = """
- name: Deploy the device plugin and wait until every node advertises its GPUs
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Deploy
      gpunode.bringup.device_plugin:
        kubeconfig: "{{ gpunode_kubeconfig }}"
        wait: true
        wait_timeout: 120
"""

PLAYBOOK = """
- name: The three modules one by one, then node_info
  hosts: gpu_nodes
  gather_facts: false
  environment: "{{ gpunode_node_environment }}"
  tasks:
    - name: Read NVML
      gpunode.bringup.nvml_info:
        node_root: "{{ gpunode_node_root }}"
      register: nvml

    - name: Read the runtime
      gpunode.bringup.container_runtime_info:
        node_root: "{{ gpunode_node_root }}"
      register: runtime

    - name: Probe
      gpunode.bringup.device_plugin_probe:
        node_root: "{{ gpunode_node_root }}"
        expected_device_ids: "{{ nvml.gpus | map(attribute='uuid') | select | list }}"
      register: probe

    - name: All three in one module run
      gpunode.bringup.node_info:
        node_root: "{{ gpunode_node_root }}"
      register: node_info

    - name: All three in check mode
      gpunode.bringup.node_info:
        node_root: "{{ gpunode_node_root }}"
      check_mode: true
      register: node_info_check

    - name: Without nvidia-ml-py on the node
      gpunode.bringup.node_info:
        node_root: "{{ gpunode_node_root }}"
      environment:
        PYTHONPATH: "{{ no_pynvml_dir }}"
      register: no_pynvml
      ignore_errors: true

    - name: Without nvidia-ml-py, the other checks
      gpunode.bringup.node_info:
        node_root: "{{ gpunode_node_root }}"
        checks: [runtime, probe]
      environment:
        PYTHONPATH: "{{ no_pynvml_dir }}"
      register: no_pynvml_other_checks

    - name: Save the results
      ansible.builtin.copy:
        content: >-
          {{ {'nvml': nvml, 'runtime': runtime, 'probe': probe, 'node_info': node_info,
              'node_info_check': node_info_check, 'no_pynvml': no_pynvml,
              'no_pynvml_other_checks': no_pynvml_other_checks} | to_json }}
        dest: "{{ results_dir }}/{{ inventory_hostname }}.json"
        mode: "0644"
      delegate_to: localhost
"""

# node index -> (lab fault, what node_info must then say as (source, code))
CASES = {
    1: (None, []),
    2: ("runtime_missing_nvidia", [("runtime", "nvidia_runtime_missing")]),
    3: ("gpu_lost", [("nvml", "gpu_lost")]),
    4: ("plugin_crash", [("probe", "plugin_socket_missing")]),
}
VOLATILE = ("seconds", "mtime", "xid_watch", "power_draw_watts", "temperature_c")


def stable(value: Any) -> Any:
    """The result without timings and sensor values, which move between two reads."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items()
                if k not in VOLATILE and not k.endswith("_mtime") and k not in ("invocation", "changed", "failed")}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Dict[str, Any]]:
    work = tmp_path_factory.mktemp("node_info")
    no_pynvml = work / "no-pynvml"
    no_pynvml.mkdir()
    (no_pynvml / "pynvml.py").write_text("raise ImportError('No module named pynvml (test stand-in)')\n")
    fleet = LabFleet(nodes=len(CASES)).up()
    try:
        names = fleet.node_names
        (work / "deploy.yml").write_text(DEPLOY)
        (work / "node_info.yml").write_text(PLAYBOOK)
        run = fleet.playbook(str(work / "deploy.yml"))
        assert run.rc == 0, run.output[-6000:]
        for index, (fault, _codes) in CASES.items():
            if fault:
                fleet.break_(names[index - 1], fault)
        # node 4's plugin is killed and its restarts exit on NVML init failure: nothing serves the socket
        crashed = str(fleet.node_root(names[3]) / "var/lib/kubelet/device-plugins/nvidia-gpu.sock")
        fleet.wait_for("the crash-looping plugin's socket dead",
                       lambda nodes: nothing_listens(crashed)
                       and (nodes[names[3]]["plugin_pod"] or {}).get("restart_count", 0) >= 1, timeout=60)
        run = fleet.playbook(str(work / "node_info.yml"), "-e", "results_dir=%s" % work,
                             "-e", "no_pynvml_dir=%s" % no_pynvml)
        assert run.rc == 0, run.output[-6000:]
        return {names[index - 1]: json.loads((work / ("%s.json" % names[index - 1])).read_text()) for index in CASES}
    finally:
        fleet.down()


@pytest.mark.parametrize("index", sorted(CASES))
def test_node_info_says_what_the_three_modules_say(results: Dict[str, Dict[str, Any]], index: int) -> None:
    node = sorted(results)[index - 1]
    r = results[node]
    info = r["node_info"]
    assert info.get("failed") is not True, info.get("msg")
    assert info["checks"] == ["nvml", "runtime", "probe"] and info["changed"] is False
    for part in ("nvml", "runtime", "probe"):
        assert stable(info[part]) == stable(r[part]), part
    codes = [(f["source"], f["code"]) for f in info["findings"]]
    expected = CASES[index][1]
    for want in expected:
        assert want in codes, codes
    assert info["healthy"] is (not expected)
    assert codes == [(part, f["code"]) for part in ("nvml", "runtime", "probe") for f in r[part]["findings"]]
    # check mode: the same verdicts, nothing changed
    check = r["node_info_check"]
    assert check["changed"] is False and [(f["source"], f["code"]) for f in check["findings"]] == codes


def test_healthy_node_compares_the_plugin_with_nvml(results: Dict[str, Dict[str, Any]]) -> None:
    info = results[sorted(results)[0]]["node_info"]
    comparison = info["probe"]["device_comparison"]
    assert comparison["compared"] is True and comparison["missing"] == [] and comparison["extra"] == []
    assert sorted(comparison["expected_device_ids"]) == sorted(g["uuid"] for g in info["nvml"]["gpus"])


def test_missing_pynvml_names_library_and_check(results: Dict[str, Dict[str, Any]]) -> None:
    for node, r in results.items():
        failed = r["no_pynvml"]
        assert failed["failed"] is True, node
        assert "nvidia-ml-py" in failed["msg"] and "check nvml" in failed["msg"]
        assert "Traceback" not in failed["msg"]
        other = r["no_pynvml_other_checks"]
        assert other.get("failed") is not True and other["checks"] == ["runtime", "probe"] and other["nvml"] is None
