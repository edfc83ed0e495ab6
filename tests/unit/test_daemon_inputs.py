"""Issue 19, the daemon's side: a unit that cannot be rendered keeps the last good one (never
an exception out of the loop), and a change of `environment:` alone restarts that server.
The rollout's decisions on a real store, with plain files in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from diversityd.adapters.unitfiles import load_templates, sync_units
from diversityd.config import parse_config
from diversityd.daemon.rollout import Rollout
from diversityd.daemon.store import Store
from diversityd.state import Observed, UnitSnapshot
from diversityd.units import UnitContext, unit_name
from diversityd.validation import validate

PROVIDERS = """\
providers:
  native: {type: llama_cpp, base_url: "http://127.0.0.1:8080", models: [llama-cpp-native]}
"""
SETTINGS = """\
providers:
  native:
    server: llama-server
    executable: /opt/bin/llama-server
    model_path: /models/current.gguf
    environment: {{GGML_CUDA_NO_PINNED: {value}}}
"""
UNIT = unit_name("native")


def a_store(tmp_path: Path, value: str) -> Store:
    """A daemon's store holding a configuration whose `environment:` value is `value`
    (adopted as the daemon adopts one: here without validate's verdict, as if it had
    missed something)."""
    config, findings = parse_config(
        {
            "providers.yaml": PROVIDERS,
            "model-mappings.yaml": "fallback_chains: {}\n",
            "diversityd.yaml": SETTINGS.format(value=json.dumps(value)),
        },
        config_dir=str(tmp_path / "cfg"),
        hostname="box",
    )
    assert config is not None, findings
    context = UnitContext(
        home="/home/user",
        templates=load_templates(),
        default_llama_server="/cache/llama-server",
        default_llama_python="/cache/python",
        llama_lib_dir="/cache/lib",
        python="/venv/bin/python",
        env_dir=str(tmp_path / "env"),
    )
    store = Store(tmp_path / "cfg", context)
    store.adopt_config(validate(config, findings, {}))
    return store


def a_rollout(store: Store, unit_dir: Path) -> Rollout:
    services: dict[str, Any] = {
        name: mock.Mock()
        for name in (
            "supervisor",
            "planner",
            "starter",
            "jobs",
            "locks",
            "statefile",
            "metrics",
            "drainer",
            "revive_now",
        )
    }
    return Rollout(mock.Mock(), store, mock.Mock(), unit_dir=unit_dir, own_units=list, **services)


def running(store: Store) -> None:
    snapshot = UnitSnapshot(UNIT, "loaded", "active", "running", 42, 1, 0, "success", "", ())
    store.records["native"].observed = Observed(unit=snapshot)


def test_a_change_of_environment_alone_restarts_that_server(tmp_path: Path) -> None:
    """Before issue 19 the unit's text did not change (the environment is in a 0600 file
    it names), so nothing rolled and `reload` said no restart was needed."""
    unit_dir = tmp_path / "units"
    store = a_store(tmp_path, "1")
    rollout = a_rollout(store, unit_dir)
    rollout.render_all()
    assert rollout._note_pending() == ["native"]  # first written
    sync_units(unit_dir, store.rendered_units)
    assert rollout._note_pending() == []  # as on disk: nothing to roll

    store = a_store(tmp_path, "0")
    running(store)
    rollout = a_rollout(store, unit_dir)
    rollout.render_all()
    assert (unit_dir / UNIT).read_text() == store.rendered_units[0].text  # the same unit
    assert rollout._note_pending() == ["native"]
    assert "native" in store.pending_rolls  # the intent, saved before the files
    result = sync_units(unit_dir, store.rendered_units)
    assert result.written == []
    assert result.environment_written == [UNIT]
    env_file = Path(str(store.rendered_units[0].env_file))
    assert env_file.read_text() == "GGML_CUDA_NO_PINNED='0'\n"
    assert env_file.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("evil", ["x\nExecStartPre=/bin/evil", "x\rExecStartPre=/bin/evil"])
def test_a_unit_that_cannot_be_rendered_keeps_the_last_good_one(tmp_path: Path, evil: str) -> None:
    """Before issue 19 the render raised ValueError out of `refresh_units`: the daemon
    crash-looped at start, or after a reload every later re-point failed."""
    unit_dir = tmp_path / "units"
    store = a_store(tmp_path, "1")
    rollout = a_rollout(store, unit_dir)
    rollout.render_all()
    good = store.rendered_units[0]
    sync_units(unit_dir, store.rendered_units)

    bad = a_store(tmp_path, evil)  # a reload the daemon took
    bad.rendered_units = store.rendered_units
    rollout = a_rollout(bad, unit_dir)
    rollout.render_all()
    assert bad.rendered_units == [good]  # the unit is neither removed nor stopped
    assert UNIT in bad.render_errors
    assert "control character" in bad.render_errors[UNIT]
    assert evil not in bad.render_errors[UNIT]  # the value is never shown (a secret?)
    assert rollout._note_pending() == []  # nothing rolls for it

    restarted = a_store(tmp_path, evil)  # a new daemon: the last good one is on disk
    rollout = a_rollout(restarted, unit_dir)
    rollout.render_all()
    assert [u.text for u in restarted.rendered_units] == [good.text]
    assert restarted.rendered_units[0].provider == "native"

    fixed = a_store(tmp_path, "2")
    fixed.render_errors = dict(bad.render_errors)
    rollout = a_rollout(fixed, unit_dir)
    rollout.render_all()
    assert fixed.render_errors == {}
