"""How a change reaches a running gateway: in-process, or only through a new process. Pure.

The daemon renders the gateway's config from the providers' state (gateway.py). A running
LiteLLM instance can take new routes (deployments and fallbacks) over its control channel
in milliseconds; everything else in the config is read once, when the process starts
(`max_fallbacks`, `disable_cooldowns`, `litellm_settings`, `general_settings`, ...), and so
is the code it runs (the launcher, LiteLLM itself). Only a change there, or an instance
whose channel does not answer, is worth a new process (seconds of CPU and ~400 MiB beside
the serving one).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diversityd.gateway import process_settings_of


class Change(enum.StrEnum):
    NONE = "none"  # the instance serves what is rendered
    ROUTES = "in-process"  # new routes over the control channel
    PROCESS = "new process"  # blue/green (or one instance after the other)


@dataclass(frozen=True)
class InstanceView:
    """What a running instance said over its channel (`answered` False: it did not)."""

    color: str
    answered: bool
    error: str | None = None
    started_document: Mapping[str, Any] | None = None
    launcher_sha: str | None = None
    litellm: str | None = None
    routes_digest: str | None = None
    pid: int | None = None


@dataclass(frozen=True)
class Wanted:
    """What should run: the rendered config's fixed part and routes, the code on disk."""

    process_settings: Mapping[str, Any]
    routes_digest: str
    launcher_sha: str
    litellm: str | None  # the installed version; None: unknown, not compared


@dataclass(frozen=True)
class Decision:
    change: Change
    reason: str


def normalized(value: Any) -> Any:
    """YAML read back and Python values compare alike (tuples are lists, keys are text)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def changed_keys(
    running: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """Key paths whose values differ, e.g. `litellm_settings.cache`."""
    keys: list[str] = []
    for key in sorted(set(running) | set(wanted), key=str):
        path = f"{prefix}{key}"
        left, right = running.get(key), wanted.get(key)
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            keys += changed_keys(left, right, f"{path}.")
        elif normalized(left) != normalized(right):
            keys.append(path)
    return keys


def why_new_process(instance: InstanceView, wanted: Wanted) -> str | None:
    """Why this instance cannot take the change in-process, or None."""
    if not instance.answered:
        return f"its control channel does not answer ({instance.error or 'no answer'})"
    if instance.launcher_sha != wanted.launcher_sha:
        return "the gateway launcher changed"
    if wanted.litellm is not None and instance.litellm != wanted.litellm:
        return f"LiteLLM {instance.litellm} runs, {wanted.litellm} is installed"
    running = process_settings_of(instance.started_document or {})
    keys = changed_keys(running, wanted.process_settings)
    if keys:
        return "settings fixed at a process's start changed: " + ", ".join(keys)
    return None


def decide(instances: list[InstanceView], wanted: Wanted) -> dict[str, Decision]:
    """Per running instance: what brings it to what is wanted."""
    decisions: dict[str, Decision] = {}
    for instance in instances:
        reason = why_new_process(instance, wanted)
        if reason is not None:
            decisions[instance.color] = Decision(Change.PROCESS, reason)
        elif instance.routes_digest != wanted.routes_digest:
            decisions[instance.color] = Decision(Change.ROUTES, "the providers' state changed")
        else:
            decisions[instance.color] = Decision(Change.NONE, "in sync")
    return decisions
