"""Probes against a real HTTP server on loopback: what they ask, and how often."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from diversityd.adapters import probes
from diversityd.config import Provider, Where
from diversityd.state import ProbeOutcome


class CountingServer:
    """Answers /health (or 404 without one) and /v1/models; counts every path asked."""

    def __init__(self, has_health: bool) -> None:
        self.asked: Counter[str] = Counter()
        self.health_status = 200 if has_health else 404
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.asked[self.path] += 1
                if self.path == "/health":
                    self.answer(outer.health_status, {"status": "ok"})
                elif self.path == "/v1/models":
                    self.answer(200, {"data": [{"id": "qwen"}]})
                else:
                    self.answer(404, {})

            def answer(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture
def servers() -> Iterator[list[CountingServer]]:
    made: list[CountingServer] = []
    yield made
    for server in made:
        server.server.shutdown()
        server.server.server_close()


def provider_at(url: str) -> Provider:
    return Provider("llama", "llama_cpp", url, True, (), None, None, None, Where("p.yaml", ()))


def probe_rounds(server: CountingServer, rounds: int, memory: probes.ProbeMemory) -> list[str]:
    async def run() -> list[str]:
        async with probes.new_client(2.0) as client:
            outcomes = []
            for _ in range(rounds):
                result = await probes.probe(client, provider_at(server.url), 2.0, memory)
                assert result.models == frozenset({"qwen"})
                outcomes.append(result.outcome.value)
            return outcomes

    return asyncio.run(run())


def test_a_healthy_server_costs_one_request_a_round(servers: list[CountingServer]) -> None:
    server = CountingServer(has_health=True)
    servers.append(server)
    memory = probes.ProbeMemory()
    assert probe_rounds(server, 5, memory) == [ProbeOutcome.OK.value] * 5
    assert server.asked == Counter({"/health": 5, "/v1/models": 1})


def test_the_model_list_is_asked_again_after_a_failure(servers: list[CountingServer]) -> None:
    server = CountingServer(has_health=True)
    servers.append(server)
    memory = probes.ProbeMemory()
    probe_rounds(server, 2, memory)
    server.health_status = 503  # loading again

    async def failed_round() -> ProbeOutcome:
        async with probes.new_client(2.0) as client:
            return (await probes.probe(client, provider_at(server.url), 2.0, memory)).outcome

    assert asyncio.run(failed_round()) is ProbeOutcome.ERROR
    server.health_status = 200
    probe_rounds(server, 1, memory)
    assert server.asked["/v1/models"] == 2


def test_a_server_without_health_is_not_asked_for_it_again(
    servers: list[CountingServer],
) -> None:
    server = CountingServer(has_health=False)  # llama-cpp-python
    servers.append(server)
    memory = probes.ProbeMemory()
    assert probe_rounds(server, 4, memory) == [ProbeOutcome.OK.value] * 4
    assert server.asked == Counter({"/health": 1, "/v1/models": 4})


def test_a_probe_pause_ends_when_the_provider_changes_state() -> None:
    # a start or restart is probed at once, however long probes.interval_s is (at 600 s a
    # started server stayed `starting` for the whole interval)
    from diversityd.daemon.providers import _pause

    async def run() -> float:
        wake = asyncio.Event()
        started = asyncio.get_running_loop().time()
        asyncio.get_running_loop().call_later(0.2, wake.set)
        await _pause(wake, 600.0)
        return asyncio.get_running_loop().time() - started

    assert asyncio.run(run()) < 5.0


def test_a_probe_pause_lasts_its_interval_without_a_change() -> None:
    from diversityd.daemon.providers import _pause

    async def run() -> float:
        wake = asyncio.Event()
        wake.set()  # a change before the pause began was seen by the probe just sent
        started = asyncio.get_running_loop().time()
        await _pause(wake, 0.3)
        return asyncio.get_running_loop().time() - started

    assert asyncio.run(run()) >= 0.29
