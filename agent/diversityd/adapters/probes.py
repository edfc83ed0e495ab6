"""HTTP probes: is a provider answering, and which models does it say it serves?

Outcomes are told apart because they mean different things: a refused connection is a
dead process (certain, immediate); a timeout is a hung or overloaded one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import httpx

from diversityd.config import Provider
from diversityd.gateway import normalize_model_id
from diversityd.state import ProbeOutcome, ProbeResult

HEALTH_ROUTE_TYPES = ("llama_cpp", "vllm")  # llama-server and vLLM answer /health
# A server's model list changes only with its process (the loop starts a new memory for a
# new PID): while /health says 200, the list is asked again only this often.
MODELS_REFRESH_S = 30.0


@dataclass
class ProbeMemory:
    """What one provider's probe loop keeps between rounds, so that a healthy server costs
    one request per round (the daemon's idle CPU is mostly its probes)."""

    health_route: bool = True  # False once /health said 404 (llama-cpp-python has none)
    models: frozenset[str] | None = None
    models_at: float = -math.inf


def _base(provider: Provider) -> str:
    return provider.base_url.removesuffix("/v1")


def probe_url(provider: Provider) -> str:
    base = _base(provider)
    if provider.type == "ollama":
        return f"{base}/api/tags"
    return f"{base}/v1/models"


def parse_models(provider: Provider, payload: Any) -> frozenset[str]:
    """Model ids from `/v1/models` ({"data": [{"id"}]}) or Ollama's `/api/tags`."""
    ids: list[str] = []
    if isinstance(payload, dict):
        for key in ("data", "models"):
            for item in payload.get(key) or []:
                if isinstance(item, dict):
                    value = item.get("id") or item.get("name") or item.get("model")
                    if isinstance(value, str):
                        ids.append(value)
    return frozenset(normalize_model_id(provider.type, i) for i in ids)


def new_client(timeout_s: float) -> httpx.AsyncClient:
    # No keep-alive: every probe opens a connection, so a dead server is refused at once.
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_keepalive_connections=0),
        trust_env=False,
    )


async def probe(
    client: httpx.AsyncClient,
    provider: Provider,
    timeout_s: float,
    memory: ProbeMemory | None = None,
) -> ProbeResult:
    started = time.monotonic()
    memory = memory if memory is not None else ProbeMemory()

    def result(outcome: ProbeOutcome, error: str | None = None, models: Any = None) -> ProbeResult:
        now = time.monotonic()
        if outcome is not ProbeOutcome.OK:
            memory.models = None  # asked again after any failure
        return ProbeResult(outcome, now, (now - started) * 1000, error, models)

    try:
        if provider.type in HEALTH_ROUTE_TYPES and memory.health_route:
            health = await client.get(f"{_base(provider)}/health", timeout=timeout_s)
            # 503: still loading the model. 404: no /health (llama-cpp-python has none).
            if health.status_code == 404:
                memory.health_route = False
            elif health.status_code != 200:
                return result(ProbeOutcome.ERROR, f"/health: HTTP {health.status_code}")
            elif memory.models is not None and started - memory.models_at < MODELS_REFRESH_S:
                return result(ProbeOutcome.OK, None, memory.models)
        response = await client.get(probe_url(provider), timeout=timeout_s)
    except httpx.ConnectError as exc:
        return result(ProbeOutcome.REFUSED, f"connection refused: {exc}")
    except httpx.TimeoutException:
        return result(ProbeOutcome.TIMEOUT, f"no answer in {timeout_s:g} s")
    except httpx.HTTPError as exc:
        return result(ProbeOutcome.ERROR, f"{type(exc).__name__}: {exc}")
    if response.status_code != 200:
        return result(ProbeOutcome.ERROR, f"HTTP {response.status_code}")
    try:
        payload = response.json()
    except ValueError:
        return result(ProbeOutcome.ERROR, "the answer is not JSON")
    models = parse_models(provider, payload)
    memory.models, memory.models_at = models, time.monotonic()
    return result(ProbeOutcome.OK, None, models)
