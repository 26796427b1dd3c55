"""Container processes of a simulated node: the sandbox a container runs in, its output as the
container runtime writes it (CRI log files), and its exit.

What a sandbox holds (lab/node/sandbox.py makes it):

- the host's userland read-only (``/usr`` but ``/usr/local``, ``/etc``; ``/bin``, ``/lib``...
  as the host has them), ``/proc``, ``/dev``, ``/sys``; a private ``/tmp`` and ``/run``;
- the image's own files (NVIDIA's plugin binary);
- the pod's volumes at their mount paths (hostPath volumes from the node root);
- with the nvidia runtime, what NVIDIA's container toolkit would inject: the driver's
  ``libnvidia-ml.so.1`` (the lab NVML) in ``/usr/local/nvidia/lib64`` and ``nvidia-smi`` in
  ``/usr/local/nvidia/bin`` (on the CUDA images' paths), the node's NVML state read-only with
  ``GPUNODE_LAB_NVML_STATE`` pointing at it, and the node's ``/proc/driver`` (the driver's
  version and ``nvidia-caps/mig-minors``). A container created without the nvidia runtime
  has none of these, so NVIDIA's plugin finds no NVML, as on a real node.

Log files: ``<node root>/var/log/pods/<namespace>_<pod>_<uid>/<container>/<restart>.log`` in the
CRI format (``<RFC 3339 time> <stdout|stderr> <F|P> <text>``), as containerd writes them.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

from lab.pins import BIN_DIR, REPO

SANDBOX_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox.py")
LAB_NVML = os.path.join(REPO, ".build", "lab", "lib", "libnvidia-ml.so.1")
LAB_NVIDIA_SMI = os.path.join(BIN_DIR, "nvidia-smi")
NVML_STATE_IN_CONTAINER = "/run/nvidia-lab/node/nvml.state"
LIB_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


def rfc3339_nano(when: Optional[datetime] = None) -> str:
    now = when or datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


def host_userland() -> Tuple[List[Dict[str, Any]], List[List[str]]]:
    """Mounts and symlinks that give a sandbox the host's userland."""
    mounts: List[Dict[str, Any]] = []
    links: List[List[str]] = []
    for sub in sorted(os.listdir("/usr")):
        path = os.path.join("/usr", sub)
        if sub == "local" or not os.path.isdir(path) or os.path.islink(path):
            continue
        mounts.append({"source": path, "target": path, "readonly": True})
    for name in LIB_DIRS:
        path = "/" + name
        if os.path.islink(path):
            links.append([os.readlink(path), path])
        elif os.path.isdir(path):
            mounts.append({"source": path, "target": path, "readonly": True})
    mounts += [
        {"source": "/etc", "target": "/etc", "readonly": True},
        {"source": "/proc", "target": "/proc"},
        {"source": "/dev", "target": "/dev"},
        {"source": "/sys", "target": "/sys", "readonly": True},
    ]
    return mounts, links


@dataclass
class ContainerSpec:
    """Everything needed to start one container process."""

    argv: List[str]
    env: Dict[str, str]
    cwd: str = "/"
    mounts: List[Dict[str, Any]] = field(default_factory=list)  # volumes and image files
    nvidia: bool = False  # the nvidia runtime injects the driver
    node_root: str = ""


class ContainerProcess:
    """One run of a container: a sandboxed process whose output goes to a CRI log file."""

    def __init__(self, spec: ContainerSpec, work_dir: str, log_path: str) -> None:
        self.spec = spec
        self.work_dir = work_dir
        self.log_path = log_path
        self.process: Optional[asyncio.subprocess.Process] = None
        self.started_at: Optional[datetime] = None
        self.finished_at: Optional[datetime] = None
        self.exit_code: Optional[int] = None
        self.stopped = False  # SIGSTOP'd (a hung process)
        self._pumps: List[asyncio.Task] = []

    def sandbox_spec(self) -> Dict[str, Any]:
        mounts, links = host_userland()
        mounts = mounts + list(self.spec.mounts)
        env = dict(self.spec.env)
        if self.spec.nvidia:
            mounts.append({"source": LAB_NVML, "target": "/usr/local/nvidia/lib64/libnvidia-ml.so.1",
                           "file": True, "readonly": True})
            if os.path.exists(LAB_NVIDIA_SMI):
                mounts.append({"source": LAB_NVIDIA_SMI, "target": "/usr/local/nvidia/bin/nvidia-smi",
                               "file": True, "readonly": True})
            mounts.append({"source": self.spec.node_root, "target": os.path.dirname(NVML_STATE_IN_CONTAINER),
                           "readonly": True})
            # the driver's /proc files as the node has them (nvidia/version, nvidia-caps/mig-minors,
            # which NVIDIA's plugin reads for MIG devices)
            proc_driver = os.path.join(self.spec.node_root, "proc", "driver")
            if os.path.isdir(proc_driver) and os.path.isdir("/proc/driver"):
                mounts.append({"source": proc_driver, "target": "/proc/driver", "readonly": True})
            env["GPUNODE_LAB_NVML_STATE"] = NVML_STATE_IN_CONTAINER
        return {"parent": os.getpid(), "rootfs": os.path.join(self.work_dir, "rootfs"), "mounts": mounts, "symlinks": links,
                "dirs": ["/tmp", "/run", "/var/tmp"], "argv": self.spec.argv, "env": env, "cwd": self.spec.cwd}

    async def start(self) -> None:
        os.makedirs(self.work_dir, exist_ok=True)
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        spec_path = os.path.join(self.work_dir, "sandbox.json")
        with open(spec_path, "w", encoding="utf-8") as handle:
            json.dump(self.sandbox_spec(), handle)
        self.started_at = datetime.now(timezone.utc)
        # no preexec_fn: Python code in the child of a forked multi-threaded process (gRPC's, the
        # fleet's) can crash it before exec; the sandbox sets PR_SET_PDEATHSIG itself
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-S", SANDBOX_SCRIPT, spec_path,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        log = open(self.log_path, "ab", buffering=0)
        assert self.process.stdout is not None and self.process.stderr is not None
        self._pumps = [asyncio.get_running_loop().create_task(_pump(self.process.stdout, b"stdout", log)),
                       asyncio.get_running_loop().create_task(_pump(self.process.stderr, b"stderr", log))]
        self._log = log

    async def wait(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        self._log.close()
        self.finished_at = datetime.now(timezone.utc)
        # a process killed by signal N exits 128+N to the runtime, as runc reports it
        self.exit_code = 128 - code if code < 0 else code
        return self.exit_code

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def send(self, signum: int) -> None:
        if self.running():
            assert self.process is not None
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass
            if signum == signal.SIGSTOP:
                self.stopped = True
            elif signum == signal.SIGCONT:
                self.stopped = False

    async def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds (a stopped process is killed at once:
        it cannot handle SIGTERM, and SIGKILL reaches it)."""
        if not self.running():
            return
        if self.stopped:
            self.send(signal.SIGKILL)
        else:
            self.send(signal.SIGTERM)
        assert self.process is not None
        try:
            await asyncio.wait_for(asyncio.shield(self.process.wait()), timeout=max(grace, 0.1))
        except asyncio.TimeoutError:
            self.send(signal.SIGKILL)
            await self.process.wait()

    def cleanup(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)


async def _pump(stream: asyncio.StreamReader, name: bytes, log: Any) -> None:
    """Copy a container's stream into the CRI log, a line at a time (long lines in parts)."""
    while True:
        try:
            line = await stream.readuntil(b"\n")
            tag = b"F"
        except asyncio.IncompleteReadError as exc:
            line, tag = exc.partial, b"F"
            if not line:
                return
        except asyncio.LimitOverrunError as exc:
            line, tag = await stream.readexactly(exc.consumed), b"P"
        text = line[:-1] if line.endswith(b"\n") else line
        log.write(rfc3339_nano().encode() + b" " + name + b" " + tag + b" " + text + b"\n")


# ---- reading CRI logs (the kubelet's containerLogs endpoint) --------------------------------

@dataclass
class LogLine:
    time: str
    stream: str
    text: str
    partial: bool


def read_cri_log(path: str) -> List[LogLine]:
    try:
        with open(path, "rb") as handle:
            return parse_cri_log(handle.read())
    except OSError:
        return []


def parse_cri_log(data: bytes) -> List[LogLine]:
    lines: List[LogLine] = []
    for raw in data.split(b"\n"):
        if not raw:
            continue
        parts = raw.split(b" ", 3)
        if len(parts) < 4:
            continue
        lines.append(LogLine(parts[0].decode(), parts[1].decode(), parts[3].decode("utf-8", "replace"),
                             parts[2] == b"P"))
    return lines


def render_log(lines: List[LogLine], tail_lines: Optional[int] = None, limit_bytes: Optional[int] = None,
               timestamps: bool = False, since: Optional[str] = None) -> bytes:
    """The log as the kubelet serves it: whole lines joined, then since / tail / limit."""
    joined: List[Tuple[str, str]] = []
    pending = ""
    first_time = ""
    for line in lines:
        if not pending:
            first_time = line.time
        pending += line.text
        if not line.partial:
            joined.append((first_time, pending))
            pending = ""
    if pending:
        joined.append((first_time, pending))
    if since:
        joined = [j for j in joined if j[0] >= since]
    if tail_lines is not None:
        joined = joined[-tail_lines:] if tail_lines > 0 else []
    out = b"".join(((t + " ") if timestamps else "").encode() + text.encode() + b"\n" for t, text in joined)
    if limit_bytes is not None:
        out = out[:limit_bytes]
    return out
