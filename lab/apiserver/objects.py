"""Object shapes: defaulting, validation, Node objects for simulated nodes, pod status."""
from __future__ import annotations

import datetime
import hashlib
import json
import re
import uuid
from typing import Any, Dict, List, Optional, Tuple

KUBELET_VERSION = "v1.32.0"
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
NATIVE_RESOURCES = ("cpu", "memory", "pods", "ephemeral-storage")

Cause = Tuple[str, str, str]  # (field, reason, message)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_uid() -> str:
    return str(uuid.uuid4())


def parse_time(value: Optional[str]) -> Optional[datetime.datetime]:
    if not value:
        return None
    try:
        return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None


def is_extended(resource_name: str) -> bool:
    return "/" in resource_name and not resource_name.startswith(("kubernetes.io/", "requests."))


# --- defaulting ------------------------------------------------------------------------------
def _pull_policy(image: str) -> str:
    if "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    if ":" not in last or last.endswith(":latest"):
        return "Always"
    return "IfNotPresent"


def default_pod_spec(spec: Dict[str, Any]) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    for group in ("initContainers", "containers"):
        for c in spec.get(group) or []:
            if not isinstance(c, dict):
                continue
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            if isinstance(c.get("image"), str):
                c.setdefault("imagePullPolicy", _pull_policy(c["image"]))
            c.setdefault("resources", {})
            for port in c.get("ports") or []:
                if isinstance(port, dict):
                    port.setdefault("protocol", "TCP")
    for vol in spec.get("volumes") or []:
        if not isinstance(vol, dict):
            continue
        if isinstance(vol.get("hostPath"), dict):
            vol["hostPath"].setdefault("type", "")
        for src in ("configMap", "secret"):
            if isinstance(vol.get(src), dict):
                vol[src].setdefault("defaultMode", 420)


def default_object(kind: str, obj: Dict[str, Any]) -> None:
    spec = obj.get("spec")
    if kind == "Pod" and isinstance(spec, dict):
        default_pod_spec(spec)
        for group in ("initContainers", "containers"):  # requests default to limits (SetDefaults_Pod)
            for c in spec.get(group) or []:
                res = c.get("resources") if isinstance(c, dict) else None
                if isinstance(res, dict) and isinstance(res.get("limits"), dict) and res["limits"]:
                    requests = res.setdefault("requests", {})
                    for k, v in res["limits"].items():
                        requests.setdefault(k, v)
        spec.setdefault("serviceAccountName", "default")
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
        spec.setdefault("enableServiceLinks", True)
        # the Priority admission plugin: the built-in classes
        spec.setdefault("priority", {"system-node-critical": 2000001000, "system-cluster-critical": 2000000000}
                        .get(spec.get("priorityClassName") or "", 0))
        spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
        tols = spec.setdefault("tolerations", [])
        for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
            if not any(t.get("operator") == "Exists" and t.get("key") in (key, None, "")
                       and t.get("effect") in ("NoExecute", None, "") for t in tols if isinstance(t, dict)):
                tols.append({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300})
    elif kind == "DaemonSet" and isinstance(spec, dict):
        strategy = spec.setdefault("updateStrategy", {})
        if isinstance(strategy, dict):
            strategy.setdefault("type", "RollingUpdate")
            if strategy["type"] == "RollingUpdate":
                ru = strategy.setdefault("rollingUpdate", {})
                if isinstance(ru, dict):
                    ru.setdefault("maxUnavailable", 1)
                    ru.setdefault("maxSurge", 0)
        spec.setdefault("revisionHistoryLimit", 10)
        tmpl = spec.get("template")
        if isinstance(tmpl, dict) and isinstance(tmpl.get("spec"), dict):
            default_pod_spec(tmpl["spec"])
    elif kind == "Namespace":
        obj.setdefault("spec", {"finalizers": ["kubernetes"]})
        labels = obj.setdefault("metadata", {}).setdefault("labels", {})
        labels.setdefault("kubernetes.io/metadata.name", obj["metadata"].get("name"))
    elif kind == "Service" and isinstance(spec, dict):
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for port in spec.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
    elif kind == "Secret":
        obj.setdefault("type", "Opaque")


def initial_status(kind: str, obj: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The status a freshly created object gets (None: keep the one in the request)."""
    if kind == "Pod":
        return {"phase": "Pending", "qosClass": qos_class(obj.get("spec") or {})}
    if kind == "DaemonSet":
        return {"currentNumberScheduled": 0, "numberMisscheduled": 0, "desiredNumberScheduled": 0,
                "numberReady": 0}
    if kind == "Namespace":
        return {"phase": "Active"}
    if kind == "Service":
        return {"loadBalancer": {}}
    return None


def qos_class(spec: Dict[str, Any]) -> str:
    any_set, guaranteed = False, True  # only cpu and memory count (extended resources do not)
    for c in spec.get("containers") or []:
        res = c.get("resources") or {} if isinstance(c, dict) else {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        if any(r in req or r in lim for r in ("cpu", "memory")):
            any_set = True
        for r in ("cpu", "memory"):
            if r not in lim or (r in req and req[r] != lim[r]):
                guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


# --- validation ------------------------------------------------------------------------------
def validate(kind: str, obj: Dict[str, Any], old: Optional[Dict[str, Any]]) -> List[Cause]:
    causes: List[Cause] = []
    meta = obj.get("metadata") or {}
    name = meta.get("name") or ""
    if not NAME_RE.match(name) or len(name) > 253:
        causes.append(("metadata.name", "FieldValueInvalid",
                       'Invalid value: "%s": a lowercase RFC 1123 subdomain must consist of lower case '
                       "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric "
                       "character (e.g. 'example.com', regex used for validation is "
                       "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')" % name))
    for field in ("labels", "annotations"):
        value = meta.get(field)
        if value is not None and not isinstance(value, dict):
            causes.append(("metadata." + field, "FieldValueInvalid", "Invalid value: must be a map"))
        elif isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(v, str):
                    causes.append(("metadata.%s" % field, "FieldValueInvalid",
                                   "Invalid value: %r: must be a string" % (v,)))
                elif field == "labels":
                    key_name = k.rsplit("/", 1)[-1]
                    if not LABEL_NAME_RE.match(key_name) or len(key_name) > 63:
                        causes.append(("metadata.labels", "FieldValueInvalid",
                                       'Invalid value: "%s": name part must consist of alphanumeric characters, '
                                       "'-', '_' or '.'" % k))
                    if len(v) > 63 or not LABEL_VALUE_RE.match(v):
                        causes.append(("metadata.labels", "FieldValueInvalid",
                                       'Invalid value: "%s": a valid label must be an empty string or consist '
                                       "of alphanumeric characters, '-', '_' or '.', and must start and end "
                                       "with an alphanumeric character" % v))
    spec = obj.get("spec")
    if kind == "Pod":
        causes += _validate_pod_spec(spec, "spec")
        if old is not None and not causes:
            causes += _validate_pod_update(old.get("spec") or {}, spec or {})
    elif kind == "DaemonSet":
        if not isinstance(spec, dict):
            causes.append(("spec", "FieldValueRequired", "Required value"))
            return causes
        selector = spec.get("selector")
        tmpl = spec.get("template") or {}
        tlabels = (tmpl.get("metadata") or {}).get("labels") or {}
        if not isinstance(selector, dict) or not (selector.get("matchLabels") or selector.get("matchExpressions")):
            causes.append(("spec.selector", "FieldValueRequired", "Required value"))
        else:
            from .selectors import match_label_selector_object
            if not match_label_selector_object(selector, tlabels):
                causes.append(("spec.template.metadata.labels", "FieldValueInvalid",
                               "Invalid value: %s: `selector` does not match template `labels`"
                               % json.dumps(tlabels, separators=(",", ":"))))
        causes += _validate_pod_spec(tmpl.get("spec"), "spec.template.spec")
        if (tmpl.get("spec") or {}).get("restartPolicy", "Always") != "Always":
            causes.append(("spec.template.spec.restartPolicy", "FieldValueNotSupported",
                           'Unsupported value: "%s": supported values: "Always"'
                           % tmpl["spec"].get("restartPolicy")))
        if old is not None and (old.get("spec") or {}).get("selector") != selector:
            causes.append(("spec.selector", "FieldValueInvalid",
                           "Invalid value: %s: field is immutable" % json.dumps(selector, separators=(",", ":"))))
    elif kind == "ConfigMap":
        for field in ("data", "binaryData"):
            data = obj.get(field)
            if data is not None and (not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values())):
                causes.append((field, "FieldValueInvalid", "Invalid value: values must be strings"))
    elif kind == "Lease":
        dur = (spec or {}).get("leaseDurationSeconds")
        if dur is not None and (not isinstance(dur, int) or dur <= 0):
            causes.append(("spec.leaseDurationSeconds", "FieldValueInvalid",
                           "Invalid value: %s: must be greater than 0" % dur))
    elif kind == "RuntimeClass":
        if not obj.get("handler"):
            causes.append(("handler", "FieldValueRequired", "Required value"))
    return causes


def _validate_pod_spec(spec: Any, path: str) -> List[Cause]:
    if not isinstance(spec, dict):
        return [(path, "FieldValueRequired", "Required value")]
    causes: List[Cause] = []
    containers = spec.get("containers")
    if not containers or not isinstance(containers, list):
        causes.append(("%s.containers" % path, "FieldValueRequired", "Required value"))
        return causes
    seen = set()
    for idx, c in enumerate(containers):
        where = "%s.containers[%d]" % (path, idx)
        if not isinstance(c, dict):
            causes.append((where, "FieldValueInvalid", "Invalid value: must be an object"))
            continue
        if not c.get("name"):
            causes.append((where + ".name", "FieldValueRequired", "Required value"))
        elif c["name"] in seen:
            causes.append((where + ".name", "FieldValueDuplicate", 'Duplicate value: "%s"' % c["name"]))
        seen.add(c.get("name"))
        if not c.get("image"):
            causes.append((where + ".image", "FieldValueRequired", "Required value"))
    for idx, tol in enumerate(spec.get("tolerations") or []):
        if isinstance(tol, dict) and tol.get("operator") == "Exists" and tol.get("value"):
            causes.append(("%s.tolerations[%d].operator" % (path, idx), "FieldValueInvalid",
                           "Invalid value: \"%s\": value must be empty when `operator` is 'Exists'" % tol["value"]))
    return causes


def _validate_pod_update(old: Dict[str, Any], new: Dict[str, Any]) -> List[Cause]:
    def strip(spec: Dict[str, Any]) -> Dict[str, Any]:
        out = dict(spec)
        out.pop("tolerations", None)
        out.pop("activeDeadlineSeconds", None)
        out["containers"] = [{k: v for k, v in c.items() if k != "image"} for c in spec.get("containers") or []
                             if isinstance(c, dict)]
        return out
    if strip(old) != strip(new):
        return [("spec", "FieldValueForbidden",
                 "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, "
                 "`spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only "
                 "additions to existing tolerations), `spec.terminationGracePeriodSeconds` (allow it to be set "
                 "to 1 if it was previously negative)")]
    return []


# --- simulated nodes -------------------------------------------------------------------------
def node_object(spec: Any, index: int, created: str) -> Dict[str, Any]:
    """A Node as a kubelet would register it, for a :class:`lab.contracts.NodeSpec`."""
    name = spec.name
    ip = "10.0.%d.%d" % (index // 250, index % 250 + 1)
    labels = {"beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
              "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
    labels.update(spec.labels or {})
    capacity = {"cpu": "64", "ephemeral-storage": "936398452Ki", "hugepages-1Gi": "0", "hugepages-2Mi": "0",
                "memory": "528272236Ki", "pods": "110"}
    allocatable = dict(capacity, **{"ephemeral-storage": "862986400218", "memory": "528169836Ki"})
    digest = hashlib.sha1(name.encode()).hexdigest()
    cidr = "10.244.%d.0/24" % (index % 256)
    node_spec: Dict[str, Any] = {"podCIDR": cidr, "podCIDRs": [cidr]}
    if spec.taints:
        node_spec["taints"] = [dict(t) for t in spec.taints]
    conditions = []
    for ctype, reason, message in (
            ("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available")):
        conditions.append({"type": ctype, "status": "False", "lastHeartbeatTime": created,
                           "lastTransitionTime": created, "reason": reason, "message": message})
    conditions.append({"type": "Ready", "status": "True", "lastHeartbeatTime": created, "lastTransitionTime": created,
                       "reason": "KubeletReady", "message": "kubelet is posting ready status"})
    return {
        "metadata": {"name": name, "labels": labels,
                     "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                                     "volumes.kubernetes.io/controller-managed-attach-detach": "true"}},
        "spec": node_spec,
        "status": {
            "capacity": capacity, "allocatable": allocatable, "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": digest[:32], "systemUUID": str(uuid.UUID(digest[:32])),
                         "bootID": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
                         "kernelVersion": "5.15.0-122-generic", "osImage": "Ubuntu 22.04.5 LTS",
                         "containerRuntimeVersion": "containerd://1.7.22", "kubeletVersion": KUBELET_VERSION,
                         "kubeProxyVersion": KUBELET_VERSION, "operatingSystem": "linux", "architecture": "amd64"},
        },
    }


def node_internal_ip(node: Dict[str, Any]) -> str:
    for addr in (node.get("status") or {}).get("addresses") or []:
        if addr.get("type") == "InternalIP":
            return addr.get("address", "")
    return ""


def node_ready(node: Dict[str, Any]) -> bool:
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


# --- pod status ------------------------------------------------------------------------------
def pod_status(pod: Dict[str, Any], host_ip: str, pod_ip: str, *, running: bool, ready: bool,
               restart_count: int = 0, waiting_reason: Optional[str] = None,
               last_exit_code: Optional[int] = None, last_reason: Optional[str] = None,
               started_at: Optional[str] = None) -> Dict[str, Any]:
    """A kubelet-shaped pod status for a one-container (or first-container) pod."""
    ts = now()
    old = pod.get("status") or {}
    started_pod = old.get("startTime") or ts
    ever_started = running or restart_count > 0 or last_exit_code is not None
    phase = "Running" if ever_started else "Pending"
    ready = bool(ready and running)
    old_conds = {c.get("type"): c for c in old.get("conditions") or []}

    def cond(ctype: str, status: bool, reason: Optional[str] = None) -> Dict[str, Any]:
        value = "True" if status else "False"
        prev = old_conds.get(ctype)
        c = {"type": ctype, "status": value, "lastProbeTime": None,
             "lastTransitionTime": prev["lastTransitionTime"] if prev and prev.get("status") == value else ts}
        if not status and reason:
            c["reason"] = reason
        return c
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or [{}]
    statuses = []
    for idx, c in enumerate(containers):
        image = c.get("image") or ""
        image_digest = hashlib.sha256(image.encode()).hexdigest()
        cs: Dict[str, Any] = {"name": c.get("name", ""), "image": image,
                              "imageID": "%s@sha256:%s" % (image.split(":")[0], image_digest),
                              "ready": ready, "restartCount": restart_count, "started": running}
        if running:
            container_key = "%s/%s/%s/%d" % (pod["metadata"].get("namespace"), pod["metadata"].get("name"),
                                             c.get("name"), restart_count)
            cs["containerID"] = "containerd://" + hashlib.sha256(container_key.encode()).hexdigest()
            cs["state"] = {"running": {"startedAt": started_at or ts}}
        else:
            cs["state"] = {"waiting": {"reason": waiting_reason or "ContainerCreating"}}
        if last_exit_code is not None:
            cs["lastState"] = {"terminated": {"exitCode": last_exit_code, "reason": last_reason or
                                              ("Completed" if last_exit_code == 0 else "Error"),
                                              "startedAt": started_at or started_pod, "finishedAt": ts}}
        else:
            cs["lastState"] = {}
        statuses.append(cs)
    not_ready_reason = "ContainersNotReady"
    status = {
        "phase": phase,
        "conditions": [cond("PodReadyToStartContainers", True), cond("Initialized", True),
                       cond("Ready", ready, not_ready_reason), cond("ContainersReady", ready, not_ready_reason),
                       cond("PodScheduled", True)],
        "hostIP": host_ip, "hostIPs": [{"ip": host_ip}] if host_ip else [],
        "startTime": started_pod, "containerStatuses": statuses,
        "qosClass": old.get("qosClass") or qos_class(spec),
    }
    if ever_started and pod_ip:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    return status


def template_hash(template: Dict[str, Any]) -> str:
    """A short stable hash of a pod template (the controller-revision-hash label)."""
    data = json.dumps(template, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:10]
