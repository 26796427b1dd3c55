"""gpunode.bringup.gpu_node through ansible-playbook against the real lab: the scheduling step's fix
(a GPU node the device plugin does not target, the lab's label_missing fault, gets its label, and
then the real DaemonSet controller and scheduler give it a plugin pod, NVIDIA's plugin registers),
check mode -> apply -> apply again -> check mode again, cordon, removal (the controller deletes
the pod again), bad input. The real API server stores what the module patched: the test reads
the Node back (labels, annotations, spec.unschedulable) and counts the patches it stored in the
audit log."""
from __future__ import annotations

from pathlib import Path

from device_plugin_lab import (
    TARGETS,
    deploy_plugin,
    lab_fleet,
    node_object,
    plugin_pods,
    pods_on,
    run_playbook,
    stored_writes,
    wait_until,
)

NEW_NODE = "gpu-node-03"


def test_label_cordon_round_trip(tmp_path: Path) -> None:
    with lab_fleet(nodes=3, gpus=2) as fleet:
        fleet.break_(NEW_NODE, "label_missing")
        deploy_plugin(fleet)
        wait_until("plugin pods on the two labelled nodes", lambda: len(plugin_pods(fleet)) == 2)
        fleet.wait_advertising(["gpu-node-01", "gpu-node-02"], timeout=180)
        assert pods_on(plugin_pods(fleet), NEW_NODE) == []
        fleet.reset_counters()
        proc, results = run_playbook(TARGETS / "gpu_node" / "labels.yml", tmp_path,
                                     {"kubeconfig": fleet.kubeconfig, "node": NEW_NODE})
        assert proc.returncode == 0, proc.stdout[-6000:]
        # what the module stored: label, annotation and cordon once each, their removal once
        patches = [w for w in stored_writes(fleet) if w[1] == "nodes"]
        assert patches == [("patch", "nodes", 200), ("patch", "nodes", 200)], stored_writes(fleet)
        node = node_object(fleet, NEW_NODE)
        assert "nvidia.com/gpu.present" not in node["metadata"]["labels"]
        assert "gpunode.bringup/maintenance" not in (node["metadata"].get("annotations") or {})
        assert not node["spec"].get("unschedulable")
        # the DaemonSet controller removed the plugin pod once the label went away
        wait_until("the plugin pod on %s deleted" % NEW_NODE, lambda: not pods_on(plugin_pods(fleet), NEW_NODE))
    applied = results["apply_first"]
    assert applied["node"]["annotations"]["gpunode.bringup/maintenance"] == "XID 79 on GPU 3, ticket OPS-1234"
    assert results["remove"]["diff"]["before"]["labels"]["nvidia.com/gpu.present"] == "true"
    # the plugin pod the label brought: Running on the node, NVIDIA's plugin registered its GPUs
    info = results["info_after_label"]["nodes"][0]
    assert info["plugin_pod"]["node"] == NEW_NODE and info["plugin_pod"]["phase"] == "Running"
    assert info["resources"]["capacity"] == {"nvidia.com/gpu": 2}
