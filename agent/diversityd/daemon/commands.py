"""The control commands diversityctl sends over the bus: status, reload, restart, job,
history, rollback, failover-test. Long ones start a job and answer its id at once."""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from diversityd import __version__
from diversityd.adapters.systemd import Systemd
from diversityd.daemon.gateway import GatewayManager
from diversityd.daemon.jobs import Jobs
from diversityd.daemon.loop import StateLoop
from diversityd.daemon.models import ModelLinks
from diversityd.daemon.providers import ProviderSupervisor
from diversityd.daemon.rollout import Rollout
from diversityd.daemon.starts import Starter
from diversityd.daemon.store import Job, ProviderRecord, Store, sha256_text
from diversityd.drill import DrillMode, unprotected_models
from diversityd.errors import Severity, UsageError
from diversityd.fleet import redacted
from diversityd.log import get_logger
from diversityd.statusdoc import GatewayStatus, ProviderStatus, ReloadOutcome, StatusDocument
from diversityd.timefmt import iso_time
from diversityd.validation import check_config_dir

log = get_logger()

GATEWAY_DECISION_WAIT_S = 20.0  # how a reload reached the gateway, for its answer


class Commands:
    def __init__(
        self,
        loop: StateLoop,
        store: Store,
        systemd: Systemd,
        *,
        supervisor: ProviderSupervisor,
        rollout: Rollout,
        starter: Starter,
        models: ModelLinks,
        jobs: Jobs,
        gateway: GatewayManager | None,
    ) -> None:
        self.loop = loop
        self.store = store
        self.systemd = systemd
        self.supervisor = supervisor
        self.rollout = rollout
        self.starter = starter
        self.models = models
        self.jobs = jobs
        self.gateway = gateway

    def handlers(self) -> dict[str, Any]:
        """What the control interface calls, by method."""
        return {
            "status": self.status,
            "reload": self.reload,
            "restart": self.restart,
            "job": self.job,
            "history": self.history,
            "rollback": self.rollback,
            "failover_test": self.failover_test,
            "stop": self.stop,
            "start": self.start,
        }

    async def status(self) -> StatusDocument:
        store = self.store
        gateway: GatewayStatus = (
            self.gateway.record.to_status()
            if self.gateway is not None
            else {"owned": False, "state": "unknown"}
        )
        return {
            "daemon": {
                "running": True,
                "reason": None,
                "pid": os.getpid(),
                "version": __version__,
                "since": iso_time(store.started),
                "config_dir": str(store.config_dir),
                "unit_dir": str(self.rollout.unit_dir),
                "host": store.config.settings.host if store.config else socket.gethostname(),
                "last_reload": store.last_reload,
                "jobs_running": self.jobs.running(),
                "unit_files_error": store.unit_errors,
                "unit_render_errors": dict(store.render_errors),
                "own_unit_stale": store.own_unit_stale,
            },
            "providers": await self._providers_status(),
            "gpus": store.gpu.to_status(),
            "gateway": gateway,
            "fleet": self._fleet_status(),
        }

    def _fleet_status(self) -> dict[str, Any] | None:
        config = self.store.config
        fleet = config.settings.fleet if config is not None else None
        if fleet is None or config is None:
            return None
        status = self.store.fleet.to_status(
            time.monotonic(), fleet.probe_interval_s, redacted(fleet.redis_url)
        )
        plan = self.gateway.record.plan if self.gateway is not None else None
        if plan is not None:
            leaving = {n for n, targets in plan.fallbacks.items() if any("@" in t for t in targets)}
            status["single_host_chains"] = sorted(
                name for name in config.chains if name in plan.served_by and name not in leaving
            )
        return status

    async def _providers_status(self) -> list[ProviderStatus]:
        """Each provider's record, with what the gateway is sending it now."""
        counts = await self.gateway.in_flight() if self.gateway is not None else None
        providers = []
        for record in self.store.records.values():
            entry = record.to_status()
            entry["draining"] = record.name in self.store.draining
            entry["in_flight"] = None if counts is None else counts.get(record.name, 0)
            providers.append(entry)
        return providers

    async def reload(self) -> dict[str, Any]:
        """Validate the configuration on disk; adopt it only when it is sound."""
        store = self.store
        report = check_config_dir(store.config_dir, os.environ)
        if not report.ok:
            errors = [f.to_json() for f in report.of(Severity.ERROR)]
            rejected: ReloadOutcome = {"ok": False, "at": iso_time(time.time()), "errors": errors}
            await self.loop.call(lambda: setattr(store, "last_reload", rejected))
            log.error(
                "config.rejected",
                path=str(store.config_dir),
                error="; ".join(f.format().splitlines()[0] for f in report.of(Severity.ERROR)),
            )
            return {"ok": False, "errors": errors, "warnings": []}
        before = {r.name: r.unit for r in store.records.values() if r.unit}
        await self.loop.call(lambda: store.adopt_config(report))
        after = {r.name: r.unit for r in store.records.values() if r.unit}
        for name, unit in before.items():
            if after.get(name) != unit:
                # No longer ours to run: stop it before its file goes.
                log.info("unit.stopping", provider=name, unit=unit, state="no longer owned")
                await self.loop.call(functools.partial(store.expected_stops.add, unit))
                await self.systemd.stop(unit)
        await self.systemd.watch(list(after.values()), self.supervisor.on_systemd_change)
        await self.supervisor.refresh_snapshots(only_missing=True)
        await self.models.watch_all()
        written, job_id = await self.rollout.refresh_units("configuration reloaded")
        gateway_change: dict[str, Any] | None = None
        if self.gateway is not None:
            await self.loop.call(self.gateway.unpin)
            # in-process, a new process, or nothing: decided within a second or two
            change = await self.gateway.next_change(GATEWAY_DECISION_WAIT_S)
            gateway_change = dict(change) if change is not None else None
        self.supervisor.ensure_probe_tasks()
        added = [name for name in after if name not in before]
        if added:
            self.loop.spawn(self.starter.start_owned(only=added))
        adopted: ReloadOutcome = {
            "ok": True,
            "at": iso_time(time.time()),
            "changed": written,
            "started": added,
            "job": job_id,
        }
        await self.loop.call(lambda: setattr(store, "last_reload", adopted))
        log.info("config.reloaded", path=str(store.config_dir), job=job_id)
        return {
            "ok": True,
            "errors": [],
            "warnings": [f.to_json() for f in report.of(Severity.WARNING)],
            "restarting": written,
            "starting": added,
            "job": job_id,
            "gateway": gateway_change,
        }

    def _owned_names(self, provider: str, verb: str) -> list[str]:
        """`provider`, checked to be one diversityd owns; or every owned one."""
        records = self.store.records
        if provider:
            record = records.get(provider)
            if record is None:
                raise UsageError(
                    f"unknown provider {provider!r}", hint=f"one of: {', '.join(records)}"
                )
            if record.owned is None:
                raise UsageError(f"{provider} is watched, not owned: diversityd cannot {verb} it")
            return [provider]
        names = [r.name for r in self.store.owned_records()]
        if not names:
            raise UsageError(
                f"diversityd owns no provider to {verb}",
                hint="list some under `providers:` in diversityd.yaml",
            )
        return names

    async def restart(self, provider: str) -> dict[str, Any]:
        """Restart one provider, or every owned one but those kept down on purpose: the
        ones the user stopped (they stay stopped until `start`) and the ones held while
        their model file is rewritten (a restart would load half a file)."""
        names = self._owned_names(provider, "restart")
        records = self.store.records
        if provider and records[provider].held is not None:
            raise UsageError(
                f"{provider} is held: {records[provider].held}",
                hint=f"`diversityctl start {provider}` starts it once the file is whole",
            )
        skipped = restart_skips({name: records[name] for name in names}) if not provider else {}
        wanted = [name for name in names if name not in skipped]
        job_id = await self.jobs.submit("restart", {"providers": wanted, "skipped": skipped})
        return {"job": job_id, "providers": wanted, "skipped": skipped}

    async def stop(self, provider: str) -> dict[str, Any]:
        """Stop on purpose: it stays stopped (across daemon restarts) until `start`."""
        if not provider:
            raise UsageError("name the provider to stop", hint="diversityctl stop PROVIDER")
        (name,) = self._owned_names(provider, "stop")
        job_id = await self.jobs.submit("stop", {"provider": name})
        return {"job": job_id, "providers": [name]}

    async def start(self, provider: str) -> dict[str, Any]:
        if not provider:
            raise UsageError("name the provider to start", hint="diversityctl start PROVIDER")
        (name,) = self._owned_names(provider, "start")
        job_id = await self.jobs.submit("start", {"provider": name})
        return {"job": job_id, "providers": [name]}

    def _owned_gateway(self) -> GatewayManager:
        if self.gateway is None:
            raise UsageError("the gateway is not owned by diversityd (gateway.owned: false)")
        return self.gateway

    async def history(self) -> dict[str, Any]:
        """Newest first; `current` marks the entry in force (after a daemon restart, which
        adopted a running instance, the newest entry with its bytes)."""
        gateway = self._owned_gateway()
        entries = gateway.files.history()
        record = gateway.record
        current = record.history_id
        if current is None and record.applied_text is not None:
            applied = sha256_text(record.applied_text)
            current = next((e.id for e in entries if e.sha256 == applied), None)
        listed = [
            {
                "id": entry.id,
                "created": entry.created,
                "sha256": entry.sha256,
                "path": str(entry.path),
                "current": entry.id == current,
            }
            for entry in entries
        ]
        return {"history": listed, "pinned": record.pinned}

    async def rollback(self, entry_id: str) -> dict[str, Any]:
        """A job: a new proxy takes ~12 s to start, longer than a D-Bus call should wait."""
        gateway = self._owned_gateway()
        entry = gateway.files.find(entry_id)  # refuse an unknown id at once
        if entry is None:
            raise UsageError(
                f"no gateway config {entry_id!r} in {gateway.files.history_dir}",
                hint="list them with `diversityctl history`",
            )
        job_id = await self.jobs.submit("rollback", {"id": entry.id})
        return {"job": job_id, "id": entry.id}

    async def run_rollback_job(self, job: Job) -> dict[str, Any]:
        """Serve a config from the history again (blue/green) and pin it."""
        gateway = self._owned_gateway()
        entry = gateway.files.find(job.params["id"])
        if entry is None:
            raise UsageError(
                f"no gateway config {job.params['id']!r} in {gateway.files.history_dir}",
                hint="list them with `diversityctl history`",
            )
        text = entry.path.read_text(encoding="utf-8")
        result = await gateway.apply(text, None, reason=f"rollback to {entry.id}", pin=entry.id)
        assert result is not None  # only automatic reloads are ever dropped
        if result["ok"]:
            log.warning(
                "gateway.pinned",
                job=entry.id,
                error="automatic reloads paused until `diversityctl reload`",
            )
        return dict(result)

    async def failover_test(self, provider: str, mode: str, force: bool) -> dict[str, Any]:
        """Start a drill (a job). Refused, saying why, when it would leave a model with no
        live fallback, unless forced."""
        try:
            drill_mode = DrillMode(mode)
        except ValueError:
            raise UsageError(
                f"unknown mode {mode!r}", hint="use kill, stop, outside-stop or hang"
            ) from None
        store = self.store
        if self.gateway is None or store.config is None or store.report is None:
            raise UsageError("a drill goes through the gateway, which diversityd does not own")
        names = self._owned_names(provider, "drill")
        availability = store.availability()
        exposed = {
            name: models
            for name in names
            if (models := unprotected_models(store.config, store.catalog, availability, name))
        }
        if exposed and not force:
            detail = "; ".join(f"{p}: {', '.join(m)}" for p, m in exposed.items())
            raise UsageError(
                f"a drill would leave models with no live fallback ({detail}): their "
                "requests would fail",
                hint="give them a fallback chain in model-mappings.yaml, drill another "
                "provider, or pass --force",
            )
        params = {"providers": names, "mode": drill_mode.value}
        job_id = await self.jobs.submit("failover", params)
        return {"job": job_id, "providers": names, "mode": drill_mode.value}

    async def job(self, job_id: str) -> dict[str, Any]:
        job = self.store.jobs.get(job_id)
        if job is None:
            raise UsageError(f"no job {job_id!r}")
        return job.to_json()


def restart_skips(records: Mapping[str, ProviderRecord]) -> dict[str, str]:
    """Of the providers a restart of all would touch, those left as they are, and why."""
    skipped = {}
    for name, record in records.items():
        if record.stopped_by_user:
            skipped[name] = f"stopped on purpose: `diversityctl start {name}` starts it"
        elif record.held is not None:
            skipped[name] = f"held: {record.held}"
    return skipped
