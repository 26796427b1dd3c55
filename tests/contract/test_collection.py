"""The collection as users get it: the built tarball and the rendered module docs."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODULES = sorted(p.stem for p in (ROOT / "plugins" / "modules").glob("*.py") if p.stem != "__init__")


def ansible_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
        "ANSIBLE_COLLECTIONS_PATH": str(ROOT / ".build"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
        "PATH": "%s:%s" % (BIN, env.get("PATH", "")),
    })
    return env


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", "--force", "--output-path", str(out),
                           str(ROOT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("gpunode-bringup-*.tar.gz")
    return path


def test_tarball_ships_the_collection_without_lab_tests_or_bench(tarball):
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
    tops = {n.split("/", 1)[0] for n in names}
    assert {"plugins", "meta", "MANIFEST.json", "FILES.json", "README.md", "LICENSE"} <= tops
    assert not tops & {"lab", "tests", "bench", ".venv", ".build", ".ci", "Makefile"}
    assert "plugins/module_utils/_kubelet_api/deviceplugin_v1beta1.py" in names


def test_tarball_installs(tarball, tmp_path):
    dest = tmp_path / "collections"
    proc = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "install", "--offline", "--force", "-p", str(dest),
                           str(tarball)], capture_output=True, text=True, env=ansible_env(tmp_path), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (dest / "ansible_collections" / "gpunode" / "bringup" / "meta" / "runtime.yml").is_file()


@pytest.mark.skipif(not MODULES, reason="no module in plugins/modules yet")
@pytest.mark.parametrize("module", MODULES)
def test_module_docs_render(module, tmp_path):
    proc = subprocess.run([str(BIN / "ansible-doc"), "-t", "module", "gpunode.bringup.%s" % module],
                          capture_output=True, text=True, env=ansible_env(tmp_path), check=False)
    assert proc.returncode == 0, proc.stderr
    assert "gpunode.bringup.%s" % module in proc.stdout
    assert "EXAMPLES" in proc.stdout and "RETURN VALUES" in proc.stdout


@pytest.mark.parametrize("playbook", ["gpu_node_bringup", "gpu_node_verify", "gpu_node_remediate"])
def test_playbooks_run_by_their_collection_name(playbook, tmp_path):
    inventory = tmp_path / "inventory.ini"
    inventory.write_text("[gpu_nodes]\ngpu-01 ansible_connection=local\n")
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), "gpunode.bringup.%s" % playbook,
                           "--syntax-check"], capture_output=True, text=True, env=ansible_env(tmp_path), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "playbook: " in proc.stdout and "%s.yml" % playbook in proc.stdout
