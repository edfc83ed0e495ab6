"""Faults done to a running stack as bad luck or a user would do them, for the chaos
benchmark: a provider killed, hung, stopped and started; the GGUF link re-pointed at a good
or a truncated file; the daemon or the serving gateway instance killed; a good or a bad
(a fallback cycle) configuration reloaded; a server that keeps crashing until systemd gives
up. Each fault undoes what a user would undo, and nothing more: recovery is the daemon's."""

from __future__ import annotations

import enum
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from diversityd.adapters.files import write_atomic
from diversityd.config import MAPPINGS_FILE, SETTINGS_FILE
from diversityd.units import DAEMON_UNIT, unit_name
from diversityd_lab.embedded import point_link, write_truncated_model
from diversityd_lab.stack import RunningStack

GOOD_MODELS = ("tiny-a.gguf", "tiny-b.gguf")
CTX_CHOICES = (256, 320)  # a harmless edit: the context per slot of a llama server


class FaultKind(enum.StrEnum):
    KILL = "kill"  # kill -9 of a provider's main process
    HANG = "hang"  # SIGSTOP of it
    STOP_START = "stop_start"  # systemctl --user stop, then start
    REPOINT_GOOD = "repoint_good"  # the active link to the other tiny model
    REPOINT_BAD = "repoint_bad"  # the active link to a truncated file, then back
    DAEMON_KILL = "daemon_kill"  # kill -9 of diversityd
    GATEWAY_KILL = "gateway_kill"  # kill -9 of the serving gateway instance
    RELOAD_GOOD = "reload_good"  # a llama server's ctx edited, diversityctl reload
    RELOAD_BAD = "reload_bad"  # a fallback cycle, diversityctl reload (refused), restored
    CRASH_LOOP = "crash_loop"  # its executable fails until systemd gives up; then it works


@dataclass(frozen=True)
class PlannedFault:
    kind: FaultKind
    target: str | None  # a provider, where the fault has one
    hold_s: float  # how long it lasts, where it lasts (a hang, a stop, a bad link, a flag)
    gap_s: float  # the pause after it


@dataclass(frozen=True)
class FaultRecord:
    kind: FaultKind
    target: str | None
    started: float  # time.monotonic()
    ended: float
    detail: str
    done: bool = True  # False: it could not be done (said why in `detail`)


def plan_faults(
    rng: random.Random,
    rounds: int,
    providers: Sequence[str],
    *,
    ctx_providers: Sequence[str],
    crash_provider: str,
    gap_s: tuple[float, float],
) -> list[PlannedFault]:
    """Every kind `rounds` times, in a random order, with random targets, holds and gaps."""
    kinds = [kind for _ in range(rounds) for kind in FaultKind]
    rng.shuffle(kinds)
    plan: list[PlannedFault] = []
    for kind in kinds:
        target: str | None = None
        hold = 0.0
        if kind in (FaultKind.KILL, FaultKind.HANG, FaultKind.STOP_START):
            target = rng.choice(list(providers))
        elif kind is FaultKind.RELOAD_GOOD:
            target = rng.choice(list(ctx_providers))
        elif kind is FaultKind.CRASH_LOOP:
            target = crash_provider
        if kind in (FaultKind.HANG, FaultKind.REPOINT_BAD):
            hold = rng.uniform(3, 5)
        elif kind in (FaultKind.STOP_START, FaultKind.CRASH_LOOP):
            hold = rng.uniform(2, 5)
        plan.append(PlannedFault(kind, target, round(hold, 2), round(rng.uniform(*gap_s), 2)))
    return plan


def write_crash_wrapper(path: Path, executable: Path, flag: Path) -> Path:
    """A server executable that exits 3 (after its start job is done, as a server dies
    loading a broken model) while `flag` exists, and is `executable` otherwise."""
    path.write_text(
        "#!/bin/sh\n"
        f'if [ -e "{flag}" ]; then sleep 0.5; echo "broken on purpose" >&2; exit 3; fi\n'
        f'exec "{executable}" "$@"\n'
    )
    path.chmod(0o755)
    return path


class FaultRunner:
    """Does planned faults to a running stack, one at a time, noting each."""

    def __init__(self, running: RunningStack, *, crash_flag: Path, daemon_ends_hangs: bool) -> None:
        self.running = running
        self.crash_flag = crash_flag
        # With `supervision.hung_grace_s` the daemon ends a hung server; without, the bench
        # thaws it (SIGCONT) after the hold.
        self.daemon_ends_hangs = daemon_ends_hangs
        self.good_model = Path(os.readlink(running.stack.active_link)).name
        self.gateway_kills: list[float] = []  # when the serving instance was killed
        self.records: list[FaultRecord] = []
        self._frozen: set[int] = set()
        self._actions: dict[FaultKind, Callable[[PlannedFault], str]] = {
            FaultKind.KILL: self._kill,
            FaultKind.HANG: self._hang,
            FaultKind.STOP_START: self._stop_start,
            FaultKind.REPOINT_GOOD: self._repoint_good,
            FaultKind.REPOINT_BAD: self._repoint_bad,
            FaultKind.DAEMON_KILL: self._daemon_kill,
            FaultKind.GATEWAY_KILL: self._gateway_kill,
            FaultKind.RELOAD_GOOD: self._reload_good,
            FaultKind.RELOAD_BAD: self._reload_bad,
            FaultKind.CRASH_LOOP: self._crash_loop,
        }

    def run(self, fault: PlannedFault) -> FaultRecord:
        started = time.monotonic()
        try:
            detail, done = self._actions[fault.kind](fault), True
        except FaultNotDoneError as exc:
            detail, done = str(exc), False
        except Exception as exc:  # noqa: BLE001 - noted as not done; the schedule goes on
            detail, done = f"{type(exc).__name__}: {exc}", False
        record = FaultRecord(fault.kind, fault.target, started, time.monotonic(), detail, done)
        self.records.append(record)
        return record

    def thaw_all(self) -> None:
        """Whatever happened, leave no process stopped."""
        for pid in self._frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                continue
        self._frozen.clear()

    # -- helpers --------------------------------------------------------------------------

    def _main_pid(self, unit: str, wait_s: float = 30) -> int:
        """The unit's main process once it runs (waiting for a restart in progress)."""
        deadline = time.monotonic() + wait_s
        while True:
            pid = int(self.running.unit_property(unit, "MainPID") or 0)
            if pid and self.running.unit_property(unit, "ActiveState") == "active":
                return pid
            if time.monotonic() >= deadline:
                raise FaultNotDoneError(f"{unit} has no running process after {wait_s:g} s")
            time.sleep(0.2)

    def _daemon_status(self, wait_s: float = 60) -> dict[str, Any]:
        """The daemon's status once it runs (it may be coming back from a kill)."""
        try:
            return self.running.wait_for(lambda d: d["daemon"].get("running") is True, wait_s)
        except AssertionError as exc:
            raise FaultNotDoneError(f"the daemon is not running: {exc}") from exc

    def _ctl(self, *args: str) -> tuple[int, str]:
        self._daemon_status()
        config_dir = str(self.running.stack.config_dir)
        result = self.running.ctl(*args, "--config-dir", config_dir, timeout=60)
        lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
        return result.returncode, lines[0] if lines else ""

    # -- the faults -----------------------------------------------------------------------

    def _kill(self, fault: PlannedFault) -> str:
        assert fault.target is not None
        pid = self._main_pid(unit_name(fault.target))
        os.kill(pid, signal.SIGKILL)
        return f"kill -9 {pid}"

    def _hang(self, fault: PlannedFault) -> str:
        assert fault.target is not None
        pid = self._main_pid(unit_name(fault.target))
        os.kill(pid, signal.SIGSTOP)
        self._frozen.add(pid)
        if not self.daemon_ends_hangs:
            time.sleep(fault.hold_s)
            os.kill(pid, signal.SIGCONT)
            self._frozen.discard(pid)
            return f"SIGSTOP {pid}; SIGCONT by the bench after {fault.hold_s:g} s"
        deadline = time.monotonic() + fault.hold_s + 30
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGCONT)
            self._frozen.discard(pid)
            return f"SIGSTOP {pid}; NOT ended by the daemon in {fault.hold_s + 30:g} s: SIGCONT"
        self._frozen.discard(pid)
        return f"SIGSTOP {pid}; ended by the daemon"

    def _stop_start(self, fault: PlannedFault) -> str:
        assert fault.target is not None
        unit = unit_name(fault.target)
        self._main_pid(unit)
        self.running.manager.systemctl("stop", unit, timeout=60)
        time.sleep(fault.hold_s)
        started = self.running.manager.systemctl("start", unit, check=False, timeout=60)
        outcome = "started" if started.returncode == 0 else f"start FAILED: {started.stderr}"
        return f"stopped for {fault.hold_s:g} s; {outcome.strip()}"

    def _repoint_good(self, _fault: PlannedFault) -> str:
        target = next(m for m in GOOD_MODELS if m != self.good_model)
        point_link(self.running.stack.active_link, f"../{target}")
        self.good_model = target
        return f"-> {target}"

    def _repoint_bad(self, fault: PlannedFault) -> str:
        bad = self.running.stack.models_dir / "truncated.gguf"
        if not bad.exists():
            write_truncated_model(self.running.stack.models_dir, bad.name)
        point_link(self.running.stack.active_link, f"../{bad.name}")
        time.sleep(fault.hold_s)
        point_link(self.running.stack.active_link, f"../{self.good_model}")
        return f"-> {bad.name} for {fault.hold_s:g} s, back to {self.good_model}"

    def _daemon_kill(self, _fault: PlannedFault) -> str:
        pid = self._main_pid(DAEMON_UNIT, wait_s=60)
        os.kill(pid, signal.SIGKILL)
        return f"kill -9 {pid}"

    def _gateway_kill(self, _fault: PlannedFault) -> str:
        gateway = self._daemon_status()["gateway"]
        unit, pid = gateway.get("unit"), gateway.get("pid")
        if not unit or not pid:
            raise FaultNotDoneError(f"no serving gateway instance in status: {gateway}")
        if self._main_pid(unit, wait_s=5) != pid:
            raise FaultNotDoneError(f"{unit}'s main process is not {pid} any more")
        self.gateway_kills.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)
        return f"kill -9 {pid} ({unit})"

    def _reload_good(self, fault: PlannedFault) -> str:
        assert fault.target is not None
        path = self.running.stack.config_dir / SETTINGS_FILE
        settings = yaml.safe_load(path.read_text())
        entry = settings["providers"][fault.target]
        old = entry["ctx"]
        entry["ctx"] = next(c for c in CTX_CHOICES if c != old)
        write_atomic(path, yaml.safe_dump(settings, sort_keys=False), mode=0o600)
        code, said = self._ctl("reload")
        verdict = "reloaded" if code == 0 else f"reload FAILED (exit {code}: {said})"
        return f"ctx {old} -> {entry['ctx']}; {verdict}"

    def _reload_bad(self, _fault: PlannedFault) -> str:
        path = self.running.stack.config_dir / MAPPINGS_FILE
        original = path.read_text()
        mappings = yaml.safe_load(original)
        chains = mappings["fallback_chains"]
        model, body = next((m, b) for m, b in chains.items() if b.get("chain"))
        back = chains.setdefault(body["chain"][0], {"chain": []})
        back["chain"] = [*back.get("chain", []), model]
        write_atomic(path, yaml.safe_dump(mappings, sort_keys=False), mode=0o600)
        try:
            code, said = self._ctl("reload")
        finally:
            write_atomic(path, original, mode=0o600)
        cycle = f"{model} -> {body['chain'][0]} -> {model}"
        if code == 2:
            return f"{cycle}: refused (exit 2), restored"
        return f"{cycle}: NOT refused (exit {code}: {said}), restored"

    def _crash_loop(self, fault: PlannedFault) -> str:
        assert fault.target is not None
        unit = unit_name(fault.target)
        pid = self._main_pid(unit)
        self.crash_flag.touch()
        try:
            os.kill(pid, signal.SIGKILL)
            started = time.monotonic()
            deadline = started + 60
            while self.running.unit_property(unit, "ActiveState") != "failed":
                if time.monotonic() > deadline:
                    return "systemd did NOT give up in 60 s; flag removed"
                time.sleep(0.1)
            gave_up = time.monotonic() - started
            time.sleep(fault.hold_s)
        finally:
            self.crash_flag.unlink(missing_ok=True)
        return (
            f"kill -9 {pid}; systemd gave up after {gave_up:.1f} s; fixed {fault.hold_s:g} s later"
        )


class FaultNotDoneError(RuntimeError):
    """The fault could not be done (its target was not running)."""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
