"""A small HTTP/1.1 server on asyncio: one request per connection, every read bounded.

Enough for Prometheus scraping the daemon's `/metrics`; no framework (the daemon's
footprint matters). It listens on loopback, where every local user can reach it, so it is
bounded like a public one: so many connections at once (past that, a 503 and close), so
many bytes of head and body, so long to send the request and to take the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus


@dataclass(frozen=True)
class Limits:
    max_connections: int = 16  # Prometheus needs one; a few more for curl
    max_head: int = 16 * 1024  # request line and headers
    max_body: int = 64 * 1024  # nothing here takes a body; a small one is read and ignored
    read_timeout_s: float = 5.0  # to send the whole request
    write_timeout_s: float = 10.0  # to take the answer


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]
REFUSE_READ_S = 0.1


class _Refused(Exception):  # noqa: N818 - a status, not a failure of ours
    """The request is refused with this status."""

    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


async def serve_http(
    host: str, port: int, handler: Handler, limits: Limits | None = None
) -> asyncio.Server:
    bounds = limits or Limits()
    open_connections = 0

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_connections
        if open_connections >= bounds.max_connections:
            # Refused after a glance at what it sent (closed unread, the client would see
            # a reset, not the 503): a tenth of a second at most, never counted.
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(reader.read(bounds.max_head), REFUSE_READ_S)
            writer.write(_encode(_status_response(HTTPStatus.SERVICE_UNAVAILABLE)))
            writer.close()
            return
        open_connections += 1
        try:
            try:
                request = await asyncio.wait_for(
                    _read_request(reader, bounds), bounds.read_timeout_s
                )
                response = await handler(request)
            except _Refused as refused:
                response = _status_response(refused.status)
            except TimeoutError:
                response = _status_response(HTTPStatus.REQUEST_TIMEOUT)
            writer.write(_encode(response))
            await asyncio.wait_for(writer.drain(), bounds.write_timeout_s)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            open_connections -= 1
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), bounds.write_timeout_s)

    return await asyncio.start_server(on_connection, host, port, limit=bounds.max_head)


def _status_response(status: HTTPStatus) -> Response:
    return Response(status, f"{status.phrase.lower()}\n".encode())


async def _read_request(reader: asyncio.StreamReader, limits: Limits) -> Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE) from None
    except asyncio.IncompleteReadError:
        raise ConnectionResetError from None  # closed half-way: nobody to answer
    if len(head) > limits.max_head:
        raise _Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _Refused(HTTPStatus.BAD_REQUEST)
    method, target, _version = parts
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "transfer-encoding":
            raise _Refused(HTTPStatus.LENGTH_REQUIRED)  # a Content-Length or nothing
        if name == "content-length":
            try:
                length = int(value.strip())
            except ValueError:
                raise _Refused(HTTPStatus.BAD_REQUEST) from None
    if length < 0:
        raise _Refused(HTTPStatus.BAD_REQUEST)
    if length > limits.max_body:
        raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    body = await reader.readexactly(length) if length else b""
    return Request(method, target.split("?", 1)[0], body)


def _encode(response: Response) -> bytes:
    reason = HTTPStatus(response.status).phrase
    headers = {
        "Content-Type": response.content_type,
        "Content-Length": str(len(response.body)),
        "Connection": "close",
        **response.headers,
    }
    head = f"HTTP/1.1 {response.status} {reason}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items()
    )
    return head.encode("latin-1") + b"\r\n" + response.body
