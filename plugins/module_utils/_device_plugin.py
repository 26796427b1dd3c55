# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""NVIDIA's device plugin as a DaemonSet and a ConfigMap: options -> validated spec -> manifests,
applied with server-side apply, and a rollout wait that does not count an empty DaemonSet as done.

The manifest follows NVIDIA's static one (deployments/static/nvidia-device-plugin.yml of
NVIDIA/k8s-device-plugin): DaemonSet ``nvidia-device-plugin-daemonset`` in ``kube-system``,
selector ``name: nvidia-device-plugin-ds``, a toleration for ``nvidia.com/gpu:NoSchedule``,
``priorityClassName: system-node-critical``, a container that drops every capability and cannot
escalate privileges, and the kubelet's device-plugins directory mounted from the host. Every
part is an option. The plugin's configuration (``version: v1``) is rendered into a ConfigMap,
mounted as the file ``CONFIG_FILE`` names; a hash of it in the pod template rolls the pods when
it changes.
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import (
    InvalidOptionError,
    K8sError,
    K8sTimeoutError,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._fleet import (
    DaemonSetState,
    classify_pod,
    current_pod,
    daemonset_state,
    pods_by_node,
    scheduling_match,
    selector_string,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_client import K8sClient
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_names import (
    DIGEST_RE,
    REPOSITORY_RE,
    TAG_RE,
    check_dns_subdomain,
    check_label_key,
    check_labels,
    check_namespace,
    label_text,
)
from ansible_collections.gpunode.bringup.plugins.module_utils._wait import Deadline, ListWatch, wait_until
from ansible_collections.gpunode.bringup.plugins.module_utils._k8s_apply import (
    ApplyResult,
    ObjectApi,
    apply_object,
    call_json,
    delete_object,
    read_object,
)

try:
    import yaml
except ImportError:  # PyYAML comes with ansible-core; JSON is valid YAML for the plugin all the same
    yaml = None

# What NVIDIA's static manifest pins (deployments/static/nvidia-device-plugin.yml, v0.17.4).
DEFAULT_IMAGE = "nvcr.io/nvidia/k8s-device-plugin"
DEFAULT_TAG = "v0.17.4"
DEFAULT_NAME = "nvidia-device-plugin-daemonset"
DEFAULT_NAMESPACE = "kube-system"
DEFAULT_CONFIG_MAP = "nvidia-device-plugin-config"
DEFAULT_SELECTOR_LABELS = {"name": "nvidia-device-plugin-ds"}
DEFAULT_PRIORITY_CLASS = "system-node-critical"
DEFAULT_KUBELET_ROOT = "/var/lib/kubelet"
CONTAINER_NAME = "nvidia-device-plugin-ctr"
# The plugin watches this fixed path inside its container (pluginapi.DevicePluginPath).
PLUGIN_DIR_IN_CONTAINER = "/var/lib/kubelet/device-plugins"
CONFIG_DIR = "/etc/nvidia-device-plugin"
CONFIG_KEY = "config.yaml"
CONFIG_FILE = CONFIG_DIR + "/" + CONFIG_KEY
CONFIG_HASH_ANNOTATION = "gpunode.bringup/config-sha256"
MANAGED_LABELS = {"app.kubernetes.io/name": "nvidia-device-plugin", "app.kubernetes.io/managed-by": "gpunode.bringup"}
DEFAULT_TOLERATIONS: List[Dict[str, Any]] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
DEFAULT_NODE_AFFINITY: List[Dict[str, Any]] = [
    {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]},
    {"matchExpressions": [{"key": "feature.node.kubernetes.io/pci-10de.present", "operator": "In",
                           "values": ["true"]}]},
]

MIG_STRATEGIES = ("none", "single", "mixed")
DEVICE_LIST_STRATEGIES = ("envvar", "volume-mounts", "cdi-annotations", "cdi-cri")
DEVICE_ID_STRATEGIES = ("uuid", "index")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
# Environment variables the plugin reads before its config file: setting one through ``env``
# would silently override ``config``.
CONFIG_ENV_VARS = ("CONFIG_FILE", "MIG_STRATEGY", "FAIL_ON_INIT_ERROR", "DEVICE_LIST_STRATEGY",
                   "DEVICE_ID_STRATEGY")

ENV_NAME_RE = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
QUANTITY_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+|[KMGTPE]i|[mkMGTPE])?")
SHARING_RESOURCE_RE = re.compile(r"nvidia\.com/(?:gpu|mig-\d+g\.\d+gb(?:[.+][a-z0-9]+)*)")
NODE_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt")
TOLERATION_OPERATORS = ("Exists", "Equal")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


# --------------------------------------------------------------------------- the spec

@dataclass
class SharingResource:
    name: str
    replicas: int


@dataclass
class Sharing:
    """``sharing.timeSlicing`` or ``sharing.mps`` of the plugin's config."""

    rename_by_default: bool = False
    fail_requests_greater_than_one: Optional[bool] = None  # time-slicing only
    resources: List[SharingResource] = field(default_factory=list)


@dataclass
class PluginConfig:
    """The plugin's config file (``version: v1``)."""

    mig_strategy: str = "none"
    fail_on_init_error: bool = True
    device_list_strategy: List[str] = field(default_factory=lambda: ["envvar"])
    device_id_strategy: str = "uuid"
    time_slicing: Optional[Sharing] = None
    mps: Optional[Sharing] = None


@dataclass
class DevicePluginSpec:
    name: str = DEFAULT_NAME
    namespace: str = DEFAULT_NAMESPACE
    image: str = DEFAULT_IMAGE
    tag: str = DEFAULT_TAG
    image_pull_policy: Optional[str] = None
    image_pull_secrets: List[str] = field(default_factory=list)
    selector_labels: Dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SELECTOR_LABELS))
    node_selector: Dict[str, str] = field(default_factory=dict)
    node_affinity: List[Dict[str, Any]] = field(default_factory=lambda: [dict(t) for t in DEFAULT_NODE_AFFINITY])
    tolerations: List[Dict[str, Any]] = field(default_factory=lambda: [dict(t) for t in DEFAULT_TOLERATIONS])
    priority_class_name: Optional[str] = DEFAULT_PRIORITY_CLASS
    resources: Dict[str, Dict[str, str]] = field(default_factory=dict)
    runtime_class_name: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)
    kubelet_root_dir: str = DEFAULT_KUBELET_ROOT
    config_map_name: str = DEFAULT_CONFIG_MAP
    config: PluginConfig = field(default_factory=PluginConfig)

    @property
    def image_reference(self) -> str:
        separator = "@" if DIGEST_RE.fullmatch(self.tag) else ":"
        return "%s%s%s" % (self.image, separator, self.tag)

    @property
    def host_plugin_dir(self) -> str:
        return self.kubelet_root_dir.rstrip("/") + "/device-plugins"


# --------------------------------------------------------------------------- validation

def check_image(image: str, tag: str) -> None:
    if not isinstance(image, str) or not image:
        raise InvalidOptionError("image must be a repository such as %s" % DEFAULT_IMAGE)
    if "@" in image or (":" in image.rsplit("/", 1)[-1]):
        raise InvalidOptionError("image %r carries a tag or digest: give the repository in image (%s) and the tag "
                                 "in tag (%s)" % (image, DEFAULT_IMAGE, DEFAULT_TAG))
    if len(image) > 255 or not REPOSITORY_RE.fullmatch(image):
        raise InvalidOptionError("image %r is not a valid image repository: [registry[:port]/]path with lower-case "
                                 "path components, for example %s" % (image, DEFAULT_IMAGE))
    if not isinstance(tag, str) or not (TAG_RE.fullmatch(tag) or DIGEST_RE.fullmatch(tag)):
        raise InvalidOptionError("tag %r is not a valid image tag (letters, digits, '_', '.', '-', at most 128 "
                                 "characters, not starting with '.' or '-') nor a digest sha256:<64 hex digits>"
                                 % (tag,))


def check_node_affinity(terms: Any) -> List[Dict[str, Any]]:
    option = "node_affinity"
    if not isinstance(terms, list):
        raise InvalidOptionError("%s must be a list of node selector terms (each with matchExpressions and/or "
                                 "matchFields)" % option)
    result = []
    for index, term in enumerate(terms, start=1):
        if not isinstance(term, dict) or not set(term) <= {"matchExpressions", "matchFields"} or not term:
            raise InvalidOptionError("%s term %d must be a dictionary with matchExpressions and/or matchFields, got %r"
                                     % (option, index, term))
        clean: Dict[str, Any] = {}
        for part in ("matchExpressions", "matchFields"):
            if part not in term:
                continue
            requirements = term[part]
            if not isinstance(requirements, list) or not requirements:
                raise InvalidOptionError("%s term %d: %s must be a non-empty list" % (option, index, part))
            clean[part] = [_check_requirement("%s term %d %s" % (option, index, part), r, part) for r in requirements]
        result.append(clean)
    return result


def _check_requirement(where: str, requirement: Any, part: str) -> Dict[str, Any]:
    if not isinstance(requirement, dict) or not set(requirement) <= {"key", "operator", "values"}:
        raise InvalidOptionError("%s: each requirement is a dictionary of key, operator and values, got %r"
                                 % (where, requirement))
    key = requirement.get("key")
    operator = requirement.get("operator")
    values = requirement.get("values")
    if part == "matchFields":
        if key != "metadata.name" or operator not in ("In", "NotIn"):
            raise InvalidOptionError("%s: matchFields supports only key metadata.name with In or NotIn" % where)
    else:
        check_label_key(where, key)
    if operator not in NODE_SELECTOR_OPERATORS:
        raise InvalidOptionError("%s: operator %r of %s is not one of %s"
                                 % (where, operator, key, ", ".join(NODE_SELECTOR_OPERATORS)))
    clean: Dict[str, Any] = {"key": key, "operator": operator}
    if operator in ("Exists", "DoesNotExist"):
        if values:
            raise InvalidOptionError("%s: %s %s takes no values" % (where, key, operator))
        return clean
    if not isinstance(values, list) or not values:
        raise InvalidOptionError("%s: %s %s needs a non-empty list of values" % (where, key, operator))
    clean["values"] = [label_text(v) for v in values]
    if operator in ("Gt", "Lt") and (len(values) != 1 or not re.fullmatch(r"-?\d+", clean["values"][0])):
        raise InvalidOptionError("%s: %s %s needs exactly one integer value" % (where, key, operator))
    return clean


def check_tolerations(tolerations: Any) -> List[Dict[str, Any]]:
    option = "tolerations"
    if not isinstance(tolerations, list):
        raise InvalidOptionError("%s must be a list of Kubernetes tolerations" % option)
    result = []
    allowed = {"key", "operator", "value", "effect", "tolerationSeconds"}
    for index, toleration in enumerate(tolerations, start=1):
        where = "%s[%d]" % (option, index)
        if not isinstance(toleration, dict) or not set(toleration) <= allowed:
            raise InvalidOptionError("%s must be a dictionary of %s, got %r"
                                     % (where, ", ".join(sorted(allowed)), toleration))
        clean = {k: v for k, v in toleration.items() if v is not None}
        operator = clean.get("operator", "Equal")
        if operator not in TOLERATION_OPERATORS:
            raise InvalidOptionError("%s: operator %r is not one of Exists, Equal" % (where, operator))
        if clean.get("key"):
            check_label_key(where, clean["key"])
        elif operator != "Exists":
            raise InvalidOptionError("%s: a toleration without key must use operator Exists (it tolerates every "
                                     "taint)" % where)
        if operator == "Exists" and clean.get("value"):
            raise InvalidOptionError("%s: operator Exists takes no value" % where)
        if "value" in clean:
            clean["value"] = label_text(clean["value"])
        if clean.get("effect") and clean["effect"] not in TAINT_EFFECTS:
            raise InvalidOptionError("%s: effect %r is not one of %s" % (where, clean["effect"], ", ".join(TAINT_EFFECTS)))
        if "tolerationSeconds" in clean:
            if clean.get("effect") != "NoExecute" or not isinstance(clean["tolerationSeconds"], int):
                raise InvalidOptionError("%s: tolerationSeconds is an integer and needs effect NoExecute" % where)
        result.append(clean)
    return result


def check_resources(resources: Any) -> Dict[str, Dict[str, str]]:
    if not resources:
        return {}
    if not isinstance(resources, dict) or not set(resources) <= {"requests", "limits"}:
        raise InvalidOptionError("resources must be a dictionary with requests and/or limits, got %r" % (resources,))
    result: Dict[str, Dict[str, str]] = {}
    for part, amounts in resources.items():
        if not amounts:
            continue
        if not isinstance(amounts, dict):
            raise InvalidOptionError("resources.%s must be a dictionary such as {cpu: 50m, memory: 64Mi}" % part)
        clean = {}
        for name, amount in amounts.items():
            text = label_text(amount)
            if not QUANTITY_RE.fullmatch(text):
                raise InvalidOptionError("resources.%s.%s: %r is not a Kubernetes quantity (for example 100m, 64Mi, 1)"
                                         % (part, name, text))
            clean[str(name)] = text
        result[part] = clean
    return result


def check_env(env: Any) -> Dict[str, str]:
    if not env:
        return {}
    if not isinstance(env, dict):
        raise InvalidOptionError("env must be a dictionary of variable names and values")
    result = {}
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME_RE.fullmatch(name):
            raise InvalidOptionError("env: %r is not a valid environment variable name" % (name,))
        if name in CONFIG_ENV_VARS:
            raise InvalidOptionError(
                "env: %s would override the plugin's config file (the plugin reads environment variables first); "
                "set it through config instead" % name)
        result[name] = "" if value is None else label_text(value)
    return result


def _check_sharing(option: str, raw: Any, time_slicing: bool, mig_strategy: str) -> Optional[Sharing]:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidOptionError("%s must be a dictionary" % option)
    resources = raw.get("resources")
    if not isinstance(resources, list) or not resources:
        raise InvalidOptionError("%s.resources must list at least one resource with name and replicas, for example "
                                 "[{name: nvidia.com/gpu, replicas: 4}]" % option)
    seen = set()
    clean: List[SharingResource] = []
    for index, resource in enumerate(resources, start=1):
        where = "%s.resources[%d]" % (option, index)
        if not isinstance(resource, dict):
            raise InvalidOptionError("%s must be a dictionary with name and replicas" % where)
        name = resource.get("name")
        replicas = resource.get("replicas")
        if not isinstance(name, str) or not SHARING_RESOURCE_RE.fullmatch(name):
            raise InvalidOptionError("%s: name %r is not a resource the plugin can share: nvidia.com/gpu or a MIG "
                                     "resource such as nvidia.com/mig-1g.10gb" % (where, name))
        if name in seen:
            raise InvalidOptionError("%s: resource %s is listed twice" % (where, name))
        seen.add(name)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 2:
            raise InvalidOptionError("%s: replicas of %s must be an integer of at least 2, got %r (1 replica "
                                     "shares nothing)" % (where, name, replicas))
        if name.startswith("nvidia.com/mig-"):
            if not time_slicing:
                raise InvalidOptionError("%s: MPS sharing supports only nvidia.com/gpu, not %s" % (where, name))
            if mig_strategy != "mixed":
                raise InvalidOptionError("%s: %s exists only with config.mig_strategy mixed (it is %s)"
                                         % (where, name, mig_strategy))
        clean.append(SharingResource(name, replicas))
    if not time_slicing and mig_strategy != "none":
        raise InvalidOptionError("%s: MPS sharing is not supported with MIG; it needs config.mig_strategy none "
                                 "(it is %s)" % (option, mig_strategy))
    fail_greater = raw.get("fail_requests_greater_than_one")
    return Sharing(rename_by_default=bool(raw.get("rename_by_default")),
                   fail_requests_greater_than_one=bool(fail_greater) if time_slicing else None,
                   resources=clean)


def check_config(raw: Optional[Dict[str, Any]]) -> PluginConfig:
    raw = raw or {}
    mig_strategy = raw.get("mig_strategy") or "none"
    if mig_strategy not in MIG_STRATEGIES:
        raise InvalidOptionError("config.mig_strategy %r is not one of %s" % (mig_strategy, ", ".join(MIG_STRATEGIES)))
    device_list = raw.get("device_list_strategy") or ["envvar"]
    if isinstance(device_list, str):
        device_list = [s.strip() for s in device_list.split(",")]
    for strategy in device_list:
        if strategy not in DEVICE_LIST_STRATEGIES:
            raise InvalidOptionError("config.device_list_strategy %r is not one of %s"
                                     % (strategy, ", ".join(DEVICE_LIST_STRATEGIES)))
    if len(set(device_list)) != len(device_list):
        raise InvalidOptionError("config.device_list_strategy lists a strategy twice: %s" % ", ".join(device_list))
    device_id = raw.get("device_id_strategy") or "uuid"
    if device_id not in DEVICE_ID_STRATEGIES:
        raise InvalidOptionError("config.device_id_strategy %r is not one of %s"
                                 % (device_id, ", ".join(DEVICE_ID_STRATEGIES)))
    if raw.get("time_slicing") is not None and raw.get("mps") is not None:
        raise InvalidOptionError("config.time_slicing and config.mps cannot be used together: the plugin shares GPUs "
                                 "one way at a time; keep one of them")
    fail_on_init_error = raw.get("fail_on_init_error")
    return PluginConfig(
        mig_strategy=mig_strategy,
        fail_on_init_error=True if fail_on_init_error is None else bool(fail_on_init_error),
        device_list_strategy=list(device_list),
        device_id_strategy=device_id,
        time_slicing=_check_sharing("config.time_slicing", raw.get("time_slicing"), True, mig_strategy),
        mps=_check_sharing("config.mps", raw.get("mps"), False, mig_strategy),
    )


def check_timeout(option: str, value: Any) -> float:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise InvalidOptionError("%s must be a number of seconds, 0 or more, got %r" % (option, value))
    return float(value)


def spec_from_params(params: Dict[str, Any]) -> DevicePluginSpec:
    """The module's options, validated: every error names the option and the cause."""
    image = params.get("image") or DEFAULT_IMAGE
    tag = params.get("tag") or DEFAULT_TAG
    check_image(image, tag)
    kubelet_root = params.get("kubelet_root_dir") or DEFAULT_KUBELET_ROOT
    if not str(kubelet_root).startswith("/"):
        raise InvalidOptionError("kubelet_root_dir %r must be an absolute path on the nodes, such as %s"
                                 % (kubelet_root, DEFAULT_KUBELET_ROOT))
    pull_policy = params.get("image_pull_policy")
    if pull_policy is not None and pull_policy not in PULL_POLICIES:
        raise InvalidOptionError("image_pull_policy %r is not one of %s" % (pull_policy, ", ".join(PULL_POLICIES)))
    selector = check_labels("selector_labels", params.get("selector_labels") or DEFAULT_SELECTOR_LABELS)
    if not selector:
        raise InvalidOptionError("selector_labels must hold at least one label")
    priority = params.get("priority_class_name")
    if priority is None:
        priority = DEFAULT_PRIORITY_CLASS
    runtime_class = params.get("runtime_class_name")
    node_affinity = params.get("node_affinity")
    tolerations = params.get("tolerations")
    return DevicePluginSpec(
        name=check_dns_subdomain("name", params.get("name") or DEFAULT_NAME),
        namespace=check_namespace("namespace", params.get("namespace") or DEFAULT_NAMESPACE),
        image=image,
        tag=tag,
        image_pull_policy=pull_policy,
        image_pull_secrets=[check_dns_subdomain("image_pull_secrets", s) for s in params.get("image_pull_secrets") or []],
        selector_labels=selector,
        node_selector=check_labels("node_selector", params.get("node_selector")),
        node_affinity=check_node_affinity(DEFAULT_NODE_AFFINITY if node_affinity is None else node_affinity),
        tolerations=check_tolerations(DEFAULT_TOLERATIONS if tolerations is None else tolerations),
        priority_class_name=check_dns_subdomain("priority_class_name", priority) if priority else None,
        resources=check_resources(params.get("resources")),
        runtime_class_name=check_dns_subdomain("runtime_class_name", runtime_class) if runtime_class else None,
        env=check_env(params.get("env")),
        kubelet_root_dir=str(kubelet_root).rstrip("/") or "/",
        config_map_name=check_dns_subdomain("config_map_name", params.get("config_map_name") or DEFAULT_CONFIG_MAP),
        config=check_config(params.get("config")),
    )


# --------------------------------------------------------------------------- rendering

def _sharing_dict(sharing: Sharing, time_slicing: bool) -> Dict[str, Any]:
    result: Dict[str, Any] = {"renameByDefault": sharing.rename_by_default}
    if time_slicing:
        result["failRequestsGreaterThanOne"] = bool(sharing.fail_requests_greater_than_one)
    result["resources"] = [{"name": r.name, "replicas": r.replicas} for r in sharing.resources]
    return result


def render_config(config: PluginConfig) -> Dict[str, Any]:
    """The plugin's config file as NVIDIA documents it (api/config/v1)."""
    strategies = config.device_list_strategy
    rendered: Dict[str, Any] = {
        "version": "v1",
        "flags": {
            "migStrategy": config.mig_strategy,
            "failOnInitError": config.fail_on_init_error,
            "plugin": {
                "deviceListStrategy": strategies[0] if len(strategies) == 1 else list(strategies),
                "deviceIDStrategy": config.device_id_strategy,
            },
        },
    }
    if config.time_slicing is not None:
        rendered["sharing"] = {"timeSlicing": _sharing_dict(config.time_slicing, True)}
    elif config.mps is not None:
        rendered["sharing"] = {"mps": _sharing_dict(config.mps, False)}
    return rendered


def config_text(config: PluginConfig) -> str:
    """The config file's text: YAML, stable for one configuration (its hash rolls the pods)."""
    rendered = render_config(config)
    if yaml is not None:
        return yaml.safe_dump(rendered, default_flow_style=False, sort_keys=False)
    return json.dumps(rendered, indent=2) + "\n"


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def render_config_map(spec: DevicePluginSpec, text: str) -> Dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": spec.config_map_name, "namespace": spec.namespace, "labels": dict(MANAGED_LABELS)},
        "data": {CONFIG_KEY: text},
    }


def render_daemonset(spec: DevicePluginSpec, text: str) -> Dict[str, Any]:
    """The DaemonSet of NVIDIA's static manifest, with the spec's overrides and the config mounted."""
    env = [{"name": "CONFIG_FILE", "value": CONFIG_FILE}]
    env.extend({"name": k, "value": v} for k, v in sorted(spec.env.items()))
    container: Dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image_reference,
        "env": env,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [
            {"name": "device-plugin", "mountPath": PLUGIN_DIR_IN_CONTAINER},
            {"name": "plugin-config", "mountPath": CONFIG_DIR, "readOnly": True},
        ],
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    if spec.resources:
        container["resources"] = spec.resources
    pod_spec: Dict[str, Any] = {"tolerations": spec.tolerations}
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    if spec.node_selector:
        pod_spec["nodeSelector"] = spec.node_selector
    if spec.node_affinity:
        pod_spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": spec.node_affinity}}}
    if spec.runtime_class_name:
        pod_spec["runtimeClassName"] = spec.runtime_class_name
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in spec.image_pull_secrets]
    pod_spec["containers"] = [container]
    pod_spec["volumes"] = [
        {"name": "device-plugin", "hostPath": {"path": spec.host_plugin_dir}},
        {"name": "plugin-config", "configMap": {"name": spec.config_map_name}},
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": dict(MANAGED_LABELS)},
        "spec": {
            "selector": {"matchLabels": dict(spec.selector_labels)},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": dict(spec.selector_labels),
                             "annotations": {CONFIG_HASH_ANNOTATION: config_hash(text)}},
                "spec": pod_spec,
            },
        },
    }


# --------------------------------------------------------------------------- rollout

@dataclass
class RolloutVerdict:
    complete: bool
    reason: str


def rollout_verdict(state: DaemonSetState, allow_empty: bool, expected_nodes: Optional[Sequence[str]],
                    pods: Optional[Sequence[Dict[str, Any]]] = None) -> RolloutVerdict:
    """Whether the rollout is complete: the controller observed the current generation and
    updated = ready = desired. Zero desired pods is complete only when allowed (``allow_empty``)
    or when the expected node list is empty; with expected nodes and their ``pods``, each node
    needs a Ready pod."""
    if not state.found:
        return RolloutVerdict(False, "the DaemonSet does not exist")
    if not state.observed:
        return RolloutVerdict(False, "the controller has not observed generation %s yet (observed %s)"
                              % (state.generation, state.observed_generation))
    if state.desired == 0:
        if allow_empty or (expected_nodes is not None and not expected_nodes):
            return RolloutVerdict(True, "scheduled on zero nodes, as allowed")
        return RolloutVerdict(False, "scheduled on zero nodes")
    if not state.updated == state.ready == state.desired:
        return RolloutVerdict(False, "%d of %d pods updated, %d ready" % (state.updated, state.desired, state.ready))
    if expected_nodes and pods is not None:
        by_node = pods_by_node(pods)
        missing = [n for n in expected_nodes if not _node_pod_ready(by_node.get(n, []))]
        if missing:
            return RolloutVerdict(False, "no Ready plugin pod on expected node(s) %s" % ", ".join(missing))
    return RolloutVerdict(True, "%d of %d pods updated and ready" % (state.ready, state.desired))


def _node_pod_ready(pods: Sequence[Dict[str, Any]]) -> bool:
    pod = current_pod(pods)
    return pod is not None and classify_pod(pod).healthy


def explain_nodes(daemonset: Dict[str, Any], nodes: Sequence[Dict[str, Any]], pods: Sequence[Dict[str, Any]],
                  expected_nodes: Optional[Sequence[str]]) -> List[Dict[str, str]]:
    """For each node that should run a Ready plugin pod and does not: the node and why.
    Without expected nodes, the nodes the DaemonSet targets (and those that have a pod) count."""
    pod_spec = ((daemonset.get("spec") or {}).get("template") or {}).get("spec") or {}
    generation = (daemonset.get("metadata") or {}).get("generation")
    nodes_by_name = {(n.get("metadata") or {}).get("name"): n for n in nodes}
    by_node = pods_by_node(pods)
    if expected_nodes:
        names = list(expected_nodes)
    else:
        names = sorted(n for n in nodes_by_name
                       if n and (n in by_node or scheduling_match(pod_spec, nodes_by_name[n]).targeted))
    result = []
    for name in names:
        pod_object = current_pod(by_node.get(name, []))
        if pod_object is None:
            node = nodes_by_name.get(name)
            if node is None:
                why = "no such node"
            else:
                match = scheduling_match(pod_spec, node)
                why = "no plugin pod yet" if match.targeted else "not targeted: " + "; ".join(
                    r.message for r in match.reasons)
            result.append({"node": name, "pod": "", "reason": why})
            continue
        pod = classify_pod(pod_object)
        template_generation = ((pod_object.get("metadata") or {}).get("labels") or {}).get("pod-template-generation")
        if not pod.healthy:
            result.append({"node": name, "pod": pod.name, "reason": pod.why_not_ready()})
        elif generation is not None and template_generation is not None and str(template_generation) != str(generation):
            result.append({"node": name, "pod": pod.name,
                           "reason": "runs template generation %s, not %s yet" % (template_generation, generation)})
    return result


# --------------------------------------------------------------------------- the manager

def daemonset_api(client: Any) -> ObjectApi:
    apps = client.apps
    return ObjectApi("DaemonSet", apps.read_namespaced_daemon_set, apps.patch_namespaced_daemon_set,
                     apps.delete_namespaced_daemon_set)


def config_map_api(client: Any) -> ObjectApi:
    core = client.core
    return ObjectApi("ConfigMap", core.read_namespaced_config_map, core.patch_namespaced_config_map,
                     core.delete_namespaced_config_map)


@dataclass
class RolloutReport:
    state: DaemonSetState
    verdict: RolloutVerdict
    waited_s: float
    nodes_not_ready: List[Dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        result = self.state.to_dict()
        result.update(complete=self.verdict.complete, reason=self.verdict.reason, waited_s=round(self.waited_s, 2),
                      nodes_not_ready=self.nodes_not_ready)
        return result


class DevicePluginManager:
    """Brings the device plugin's ConfigMap and DaemonSet to the spec (or removes them)."""

    def __init__(self, client: Any, spec: DevicePluginSpec, check_mode: bool,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.client = client
        self.spec = spec
        self.check_mode = check_mode
        self.config_text = config_text(spec.config)
        self._clock = clock
        self._sleep = sleep

    # manifests
    def desired_config_map(self) -> Dict[str, Any]:
        return render_config_map(self.spec, self.config_text)

    def desired_daemonset(self) -> Dict[str, Any]:
        return render_daemonset(self.spec, self.config_text)

    def get_existing(self) -> Optional[Dict[str, Any]]:
        return read_object(self.client, daemonset_api(self.client), self.spec.name, self.spec.namespace)

    def _apply(self, api: ObjectApi, desired: Dict[str, Any]) -> ApplyResult:
        try:
            return apply_object(self.client, api, desired, self.check_mode)
        except K8sError as exc:
            if exc.details.get("status") == 404 and "namespace" in exc.msg:
                raise InvalidOptionError("namespace %s does not exist: nothing was written" % self.spec.namespace,
                                         action="create the namespace first, or set namespace to an existing one")
            raise

    def present(self) -> List[ApplyResult]:
        """Apply the ConfigMap, then the DaemonSet that mounts it; each written only when it differs."""
        return [self._apply(config_map_api(self.client), self.desired_config_map()),
                self._apply(daemonset_api(self.client), self.desired_daemonset())]

    def absent(self) -> List[ApplyResult]:
        """Delete the DaemonSet, then its ConfigMap."""
        return [delete_object(self.client, daemonset_api(self.client), "DaemonSet", self.spec.name,
                              self.spec.namespace, self.check_mode),
                delete_object(self.client, config_map_api(self.client), "ConfigMap", self.spec.config_map_name,
                              self.spec.namespace, self.check_mode)]

    # waits
    def _list_pods(self, daemonset: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
        match_labels = (((daemonset or {}).get("spec") or {}).get("selector") or {}).get("matchLabels") \
            or self.spec.selector_labels
        selector = selector_string(match_labels)
        return call_json(self.client, "list plugin pods in %s (%s)" % (self.spec.namespace, selector),
                         self.client.core.list_namespaced_pod, self.spec.namespace,
                         label_selector=selector).get("items") or []

    def _daemonset_watch(self) -> ListWatch:
        return ListWatch(self.client, "DaemonSet %s/%s" % (self.spec.namespace, self.spec.name),
                         self.client.apps.list_namespaced_daemon_set, self.spec.namespace,
                         field_selector="metadata.name=%s" % self.spec.name)

    def wait_rollout(self, timeout: float, allow_empty: bool, expected_nodes: Optional[List[str]]) -> RolloutReport:
        """Watch the DaemonSet until the rollout is complete (its status counts every pod's
        readiness); with expected nodes, their pods are listed once the counters agree. On the
        deadline fail naming the nodes whose pods are not ready and why."""
        deadline = Deadline(timeout, self._clock)
        seen: Dict[str, Any] = {"daemonset": None}

        def complete(objects: Dict[str, Dict[str, Any]]) -> Optional[RolloutVerdict]:
            daemonset = next(iter(objects.values()), None)
            state = daemonset_state(daemonset, self.spec.name, self.spec.namespace)
            verdict = rollout_verdict(state, allow_empty, expected_nodes)
            if verdict.complete and expected_nodes and daemonset is not None:
                verdict = rollout_verdict(state, allow_empty, expected_nodes, self._list_pods(daemonset))
            seen.update(daemonset=daemonset, state=state, verdict=verdict)
            return verdict if verdict.complete else None

        wait_until(self._daemonset_watch(), complete, deadline, pause=self._sleep)
        report = RolloutReport(seen["state"], seen["verdict"], deadline.elapsed)
        if report.verdict.complete:
            return report
        ref = "DaemonSet %s/%s" % (self.spec.namespace, self.spec.name)
        if seen["daemonset"] is None:
            raise K8sTimeoutError("%s: still absent after %ss" % (ref, _seconds(timeout)), rollout=report.to_dict())
        nodes = call_json(self.client, "list nodes", self.client.core.list_node).get("items") or []
        report.nodes_not_ready = explain_nodes(seen["daemonset"], nodes, self._list_pods(seen["daemonset"]),
                                               expected_nodes)
        detail = "; ".join("%s: %s" % (n["node"], n["reason"]) for n in report.nodes_not_ready[:20])
        if len(report.nodes_not_ready) > 20:
            detail += "; and %d more" % (len(report.nodes_not_ready) - 20)
        if report.state.desired == 0 and report.verdict.reason == "scheduled on zero nodes":
            raise K8sTimeoutError(
                "%s is scheduled on zero nodes after %ss: no node matches its node selector, node affinity and "
                "tolerations (%d nodes in the cluster)" % (ref, _seconds(timeout), len(nodes)),
                action="label the GPU nodes (for example nvidia.com/gpu.present=true with gpunode.bringup.gpu_node), "
                       "or set allow_empty: true (or expected_nodes: []) where no GPU node exists yet",
                rollout=report.to_dict())
        raise K8sTimeoutError(
            "%s: rollout not complete after %ss: %s%s" % (ref, _seconds(timeout), report.verdict.reason,
                                                          ". Not ready: " + detail if detail else ""),
            action="see each node's reason; gpunode.bringup.device_plugin_info classifies the plugin logs",
            rollout=report.to_dict())

    def wait_deleted(self, timeout: float) -> bool:
        """Watch until the DaemonSet is gone, then its pods."""
        deadline = Deadline(timeout, self._clock)
        selector = selector_string(self.spec.selector_labels)
        pods = ListWatch(self.client, "plugin pods in %s (%s)" % (self.spec.namespace, selector),
                         self.client.core.list_namespaced_pod, self.spec.namespace, label_selector=selector)
        for lister in (self._daemonset_watch(), pods):
            if not wait_until(lister, lambda objects: True if not objects else None, deadline, pause=self._sleep).met:
                raise K8sTimeoutError("DaemonSet %s/%s or its pods still exist after %ss"
                                      % (self.spec.namespace, self.spec.name, _seconds(timeout)))
        return True


def _seconds(value: float) -> str:
    return ("%d" % value) if float(value).is_integer() else ("%.1f" % value)


# --------------------------------------------------------------------------- the module's result

def device_plugin_result(params: Dict[str, Any], check_mode: bool, diff_mode: bool,
                         client_factory: Optional[Callable[[Dict[str, Any]], Any]] = None) -> Dict[str, Any]:
    """Validate every option, then apply (or delete) and optionally wait: the module's result."""
    spec = spec_from_params(params)
    wait_timeout = check_timeout("wait_timeout", params.get("wait_timeout", 120))
    expected_nodes = params.get("expected_nodes")
    if expected_nodes is not None:
        expected_nodes = [check_dns_subdomain("expected_nodes", n) for n in expected_nodes]
    client = (client_factory or K8sClient)(params)
    manager = DevicePluginManager(client, spec, check_mode)
    state = params.get("state") or "present"
    results = manager.present() if state == "present" else manager.absent()
    result: Dict[str, Any] = {
        "changed": any(r.changed for r in results),
        "config_map": results[0].after or {},
        "daemonset": results[1].after or {},
        "config": render_config(spec.config),
        "image": spec.image_reference,
    }
    if diff_mode:
        result["diff"] = [r.diff for r in results if r.changed]
    if params.get("wait") and not check_mode:
        if state == "present":
            result["rollout"] = manager.wait_rollout(wait_timeout, bool(params.get("allow_empty")),
                                                     expected_nodes).to_dict()
        else:
            manager.wait_deleted(wait_timeout)
    result["api_requests"] = client.requests
    return result
