"""Shared by the integration tests of node_lease, device_plugin_restart and gpu_smoke_test: the
Ansible environment for a lab API server and a runner that plays many module tasks in one
ansible-playbook process and returns each task's registered result."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
BIN = VENV_BIN if (VENV_BIN / "ansible-playbook").exists() else Path(sys.executable).parent
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable


def ansible_env(base: Path, kubeconfig: str, **extra: str) -> Dict[str, str]:
    """Ansible confined to ``base``, the collection from .build, auth from K8S_AUTH_KUBECONFIG."""
    env = dict(os.environ)
    env.update({
        "ANSIBLE_HOME": str(base / "ansible-home"), "ANSIBLE_COLLECTIONS_PATH": str(ROOT / ".build"),
        "ANSIBLE_REMOTE_TMP": str(base / "tmp"), "ANSIBLE_LOCAL_TEMP": str(base / "tmp"),
        "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0", "ANSIBLE_PIPELINING": "1",
        "K8S_AUTH_KUBECONFIG": kubeconfig,
    })
    env.update(extra)
    env.pop("PYTHONPATH", None)
    return env


def run_tasks(lab: Dict[str, Any], tasks: List[Dict[str, Any]], play: Optional[Dict[str, Any]] = None,
              env: Optional[Dict[str, str]] = None) -> Dict[str, Dict[str, Any]]:
    """Run ``tasks`` in one playbook on localhost (each with ignore_errors; ``play``: more play
    keywords) and return each task's registered result by task name. ``lab`` holds ``base``
    (a directory) and ``env`` (from ansible_env)."""
    base = lab["base"]
    index = len(list(base.glob("play-*.json")))
    results_file = base / ("results-%d.json" % index)
    names = ["r%d" % i for i in range(len(tasks))]
    play_tasks = [dict(task, register=name, ignore_errors=True) for task, name in zip(tasks, names)]
    play_tasks.append({"name": "save results", "ansible.builtin.copy": {
        "dest": str(results_file), "content": "{{ dict(names | zip(query('ansible.builtin.vars', *names))) | to_json }}"}})
    path = base / ("play-%d.json" % index)  # JSON is YAML
    path.write_text(json.dumps([dict({"hosts": "localhost", "gather_facts": False, "vars": {"names": names},
                                      "tasks": play_tasks}, **(play or {}))]))
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-e", "ansible_python_interpreter=" + PYTHON, str(path)],
                          env=dict(lab["env"], **(env or {})), capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, "ansible-playbook failed:\n%s\n%s" % (proc.stdout[-4000:], proc.stderr[-4000:])
    saved = json.loads(results_file.read_text())
    return {task["name"]: saved[name] for task, name in zip(tasks, names)}
