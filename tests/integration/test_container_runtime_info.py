"""gpunode.bringup.container_runtime_info through ansible-playbook, over node roots written here.

One inventory host per layout: containerd schema 2 and 3, imports and a drop-in nothing imports,
containerd 1.x's section replacement, k3s/RKE2 generated configs and templates, CRI-O drop-ins, CDI
specs, bad options, and the two nodes of a running LabFleet (their ``gpunode_node_root`` from the
lab's inventory): one as the lab sets a GPU node up, one with the lab's ``runtime_missing_nvidia``
fault (containerd's config rewritten without the nvidia handler), where the test also shows what
the real components make of it: a new plugin pod's sandbox gets no NVIDIA injection, and NVIDIA's
plugin logs ``Incompatible strategy detected auto``. The playbook runs the module, then again in
check mode; each host's findings (code, severity, action) and check-mode result are asserted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / ".build", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from device_plugin_lab import deploy_plugin, lab_fleet, plugin_pods, pods_on, wait_until  # noqa: E402
from lab_fleet import LabFleet  # noqa: E402

VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
ANSIBLE_PLAYBOOK = str(Path(PYTHON).parent / "ansible-playbook")
NVIDIA_BIN = "/usr/bin/nvidia-container-runtime"
CONTAINERD_CONFIG = "/etc/containerd/config.toml"
K3S_DIR = "/var/lib/rancher/k3s/agent/etc/containerd"
RKE2_DIR = "/var/lib/rancher/rke2/agent/etc/containerd"

PLAYBOOK = """
- name: Read the container runtime of every node
  hosts: all
  gather_facts: false
  tasks:
    - name: Read the runtime configuration
      gpunode.bringup.container_runtime_info:
        node_root: "{{ node_root }}"
        runtime: "{{ runtime | default('auto') }}"
        config_path: "{{ config_path | default(omit) }}"
        require_default_runtime: "{{ require_default_runtime | default(true) }}"
      register: runtime_info
      ignore_errors: true

    - name: Read it in check mode
      gpunode.bringup.container_runtime_info:
        node_root: "{{ node_root }}"
        runtime: "{{ runtime | default('auto') }}"
        config_path: "{{ config_path | default(omit) }}"
        require_default_runtime: "{{ require_default_runtime | default(true) }}"
      check_mode: true
      register: runtime_info_check
      ignore_errors: true

- name: Save every host's results for the test
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Write results.json
      ansible.builtin.copy:
        content: >-
          {{ {'run': dict(groups['all'] | zip(groups['all'] | map('extract', hostvars, 'runtime_info'))),
              'check': dict(groups['all'] | zip(groups['all'] | map('extract', hostvars, 'runtime_info_check')))}
             | to_json }}
        dest: "{{ results_file }}"
        mode: "0644"
"""


def cri_v2(default: str = "nvidia", binary: str = NVIDIA_BIN, with_nvidia: bool = True) -> str:
    """containerd schema 2 as `nvidia-ctk runtime configure --runtime=containerd` writes it."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    text = 'version = 2\n[%s.containerd]\n  default_runtime_name = "%s"\n' % (cri, default)
    text += '[%s.containerd.runtimes.runc]\n  runtime_type = "io.containerd.runc.v2"\n' % cri
    if with_nvidia:
        text += ('[%s.containerd.runtimes.nvidia]\n  runtime_type = "io.containerd.runc.v2"\n'
                 '[%s.containerd.runtimes.nvidia.options]\n  BinaryName = "%s"\n  SystemdCgroup = true\n'
                 % (cri, cri, binary))
    return text


CRI_V3 = """version = 3
[plugins."io.containerd.cri.v1.runtime".containerd]
  default_runtime_name = "nvidia"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.nvidia]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.nvidia.options]
      BinaryName = "/usr/bin/nvidia-container-runtime"
"""

NVIDIA_DROPIN = cri_v2().replace(
    '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n  runtime_type = "io.containerd.runc.v2"\n', "")

KATA_DROPIN = """version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
  runtime_type = "io.containerd.kata.v2"
"""

K3S_TEMPLATE = """{{ template "base" . }}
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes."nvidia"]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes."nvidia".options]
  BinaryName = "/usr/bin/nvidia-container-runtime"
"""

CRIO_DROPIN = """[crio.runtime]
default_runtime = "{default}"
[crio.runtime.runtimes.nvidia]
runtime_path = "/usr/bin/nvidia-container-runtime"
runtime_type = "oci"
"""

CDI_SPEC = "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: all\n"

Finding = Tuple[str, str]  # (code, words its action holds)

# host -> (files under the node root, whether the toolkit binary is installed, host vars,
#          expected findings as (code, action words))
SCENARIOS: Dict[str, Tuple[Dict[str, str], bool, Dict[str, Any], List[Finding]]] = {
    "containerd_v2_default": ({CONTAINERD_CONFIG: cri_v2()}, True, {}, []),
    "containerd_v2_not_default": ({CONTAINERD_CONFIG: cri_v2(default="runc")}, True, {},
                                  [("nvidia_runtime_not_default", "--set-as-default")]),
    "containerd_runtime_class": ({CONTAINERD_CONFIG: cri_v2(default="runc")}, True,
                                 {"require_default_runtime": False}, []),
    "containerd_v3": ({CONTAINERD_CONFIG: CRI_V3}, True, {}, []),
    "containerd_imports": ({CONTAINERD_CONFIG: 'version = 2\nimports = ["/etc/containerd/conf.d/*.toml"]\n',
                            "/etc/containerd/conf.d/99-nvidia.toml": NVIDIA_DROPIN}, True, {}, []),
    "containerd_dropin_not_imported": ({CONTAINERD_CONFIG: cri_v2(default="runc", with_nvidia=False),
                                        "/etc/containerd/conf.d/99-nvidia.toml": NVIDIA_DROPIN}, True, {},
                                       [("nvidia_runtime_missing", 'imports = ["/etc/containerd/conf.d/*.toml"]')]),
    "containerd_section_replaced": ({CONTAINERD_CONFIG: cri_v2().replace(
        "version = 2\n", 'version = 2\nimports = ["conf.d/*.toml"]\n'),
        "/etc/containerd/conf.d/50-kata.toml": KATA_DROPIN}, True, {},
        [("nvidia_runtime_missing", "nvidia-ctk runtime configure")]),
    "containerd_v3_with_v2_snippet": ({CONTAINERD_CONFIG: cri_v2().replace("version = 2", "version = 3")}, True, {},
                                      [("nvidia_runtime_missing", "io.containerd.cri.v1.runtime")]),
    "containerd_binary_missing": ({CONTAINERD_CONFIG: cri_v2()}, False, {},
                                  [("nvidia_runtime_binary_missing", "nvidia-container-toolkit")]),
    "containerd_runc_only": ({CONTAINERD_CONFIG: cri_v2(default="runc", with_nvidia=False)}, True, {},
                             [("nvidia_runtime_missing", "systemctl restart containerd")]),
    "containerd_invalid": ({CONTAINERD_CONFIG: "version = 2\n[plugins\n"}, True, {},
                           [("runtime_config_invalid", "Fix the file"), ("nvidia_runtime_missing", "nvidia-ctk")]),
    "k3s_not_default": ({K3S_DIR + "/config.toml": cri_v2(default="runc")}, True, {},
                        [("nvidia_runtime_not_default", "default-runtime: nvidia")]),
    "k3s_template_only": ({K3S_DIR + "/config.toml.tmpl": K3S_TEMPLATE}, True, {},
                          [("nvidia_runtime_missing", "Restart k3s")]),
    "rke2_default": ({RKE2_DIR + "/config.toml": cri_v2()}, True, {"runtime": "rke2"}, []),
    "crio_dropin": ({"/etc/crio/crio.conf.d/99-nvidia.toml": CRIO_DROPIN.format(default="nvidia")}, True, {}, []),
    "crio_not_default": ({"/etc/crio/crio.conf.d/99-nvidia.toml": CRIO_DROPIN.format(default="crun")}, True, {},
                         [("nvidia_runtime_not_default", "--runtime=crio")]),
    "cdi_without_runtime": ({CONTAINERD_CONFIG: cri_v2(default="runc", with_nvidia=False),
                             "/var/run/cdi/nvidia.yaml": CDI_SPEC}, False, {},
                            [("nvidia_runtime_missing", "nvidia-ctk")]),
    "no_runtime": ({}, False, {}, [("container_runtime_not_found", "runtime option")]),
}


def write(root: Path, path: str, text: str, mode: Optional[int] = None) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    if mode is not None:
        os.chmod(str(target), mode)


LAB_HEALTHY, LAB_MISSING = "gpu-node-01", "gpu-node-02"


@pytest.fixture(scope="module")
def lab() -> Iterator[LabFleet]:
    """A running lab fleet with the device plugin; gpu-node-02's containerd lost its nvidia handler."""
    with lab_fleet(nodes=2, gpus=1) as fleet:
        deploy_plugin(fleet)
        fleet.wait_advertising(fleet.node_names, timeout=180)
        fleet.break_(LAB_MISSING, "runtime_missing_nvidia")
        yield fleet


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, lab: LabFleet) -> Dict[str, Dict[str, Any]]:
    """Write each host's node root, run the playbook once; {host: {"run": ..., "check": ...}}."""
    subprocess.run(["make", "-s", "collection"], cwd=str(ROOT), check=True)
    base = tmp_path_factory.mktemp("runtime-info")
    hosts: Dict[str, Dict[str, Any]] = {}
    for name, (files, toolkit, host_vars, unused_findings) in SCENARIOS.items():
        node_root = base / name
        node_root.mkdir()
        for path, text in files.items():
            write(node_root, path, text)
        if toolkit:
            write(node_root, NVIDIA_BIN, "#!/bin/sh\nexit 0\n", 0o755)
        hosts[name] = dict(host_vars, node_root=str(node_root))
    # the running lab's nodes, as its inventory names their roots
    for host, node in (("lab_healthy", LAB_HEALTHY), ("lab_runtime_missing_nvidia", LAB_MISSING)):
        hosts[host] = {"node_root": str(lab.node_root(node))}
    hosts["bad_runtime"] = {"node_root": str(base / "no_runtime"), "runtime": "docker"}
    hosts["bad_config_path"] = {"node_root": str(base / "no_runtime"), "config_path": "/etc/containerd/config.toml"}
    hosts["bad_node_root"] = {"node_root": str(base / "does-not-exist")}

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
        "ANSIBLE_PIPELINING": "1",
    })
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(base / "inventory.json"), str(base / "playbook.yml")],
                          env=env, cwd=str(base), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0, "ansible-playbook failed:\n%s\n%s" % (proc.stdout[-4000:], proc.stderr[-4000:])
    saved = json.loads(results_file.read_text())
    return {host: {"run": saved["run"][host], "check": saved["check"][host]} for host in hosts}


def comparable(result: Dict[str, Any]) -> Dict[str, Any]:
    return {key: value for key, value in result.items()
            if key not in ("invocation", "_ansible_no_log", "warnings", "deprecations", "action")}


@pytest.mark.parametrize("host", sorted(SCENARIOS))
def test_layout_gives_its_findings(nodes: Dict[str, Dict[str, Any]], host: str) -> None:
    result = nodes[host]["run"]
    assert result.get("failed") is not True, result.get("msg")
    expected = SCENARIOS[host][3]
    assert [f["code"] for f in result["findings"]] == [code for code, unused_words in expected]
    for finding, (unused_code, words) in zip(result["findings"], expected):
        assert words in finding["action"], finding
        assert finding["severity"] == "error" and finding["gpu"] is None
    assert result["healthy"] is (not expected)
    assert result["changed"] is False


def test_healthy_layouts_report_the_handler(nodes: Dict[str, Dict[str, Any]]) -> None:
    v2 = nodes["containerd_v2_default"]["run"]
    assert (v2["runtime"], v2["config_version"], v2["default_runtime"], v2["nvidia_is_default"]) == (
        "containerd", 2, "nvidia", True)
    assert v2["nvidia_runtime"]["binary"] == NVIDIA_BIN and v2["nvidia_runtime"]["binary_exists"] is True
    assert nodes["containerd_v3"]["run"]["cdi"]["enabled"] is True
    imported = nodes["containerd_imports"]["run"]
    assert imported["nvidia_runtime"]["defined_in"] == "/etc/containerd/conf.d/99-nvidia.toml"
    assert [f["role"] for f in imported["config_files"]] == ["main", "import"]
    crio = nodes["crio_dropin"]["run"]
    assert (crio["runtime"], crio["default_runtime"], crio["cdi"]["enabled"]) == ("crio", "nvidia", True)
    assert nodes["rke2_default"]["run"]["config_path"] == RKE2_DIR + "/config.toml"


def test_runtime_class_instead_of_default(nodes: Dict[str, Dict[str, Any]]) -> None:
    result = nodes["containerd_runtime_class"]["run"]
    assert result["runtime_class_needed"] is True and result["nvidia_is_default"] is False
    assert nodes["containerd_v2_default"]["run"]["runtime_class_needed"] is False


def test_dropin_nothing_imports_is_listed(nodes: Dict[str, Dict[str, Any]]) -> None:
    result = nodes["containerd_dropin_not_imported"]["run"]
    assert result["ignored_dropins"] == ["/etc/containerd/conf.d/99-nvidia.toml"]
    assert "not imported" in result["findings"][0]["message"]


def test_containerd_1x_import_replaces_the_cri_section(nodes: Dict[str, Dict[str, Any]]) -> None:
    result = nodes["containerd_section_replaced"]["run"]
    assert result["handlers"] == ["kata"]


def test_cdi_spec_is_reported(nodes: Dict[str, Dict[str, Any]]) -> None:
    result = nodes["cdi_without_runtime"]["run"]
    assert result["cdi"]["specs"] == [{"path": "/var/run/cdi/nvidia.yaml", "kind": "nvidia.com/gpu"}]
    assert result["cdi"]["nvidia_gpu_spec"] is True


def test_lab_node_is_healthy(nodes: Dict[str, Dict[str, Any]]) -> None:
    result = nodes["lab_healthy"]["run"]
    assert result["findings"] == [] and result["healthy"] is True
    assert result["nvidia_runtime"]["binary"] == NVIDIA_BIN and result["nvidia_is_default"] is True


def test_lab_runtime_missing_nvidia_fault(nodes: Dict[str, Dict[str, Any]], lab: LabFleet) -> None:
    result = nodes["lab_runtime_missing_nvidia"]["run"]
    assert [f["code"] for f in result["findings"]] == ["nvidia_runtime_missing"]
    assert result["handlers"] == ["runc"] and result["default_runtime"] == "runc"
    # what the finding means on the node: a new plugin pod gets a sandbox without the driver
    for pod in pods_on(plugin_pods(lab), LAB_MISSING):
        lab.api("/api/v1/namespaces/kube-system/pods/%s" % pod["metadata"]["name"], "DELETE")

    def incompatible() -> bool:
        pods = [p for p in pods_on(plugin_pods(lab), LAB_MISSING) if not p["metadata"].get("deletionTimestamp")]
        if not pods or not (pods[0].get("status") or {}).get("containerStatuses"):
            return False
        logs = lab.kubectl("logs", "-n", "kube-system", pods[0]["metadata"]["name"], check=False)
        return "Incompatible strategy detected auto" in logs.stdout

    wait_until("NVIDIA's plugin on %s without the nvidia runtime" % LAB_MISSING, incompatible, 120, pause=1.0)


@pytest.mark.parametrize("host, words", [
    ("bad_runtime", "runtime"),
    ("bad_config_path", "config_path needs runtime"),
    ("bad_node_root", "node_root"),
])
def test_bad_options_fail_naming_the_option(nodes: Dict[str, Dict[str, Any]], host: str, words: str) -> None:
    result = nodes[host]["run"]
    assert result["failed"] is True and words in result["msg"]
    assert "Traceback" not in json.dumps(result)


@pytest.mark.parametrize("host", sorted(SCENARIOS))
def test_check_mode_gives_the_same_result(nodes: Dict[str, Dict[str, Any]], host: str) -> None:
    run, check = nodes[host]["run"], nodes[host]["check"]
    assert check["changed"] is False
    assert comparable(check) == comparable(run)
