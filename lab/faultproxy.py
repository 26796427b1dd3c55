"""A fault proxy in front of the lab's API server: what a flaky network or an overloaded API
server does to the collection's requests, on demand.

``python -m lab up --fault-proxy`` points the lab's kubeconfig at this proxy (TLS with the lab
CA's certificate for 127.0.0.1) instead of at kube-apiserver; it forwards every request
unchanged (bearer tokens included; watches stream) unless an armed fault matches it:

- ``429``: the API server's answer under API Priority and Fairness (``TooManyRequests``,
  ``Retry-After: 1``), without forwarding;
- ``500``: an ``InternalError`` Status, without forwarding;
- ``drop``: the connection closes without an answer;
- ``slow``: forwarded after ``delay_s`` seconds.

A fault matches a Kubernetes verb (``get``, ``list``, ``watch``, ``create``, ``update``,
``patch``, ``delete``, ``deletecollection``) and resource (``pods``, ``nodes``, ``leases``,
``pods/log``...) as the API server's own request info would name them, and fires ``count``
times (0: until cleared). What reached the API server is counted there (its audit log), so a
request the proxy answered itself is not a request the cluster saw.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiohttp import web

LOG = logging.getLogger("lab.faultproxy")

KINDS = ("429", "500", "drop", "slow")
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "content-length", "host"}


class FaultSpecError(ValueError):
    pass


@dataclass
class ApiFault:
    verb: str
    resource: str
    kind: str
    count: int = 1  # 0: until cleared
    delay_s: float = 1.0
    fired: int = 0

    @classmethod
    def from_dict(cls, spec: Dict[str, Any]) -> "ApiFault":
        verb = str(spec.get("verb", "")).lower()
        kind = str(spec.get("kind", ""))
        if verb not in VERBS:
            raise FaultSpecError("API fault: verb must be one of %s, got %r" % (", ".join(VERBS), verb))
        if kind not in KINDS:
            raise FaultSpecError("API fault: kind must be one of %s, got %r" % (", ".join(KINDS), kind))
        resource = str(spec.get("resource", ""))
        if not resource:
            raise FaultSpecError("API fault: resource is required (e.g. pods, nodes, leases, pods/log)")
        try:
            count = int(spec.get("count", 1))
            delay = float(spec.get("delay_s", 1.0))
        except (TypeError, ValueError):
            raise FaultSpecError("API fault: count must be an integer and delay_s a number") from None
        if count < 0 or delay < 0:
            raise FaultSpecError("API fault: count and delay_s must not be negative")
        return cls(verb, resource, kind, count, delay)

    def describe(self) -> Dict[str, Any]:
        return {"verb": self.verb, "resource": self.resource, "kind": self.kind, "count": self.count,
                "delay_s": self.delay_s, "fired": self.fired}


def request_info(method: str, path: str, query: Dict[str, List[str]]) -> Tuple[str, str]:
    """(verb, resource[/subresource]) of a request, as the API server's RequestInfoFactory."""
    parts = [p for p in path.split("/") if p]
    if not parts or parts[0] not in ("api", "apis"):
        return "", ""
    parts = parts[2:] if parts[0] == "api" else parts[3:]
    if parts[:1] == ["namespaces"] and len(parts) >= 3:
        parts = parts[2:]
    elif parts[:1] == ["namespaces"]:
        parts = ["namespaces"] + parts[1:2]
    if not parts:
        return "", ""
    resource = parts[0]
    name = parts[1] if len(parts) > 1 else ""
    if len(parts) > 2:
        resource += "/" + parts[2]
    watching = query.get("watch", [""])[0] in ("1", "true")
    method = method.upper()
    if method == "GET":
        verb = "watch" if watching else ("get" if name else "list")
    elif method == "POST":
        verb = "create"
    elif method == "PUT":
        verb = "update"
    elif method == "PATCH":
        verb = "patch"
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = method.lower()
    return verb, resource


def status_body(code: int, reason: str, message: str, retry_after: Optional[int] = None) -> bytes:
    body: Dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": reason, "code": code}
    if retry_after is not None:
        body["details"] = {"retryAfterSeconds": retry_after}
    return json.dumps(body).encode()


@dataclass
class FaultProxy:
    upstream: str
    ca_file: str
    serving_cert: Tuple[str, str]
    faults: List[ApiFault] = field(default_factory=list)
    url: str = ""
    # requests on the wire (all that came in) and those the proxy answered itself, by
    # "verb resource" (what reached the API server is in its audit log)
    seen: Dict[str, int] = field(default_factory=dict)
    answered: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._runner: Optional[web.AppRunner] = None
        self._session: Optional[aiohttp.ClientSession] = None

    # ---- faults (any thread) --------------------------------------------------------------

    def add(self, specs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        faults = [ApiFault.from_dict(s) for s in specs]
        with self._lock:
            self.faults.extend(faults)
        return [f.describe() for f in faults]

    def clear(self) -> None:
        with self._lock:
            self.faults = []

    def reset_counts(self) -> None:
        with self._lock:
            self.seen = {}
            self.answered = {}

    def counts(self) -> Dict[str, Dict[str, int]]:
        with self._lock:
            return {"seen": dict(self.seen), "answered": dict(self.answered)}

    def describe(self) -> List[Dict[str, Any]]:
        with self._lock:
            return [f.describe() for f in self.faults]

    def _take(self, verb: str, resource: str) -> Optional[ApiFault]:
        with self._lock:
            for fault in self.faults:
                if fault.verb == verb and fault.resource == resource and (fault.count == 0 or fault.fired < fault.count):
                    fault.fired += 1
                    return fault
        return None

    # ---- serving (the fleet's loop) ---------------------------------------------------------

    async def start(self) -> str:
        client_context = ssl.create_default_context(cafile=self.ca_file)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context, limit=64),
                                              auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*self.serving_cert)
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        server = site._server
        assert server is not None
        port = int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        self.url = "https://127.0.0.1:%d" % port
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        split = urlsplit(str(request.rel_url))
        verb, resource = request_info(request.method, split.path, parse_qs(split.query))
        key = "%s %s" % (verb, resource) if verb else split.path
        with self._lock:
            self.seen[key] = self.seen.get(key, 0) + 1
        fault = self._take(verb, resource) if verb else None
        if fault is not None and fault.kind != "slow":
            with self._lock:
                self.answered[key] = self.answered.get(key, 0) + 1
        if fault is not None:
            if fault.kind == "429":
                return web.Response(status=429, body=status_body(429, "TooManyRequests",
                                                                 "Too many requests, please try again later.", 1),
                                    headers={"Retry-After": "1"}, content_type="application/json")
            if fault.kind == "500":
                return web.Response(status=500, body=status_body(500, "InternalError",
                                                                 "Internal error occurred: lab fault proxy: %s %s"
                                                                 % (verb, resource)), content_type="application/json")
            if fault.kind == "drop":
                await request.read()
                transport = request.transport
                if transport is not None:
                    transport.abort()
                raise asyncio.CancelledError()
            await asyncio.sleep(fault.delay_s)
        return await self.forward(request)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        body = await request.read()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        try:
            # skip_auto_headers: a body without a Content-Type (the kubernetes client's DELETE
            # options) goes on without one, not as aiohttp's application/octet-stream (a 415)
            upstream = await self._session.request(request.method, self.upstream + str(request.rel_url),
                                                   headers=headers, data=body or None, timeout=timeout,
                                                   allow_redirects=False, skip_auto_headers=("Content-Type",))
        except aiohttp.ClientError as exc:
            return web.Response(status=502, text="lab fault proxy: upstream: %s" % exc)
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_HEADERS:
                    response.headers.add(key, value)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            upstream.release()
