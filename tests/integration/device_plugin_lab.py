"""Shared by the integration tests of the API and node modules (device_plugin, device_plugin_info,
gpu_node, device_plugin_restart, gpu_smoke_test, device_plugin_probe, node_info, nvml_info,
container_runtime_info): a real lab fleet for one test module (tests/integration/lab_fleet.py: the
real kube-apiserver, controllers and scheduler of Kubernetes v1.37.2, simulated kubelets running
NVIDIA's real device plugin v0.17.4), the device plugin deployed as the collection renders it,
waits on what the real components do, what the audit log says was stored, and ansible-playbook
runs of the targets against the fleet."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _path in (ROOT / ".build", ROOT, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from ansible_collections.gpunode.bringup.plugins.module_utils._device_plugin import (  # noqa: E402
    DevicePluginSpec,
    config_text,
    render_config_map,
    render_daemonset,
    spec_from_params,
)
from lab_fleet import LabFleet  # noqa: E402

VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
ANSIBLE_PLAYBOOK = str(Path(PYTHON).parent / "ansible-playbook")
TARGETS = HERE / "targets"
GPU = "nvidia.com/gpu"
GPU_LABEL = "nvidia.com/gpu.present"
NS = "kube-system"
MERGE_PATCH = "application/merge-patch+json"


@contextmanager
def lab_fleet(**options: Any) -> Iterator[LabFleet]:
    """A started LabFleet (``python -m lab up`` in its own state dir), always taken down."""
    fleet = LabFleet(**options).up()
    try:
        yield fleet
    finally:
        fleet.down()


def wait_until(what: str, probe: Callable[[], Any], timeout: float = 120.0, pause: float = 0.3) -> Any:
    """``probe()`` until it returns something true (returned); fails naming ``what`` on the timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError("lab: %s not reached after %ds (last: %s)" % (what, timeout, str(last)[:2000]))
        time.sleep(pause)


def nothing_listens(path: str) -> bool:
    """No socket at ``path``, or one nobody listens on: what a plugin that crashed (SIGKILL leaves
    its socket file behind) or never served leaves."""
    if not os.path.lexists(path):
        return True
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return True
        except OSError:
            return False
    return False


# ---- the device plugin as the collection renders it, applied by the lab's administrator ------------

def plugin_spec(**params: Any) -> DevicePluginSpec:
    return spec_from_params(params) if params else DevicePluginSpec()


def deploy_plugin(fleet: LabFleet, spec: Optional[DevicePluginSpec] = None) -> DevicePluginSpec:
    """The collection's ConfigMap and DaemonSet, server-side applied through kubectl (field
    manager lab-test), for the tests whose subject is not the device_plugin module."""
    spec = spec or DevicePluginSpec()
    text = config_text(spec.config)
    fleet.apply(render_config_map(spec, text))
    fleet.apply(render_daemonset(spec, text))
    return spec


def remove_plugin(fleet: LabFleet, spec: DevicePluginSpec, timeout: float = 120.0) -> None:
    """Delete the DaemonSet and its ConfigMap, and wait until the garbage collector and the
    kubelets have removed its pods."""
    base = "/apis/apps/v1/namespaces/%s/daemonsets/%s" % (spec.namespace, spec.name)
    if fleet.api(base, missing_ok=True) is not None:
        fleet.api(base, "DELETE", {"propagationPolicy": "Background"}, missing_ok=True)
    fleet.api("/api/v1/namespaces/%s/configmaps/%s" % (spec.namespace, spec.config_map_name), "DELETE",
              missing_ok=True)
    wait_until("the pods of DaemonSet %s/%s gone" % (spec.namespace, spec.name),
               lambda: not plugin_pods(fleet, spec) and fleet.api(base, missing_ok=True) is None, timeout)


def selector(spec: DevicePluginSpec) -> str:
    return ",".join("%s=%s" % item for item in sorted(spec.selector_labels.items()))


def plugin_pods(fleet: LabFleet, spec: Optional[DevicePluginSpec] = None) -> List[Dict[str, Any]]:
    """The DaemonSet's pods as the API lists them (a request counted in the audit log)."""
    spec = spec or DevicePluginSpec()
    answer = fleet.api("/api/v1/namespaces/%s/pods?labelSelector=%s" % (spec.namespace, selector(spec)))
    return list(answer.get("items") or [])


def pods_on(pods: List[Dict[str, Any]], node: str) -> List[Dict[str, Any]]:
    return [p for p in pods if (p.get("spec") or {}).get("nodeName") == node]


def pod_ready(pod: Dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def node_object(fleet: LabFleet, node: str) -> Dict[str, Any]:
    return fleet.api("/api/v1/nodes/%s" % node)


def patch_node(fleet: LabFleet, node: str, patch: Dict[str, Any]) -> Dict[str, Any]:
    """A JSON merge patch of the Node as the administrator (``None`` removes a key)."""
    return fleet.api("/api/v1/nodes/%s" % node, "PATCH", patch, content_type=MERGE_PATCH)


def create_namespace(fleet: LabFleet, name: str) -> None:
    if fleet.api("/api/v1/namespaces/%s" % name, missing_ok=True) is None:
        fleet.api("/api/v1/namespaces", "POST", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})


def daemonset(fleet: LabFleet, namespace: str = NS, name: str = "nvidia-device-plugin-daemonset") -> Optional[Dict[str, Any]]:
    return fleet.api("/apis/apps/v1/namespaces/%s/daemonsets/%s" % (namespace, name), missing_ok=True)


def config_map(fleet: LabFleet, namespace: str = NS, name: str = "nvidia-device-plugin-config") -> Optional[Dict[str, Any]]:
    return fleet.api("/api/v1/namespaces/%s/configmaps/%s" % (namespace, name), missing_ok=True)


def stored_writes(fleet: LabFleet) -> List[Tuple[str, str, int]]:
    """Writes since the last reset that the API server stored (not dry runs, not refused):
    (verb, resource, HTTP code) from the audit log."""
    assert fleet.audit is not None
    writes = []
    for event in fleet.audit.events():
        ref = event.get("objectRef") or {}
        code = int((event.get("responseStatus") or {}).get("code") or 0)
        if event.get("verb") in ("create", "update", "patch", "delete", "deletecollection") \
                and "dryRun=All" not in event.get("requestURI", "") and code < 400:
            resource = ref.get("resource", "") + ("/" + ref["subresource"] if ref.get("subresource") else "")
            writes.append((event["verb"], resource, code))
    return writes


# ---- ansible-playbook on localhost ----------------------------------------------------------------

def ansible_env(work: Path) -> Dict[str, str]:
    link = ROOT / ".build" / "ansible_collections" / "gpunode" / "bringup"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("../../..", str(link))
    env = dict(os.environ)
    for name in ("home", "tmp"):
        (work / name).mkdir(parents=True, exist_ok=True)
    env.update(ANSIBLE_HOME=str(work / "home"), ANSIBLE_REMOTE_TMP=str(work / "tmp"),
               ANSIBLE_LOCAL_TEMP=str(work / "tmp"), ANSIBLE_COLLECTIONS_PATH=str(ROOT / ".build"),
               ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
               ANSIBLE_DEPRECATION_WARNINGS="false", ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="false",
               ANSIBLE_PIPELINING="true")
    env.pop("K8S_AUTH_KUBECONFIG", None)
    env.pop("PYTHONPATH", None)
    return env


def run_playbook(playbook: Path, work: Path, extra_vars: Dict[str, Any], timeout: float = 600
                 ) -> Tuple[subprocess.CompletedProcess, Dict[str, Any]]:
    """Run a playbook on localhost; it writes its registered results to ``results_file``."""
    results_file = work / ("%s.results.json" % playbook.stem)
    vars_file = work / ("%s.vars.json" % playbook.stem)
    if results_file.exists():
        results_file.unlink()
    vars_file.write_text(json.dumps(dict(extra_vars, results_file=str(results_file))))
    proc = subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", "localhost,", "-c", "local", "-e", "ansible_python_interpreter=" + PYTHON,
         "-e", "@" + str(vars_file), str(playbook)],
        cwd=str(work), env=ansible_env(work), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        timeout=timeout, check=False)
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    return proc, results
