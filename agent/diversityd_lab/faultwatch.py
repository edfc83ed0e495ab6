"""Watching a fault from outside, for bench/failover.py: each faulty server probed straight
(its own `/v1/models`, every 0.1 s, 1 s timeout, a thread each), and what the client stream
saw, read into how long requests kept touching the faulty server and when it served again.

- A request *touched* a server when LiteLLM says the server answered it
  (`x-litellm-model-api-base`), or when it asked for a name the server serves first and it
  failed or was answered by a fallback (`x-litellm-attempted-fallbacks` > 0).
- `back_at`: when the server answered its probe again after its last failed probe.
- `failover_s`: from the fault to the end of the last request that touched the server and
  was sent before it was back (0 when none did).
- `recovery_s`: from the fault to the end of the first request it answered that was sent
  once it was back (None when none came).
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import urlsplit

from diversityd.drill import Answer, percentile

PROBE_EVERY_S = 0.1
PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class FaultyServer:
    name: str  # the provider
    base_url: str  # http://127.0.0.1:PORT
    models: frozenset[str]  # the names it serves first (their fallbacks serve them when down)

    @property
    def port(self) -> int | None:
        return urlsplit(self.base_url).port


def probe_once(base_url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    try:
        with urllib.request.urlopen(  # noqa: S310 - http on loopback
            f"{base_url}/v1/models", timeout=timeout_s
        ) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


@dataclass
class ServerWatch:
    """`with ServerWatch(servers):` probes each server until the block ends; `probes[name]`
    holds (the time the answer or the failure came, ok)."""

    servers: Sequence[FaultyServer]
    probes: dict[str, list[tuple[float, bool]]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Self:
        for server in self.servers:
            self.probes[server.name] = []
            thread = threading.Thread(target=self._watch, args=(server,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=PROBE_TIMEOUT_S + 5)

    def _watch(self, server: FaultyServer) -> None:
        record = self.probes[server.name]
        while not self._stop.is_set():
            ok = probe_once(server.base_url)
            record.append((time.monotonic(), ok))
            self._stop.wait(PROBE_EVERY_S)

    def back_at(self, name: str, since: float) -> float | None:
        return back_at(self.probes[name], since)


def back_at(probes: Sequence[tuple[float, bool]], since: float) -> float | None:
    """When the server answered again after its last failed probe since `since`; `since`
    itself when no probe failed; None while the last probe failed."""
    after = [(t, ok) for t, ok in probes if t >= since]
    failed = [t for t, ok in after if not ok]
    if not failed:
        return since
    answered = [t for t, ok in after if ok and t > failed[-1]]
    return answered[0] if answered else None


def ended(answer: Answer) -> float:
    return answer.started + answer.latency_ms / 1000


def answered_by(answer: Answer, server: FaultyServer) -> bool:
    return answer.api_base is not None and urlsplit(answer.api_base).port == server.port


def touched(answer: Answer, server: FaultyServer) -> bool:
    if answered_by(answer, server):
        return True
    return answer.model in server.models and (answer.attempted_fallbacks > 0 or not answer.ok)


def failover_s(
    answers: Iterable[Answer], server: FaultyServer, fault_at: float, back: float
) -> float:
    ends = [
        ended(a)
        for a in answers
        if touched(a, server) and a.started < back and ended(a) >= fault_at
    ]
    return max(0.0, max(ends, default=fault_at) - fault_at)


def recovery_s(
    answers: Iterable[Answer], server: FaultyServer, fault_at: float, back: float
) -> float | None:
    served = [ended(a) for a in answers if a.ok and answered_by(a, server) and a.started >= back]
    return min(served) - fault_at if served else None


def served_since(answers: Iterable[Answer], server: FaultyServer, since: float) -> bool:
    """Whether the server answered a request sent at `since` or later."""
    return any(a.ok and answered_by(a, server) and a.started >= since for a in answers)


def latency(answers: Sequence[Answer]) -> dict[str, float | None]:
    values = [a.latency_ms for a in answers]
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "p50_ms": round(percentile(values, 0.5), 1),
        "p99_ms": round(percentile(values, 0.99), 1),
        "max_ms": round(max(values), 1),
    }


def trial_metrics(
    answers: Sequence[Answer],
    servers: Sequence[FaultyServer],
    fault_at: float,
    backs: Mapping[str, float | None],
) -> dict[str, float | int | None]:
    """One fault's numbers: `sent`, `failed`, latency over every request, and the slowest
    faulty server's `failover_s` and `recovery_s` (None if one never came back)."""
    failovers: list[float] = []
    recoveries: list[float | None] = []
    for server in servers:
        back = backs.get(server.name)
        if back is None:  # never back: everything it touched, to the end, counts
            failovers.append(failover_s(answers, server, fault_at, float("inf")))
            recoveries.append(None)
            continue
        failovers.append(failover_s(answers, server, fault_at, back))
        recoveries.append(recovery_s(answers, server, fault_at, back))
    recovery: float | None = None
    if recoveries and all(r is not None for r in recoveries):
        recovery = round(max(r for r in recoveries if r is not None), 2)
    return {
        "sent": len(answers),
        "failed": sum(not a.ok for a in answers),
        **latency(answers),
        "failover_s": round(max(failovers), 2) if failovers else None,
        "recovery_s": recovery,
    }
