"""Shared by the benchmarks in bench/: the machine's description, a load sampler, statistics,
lab fleets started with ``python -m lab`` (always stopped again), the API server's request
counters, a small API reader/watcher for the lab's HTTPS API, Ansible runs, and result files.

Nothing here asserts anything: benchmarks report figures, they never pass or fail.
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import http.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# The collection is found at <BUILD>/ansible_collections/gpunode/bringup (`make collection` links
# this checkout there). BENCH_COLLECTIONS_PATH points the benchmarks at another copy (e.g. to
# compare two versions of the collection on the same machine).
BUILD = Path(os.environ.get("BENCH_COLLECTIONS_PATH") or ROOT / ".build")
RESULTS = BENCH / "results"
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
ANSIBLE = str(Path(PYTHON).parent / "ansible")
ANSIBLE_PLAYBOOK = str(Path(PYTHON).parent / "ansible-playbook")
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
LAB_LIB_DIR = ROOT / ".build" / "lab" / "lib"
CALLBACK_DIR = BENCH / "callback_plugins"
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)"
                   r"\s+rescued=(\d+)\s+ignored=(\d+)", re.M)

for _path in (BUILD, ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


# --------------------------------------------------------------------------- the machine

def _first(path: str, pattern: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                match = re.match(pattern, line)
                if match:
                    return match.group(1).strip()
    except OSError:
        pass
    return None


def _version(cmd: List[str], pattern: str) -> Optional[str]:
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
                             check=False).stdout
    except OSError:
        return None
    match = re.search(pattern, out)
    return match.group(1) if match else None


def machine_info() -> Dict[str, Any]:
    """What the figures were measured on."""
    mem_kb = _first("/proc/meminfo", r"MemTotal:\s+(\d+)")
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _first("/proc/cpuinfo", r"model name\s*:\s*(.*)"),
        "memory_gib": round(int(mem_kb) / 1024 / 1024, 1) if mem_kb else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": PYTHON,
        "ansible_core": _version([PYTHON, "-c", "import ansible.release as r; print(r.__version__)"], r"(\S+)"),
        "kubernetes_client": _version([PYTHON, "-c", "import kubernetes; print(kubernetes.__version__)"], r"(\S+)"),
        "kubectl": _version([KUBECTL, "version", "--client"], r"Client Version:\s*(\S+)"),
        "loadavg_at_start": read_loadavg(),
        "collection": str(BUILD / "ansible_collections" / "gpunode" / "bringup"),
        "git_commit": _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], r"(\S+)"),
        "git_dirty_files": _version(["sh", "-c", "git -C '%s' status --porcelain -- plugins roles playbooks lab | wc -l"
                                     % ROOT], r"(\d+)"),
    }


def read_loadavg() -> List[float]:
    with open("/proc/loadavg", encoding="utf-8") as handle:
        return [float(x) for x in handle.read().split()[:3]]


def _cpu_times() -> List[int]:
    with open("/proc/stat", encoding="utf-8") as handle:
        return [int(x) for x in handle.readline().split()[1:]]


class LoadSampler:
    """Samples the 1-minute load average and the machine's CPU busy share once a second."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.load1: List[float] = []
        self.busy: List[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)
        self.started = time.time()
        self.ended: Optional[float] = None

    def _run(self) -> None:
        before = _cpu_times()
        while not self._stop.wait(self.interval):
            self.load1.append(read_loadavg()[0])
            after = _cpu_times()
            delta = [b - a for a, b in zip(before, after)]
            total = sum(delta)
            idle = delta[3] + (delta[4] if len(delta) > 4 else 0)
            if total > 0:
                self.busy.append(round(100.0 * (total - idle) / total, 1))
            before = after

    def __enter__(self) -> "LoadSampler":
        self.load1.append(read_loadavg()[0])
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)
        self.load1.append(read_loadavg()[0])
        self.ended = time.time()

    def summary(self) -> Dict[str, Any]:
        return {
            "seconds": round((self.ended or time.time()) - self.started, 1),
            "load1": summarize(self.load1, digits=2),
            "cpu_busy_percent": summarize(self.busy, digits=1),
        }

    def line(self) -> str:
        s = self.summary()
        load, busy = s["load1"], s["cpu_busy_percent"]
        return ("load during the run (1-min load average, %d cores): median %s, min %s, max %s; "
                "CPU busy median %s%%" % (os.cpu_count() or 0, load.get("median"), load.get("min"), load.get("max"),
                                          busy.get("median")))


# --------------------------------------------------------------------------- statistics

def summarize(values: Sequence[float], digits: int = 4) -> Dict[str, Any]:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits),
            "values": [round(v, digits) for v in values]}


def median(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(ours: Optional[float], baseline: Optional[float]) -> Optional[float]:
    """ours / baseline (below 1: ours is faster)."""
    if ours is None or not baseline:
        return None
    return round(ours / baseline, 4)


def fmt_s(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return "%.1f ms" % (seconds * 1000)
    return "%.2f s" % seconds


def fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else "%.3fx" % value


# --------------------------------------------------------------------------- processes

_LABS: List["Lab"] = []


def _down_all() -> None:
    for lab in list(_LABS):
        lab.down()


def _on_signal(signum: int, _frame: Any) -> None:
    _down_all()
    sys.exit(128 + signum)


atexit.register(_down_all)
for _sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, _on_signal)


def workdir(prefix: str) -> Path:
    """A short directory under /tmp (unix socket paths of lab nodes are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def ansible_env(work: Path, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for ansible / ansible-playbook: the collection from .build, default settings
    otherwise (no pipelining, the default callback), a private ANSIBLE_HOME and temp dirs."""
    env = dict(os.environ)
    for name in ("ansible-home", "ansible-tmp", "kube-cache"):
        (work / name).mkdir(parents=True, exist_ok=True)
    for name in ("ANSIBLE_CALLBACKS_ENABLED", "ANSIBLE_CALLBACK_PLUGINS", "ANSIBLE_STDOUT_CALLBACK", "KUBECONFIG",
                 "K8S_AUTH_KUBECONFIG", "ANSIBLE_PIPELINING", "ANSIBLE_FORKS", "GPUNODE_LAB_NVML_STATE"):
        env.pop(name, None)
    env.update({
        "ANSIBLE_HOME": str(work / "ansible-home"),
        "ANSIBLE_COLLECTIONS_PATH": str(BUILD),
        "ANSIBLE_LOCAL_TEMP": str(work / "ansible-tmp"),
        "ANSIBLE_REMOTE_TMP": str(work / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCALHOST_WARNING": "0",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "KUBECACHEDIR": str(work / "kube-cache"),
        "PATH": "%s:%s" % (VENV_BIN, os.environ.get("PATH", "")),
        "PYTHONPATH": "%s:%s" % (BUILD, ROOT),
    })
    if extra:
        env.update(extra)
    return env


def timing_callback_env(out: Path) -> Dict[str, str]:
    """Enable bench/callback_plugins/bench_timing.py, writing per-task timings to ``out``."""
    return {"ANSIBLE_CALLBACK_PLUGINS": str(CALLBACK_DIR), "ANSIBLE_CALLBACKS_ENABLED": "bench_timing",
            "BENCH_TIMING_OUT": str(out)}


@dataclass
class Run:
    cmd: List[str]
    rc: int
    seconds: float
    output: str
    cpu_s: float = 0.0  # user + system CPU of the command and every descendant it waited for

    def recap(self) -> Dict[str, Dict[str, int]]:
        return {m.group(1): {"ok": int(m.group(2)), "changed": int(m.group(3)), "unreachable": int(m.group(4)),
                             "failed": int(m.group(5)), "skipped": int(m.group(6)), "rescued": int(m.group(7)),
                             "ignored": int(m.group(8))} for m in RECAP.finditer(self.output)}

    def tail(self, chars: int = 3000) -> str:
        return self.output[-chars:]


def run_cmd(cmd: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
            timeout: float = 900, keep_output: bool = True) -> Run:
    """Run a command; wall time from just before the start to its exit."""
    before = children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(cwd) if cwd else None, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)
    seconds = time.perf_counter() - start
    return Run(cmd, proc.returncode, seconds, proc.stdout if keep_output else proc.stdout[-20000:],
               children_cpu() - before)


def children_cpu() -> float:
    """CPU seconds (user + system) of the children this process has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used, from /proc (e.g. the lab daemon)."""
    try:
        with open("/proc/%d/stat" % pid, encoding="utf-8") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


# --------------------------------------------------------------------------- the lab

class Lab:
    """A lab fleet started with ``python -m lab up`` in a fresh state dir; ``down()`` stops it
    (also at exit and on SIGTERM/SIGHUP) and removes the state dir."""

    def __init__(self, nodes: int, api_only: bool = False, scenario: str = "healthy", timeout: int = 300) -> None:
        self.nodes = nodes
        self.api_only = api_only
        self.scenario = scenario
        self.timeout = timeout
        self.state_dir = workdir("bl")
        self.info: Dict[str, Any] = {}
        self.up_seconds: Optional[float] = None
        self._down = False

    def _lab(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = "%s:%s" % (BUILD, ROOT)
        return subprocess.run([PYTHON, "-m", "lab", "--state-dir", str(self.state_dir), *args], cwd=str(ROOT), env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, check=False)

    def up(self) -> "Lab":
        args = ["up", "--nodes", str(self.nodes), "--scenario", self.scenario, "--timeout", str(self.timeout)]
        if self.api_only:
            args.append("--api-only")
        _LABS.append(self)
        start = time.perf_counter()
        proc = self._lab(*args, timeout=self.timeout + 60)
        self.up_seconds = time.perf_counter() - start
        if proc.returncode != 0:
            self.down()
            raise RuntimeError("lab up failed (%d): %s" % (proc.returncode, proc.stdout[-3000:]))
        self.info = json.loads((self.state_dir / "lab.json").read_text())
        return self

    def down(self) -> None:
        if self._down:
            return
        self._down = True
        try:
            proc = self._lab("down", timeout=120)
            if proc.returncode not in (0, 3):
                print("warning: lab down: %s" % proc.stdout[-2000:], file=sys.stderr)
        finally:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            if self in _LABS:
                _LABS.remove(self)

    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc: Any) -> None:
        self.down()

    @property
    def kubeconfig(self) -> str:
        return self.info["kubeconfig"]

    @property
    def inventory(self) -> str:
        return self.info["inventory"]

    @property
    def node_names(self) -> List[str]:
        return list(self.info["nodes"])

    def node_root(self, node: str) -> str:
        return self.info["node_roots"][node]

    @property
    def api(self) -> "LabApi":
        return LabApi(self.info["url"], self.info["token"])

    def daemon_pid(self) -> int:
        return int(self.info["pids"]["daemon"])


class LabApi:
    """Plain HTTPS requests to the lab API server (loopback; the lab's own CA is not checked)."""

    def __init__(self, url: str, token: str) -> None:
        parsed = urllib.parse.urlparse(url)
        self.url = url
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 443
        self.token = token
        self.context = ssl.create_default_context()
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE  # loopback lab server with a throwaway CA

    def request(self, path: str, method: str = "GET", body: Optional[Dict[str, Any]] = None,
                content_type: str = "application/json") -> Dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        request = urllib.request.Request(self.url + path, method=method, data=data)
        request.add_header("Authorization", "Bearer " + self.token)
        if data is not None:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, context=self.context, timeout=60) as answer:
            return json.loads(answer.read() or b"{}")

    # the side channel (no token needed, but it does no harm)
    def counters(self) -> Dict[str, Any]:
        return self.request("/lab/counters")

    def reset_counters(self) -> None:
        self.request("/lab/counters/reset", method="POST")

    def nodes(self) -> List[Dict[str, Any]]:
        return self.request("/api/v1/nodes").get("items") or []

    def watch(self, path: str, on_event: Callable[[float, Dict[str, Any]], None], stop: threading.Event,
              connected: threading.Event, timeout_s: int = 600) -> None:
        """Stream ``path?watch=true`` and call ``on_event(monotonic time, event)`` per event line."""
        sep = "&" if "?" in path else "?"
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=timeout_s + 10)
        try:
            conn.request("GET", "%s%swatch=true&timeoutSeconds=%d" % (path, sep, timeout_s),
                         headers={"Authorization": "Bearer " + self.token})
            response = conn.getresponse()
            connected.set()
            while not stop.is_set():
                line = response.readline()
                if not line:
                    break
                now = time.monotonic()
                if line.strip():
                    on_event(now, json.loads(line))
        finally:
            connected.set()
            conn.close()


def wait_advertised(api: LabApi, count: int, expected: int = 8, timeout: float = 300,
                    resource: str = "nvidia.com/gpu") -> float:
    """Wait until ``count`` nodes have allocatable ``resource`` == expected; seconds waited."""
    start = time.monotonic()
    while True:
        nodes = api.nodes()
        ok = sum(1 for n in nodes if str(((n.get("status") or {}).get("allocatable") or {}).get(resource)) == str(expected))
        if ok >= count:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise RuntimeError("only %d of %d nodes advertise %s=%d after %ds" % (ok, count, resource, expected, timeout))
        time.sleep(0.2)


def deploy_plugin(lab: Lab, work: Path, wait_timeout: int = 240) -> Run:
    """Deploy the device plugin DaemonSet with the collection's device_plugin module (as a user
    would, ad hoc), then wait until every node advertises its GPUs."""
    args = {"kubeconfig": lab.kubeconfig, "wait": True, "wait_timeout": wait_timeout}
    run = run_cmd([ANSIBLE, "localhost", "-m", "gpunode.bringup.device_plugin", "-a", json.dumps(args),
                   "-e", "ansible_python_interpreter=%s" % PYTHON], env=ansible_env(work), cwd=work)
    if run.rc != 0:
        raise RuntimeError("device_plugin failed: %s" % run.tail())
    wait_advertised(lab.api, len(lab.node_names), timeout=wait_timeout)
    return run


# --------------------------------------------------------------------------- results

def write_result(name: str, data: Dict[str, Any]) -> Path:
    """bench/results/<name>-<UTC time>.json and bench/results/<name>-latest.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    data = dict(data)
    data.setdefault("benchmark", name)
    data.setdefault("finished_utc", stamp)
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    path = RESULTS / ("%s-%s.json" % (name, stamp))
    path.write_text(text)
    (RESULTS / ("%s-latest.json" % name)).write_text(text)
    return path


def banner(title: str) -> None:
    print("=" * 100)
    print(title)
    print("=" * 100, flush=True)


def begin(title: str, kubectl: bool = False) -> Dict[str, Any]:
    """A benchmark's banner and the one line on the machine it runs on; the machine's details."""
    banner(title)
    machine = machine_info()
    print("machine: %(nproc)s cores, %(memory_gib)s GiB, %(cpu_model)s; Python %(python)s, ansible-core %(ansible_core)s"
          % machine + (", kubectl %s" % machine["kubectl"] if kubectl else ""), flush=True)
    return machine


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def iter_jsonl(path: Path) -> Iterator[Dict[str, Any]]:
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                yield json.loads(line)
