"""A steady stream of chat requests through a gateway, sent with the `openai` package as
client applications send them (the `bench` extra installs it).

Open loop: a request every 1/rate seconds whatever the earlier ones are doing (a hung
backend holds its requests, not the stream), models in turn, plain and streamed in turn,
`max_retries=0`, each bounded by `timeout_s` from its start to its last byte, a new
connection each (`Connection: close`; as traffic.GatewayStream: a keep-alive connection to
a proxy that is draining is closed under the client once, which says nothing about the
gateway), loopback only (no proxy from the environment). Who answered comes from
LiteLLM's response headers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Self

import openai

from diversityd.adapters.gatewayclient import HEADER_API_BASE, HEADER_FALLBACKS
from diversityd.drill import Answer

PROMPT = [{"role": "user", "content": "Say something."}]
CLOSE = {"Connection": "close"}  # a connection per request: never reused


def read_whole_stream(
    client: openai.OpenAI,
    model: str,
    prompt: str,
    *,
    max_tokens: int,
    temperature: float | None = None,
) -> tuple[str, str | None, str | None]:
    """One streamed chat read to its end: (the text, its finish reason, the error that
    ended it if any). A stream cut short has no finish reason, or an error."""
    text, finish, error = "", None, None
    try:
        for chunk in client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=openai.omit if temperature is None else temperature,
            stream=True,
        ):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
    except openai.APIError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return text, finish, error


class OpenAIStream:
    """`with OpenAIStream(url, key, models) as stream:` sends until the block ends, then
    waits for the requests in flight (each ends within `timeout_s`); `answers` holds one
    `Answer` per request, in the order they ended."""

    def __init__(
        self,
        url: str,
        key: str,
        models: Sequence[str],
        *,
        rate_per_s: float = 4.0,
        timeout_s: float = 30.0,
        max_in_flight: int = 256,
        max_tokens: int = 8,
    ) -> None:
        self.url, self.key, self.models = url, key, tuple(models)
        self.rate_per_s, self.timeout_s = rate_per_s, timeout_s
        self.max_in_flight, self.max_tokens = max_in_flight, max_tokens
        self.answers: list[Answer] = []
        self.skipped = 0  # ticks with max_in_flight requests already open (none sent)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._send()), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=self.timeout_s + 30)

    async def _send(self) -> None:
        client = openai.AsyncOpenAI(
            base_url=f"{self.url}/v1",
            api_key=self.key,
            max_retries=0,
            timeout=self.timeout_s,
            http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
        )
        in_flight: set[asyncio.Task[None]] = set()
        turn = 0
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                if len(in_flight) < self.max_in_flight:
                    model = self.models[turn % len(self.models)]
                    task = asyncio.create_task(self._ask(client, model, stream=turn % 2 == 1))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    turn += 1
                else:
                    self.skipped += 1
                next_at += 1 / self.rate_per_s
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if in_flight:
                await asyncio.gather(*in_flight)
        finally:
            await client.close()

    async def _ask(self, client: openai.AsyncOpenAI, model: str, *, stream: bool) -> None:
        started = time.monotonic()
        headers: Mapping[str, str] | None = None
        status: int | None = None
        error: str | None = None
        ok = False
        try:
            async with asyncio.timeout(self.timeout_s):
                if stream:
                    raw = await client.chat.completions.with_raw_response.create(
                        model=model,
                        messages=PROMPT,  # type: ignore[arg-type]
                        max_tokens=self.max_tokens,
                        temperature=0,
                        stream=True,
                        extra_headers=CLOSE,
                    )
                    headers, status = raw.headers, raw.status_code
                    chunks = raw.parse()
                    assert isinstance(chunks, openai.AsyncStream)
                    content = ""
                    async for chunk in chunks:
                        for choice in chunk.choices:
                            content += choice.delta.content or ""
                    ok = bool(content)
                    error = None if ok else "stream ended without content"
                else:
                    raw_plain = await client.chat.completions.with_raw_response.create(
                        model=model,
                        messages=PROMPT,  # type: ignore[arg-type]
                        max_tokens=self.max_tokens,
                        temperature=0,
                        extra_headers=CLOSE,
                    )
                    headers, status = raw_plain.headers, raw_plain.status_code
                    completion = raw_plain.parse()
                    ok = bool(completion.choices) and bool(completion.choices[0].message.content)
                    error = None if ok else "no content in the answer"
        except TimeoutError:
            error = f"no whole answer in {self.timeout_s:g} s"
        except openai.APIStatusError as exc:
            headers, status = exc.response.headers, exc.status_code
            error = f"{type(exc).__name__}: {exc.message}"[:300]
        except Exception as exc:  # noqa: BLE001 - whatever ended a request, it failed; noted
            error = f"{type(exc).__name__}: {exc}"[:300]
        fallbacks = headers.get(HEADER_FALLBACKS, "0") if headers is not None else "0"
        self.answers.append(
            Answer(
                model=model,
                stream=stream,
                ok=ok,
                status=status,
                started=started,
                latency_ms=(time.monotonic() - started) * 1000,
                api_base=headers.get(HEADER_API_BASE) if headers is not None else None,
                attempted_fallbacks=int(fallbacks) if fallbacks.isdigit() else 0,
                error=error,
            )
        )
