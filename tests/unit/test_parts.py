"""parts.py and packaging/versions.sh pin the same versions and the same cache layout."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from diversityd import parts
from tests.conftest import REPO_ROOT


def versions_sh(expression: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        ["bash", "-c", f'. "{REPO_ROOT}/packaging/versions.sh"; printf %s "{expression}"'],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return result.stdout


def test_versions_agree() -> None:
    env = {"HOME": "/nonexistent", "PATH": "/usr/bin:/bin"}
    assert versions_sh("$LLAMA_CPP_PYTHON_VERSION", env) == parts.LLAMA_CPP_PYTHON_VERSION
    assert versions_sh("$LITELLM_VERSION", env) == parts.LITELLM_VERSION


def test_paths_agree(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for variables in (
        {"XDG_CACHE_HOME": str(tmp_path / "xdg")},
        {"DIVERSITYD_CACHE_DIR": str(tmp_path / "pin")},
    ):
        monkeypatch.delenv("DIVERSITYD_CACHE_DIR", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        for key, value in variables.items():
            monkeypatch.setenv(key, value)
        env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", **variables}
        assert versions_sh("$LLAMA_BIN_DIR", env) == str(parts.llama_bin_dir())
        assert versions_sh("$LLAMA_CPP_PYTHON_VENV", env) == str(parts.llama_cpp_python_venv())
        assert versions_sh("$LITELLM_VENV", env) == str(parts.litellm_venv())
