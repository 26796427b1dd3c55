"""The lab's Kubernetes API server: HTTPS on loopback, bearer-token auth, the store, the
DaemonSet controller, and a side channel (``/lab/...``) for request counters and fault injection."""
from __future__ import annotations

import base64
import collections
import ipaddress
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

import yaml

from . import rbac as rbac_mod
from . import resources, tables
from .controller import DaemonSetController
from .resources import BY_PATH, Resource
from .store import ApiError, Store, bad_request, typed
from .tls import make_certs
from .workloads import WorkloadController, is_daemon_pod

LOG = logging.getLogger("lab.apiserver")
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
FAULT_KINDS = ("429", "500", "slow", "drop")
DEFAULT_WATCH_TIMEOUT_S = 1800.0
PATCH_TYPES = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/apply-patch+yaml": "apply",
    "application/apply-patch+cbor": "unsupported",
}
STATUS_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
                  410: "Gone", 422: "Invalid", 429: "TooManyRequests", 500: "InternalError",
                  503: "ServiceUnavailable", 504: "Timeout"}
NOT_FOUND_PATH = ApiError(404, "NotFound", "the server could not find the requested resource", {})
ADMIN = rbac_mod.Identity("kubernetes-admin")
FORBIDDEN_LOG_SIZE = 200

try:
    _YAML_LOADER: Any = yaml.CSafeLoader
except AttributeError:  # PyYAML without libyaml
    _YAML_LOADER = yaml.SafeLoader


def _truthy(value: Optional[str]) -> bool:
    return (value or "").lower() in ("true", "1")


class Fault:
    def __init__(self, verb: Optional[str], resource: Optional[str], kind: str, count: int, delay_s: float) -> None:
        self.verb, self.resource, self.kind = verb or "*", resource or "*", kind
        self.remaining = count  # <= 0: until cleared
        self.delay_s = delay_s
        self.hits = 0

    def matches(self, verb: str, resource: str) -> bool:
        return (self.verb in ("*", verb)) and (self.resource in ("*", resource, resource.split("/", 1)[0]))

    def as_dict(self) -> dict:
        return {"verb": self.verb, "resource": self.resource, "kind": self.kind,
                "remaining": self.remaining if self.remaining > 0 else None, "delay_s": self.delay_s,
                "hits": self.hits}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, addr: Tuple[str, int], lab: "LabApiServer", ctx: ssl.SSLContext) -> None:
        self.lab = lab
        self.ssl_context = ctx
        self.open_sockets: set = set()
        self.sockets_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        request.settimeout(30)
        try:  # small responses go out at once (no Nagle / delayed-ACK stalls)
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        try:
            conn = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        conn.settimeout(None)
        with self.sockets_lock:
            self.open_sockets.add(conn)
        try:
            self.RequestHandlerClass(conn, client_address, self)
        except (ssl.SSLError, OSError):
            pass
        finally:
            with self.sockets_lock:
                self.open_sockets.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def close_all(self) -> None:
        with self.sockets_lock:
            conns = list(self.open_sockets)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lab-kube-apiserver"
    sys_version = ""
    server: _HTTPServer

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet; debug logging only
        LOG.debug("%s " + fmt, self.client_address[0], *args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # --- plumbing ---------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, code: int, body: bytes, content_type: str = "application/json",
              headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache, private")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self._headers_buffer.append(b"\r\n" + body)  # headers and body in one write
        self.flush_headers()

    def _send_json(self, code: int, obj: Any, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(code, json.dumps(obj, separators=(",", ":")).encode(), headers=headers)

    def _send_error(self, err: ApiError) -> None:
        self._send_json(err.code, err.body(), err.headers)

    def _json_body(self, raw: bytes, yaml_ok: bool = False) -> Any:
        if not raw:
            raise bad_request("the request body is empty")
        try:
            return json.loads(raw)
        except ValueError:
            if yaml_ok:
                try:
                    return yaml.load(raw, Loader=_YAML_LOADER)
                except yaml.YAMLError as exc:
                    raise bad_request("error decoding YAML: %s" % exc)
            raise bad_request("the body of the request was in an unknown format - accepted media types include: "
                              "application/json, application/yaml")

    # --- dispatch ---------------------------------------------------------------------------
    def _handle(self, method: str) -> None:
        lab = self.server.lab
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            if path == "/lab" or path.startswith("/lab/"):
                self._side_channel(method, path)
                return
            auth = self.headers.get("Authorization", "")
            public = method == "GET" and path in ("/version", "/healthz", "/livez", "/readyz")
            ident = lab._identity(auth[7:].strip()) if auth.startswith("Bearer ") else None
            if not public and ident is None:
                raw = self._read_body()  # keep the connection usable
                del raw
                raise ApiError(401, "Unauthorized", "Unauthorized")
            route = self._route(path)
            if route is None:
                self._nonresource(method, path)  # discovery: every authenticated user (system:discovery)
                return
            res, ns, name, sub = route
            verb = self._verb(method, name, query)
            counter_res = res.plural + ("/" + sub if sub else "")
            if ident is not None and not ident.admin:
                self._authorize(ident, verb, res, ns, name, sub, query)
            # a dry-run write (check mode's server-side dry run) changes nothing: counted apart
            lab._count(("dryrun-" + verb) if query.get("dryRun") == "All" and verb in WRITE_VERBS else verb,
                       counter_res)
            raw = self._read_body()
            fault = lab._take_fault(verb, counter_res)
            if fault is not None:
                if fault.kind == "drop":
                    self.close_connection = True
                    return
                if fault.kind == "slow":
                    time.sleep(fault.delay_s)
                else:
                    code = int(fault.kind)
                    if code == 429:
                        raise ApiError(429, "TooManyRequests", "Too many requests, please try again later.",
                                       {"retryAfterSeconds": 1}, {"Retry-After": "1"})
                    raise ApiError(code, STATUS_REASONS.get(code, "InternalError"),
                                   "Internal error occurred: injected by the lab (fault %s on %s %s)"
                                   % (fault.kind, verb, counter_res) if code >= 500 else
                                   "injected by the lab (fault %s on %s %s)" % (fault.kind, verb, counter_res))
            self._resource(method, verb, res, ns, name, sub, query, raw)
        except ApiError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, socket.timeout):
            self.close_connection = True
        except Exception as exc:  # pragma: no cover - a bug in the lab; answered like the real server
            LOG.exception("lab API server: %s %s failed", method, self.path)
            self._send_error(ApiError(500, "InternalError", "Internal error occurred: %s" % exc))

    @staticmethod
    def _route(path: str) -> Optional[Tuple[Resource, Optional[str], Optional[str], Optional[str]]]:
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 3 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 4 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        ns = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            ns, rest = rest[1], rest[2:]
        res = BY_PATH.get((group, version, rest[0]))
        if res is None or len(rest) > 3:
            raise NOT_FOUND_PATH
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if (ns and not res.namespaced) or (sub and sub not in res.subresources):
            raise NOT_FOUND_PATH
        if name and res.namespaced and not ns:
            raise NOT_FOUND_PATH
        return res, ns, name, sub

    def _authorize(self, ident: rbac_mod.Identity, verb: str, res: Resource, ns: Optional[str], name: Optional[str],
                   sub: Optional[str], query: Dict[str, str]) -> None:
        """RBAC: the request's attributes as the real request-info has them, checked against the
        token's rules; a denial is answered 403 with the real Status body."""
        authz_name = name or ""
        if not authz_name and verb in ("list", "watch"):
            authz_name = rbac_mod.name_from_field_selector(query.get("fieldSelector"))
        authz_ns = (name if res.plural == "namespaces" and name else ns) or ""
        if ident.allows(verb, res.group, res.plural, sub or "", authz_name, authz_ns):
            return
        self._read_body()  # keep the connection usable
        err = rbac_mod.forbidden(ident.user, verb, res.group, res.plural, res.qualified, sub or "", authz_name,
                                 authz_ns)
        self.server.lab._count_forbidden(ident.user, verb, res.plural + ("/" + sub if sub else ""), authz_ns,
                                         authz_name, err.message)
        raise err

    @staticmethod
    def _verb(method: str, name: Optional[str], query: Dict[str, str]) -> str:
        if method == "GET":
            if name:
                return "get"
            return "watch" if _truthy(query.get("watch")) else "list"
        if method == "POST":
            return "create"
        if method == "PUT":
            return "update"
        if method == "PATCH":
            return "patch"
        return "delete" if name else "deletecollection"

    def _nonresource(self, method: str, path: str) -> None:
        lab = self.server.lab
        lab._count_nonresource(path)
        if method != "GET":
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested "
                                                    "resource", {})
        parts = [p for p in path.split("/") if p]
        doc: Any = None
        if path == "/version":
            doc = resources.SERVER_VERSION
        elif path in ("/healthz", "/livez", "/readyz"):
            self._send(200, b"ok", "text/plain; charset=utf-8")
            return
        elif path == "/api":
            doc = resources.api_versions("%s:%d" % (lab.host, lab.port))
        elif path == "/apis":
            doc = resources.api_group_list()
        elif len(parts) == 2 and parts[0] == "api":
            doc = resources.api_resource_list("", parts[1])
        elif len(parts) == 2 and parts[0] == "apis":
            doc = resources.api_group(parts[1])
        elif len(parts) == 3 and parts[0] == "apis":
            doc = resources.api_resource_list(parts[1], parts[2])
        elif path == "/openapi/v3":
            doc = resources.openapi_v3_root()
        elif len(parts) == 4 and parts[:2] == ["openapi", "v3"] and parts[2] == "api":
            doc = resources.openapi_v3_doc("", parts[3])
        elif len(parts) == 5 and parts[:3] == ["openapi", "v3", "apis"]:
            doc = resources.openapi_v3_doc(parts[3], parts[4])
        if doc is None:
            raise NOT_FOUND_PATH
        self._send_json(200, doc)

    # --- resources ----------------------------------------------------------------------------
    def _manager(self, query: Dict[str, str]) -> str:
        return query.get("fieldManager") or (self.headers.get("User-Agent") or "unknown").split("/")[0][:128]

    def _wants_table(self) -> bool:
        return "as=Table" in (self.headers.get("Accept") or "")

    def _resource(self, method: str, verb: str, res: Resource, ns: Optional[str], name: Optional[str],
                  sub: Optional[str], query: Dict[str, str], raw: bytes) -> None:
        store = self.server.lab.store
        dry_run = query.get("dryRun") == "All"
        if verb == "list":
            limit = int(query["limit"]) if query.get("limit", "").isdigit() else None
            items, rv, token, remaining = store.list(res, ns, query.get("labelSelector"),
                                                     query.get("fieldSelector"), limit, query.get("continue"))
            if self._wants_table():
                self._send_json(200, tables.table(res, items, str(rv), query.get("includeObject", "Metadata"),
                                                  continue_token=token))
                return
            meta: Dict[str, Any] = {"resourceVersion": str(rv)}
            if token:
                meta["continue"] = token
                meta["remainingItemCount"] = remaining
            if self.server.lab.list_item_typemeta:
                items = [typed(res, o) for o in items]
            self._send_json(200, {"kind": res.list_kind, "apiVersion": res.api_version, "metadata": meta,
                                  "items": items})
            return
        if verb == "watch":
            self._watch(res, ns, query)
            return
        if verb == "get":
            if sub == "log":
                self._log(res, ns, name, query)  # type: ignore[arg-type]
                return
            obj = store.get(res, ns, name)  # type: ignore[arg-type]
            if self._wants_table():
                self._send_json(200, tables.table(res, [obj], obj["metadata"].get("resourceVersion", ""),
                                                  query.get("includeObject", "Metadata")))
            else:
                self._send_json(200, typed(res, obj))
            return
        if sub == "log":
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested "
                                                    "resource", {})
        manager = self._manager(query)
        if verb == "create":
            if name:
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested "
                                                        "resource", {})
            obj = store.create(res, ns, self._json_body(raw), manager=manager, dry_run=dry_run)
            self._send_json(201, obj)
        elif verb == "update":
            obj = store.replace(res, ns, name, self._json_body(raw), manager=manager,  # type: ignore[arg-type]
                                subresource=sub, dry_run=dry_run)
            self._send_json(200, obj)
        elif verb == "patch":
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            ptype = PATCH_TYPES.get(ctype)
            if ptype is None or ptype == "unsupported":
                raise ApiError(415, "UnsupportedMediaType",
                               "the body of the request was in an unknown format - accepted media types include: "
                               "application/json-patch+json, application/merge-patch+json, "
                               "application/apply-patch+yaml, application/strategic-merge-patch+json", {})
            body = self._json_body(raw, yaml_ok=(ptype == "apply"))
            if ptype == "apply":
                if not query.get("fieldManager"):
                    raise bad_request("PATCH, application/apply-patch+yaml: fieldManager is required for apply "
                                      "requests")
                exists = store.get_raw(res, ns, name) is not None  # type: ignore[arg-type]
            obj = store.patch(res, ns, name, ptype, body, manager=manager, subresource=sub,  # type: ignore[arg-type]
                              dry_run=dry_run, force=_truthy(query.get("force")))
            self._send_json(201 if ptype == "apply" and not exists else 200, obj)
        elif verb == "delete":
            opts = self._json_body(raw) if raw.strip() else {}
            if not isinstance(opts, dict):
                opts = {}
            dry_run = dry_run or "All" in (opts.get("dryRun") or [])
            obj = store.delete(res, ns, name, dry_run=dry_run,  # type: ignore[arg-type]
                               preconditions=opts.get("preconditions"))
            if res.plural == "pods":
                self._send_json(200, obj)
            else:
                details = {"name": name}
                if res.group:
                    details["group"] = res.group
                details.update(kind=res.plural, uid=obj["metadata"].get("uid"))
                self._send_json(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                      "details": details})
        elif verb == "deletecollection":
            items, rv, _t, _r = store.list(res, ns, query.get("labelSelector"), query.get("fieldSelector"))
            deleted = []
            for o in items:
                try:
                    deleted.append(store.delete(res, o["metadata"].get("namespace"), o["metadata"]["name"],
                                                dry_run=dry_run))
                except ApiError:
                    pass
            self._send_json(200, {"kind": res.list_kind, "apiVersion": res.api_version,
                                  "metadata": {"resourceVersion": str(store.resource_version)},
                                  "items": [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")}
                                            for o in deleted]})

    def _log(self, res: Resource, ns: Optional[str], name: str, query: Dict[str, str]) -> None:
        lab = self.server.lab
        pod = lab.store.get(res, ns, name)
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        container = query.get("container")
        if not container:
            if len(containers) != 1:
                raise bad_request("a container name must be specified for pod %s, choose one of: [%s]"
                                  % (name, " ".join(containers)))
            container = containers[0]
        elif container not in containers:
            raise bad_request("container %s is not valid for pod %s" % (container, name))
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") == container:
                waiting = (cs.get("state") or {}).get("waiting")
                if waiting and not cs.get("restartCount") and not (cs.get("lastState") or {}).get("terminated"):
                    raise bad_request('container "%s" in pod "%s" is waiting to start: %s'
                                      % (container, name, waiting.get("reason") or "ContainerCreating"))
        tail = None
        if query.get("tailLines", "").lstrip("-").isdigit():
            tail = int(query["tailLines"])
        node = (pod.get("spec") or {}).get("nodeName")
        text = ""
        if lab.workloads.enabled and not is_daemon_pod(pod):
            text = lab.workloads.pod_log(ns or "default", name, pod["metadata"].get("uid"))
        elif lab.runtime is not None and node:
            try:
                text = lab.runtime.pod_log(node, name, tail) or ""
            except Exception as exc:
                raise ApiError(500, "InternalError", "Internal error occurred: reading the log: %s" % exc)
        if tail is not None and tail >= 0:
            lines = text.splitlines(True)
            text = "".join(lines[-tail:]) if tail else ""
        data = text.encode()
        if query.get("limitBytes", "").isdigit():
            data = data[:int(query["limitBytes"])]
        self._send(200, data, "text/plain")

    def _watch(self, res: Resource, ns: Optional[str], query: Dict[str, str]) -> None:
        lab = self.server.lab
        try:
            timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT_S)
        except ValueError:
            raise bad_request("invalid timeoutSeconds")
        w = lab.store.watch(res, ns, query.get("labelSelector"), query.get("fieldSelector"),
                            query.get("resourceVersion"))
        as_table = self._wants_table()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache, private")
            self.end_headers()
            self.wfile.flush()
            deadline = time.monotonic() + timeout
            first = True
            while not lab._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                events = w.get(min(remaining, 0.5))
                for etype, obj in events:
                    if as_table and etype != "ERROR":
                        obj = tables.table(res, [obj], obj["metadata"].get("resourceVersion", ""),
                                           query.get("includeObject", "Metadata"), with_columns=first)
                        first = False
                    data = json.dumps({"type": etype, "object": obj}, separators=(",", ":")).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                if w.closed and not events:
                    break
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            self.close_connection = True
        finally:
            w.close()

    # --- side channel -------------------------------------------------------------------------
    def _side_channel(self, method: str, path: str) -> None:
        lab = self.server.lab
        raw = self._read_body()
        try:
            loopback = ipaddress.ip_address(self.client_address[0].split("%")[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ApiError(403, "Forbidden", "the lab side channel answers loopback clients only", {})
        if path == "/lab/counters" and method == "GET":
            self._send_json(200, lab.counters_document())
        elif path == "/lab/counters/reset" and method == "POST":
            lab.reset_counters()
            self._send_json(200, lab.counters_document())
        elif path == "/lab/faults" and method == "GET":
            self._send_json(200, {"faults": lab.faults()})
        elif path == "/lab/faults" and method == "POST":
            spec = self._json_body(raw)
            specs = spec if isinstance(spec, list) else [spec]
            try:
                wanted = ("verb", "resource", "kind", "count", "delay_s")
                for s in specs:
                    lab.add_fault(**{k: v for k, v in s.items() if k in wanted})
            except (TypeError, ValueError, AttributeError) as exc:
                raise bad_request("invalid fault: %s" % exc)
            self._send_json(201, {"faults": lab.faults()})
        elif path == "/lab/faults" and method == "DELETE":
            lab.clear_faults()
            self._send_json(200, {"faults": []})
        else:
            raise NOT_FOUND_PATH


class LabApiServer:
    """An in-process Kubernetes API server for the lab.

    ``LabApiServer(state_dir, runtime=None, host="127.0.0.1", port=0, token=None,
    list_item_typemeta=False, rbac=None, workloads=False)``; ``start()`` makes the certificates
    under ``state_dir`` and starts serving; ``url``; ``store`` (ClusterHooks);
    ``write_kubeconfig(path, token=None)``; ``stop()``. Also a context manager.

    ``rbac``: more bearer tokens, ``{token: rules}`` or ``{token: {"user": ..., "rules": [...]}}``
    (see :meth:`add_token`). ``workloads``: schedule and run ordinary pods (see workloads.py).
    """

    def __init__(self, state_dir: str, runtime: Any = None, host: str = "127.0.0.1", port: int = 0,
                 token: Optional[str] = None, list_item_typemeta: bool = False,
                 rbac: Optional[Dict[str, Any]] = None, workloads: bool = False) -> None:
        self.state_dir = state_dir
        self.runtime = runtime
        self.host = host
        self.port = port
        self.token = token or secrets.token_urlsafe(24)
        self.tokens = {self.token}  # accepted tokens; one without an identity is an admin token
        self._identities: Dict[str, rbac_mod.Identity] = {}
        # The real server omits apiVersion/kind on list items; True adds them (not faithful).
        self.list_item_typemeta = list_item_typemeta
        self.store = Store(runtime)
        self.controller = DaemonSetController(self.store, runtime)
        self.workloads = WorkloadController(self.store, runtime, enabled=workloads)
        self.ca_file = self.cert_file = self.key_file = ""
        self._httpd: Optional[_HTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._lock = threading.Lock()
        self._counts: Dict[Tuple[str, str], int] = collections.Counter()
        self._nonresource: Dict[str, int] = collections.Counter()
        self._faults: List[Fault] = []
        self._forbidden: Dict[Tuple[str, str], int] = collections.Counter()
        self._forbidden_log: collections.deque = collections.deque(maxlen=FORBIDDEN_LOG_SIZE)
        for tok, spec in (rbac or {}).items():
            if isinstance(spec, dict):
                self.add_token(tok, spec.get("rules"), spec.get("user"))
            else:
                self.add_token(tok, spec)

    def attach_runtime(self, runtime: Any) -> None:
        """Set the node runtime after construction (it usually needs ``store`` first); call
        before ``start()``."""
        self.runtime = self.store.runtime = self.controller.runtime = self.workloads.runtime = runtime

    def enable_workloads(self, enabled: bool = True) -> None:
        """Switch the scheduler and kubelet stand-in for ordinary pods on or off (any time)."""
        self.workloads.set_enabled(enabled)

    # --- tokens and RBAC ----------------------------------------------------------------------
    def add_token(self, token: Optional[str] = None, rules: Optional[List[Dict[str, Any]]] = None,
                  user: Optional[str] = None) -> str:
        """Accept another bearer token and return it (a random one when ``token`` is None).
        ``rules`` None: an admin token (everything allowed); a list: only what these rules allow
        (PolicyRule shape: apiGroups, resources, verbs, resourceNames, plus ``namespace`` for a
        rule that applies in one namespace only); ``user``: the user name 403 messages show
        (default ``lab-user``). Raises ValueError on a malformed rule."""
        token = token or secrets.token_urlsafe(24)
        if rules is None:
            self._identities.pop(token, None)
        else:
            self._identities[token] = rbac_mod.Identity(user or "lab-user", rules)
        self.tokens.add(token)
        return token

    def add_service_account_token(self, service_account: str, rbac_yaml: Optional[str] = None,
                                  rules: Optional[List[Dict[str, Any]]] = None, token: Optional[str] = None) -> str:
        """A token for ServiceAccount ``namespace:name`` (user ``system:serviceaccount:ns:name``)
        with the rules an RBAC manifest binds to it (``rbac_yaml``) and/or ``rules``."""
        bound = list(rules or [])
        if rbac_yaml is not None:
            bound += rbac_mod.rules_from_rbac_yaml(rbac_yaml, service_account)
        return self.add_token(token, bound, rbac_mod.service_account_user(service_account))

    def remove_token(self, token: str) -> None:
        self.tokens.discard(token)
        self._identities.pop(token, None)

    def token_rules(self, token: str) -> Optional[List[Dict[str, Any]]]:
        """The rules of a token (None: admin)."""
        ident = self._identities.get(token)
        return None if ident is None else list(ident.rule_dicts or [])

    def _identity(self, token: str) -> Optional[rbac_mod.Identity]:
        if token not in self.tokens:
            return None
        return self._identities.get(token, ADMIN)

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "LabApiServer":
        os.makedirs(self.state_dir, exist_ok=True)
        self.ca_file, self.cert_file, self.key_file = make_certs(os.path.join(self.state_dir, "pki"))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        cls = _HTTPServer6 if ":" in self.host else _HTTPServer
        self._httpd = cls((self.host, self.port), self, ctx)
        self.port = self._httpd.server_address[1]
        self._stopping = False
        self.controller.start()
        self.workloads.start()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="lab-apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        if self._httpd is not None:
            self._httpd.shutdown()
            self.store.close_watchers()
            self._httpd.close_all()
            self._httpd.server_close()
            self._httpd = None
        self.controller.stop()
        self.workloads.stop()

    def __enter__(self) -> "LabApiServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "https://%s:%d" % (host, self.port)

    def write_kubeconfig(self, path: str, token: Optional[str] = None, context: str = "lab",
                         namespace: Optional[str] = None) -> str:
        with open(self.ca_file, "rb") as fh:
            ca = base64.b64encode(fh.read()).decode()
        ctx: Dict[str, Any] = {"cluster": "lab", "user": "lab-admin"}
        if namespace:
            ctx["namespace"] = namespace
        doc = {"apiVersion": "v1", "kind": "Config", "preferences": {},
               "clusters": [{"name": "lab", "cluster": {"server": self.url, "certificate-authority-data": ca}}],
               "users": [{"name": "lab-admin", "user": {"token": token if token is not None else self.token}}],
               "contexts": [{"name": context, "context": ctx}], "current-context": context}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            yaml.safe_dump(doc, fh, default_flow_style=False)
        os.chmod(path, 0o600)
        return path

    # --- counters -----------------------------------------------------------------------------
    def _count(self, verb: str, resource: str) -> None:
        with self._lock:
            self._counts[(verb, resource)] += 1

    def _count_nonresource(self, path: str) -> None:
        with self._lock:
            self._nonresource[path] += 1

    def counters(self) -> Dict[Tuple[str, str], int]:
        """Requests per (verb, resource) since the last reset; resource is e.g. ``pods`` or ``pods/log``."""
        with self._lock:
            return dict(self._counts)

    def count(self, verb: str, resource: str) -> int:
        with self._lock:
            return self._counts.get((verb, resource), 0)

    @property
    def write_count(self) -> int:
        """Write requests (create, update, patch, delete, deletecollection) since the last reset,
        dry runs (``?dryRun=All``) excluded: those are counted under ``dryrun-<verb>``."""
        with self._lock:
            return sum(n for (verb, _r), n in self._counts.items() if verb in WRITE_VERBS)

    def _count_forbidden(self, user: str, verb: str, resource: str, namespace: str, name: str,
                         message: str) -> None:
        with self._lock:
            self._forbidden[(verb, resource)] += 1
            self._forbidden_log.append({"user": user, "verb": verb, "resource": resource, "namespace": namespace,
                                        "name": name, "message": message})

    def forbidden_counts(self) -> Dict[Tuple[str, str], int]:
        """Requests denied by RBAC (403) per (verb, resource) since the last reset."""
        with self._lock:
            return dict(self._forbidden)

    def forbidden_count(self, verb: str, resource: str) -> int:
        with self._lock:
            return self._forbidden.get((verb, resource), 0)

    def forbidden_requests(self) -> List[dict]:
        """The last denied requests (at most 200): user, verb, resource, namespace, name, message."""
        with self._lock:
            return [dict(d) for d in self._forbidden_log]

    def reset_counters(self) -> None:
        with self._lock:
            self._counts.clear()
            self._nonresource.clear()
            self._forbidden.clear()
            self._forbidden_log.clear()

    def counters_document(self) -> dict:
        with self._lock:
            counts = dict(self._counts)
            nonres = dict(self._nonresource)
            denied = dict(self._forbidden)
            denied_log = [dict(d) for d in self._forbidden_log]
        by_verb: Dict[str, Dict[str, int]] = {}
        for (verb, res), n in sorted(counts.items()):
            by_verb.setdefault(verb, {})[res] = n
        forbidden: Dict[str, Dict[str, int]] = {}
        for (verb, res), n in sorted(denied.items()):
            forbidden.setdefault(verb, {})[res] = n
        return {"requests": by_verb, "total": sum(counts.values()),
                "writes": sum(n for (verb, _r), n in counts.items() if verb in WRITE_VERBS),
                "dryRunWrites": sum(n for (verb, _r), n in counts.items() if verb.startswith("dryrun-")),
                "nonResource": nonres, "forbidden": forbidden, "forbiddenRequests": denied_log,
                "resourceVersion": self.store.resource_version}

    # --- faults -------------------------------------------------------------------------------
    def add_fault(self, verb: Optional[str] = None, resource: Optional[str] = None, kind: str = "500",
                  count: Optional[int] = 1, delay_s: float = 1.0) -> None:
        """Make the next ``count`` matching requests fail (``count`` <= 0: until cleared).
        ``kind``: "429" (with Retry-After: 1), "500" (or another HTTP status code), "slow"
        (answer after ``delay_s``), "drop" (close the connection without an answer)."""
        kind = str(kind)
        if kind not in FAULT_KINDS and not (kind.isdigit() and 400 <= int(kind) <= 599):
            raise ValueError("kind must be one of %s or an HTTP error code" % ", ".join(FAULT_KINDS))
        if verb not in (None, "*") and verb not in VERBS:
            raise ValueError("verb must be one of %s" % ", ".join(VERBS))
        with self._lock:
            self._faults.append(Fault(verb, resource, kind, 1 if count is None else int(count), float(delay_s)))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def faults(self) -> List[dict]:
        with self._lock:
            return [f.as_dict() for f in self._faults]

    def _take_fault(self, verb: str, resource: str) -> Optional[Fault]:
        with self._lock:
            for f in self._faults:
                if f.matches(verb, resource):
                    f.hits += 1
                    if f.remaining > 0:
                        f.remaining -= 1
                        if f.remaining == 0:
                            self._faults.remove(f)
                    return f
        return None
