"""Least privilege: docs/rbac.yaml grants what the collection needs and nothing it can do without.

1. With a token bound to exactly the rules of docs/rbac.yaml (ServiceAccount
   kube-system:gpunode-bringup, through the lab's ``rules_from_rbac_yaml``), the playbooks work on a
   lab fleet with faults that need every API remediation (apply the DaemonSet, add the GPU label,
   restart a plugin pod under the node's Lease), the verify playbook with the workload check runs a
   smoke pod on every node, and the API server denies nothing.
2. For each rule of the manifest, a token holding every rule but that one makes the step that needs
   it fail with "forbidden" naming the verb and the resource. The steps run in one ansible-playbook
   process (each task with its own kubeconfig, ``ignore_errors``, results dumped as JSON); they use
   check mode (server-side dry runs) wherever the module has it, so a rule that turned out to be
   unnecessary would not change the fleet. One playbook users run is repeated without a rule.
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import yaml

from hardening_lab import RBAC_YAML, TokenLabFleet, rbac_rules, run_playbook_text

NODES = ["gpu-node-01", "gpu-node-02"]
FAST = ("-e", "gpunode_serial=100%")  # one batch: a constant number of reads for both nodes


def rule_key(rule: Dict[str, Any]) -> Tuple[str, str, str, Tuple[str, ...]]:
    return (rule.get("namespace") or "*", ",".join(rule["apiGroups"]), ",".join(rule["resources"]),
            tuple(rule["verbs"]))


def rule_id(rule: Dict[str, Any]) -> str:
    namespace, group, resources, verbs = rule_key(rule)
    return "%s:%s%s:%s" % (namespace, group + "/" if group else "", resources, "+".join(verbs))


# The step that needs each rule: (module, args, check mode, what the message must name). A rule of
# the manifest without a probe fails test_every_rule_has_a_probe.
PROBES: Dict[Tuple[str, str, str, Tuple[str, ...]], Dict[str, Any]] = {
    ("*", "", "nodes", ("get", "list", "watch")): dict(
        module="device_plugin_info", args={"nodes": NODES}, check=False, verb="list", resource="nodes"),
    ("*", "", "nodes", ("patch",)): dict(
        module="gpu_node", args={"name": "gpu-node-01", "labels": {"example.com/rbac-probe": "x"}}, check=True,
        verb="patch", resource="nodes"),
    ("kube-system", "apps", "daemonsets", ("get", "list", "watch", "patch")): dict(
        module="device_plugin", args={}, check=True, verb="get", resource="daemonsets"),
    ("kube-system", "", "configmaps", ("get", "patch")): dict(
        module="device_plugin", args={}, check=True, verb="get", resource="configmaps"),
    ("kube-system", "apps", "daemonsets", ("delete",)): dict(
        module="device_plugin", args={"state": "absent"}, check=True, verb="delete", resource="daemonsets"),
    ("kube-system", "", "configmaps", ("delete",)): dict(
        module="device_plugin", args={"state": "absent"}, check=True, verb="delete", resource="configmaps"),
    ("kube-system", "", "pods", ("list", "watch")): dict(
        module="device_plugin_info", args={"nodes": NODES}, check=False, verb="list", resource="pods"),
    ("kube-system", "", "pods", ("delete",)): dict(
        module="device_plugin_restart", args={"node": "gpu-node-01"}, check=True, verb="delete", resource="pods"),
    ("kube-system", "", "pods/log", ("get",)): dict(
        module="device_plugin_info", args={"nodes": NODES, "read_logs": "always"}, check=False, verb="get",
        resource="pods/log"),
    ("kube-system", "coordination.k8s.io", "leases", ("get", "create", "update", "delete")): dict(
        module="node_lease", args={"node": "gpu-node-01", "holder_identity": "rbac-probe"}, check=True, verb="get",
        resource="leases"),
    ("default", "", "pods", ("create", "list", "watch", "delete")): dict(
        module="gpu_smoke_test", args={"node": "gpu-node-01"}, check=True, verb="create", resource="pods"),
    ("default", "", "pods/log", ("get",)): dict(
        module="gpu_smoke_test", args={"node": "gpu-node-01", "timeout": 60}, check=False, verb="get",
        resource="pods/log"),
    ("default", "", "events", ("list",)): dict(
        module="gpu_smoke_test", args={"node": "gpu-node-01", "timeout": 60}, check=False, verb="list",
        resource="events"),
}


@pytest.fixture(scope="module")
def fleet() -> Iterator[TokenLabFleet]:
    fleet = TokenLabFleet(nodes=2, scenario="healthy").up()
    try:
        yield fleet
    finally:
        fleet.down()


@pytest.fixture(scope="module")
def rules() -> List[Dict[str, Any]]:
    return rbac_rules()


def _forbidden_summary(fleet: TokenLabFleet) -> str:
    return json.dumps(fleet.forbidden_requests(), indent=1)[:3000]


def test_manifest_grants_nothing_cluster_wide_but_nodes(rules):
    manifest = yaml.safe_load(RBAC_YAML.read_text())  # one document (ansible-test's yamllint wants one)
    assert manifest["kind"] == "List"
    kinds = sorted(d["kind"] for d in manifest["items"])
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Role", "Role", "RoleBinding", "RoleBinding",
                     "ServiceAccount"]
    cluster_wide = [r for r in rules if "namespace" not in r]
    assert {res for r in cluster_wide for res in r["resources"]} == {"nodes"}
    assert {r["namespace"] for r in rules if "namespace" in r} == {"kube-system", "default"}
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"], rule
    # every rule comes after a comment naming the module that needs it
    modules = re.compile(r"\b(device_plugin|device_plugin_info|device_plugin_restart|gpu_node|node_lease|"
                         r"gpu_smoke_test)\b")
    lines = [line.strip() for line in RBAC_YAML.read_text().splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("- apiGroups:")]
    assert len(starts) == len(rules)
    for index in starts:
        comment = []
        while lines[index - 1 - len(comment)].startswith("#"):
            comment.append(lines[index - 1 - len(comment)])
        assert comment and modules.search(" ".join(comment)), lines[index:index + 3]


def test_every_rule_has_a_probe(rules):
    assert sorted(map(rule_id, rules)) == sorted(rule_id_from_key(k) for k in PROBES)


def rule_id_from_key(key: Tuple[str, str, str, Tuple[str, ...]]) -> str:
    namespace, group, resources, verbs = key
    return rule_id(dict({"apiGroups": [group], "resources": [resources], "verbs": list(verbs)},
                        **({"namespace": namespace} if namespace != "*" else {})))


def test_every_playbook_works_with_exactly_the_documented_rules(fleet, rules):
    kubeconfig = fleet.kubeconfig_for(rules, "documented")
    auth = ("-e", "gpunode_kubeconfig=%s" % kubeconfig)
    # faults that need every API remediation: a node without the GPU label, a crash-looping plugin
    fleet.break_("gpu-node-01", "label_missing")
    fleet.break_("gpu-node-02", "plugin_crash", signature="nvml_init_failed")
    fleet.reset_counters()

    bringup = fleet.playbook("gpu_node_bringup.yml", *auth, *FAST)
    assert bringup.rc == 0, bringup.output[-4000:]
    assert fleet.forbidden() == {}, _forbidden_summary(fleet)
    assert bringup.steps("gpu-node-01")["scheduling"] == "fixed"
    assert bringup.steps("gpu-node-02")["plugin_pod"] == "fixed"
    counters = fleet.counters()["requests"]
    assert counters["patch"]["daemonsets"] >= 1 and counters["patch"]["nodes"] == 1, counters
    assert counters["delete"]["pods"] == 1 and counters["create"]["leases"] == 2, counters

    verify = fleet.playbook("gpu_node_verify.yml", *auth, *FAST)
    assert verify.rc == 0, verify.output[-4000:]
    assert fleet.forbidden() == {}, _forbidden_summary(fleet)

    # remediate: the DaemonSet is gone; with the workload check, a smoke pod on every node
    fleet.break_("cluster", "daemonset_missing")
    fleet.reset_counters()
    remediate = fleet.playbook("gpu_node_remediate.yml", *auth, *FAST, "-e", "gpunode_workload_check=true")
    assert remediate.rc == 0, remediate.output[-4000:]
    assert "fixed" in {remediate.steps(node)["daemonset"] for node in NODES}, remediate.report
    assert all(remediate.steps(node)["workload"] == "ok" for node in NODES), remediate.report
    assert fleet.counters()["requests"]["create"]["pods"] >= 2
    assert fleet.forbidden() == {}, _forbidden_summary(fleet)


# ---- one rule missing at a time ----------------------------------------------------------------

@pytest.fixture(scope="module")
def without_each_rule(fleet, rules) -> Dict[str, Any]:
    """Every probe with a kubeconfig missing its rule, in one playbook; returns results, denials."""
    admin = fleet.info["kubeconfig"]
    tasks: List[Dict[str, Any]] = [{
        # the fleet as the playbooks leave it (a no-op when the test above ran): the DaemonSet
        # rolled out, so there is a pod to delete and a log to read
        "name": "Deploy the device plugin (admin)", "gpunode.bringup.device_plugin": {
            "kubeconfig": admin, "wait": True, "wait_timeout": 60}}]
    for index, rule in enumerate(rules):
        probe = PROBES[rule_key(rule)]
        kubeconfig = fleet.kubeconfig_for(rules[:index] + rules[index + 1:], "without-%d" % index)
        task: Dict[str, Any] = {"name": rule_id(rule), "gpunode.bringup." + probe["module"]: dict(
            probe["args"], kubeconfig=kubeconfig), "register": "r_%d" % index, "ignore_errors": True}
        if probe["check"]:
            task["check_mode"] = True
        tasks.append(task)
    results_file = fleet.state_dir / "without-each-rule.json"
    body = ", ".join("%r: r_%d" % (rule_id(rule), index) for index, rule in enumerate(rules))
    tasks.append({"name": "Save the results", "ansible.builtin.copy": {
        "content": "{{ {%s} | to_json }}" % body, "dest": str(results_file), "mode": "0644"}})
    play = [{"name": "Each step without its rule", "hosts": "localhost", "gather_facts": False, "tasks": tasks}]
    fleet.reset_counters()
    proc = run_playbook_text(fleet, yaml.safe_dump(play, sort_keys=False, width=1000), "without-each-rule")
    assert results_file.exists(), proc.stdout[-4000:] + proc.stderr[-2000:]
    return {"results": json.loads(results_file.read_text()), "forbidden": fleet.forbidden_requests(),
            "output": proc.stdout + proc.stderr}


def _rule_params() -> List[Any]:
    params = []
    for rule in rbac_rules():
        probe = PROBES.get(rule_key(rule), {})
        marks = [pytest.mark.xfail(strict=True, reason=probe["bug"])] if probe.get("bug") else []
        params.append(pytest.param(rule, id=rule_id(rule), marks=marks))
    return params


@pytest.mark.parametrize("rule", _rule_params())
def test_without_the_rule_the_step_fails_naming_it(without_each_rule, rule):
    probe = PROBES[rule_key(rule)]
    result = without_each_rule["results"][rule_id(rule)]
    assert result.get("failed") is True, json.dumps(result)[:3000]
    message = result["msg"]
    namespace = rule.get("namespace")
    assert "forbidden" in message, message
    assert 'cannot %s resource "%s"' % (probe["verb"], probe["resource"]) in message, message
    assert ('in the namespace "%s"' % namespace if namespace else "at the cluster scope") in message, message
    assert "system:serviceaccount:kube-system:gpunode-bringup" in message and "docs/rbac.yaml" in message, message
    assert "Traceback" not in json.dumps(result)


def test_only_the_removed_rules_were_denied(without_each_rule, rules):
    """Each probe hit the rule it lacked and no other: a denial outside the removed rules would
    mean a probe needs more than its rule (or the manifest lacks one)."""
    removed = {(r.get("namespace"), res, verb) for r in rules for res in r["resources"] for verb in r["verbs"]}
    assert without_each_rule["forbidden"], without_each_rule["output"][-3000:]
    for denial in without_each_rule["forbidden"]:
        assert (denial["namespace"] or None, denial["resource"], denial["verb"]) in removed \
            or (None, denial["resource"], denial["verb"]) in removed, denial
    assert "Traceback" not in without_each_rule["output"]


def test_a_playbook_without_a_rule_fails_and_names_it(fleet, rules):
    """Users see the denial in the run's report: remediation of a crashing plugin without the
    right to delete pods in kube-system."""
    kept = [r for r in rules if rule_key(r) != ("kube-system", "", "pods", ("delete",))]
    assert len(kept) == len(rules) - 1
    kubeconfig = fleet.kubeconfig_for(kept, "no-pod-delete")
    fleet.break_("gpu-node-02", "plugin_crash", signature="nvml_init_failed")
    fleet.reset_counters()
    run = fleet.playbook("gpu_node_remediate.yml", "-e", "gpunode_kubeconfig=%s" % kubeconfig, *FAST,
                         limit="gpu-node-02")
    assert run.rc != 0
    node = run.node_report("gpu-node-02")
    assert node["verdict"] == "failed" and node["failed_step"] == "plugin_pod", node
    assert 'cannot delete resource "pods"' in node["next_action"], node["next_action"]
    assert "forbidden" in node["next_action"] and "docs/rbac.yaml" in node["next_action"]
    assert fleet.forbidden() == {"delete": {"pods": 1}}, _forbidden_summary(fleet)
    assert "Traceback" not in run.output
    # the fleet is left healthy for whoever comes next
    fleet.fix("gpu-node-02", "plugin_crash")
