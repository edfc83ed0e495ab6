"""The running stack as a pytest fixture: diversityd as `diversityd.service` in a private
systemd --user manager, owning real llama servers (diversityd_lab.stack)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from diversityd.units import DAEMON_UNIT
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.stack import RunningStack, start_stack


@pytest.fixture(scope="module")
def running_stack(
    shared_private_manager: PrivateManager,
    tmp_path_factory: pytest.TempPathFactory,
    llama_server_bin: Path,
    llama_cpp_python_interpreter: Path,
) -> Iterator[RunningStack]:
    running = start_stack(shared_private_manager, tmp_path_factory.mktemp("stack"))
    try:
        running.wait_all_ready(timeout_s=90)
        yield running
    finally:
        shared_private_manager.systemctl("stop", DAEMON_UNIT, check=False)
