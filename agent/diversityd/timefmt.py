"""One time format for status and logs: ISO 8601 in UTC, to the second."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def iso_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def iso_now() -> str:
    return iso_time(time.time())
