"""Issue 20, points 1, 2 and 5, the daemon's side, on a real store and state loop with
systemd left out: what the user stopped is told from a process that ended (by the job
signals), revivals run side by side on the monotonic clock and keep their backoff across
a restart, `restart` of all skips what is kept down on purpose, `start` of a held server
waits for its file. (tests/integration/test_recovery.py has the same on a real manager.)"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest import mock

from diversityd.adapters.systemd import JobSignal
from diversityd.adapters.unitfiles import load_templates
from diversityd.config import parse_config
from diversityd.daemon.commands import Commands
from diversityd.daemon.intent import Intent
from diversityd.daemon.loop import ProviderLocks, StateLoop
from diversityd.daemon.revivals import Reviver
from diversityd.daemon.starts import Starter
from diversityd.daemon.statefile import StateFile
from diversityd.daemon.store import Job, ProviderRecord, Store
from diversityd.persisted import Persisted, Revival
from diversityd.reconcile import FAILED_SETTLE_S, RevivalPlan
from diversityd.state import Observed, ProviderState, UnitSnapshot
from diversityd.units import UnitContext, unit_name
from diversityd.validation import validate

PROVIDERS = """\
providers:
  a: {type: llama_cpp, base_url: "http://127.0.0.1:8080", models: [model-a]}
  b: {type: llama_cpp, base_url: "http://127.0.0.1:8081", models: [model-b]}
"""
SETTINGS = """\
supervision: {revive_initial_s: 10, revive_max_s: 300, ready_wait_s: 5}
providers:
  a: {server: llama-server, executable: /opt/bin/llama-server, model_path: /m/a.gguf}
  b: {server: llama-server, executable: /opt/bin/llama-server, model_path: /m/b.gguf}
"""


def a_store(tmp_path: Path) -> Store:
    config, findings = parse_config(
        {
            "providers.yaml": PROVIDERS,
            "model-mappings.yaml": "fallback_chains: {}\n",
            "diversityd.yaml": SETTINGS,
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
    )
    store = Store(tmp_path / "cfg", context)
    store.adopt_config(validate(config, findings, {}))
    return store


def set_unit(
    record: ProviderRecord, active: str, result: str = "success", ago: float = 5.0
) -> None:
    """What systemd said last of its unit, and the state it gave (`ago` seconds since)."""
    sub = {"active": "running", "inactive": "dead", "failed": "failed"}[active]
    snapshot = UnitSnapshot(record.unit or "", "loaded", active, sub, 0, 0, 0, result, "", ())
    record.observed = Observed(unit=snapshot)
    record.state = {
        "active": ProviderState.READY,
        "inactive": ProviderState.STOPPED,
        "failed": ProviderState.FAILED,
    }[active]
    record.last_state_change = time.monotonic() - ago


class World:
    """The state loop running, the daemon's services on it; systemd stands apart."""

    def __init__(self, tmp_path: Path, start_unit: Callable[..., Awaitable[bool]]) -> None:
        self.store = a_store(tmp_path)
        self.loop = StateLoop()
        self.locks = ProviderLocks()
        self.statefile = StateFile(self.loop, self.store, tmp_path / "state")
        self.intent = Intent(self.store, self.statefile)
        self.reviver = Reviver(
            self.loop,
            self.store,
            locks=self.locks,
            statefile=self.statefile,
            metrics=mock.Mock(),
            intent=self.intent,
            start_unit=start_unit,
        )
        self.reviver.startup_finished = True

    def record(self, name: str) -> ProviderRecord:
        return self.store.records[name]

    async def job(self, unit: str, job_type: str | None, result: str = "done") -> None:
        """A job of `unit` as the bus reader hands it over: queued, typed, finished."""
        path = f"/org/freedesktop/systemd1/job/{time.monotonic_ns()}"
        self.loop.post(JobSignal(unit, path, "new"))
        if job_type is not None:
            self.loop.post(JobSignal(unit, path, "typed", job_type=job_type))
        self.loop.post(JobSignal(unit, path, "removed", result=result))
        await self.loop.call(lambda: None)  # handled


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(scenario())


def test_only_a_stop_job_is_the_users_and_an_ended_process_is_revived(tmp_path: Path) -> None:
    """Point 1: an exit 0 or a SIGTERM from outside (`success` to systemd, no job) was
    recorded as the user's stop and never revived."""
    started: list[str] = []

    async def start_unit(record: ProviderRecord, _reset: bool, _why: str) -> bool:
        started.append(record.name)
        return True

    async def scenario() -> None:
        world = World(tmp_path, start_unit)
        world.loop.spawn(world.loop.run())
        world.loop.on(JobSignal, world.intent.on_job)
        a, b = world.record("a"), world.record("b")
        a_unit, b_unit = unit_name("a"), unit_name("b")
        # a: `systemctl --user stop` (a stop job nobody in diversityd asked for)
        set_unit(a, "inactive")
        await world.job(a_unit, "stop")
        # b: its process ended by itself; then a restart job of systemd's own
        set_unit(b, "inactive")
        await world.job(b_unit, "restart")
        assert a.stopped_by_user
        assert not b.stopped_by_user
        await world.reviver._revive_due()  # b's revival is scheduled (backoff), a's not
        assert a.revival is None
        assert b.revival is not None
        assert b.revival.due - time.monotonic() > 9  # revive_initial_s
        assert "ended with no stop job" in (b.revival.last_failure or "")
        b.revival = RevivalPlan(0, time.monotonic(), b.revival.last_failure)
        await world.reviver._revive_due()
        await asyncio.sleep(0.05)
        assert started == ["b"]
        # diversityd's own stop job (a reload, a hold, a drill) is not the user's
        world.store.expected_stops.add(b_unit)
        await world.job(b_unit, "stop")
        assert not b.stopped_by_user
        assert b_unit not in world.store.expected_stops
        # a job whose type could not be read in time is judged by what it left
        set_unit(b, "inactive")
        await world.job(b_unit, None)
        assert b.stopped_by_user
        # started again by someone: the user's stop no longer holds
        world.intent.on_state(a, ProviderState.STARTING)
        assert not a.stopped_by_user
        await world.loop.cancel_tasks()

    run(scenario)


def test_revivals_run_side_by_side(tmp_path: Path) -> None:
    """Point 5: one revival waiting on its server (up to ready_wait_s) held up the others."""
    started: list[str] = []
    never = asyncio.Event()

    async def start_unit(record: ProviderRecord, _reset: bool, _why: str) -> bool:
        started.append(record.name)
        if record.name == "a":
            await never.wait()  # a slow start
        return True

    async def scenario() -> None:
        world = World(tmp_path, start_unit)
        world.loop.spawn(world.loop.run())
        for name in ("a", "b"):
            record = world.record(name)
            set_unit(record, "failed", result="exit-code")
            record.revival = RevivalPlan(1, time.monotonic() - 1, "unit failed")
        pass_done = asyncio.ensure_future(world.reviver._revive_due())
        await asyncio.wait_for(pass_done, 2)  # the pass itself does not wait on a start
        await asyncio.sleep(0.05)
        assert sorted(started) == ["a", "b"]
        await world.reviver._revive_due()  # a is still being revived: not twice
        await asyncio.sleep(0.05)
        assert sorted(started) == ["a", "b"]
        never.set()
        await world.loop.cancel_tasks()

    run(scenario)


def test_a_new_daemon_keeps_the_backoff_it_reads_back(tmp_path: Path) -> None:
    """Point 5: a restarted daemon revived at once (its first look took the unit's inputs
    for changed inputs), whatever the backoff said."""
    started: list[str] = []

    async def start_unit(record: ProviderRecord, _reset: bool, _why: str) -> bool:
        started.append(record.name)
        return True

    async def scenario() -> None:
        world = World(tmp_path, start_unit)
        world.loop.spawn(world.loop.run())
        saved = Persisted(revivals={"a": Revival(3, time.time() + 60, "unit failed")})
        await world.loop.call(lambda: world.store.adopt_persisted(saved))
        a = world.record("a")
        set_unit(a, "failed", result="exit-code", ago=FAILED_SETTLE_S + 1)
        assert a.revival is not None
        assert 55 < a.revival.due - time.monotonic() <= 60
        for _ in range(3):
            await world.reviver._revive_due()
        await asyncio.sleep(0.05)
        assert started == []
        assert a.revival.attempts == 3
        await world.loop.cancel_tasks()

    run(scenario)


def test_restart_of_all_skips_what_is_kept_down_on_purpose(tmp_path: Path) -> None:
    """Point 2: `diversityctl restart` with no name restarted what the user had stopped."""

    async def scenario() -> tuple[dict[str, Any], list[Any]]:
        store = a_store(tmp_path)
        store.records["a"].stopped_by_user = True
        jobs = mock.AsyncMock()
        jobs.submit.return_value = "job-1"
        commands = Commands(
            mock.Mock(), store, mock.Mock(), supervisor=mock.Mock(), rollout=mock.Mock(),
            starter=mock.Mock(), models=mock.Mock(), jobs=jobs, gateway=None,
        )  # fmt: skip
        answer = await commands.restart("")
        store.records["a"].stopped_by_user = False
        store.records["b"].held = "/m/b.gguf is being rewritten in place"
        await commands.restart("")
        return answer, jobs.submit.await_args_list

    answer, calls = run(scenario)
    assert answer["providers"] == ["b"]
    assert "stopped on purpose" in answer["skipped"]["a"]
    assert calls[0].args[1]["providers"] == ["b"]
    assert calls[1].args[1]["providers"] == ["a"]
    assert "rewritten in place" in calls[1].args[1]["skipped"]["b"]


def test_start_of_a_held_server_waits_for_its_file(tmp_path: Path) -> None:
    """Point 2: `diversityctl start` of a server held during an in-place rewrite of its
    model started it at once, onto half a file."""
    systemd = mock.AsyncMock()
    systemd.start.return_value = "done"

    async def scenario() -> tuple[list[Any], dict[str, Any]]:
        store = a_store(tmp_path)
        loop = StateLoop()
        loop.spawn(loop.run())
        record = store.records["a"]
        set_unit(record, "inactive")
        record.held = "/m/a.gguf is being rewritten in place"
        starter = Starter(
            loop, store, systemd, locks=ProviderLocks(),
            statefile=StateFile(loop, store, tmp_path / "state"), metrics=mock.Mock(),
            drainer=mock.Mock(), report=mock.Mock(),
        )  # fmt: skip
        job = asyncio.ensure_future(starter.run_start_job(Job("j", "start", {"provider": "a"})))
        await asyncio.sleep(0.3)
        before = list(systemd.start.await_args_list)
        await loop.call(lambda: setattr(record, "held", None))  # the file is whole again
        await asyncio.sleep(0.1)
        await loop.call(lambda: set_unit(record, "active", ago=0.0))  # it answers
        result = await asyncio.wait_for(job, 5)
        await loop.cancel_tasks()
        return before, result

    before, result = run(scenario)
    assert before == []  # not started while held
    assert systemd.start.await_count == 1
    assert result["ok"] is True


def test_a_hold_outlives_the_daemon(tmp_path: Path) -> None:
    """Point 2: a new daemon started a server held during an in-place rewrite onto half a
    file. The hold is read back from the state file; a new daemon releases it only when
    the file is whole again, and holds servers whose accepted file it finds half-written."""
    from diversityd.adapters.modellink import resolve
    from diversityd.daemon.models import ModelLinks
    from diversityd_lab.ggufwriter import write_gguf

    model = write_gguf(tmp_path / "models" / "a.gguf")
    link = tmp_path / "models" / "current.gguf"
    link.symlink_to("a.gguf")
    accepted = resolve(str(link))
    assert accepted.ok
    reason = f"{model} is being rewritten in place"

    async def start_daemon(whole: bool) -> tuple[str | None, list[Any]]:
        store = a_store(tmp_path)
        for record in store.records.values():
            assert record.owned is not None
            record.owned = dataclasses.replace(record.owned, model_path=str(link))
        loop = StateLoop()
        loop.spawn(loop.run())
        await loop.call(lambda: store.adopt_persisted(Persisted(held={"a": reason})))
        hold = mock.AsyncMock()
        links = ModelLinks(
            loop, store, tmp_path, refresh_units=mock.AsyncMock(), hold=hold,
            release=mock.AsyncMock(),
        )  # fmt: skip
        links.start(asyncio.get_running_loop())
        if not whole:
            model.write_bytes(model.read_bytes()[:100])  # `cp` half-way over it
        await links.watch_all({str(link): accepted})
        links.close()
        await loop.cancel_tasks()
        return store.records["a"].held, hold.await_args_list

    held, holds = run(lambda: start_daemon(whole=True))
    assert held is None  # whole again: released (start-up starts it)
    assert holds == []
    held, holds = run(lambda: start_daemon(whole=False))
    assert held == reason  # still held, across the restart
    assert [sorted(call.args[0]) for call in holds] == [["a", "b"]]
