"""The lab's nvidia-smi stand-in (lab/nvml/nvidia_smi.c) over the lab NVML library.

Both are built from source into a private directory; nvidia-smi finds libnvidia-ml.so.1 through
LD_LIBRARY_PATH like the real tool and shows the node of $GPUNODE_LAB_NVML_STATE.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lab import nvml_state  # noqa: E402

NVML_DIR = ROOT / "lab" / "nvml"
CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror"]


@pytest.fixture(scope="module")
def smi(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path]:
    """(library directory, nvidia-smi path), built like the Makefile's lab-nvml rule."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to build the lab NVML library and nvidia-smi")
    assert gcc is not None
    out = tmp_path_factory.mktemp("lab-nvml-smi")
    lib_dir = out / "lib"
    lib_dir.mkdir()
    sources = sorted(str(p) for p in NVML_DIR.glob("*.c") if p.name != "nvidia_smi.c")
    subprocess.run([gcc, *CFLAGS, "-shared", "-fPIC", "-pthread", "-Wl,-soname,libnvidia-ml.so.1",
                    "-o", str(lib_dir / "libnvidia-ml.so.1"), *sources], check=True)
    binary = out / "nvidia-smi"
    subprocess.run([gcc, *CFLAGS, "-o", str(binary), str(NVML_DIR / "nvidia_smi.c"), "-ldl"], check=True)
    return lib_dir, binary


def run_smi(smi: Tuple[Path, Path], state: Optional[Path], *args: str,
            env_extra: Optional[Dict[str, str]] = None, lib_dir: Optional[Path] = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()
           if key not in ("NVIDIA_VISIBLE_DEVICES", nvml_state.ENV_INIT_ERROR, nvml_state.ENV_STATE_PATH)}
    env["LD_LIBRARY_PATH"] = str(lib_dir if lib_dir is not None else smi[0])
    if state is not None:
        env[nvml_state.ENV_STATE_PATH] = str(state)
    env.update(env_extra or {})
    return subprocess.run([str(smi[1]), *args], env=env, capture_output=True, text=True, timeout=20, check=False)


@pytest.fixture
def node(tmp_path: Path) -> Path:
    path = tmp_path / "nvml.state"
    nvml_state.write_state(str(path), nvml_state.default_node_state("smi-node", gpu_count=4))
    return path


def _state(path: Path) -> nvml_state.State:
    return nvml_state.read_state(str(path))


# ---- -L ---------------------------------------------------------------------------------------

def test_list_gpus(smi: Tuple[Path, Path], node: Path) -> None:
    proc = run_smi(smi, node, "-L")
    gpus = _state(node)["gpus"]
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == "".join("GPU %d: NVIDIA A100-SXM4-80GB (UUID: %s)\n" % (i, g["uuid"]) for i, g in enumerate(gpus))
    assert run_smi(smi, node, "--list-gpus").stdout == proc.stdout


def test_list_gpus_with_mig_devices(smi: Tuple[Path, Path], node: Path) -> None:
    state = nvml_state.configure_mig(str(node), {0: ["3g.40gb", "1g.10gb", "1g.10gb"], 2: ["7g.80gb"], 3: []})
    proc = run_smi(smi, node, "-L")
    gpus = state["gpus"]
    migs = [[d["uuid"] for d in g.get("mig_devices", [])] for g in gpus]
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        "GPU 0: NVIDIA A100-SXM4-80GB (UUID: %s)" % gpus[0]["uuid"],
        "  MIG 3g.40gb     Device  0: (UUID: %s)" % migs[0][0],
        "  MIG 1g.10gb     Device  1: (UUID: %s)" % migs[0][1],
        "  MIG 1g.10gb     Device  2: (UUID: %s)" % migs[0][2],
        "GPU 1: NVIDIA A100-SXM4-80GB (UUID: %s)" % gpus[1]["uuid"],
        "GPU 2: NVIDIA A100-SXM4-80GB (UUID: %s)" % gpus[2]["uuid"],
        "  MIG 7g.80gb     Device  0: (UUID: %s)" % migs[2][0],
        "GPU 3: NVIDIA A100-SXM4-80GB (UUID: %s)" % gpus[3]["uuid"],   # MIG enabled, no MIG devices
    ]
    # a container given one MIG device sees its GPU as GPU 0 and the MIG device as Device 0
    inside = run_smi(smi, node, "-L", env_extra={"NVIDIA_VISIBLE_DEVICES": migs[0][2]})
    assert inside.stdout.splitlines() == [
        "GPU 0: NVIDIA A100-SXM4-80GB (UUID: %s)" % gpus[0]["uuid"],
        "  MIG 1g.10gb     Device  0: (UUID: %s)" % migs[0][2],
    ]


def test_list_gpus_in_a_container(smi: Tuple[Path, Path], node: Path) -> None:
    gpus = _state(node)["gpus"]
    proc = run_smi(smi, node, "-L", env_extra={"NVIDIA_VISIBLE_DEVICES": "%s,1" % gpus[3]["uuid"]})
    assert proc.stdout.splitlines() == ["GPU 0: NVIDIA A100-SXM4-80GB (UUID: %s)" % gpus[1]["uuid"],
                                        "GPU 1: NVIDIA A100-SXM4-80GB (UUID: %s)" % gpus[3]["uuid"]]


# ---- --query-gpu -------------------------------------------------------------------------------

QUERY = "--query-gpu=index,uuid,name,driver_version,memory.total"


def test_query_gpu_csv(smi: Tuple[Path, Path], node: Path) -> None:
    gpus = _state(node)["gpus"]
    rows = ["%d, %s, NVIDIA A100-SXM4-80GB, 550.54.15, 81920 MiB" % (i, g["uuid"]) for i, g in enumerate(gpus)]
    proc = run_smi(smi, node, QUERY, "--format=csv")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines() == ["index, uuid, name, driver_version, memory.total [MiB]"] + rows
    assert run_smi(smi, node, QUERY, "--format=csv,noheader").stdout.splitlines() == rows
    nounits = run_smi(smi, node, QUERY, "--format=csv,noheader,nounits").stdout.splitlines()
    assert nounits == [row[: -len(" MiB")] for row in rows]
    assert run_smi(smi, node, "--query-gpu", "index,uuid", "--format", "csv,noheader").stdout.splitlines() == [
        "%d, %s" % (i, g["uuid"]) for i, g in enumerate(gpus)]


def test_query_gpu_more_fields(smi: Tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "nvml.state"
    state = nvml_state.default_node_state("v", gpu_count=2, model="V100")
    state["gpus"][1]["memory_used"] = state["gpus"][1]["memory_reserved"] + 1000 * 1024 * 1024
    state["gpus"][1]["memory_free"] = state["gpus"][1]["memory_total"] - state["gpus"][1]["memory_used"]
    state["gpus"][1]["persistence_mode"] = 0
    nvml_state.write_state(str(path), state)
    proc = run_smi(smi, path, "--query-gpu=count,pci.bus_id,serial,persistence_mode,mig.mode.current,"
                   "temperature.gpu,power.draw,power.limit,memory.used,memory.free", "--format=csv")
    g0, g1 = state["gpus"]
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        "count, pci.bus_id, serial, persistence_mode, mig.mode.current, temperature.gpu, power.draw [W], "
        "power.limit [W], memory.used [MiB], memory.free [MiB]",
        "2, 00000000:07:00.0, %s, Enabled, [N/A], 35, 43.00 W, 300.00 W, 0 MiB, 32510 MiB" % g0["serial"],
        "2, 00000000:0F:00.0, %s, Disabled, [N/A], 35, 43.00 W, 300.00 W, 1000 MiB, 31510 MiB" % g1["serial"],
    ]


def test_query_gpu_bad_arguments(smi: Tuple[Path, Path], node: Path) -> None:
    bad = run_smi(smi, node, "--query-gpu=index,fan.speedy", "--format=csv")
    assert (bad.returncode, bad.stdout) == (2, 'Field "fan.speedy" is not a valid field to query.\n\n')
    assert run_smi(smi, node, QUERY).returncode == 2            # no --format
    assert run_smi(smi, node, "--bogus").returncode == 2


# ---- the summary table ------------------------------------------------------------------------

def test_summary_table(smi: Tuple[Path, Path], node: Path) -> None:
    nvml_state.configure_mig(str(node), {1: ["4g.40gb", "2g.20gb", "1g.10gb"]})
    proc = run_smi(smi, node)
    lines = proc.stdout.splitlines()
    assert (proc.returncode, proc.stderr) == (0, "")
    table = [line for line in lines[1:] if line.strip()]
    assert {len(line) for line in table} == {91}
    assert lines[2] == "| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |"
    assert lines[8:11] == [
        "|   0  NVIDIA A100-SXM4-80GB          On  |   00000000:07:00.0 Off |                    0 |",
        "| N/A   31C    P0             62W /  400W |       0MiB /  81920MiB |      0%      Default |",
        "|                                         |                        |             Disabled |",
    ]
    assert lines[12:15] == [
        "|   1  NVIDIA A100-SXM4-80GB          On  |   00000000:0F:00.0 Off |                   On |",
        "| N/A   31C    P0             62W /  400W |       0MiB /  81920MiB |     N/A      Default |",
        "|                                         |                        |              Enabled |",
    ]
    mig_rows = [line for line in lines if line.startswith("|  1 ")]
    assert mig_rows == [
        "|  1    1   0   0  |               0MiB / 40192MiB    | 56      0 |  4   0    2    0    0 |",
        "|  1    5   0   1  |               0MiB / 19968MiB    | 28      0 |  2   0    1    0    0 |",
        "|  1   13   0   2  |               0MiB / 9728MiB     | 14      0 |  1   0    0    0    0 |",
    ]
    assert "|  No running processes found                                                             |" in lines


# ---- failures: messages and exit codes of the real tool -----------------------------------------

DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the "
          "latest NVIDIA driver is installed and running.\n\n")
NO_LIBRARY = ("NVIDIA-SMI couldn't find libnvidia-ml.so library in your system. Please make sure that the NVIDIA "
              "Display Driver is properly installed and present in your system.\nPlease also try adding directory "
              "that contains libnvidia-ml.so to your system PATH.\n")


@pytest.mark.parametrize("args", [(), ("-L",), (QUERY, "--format=csv")])
@pytest.mark.parametrize(
    ("fault", "stdout", "code"),
    [
        ("driver_not_loaded", DRIVER, 9),
        ("driver_library_mismatch", "Failed to initialize NVML: Driver/library version mismatch\n"
                                    "NVML library version: 550.54\n", 18),
        ("no_permission", "Failed to initialize NVML: Insufficient Permissions\n", 4),
        ("library_missing", NO_LIBRARY, 12),
    ],
)
def test_init_failures(smi: Tuple[Path, Path], node: Path, args: tuple, fault: str, stdout: str, code: int) -> None:
    nvml_state.apply_fault(str(node), fault)
    proc = run_smi(smi, node, *args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (code, stdout, "")


def test_no_library_no_state_and_broken_injection(smi: Tuple[Path, Path], node: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty-lib-dir"
    empty.mkdir()
    no_lib = run_smi(smi, node, "-L", lib_dir=empty)
    assert (no_lib.returncode, no_lib.stdout) == (12, NO_LIBRARY)
    no_state = run_smi(smi, tmp_path / "missing.state", "-L")
    assert (no_state.returncode, no_state.stdout) == (12, NO_LIBRARY)
    broken = run_smi(smi, node, env_extra={nvml_state.ENV_INIT_ERROR: "999"})
    assert (broken.returncode, broken.stdout) == (255, "Failed to initialize NVML: Unknown Error\n")


@pytest.mark.parametrize("visible", ["none", "void", ""])
def test_no_devices(smi: Tuple[Path, Path], node: Path, visible: str) -> None:
    for args in ((), ("-L",), (QUERY, "--format=csv")):
        proc = run_smi(smi, node, *args, env_extra={"NVIDIA_VISIBLE_DEVICES": visible})
        assert (proc.returncode, proc.stdout) == (6, "No devices were found\n")


def test_node_without_gpus(smi: Tuple[Path, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.state"
    nvml_state.write_state(str(empty), nvml_state.default_node_state("empty", gpu_count=0))
    proc = run_smi(smi, empty, "-L")
    assert (proc.returncode, proc.stdout) == (6, "No devices were found\n")


def test_lost_gpu(smi: Tuple[Path, Path], node: Path) -> None:
    gpus = nvml_state.apply_fault(str(node), "gpu_lost", gpu=1)["gpus"]
    message = ("Unable to determine the device handle for GPU0000:0F:00.0: GPU is lost.  "
               "Reboot the system to recover this GPU\n")
    listed = run_smi(smi, node, "-L")
    assert (listed.returncode, listed.stderr) == (15, message)
    assert listed.stdout.splitlines() == ["GPU %d: NVIDIA A100-SXM4-80GB (UUID: %s)" % (i, gpus[i]["uuid"])
                                          for i in (0, 2, 3)]
    query = run_smi(smi, node, "--query-gpu=index", "--format=csv,noheader")
    assert (query.returncode, query.stdout, query.stderr) == (15, "0\n2\n3\n", message)
    table = run_smi(smi, node)
    assert (table.returncode, table.stderr) == (15, message)
    assert "00000000:0F:00.0" not in table.stdout and "00000000:47:00.0" in table.stdout
