"""diversityctl env: how a shell reaches the gateway (`eval "$(diversityctl env)"`)."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from diversityd.cli.common import config_dir_option, print_findings, resolve_config_dir
from diversityd.errors import DiversitydError, Severity, UsageError

ANY_ADDRESS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - recognised, never bound


def gateway_url(host: str, port: int) -> str:
    from diversityd.units import listen_address

    return f"http://{listen_address('127.0.0.1' if host in ANY_ADDRESS else host, port)}/v1"


def key_file_of(master_key_file: str | None, state_dir: str | None) -> Path:
    """Where the gateway's key is: as the daemon decides it (gateway.master_key_file, else
    `<state_dir>/master.key`)."""
    import os

    from diversityd import parts

    if master_key_file:
        return Path(os.path.expanduser(master_key_file))
    return parts.state_dir(state_dir) / "master.key"


@click.command("env")
@config_dir_option
@click.option(
    "--show-key",
    is_flag=True,
    help="Also export OPENAI_API_KEY with the key itself (for eval; it is printed).",
)
def env(config_dir: Path | None, show_key: bool) -> None:
    """Print `export OPENAI_BASE_URL=...` for the gateway, and where its key is.

    `eval "$(diversityctl env --show-key)"` exports OPENAI_API_KEY too (the key file
    holds the key, or `LITELLM_MASTER_KEY=...` when an older diversityd wrote it).
    """
    from diversityd.adapters.litellm import key_file_problem, read_master_key
    from diversityd.config import load_config

    directory = resolve_config_dir(config_dir)
    config, findings = load_config(directory)
    if config is None:
        print_findings([f for f in findings if f.severity is Severity.ERROR])
        raise UsageError(f"the configuration in {directory} cannot be read")
    settings = config.settings
    gateway = settings.gateway
    key_file = key_file_of(gateway.master_key_file, settings.state_dir)
    if not gateway.owned:
        click.echo("# gateway.owned is false: diversityd does not run this gateway", err=True)
    click.echo(f"export OPENAI_BASE_URL={shlex.quote(gateway_url(gateway.host, gateway.port))}")
    if not show_key:
        click.echo(f"# the key is in {key_file};")
        click.echo('# export it too with: eval "$(diversityctl env --show-key)"')
        return
    if not key_file.exists():
        raise DiversitydError(
            f"no key file at {key_file} yet",
            hint="diversityd writes it when it first starts the gateway: "
            "systemctl --user start diversityd",
        )
    problem = key_file_problem(key_file)
    if problem:
        click.echo(f"# warning: {problem}", err=True)
    try:
        key = read_master_key(key_file)
    except (OSError, ValueError) as exc:
        raise DiversitydError(str(exc), hint=f"write the key (sk-...) in {key_file}") from None
    click.echo(f"export OPENAI_API_KEY={shlex.quote(key)}")
