"""The playbooks users run, on full lab fleets: the ordered plan fixes what is safe, refuses what
is disruptive unless asked, writes nothing in check mode or verify, and a second run changes
nothing."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml

from lab_fleet import LabFleet


GPU_HOSTS = ["gpu-node-01", "gpu-node-02", "gpu-node-03", "gpu-node-04"]


@pytest.fixture(scope="module")
def demo():
    fleet = LabFleet(scenario="demo").up()
    try:
        yield fleet
    finally:
        fleet.down()


def test_demo_fleet_check_mode_then_bringup_then_nothing_to_do(demo):
    # check mode on the broken fleet: the plan is printed, nothing is written anywhere
    before = demo.snapshot()
    demo.reset_counters()
    check = demo.playbook("gpu_node_bringup.yml", check=True)
    assert demo.writes() == 0, demo.counters()
    assert demo.snapshot() == before
    assert check.rc != 0  # nodes stay failed in check mode
    for host in GPU_HOSTS:  # the DaemonSet is not there yet: that is the first thing the plan would do
        assert check.node_report(host)["failed_step"] == "daemonset"
        assert check.node_report(host)["next_action"] == "would apply the device plugin DaemonSet"

    # the real run fixes every node with safe actions
    first = demo.playbook("gpu_node_bringup.yml")
    assert first.rc == 0, first.output[-4000:]
    assert first.report["counts"] == {"ok": 1, "fixed": 3, "failed": 0, "skipped": 0}
    assert first.steps("gpu-node-02")["scheduling"] == "fixed"
    assert first.steps("gpu-node-03")["plugin_pod"] == "fixed"
    assert first.steps("gpu-node-04")["socket"] == "fixed"  # the kubelet removed the stale plugin's socket
    assert first.changed("gpu-node-01") == 0
    assert all(first.changed(h) > 0 for h in GPU_HOSTS[1:])

    # a second run finds nothing to do
    second = demo.playbook("gpu_node_bringup.yml")
    assert second.rc == 0, second.output[-4000:]
    assert all(second.changed(h) == 0 for h in GPU_HOSTS + ["localhost"]), second.recap
    assert second.report["counts"]["ok"] == 4

    # verify on the healthy fleet: exit 0, no write
    demo.reset_counters()
    verify = demo.playbook("gpu_node_verify.yml")
    assert verify.rc == 0, verify.output[-4000:]
    assert demo.writes() == 0, demo.counters()
    assert all(verify.changed(h) == 0 for h in GPU_HOSTS)

    # break two nodes again: check mode of the remediation playbook says what it would do, writes nothing
    demo.break_("gpu-node-03", "plugin_crash", signature="nvml_init_failed")
    demo.break_("gpu-node-02", "label_missing")
    before = demo.snapshot()
    demo.reset_counters()
    check = demo.playbook("gpu_node_remediate.yml", check=True)
    assert demo.writes() == 0, demo.counters()
    assert demo.snapshot() == before
    assert check.node_report("gpu-node-01")["verdict"] == "ok"
    assert check.node_report("gpu-node-03")["failed_step"] == "plugin_pod"
    assert check.node_report("gpu-node-03")["next_action"].startswith("would delete the plugin pod")
    assert check.node_report("gpu-node-02")["failed_step"] == "scheduling"
    assert check.node_report("gpu-node-02")["next_action"].startswith("would add the GPU label")


@pytest.fixture()
def fleet():
    fleet = LabFleet(nodes=2, scenario="healthy").up()
    try:
        first = fleet.playbook("gpu_node_bringup.yml")
        assert first.rc == 0, first.output[-4000:]
        yield fleet
    finally:
        fleet.down()


def test_verify_fails_on_a_broken_node_and_writes_nothing(fleet):
    fleet.break_("gpu-node-02", "plugin_crash", signature="nvml_init_failed", sticky="true")
    before = fleet.snapshot()
    fleet.reset_counters()
    verify = fleet.playbook("gpu_node_verify.yml")
    assert verify.rc != 0
    assert fleet.writes() == 0, fleet.counters()
    assert fleet.snapshot() == before
    node = verify.node_report("gpu-node-02")
    assert node["verdict"] == "failed" and node["failed_step"] in ("plugin_pod", "socket")
    assert "gpu_node_remediate" in node["next_action"]
    assert verify.node_report("gpu-node-01")["verdict"] == "ok"


def test_disruptive_remediation_is_opt_in_and_refused_on_busy_gpus(fleet):
    fleet.break_("gpu-node-02", "kubelet_down")
    refused = fleet.playbook("gpu_node_remediate.yml")
    node = refused.node_report("gpu-node-02")
    assert refused.rc != 0 and node["verdict"] == "failed"
    assert node["failed_step"] in ("node", "registration")  # NotReady, or the socket gone before the API saw it
    assert "restart the kubelet" in node["next_action"] and "gpunode_allow_disruptive=true" in node["next_action"]

    fleet.fix("gpu-node-02", "kubelet_down")
    fleet.break_("gpu-node-01", "driver_library_mismatch")
    fleet.break_("gpu-node-01", "gpu_in_use", pod="train-0", namespace="ml", count="2")
    busy = fleet.playbook("gpu_node_remediate.yml", "-e", "gpunode_allow_disruptive=true")
    node = busy.node_report("gpu-node-01")
    assert node["failed_step"] == "driver" and "GPUs are in use by ml/train-0" in node["next_action"]

    fleet.fix("gpu-node-01", "gpu_in_use")
    allowed = fleet.playbook("gpu_node_remediate.yml", "-e", "gpunode_allow_disruptive=true")
    assert allowed.rc == 0, allowed.output[-4000:]
    assert allowed.steps("gpu-node-01")["driver"] == "fixed"
    again = fleet.playbook("gpu_node_remediate.yml", "-e", "gpunode_allow_disruptive=true")
    assert again.rc == 0 and all(again.changed(h) == 0 for h in ("gpu-node-01", "gpu-node-02"))


def test_two_runs_on_one_node_one_remediates_the_other_skips_on_the_lease(fleet):
    fleet.break_("gpu-node-02", "plugin_crash", signature="registration_failed")
    fleet.reset_counters()
    runs = {}

    def run(name):
        runs[name] = fleet.playbook("gpu_node_remediate.yml", "-e", "gpunode_run_id=%s" % name, limit="gpu-node-02")

    threads = [threading.Thread(target=run, args=(name,)) for name in ("run-a", "run-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    verdicts = sorted(r.node_report("gpu-node-02")["verdict"] for r in runs.values())
    assert verdicts == ["fixed", "skipped"], {k: v.output[-3000:] for k, v in runs.items()}
    skipped = next(r for r in runs.values() if r.node_report("gpu-node-02")["verdict"] == "skipped")
    assert "being remediated by run-" in skipped.node_report("gpu-node-02")["next_action"]
    assert fleet.deletes("pods") == 1, fleet.counters()


def test_workload_step_runs_a_gpu_pod_on_each_node_and_cleans_up(fleet):
    fleet.reset_counters()
    run = fleet.playbook("gpu_node_verify.yml", "-e", "gpunode_workload_check=true")
    assert run.rc == 0, run.output[-4000:]
    for host in ("gpu-node-01", "gpu-node-02"):
        assert run.steps(host)["workload"] == "ok"
    requests = fleet.counters()["requests"]
    assert requests["create"]["pods"] == 2 and requests["delete"]["pods"] == 2  # one smoke pod per node, removed
    assert all(run.changed(h) == 0 for h in ("gpu-node-01", "gpu-node-02"))


def test_verify_without_gpunode_node_python_uses_the_hosts_interpreter(fleet):
    # An inventory that sets only ansible_python_interpreter (the common case): the node-side check
    # runs with it. (The role once set ansible_python_interpreter from itself here and failed with a
    # recursive template on every host.)
    inventory = Path(fleet.inventory)
    original = inventory.read_text()
    data = yaml.safe_load(original)
    del data["all"]["vars"]["gpunode_node_python"]
    inventory.write_text(yaml.safe_dump(data))
    try:
        verify = fleet.playbook("gpu_node_verify.yml")
    finally:
        inventory.write_text(original)
    assert "Recursive loop" not in verify.output
    assert verify.rc == 0, verify.output[-4000:]
    assert {n["node"]: n["verdict"] for n in verify.report["nodes"]} == {"gpu-node-01": "ok", "gpu-node-02": "ok"}
