"""Integration fixtures: a private `systemd --user` manager (diversityd_lab.privatemanager).

`private_manager` gives each test a fresh manager (~0.2 s); `shared_private_manager` one per
module, for tests that only read or add uniquely named units. Both always stop it. Once per
session, leftovers of crashed runs are swept and journald is held, so that it is not started
and stopped with every manager.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from diversityd_lab.privatemanager import (
    PrivateManager,
    PrivateManagerUnavailable,
    hold_journald,
    sweep_stale,
)
from tests.conftest import unavailable
from tests.integration.harness import running_stack  # noqa: F401  a fixture


@pytest.fixture(scope="session")
def private_manager_host() -> Iterator[str | None]:
    """Why this host cannot run a private manager, or None when it can."""
    with contextlib.ExitStack() as stack:
        reason = None
        try:
            sweep_stale()
            stack.enter_context(hold_journald())
        except PrivateManagerUnavailable as exc:
            reason = str(exc)
        yield reason


def start_private_manager(root: Path, host_problem: str | None) -> PrivateManager:
    """A started manager under `root`; skips (fails under CI) where the host cannot."""
    if host_problem is not None:
        unavailable(f"no private systemd --user manager: {host_problem}")
    manager = PrivateManager(root)
    try:
        manager.start()  # stops what it began when it fails
    except PrivateManagerUnavailable as exc:
        unavailable(f"no private systemd --user manager: {exc}")
    return manager


@pytest.fixture
def private_manager(tmp_path: Path, private_manager_host: str | None) -> Iterator[PrivateManager]:
    manager = start_private_manager(tmp_path / "pm", private_manager_host)
    try:
        yield manager
    finally:
        manager.stop()


@pytest.fixture(scope="module")
def shared_private_manager(
    tmp_path_factory: pytest.TempPathFactory, private_manager_host: str | None
) -> Iterator[PrivateManager]:
    manager = start_private_manager(tmp_path_factory.mktemp("shared-pm"), private_manager_host)
    try:
        yield manager
    finally:
        manager.stop()
