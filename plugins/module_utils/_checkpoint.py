# -*- coding: utf-8 -*-
# Copyright: (c) 2026, gpunode.bringup contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the gpunode.bringup collection; not a public API.
"""Read the kubelet device manager checkpoint (``device-plugins/kubelet_internal_checkpoint``).

The kubelet writes it as JSON (``checkpointmanager`` + ``devicemanager/checkpoint``)::

    {"Data": {"PodDeviceEntries": [{"PodUID": "...", "ContainerName": "...",
                                    "ResourceName": "nvidia.com/gpu",
                                    "DeviceIDs": {"0": ["GPU-..."]},   # per NUMA node (v2)
                                    "AllocResp": "<base64 protobuf>"}],
              "RegisteredDevices": {"nvidia.com/gpu": ["GPU-...", ...]}},
     "Checksum": 1234567890}

Kubelets before 1.20 wrote ``DeviceIDs`` as a flat list (v1). Some kubelet builds also record
the node's ``BootID`` (next to ``Data`` or inside it); it is optional and reported when present.
``RegisteredDevices`` holds the *healthy* device IDs per resource at the last write: the
kubelet rewrites the file on every ListAndWatch update and when it allocates, not when it
restarts, so after a kubelet restart it still lists the devices of the previous run.

Only read here, never written. Python 3.9 compatible (node side).
"""

from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

import json
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ansible_collections.gpunode.bringup.plugins.module_utils._errors import NodeProbeError

CHECKPOINT_NAME = "kubelet_internal_checkpoint"
# A checkpoint of a node with thousands of allocations stays far below this; anything larger
# is not a kubelet checkpoint and is not read into memory.
MAX_CHECKPOINT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class PodDeviceEntry:
    """One allocation the kubelet remembers: devices of a resource given to a container."""

    pod_uid: str
    container_name: str
    resource_name: str
    device_ids: Tuple[str, ...]
    numa_nodes: Tuple[int, ...] = ()  # empty for v1 checkpoints and devices without topology

    def to_dict(self) -> Dict[str, Any]:
        return {
            "pod_uid": self.pod_uid,
            "container_name": self.container_name,
            "resource_name": self.resource_name,
            "device_ids": list(self.device_ids),
            "numa_nodes": list(self.numa_nodes),
        }


@dataclass(frozen=True)
class KubeletCheckpoint:
    """The parts of the checkpoint the probe uses."""

    path: str
    format_version: str  # "v2" (DeviceIDs per NUMA node) or "v1" (flat DeviceIDs list)
    registered_devices: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    pod_device_entries: Tuple[PodDeviceEntry, ...] = ()
    checksum: Optional[int] = None
    boot_id: Optional[str] = None

    def devices_for(self, resource_name: str) -> Optional[Tuple[str, ...]]:
        """The registered device IDs of a resource; None when the resource is not registered."""
        return self.registered_devices.get(resource_name)

    def entries_for(self, resource_name: str) -> List[PodDeviceEntry]:
        return [entry for entry in self.pod_device_entries if entry.resource_name == resource_name]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "path": self.path,
            "format_version": self.format_version,
            "registered_devices": {name: list(ids) for name, ids in sorted(self.registered_devices.items())},
            "pod_device_entries": [entry.to_dict() for entry in self.pod_device_entries],
            "checksum": self.checksum,
            "boot_id": self.boot_id,
        }


def _bad(path: str, cause: str) -> NodeProbeError:
    return NodeProbeError(
        "kubelet checkpoint %s: %s" % (path, cause),
        action="check the file; the kubelet rewrites it on the next device plugin update",
        path=path,
    )


def _string_list(value: Any, path: str, what: str) -> Tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _bad(path, "%s is not a list of strings" % what)
    return tuple(value)


def _device_ids(value: Any, path: str, what: str) -> Tuple[Tuple[str, ...], Tuple[int, ...], str]:
    """DeviceIDs of a v2 entry ({"<numa>": [ids]}) or a v1 entry ([ids]): ids, NUMA nodes, format."""
    if isinstance(value, dict):
        ids: List[str] = []
        nodes: List[int] = []
        for numa, numa_ids in sorted(value.items(), key=lambda item: item[0]):
            try:
                node = int(numa)
            except (TypeError, ValueError):
                raise _bad(path, "%s has NUMA node key %r, not an integer" % (what, numa))
            for device_id in _string_list(numa_ids, path, "%s[%s]" % (what, numa)):
                if device_id not in ids:
                    ids.append(device_id)
            if node >= 0 and node not in nodes:  # the kubelet files devices without topology under -1
                nodes.append(node)
        return tuple(ids), tuple(sorted(nodes)), "v2"
    return _string_list(value, path, what), (), "v1"


def parse_checkpoint(text: str, path: str) -> KubeletCheckpoint:
    """Parse the checkpoint's JSON text; raise NodeProbeError naming ``path`` on a wrong shape."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise _bad(path, "not valid JSON (%s)" % exc)
    if not isinstance(document, dict) or not isinstance(document.get("Data"), dict):
        raise _bad(path, 'no "Data" object: not a kubelet device manager checkpoint')
    data: Dict[str, Any] = document["Data"]

    registered_raw = data.get("RegisteredDevices")
    if registered_raw is None:  # a nil map
        registered_raw = {}
    if not isinstance(registered_raw, dict):
        raise _bad(path, "Data.RegisteredDevices is not an object")
    registered = {
        str(resource): _string_list(ids, path, "Data.RegisteredDevices[%s]" % resource)
        for resource, ids in registered_raw.items()
    }

    entries_raw = data.get("PodDeviceEntries")
    if entries_raw is None:  # a nil slice
        entries_raw = []
    if not isinstance(entries_raw, list):
        raise _bad(path, "Data.PodDeviceEntries is not a list")
    entries: List[PodDeviceEntry] = []
    formats = set()
    for index, raw in enumerate(entries_raw):
        what = "Data.PodDeviceEntries[%d]" % index
        if not isinstance(raw, dict):
            raise _bad(path, "%s is not an object" % what)
        ids, nodes, entry_format = _device_ids(raw.get("DeviceIDs"), path, what + ".DeviceIDs")
        formats.add(entry_format)
        entries.append(PodDeviceEntry(
            pod_uid=str(raw.get("PodUID") or ""),
            container_name=str(raw.get("ContainerName") or ""),
            resource_name=str(raw.get("ResourceName") or ""),
            device_ids=ids,
            numa_nodes=nodes,
        ))

    checksum = document.get("Checksum")
    if checksum is not None and (isinstance(checksum, bool) or not isinstance(checksum, int)):
        raise _bad(path, "Checksum is not an integer")
    boot_id = document.get("BootID", data.get("BootID"))
    if boot_id is not None and not isinstance(boot_id, str):
        raise _bad(path, "BootID is not a string")

    return KubeletCheckpoint(
        path=path,
        format_version="v1" if formats == {"v1"} else "v2",
        registered_devices=registered,
        pod_device_entries=tuple(entries),
        checksum=checksum,
        boot_id=boot_id or None,
    )


def read_checkpoint(path: str) -> Optional[KubeletCheckpoint]:
    """Read and parse the checkpoint; None when it does not exist (read-only, never created)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _bad(path, "cannot stat it (%s)" % (exc.strerror or exc))
    if stat.S_ISDIR(info.st_mode):
        raise _bad(path, "is a directory, not the checkpoint file")
    if not stat.S_ISREG(info.st_mode):
        raise _bad(path, "is not a regular file")
    if info.st_size > MAX_CHECKPOINT_BYTES:
        raise _bad(path, "is %d bytes, larger than any kubelet checkpoint" % info.st_size)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CHECKPOINT_BYTES + 1)
    except OSError as exc:
        raise _bad(path, "cannot be read (%s)" % (exc.strerror or exc))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(path, "is not UTF-8 text")
    return parse_checkpoint(text, path)
