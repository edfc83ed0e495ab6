"""Where the stack's parts live once packaging/ has installed or built them.

The versions are pinned in packaging/versions.sh (the scripts' source of truth); a unit test
keeps this module in step with it. Everything sits under one cache root,
`$XDG_CACHE_HOME/diversityd/`, keyed by version, outside any work tree.
"""

from __future__ import annotations

import os
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LITELLM_VERSION = "1.106.2"


def xdg_dir(variable: str, fallback: str) -> Path:
    """An XDG base directory: `$variable`, else `~/fallback`."""
    return Path(os.environ.get(variable) or str(Path.home() / fallback))


def cache_root() -> Path:
    """`$DIVERSITYD_CACHE_DIR`, else `$XDG_CACHE_HOME/diversityd` (units pin the former, so
    a daemon whose XDG world is private still finds the parts it was installed with)."""
    pinned = os.environ.get("DIVERSITYD_CACHE_DIR")
    if pinned:
        return Path(pinned)
    return xdg_dir("XDG_CACHE_HOME", ".cache") / "diversityd"


def default_config_dir() -> Path:
    return xdg_dir("XDG_CONFIG_HOME", ".config") / "diversityd"


def default_state_dir() -> Path:
    return xdg_dir("XDG_STATE_HOME", ".local/state") / "diversityd"


def state_dir(configured: str | None) -> Path:
    """diversityd.yaml's `state_dir` (with ~), else the default."""
    return Path(os.path.expanduser(configured)) if configured else default_state_dir()


def default_unit_dir() -> Path:
    return xdg_dir("XDG_CONFIG_HOME", ".config") / "systemd" / "user"


def llama_bin_dir() -> Path:
    """llama-server and the shared llama.cpp libraries llama-cpp-python loads too."""
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}" / "bin"


def llama_server_binary() -> Path:
    return llama_bin_dir() / "llama-server"


def llama_cpp_python_venv() -> Path:
    return cache_root() / "venvs" / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"


def llama_cpp_python_interpreter() -> Path:
    return llama_cpp_python_venv() / "bin" / "python"


def litellm_venv() -> Path:
    return cache_root() / "venvs" / f"litellm-{LITELLM_VERSION}"


def litellm_interpreter() -> Path:
    return litellm_venv() / "bin" / "python"
