"""journald's native protocol: one datagram of fields per entry (no libsystemd needed)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Mapping

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
