"""``python3 -m lab.build``: build the lab's real parts from their Go modules (``make lab``).

- ``.build/lab/bin/kube-lab``: etcd, kube-apiserver, kube-controller-manager and kube-scheduler
  of the pinned Kubernetes release in one binary (lab/controlplane), version stamped as
  Kubernetes' own build does (``-X k8s.io/component-base/version.gitVersion=...``).
- ``.build/lab/bin/device-plugin-<tag>/nvidia-device-plugin``: NVIDIA's device plugin at each
  pinned tag, with NVIDIA's link flags and version stamp.

Each output has a stamp of its inputs (pins, go.mod, go.sum, sources, Go version): an unchanged
input is not rebuilt. When the pinned Kubernetes or etcd version differs from
lab/controlplane/go.mod, go.mod is rewritten (the release's k8s.io/* staging modules replaced
by their published versions, as k8s.io/kubernetes needs) and tidied.

Exit status: 0 built or up to date, 1 a build failed (the message names the component), 2 no
usable Go toolchain. Standard library only: it runs before the venv exists.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # `python3 lab/build.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lab.pins import (  # noqa: E402
    BIN_DIR,
    CONTROLPLANE_SRC,
    DEVICE_PLUGIN_MODULE,
    KUBE_LAB,
    device_plugin_binary,
    device_plugin_versions,
    pins,
    staging_version,
)

EXIT_BUILD_FAILED = 1
EXIT_NO_GO = 2
CONTROLPLANE_MODULE = "gpunode.bringup/lab/controlplane"
# NVIDIA's Makefile links the plugin this way: go-nvml resolves NVML's symbols when the library
# is loaded, not at link time.
PLUGIN_EXTLDFLAGS = "-Wl,--export-dynamic -Wl,--unresolved-symbols=ignore-in-object-files"


class BuildError(Exception):
    def __init__(self, message: str, status: int = EXIT_BUILD_FAILED) -> None:
        super().__init__(message)
        self.status = status


def log(message: str) -> None:
    print("lab build: %s" % message, flush=True)


def go_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GOFLAGS", "-modcacherw")  # the module cache stays removable
    env["GOTOOLCHAIN"] = "local"  # never fetch another toolchain behind the operator's back
    env["CGO_ENABLED"] = "1"
    return env


def go_binary() -> str:
    go = os.environ.get("GO") or shutil.which("go")
    if not go:
        raise BuildError("Go is not installed (the lab builds Kubernetes %s and NVIDIA's device plugin "
                         "from their Go modules and needs Go %s or newer): install Go, or set GO=/path/to/go"
                         % (pins()["KUBERNETES_VERSION"], required_go()), EXIT_NO_GO)
    return go


def go_version(go: str) -> str:
    try:
        out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, env=go_env(),
                             timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError("%s does not run (%s): install Go %s or newer" % (go, exc, required_go()), EXIT_NO_GO)
    return out


def required_go() -> str:
    try:
        with open(os.path.join(CONTROLPLANE_SRC, "go.mod"), encoding="utf-8") as handle:
            match = re.search(r"^go (\S+)$", handle.read(), re.M)
    except OSError:
        match = None
    return match.group(1) if match else "1.26.0"


def _version_tuple(version: str) -> List[int]:
    """[major, minor, patch] of a Go version (1.26.0, go1.26.8, 1.20); a pre-release (go1.26rc1)
    comes before its .0."""
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?(rc|beta)?", version)
    if not match:
        return []
    major, minor, patch, pre = match.groups()
    return [int(major), int(minor), -1 if pre else int(patch or 0)]


def check_go(go: str) -> str:
    version = go_version(go)
    need = required_go()
    if _version_tuple(version.lstrip("go")) < _version_tuple(need):
        raise BuildError("%s is %s; Kubernetes %s needs Go %s or newer (go.mod of lab/controlplane)"
                         % (go, version, pins()["KUBERNETES_VERSION"], need), EXIT_NO_GO)
    return version


def run(argv: Sequence[str], component: str, cwd: Optional[str] = None, env: Optional[Dict[str, str]] = None,
        timeout: float = 3600) -> str:
    started = time.monotonic()
    try:
        proc = subprocess.run(list(argv), cwd=cwd, env=env or go_env(), capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BuildError("%s: `%s` did not finish in %ds" % (component, " ".join(argv[:3]), timeout)) from None
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip().splitlines()
        raise BuildError("%s failed to build (`%s` exited %d after %.0fs); its last lines:\n%s"
                         % (component, " ".join(argv[:4]), proc.returncode, time.monotonic() - started,
                            "\n".join(output[-25:])))
    return proc.stdout


def stamp_of(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def file_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return ""


def up_to_date(output: str, stamp: str) -> bool:
    return os.access(output, os.X_OK) and file_text(output + ".stamp").strip() == stamp


def write_stamp(output: str, stamp: str) -> None:
    with open(output + ".stamp", "w", encoding="utf-8") as handle:
        handle.write(stamp + "\n")


# ---- the control plane ----------------------------------------------------------------------

def controlplane_go_mod(go: str, kubernetes: str, etcd: str) -> str:
    """go.mod for the pinned release: k8s.io/kubernetes, etcd's server, and the release's
    staging modules (k8s.io/kubernetes names them as local paths) at their published version."""
    out = run([go, "mod", "download", "-json", "k8s.io/kubernetes@%s" % kubernetes],
              "k8s.io/kubernetes %s (module download)" % kubernetes, cwd=CONTROLPLANE_SRC)
    info = json.loads(out)
    staging = re.findall(r"^\s*(k8s\.io/[\w.-]+) => \./staging/", file_text(info["GoMod"]), re.M)
    if not staging:
        raise BuildError("k8s.io/kubernetes %s: its go.mod names no staging modules" % kubernetes)
    go_line = re.search(r"^go (\S+)$", file_text(info["GoMod"]), re.M)
    lines = ["module %s" % CONTROLPLANE_MODULE, "", "go %s" % (go_line.group(1) if go_line else "1.26.0"), "",
             "require (", "\tgo.etcd.io/etcd/server/v3 %s" % etcd, "\tk8s.io/kubernetes %s" % kubernetes, ")", "",
             "replace ("]
    lines += ["\t%s => %s %s" % (m, m, staging_version(kubernetes)) for m in sorted(staging)]
    lines.append(")")
    return "\n".join(lines) + "\n"


def pinned_in_go_mod(text: str, module: str) -> Optional[str]:
    match = re.search(r"^\s*%s (v\S+)" % re.escape(module), text, re.M)
    return match.group(1) if match else None


def sync_go_mod(go: str) -> None:
    kubernetes, etcd = pins()["KUBERNETES_VERSION"], pins()["ETCD_VERSION"]
    path = os.path.join(CONTROLPLANE_SRC, "go.mod")
    text = file_text(path)
    if pinned_in_go_mod(text, "k8s.io/kubernetes") == kubernetes and \
            pinned_in_go_mod(text, "go.etcd.io/etcd/server/v3") == etcd:
        return
    log("pins changed: rewriting lab/controlplane/go.mod for Kubernetes %s, etcd %s" % (kubernetes, etcd))
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(controlplane_go_mod(go, kubernetes, etcd))
    run([go, "mod", "tidy"], "lab/controlplane (go mod tidy)", cwd=CONTROLPLANE_SRC)


def version_ldflags(kubernetes: str) -> str:
    major, minor = kubernetes.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += ["-X", "%s.gitVersion=%s" % (package, kubernetes), "-X", "%s.gitMajor=%s" % (package, major),
                  "-X", "%s.gitMinor=%s" % (package, minor), "-X", "%s.gitTreeState=clean" % package]
    return " ".join(flags)


def link_kubectl() -> None:
    """``.build/lab/bin/kubectl``: kube-lab answers as kubectl of the pinned release when called
    by that name (the tests and benchmarks use it, whatever kubectl the machine has)."""
    link = os.path.join(BIN_DIR, "kubectl")
    if os.path.islink(link) and os.readlink(link) == "kube-lab":
        return
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink("kube-lab", link)


def build_controlplane(go: str, version: str, force: bool) -> bool:
    sync_go_mod(go)
    kubernetes = pins()["KUBERNETES_VERSION"]
    sources = "".join(file_text(os.path.join(CONTROLPLANE_SRC, n)) for n in sorted(os.listdir(CONTROLPLANE_SRC)))
    stamp = stamp_of(version, kubernetes, pins()["ETCD_VERSION"], sources)
    if not force and up_to_date(KUBE_LAB, stamp):
        link_kubectl()
        log("kube-lab (Kubernetes %s) is up to date" % kubernetes)
        return False
    log("building kube-lab: etcd %s, kube-apiserver, kube-controller-manager, kube-scheduler %s "
        "(the first build takes about 8 minutes on 2 cores)" % (pins()["ETCD_VERSION"], kubernetes))
    started = time.monotonic()
    os.makedirs(BIN_DIR, exist_ok=True)
    tmp = KUBE_LAB + ".new"
    run([go, "build", "-trimpath", "-ldflags", version_ldflags(kubernetes), "-o", tmp, "."],
        "kube-lab (the Kubernetes %s control plane)" % kubernetes, cwd=CONTROLPLANE_SRC)
    os.replace(tmp, KUBE_LAB)
    link_kubectl()
    write_stamp(KUBE_LAB, stamp)
    log("kube-lab built in %.0fs" % (time.monotonic() - started))
    return True


# ---- NVIDIA's device plugin -----------------------------------------------------------------

def build_device_plugin(go: str, version: str, tag: str, force: bool) -> bool:
    output = device_plugin_binary(tag)
    stamp = stamp_of(version, DEVICE_PLUGIN_MODULE, tag, PLUGIN_EXTLDFLAGS)
    if not force and up_to_date(output, stamp):
        log("nvidia-device-plugin %s is up to date" % tag)
        return False
    log("building NVIDIA's device plugin %s from %s@%s" % (tag, DEVICE_PLUGIN_MODULE, tag))
    started = time.monotonic()
    os.makedirs(os.path.dirname(output), exist_ok=True)
    ldflags = "-s -w '-extldflags=%s' -X %s/internal/info.version=%s" % (PLUGIN_EXTLDFLAGS, DEVICE_PLUGIN_MODULE, tag)
    with tempfile.TemporaryDirectory(prefix="lab-build-") as gobin:
        env = go_env()
        env["GOBIN"] = gobin
        # outside any module: `go install module@version` builds it with its own go.mod
        run([go, "install", "-trimpath", "-ldflags", ldflags, "%s/cmd/nvidia-device-plugin@%s" % (DEVICE_PLUGIN_MODULE, tag)],
            "nvidia-device-plugin %s (%s)" % (tag, DEVICE_PLUGIN_MODULE), cwd=gobin, env=env)
        shutil.move(os.path.join(gobin, "nvidia-device-plugin"), output + ".new")
    os.replace(output + ".new", output)
    write_stamp(output, stamp)
    log("nvidia-device-plugin %s built in %.0fs" % (tag, time.monotonic() - started))
    return True


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m lab.build", description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when the stamps match")
    parser.add_argument("--only", choices=("controlplane", "device-plugin"), help="build one part")
    args = parser.parse_args(argv)
    try:
        go = go_binary()
        version = check_go(go)
        if args.only in (None, "controlplane"):
            build_controlplane(go, version, args.force)
        if args.only in (None, "device-plugin"):
            for tag in device_plugin_versions():
                build_device_plugin(go, version, tag, args.force)
    except BuildError as exc:
        print("lab build: %s" % exc, file=sys.stderr)
        return exc.status
    return 0


if __name__ == "__main__":
    sys.exit(main())
