"""A full lab fleet (`python -m lab up`: the real control plane, simulated kubelets running
NVIDIA's real device plugin) for playbook-level tests: start/stop, faults, the request counts of
the API server's audit log, requests and kubectl as the lab's administrator, restricted
ServiceAccount tokens, a snapshot of the node roots, and ansible-playbook runs."""
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
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import yaml

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / ".build", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from lab.cluster import AuditLog  # noqa: E402
from lab.daemon import control_request  # noqa: E402

VENV_BIN = ROOT / ".venv" / "bin"
KUBECTL = str(ROOT / ".build" / "lab" / "bin" / "kubectl")
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
PLAYBOOKS = ROOT / "playbooks"
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)"
                   r"\s+rescued=(\d+)", re.M)
from lab.node.layout import KUBELET_OWNED  # noqa: E402


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
    def __init__(self, nodes: int = 4, scenario: str = "healthy", gpus: int = 8, fault_proxy: bool = False,
                 node_status_update_frequency: Optional[float] = None, api_only: bool = False) -> None:
        # unix socket paths are limited to 107 bytes: keep the state directory short
        self.state_dir = Path(tempfile.mkdtemp(prefix="gl", dir="/tmp"))
        self.nodes = nodes
        self.scenario = scenario
        self.gpus = gpus
        self.fault_proxy = fault_proxy
        self.node_status_update_frequency = node_status_update_frequency
        self.api_only = api_only
        self.audit: Optional[AuditLog] = None
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
        args = ["up", "--nodes", str(self.nodes), "--scenario", self.scenario, "--gpus", str(self.gpus)]
        if self.fault_proxy:
            args.append("--fault-proxy")
        if self.api_only:
            args.append("--api-only")
        if self.node_status_update_frequency is not None:
            args += ["--node-status-update-frequency", str(self.node_status_update_frequency)]
        try:
            self.lab(*args)
        except AssertionError:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            raise
        self.info = json.loads((self.state_dir / "lab.json").read_text())
        self.audit = AuditLog(self.info["audit_log"])
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

    # ---- the API as the lab's administrator ------------------------------------------------
    @property
    def kubeconfig(self) -> str:
        return self.info["kubeconfig"]

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.info["ca"])

    def api(self, path: str, method: str = "GET", body: Any = None, content_type: str = "application/json",
            token: Optional[str] = None, missing_ok: bool = False) -> Any:
        """A request to the API server (counted in its audit log like the collection's)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.info["apiserver_url"] + path, method=method, data=data, headers={
            "Authorization": "Bearer " + (token or self.info["token"]), "Content-Type": content_type,
            "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, context=self._context(), timeout=30) as answer:
                text = answer.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and missing_ok:
                return None
            raise AssertionError("%s %s: HTTP %d %s" % (method, path, exc.code, exc.read()[:500])) from None
        return json.loads(text) if text else {}

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([KUBECTL, "--kubeconfig", self.kubeconfig, *args], text=True, capture_output=True,
                              check=False, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError("kubectl %s: %s%s" % (" ".join(args), proc.stdout, proc.stderr))
        return proc

    def service_account_kubeconfig(self, name: str, namespace: str, documents: Iterable[Dict[str, Any]],
                                   path: Optional[Path] = None) -> str:
        """A kubeconfig whose token (TokenRequest) is ServiceAccount ``namespace/name``, after the
        RBAC ``documents`` (Roles, ClusterRoles and their bindings) are applied as they are."""
        self.api("/api/v1/namespaces/%s/serviceaccounts" % namespace, "POST", {
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}) \
            if self.api("/api/v1/namespaces/%s/serviceaccounts/%s" % (namespace, name), missing_ok=True) is None else None
        for doc in documents:
            self.apply(doc)
        answer = self.api("/api/v1/namespaces/%s/serviceaccounts/%s/token" % (namespace, name), "POST", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}})
        token = answer["status"]["token"]
        target = path or (self.state_dir / ("kubeconfig-%s-%s" % (namespace, name)))
        document = yaml.safe_load(Path(self.kubeconfig).read_text())
        document["users"] = [{"name": name, "user": {"token": token}}]
        document["contexts"][0]["context"]["user"] = name
        Path(target).write_text(yaml.safe_dump(document))
        return str(target)

    def apply(self, doc: Dict[str, Any], manager: str = "lab-test") -> None:
        """Server-side apply of one object as the administrator (kubectl finds its resource)."""
        proc = subprocess.run([KUBECTL, "--kubeconfig", self.kubeconfig, "apply", "--server-side",
                               "--field-manager", manager, "--force-conflicts", "-f", "-"],
                              input=json.dumps(doc), text=True, capture_output=True, check=False, timeout=120)
        if proc.returncode != 0:
            raise AssertionError("kubectl apply %s/%s: %s" % (doc.get("kind"), (doc.get("metadata") or {}).get("name"),
                                                              proc.stderr))

    # ---- request counts: the API server's audit log ---------------------------------------------
    def reset_counters(self) -> None:
        assert self.audit is not None
        self.audit.mark()

    def counters(self) -> Dict[str, Any]:
        """Requests since the last reset, by verb and resource (writes and dry-run writes apart)."""
        assert self.audit is not None
        return self.audit.counts()

    def writes(self) -> int:
        return int(self.counters()["writes"])

    def deletes(self, resource: str = "pods") -> int:
        return int(self.counters()["requests"].get("delete", {}).get(resource, 0))

    def write_requests(self) -> Dict[str, Dict[str, int]]:
        """Writes (dry runs apart) per verb and resource since the last reset."""
        return self.counters()["write_requests"]

    # ---- the lab daemon's control socket ------------------------------------------------------
    def control(self, op: str, **request: Any) -> Any:
        answer = control_request(str(self.state_dir), dict(request, op=op))
        if not answer.get("ok"):
            raise AssertionError("lab %s %s: %s" % (op, request, answer.get("error")))
        return answer

    def add_api_faults(self, *faults: Dict[str, Any]) -> None:
        self.control("api_faults", action="add", faults=list(faults))

    def api_faults(self) -> Any:
        return self.control("api_faults", action="list")["faults"]

    def clear_api_faults(self) -> None:
        self.control("api_faults", action="clear")

    def wire_counts(self) -> Dict[str, Dict[str, int]]:
        """What the fault proxy saw since its last reset: ``seen`` (every request on the wire) and
        ``answered`` (those it answered itself: they never reached the API server), by
        "verb resource"."""
        answer = self.control("api_faults", action="list")
        return {"seen": answer.get("seen") or {}, "answered": answer.get("answered") or {}}

    def reset_wire_counts(self) -> None:
        self.control("api_faults", action="reset_counts")

    def nodes_status(self) -> Dict[str, Any]:
        return self.control("status")["status"]["nodes"]

    def wait_for(self, what: str, predicate: Callable[[Dict[str, Any]], bool], timeout: float = 90.0) -> Dict[str, Any]:
        """Poll the lab's status until ``predicate(nodes)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.nodes_status()
            if predicate(nodes):
                return nodes
            if time.monotonic() > deadline:
                raise AssertionError("lab: %s not reached after %ds: %s" % (what, timeout, json.dumps(nodes)[:4000]))
            time.sleep(0.3)

    def wait_advertising(self, nodes: Iterable[str], count: Optional[int] = None, timeout: float = 90.0) -> Dict[str, Any]:
        names = list(nodes)
        want = str(self.gpus if count is None else count)

        def ok(status: Dict[str, Any]) -> bool:
            return all(str(status[n].get("allocatable")) == want and str(status[n].get("capacity")) == want
                       and (status[n].get("plugin_pod") or {}).get("running") for n in names)

        return self.wait_for("%s GPUs advertised on %s" % (want, ", ".join(names)), ok, timeout)

    # ---- node roots ----------------------------------------------------------------------------
    def snapshot(self) -> Dict[str, str]:
        """Regular files under every node root with a hash of their content."""
        result: Dict[str, str] = {}
        for node in self.node_names:
            root = self.node_root(node)
            for dirpath, _dirs, files in os.walk(root):
                for name in files:
                    path = Path(dirpath) / name
                    relative = str(path.relative_to(root))
                    if relative.startswith(KUBELET_OWNED) or name.endswith(".lock") or not path.is_file() \
                            or path.is_socket():
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
