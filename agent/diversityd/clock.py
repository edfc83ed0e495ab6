"""The time fleet decisions read: this machine's clock, shifted by an offset.

Hosts in the lab share one kernel, so one clock: skew between them cannot be made outside
the process. Code that compares times across hosts (leases, heartbeats in Redis) reads
`now()` from here, and a test or a lab host shifts it with `DIVERSITYD_CLOCK_OFFSET_S`
(seconds, may be negative; read once at import) or `set_offset`. Existing callers of
`time.time()` are not fleet decisions and stay as they are.

`monotonic()` is not shifted: monotonic readings are only ever subtracted from readings of
the same process, where a constant offset cancels out.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping

OFFSET_ENV = "DIVERSITYD_CLOCK_OFFSET_S"
MAX_OFFSET_S = 86400.0 * 365  # a year: anything larger is a typo, not a skew to test


def parse_offset(text: str | None) -> float:
    """The offset a `DIVERSITYD_CLOCK_OFFSET_S` value names (unset or empty: 0)."""
    if text is None or not text.strip():
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{OFFSET_ENV}={text!r} is not a number of seconds") from None
    if not math.isfinite(value) or abs(value) > MAX_OFFSET_S:
        raise ValueError(f"{OFFSET_ENV}={text!r} is not a finite offset of at most a year")
    return value


def offset_from_environment(environ: Mapping[str, str]) -> float:
    return parse_offset(environ.get(OFFSET_ENV))


_offset_s = offset_from_environment(os.environ)


def offset() -> float:
    return _offset_s


def set_offset(seconds: float) -> None:
    """Shift `now()` (tests; a process's offset otherwise comes from its environment)."""
    global _offset_s
    _offset_s = parse_offset(repr(seconds))


def now() -> float:
    """Seconds since the epoch, as this host's (possibly skewed) clock says."""
    return time.time() + _offset_s


def monotonic() -> float:
    return time.monotonic()
