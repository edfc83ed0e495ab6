"""HTTP probes: is a provider answering, and which models does it say it serves?

Outcomes are told apart because they mean different things: a refused connection is a
dead process (certain, immediate); a timeout is a hung or overloaded one.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from diversityd.config import Provider
from diversityd.gateway import normalize_model_id
from diversityd.state import ProbeOutcome, ProbeResult

HEALTH_ROUTE_TYPES = ("llama_cpp", "vllm")  # llama-server and vLLM answer /health


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


async def probe(client: httpx.AsyncClient, provider: Provider, timeout_s: float) -> ProbeResult:
    started = time.monotonic()

    def result(outcome: ProbeOutcome, error: str | None = None, models: Any = None) -> ProbeResult:
        now = time.monotonic()
        return ProbeResult(outcome, now, (now - started) * 1000, error, models)

    try:
        if provider.type in HEALTH_ROUTE_TYPES:
            health = await client.get(f"{_base(provider)}/health", timeout=timeout_s)
            # 503: still loading the model. 404: no /health (llama-cpp-python has none).
            if health.status_code not in (200, 404):
                return result(ProbeOutcome.ERROR, f"/health: HTTP {health.status_code}")
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
    return result(ProbeOutcome.OK, None, parse_models(provider, payload))
