"""No secret in the output: the bearer token given as ``api_key`` (a module option with
``no_log``) or through ``K8S_AUTH_API_KEY`` never appears in what ansible-playbook prints at
-vvv, neither when the call works nor when it fails (a host nothing listens on, a rejected token).

The token is a real one the lab's API server issued (TokenRequest) for a ServiceAccount bound to
cluster-admin, distinct from the one in the lab's kubeconfig, so every occurrence in the output
could only come from the collection's handling of it. A second real token, of the least-privilege
ServiceAccount of docs/rbac.yaml, is refused a read its roles lack (HTTP 403 from the API
server's RBAC authorizer): the error path with a token the API server accepts.

K8S_AUTH_API_KEY is set in the controller's environment (an AWX credential, an ``export``). Set with
the ``environment:`` task keyword instead, Ansible itself shows it at -vvv (the ``EXEC`` line of the
local connection carries the variables): that is Ansible's behaviour, not the collection's.
"""
from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
import yaml

from hardening_lab import (SERVICE_ACCOUNT_USER, admin_service_account, closed_port, hardening_fleet, rbac_manifest,
                           restricted_kubeconfig, run_playbook_text, token_of)
from lab_fleet import PLAYBOOKS, VENV_BIN, LabFleet

NODE = "gpu-node-01"
MASK = "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"


@pytest.fixture(scope="module")
def lab() -> Iterator[Dict[str, Any]]:
    fleet = hardening_fleet(nodes=1).up()
    try:
        _kubeconfig, token = admin_service_account(fleet, "gpunode-nolog")
        restricted = token_of(restricted_kubeconfig(fleet, rbac_manifest(), "nolog-restricted"))
        assert token != fleet.info["token"] and restricted not in (token, fleet.info["token"])
        # the device plugin, deployed with the lab's own kubeconfig: the verify playbook below passes
        deploy = [{"name": "deploy", "hosts": "localhost", "gather_facts": False, "tasks": [
            {"name": "Deploy the device plugin", "gpunode.bringup.device_plugin": {
                "kubeconfig": fleet.info["kubeconfig"], "wait": True, "wait_timeout": 60}}]}]
        proc = run_playbook_text(fleet, yaml.safe_dump(deploy), "nolog-deploy")
        assert proc.returncode == 0, proc.stdout[-3000:]
        yield {"fleet": fleet, "token": token, "restricted": restricted, "ca": fleet.info["ca"],
               "url": fleet.info["url"], "closed": "https://127.0.0.1:%d" % closed_port()}
    finally:
        fleet.down()


def assert_no_secret(output: str, *secrets_: str) -> None:
    for secret in secrets_:
        assert secret not in output, "the token appears in the output"
        for start in range(0, len(secret) - 15):  # nor any 16 characters of it
            assert secret[start:start + 16] not in output, "part of the token appears in the output"


def _vars_file(fleet: LabFleet, name: str, data: Dict[str, Any]) -> str:
    path = fleet.state_dir / ("%s.vars.json" % name)
    path.write_text(json.dumps(data))
    return str(path)


def test_api_key_option_and_environment_are_masked_in_module_output(lab):
    """API modules at -vvv: api_key as an option, then from K8S_AUTH_API_KEY (the controller's
    environment); each working, against a closed port, and (as option) a token the API rejects."""
    fleet = lab["fleet"]
    wrong = "gpunode-wrong-" + secrets.token_hex(16)
    auth = {"host": "{{ api_url }}", "ca_cert": "{{ api_ca }}", "api_key": "{{ api_token }}"}
    tasks = [
        {"name": "api_key option: apply the plugin (read, dry-run apply)", "gpunode.bringup.device_plugin": dict(
            auth, wait=True, wait_timeout=60), "register": "deploy"},
        {"name": "api_key option: read the fleet", "gpunode.bringup.device_plugin_info": dict(auth, nodes=[NODE]),
         "register": "info"},
        {"name": "api_key option: a host nothing listens on", "gpunode.bringup.device_plugin_info": dict(
            auth, host="{{ closed_url }}", api_retries=0), "register": "closed", "ignore_errors": True},
        {"name": "api_key option: a token the API rejects", "gpunode.bringup.gpu_node": dict(
            auth, api_key="{{ wrong_token }}", name=NODE, labels={"example.com/nolog": "x"}),
         "register": "rejected", "ignore_errors": True},
        {"name": "api_key option: a read the token's roles lack (403)", "gpunode.bringup.device_plugin_info": dict(
            auth, api_key="{{ restricted_token }}", nodes=[NODE], namespace="default"),
         "register": "forbidden", "ignore_errors": True},
        {"name": "K8S_AUTH_API_KEY: read the fleet", "gpunode.bringup.device_plugin_info": {"nodes": [NODE]},
         "register": "env_info"},
        {"name": "K8S_AUTH_API_KEY: a host nothing listens on", "gpunode.bringup.node_lease": {
            "host": "{{ closed_url }}", "node": NODE, "holder_identity": "nolog", "api_retries": 0},
         "register": "env_closed", "ignore_errors": True},
        {"name": "Save the results", "ansible.builtin.copy": {
            "content": "{{ {'deploy': deploy, 'info': info, 'closed': closed, 'rejected': rejected, "
                       "'forbidden': forbidden, 'env_info': env_info, 'env_closed': env_closed} | to_json }}",
            "dest": "{{ results_file }}", "mode": "0644"}},
    ]
    play = [{"name": "API modules with a bearer token", "hosts": "localhost", "gather_facts": False, "tasks": tasks}]
    results_file = fleet.state_dir / "nolog-results.json"
    variables = _vars_file(fleet, "nolog", {
        "api_url": lab["url"], "api_ca": lab["ca"], "api_token": lab["token"], "closed_url": lab["closed"],
        "wrong_token": wrong, "restricted_token": lab["restricted"], "results_file": str(results_file)})
    # K8S_AUTH_* in the controller's environment, as an AWX credential or an `export` provides them
    # (not with the `environment:` keyword: Ansible prints its values at -vvv, see the module docstring)
    env = dict(fleet.env, K8S_AUTH_HOST=lab["url"], K8S_AUTH_API_KEY=lab["token"], K8S_AUTH_SSL_CA_CERT=lab["ca"])
    proc = run_playbook_text(fleet, yaml.safe_dump(play, sort_keys=False), "nolog", "-vvv", "-e", "@" + variables,
                             env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    results = json.loads(results_file.read_text())
    # the calls did what they should, with the token
    assert not results["deploy"].get("failed") and results["deploy"]["rollout"]["complete"], results["deploy"]
    assert results["info"]["nodes"][0]["name"] == NODE and results["env_info"]["nodes"][0]["name"] == NODE
    assert results["closed"]["failed"] and lab["closed"] in results["closed"]["msg"]
    assert results["rejected"]["failed"] and "401" in results["rejected"]["msg"]
    assert results["forbidden"]["failed"], results["forbidden"]
    assert ('is forbidden: User "%s" cannot get resource "daemonsets" in API group "apps" in the namespace "default"'
            % SERVICE_ACCOUNT_USER) in results["forbidden"]["msg"], results["forbidden"]["msg"]
    assert results["env_closed"]["failed"] and lab["closed"] in results["env_closed"]["msg"]
    # -vvv shows each module's arguments, with the key masked
    assert output.count(MASK) >= 5, output[-3000:]
    assert_no_secret(output, lab["token"], wrong, lab["restricted"])
    assert_no_secret(results_file.read_text(), lab["token"], wrong, lab["restricted"])


def test_token_from_the_environment_is_not_printed_by_a_playbook(lab):
    """The verify playbook at -vvv with K8S_AUTH_HOST/K8S_AUTH_API_KEY (explicit host and key win
    over the inventory's kubeconfig), working, then with a host nothing listens on."""
    fleet = lab["fleet"]
    env = dict(fleet.env, K8S_AUTH_HOST=lab["url"], K8S_AUTH_API_KEY=lab["token"], K8S_AUTH_SSL_CA_CERT=lab["ca"])
    fleet.reset_counters()
    # the inventory's kubeconfig is replaced by a missing file: only the environment's key can work
    ok = _run(fleet, env, "gpu_node_verify.yml", "-e", "gpunode_kubeconfig=/nonexistent/kubeconfig")
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-4000:]
    assert fleet.counters()["requests"]["list"]["nodes"] >= 1
    assert_no_secret(ok.stdout + ok.stderr, lab["token"])

    env["K8S_AUTH_HOST"] = lab["closed"]
    failed = _run(fleet, env, "gpu_node_verify.yml")
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "cannot reach the Kubernetes API at %s" % lab["closed"] in output, output[-4000:]
    assert_no_secret(output, lab["token"])


def _run(fleet: LabFleet, env: Dict[str, str], playbook: str, *extra: str) -> Any:
    cmd = [str(VENV_BIN / "ansible-playbook"), "-vvv", "-i", fleet.inventory, str(PLAYBOOKS / playbook),
           "-e", "gpunode_report_path=%s" % (fleet.state_dir / "nolog-report.json"), "-e", "gpunode_rollout_timeout=10",
           *extra]
    return subprocess.run(cmd, cwd=str(fleet.state_dir), env=env, text=True, capture_output=True, timeout=300,
                          check=False)


def test_kubeconfig_token_is_not_printed_either(lab):
    """The lab's kubeconfig token, used by the inventory's gpunode_kubeconfig: not in the -vvv output
    of a failing call (a context the kubeconfig lacks)."""
    fleet = lab["fleet"]
    play = [{"name": "kubeconfig", "hosts": "localhost", "gather_facts": False, "tasks": [
        {"name": "a context the kubeconfig lacks", "gpunode.bringup.device_plugin_info": {
            "kubeconfig": fleet.info["kubeconfig"], "context": "nowhere"}, "ignore_errors": True}]}]
    proc = run_playbook_text(fleet, yaml.safe_dump(play), "nolog-kubeconfig", "-vvv")
    output = proc.stdout + proc.stderr
    assert "nowhere" in output
    assert_no_secret(output, fleet.info["token"])
    assert Path(fleet.info["kubeconfig"]).read_text().count(fleet.info["token"]) == 1
