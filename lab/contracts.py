"""What the lab's parts share: the description of a simulated node.

The API server, the controllers and the scheduler are the real ones (lab/cluster.py); the node
agents (lab/node/agent.py) talk to them only through the Kubernetes API, as kubelets do.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class NodeSpec:
    """A simulated node as the lab creates it."""

    name: str
    root: str  # directory standing in for the node's "/" ("" for an API-only node)
    gpu_count: int = 8
    labels: Dict[str, str] = field(default_factory=dict)
    taints: List[Dict[str, str]] = field(default_factory=list)
