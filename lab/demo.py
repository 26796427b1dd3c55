"""`make demo`: the main job on a four-node lab fleet, twice.

Starts the lab's `demo` scenario (gpu-node-01 healthy, gpu-node-02 missing the GPU label the
DaemonSet selects on, gpu-node-03 with a crash-looping plugin, gpu-node-04 with a plugin gone
stale after a kubelet restart), runs playbooks/gpu_node_bringup.yml, shows its report, runs it
again to show changed=0 on every host, and stops the lab whatever happens.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / ".build"
STATE_DIR = BUILD / "demo-lab"
PLAYBOOK = ROOT / "playbooks" / "gpu_node_bringup.yml"
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def ansible_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update({
        "ANSIBLE_HOME": str(BUILD / "ansible-home"),
        "ANSIBLE_COLLECTIONS_PATH": str(BUILD),
        "ANSIBLE_LOCAL_TEMP": str(BUILD / "ansible-tmp"),
        "ANSIBLE_REMOTE_TMP": str(BUILD / "ansible-tmp"),
        "ANSIBLE_FORCE_COLOR": "0",
        "PATH": "%s:%s" % (Path(sys.executable).parent, env.get("PATH", "")),
        "PYTHONPATH": "%s:%s" % (BUILD, ROOT),
    })
    return env


def lab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab", "--state-dir", str(STATE_DIR), *args], cwd=ROOT,
                          env=ansible_env(), text=True, capture_output=True, check=False)


def run_bringup(title: str, log: Path, report: Path) -> Dict[str, Dict[str, int]]:
    print("\n=== %s: ansible-playbook -i %s playbooks/gpu_node_bringup.yml (log: %s)" % (
        title, STATE_DIR / "inventory.yml", log.relative_to(ROOT)), flush=True)
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(STATE_DIR / "inventory.yml"),
             str(PLAYBOOK), "-e", "gpunode_rollout_timeout=10", "-e", "gpunode_report_path=%s" % report],
            cwd=ROOT, env=ansible_env(), stdout=out, stderr=subprocess.STDOUT, check=False)
    elapsed = time.monotonic() - start
    text = log.read_text()
    recap = {m.group(1): {"ok": int(m.group(2)), "changed": int(m.group(3)), "unreachable": int(m.group(4)),
                          "failed": int(m.group(5))} for m in RECAP.finditer(text)}
    show_report(report)
    print("\nPLAY RECAP (%.0f s, exit %d)" % (elapsed, proc.returncode))
    for host, counts in sorted(recap.items()):
        print("  %-12s ok=%-3d changed=%-2d unreachable=%d failed=%d" % (
            host, counts["ok"], counts["changed"], counts["unreachable"], counts["failed"]))
    return recap


def show_report(report: Path) -> None:
    from ansible_collections.gpunode.bringup.plugins.module_utils import _plan

    if not report.exists():
        print("(no report was written: see the log)")
        return
    data = json.loads(report.read_text())
    steps: List[str] = []
    for node in data["nodes"]:
        for step in node.get("steps", []):
            if step["step"] not in steps:
                steps.append(step["step"])
    print()
    print("\n".join(_plan.report_table(data["nodes"], steps)))


def main() -> int:
    if not PLAYBOOK.exists():
        print("make demo: playbooks/gpu_node_bringup.yml is missing", file=sys.stderr)
        return 2
    sys.path[:0] = [str(BUILD), str(ROOT)]
    BUILD.mkdir(exist_ok=True)
    lab("down")
    up = lab("up", "--scenario", "demo")
    print(up.stdout, end="")
    if up.returncode != 0:
        print(up.stderr, file=sys.stderr)
        return 1
    try:
        print("\nThe lab fleet (python -m lab status):")
        print(lab("status").stdout)
        first = run_bringup("first run", BUILD / "demo-run1.log", BUILD / "demo-report1.json")
        second = run_bringup("second run", BUILD / "demo-run2.log", BUILD / "demo-report2.json")
    finally:
        down = lab("down")
        print("\n" + (down.stdout or down.stderr).strip())
    nodes = [h for h in second if h != "localhost"]
    healthy = all(v["failed"] == 0 and v["unreachable"] == 0 for v in second.values())
    unchanged = all(v["changed"] == 0 for v in second.values())
    fixed = sum(first.get(h, {}).get("changed", 0) > 0 for h in nodes)
    print("\nmake demo: first run fixed %d of %d nodes; second run: %s, %s" % (
        fixed, len(nodes), "changed=0 on every host" if unchanged else "SOMETHING CHANGED AGAIN",
        "all nodes healthy" if healthy else "NOT ALL NODES HEALTHY"))
    return 0 if healthy and unchanged and nodes else 1


if __name__ == "__main__":
    sys.exit(main())
