# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""Waits with a deadline, driven by API events: LIST, then WATCH with ``timeoutSeconds``.

``wait_until(lister, condition, deadline)`` lists a collection once, evaluates ``condition`` on
the objects, then watches from the list's resourceVersion and evaluates it again after every
event. A watch asks the server to end it at the deadline (``timeoutSeconds``, at most
:data:`MAX_WATCH_S`); when a watch ends early (server timeout, HTTP 410 Gone, a dropped
connection) the collection is listed again. Nothing sleeps for a fixed time: the only pause is
:data:`POLL_S` (0.2 s) after a watch that ended at once without an event, so a server that closes
watches immediately is polled instead of hammered.

The loop (:func:`wait_until`) only sees a :class:`Lister` protocol, so unit tests drive it with
fakes and a fixed clock; :class:`ListWatch` is the Kubernetes implementation.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import json
import math
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generator, Generic, Iterable, Iterator, List, Optional, Tuple, TypeVar

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import K8sError
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_apply import call_json

try:
    from urllib3.exceptions import HTTPError as _StreamError
except ImportError:  # urllib3 comes with kubernetes; without it nothing here runs anyway
    class _StreamError(Exception):  # type: ignore[no-redef]
        """Stand-in."""

T = TypeVar("T")
Objects = Dict[str, Dict[str, Any]]
Events = Generator[Dict[str, Any], None, None]

MAX_WATCH_S = 60  # one watch request lasts at most this long, then the collection is listed again
POLL_S = 0.2  # pause after a watch that ended at once without an event


class Deadline:
    """A point in time a wait must not pass (monotonic clock, injectable for tests)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = float(seconds)
        self._clock = clock
        self._start = clock()

    @property
    def elapsed(self) -> float:
        return self._clock() - self._start

    @property
    def remaining(self) -> float:
        return max(0.0, self.seconds - self.elapsed)

    @property
    def expired(self) -> bool:
        return self.elapsed >= self.seconds


def watch_timeout_seconds(remaining: float, cap: int = MAX_WATCH_S) -> int:
    """``timeoutSeconds`` for the next watch: the time left, rounded up, between 1 and ``cap``."""
    return int(max(1, min(cap, math.ceil(remaining))))


def object_key(obj: Dict[str, Any]) -> str:
    """``namespace/name`` (``name`` for cluster-scoped objects)."""
    metadata = obj.get("metadata") or {}
    name = str(metadata.get("name", ""))
    return "%s/%s" % (metadata["namespace"], name) if metadata.get("namespace") else name


def apply_event(objects: Objects, event_type: str, obj: Dict[str, Any]) -> Optional[str]:
    """Apply one watch event to ``objects``; return the object's resourceVersion (None when absent)."""
    if event_type in ("ADDED", "MODIFIED"):
        objects[object_key(obj)] = obj
    elif event_type == "DELETED":
        objects.pop(object_key(obj), None)
    version = (obj.get("metadata") or {}).get("resourceVersion")
    return str(version) if version else None


def iter_lines(chunks: Iterable[Any]) -> Iterator[str]:
    """Lines of a streamed body (bytes or str chunks, split anywhere), without the newline."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield line.decode("utf-8", errors="replace")
    if buffer.strip():
        yield buffer.decode("utf-8", errors="replace")


def parse_event(line: str) -> Optional[Dict[str, Any]]:
    """One watch event (``{"type": ..., "object": {...}}``); None for a line that is not one."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("object"), dict) or not event.get("type"):
        return None
    return event


class Lister:
    """What :func:`wait_until` needs from a collection (the protocol :class:`ListWatch` implements)."""

    def list(self) -> Tuple[List[Dict[str, Any]], Optional[str]]:
        """The objects and the list's resourceVersion."""
        raise NotImplementedError

    def watch(self, resource_version: Optional[str], timeout_s: int) -> Events:
        """Watch events after ``resource_version``; ends when the server ends the watch."""
        raise NotImplementedError


@dataclass
class WaitResult(Generic[T]):
    """What a wait saw: the condition's value (None at the deadline) and the last objects."""

    value: Optional[T]
    objects: Objects = field(default_factory=dict)
    waited_s: float = 0.0
    lists: int = 0
    watches: int = 0

    @property
    def met(self) -> bool:
        return self.value is not None


def wait_until(lister: Lister, condition: Callable[[Objects], Optional[T]], deadline: Deadline,
               pause: Callable[[float], None] = time.sleep) -> WaitResult[T]:
    """List, then watch, until ``condition(objects)`` returns a value or the deadline passes.

    ``objects`` maps ``namespace/name`` to the object as last seen. The condition is evaluated
    after the first list even when the deadline has already passed, so a state that already
    holds is reported as met.
    """
    result: WaitResult[T] = WaitResult(None)
    while True:
        items, version = lister.list()
        result.lists += 1
        result.objects = {object_key(item): item for item in items}
        result.value = condition(result.objects)
        if result.value is not None or deadline.expired:
            break
        started = deadline.elapsed
        events = 0
        result.watches += 1
        with closing(lister.watch(version, watch_timeout_seconds(deadline.remaining))) as stream:
            for event in stream:
                if event.get("type") == "ERROR":  # e.g. 410 Gone: the version is too old; list again
                    break
                events += 1
                if event.get("type") == "BOOKMARK":  # progress only; the next watch starts from a new list
                    continue
                apply_event(result.objects, str(event["type"]), event["object"])
                result.value = condition(result.objects)
                if result.value is not None or deadline.expired:
                    break
        if result.value is not None or deadline.expired:
            break
        if events == 0 and deadline.elapsed - started < POLL_S:
            pause(min(POLL_S, deadline.remaining))
    result.waited_s = round(deadline.elapsed, 3)
    return result


class ListWatch(Lister):
    """LIST and WATCH of one collection through :class:`K8sClient` (timeouts, retries, errors).

    ``ListWatch(client, "pods on node gpu-07", client.core.list_namespaced_pod, "kube-system",
    label_selector="name=nvidia-device-plugin-ds", field_selector="spec.nodeName=gpu-07")``
    """

    def __init__(self, client: Any, what: str, list_fn: Callable[..., Any], *args: Any, **selectors: Any) -> None:
        self.client = client
        self.what = what
        self.list_fn = list_fn
        self.args = args
        self.selectors = selectors

    def list(self) -> Tuple[List[Dict[str, Any]], Optional[str]]:
        body = call_json(self.client, "list " + self.what, self.list_fn, *self.args, **self.selectors)
        version = (body.get("metadata") or {}).get("resourceVersion")
        return list(body.get("items") or []), str(version) if version else None

    def watch(self, resource_version: Optional[str], timeout_s: int) -> Events:
        kwargs = dict(self.selectors)
        kwargs.update(watch=True, timeout_seconds=timeout_s, allow_watch_bookmarks=True, _preload_content=False,
                      _request_timeout=(self.client.request_timeout, timeout_s + self.client.request_timeout))
        if resource_version:
            kwargs["resource_version"] = resource_version
        try:
            response = self.client.call("watch " + self.what, self.list_fn, *self.args, **kwargs)
        except K8sError as exc:
            if exc.details.get("status") == 410:  # Gone: the version is too old; the caller lists again
                return
            raise
        try:
            for line in iter_lines(response.stream(amt=None, decode_content=False)):
                event = parse_event(line)
                if event is not None:
                    yield event
        except (_StreamError, OSError, ValueError):
            return  # the connection dropped: the caller lists again
        finally:
            response.close()  # a half-read stream must not go back to the pool
            response.release_conn()
