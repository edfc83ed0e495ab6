"""diversityctl status: the daemon's status document (over a light blocking D-Bus client:
the fast path), or, when the daemon is down, what systemd and a quick probe say."""

from __future__ import annotations

import json
from pathlib import Path

import click

from diversityd.cli.common import config_dir_option, resolve_config_dir
from diversityd.errors import ConfigError, DiversitydError
from diversityd.statusdoc import StatusDocument, format_status


async def _status_from_systemd(config_dir: Path, reason: str) -> StatusDocument:
    """The daemon is down: say what systemd (and a quick probe) says about each provider."""
    import time

    from diversityd import __version__
    from diversityd.adapters import probes
    from diversityd.adapters.systemd import Systemd, SystemdError
    from diversityd.config import load_config
    from diversityd.state import derive_state, unit_state
    from diversityd.statusdoc import NO_GPU_STATUS, ProviderStatus, probe_status
    from diversityd.units import unit_name

    providers: list[ProviderStatus] = []
    try:
        config, _ = load_config(config_dir)
    except ConfigError:
        config = None
    try:
        systemd: Systemd | None = await Systemd.connect()
    except SystemdError:
        systemd = None
    if config is not None:
        client = probes.new_client(0.5)
        try:
            for name, provider in config.providers.items():
                if not provider.active:
                    continue
                owned = name in config.settings.owned
                unit = unit_name(name) if owned else None
                snapshot = await systemd.snapshot(unit) if systemd and unit else None
                probe = None
                if provider.is_local and (not owned or unit_state(snapshot) is None):
                    probe = await probes.probe(client, provider, 0.5)
                state = derive_state(
                    owned=owned,
                    unit=snapshot,
                    probe=probe,
                    answered_since_start=bool(probe and probe.ok),
                )
                providers.append(
                    {
                        "name": name,
                        "owned": owned,
                        "unit": unit,
                        "state": state.value,
                        "pid": snapshot.main_pid if snapshot and snapshot.main_pid else None,
                        "since": None,
                        "models": [],
                        "probe": probe_status(probe, time.monotonic()) if probe else None,
                        "n_gpu_layers": None,
                        "vram_mib": None,
                        "gpu_warnings": [],
                        "error": None if probe is None or probe.ok else probe.error,
                        "type": provider.type,
                        "base_url": provider.base_url,
                        "state_since": None,
                        "restarts": snapshot.n_restarts if snapshot else None,
                        "last_unit_event_monotonic": None,
                        "last_state_change_monotonic": None,
                        "last_exit_monotonic": None,
                        "left_ready_monotonic": None,
                        "models_missing": [],
                        "models_extra": [],
                        "model_file": None,
                        "stopped_by_user": False,
                        "revival": None,
                    }
                )
        finally:
            await client.aclose()
    if systemd is not None:
        systemd.disconnect()
    return {
        "daemon": {
            "running": False,
            "reason": reason,
            "pid": None,
            "version": __version__,
            "since": None,
            "config_dir": str(config_dir),
            "unit_dir": None,
            "host": config.settings.host if config else None,
            "last_reload": None,
            "jobs_running": [],
            "unit_files_error": None,
        },
        "providers": providers,
        "gpus": NO_GPU_STATUS,
        "gateway": {"owned": False, "state": "unknown"},
    }


def _fetch_status(config_dir: Path) -> StatusDocument:
    """The daemon's answer over a light blocking client (the fast path); when the daemon
    is not there, what systemd and a quick probe say."""
    from diversityd.adapters import busclient

    try:
        answer = busclient.call_string(
            busclient.session_bus_address(),
            busclient.BUS_NAME,
            busclient.OBJECT_PATH,
            busclient.INTERFACE,
            "Status",
            timeout_s=5,
        )
    except busclient.BusCallError as exc:
        if exc.name not in busclient.NO_SUCH_NAME:
            raise DiversitydError(f"the daemon failed to answer: {exc}") from exc
        reason = "diversityd is not running on the user bus"
    except OSError as exc:
        reason = f"no user bus: {exc}"
    else:
        document: StatusDocument = json.loads(answer)
        return document
    import asyncio  # only now: the fast path does without it

    return asyncio.run(_status_from_systemd(config_dir, reason))


@click.command()
@config_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(config_dir: Path | None, as_json: bool) -> None:
    """Show every provider: unit, state, PID, uptime, probe, models, GPU layers, VRAM.

    When the daemon is not running, shows what systemd says and that the daemon is down.
    """
    document = _fetch_status(resolve_config_dir(config_dir))
    click.echo(json.dumps(document, indent=2) if as_json else format_status(document))
