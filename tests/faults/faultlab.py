"""Helpers of the fault suites: a lab fleet (tests/integration/lab_fleet.py: the real control
plane, NVIDIA's real plugin) with extra inventories, forks, and what the suites read of the
cluster (the remediation Leases, the plugin pod of each node)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _path in (HERE.parent / "integration", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from lab_fleet import LabFleet, PlaybookRun  # noqa: E402  (path set just above)

# One fork per node on a 2-core machine is slower than a few: the runs are CPU bound.
FORKS = "10"
# the collection's remediation Leases: node_lease's default name_prefix
LEASE_PREFIX = "gpunode-bringup-"


class FaultFleet(LabFleet):
    """A lab fleet for the fault suites."""

    def __init__(self, nodes: int, scenario: str = "healthy", fault_proxy: bool = False,
                 node_status_update_frequency: Optional[float] = None) -> None:
        super().__init__(nodes=nodes, scenario=scenario, fault_proxy=fault_proxy,
                         node_status_update_frequency=node_status_update_frequency)
        self.host_vars: Dict[str, Dict[str, Any]] = {}

    # ---- playbooks -------------------------------------------------------------------------
    def set_host_vars(self, host: str, **variables: Any) -> None:
        """Host variables from a second inventory source (the lab writes the first one)."""
        self.host_vars.setdefault(host, {}).update(variables)
        document = {"all": {"children": {"gpu_nodes": {"hosts": self.host_vars}}}}
        (self.state_dir / "matrix-hosts.yml").write_text(yaml.safe_dump(document))

    def run(self, playbook: str, *extra: str, limit: Optional[str] = None, check: bool = False,
            tag: str = "") -> PlaybookRun:
        """ansible-playbook with forks and one batch; with $FAULTS_KEEP_DIR set, the run's output
        and JSON report are kept there as <tag>.log / <tag>.json (with the audit log's request
        counts and, behind the fault proxy, what it saw on the wire)."""
        args: List[str] = ["-f", FORKS, "-e", "gpunode_serial=100%"]
        if self.host_vars:
            args += ["-i", str(self.state_dir / "matrix-hosts.yml")]
        result = self.playbook(playbook, *args, *extra, limit=limit, check=check)
        keep = os.environ.get("FAULTS_KEEP_DIR")
        if keep and tag:
            Path(keep).mkdir(parents=True, exist_ok=True)
            name = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
            (Path(keep) / (name + ".log")).write_text(result.output)
            kept = {"rc": result.rc, "seconds": result.seconds, "recap": result.recap, "report": result.report,
                    "counters": self.counters()}
            if self.fault_proxy:
                kept["wire"] = self.wire_counts()
            (Path(keep) / (name + ".json")).write_text(json.dumps(kept, indent=1))
        return result

    def leases(self, namespace: str = "kube-system") -> List[str]:
        """Names of the collection's remediation Leases (node_lease's default prefix): not the
        kubelets' heartbeats (kube-node-lease) nor the API server's identity Lease
        (kube-system/apiserver-<id>) beside them."""
        body = self.api("/apis/coordination.k8s.io/v1/namespaces/%s/leases" % namespace)
        return sorted(item["metadata"]["name"] for item in body.get("items") or []
                      if item["metadata"]["name"].startswith(LEASE_PREFIX))

    def break_(self, node: str, fault: str, **args: Any) -> None:
        """Through the control socket (no CLI process per call)."""
        self.control("break", node=node, fault=fault, args={k: str(v) for k, v in args.items()})

    def fix(self, node: str, fault: str, **args: Any) -> None:
        self.control("fix", node=node, fault=fault, args={k: str(v) for k, v in args.items()})

    def status(self) -> Dict[str, Any]:
        return self.control("status")["status"]

    def wait_settled(self, checks: Dict[str, Callable[[Dict[str, Any]], bool]], timeout: float) -> Dict[str, Any]:
        """Poll the lab's status until every ``checks[node](entry)`` holds; on a timeout the
        error names the nodes that did not get there, with their entries."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.nodes_status()
            pending = [n for n, check in checks.items() if not check(nodes[n])]
            if not pending:
                return nodes
            if time.monotonic() > deadline:
                raise AssertionError("lab: not settled after %ds on %s: %s" % (
                    timeout, ", ".join(pending), json.dumps({n: nodes[n] for n in pending})[:6000]))
            time.sleep(0.3)

    def plugin_pods(self) -> Dict[str, Optional[str]]:
        """The plugin pod's name on every node (None: no pod)."""
        return {name: (entry.get("plugin_pod") or {}).get("name") for name, entry in self.nodes_status().items()}

    def node_snapshot(self, node: str) -> Dict[str, str]:
        root = str(self.node_root(node)) + "/"
        return {path: digest for path, digest in self.snapshot().items() if path.startswith(root)}
