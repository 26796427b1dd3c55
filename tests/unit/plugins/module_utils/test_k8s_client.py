# -*- coding: utf-8 -*-
"""The shared Kubernetes plumbing: option spec, configuration, retries, error translation."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

import pytest

from ansible_collections.gpunode.bringup.plugins.module_utils import _k8s_client as kc
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import (
    GpuNodeError,
    InvalidOptionError,
    K8sError,
    K8sForbiddenError,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_args import (
    AUTH_ARG_SPEC,
    auth_argument_spec,
)

KUBECONFIG = {
    "apiVersion": "v1",
    "kind": "Config",
    "clusters": [{"name": "lab", "cluster": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}},
                 {"name": "other", "cluster": {"server": "https://10.9.9.9:6443"}}],
    "users": [{"name": "admin", "user": {"token": "secret-token"}}],
    "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "admin"}},
                 {"name": "other", "context": {"cluster": "other", "user": "admin"}}],
    "current-context": "lab",
}


def auth_header(config):
    return [v["value"] for v in config.auth_settings().values() if v["key"] == "authorization"][0]


def params(**overrides):
    base = {name: spec.get("default") for name, spec in AUTH_ARG_SPEC.items()}
    base.update(overrides)
    return base


@pytest.mark.parametrize("option,env", [
    ("kubeconfig", "K8S_AUTH_KUBECONFIG"), ("context", "K8S_AUTH_CONTEXT"), ("host", "K8S_AUTH_HOST"),
    ("api_key", "K8S_AUTH_API_KEY"), ("validate_certs", "K8S_AUTH_VERIFY_SSL"),
    ("ca_cert", "K8S_AUTH_SSL_CA_CERT"), ("client_cert", "K8S_AUTH_CERT_FILE"), ("client_key", "K8S_AUTH_KEY_FILE"),
])
def test_auth_options_fall_back_to_kubernetes_core_environment(option, env):
    assert AUTH_ARG_SPEC[option]["fallback"][1] == [env]


def test_secrets_are_no_log_and_module_specs_are_copies():
    assert AUTH_ARG_SPEC["api_key"]["no_log"] is True
    assert AUTH_ARG_SPEC["password"]["no_log"] is True
    spec = auth_argument_spec({"name": {"type": "str"}})
    spec["api_key"]["no_log"] = False
    assert AUTH_ARG_SPEC["api_key"]["no_log"] is True and "name" not in AUTH_ARG_SPEC


def test_kubeconfig_dict_and_context():
    config = kc.build_configuration(params(kubeconfig=KUBECONFIG))
    assert config.host == "https://127.0.0.1:6443"
    assert auth_header(config) == "Bearer secret-token"
    other = kc.build_configuration(params(kubeconfig=KUBECONFIG, context="other"))
    assert other.host == "https://10.9.9.9:6443"


def test_explicit_options_override_kubeconfig(tmp_path):
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(KUBECONFIG))
    config = kc.build_configuration(params(kubeconfig=str(path), host="https://api.example:6443/",
                                           validate_certs=False))
    assert config.host == "https://api.example:6443"
    assert config.verify_ssl is False


def test_api_key_option_sets_the_bearer_header():
    config = kc.build_configuration(params(host="https://api.example:6443", api_key="tok"))
    assert auth_header(config) == "Bearer tok"


@pytest.mark.parametrize("overrides,needle", [
    ({"kubeconfig": "/nonexistent/kubeconfig"}, "kubeconfig /nonexistent/kubeconfig: no such file"),
    ({"kubeconfig": KUBECONFIG, "context": "missing"}, "missing"),
    ({"kubeconfig": KUBECONFIG, "ca_cert": "/nonexistent/ca.crt"}, "ca_cert /nonexistent/ca.crt: no such file"),
    ({"kubeconfig": KUBECONFIG, "request_timeout": -1}, "request_timeout must be greater than 0"),
    ({"kubeconfig": KUBECONFIG, "api_retries": -2}, "api_retries must be 0 or more"),
])
def test_bad_options_name_the_option(overrides, needle):
    with pytest.raises(InvalidOptionError) as err:
        kc.K8sClient(params(**overrides))
    assert needle in err.value.msg


class FakeApiException(kc.ApiException):
    def __init__(self, status, message="boom", headers=None):  # pylint: disable=super-init-not-called
        self.status = status
        self.reason = "reason"
        self.body = json.dumps({"kind": "Status", "message": message})
        self.headers = headers or {}


def client(sleeps):
    return kc.K8sClient(params(kubeconfig=KUBECONFIG, api_retries=3), sleep=sleeps.append)


def flaky(failures):
    calls = []

    def call(**kwargs):
        calls.append(kwargs)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return "ok"
    return call, calls


def test_retries_429_honouring_retry_after_then_succeeds():
    sleeps = []
    fn, calls = flaky([FakeApiException(429, headers={"Retry-After": "1"}), FakeApiException(503)])
    assert client(sleeps).call("list nodes", fn) == "ok"
    assert len(calls) == 3 and sleeps == [1.0, 0.4]
    assert all(c["_request_timeout"] == 20 for c in calls)


def test_retries_are_bounded_and_the_error_names_the_call():
    sleeps = []
    fn, calls = flaky([FakeApiException(500, "etcd down")] * 10)
    with pytest.raises(K8sError) as err:
        client(sleeps).call("list nodes", fn)
    assert len(calls) == 4 and len(sleeps) == 3
    assert "list nodes: the API answered HTTP 500 after 4 attempts: etcd down" in err.value.msg


def test_dropped_connections_are_retried_then_reported():
    sleeps = []
    fn, calls = flaky([ConnectionResetError("reset by peer")] * 10)
    with pytest.raises(K8sError) as err:
        client(sleeps).call("get daemonset kube-system/nvidia-device-plugin-daemonset", fn)
    assert len(calls) == 4
    assert "cannot reach the Kubernetes API" in err.value.msg


@pytest.mark.parametrize("status,kind,needle", [
    (401, K8sError, "unauthorized (HTTP 401)"),
    (403, K8sForbiddenError, 'forbidden: nodes "gpu-1" is forbidden'),
    (404, K8sError, "HTTP 404"),
    (422, K8sError, "HTTP 422"),
])
def test_client_errors_are_not_retried(status, kind, needle):
    sleeps = []
    fn, calls = flaky([FakeApiException(status, 'nodes "gpu-1" is forbidden')])
    with pytest.raises(kind) as err:
        client(sleeps).call("patch node gpu-1", fn)
    assert len(calls) == 1 and not sleeps
    assert err.value.msg.startswith("patch node gpu-1: ") and needle in err.value.msg


def test_error_result_carries_the_next_action():
    result = GpuNodeError("node gpu-7: plugin socket missing", action="restart the plugin pod", node="gpu-7").to_result()
    assert result == {"msg": "node gpu-7: plugin socket missing. Next: restart the plugin pod",
                      "action": "restart the plugin pod", "node": "gpu-7"}
