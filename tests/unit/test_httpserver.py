"""The daemon's loopback HTTP server is bounded (issue 20, point 8): any local user can
reach it, so connections, header and body sizes and the time a client may take are
limited; a flood of idle connections does not keep Prometheus out. Real sockets."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from diversityd.adapters.httpserver import Limits, Request, Response, serve_http

LIMITS = Limits(
    max_connections=4, max_head=1024, max_body=2048, read_timeout_s=0.5, write_timeout_s=0.5
)


async def answer(request: Request) -> Response:
    return Response(HTTPStatus.OK, b"metrics " + str(len(request.body)).encode() + b"\n")


async def exchange(port: int, data: bytes, *, timeout_s: float = 3.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def test_sizes_and_time_are_bounded() -> None:
    async def scenario() -> dict[str, bytes]:
        server = await serve_http("127.0.0.1", 0, answer, LIMITS)
        port = server.sockets[0].getsockname()[1]
        replies = {
            "plain": await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            "big head": await exchange(
                port, b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 4096 + b"\r\n\r\n"
            ),
            "big body": await exchange(
                port, b"POST /metrics HTTP/1.1\r\nContent-Length: 100000\r\n\r\n"
            ),
            "chunked": await exchange(
                port, b"POST /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
        }
        # a client that sends half a request and waits is cut off after read_timeout_s
        started = asyncio.get_running_loop().time()
        replies["slow"] = await exchange(port, b"GET /metrics HTTP/1.1\r\n", timeout_s=5)
        replies["slow took"] = str(asyncio.get_running_loop().time() - started).encode()
        server.close()
        await asyncio.sleep(0.1)
        return replies

    replies = asyncio.run(scenario())
    assert status_of(replies["plain"]) == 200
    assert status_of(replies["big head"]) == 431
    assert status_of(replies["big body"]) == 413
    assert status_of(replies["chunked"]) == 411
    assert status_of(replies["slow"]) == 408
    assert float(replies["slow took"]) < 2.0


def test_idle_connections_past_the_bound_do_not_keep_the_scrape_out() -> None:
    """Connections over the bound are answered 503 at once and closed; once the idle ones
    time out, a scrape is served again."""

    async def scenario() -> tuple[list[int], int, int]:
        server = await serve_http("127.0.0.1", 0, answer, LIMITS)
        port = server.sockets[0].getsockname()[1]
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        await asyncio.sleep(0.05)
        over = [
            status_of(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n", timeout_s=1))
            for _ in range(3)
        ]
        await asyncio.sleep(LIMITS.read_timeout_s + 0.3)  # the idle ones are cut off
        after = status_of(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
        for _reader, writer in idle:
            writer.close()
        await asyncio.sleep(0.05)
        again = status_of(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
        server.close()
        await asyncio.sleep(0.1)
        return over, after, again

    over, after, again = asyncio.run(scenario())
    assert over == [503, 503, 503]
    assert after == 200
    assert again == 200
