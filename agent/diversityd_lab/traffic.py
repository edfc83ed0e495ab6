"""Request streams the tests, the demo and the benchmarks send: straight at the llama
servers (as a client that knows two of them would), or through the gateway."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Self

from diversityd.adapters.gatewayclient import ask, new_client
from diversityd.drill import Answer


def chat(base_url: str, model: str, timeout: float = 10) -> dict[str, object]:
    """One small chat straight at a server's OpenAI-compatible endpoint."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "temperature": 0,
        }
    ).encode()
    request = urllib.request.Request(  # noqa: S310 - http on loopback
        f"{base_url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return dict(json.load(response))


class _InBackground:
    """Runs `run()` in a thread between `with` and its end; `_stop` asks it to end."""

    join_s = 30.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=self.join_s)


class RequestStream(_InBackground):
    """A steady stream of requests; each tries one server and, if refused, the other."""

    def __init__(self, servers: list[tuple[str, str]]) -> None:  # (base URL, model)
        super().__init__()
        self.servers = servers
        self.answered = 0
        self.unanswered: list[str] = []

    def run(self) -> None:
        turn = 0
        while not self._stop.is_set():
            order = self.servers[turn % 2 :] + self.servers[: turn % 2]
            turn += 1
            errors = []
            for base_url, model in order:
                try:
                    chat(base_url, model)
                except (OSError, urllib.error.URLError) as exc:
                    errors.append(f"{base_url}: {exc}")
                    continue
                self.answered += 1
                break
            else:
                self.unanswered.append("; ".join(errors))
            time.sleep(0.02)


class GatewayStream(_InBackground):
    """Requests through the gateway, one model after another, plain and streamed in turn,
    a new connection each; every answer is kept."""

    join_s = 120.0

    def __init__(
        self,
        url: str,
        key: str,
        models: Sequence[str],
        *,
        timeout_s: float = 60.0,
        pause_s: float = 0.05,
    ) -> None:
        super().__init__()
        self.url, self.key, self.models = url, key, models
        self.timeout_s, self.pause_s = timeout_s, pause_s
        self.answers: list[Answer] = []

    @property
    def failed(self) -> list[Answer]:
        return [a for a in self.answers if not a.ok]

    def run(self) -> None:
        async def loop() -> None:
            async with new_client(self.timeout_s) as client:
                turn = 0
                while not self._stop.is_set():
                    model = self.models[turn % len(self.models)]
                    stream = turn % 2 == 0
                    turn += 1
                    self.answers.append(await ask(client, self.url, self.key, model, stream=stream))
                    await asyncio.sleep(self.pause_s)

        asyncio.run(loop())
