"""The lab's control plane (lab/cluster.py), its build (lab/build.py) and its PKI (lab/pki.py).

The control plane is the real one: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler of the pinned Kubernetes release, built by ``make lab`` into
``.build/lab/bin/kube-lab``. Every way ``start()`` can fail must name the cause and leave no
process behind; the build's failures name the part that failed.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / ".build", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from ansible_collections.gpunode.bringup.plugins.module_utils import _device_plugin as collection  # noqa: E402
from lab import build  # noqa: E402
from lab.cluster import ADMIN_USER, COMPONENTS, LAB_USER, AuditLog, ControlPlane, ControlPlaneError  # noqa: E402
from lab.pins import (  # noqa: E402
    CONTROLPLANE_SRC,
    DEVICE_PLUGIN_IMAGE,
    KUBE_LAB,
    KUBECTL,
    device_plugin_versions,
    pins,
    staging_version,
)
from lab.pki import APISERVER_HOSTS, ClusterPKI, KeyPair  # noqa: E402

needs_kube_lab = pytest.mark.skipif(not os.access(KUBE_LAB, os.X_OK), reason="kube-lab is not built (make lab)")
VERSION = pins()["KUBERNETES_VERSION"]


# ---- helpers ---------------------------------------------------------------------------------

def alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid, encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children() -> Set[int]:
    """Live processes whose parent is this test process."""
    me = os.getpid()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, encoding="utf-8") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            found.add(int(entry))
    return found


def request(url: str, token: Optional[str] = None, method: str = "GET", body: Any = None,
            context: Optional[ssl.SSLContext] = None, content_type: str = "application/json") -> Any:
    """(status, decoded JSON or text) of one request."""
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = "Bearer " + token
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method, headers=headers),
                                    context=context, timeout=30) as answer:
            status, text = answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@pytest.fixture
def short_tmp() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="glt", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    if not os.access(KUBE_LAB, os.X_OK):
        pytest.skip("kube-lab is not built (make lab)")
    directory = tempfile.mkdtemp(prefix="glc", dir="/tmp")
    plane = ControlPlane(os.path.join(directory, "cluster"))
    try:
        yield plane.start()
    finally:
        plane.stop()
        shutil.rmtree(directory, ignore_errors=True)


# ---- start and stop ------------------------------------------------------------------------------

@needs_kube_lab
def test_control_plane_starts_and_stops(short_tmp: str) -> None:
    plane = ControlPlane(os.path.join(short_tmp, "cluster")).start()
    try:
        pids = plane.pids()
        assert sorted(pids) == sorted(COMPONENTS)
        assert all(alive(pid) for pid in pids.values()) and len(set(pids.values())) == 4
        assert plane.dead() == []
        context = ssl.create_default_context(cafile=plane.ca_file)
        assert plane.url.startswith("https://127.0.0.1:")
        status, version = request(plane.url + "/version", plane.admin_token, context=context)
        assert status == 200 and version["gitVersion"] == VERSION
        status, text = request(plane.url + "/readyz", plane.admin_token, context=context)
        assert (status, text) == (200, "ok")
        # the admin kubeconfig works with the real kubectl
        kubeconfig = plane.admin_kubeconfig(os.path.join(short_tmp, "kubeconfig"))
        assert stat.S_IMODE(os.stat(kubeconfig).st_mode) == 0o600
        out = subprocess.run([KUBECTL, "--kubeconfig", kubeconfig, "auth", "whoami", "-o", "json"], text=True,
                             capture_output=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["status"]["userInfo"]["username"] == ADMIN_USER
        # each component logs to its own file
        for name in COMPONENTS:
            assert os.path.getsize(plane.path("logs", name + ".log")) > 0
        described = plane.describe()
        assert described["version"] == VERSION and described["url"] == plane.url
        assert {n: c["alive"] for n, c in described["components"].items()} == {n: True for n in COMPONENTS}
    finally:
        plane.stop()
    assert not any(alive(pid) for pid in pids.values())
    assert sorted(plane.dead()) == sorted(COMPONENTS)
    assert not children() & set(pids.values())


def test_missing_kube_lab_fails_naming_make_lab(short_tmp: str) -> None:
    directory = os.path.join(short_tmp, "cluster")
    missing = os.path.join(short_tmp, "no-such", "kube-lab")
    before = children()
    with pytest.raises(ControlPlaneError) as failed:
        ControlPlane(directory, kube_lab=missing).start()
    assert str(failed.value) == (
        "lab control plane: %s is missing: run `make lab` (it builds Kubernetes %s from its Go modules, about 8 "
        "minutes the first time)" % (missing, VERSION))
    assert not os.path.exists(directory)
    assert children() == before


@needs_kube_lab
def test_port_in_use_fails_clearly_and_starts_nothing(short_tmp: str) -> None:
    directory = os.path.join(short_tmp, "cluster")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        before = children()
        plane = ControlPlane(directory, api_port=port)
        with pytest.raises(ControlPlaneError) as failed:
            plane.start()
        assert str(failed.value) == ("port %d on 127.0.0.1 is in use (Address already in use): choose another with "
                                     "--api-port, or stop what holds it" % port)
        assert plane.components == {}
        assert children() == before
        assert not os.path.exists(directory)


@needs_kube_lab
def test_port_in_use_through_the_cli(short_tmp: str) -> None:
    state_dir = os.path.join(short_tmp, "s")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / ".build"), str(ROOT)]))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        up = subprocess.run([sys.executable, "-m", "lab", "--state-dir", state_dir, "up", "--nodes", "1",
                             "--api-port", str(port)], cwd=str(ROOT), env=env, text=True, capture_output=True,
                            timeout=120, check=False)
    assert up.returncode == 1, up.stdout + up.stderr
    assert up.stderr.startswith("lab up: the daemon exited with status 1; the end of %s/daemon.log:" % state_dir)
    assert ("lab daemon failed to start: port %d on 127.0.0.1 is in use (Address already in use): choose another "
            "with --api-port, or stop what holds it" % port) in up.stderr
    with open(os.path.join(state_dir, "daemon.pid"), encoding="utf-8") as handle:
        daemon = int(handle.read())
    assert not alive(daemon)
    assert not os.path.exists(os.path.join(state_dir, "lab.json"))
    assert not os.path.exists(os.path.join(state_dir, "cluster", "logs"))  # no component was started


FAILING_COMPONENT = """#!/bin/sh
if [ "$1" = "%(component)s" ]; then
    echo "lab test: $1 cannot start"
    echo "its last words" >&2
    exit 1
fi
exec %(kube_lab)s "$@"
"""


@needs_kube_lab
@pytest.mark.parametrize("component", COMPONENTS)
def test_component_dying_during_start_is_named_and_nothing_is_left(short_tmp: str, component: str) -> None:
    fake = os.path.join(short_tmp, "kube-lab")
    with open(fake, "w", encoding="utf-8") as handle:
        handle.write(FAILING_COMPONENT % {"component": component, "kube_lab": KUBE_LAB})
    os.chmod(fake, 0o755)
    directory = os.path.join(short_tmp, "cluster")
    before = children()
    plane = ControlPlane(directory, kube_lab=fake)
    with pytest.raises(ControlPlaneError) as failed:
        plane.start()
    log = os.path.join(directory, "logs", component + ".log")
    assert str(failed.value) == ("lab control plane: %s exited with status 1; the end of %s:\n"
                                 "lab test: %s cannot start\nits last words\n" % (component, log, component))
    started = list(plane.components)
    assert started == list(COMPONENTS[:COMPONENTS.index(component) + 1])  # in order, up to the one that died
    assert not any(alive(c.pid) for c in plane.components.values() if c.pid)
    assert children() == before


def test_unwritable_state_dir_fails_clearly() -> None:
    # /sys is not writable, not even by root
    plane = ControlPlane("/sys/gpunode-lab-test/cluster", kube_lab=sys.executable)
    with pytest.raises(ControlPlaneError) as failed:
        plane.start()
    assert str(failed.value).startswith("lab control plane: cannot write its state in /sys/gpunode-lab-test/cluster (")
    assert str(failed.value).endswith("): choose a writable state dir")
    assert plane.components == {}


def test_unwritable_state_dir_through_the_cli() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / ".build"), str(ROOT)]))
    up = subprocess.run([sys.executable, "-m", "lab", "--state-dir", "/sys/gpunode-lab-test", "up", "--nodes", "1"],
                        cwd=str(ROOT), env=env, text=True, capture_output=True, timeout=60, check=False)
    assert up.returncode == 2, up.stdout + up.stderr
    assert up.stderr.startswith("lab up: cannot write the state dir /sys/gpunode-lab-test (")
    assert up.stderr.rstrip().endswith("): choose another with --state-dir")
    assert "Traceback" not in up.stderr


# ---- the audit log as a request counter --------------------------------------------------------

def test_audit_log_counts_a_known_set_of_requests_exactly(cluster: ControlPlane) -> None:
    context = ssl.create_default_context(cafile=cluster.ca_file)
    admin = cluster.admin_token
    base = cluster.url
    configmaps = base + "/api/v1/namespaces/default/configmaps"
    audit = AuditLog(cluster.audit_log)
    audit.mark()
    assert audit.counts()["total"] == 0
    # the lab's own requests (its certificate) and a node's (system:node:<name>) are not counted
    lab_context = cluster.ssl_context(KeyPair(cluster.pki.path("lab.crt"), cluster.pki.path("lab.key")))
    assert request(base + "/api/v1/nodes", context=lab_context)[0] == 200
    node_context = cluster.ssl_context(cluster.pki.node_client("audit-node"))
    assert request(base + "/api/v1/nodes/audit-node", context=node_context)[0] == 404
    assert request(base + "/readyz", admin, context=context)[0] == 200  # health checks are not audited
    # what the administrator (the collection's identity) does
    assert request(configmaps, admin, context=context)[0] == 200
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "audit-cm"}, "data": {"a": "1"}}
    assert request(configmaps, admin, "POST", cm, context=context)[0] == 201
    assert request(configmaps + "?dryRun=All", admin, "POST", dict(cm, metadata={"name": "audit-dry"}),
                   context=context)[0] == 201
    assert request(configmaps + "/audit-cm", admin, context=context)[0] == 200
    assert request(configmaps + "/no-such-cm", admin, context=context)[0] == 404
    assert request(configmaps + "/audit-cm", admin, "PATCH", {"data": {"a": "2"}}, context=context,
                   content_type="application/merge-patch+json")[0] == 200
    assert request(configmaps + "/audit-cm", admin, "DELETE", context=context)[0] == 200
    assert request(base + "/version", admin, context=context)[0] == 200
    accounts = base + "/api/v1/namespaces/default/serviceaccounts"
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "audit-tester"}}
    assert request(accounts, admin, "POST", account, context=context)[0] == 201
    status, token = request(accounts + "/audit-tester/token", admin, "POST", {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 600}},
        context=context)
    assert status == 201
    # a restricted user: RBAC refuses it (403), the log says who and what
    assert request(base + "/api/v1/nodes", token["status"]["token"], context=context)[0] == 403
    counts = audit.counts()
    assert counts["requests"] == {
        "list": {"configmaps": 1, "nodes": 1},
        "create": {"configmaps": 2, "serviceaccounts": 1, "serviceaccounts/token": 1},
        "get": {"configmaps": 2, "/version": 1},
        "patch": {"configmaps": 1},
        "delete": {"configmaps": 1},
    }
    assert counts["total"] == 11
    assert counts["writes"] == 5 and counts["dry_run_writes"] == 1
    assert counts["write_requests"] == {"create": {"configmaps": 1, "serviceaccounts": 1, "serviceaccounts/token": 1},
                                        "patch": {"configmaps": 1}, "delete": {"configmaps": 1}}
    assert counts["forbidden"] == [{"user": "system:serviceaccount:default:audit-tester", "verb": "list",
                                    "resource": "nodes", "namespace": None, "name": None, "uri": "/api/v1/nodes"}]
    assert audit.counts(users=(ADMIN_USER,))["total"] == 10
    assert audit.counts(users=(LAB_USER,))["total"] == 0
    # a new mark starts from zero
    audit.mark()
    assert request(configmaps, admin, context=context)[0] == 200
    assert audit.counts()["requests"] == {"list": {"configmaps": 1}}


# ---- the PKI ---------------------------------------------------------------------------------

def _load(path: str) -> x509.Certificate:
    with open(path, "rb") as handle:
        return x509.load_pem_x509_certificate(handle.read())


def test_pki_issues_what_the_components_need(short_tmp: str) -> None:
    pki = ClusterPKI(os.path.join(short_tmp, "pki"))
    with pytest.raises(RuntimeError, match="create\\(\\) or load\\(\\) first"):
        pki.issue("early", "early")
    pki.create()
    ca = _load(pki.ca_cert_path)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gpunode-lab-ca"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    for private in ("ca.key", "sa.key"):
        assert stat.S_IMODE(os.stat(pki.path(private)).st_mode) == 0o600
    now = datetime.datetime.now(datetime.timezone.utc)
    assert ca.not_valid_before_utc < now < ca.not_valid_after_utc
    # a client certificate: user = CN, groups = O
    pair = pki.issue("admin", "lab-admin", ("system:masters",))
    cert = _load(pair.cert)
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "lab-admin"
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == ["system:masters"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert stat.S_IMODE(os.stat(pair.key).st_mode) == 0o600
    # a serving certificate for the API server's names and addresses
    serving = _load(pki.issue("apiserver", "kube-apiserver", server_hosts=APISERVER_HOSTS, client=False).cert)
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)) == ["10.96.0.1", "127.0.0.1", "::1"]
    assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted(
        ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"])
    assert list(serving.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    # nodes: one certificate (and identity) each, one shared key
    one, two = pki.node_client("gpu-node-01"), pki.node_client("gpu-node-02")
    first, second = _load(one.cert), _load(two.cert)
    assert first.subject.rfc4514_string() == "CN=system:node:gpu-node-01,O=system:nodes"
    assert second.subject.rfc4514_string() == "CN=system:node:gpu-node-02,O=system:nodes"
    assert Path(one.key).read_bytes() == Path(two.key).read_bytes()
    assert first.serial_number != second.serial_number
    key = first.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    # load(): a second PKI object signs with the same CA
    again = ClusterPKI(pki.directory).load()
    _load(again.issue("later", "later").cert).verify_directly_issued_by(ca)


# ---- lab.build -------------------------------------------------------------------------------

def _build(env: Dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab.build", *args], cwd=str(ROOT), env=env, text=True,
                          capture_output=True, timeout=120, check=False)


def test_build_without_go_exits_2(short_tmp: str) -> None:
    empty = os.path.join(short_tmp, "empty-bin")
    os.makedirs(empty)
    env = {k: v for k, v in os.environ.items() if k != "GO"}
    env["PATH"] = empty
    out = _build(env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr == ("lab build: Go is not installed (the lab builds Kubernetes %s and NVIDIA's device plugin "
                          "from their Go modules and needs Go %s or newer): install Go, or set GO=/path/to/go\n"
                          % (VERSION, build.required_go()))
    env = dict(os.environ, GO="/nonexistent/go")
    out = _build(env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("lab build: /nonexistent/go does not run (")
    assert out.stderr.endswith("): install Go %s or newer\n" % build.required_go())


def test_go_version_check(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build.required_go() == "1.26.0"
    assert build._version_tuple("1.26.0") == [1, 26, 0]
    assert build._version_tuple("go1.26.8") == [1, 26, 8]
    assert build._version_tuple("1.20") == [1, 20, 0]
    assert build._version_tuple("go1.26rc1") < build._version_tuple("1.26.0")
    for version, ok in (("go1.25.7", False), ("go1.26rc2", False), ("go1.26.0", True), ("go1.26.8", True),
                        ("go1.27rc1", True)):
        monkeypatch.setattr(build, "go_version", lambda go, v=version: v)
        if ok:
            assert build.check_go("/fake/go") == version
            continue
        with pytest.raises(build.BuildError) as old:
            build.check_go("/fake/go")
        assert old.value.status == build.EXIT_NO_GO == 2
        assert str(old.value) == ("/fake/go is %s; Kubernetes %s needs Go 1.26.0 or newer (go.mod of lab/controlplane)"
                                  % (version, VERSION))


FAKE_GO = """#!/bin/sh
if [ "$1" = "env" ]; then echo go1.26.8; exit 0; fi
echo "fake go: $*" >&2
echo "./main.go:1:1: lab test: this build fails" >&2
exit 1
"""


@pytest.mark.parametrize("part, component", [
    ("controlplane", "kube-lab (the Kubernetes %s control plane)" % VERSION),
    ("device-plugin", "nvidia-device-plugin %s (github.com/NVIDIA/k8s-device-plugin)" % device_plugin_versions()[0]),
])
def test_failed_build_names_the_component(short_tmp: str, part: str, component: str) -> None:
    fake = os.path.join(short_tmp, "go")
    with open(fake, "w", encoding="utf-8") as handle:
        handle.write(FAKE_GO)
    os.chmod(fake, 0o755)
    before = {p: os.stat(p).st_mtime for p in (KUBE_LAB,) if os.path.exists(p)}
    out = _build(dict(os.environ, GO=fake), "--only", part, "--force")
    assert out.returncode == 1, out.stdout + out.stderr
    verb = "build" if part == "controlplane" else "install"
    assert re.match(r"^lab build: %s failed to build \(`%s %s -trimpath -ldflags` exited 1 after \d+s\); its last "
                    r"lines:\nfake go: %s .*\n\./main\.go:1:1: lab test: this build fails\n$"
                    % (re.escape(component), re.escape(fake), verb, verb), out.stderr), out.stderr
    # a failed build replaces nothing
    assert {p: os.stat(p).st_mtime for p in before} == before


def test_go_mod_follows_the_pins() -> None:
    text = Path(CONTROLPLANE_SRC, "go.mod").read_text()
    kubernetes, etcd = pins()["KUBERNETES_VERSION"], pins()["ETCD_VERSION"]
    assert build.pinned_in_go_mod(text, "k8s.io/kubernetes") == kubernetes
    assert build.pinned_in_go_mod(text, "go.etcd.io/etcd/server/v3") == etcd
    assert re.search(r"^module %s$" % re.escape(build.CONTROLPLANE_MODULE), text, re.M)
    replaces = dict(re.findall(r"^\s*(k8s\.io/[\w.-]+) => \1 (v\S+)$", text, re.M))
    assert replaces and set(replaces.values()) == {staging_version(kubernetes)} == {"v0.%s" % kubernetes[3:]}
    # every replace of the line `=>` form is one of those (none to another module or a local path)
    assert len(re.findall(r"=>", text)) == len(replaces)
    # ... and they are exactly k8s.io/kubernetes' own staging modules (its go.mod, in the module cache)
    cache = os.environ.get("GOMODCACHE") or os.path.join(os.path.expanduser("~"), "go", "pkg", "mod")
    upstream = os.path.join(cache, "cache", "download", "k8s.io", "kubernetes", "@v", "%s.mod" % kubernetes)
    if not os.path.exists(upstream):
        pytest.skip("k8s.io/kubernetes %s's go.mod is not in the module cache" % kubernetes)
    staging = set(re.findall(r"^\s*(k8s\.io/[\w.-]+) => \./staging/", Path(upstream).read_text(), re.M))
    assert set(replaces) == staging
    go_line = re.search(r"^go (\S+)$", Path(upstream).read_text(), re.M)
    assert go_line is not None and build.required_go() == go_line.group(1)


def test_collection_default_tag_is_the_first_pinned_plugin() -> None:
    versions: List[str] = device_plugin_versions()
    assert versions and collection.DEFAULT_TAG == versions[0]
    assert collection.DEFAULT_IMAGE == DEVICE_PLUGIN_IMAGE
    assert all(re.fullmatch(r"v\d+\.\d+\.\d+", v) for v in versions)


def test_staging_version() -> None:
    assert staging_version("v1.37.2") == "v0.37.2"
    assert staging_version("1.30.0") == "v0.30.0"
    with pytest.raises(ValueError, match="unexpected Kubernetes version v2.0.0"):
        staging_version("v2.0.0")
