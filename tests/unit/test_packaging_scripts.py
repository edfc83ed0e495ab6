"""The demo installs what the demo needs (issue 20, point 9): Prometheus is the test
suite's alone (and the lab's Redis and network tools the lab's), and the set-up prints a
line per step, the package managers' output going to a log file. The real scripts, run
with stand-ins for apt-get, dpkg-query and the build steps (nothing is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGING = REPO_ROOT / "packaging"
NOISE = "Reading package lists... Done (apt noise)"


def fake(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def bare_path(tmp_path: Path) -> Path:
    """A PATH where none of the packages' commands is found, dpkg knows none of them,
    and apt-get only talks (and notes what it was asked)."""
    bin_dir = tmp_path / "bin"
    fake(bin_dir, "dpkg-query", "exit 1\n")
    fake(
        bin_dir,
        "apt-get",
        f'echo "$*" >> "{tmp_path}/apt-calls"\nfor i in 1 2 3; do echo "{NOISE}"; done\n',
    )
    for tool in ("id", "date", "tail", "cat", "env"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return bin_dir


def run(
    script: Path, *args: str, path: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [shutil.which("bash") or "/bin/bash", str(script), *args],
        env={"PATH": path, "HOME": str(cwd or REPO_ROOT), "LANG": "C.UTF-8"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("purpose", "wanted", "unwanted"),
    [
        ("demo", {"systemd", "dbus", "cmake"}, {"prometheus", "iproute2", "redis-tools"}),
        ("lab", {"iproute2", "redis-tools"}, {"prometheus"}),
        ("test", {"prometheus", "iproute2", "redis-tools", "cmake"}, set()),
    ],
)
def test_each_purpose_asks_for_its_own_packages(
    tmp_path: Path, purpose: str, wanted: set[str], unwanted: set[str]
) -> None:
    bin_dir = bare_path(tmp_path)
    result = run(PACKAGING / "install-system-deps.sh", "--for", purpose, "--check",
                 path=str(bin_dir))  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    missing = set(result.stdout.split("missing:", 1)[1].split())
    assert wanted <= missing
    assert not unwanted & missing


def test_apt_gets_output_goes_to_the_log(tmp_path: Path) -> None:
    bin_dir = bare_path(tmp_path)
    log = tmp_path / "setup.log"
    if os.getuid() != 0:
        pytest.skip("the script asks for sudo when not root")
    result = run(PACKAGING / "install-system-deps.sh", "--for", "demo", "--log", str(log),
                 path=str(bin_dir))  # fmt: skip
    # the stand-in apt-get installs nothing: still missing afterwards, said in one line
    assert result.returncode == 1
    assert NOISE not in result.stdout + result.stderr
    assert NOISE in log.read_text()
    calls = (tmp_path / "apt-calls").read_text()
    assert "prometheus" not in calls
    assert "update" in calls


def packaging_copy(tmp_path: Path, *scripts: str) -> Path:
    """The scripts named, beside stand-ins for the rest, in a root of the test's."""
    folder = tmp_path / "root" / "packaging"
    folder.mkdir(parents=True)
    for name in ("versions.sh", *scripts):
        shutil.copy(PACKAGING / name, folder / name)
    return folder


def test_setup_prints_a_line_per_step_and_logs_the_rest(tmp_path: Path) -> None:
    folder = packaging_copy(tmp_path, "setup.sh")
    calls = tmp_path / "calls"
    for name, said in (
        ("install-system-deps.sh", "install-system-deps: done in 9 s"),
        ("bootstrap.sh", "bootstrap: venv ready"),
        ("build-llama-server.sh", "llama-server 1: cached"),
        ("install-llama-cpp-python.sh", "llama-cpp-python 1: cached"),
        ("install-litellm.sh", "litellm 1: cached"),
    ):
        fake(
            folder,
            name,
            f'echo "{name} $*" >> "{calls}"\nfor i in 1 2 3; do echo "{NOISE}"; done\n'
            f'echo "{said}"\n',
        )
    log = tmp_path / "setup.log"
    env_path = os.environ["PATH"]
    result = subprocess.run(
        ["bash", str(folder / "setup.sh"), "--for", "demo"],
        env={"PATH": env_path, "HOME": str(tmp_path), "DIVERSITYD_SETUP_LOG": str(log),
             "DIVERSITYD_CACHE_DIR": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 6  # a line per step, and where the log is
    assert lines[0] == (
        "setup: system packages for the demo ... install-system-deps: done in 9 s (0 s)"
    )
    assert "llama-server 1: cached" in lines[2]
    assert str(log) in lines[-1]
    assert NOISE not in result.stdout + result.stderr
    assert NOISE in log.read_text()
    assert f"install-system-deps.sh --for demo --log {log}" in calls.read_text()


def test_a_failed_step_shows_the_end_of_the_log(tmp_path: Path) -> None:
    folder = packaging_copy(tmp_path, "setup.sh")
    fake(folder, "install-system-deps.sh", 'echo "E: Unable to locate package nothing"\nexit 100\n')
    log = tmp_path / "setup.log"
    result = subprocess.run(
        ["bash", str(folder / "setup.sh")],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path),
             "DIVERSITYD_SETUP_LOG": str(log)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "FAILED" in result.stdout
    assert "Unable to locate package" in result.stderr


@pytest.mark.parametrize(
    ("script", "args", "purpose"),
    [
        ("demo.sh", (), "demo"),
        ("demo.sh", ("--stay",), "demo"),
        ("demo.sh", ("--hosts", "2"), "lab"),
        ("test.sh", ("-q",), "test"),
    ],
)
def test_the_demo_installs_what_the_demo_needs(
    tmp_path: Path, script: str, args: tuple[str, ...], purpose: str
) -> None:
    folder = packaging_copy(tmp_path, script)
    seen = tmp_path / "setup-args"
    fake(folder, "setup.sh", f'echo "$*" > "{seen}"\n')
    fake(folder.parent / ".venv" / "bin", "python", "exit 0\n")
    result = run(folder / script, *args, path=os.environ["PATH"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert seen.read_text().split() == ["--for", purpose]
