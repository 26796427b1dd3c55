"""K8sClient.request (the typed-API-free requests of the fleet read and the Lease) under the lowest kubernetes client
requirements.txt admits and under the installed one: the two generator shapes of ApiClient
(``call_api(path, method, ...)`` up to 30, ``param_serialize`` + ``call_api(method, url)`` after).
Against a lab API server (TLS + token): a LIST with a label selector, a GET that is not found
(404 -> None for the DaemonSet), a pod log of a pod that does not exist (404), a wrong token
(401 names the credentials), and requests with bodies: a Lease created in check mode (dry run),
created, renewed (PUT) and released (DELETE with a precondition). The floor is installed with pip into a cache under .build."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".build" / "kubernetes-range"
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable

SCRIPT = r"""
import json, sys
import kubernetes
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import K8sError
from ansible_collections.gpunode.bringup.plugins.module_utils._fleet import FleetQuery, FleetReader
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import K8sClient, is_not_found

kubeconfig, bad_kubeconfig = sys.argv[1], sys.argv[2]
client = K8sClient({"kubeconfig": kubeconfig, "api_retries": 0})
reader = FleetReader(client)
snapshot = reader.snapshot(FleetQuery(nodes=None, daemonset_name="absent-plugin", namespace="kube-system",
                                      label_selector="nvidia.com/gpu.present=true"))
out = {"version": kubernetes.__version__, "nodes": sorted(n["metadata"]["name"] for n in snapshot.nodes),
       "daemonset": snapshot.daemonset, "pods": len(snapshot.pods), "requests": client.requests}
try:
    client.call("read log", client.request, "GET", "/api/v1/namespaces/kube-system/pods/nope/log", [("tailLines", 5)])
except K8sError as exc:
    out["log_404"] = is_not_found(exc)
bad = K8sClient({"kubeconfig": bad_kubeconfig, "api_retries": 0})
try:
    FleetReader(bad).snapshot(FleetQuery(nodes=None, daemonset_name="x", namespace="kube-system"))
except K8sError as exc:
    out["bad_token"] = exc.msg
# bodies: a Lease created in check mode (dry run), created, renewed (PUT), released (DELETE with
# a precondition), then read back as gone
from ansible_collections.gpunode.bringup.plugins.module_utils._lease import LeaseRequest, run_node_lease
lease = LeaseRequest("gpu-node-01", "kube-system", "gpunode-bringup-", "contract-test", 600)
steps = [run_node_lease(client, lease, "acquired", True), run_node_lease(client, lease, "acquired", False)]
before = client.requests
steps.append(run_node_lease(client, lease, "acquired", False))
out["renew_requests"] = client.requests - before  # GET + PUT
steps.append(run_node_lease(client, lease, "released", False))
out["lease"] = [(r["changed"], r.get("acquired"), r.get("renewed"), r.get("released")) for r in steps]
try:
    client.call("get lease", client.request, "GET", "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/"
                + lease.name)
    out["lease_gone"] = False
except K8sError as exc:
    out["lease_gone"] = is_not_found(exc)
out["typed_api_imported"] = any(m.startswith("kubernetes.client.api.") and m != "kubernetes.client.api"
                                for m in sys.modules)
print(json.dumps(out))
"""


def kubernetes_floor() -> str:
    line = next(l for l in (ROOT / "requirements.txt").read_text().splitlines() if l.startswith("kubernetes"))
    return re.search(r">=\s*([\d.]+)", line).group(1)


@pytest.fixture(scope="module")
def lab():
    state = Path(tempfile.mkdtemp(prefix="gk", dir="/tmp"))
    env = dict(os.environ, PYTHONPATH="%s:%s" % (ROOT / ".build", ROOT))
    up = subprocess.run([PYTHON, "-m", "lab", "--state-dir", str(state), "up", "--api-only", "--nodes", "3"],
                        cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert up.returncode == 0, up.stdout + up.stderr
    bad = state / "bad-kubeconfig"
    text = (state / "kubeconfig").read_text()
    bad.write_text(re.sub(r"(token:\s*)\S+", r"\1wrong-token", text))
    try:
        yield state
    finally:
        subprocess.run([PYTHON, "-m", "lab", "--state-dir", str(state), "down"], cwd=ROOT, env=env,
                       capture_output=True, check=False)
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.parametrize("bound", ["floor", "installed"])
def test_raw_requests_under_kubernetes_bound(lab, bound):
    path = [str(ROOT / ".build")]
    if bound == "floor":
        spec = "kubernetes==%s" % kubernetes_floor()
        target = CACHE / re.sub(r"[^\w.]", "_", spec)
        if not (target / "kubernetes").is_dir():
            proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                   "--target", str(target), spec], capture_output=True, text=True, check=False)
            assert proc.returncode == 0, proc.stderr
        path.insert(0, str(target))
    env = dict(os.environ, PYTHONPATH=":".join(path))
    proc = subprocess.run([PYTHON, "-c", SCRIPT, str(lab / "kubeconfig"), str(lab / "bad-kubeconfig")],
                          capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    if bound == "floor":
        assert out["version"] == kubernetes_floor()
    assert len(out["nodes"]) == 3 and out["daemonset"] is None and out["pods"] == 0
    assert out["requests"] == 3
    assert out["log_404"] is True
    # check mode, create, renew, release; then the Lease is gone
    # (changed, acquired, renewed, released)
    assert out["lease"] == [[True, True, False, False], [True, True, False, False], [False, True, True, False],
                            [True, False, False, True]], out["lease"]
    assert out["renew_requests"] == 2
    assert out["lease_gone"] is True
    assert "unauthorized (HTTP 401)" in out["bad_token"] and "wrong-token" not in out["bad_token"]
    if bound == "installed":
        # the installed client imports API classes lazily: the fleet read never loads CoreV1Api
        # (kubernetes 29 imports them all with the package, whatever the caller uses)
        assert out["typed_api_imported"] is False
