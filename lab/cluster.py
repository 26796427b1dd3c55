"""The lab's control plane: the real etcd, kube-apiserver, kube-controller-manager and
kube-scheduler of the Kubernetes release pinned in lab/pins.env, built by ``make lab`` into one
binary (``.build/lab/bin/kube-lab <component> [flags]``), each run as its own process on
loopback ports.

- Authentication: client certificates of the lab CA (components, nodes, the lab itself), a
  static token for the lab's administrator (``lab-admin`` in ``system:masters``: the user of
  the kubeconfig the collection is given), service account tokens (TokenRequest).
- Authorization: ``Node,RBAC``, with the NodeRestriction admission plugin: the node agents are
  held to what a kubelet may do.
- An audit log (``<state dir>/cluster/audit.log``, Metadata level, everything but the nodes'
  and the controllers' own requests): the request counts the tests and benchmarks use come
  from it, not from lab code.

``ControlPlane.start()`` fails with :class:`ControlPlaneError` naming the component and the end
of its log when a component exits or is not ready in time; nothing it started is left running.
"""
from __future__ import annotations

import ctypes
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

from lab.pins import KUBE_LAB, pins
from lab.pki import APISERVER_HOSTS, ClusterPKI, KeyPair

ADMIN_USER = "lab-admin"
# The lab daemon's own identity (scenario setup, faults, status): audited apart from lab-admin.
LAB_USER = "gpunode-lab"
SERVICE_CIDR = "10.96.0.0/16"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
PR_SET_PDEATHSIG = 1

AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        # the simulated kubelets (heartbeats, status) and the control plane's own traffic
        {"level": "None", "userGroups": ["system:nodes"]},
        {"level": "None", "users": ["system:kube-controller-manager", "system:kube-scheduler",
                                    "system:apiserver", LAB_USER,
                                    # the --api-only fleet's one light agent (lab/node/agent.py)
                                    "system:lab:light-kubelet"]},
        # the collection's least-privilege identity (docs/rbac.yaml) is a kube-system service
        # account: audited (the first matching rule wins), unlike the controllers' beside it
        {"level": "Metadata", "users": ["system:serviceaccount:kube-system:gpunode-bringup"]},
        {"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
        {"level": "None", "nonResourceURLs": ["/healthz*", "/readyz*", "/livez*"]},
        {"level": "Metadata"},
    ],
}


class ControlPlaneError(RuntimeError):
    """A component of the control plane could not be started (the message names it)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ControlPlaneError("port %d on 127.0.0.1 is in use (%s): choose another with --api-port, "
                                    "or stop what holds it" % (port, exc.strerror)) from None


def _die_with_parent() -> None:
    """Child side of Popen: the component dies with the lab daemon, even on SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Component:
    name: str
    argv: List[str]
    log_path: str
    process: Optional[subprocess.Popen] = None
    started_at: float = 0.0

    def start(self, env: Dict[str, str]) -> None:
        with open(self.log_path, "ab") as log, open(os.devnull, "rb") as devnull:
            self.process = subprocess.Popen(self.argv, stdin=devnull, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, close_fds=True, preexec_fn=_die_with_parent)
        self.started_at = time.time()

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def failure(self, why: str) -> ControlPlaneError:
        code = self.process.poll() if self.process is not None else None
        state = "exited with status %s" % code if code is not None else why
        return ControlPlaneError("lab control plane: %s %s; the end of %s:\n%s"
                                 % (self.name, state, self.log_path, tail(self.log_path)))

    def stop(self, timeout: float = 10.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@dataclass
class ControlPlane:
    """One lab cluster's control plane, its files under ``directory``."""

    directory: str
    api_port: Optional[int] = None
    start_timeout: float = 120.0
    kube_lab: str = KUBE_LAB
    components: Dict[str, Component] = field(default_factory=dict)
    url: str = ""
    admin_token: str = ""

    def __post_init__(self) -> None:
        self.directory = os.path.abspath(self.directory)
        self.pki = ClusterPKI(os.path.join(self.directory, "pki"))
        self._lab_context: Optional[ssl.SSLContext] = None

    def path(self, *names: str) -> str:
        return os.path.join(self.directory, *names)

    @property
    def audit_log(self) -> str:
        return self.path("audit.log")

    @property
    def ca_file(self) -> str:
        return self.pki.ca_cert_path

    # ---- start ------------------------------------------------------------------------------

    def start(self) -> "ControlPlane":
        if not os.access(self.kube_lab, os.X_OK):
            raise ControlPlaneError("lab control plane: %s is missing: run `make lab` (it builds Kubernetes %s "
                                    "from its Go modules, about 8 minutes the first time)"
                                    % (self.kube_lab, pins()["KUBERNETES_VERSION"]))
        if self.api_port:
            check_port_free(self.api_port)
        try:
            for sub in ("logs", "etcd"):
                os.makedirs(self.path(sub), exist_ok=True)
            self.pki.create()
        except OSError as exc:
            raise ControlPlaneError("lab control plane: cannot write its state in %s (%s): choose a writable "
                                    "state dir" % (self.directory, exc)) from None
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_all(self) -> None:
        deadline = time.time() + self.start_timeout
        etcd_client, etcd_peer = free_port(), free_port()
        api_port = self.api_port or free_port()
        self.url = "https://127.0.0.1:%d" % api_port
        self._write_files()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.directory}
        etcd_url = "http://127.0.0.1:%d" % etcd_client
        etcd = self._component("etcd", [
            "--name", "lab", "--data-dir", self.path("etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", "http://127.0.0.1:%d" % etcd_peer,
            "--initial-advertise-peer-urls", "http://127.0.0.1:%d" % etcd_peer,
            "--initial-cluster", "lab=http://127.0.0.1:%d" % etcd_peer,
            # a lab's data is thrown away with it: no fsync, so a slow disk does not slow the API
            "--unsafe-no-fsync", "--log-level", "warn", "--logger", "zap"])
        etcd.start(env)
        self._wait(etcd, deadline, lambda: _http_ok(etcd_url + "/health"))
        apiserver = self._component("kube-apiserver", self._apiserver_args(etcd_url, api_port))
        apiserver.start(env)
        self._wait(apiserver, deadline, lambda: self._api_ok("/readyz"))
        for name in ("kube-controller-manager", "kube-scheduler"):
            port = free_port()
            args = self._controller_args(name, port)
            component = self._component(name, args)
            component.start(env)
            component_port = port
            self._wait(component, deadline,
                       lambda p=component_port: _http_ok("https://127.0.0.1:%d/healthz" % p, insecure=True))
        # the service account controller is the one the lab's pods depend on (admission)
        self._wait(self.components["kube-controller-manager"], deadline,
                   lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"))

    def _component(self, name: str, args: List[str]) -> Component:
        component = Component(name, [self.kube_lab, name] + args, self.path("logs", name + ".log"))
        self.components[name] = component
        return component

    def _wait(self, component: Component, deadline: float, ready: Callable[[], bool]) -> None:
        while True:
            if not component.alive():
                raise component.failure("exited")
            if ready():
                return
            if time.time() > deadline:
                raise component.failure("was not ready after %.0fs" % self.start_timeout)
            time.sleep(0.1)

    def _write_files(self) -> None:
        self.admin_token = secrets.token_hex(24)
        with open(self.path("tokens.csv"), "w", encoding="utf-8") as handle:
            handle.write('%s,%s,%s,"system:masters"\n' % (self.admin_token, ADMIN_USER, ADMIN_USER))
        os.chmod(self.path("tokens.csv"), 0o600)
        with open(self.path("audit-policy.yaml"), "w", encoding="utf-8") as handle:
            yaml.safe_dump(AUDIT_POLICY, handle, sort_keys=False)
        self.serving = self.pki.issue("apiserver", "kube-apiserver", server_hosts=APISERVER_HOSTS, client=False)
        self.kubelet_client = self.pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                                             ("system:masters",))
        self.kubelet_serving = self.pki.issue("kubelet-serving", "kubelet", server_hosts=("127.0.0.1",),
                                              client=False)
        # the aggregation layer's front proxy identity (the controllers read its CA from the
        # extension-apiserver-authentication ConfigMap, as on a kubeadm cluster)
        self.front_proxy = self.pki.issue("front-proxy-client", "front-proxy-client")
        for name, user in (("kube-controller-manager", "system:kube-controller-manager"),
                           ("kube-scheduler", "system:kube-scheduler"),
                           ("lab", LAB_USER)):
            groups = ("system:masters",) if name == "lab" else ()
            pair = self.pki.issue(name, user, groups)
            self.write_kubeconfig(self.path(name + ".kubeconfig"), cert=pair)

    def _apiserver_args(self, etcd_url: str, port: int) -> List[str]:
        pki = self.pki
        return [
            "--etcd-servers", etcd_url,
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1", "--secure-port", str(port),
            "--tls-cert-file", self.serving.cert, "--tls-private-key-file", self.serving.key,
            "--client-ca-file", pki.ca_cert_path, "--token-auth-file", self.path("tokens.csv"),
            "--authorization-mode", "Node,RBAC", "--enable-admission-plugins", "NodeRestriction",
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", pki.service_account_pub,
            "--service-account-signing-key-file", pki.service_account_key,
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--kubelet-client-certificate", self.kubelet_client.cert, "--kubelet-client-key", self.kubelet_client.key,
            "--kubelet-certificate-authority", pki.ca_cert_path,
            "--kubelet-preferred-address-types", "InternalIP",
            "--requestheader-client-ca-file", pki.ca_cert_path,
            "--requestheader-allowed-names", "front-proxy-client",
            "--requestheader-username-headers", "X-Remote-User", "--requestheader-group-headers", "X-Remote-Group",
            "--requestheader-extra-headers-prefix", "X-Remote-Extra-",
            "--proxy-client-cert-file", self.front_proxy.cert, "--proxy-client-key-file", self.front_proxy.key,
            "--audit-policy-file", self.path("audit-policy.yaml"), "--audit-log-path", self.audit_log,
            "--audit-log-format", "json", "--audit-log-maxsize", "200", "--audit-log-maxbackup", "1",
            # loopback is not a valid Endpoints address: the `kubernetes` Service gets none
            "--endpoint-reconciler-type", "none",
            "--allow-privileged=true", "--profiling=false",
            "--cert-dir", self.path("apiserver-certs"),
        ]

    def _controller_args(self, name: str, port: int) -> List[str]:
        kubeconfig = self.path(name + ".kubeconfig")
        args = [
            "--kubeconfig", kubeconfig,
            "--authentication-kubeconfig", kubeconfig, "--authorization-kubeconfig", kubeconfig,
            "--bind-address", "127.0.0.1", "--secure-port", str(port),
            "--cert-dir", self.path(name + "-certs"),
            "--leader-elect=false",
        ]
        if name == "kube-controller-manager":
            args += [
                "--use-service-account-credentials",
                "--service-account-private-key-file", self.pki.service_account_key,
                "--root-ca-file", self.pki.ca_cert_path,
                "--cluster-signing-cert-file", self.pki.ca_cert_path,
                "--cluster-signing-key-file", self.pki.path("ca.key"),
            ]
        return args

    # ---- clients ----------------------------------------------------------------------------

    def write_kubeconfig(self, path: str, token: Optional[str] = None, cert: Optional[KeyPair] = None,
                         user: str = "lab", server: Optional[str] = None) -> str:
        credentials: Dict[str, Any] = {}
        if token:
            credentials["token"] = token
        if cert:
            credentials.update({"client-certificate": cert.cert, "client-key": cert.key})
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "lab", "cluster": {"server": server or self.url,
                                                     "certificate-authority": self.ca_file}}],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": user}}],
            "current-context": "lab",
        }
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yaml.safe_dump(config, handle, sort_keys=False)
        os.replace(tmp, path)
        return path

    def admin_kubeconfig(self, path: str, server: Optional[str] = None) -> str:
        return self.write_kubeconfig(path, token=self.admin_token, user=ADMIN_USER, server=server)

    def ssl_context(self, cert: Optional[KeyPair] = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if cert is not None:
            context.load_cert_chain(cert.cert, cert.key)
        return context

    def _api_ok(self, path: str) -> bool:
        """A GET as the lab itself (its client certificate: not in the audit log)."""
        if self._lab_context is None:
            self._lab_context = self.ssl_context(KeyPair(self.pki.path("lab.crt"), self.pki.path("lab.key")))
        return _http_ok(self.url + path, context=self._lab_context)

    # ---- state ------------------------------------------------------------------------------

    def pids(self) -> Dict[str, int]:
        return {name: c.pid for name, c in self.components.items() if c.pid is not None}

    def dead(self) -> List[str]:
        """Components that have exited since they started."""
        return [name for name, c in self.components.items() if not c.alive()]

    def describe(self) -> Dict[str, Any]:
        return {
            "url": self.url,
            "version": pins()["KUBERNETES_VERSION"],
            "components": {name: {"pid": c.pid, "alive": c.alive(), "log": c.log_path}
                           for name, c in self.components.items()},
            "audit_log": self.audit_log,
            "ca": self.ca_file,
        }

    def stop(self) -> None:
        """Stop in reverse order: the controllers, the API server, then etcd."""
        for name in reversed(COMPONENTS):
            component = self.components.get(name)
            if component is not None:
                component.stop()


def _http_ok(url: str, headers: Optional[Dict[str, str]] = None, context: Optional[ssl.SSLContext] = None,
             insecure: bool = False) -> bool:
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # a component's self-signed healthz, on loopback
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class AuditLog:
    """The API server's audit log as a request counter: ``mark()`` now, ``counts()`` of what
    the API server logged since. The policy (AUDIT_POLICY) leaves out the nodes', the
    controllers' and the lab's own requests, so what is counted is the clients' (the
    collection's). The log rotates at 200 MB; a mark older than the rotation counts from the
    rotated file's start."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0

    def size(self) -> int:
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def mark(self) -> None:
        self.offset = self._settled_size()

    def _settled_size(self, settle_s: float = 0.15, timeout: float = 3.0) -> int:
        """The log's size once it has stopped growing for ``settle_s`` (the API server writes
        an event as the response completes, so a client may see its answer a moment before)."""
        deadline = time.monotonic() + timeout
        size = self.size()
        while time.monotonic() < deadline:
            time.sleep(settle_s)
            now = self.size()
            if now == size:
                break
            size = now
        return size

    def events(self) -> List[Dict[str, Any]]:
        end = self._settled_size()
        offset = self.offset if self.offset <= end else 0
        events: List[Dict[str, Any]] = []
        try:
            with open(self.path, "rb") as handle:
                handle.seek(offset)
                data = handle.read(end - offset)
        except OSError:
            return events
        for line in data.splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def counts(self, users: Optional[Tuple[str, ...]] = None) -> Dict[str, Any]:
        return request_counts(self.events(), users)


def request_counts(events: List[Dict[str, Any]], users: Optional[Tuple[str, ...]] = None) -> Dict[str, Any]:
    """Requests by verb and resource, writes and dry-run writes apart, from audit events."""
    writes = dry_run_writes = 0
    by_verb: Dict[str, Dict[str, int]] = {}
    write_requests: Dict[str, Dict[str, int]] = {}
    forbidden: List[Dict[str, Any]] = []
    seen: set = set()
    for event in events:
        user = (event.get("user") or {}).get("username", "")
        if users is not None and user not in users:
            continue
        # a long-running request (watch, pods/log) is logged at ResponseStarted and again at
        # ResponseComplete, with one auditID: one request
        if event.get("auditID") in seen:
            continue
        seen.add(event.get("auditID"))
        verb = event.get("verb", "")
        ref = event.get("objectRef") or {}
        resource = ref.get("resource") or event.get("requestURI", "").split("?")[0]
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        by_verb.setdefault(verb, {})
        by_verb[verb][resource] = by_verb[verb].get(resource, 0) + 1
        if (event.get("responseStatus") or {}).get("code") == 403:
            forbidden.append({"user": user, "verb": verb, "resource": resource, "namespace": ref.get("namespace"),
                              "name": ref.get("name"), "uri": event.get("requestURI", "")})
        if verb in ("create", "update", "patch", "delete", "deletecollection"):
            if "dryRun=All" in event.get("requestURI", ""):
                dry_run_writes += 1
            else:
                writes += 1
                per = write_requests.setdefault(verb, {})
                per[resource] = per.get(resource, 0) + 1
    return {"requests": by_verb, "writes": writes, "dry_run_writes": dry_run_writes, "write_requests": write_requests,
            "forbidden": forbidden, "total": sum(sum(v.values()) for v in by_verb.values())}
