"""Least privilege: docs/rbac.yaml grants what the collection needs and nothing it can do without,
on the lab's real API server (its RBAC authorizer, its audit log).

1. docs/rbac.yaml applied as it is (one List: the ServiceAccount kube-system/gpunode-bringup, its
   ClusterRole and Roles, their bindings to it) and a TokenRequest token of that ServiceAccount:
   the bring-up, verify and remediate playbooks work on a lab fleet with faults that need every
   API remediation (apply the DaemonSet, add the GPU label, restart a plugin pod under the node's
   Lease), the remediate playbook with the workload check runs a smoke pod on every node, and the
   API server's audit log holds no 403.
2. For each rule of the manifest, a copy of the manifest whose role lacks that rule is applied
   (the same ServiceAccount: the roles are replaced between variants and the authorizer is asked,
   with SubjectAccessReviews, until it decides as the copy says), then the step that needs the
   rule runs and fails with the API server's own "... is forbidden: User
   "system:serviceaccount:kube-system:gpunode-bringup" cannot <verb> resource "<resource>" ..."
   message and the collection's pointer to docs/rbac.yaml. The probes use check mode (server-side
   dry runs) wherever the module has it, so a rule that turned out to be unnecessary would not
   change the fleet; the audit log shows that each probe was denied only what its copy lacked.
   One playbook users run is repeated without a rule.
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import yaml

from hardening_lab import (RBAC_YAML, SERVICE_ACCOUNT_NAME, SERVICE_ACCOUNT_NAMESPACE, SERVICE_ACCOUNT_USER, RuleRef,
                           bound_roles, denials, hardening_fleet, manifest_rules, rbac_manifest, restricted_kubeconfig,
                           roles_of, run_playbook_text, wait_authorized, without_rule)
from lab_fleet import LabFleet

NODES = ["gpu-node-01", "gpu-node-02"]
FAST = ("-e", "gpunode_serial=100%")  # one batch: a constant number of reads for both nodes
MANIFEST = rbac_manifest()
RULES = manifest_rules(MANIFEST)
# a DaemonSet and a ConfigMap that do not exist: their (dry-run) apply creates them
NEW_PLUGIN = {"name": "rbac-probe-plugin", "config_map_name": "rbac-probe-plugin-config"}


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
    ("kube-system", "apps", "daemonsets", ("create",)): dict(
        module="device_plugin", args=NEW_PLUGIN, check=True, verb="create", resource="daemonsets"),
    ("kube-system", "", "configmaps", ("create",)): dict(
        module="device_plugin", args=NEW_PLUGIN, check=True, verb="create", resource="configmaps"),
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
def fleet() -> Iterator[LabFleet]:
    fleet = hardening_fleet(nodes=2).up()
    try:
        yield fleet
    finally:
        fleet.down()


@pytest.fixture(scope="module")
def documented(fleet) -> str:
    """The kubeconfig of the ServiceAccount with exactly docs/rbac.yaml applied."""
    kubeconfig = restricted_kubeconfig(fleet, MANIFEST, "documented")
    wait_authorized(fleet, {p: True for rule in RULES for p in rule.permissions()})
    return kubeconfig


def _why(run: Any) -> str:
    """The steps that did not end ok or fixed (with their evidence), and the end of the output."""
    steps = [dict(s, node=n["node"]) for n in (run.report or {}).get("nodes", []) for s in n["steps"]
             if s["verdict"] not in ("ok", "fixed", "skipped")]
    return json.dumps(steps, indent=1)[:6000] + "\n" + run.output[-3000:]


def _forbidden_summary(fleet: LabFleet) -> str:
    return json.dumps(fleet.counters()["forbidden"], indent=1)[:3000]


def test_manifest_grants_nothing_cluster_wide_but_nodes():
    kinds = sorted(d["kind"] for d in MANIFEST["items"])  # one document (ansible-test's yamllint wants one)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Role", "Role", "RoleBinding", "RoleBinding",
                     "ServiceAccount"]
    account = next(d for d in MANIFEST["items"] if d["kind"] == "ServiceAccount")["metadata"]
    assert (account["namespace"], account["name"]) == (SERVICE_ACCOUNT_NAMESPACE, SERVICE_ACCOUNT_NAME)
    # every role is bound to that ServiceAccount by the manifest's own bindings, in the role's namespace
    roles = [(r["kind"], r["metadata"]["name"], r["metadata"].get("namespace") if r["kind"] == "Role" else None)
             for r in roles_of(MANIFEST)]
    assert sorted(roles, key=str) == sorted(bound_roles(MANIFEST), key=str)
    assert {res for r in RULES if r.namespace is None for res in r.resources} == {"nodes"}
    assert {r.namespace for r in RULES if r.namespace} == {"kube-system", "default"}
    for rule in RULES:
        assert "*" not in rule.verbs and "*" not in rule.resources and "*" not in rule.api_groups, rule
    # every rule comes after a comment naming the module that needs it
    modules = re.compile(r"\b(device_plugin|device_plugin_info|device_plugin_restart|gpu_node|node_lease|"
                         r"gpu_smoke_test)\b")
    lines = [line.strip() for line in RBAC_YAML.read_text().splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("- apiGroups:")]
    assert len(starts) == len(RULES)
    for index in starts:
        comment = []
        while lines[index - 1 - len(comment)].startswith("#"):
            comment.append(lines[index - 1 - len(comment)])
        assert comment and modules.search(" ".join(comment)), lines[index:index + 3]


def test_every_rule_has_a_probe():
    assert sorted(r.key for r in RULES) == sorted(PROBES)
    assert len({r.key for r in RULES}) == len(RULES)


def test_every_playbook_works_with_exactly_the_documented_rules(fleet, documented):
    auth = ("-e", "gpunode_kubeconfig=%s" % documented)
    # faults that need every API remediation: a node without the GPU label, a crash-looping plugin
    fleet.break_("gpu-node-01", "label_missing")
    fleet.break_("gpu-node-02", "plugin_crash", signature="nvml_init_failed")
    fleet.reset_counters()

    bringup = fleet.playbook("gpu_node_bringup.yml", *auth, *FAST)
    counters = fleet.counters()
    assert counters["forbidden"] == [], _forbidden_summary(fleet)
    assert bringup.rc == 0, _why(bringup)
    assert bringup.steps("gpu-node-01")["scheduling"] == "fixed", bringup.report
    assert bringup.steps("gpu-node-02")["plugin_pod"] == "fixed", bringup.report
    requests = counters["requests"]
    # the ConfigMap and the DaemonSet created by their first apply (a PATCH the API server also
    # authorizes as create), the label, the plugin pod deleted under the node's Lease
    assert requests["patch"]["daemonsets"] >= 1 and requests["patch"]["configmaps"] >= 1, requests
    assert requests["patch"]["nodes"] == 1, requests
    assert requests["delete"]["pods"] == 1 and requests["create"]["leases"] == 2, requests

    fleet.reset_counters()
    verify = fleet.playbook("gpu_node_verify.yml", *auth, *FAST)
    counters = fleet.counters()
    assert counters["forbidden"] == [], _forbidden_summary(fleet)
    assert verify.rc == 0, _why(verify)
    assert counters["writes"] == 0 and counters["requests"]["list"]["nodes"] >= 1, counters

    # remediate: the DaemonSet is gone (deleted through the API); with the workload check, a smoke
    # pod on every node
    fleet.break_("cluster", "daemonset_missing")
    fleet.wait_for("plugin pods gone", lambda s: all(not s[n].get("plugin_pod") or not s[n]["plugin_pod"].get("running")
                                                     for n in NODES), timeout=60)
    fleet.reset_counters()
    remediate = fleet.playbook("gpu_node_remediate.yml", *auth, *FAST, "-e", "gpunode_workload_check=true")
    assert fleet.counters()["forbidden"] == [], _forbidden_summary(fleet)
    assert remediate.rc == 0, _why(remediate)
    assert "fixed" in {remediate.steps(node)["daemonset"] for node in NODES}, remediate.report
    assert all(remediate.steps(node)["workload"] == "ok" for node in NODES), remediate.report
    counters = fleet.counters()
    assert counters["write_requests"]["patch"]["daemonsets"] >= 1, counters
    assert counters["write_requests"]["create"]["pods"] >= 2, counters
    assert counters["forbidden"] == [], _forbidden_summary(fleet)
    fleet.wait_advertising(NODES)


# ---- one rule missing at a time ----------------------------------------------------------------

def _probe_task(rule: RuleRef, kubeconfig: str, results_file: str) -> List[Dict[str, Any]]:
    probe = PROBES[rule.key]
    task: Dict[str, Any] = {"name": rule.id, "gpunode.bringup." + probe["module"]: dict(
        probe["args"], kubeconfig=kubeconfig), "register": "result", "ignore_errors": True}
    if probe["check"]:
        task["check_mode"] = True
    return [task, {"name": "Save the result", "ansible.builtin.copy": {
        "content": "{{ result | to_json }}", "dest": results_file, "mode": "0644"}}]


@pytest.fixture(scope="module")
def without_each_rule(fleet, documented) -> Iterator[Dict[str, Any]]:
    """Each probe, with the ServiceAccount's roles lacking its rule; per rule: the result, what
    the audit log says was denied, the output."""
    admin = fleet.kubeconfig
    deploy = [{"name": "The device plugin (admin)", "hosts": "localhost", "gather_facts": False, "tasks": [{
        # the fleet as the playbooks leave it (a no-op when the test above ran): the DaemonSet
        # rolled out, so there is a pod to delete and a log to read
        "name": "Deploy the device plugin", "gpunode.bringup.device_plugin": {
            "kubeconfig": admin, "wait": True, "wait_timeout": 90}}]}]
    proc = run_playbook_text(fleet, yaml.safe_dump(deploy, sort_keys=False), "rbac-deploy")
    assert proc.returncode == 0, proc.stdout[-4000:]
    outcome: Dict[str, Any] = {}
    try:
        for index, rule in enumerate(RULES):
            kubeconfig = restricted_kubeconfig(fleet, without_rule(MANIFEST, rule), "without-%d" % index)
            wait_authorized(fleet, {p: p not in rule.permissions() for r in RULES for p in r.permissions()})
            results_file = fleet.state_dir / ("without-%d.json" % index)
            play = [{"name": "Without " + rule.id, "hosts": "localhost", "gather_facts": False,
                     "tasks": _probe_task(rule, kubeconfig, str(results_file))}]
            fleet.reset_counters()
            proc = run_playbook_text(fleet, yaml.safe_dump(play, sort_keys=False, width=1000), "without-%d" % index)
            assert results_file.exists(), proc.stdout[-4000:] + proc.stderr[-2000:]
            outcome[rule.id] = {"result": json.loads(results_file.read_text()), "denials": denials(fleet),
                                "output": proc.stdout + proc.stderr}
        yield outcome
    finally:
        # the documented rules again, for whoever comes next
        restricted_kubeconfig(fleet, MANIFEST, "documented")
        wait_authorized(fleet, {p: True for rule in RULES for p in rule.permissions()})


@pytest.mark.parametrize("rule", [pytest.param(r, id=r.id) for r in RULES])
def test_without_the_rule_the_step_fails_naming_it(without_each_rule, rule):
    probe = PROBES[rule.key]
    result = without_each_rule[rule.id]["result"]
    assert result.get("failed") is True, json.dumps(result)[:3000]
    message = result["msg"]
    # the API server's own message (RBAC's "forbidden" text), then the collection's pointer
    scope = 'in the namespace "%s"' % rule.namespace if rule.namespace else "at the cluster scope"
    expected = ' is forbidden: User "%s" cannot %s resource "%s" in API group "%s" %s' % (
        SERVICE_ACCOUNT_USER, probe["verb"], probe["resource"], rule.api_groups[0], scope)
    assert expected in message, message
    assert "docs/rbac.yaml" in message, message
    assert "Traceback" not in json.dumps(result)
    assert "Traceback" not in without_each_rule[rule.id]["output"]


@pytest.mark.parametrize("rule", [pytest.param(r, id=r.id) for r in RULES])
def test_each_probe_was_denied_only_what_its_role_lacked(without_each_rule, rule):
    """Every 403 of the probe (in the audit log) denied a permission of the removed rule: a denial
    outside it would mean the probe needs more than its rule (or the manifest lacks one). The
    probe's own denial is among them."""
    probe = PROBES[rule.key]
    found = without_each_rule[rule.id]["denials"]
    assert found, without_each_rule[rule.id]["output"][-3000:]
    for denial in found:
        assert denial["user"] == SERVICE_ACCOUNT_USER and denial["denied"], denial
        denied = denial["denied"]
        assert (denied["namespace"], denied["group"], denied["resource"], denied["verb"]) in rule.permissions(), denial
    assert (rule.namespace, probe["resource"], probe["verb"]) in {
        (d["denied"]["namespace"], d["denied"]["resource"], d["denied"]["verb"]) for d in found}, found
    if probe["verb"] == "create" and probe["module"] == "device_plugin":
        # the request was an apply (a PATCH, dry run): the API server authorized it as patch, then,
        # as the object does not exist, as create
        assert {(d["verb"], d["resource"]) for d in found} == {("patch", probe["resource"])}, found


def test_a_playbook_without_a_rule_fails_and_names_it(fleet, documented, without_each_rule):
    """Users see the denial in the run's report: remediation of a crashing plugin without the
    right to delete pods in kube-system."""
    rule = next(r for r in RULES if r.key == ("kube-system", "", "pods", ("delete",)))
    kubeconfig = restricted_kubeconfig(fleet, without_rule(MANIFEST, rule), "no-pod-delete")
    try:
        wait_authorized(fleet, {p: p not in rule.permissions() for r in RULES for p in r.permissions()})
        fleet.break_("gpu-node-02", "plugin_crash", signature="nvml_init_failed")
        fleet.wait_for("plugin crash on gpu-node-02", lambda s: not (s["gpu-node-02"].get("plugin_pod") or {}).get(
            "running"), timeout=60)
        fleet.reset_counters()
        run = fleet.playbook("gpu_node_remediate.yml", "-e", "gpunode_kubeconfig=%s" % kubeconfig, *FAST,
                             limit="gpu-node-02")
        assert run.rc != 0
        node = run.node_report("gpu-node-02")
        assert node["verdict"] == "failed" and node["failed_step"] == "plugin_pod", node
        assert ('is forbidden: User "%s" cannot delete resource "pods" in API group "" in the namespace "kube-system"'
                % SERVICE_ACCOUNT_USER) in node["next_action"], node["next_action"]
        assert "docs/rbac.yaml" in node["next_action"], node["next_action"]
        found = [(d["user"], d["verb"], d["resource"], d["namespace"]) for d in fleet.counters()["forbidden"]]
        assert found == [(SERVICE_ACCOUNT_USER, "delete", "pods", "kube-system")], _forbidden_summary(fleet)
        assert "Traceback" not in run.output
    finally:
        # the fleet is left healthy, with the documented rules, for whoever comes next
        fleet.fix("gpu-node-02", "plugin_crash")
        restricted_kubeconfig(fleet, MANIFEST, "documented")
        wait_authorized(fleet, {p: True for rule in RULES for p in rule.permissions()})
