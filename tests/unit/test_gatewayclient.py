"""How a drill's client reads an answer: a stream its server ended early is a cut (counted
apart, as a kill's), never a failure failover should have saved, nor a whole answer."""

from __future__ import annotations

import asyncio
import json

import httpx

from diversityd.adapters.gatewayclient import ask
from diversityd.adapters.gatewayruntime import TRUNCATED
from diversityd.drill import Answer


def answered(handler: httpx.MockTransport, *, stream: bool = True) -> Answer:
    async def go() -> Answer:
        async with httpx.AsyncClient(transport=handler) as client:
            return await ask(client, "http://gateway", "sk-x", "m", stream=stream)

    return asyncio.run(go())


def sse(*events: object) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events)


def test_a_stream_ended_by_its_server_before_it_began_is_a_cut() -> None:
    """Found in CI: an unannounced stop of llama-cpp-python before its first word; LiteLLM
    answers 500 with the launcher's message when the chain has nothing left to try."""
    body = json.dumps({"error": {"message": f"litellm.APIConnectionError: {TRUNCATED}"}})
    answer = answered(httpx.MockTransport(lambda _: httpx.Response(500, text=body)))
    assert answer.cut is True
    assert answer.ok is False


def test_a_stream_ended_by_its_server_mid_answer_is_a_cut() -> None:
    chunk = {"choices": [{"delta": {"content": "Hel"}, "finish_reason": None}]}
    error = {"error": {"message": TRUNCATED}}
    answer = answered(httpx.MockTransport(lambda _: httpx.Response(200, content=sse(chunk, error))))
    assert answer.cut is True


def test_any_other_error_is_a_failure_not_a_cut() -> None:
    body = json.dumps({"error": {"message": "no healthy deployments"}})
    answer = answered(httpx.MockTransport(lambda _: httpx.Response(500, text=body)))
    assert answer.cut is False
    assert answer.ok is False
