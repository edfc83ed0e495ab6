"""Where events go: journald's native protocol (one datagram of fields per entry, no
libsystemd needed), a console, or JSON lines; `configure_logging` picks one per process.

Under journald (JOURNAL_STREAM set, or asked for) each event is one native journal entry
whose fields are journal fields: `provider` becomes `PROVIDER=`, so
`journalctl --user -u diversityd PROVIDER=ollama` and `-o json` work. On a terminal a
readable console renderer; otherwise one JSON object per line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

from diversityd.log import event_text

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITIES = {"critical": 2, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}


def priority_of(level: str) -> int:
    return _PRIORITIES.get(level.lower(), 6)


def _field_name(name: str) -> str | None:
    """Journal field names: uppercase letters, digits, '_'; not starting with '_' or a digit."""
    cleaned = "".join(ch if ch.isalnum() else "_" for ch in name.upper())
    cleaned = cleaned.lstrip("_")
    if not cleaned or cleaned[0].isdigit():
        return None
    return cleaned[:64]


def encode_entry(fields: Mapping[str, str]) -> bytes:
    parts: list[bytes] = []
    for raw_name, value in fields.items():
        name = _field_name(raw_name)
        if name is None:
            continue
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            # binary-safe form: NAME\n<64-bit little-endian length><data>\n
            parts.append(name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name.encode() + b"=" + data + b"\n")
    return b"".join(parts)


class JournalSender:
    def __init__(self, sock: socket.socket, identifier: str) -> None:
        self._sock = sock
        self._identifier = identifier

    @classmethod
    def connect(
        cls, identifier: str = "diversityd", path: str = JOURNAL_SOCKET
    ) -> JournalSender | None:
        if not os.path.exists(path):
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            return None
        return cls(sock, identifier)

    def send(self, *, message: str, priority: int, fields: Mapping[str, str]) -> None:
        entry = {
            "MESSAGE": message,
            "PRIORITY": str(priority),
            "SYSLOG_IDENTIFIER": self._identifier,
            **fields,
        }
        # A full or vanished journal must not take the daemon down.
        with contextlib.suppress(OSError):
            self._sock.send(encode_entry(entry))


class _JournalRenderer:
    def __init__(self, sender: JournalSender) -> None:
        self.sender = sender

    def __call__(self, _logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
        fields = dict(event_dict)
        event = str(fields.pop("event", ""))
        level = str(fields.pop("level", method_name))
        fields.pop("timestamp", None)
        # words first (what happened), then the fields; EVENT= keeps the dotted name
        message = event_text(event)
        details = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        if details:
            message = f"{message}: {details}"
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
