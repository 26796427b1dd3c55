"""Helpers of the fault matrix: a lab fleet (tests/integration/lab_fleet.py) with extra
inventories, forks, the API server's fault injection and waits on the lab's status."""
from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _path in (HERE.parent / "integration", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from lab_fleet import LabFleet, PlaybookRun  # noqa: E402  (path set just above)

# One fork per node on a 2-core machine is slower than a few: the runs are CPU bound.
FORKS = "10"


class FaultFleet(LabFleet):
    """A lab fleet for the fault matrix."""

    def __init__(self, nodes: int, scenario: str = "healthy") -> None:
        super().__init__(nodes=nodes, scenario=scenario)
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
        and JSON report are kept there as <tag>.log / <tag>.json."""
        args: List[str] = ["-f", FORKS, "-e", "gpunode_serial=100%"]
        if self.host_vars:
            args += ["-i", str(self.state_dir / "matrix-hosts.yml")]
        result = self.playbook(playbook, *args, *extra, limit=limit, check=check)
        keep = os.environ.get("FAULTS_KEEP_DIR")
        if keep and tag:
            Path(keep).mkdir(parents=True, exist_ok=True)
            name = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
            (Path(keep) / (name + ".log")).write_text(result.output)
            (Path(keep) / (name + ".json")).write_text(json.dumps(
                {"rc": result.rc, "seconds": result.seconds, "recap": result.recap, "report": result.report,
                 "counters": self.counters()}, indent=1))
        return result

    # ---- the API server's fault injection ---------------------------------------------------
    def _request(self, path: str, method: str, body: Any = None) -> Any:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # loopback side channel of our own lab server
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        request = urllib.request.Request(self.info["url"] + path, method=method, data=data,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, context=context, timeout=10) as answer:
            text = answer.read()
        return json.loads(text) if text else {}

    def add_api_faults(self, *faults: Dict[str, Any]) -> None:
        self._request("/lab/faults", "POST", list(faults))

    def api_faults(self) -> Any:
        return self._request("/lab/faults", "GET")

    def clear_api_faults(self) -> None:
        self._request("/lab/faults", "DELETE")

    def requests(self, verb: str, resource: str) -> int:
        return int(self.counters()["requests"].get(verb, {}).get(resource, 0))

    def write_requests(self) -> Dict[str, Dict[str, int]]:
        """Counted writes (dry runs apart) per verb and resource."""
        requests = self.counters()["requests"]
        return {verb: dict(per) for verb, per in requests.items()
                if verb in ("create", "update", "patch", "delete", "deletecollection")}

    def api_get(self, path: str) -> Any:
        """A GET with the lab's admin token (counted like any client request)."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # loopback, our own lab server
        request = urllib.request.Request(self.info["url"] + path,
                                         headers={"Authorization": "Bearer " + self.info["token"]})
        with urllib.request.urlopen(request, context=context, timeout=10) as answer:
            return json.loads(answer.read())

    def leases(self, namespace: str = "kube-system") -> List[str]:
        """Names of the collection's remediation Leases (not the kubelets' heartbeats)."""
        body = self.api_get("/apis/coordination.k8s.io/v1/namespaces/%s/leases" % namespace)
        return sorted(item["metadata"]["name"] for item in body.get("items") or [])

    # ---- the lab daemon's control socket (no CLI process per call) ---------------------------
    def control(self, op: str, **request: Any) -> Any:
        from lab.daemon import control_request

        answer = control_request(str(self.state_dir), dict(request, op=op))
        if not answer.get("ok"):
            raise AssertionError("lab %s %s: %s" % (op, request, answer.get("error")))
        return answer

    def break_(self, node: str, fault: str, **args: Any) -> None:
        self.control("break", node=node, fault=fault, args={k: str(v) for k, v in args.items()})

    def fix(self, node: str, fault: str, **args: Any) -> None:
        self.control("fix", node=node, fault=fault, args={k: str(v) for k, v in args.items()})

    def status(self) -> Dict[str, Any]:
        return self.control("status")["status"]

    def nodes_status(self) -> Dict[str, Any]:
        return self.status()["nodes"]

    def wait_for(self, what: str, predicate: Callable[[Dict[str, Any]], bool], timeout: float = 60.0) -> Dict[str, Any]:
        """Poll the lab's status until ``predicate(nodes)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.nodes_status()
            if predicate(nodes):
                return nodes
            if time.monotonic() > deadline:
                raise AssertionError("lab: %s not reached after %ds: %s" % (what, timeout, json.dumps(nodes)[:4000]))
            time.sleep(0.3)

    def wait_advertising(self, nodes: Iterable[str], count: int = 8, timeout: float = 60.0) -> Dict[str, Any]:
        names = list(nodes)

        def ok(status: Dict[str, Any]) -> bool:
            return all(str(status[n].get("allocatable")) == str(count) and str(status[n].get("capacity")) == str(count)
                       and (status[n].get("plugin_pod") or {}).get("running") for n in names)

        return self.wait_for("%d GPUs advertised on %s" % (count, ", ".join(names)), ok, timeout)

    def plugin_pods(self) -> Dict[str, Optional[str]]:
        """The plugin pod's name on every node (None: no pod)."""
        return {name: (entry.get("plugin_pod") or {}).get("name") for name, entry in self.nodes_status().items()}

    def node_snapshot(self, node: str) -> Dict[str, str]:
        root = str(self.node_root(node)) + "/"
        return {path: digest for path, digest in self.snapshot().items() if path.startswith(root)}
