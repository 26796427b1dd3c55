"""Start one container process of a simulated node: ``python -S sandbox.py SPEC.json``.

The lab has no container runtime; this is the part of one it needs. In a mount namespace of its
own (``unshare(CLONE_NEWNS)``, every mount private), it mounts a tmpfs as the container's root
filesystem, binds into it what the spec lists (the host's userland read-only in place of the
image's, the image's own binaries, the pod's volumes, and what the nvidia runtime would inject),
chroots into it and execs the container's command with the container's environment. Nothing is
written outside the tmpfs; the mounts vanish with the process.

A read-only host directory that a later mount lands in (a ConfigMap volume at
``/etc/nvidia-device-plugin``) becomes an overlay whose upper layer is a private tmpfs, as a
container runtime's writable layer: the host's directory is never written.

Spec (JSON): ``{"parent": the lab's pid, "rootfs": dir, "mounts": [{"source", "target", "readonly", "file"}],
"symlinks": [[target, link]], "argv": [...], "env": {...}, "cwd": "/"}``.

A command that cannot be executed exits 128 with the runtime's message on stderr, as a failed
``StartContainer`` (reason StartError) on a real node.

Standard library only, run with ``-S``: it starts for every container start.
"""
import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

EXIT_START_ERROR = 128
PR_SET_PDEATHSIG = 1
SIGKILL = 9

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _enc(value):
    return None if value is None else value.encode()


def mount(source, target, fstype, flags, data=None):
    if _libc.mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, "mount %s on %s: %s" % (source, target, os.strerror(errno)))


def fail(message):
    sys.stderr.write("lab runtime: %s\n" % message)
    sys.stderr.flush()
    os._exit(EXIT_START_ERROR)


def prepare(spec):
    if _libc.unshare(CLONE_NEWNS) != 0:
        errno = ctypes.get_errno()
        fail("unshare(CLONE_NEWNS): %s (the lab's containers need root)" % os.strerror(errno))
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    rootfs = spec["rootfs"]
    scratch = rootfs + ".overlay"
    os.makedirs(rootfs, exist_ok=True)
    os.makedirs(scratch, exist_ok=True)
    mount("lab-rootfs", rootfs, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    mounts = spec.get("mounts", [])
    targets = [m["target"].rstrip("/") for m in mounts]
    for number, entry in enumerate(mounts):
        target = os.path.join(rootfs, entry["target"].lstrip("/"))
        below = [t for t in targets[number + 1:] if t.startswith(entry["target"].rstrip("/") + "/")]
        if entry.get("readonly") and below and not entry.get("file"):
            # a later mount lands inside this read-only host directory: give the container a
            # writable overlay of it (upper layer in a private tmpfs), the host stays untouched
            layer = os.path.join(scratch, str(number))
            os.makedirs(layer, exist_ok=True)
            mount("lab-overlay", layer, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
            os.makedirs(os.path.join(layer, "upper"))
            os.makedirs(os.path.join(layer, "work"))
            os.makedirs(target, exist_ok=True)
            mount("overlay", target, "overlay", 0, "lowerdir=%s,upperdir=%s,workdir=%s"
                  % (entry["source"], os.path.join(layer, "upper"), os.path.join(layer, "work")))
            continue
        if entry.get("file"):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                open(target, "a").close()
        else:
            os.makedirs(target, exist_ok=True)
        mount(entry["source"], target, None, MS_BIND | MS_REC)
        if entry.get("readonly"):
            mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    for link_target, link in spec.get("symlinks", []):
        path = os.path.join(rootfs, link.lstrip("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(link_target, path)
    for directory in spec.get("dirs", []):
        os.makedirs(os.path.join(rootfs, directory.lstrip("/")), mode=0o1777, exist_ok=True)
    os.chroot(rootfs)
    os.chdir(spec.get("cwd") or "/")


def find_executable(name, env):
    """$PATH lookup as the runtime does it, by hand: after the chroot the host's Python library
    (which os.execvpe would import from) is out of reach."""
    if "/" in name:
        return name
    for directory in env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def main():
    with open(sys.argv[1], encoding="utf-8") as handle:
        spec = json.load(handle)
    # the container dies with the lab (PR_SET_PDEATHSIG, SIGKILL), also when it went already
    _libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
    if spec.get("parent") and os.getppid() != spec["parent"]:
        os._exit(EXIT_START_ERROR)
    try:
        prepare(spec)
    except OSError as exc:
        fail(str(exc))
    argv = spec["argv"]
    env = spec.get("env", {})
    executable = find_executable(argv[0], env)
    try:
        if executable is None:
            raise OSError("not found")
        os.execve(executable, argv, env)
    except OSError:
        fail('failed to create containerd task: failed to create shim task: OCI runtime create failed: '
             'runc create failed: unable to start container process: exec: "%s": executable file not found '
             'in $PATH: unknown' % argv[0])


if __name__ == "__main__":
    main()
