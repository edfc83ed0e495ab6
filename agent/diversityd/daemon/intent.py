"""What the user meant, told apart from what merely happened to a unit.

Only a stop job stops a provider on purpose (`diversityctl stop`, `systemctl --user stop`):
the manager's JobNew and JobRemoved signals, and the job's type read while it lasts, say
that one ran and whether diversityd asked for it itself (`store.expected_stops`, noted
before each of its StopUnit calls: a reload's retirement, a hold, a drain and stop, a
drill). A process that ended by itself (an exit 0; a SIGTERM from `kill` or earlyoom,
which systemd calls success) made no job, and is revived (starts.py). Watching the states
go past could not tell them apart: it may miss a stop's `deactivating`.

The handlers run in the state loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from diversityd.adapters.systemd import JobSignal
from diversityd.daemon.statefile import StateFile
from diversityd.daemon.store import ProviderRecord, Store
from diversityd.log import get_logger
from diversityd.reconcile import stopped_by_user, stops_unit
from diversityd.state import ProviderState

log = get_logger()

MAX_JOBS = 256  # jobs of watched units in flight at once: a handful in practice


@dataclass
class _Job:
    unit: str
    ours: bool  # diversityd had asked for a stop of this unit when the job appeared
    job_type: str | None = None  # None: not read (yet)


class Intent:
    def __init__(self, store: Store, statefile: StateFile) -> None:
        self.store = store
        self.statefile = statefile
        self._jobs: dict[str, _Job] = {}  # job object path -> what is known of it

    def job_pending(self, unit: str) -> bool:
        """A job of this unit runs now (its end says whether it was a stop, and whose)."""
        return any(job.unit == unit for job in self._jobs.values())

    def on_job(self, signal: JobSignal) -> None:
        if signal.phase == "new":
            ours = signal.unit in self.store.expected_stops
            self._jobs[signal.job_path] = _Job(signal.unit, ours)
            while len(self._jobs) > MAX_JOBS:  # a JobRemoved lost with a bus hiccup
                self._jobs.pop(next(iter(self._jobs)))
        elif signal.phase == "typed":
            job = self._jobs.get(signal.job_path)
            if job is not None:
                job.job_type = signal.job_type
        elif signal.phase == "removed":
            self._job_removed(signal)

    def _job_removed(self, signal: JobSignal) -> None:
        unit = signal.unit
        job = self._jobs.pop(signal.job_path, None)
        if job is None:  # queued before this daemon listened
            job = _Job(unit, unit in self.store.expected_stops)
        record = self.store.record_of_unit(unit)
        if record is None or record.owned is None:
            return
        # systemd sends the unit's last change before JobRemoved: the snapshot is current
        after = record.snapshot.active_state if record.snapshot is not None else ""
        stop_job = stops_unit(job.job_type, after)
        if stop_job:
            self.store.expected_stops.discard(unit)
        if not stopped_by_user(stop_job=stop_job, ours=job.ours, result=signal.result or ""):
            return
        record.stopped_by_user = True
        record.revival = None
        log.warning(
            "provider.stopped_by_user",
            provider=record.name,
            unit=unit,
            error="stopped outside diversityd: left stopped until started again",
        )
        self.statefile.save_in_loop()

    def on_state(self, record: ProviderRecord, state: ProviderState) -> None:
        """A state change: a provider the user stopped that runs again was started by
        someone (`systemctl --user start`); one that serves again ends its revival."""
        if record.stopped_by_user and state in (ProviderState.STARTING, ProviderState.READY):
            record.stopped_by_user = False
            self.statefile.save_in_loop()
        if state is ProviderState.READY and record.revival is not None:
            record.revival = None  # revived: the next failure starts the backoff afresh
            self.statefile.save_in_loop()
