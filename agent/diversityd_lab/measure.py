"""What every benchmark (bench/*.py) shares: the summary of a sample, the JSON line."""

from __future__ import annotations

import json
import statistics
from typing import Any


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "n": len(values),
    }


def emit(result: dict[str, Any]) -> None:
    """The benchmark's result: one JSON object, the last line of stdout."""
    print(json.dumps(result), flush=True)
