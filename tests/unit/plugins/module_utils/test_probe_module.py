# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The device_plugin_probe module's thin layer: arguments, fail_json on bad input, missing libraries."""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import json
import os
import shutil
import tempfile

import pytest

from ansible.module_utils import testing

from ansible_collections.gpunode.bringup.plugins.module_utils._kubelet_api import _runtime
from ansible_collections.gpunode.bringup.plugins.modules import device_plugin_probe


def run(args, capsys):
    with testing.patch_module_args(args):
        with pytest.raises(SystemExit) as info:
            device_plugin_probe.main()
    return info.value.code, json.loads(capsys.readouterr().out)


@pytest.fixture
def node_root():
    root = tempfile.mkdtemp(prefix="dpp-", dir="/tmp" if os.path.isdir("/tmp") else None)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("check_mode", [False, True])
def test_reports_findings_without_failing(node_root, capsys, check_mode):
    code, result = run({"node_root": node_root, "_ansible_check_mode": check_mode}, capsys)
    assert code == 0
    assert result["changed"] is False and result["healthy"] is False
    assert result["finding_codes"] == ["plugin_dir_missing"]
    assert result["paths"]["device_plugins_dir"] == os.path.join(node_root, "var/lib/kubelet/device-plugins")


@pytest.mark.parametrize(
    "args, message",
    [
        ({"deadline": -1}, "deadline must be more than 0 and at most 300 seconds, got -1.0"),
        ({"node_root": "relative/dir"}, "node_root must be an absolute path"),
        ({"plugin_socket_name": "a/b.sock"}, "plugin_socket_name must be a file name"),
        ({"node_root": "/tmp/" + "x" * 90}, "unix socket paths are limited to 107 bytes"),
    ],
)
def test_bad_input_fails_naming_it(args, message, capsys):
    code, result = run(args, capsys)
    assert code == 1 and result["failed"]
    assert message in result["msg"]
    assert "Traceback" not in result["msg"]


def test_socket_path_is_a_directory(node_root, capsys):
    os.makedirs(os.path.join(node_root, "var/lib/kubelet/device-plugins/nvidia-gpu.sock"))
    code, result = run({"node_root": node_root}, capsys)
    assert code == 1
    assert result["msg"].startswith(os.path.join(node_root, "var/lib/kubelet/device-plugins/nvidia-gpu.sock")
                                    + " is a directory, not a socket")


@pytest.mark.parametrize("flag, library", [("HAS_GRPC", "grpcio"), ("HAS_PROTOBUF", "protobuf")])
def test_missing_library(monkeypatch, capsys, flag, library):
    monkeypatch.setattr(_runtime, flag, False)
    code, result = run({}, capsys)
    assert code == 1
    assert "Failed to import the required Python library (%s)" % library in result["msg"]
