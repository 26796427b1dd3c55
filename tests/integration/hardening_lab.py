"""Helpers of the hardening suites (test_bad_input, test_rbac, test_no_log).

- Restricted identities on the lab's real API server: docs/rbac.yaml (a ``kind: List`` holding
  the ServiceAccount kube-system/gpunode-bringup, its Roles and ClusterRole and the bindings to
  it) applied as it is, a TokenRequest token of that ServiceAccount in a kubeconfig
  (``LabFleet.service_account_kubeconfig``). ``manifest_rules`` lists the rules of the manifest's
  Roles and ClusterRoles (where each one is, to edit a copy: ``without_rule``); nothing here
  decides what a rule allows, the API server's RBAC authorizer does. ``wait_authorized`` waits
  until the authorizer answers SubjectAccessReviews as expected after a role changed.
- ``admin_service_account``: a ServiceAccount bound to cluster-admin and its token, a token string
  the tests know.
- TLS material made with ``cryptography``: an expired server certificate and a loopback TLS
  server presenting it, a CA that did not sign the lab's server certificate.
- ``run_playbook_text``: one ansible-playbook process for many tasks, each registered into a JSON file.
"""
from __future__ import annotations

import base64
import copy
import datetime
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / ".build", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import yaml  # noqa: E402

from lab_fleet import VENV_BIN, LabFleet  # noqa: E402

RBAC_YAML = ROOT / "docs" / "rbac.yaml"
SERVICE_ACCOUNT_NAMESPACE = "kube-system"
SERVICE_ACCOUNT_NAME = "gpunode-bringup"
SERVICE_ACCOUNT_USER = "system:serviceaccount:%s:%s" % (SERVICE_ACCOUNT_NAMESPACE, SERVICE_ACCOUNT_NAME)
ROLE_KINDS = ("Role", "ClusterRole")
BINDING_KINDS = {"RoleBinding": "Role", "ClusterRoleBinding": "ClusterRole"}


def hardening_fleet(nodes: int, scenario: str = "healthy") -> LabFleet:
    """A LabFleet (not started) whose ansible-playbook runs use pipelining: one process per task
    on the local connection, no module copy."""
    fleet = LabFleet(nodes=nodes, scenario=scenario)
    fleet.env["ANSIBLE_PIPELINING"] = "1"
    return fleet


# ---------------------------------------------------------------------------------------------
# docs/rbac.yaml and its rules

def rbac_manifest(path: Path = RBAC_YAML) -> Dict[str, Any]:
    """The manifest as one document (a ``kind: List``)."""
    manifest = yaml.safe_load(path.read_text())
    assert manifest.get("kind") == "List", "%s is not one kind: List document" % path
    return manifest


@dataclass(frozen=True)
class RuleRef:
    """One rule of a Role or ClusterRole of the manifest: where it is, and what it says."""

    kind: str  # Role | ClusterRole
    role: str
    namespace: Optional[str]  # None for a ClusterRole
    item: int  # index of the role in the List's items
    index: int  # index of the rule in the role's rules
    api_groups: Tuple[str, ...]
    resources: Tuple[str, ...]
    verbs: Tuple[str, ...]

    @property
    def key(self) -> Tuple[str, str, str, Tuple[str, ...]]:
        return (self.namespace or "*", ",".join(self.api_groups), ",".join(self.resources), self.verbs)

    @property
    def id(self) -> str:
        namespace, group, resources, verbs = self.key
        return "%s:%s%s:%s" % (namespace, group + "/" if group else "", resources, "+".join(verbs))

    def permissions(self) -> List[Tuple[Optional[str], str, str, str]]:
        """(namespace, API group, resource, verb) of every combination the rule names."""
        return [(self.namespace, group, resource, verb) for group in self.api_groups for resource in self.resources
                for verb in self.verbs]


def manifest_rules(manifest: Dict[str, Any]) -> List[RuleRef]:
    """Every rule of the manifest's Roles and ClusterRoles, in the file's order."""
    rules: List[RuleRef] = []
    for item_index, item in enumerate(manifest["items"]):
        if item.get("kind") not in ROLE_KINDS:
            continue
        metadata = item.get("metadata") or {}
        namespace = metadata.get("namespace") if item["kind"] == "Role" else None
        for rule_index, rule in enumerate(item.get("rules") or []):
            rules.append(RuleRef(item["kind"], metadata["name"], namespace, item_index, rule_index,
                                 tuple(rule.get("apiGroups") or ()), tuple(rule.get("resources") or ()),
                                 tuple(rule.get("verbs") or ())))
    return rules


def bound_roles(manifest: Dict[str, Any], namespace: str = SERVICE_ACCOUNT_NAMESPACE,
                name: str = SERVICE_ACCOUNT_NAME) -> List[Tuple[str, str, Optional[str]]]:
    """(kind, name, namespace) of each role the manifest's own bindings bind to the ServiceAccount."""
    bound: List[Tuple[str, str, Optional[str]]] = []
    for item in manifest["items"]:
        if item.get("kind") not in BINDING_KINDS:
            continue
        subjects = item.get("subjects") or []
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == name and s.get("namespace") == namespace
                   for s in subjects):
            continue
        ref = item["roleRef"]
        assert ref["kind"] == BINDING_KINDS[item["kind"]], item
        bound.append((ref["kind"], ref["name"], (item["metadata"] or {}).get("namespace")
                      if item["kind"] == "RoleBinding" else None))
    return bound


def without_rule(manifest: Dict[str, Any], rule: RuleRef) -> Dict[str, Any]:
    """A copy of the manifest whose role lacks ``rule`` (everything else as it is)."""
    edited = copy.deepcopy(manifest)
    role = edited["items"][rule.item]
    assert role["kind"] == rule.kind and role["metadata"]["name"] == rule.role, role
    del role["rules"][rule.index]
    return edited


def roles_of(manifest: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [item for item in manifest["items"] if item.get("kind") in ROLE_KINDS]


def restricted_kubeconfig(fleet: LabFleet, manifest: Dict[str, Any], name: str = "rbac") -> str:
    """Apply ``manifest`` (the whole List, as ``kubectl apply -f docs/rbac.yaml`` would) and
    return a kubeconfig with a TokenRequest token of kube-system/gpunode-bringup. The roles the
    API server then holds are checked to be exactly the manifest's."""
    path = fleet.state_dir / ("kubeconfig-%s" % name)
    kubeconfig = fleet.service_account_kubeconfig(SERVICE_ACCOUNT_NAME, SERVICE_ACCOUNT_NAMESPACE, [manifest], path=path)
    for role in roles_of(manifest):
        metadata = role["metadata"]
        group_path = "/apis/rbac.authorization.k8s.io/v1"
        if role["kind"] == "Role":
            stored = fleet.api("%s/namespaces/%s/roles/%s" % (group_path, metadata["namespace"], metadata["name"]))
        else:
            stored = fleet.api("%s/clusterroles/%s" % (group_path, metadata["name"]))
        assert _plain_rules(stored.get("rules")) == _plain_rules(role.get("rules")), (role, stored.get("rules"))
    return kubeconfig


def _plain_rules(rules: Any) -> List[Dict[str, List[str]]]:
    return [{k: list(rule.get(k) or []) for k in ("apiGroups", "resources", "verbs")} for rule in rules or []]


def allowed(fleet: LabFleet, user: str, namespace: Optional[str], group: str, resource: str, verb: str) -> bool:
    """The API server's RBAC decision for ``user`` (a SubjectAccessReview, as the administrator)."""
    resource, _slash, subresource = resource.partition("/")
    attributes: Dict[str, Any] = {"verb": verb, "group": group, "resource": resource}
    if subresource:
        attributes["subresource"] = subresource
    if namespace:
        attributes["namespace"] = namespace
    groups = ["system:serviceaccounts", "system:serviceaccounts:%s" % user.split(":")[2], "system:authenticated"] \
        if user.startswith("system:serviceaccount:") else ["system:authenticated"]
    answer = fleet.api("/apis/authorization.k8s.io/v1/subjectaccessreviews", "POST", {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": groups, "resourceAttributes": attributes}})
    return bool(answer["status"].get("allowed"))


def wait_authorized(fleet: LabFleet, expected: Dict[Tuple[Optional[str], str, str, str], bool],
                    user: str = SERVICE_ACCOUNT_USER, timeout: float = 30.0) -> None:
    """Wait until the authorizer (its informers follow role changes within moments) decides each
    (namespace, group, resource, verb) as expected."""
    deadline = time.monotonic() + timeout
    while True:
        wrong = {k: v for k, v in expected.items() if allowed(fleet, user, *k) != v}
        if not wrong:
            return
        if time.monotonic() > deadline:
            raise AssertionError("RBAC: after %ds these decisions differ from the expected ones: %s" % (timeout, wrong))
        time.sleep(0.2)


FORBIDDEN = re.compile(r'is forbidden: User "(?P<user>[^"]+)" cannot (?P<verb>\S+) resource "(?P<resource>[^"]+)" '
                       r'in API group "(?P<group>[^"]*)" (?:in the namespace "(?P<namespace>[^"]+)"|at the cluster scope)')


def denials(fleet: LabFleet) -> List[Dict[str, Any]]:
    """The 403s in the audit log since the last ``reset_counters``: the request (``verb``,
    ``resource``, as ``counters()["forbidden"]``) and the authorization the API server denied,
    parsed from its message (``denied``: verb, resource, group, namespace). They differ where one
    request needs two decisions: an apply (a patch) that creates the object is authorized as
    create too."""
    assert fleet.audit is not None
    found: List[Dict[str, Any]] = []
    for event in fleet.audit.events():
        status = event.get("responseStatus") or {}
        if status.get("code") != 403:
            continue
        ref = event.get("objectRef") or {}
        message = status.get("message") or ""
        match = FORBIDDEN.search(message)
        found.append({"user": (event.get("user") or {}).get("username"), "verb": event.get("verb"),
                      "resource": ref.get("resource", "") + ("/" + ref["subresource"] if ref.get("subresource") else ""),
                      "namespace": ref.get("namespace"), "message": message,
                      "denied": match.groupdict() if match else None})
    return found


def admin_service_account(fleet: LabFleet, name: str, namespace: str = "default") -> Tuple[str, str]:
    """A ServiceAccount bound to cluster-admin: (kubeconfig path, its TokenRequest token)."""
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "%s-%s-cluster-admin" % (namespace, name)},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
               "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]}
    kubeconfig = fleet.service_account_kubeconfig(name, namespace, [binding])
    token = token_of(kubeconfig)
    wait_authorized(fleet, {(None, "", "nodes", "list"): True}, user="system:serviceaccount:%s:%s" % (namespace, name))
    return kubeconfig, token


def token_of(kubeconfig: str) -> str:
    document = yaml.safe_load(Path(kubeconfig).read_text())
    context = next(c["context"] for c in document["contexts"] if c["name"] == document["current-context"])
    return next(u["user"]["token"] for u in document["users"] if u["name"] == context["user"])


# ---------------------------------------------------------------------------------------------
# TLS material

def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(name: str) -> Any:
    """(certificate, key) of a self-signed CA valid now."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_server_cert(ca: Any, expired: bool) -> Any:
    """(certificate, key) for 127.0.0.1 signed by ``ca``; expired a week ago when asked."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    import ipaddress

    ca_cert, ca_key = ca
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    if expired:
        start, end = now - datetime.timedelta(days=30), now - datetime.timedelta(days=7)
    else:
        start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


class TlsServer:
    """A loopback TLS server presenting ``cert``: the handshake is all it does (a client that
    accepts the certificate gets its connection closed)."""

    def __init__(self, directory: Path, cert: Any, key: Any) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.cert_file = directory / "server.crt"
        self.key_file = directory / "server.key"
        self.cert_file.write_bytes(_pem_cert(cert))
        self.key_file.write_bytes(_pem_key(key))
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(self.cert_file), str(self.key_file))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.url = "https://127.0.0.1:%d" % self.port
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="expired-tls", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _addr = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            conn.settimeout(2)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass
            finally:
                conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def write_kubeconfig(path: Path, server: str, token: str, ca_pem: Optional[bytes] = None,
                     context: str = "lab") -> str:
    cluster: Dict[str, Any] = {"server": server}
    if ca_pem is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    doc = {"apiVersion": "v1", "kind": "Config", "preferences": {},
           "clusters": [{"name": "c", "cluster": cluster}],
           "users": [{"name": "u", "user": {"token": token}}],
           "contexts": [{"name": context, "context": {"cluster": "c", "user": "u"}}], "current-context": context}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def pem(cert: Any) -> bytes:
    return _pem_cert(cert)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Many tasks, one ansible-playbook process

def run_playbook_text(fleet: LabFleet, text: str, name: str, *extra: str, inventory: Optional[str] = None,
                      env: Optional[Dict[str, str]] = None, timeout: float = 300) -> subprocess.CompletedProcess:
    playbook = fleet.state_dir / ("%s.yml" % name)
    playbook.write_text(text)
    cmd = [str(VENV_BIN / "ansible-playbook"), "-i", inventory or fleet.inventory, str(playbook), *extra]
    return subprocess.run(cmd, cwd=str(fleet.state_dir), env=env or fleet.env, text=True, capture_output=True,
                          timeout=timeout, check=False)
