"""Each event line in the journal says what happened in words before its fields (issue 13)."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import pytest
import structlog

from diversityd.adapters.journal import JournalSender, _JournalRenderer
from diversityd.log import EVENT_TEXT, event_text

PACKAGE = Path(__file__).resolve().parents[2] / "agent" / "diversityd"
LOG_METHODS = {"debug", "info", "warning", "error", "critical", "exception"}


def logged_events() -> dict[str, str]:
    """Every event name the daemon's code logs (`log.info("unit.started", ...)`, or through
    a chosen `log_method`), with where; both arms of a conditional name count."""
    found: dict[str, str] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func
            if not (
                (isinstance(func, ast.Attribute) and func.attr in LOG_METHODS)
                or (isinstance(func, ast.Name) and func.id.startswith("log"))  # log_method(...)
            ):
                continue
            first = node.args[0]
            names = [first.body, first.orelse] if isinstance(first, ast.IfExp) else [first]
            for name in names:
                if isinstance(name, ast.Constant) and isinstance(name.value, str):
                    found.setdefault(name.value, f"{path.name}:{node.lineno}")
    return found


def test_every_event_logged_has_its_words() -> None:
    events = logged_events()
    assert len(events) > 40  # the scan finds the daemon's events
    missing = {name: where for name, where in events.items() if name not in EVENT_TEXT}
    assert missing == {}, "add these to diversityd.log.EVENT_TEXT"
    unused = set(EVENT_TEXT) - set(events)
    assert unused == set(), "no longer logged: remove from EVENT_TEXT"


def test_the_journal_line_is_words_then_fields_and_the_fields_stay_fields() -> None:
    ours, journal = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, journal:
        renderer = _JournalRenderer(JournalSender(ours, "diversityd"))
        with pytest.raises(structlog.DropEvent):
            renderer(None, "warning", {"event": "unit.restarting", "provider": "vllm", "pid": 7})
        entry = dict(
            line.split("=", 1) for line in journal.recv(65536).decode().splitlines() if line
        )
    assert entry["MESSAGE"] == "restarting a provider: provider=vllm pid=7"
    assert entry["EVENT"] == "unit.restarting"
    assert entry["PROVIDER"] == "vllm"
    assert entry["PRIORITY"] == "4"


def test_an_event_without_words_is_read_aloud() -> None:
    assert event_text("gateway.new_thing") == "gateway new thing"
