"""Fixtures shared by unit and integration tests.

Integration tests need real parts (llama-server, llama-cpp-python, LiteLLM, a private
systemd --user manager). Where a part is missing a test skips with the reason, except under
CI (CI=true), where a skip would hide a missing install step: there it fails.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

from diversityd import parts

REPO_ROOT = Path(__file__).resolve().parent.parent


def unavailable(reason: str) -> NoReturn:
    """Skip (with the reason) on a developer machine; fail under CI."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"under CI every integration part must be present: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    binary = parts.llama_server_binary()
    if not binary.exists():
        unavailable(f"{binary} missing: run packaging/build-llama-server.sh")
    return binary


@pytest.fixture(scope="session")
def llama_cpp_python_interpreter() -> Path:
    python = parts.llama_cpp_python_interpreter()
    if not python.exists():
        unavailable(f"{python} missing: run packaging/install-llama-cpp-python.sh")
    return python


@pytest.fixture(scope="session")
def litellm_python() -> Path:
    python = parts.litellm_interpreter()
    if not python.exists():
        unavailable(f"{python} missing: run packaging/install-litellm.sh")
    return python
