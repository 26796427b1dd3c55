#!/usr/bin/env python
"""Run every test stage of `make test` and end with one summary line of counts.

Stages (in order): stubs-check (generated gRPC stubs vs a fresh regeneration), sanity
(ansible-test sanity, offline tests), lint (ansible-lint, production profile), units
(ansible-test units), pytest (contract, lab, integration and fault suites). A stage that
collects no test counts as failed: an empty run must not pass silently.

Usage: tests/run_all.py [--only STAGE]
"""
from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / ".build"
VENV_BIN = Path(sys.executable).parent
# ansible-test needs the collection at a real path ending in ansible_collections/NS/NAME.
TEST_COPY = BUILD / "ansible-test" / "ansible_collections" / "gpunode" / "bringup"
# ansible-test keeps its cache (get-pip, sanity venvs) under $HOME/.ansible/test.
TEST_HOME = BUILD / "ansible-test-home"
NODE_PYTHONS = ["3.9", "3.10"]
PYTEST_SUITES = ["tests/contract", "tests/lab", "tests/integration", "tests/faults"]


@dataclass
class Stage:
    name: str
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.passed > 0


def run(cmd: List[str], cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command, streaming its output as it comes and keeping it for the stage's counts."""
    print("+ " + " ".join(cmd), flush=True)
    lines: List[str] = []
    with subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines), None)


def tracked_files() -> List[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         check=True, stdout=subprocess.PIPE).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).exists()]


def make_test_copy() -> None:
    if TEST_COPY.exists():
        output = TEST_COPY / "tests" / "output"
        keep = BUILD / "ansible-test-output"
        if output.exists():
            shutil.rmtree(keep, ignore_errors=True)
            output.rename(keep)
        shutil.rmtree(TEST_COPY)
    for rel in tracked_files():
        dest = TEST_COPY / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / rel).is_symlink():
            os.symlink(os.readlink(ROOT / rel), dest)
        else:
            shutil.copy2(ROOT / rel, dest)
    keep = BUILD / "ansible-test-output"
    if keep.exists():
        (TEST_COPY / "tests").mkdir(exist_ok=True)
        keep.rename(TEST_COPY / "tests" / "output")
    # ansible-test scans a git work tree by `git ls-files`; give the copy its own repository
    subprocess.run(["git", "init", "-q"], cwd=TEST_COPY, check=True)
    subprocess.run(["git", "add", "-A"], cwd=TEST_COPY, check=True)


def ansible_test_env() -> dict:
    env = dict(os.environ)
    cache = TEST_HOME / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "tests" / "ansible_test" / "get_pip_24_2.py", cache / "get_pip_24_2.py")
    env["HOME"] = str(TEST_HOME)
    env["PATH"] = str(VENV_BIN) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)
    return env


def find_python(version: str) -> Path | None:
    """A working python<version>: pyenv's installed versions first (their shims may not be
    active), then PATH."""
    candidates = sorted(Path(os.path.expanduser("~/.pyenv/versions")).glob(version + ".*/bin/python" + version))
    found = shutil.which("python" + version)
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        ok = subprocess.run([str(candidate), "-c", "import sys"], capture_output=True, check=False).returncode == 0
        if ok:
            return candidate
    return None


def junit_counts(paths: List[Path], stage: Stage) -> None:
    for path in paths:
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for suite in suites:
            tests = int(suite.get("tests", 0))
            failures = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            skipped = int(suite.get("skipped", 0))
            stage.passed += tests - failures - skipped
            stage.failed += failures
            stage.skipped += skipped


def stage_stubs_check(stage: Stage) -> None:
    proc = run([sys.executable, "plugin_src/generate", "--check"])
    if proc.returncode == 0:
        stage.passed = 1
    else:
        stage.failed = 1
        stage.notes.append("committed stubs differ from plugin_src: run plugin_src/generate")


def stage_sanity(stage: Stage) -> None:
    make_test_copy()
    env = ansible_test_env()
    proc = run(["ansible-test", "sanity", "--python", "3.11", "--color", "no"], cwd=TEST_COPY, env=env)
    failed = re.search(r"The (\d+) sanity test\(s\) listed below \(out of (\d+)\) failed", proc.stdout)
    ran = len(re.findall(r"^Running sanity test [\"']", proc.stdout, re.M))
    skipped = len(re.findall(r"^WARNING: Skipping sanity test [\"']", proc.stdout, re.M))
    if failed:
        stage.failed = int(failed.group(1))
        stage.passed = int(failed.group(2)) - stage.failed
    elif proc.returncode == 0:
        stage.passed = ran
    else:
        stage.failed = max(1, ran)
        stage.notes.append("ansible-test sanity exited %d" % proc.returncode)
    stage.skipped = skipped
    # Node-side modules run on the node's Python (RHEL 9: 3.9, Ubuntu 22.04: 3.10): compile and
    # import everything again on those versions when this machine has them.
    for version in NODE_PYTHONS:
        interpreter = find_python(version)
        if not interpreter:
            stage.skipped += 2
            stage.notes.append("python%s not found: compile/import on %s skipped" % (version, version))
            continue
        env_v = dict(env)
        env_v["PATH"] = str(interpreter.parent) + os.pathsep + env["PATH"]
        proc = run(["ansible-test", "sanity", "--test", "compile", "--test", "import", "--python", version,
                    "--color", "no"], cwd=TEST_COPY, env=env_v)
        failed_v = re.search(r"The (\d+) sanity test\(s\) listed below \(out of (\d+)\) failed", proc.stdout)
        if failed_v:
            stage.failed += int(failed_v.group(1))
            stage.passed += 2 - int(failed_v.group(1))
        elif proc.returncode == 0:
            stage.passed += 2
        else:
            stage.failed += 2


def stage_lint(stage: Stage) -> None:
    env = dict(os.environ)
    env["PATH"] = str(VENV_BIN) + os.pathsep + env.get("PATH", "")
    proc = run(["ansible-lint", "--offline", "--profile", "production", "--nocolor"], env=env)
    files = re.search(r"(?:on|in) (\d+) files", proc.stdout)
    failures = re.search(r"(\d+) failure\(s\), (\d+) warning\(s\)", proc.stdout)
    checked = int(files.group(1)) if files else 0
    if proc.returncode == 0 and checked:
        stage.passed = checked
    else:
        stage.failed = int(failures.group(1)) + int(failures.group(2)) if failures else 1
        stage.passed = max(0, checked - stage.failed)


def stage_docs(stage: Stage) -> None:
    """antsibull-docs lint-collection-docs: every plugin's and role's documentation parses and its
    references (O(), M(), P()) resolve, as the docsite build would see them."""
    env = dict(os.environ)
    env["PATH"] = str(VENV_BIN) + os.pathsep + env.get("PATH", "")
    env["ANSIBLE_COLLECTIONS_PATH"] = str(BUILD)
    collection = BUILD / "ansible_collections" / "gpunode" / "bringup"
    proc = run(["antsibull-docs", "lint-collection-docs", "--plugin-docs", "."], cwd=collection, env=env)
    problems = [line for line in proc.stdout.splitlines() if re.match(r"^\S+:\d+:\d+: ", line)]
    if proc.returncode == 0 and not problems:
        stage.passed = 1
    else:
        stage.failed = max(1, len(problems))


def stage_units(stage: Stage) -> None:
    make_test_copy()
    env = ansible_test_env()
    junit_dir = TEST_COPY / "tests" / "output" / "junit"
    shutil.rmtree(junit_dir, ignore_errors=True)
    proc = run(["ansible-test", "units", "--python", "3.11", "--color", "no", "--num-workers", "2"],
               cwd=TEST_COPY, env=env)
    junit_counts(sorted(junit_dir.glob("*.xml")), stage)
    if proc.returncode != 0 and stage.failed == 0:
        stage.failed = 1
        stage.notes.append("ansible-test units exited %d" % proc.returncode)


def stage_pytest(stage: Stage) -> None:
    suites = [s for s in PYTEST_SUITES if (ROOT / s).is_dir()]
    report = BUILD / "pytest-junit.xml"
    report.unlink(missing_ok=True)
    proc = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(report), *suites])
    if report.exists():
        junit_counts([report], stage)
    if proc.returncode not in (0,) and stage.failed == 0:
        stage.failed = 1
        stage.notes.append("pytest exited %d" % proc.returncode)


STAGES = {
    "stubs-check": stage_stubs_check,
    "sanity": stage_sanity,
    "lint": stage_lint,
    "docs": stage_docs,
    "units": stage_units,
    "pytest": stage_pytest,
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=sorted(STAGES), action="append")
    args = parser.parse_args()
    results: List[Stage] = []
    for name, fn in STAGES.items():
        if args.only and name not in args.only:
            continue
        stage = Stage(name)
        start = time.monotonic()
        print("\n===== %s =====" % name, flush=True)
        if name in ("sanity", "units"):
            # one ansible-test run at a time per checkout: they share the copy and the cache
            BUILD.mkdir(exist_ok=True)
            with open(BUILD / "ansible-test.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                fn(stage)
        else:
            fn(stage)
        stage.seconds = time.monotonic() - start
        if stage.passed == 0 and stage.failed == 0:
            stage.failed = 1
            stage.notes.append("no test ran")
        results.append(stage)
    print("\n===== summary =====")
    for s in results:
        print("%-12s %4d passed, %d failed, %d skipped  (%.0fs)%s" % (
            s.name + ":", s.passed, s.failed, s.skipped, s.seconds,
            "  " + "; ".join(s.notes) if s.notes else ""))
    passed = sum(s.passed for s in results)
    failed = sum(s.failed for s in results)
    skipped = sum(s.skipped for s in results)
    print("total: %d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 0 if all(s.ok for s in results) else 1


if __name__ == "__main__":
    sys.exit(main())
