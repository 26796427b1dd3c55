"""Helpers of the hardening suites (test_bad_input, test_rbac, test_no_log).

- ``TokenLabFleet``: a full lab fleet (a ``LabFleet``) whose daemon also hands out restricted
  bearer tokens. The lab daemon's control socket has no operation for that, so this module runs
  ``lab.daemon.LabDaemon`` through a subclass that answers one more request,
  ``{"op": "add_token", "service_account": "ns:name", "rules": [...], "kubeconfig": path}``
  (the API server's ``add_service_account_token`` + ``write_kubeconfig``; ``"admin": true`` and
  ``"token": "..."`` instead of rules: an admin token of that value, ``add_token``). Everything else is the
  lab's own daemon: same state dir layout, ``lab.json``, inventory, ``python -m lab break/fix/down``.
- TLS material made with ``cryptography``: an expired server certificate and a loopback TLS
  server presenting it, a CA that did not sign the lab's server certificate.
- ``run_tasks``: one ansible-playbook process for many tasks, each registered into a JSON file.

``python tests/integration/hardening_lab.py daemon --state-dir DIR [--nodes N] [--scenario S]``
runs the daemon in the foreground (``TokenLabFleet.up`` starts it in its own session).
"""
from __future__ import annotations

import argparse
import base64
import datetime
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT / ".build", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import yaml  # noqa: E402

from lab_fleet import PYTHON, VENV_BIN, LabFleet  # noqa: E402

SERVICE_ACCOUNT = "kube-system:gpunode-bringup"
RBAC_YAML = ROOT / "docs" / "rbac.yaml"


# ---------------------------------------------------------------------------------------------
# A lab daemon that can add restricted tokens

def _token_daemon_class() -> Any:
    from lab.daemon import LabDaemon

    class TokenLabDaemon(LabDaemon):
        """The lab daemon plus the ``add_token`` control request."""

        def handle(self, request: Dict[str, Any]) -> Dict[str, Any]:
            if request.get("op") != "add_token":
                return super().handle(request)
            try:
                if request.get("admin"):
                    token = self.api.add_token(token=request.get("token"))
                else:
                    token = self.api.add_service_account_token(
                        request.get("service_account") or SERVICE_ACCOUNT, rules=list(request.get("rules") or []),
                        token=request.get("token"))
                path = self.api.write_kubeconfig(request["kubeconfig"], token=token)
                return {"ok": True, "token": token, "kubeconfig": path}
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
                return {"ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}

    return TokenLabDaemon


def daemon_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hardening_lab.py daemon")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--scenario", default="healthy")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    daemon = _token_daemon_class()(args.state_dir, args.nodes, args.scenario)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: daemon.request_stop())
    try:
        daemon.start()
    except Exception:  # noqa: BLE001
        logging.exception("token lab daemon failed to start")
        daemon.stop()
        return 1
    daemon.serve_forever()
    daemon.stop()
    return 0


class TokenLabFleet(LabFleet):
    """A ``LabFleet`` whose daemon hands out tokens bound to RBAC rules."""

    def __init__(self, nodes: int = 4, scenario: str = "healthy") -> None:
        super().__init__(nodes, scenario)
        self.env["ANSIBLE_PIPELINING"] = "1"  # one process per task on the local connection, no copy

    def up(self) -> "TokenLabFleet":
        from lab.cli import _daemon_env
        from lab.daemon import control_request

        self._control_request = control_request
        env = _daemon_env()
        command = [PYTHON, str(Path(__file__).resolve()), "daemon", "--state-dir", str(self.state_dir),
                   "--nodes", str(self.nodes), "--scenario", self.scenario]
        log_path = self.state_dir / "daemon.log"
        with open(log_path, "ab") as log, open(os.devnull, "rb") as devnull:
            process = subprocess.Popen(command, cwd=str(ROOT), env=env, stdin=devnull, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        (self.state_dir / "daemon.pid").write_text("%d\n" % process.pid)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                info = json.loads((self.state_dir / "lab.json").read_text())
            except (OSError, ValueError):
                info = {}
            if info.get("ready") and info.get("pids", {}).get("daemon") == process.pid:
                self.info = info
                return self
            if process.poll() is not None:
                raise AssertionError("token lab daemon exited: %s" % log_path.read_text()[-3000:])
            time.sleep(0.05)
        self.down()
        raise AssertionError("token lab daemon not ready after 120 s: %s" % log_path.read_text()[-3000:])

    def kubeconfig_for(self, rules: Sequence[Dict[str, Any]], name: str) -> str:
        """A kubeconfig whose token is ServiceAccount kube-system:gpunode-bringup bound to ``rules``."""
        answer = self._control_request(str(self.state_dir), {
            "op": "add_token", "service_account": SERVICE_ACCOUNT, "rules": list(rules),
            "kubeconfig": str(self.state_dir / ("kubeconfig-%s" % name))})
        assert answer.get("ok"), answer
        return answer["kubeconfig"]

    def admin_token(self, token: str, name: str) -> str:
        """Accept ``token`` as another admin token; returns the path of a kubeconfig holding it."""
        answer = self._control_request(str(self.state_dir), {
            "op": "add_token", "admin": True, "token": token, "kubeconfig": str(self.state_dir / ("kubeconfig-%s" % name))})
        assert answer.get("ok"), answer
        return answer["kubeconfig"]

    def forbidden(self) -> Dict[str, Dict[str, int]]:
        return self.counters().get("forbidden") or {}

    def forbidden_requests(self) -> List[Dict[str, Any]]:
        return self.counters().get("forbiddenRequests") or []


def rbac_rules(path: Path = RBAC_YAML) -> List[Dict[str, Any]]:
    from lab.apiserver import rules_from_rbac_yaml

    return rules_from_rbac_yaml(str(path), SERVICE_ACCOUNT)


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


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "daemon":
        sys.exit(daemon_main(sys.argv[2:]))
    sys.exit("usage: hardening_lab.py daemon --state-dir DIR [--nodes N] [--scenario S]")
