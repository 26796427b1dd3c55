"""Interfaces between the lab's parts, all living in one lab daemon process.

- The API server (lab/apiserver/) owns the cluster objects. Its DaemonSet controller decides
  which node runs a plugin pod and tells the node runtime through :class:`NodeRuntime`.
- The node runtime (lab/node/) owns each simulated node: its kubelet (Registration server on
  kubelet.sock, pod-resources server, checkpoint file) and its device plugin process stand-in.
  It reports back to the API server through :class:`ClusterHooks`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Tuple


@dataclass
class PluginPodStatus:
    """What the node runtime reports about the plugin container of one pod."""

    running: bool  # container process alive
    ready: bool  # plugin registered with the kubelet (the real pod has no readiness probe; the
    #              lab reports Ready when the container is running, like the kubelet does)
    restart_count: int = 0
    waiting_reason: Optional[str] = None  # e.g. "CrashLoopBackOff" while not running
    last_exit_code: Optional[int] = None  # last termination of the container
    last_reason: Optional[str] = None  # e.g. "Error"
    started_at: Optional[str] = None  # RFC 3339


@dataclass
class NodeSpec:
    """A simulated node as the lab creates it."""

    name: str
    root: str  # directory standing in for the node's "/"
    gpu_count: int = 8
    labels: Dict[str, str] = field(default_factory=dict)
    taints: List[Dict[str, str]] = field(default_factory=list)


class NodeRuntime(Protocol):
    """Implemented by lab/node/: called by the API server's DaemonSet controller and pod API.

    A runtime may also implement the optional methods of :class:`WorkloadRunner`; the API server
    looks them up with ``getattr`` and works without them.
    """

    def start_plugin_pod(self, node: str, pod: Dict[str, Any]) -> None:
        """A plugin pod (full API object) was bound to ``node``: start its plugin."""

    def stop_plugin_pod(self, node: str, pod_name: str) -> None:
        """The pod was deleted: stop its plugin (its socket goes away)."""

    def pod_log(self, node: str, pod_name: str, tail_lines: Optional[int] = None) -> str:
        """The plugin container's output so far (served as the pod log)."""


class WorkloadRunner(Protocol):
    """Optional NodeRuntime methods for ordinary (non-DaemonSet) pods, which the API server's
    scheduler and kubelet stand-in run when ``LabApiServer(workloads=True)``."""

    def run_workload_pod(self, node: str, pod: Dict[str, Any]) -> Tuple[int, str]:
        """Run the containers of a workload pod admitted on ``node`` (``pod``: the full API object,
        bound and Running, e.g. the collection's GPU smoke pod that runs ``nvidia-smi -L``) and
        return ``(exit_code, log)``: exit code 0 makes the pod Succeeded (restartPolicy Never or
        OnFailure), another makes it Failed with container reason Error; ``log`` is served as the
        pod log. Called in a worker thread of the API server (blocking is fine, a few seconds at
        most); the pod is Running for at least 0.2 s. An exception counts as exit code 1 with the
        exception text as log. Without this method: exit code 0 and one line per requested GPU,
        ``GPU <i>: lab GPU (UUID: GPU-...) (lab, no runtime)``."""


class ClusterHooks(Protocol):
    """Implemented by lab/apiserver/: called by the node runtime (kubelet stand-in)."""

    def update_pod_status(self, namespace: str, name: str, status: PluginPodStatus) -> None:
        """Set the pod's status (phase, conditions, containerStatuses) from the runtime's view."""

    def update_node_status(self, node: str, capacity: Dict[str, str],
                           allocatable: Dict[str, str], ready: Optional[bool] = None) -> None:
        """Merge extended resources into status.capacity/allocatable (a resource absent from
        ``capacity`` is removed from both); set the Ready condition when ``ready`` is given."""

    def get_object(self, api_version: str, kind: str, namespace: Optional[str],
                   name: str) -> Optional[Dict[str, Any]]:
        """Read an object (e.g. the plugin's ConfigMap); None when absent."""
