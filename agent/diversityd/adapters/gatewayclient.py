"""A client of the gateway, as applications are: chat requests, plain and streamed, noting
who answered (LiteLLM's `x-litellm-model-api-base`) and how many fallbacks it tried."""

from __future__ import annotations

import dataclasses
import json
import time

import httpx

from diversityd.adapters.gatewayruntime import TRUNCATED
from diversityd.drill import Answer

HEADER_API_BASE = "x-litellm-model-api-base"
HEADER_FALLBACKS = "x-litellm-attempted-fallbacks"


def new_client(timeout_s: float) -> httpx.AsyncClient:
    # A new connection per request: a keep-alive connection to a proxy that is draining
    # is closed under the client once, which says nothing about the gateway.
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=5.0),
        limits=httpx.Limits(max_keepalive_connections=0),
        trust_env=False,
    )


async def ask(
    client: httpx.AsyncClient,
    base_url: str,
    key: str,
    model: str,
    *,
    stream: bool,
    max_tokens: int = 8,
    fallbacks: list[dict[str, list[str]]] | None = None,
) -> Answer:
    """`fallbacks`: this request's own chains (LiteLLM reads them from the body), instead
    of the gateway's: a drill's keep to local servers, never a paid cloud."""
    started = time.monotonic()
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if fallbacks is not None:
        body["fallbacks"] = fallbacks
    headers = {"Authorization": f"Bearer {key}"}

    content = ""  # what a stream delivered before it ended or broke

    def answer(
        ok: bool, status: int | None, response: httpx.Response | None, error: str | None
    ) -> Answer:
        api_base = response.headers.get(HEADER_API_BASE) if response is not None else None
        fallbacks = response.headers.get(HEADER_FALLBACKS, "0") if response is not None else "0"
        return Answer(
            model=model,
            stream=stream,
            ok=ok,
            status=status,
            started=started,
            latency_ms=(time.monotonic() - started) * 1000,
            api_base=api_base,
            attempted_fallbacks=int(fallbacks) if fallbacks.isdigit() else 0,
            error=error,
            cut=not ok and bool(content),
        )

    def ended_by_its_server(text: str) -> Answer:
        """The server accepted the stream and ended it early (the gateway says so): a
        stream cut, counted apart, as a kill's is (nothing can move it)."""
        cut = answer(False, None, None, text[:300])
        return dataclasses.replace(cut, cut=True)

    url = f"{base_url}/v1/chat/completions"
    try:
        if not stream:
            response = await client.post(url, json=body, headers=headers)
            if response.status_code != 200:
                return answer(False, response.status_code, response, response.text[:300])
            choices = response.json().get("choices") or []
            ok = bool(choices) and bool(choices[0].get("message", {}).get("content"))
            return answer(ok, 200, response, None if ok else "no content in the answer")
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                if TRUNCATED in text:
                    return ended_by_its_server(text)
                return answer(False, response.status_code, response, text[:300])
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    if TRUNCATED in str(chunk["error"]):
                        return ended_by_its_server(str(chunk["error"]))
                    return answer(False, 200, response, str(chunk["error"])[:300])
                for choice in chunk.get("choices") or []:
                    content += (choice.get("delta") or {}).get("content") or ""
            ok = done and bool(content)
            return answer(ok, 200, response, None if ok else "stream ended without content")
    except httpx.HTTPError as exc:
        return answer(False, None, None, f"{type(exc).__name__}: {exc}")
    except (ValueError, AttributeError, TypeError) as exc:  # not JSON, or not the shape
        return answer(False, None, None, f"malformed answer: {type(exc).__name__}: {exc}")
