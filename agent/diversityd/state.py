"""Provider states from observations (systemd's unit state, HTTP probes). Pure.

States (a small named set; `status --json` shows the value):
- starting: the process runs (or is being started) and has not answered yet;
- ready: it answers its probe;
- hung: the process is alive but stopped answering (a probe timed out) and makes no
  progress (its CPU time stands still);
- busy: it answered before, its probe times out now, but it is working (its CPU time
  advances): llama-cpp-python answers `/v1/models` only between generations. It serves;
- down: not answering (refused), crashed and waiting for systemd's Restart=, or stopping;
- failed: systemd gave up on the unit (failed state);
- stopped: the unit is inactive: stopped on purpose;
- unknown: nothing observed yet.

`Observed` is what the daemon knows of one provider's process; `apply_unit_change` and
`apply_probe` fold one observation into it, `derive_state` reads the state off it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

STARTING_PROBE_S = 0.1  # probe fast while a provider starts: readiness gates restarts
PROGRESS_CPU_S = 0.05  # CPU time a process must use between two probes to be working
MAX_PROBE_BACKOFF_S = 30.0


class ProviderState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    HUNG = "hung"
    DOWN = "down"
    FAILED = "failed"
    STOPPED = "stopped"
    UNKNOWN = "unknown"


class ProbeOutcome(enum.StrEnum):
    OK = "ok"
    REFUSED = "refused"  # nothing listens: fast, certain
    TIMEOUT = "timeout"  # connected or not, no answer in time: hung or overloaded
    ERROR = "error"  # answered, but not as a ready server (HTTP 5xx, bad JSON, ...)


@dataclass(frozen=True)
class ProbeResult:
    outcome: ProbeOutcome
    at: float  # time.monotonic() when the probe finished
    latency_ms: float
    error: str | None = None
    models: frozenset[str] | None = None  # ids the provider reports serving

    @property
    def ok(self) -> bool:
        return self.outcome is ProbeOutcome.OK


@dataclass(frozen=True)
class UnitSnapshot:
    """What systemd says about one unit (its D-Bus properties, merged from signals)."""

    name: str
    load_state: str  # loaded, not-found, masked, error
    active_state: str  # active, activating, deactivating, inactive, failed, reloading
    sub_state: str  # running, exited, dead, auto-restart, ...
    main_pid: int
    active_enter_us: int  # CLOCK_REALTIME microseconds of entering active (0: never)
    n_restarts: int
    result: str  # success, exit-code, signal, core-dump, watchdog, ...
    fragment_path: str
    drop_in_paths: tuple[str, ...]

    @classmethod
    def from_properties(cls, name: str, props: Mapping[str, Any]) -> UnitSnapshot:
        return cls(
            name=name,
            load_state=str(props.get("LoadState", "")),
            active_state=str(props.get("ActiveState", "")),
            sub_state=str(props.get("SubState", "")),
            main_pid=int(props.get("MainPID", 0) or 0),
            active_enter_us=int(props.get("ActiveEnterTimestamp", 0) or 0),
            n_restarts=int(props.get("NRestarts", 0) or 0),
            result=str(props.get("Result", "")),
            fragment_path=str(props.get("FragmentPath", "")),
            drop_in_paths=tuple(str(p) for p in props.get("DropInPaths", []) or []),
        )

    def merged(self, changed: Mapping[str, Any]) -> UnitSnapshot:
        current = {
            "LoadState": self.load_state,
            "ActiveState": self.active_state,
            "SubState": self.sub_state,
            "MainPID": self.main_pid,
            "ActiveEnterTimestamp": self.active_enter_us,
            "NRestarts": self.n_restarts,
            "Result": self.result,
            "FragmentPath": self.fragment_path,
            "DropInPaths": list(self.drop_in_paths),
        }
        current.update(changed)
        return UnitSnapshot.from_properties(self.name, current)

    @property
    def running(self) -> bool:
        """A process runs or is being started (after a daemon restart: never start it twice)."""
        return self.active_state in ("active", "activating", "reloading")


def adopt_snapshot(
    snapshot: UnitSnapshot, early: Iterable[tuple[float, Mapping[str, Any]]], taken_at: float
) -> UnitSnapshot:
    """A snapshot read with GetAll at `taken_at`, with the property changes that came in
    meanwhile: those sent after systemd answered (newer than `taken_at`) go on top."""
    for at, changed in early:
        if at > taken_at:
            snapshot = snapshot.merged(changed)
    return snapshot


@dataclass(frozen=True)
class Observed:
    """What the daemon knows of one provider's process right now."""

    unit: UnitSnapshot | None = None
    probe: ProbeResult | None = None
    answered_pid: int = -1  # MainPID for which a probe succeeded (-1: none yet)
    failures: int = 0  # consecutive failed probes (backoff)
    cpu_s: float | None = None  # the process tree's CPU time at the last probe ...
    cpu_pid: int = 0  # ... of this main process
    progressing: bool = False  # its CPU time advanced since the probe before

    @property
    def pid(self) -> int:
        return self.unit.main_pid if self.unit is not None else 0

    @property
    def answered_since_start(self) -> bool:
        """A probe succeeded since the current process started."""
        return self.unit is not None and self.pid != 0 and self.answered_pid == self.pid


def apply_unit_change(observed: Observed, changed: Mapping[str, Any]) -> tuple[Observed, int]:
    """Fold a PropertiesChanged into what is known. Returns the new knowledge and the pid of
    a process that just went away (0 when none did). A new process has not answered yet."""
    assert observed.unit is not None
    before = observed.unit.main_pid
    unit = observed.unit.merged(changed)
    if unit.main_pid == before:
        return dataclasses.replace(observed, unit=unit), 0
    exited = before if before and unit.main_pid == 0 else 0
    return dataclasses.replace(observed, unit=unit, answered_pid=-1), exited


def apply_probe(
    observed: Observed, result: ProbeResult, pid: int, cpu_s: float | None = None
) -> Observed:
    """Fold a probe's answer in. `pid`: the main process when the probe was sent; a success
    counts for it alone (an answer from a process since replaced proves nothing). `cpu_s`:
    its process tree's CPU time after the probe: one that timed out while the CPU time
    advanced since the probe before is working (busy), not hung."""
    answered = observed.answered_pid
    if result.ok and pid == observed.pid:
        answered = pid
    failures = 0 if result.ok else observed.failures + 1
    progressing = (
        not result.ok
        and cpu_s is not None
        and observed.cpu_s is not None
        and observed.cpu_pid == pid
        and cpu_s - observed.cpu_s >= PROGRESS_CPU_S
    )
    return dataclasses.replace(
        observed,
        probe=result,
        answered_pid=answered,
        failures=failures,
        cpu_s=cpu_s,
        cpu_pid=pid,
        progressing=progressing,
    )


def unit_state(unit: UnitSnapshot | None) -> ProviderState | None:
    """What systemd alone says; None when the process runs and the probe must decide."""
    if unit is None or unit.load_state not in ("loaded", ""):
        return ProviderState.UNKNOWN
    if unit.active_state == "failed":
        return ProviderState.FAILED
    if unit.active_state == "inactive":
        return ProviderState.STOPPED
    if unit.active_state == "deactivating" or unit.sub_state == "auto-restart":
        return ProviderState.DOWN
    if unit.active_state in ("active", "activating", "reloading"):
        if unit.main_pid == 0 and unit.active_state == "activating":
            return ProviderState.STARTING
        return None
    return ProviderState.UNKNOWN


def start_overdue(unit: UnitSnapshot | None, now: float, grace_s: float) -> bool:
    """The process has run longer than a start may take (`now`: time.time()) without
    answering: it is no longer loading, it is hung or dead (a SIGSTOPped server a restarted
    daemon finds, a server stuck at start)."""
    if unit is None or not unit.active_enter_us:
        return False
    return now - unit.active_enter_us / 1e6 > grace_s


def derive_state(
    *,
    owned: bool,
    unit: UnitSnapshot | None,
    probe: ProbeResult | None,
    answered_since_start: bool,
    overdue: bool = False,
    progressing: bool = False,
) -> ProviderState:
    """One provider's state. `answered_since_start`: a probe succeeded since the current
    process started (until then a silent server is loading, not hung, unless `overdue`:
    it has been silent for longer than a start may take)."""
    if owned:
        from_unit = unit_state(unit)
        if from_unit is not None:
            return from_unit
        if probe is None:
            return ProviderState.STARTING
        if not answered_since_start:
            if not overdue or probe.outcome is ProbeOutcome.OK or progressing:
                return ProviderState.STARTING  # loading (still working after the grace)
            # silent past the grace and its CPU time standing still: frozen or stuck at
            # start (a stopped process never binds its port: refused), not loading
            return ProviderState.HUNG
    elif probe is None:
        return ProviderState.UNKNOWN
    if probe.outcome is ProbeOutcome.OK:
        return ProviderState.READY
    if probe.outcome is ProbeOutcome.TIMEOUT:
        return ProviderState.BUSY if progressing else ProviderState.HUNG
    return ProviderState.DOWN


def state_of(observed: Observed, *, owned: bool, overdue: bool = False) -> ProviderState:
    return derive_state(
        owned=owned,
        unit=observed.unit,
        probe=observed.probe,
        answered_since_start=observed.answered_since_start,
        overdue=overdue,
        progressing=observed.progressing,
    )


def is_serving(state: ProviderState) -> bool:
    """It answers requests (a busy server takes them too: they queue behind its work)."""
    return state in (ProviderState.READY, ProviderState.BUSY)


# What systemd's Restart= walks a killed server through (auto-restart shows as failed,
# then inactive between the stop and start of the restart job, for a moment each).
def probe_interval(state: ProviderState, failures: int, base_s: float) -> float:
    """How long until the next probe: fast while starting (readiness gates restarts), the
    base interval while up or stopped, backing off while down (never slower than 30 s)."""
    if state is ProviderState.STARTING:
        return STARTING_PROBE_S
    if state in (ProviderState.STOPPED, ProviderState.FAILED):
        return base_s
    if failures:
        return float(min(MAX_PROBE_BACKOFF_S, base_s * 2 ** min(failures - 1, 5)))
    return base_s
