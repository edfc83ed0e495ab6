"""diversityd: the wiring. Builds the loop, the store, the adapters and the services, starts
them in order, and runs until SIGTERM or a lost bus.

Start-up: validate the configuration; connect to the user bus and read every owned unit's
state from systemd (a restarted daemon starts nothing twice); watch the unit folder and the
model links; plan the GPUs and write the units (the same bytes after a restart: nothing
rolls); answer on the bus; probe; start what should run; bring the gateway up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from diversityd import __version__
from diversityd.adapters.control import ControlInterface, claim_bus_name, export_interface
from diversityd.adapters.journal import configure_logging
from diversityd.adapters.notify import Notifier
from diversityd.adapters.systemd import JobSignal, Systemd
from diversityd.adapters.unitfiles import machine_context, own_unit_staleness
from diversityd.daemon.commands import Commands
from diversityd.daemon.draining import Drainer
from diversityd.daemon.drills import Drills
from diversityd.daemon.fleet import Fleet
from diversityd.daemon.gateway import GatewayManager
from diversityd.daemon.gpus import GpuPlanner
from diversityd.daemon.intent import Intent
from diversityd.daemon.jobs import Jobs
from diversityd.daemon.loop import ProbeDone, ProviderLocks, StateLoop, UnitChanged
from diversityd.daemon.metrics import Metrics
from diversityd.daemon.models import ModelLinks
from diversityd.daemon.providers import ProviderSupervisor
from diversityd.daemon.revivals import Reviver
from diversityd.daemon.rollout import STARTUP, Rollout
from diversityd.daemon.starts import Starter
from diversityd.daemon.statefile import StateFile
from diversityd.daemon.store import Store
from diversityd.daemon.web import Web
from diversityd.errors import DiversitydError, Severity
from diversityd.log import get_logger
from diversityd.parts import default_config_dir, default_unit_dir, state_dir
from diversityd.state import is_serving
from diversityd.validation import check_config_dir

log = get_logger()

STARTUP_PROBE_WAIT_S = 10.0  # at start, how long to wait for the watched providers' answers


class Daemon:
    def __init__(
        self, config_dir: Path, *, unit_dir: Path | None = None, bus_address: str | None = None
    ) -> None:
        self.store = Store(Path(os.path.realpath(config_dir)), machine_context(sys.executable))
        self.unit_dir_override = unit_dir
        self.bus_address = bus_address
        self.notifier = Notifier()
        self.loop = StateLoop()
        self._stop = asyncio.Event()
        # Set once owned units were started and watched ones probed: the gateway's first
        # render waits for it, so it does not serve a config that leaves everything out.
        self._startup_done = asyncio.Event()
        self.fleet: Fleet | None = None
        self.gateway: GatewayManager | None = None

    def _unit_dir(self) -> Path:
        if self.unit_dir_override is not None:
            return self.unit_dir_override
        config = self.store.config
        if config is not None and config.settings.unit_dir:
            return Path(os.path.expanduser(config.settings.unit_dir))
        return default_unit_dir()

    def _on_unit_changed(self, event: UnitChanged) -> None:
        if self.gateway is not None and event.unit in self.gateway.instance_units():
            self.gateway.on_unit_changed(event.unit, event.changed)
        else:
            self.supervisor.on_unit_changed(event)

    def _after_state_change(self) -> None:
        records = self.store.records.values()
        ready = sum(is_serving(r.state) for r in records)
        self.notifier.status(f"{ready}/{len(records)} providers ready")
        self._gateway_may_change()
        if self.fleet is not None:
            self.fleet.announce()  # the peers hear what this host serves now

    def _gateway_may_change(self) -> None:
        if self.gateway is not None:
            self.gateway.mark_dirty()  # it reloads only if the rendered bytes changed

    def _state_dir(self) -> Path:
        config = self.store.config
        assert config is not None
        return state_dir(config.settings.state_dir)

    def _build(self, systemd: Systemd) -> None:
        """The services, each given what it needs and nothing more."""
        loop, store = self.loop, self.store
        locks = ProviderLocks()
        metrics = self.metrics = Metrics(
            store,
            gateway=lambda: self.gateway.record if self.gateway is not None else None,
            jobs_running=lambda: len(self.jobs.running()),
        )
        metrics.providers_known(store.records)
        self.intent = Intent(store, self.statefile)
        self.supervisor = ProviderSupervisor(
            loop,
            store,
            systemd,
            locks=locks,
            intent=self.intent,
            metrics=metrics,
            on_state_change=self._after_state_change,
            on_models_change=self._gateway_may_change,
        )
        assert store.config is not None
        if store.config.settings.gateway.owned:
            self.gateway = GatewayManager(
                loop,
                store,
                systemd,
                self.statefile,
                metrics,
                on_unit_change=self.supervisor.on_systemd_change,
            )
        self.jobs = Jobs(loop, store)
        gateway = self.gateway
        drainer = Drainer(
            loop,
            store,
            record=gateway.record if gateway is not None else None,
            paths=gateway.paths if gateway is not None else None,
            instances=store.config.settings.gateway.instances,
            wake=self._gateway_may_change,
        )
        self.planner = GpuPlanner(
            loop,
            store,
            self.statefile,
            metrics,
            restarting=locks.any_locked,
            # The rollout is built next, on this planner: reach it when called.
            refresh_units=lambda reason: self.rollout.refresh_units(reason),  # noqa: PLW0108
        )
        self.starter = Starter(
            loop,
            store,
            systemd,
            locks=locks,
            statefile=self.statefile,
            metrics=metrics,
            drainer=drainer,
            report=self.jobs.report,
        )
        self.reviver = Reviver(
            loop,
            store,
            locks=locks,
            statefile=self.statefile,
            metrics=metrics,
            intent=self.intent,
            start_unit=self.starter.start_unit,
        )
        self.rollout = Rollout(
            loop,
            store,
            systemd,
            supervisor=self.supervisor,
            planner=self.planner,
            starter=self.starter,
            jobs=self.jobs,
            locks=locks,
            statefile=self.statefile,
            metrics=metrics,
            unit_dir=self._unit_dir(),
            own_units=gateway.units if gateway is not None else list,
            drainer=drainer,
            revive_now=self.reviver.revive_now,
        )
        self.models = ModelLinks(
            loop,
            store,
            self.rollout.unit_dir,
            refresh_units=self.rollout.refresh_units,
            hold=self.starter.hold,
            release=self.starter.release,
        )
        self.commands = Commands(
            loop,
            store,
            systemd,
            supervisor=self.supervisor,
            rollout=self.rollout,
            starter=self.starter,
            models=self.models,
            jobs=self.jobs,
            gateway=gateway,
        )
        self.jobs.register("restart", self.rollout.run_restart_job)
        self.jobs.register("start", self.starter.run_start_job)
        self.jobs.register("stop", self.starter.run_stop_job)
        self.jobs.register("rollback", self.commands.run_rollback_job)
        if gateway is not None:
            drills = Drills(
                loop,
                store,
                systemd,
                jobs=self.jobs,
                locks=locks,
                gateway=gateway,
                metrics=metrics,
                drainer=drainer,
            )
            self.jobs.register("failover", drills.run_job)
        self.web = Web(store, metrics=metrics.exposition)
        loop.on(UnitChanged, self._on_unit_changed)
        loop.on(ProbeDone, self.supervisor.on_probe)
        loop.on(JobSignal, self.intent.on_job)

    async def _start_then_mark_ready(self) -> None:
        try:
            await self.starter.start_owned()
        except Exception as exc:  # noqa: BLE001 - the gateway must still come up
            log.error("daemon.start_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self.reviver.startup_finished = True  # what is stopped from now on ended
        await self.loop.wait_until(
            lambda: all(
                r.probe is not None for r in self.store.records.values() if r.owned is None
            ),
            STARTUP_PROBE_WAIT_S,
        )
        self._startup_done.set()

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval / 3)

    async def run(self) -> int:
        store, loop = self.store, self.loop
        report = check_config_dir(store.config_dir, os.environ)
        if not report.ok:
            for finding in report.of(Severity.ERROR):
                log.error("config.invalid", error=finding.format())
            self.notifier.send("STATUS=invalid configuration; see the journal")
            return 2
        event_loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            event_loop.add_signal_handler(signum, self._stop.set)
        loop.spawn(loop.run(), name="state")
        await loop.call(lambda: store.adopt_config(report))
        store.unit_context = dataclasses.replace(
            store.unit_context, env_dir=str(self._state_dir() / "env")
        )
        self.statefile = StateFile(loop, store, self._state_dir())
        # One daemon at a time: the bus name first, before anything is read, thawed,
        # written, stopped or retired (a second daemon would undo the first one's work).
        systemd = await Systemd.connect(self.bus_address)
        await claim_bus_name(systemd.bus)
        persisted = self.statefile.load()
        await loop.call(lambda: store.adopt_persisted(persisted))
        self._build(systemd)
        owned_units = [r.unit for r in store.records.values() if r.unit]
        systemd.watch_jobs(loop.post)
        await systemd.watch(owned_units, self.supervisor.on_systemd_change)
        await self.supervisor.refresh_snapshots()
        await self.supervisor.thaw_frozen()
        unit_dir = self.rollout.unit_dir
        stale = own_unit_staleness(unit_dir, str(store.config_dir), sys.executable)
        if stale:
            log.warning("daemon.unit_stale", error=stale)
            await loop.call(lambda: setattr(store, "own_unit_stale", stale))
        self.rollout.watch_unit_dir(event_loop)
        loop.spawn(self.rollout.restore_loop(), name="restore")
        loop.spawn(self.rollout.retry_loop(), name="retry")
        self.models.start(event_loop)
        await self.models.watch_all(persisted.accepted_models)
        # Units are written once the models are resolved and the GPU planned: a daemon
        # restart renders the same bytes, writes nothing and restarts nothing.
        await self.rollout.refresh_units(STARTUP)
        control = ControlInterface(self.commands.handlers())
        self.jobs.on_progress = lambda job_id, p: control.JobProgress(job_id, json.dumps(p))
        self.jobs.on_finished = lambda job_id, p: control.JobFinished(job_id, json.dumps(p))
        await export_interface(systemd.bus, control)
        assert store.config is not None
        http = store.config.settings.http
        if http.port:
            await self.web.start(http.host, http.port)
        self.supervisor.ensure_probe_tasks()
        loop.spawn(self._watchdog(), name="watchdog")
        loop.spawn(self.planner.watch(), name="gpus")
        loop.spawn(self.reviver.revival_loop(), name="revival")
        loop.spawn(self._start_then_mark_ready(), name="start-up")
        if self.gateway is not None:
            loop.spawn(self.gateway.supervise(self._startup_done), name="gateway")
        fleet_settings = store.config.settings.fleet
        if fleet_settings is not None:
            self.fleet = Fleet(loop, store, fleet_settings, self.metrics,
                               wake=self._gateway_may_change)  # fmt: skip
            loop.spawn(self.fleet.run(self._startup_done), name="fleet")
        log.info("daemon.ready", path=str(store.config_dir), unit=str(unit_dir), pid=os.getpid())
        self.notifier.ready(f"watching {len(store.records)} providers")
        lost_bus = asyncio.ensure_future(systemd.bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
        stopped = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({lost_bus, stopped}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if lost_bus.done() and not stopped.done():
            # Blind without the bus (no unit events, no control): let systemd restart us.
            log.error("daemon.bus_lost", error="the user bus connection closed")
            code = 1
        stopped.cancel()
        lost_bus.cancel()
        self.notifier.stopping()
        log.info("daemon.stopping", pid=os.getpid())
        self.rollout.close()
        self.models.close()
        self.web.close()
        with contextlib.suppress(Exception):
            await loop.cancel_tasks()
        if self.fleet is not None:
            await self.fleet.close()
        with contextlib.suppress(Exception):
            systemd.disconnect()
        return code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="diversityd",
        description="Keep the local LLM servers and their LiteLLM gateway alive "
        "(runs as a systemd user service; see `diversityctl install`).",
    )
    parser.add_argument(
        "--config-dir",
        type=Path,
        default=os.environ.get("DIVERSITYD_CONFIG_DIR") or None,
        help="directory holding providers.yaml, model-mappings.yaml and diversityd.yaml "
        "[default: $XDG_CONFIG_HOME/diversityd]",
    )
    parser.add_argument("--unit-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--version", action="version", version=f"diversityd {__version__}")
    args = parser.parse_args(argv)
    configure_logging(level=args.log_level)
    daemon = Daemon(args.config_dir or default_config_dir(), unit_dir=args.unit_dir)
    try:
        code = asyncio.run(daemon.run())
    except DiversitydError as exc:
        log.error("daemon.failed", error=str(exc))
        code = exc.exit_code
    sys.exit(code)
