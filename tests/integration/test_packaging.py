"""The package as a user installs it: an sdist and a wheel built from a copy of the source
tree (the wheel from the sdist, so the sdist must be complete), the wheel installed into a
fresh venv (`pipx install` does the same), and diversityctl run from there.

Dependencies come through pip's ordinary index (PyPI, or the pip cache)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEMPLATES = (
    "diversityd.service.in",
    "gateway.socket.in",
    "gateway@.service.in",
    "llama-server.service.in",
    "llama-cpp-python.service.in",
    "ollama.service.in",
    "vllm.service.in",
)


def source_copy(target: Path) -> Path:
    """The files git would ship (tracked, and new ones not ignored), links kept as links:
    building never writes into the work tree (egg-info, build/)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=False,
        timeout=60,
    )
    if listed.returncode != 0:  # not a git checkout: copy what is not generated
        ignore = shutil.ignore_patterns(".venv", "*.egg-info", "__pycache__", ".*_cache", "dist")
        shutil.copytree(REPO_ROOT, target, symlinks=True, ignore=ignore)
        return target
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO_ROOT / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            destination.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, destination)
    return target


def run(*args: str | Path, timeout: float = 600, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )
    output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{args}:\n{output}"
    return result.stdout


def test_wheel_and_sdist_install_and_run_from_a_fresh_venv(tmp_path: Path) -> None:
    source = source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, source)
    (sdist,) = dist.glob("diversityd-*.tar.gz")
    (wheel,) = dist.glob("diversityd-*.whl")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    for template in TEMPLATES:
        assert any(n.endswith(f"units/{template}") for n in names), template
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    for template in TEMPLATES:
        assert f"diversityd/data/units/{template}" in names, template
    assert "diversityd/adapters/gatewaylauncher.py" in names

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel)
    ctl = venv / "bin" / "diversityctl"
    help_text = run(ctl, "--help", cwd=tmp_path)
    for command in ("install", "uninstall", "env", "completion", "validate"):
        assert command in help_text
    verdict = run(ctl, "validate", "--config-dir", REPO_ROOT / "config", cwd=tmp_path)
    assert verdict.splitlines()[-1].startswith("ok:")
    assert "_DIVERSITYCTL_COMPLETE" in run(ctl, "completion", "zsh", cwd=tmp_path)
    # It runs from the venv, not from this work tree.
    where = run(venv / "bin" / "python", "-c", "import diversityd; print(diversityd.__file__)")
    assert where.startswith(str(venv))
