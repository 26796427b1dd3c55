"""Offline stand-in for ansible-test's cached get-pip script (get_pip_24_2.py).

ansible-test bootstraps pip in each venv it creates by running the cached get-pip script
with pip's install arguments (e.g. ``pip==24.2 --no-setuptools --no-wheel``); the real script
is downloaded from a host this environment cannot reach. This stand-in gets pip from the
interpreter's bundled ensurepip, then installs the requested pip from the package index the
machine's pip configuration names. Both run as subprocesses so that pip keeps that
configuration (ensurepip in-process sets PIP_CONFIG_FILE=/dev/null).
"""
import subprocess
import sys

GET_PIP_ONLY = {"--no-setuptools", "--no-wheel"}


def main() -> int:
    args = [a for a in sys.argv[1:] if a not in GET_PIP_ONLY]
    subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade"])
    if args:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args])
    return 0


if __name__ == "__main__":
    sys.exit(main())
