"""The node agents' Kubernetes API client: asyncio (aiohttp), one identity per session.

A simulated kubelet talks to the real API server as a real kubelet does: with its node's
client certificate, JSON bodies, strategic merge patches for status, and LIST + WATCH with
bookmarks for the pods bound to it. Every request has a deadline.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple
from urllib.parse import urlencode

import aiohttp

LOG = logging.getLogger("lab.node.api")

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
REQUEST_TIMEOUT = 30.0
WATCH_TIMEOUT_S = 300  # the server ends a watch after this; the client relists or resumes


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__("HTTP %d %s: %s" % (status, reason, message))
        self.status = status
        self.reason = reason
        self.message = message


class WatchExpired(Exception):
    """410 Gone: the resource version is too old; relist."""


class KubeApi:
    """One identity's connection to the API server (an aiohttp session with its TLS context)."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext, user_agent: str, limit: int = 4) -> None:
        self.url = url.rstrip("/")
        self.ssl_context = ssl_context
        self.user_agent = user_agent
        self.limit = limit
        self._session: Optional[aiohttp.ClientSession] = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.ssl_context, limit=self.limit)
            self._session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": self.user_agent})
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def request(self, method: str, path: str, body: Any = None, query: Optional[Dict[str, Any]] = None,
                      content_type: str = JSON, timeout: float = REQUEST_TIMEOUT,
                      ok_missing: bool = False) -> Optional[Dict[str, Any]]:
        """One request; the decoded JSON answer. ``ok_missing``: a 404 gives None."""
        url = self.url + path
        if query:
            url += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body)
        headers = {"Accept": JSON}
        if data is not None:
            headers["Content-Type"] = content_type
        async with self.session.request(method, url, data=data, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as answer:
            text = await answer.text()
            if answer.status == 404 and ok_missing:
                return None
            if answer.status >= 400:
                raise _error(answer.status, text)
            return json.loads(text) if text else {}

    async def get(self, path: str, **kwargs: Any) -> Optional[Dict[str, Any]]:
        return await self.request("GET", path, **kwargs)

    async def create(self, path: str, body: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        return await self.request("POST", path, body)

    async def patch(self, path: str, body: Dict[str, Any], content_type: str = STRATEGIC_PATCH,
                    ok_missing: bool = False) -> Optional[Dict[str, Any]]:
        return await self.request("PATCH", path, body, content_type=content_type, ok_missing=ok_missing)

    async def put(self, path: str, body: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        return await self.request("PUT", path, body)

    async def delete(self, path: str, body: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
        return await self.request("DELETE", path, body, ok_missing=True)

    async def list_and_watch(self, path: str, query: Dict[str, Any]
                             ) -> AsyncIterator[Tuple[str, Dict[str, Any]]]:
        """LIST, then WATCH from its resource version, forever: yields ("SYNC", list) after each
        (re)list, then ("ADDED"|"MODIFIED"|"DELETED", object). Resumes after a watch ends or a
        connection drops; relists after 410 Gone."""
        version: Optional[str] = None
        while True:
            if version is None:
                try:
                    listed = await self.get(path, query=query)
                except (aiohttp.ClientError, asyncio.TimeoutError, ApiError) as exc:
                    LOG.info("%s: list %s failed (%s); retrying", self.user_agent, path, exc)
                    await asyncio.sleep(1.0)
                    continue
                assert listed is not None
                version = (listed.get("metadata") or {}).get("resourceVersion")
                yield "SYNC", {"items": listed.get("items") or []}
            try:
                async for kind, obj in self._watch(path, query, version or ""):
                    if kind == "BOOKMARK":
                        version = (obj.get("metadata") or {}).get("resourceVersion") or version
                        continue
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    yield kind, obj
            except WatchExpired:
                version = None
            except (aiohttp.ClientError, asyncio.TimeoutError, ApiError) as exc:
                LOG.info("%s: watch %s ended (%s); resuming", self.user_agent, path, exc)
                await asyncio.sleep(0.5)

    async def _watch(self, path: str, query: Dict[str, Any], version: str
                     ) -> AsyncIterator[Tuple[str, Dict[str, Any]]]:
        params = dict(query, watch="true", resourceVersion=version, allowWatchBookmarks="true",
                      timeoutSeconds=WATCH_TIMEOUT_S)
        url = "%s%s?%s" % (self.url, path, urlencode(params))
        timeout = aiohttp.ClientTimeout(total=WATCH_TIMEOUT_S + 30, sock_connect=10)
        async with self.session.get(url, headers={"Accept": JSON}, timeout=timeout) as answer:
            if answer.status == 410:
                raise WatchExpired()
            if answer.status >= 400:
                raise _error(answer.status, await answer.text())
            async for line in answer.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type", ""), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise WatchExpired()
                    raise ApiError(int(obj.get("code") or 500), obj.get("reason", ""), obj.get("message", ""))
                yield kind, obj


def _error(status: int, text: str) -> ApiError:
    try:
        body = json.loads(text)
    except ValueError:
        body = {}
    return ApiError(status, body.get("reason", ""), body.get("message", text[:300]))


def items(answer: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return list((answer or {}).get("items") or [])
