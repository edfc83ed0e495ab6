"""Failover drills: what may be drilled, and what a drill's answers say. Pure.

A drill takes one owned provider down (kill, stop or hang) while requests for each model
it serves flow through the gateway, waits until the gateway has settled, restores the
provider and checks it serves again. These functions decide whether a drill is safe and
summarize the answers; the daemon runs the drill (I/O) as a job.
"""

from __future__ import annotations

import enum
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from diversityd.catalog import Catalog
from diversityd.config import Config
from diversityd.gateway import JUDGED_INFO, Availability, GatewayPlan, render_gateway


@dataclass(frozen=True)
class Answer:
    """One request through the gateway, as a client saw it."""

    model: str
    stream: bool
    ok: bool
    status: int | None
    started: float  # time.monotonic()
    latency_ms: float
    api_base: str | None
    attempted_fallbacks: int
    error: str | None = None
    # a stream that broke after content had come: the process sending it died mid-answer,
    # and nothing can move a half-sent answer to another server (the client retries it)
    cut: bool = False


class DrillMode(enum.StrEnum):
    KILL = "kill"  # SIGKILL the main process; systemd's Restart= brings it back
    STOP = "stop"  # a planned stop: drained, then stopped; the drill starts it again
    OUTSIDE_STOP = "outside-stop"  # systemctl stop unannounced, as another tool would
    HANG = "hang"  # SIGSTOP (alive, not answering); the drill sends SIGCONT


def render_without(
    config: Config, catalog: Catalog, availability: Availability, provider: str
) -> GatewayPlan:
    """The gateway's config while `provider` is down (as a drill makes it)."""
    down = Availability(up={k: v for k, v in availability.up.items() if k != provider})
    return render_gateway(config, catalog, down)


def unprotected_models(
    config: Config, catalog: Catalog, availability: Availability, provider: str
) -> list[str]:
    """The names `provider` serves that would have no live local fallback while it is down
    (nothing at all, or only a cloud, which a drill never asks)."""
    plan = render_without(config, catalog, availability, provider)
    local_names = {
        entry["model_name"]
        for entry in plan.document["model_list"]
        if entry.get("model_info", {}).get(JUDGED_INFO)
    }
    chains = {name: targets for item in local_fallbacks(plan) for name, targets in item.items()}
    return sorted(
        name
        for name in catalog.models_of(provider)
        if name not in local_names and not chains.get(name)
    )


def cloud_answered(plan: GatewayPlan, models: Iterable[str]) -> list[str]:
    """Of `models`, those the gateway sends to a cloud (or a local relay of one) right now:
    a drill never asks them."""
    judged: dict[str, bool] = {}
    for entry in plan.document["model_list"]:
        name = entry["model_name"]
        judged[name] = judged.get(name, True) and bool(entry.get("model_info", {}).get(JUDGED_INFO))
    return [m for m in models if m in judged and not judged[m]]


def local_fallbacks(plan: GatewayPlan) -> list[dict[str, list[str]]]:
    """The gateway's chains without the names a cloud serves (or a local server relaying
    one): a drill's requests carry these, so no drill ever spends a paid request."""
    local: dict[str, bool] = {}
    for entry in plan.document["model_list"]:
        name = entry["model_name"]
        judged = bool(entry.get("model_info", {}).get(JUDGED_INFO))
        local[name] = local.get(name, True) and judged
    return [
        {name: [t for t in targets if local.get(t)]}
        for name, targets in plan.fallbacks.items()
        if local.get(name)
    ]


DRILL_CLEAN_STREAK = 5  # answers in a row that needed no fallback: the gateway has settled


def drill_settled(
    answers: Sequence[Answer],
    since: float,
    *,
    seen_down: bool,
    mode: DrillMode,
    gateway_settled: bool,
    streak: int = DRILL_CLEAN_STREAK,
) -> bool:
    """Whether the gateway stopped trying the provider taken down at `since`: the daemon has
    seen it down (a killed one may already be back), the gateway's config is in sync, and
    the last `streak` answers since then needed no fallback."""
    recent = [a for a in answers if a.started > since][-streak:]
    return (
        (seen_down or mode is DrillMode.KILL)
        and gateway_settled
        and len(recent) == streak
        and all(a.ok and a.attempted_fallbacks == 0 for a in recent)
    )


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


@dataclass(frozen=True)
class DrillReport:
    provider: str
    mode: DrillMode
    answers: tuple[Answer, ...]
    taken_down_at: float  # time.monotonic()
    restored: bool
    error: str | None = None

    @property
    def failed(self) -> list[Answer]:
        """Requests failover did not save (streams cut mid-answer are counted apart)."""
        return [a for a in self.answers if not a.ok and not a.cut]

    @property
    def cut(self) -> list[Answer]:
        return [a for a in self.answers if a.cut]

    def settle_ms(self) -> float:
        """How long after the take-down the gateway still tried the dead provider: until
        the last answer that needed a fallback (or failed) before the restore."""
        late = [
            a
            for a in self.answers
            if a.started >= self.taken_down_at and (a.attempted_fallbacks > 0 or not a.ok)
        ]
        if not late:
            return 0.0
        last = max(late, key=lambda a: a.started)
        return max(0.0, (last.started - self.taken_down_at) * 1000 + last.latency_ms)

    def to_json(self) -> dict[str, Any]:
        latencies = [a.latency_ms for a in self.answers]
        failures = self.failed
        return {
            "provider": self.provider,
            "mode": self.mode.value,
            "sent": len(self.answers),
            "failed": len(failures),
            "cut_mid_stream": len(self.cut),
            "p50_ms": round(statistics.median(latencies), 1) if latencies else 0.0,
            "p99_ms": round(percentile(latencies, 0.99), 1),
            "settle_ms": round(self.settle_ms(), 1),
            "restored": self.restored,
            "answered_by": dict(Counter(a.api_base or "(none)" for a in self.answers if a.ok)),
            "streamed": sum(a.stream for a in self.answers),
            "failures": [_failure(a) for a in failures[:5]],
            "error": self.error,
        }


def _failure(answer: Answer) -> dict[str, Any]:
    return {
        "model": answer.model,
        "stream": answer.stream,
        "status": answer.status,
        "error": answer.error,
    }


def overall_ok(reports: Iterable[DrillReport]) -> bool:
    collected = list(reports)
    return bool(collected) and all(
        not r.failed and r.restored and r.error is None for r in collected
    )
