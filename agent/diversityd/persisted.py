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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from diversityd.gpuplan import GpuSettings
from diversityd.reconcile import ModelTarget

FORMAT_VERSION = 1
STATE_FILE = "daemon-state.json"


@dataclass(frozen=True)
class Revival:
    """Reviving a unit systemd gave up on (failed): with backoff."""

    attempts: int  # revivals tried since it last served
    next_at: float  # wall clock (time.time()) of the next try: survives a daemon restart
    last_failure: str | None  # why it failed last (systemd's Result, the error)


@dataclass(frozen=True)
class Persisted:
    accepted_models: Mapping[str, ModelTarget] = field(default_factory=dict)  # by model path
    pending_rolls: Mapping[str, str] = field(default_factory=dict)  # provider -> unit's sha256
    stopped_by_user: frozenset[str] = frozenset()
    revivals: Mapping[str, Revival] = field(default_factory=dict)
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
        "gpu_settings": {
            name: {f.name: _plain(getattr(s, f.name)) for f in fields(GpuSettings)}
            for name, s in sorted(state.gpu_settings.items())
        },
        "gateway_pin": state.gateway_pin,
    }
    return json.dumps(document, indent=2) + "\n"


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class _Problems(list[str]):
    def section(self, name: str, error: Exception) -> None:
        self.append(f"{name}: {type(error).__name__}: {error}; rebuilt from systemd")


def load_persisted(text: str) -> tuple[Persisted, list[str]]:
    """The state in `text`, and what could not be read (each part that fails is dropped
    alone: the rest still counts)."""
    problems = _Problems()
    try:
        document = json.loads(text)
    except ValueError as exc:
        return Persisted(), [f"not JSON ({exc}); rebuilt from systemd and the unit files"]
    if not isinstance(document, dict):
        return Persisted(), ["not a JSON object; rebuilt from systemd and the unit files"]
    version = document.get("version")
    if not isinstance(version, int):
        problems.append("no format version; read as version 1")
    elif version > FORMAT_VERSION:
        problems.append(f"written by a newer diversityd (format {version}); read what it knows")
    values: dict[str, Any] = {}
    readers: dict[str, Callable[[Any], Any]] = {
        "accepted_models": _read_models,
        "pending_rolls": _read_pending,
        "stopped_by_user": _read_stopped,
        "revivals": _read_revivals,
        "gpu_settings": _read_gpu_settings,
        "gateway_pin": _read_pin,
    }
    for key, read in readers.items():
        if key not in document or document[key] is None:
            continue
        try:
            values[key] = read(document[key])
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            problems.section(key, exc)
    return Persisted(**values), list(problems)


def _read_models(raw: Mapping[str, Any]) -> dict[str, ModelTarget]:
    models = {}
    for path, entry in raw.items():
        target = entry["target"]
        identity = entry.get("identity")
        if not isinstance(target, str) or not isinstance(path, str):
            raise TypeError(f"{path!r}: target must be a path")
        models[path] = ModelTarget(
            path=path,
            hops=tuple(str(h) for h in entry.get("hops") or (path, target)),
            target=target,
            identity=(
                (int(identity[0]), int(identity[1]), int(identity[2]), int(identity[3]))
                if identity
                else None
            ),
        )
    return models


def _read_pending(raw: Mapping[str, Any]) -> dict[str, str]:
    return {str(name): str(sha) for name, sha in raw.items()}


def _read_stopped(raw: list[Any]) -> frozenset[str]:
    if not isinstance(raw, list):
        raise TypeError("a list of provider names")
    return frozenset(str(name) for name in raw)


def _read_revivals(raw: Mapping[str, Any]) -> dict[str, Revival]:
    return {
        str(name): Revival(
            attempts=int(entry["attempts"]),
            next_at=float(entry["next_at"]),
            last_failure=str(entry["last_failure"]) if entry.get("last_failure") else None,
        )
        for name, entry in raw.items()
    }


def _read_gpu_settings(raw: Mapping[str, Any]) -> dict[str, GpuSettings]:
    known = {f.name for f in fields(GpuSettings)}
    settings = {}
    for name, entry in raw.items():
        values = {k: v for k, v in entry.items() if k in known}
        values["warnings"] = tuple(str(w) for w in values.get("warnings") or ())
        settings[str(name)] = GpuSettings(**values)
    return settings


def _read_pin(raw: Any) -> str:
    if not isinstance(raw, str):
        raise TypeError("a history id")
    return raw
