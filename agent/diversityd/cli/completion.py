"""diversityctl completion: the shell completion script (click's), for bash, zsh or fish."""

from __future__ import annotations

import click

PROG = "diversityctl"
COMPLETE_VAR = "_DIVERSITYCTL_COMPLETE"  # what click's scripts set when they ask us
SHELLS = ("bash", "zsh", "fish")


def completion_script(shell: str) -> str:
    from click.shell_completion import get_completion_class

    from diversityd.cli.app import cli

    completer = get_completion_class(shell)
    if completer is None:
        raise click.BadParameter(f"no completion for {shell}", param_hint="SHELL")
    return completer(cli, {}, PROG, COMPLETE_VAR).source()


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the completion script for SHELL (bash, zsh or fish).

    \b
    bash: eval "$(diversityctl completion bash)"        (in ~/.bashrc)
    zsh:  eval "$(diversityctl completion zsh)"         (in ~/.zshrc)
    fish: diversityctl completion fish > ~/.config/fish/completions/diversityctl.fish
    """
    click.echo(completion_script(shell))
