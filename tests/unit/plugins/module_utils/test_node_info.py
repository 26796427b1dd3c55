# -*- coding: utf-8 -*-
"""node_info's wiring: every option validated before any check reads, option names in messages,
the NVML UUIDs fed to the probe, findings tagged with their check, the checks selection."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import tempfile

import pytest

from ansible_collections.gpunode.bringup.plugins.module_utils import _node_info as ni
from ansible_collections.gpunode.bringup.plugins.module_utils import _nvml, _probe, _runtime_config
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError

DEFAULTS = dict(
    checks=["nvml", "runtime", "probe"], node_root="/", driver_root=None, expected_gpu_count=None,
    min_driver_version=None, require_persistence_mode=False, xid_watch_seconds=0,
    ignored_xids=[13, 31, 43, 45, 68, 109], nvml_timeout=60, runtime="auto", runtime_config_path=None,
    handler_name="nvidia", require_default_runtime=True, kubelet_root_dir="/var/lib/kubelet",
    resource_name="nvidia.com/gpu", plugin_socket_name="nvidia-gpu.sock", expected_device_ids=None, deadline=5.0,
)


def params(**overrides):
    values = dict(DEFAULTS)
    values.update(overrides)
    return values


class Recorder(object):
    """Stands in for the three checks; records the order and what each got."""

    def __init__(self, monkeypatch, nvml_gpus=("GPU-a", "GPU-b"), healthy=(True, True, True)):
        self.calls = []
        self.probe_request = None
        recorder = self

        def nvml(values, library=None, timeout_option="timeout"):
            recorder.calls.append(("nvml", values["timeout"], timeout_option))
            return {"changed": False, "healthy": healthy[0], "gpu_count": len(nvml_gpus),
                    "gpus": [{"index": i, "uuid": u} for i, u in enumerate(nvml_gpus)] + [{"index": 9, "uuid": None}],
                    "findings": [] if healthy[0] else [{"code": "gpu_lost", "severity": "error", "gpu": 1}]}

        def runtime(values, config_path_option="config_path"):
            recorder.calls.append(("runtime", values["config_path"], config_path_option))
            return {"changed": False, "healthy": healthy[1],
                    "findings": [] if healthy[1] else [{"code": "nvidia_runtime_missing", "severity": "error"}]}

        class Report(object):
            def to_result(self):
                return {"changed": False, "healthy": healthy[2],
                        "findings": [] if healthy[2] else [{"code": "plugin_socket_missing", "message": "m"}]}

        def probe(request):
            recorder.calls.append(("probe",))
            recorder.probe_request = request
            return Report()

        monkeypatch.setattr(_nvml, "gather_nvml_info", nvml)
        monkeypatch.setattr(_runtime_config, "gather_runtime_info", runtime)
        monkeypatch.setattr(_probe, "probe_node", probe)


def test_runs_the_checks_in_order_and_feeds_nvml_uuids_to_the_probe(monkeypatch):
    rec = Recorder(monkeypatch)
    result = ni.gather_node_info(params())
    assert [c[0] for c in rec.calls] == ["nvml", "runtime", "probe"]
    assert rec.probe_request.expected_device_ids == ("GPU-a", "GPU-b")
    assert result["checks"] == ["nvml", "runtime", "probe"]
    assert result["healthy"] is True and result["findings"] == [] and result["changed"] is False
    assert set(result["seconds"]) == {"nvml", "runtime", "probe", "total"}
    # each part is the module's own result, without its own "changed"
    assert "changed" not in result["nvml"] and result["nvml"]["gpu_count"] == 2


def test_given_expected_device_ids_win_over_nvml(monkeypatch):
    rec = Recorder(monkeypatch)
    ni.gather_node_info(params(expected_device_ids=["GPU-x"]))
    assert rec.probe_request.expected_device_ids == ("GPU-x",)


def test_option_names_reach_the_checks(monkeypatch):
    rec = Recorder(monkeypatch)
    ni.gather_node_info(params(nvml_timeout=7.5, runtime="containerd", runtime_config_path="/etc/c.toml"))
    assert ("nvml", 7.5, "nvml_timeout") in rec.calls
    assert ("runtime", "/etc/c.toml", "runtime_config_path") in rec.calls


@pytest.mark.parametrize("healthy, unhealthy_sources", [
    ((False, True, True), ["nvml"]),
    ((True, False, True), ["runtime"]),
    ((True, True, False), ["probe"]),
    ((False, False, False), ["nvml", "runtime", "probe"]),
])
def test_findings_carry_their_check_and_an_unhealthy_check_fails_the_node(monkeypatch, healthy, unhealthy_sources):
    Recorder(monkeypatch, healthy=healthy)
    result = ni.gather_node_info(params())
    assert result["healthy"] is False
    assert [f["source"] for f in result["findings"]] == unhealthy_sources


def test_checks_left_out_are_null_and_not_run(monkeypatch):
    rec = Recorder(monkeypatch)
    result = ni.gather_node_info(params(checks=["probe", "runtime"]))
    assert [c[0] for c in rec.calls] == ["runtime", "probe"]
    assert result["checks"] == ["runtime", "probe"] and result["nvml"] is None
    assert rec.probe_request.expected_device_ids == ()  # nothing to compare with: comparison skipped


@pytest.mark.parametrize("overrides, words", [
    (dict(node_root="relative/root"), "node_root must be an absolute path"),
    (dict(nvml_timeout=0), "nvml_timeout must be more than 0 seconds"),
    (dict(xid_watch_seconds=-1), "xid_watch_seconds must be between 0 and 3600"),
    (dict(driver_root="run/nvidia/driver"), "driver_root must be an absolute path"),
    (dict(runtime_config_path="etc/containerd/config.toml", runtime="containerd"),
     "runtime_config_path must be an absolute path"),
    (dict(runtime_config_path="/etc/containerd/config.toml"), "runtime_config_path needs runtime set"),
    (dict(handler_name="Not A Handler"), "handler_name must be a runtime handler name"),
    (dict(deadline=0), "deadline"),
    (dict(kubelet_root_dir="/" + "k" * 120), "107"),
])
def test_every_option_is_checked_before_any_check_reads(monkeypatch, overrides, words):
    rec = Recorder(monkeypatch)
    with pytest.raises(InvalidOptionError) as err:
        ni.gather_node_info(params(**overrides))
    assert words in err.value.msg
    assert rec.calls == []  # nothing read


def test_only_selected_checks_validate_their_options(monkeypatch):
    Recorder(monkeypatch)
    # a runtime option nobody uses does not fail a probe-only run
    ni.gather_node_info(params(checks=["probe"], handler_name="Not A Handler"))


def test_missing_libraries_name_the_check(monkeypatch):
    monkeypatch.setattr(_nvml, "HAS_PYNVML", False)
    monkeypatch.setattr(_nvml, "PYNVML_IMPORT_ERROR", "ImportError: pynvml")
    assert ni.missing_libraries(["nvml", "runtime", "probe"])[0] == ("nvml", "nvidia-ml-py", "ImportError: pynvml")
    assert all(check != "nvml" for check, _lib, _err in ni.missing_libraries(["runtime", "probe"]))


def test_nvml_device_ids_skip_gpus_without_uuid():
    assert ni.nvml_device_ids({"gpus": [{"uuid": "GPU-1"}, {"uuid": None}, "junk", {"uuid": "GPU-2"}]}) == ["GPU-1", "GPU-2"]
    assert ni.nvml_device_ids(None) == []


def test_a_real_pass_over_an_empty_node_root():
    # no stand-ins here: runtime and probe really read an empty node root (short: socket paths)
    root = tempfile.mkdtemp(prefix="ni", dir="/tmp")
    try:
        result = ni.gather_node_info(params(checks=["runtime", "probe"], node_root=root))
    finally:
        os.rmdir(root)
    codes = [(f["source"], f["code"]) for f in result["findings"]]
    assert ("runtime", "container_runtime_not_found") in codes
    assert ("probe", "plugin_dir_missing") in codes
    assert result["healthy"] is False


def test_shared_specs_agree_with_the_checks_and_node_info_has_every_option():
    from ansible_collections.gpunode.bringup.plugins.module_utils import _node_args as args

    assert tuple(args.NVML_ARGS["ignored_xids"]["default"]) == _nvml.DEFAULT_IGNORED_XIDS
    assert tuple(args.RUNTIME_ARGS["runtime"]["choices"]) == _runtime_config.RUNTIME_CHOICES
    spec = args.node_info_spec(ni.CHECKS)
    for part in (args.NVML_ARGS, args.RUNTIME_ARGS, args.PROBE_ARGS):
        for name, option in part.items():
            renamed = args.NODE_INFO_RENAMED.get(name, name)
            assert renamed in spec, name
            if name != "expected_device_ids":
                assert spec[renamed] == option, name
    assert "default" not in spec["expected_device_ids"]  # unset: NVML's UUIDs
    assert set(spec) - {"checks"} == set(DEFAULTS) - {"checks"}
    # a copy: what one module does to its spec does not reach another
    copy = args.spec(args.PROBE_ARGS)
    copy["deadline"]["default"] = 1.0
    assert args.PROBE_ARGS["deadline"]["default"] == 5.0
