"""What the daemon should do, decided from configuration and observations. Pure.

- `start_order`: which owned providers to start, and in which order;
- `units_to_roll`: which units a change of their files must restart;
- `judge_model_target`: accept or refuse where a model link now leads;
- `is_ready_since`: whether a restart really finished.

The daemon's services gather the inputs (systemd, the link, probes) and carry the answers
out; these functions do no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from diversityd.state import ProviderState, UnitSnapshot


@dataclass(frozen=True)
class StartCandidate:
    """An owned provider as start-up sees it."""

    name: str
    priority: int  # vram_priority: who gets VRAM first also starts first
    unit: UnitSnapshot | None  # None: not read from systemd yet


@dataclass(frozen=True)
class StartStep:
    name: str
    reset_failed: bool  # systemd gave up on it before: clear that first


def start_order(
    candidates: Iterable[StartCandidate], *, port_taken: Collection[str] = ()
) -> list[StartStep]:
    """The owned providers to start, highest vram_priority first (ties by name).

    A unit that is active, activating or waiting for systemd's Restart= is left alone:
    after a daemon restart, state comes from systemd and nothing is started twice. A
    provider whose port another process holds is not started (it could not bind); one
    whose unit was never read is not either (it is unknown)."""
    ordered = sorted(candidates, key=lambda c: (-c.priority, c.name))
    return [
        StartStep(c.name, reset_failed=c.unit.active_state == "failed")
        for c in ordered
        if c.unit is not None and c.name not in port_taken and not c.unit.running
    ]


def units_to_roll(written: Iterable[str], units: dict[str, UnitSnapshot | None]) -> list[str]:
    """Of the providers whose unit file changed, those running: they restart one at a time.
    A stopped one picks its new file up when it next starts."""
    return [
        name
        for name in written
        if (unit := units.get(name)) is not None and unit.active_state in ("active", "activating")
    ]


def is_ready_since(state: ProviderState, last_change: float | None, since: float) -> bool:
    """Ready, and became so after `since` (a monotonic time; 0: any time)."""
    return state is ProviderState.READY and (since == 0.0 or (last_change or 0.0) > since)


@dataclass(frozen=True)
class ModelTarget:
    """Where a configured model path leads, and whether the file there can be served."""

    path: str  # as configured (usually the active symlink)
    hops: tuple[str, ...]  # every path visited, the configured one first
    target: str | None  # the final file (absolute), None when the chain is broken
    identity: tuple[int, int, int, int] | None  # (device, inode, size, mtime_ns) of the target
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class TargetVerdict(enum.StrEnum):
    REFUSE = "refuse"  # the servers keep the model they run
    KEEP = "keep"  # the same file as accepted: nothing to roll
    ACCEPT = "accept"  # a new, whole file: the units change and roll


def judge_model_target(accepted: ModelTarget | None, seen: ModelTarget) -> TargetVerdict:
    """What to do with where the link leads now, given the target accepted last."""
    if not seen.ok:
        return TargetVerdict.REFUSE
    if accepted is not None and (accepted.target, accepted.identity) == (
        seen.target,
        seen.identity,
    ):
        return TargetVerdict.KEEP
    return TargetVerdict.ACCEPT


def choose_accepted(seen: ModelTarget, remembered: ModelTarget | None) -> ModelTarget | None:
    """The model a server may run, when the daemon (re)reads its configuration: where the
    link leads when that file is whole, else the one accepted before (remembered across
    restarts, or read back from the unit file): never a file that was not checked."""
    return seen if seen.ok else remembered


def units_to_retire(on_disk: Iterable[str], wanted: Collection[str]) -> list[str]:
    """Owned unit files no longer configured (a provider removed or renamed): their units
    are stopped before the files go, or they would hold their ports and VRAM for ever."""
    return sorted(name for name in on_disk if name not in wanted)


STOP_JOB = "stop"
ACTIVE_STATES = ("active", "activating", "reloading")


def stops_unit(job_type: str | None, active_state_after: str) -> bool:
    """Whether a job that just finished was a stop: its type, when it was read in time,
    else what it left (systemd sends the unit's change before JobRemoved: a start,
    restart or reload job that is done leaves the unit active; a restart job's stop phase
    is no stop job)."""
    if job_type is not None:
        return job_type == STOP_JOB
    return active_state_after not in ACTIVE_STATES


def stopped_by_user(*, stop_job: bool, ours: bool, result: str) -> bool:
    """A stop job diversityd did not ask for (`systemctl --user stop`) that stopped the
    unit: the user's word. Only a job counts: a process that ended by itself (an exit 0, a
    SIGTERM from `kill` or earlyoom, both `success` to systemd) made none and is revived."""
    return stop_job and not ours and result == "done"


FAILED_SETTLE_S = 1.5  # systemd shows `failed` for an instant before each Restart=


def gave_up(state: ProviderState, changed_at: float | None, now: float) -> bool:
    """systemd gave up on the unit: `failed`, and still so after an instant (before each
    of its own restarts a unit is `failed` for milliseconds). Monotonic times."""
    return (
        state is ProviderState.FAILED
        and changed_at is not None
        and now - changed_at >= FAILED_SETTLE_S
    )


def down_for_good(state: ProviderState, changed_at: float | None, now: float) -> bool:
    """Nothing will bring the unit back by itself: systemd gave up on it (`failed`), or its
    process ended with no stop job (`stopped`: Restart=on-failure does not restart a
    clean exit), and it has stayed so an instant. The caller rules out the stops that
    were meant (the user's, diversityd's own, a hold)."""
    settled = changed_at is not None and now - changed_at >= FAILED_SETTLE_S
    return settled and state in (ProviderState.FAILED, ProviderState.STOPPED)


@dataclass(frozen=True)
class RevivalPlan:
    """Reviving an owned unit that is down for good, with backoff. On the monotonic clock:
    a wall clock set back or forward moves no revival (the state file keeps wall-clock
    times, converted when read: persisted.py)."""

    attempts: int  # revivals tried since it last served
    due: float  # time.monotonic() of the next try
    last_failure: str | None  # why it went down last


def revival_due(plan: RevivalPlan, now: float) -> bool:
    return now >= plan.due


def revival_delay_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Backoff before the next revival: initial_s, doubling per attempt, at most max_s."""
    return float(min(max_s, initial_s * 2 ** min(attempts, 30)))


def hung_too_long(state: ProviderState, since: float | None, now: float, grace_s: float) -> bool:
    """An owned server hung (no answer, no CPU progress) for `grace_s`: kill it, so the
    requests it holds fail over at once and systemd's Restart= brings it back."""
    return state is ProviderState.HUNG and since is not None and now - since >= grace_s


def rewritten_in_place(accepted: ModelTarget | None, seen: ModelTarget) -> bool:
    """The accepted file itself is being rewritten (`cp` over it): the same path, other
    bytes, not whole yet. The servers that map it die (SIGBUS) and must not be restarted
    onto it until it is whole again, or the link points elsewhere."""
    return (
        accepted is not None
        and not seen.ok
        and seen.target is not None
        and seen.target == accepted.target
        and seen.identity != accepted.identity
    )
