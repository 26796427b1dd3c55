"""A full lab fleet (`python -m lab up`) for playbook-level tests: start/stop, faults, the API
server's request counters, a snapshot of the node roots, and ansible-playbook runs."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
PLAYBOOKS = ROOT / "playbooks"
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)"
                   r"\s+rescued=(\d+)", re.M)
# Files the lab's kubelet stand-in rewrites on its own (registration); everything else under a
# node root changes only through the collection's actions.
SNAPSHOT_SKIP = ("kubelet_internal_checkpoint",)


@dataclass
class PlaybookRun:
    rc: int
    output: str
    recap: Dict[str, Dict[str, int]]
    report: Optional[Dict[str, Any]]
    seconds: float

    def node_report(self, node: str) -> Dict[str, Any]:
        assert self.report is not None, self.output[-3000:]
        return next(n for n in self.report["nodes"] if n["node"] == node)

    def steps(self, node: str) -> Dict[str, str]:
        return {s["step"]: s["verdict"] for s in self.node_report(node)["steps"]}

    def changed(self, host: str) -> int:
        return self.recap[host]["changed"]


class LabFleet:
    def __init__(self, nodes: int = 4, scenario: str = "healthy") -> None:
        # unix socket paths are limited to 107 bytes: keep the state directory short
        self.state_dir = Path(tempfile.mkdtemp(prefix="gl", dir="/tmp"))
        self.nodes = nodes
        self.scenario = scenario
        self.env = dict(os.environ)
        self.env.update({
            "ANSIBLE_HOME": str(self.state_dir / "ansible-home"),
            "ANSIBLE_COLLECTIONS_PATH": str(ROOT / ".build"),
            "ANSIBLE_LOCAL_TEMP": str(self.state_dir / "ansible-tmp"),
            "ANSIBLE_REMOTE_TMP": str(self.state_dir / "ansible-tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "PATH": "%s:%s" % (VENV_BIN, self.env.get("PATH", "")),
            "PYTHONPATH": "%s:%s" % (ROOT / ".build", ROOT),
        })
        self.info: Dict[str, Any] = {}

    # ---- lifecycle -------------------------------------------------------------------------
    def lab(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([PYTHON, "-m", "lab", "--state-dir", str(self.state_dir), *args], cwd=ROOT,
                              env=self.env, text=True, capture_output=True, check=False)
        if check and proc.returncode != 0:
            raise AssertionError("lab %s failed: %s%s" % (" ".join(args), proc.stdout, proc.stderr))
        return proc

    def up(self) -> "LabFleet":
        self.lab("up", "--nodes", str(self.nodes), "--scenario", self.scenario)
        self.info = json.loads((self.state_dir / "lab.json").read_text())
        return self

    def down(self) -> None:
        try:
            self.lab("down", check=False)
        finally:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    @property
    def inventory(self) -> str:
        return str(self.state_dir / "inventory.yml")

    @property
    def node_names(self) -> List[str]:
        return list(self.info["nodes"])

    def node_root(self, node: str) -> Path:
        return Path(self.info["node_roots"][node])

    def break_(self, node: str, fault: str, **args: str) -> None:
        self.lab("break", node, fault, *[a for k, v in args.items() for a in ("--arg", "%s=%s" % (k, v))])

    def fix(self, node: str, fault: str) -> None:
        self.lab("fix", node, fault)

    def status(self) -> Dict[str, Any]:
        return json.loads(self.lab("status", "--json").stdout)

    # ---- the API server's side channel -------------------------------------------------------
    def _side(self, path: str, method: str = "GET") -> Dict[str, Any]:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # loopback side channel of our own lab server
        request = urllib.request.Request(self.info["url"] + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, context=context, timeout=10) as answer:
            return json.loads(answer.read() or b"{}")

    def counters(self) -> Dict[str, Any]:
        return self._side("/lab/counters")

    def reset_counters(self) -> None:
        self._side("/lab/counters/reset", method="POST")

    def writes(self) -> int:
        return int(self.counters()["writes"])

    def deletes(self, resource: str = "pods") -> int:
        return int(self.counters()["requests"].get("delete", {}).get(resource, 0))

    # ---- node roots ----------------------------------------------------------------------------
    def snapshot(self) -> Dict[str, str]:
        """Regular files under every node root with a hash of their content."""
        result: Dict[str, str] = {}
        for node in self.node_names:
            root = self.node_root(node)
            for dirpath, _dirs, files in os.walk(root):
                for name in files:
                    path = Path(dirpath) / name
                    if name in SNAPSHOT_SKIP or name.endswith(".lock") or not path.is_file() or path.is_socket():
                        continue
                    result[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        return result

    # ---- playbooks ---------------------------------------------------------------------------
    def playbook(self, name: str, *extra: str, check: bool = False, limit: Optional[str] = None) -> PlaybookRun:
        report = self.state_dir / ("report-%d.json" % time.monotonic_ns())
        cmd = [str(VENV_BIN / "ansible-playbook"), "-i", self.inventory, str(PLAYBOOKS / name),
               "-e", "gpunode_report_path=%s" % report, "-e", "gpunode_rollout_timeout=10", *extra]
        if check:
            cmd.append("--check")
        if limit:
            cmd += ["--limit", limit]
        start = time.monotonic()
        proc = subprocess.run(cmd, cwd=str(self.state_dir), env=self.env, text=True, capture_output=True, check=False)
        output = proc.stdout + proc.stderr
        recap = {m.group(1): {"ok": int(m.group(2)), "changed": int(m.group(3)), "unreachable": int(m.group(4)),
                              "failed": int(m.group(5)), "rescued": int(m.group(7))} for m in RECAP.finditer(output)}
        data = json.loads(report.read_text()) if report.exists() else None
        return PlaybookRun(proc.returncode, output, recap, data, time.monotonic() - start)
