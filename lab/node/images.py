"""The images a simulated node can "pull", and what each one is when it runs.

The lab has no registry and no image store. A container runs in a sandbox whose userland is the
host's (lab/node/sandbox.py); an image contributes its entrypoint, its environment and its own
binaries:

- NVIDIA's device plugin, ``nvcr.io/nvidia/k8s-device-plugin:<tag>``: the binary ``make lab``
  built from github.com/NVIDIA/k8s-device-plugin at that tag (lab/pins.env). A tag that was not
  built cannot be pulled: the container waits in ErrImagePull / ImagePullBackOff with the
  registry's "not found" message, as for a tag that does not exist. The image's environment is
  NVIDIA's (its Dockerfile on the CUDA base image); its binary sits on the image's PATH at
  /usr/local/bin (NVIDIA's image has it at /usr/bin, where the lab binds the host's).
- Every other image: the host's userland, the image's command from the pod spec. CUDA images
  (``nvcr.io/nvidia/cuda:*``) carry the CUDA base image's environment (the loader path where
  the nvidia runtime puts the driver's libraries, ``NVIDIA_VISIBLE_DEVICES=all``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from lab.pins import DEVICE_PLUGIN_IMAGE, device_plugin_binary

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# nvcr.io/nvidia/cuda:*-base images (ENV of their Dockerfiles)
CUDA_PATH = "/usr/local/nvidia/bin:/usr/local/cuda/bin:" + DEFAULT_PATH
CUDA_ENV = {
    "PATH": CUDA_PATH,
    "LD_LIBRARY_PATH": "/usr/local/nvidia/lib:/usr/local/nvidia/lib64",
    "NVIDIA_VISIBLE_DEVICES": "all",
    "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
}
PLUGIN_BINARY_IN_IMAGE = "/usr/local/bin/nvidia-device-plugin"
REFERENCE = re.compile(r"^(?P<name>[^@:]+(?::\d+/[^@:]+)?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>\S+))?$")


class ImagePullError(Exception):
    """The image cannot be pulled; the message is the runtime's."""


@dataclass
class Image:
    reference: str
    entrypoint: List[str] = field(default_factory=list)
    cmd: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    files: List[Tuple[str, str]] = field(default_factory=list)  # (host path, path in the image)
    image_id: str = ""
    # the image's working directory
    working_dir: str = "/"


def split_reference(reference: str) -> Tuple[str, str, str]:
    """(repository, tag, digest) of an image reference; the tag defaults to latest."""
    match = REFERENCE.match(reference.strip())
    if not match:
        raise ImagePullError('failed to pull and unpack image "%s": invalid reference format' % reference)
    name = match.group("name")
    if "/" not in name:
        name = "docker.io/library/" + name
    elif "." not in name.split("/")[0] and ":" not in name.split("/")[0] and name.split("/")[0] != "localhost":
        name = "docker.io/" + name
    return name, match.group("tag") or ("" if match.group("digest") else "latest"), match.group("digest") or ""


def _not_found(repository: str, tag: str, digest: str) -> ImagePullError:
    """containerd's answer for a reference the registry does not have."""
    ref = repository + (":" + tag if tag else "") + ("@" + digest if digest else "")
    return ImagePullError('rpc error: code = NotFound desc = failed to pull and unpack image "%s": failed to '
                          'resolve reference "%s": %s: not found' % (ref, ref, ref))


def resolve(reference: str) -> Image:
    """The image for a container's ``image``; ImagePullError when it cannot be pulled."""
    repository, tag, digest = split_reference(reference)
    if repository in (DEVICE_PLUGIN_IMAGE, "docker.io/nvidia/k8s-device-plugin"):
        binary = device_plugin_binary(tag) if tag and not digest else ""
        if not binary or not os.access(binary, os.X_OK):
            raise _not_found(repository, tag, digest)
        env = dict(CUDA_ENV)
        env.update({"NVIDIA_DISABLE_REQUIRE": "true"})
        return Image(reference=reference, entrypoint=["nvidia-device-plugin"], env=env,
                     files=[(binary, PLUGIN_BINARY_IN_IMAGE)],
                     image_id="%s@sha256:lab-built-%s" % (repository, tag))
    env = dict(CUDA_ENV) if repository == "nvcr.io/nvidia/cuda" else {"PATH": DEFAULT_PATH}
    return Image(reference=reference, env=env, image_id="%s@sha256:lab-host-userland" % repository)


def is_device_plugin(reference: str) -> bool:
    try:
        repository, _tag, _digest = split_reference(reference)
    except ImagePullError:
        return False
    return repository in (DEVICE_PLUGIN_IMAGE, "docker.io/nvidia/k8s-device-plugin")


def expected_tag(reference: str) -> Optional[str]:
    try:
        return split_reference(reference)[1] or None
    except ImagePullError:
        return None
