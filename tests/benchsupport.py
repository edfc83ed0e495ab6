"""What every benchmark (bench/*.py) shares: the summary of a sample, the JSON line."""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from diversityd.embedded import StackSpec
from diversityd.privatemanager import PrivateManager
from tests.integration.harness import RunningStack, start_stack


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


@contextlib.contextmanager
def bench_stack(
    prefix: str, make_spec: Callable[[PrivateManager], StackSpec] | None = None
) -> Iterator[RunningStack]:
    """A private manager running the embedded stack and diversityd, every provider ready;
    afterwards everything is stopped and the temporary folder removed."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    manager = PrivateManager(root / "pm")
    manager.start()
    try:
        spec = make_spec(manager) if make_spec is not None else None
        running = start_stack(manager, root / "stack", spec)
        running.wait_all_ready(timeout_s=120)
        yield running
        manager.systemctl("stop", "diversityd.service", check=False)
    finally:
        manager.stop()
        shutil.rmtree(root, ignore_errors=True)
