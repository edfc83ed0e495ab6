"""Logs are events: dotted names, fixed snake_case fields.

Under journald (JOURNAL_STREAM set, or asked for) each event is one native journal entry
whose fields are journal fields: `provider` becomes `PROVIDER=`, so
`journalctl --user -u diversityd PROVIDER=ollama` and `-o json` work. On a terminal a
readable console renderer; otherwise one JSON object per line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

from diversityd.adapters.journal import JournalSender, priority_of

# The field names every event may carry; values are rendered as text.
FIELDS = ("provider", "unit", "model", "elapsed_ms", "error", "state", "pid", "path", "job")


class _JournalRenderer:
    def __init__(self, sender: JournalSender) -> None:
        self.sender = sender

    def __call__(self, _logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
        fields = dict(event_dict)
        event = str(fields.pop("event", ""))
        level = str(fields.pop("level", method_name))
        fields.pop("timestamp", None)
        message = event
        details = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        if details:
            message = f"{event} {details}"
        self.sender.send(
            message=message,
            priority=priority_of(level),
            fields={"EVENT": event, **{k.upper(): _text(v) for k, v in fields.items()}},
        )
        raise structlog.DropEvent


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


def configure_logging(*, journal: bool | None = None, level: str = "info") -> None:
    """Call once per process. `journal=None`: use journald when systemd gave us a stream."""
    use_journal = journal if journal is not None else bool(os.environ.get("JOURNAL_STREAM"))
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    sender = JournalSender.connect() if use_journal else None
    if sender is not None:
        processors.append(_JournalRenderer(sender))
    elif sys.stderr.isatty():
        processors += [
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(),
        ]
    else:
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(default=str),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)
