# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""Container runtime configuration of a node and the runtime step's verdict
(module gpunode.bringup.container_runtime_info).

The device plugin sees no GPU when the container runtime does not inject the driver, so this
reads what the runtime will run with:

- containerd: ``/etc/containerd/config.toml`` and the files its ``imports`` pull in (relative
  to the importing file, globs expanded in name order, imports of imports followed once each),
  merged as containerd merges them: config version 3 (containerd 2.x) merges keys deeply;
  versions 1 and 2 (containerd 1.x) let an imported file that configures the CRI plugin replace
  that plugin's whole section. Files in ``/etc/containerd/conf.d`` that nothing imports are
  listed as ignored: containerd does not read them.
- k3s and RKE2: the containerd config they generate at start
  (``/var/lib/rancher/{k3s,rke2}/agent/etc/containerd/config.toml``); their ``config.toml.tmpl`` /
  ``config-v3.toml.tmpl`` templates are listed, and read only when no generated config exists
  and the template is plain TOML.
- CRI-O: ``/etc/crio/crio.conf`` then every file of ``/etc/crio/crio.conf.d`` in name order,
  later values winning.
- CDI specs under ``/etc/cdi`` and ``/var/run/cdi``.

Every path is a node path read below ``node_root``. TOML comes from tomllib (Python 3.11+) or
tomli (3.9, 3.10). Node-side code: runs on Python 3.9.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import copy
import glob
import os
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import InvalidOptionError
from ansible_collections.gpunode.bringup.plugins.module_utils._nvml import (
    SEVERITY_ERROR,
    Finding,
    is_healthy,
    node_path,
    resolve_in_root,
)

try:
    import tomllib as toml_library
except ImportError:
    try:
        import tomli as toml_library
    except ImportError:
        toml_library = None
        TOML_IMPORT_ERROR: Optional[str] = traceback.format_exc()
    else:
        TOML_IMPORT_ERROR = None
else:
    TOML_IMPORT_ERROR = None

HAS_TOML = toml_library is not None

RUNTIME_CHOICES = ("auto", "containerd", "k3s", "rke2", "crio")

CONTAINERD_CONFIG = "/etc/containerd/config.toml"
CONTAINERD_DROPIN_DIR = "/etc/containerd/conf.d"
K3S_CONTAINERD_DIR = "/var/lib/rancher/k3s/agent/etc/containerd"
RKE2_CONTAINERD_DIR = "/var/lib/rancher/rke2/agent/etc/containerd"
K3S_TEMPLATES = ("config-v3.toml.tmpl", "config.toml.tmpl")
CRIO_CONFIG = "/etc/crio/crio.conf"
CRIO_DROPIN_DIR = "/etc/crio/crio.conf.d"
CDI_SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")
CDI_NVIDIA_KIND = "nvidia.com/gpu"
RUNTIME_SOCKETS = (("containerd", "/run/containerd/containerd.sock"), ("crio", "/var/run/crio/crio.sock"))
# Where a bare binary name is looked up (a root's PATH).
SEARCH_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
MAX_IMPORTED_FILES = 256

# Path of the CRI runtime section ("...containerd" table) for each containerd config version.
CRI_PLUGIN_KEYS: Dict[int, str] = {
    1: "cri",
    2: "io.containerd.grpc.v1.cri",
    3: "io.containerd.cri.v1.runtime",
}
RUNC_V2 = "io.containerd.runc.v2"
LEGACY_LINUX_RUNTIME = "io.containerd.runtime.v1.linux"


# ---- records ------------------------------------------------------------------------------

@dataclass
class ConfigFile:
    """One configuration file considered, as a node path."""

    path: str
    role: str  # main, import, drop-in, template
    loaded: bool = False
    error: Optional[str] = None

    def to_result(self) -> Dict[str, Any]:
        return {"path": self.path, "role": self.role, "loaded": self.loaded, "error": self.error}


@dataclass
class RuntimeView:
    """The parts of a runtime's configuration this step needs, from one file or merged."""

    present: bool = False  # the file configures the CRI runtime section at all
    default_runtime: Optional[str] = None
    runtimes: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    defined_in: Dict[str, str] = field(default_factory=dict)  # handler -> file that last set it
    enable_cdi: Optional[bool] = None
    legacy_default: Optional[Dict[str, Any]] = None  # containerd 1.x [..containerd.default_runtime]


@dataclass
class Handler:
    """A runtime handler (a RuntimeClass handler name) and the binary it runs."""

    name: str
    runtime_type: Optional[str] = None
    binary: Optional[str] = None  # as configured (path or bare name); None when nothing names one
    binary_default: bool = False  # no binary configured: the runtime's default applies
    binary_path: Optional[str] = None  # node path found for it
    binary_exists: bool = False
    defined_in: Optional[str] = None

    def to_result(self) -> Dict[str, Any]:
        return {"name": self.name, "runtime_type": self.runtime_type, "binary": self.binary,
                "binary_path": self.binary_path, "binary_exists": self.binary_exists,
                "defined_in": self.defined_in}


@dataclass
class CdiSpec:
    path: str
    kind: Optional[str]

    def to_result(self) -> Dict[str, Any]:
        return {"path": self.path, "kind": self.kind}


@dataclass
class RuntimeReport:
    """What the node's container runtime will run with."""

    runtime: Optional[str]
    detected: List[str] = field(default_factory=list)
    config_path: Optional[str] = None
    config_version: Optional[int] = None
    files: List[ConfigFile] = field(default_factory=list)
    ignored_dropins: List[str] = field(default_factory=list)
    dropins_with_handler: List[str] = field(default_factory=list)  # ignored drop-ins defining it
    misplaced: List[str] = field(default_factory=list)  # "file: table" defining it under a wrong plugin id
    templates: List[str] = field(default_factory=list)
    template_has_handler: bool = False
    handler_name: str = "nvidia"
    handlers: List[str] = field(default_factory=list)
    handler: Optional[Handler] = None
    default_runtime: Optional[str] = None
    default_handler: Optional[Handler] = None
    cdi_enabled: Optional[bool] = None
    cdi_specs: List[CdiSpec] = field(default_factory=list)

    @property
    def nvidia_is_default(self) -> bool:
        """The default runtime is the handler, or another handler that runs the NVIDIA runtime."""
        if self.handler is not None and self.default_runtime == self.handler_name:
            return True
        return self.default_handler is not None and is_nvidia_binary(self.default_handler.binary)

    @property
    def runtime_class_needed(self) -> bool:
        """Pods reach the handler only through a RuntimeClass (it exists but is not the default)."""
        return self.handler is not None and not self.nvidia_is_default

    @property
    def cdi_nvidia_spec(self) -> bool:
        return any(spec.kind == CDI_NVIDIA_KIND for spec in self.cdi_specs)


# ---- pure helpers -------------------------------------------------------------------------

def is_nvidia_binary(binary: Optional[str]) -> bool:
    """nvidia-container-runtime and its .cdi/.legacy modes."""
    return bool(binary) and os.path.basename(binary or "").startswith("nvidia-container-runtime")


def get_path(data: Any, *keys: str) -> Any:
    """data[k1][k2]... or None when any level is missing or not a table."""
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def deep_merge(base: Dict[str, Any], overlay: Dict[str, Any]) -> Dict[str, Any]:
    """A new dict: tables merged key by key, everything else from ``overlay``."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def config_version(data: Dict[str, Any], default: int = 1) -> int:
    """A containerd config's ``version`` (1 when absent, as containerd reads it)."""
    value = data.get("version", default)
    return value if isinstance(value, int) and value in CRI_PLUGIN_KEYS else default


def cri_plugin_keys(version: int) -> Tuple[str, ...]:
    """Plugin ids under which a config file of schema ``version`` configures the CRI runtimes
    (containerd migrates each file from its own version, so an older file keeps its old ids)."""
    if version == 1:
        return (CRI_PLUGIN_KEYS[1], CRI_PLUGIN_KEYS[2])
    return (CRI_PLUGIN_KEYS[version],)


def containerd_view(data: Dict[str, Any], version: int) -> RuntimeView:
    """The CRI runtime settings of one containerd config file of schema ``version``."""
    plugin = None
    for key in cri_plugin_keys(version):
        plugin = get_path(data, "plugins", key)
        if isinstance(plugin, dict):
            break
    if not isinstance(plugin, dict):
        return RuntimeView()
    section = plugin.get("containerd") if isinstance(plugin.get("containerd"), dict) else {}
    runtimes = section.get("runtimes") if isinstance(section.get("runtimes"), dict) else {}
    legacy = section.get("default_runtime")
    return RuntimeView(
        present=True,
        default_runtime=section.get("default_runtime_name") if isinstance(section.get("default_runtime_name"), str) else None,
        runtimes={name: spec for name, spec in runtimes.items() if isinstance(spec, dict)},
        enable_cdi=plugin.get("enable_cdi") if isinstance(plugin.get("enable_cdi"), bool) else None,
        legacy_default=legacy if isinstance(legacy, dict) and legacy else None,
    )


def misplaced_handler(data: Dict[str, Any], version: int, handler: str) -> Optional[str]:
    """The table where a file defines ``handler`` under a plugin id its schema version does not
    read (e.g. a schema 2 snippet pasted into a containerd 2.x ``version = 3`` config)."""
    for key in CRI_PLUGIN_KEYS.values():
        if key in cri_plugin_keys(version):
            continue
        if isinstance(get_path(data, "plugins", key, "containerd", "runtimes", handler), dict):
            return 'plugins."%s".containerd.runtimes.%s' % (key, handler)
    return None


def crio_view(data: Dict[str, Any]) -> RuntimeView:
    """The runtime settings of a (merged) CRI-O config."""
    runtime = get_path(data, "crio", "runtime")
    if not isinstance(runtime, dict):
        return RuntimeView()
    runtimes = runtime.get("runtimes") if isinstance(runtime.get("runtimes"), dict) else {}
    default = runtime.get("default_runtime")
    return RuntimeView(
        present=True,
        default_runtime=default if isinstance(default, str) and default else None,
        runtimes={name: spec for name, spec in runtimes.items() if isinstance(spec, dict)},
        enable_cdi=True,  # CRI-O always reads CDI specs (1.23 and later)
    )


def merge_views(base: RuntimeView, overlay: RuntimeView, source: str, deep: bool) -> RuntimeView:
    """``overlay`` (from file ``source``) applied on ``base``.

    ``deep`` (containerd 2.x, CRI-O): values merge key by key. Otherwise (containerd 1.x) a file
    that configures the CRI plugin replaces its whole section.
    """
    if not overlay.present:
        return base
    defined = {name: source for name in overlay.runtimes}
    if not deep:
        return RuntimeView(True, overlay.default_runtime, copy.deepcopy(overlay.runtimes), defined,
                           overlay.enable_cdi, overlay.legacy_default)
    runtimes = copy.deepcopy(base.runtimes)
    for name, spec in overlay.runtimes.items():
        runtimes[name] = deep_merge(runtimes.get(name, {}), spec)
    merged_defined = dict(base.defined_in)
    merged_defined.update(defined)
    return RuntimeView(
        present=True,
        default_runtime=overlay.default_runtime or base.default_runtime,
        runtimes=runtimes,
        defined_in=merged_defined,
        enable_cdi=overlay.enable_cdi if overlay.enable_cdi is not None else base.enable_cdi,
        legacy_default=overlay.legacy_default or base.legacy_default,
    )


def containerd_handler(name: str, spec: Dict[str, Any], defined_in: Optional[str]) -> Handler:
    """The binary a containerd runtime handler runs (runc.v2 ``options.BinaryName``; the legacy
    v1 linux runtime's ``runtime_engine``; runc when neither is set)."""
    runtime_type = spec.get("runtime_type") if isinstance(spec.get("runtime_type"), str) else None
    options = spec.get("options") if isinstance(spec.get("options"), dict) else {}
    binary: Optional[str] = None
    if runtime_type in (None, "", RUNC_V2, "io.containerd.runc.v1"):
        binary = options.get("BinaryName") or None
    elif runtime_type == LEGACY_LINUX_RUNTIME:
        binary = spec.get("runtime_engine") or options.get("Runtime") or None
    else:
        return Handler(name, runtime_type, defined_in=defined_in)
    return Handler(name, runtime_type or RUNC_V2, binary=binary or "runc", binary_default=binary is None,
                   defined_in=defined_in)


def crio_handler(name: str, spec: Dict[str, Any], defined_in: Optional[str]) -> Handler:
    """CRI-O runs ``runtime_path``, else the handler's name looked up in PATH."""
    path = spec.get("runtime_path") if isinstance(spec.get("runtime_path"), str) else ""
    runtime_type = spec.get("runtime_type") if isinstance(spec.get("runtime_type"), str) else "oci"
    return Handler(name, runtime_type, binary=path or name, binary_default=not path, defined_in=defined_in)


def cdi_kind(text: str) -> Optional[str]:
    """The ``kind`` of a CDI spec, YAML or JSON, without a YAML parser."""
    match = re.search(r'"kind"\s*:\s*"([^"]+)"', text) or \
        re.search(r"""^kind:\s*["']?([^"'\s#]+)""", text, re.MULTILINE)
    return match.group(1) if match else None


# ---- reading files below the node root ----------------------------------------------------

class NodeFiles:
    """Reads node paths below ``node_root``."""

    def __init__(self, node_root: str) -> None:
        self.node_root = node_root

    def local(self, path: str) -> str:
        """Where a node path is on this machine, symlinks followed inside the node root."""
        return resolve_in_root(self.node_root, node_path(self.node_root, path))

    def exists(self, path: str) -> bool:
        return os.path.exists(self.local(path))

    def is_executable(self, path: str) -> bool:
        local = self.local(path)
        return os.path.isfile(local) and os.access(local, os.X_OK)

    def read_text(self, path: str) -> str:
        with open(self.local(path), "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def list_dir(self, path: str) -> List[str]:
        """Node paths of the regular files in directory ``path``, by name; [] when absent."""
        local = self.local(path)
        try:
            names = sorted(os.listdir(local))
        except OSError:
            return []
        return [path.rstrip("/") + "/" + name for name in names if os.path.isfile(os.path.join(local, name))]

    def glob(self, pattern: str) -> List[str]:
        """Node paths matching a glob pattern (a node path), in name order as containerd takes them."""
        return sorted(self.to_node(match) for match in glob.glob(node_path(self.node_root, pattern)))

    def to_node(self, local: str) -> str:
        """The node path of a path on this machine below the node root."""
        if self.node_root == "/":
            return local
        return "/" + os.path.relpath(local, self.node_root)

    def find_binary(self, binary: str) -> Tuple[Optional[str], bool]:
        """(node path, executable) of a configured binary: absolute as given, a bare name in PATH."""
        if "/" in binary:
            path = binary if binary.startswith("/") else "/" + binary
            return path, self.is_executable(path)
        for directory in SEARCH_PATH:
            candidate = directory + "/" + binary
            if self.is_executable(candidate):
                return candidate, True
        return None, False


def parse_toml_file(files: NodeFiles, path: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(data, None), or (None, why it could not be used)."""
    try:
        text = files.read_text(path)
    except OSError as exc:
        return None, "cannot be read: %s" % (exc.strerror or exc)
    try:
        return toml_library.loads(text), None
    except Exception as exc:  # tomllib/tomli raise TOMLDecodeError (a ValueError)  # pylint: disable=broad-except
        return None, "is not valid TOML: %s" % exc


def _import_paths(files: NodeFiles, parent: str, data: Dict[str, Any]) -> List[str]:
    imports = data.get("imports")
    if not isinstance(imports, list):
        return []
    found: List[str] = []
    for pattern in imports:
        if not isinstance(pattern, str) or not pattern:
            continue
        if not pattern.startswith("/"):
            pattern = os.path.dirname(parent).rstrip("/") + "/" + pattern
        found.extend(files.glob(pattern) if any(c in pattern for c in "*?[") else [pattern])
    return found


def load_containerd(files: NodeFiles, config_path: str, report: RuntimeReport) -> RuntimeView:
    """Read a containerd config and its imports (breadth first, each file once), merged."""
    main_file = ConfigFile(config_path, "main")
    report.files.append(main_file)
    report.config_path = config_path
    if not files.exists(config_path):
        main_file.error = "does not exist (containerd then runs with its built-in defaults)"
        report.config_version = None
        return RuntimeView()
    data, error = parse_toml_file(files, config_path)
    if data is None:
        main_file.error = error
        return RuntimeView()
    main_file.loaded = True
    version = config_version(data)
    report.config_version = version
    _note_misplaced(report, config_path, data, version)
    view = merge_views(RuntimeView(), containerd_view(data, version), config_path, deep=version >= 3)
    loaded = {config_path}
    pending = _import_paths(files, config_path, data)
    while pending and len(loaded) < MAX_IMPORTED_FILES:
        path = pending.pop(0)
        if path in loaded:
            continue
        loaded.add(path)
        imported = ConfigFile(path, "import")
        report.files.append(imported)
        imported_data, error = parse_toml_file(files, path)
        if imported_data is None:
            imported.error = error
            continue
        imported.loaded = True
        file_version = config_version(imported_data, version)
        _note_misplaced(report, path, imported_data, file_version)
        file_view = containerd_view(imported_data, file_version)
        view = merge_views(view, file_view, path, deep=version >= 3)
        pending.extend(_import_paths(files, path, imported_data))
    return view


def _note_misplaced(report: RuntimeReport, path: str, data: Dict[str, Any], version: int) -> None:
    table = misplaced_handler(data, version, report.handler_name)
    if table:
        report.misplaced.append("%s defines [%s], which a version %d config does not read" % (path, table, version))


def note_ignored_dropins(files: NodeFiles, report: RuntimeReport, dropin_dir: str) -> None:
    """List drop-ins containerd does not read (not imported), and which of them define the handler."""
    loaded = {f.path for f in report.files}
    for path in files.list_dir(dropin_dir):
        if path in loaded or not path.endswith(".toml"):
            continue
        report.ignored_dropins.append(path)
        data, unused_error = parse_toml_file(files, path)
        if data is not None and report.handler_name in containerd_view(data, config_version(data, 2)).runtimes:
            report.dropins_with_handler.append(path)


def load_k3s(files: NodeFiles, config_dir: str, config_path: Optional[str], report: RuntimeReport) -> RuntimeView:
    """k3s/RKE2: the generated config; templates are listed (and read when nothing was generated)."""
    generated = config_path or config_dir + "/config.toml"
    for name in K3S_TEMPLATES:
        template = config_dir + "/" + name
        if files.exists(template):
            report.templates.append(template)
    if files.exists(generated) or not report.templates:
        view = load_containerd(files, generated, report)
        _check_templates(files, report)
        return view
    report.config_path = generated
    report.files.append(ConfigFile(generated, "main", error="does not exist (k3s writes it at start)"))
    template = report.templates[0]
    template_file = ConfigFile(template, "template")
    report.files.append(template_file)
    try:
        text = files.read_text(template)
    except OSError as exc:
        template_file.error = "cannot be read: %s" % (exc.strerror or exc)
        return RuntimeView()
    if "{{" in text:
        template_file.error = "is a Go template; k3s renders it at start"
        _check_templates(files, report)
        return RuntimeView()
    return load_containerd_text(template_file, text, report)


def load_containerd_text(source: ConfigFile, text: str, report: RuntimeReport) -> RuntimeView:
    try:
        data = toml_library.loads(text)
    except Exception as exc:  # pylint: disable=broad-except
        source.error = "is not valid TOML: %s" % exc
        return RuntimeView()
    source.loaded = True
    version = config_version(data)
    report.config_version = version
    return merge_views(RuntimeView(), containerd_view(data, version), source.path, deep=version >= 3)


def _check_templates(files: NodeFiles, report: RuntimeReport) -> None:
    for template in report.templates:
        try:
            text = files.read_text(template)
        except OSError:
            continue
        if re.search(r"runtimes\.[\"']?%s[\"'\]]" % re.escape(report.handler_name), text):
            report.template_has_handler = True
        if not any(f.path == template for f in report.files):
            report.files.append(ConfigFile(template, "template", error="read by k3s at its next start"))


def load_crio(files: NodeFiles, config_path: Optional[str], report: RuntimeReport) -> RuntimeView:
    """crio.conf, then each crio.conf.d file in name order (later values win)."""
    main_path = config_path or CRIO_CONFIG
    report.config_path = main_path
    merged: Dict[str, Any] = {}
    sources: List[Tuple[str, str]] = [(main_path, "main")] + [(p, "drop-in") for p in files.list_dir(CRIO_DROPIN_DIR)]
    view = RuntimeView()
    for path, role in sources:
        entry = ConfigFile(path, role)
        report.files.append(entry)
        if not files.exists(path):
            entry.error = "does not exist"
            continue
        data, error = parse_toml_file(files, path)
        if data is None:
            entry.error = error
            continue
        entry.loaded = True
        merged = deep_merge(merged, data)
        view = merge_views(view, crio_view(data), path, deep=True)
    full = crio_view(merged)
    full.defined_in = view.defined_in
    return full


def read_cdi_specs(files: NodeFiles) -> List[CdiSpec]:
    specs: List[CdiSpec] = []
    for directory in CDI_SPEC_DIRS:
        for path in files.list_dir(directory):
            if not path.endswith((".yaml", ".yml", ".json")):
                continue
            try:
                kind = cdi_kind(files.read_text(path))
            except OSError:
                kind = None
            specs.append(CdiSpec(path, kind))
    return specs


def detect_runtimes(files: NodeFiles) -> List[str]:
    """Runtimes whose configuration (or socket) is present, most specific first."""
    found: List[str] = []
    for name, directory in (("k3s", K3S_CONTAINERD_DIR), ("rke2", RKE2_CONTAINERD_DIR)):
        if files.exists(directory + "/config.toml") or any(files.exists(directory + "/" + t) for t in K3S_TEMPLATES):
            found.append(name)
    if files.exists(CONTAINERD_CONFIG):
        found.append("containerd")
    if files.exists(CRIO_CONFIG) or files.list_dir(CRIO_DROPIN_DIR):
        found.append("crio")
    for name, socket in RUNTIME_SOCKETS:
        if name not in found and files.exists(socket):
            found.append(name)
    return found


def build_report(files: NodeFiles, runtime: str, config_path: Optional[str], handler_name: str) -> RuntimeReport:
    """Read the configuration of ``runtime`` (or the first detected, for auto)."""
    detected = detect_runtimes(files)
    chosen: Optional[str] = runtime if runtime != "auto" else (detected[0] if detected else None)
    report = RuntimeReport(runtime=chosen, detected=detected, handler_name=handler_name)
    if chosen is None:
        return report
    if chosen == "crio":
        view = load_crio(files, config_path, report)
        make_handler = crio_handler
    else:
        if chosen == "containerd":
            view = load_containerd(files, config_path or CONTAINERD_CONFIG, report)
            note_ignored_dropins(files, report, CONTAINERD_DROPIN_DIR)
        else:
            view = load_k3s(files, K3S_CONTAINERD_DIR if chosen == "k3s" else RKE2_CONTAINERD_DIR,
                            config_path, report)
        make_handler = containerd_handler
    _resolve_handlers(files, report, view, make_handler, chosen)
    report.cdi_specs = read_cdi_specs(files)
    return report


def _resolve_handlers(files: NodeFiles, report: RuntimeReport, view: RuntimeView, make_handler: Any,
                      runtime: str) -> None:
    report.handlers = sorted(view.runtimes)
    if runtime == "crio":
        report.default_runtime = view.default_runtime
        report.cdi_enabled = True
    else:
        report.default_runtime = view.default_runtime or ("runc" if view.legacy_default is None else None)
        report.cdi_enabled = view.enable_cdi if view.enable_cdi is not None else (report.config_version or 1) >= 3
    if report.handler_name in view.runtimes:
        report.handler = make_handler(report.handler_name, view.runtimes[report.handler_name],
                                      view.defined_in.get(report.handler_name))
    if report.default_runtime in view.runtimes:
        report.default_handler = make_handler(report.default_runtime, view.runtimes[report.default_runtime],
                                              view.defined_in.get(report.default_runtime))
    elif view.legacy_default is not None and runtime != "crio":
        report.default_handler = containerd_handler("default_runtime", view.legacy_default, None)
    for handler in (report.handler, report.default_handler):
        if handler is not None and handler.binary:
            handler.binary_path, handler.binary_exists = files.find_binary(handler.binary)


# ---- verdict ------------------------------------------------------------------------------

_RESTART = {
    "containerd": "systemctl restart containerd",
    "k3s": "systemctl restart k3s (or k3s-agent)",
    "rke2": "systemctl restart rke2-server (or rke2-agent)",
    "crio": "systemctl restart crio",
}


def _missing_action(report: RuntimeReport) -> str:
    runtime = report.runtime or "containerd"
    if report.dropins_with_handler:
        return ("Add imports = [\"%s/*.toml\"] to %s (containerd reads drop-ins only through imports), "
                "then %s." % (CONTAINERD_DROPIN_DIR, report.config_path, _RESTART[runtime]))
    if report.misplaced and report.config_version in CRI_PLUGIN_KEYS:
        return ("Move the handler under [plugins.\"%s\".containerd.runtimes.%s] (or rerun 'nvidia-ctk runtime "
                "configure', which writes the layout of the config's version), then %s."
                % (CRI_PLUGIN_KEYS[report.config_version], report.handler_name, _RESTART[runtime]))
    if runtime in ("k3s", "rke2"):
        if report.template_has_handler:
            return "Restart %s so it regenerates config.toml from %s: %s." % (
                runtime, report.templates[0], _RESTART[runtime])
        return ("Install the NVIDIA Container Toolkit (nvidia-container-toolkit) and restart %s: it adds an "
                "'nvidia' runtime when it finds nvidia-container-runtime at start (%s)." % (runtime, _RESTART[runtime]))
    return ("Install the NVIDIA Container Toolkit and run 'nvidia-ctk runtime configure --runtime=%s "
            "--set-as-default', then %s." % ("crio" if runtime == "crio" else "containerd", _RESTART[runtime]))


def _not_default_action(report: RuntimeReport) -> str:
    runtime = report.runtime or "containerd"
    name = report.handler_name
    if runtime in ("k3s", "rke2"):
        return ("Set 'default-runtime: %s' in /etc/rancher/%s/config.yaml (the --default-runtime flag) and %s, "
                "or run the device plugin with runtimeClassName: %s." % (name, runtime, _RESTART[runtime], name))
    return ("Run 'nvidia-ctk runtime configure --runtime=%s --set-as-default' and %s, or run the device "
            "plugin with runtimeClassName: %s (a RuntimeClass whose handler is %s)."
            % ("crio" if runtime == "crio" else "containerd", _RESTART[runtime], name, name))


def assess_runtime(report: RuntimeReport, require_default_runtime: bool) -> List[Finding]:
    """The runtime step's findings."""
    if report.runtime is None:
        return [Finding(
            "container_runtime_not_found", SEVERITY_ERROR,
            "No containerd, k3s, RKE2 or CRI-O configuration or socket was found on the node",
            "Check which container runtime the kubelet uses (its --container-runtime-endpoint) and "
            "set the runtime option (and config_path) to it.")]
    findings: List[Finding] = []
    for entry in report.files:
        if entry.loaded or entry.error is None or entry.role == "template" or "does not exist" in entry.error:
            continue
        findings.append(Finding(
            "runtime_config_invalid", SEVERITY_ERROR,
            "%s configuration %s %s" % (report.runtime, entry.path, entry.error),
            "Fix the file (the runtime refuses to start or ignores it), then %s." % _RESTART[report.runtime]))
    findings.extend(_handler_findings(report, require_default_runtime))
    return findings


def _handler_findings(report: RuntimeReport, require_default_runtime: bool) -> List[Finding]:
    name = report.handler_name
    handler = report.handler
    if handler is None:
        where = ", ".join(f.path for f in report.files if f.loaded) or "no configuration file"
        extra = ""
        if report.dropins_with_handler:
            extra = "; %s defines it but is not imported" % ", ".join(report.dropins_with_handler)
        elif report.misplaced:
            extra = "; %s" % "; ".join(report.misplaced)
        elif report.cdi_nvidia_spec:
            extra = "; a CDI spec for %s exists, but the device plugin's default setup needs the runtime" % CDI_NVIDIA_KIND
        return [Finding(
            "nvidia_runtime_missing", SEVERITY_ERROR,
            "%s has no '%s' runtime handler (read: %s)%s: containers get no GPU driver injected"
            % (report.runtime, name, where, extra),
            _missing_action(report))]
    findings: List[Finding] = []
    if handler.binary is None:
        findings.append(Finding(
            "nvidia_runtime_binary_missing", SEVERITY_ERROR,
            "The '%s' runtime handler (%s) has runtime_type %s, which runs no NVIDIA container runtime"
            % (name, handler.defined_in, handler.runtime_type),
            "Point the handler at nvidia-container-runtime: 'nvidia-ctk runtime configure --runtime=%s', then %s."
            % ("crio" if report.runtime == "crio" else "containerd", _RESTART[report.runtime or "containerd"])))
    elif handler.binary_default and report.runtime != "crio":
        findings.append(Finding(
            "nvidia_runtime_binary_missing", SEVERITY_ERROR,
            "The '%s' runtime handler (%s) names no binary, so it runs plain %s, which does not inject the driver"
            % (name, handler.defined_in, handler.binary),
            "Set BinaryName (containerd) or runtime_path (CRI-O) to /usr/bin/nvidia-container-runtime, "
            "e.g. with 'nvidia-ctk runtime configure', then %s." % _RESTART[report.runtime or "containerd"]))
    elif not handler.binary_exists:
        findings.append(Finding(
            "nvidia_runtime_binary_missing", SEVERITY_ERROR,
            "The '%s' runtime handler (%s) runs %s, which does not exist on the node (or is not executable)"
            % (name, handler.defined_in, handler.binary),
            "Install the NVIDIA Container Toolkit (package nvidia-container-toolkit) so that %s exists, or "
            "correct the path in %s, then %s." % (handler.binary, handler.defined_in,
                                                  _RESTART[report.runtime or "containerd"])))
    if require_default_runtime and not report.nvidia_is_default:
        findings.append(Finding(
            "nvidia_runtime_not_default", SEVERITY_ERROR,
            "The default runtime is %s, not '%s': pods without runtimeClassName (such as NVIDIA's device plugin "
            "manifest) start without the GPU driver" % (report.default_runtime or "unset", name),
            _not_default_action(report)))
    return findings


# ---- the module's body --------------------------------------------------------------------

def check_options(params: Dict[str, Any], config_path_option: str = "config_path") -> Tuple[str, str, Optional[str], str]:
    """(node_root, runtime, config_path, handler_name) validated; ``config_path_option`` is the
    option's name in messages (node_info calls it runtime_config_path)."""
    node_root = params.get("node_root") or "/"
    if not os.path.isabs(node_root):
        raise InvalidOptionError("node_root must be an absolute path, got %r" % node_root)
    if not os.path.isdir(node_root):
        raise InvalidOptionError("node_root %s is not a directory on this host" % node_root)
    runtime = params.get("runtime") or "auto"
    if runtime not in RUNTIME_CHOICES:
        raise InvalidOptionError("runtime must be one of %s, got %r" % (", ".join(RUNTIME_CHOICES), runtime))
    config_path = params.get("config_path")
    if config_path is not None:
        if not config_path.startswith("/"):
            raise InvalidOptionError("%s must be an absolute path on the node, got %r"
                                     % (config_path_option, config_path))
        if runtime == "auto":
            raise InvalidOptionError("%s needs runtime set to containerd, k3s, rke2 or crio "
                                     "(it names that runtime's main file)" % config_path_option)
    handler_name = params.get("handler_name") or "nvidia"
    if not re.match(r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$", handler_name):
        raise InvalidOptionError("handler_name must be a runtime handler name such as nvidia, got %r" % handler_name)
    return node_root, runtime, config_path, handler_name


def result_of(report: RuntimeReport, findings: Sequence[Finding]) -> Dict[str, Any]:
    return {
        "changed": False,
        "healthy": is_healthy(findings),
        "findings": [finding.to_result() for finding in findings],
        "runtime": report.runtime,
        "detected_runtimes": list(report.detected),
        "config_path": report.config_path,
        "config_version": report.config_version,
        "config_files": [entry.to_result() for entry in report.files],
        "ignored_dropins": list(report.ignored_dropins),
        "handler_name": report.handler_name,
        "handlers": list(report.handlers),
        "nvidia_runtime": dict(present=report.handler is not None,
                               **(report.handler.to_result() if report.handler else
                                  Handler(report.handler_name).to_result())),
        "default_runtime": report.default_runtime,
        "nvidia_is_default": report.nvidia_is_default,
        "runtime_class_needed": report.runtime_class_needed,
        "cdi": {
            "enabled": report.cdi_enabled,
            "spec_dirs": list(CDI_SPEC_DIRS),
            "specs": [spec.to_result() for spec in report.cdi_specs],
            "nvidia_gpu_spec": report.cdi_nvidia_spec,
        },
    }


def gather_runtime_info(params: Dict[str, Any], config_path_option: str = "config_path") -> Dict[str, Any]:
    """Validate the options, read the runtime configuration and return the module result."""
    node_root, runtime, config_path, handler_name = check_options(params, config_path_option)
    report = build_report(NodeFiles(node_root), runtime, config_path, handler_name)
    findings = assess_runtime(report, bool(params.get("require_default_runtime", True)))
    return result_of(report, findings)
