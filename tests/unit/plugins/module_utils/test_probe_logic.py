# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Pure logic of the device plugin probe: options, paths, device IDs, comparison, findings."""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import dataclasses
import json

import pytest

from ansible_collections.gpunode.bringup.plugins.module_utils import _probe as probe
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError
from ansible_collections.gpunode.bringup.plugins.module_utils._probe import (
    DeviceComparison,
    KubeletView,
    NodeObservations,
    PluginAnswer,
    PluginDevice,
    ProbeRequest,
    RpcFailure,
    SocketCheck,
    assess,
    compare_devices,
    node_paths,
    parse_device_id,
    validate_request,
)

G1 = "GPU-11111111-1111-4111-8111-111111111111"
G2 = "GPU-22222222-2222-4222-8222-222222222222"
G3 = "GPU-33333333-3333-4333-8333-333333333333"
M1 = "MIG-aaaaaaaa-aaaa-5aaa-8aaa-aaaaaaaaaaaa"
M2 = "MIG-bbbbbbbb-bbbb-5bbb-8bbb-bbbbbbbbbbbb"


def healthy(*ids):
    return tuple(PluginDevice(device_id, "Healthy", (0,)) for device_id in ids)


# ------------------------------------------------------------------ options and paths

@pytest.mark.parametrize(
    "change, message",
    [
        ({"node_root": "lab/node"}, "node_root must be an absolute path"),
        ({"kubelet_root_dir": "var/lib/kubelet"}, "kubelet_root_dir must be an absolute path"),
        ({"plugin_socket_name": ""}, "plugin_socket_name must be a file name"),
        ({"plugin_socket_name": "../kubelet.sock"}, "plugin_socket_name must be a file name"),
        ({"plugin_socket_name": ".."}, "plugin_socket_name must be a file name"),
        ({"resource_name": "nvidia.com/"}, "resource_name must be an extended resource name"),
        ({"resource_name": ""}, "resource_name must be an extended resource name"),
        ({"deadline": -1.0}, "deadline must be more than 0"),
        ({"deadline": 0}, "deadline must be more than 0"),
        ({"deadline": 301}, "at most 300 seconds"),
        ({"deadline": float("nan")}, "deadline must be a number"),
        ({"expected_device_ids": (G1, " ")}, "expected_device_ids must hold non-empty strings"),
    ],
)
def test_validate_request_names_the_option(change, message):
    with pytest.raises(InvalidOptionError) as info:
        validate_request(dataclasses.replace(ProbeRequest(), **change))
    assert message in info.value.msg


@pytest.mark.parametrize("resource", ["nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/mig-1g.10gb"])
def test_validate_request_accepts(resource):
    validate_request(ProbeRequest(resource_name=resource, deadline=0.2, expected_device_ids=(G1,)))


@pytest.mark.parametrize(
    "node_root, kubelet_root, plugin_dir",
    [
        ("/", "/var/lib/kubelet", "/var/lib/kubelet/device-plugins"),
        ("/tmp/lab/nodes/gpu-1", "/var/lib/kubelet", "/tmp/lab/nodes/gpu-1/var/lib/kubelet/device-plugins"),
        ("/", "/var/snap/microk8s/common/var/lib/kubelet", "/var/snap/microk8s/common/var/lib/kubelet/device-plugins"),
        ("/tmp/n/", "/var/lib/kubelet/", "/tmp/n/var/lib/kubelet/device-plugins"),
    ],
)
def test_node_paths(node_root, kubelet_root, plugin_dir):
    paths = node_paths(ProbeRequest(node_root=node_root, kubelet_root_dir=kubelet_root))
    assert paths.device_plugins_dir == plugin_dir
    assert paths.kubelet_socket == plugin_dir + "/kubelet.sock"
    assert paths.plugin_socket == plugin_dir + "/nvidia-gpu.sock"
    assert paths.checkpoint == plugin_dir + "/kubelet_internal_checkpoint"
    assert paths.pod_resources_socket == plugin_dir.replace("device-plugins", "pod-resources/kubelet.sock")


def test_socket_path_length_limit_is_named():
    probe.check_socket_path_length("/" + "x" * 106, "plugin socket")  # 107 bytes: fine
    with pytest.raises(InvalidOptionError) as info:
        probe.check_socket_path_length("/" + "x" * 107, "plugin socket")
    assert "is 108 bytes long; unix socket paths are limited to 107 bytes" in info.value.msg


# ------------------------------------------------------------------ device IDs

@pytest.mark.parametrize(
    "device_id, base, kind, replica, parent",
    [
        (G1, G1, "gpu", None, None),
        (G1 + "::3", G1, "gpu", 3, None),
        (M1, M1, "mig", None, None),
        (M1 + "::0", M1, "mig", 0, None),
        ("MIG-" + G2 + "/7/0", "MIG-" + G2 + "/7/0", "mig", None, G2),
        ("MIG-" + G2 + "/7/0::1", "MIG-" + G2 + "/7/0", "mig", 1, G2),
        ("0", "0", "other", None, None),
        ("weird::x", "weird::x", "other", None, None),
    ],
)
def test_parse_device_id(device_id, base, kind, replica, parent):
    ref = parse_device_id(device_id)
    assert (ref.base_id, ref.kind, ref.replica, ref.parent_gpu) == (base, kind, replica, parent)


# ------------------------------------------------------------------ comparison

@pytest.mark.parametrize(
    "devices, expected, missing, extra, unhealthy, replicas, unverified",
    [
        # whole GPUs
        (healthy(G1, G2), [G1, G2], [], [], [], {}, []),
        (healthy(G1), [G1, G2], [G2], [], [], {}, []),
        (healthy(G1, G2, G3), [G1, G2], [], [G3], [], {}, []),
        ((), [G1, G2], [G1, G2], [], [], {}, []),
        # duplicate expected IDs count once
        (healthy(G1), [G1, G1], [], [], [], {}, []),
        # time-slicing replicas stand for their GPU
        (healthy(*["%s::%d" % (g, n) for g in (G1, G2) for n in range(4)]), [G1, G2], [], [], [],
         {G1: 4, G2: 4}, []),
        (healthy(*["%s::%d" % (G1, n) for n in range(4)]), [G1, G2], [G2], [], [], {G1: 4}, []),
        # MIG UUIDs expected
        (healthy(M1, M2), [M1, M2], [], [], [], {}, []),
        (healthy(M1), [M1, M2], [M2], [], [], {}, []),
        # MIG devices when only GPU UUIDs are expected: not comparable, not "extra", no GPU "missing"
        (healthy(M1, M2), [G1], [], [], [], {}, [M1, M2]),
        # old-style MIG IDs name their parent GPU
        (healthy("MIG-%s/1/0" % G1, "MIG-%s/2/0" % G1), [G1, G2], [G2], [], [], {}, []),
        # unhealthy devices keep their full ID
        ((PluginDevice(G1, "Healthy"), PluginDevice(G2, "Unhealthy")), [G1, G2], [], [], [G2], {}, []),
        ((PluginDevice(G1 + "::0", "Unhealthy"), PluginDevice(G1 + "::1", "Unhealthy")), [G1], [], [],
         [G1 + "::0", G1 + "::1"], {G1: 2}, []),
    ],
    ids=["match", "missing", "extra", "no-devices", "dup-expected", "replicas", "replicas-missing",
         "mig", "mig-missing", "mig-unverified", "mig-old-style", "unhealthy", "unhealthy-replicas"],
)
def test_compare_devices(devices, expected, missing, extra, unhealthy, replicas, unverified):
    result = compare_devices(devices, expected)
    assert result.compared
    assert list(result.missing) == missing
    assert list(result.extra) == extra
    assert list(result.unhealthy) == unhealthy
    assert result.replicas == replicas
    assert list(result.unverified) == unverified


def test_compare_without_expected_still_reports_unhealthy():
    result = compare_devices((PluginDevice(G1, "Healthy"), PluginDevice(G2, "Unhealthy")), [])
    assert not result.compared and result.missing == () and result.extra == ()
    assert result.unhealthy == (G2,) and result.unhealthy_base_ids == (G2,)


def test_unhealthy_base_ids_fold_replicas():
    devices = tuple(PluginDevice("%s::%d" % (G2, n), "Unhealthy") for n in range(3))
    assert compare_devices(devices, [G2]).unhealthy_base_ids == (G2,)


# ------------------------------------------------------------------ findings

PATHS = node_paths(ProbeRequest(node_root="/n"))
T0 = 1767225600.0


def observations(**change):
    """A healthy node: every socket listening, plugin answered with G1 and G2, kubelet has both."""
    devices = change.pop("devices", healthy(G1, G2))
    expected = change.pop("expected", (G1, G2))
    request = ProbeRequest(node_root="/n", expected_device_ids=tuple(expected), deadline=2.0)
    base = dict(
        request=request,
        paths=PATHS,
        plugin_dir_exists=True,
        kubelet_socket=SocketCheck(PATHS.kubelet_socket, probe.SOCKET_LISTENING, T0),
        plugin_socket=SocketCheck(PATHS.plugin_socket, probe.SOCKET_LISTENING, T0 + 5),
        pod_resources_socket=SocketCheck(PATHS.pod_resources_socket, probe.SOCKET_LISTENING, T0),
        plugin=PluginAnswer(options={}, devices=devices),
        comparison=compare_devices(devices, expected),
        kubelet=KubeletView("pod_resources", tuple(d.id for d in devices if d.healthy) or None),
    )
    base.update(change)
    return NodeObservations(**base)


def codes(obs):
    return [finding.code for finding in assess(obs)]


def test_healthy_node_has_no_findings():
    assert assess(observations()) == []


@pytest.mark.parametrize(
    "change, expected_codes",
    [
        ({"plugin_dir_exists": False}, ["plugin_dir_missing"]),
        ({"kubelet_socket": SocketCheck(PATHS.kubelet_socket, probe.SOCKET_MISSING)}, ["kubelet_socket_missing"]),
        ({"kubelet_socket": SocketCheck(PATHS.kubelet_socket, probe.SOCKET_DEAD, T0)}, ["kubelet_socket_missing"]),
        ({"plugin_socket": SocketCheck(PATHS.plugin_socket, probe.SOCKET_MISSING), "plugin": None,
          "comparison": None}, ["plugin_socket_missing"]),
        ({"plugin_socket": SocketCheck(PATHS.plugin_socket, probe.SOCKET_DEAD, T0), "plugin": None,
          "comparison": None}, ["plugin_socket_missing"]),
        ({"plugin_socket": SocketCheck(PATHS.plugin_socket, probe.SOCKET_REGULAR_FILE, T0), "plugin": None,
          "comparison": None}, ["plugin_socket_not_socket"]),
        ({"plugin_socket": SocketCheck(PATHS.plugin_socket, probe.SOCKET_OTHER, T0), "plugin": None,
          "comparison": None}, ["plugin_socket_not_socket"]),
        ({"plugin_socket": SocketCheck(PATHS.plugin_socket, probe.SOCKET_UNRESPONSIVE, T0), "plugin": None,
          "comparison": None}, ["plugin_not_answering"]),
        ({"plugin": PluginAnswer(failure=RpcFailure("GetDevicePluginOptions", "DEADLINE_EXCEEDED", "", 2.0)),
          "comparison": None}, ["plugin_not_answering"]),
        ({"plugin": PluginAnswer(options={}, failure=RpcFailure("ListAndWatch", "STREAM_ENDED", "", 0.0)),
          "comparison": None}, ["plugin_not_answering"]),
        ({"devices": healthy(G1)}, ["plugin_devices_missing"]),
        ({"devices": ()}, ["plugin_devices_missing"]),
        ({"devices": (), "expected": ()}, ["plugin_devices_missing"]),
        ({"devices": healthy(G1, G2, G3)}, ["plugin_devices_extra"]),
        ({"devices": (PluginDevice(G1, "Healthy"), PluginDevice(G2, "Unhealthy"))}, ["plugin_devices_unhealthy"]),
        # all unhealthy: the kubelet lists none, which is consistent, not "not registered"
        ({"devices": (PluginDevice(G1, "Unhealthy"), PluginDevice(G2, "Unhealthy"))}, ["plugin_devices_unhealthy"]),
        ({"kubelet": KubeletView("pod_resources", None)}, ["not_registered"]),
        ({"kubelet": KubeletView("checkpoint", None, "UNIMPLEMENTED")}, ["not_registered"]),
        ({"kubelet": KubeletView("none", None, "no checkpoint")}, ["not_registered"]),
        ({"kubelet": KubeletView("pod_resources", (G1,))}, ["kubelet_devices_mismatch"]),
        ({"kubelet": KubeletView("checkpoint", (G1, G2, G3))}, ["kubelet_devices_mismatch"]),
        # kubelet.sock newer than the plugin socket, kubelet has no devices: stale (not also not_registered)
        ({"kubelet_socket": SocketCheck(PATHS.kubelet_socket, probe.SOCKET_LISTENING, T0 + 10),
          "kubelet": KubeletView("pod_resources", None)}, ["registration_stale"]),
        # stale by mtimes and the checkpoint still lists the old devices
        ({"kubelet_socket": SocketCheck(PATHS.kubelet_socket, probe.SOCKET_LISTENING, T0 + 10),
          "kubelet": KubeletView("checkpoint", (G1, G2))}, ["registration_stale"]),
        # mtimes say stale but pod-resources shows the kubelet has the devices: registered
        ({"kubelet_socket": SocketCheck(PATHS.kubelet_socket, probe.SOCKET_LISTENING, T0 + 10)}, []),
        # kubelet down and plugin hung: both named; no registration verdict without a kubelet
        ({"kubelet_socket": SocketCheck(PATHS.kubelet_socket, probe.SOCKET_MISSING),
          "plugin": PluginAnswer(failure=RpcFailure("GetDevicePluginOptions", "DEADLINE_EXCEEDED", "", 2.0)),
          "comparison": None, "kubelet": KubeletView("none", None)},
         ["kubelet_socket_missing", "plugin_not_answering"]),
        # plugin missing: the kubelet's empty view is explained by it, not reported again
        ({"plugin_socket": SocketCheck(PATHS.plugin_socket, probe.SOCKET_MISSING), "plugin": None,
          "comparison": None, "kubelet": KubeletView("pod_resources", None)}, ["plugin_socket_missing"]),
    ],
)
def test_assess_codes(change, expected_codes):
    assert codes(observations(**change)) == expected_codes


def test_findings_name_the_object_and_carry_evidence():
    obs = observations(plugin=PluginAnswer(
        failure=RpcFailure("GetDevicePluginOptions", "DEADLINE_EXCEEDED", "Deadline Exceeded", 2.001)),
        comparison=None)
    (finding,) = assess(obs)
    assert finding.message == ("plugin socket /n/var/lib/kubelet/device-plugins/nvidia-gpu.sock accepted the "
                               "connection but did not answer GetDevicePluginOptions within 2s")
    assert finding.evidence["rpc"]["code"] == "DEADLINE_EXCEEDED"
    assert finding.action.startswith("restart the device plugin pod")
    json.dumps(finding.to_dict())


def test_dead_socket_is_named_as_such():
    (finding,) = assess(observations(plugin_socket=SocketCheck(PATHS.plugin_socket, probe.SOCKET_DEAD, T0),
                                     plugin=None, comparison=None))
    assert "dead socket left behind" in finding.message
    assert finding.evidence["socket"]["state"] == "dead_socket"


def test_regular_file_is_named_as_such():
    (finding,) = assess(observations(plugin_socket=SocketCheck(PATHS.plugin_socket, probe.SOCKET_REGULAR_FILE, T0),
                                     plugin=None, comparison=None))
    assert "is a regular file, not a socket" in finding.message


def test_mismatch_evidence_lists_both_sides():
    (finding,) = assess(observations(kubelet=KubeletView("pod_resources", (G1, G3))))
    assert finding.evidence["only_in_plugin"] == [G2]
    assert finding.evidence["only_in_kubelet"] == [G3]


def test_every_code_has_an_action():
    assert set(probe.ACTIONS) == {
        "plugin_dir_missing", "kubelet_socket_missing", "plugin_socket_missing", "plugin_socket_not_socket",
        "plugin_not_answering", "plugin_devices_missing", "plugin_devices_extra", "plugin_devices_unhealthy",
        "not_registered", "registration_stale", "kubelet_devices_mismatch"}


def test_comparison_is_serializable():
    json.dumps(DeviceComparison(True, (G1,), 1).to_dict())
