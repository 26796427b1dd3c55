"""The on-disk shape of one simulated node: a directory standing in for the node's "/".

Everything the collection's node-side modules read lives under the node root at the same
relative path as on a real node, so a module given ``root=<node root>`` reads the lab exactly
as it reads ``/`` on a GPU host.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import List, Optional

# sun_path is 108 bytes including the terminating NUL.
UNIX_SOCKET_PATH_MAX = 107

DEVICE_PLUGIN_DIR = "var/lib/kubelet/device-plugins"
POD_RESOURCES_DIR = "var/lib/kubelet/pod-resources"
KUBELET_SOCKET_NAME = "kubelet.sock"
CHECKPOINT_NAME = "kubelet_internal_checkpoint"
NVML_STATE_NAME = "nvml.state"
CONTAINERD_CONFIG = "etc/containerd/config.toml"
NVIDIA_RUNTIME_BINARY = "usr/bin/nvidia-container-runtime"
PROC_DRIVER_VERSION = "proc/driver/nvidia/version"

# What the kubelet and the container runtime write under a node root on their own (pod volumes,
# container logs, the runtime's container state, the device manager's checkpoint): a snapshot
# of what the collection changed on a node leaves these out.
KUBELET_OWNED = ("var/lib/kubelet/pods/", "var/log/pods/", "run/containerd/",
                 DEVICE_PLUGIN_DIR + "/" + CHECKPOINT_NAME, DEVICE_PLUGIN_DIR + ".replaced-")

# Paths as the plugin container sees them (its log shows these, never the lab's node root).
CONTAINER_DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"

# The longest socket name the lab creates: the plugin socket of the renamed time-slicing
# resource ("nvidia-" + "gpu.shared" + ".sock").
_LONGEST_SOCKET_SUFFIX = os.path.join(DEVICE_PLUGIN_DIR, "nvidia-gpu.shared.sock")


class SocketPathTooLong(ValueError):
    """A node root is too deep for its unix sockets (107 bytes at most)."""


def plugin_socket_name(resource_name: str) -> str:
    """The plugin's socket file name for a resource, as NVIDIA's plugin names it."""
    return "nvidia-%s.sock" % resource_name.split("/", 1)[-1]


@dataclass(frozen=True)
class NodeLayout:
    """Absolute paths of one simulated node."""

    name: str
    root: str

    @property
    def device_plugin_dir(self) -> str:
        return os.path.join(self.root, DEVICE_PLUGIN_DIR)

    @property
    def kubelet_socket(self) -> str:
        return os.path.join(self.device_plugin_dir, KUBELET_SOCKET_NAME)

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.device_plugin_dir, CHECKPOINT_NAME)

    @property
    def pod_resources_socket(self) -> str:
        return os.path.join(self.root, POD_RESOURCES_DIR, KUBELET_SOCKET_NAME)

    @property
    def nvml_state(self) -> str:
        return os.path.join(self.root, NVML_STATE_NAME)

    @property
    def containerd_config(self) -> str:
        return os.path.join(self.root, CONTAINERD_CONFIG)

    @property
    def nvidia_runtime_binary(self) -> str:
        return os.path.join(self.root, NVIDIA_RUNTIME_BINARY)

    @property
    def proc_driver_version(self) -> str:
        return os.path.join(self.root, PROC_DRIVER_VERSION)

    def plugin_socket(self, resource_name: str = "nvidia.com/gpu") -> str:
        return os.path.join(self.device_plugin_dir, plugin_socket_name(resource_name))

    def check_socket_paths(self) -> None:
        """Fail clearly when this node's sockets cannot be bound (path longer than 107 bytes)."""
        longest = os.path.join(self.root, _LONGEST_SOCKET_SUFFIX)
        if len(longest.encode()) > UNIX_SOCKET_PATH_MAX:
            raise SocketPathTooLong(
                "node %s: socket path %s is %d bytes, unix sockets allow %d; use a shorter lab "
                "state dir (e.g. --state-dir /tmp/gl)"
                % (self.name, longest, len(longest.encode()), UNIX_SOCKET_PATH_MAX)
            )


def max_state_dir_length(node_name_length: int) -> int:
    """How long a state dir may be for nodes named with ``node_name_length`` characters."""
    suffix = os.path.join("nodes", "x" * node_name_length, _LONGEST_SOCKET_SUFFIX)
    return UNIX_SOCKET_PATH_MAX - len(suffix) - 1


def containerd_config_text(layout: NodeLayout, with_nvidia: bool = True) -> str:
    """A containerd config (schema version 2) as ``nvidia-ctk runtime configure --set-as-default``
    leaves it; without ``with_nvidia`` it is the stock runc-only config."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    lines: List[str] = [
        "version = 2",
        "",
        "[plugins]",
        "",
        "  [%s]" % cri,
        "",
        "    [%s.containerd]" % cri,
        '      default_runtime_name = "%s"' % ("nvidia" if with_nvidia else "runc"),
        "",
        "      [%s.containerd.runtimes]" % cri,
        "",
    ]
    if with_nvidia:
        lines += [
            "        [%s.containerd.runtimes.nvidia]" % cri,
            "          privileged_without_host_devices = false",
            '          runtime_engine = ""',
            '          runtime_root = ""',
            '          runtime_type = "io.containerd.runc.v2"',
            "",
            "          [%s.containerd.runtimes.nvidia.options]" % cri,
            '            BinaryName = "%s"' % ("/" + NVIDIA_RUNTIME_BINARY),  # as the node sees it
            "            SystemdCgroup = true",
            "",
        ]
    lines += [
        "        [%s.containerd.runtimes.runc]" % cri,
        '          runtime_type = "io.containerd.runc.v2"',
        "",
        "          [%s.containerd.runtimes.runc.options]" % cri,
        "            SystemdCgroup = true",
        "",
    ]
    return "\n".join(lines)


def containerd_has_nvidia(layout: NodeLayout) -> tuple:
    """(nvidia runtime handler configured, nvidia is the default runtime) from config.toml."""
    import tomllib

    try:
        with open(layout.containerd_config, "rb") as handle:
            config = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError):
        return False, False
    containerd = config.get("plugins", {}).get("io.containerd.grpc.v1.cri", {}).get("containerd", {})
    runtimes = containerd.get("runtimes", {})
    has_handler = "nvidia" in runtimes
    return has_handler, has_handler and containerd.get("default_runtime_name") == "nvidia"


def proc_version_text(kernel_module_version: str) -> str:
    """/proc/driver/nvidia/version of the proprietary kernel module."""
    return (
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  %s  Tue Mar  5 22:23:56 UTC 2024\n"
        "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n" % kernel_module_version
    )


def write_file_atomic(path: str, text: str, mode: Optional[int] = None) -> None:
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


def create_node_tree(layout: NodeLayout, driver_version: str) -> None:
    """Create the node root: kubelet directories, containerd config, runtime stub, /proc file."""
    layout.check_socket_paths()
    for directory in (
        layout.device_plugin_dir,
        os.path.dirname(layout.pod_resources_socket),
        os.path.dirname(layout.containerd_config),
        os.path.dirname(layout.nvidia_runtime_binary),
        os.path.dirname(layout.proc_driver_version),
    ):
        os.makedirs(directory, exist_ok=True)
    write_file_atomic(layout.containerd_config, containerd_config_text(layout, with_nvidia=True))
    write_file_atomic(
        layout.nvidia_runtime_binary,
        "#!/bin/sh\n# lab stand-in for the NVIDIA container runtime: never runs containers\nexit 0\n",
        mode=0o755,
    )
    write_file_atomic(layout.proc_driver_version, proc_version_text(driver_version))


def is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def remove_path(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
