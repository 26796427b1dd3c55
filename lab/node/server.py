"""The kubelet's HTTPS endpoint of one simulated node (its port is the Node's
``status.daemonEndpoints.kubeletEndpoint``): the API server proxies ``pods/log`` here, so
``kubectl logs`` and the kubernetes client read a container's output as on a real cluster.

- ``GET /containerLogs/{namespace}/{pod}/{container}`` with the kubelet's query parameters
  ``tailLines``, ``limitBytes``, ``timestamps``, ``sinceSeconds``, ``sinceTime``, ``previous``
  and ``follow``; the kubelet's answers for a pod it does not have (404) and a container that
  has not started or has no previous run (400).
- ``GET /healthz``: ``ok``.

TLS with the lab CA's kubelet serving certificate (for 127.0.0.1); clients must present a
certificate of the lab CA (the API server's kubelet client certificate).
"""
from __future__ import annotations

import asyncio
import os
import ssl
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Optional

from aiohttp import web

from .containers import parse_cri_log, read_cri_log, render_log, rfc3339_nano

if TYPE_CHECKING:  # pragma: no cover
    from .agent import SimNode


def _int(value: Optional[str]) -> Optional[int]:
    if value is None or value == "":
        return None
    return int(value)


def _bool(value: Optional[str]) -> bool:
    return (value or "").lower() in ("1", "true")


class KubeletServer:
    def __init__(self, node: "SimNode", ssl_context: ssl.SSLContext) -> None:
        self.node = node
        self.ssl_context = ssl_context
        self.port = 0
        self._runner: Optional[web.AppRunner] = None

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self.container_logs)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.node.address, 0, ssl_context=self.ssl_context)
        await site.start()
        server = site._server  # aiohttp keeps the bound sockets there
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def container_logs(self, request: web.Request) -> web.StreamResponse:
        namespace = request.match_info["namespace"]
        pod_name = request.match_info["pod"]
        container = request.match_info["container"]
        query = request.query
        try:
            tail = _int(query.get("tailLines"))
            limit = _int(query.get("limitBytes"))
            since_seconds = _int(query.get("sinceSeconds"))
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        worker = self.node.pod_worker(namespace, pod_name)
        if worker is None:
            return web.Response(status=404, text='pod "%s" does not exist' % pod_name)
        state = worker.containers.get(container) or worker.init_containers.get(container)
        if state is None:
            return web.Response(status=404, text='container "%s" not found in pod "%s"' % (container, pod_name))
        # instance N of a container writes N.log; restartCount is the latest instance, which a
        # waiting container in CrashLoopBackOff has run already
        if _bool(query.get("previous")):
            if state.last is None:
                return web.Response(status=400, text='previous terminated container "%s" in pod "%s" not found'
                                    % (container, pod_name))
            # lastState.terminated: the run before the running one, or the one a container waiting
            # in CrashLoopBackOff has just ended (the kubelet's lastState)
            path = worker.log_path(container, state.restart_count - (1 if state.state == "running" else 0))
        else:
            if state.state == "waiting" and state.last is None:
                # the kubelet's texts (pkg/kubelet/kubelet_pods.go validateContainerLogStatus)
                why = {"ErrImagePull": "image can't be pulled",
                       "ImagePullBackOff": "trying and failing to pull image"}.get(state.reason, state.reason)
                return web.Response(status=400, text='container "%s" in pod "%s" is waiting to start: %s'
                                    % (container, pod_name, why))
            path = worker.log_path(container, state.restart_count)
        since = query.get("sinceTime")
        if since_seconds is not None:
            since = rfc3339_nano(datetime.now(timezone.utc) - timedelta(seconds=since_seconds))
        timestamps = _bool(query.get("timestamps"))
        body = render_log(read_cri_log(path), tail_lines=tail, limit_bytes=limit, timestamps=timestamps, since=since)
        if not _bool(query.get("follow")):
            return web.Response(body=body, content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(body)
        offset = os.path.getsize(path) if os.path.exists(path) else 0
        pending = b""
        while worker.containers.get(container) is state and state.state == "running" and not worker.deleting:
            await asyncio.sleep(0.2)
            try:
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
            except OSError:
                break
            offset += len(chunk)
            pending += chunk
            if b"\n" in pending:
                complete, pending = pending.rsplit(b"\n", 1)
                await response.write(render_log(parse_cri_log(complete + b"\n"), timestamps=timestamps))
        await response.write_eof()
        return response
