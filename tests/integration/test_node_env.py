"""Role node_env: the node's virtualenv for the node-side modules, from a local wheelhouse (the
air-gapped path), idempotent, and used by the plan; a given interpreter is only verified."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
PACKAGES = ["nvidia-ml-py>=12.535.77", "grpcio>=1.59.0,<2", "protobuf>=4.25.0,<8"]

PLAYBOOK = """
- name: Node environment
  hosts: nodes
  gather_facts: false
  roles:
    - role: gpunode.bringup.node_env
  post_tasks:
    - name: Save the interpreter the plan would use
      ansible.builtin.copy:
        content: "{{ {'python': node_env_python} | to_json }}"
        dest: "{{ result_file }}"
        mode: "0644"
      delegate_to: localhost
      changed_when: false  # the test's own output, not the role's
"""


def env(tmp: Path) -> dict:
    result = dict(os.environ)
    result.update({"ANSIBLE_HOME": str(tmp / "home"), "ANSIBLE_COLLECTIONS_PATH": str(ROOT / ".build"),
                   "ANSIBLE_LOCAL_TEMP": str(tmp / "t"), "ANSIBLE_REMOTE_TMP": str(tmp / "t"),
                   "ANSIBLE_NOCOLOR": "1", "PATH": "%s:%s" % (BIN, result.get("PATH", ""))})
    return result


def run(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    (tmp / "play.yml").write_text(PLAYBOOK)
    inventory = tmp / "inventory.ini"
    inventory.write_text("[nodes]\nnode-a ansible_connection=local ansible_python_interpreter=%s\n" % sys.executable)
    return subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(tmp / "play.yml"),
                           "-e", "result_file=%s" % (tmp / "result.json"), *extra],
                          env=env(tmp), text=True, capture_output=True, check=False)


def changed(output: str) -> int:
    line = next(l for l in output.splitlines() if l.startswith("node-a") and "changed=" in l)
    return int(line.split("changed=")[1].split()[0])


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    house = tmp_path_factory.mktemp("wheelhouse")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                           "--only-binary=:all:", "-d", str(house), *PACKAGES],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail("could not fill the wheelhouse from the package index: %s" % proc.stderr[-2000:])
    return house


def test_virtualenv_from_a_wheelhouse_is_idempotent(tmp_path, wheelhouse):
    venv = tmp_path / "venv"
    args = ("-e", "gpunode_wheelhouse=%s" % wheelhouse, "-e", "node_env_path=%s" % venv,
            "-e", "node_env_become=false", "-e", "node_env_base_python=%s" % sys.executable)
    first = run(tmp_path, *args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert changed(first.stdout) == 1
    python = venv / "bin" / "python"
    assert json.loads((tmp_path / "result.json").read_text())["python"] == str(python)
    probe = subprocess.run([str(python), "-c", "import pynvml, grpc, google.protobuf"], check=False)
    assert probe.returncode == 0
    second = run(tmp_path, *args)
    assert second.returncode == 0 and changed(second.stdout) == 0, second.stdout[-3000:]


def test_a_given_interpreter_is_verified_not_changed(tmp_path):
    ok = run(tmp_path, "-e", "gpunode_node_python=%s" % sys.executable)
    assert ok.returncode == 0 and changed(ok.stdout) == 0, ok.stdout[-3000:]
    assert json.loads((tmp_path / "result.json").read_text())["python"] == sys.executable
    bare = run(tmp_path, "-e", "gpunode_node_python=/usr/bin/python3")  # the system Python lacks pynvml
    assert bare.returncode != 0
    assert "cannot import nvidia-ml-py, grpcio and protobuf" in bare.stdout
    assert "gpunode_wheelhouse" in bare.stdout or "wheelhouse" in bare.stdout
