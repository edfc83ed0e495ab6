#!/usr/bin/env python3
"""diversityctl(1) in troff, made from the click commands' own --help.

    python packaging/make-manpage.py > diversityctl.1     # or -o diversityctl.1
    man -l diversityctl.1

Every command, its usage, help text and options come from the CLI itself, so the page
cannot drift from `diversityctl --help`. The date is $SOURCE_DATE_EPOCH's (reproducible
builds), else today's.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "agent"))

from diversityd.cli.app import cli  # noqa: E402 - after the path is set

PROG = "diversityctl"
EXIT_STATUS = (
    ("0", "success (a validation with warnings included)"),
    ("2", "a bad configuration or usage, also a refused drill; nothing was changed"),
    ("1", "anything else: a provider that did not come back, a failed drill"),
)
ENVIRONMENT = (
    ("DIVERSITYD_CONFIG_DIR", "the configuration directory (what --config-dir gives)"),
    ("DIVERSITYD_CACHE_DIR", "where packaging/ put llama-server, llama-cpp-python, LiteLLM"),
    ("XDG_CONFIG_HOME, XDG_STATE_HOME, XDG_CACHE_HOME", "the defaults of the directories below"),
)
FILES = (
    ("~/.config/diversityd/", "providers.yaml, model-mappings.yaml, diversityd.yaml"),
    ("~/.config/systemd/user/", "diversityd.service and the units it writes (diversityd-*)"),
    ("~/.local/state/diversityd/", "gateway configs and history, the master key, "
     "install/manifest.json (what install wrote and adopted)"),
)


def escape(text: str) -> str:
    """Text for troff: backslashes, hyphens of options, a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def paragraphs(help_text: str) -> list[str]:
    """click's help text: paragraphs, with `\\b` blocks kept as they are written."""
    out: list[str] = []
    for block in inspect.cleandoc(help_text).split("\n\n"):
        if block.startswith("\b\n"):
            out.append(".nf\n" + escape(block[2:]) + "\n.fi")
        else:
            out.append(escape(" ".join(block.split())))
    return out


def option_items(command: click.Command, ctx: click.Context) -> Iterable[tuple[str, str]]:
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is not None:
            yield record


def section(title: str) -> str:
    return f".SH {title}"


def render(date: str, version: str) -> str:
    root = click.Context(cli, info_name=PROG, **cli.context_settings)
    out = [
        f'.TH DIVERSITYCTL 1 "{date}" "diversityd {version}" "User Commands"',
        section("NAME"),
        f"{PROG} \\- keep the local LLM servers and their LiteLLM gateway alive",
        section("SYNOPSIS"),
        f".B {PROG}",
        "[\\-\\-debug] \\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIARGS\\fR]",
        section("DESCRIPTION"),
    ]
    out += [p + "\n.PP" for p in paragraphs(cli.help or "")]
    out.append(section("OPTIONS"))
    for names, text in option_items(cli, root):
        out += [".TP", f".B {escape(names)}", escape(text)]
    out.append(section("COMMANDS"))
    for name in cli.list_commands(root):
        command = cli.get_command(root, name)
        assert command is not None
        ctx = click.Context(command, info_name=name, parent=root)
        usage = " ".join(command.collect_usage_pieces(ctx))
        out += [f".SS {escape(name)}", f".B {PROG} {escape(name)}", escape(usage), ".PP"]
        out += [p + "\n.PP" for p in paragraphs(command.help or "")]
        for names, text in option_items(command, ctx):
            out += [".TP", f".B {escape(names)}", escape(text)]
    out.append(section("EXIT STATUS"))
    for code, meaning in EXIT_STATUS:
        out += [".TP", f".B {code}", escape(meaning)]
    out.append(section("ENVIRONMENT"))
    for variable, meaning in ENVIRONMENT:
        out += [".TP", f".B {escape(variable)}", escape(meaning)]
    out.append(section("FILES"))
    for path, meaning in FILES:
        out += [".TP", f".I {escape(path)}", escape(meaning)]
    out += [
        section("SEE ALSO"),
        "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBloginctl\\fR(1), "
        "\\fBsystemd.unit\\fR(5)",
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="Render diversityctl(1) from --help.")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args()
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    date = time.strftime("%Y-%m-%d", time.gmtime(epoch))
    try:
        from importlib.metadata import version as package_version

        version = package_version("diversityd")
    except Exception:  # noqa: BLE001 - a source tree that was never installed
        version = "unknown"
    page = render(date, version)
    if args.output:
        args.output.write_text(page, encoding="utf-8")
    else:
        sys.stdout.write(page)


if __name__ == "__main__":
    main()
