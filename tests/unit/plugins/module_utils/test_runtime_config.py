# -*- coding: utf-8 -*-
"""container_runtime_info's logic: containerd (v1, v2, v3, imports, drop-ins), k3s/RKE2, CRI-O and
CDI layouts written into a temporary node root, and the findings they give."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os

import pytest

from ansible_collections.gpunode.bringup.plugins.module_utils import _runtime_config as rc
from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError

NVIDIA_BIN = "/usr/bin/nvidia-container-runtime"

# What `nvidia-ctk runtime configure --runtime=containerd [--set-as-default]` writes (schema 2).
CONTAINERD_V2 = """version = 2
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "{default}"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes]
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]
          privileged_without_host_devices = false
          runtime_engine = ""
          runtime_root = ""
          runtime_type = "io.containerd.runc.v2"
          [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]
            BinaryName = "{binary}"
            SystemdCgroup = true
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
          runtime_type = "io.containerd.runc.v2"
"""

RUNC_ONLY_V2 = """version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"""

# containerd 2.x (schema 3): the CRI runtime plugin has its own id.
CONTAINERD_V3 = """version = 3
[plugins."io.containerd.cri.v1.runtime".containerd]
  default_runtime_name = "nvidia"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.nvidia]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.nvidia.options]
      BinaryName = "/usr/bin/nvidia-container-runtime"
"""

# containerd 1.x schema 1: short plugin ids.
CONTAINERD_V1 = """[plugins.cri.containerd]
  default_runtime_name = "nvidia"
  [plugins.cri.containerd.runtimes.nvidia]
    runtime_type = "io.containerd.runc.v2"
    [plugins.cri.containerd.runtimes.nvidia.options]
      BinaryName = "/usr/bin/nvidia-container-runtime"
"""

# An nvidia-ctk drop-in (toolkit 1.17+ writes one and adds an import line to config.toml).
NVIDIA_DROPIN_V2 = """version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "nvidia"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]
      BinaryName = "/usr/bin/nvidia-container-runtime"
"""

# A drop-in that configures something else in the CRI plugin (a registry runtime, here).
OTHER_RUNTIME_DROPIN = """[plugins."{plugin}".containerd.runtimes.kata]
  runtime_type = "io.containerd.kata.v2"
"""

# k3s's generated config when it found nvidia-container-runtime (no --default-runtime).
K3S_GENERATED = """version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  {default_line}
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes."nvidia"]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes."nvidia".options]
  BinaryName = "/usr/bin/nvidia-container-runtime"
  SystemdCgroup = true
"""

K3S_GO_TEMPLATE = """{{ template "base" . }}
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes."nvidia"]
  runtime_type = "io.containerd.runc.v2"
"""

CRIO_NVIDIA_DROPIN = """[crio]
  [crio.runtime]
    default_runtime = "nvidia"
    [crio.runtime.runtimes]
      [crio.runtime.runtimes.nvidia]
        runtime_path = "/usr/bin/nvidia-container-runtime"
        runtime_type = "oci"
"""

CRIO_MAIN = """[crio.runtime]
default_runtime = "crun"
[crio.runtime.runtimes.crun]
runtime_path = "/usr/bin/crun"
"""

CDI_YAML = """---
cdiVersion: 0.5.0
kind: nvidia.com/gpu
devices:
- name: "0"
"""


def write(root, path, text, mode=None):
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    if mode is not None:
        os.chmod(str(target), mode)
    return target


def install_toolkit(root, path=NVIDIA_BIN):
    write(root, path, "#!/bin/sh\nexit 0\n", 0o755)


def gather(root, **params):
    values = {"node_root": str(root), "runtime": "auto", "config_path": None, "handler_name": "nvidia",
              "require_default_runtime": True}
    values.update(params)
    return rc.gather_runtime_info(values)


def finding_codes(result):
    return [f["code"] for f in result["findings"]]


# ---- containerd ---------------------------------------------------------------------------

def test_nvidia_ctk_default_config_is_healthy(tmp_path):
    write(tmp_path, rc.CONTAINERD_CONFIG, CONTAINERD_V2.format(default="nvidia", binary=NVIDIA_BIN))
    install_toolkit(tmp_path)
    result = gather(tmp_path)
    assert result["findings"] == [] and result["healthy"] is True
    assert (result["runtime"], result["config_version"], result["default_runtime"]) == ("containerd", 2, "nvidia")
    assert result["handlers"] == ["nvidia", "runc"]
    assert result["nvidia_runtime"] == {
        "present": True, "name": "nvidia", "runtime_type": "io.containerd.runc.v2", "binary": NVIDIA_BIN,
        "binary_path": NVIDIA_BIN, "binary_exists": True, "defined_in": "/etc/containerd/config.toml"}
    assert result["nvidia_is_default"] is True and result["runtime_class_needed"] is False
    assert result["cdi"]["enabled"] is False


@pytest.mark.parametrize("config, version, cdi_default", [
    (CONTAINERD_V1, 1, False),
    (CONTAINERD_V3, 3, True),
])
def test_other_schema_versions(tmp_path, config, version, cdi_default):
    write(tmp_path, rc.CONTAINERD_CONFIG, config)
    install_toolkit(tmp_path)
    result = gather(tmp_path)
    assert (result["config_version"], result["findings"]) == (version, [])
    assert result["nvidia_runtime"]["binary_exists"] is True
    assert result["cdi"]["enabled"] is cdi_default


@pytest.mark.parametrize("require, codes, class_needed", [
    (True, ["nvidia_runtime_not_default"], True),
    (False, [], True),
])
def test_handler_present_but_not_default(tmp_path, require, codes, class_needed):
    write(tmp_path, rc.CONTAINERD_CONFIG, CONTAINERD_V2.format(default="runc", binary=NVIDIA_BIN))
    install_toolkit(tmp_path)
    result = gather(tmp_path, require_default_runtime=require)
    assert finding_codes(result) == codes
    assert result["runtime_class_needed"] is class_needed
    if codes:
        assert "--set-as-default" in result["findings"][0]["action"]
        assert "runtimeClassName: nvidia" in result["findings"][0]["action"]


def test_runc_only_config_lacks_the_handler(tmp_path):
    write(tmp_path, rc.CONTAINERD_CONFIG, RUNC_ONLY_V2)
    result = gather(tmp_path)
    assert finding_codes(result) == ["nvidia_runtime_missing"]
    assert "nvidia-ctk runtime configure --runtime=containerd --set-as-default" in result["findings"][0]["action"]
    assert result["nvidia_runtime"]["present"] is False and result["healthy"] is False


@pytest.mark.parametrize("binary, installed, words", [
    (NVIDIA_BIN, None, "does not exist"),
    ("/usr/local/nvidia/toolkit/nvidia-container-runtime", NVIDIA_BIN, "does not exist"),
    ("", None, "runs plain runc"),
])
def test_binary_problems(tmp_path, binary, installed, words):
    write(tmp_path, rc.CONTAINERD_CONFIG, CONTAINERD_V2.format(default="nvidia", binary=binary))
    if installed:
        install_toolkit(tmp_path, installed)
    result = gather(tmp_path)
    assert finding_codes(result) == ["nvidia_runtime_binary_missing"]
    assert words in result["findings"][0]["message"]


def test_binary_not_executable(tmp_path):
    write(tmp_path, rc.CONTAINERD_CONFIG, CONTAINERD_V2.format(default="nvidia", binary=NVIDIA_BIN))
    write(tmp_path, NVIDIA_BIN, "not a program", 0o644)
    assert finding_codes(gather(tmp_path)) == ["nvidia_runtime_binary_missing"]


def test_binary_symlink_is_followed_inside_the_node_root(tmp_path):
    write(tmp_path, rc.CONTAINERD_CONFIG, CONTAINERD_V2.format(default="nvidia", binary=NVIDIA_BIN))
    install_toolkit(tmp_path, "/usr/local/nvidia/toolkit/nvidia-container-runtime")
    (tmp_path / "usr/bin").mkdir(parents=True)
    os.symlink("/usr/local/nvidia/toolkit/nvidia-container-runtime", str(tmp_path / "usr/bin/nvidia-container-runtime"))
    result = gather(tmp_path)
    assert result["findings"] == [] and result["nvidia_runtime"]["binary_exists"] is True


def test_other_runtime_type_runs_no_nvidia_binary(tmp_path):
    write(tmp_path, rc.CONTAINERD_CONFIG, """version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "nvidia"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]
    runtime_type = "io.containerd.kata.v2"
""")
    result = gather(tmp_path)
    assert finding_codes(result) == ["nvidia_runtime_binary_missing"]
    assert "io.containerd.kata.v2" in result["findings"][0]["message"]


def test_schema_2_snippet_in_a_version_3_config_is_not_read(tmp_path):
    write(tmp_path, rc.CONTAINERD_CONFIG, CONTAINERD_V2.format(default="nvidia", binary=NVIDIA_BIN)
          .replace("version = 2", "version = 3"))
    install_toolkit(tmp_path)
    result = gather(tmp_path)
    assert finding_codes(result) == ["nvidia_runtime_missing"]
    finding = result["findings"][0]
    assert 'defines [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia], which a version 3 config ' \
           'does not read' in finding["message"]
    assert 'plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.nvidia' in finding["action"]


@pytest.mark.parametrize("version, key", [(1, "cri"), (1, "io.containerd.grpc.v1.cri"), (2, "io.containerd.grpc.v1.cri"),
                                          (3, "io.containerd.cri.v1.runtime")])
def test_cri_plugin_key_per_version(version, key):
    data = {"plugins": {key: {"containerd": {"runtimes": {"nvidia": {"runtime_type": "io.containerd.runc.v2"}}}}}}
    assert "nvidia" in rc.containerd_view(data, version).runtimes
    assert rc.misplaced_handler(data, version, "nvidia") is None
    other = 3 if version < 3 else 2
    assert rc.containerd_view(data, other).runtimes == {}
    assert rc.misplaced_handler(data, other, "nvidia") is not None


def test_legacy_default_runtime_table(tmp_path):
    write(tmp_path, rc.CONTAINERD_CONFIG, """[plugins.cri.containerd.default_runtime]
  runtime_type = "io.containerd.runtime.v1.linux"
  runtime_engine = "/usr/bin/nvidia-container-runtime"
[plugins.cri.containerd.runtimes.nvidia]
  runtime_type = "io.containerd.runtime.v1.linux"
  runtime_engine = "/usr/bin/nvidia-container-runtime"
""")
    install_toolkit(tmp_path)
    result = gather(tmp_path)
    assert result["findings"] == [] and result["nvidia_is_default"] is True


# ---- imports and drop-ins -------------------------------------------------------------------

@pytest.mark.parametrize("import_line, dropin", [
    ('imports = ["/etc/containerd/conf.d/*.toml"]', "/etc/containerd/conf.d/99-nvidia.toml"),
    ('imports = ["conf.d/*.toml"]', "/etc/containerd/conf.d/99-nvidia.toml"),
    ('imports = ["/etc/containerd/nvidia.toml"]', "/etc/containerd/nvidia.toml"),
])
def test_handler_from_an_imported_dropin(tmp_path, import_line, dropin):
    write(tmp_path, rc.CONTAINERD_CONFIG, "version = 2\n%s\n" % import_line)
    write(tmp_path, dropin, NVIDIA_DROPIN_V2)
    install_toolkit(tmp_path)
    result = gather(tmp_path)
    assert result["findings"] == []
    assert result["nvidia_runtime"]["defined_in"] == dropin
    assert [(f["path"], f["role"], f["loaded"]) for f in result["config_files"]] == [
        ("/etc/containerd/config.toml", "main", True), (dropin, "import", True)]


def test_imports_are_read_in_name_order_and_followed_once(tmp_path):
    write(tmp_path, rc.CONTAINERD_CONFIG, 'version = 2\nimports = ["/etc/containerd/conf.d/*.toml"]\n')
    write(tmp_path, "/etc/containerd/conf.d/10-a.toml", 'version = 2\nimports = ["/etc/containerd/extra.toml"]\n')
    write(tmp_path, "/etc/containerd/conf.d/20-b.toml", 'version = 2\nimports = ["/etc/containerd/config.toml"]\n')
    write(tmp_path, "/etc/containerd/extra.toml", NVIDIA_DROPIN_V2)
    install_toolkit(tmp_path)
    result = gather(tmp_path)
    assert [f["path"] for f in result["config_files"]] == [
        "/etc/containerd/config.toml", "/etc/containerd/conf.d/10-a.toml", "/etc/containerd/conf.d/20-b.toml",
        "/etc/containerd/extra.toml"]
    assert result["findings"] == []


@pytest.mark.parametrize("version, plugin, survives", [
    (2, "io.containerd.grpc.v1.cri", False),  # containerd 1.x: the import replaces the CRI plugin section
    (3, "io.containerd.cri.v1.runtime", True),  # containerd 2.x: keys merge
])
def test_merge_semantics_follow_the_config_version(tmp_path, version, plugin, survives):
    main = CONTAINERD_V2.format(default="nvidia", binary=NVIDIA_BIN) if version == 2 else CONTAINERD_V3
    write(tmp_path, rc.CONTAINERD_CONFIG, main.replace(
        "version = %d\n" % version, 'version = %d\nimports = ["/etc/containerd/conf.d/*.toml"]\n' % version))
    write(tmp_path, "/etc/containerd/conf.d/50-kata.toml", OTHER_RUNTIME_DROPIN.format(plugin=plugin))
    install_toolkit(tmp_path)
    result = gather(tmp_path)
    assert ("nvidia" in result["handlers"]) is survives
    assert "kata" in result["handlers"]
    assert finding_codes(result) == ([] if survives else ["nvidia_runtime_missing"])


def test_dropin_that_nothing_imports_is_ignored(tmp_path):
    write(tmp_path, rc.CONTAINERD_CONFIG, RUNC_ONLY_V2)
    write(tmp_path, "/etc/containerd/conf.d/99-nvidia.toml", NVIDIA_DROPIN_V2)
    install_toolkit(tmp_path)
    result = gather(tmp_path)
    assert result["ignored_dropins"] == ["/etc/containerd/conf.d/99-nvidia.toml"]
    assert finding_codes(result) == ["nvidia_runtime_missing"]
    finding = result["findings"][0]
    assert "99-nvidia.toml defines it but is not imported" in finding["message"]
    assert 'imports = ["/etc/containerd/conf.d/*.toml"]' in finding["action"]


@pytest.mark.parametrize("files, bad_path, words", [
    ({rc.CONTAINERD_CONFIG: "version = 2\n[plugins\n"}, rc.CONTAINERD_CONFIG, "not valid TOML"),
    ({rc.CONTAINERD_CONFIG: 'version = 2\nimports = ["/etc/containerd/missing.toml"]\n'},
     "/etc/containerd/missing.toml", "cannot be read"),
    ({rc.CONTAINERD_CONFIG: 'version = 2\nimports = ["/etc/containerd/conf.d/*.toml"]\n',
      "/etc/containerd/conf.d/bad.toml": "= broken"}, "/etc/containerd/conf.d/bad.toml", "not valid TOML"),
])
def test_unusable_files_are_reported(tmp_path, files, bad_path, words):
    for path, text in files.items():
        write(tmp_path, path, text)
    result = gather(tmp_path)
    invalid = [f for f in result["findings"] if f["code"] == "runtime_config_invalid"]
    assert len(invalid) == 1 and bad_path in invalid[0]["message"] and words in invalid[0]["message"]
    assert "nvidia_runtime_missing" in finding_codes(result)


def test_missing_config_means_containerd_defaults(tmp_path):
    write(tmp_path, "/run/containerd/containerd.sock", "")
    result = gather(tmp_path)
    assert result["runtime"] == "containerd" and result["default_runtime"] == "runc"
    assert finding_codes(result) == ["nvidia_runtime_missing"]
    assert "built-in defaults" in result["config_files"][0]["error"]


# ---- k3s and RKE2 ---------------------------------------------------------------------------

@pytest.mark.parametrize("distro, directory", [("k3s", rc.K3S_CONTAINERD_DIR), ("rke2", rc.RKE2_CONTAINERD_DIR)])
def test_k3s_generated_config_without_default_runtime(tmp_path, distro, directory):
    write(tmp_path, directory + "/config.toml", K3S_GENERATED.format(default_line=""))
    install_toolkit(tmp_path)
    result = gather(tmp_path)
    assert result["runtime"] == distro and result["default_runtime"] == "runc"
    assert finding_codes(result) == ["nvidia_runtime_not_default"]
    action = result["findings"][0]["action"]
    assert "default-runtime: nvidia" in action and "/etc/rancher/%s/config.yaml" % distro in action


def test_k3s_with_default_runtime_is_healthy(tmp_path):
    write(tmp_path, rc.K3S_CONTAINERD_DIR + "/config.toml", K3S_GENERATED.format(default_line='default_runtime_name = "nvidia"'))
    install_toolkit(tmp_path)
    assert gather(tmp_path)["findings"] == []


def test_k3s_plain_template_is_read_when_nothing_was_generated(tmp_path):
    write(tmp_path, rc.K3S_CONTAINERD_DIR + "/config.toml.tmpl",
          K3S_GENERATED.format(default_line='default_runtime_name = "nvidia"'))
    install_toolkit(tmp_path)
    result = gather(tmp_path)
    assert result["findings"] == []
    assert [(f["role"], f["loaded"]) for f in result["config_files"]] == [("main", False), ("template", True)]


def test_k3s_go_template_is_not_evaluated(tmp_path):
    write(tmp_path, rc.K3S_CONTAINERD_DIR + "/config-v3.toml.tmpl", K3S_GO_TEMPLATE)
    result = gather(tmp_path)
    assert result["runtime"] == "k3s"
    assert finding_codes(result) == ["nvidia_runtime_missing"]
    assert "Restart k3s" in result["findings"][0]["action"]
    assert "Go template" in result["config_files"][-1]["error"]


def test_k3s_template_with_handler_but_stale_generated_config(tmp_path):
    write(tmp_path, rc.K3S_CONTAINERD_DIR + "/config.toml", RUNC_ONLY_V2)
    write(tmp_path, rc.K3S_CONTAINERD_DIR + "/config.toml.tmpl", K3S_GO_TEMPLATE)
    result = gather(tmp_path, runtime="k3s")
    assert finding_codes(result) == ["nvidia_runtime_missing"]
    assert "regenerates config.toml" in result["findings"][0]["action"]


def test_k3s_without_toolkit_is_told_to_install_it(tmp_path):
    write(tmp_path, rc.K3S_CONTAINERD_DIR + "/config.toml", RUNC_ONLY_V2)
    result = gather(tmp_path)
    assert "Install the NVIDIA Container Toolkit" in result["findings"][0]["action"]
    assert "systemctl restart k3s" in result["findings"][0]["action"]


def test_config_path_overrides_the_k3s_data_dir(tmp_path):
    write(tmp_path, "/data/k3s/agent/etc/containerd/config.toml", K3S_GENERATED.format(
        default_line='default_runtime_name = "nvidia"'))
    install_toolkit(tmp_path)
    result = gather(tmp_path, runtime="k3s", config_path="/data/k3s/agent/etc/containerd/config.toml")
    assert result["findings"] == [] and result["config_path"] == "/data/k3s/agent/etc/containerd/config.toml"


# ---- CRI-O ----------------------------------------------------------------------------------

def test_crio_dropin_from_nvidia_ctk(tmp_path):
    write(tmp_path, rc.CRIO_CONFIG, CRIO_MAIN)
    write(tmp_path, rc.CRIO_DROPIN_DIR + "/99-nvidia.toml", CRIO_NVIDIA_DROPIN)
    install_toolkit(tmp_path)
    result = gather(tmp_path)
    assert result["runtime"] == "crio" and result["findings"] == []
    assert result["handlers"] == ["crun", "nvidia"] and result["default_runtime"] == "nvidia"
    assert result["nvidia_runtime"]["defined_in"] == rc.CRIO_DROPIN_DIR + "/99-nvidia.toml"
    assert result["cdi"]["enabled"] is True


def test_crio_later_dropin_wins(tmp_path):
    write(tmp_path, rc.CRIO_DROPIN_DIR + "/10-nvidia.conf", CRIO_NVIDIA_DROPIN)
    write(tmp_path, rc.CRIO_DROPIN_DIR + "/20-crun.conf", '[crio.runtime]\ndefault_runtime = "crun"\n')
    install_toolkit(tmp_path)
    result = gather(tmp_path)
    assert result["default_runtime"] == "crun"
    assert finding_codes(result) == ["nvidia_runtime_not_default"]
    assert "--runtime=crio" in result["findings"][0]["action"]


@pytest.mark.parametrize("installed, codes", [("/usr/bin/nvidia", []), (None, ["nvidia_runtime_binary_missing"])])
def test_crio_without_runtime_path_looks_up_the_handler_name(tmp_path, installed, codes):
    write(tmp_path, rc.CRIO_DROPIN_DIR + "/99-nvidia.conf",
          '[crio.runtime]\ndefault_runtime = "nvidia"\n[crio.runtime.runtimes.nvidia]\nruntime_type = "oci"\n')
    if installed:
        install_toolkit(tmp_path, installed)
    assert finding_codes(gather(tmp_path)) == codes


def test_crio_without_handler(tmp_path):
    write(tmp_path, rc.CRIO_CONFIG, CRIO_MAIN)
    result = gather(tmp_path)
    assert finding_codes(result) == ["nvidia_runtime_missing"]
    assert "systemctl restart crio" in result["findings"][0]["action"]


# ---- detection, CDI, options ---------------------------------------------------------------

@pytest.mark.parametrize("paths, detected", [
    ([], []),
    (["/run/containerd/containerd.sock"], ["containerd"]),
    (["/var/run/crio/crio.sock"], ["crio"]),
    ([rc.CONTAINERD_CONFIG, rc.K3S_CONTAINERD_DIR + "/config.toml"], ["k3s", "containerd"]),
    ([rc.CRIO_DROPIN_DIR + "/01.conf", rc.RKE2_CONTAINERD_DIR + "/config.toml.tmpl"], ["rke2", "crio"]),
])
def test_detection_order(tmp_path, paths, detected):
    for path in paths:
        write(tmp_path, path, "")
    assert rc.detect_runtimes(rc.NodeFiles(str(tmp_path))) == detected


def test_no_runtime_at_all(tmp_path):
    result = gather(tmp_path)
    assert result["runtime"] is None
    assert [(f["code"], f["severity"]) for f in result["findings"]] == [("container_runtime_not_found", "error")]


def test_cdi_specs_are_listed_with_their_kind(tmp_path):
    write(tmp_path, rc.CONTAINERD_CONFIG, RUNC_ONLY_V2)
    write(tmp_path, "/etc/cdi/nvidia.yaml", CDI_YAML)
    write(tmp_path, "/var/run/cdi/other.json", '{"cdiVersion": "0.6.0", "kind": "vendor.com/fpga"}')
    write(tmp_path, "/etc/cdi/README", "not a spec")
    result = gather(tmp_path)
    assert result["cdi"]["specs"] == [{"path": "/etc/cdi/nvidia.yaml", "kind": "nvidia.com/gpu"},
                                      {"path": "/var/run/cdi/other.json", "kind": "vendor.com/fpga"}]
    assert result["cdi"]["nvidia_gpu_spec"] is True
    assert "a CDI spec for nvidia.com/gpu exists" in result["findings"][0]["message"]


def test_custom_handler_name(tmp_path):
    write(tmp_path, rc.CONTAINERD_CONFIG, CONTAINERD_V2.format(default="nvidia", binary=NVIDIA_BIN)
          .replace("runtimes.nvidia", "runtimes.nvidia-cdi").replace('"nvidia"', '"nvidia-cdi"'))
    install_toolkit(tmp_path)
    assert gather(tmp_path, handler_name="nvidia-cdi")["findings"] == []
    assert finding_codes(gather(tmp_path)) == ["nvidia_runtime_missing"]


@pytest.mark.parametrize("params, option", [
    ({"node_root": "relative"}, "node_root"),
    ({"node_root": "/no/such/node/root"}, "node_root"),
    ({"runtime": "docker"}, "runtime"),
    ({"config_path": "etc/containerd/config.toml", "runtime": "containerd"}, "config_path"),
    ({"config_path": "/etc/containerd/config.toml"}, "config_path"),
    ({"handler_name": "Nvidia Runtime"}, "handler_name"),
])
def test_bad_options_name_the_option(params, option):
    values = {"node_root": "/", "runtime": "auto", "config_path": None, "handler_name": "nvidia"}
    values.update(params)
    with pytest.raises(InvalidOptionError, match=option):
        rc.check_options(values)


# ---- pure helpers ---------------------------------------------------------------------------

def test_deep_merge_keeps_base_keys_and_does_not_mutate():
    base = {"a": {"b": 1, "c": {"d": 2}}, "x": [1]}
    merged = rc.deep_merge(base, {"a": {"c": {"e": 3}}, "x": [2]})
    assert merged == {"a": {"b": 1, "c": {"d": 2, "e": 3}}, "x": [2]}
    assert base == {"a": {"b": 1, "c": {"d": 2}}, "x": [1]}


@pytest.mark.parametrize("spec, binary, default", [
    ({"runtime_type": "io.containerd.runc.v2", "options": {"BinaryName": NVIDIA_BIN}}, NVIDIA_BIN, False),
    ({"runtime_type": "io.containerd.runc.v2"}, "runc", True),
    ({"options": {"BinaryName": "nvidia-container-runtime.cdi"}}, "nvidia-container-runtime.cdi", False),
    ({"runtime_type": "io.containerd.runtime.v1.linux", "runtime_engine": NVIDIA_BIN}, NVIDIA_BIN, False),
    ({"runtime_type": "io.containerd.kata.v2"}, None, False),
])
def test_containerd_handler_binary(spec, binary, default):
    handler = rc.containerd_handler("nvidia", spec, "/etc/containerd/config.toml")
    assert (handler.binary, handler.binary_default) == (binary, default)


@pytest.mark.parametrize("text, kind", [
    (CDI_YAML, "nvidia.com/gpu"),
    ('kind: "nvidia.com/gpu"\n', "nvidia.com/gpu"),
    ('{"cdiVersion":"0.5.0","kind":"nvidia.com/gpu","devices":[]}', "nvidia.com/gpu"),
    ("cdiVersion: 0.5.0\n", None),
])
def test_cdi_kind(text, kind):
    assert rc.cdi_kind(text) == kind


@pytest.mark.parametrize("binary, nvidia", [
    (NVIDIA_BIN, True), ("nvidia-container-runtime.cdi", True), ("/usr/bin/runc", False), (None, False)])
def test_is_nvidia_binary(binary, nvidia):
    assert rc.is_nvidia_binary(binary) is nvidia
