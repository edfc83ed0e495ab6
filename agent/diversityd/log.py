"""Logs are events: dotted names, fixed snake_case fields (`FIELDS`).

The core only names events (`get_logger().info("unit.started", provider=...)`); where they
go is set once per process by adapters/journal.py's `configure_logging` (journald's native
fields, a console, or JSON lines).
"""

from __future__ import annotations

from typing import Any

import structlog

# The field names every event may carry; values are rendered as text.
FIELDS = ("provider", "unit", "model", "elapsed_ms", "error", "state", "pid", "path", "job")


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)
