"""gpunode.bringup.gpu_node through ansible-playbook against the lab API server: the scheduling step's
fix (a GPU node the device plugin does not target gets its label, and then its plugin pod),
check mode -> apply -> apply again -> check mode again, cordon, removal, bad input."""
from __future__ import annotations

from pathlib import Path

from ansible_collections.gpunode.bringup.plugins.module_utils._device_plugin import (
    DevicePluginSpec,
    config_text,
    render_daemonset,
)
from ansible_collections.gpunode.bringup.tests.integration.device_plugin_lab import (
    TARGETS,
    gpu_nodes,
    lab_cluster,
    run_playbook,
)
from lab.contracts import NodeSpec


def test_label_cordon_round_trip(tmp_path: Path) -> None:
    nodes = gpu_nodes(2, tmp_path) + [NodeSpec(name="gpu-new", root=str(tmp_path), gpu_count=8)]
    with lab_cluster(tmp_path, nodes) as (server, kubeconfig):
        spec = DevicePluginSpec()
        server.store.create_object(render_daemonset(spec, config_text(spec.config)))
        proc, results = run_playbook(TARGETS / "gpu_node" / "labels.yml", tmp_path,
                                     {"kubeconfig": kubeconfig, "node": "gpu-new"})
        assert proc.returncode == 0, proc.stdout[-6000:]
        node = server.store.get_object("v1", "Node", None, "gpu-new")
        assert "nvidia.com/gpu.present" not in node["metadata"]["labels"]
        assert "gpunode.bringup/maintenance" not in (node["metadata"].get("annotations") or {})
        assert not node["spec"].get("unschedulable")
        managers = {entry["manager"] for entry in node["metadata"].get("managedFields") or []}
    assert results["apply_first"]["node"]["annotations"]["gpunode.bringup/maintenance"] == \
        "XID 79 on GPU 3, ticket OPS-1234"
    assert results["remove"]["diff"]["before"]["labels"]["nvidia.com/gpu.present"] == "true"
    assert managers  # the lab records who wrote the node
