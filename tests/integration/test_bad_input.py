"""Bad input everywhere: wrong types, unknown choices, malformed names and image references, no
kubeconfig, an unreachable API, a wrong token, an expired or foreign server certificate, broken
node files, negative timeouts, invalid plugin configs and role argument_specs violations.

Every case must fail (or, for a broken node file, which is evidence about the node, report a
finding) with a clear message that names the input, without a Python traceback or a module crash,
and without writing: the lab's real API server (Kubernetes v1.37.2, its validation, its TLS, its
token authentication) logs no write request in its audit log, and no node root changes.

All cases run in one ansible-playbook process (API modules and roles on the controller, node-side
modules on a lab node with its Python and NVML environment): every task has ``ignore_errors:
true`` (roles: ``block``/``rescue``) and a last task writes every registered result as JSON. Each
known bug (xfail) runs in a process of its own after it, so its writes are counted apart. Another
process runs the verify playbook with an inventory variable of the wrong type.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import yaml

from hardening_lab import (TlsServer, closed_port, hardening_fleet, make_ca, make_server_cert, pem, run_playbook_text,
                           write_kubeconfig)
from lab_fleet import LabFleet

NODE = "gpu-node-01"
KC = {"kubeconfig": "@kubeconfig"}  # "@name": a path or value the fixture makes (see _context)
ROOT = {"node_root": "@node_root"}


@dataclass
class Case:
    """One bad input: a module (or role) call and the words its message must hold."""

    id: str
    module: str
    args: Dict[str, Any]
    expect: Tuple[str, ...]
    where: str = "api"  # api: on localhost; node: on the lab node; role: include_role on localhost
    task: Dict[str, Any] = field(default_factory=dict)  # extra task keywords
    finding: Optional[str] = None  # a broken node file: reported as this finding code, not a failure
    bug: Optional[str] = None  # a known bug outside this suite: the case is xfail(strict) with this reason


CASES: List[Case] = [
    # ---- wrong types, unknown choices, negative timeouts: API modules ------------------------
    Case("device_plugin_state_choice", "device_plugin", dict(KC, state="installed"), ("state", "installed")),
    Case("device_plugin_wait_timeout_type", "device_plugin", dict(KC, wait_timeout="soon"), ("wait_timeout",)),
    Case("device_plugin_wait_timeout_negative", "device_plugin", dict(KC, wait=True, wait_timeout=-5),
         ("wait_timeout", "-5")),
    Case("device_plugin_node_selector_type", "device_plugin", dict(KC, node_selector=["gpu"]), ("node_selector",)),
    Case("device_plugin_pull_policy_choice", "device_plugin", dict(KC, image_pull_policy="Sometimes"),
         ("image_pull_policy", "Sometimes")),
    Case("device_plugin_toleration_operator", "device_plugin",
         dict(KC, tolerations=[{"key": "nvidia.com/gpu", "operator": "Maybe", "effect": "NoSchedule"}]),
         ("tolerations", "Maybe")),
    Case("device_plugin_info_read_logs_choice", "device_plugin_info", dict(KC, read_logs="sometimes"),
         ("read_logs", "sometimes")),
    Case("device_plugin_info_tail_negative", "device_plugin_info", dict(KC, log_tail_lines=-1),
         ("log_tail_lines", "-1")),
    Case("gpu_node_labels_type", "gpu_node", dict(KC, name=NODE, labels="gpu"), ("labels",)),
    Case("gpu_node_cordon_type", "gpu_node", dict(KC, name=NODE, cordon="sometimes"), ("cordon", "sometimes")),
    Case("node_lease_state_choice", "node_lease", dict(KC, node=NODE, holder_identity="run-1", state="held"),
         ("state", "held")),
    Case("node_lease_duration_negative", "node_lease",
         dict(KC, node=NODE, holder_identity="run-1", lease_duration_seconds=-30), ("lease_duration_seconds", "-30")),
    Case("device_plugin_restart_timeout_negative", "device_plugin_restart", dict(KC, node=NODE, timeout=-1),
         ("timeout", "-1")),
    Case("device_plugin_restart_count_type", "device_plugin_restart", dict(KC, node=NODE, expected_count="eight"),
         ("expected_count", "eight")),
    Case("gpu_smoke_test_timeout_negative", "gpu_smoke_test", dict(KC, node=NODE, timeout=-10), ("timeout", "-10")),
    # ---- malformed names and image references ---------------------------------------------
    Case("device_plugin_image_uppercase", "device_plugin", dict(KC, image="NVCR.io/Nvidia/Plugin"),
         ("image", "NVCR.io/Nvidia/Plugin")),
    Case("device_plugin_image_with_tag", "device_plugin", dict(KC, image="nvcr.io/nvidia/k8s-device-plugin:v1"),
         ("image", "k8s-device-plugin:v1")),
    Case("device_plugin_tag_malformed", "device_plugin", dict(KC, tag="v0.17 beta!"), ("tag", "v0.17 beta!")),
    Case("device_plugin_namespace_malformed", "device_plugin", dict(KC, namespace="Kube_System"),
         ("namespace", "Kube_System")),
    Case("device_plugin_name_malformed", "device_plugin", dict(KC, name="-plugin-"), ("name", "-plugin-")),
    Case("device_plugin_info_node_malformed", "device_plugin_info", dict(KC, nodes=["GPU_Node_01"]),
         ("nodes", "GPU_Node_01")),
    Case("gpu_node_name_malformed", "gpu_node", dict(KC, name="gpu node 01", labels={"a": "b"}),
         ("name", "gpu node 01")),
    Case("gpu_node_label_key_malformed", "gpu_node", dict(KC, name=NODE, labels={"nvidia.com/gpu present": "x"}),
         ("labels", "nvidia.com/gpu present")),
    Case("node_lease_node_malformed", "node_lease", dict(KC, node="gpu/node", holder_identity="run-1"),
         ("node", "gpu/node")),
    Case("device_plugin_restart_node_malformed", "device_plugin_restart", dict(KC, node="gpu-node-01;reboot"),
         ("gpu-node-01;reboot",)),
    Case("gpu_smoke_test_namespace_malformed", "gpu_smoke_test", dict(KC, node=NODE, namespace="Default"),
         ("namespace", "Default")),
    # ---- the device plugin's config ---------------------------------------------------------
    Case("device_plugin_config_type", "device_plugin", dict(KC, config=["mig_strategy", "none"]), ("config",),
         bug="plugins/modules/device_plugin.py declares config as a dict with suboptions: for a list value "
             "ansible-core's sub-spec validation answers only 'dictionary requested, could not parse JSON or "
             "key=value', without naming the option (declare it type raw and validate it in module_utils, or "
             "check the type before AnsibleModule)"),
    Case("device_plugin_config_unknown_key", "device_plugin", dict(KC, config={"migStrategy": "none"}),
         ("migStrategy",)),
    Case("device_plugin_mig_strategy_unknown", "device_plugin", dict(KC, config={"mig_strategy": "partial"}),
         ("mig_strategy", "partial")),
    Case("device_plugin_time_slicing_one_replica", "device_plugin",
         dict(KC, config={"time_slicing": {"resources": [{"name": "nvidia.com/gpu", "replicas": 1}]}}),
         ("time_slicing", "replicas", "got 1")),
    # ---- authentication and reachability ------------------------------------------------------
    Case("kubeconfig_absent", "device_plugin_info", {"kubeconfig": "@missing_kubeconfig"},
         ("@missing_kubeconfig", "no such file")),
    Case("kubeconfig_is_directory", "device_plugin_info", {"kubeconfig": "@directory"},
         ("kubeconfig", "@directory")),
    Case("kubeconfig_unknown_context", "device_plugin_info", dict(KC, context="prod-cluster"),
         ("prod-cluster", "context")),
    Case("api_unreachable", "device_plugin_info",
         {"host": "@closed_url", "api_key": "t0ken", "validate_certs": False, "api_retries": 0},
         ("@closed_url", "cannot reach", "Connection refused")),
    Case("api_wrong_token", "device_plugin_info", {"kubeconfig": "@wrong_token_kubeconfig"},
         ("unauthorized", "401", "api_key")),
    Case("api_expired_certificate", "device_plugin_info", {"kubeconfig": "@expired_kubeconfig", "api_retries": 0},
         ("@expired_url", "certificate has expired")),
    Case("api_foreign_ca", "device_plugin_info", {"kubeconfig": "@foreign_ca_kubeconfig", "api_retries": 0},
         ("@url", "certificate verify failed")),
    Case("ca_cert_absent", "device_plugin_info", dict(KC, ca_cert="/nonexistent/ca.crt"),
         ("ca_cert", "/nonexistent/ca.crt")),
    Case("request_timeout_negative", "device_plugin_info", dict(KC, request_timeout=-1), ("request_timeout", "-1")),
    Case("api_retries_negative", "device_plugin_info", dict(KC, api_retries=-2), ("api_retries", "-2")),
    # ---- node-side modules ----------------------------------------------------------------------
    Case("nvml_info_expected_count_type", "nvml_info", dict(ROOT, expected_gpu_count="eight"),
         ("expected_gpu_count", "eight"), where="node"),
    Case("nvml_info_timeout_negative", "nvml_info", dict(ROOT, timeout=-1), ("timeout", "-1"), where="node"),
    Case("nvml_info_xid_watch_negative", "nvml_info", dict(ROOT, xid_watch_seconds=-3),
         ("xid_watch_seconds", "-3"), where="node"),
    Case("nvml_info_min_driver_malformed", "nvml_info", dict(ROOT, min_driver_version="latest"),
         ("min_driver_version", "latest"), where="node"),
    Case("nvml_info_node_root_absent", "nvml_info", {"node_root": "/nonexistent/node"},
         ("node_root", "/nonexistent/node"), where="node"),
    # the lab NVML rejects a state file without its end line as real NVML does a host without
    # the driver's user-space library: the module reports it as evidence
    Case("nvml_info_truncated_state", "nvml_info", dict(ROOT), ("libnvidia-ml.so.1", "could not be loaded"),
         where="node", finding="nvml_library_missing", task={"environment": "@truncated_environment"}),
    Case("container_runtime_info_runtime_choice", "container_runtime_info", dict(ROOT, runtime="docker"),
         ("runtime", "docker"), where="node"),
    Case("container_runtime_info_config_relative", "container_runtime_info",
         dict(ROOT, runtime="containerd", config_path="etc/containerd/config.toml"),
         ("config_path", "etc/containerd/config.toml"), where="node"),
    Case("container_runtime_info_config_is_directory", "container_runtime_info",
         {"node_root": "@fake_root", "runtime": "containerd", "config_path": "/etc/containerd"},
         ("/etc/containerd", "Is a directory"), where="node", finding="runtime_config_invalid"),
    Case("container_runtime_info_config_malformed", "container_runtime_info",
         {"node_root": "@fake_root", "runtime": "containerd", "config_path": "/etc/containerd/config.toml"},
         ("/etc/containerd/config.toml", "not valid TOML"), where="node", finding="runtime_config_invalid"),
    Case("device_plugin_probe_deadline_negative", "device_plugin_probe", dict(ROOT, deadline=-1),
         ("deadline", "-1"), where="node"),
    Case("device_plugin_probe_socket_name_path", "device_plugin_probe",
         dict(ROOT, plugin_socket_name="../../../../etc/passwd"), ("plugin_socket_name", "../../../../etc/passwd"),
         where="node"),
    Case("device_plugin_probe_resource_malformed", "device_plugin_probe", dict(ROOT, resource_name="gpu!"),
         ("resource_name", "gpu!"), where="node"),
    Case("device_plugin_probe_kubelet_root_relative", "device_plugin_probe",
         dict(ROOT, kubelet_root_dir="var/lib/kubelet"), ("kubelet_root_dir", "var/lib/kubelet"), where="node"),
    Case("device_plugin_probe_expected_ids_empty", "device_plugin_probe", dict(ROOT, expected_device_ids=[""]),
         ("expected_device_ids",), where="node"),
    Case("device_plugin_probe_socket_is_directory", "device_plugin_probe", {"node_root": "@fake_root"},
         ("nvidia-gpu.sock", "is a directory"), where="node"),
    Case("device_plugin_probe_checkpoint_is_directory", "device_plugin_probe", {"node_root": "@fake_root2"},
         ("kubelet_internal_checkpoint", "directory"), where="node"),
    Case("device_plugin_probe_checkpoint_malformed", "device_plugin_probe", {"node_root": "@fake_root3"},
         ("kubelet_internal_checkpoint", "not valid JSON"), where="node"),
    # ---- role argument_specs -----------------------------------------------------------------
    Case("role_device_plugin_config_type", "device_plugin", {"device_plugin_config": ["mig_strategy"]},
         ("device_plugin_config",), where="role"),
    Case("role_device_plugin_state_choice", "device_plugin", {"device_plugin_state": "installed"},
         ("device_plugin_state", "installed"), where="role"),
    Case("role_device_plugin_wait_type", "device_plugin", {"device_plugin_wait": "sometimes"},
         ("device_plugin_wait", "sometimes"), where="role"),
    Case("role_device_plugin_selector_type", "device_plugin", {"device_plugin_node_selector": ["gpu"]},
         ("device_plugin_node_selector",), where="role"),
    Case("role_gpu_node_max_rounds_type", "gpu_node", {"gpu_node_max_rounds": "many"},
         ("gpu_node_max_rounds", "many"), where="role"),
    Case("role_gpu_node_commands_type", "gpu_node", {"gpu_node_commands": "reboot"},
         ("gpu_node_commands",), where="role"),
    Case("role_node_env_become_type", "node_env", {"node_env_become": "perhaps"},
         ("node_env_become", "perhaps"), where="role"),
    Case("kubeconfig_malformed", "device_plugin_info", {"kubeconfig": "@malformed_kubeconfig"},
         ("kubeconfig", "@malformed_kubeconfig")),
    Case("gpu_smoke_test_image_malformed", "gpu_smoke_test", dict(KC, node=NODE, image="cuda:::latest", timeout=5),
         ("image", "cuda:::latest")),
    Case("gpu_smoke_test_node_malformed", "gpu_smoke_test", dict(KC, node="gpu node 01", timeout=5),
         ("node", "gpu node 01")),
]
PLAYBOOK_CASE = "verify_playbook_expected_gpu_count_type"
CRASH = re.compile(r"MODULE FAILURE|Traceback \(most recent call last\)|^Task failed: Module failed", re.M)


# ---- the playbook ---------------------------------------------------------------------------

def _resolve(value: Any, ctx: Dict[str, Any]) -> Any:
    if isinstance(value, str) and value.startswith("@"):
        return ctx[value[1:]]
    if isinstance(value, dict):
        return {k: _resolve(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, ctx) for v in value]
    return value


def _task(case: Case, ctx: Dict[str, Any]) -> Dict[str, Any]:
    args = _resolve(case.args, ctx)
    if case.where == "role":
        return {"name": case.id, "block": [{"name": case.id + " (role)", "ansible.builtin.include_role": {
            "name": "gpunode.bringup." + case.module}, "vars": args}],
            "rescue": [{"name": case.id + " (record)", "ansible.builtin.set_fact": {
                "r_" + case.id: "{{ ansible_failed_result }}"}}]}
    task = {"name": case.id, "gpunode.bringup." + case.module: args, "register": "r_" + case.id,
            "ignore_errors": True}
    task.update(_resolve(case.task, ctx))
    return task


def _dump(names: List[str], path: str) -> Dict[str, Any]:
    body = ", ".join("%r: (r_%s | default({'failed': false, 'msg': 'no failure'}))" % (n, n) for n in names)
    return {"name": "Save the results", "ansible.builtin.copy": {
        "content": "{{ {%s} | to_json }}" % body, "dest": path, "mode": "0644"}, "delegate_to": "localhost"}


def _playbook(ctx: Dict[str, Any], results: Dict[str, str], cases: List[Case]) -> str:
    """The node-side cases on the lab node (results to ``results["node"]``), then the API and role
    cases on the controller (to ``results["api"]``)."""
    controller = [c for c in cases if c.where in ("api", "role")]
    node = [c for c in cases if c.where == "node"]
    plays = []
    if node:
        plays.append({"name": "Bad input to the node-side modules", "hosts": NODE, "gather_facts": False,
                      "environment": "{{ gpunode_node_environment }}",
                      "tasks": [_task(c, ctx) for c in node] + [_dump([c.id for c in node], results["node"])]})
    if controller:
        plays.append({"name": "Bad input to the API modules and the roles", "hosts": "localhost", "gather_facts": False,
                      "tasks": [_task(c, ctx) for c in controller] + [_dump([c.id for c in controller], results["api"])]})
    return yaml.safe_dump(plays, sort_keys=False, width=1000)


# ---- fixture: one lab node, broken files beside it, the runs ---------------------------------

def _tree_digest(path: Path) -> Dict[str, str]:
    digest: Dict[str, str] = {}
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            full = Path(dirpath) / name
            content = "dir" if full.is_dir() else hashlib.sha256(full.read_bytes()).hexdigest()
            digest[str(full.relative_to(path))] = "%s:%o" % (content, full.stat().st_mode)
    return digest


def _context(fleet: LabFleet, base: Path, tls: TlsServer, ca: Any) -> Dict[str, Any]:
    plugins = "var/lib/kubelet/device-plugins"
    ctx: Dict[str, Any] = {"kubeconfig": fleet.info["kubeconfig"], "url": fleet.info["url"],
                           "node_root": str(fleet.node_root(NODE))}
    # node roots with one broken file each, outside the lab's node roots
    one, two, three = base / "fr1", base / "fr2", base / "fr3"
    (one / plugins / "nvidia-gpu.sock").mkdir(parents=True)  # the socket path is a directory
    (one / "etc" / "containerd").mkdir(parents=True)
    (one / "etc" / "containerd" / "config.toml").write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri"\n')
    (two / plugins / "kubelet_internal_checkpoint").mkdir(parents=True)  # the checkpoint is a directory
    (three / plugins).mkdir(parents=True)
    (three / plugins / "kubelet_internal_checkpoint").write_text('{"Data": {"RegisteredDevices": {"nvidia.com/gpu": [')
    ctx.update(fake_root=str(one), fake_root2=str(two), fake_root3=str(three))
    # kubeconfigs: absent, a directory, not YAML, a wrong token, a server with an expired
    # certificate, the lab server checked against another CA; an API on a closed port
    ctx["missing_kubeconfig"] = str(base / "no-such-kubeconfig")
    ctx["directory"] = str(base / "fr1" / "etc")
    malformed = base / "kubeconfig-malformed"
    malformed.write_text("apiVersion: v1\nclusters: [\n  - {name: lab\n")
    ctx["malformed_kubeconfig"] = str(malformed)
    ctx["closed_url"] = "https://127.0.0.1:%d" % closed_port()
    lab_ca = Path(fleet.info["ca"]).read_bytes()
    ctx["wrong_token_kubeconfig"] = write_kubeconfig(base / "kc-wrong-token", fleet.info["url"], "not-a-lab-token",
                                                     lab_ca)
    ctx["expired_url"] = tls.url
    ctx["expired_kubeconfig"] = write_kubeconfig(base / "kc-expired", tls.url, "t0ken", pem(ca[0]))
    ctx["foreign_ca_kubeconfig"] = write_kubeconfig(base / "kc-foreign-ca", fleet.info["url"], fleet.info["token"],
                                                    pem(make_ca("another-ca")[0]))
    # the node's NVML state file without its end line
    lines = (fleet.node_root(NODE) / "nvml.state").read_text().splitlines(keepends=True)
    truncated = base / "nvml-truncated.state"
    truncated.write_text("".join(lines[:-1]))
    ctx["truncated_environment"] = {"LD_LIBRARY_PATH": fleet.info["nvml_library_dir"],
                                    "GPUNODE_LAB_NVML_STATE": str(truncated)}
    return ctx


@pytest.fixture(scope="module")
def outcome() -> Iterator[Dict[str, Any]]:
    fleet = hardening_fleet(nodes=1).up()
    tls: Optional[TlsServer] = None
    try:
        ca = make_ca("bad-input-ca")
        tls = TlsServer(fleet.state_dir / "tls", *make_server_cert(ca, expired=True))
        base = fleet.state_dir / "bad"
        base.mkdir()
        ctx = _context(fleet, base, tls, ca)
        fake_roots = ("fake_root", "fake_root2", "fake_root3")
        before = (fleet.snapshot(), {k: _tree_digest(Path(ctx[k])) for k in fake_roots})
        results: Dict[str, Any] = {}
        writes: Dict[str, Dict[str, Dict[str, int]]] = {}
        requests: Dict[str, Dict[str, Dict[str, int]]] = {}
        outputs: List[str] = []
        # the cases, then each known bug alone: the writes of each process from the audit log
        runs = [("before_bugs", [c for c in CASES if not c.bug])] + [(c.id, [c]) for c in CASES if c.bug]
        for name, cases in runs:
            results_files = {"api": str(base / ("%s.api.json" % name)), "node": str(base / ("%s.node.json" % name))}
            fleet.reset_counters()
            proc = run_playbook_text(fleet, _playbook(ctx, results_files, cases), "bad-input-" + name)
            outputs.append(proc.stdout + proc.stderr)
            for where in sorted({"node" if c.where == "node" else "api" for c in cases}):
                assert os.path.exists(results_files[where]), proc.stdout[-4000:] + proc.stderr[-4000:]
                results.update(json.loads(Path(results_files[where]).read_text()))
            counters = fleet.counters()
            writes[name], requests[name] = counters["write_requests"], counters["requests"]
        after = (fleet.snapshot(), {k: _tree_digest(Path(ctx[k])) for k in fake_roots})

        # an inventory variable of the wrong type, through a playbook users run
        fleet.reset_counters()
        verify = fleet.playbook("gpu_node_verify.yml", "-e", json.dumps({"gpunode_expected_gpu_count": "eight"}))
        results[PLAYBOOK_CASE] = {"rc": verify.rc, "output": verify.output, "writes": fleet.write_requests()}
        yield {"results": results, "output": "\n".join(outputs), "writes": writes, "requests": requests, "before": before,
               "after": after, "ctx": ctx}
    finally:
        if tls is not None:
            tls.stop()
        fleet.down()


# ---- assertions ------------------------------------------------------------------------------

def _message(result: Dict[str, Any], case: Case) -> str:
    if case.finding:
        findings = [f for f in result.get("findings") or [] if f.get("code") == case.finding]
        assert findings, "expected finding %s, got %s" % (case.finding, json.dumps(result)[:3000])
        return " ".join(f["message"] for f in findings)
    assert result.get("failed") is True, json.dumps(result)[:3000]
    return str(result.get("msg") or "")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.bug)]
                                               if c.bug else []) for c in CASES])
def test_bad_input_is_refused_clearly(outcome, case):
    result = outcome["results"][case.id]
    message = _message(result, case)
    assert not CRASH.search(message), message
    assert "Traceback" not in json.dumps(result), json.dumps(result)[:3000]
    assert "module_stderr" not in result, result.get("module_stderr")
    for word in _resolve(list(case.expect), outcome["ctx"]):
        assert word.lower() in message.lower(), "%r not in %r" % (word, message)
    if case.bug:  # each known bug ran in a process of its own: its writes apart
        assert outcome["writes"][case.id] == {}, "the API was written to: %s" % outcome["writes"][case.id]


def test_nothing_written_anywhere(outcome):
    # the audit log saw the run (the cases that get as far as the API read from it), and no write
    assert sum(n for per in outcome["requests"]["before_bugs"].values() for n in per.values()) > 0, outcome["requests"]
    assert outcome["writes"]["before_bugs"] == {}, outcome["writes"]["before_bugs"]
    assert outcome["before"][0] == outcome["after"][0], "a lab node root changed"
    assert outcome["before"][1] == outcome["after"][1], "a broken node root changed"
    assert "Traceback" not in outcome["output"]
    assert "MODULE FAILURE" not in outcome["output"]


def test_playbook_with_an_inventory_variable_of_the_wrong_type(outcome):
    result = outcome["results"][PLAYBOOK_CASE]
    assert result["rc"] != 0
    assert "gpu_node_expected_gpu_count" in result["output"] and "'eight'" in result["output"], result["output"][-3000:]
    assert "Traceback" not in result["output"] and "MODULE FAILURE" not in result["output"]
    assert result["writes"] == {}, result["writes"]


def test_enough_cases():
    assert len(CASES) + 1 >= 30
    assert len({c.id for c in CASES}) == len(CASES)
