"""What the daemon decided that must outlive it, as a versioned JSON document. Pure.

A restarted daemon (a crash, the watchdog, an upgrade) must not undo what was decided:
the model files it accepted (a bad link met at start must not reach a restart), the units
whose new file is written but not yet rolled, the providers the user stopped on purpose,
the revival backoff of failed units, the last GPU plan's word per unit (kept when NVML
fails at start), and a rollback's pin of the gateway config.

The file lives in the state directory and is written atomically. A newer daemon reads an
older file (missing keys take their defaults); a file it cannot read is reported and the
daemon rebuilds what it can from systemd and the unit files, never crashing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from diversityd.config import SERVER_KINDS
from diversityd.gpuplan import GpuSettings
from diversityd.reconcile import ModelTarget, RevivalPlan
from diversityd.units import UNSAFE_CHARACTERS

FORMAT_VERSION = 1
STATE_FILE = "daemon-state.json"


@dataclass(frozen=True)
class Revival:
    """A revival's backoff as the file keeps it (reconcile.RevivalPlan in memory)."""

    attempts: int  # revivals tried since it last served
    next_at: float  # wall clock (time.time()) of the next try: survives a daemon restart
    last_failure: str | None  # why it went down last (systemd's Result, the error)


def revival_on_disk(plan: RevivalPlan, *, wall_now: float, monotonic_now: float) -> Revival:
    """The monotonic due time as a wall-clock one (a new daemon has another monotonic
    origin only after a reboot, but a wall-clock time reads the same in any process)."""
    next_at = round(wall_now + (plan.due - monotonic_now), 2)
    return Revival(plan.attempts, max(0.0, next_at), plan.last_failure)


def revival_in_memory(
    saved: Revival, *, wall_now: float, monotonic_now: float, max_s: float
) -> RevivalPlan:
    """Back on the monotonic clock, never further off than the longest backoff (a clock
    set back, a damaged file) and never in the past (due now)."""
    ahead = min(max(saved.next_at - wall_now, 0.0), max_s)
    return RevivalPlan(saved.attempts, monotonic_now + ahead, saved.last_failure)


@dataclass(frozen=True)
class Persisted:
    accepted_models: Mapping[str, ModelTarget] = field(default_factory=dict)  # by model path
    pending_rolls: Mapping[str, str] = field(default_factory=dict)  # provider -> unit's sha256
    stopped_by_user: frozenset[str] = frozenset()
    revivals: Mapping[str, Revival] = field(default_factory=dict)
    held: Mapping[str, str] = field(default_factory=dict)  # provider -> why it is held
    gpu_settings: Mapping[str, GpuSettings] = field(default_factory=dict)
    gateway_pin: str | None = None


def dump_persisted(state: Persisted) -> str:
    document = {
        "version": FORMAT_VERSION,
        "accepted_models": {
            path: {
                "hops": list(t.hops),
                "target": t.target,
                "identity": list(t.identity) if t.identity else None,
            }
            for path, t in sorted(state.accepted_models.items())
            if t.ok
        },
        "pending_rolls": dict(sorted(state.pending_rolls.items())),
        "stopped_by_user": sorted(state.stopped_by_user),
        "revivals": {
            name: {"attempts": r.attempts, "next_at": r.next_at, "last_failure": r.last_failure}
            for name, r in sorted(state.revivals.items())
        },
        "held": dict(sorted(state.held.items())),
        "gpu_settings": {
            name: {f.name: _plain(getattr(s, f.name)) for f in fields(GpuSettings)}
            for name, s in sorted(state.gpu_settings.items())
        },
        "gateway_pin": state.gateway_pin,
    }
    return json.dumps(document, indent=2) + "\n"


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# Bounds on what a state file may say: past them an entry is damaged, not believed.
MAX_STATE_BYTES = 4 << 20  # the file itself (a few KiB in practice)
MAX_WALL_TIME = float(2**33)  # a revival's next try (the year 2242: a date still prints)
MAX_ATTEMPTS = 1_000_000
MAX_TEXT = 4096  # a path, a reason, a name
MAX_COUNT = 1 << 52  # layers, bytes, ids: integers a float holds exactly
MAX_HOPS = 64  # links followed to a model file
MAX_WARNINGS = 64

_SAFE_ID = re.compile(r"^[A-Za-z0-9_.:+-]{1,200}$")  # a history id, a sha256


class _DamagedError(ValueError):
    """One entry (or section) of the file is not what this daemon writes."""


def load_persisted(text: str) -> tuple[Persisted, list[str]]:
    """The state in `text`, and what could not be read. Any JSON at all is read without
    raising: each damaged entry is dropped alone (the rest still counts) and reported."""
    problems: list[str] = []
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        why = "nested too deep" if isinstance(exc, RecursionError) else str(exc)
        return Persisted(), [f"not JSON ({why}); rebuilt from systemd and the unit files"]
    if not isinstance(document, dict):
        return Persisted(), ["not a JSON object; rebuilt from systemd and the unit files"]
    version = document.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        problems.append("no format version; read as version 1")
    elif version > FORMAT_VERSION:
        problems.append(f"written by a newer diversityd (format {version}); read what it knows")
    values: dict[str, Any] = {}
    readers: dict[str, Callable[[Any, list[str]], Any]] = {
        "accepted_models": _read_models,
        "pending_rolls": _read_pending,
        "stopped_by_user": _read_stopped,
        "revivals": _read_revivals,
        "held": _read_held,
        "gpu_settings": _read_gpu_settings,
        "gateway_pin": _read_pin,
    }
    for key, read in readers.items():
        if key not in document or document[key] is None:
            continue
        damaged: list[str] = []
        try:
            values[key] = read(document[key], damaged)
        except _DamagedError as exc:
            damaged.append(str(exc))
        problems += [f"{key}: {why}; rebuilt from systemd and the unit files" for why in damaged]
    return Persisted(**values), problems


def _entries(raw: Any, damaged: list[str]) -> Iterator[tuple[str, Any]]:
    """The entries of a JSON object section; each one `read` refuses is dropped alone."""
    if not isinstance(raw, dict):
        raise _DamagedError(f"not a JSON object but {_kind(raw)}")
    for name, entry in raw.items():
        if len(name) > MAX_TEXT or UNSAFE_CHARACTERS.search(name):
            damaged.append(f"an entry's name is not a name ({name[:40]!r})")
            continue
        yield name, entry


def _each(raw: Any, damaged: list[str], read: Callable[[str, Any], Any]) -> dict[str, Any]:
    result = {}
    for name, entry in _entries(raw, damaged):
        try:
            result[name] = read(name, entry)
        except _DamagedError as exc:
            damaged.append(f"{name!r}: {exc}")
    return result


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(value: Any, what: str, *, path: bool = False) -> str:
    """A string that may reach a unit file or a status line: one line, bounded."""
    if not isinstance(value, str) or not value:
        raise _DamagedError(f"{what} is {_kind(value)}, not a string")
    if len(value) > MAX_TEXT or UNSAFE_CHARACTERS.search(value):
        raise _DamagedError(f"{what} is not one line of at most {MAX_TEXT} characters")
    if path and not value.startswith("/"):
        raise _DamagedError(f"{what} is not an absolute path")
    return value


def _integer(value: Any, what: str, low: int, high: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _DamagedError(f"{what} is not an integer in [{low}, {high}]")
    return value


def _optional_integer(value: Any, what: str, low: int) -> int | None:
    return None if value is None else _integer(value, what, low)


def _number(value: Any, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _DamagedError(f"{what} is {_kind(value)}, not a number")
    if not low <= value <= high:  # NaN fails this too
        raise _DamagedError(f"{what} is out of [{low:g}, {high:g}]")
    return float(value)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _DamagedError(f"{what} is {_kind(value)}, not a JSON object")
    return value


def _read_models(raw: Any, damaged: list[str]) -> dict[str, ModelTarget]:
    def read(path: str, entry: Any) -> ModelTarget:
        _text(path, "the model path", path=True)
        body = _object(entry, "the entry")
        target = _text(body.get("target"), "target", path=True)
        hops = body.get("hops") or [path, target]
        if not isinstance(hops, list) or len(hops) > MAX_HOPS:
            raise _DamagedError(f"hops is not a list of at most {MAX_HOPS} paths")
        identity = body.get("identity")
        if identity is not None and (not isinstance(identity, list) or len(identity) != 4):
            raise _DamagedError("identity is not [device, inode, size, mtime_ns]")
        device, inode, size, mtime_ns = (
            _integer(n, "identity", -(2**63), 2**64) for n in identity or (0, 0, 0, 0)
        )
        return ModelTarget(
            path=path,
            hops=tuple(_text(hop, "a hop", path=True) for hop in hops),
            target=target,
            identity=(device, inode, size, mtime_ns) if identity is not None else None,
        )

    return _each(raw, damaged, read)


def _read_pending(raw: Any, damaged: list[str]) -> dict[str, str]:
    def read(_name: str, sha: Any) -> str:
        if not isinstance(sha, str) or not _SAFE_ID.match(sha):
            raise _DamagedError("not a sha256")
        return sha

    return _each(raw, damaged, read)


def _read_stopped(raw: Any, damaged: list[str]) -> frozenset[str]:
    if not isinstance(raw, list):
        raise _DamagedError(f"not a list of provider names but {_kind(raw)}")
    names = set()
    for item in raw:
        try:
            names.add(_text(item, "a provider name"))
        except _DamagedError as exc:
            damaged.append(str(exc))
    return frozenset(names)


def _read_revivals(raw: Any, damaged: list[str]) -> dict[str, Revival]:
    def read(_name: str, entry: Any) -> Revival:
        body = _object(entry, "the entry")
        failure = body.get("last_failure")
        return Revival(
            attempts=_integer(body.get("attempts"), "attempts", 0, MAX_ATTEMPTS),
            next_at=_number(body.get("next_at"), "next_at", 0.0, MAX_WALL_TIME),
            last_failure=None if failure in (None, "") else _text(failure, "last_failure"),
        )

    return _each(raw, damaged, read)


def _read_held(raw: Any, damaged: list[str]) -> dict[str, str]:
    return _each(raw, damaged, lambda _name, reason: _text(reason, "the reason"))


def _read_gpu_settings(raw: Any, damaged: list[str]) -> dict[str, GpuSettings]:
    def read(name: str, entry: Any) -> GpuSettings:
        body = _object(entry, "the entry")
        hide_gpu = body.get("hide_gpu", False)
        if not isinstance(hide_gpu, bool):
            raise _DamagedError("hide_gpu is not true or false")
        utilization = body.get("gpu_memory_utilization")
        server = body.get("server", "")
        if server not in ("", *SERVER_KINDS):
            raise _DamagedError("server is not a server kind")
        warnings = body.get("warnings") or []
        if not isinstance(warnings, list) or len(warnings) > MAX_WARNINGS:
            raise _DamagedError("warnings is not a list")
        return GpuSettings(
            provider=_text(body.get("provider", name), "provider"),
            n_gpu_layers=_optional_integer(body.get("n_gpu_layers"), "n_gpu_layers", -1),
            hide_gpu=hide_gpu,
            gpu_memory_utilization=None
            if utilization is None
            else _number(utilization, "gpu_memory_utilization", 0.0, 1.0),
            ollama_gpu_overhead_bytes=_optional_integer(
                body.get("ollama_gpu_overhead_bytes"), "ollama_gpu_overhead_bytes", 0
            ),
            vram_bytes=_optional_integer(body.get("vram_bytes"), "vram_bytes", 0),
            warnings=tuple(_text(w, "a warning") for w in warnings),
            server=server,
            gpu=_optional_integer(body.get("gpu"), "gpu", 0),
        )

    return _each(raw, damaged, read)


def _read_pin(raw: Any, _damaged: list[str]) -> str:
    if not isinstance(raw, str) or not _SAFE_ID.match(raw):
        raise _DamagedError("not a history id")
    return raw
