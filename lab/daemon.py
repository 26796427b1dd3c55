"""The lab daemon: one process holding a whole simulated fleet.

It starts the real control plane (lab/cluster.py: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, as child processes), the node agents (lab/node: a simulated kubelet per node,
a real API client, running NVIDIA's real device plugin in its pods; light agents with
``--api-only``), applies a scenario, writes ``kubeconfig``, ``inventory.yml`` and ``lab.json``
into the state dir, and answers a control socket (``<state dir>/control.sock``: one JSON request
per line, one JSON answer per line) through which ``python -m lab break/fix/status/down`` act
on the running fleet.

Every process the daemon starts is in its process group and dies with it (PR_SET_PDEATHSIG), so
``down`` leaves nothing behind, also after a crash.

Started by ``python -m lab up`` (see lab/cli.py); ``python -m lab daemon ...`` runs it in the
foreground.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import socketserver
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import yaml

from lab.contracts import NodeSpec
from lab.pins import pins
from lab.shapes import MIG_LAYOUTS, SHAPES, node_labels

LOG = logging.getLogger("lab.daemon")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB_LIB_DIR = os.path.join(REPO, ".build", "lab", "lib")
GPU_LABEL = "nvidia.com/gpu.present"
MAINTENANCE_TAINT = {"key": "gpu-maintenance", "value": "true", "effect": "NoSchedule"}
API_FAULTS = ("daemonset_missing", "label_missing", "taint_untolerated")
SCENARIOS = ("healthy", "demo") + SHAPES
DEFAULT_NODES = dict({"healthy": 4, "demo": 4}, **{shape: 2 for shape in SHAPES})
CLUSTER_TARGETS = ("cluster", "-")


def node_names(count: int) -> List[str]:
    width = max(2, len(str(count)))
    return ["gpu-node-%0*d" % (width, i) for i in range(1, count + 1)]


def plan_scenario(scenario: str, count: Optional[int], gpus: int) -> Tuple[List[NodeSpec], List[Tuple[str, str, Dict[str, Any]]]]:
    """The nodes of a scenario and the faults (node, fault, args) to set once they exist."""
    if scenario not in SCENARIOS:
        raise ValueError("unknown scenario %r (known: %s)" % (scenario, ", ".join(SCENARIOS)))
    if scenario == "demo":
        if count not in (None, 4):
            raise ValueError("scenario demo has exactly 4 nodes (got --nodes %d)" % count)
        count = 4
    count = DEFAULT_NODES[scenario] if count is None else count
    if count < 1:
        raise ValueError("--nodes must be at least 1")
    labels = dict({GPU_LABEL: "true"}, **node_labels(scenario))
    specs = [NodeSpec(name=n, root="", gpu_count=gpus, labels=dict(labels)) for n in node_names(count)]
    faults: List[Tuple[str, str, Dict[str, Any]]] = []
    if scenario == "demo":
        # 01 healthy; 02 lacks the scheduling label; 03's plugin crash-loops until its pod is
        # deleted; 04's kubelet restarts right after the plugin registers and the plugin does
        # not register again (stale) until its pod is deleted.
        specs[1].labels = {}
        faults.append((specs[1].name, "label_missing", {}))
        faults.append((specs[2].name, "plugin_crash", {"signature": "nvml_init_failed"}))
        faults.append((specs[3].name, "plugin_stale", {}))
        faults.append((specs[3].name, "kubelet_restart", {"after": "register"}))
    return specs, faults


def _is_plugin_daemonset(ds: Dict[str, Any]) -> bool:
    name = (ds.get("metadata") or {}).get("name", "")
    containers = (((ds.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []
    images = " ".join(str(c.get("image", "")) for c in containers)
    return "nvidia-device-plugin" in name or "k8s-device-plugin" in images


class LabDaemon:
    def __init__(self, state_dir: str, nodes: Optional[int] = None, scenario: str = "healthy",
                 api_only: bool = False, gpus: int = 8, crash_backoff: Tuple[float, float] = (10.0, 300.0),
                 endpoint_grace_s: float = 300.0, api_port: Optional[int] = None,
                 node_status_update_frequency: float = 10.0, fault_proxy: bool = False) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.scenario = scenario
        self.api_only = api_only
        self.gpus = gpus
        self.specs, self.initial_faults = plan_scenario(scenario, nodes, gpus)
        self.crash_backoff = crash_backoff
        self.endpoint_grace_s = endpoint_grace_s
        self.api_port = api_port
        self.node_status_update_frequency = node_status_update_frequency
        self.fault_proxy = fault_proxy
        self.proxy: Any = None
        self.cluster: Any = None
        self.fleet: Any = None
        self.api_faults: Dict[str, Dict[str, Any]] = {}  # "node/fault" -> args (what fix restores)
        self._saved_daemonsets: List[Dict[str, Any]] = []
        self._control: Optional[socketserver.BaseServer] = None
        self._stop = threading.Event()
        self.started_at = 0.0
        self.ready_s = 0.0
        self.timings: Dict[str, float] = {}
        self.shape_objects: List[str] = []

    # ---- paths -------------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        from lab.cluster import ControlPlane
        from lab.node.agent import NodeFleet

        self.started_at = time.time()
        os.makedirs(self.state_dir, exist_ok=True)
        for stale in ("lab.json", "control.sock"):
            try:
                os.unlink(self.path(stale))
            except FileNotFoundError:
                pass
        self._discard_old("nodes")
        self._discard_old("cluster")
        self.cluster = ControlPlane(self.path("cluster"), api_port=self.api_port).start()
        self.timings["control_plane"] = round(time.time() - self.started_at, 2)
        for spec in self.specs:
            spec.root = "" if self.api_only else os.path.join(self.state_dir, "nodes", spec.name)
        self.fleet = NodeFleet(self.state_dir, self.cluster, light=self.api_only, crash_backoff=self.crash_backoff,
                               endpoint_grace_s=self.endpoint_grace_s,
                               node_status_update_frequency=self.node_status_update_frequency).start()
        server = None
        if self.fault_proxy:
            from lab.faultproxy import FaultProxy

            pair = self.cluster.pki.issue("fault-proxy", "lab-fault-proxy", server_hosts=("127.0.0.1",), client=False)
            self.proxy = FaultProxy(self.cluster.url, self.cluster.ca_file, (pair.cert, pair.key))
            server = self.fleet.run(self.proxy.start())
        # the clients' kubeconfig: the API server, or the fault proxy in front of it
        self.cluster.admin_kubeconfig(self.path("kubeconfig"), server=server)
        self._cluster_objects()
        started = time.time()
        self.fleet.add_nodes(self.specs)
        self.timings["nodes"] = round(time.time() - started, 2)
        self.shape_objects = self._apply_shape()
        for node, fault, args in self.initial_faults:
            self.break_fault(node, fault, dict(args), initial=True)
        self._write_inventory()
        self._start_control()
        self.ready_s = time.time() - self.started_at
        self._write_lab_json()
        LOG.info("lab up: %d nodes (%s) in %.2fs (%s)", len(self.specs), self.scenario, self.ready_s, self.timings)

    def _cluster_objects(self) -> None:
        """What a GPU cluster has before the collection comes: the nvidia RuntimeClass (NVIDIA's
        container toolkit and the GPU Operator create it)."""
        from lab.node.kubeapi import ApiError

        async def create() -> None:
            try:
                await self.fleet.lab_api.create("/apis/node.k8s.io/v1/runtimeclasses", {
                    "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "nvidia"},
                    "handler": "nvidia"})
            except ApiError as exc:
                if exc.status != 409:
                    raise

        self.fleet.run(create())

    def _apply_shape(self) -> List[str]:
        """The deployment shape of the scenario (lab/shapes.py): node state, then API objects."""
        from lab import nvml_state, shapes

        if self.scenario not in SHAPES:
            return []
        gpus: List[Tuple[str, List[Dict[str, Any]]]] = []
        for spec in self.specs:
            if self.api_only:
                continue
            layout = self.fleet.layout(spec.name)
            if self.scenario in MIG_LAYOUTS:
                nvml_state.configure_mig(layout.nvml_state, MIG_LAYOUTS[self.scenario])
            shapes.prepare_node_root(self.scenario, layout.root, os.path.join(LAB_LIB_DIR, "libnvidia-ml.so.1"))
            gpus.append((spec.name, nvml_state.read_state(layout.nvml_state).get("gpus") or []))

        def wait(what: str, predicate: Any, timeout: float) -> None:
            deadline = time.time() + timeout
            while not predicate():
                if time.time() > deadline:
                    raise RuntimeError("lab shape %s: %s not reached in %.0fs" % (self.scenario, what, timeout))
                time.sleep(0.2)

        return shapes.apply_shape(self.scenario, self._api, gpus, wait)

    def _discard_old(self, name: str) -> None:
        """Move the last run's directory aside and delete it in the background (slow on some
        filesystems, and not needed before the new fleet is up)."""
        old = self.path(name)
        if os.path.exists(old):
            os.rename(old, self.path("%s.old.%d.%d" % (name, os.getpid(), time.time_ns())))
        trash = [self.path(n) for n in os.listdir(self.state_dir) if n.startswith(name + ".old.")]

        def remove() -> None:
            for path in trash:
                shutil.rmtree(path, ignore_errors=True)

        if trash:
            threading.Thread(target=remove, name="lab-cleanup", daemon=True).start()

    def stop(self) -> None:
        if self._control is not None:
            self._control.shutdown()
            self._control.server_close()
            self._control = None
        try:
            os.unlink(self.path("control.sock"))
        except FileNotFoundError:
            pass
        if self.proxy is not None:
            try:
                self.fleet.run(self.proxy.stop())
            except Exception:  # noqa: BLE001 - stopping anyway
                LOG.exception("fault proxy stop")
        if self.fleet is not None:
            self.fleet.stop()  # first: the plugins stop while the API server still answers
        if self.cluster is not None:
            self.cluster.stop()

    def serve_forever(self) -> None:
        while not self._stop.wait(1.0):
            if self.cluster is not None and self.cluster.dead():
                LOG.error("lab: control plane component(s) exited: %s", ", ".join(self.cluster.dead()))

    def request_stop(self) -> None:
        self._stop.set()

    # ---- outputs ----------------------------------------------------------------------------

    def _write_inventory(self) -> None:
        hosts: Dict[str, Any] = {}
        kubeconfig = self.path("kubeconfig")
        for spec in self.specs:
            host: Dict[str, Any] = {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
            }
            if not self.api_only:
                layout = self.fleet.layout(spec.name)
                host["gpunode_node_root"] = layout.root
                host["gpunode_node_environment"] = {
                    "LD_LIBRARY_PATH": LAB_LIB_DIR,
                    "GPUNODE_LAB_NVML_STATE": layout.nvml_state,
                }
            hosts[spec.name] = host
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        lab = "env PYTHONPATH=%s %s -m lab --state-dir %s node-action {{ inventory_hostname }} " % (
            repo, sys.executable, self.state_dir)
        inventory = {
            "all": {
                # implicit localhost takes `all` vars too: the API plays find the kubeconfig
                "vars": {
                    "gpunode_kubeconfig": kubeconfig,
                    # node-side modules run with the lab's Python; node_env only verifies it
                    "gpunode_node_python": sys.executable,
                    # remediation commands: the lab's stand-ins for modprobe, systemctl, reboot
                    "gpunode_become": False,
                    "gpunode_commands": {action: lab + action for action in NODE_ACTIONS},
                },
                "children": {
                    "gpu_nodes": {
                        "hosts": hosts,
                        "vars": {"gpunode_expected_gpu_count": self.gpus, "gpunode_lab": True,
                                 "gpunode_lab_api_only": self.api_only},
                    }
                }
            }
        }
        _write_atomic(self.path("inventory.yml"), yaml.safe_dump(inventory, default_flow_style=False, sort_keys=False))

    def _write_lab_json(self) -> None:
        document = {
            "ready": True,
            "state_dir": self.state_dir,
            "url": self.proxy.url if self.proxy is not None else self.cluster.url,
            "apiserver_url": self.cluster.url,
            "fault_proxy": self.proxy is not None,
            "token": self.cluster.admin_token,
            "ca": self.cluster.ca_file,
            "kubernetes_version": pins()["KUBERNETES_VERSION"],
            "audit_log": self.cluster.audit_log,
            "kubeconfig": self.path("kubeconfig"),
            "inventory": self.path("inventory.yml"),
            "control_socket": self.path("control.sock"),
            "pids": dict(self.cluster.pids(), daemon=os.getpid()),
            "pgid": os.getpgrp(),
            "timings": self.timings,
            "scenario": self.scenario,
            "shape_objects": self.shape_objects,
            "api_only": self.api_only,
            "gpus_per_node": self.gpus,
            "nodes": [s.name for s in self.specs],
            "node_roots": {s.name: s.root for s in self.specs} if not self.api_only else {},
            "nvml_library_dir": LAB_LIB_DIR,
            "started_at": self.started_at,
            "up_seconds": round(self.ready_s, 3),
        }
        _write_atomic(self.path("lab.json"), json.dumps(document, indent=2) + "\n")

    # ---- faults -----------------------------------------------------------------------------

    @staticmethod
    def fault_names() -> List[str]:
        from lab.node.faults import runtime_fault_names

        return runtime_fault_names() + list(API_FAULTS)

    def _check_node(self, node: str) -> None:
        if node not in {s.name for s in self.specs}:
            raise ValueError("no node %r in this lab (nodes: %s)" % (node, ", ".join(s.name for s in self.specs)))

    def break_fault(self, node: str, fault: str, args: Dict[str, Any], initial: bool = False) -> Dict[str, Any]:
        if fault in API_FAULTS:
            return self._api_fault(node, fault, args, broken=True, initial=initial)
        if self.api_only:
            raise ValueError("fault %s needs the node runtime; this lab is --api-only (API faults: %s)"
                             % (fault, ", ".join(API_FAULTS)))
        self._check_node(node)
        return self.fleet.break_fault(node, fault, **args)

    def fix_fault(self, node: str, fault: str, args: Dict[str, Any]) -> Dict[str, Any]:
        if fault in API_FAULTS:
            return self._api_fault(node, fault, args, broken=False)
        if self.api_only:
            raise ValueError("fault %s needs the node runtime; this lab is --api-only" % fault)
        self._check_node(node)
        return self.fleet.fix_fault(node, fault, **args)

    def node_action(self, node: str, action: str) -> Dict[str, Any]:
        """What the node's OS would do for a remediation command (modprobe, systemctl, reboot).

        The collection runs these through its `gpunode_commands` variable; the lab inventory points
        them at `python -m lab node-action NODE ACTION`.
        """
        if self.api_only:
            raise ValueError("node actions need the node runtime; this lab is --api-only")
        self._check_node(node)
        if action not in NODE_ACTIONS:
            raise ValueError("unknown node action %r (known: %s)" % (action, ", ".join(NODE_ACTIONS)))
        done: List[str] = []
        # a stopped kubelet is started once (clearing kubelet_down starts it), not started and restarted
        was_down = (self.fleet.status().get(node) or {}).get("kubelet", {}).get("running") is False
        for fault in NODE_ACTIONS[action]:
            self.fleet.fix_fault(node, fault)
            done.append("cleared " + fault)
        if action in ("restart_kubelet", "reboot"):
            running = (self.fleet.status().get(node) or {}).get("kubelet", {})
            if isinstance(running, dict) and running.get("running") is False:
                self.fleet.start_kubelet(node)
                done.append("kubelet started")
            elif was_down:
                done.append("kubelet started")
            else:
                self.fleet.restart_kubelet(node)
                done.append("kubelet restarted")
        return {"action": action, "done": done}

    def _api(self, method: str, path: str, body: Any = None, query: Optional[Dict[str, Any]] = None,
             content_type: str = "application/json", ok_missing: bool = False) -> Any:
        """One request with the lab's own identity (not counted as the collection's)."""
        return self.fleet.run(self.fleet.lab_api.request(method, path, body, query=query, content_type=content_type,
                                                         ok_missing=ok_missing))

    def _list(self, path: str) -> List[Dict[str, Any]]:
        return list((self._api("GET", path) or {}).get("items") or [])

    def _api_fault(self, node: str, fault: str, args: Dict[str, Any], broken: bool, initial: bool = False) -> Dict[str, Any]:
        merge = "application/merge-patch+json"
        if fault == "daemonset_missing":
            key = "cluster/%s" % fault
            if broken:
                removed = []
                for ds in self._list("/apis/apps/v1/daemonsets"):
                    if not _is_plugin_daemonset(ds):
                        continue
                    meta = ds["metadata"]
                    self._api("DELETE", "/apis/apps/v1/namespaces/%s/daemonsets/%s" % (meta.get("namespace"), meta["name"]),
                              {"propagationPolicy": "Background"}, ok_missing=True)
                    self._saved_daemonsets.append(_recreatable(ds))
                    removed.append("%s/%s" % (meta.get("namespace"), meta["name"]))
                if not removed:
                    raise ValueError("no device plugin DaemonSet is deployed: nothing to delete")
                self.api_faults[key] = {"deleted": removed}
                return {"deleted": removed}
            restored = []
            for body in self._saved_daemonsets:
                meta = body["metadata"]
                path = "/apis/apps/v1/namespaces/%s/daemonsets" % meta.get("namespace")
                if self._api("GET", "%s/%s" % (path, meta["name"]), ok_missing=True) is None:
                    self._api("POST", path, body)
                    restored.append("%s/%s" % (meta.get("namespace"), meta["name"]))
            self._saved_daemonsets = []
            self.api_faults.pop(key, None)
            return {"restored": restored}
        self._check_node(node)
        key = "%s/%s" % (node, fault)
        if fault == "label_missing":
            label = str(args.get("label", GPU_LABEL))
            if not initial:
                value = None if broken else str(args.get("value", "true"))
                self._api("PATCH", "/api/v1/nodes/%s" % node, {"metadata": {"labels": {label: value}}}, content_type=merge)
            if broken:
                self.api_faults[key] = {"label": label}
            else:
                self.api_faults.pop(key, None)
            return {}
        if fault == "taint_untolerated":
            taint = {
                "key": str(args.get("key", MAINTENANCE_TAINT["key"])),
                "value": str(args.get("value", MAINTENANCE_TAINT["value"])),
                "effect": str(args.get("effect", MAINTENANCE_TAINT["effect"])),
            }
            current = self._api("GET", "/api/v1/nodes/%s" % node) or {}
            taints = [t for t in (current.get("spec") or {}).get("taints") or [] if t.get("key") != taint["key"]]
            if broken:
                taints.append(taint)
                self.api_faults[key] = taint
            else:
                self.api_faults.pop(key, None)
            self._api("PATCH", "/api/v1/nodes/%s" % node, {"spec": {"taints": taints or None}}, content_type=merge)
            return {}
        raise ValueError("unknown API fault %r" % fault)

    # ---- status -----------------------------------------------------------------------------

    def _prune_api_faults(self, api_nodes: Dict[str, Dict[str, Any]], daemonsets: List[Dict[str, Any]]) -> None:
        """Forget API faults someone (e.g. the collection) has repaired through the API."""
        for key, args in list(self.api_faults.items()):
            node_name, fault = key.split("/", 1)
            node = api_nodes.get(node_name) or {}
            if fault == "label_missing":
                holds = args.get("label", GPU_LABEL) not in ((node.get("metadata") or {}).get("labels") or {})
            elif fault == "taint_untolerated":
                holds = any(t.get("key") == args.get("key") for t in (node.get("spec") or {}).get("taints") or [])
            else:
                holds = not any(_is_plugin_daemonset(d) for d in daemonsets)
            if not holds:
                del self.api_faults[key]

    def status(self) -> Dict[str, Any]:
        runtime = self.fleet.status() if not self.api_only else {}
        api_nodes = {n["metadata"]["name"]: n for n in self._list("/api/v1/nodes")}
        all_daemonsets = self._list("/apis/apps/v1/daemonsets")
        self._prune_api_faults(api_nodes, all_daemonsets)
        nodes = {}
        for api_node in api_nodes.values():
            name = api_node["metadata"]["name"]
            status = api_node.get("status") or {}
            ready = next((c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"), "Unknown")
            entry = {
                "ready": ready == "True",
                "gpu_label": (api_node["metadata"].get("labels") or {}).get(GPU_LABEL),
                "taints": ["%s=%s:%s" % (t.get("key"), t.get("value", ""), t.get("effect")) for t in (api_node.get("spec") or {}).get("taints") or []],
                "capacity": (status.get("capacity") or {}).get("nvidia.com/gpu"),
                "allocatable": (status.get("allocatable") or {}).get("nvidia.com/gpu"),
                "api_faults": sorted(k.split("/", 1)[1] for k in self.api_faults if k.startswith(name + "/")),
            }
            entry.update(runtime.get(name, {}))
            nodes[name] = entry
        pods = []
        for pod in self._list("/api/v1/pods"):
            meta = pod["metadata"]
            statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
            state = statuses[0].get("state") or {}
            phase = (pod.get("status") or {}).get("phase", "")
            reason = ((state.get("waiting") or {}).get("reason")) or phase
            pods.append({
                "namespace": meta.get("namespace"),
                "name": meta["name"],
                "node": (pod.get("spec") or {}).get("nodeName"),
                "status": reason,
                "restarts": statuses[0].get("restartCount", 0),
            })
        daemonsets = ["%s/%s" % (d["metadata"].get("namespace"), d["metadata"]["name"]) for d in all_daemonsets]
        return {
            "state_dir": self.state_dir,
            "url": self.cluster.url,
            "kubernetes_version": pins()["KUBERNETES_VERSION"],
            "control_plane": self.cluster.describe()["components"],
            "scenario": self.scenario,
            "api_only": self.api_only,
            "nodes": nodes,
            "pods": pods,
            "daemonsets": daemonsets,
            "cluster_faults": sorted(k.split("/", 1)[1] for k in self.api_faults if k.startswith("cluster/")),
        }

    # ---- control socket ---------------------------------------------------------------------

    def handle(self, request: Dict[str, Any]) -> Dict[str, Any]:
        op = request.get("op")
        try:
            if op == "ping":
                return {"ok": True, "pid": os.getpid()}
            if op == "status":
                return {"ok": True, "status": self.status()}
            if op == "faults":
                return {"ok": True, "faults": self.fault_names()}
            if op in ("break", "fix"):
                node, fault = str(request.get("node", "")), str(request.get("fault", ""))
                args = dict(request.get("args") or {})
                if fault not in self.fault_names():
                    raise ValueError("unknown fault %r (known: %s)" % (fault, ", ".join(self.fault_names())))
                if node in CLUSTER_TARGETS and fault != "daemonset_missing":
                    raise ValueError("fault %s needs a node name" % fault)
                call = self.break_fault if op == "break" else self.fix_fault
                return {"ok": True, "result": call(node, fault, args)}
            if op == "node_action":
                return {"ok": True, "result": self.node_action(str(request.get("node", "")),
                                                               str(request.get("action", "")))}
            if op == "api_faults":
                if self.proxy is None:
                    raise ValueError("API faults need the fault proxy: start the lab with `up --fault-proxy`")
                action = request.get("action", "list")
                if action == "add":
                    return {"ok": True, "faults": self.proxy.add(list(request.get("faults") or []))}
                if action == "clear":
                    self.proxy.clear()
                    return {"ok": True, "faults": []}
                if action == "reset_counts":
                    self.proxy.reset_counts()
                    return {"ok": True}
                return dict({"ok": True, "faults": self.proxy.describe()}, **self.proxy.counts())
            if op == "stop":
                threading.Thread(target=self.request_stop, daemon=True).start()
                return {"ok": True}
            return {"ok": False, "error": "unknown op %r" % op}
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
            LOG.info("control %s failed: %s", op, exc)
            return {"ok": False, "error": str(exc)}

    def _start_control(self) -> None:
        daemon = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for raw in self.rfile:
                    try:
                        request = json.loads(raw)
                    except ValueError:
                        answer: Dict[str, Any] = {"ok": False, "error": "not JSON"}
                    else:
                        answer = daemon.handle(request)
                    self.wfile.write((json.dumps(answer) + "\n").encode())
                    self.wfile.flush()

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        path = self.path("control.sock")
        self._control = Server(path, Handler)
        threading.Thread(target=self._control.serve_forever, name="lab-control", daemon=True).start()


# Remediation commands of the collection and the lab faults each one clears on a node.
NODE_ACTIONS: Dict[str, List[str]] = {
    "load_kernel_modules": ["driver_not_loaded"],
    "start_persistenced": ["persistence_off"],
    "configure_runtime": ["runtime_missing_nvidia"],
    "restart_runtime": [],
    "restart_kubelet": ["kubelet_down"],
    "reboot": ["driver_library_mismatch", "driver_not_loaded", "kubelet_down"],
}


def _recreatable(obj: Dict[str, Any]) -> Dict[str, Any]:
    meta = {k: v for k, v in obj["metadata"].items()
            if k in ("name", "namespace", "labels", "annotations")}
    body = {"apiVersion": obj.get("apiVersion", "apps/v1"), "kind": obj.get("kind", "DaemonSet"),
            "metadata": meta, "spec": obj.get("spec")}
    return body


def _write_atomic(path: str, text: str) -> None:
    tmp = "%s.tmp" % path
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def control_request(state_dir: str, request: Dict[str, Any], timeout: float = 60.0) -> Dict[str, Any]:
    """Send one request to a running daemon's control socket."""
    path = os.path.join(state_dir, "control.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall((json.dumps(request) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data or b'{"ok": false, "error": "no answer"}')


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab daemon", description="run the lab daemon in the foreground")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--scenario", default="healthy", choices=SCENARIOS)
    parser.add_argument("--api-only", action="store_true")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--endpoint-grace", type=float, default=300.0)
    parser.add_argument("--api-port", type=int)
    parser.add_argument("--node-status-update-frequency", type=float, default=10.0)
    parser.add_argument("--fault-proxy", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before gRPC loads: no INFO lines in daemon.log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    daemon = LabDaemon(args.state_dir, args.nodes, args.scenario, args.api_only, args.gpus,
                       endpoint_grace_s=args.endpoint_grace, api_port=args.api_port,
                       node_status_update_frequency=args.node_status_update_frequency,
                       fault_proxy=args.fault_proxy)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: daemon.request_stop())
    from lab.cluster import ControlPlaneError

    try:
        daemon.start()
    except ControlPlaneError as exc:
        LOG.error("lab daemon failed to start: %s", exc)
        daemon.stop()
        return 1
    except Exception:
        LOG.exception("lab daemon failed to start")
        daemon.stop()
        return 1
    daemon.serve_forever()
    LOG.info("lab daemon stopping")
    daemon.stop()
    LOG.info("lab daemon stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
