"""Provider states from observations (systemd's unit state, HTTP probes). Pure.

States (a small named set; `status --json` shows the value):
- starting: the process runs (or is being started) and has not answered yet;
- ready: it answers its probe;
- hung: the process is alive but stopped answering (a probe timed out);
- down: not answering (refused), crashed and waiting for systemd's Restart=, or stopping;
- failed: systemd gave up on the unit (failed state);
- stopped: the unit is inactive: stopped on purpose;
- unknown: nothing observed yet.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ProviderState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
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
class UnitView:
    """The parts of a systemd unit's state the decision needs."""

    load_state: str
    active_state: str
    sub_state: str
    main_pid: int


def unit_state(unit: UnitView | None) -> ProviderState | None:
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


def derive_state(
    *,
    owned: bool,
    unit: UnitView | None,
    probe: ProbeResult | None,
    answered_since_start: bool,
) -> ProviderState:
    """One provider's state. `answered_since_start`: a probe succeeded since the current
    process started (until then a silent server is loading, not hung)."""
    if owned:
        from_unit = unit_state(unit)
        if from_unit is not None:
            return from_unit
        if probe is None or not answered_since_start:
            return ProviderState.STARTING
    elif probe is None:
        return ProviderState.UNKNOWN
    if probe.outcome is ProbeOutcome.OK:
        return ProviderState.READY
    if probe.outcome is ProbeOutcome.TIMEOUT:
        return ProviderState.HUNG
    return ProviderState.DOWN


def is_serving(state: ProviderState) -> bool:
    return state is ProviderState.READY
