"""``python -m lab``: start, inspect, break, fix and stop a simulated GPU fleet.

    python -m lab up [--nodes N] [--scenario healthy|demo] [--state-dir DIR] [--api-only]
    python -m lab status [--json]
    python -m lab break NODE FAULT [--arg KEY=VALUE ...] [--sticky]
    python -m lab fix NODE FAULT [--arg KEY=VALUE ...]
    python -m lab faults
    python -m lab env            # shell exports: KUBECONFIG, the inventory path
    python -m lab down

The state dir defaults to $GPUNODE_LAB_STATE_DIR, else ``<repo>/.lab`` when its unix socket
paths fit in 107 bytes, else ``/tmp/gpunode-lab-<uid>``. See docs/LAB.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from lab.daemon import API_FAULTS, LAB_LIB_DIR, REPO, SCENARIOS, control_request, node_names
from lab.node.layout import max_state_dir_length

EXIT_NOT_RUNNING = 3


def default_state_dir() -> str:
    env = os.environ.get("GPUNODE_LAB_STATE_DIR")
    if env:
        return os.path.abspath(env)
    repo_dir = os.path.join(REPO, ".lab")
    if len(repo_dir.encode()) <= max_state_dir_length(len("gpu-node-0001")):
        return repo_dir
    return "/tmp/gpunode-lab-%d" % os.getuid()


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """A live (not zombie) process."""
    try:
        with open("/proc/%d/stat" % pid, encoding="utf-8") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def _group_members(pgid: int) -> List[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, encoding="utf-8") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _daemon_pid(state_dir: str) -> Optional[int]:
    info = _read_json(os.path.join(state_dir, "lab.json"))
    if info and info.get("pids", {}).get("daemon"):
        return int(info["pids"]["daemon"])
    try:
        with open(os.path.join(state_dir, "daemon.pid"), encoding="utf-8") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def _running_pid(state_dir: str) -> Optional[int]:
    pid = _daemon_pid(state_dir)
    return pid if pid is not None and _alive(pid) else None


def _daemon_env() -> Dict[str, str]:
    env = dict(os.environ)
    paths = [os.path.join(REPO, ".build"), REPO]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (LAB_LIB_DIR, env.get("LD_LIBRARY_PATH", "")) if p)
    # the lab NVML reads these as a container's view of the driver: none of it is the daemon's
    for name in ("GPUNODE_LAB_NVML_STATE", "GPUNODE_LAB_NVML_INIT_ERROR", "NVIDIA_VISIBLE_DEVICES"):
        env.pop(name, None)
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    return env


def cmd_up(args: argparse.Namespace) -> int:
    state_dir = os.path.abspath(args.state_dir)
    if args.scenario == "demo" and args.nodes not in (None, 4):
        print("lab up: scenario demo has exactly 4 nodes", file=sys.stderr)
        return 2
    count = args.nodes if args.nodes is not None else 4
    longest_name = len(node_names(max(count, 1))[-1])
    limit = max_state_dir_length(longest_name)
    if not args.api_only and len(state_dir.encode()) > limit:
        print(
            "lab up: state dir %s is %d bytes; node sockets need it at most %d (unix socket paths are "
            "limited to 107 bytes): use e.g. --state-dir /tmp/gpunode-lab" % (state_dir, len(state_dir.encode()), limit),
            file=sys.stderr,
        )
        return 2
    pid = _running_pid(state_dir)
    if pid is not None:
        print("lab up: a lab is already running from %s (pid %d); run `python -m lab down` first" % (state_dir, pid), file=sys.stderr)
        return 1
    try:
        os.makedirs(state_dir, exist_ok=True)
        for stale in ("lab.json", "control.sock", "daemon.pid"):
            try:
                os.unlink(os.path.join(state_dir, stale))
            except FileNotFoundError:
                pass
        with open(os.path.join(state_dir, "daemon.log"), "ab"):
            pass
    except OSError as exc:
        print("lab up: cannot write the state dir %s (%s): choose another with --state-dir" % (state_dir, exc),
              file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "lab", "daemon", "--state-dir", state_dir, "--scenario", args.scenario,
               "--gpus", str(args.gpus)]
    if args.nodes is not None:
        command += ["--nodes", str(args.nodes)]
    if args.api_only:
        command.append("--api-only")
    if args.fault_proxy:
        command.append("--fault-proxy")
    if args.api_port:
        command += ["--api-port", str(args.api_port)]
    if args.node_status_update_frequency is not None:
        command += ["--node-status-update-frequency", str(args.node_status_update_frequency)]
    log_path = os.path.join(state_dir, "daemon.log")
    started = time.time()
    with open(log_path, "ab") as log, open(os.devnull, "rb") as devnull:
        process = subprocess.Popen(command, cwd=REPO, env=_daemon_env(), stdin=devnull, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    with open(os.path.join(state_dir, "daemon.pid"), "w", encoding="utf-8") as handle:
        handle.write("%d\n" % process.pid)
    deadline = started + args.timeout
    info = None
    while time.time() < deadline:
        info = _read_json(os.path.join(state_dir, "lab.json"))
        if info and info.get("ready") and info.get("pids", {}).get("daemon") == process.pid:
            break
        if process.poll() is not None:
            print("lab up: the daemon exited with status %s; the end of %s:" % (process.returncode, log_path), file=sys.stderr)
            print(_tail(log_path, 30), file=sys.stderr)
            return 1
        time.sleep(0.05)
    else:
        print("lab up: the daemon was not ready after %ss; see %s" % (args.timeout, log_path), file=sys.stderr)
        _stop_daemon(state_dir, process.pid, process.pid)
        return 1
    print("lab up: %d nodes (%s%s) in %.1fs, pid %d"
          % (len(info["nodes"]), info["scenario"], ", API only" if info["api_only"] else "", time.time() - started, process.pid))
    print("  kubeconfig: %s" % info["kubeconfig"])
    print("  inventory:  %s" % info["inventory"])
    proxy = "; clients go through the fault proxy at %s" % info["url"] if info.get("fault_proxy") else ""
    print("  API server: %s (Kubernetes %s)%s" % (info.get("apiserver_url", info["url"]), info.get("kubernetes_version", "?"),
                                                  proxy))
    print("  export KUBECONFIG=%s" % info["kubeconfig"])
    return 0


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""


def _wait_gone(pid: int, pgid: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pid) and not _group_members(pgid):
            return True
        time.sleep(0.05)
    return not _alive(pid) and not _group_members(pgid)


def _stop_daemon(state_dir: str, pid: int, pgid: int) -> List[int]:
    """Stop the daemon and its process group; the PIDs still alive afterwards (none, normally)."""
    running = _alive(pid)
    if running:
        try:
            control_request(state_dir, {"op": "stop"}, timeout=5)
        except OSError:
            pass
    # a daemon that was killed: its children die with it (PR_SET_PDEATHSIG) in a moment; what
    # is left of its group (it keeps the group id while a member lives) gets the signals
    if not _wait_gone(pid, pgid, 20 if running else 2):
        for signum, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(pgid, signum)
            except ProcessLookupError:
                break
            if _wait_gone(pid, pgid, wait):
                break
    return ([pid] if _alive(pid) else []) + [p for p in _group_members(pgid) if p != pid]


def cmd_down(args: argparse.Namespace) -> int:
    state_dir = os.path.abspath(args.state_dir)
    info = _read_json(os.path.join(state_dir, "lab.json")) or {}
    pid = _daemon_pid(state_dir)
    if pid is None:
        print("lab down: no lab in %s" % state_dir)
        return 0
    pgid = int(info.get("pgid") or pid)
    left = _stop_daemon(state_dir, pid, pgid)
    if left:
        print("lab down: processes still alive: %s" % ", ".join(map(str, left)), file=sys.stderr)
        return 1
    for name in ("lab.json", "control.sock", "daemon.pid"):
        try:
            os.unlink(os.path.join(state_dir, name))
        except FileNotFoundError:
            pass
    print("lab down: stopped pid %d, no process left in group %d" % (pid, pgid))
    return 0


def _request(state_dir: str, request: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    if _running_pid(state_dir) is None:
        print("lab: no lab running from %s (start one with `python -m lab up`)" % state_dir, file=sys.stderr)
        return None
    try:
        return control_request(state_dir, request)
    except OSError as exc:
        print("lab: cannot reach the daemon at %s/control.sock: %s" % (state_dir, exc), file=sys.stderr)
        return None


def _parse_args(pairs: List[str]) -> Dict[str, str]:
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit("lab: --arg wants KEY=VALUE, got %r" % pair)
        parsed[key] = value
    return parsed


def cmd_fault(args: argparse.Namespace) -> int:
    fault_args = _parse_args(args.arg or [])
    if getattr(args, "sticky", False):
        fault_args["sticky"] = "true"
    answer = _request(os.path.abspath(args.state_dir),
                      {"op": args.command, "node": args.node, "fault": args.fault, "args": fault_args})
    if answer is None:
        return EXIT_NOT_RUNNING
    if not answer.get("ok"):
        print("lab %s: %s" % (args.command, answer.get("error")), file=sys.stderr)
        return 1
    result = answer.get("result") or {}
    print("lab %s: %s %s%s" % (args.command, args.node, args.fault, (" " + json.dumps(result)) if result else ""))
    return 0


def cmd_node_action(args: argparse.Namespace) -> int:
    answer = _request(os.path.abspath(args.state_dir), {"op": "node_action", "node": args.node, "action": args.action})
    if answer is None:
        return EXIT_NOT_RUNNING
    if not answer.get("ok"):
        print("lab node-action: %s" % answer.get("error"), file=sys.stderr)
        return 1
    print("lab node-action: %s %s: %s" % (args.node, args.action, ", ".join((answer.get("result") or {}).get("done") or ["nothing to do"])))
    return 0


def cmd_api_faults(args: argparse.Namespace) -> int:
    request: Dict[str, Any] = {"op": "api_faults", "action": args.action}
    if args.action == "add":
        request["faults"] = [{"verb": args.verb, "resource": args.resource, "kind": args.kind, "count": args.count,
                              "delay_s": args.delay}]
    answer = _request(os.path.abspath(args.state_dir), request)
    if answer is None:
        return EXIT_NOT_RUNNING
    if not answer.get("ok"):
        print("lab api-faults: %s" % answer.get("error"), file=sys.stderr)
        return 1
    for fault in answer.get("faults") or []:
        print("%(verb)s %(resource)s: %(kind)s, %(fired)d of %(count)d fired (0: until cleared)" % fault)
    return 0


def cmd_faults(args: argparse.Namespace) -> int:
    from lab.node.faults import runtime_fault_names

    print("\n".join(runtime_fault_names() + list(API_FAULTS)))
    return 0


def _cell(value: Any) -> str:
    return "-" if value in (None, "", [], {}) else str(value)


def cmd_status(args: argparse.Namespace) -> int:
    answer = _request(os.path.abspath(args.state_dir), {"op": "status"})
    if answer is None:
        return EXIT_NOT_RUNNING
    if not answer.get("ok"):
        print("lab status: %s" % answer.get("error"), file=sys.stderr)
        return 1
    status = answer["status"]
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print("lab %s  scenario=%s%s  state=%s" % (status["url"], status["scenario"], "  (API only)" if status["api_only"] else "", status["state_dir"]))
    pods_by_node = {p["node"]: p for p in status["pods"] if p.get("node")}
    rows = [("NODE", "READY", "GPU LABEL", "KUBELET", "PLUGIN POD", "POD STATUS", "RESTARTS", "PLUGIN", "GPU CAP/ALLOC", "FAULTS")]
    for name, node in sorted(status["nodes"].items()):
        pod = pods_by_node.get(name) or {}
        container = ((node.get("plugin_pod") or {}).get("container") or {})
        faults = sorted(list((node.get("faults") or {}).keys()) + list(node.get("api_faults") or []) + (["taint:" + t for t in node.get("taints") or []]))
        kubelet = node.get("kubelet")
        rows.append((
            name,
            "yes" if node.get("ready") else "NO",
            _cell(node.get("gpu_label")),
            "-" if kubelet is None else ("up" if kubelet.get("running") else "DOWN"),
            _cell(pod.get("name")),
            _cell(pod.get("status")),
            _cell(pod.get("restarts")) if pod else "-",
            _cell(container.get("state")),
            "%s/%s" % (_cell(node.get("capacity")), _cell(node.get("allocatable"))),
            ",".join(faults) or "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    print("daemonsets: %s" % (", ".join(status["daemonsets"]) or "none"))
    if status.get("cluster_faults"):
        print("cluster faults: %s" % ", ".join(status["cluster_faults"]))
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    info = _read_json(os.path.join(os.path.abspath(args.state_dir), "lab.json"))
    if not info:
        print("lab env: no lab in %s" % args.state_dir, file=sys.stderr)
        return EXIT_NOT_RUNNING
    print("export KUBECONFIG=%s" % info["kubeconfig"])
    print("export GPUNODE_LAB_INVENTORY=%s" % info["inventory"])
    print("export GPUNODE_LAB_STATE_DIR=%s" % info["state_dir"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lab", description="the gpunode.bringup lab: a simulated GPU fleet")
    parser.add_argument("--state-dir", default=None, help="lab state directory (default: %s)" % default_state_dir())
    sub = parser.add_subparsers(dest="command", required=True)

    def with_state_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--state-dir", default=argparse.SUPPRESS)
        return p

    up = with_state_dir(sub.add_parser("up", help="start a fleet in the background"))
    up.add_argument("--nodes", type=int, help="number of nodes (default 4; demo: 4)")
    up.add_argument("--scenario", default="healthy", choices=SCENARIOS)
    up.add_argument("--api-only", action="store_true", help="no node runtime: API objects only (large fleets)")
    up.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    up.add_argument("--timeout", type=float, default=180.0)
    up.add_argument("--fault-proxy", action="store_true",
                    help="put the fault proxy between the clients and the API server (lab/faultproxy.py)")
    up.add_argument("--api-port", type=int, help="the API server's port on 127.0.0.1 (default: a free one)")
    up.add_argument("--node-status-update-frequency", type=float, default=None, metavar="SECONDS",
                    help="the simulated kubelets' nodeStatusUpdateFrequency (default 10, the kubelet's)")
    up.set_defaults(func=cmd_up)

    down = with_state_dir(sub.add_parser("down", help="stop the fleet; no process is left"))
    down.set_defaults(func=cmd_down)

    status = with_state_dir(sub.add_parser("status", help="nodes, pods and faults"))
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    for verb, text in (("break", "inject a fault"), ("fix", "clear a fault")):
        p = with_state_dir(sub.add_parser(verb, help=text))
        p.add_argument("node", help="node name (`cluster` for daemonset_missing)")
        p.add_argument("fault", help="fault name (python -m lab faults)")
        p.add_argument("--arg", action="append", metavar="KEY=VALUE", help="fault argument (repeatable)")
        if verb == "break":
            p.add_argument("--sticky", action="store_true", help="plugin faults: survive the deletion of the plugin pod")
        p.set_defaults(func=cmd_fault)

    action = with_state_dir(sub.add_parser("node-action", help="what a node's OS does for a remediation command"))
    action.add_argument("node")
    action.add_argument("action", help="load_kernel_modules, start_persistenced, configure_runtime, restart_runtime, "
                                       "restart_kubelet, reboot")
    action.set_defaults(func=cmd_node_action)

    api = with_state_dir(sub.add_parser("api-faults", help="faults of the API as the clients see it (needs up --fault-proxy)"))
    api.add_argument("action", choices=("add", "list", "clear"))
    api.add_argument("--verb", help="get, list, watch, create, update, patch, delete, deletecollection")
    api.add_argument("--resource", help="e.g. pods, nodes, daemonsets, leases, pods/log")
    api.add_argument("--kind", choices=("429", "500", "drop", "slow"))
    api.add_argument("--count", type=int, default=1, help="how many requests it hits (0: until cleared)")
    api.add_argument("--delay", type=float, default=1.0, help="seconds, for kind slow")
    api.set_defaults(func=cmd_api_faults)

    faults = with_state_dir(sub.add_parser("faults", help="list fault names"))
    faults.set_defaults(func=cmd_faults)

    env = with_state_dir(sub.add_parser("env", help="shell exports for the running lab"))
    env.set_defaults(func=cmd_env)

    daemon = sub.add_parser("daemon", help="run the daemon in the foreground (what `up` starts)", add_help=False)
    daemon.set_defaults(func=None)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["daemon"]:
        from lab import daemon

        return daemon.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.state_dir is None:
        args.state_dir = default_state_dir()
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
