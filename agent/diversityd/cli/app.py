"""diversityctl: validate, render, plan, install, status, restart, reload, failover-test,
history, rollback.

Exit codes: 0 ok, 2 bad configuration or usage, 1 anything else. Tracebacks only with --debug.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import click

from diversityd.cli.common import run_click


class LazyGroup(click.Group):
    """Each command's module loads when the command runs (or when --help lists it): `status`
    stays fast, and a command's heavy imports cost nothing to the others."""

    commands_at: ClassVar[dict[str, tuple[str, str]]] = {
        "validate": ("diversityd.cli.configcmds", "validate"),
        "render": ("diversityd.cli.configcmds", "render"),
        "plan": ("diversityd.cli.plan", "plan"),
        "install": ("diversityd.cli.install", "install"),
        "uninstall": ("diversityd.cli.uninstall", "uninstall"),
        "env": ("diversityd.cli.env", "env"),
        "completion": ("diversityd.cli.completion", "completion"),
        "status": ("diversityd.cli.status", "status"),
        "restart": ("diversityd.cli.control", "restart"),
        "stop": ("diversityd.cli.control", "stop"),
        "start": ("diversityd.cli.control", "start"),
        "reload": ("diversityd.cli.control", "reload"),
        "failover-test": ("diversityd.cli.control", "failover_test"),
        "history": ("diversityd.cli.control", "history"),
        "rollback": ("diversityd.cli.control", "rollback"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:  # noqa: ARG002 - click's
        return sorted(self.commands_at)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:  # noqa: ARG002
        where = self.commands_at.get(cmd_name)
        if where is None:
            return None
        command = getattr(importlib.import_module(where[0]), where[1])
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks of unexpected errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Keep the local LLM servers and their LiteLLM gateway alive.

    diversityctl talks to the diversityd daemon over the user bus (status, restart, stop,
    start, reload, failover-test, history, rollback), works on the configuration alone
    (validate, render, plan), installs the daemon as a systemd user service, adopting
    hand-made units (install, uninstall undoes it), and helps clients and shells (env,
    completion).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main() -> None:
    run_click(cli, "diversityctl")
