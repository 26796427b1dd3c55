"""The device plugin's configuration, read from its pod the way NVIDIA's plugin reads it.

Sources, later ones win: built-in defaults; the config file (``CONFIG_FILE`` / ``--config-file``
pointing into a ConfigMap volume, or else the first ConfigMap volume's ``config.yaml`` /
first key); the container's ``MIG_STRATEGY`` / ``FAIL_ON_INIT_ERROR`` env and
``--mig-strategy`` / ``--fail-on-init-error`` args.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

MIG_STRATEGIES = ("none", "single", "mixed")
GPU_RESOURCE = "nvidia.com/gpu"

GetObject = Callable[[str, str, Optional[str], str], Optional[Dict[str, Any]]]


class ConfigError(Exception):
    """The plugin cannot load its configuration (it exits with the message)."""


@dataclass
class PluginConfig:
    mig_strategy: str = "none"
    fail_on_init_error: bool = True
    replicas: int = 1
    rename_by_default: bool = False
    fail_requests_greater_than_one: bool = False
    disabled_xids: Tuple[int, ...] = ()
    health_checks_disabled: bool = False
    source: str = "defaults"

    @property
    def resource_name(self) -> str:
        if self.replicas > 1 and self.rename_by_default:
            return GPU_RESOURCE + ".shared"
        return GPU_RESOURCE

    def as_json(self) -> Dict[str, Any]:
        """The shape of the plugin's "Running with config" dump."""
        sharing: Dict[str, Any] = {"timeSlicing": {}}
        if self.replicas > 1:
            sharing["timeSlicing"] = {
                "renameByDefault": self.rename_by_default,
                "failRequestsGreaterThanOne": self.fail_requests_greater_than_one,
                "resources": [{"name": GPU_RESOURCE, "devices": "all", "replicas": self.replicas}],
            }
        return {
            "version": "v1",
            "flags": {
                "migStrategy": self.mig_strategy,
                "failOnInitError": self.fail_on_init_error,
                "mpsRoot": "",
                "nvidiaDriverRoot": "/",
                "nvidiaDevRoot": "/",
                "gdsEnabled": False,
                "mofedEnabled": False,
                "useNodeFeatureAPI": None,
                "deviceDiscoveryStrategy": "auto",
                "plugin": {
                    "passDeviceSpecs": False,
                    "deviceListStrategy": ["envvar"],
                    "deviceIDStrategy": "uuid",
                    "cdiAnnotationPrefix": "cdi.k8s.io/",
                    "nvidiaCTKPath": "/usr/bin/nvidia-ctk",
                    "containerDriverRoot": "/driver-root",
                },
            },
            "resources": {"gpus": [{"pattern": "*", "name": GPU_RESOURCE}]},
            "sharing": sharing,
        }


def plugin_container(pod: Dict[str, Any]) -> Dict[str, Any]:
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    for container in containers:
        if "device-plugin" in str(container.get("name", "")):
            return container
    return containers[0]


def _bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "t"):
        return True
    if text in ("false", "0", "no", "f"):
        return False
    raise ConfigError("unable to validate flags: invalid %s value %r" % (what, value))


def _explicit_flags(container: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[str]]:
    """MIG strategy / failOnInitError / config file set on the command line or in env."""
    flags: Dict[str, Any] = {}
    config_file = None
    env = {e.get("name"): e.get("value") for e in container.get("env") or [] if "value" in e}
    if env.get("MIG_STRATEGY"):
        flags["mig_strategy"] = env["MIG_STRATEGY"]
    if env.get("FAIL_ON_INIT_ERROR") not in (None, ""):
        flags["fail_on_init_error"] = env["FAIL_ON_INIT_ERROR"]
    if env.get("CONFIG_FILE"):
        config_file = env["CONFIG_FILE"]
    if env.get("DP_DISABLE_HEALTHCHECKS"):
        flags["disable_healthchecks"] = env["DP_DISABLE_HEALTHCHECKS"]
    args = [str(a) for a in (container.get("command") or [])[1:]] + [str(a) for a in container.get("args") or []]
    for arg in args:
        name, _sep, value = arg.lstrip("-").partition("=")
        if name == "mig-strategy":
            flags["mig_strategy"] = value
        elif name == "fail-on-init-error":
            flags["fail_on_init_error"] = value or "true"
        elif name == "config-file":
            config_file = value
    return flags, config_file


def _config_map_text(pod: Dict[str, Any], container: Dict[str, Any], config_file: Optional[str],
                     get_object: GetObject) -> Tuple[Optional[str], str]:
    """(config file text or None, where it came from)."""
    namespace = (pod.get("metadata") or {}).get("namespace")
    volumes = {v.get("name"): v for v in (pod.get("spec") or {}).get("volumes") or []}
    mounts = container.get("volumeMounts") or []
    candidates: List[Tuple[Dict[str, Any], Optional[str]]] = []
    if config_file:
        for mount in mounts:
            mount_path = str(mount.get("mountPath", "")).rstrip("/")
            volume = volumes.get(mount.get("name"))
            if not volume or "configMap" not in volume or not config_file.startswith(mount_path + "/"):
                continue
            relative = config_file[len(mount_path) + 1:]
            if mount.get("subPath"):
                relative = mount["subPath"]
            key = relative
            for item in volume["configMap"].get("items") or []:
                if item.get("path") == relative:
                    key = item.get("key", relative)
            candidates.append((volume, key))
        if not candidates:
            raise ConfigError(
                "unable to load config: unable to finalize config: unable to parse config file: "
                "read error: open %s: no such file or directory" % config_file
            )
    else:
        candidates = [(v, None) for v in volumes.values() if "configMap" in v]
    for volume, key in candidates:
        name = volume["configMap"].get("name", "")
        config_map = get_object("v1", "ConfigMap", namespace, name)
        if config_map is None:
            if config_file:
                raise ConfigError(
                    "unable to load config: unable to finalize config: unable to parse config file: "
                    "read error: open %s: no such file or directory" % config_file
                )
            continue
        data = config_map.get("data") or {}
        if key is None:
            key = "config.yaml" if "config.yaml" in data else (sorted(data)[0] if data else None)
        if key is None or key not in data:
            if config_file:
                raise ConfigError(
                    "unable to load config: unable to finalize config: unable to parse config file: "
                    "read error: open %s: no such file or directory" % config_file
                )
            continue
        return data[key], "ConfigMap %s/%s key %s" % (namespace, name, key)
    return None, "defaults"


def load_config(pod: Dict[str, Any], get_object: GetObject) -> PluginConfig:
    container = plugin_container(pod)
    flags, config_file = _explicit_flags(container)
    config = PluginConfig()
    text, config.source = _config_map_text(pod, container, config_file, get_object)
    if text is not None:
        try:
            document = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("unable to load config: unable to finalize config: unable to parse config file: %s" % exc)
        if not isinstance(document, dict):
            raise ConfigError("unable to load config: unable to finalize config: unable to parse config file: not a mapping")
        file_flags = document.get("flags") or {}
        if "migStrategy" in file_flags:
            config.mig_strategy = str(file_flags["migStrategy"])
        if "failOnInitError" in file_flags:
            config.fail_on_init_error = _bool(file_flags["failOnInitError"], "failOnInitError")
        time_slicing = ((document.get("sharing") or {}).get("timeSlicing")) or {}
        config.rename_by_default = bool(time_slicing.get("renameByDefault", False))
        config.fail_requests_greater_than_one = bool(time_slicing.get("failRequestsGreaterThanOne", False))
        for resource in time_slicing.get("resources") or []:
            if resource.get("name", GPU_RESOURCE) == GPU_RESOURCE:
                try:
                    config.replicas = int(resource.get("replicas", 1))
                except (TypeError, ValueError):
                    raise ConfigError("unable to load config: invalid replicas %r" % resource.get("replicas"))
                if config.replicas < 1:
                    raise ConfigError("unable to load config: number of replicas must be >= 1")
    if "mig_strategy" in flags:
        config.mig_strategy = flags["mig_strategy"]
    if "fail_on_init_error" in flags:
        config.fail_on_init_error = _bool(flags["fail_on_init_error"], "fail-on-init-error")
    if config.mig_strategy not in MIG_STRATEGIES:
        raise ConfigError("unable to load config: unable to validate flags: invalid --mig-strategy option: %s" % config.mig_strategy)
    disabled = str(flags.get("disable_healthchecks", "")).strip().lower()
    if disabled in ("all", "xids"):
        config.health_checks_disabled = True
    elif disabled:
        config.disabled_xids = tuple(int(x) for x in disabled.split(",") if x.strip().isdigit())
    return config


def runtime_class(pod: Dict[str, Any]) -> Optional[str]:
    return (pod.get("spec") or {}).get("runtimeClassName")
