"""klog-style log lines, as NVIDIA's device plugin (a Go program using k8s.io/klog/v2) writes them.

``I1127 01:02:03.123456       1 main.go:238] Starting FS watcher for /var/lib/kubelet/device-plugins``
: severity letter, month and day, wall clock with microseconds (UTC, as in a container), the
thread id right-aligned in 7 columns (1: the container's PID namespace), file:line, "] ", text.
"""
from __future__ import annotations

import threading
from datetime import datetime, timezone
from typing import List, Optional


def klog_line(severity: str, source: str, message: str, when: Optional[datetime] = None) -> str:
    now = when or datetime.now(timezone.utc)
    return "%s%02d%02d %02d:%02d:%02d.%06d %7d %s] %s" % (
        severity[0].upper(),
        now.month,
        now.day,
        now.hour,
        now.minute,
        now.second,
        now.microsecond,
        1,
        source,
        message,
    )


class ContainerLog:
    """The output of one container instance; thread-safe appends and reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lines: List[str] = []

    def write(self, severity: str, source: str, message: str) -> None:
        line = klog_line(severity, source, message)
        with self._lock:
            self._lines.append(line)

    def info(self, source: str, message: str) -> None:
        self.write("I", source, message)

    def warning(self, source: str, message: str) -> None:
        self.write("W", source, message)

    def error(self, source: str, message: str) -> None:
        self.write("E", source, message)

    def text(self, tail_lines: Optional[int] = None) -> str:
        with self._lock:
            text = "\n".join(self._lines)
        if not text:
            return ""
        lines = text.split("\n")  # a message may span lines (the config dump)
        if tail_lines is not None:
            lines = lines[-tail_lines:] if tail_lines > 0 else []
        return "\n".join(lines) + ("\n" if lines else "")
