"""diversityctl install: write and enable diversityd.service for a configuration."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from diversityd.cli.common import config_dir_option, load_report, print_findings, resolve_config_dir
from diversityd.errors import DiversitydError, Severity, UsageError


@click.command()
@config_dir_option
@click.option("--now", is_flag=True, help="Also start (or restart) diversityd.service.")
@click.option(
    "--unit-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where diversityd.service is written [default: diversityd.yaml `unit_dir`, else "
    "$XDG_CONFIG_HOME/systemd/user]; the daemon writes the providers' units to `unit_dir`.",
)
def install(config_dir: Path | None, now: bool, unit_dir: Path | None) -> None:
    """Write and enable diversityd.service (a systemd user unit) for this configuration."""
    import asyncio

    from diversityd import parts
    from diversityd.adapters.files import write_atomic
    from diversityd.adapters.systemd import Systemd
    from diversityd.adapters.unitfiles import machine_context
    from diversityd.parts import default_unit_dir
    from diversityd.units import DAEMON_UNIT, render_daemon_unit

    directory = resolve_config_dir(config_dir).resolve()
    report = load_report(directory)
    if not report.ok:
        print_findings(report.of(Severity.ERROR))
        raise UsageError("the configuration is invalid; nothing installed")
    settings_dir = report.config.settings.unit_dir
    target_dir = unit_dir or (
        Path(settings_dir).expanduser() if settings_dir else default_unit_dir()
    )
    unit = render_daemon_unit(
        str(directory),
        machine_context(sys.executable),
        environment={"DIVERSITYD_CACHE_DIR": str(parts.cache_root())},
    )
    write_atomic(target_dir / unit.name, unit.text)

    async def apply() -> None:
        systemd = await Systemd.connect()
        try:
            await systemd.reload_manager()
            await systemd.enable([DAEMON_UNIT])
            if now:
                result = await systemd.restart(DAEMON_UNIT, timeout_s=120)
                if result != "done":
                    raise DiversitydError(
                        f"diversityd.service did not start ({result})",
                        hint="journalctl --user -u diversityd",
                    )
        finally:
            systemd.disconnect()

    asyncio.run(apply())
    click.echo(f"installed {target_dir / unit.name}" + (" and started it" if now else ""))
