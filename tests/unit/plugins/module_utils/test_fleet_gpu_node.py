# -*- coding: utf-8 -*-
"""gpu_node: label/annotation/cordon validation, the minimal merge patch, check mode as a dry run."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import pytest

from ansible_collections.gpunode.bringup.plugins.module_utils import _node_labels as nl
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError, K8sError
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_apply import comparable, decode_response
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_names import check_label_key, label_text
from ansible_collections.gpunode.bringup.tests.unit.plugins.module_utils.device_plugin_fakes import FakeClient, node


@pytest.mark.parametrize("params,fragment", [
    ({}, "name (the node) is required"),
    ({"name": "gpu_01", "cordon": True}, "name 'gpu_01' is not a valid Kubernetes name"),
    ({"name": "gpu-01"}, "nothing to do"),
    ({"name": "gpu-01", "labels": {"nvidia.com/gpu.present": None}}, "to remove a label use state=absent"),
    ({"name": "gpu-01", "labels": {"nvidia.com/gpu present": "true"}}, "the name part must be"),
    ({"name": "gpu-01", "labels": {"Bad_Prefix!/x": "true"}}, "invalid prefix"),
    ({"name": "gpu-01", "labels": {"pool": "a b"}}, "is not a valid label value"),
    ({"name": "gpu-01", "labels": {"pool": "x" * 64}}, "is not a valid label value"),
    ({"name": "gpu-01", "labels": ["pool"]}, "labels must be a dictionary"),
    ({"name": "gpu-01", "annotations": {"note": None}}, "annotations: note has no value"),
    ({"name": "gpu-01", "state": "absent", "labels": "pool"}, "list of keys"),
    ({"name": "gpu-01", "state": "gone", "cordon": True}, "state 'gone'"),
])
def test_bad_options(params, fragment):
    with pytest.raises(InvalidOptionError) as error:
        nl.spec_from_params(params)
    assert fragment in error.value.msg


def test_label_values_are_stored_as_kubernetes_text():
    spec = nl.spec_from_params({"name": "gpu-01", "labels": {"nvidia.com/gpu.present": True, "gpus": 8},
                                "annotations": {"note": "XID 79 on GPU 3, ticket OPS-1234"}})
    assert spec.labels == {"nvidia.com/gpu.present": "true", "gpus": "8"}
    assert spec.annotations["note"] == "XID 79 on GPU 3, ticket OPS-1234"
    assert nl.spec_from_params({"name": "n", "state": "absent", "labels": {"a": "x"}}).labels == {"a": None}
    assert label_text(False) == "false"


@pytest.mark.parametrize("node_object,params,patch", [
    (node("gpu-01", {}), {"labels": {"nvidia.com/gpu.present": "true"}},
     {"metadata": {"labels": {"nvidia.com/gpu.present": "true"}}}),
    (node("gpu-01", {"nvidia.com/gpu.present": "true"}), {"labels": {"nvidia.com/gpu.present": "true"}}, None),
    (node("gpu-01", {"nvidia.com/gpu.present": "false"}), {"labels": {"nvidia.com/gpu.present": "true"}},
     {"metadata": {"labels": {"nvidia.com/gpu.present": "true"}}}),
    (node("gpu-01", {"pool": "a"}), {"state": "absent", "labels": ["pool", "missing"]},
     {"metadata": {"labels": {"pool": None}}}),
    (node("gpu-01", {}), {"state": "absent", "labels": ["missing"]}, None),
    (node("gpu-01", {}), {"cordon": True}, {"spec": {"unschedulable": True}}),
    (node("gpu-01", {}, unschedulable=True), {"cordon": True}, None),
    (node("gpu-01", {}, unschedulable=True), {"cordon": False}, {"spec": {"unschedulable": False}}),
    (node("gpu-01", {}), {"cordon": False}, None),
    (node("gpu-01", {}), {"annotations": {"node.alpha.kubernetes.io/ttl": "0", "note": "x"}},
     {"metadata": {"annotations": {"note": "x"}}}),
    (node("gpu-01", {}), {"state": "absent", "annotations": ["node.alpha.kubernetes.io/ttl"], "cordon": True},
     {"metadata": {"annotations": {"node.alpha.kubernetes.io/ttl": None}}, "spec": {"unschedulable": True}}),
])
def test_compute_patch_touches_only_what_differs(node_object, params, patch):
    spec = nl.spec_from_params(dict(params, name="gpu-01"))
    assert nl.compute_patch(node_object, spec) == patch


def test_describe_patch():
    assert nl.describe_patch({"metadata": {"labels": {"a": "1", "b": None}, "annotations": {"n": "x"}},
                              "spec": {"unschedulable": False}}) == ["label a=1", "remove label b", "annotation n=x",
                                                                     "uncordon"]


def run(client, check_mode, **params):
    return nl.gpu_node_result(dict(params, name="gpu-01"), check_mode, True, client_factory=lambda _p: client)


def test_check_mode_is_a_dry_run_then_apply_then_idempotent():
    client = FakeClient(nodes=[node("gpu-01", {})])
    check = run(client, True, labels={"nvidia.com/gpu.present": True}, cordon=True)
    assert check["changed"] is True and client.writes == []
    assert check["node"]["labels"]["nvidia.com/gpu.present"] == "true" and check["node"]["unschedulable"] is True
    assert "nvidia.com/gpu.present" not in client.nodes[0]["metadata"]["labels"]
    assert check["actions"] == ["label nvidia.com/gpu.present=true", "cordon"]
    assert check["diff"]["before"]["unschedulable"] is False and check["diff"]["after"]["unschedulable"] is True
    applied = run(client, False, labels={"nvidia.com/gpu.present": True}, cordon=True)
    assert applied["changed"] is True and len(client.writes) == 1
    patch_call = client.writes[0]
    assert patch_call[2]["_content_type"] == "application/merge-patch+json"
    requests_before = client.requests
    again = run(client, False, labels={"nvidia.com/gpu.present": True}, cordon=True)
    assert again["changed"] is False and "diff" not in again and len(client.writes) == 1
    assert client.requests - requests_before == 1  # one read, no write
    assert run(client, True, labels={"nvidia.com/gpu.present": True}, cordon=True)["changed"] is False


def test_unknown_node_is_named():
    with pytest.raises(K8sError) as error:
        run(FakeClient(nodes=[]), False, cordon=True)
    assert "node gpu-01 does not exist" in error.value.msg


@pytest.mark.parametrize("key,ok", [
    ("nvidia.com/gpu.present", True), ("feature.node.kubernetes.io/pci-10de.present", True), ("pool", True),
    ("a" * 63, True), ("a" * 64, False), ("/x", False), ("example.com/", False), ("UPPER.example/x", False),
])
def test_label_keys(key, ok):
    if ok:
        assert check_label_key("labels", key) == key
    else:
        with pytest.raises(InvalidOptionError):
            check_label_key("labels", key)


def test_comparable_drops_status_and_server_metadata():
    obj = {"kind": "ConfigMap", "metadata": {"name": "x", "resourceVersion": "9", "managedFields": [], "uid": "u",
                                             "generation": 2, "creationTimestamp": "t",
                                             "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
           "data": {"a": "b"}, "status": {}}
    assert comparable(obj) == {"kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}}
    assert comparable(None) is None
    assert obj["metadata"]["resourceVersion"] == "9"


class Raw:
    def __init__(self, data):
        self.data = data


@pytest.mark.parametrize("response,decoded", [
    (Raw(b'{"kind": "Node"}'), {"kind": "Node"}), (Raw(b""), {}), ({"kind": "Pod"}, {"kind": "Pod"}),
    ('{"items": []}', {"items": []}),
])
def test_decode_response(response, decoded):
    assert decode_response(response) == decoded
