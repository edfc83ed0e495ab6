"""The daemon's HTTP endpoint (loopback, `http:` in diversityd.yaml): Prometheus' `/metrics`.
(The answer for a name no server can serve is given inside the gateway: no user's prompt
ever reaches this port, which another local user could hold.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from http import HTTPStatus

from diversityd.adapters.httpserver import Request, Response, serve_http
from diversityd.daemon.store import Store
from diversityd.log import get_logger

log = get_logger()


class Web:
    def __init__(self, store: Store, *, metrics: Callable[[], bytes]) -> None:
        self.store = store
        self._metrics = metrics  # the exposition, rendered at each scrape
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        try:
            self.server = await serve_http(host, port, self.handle)
        except OSError as exc:
            # Metrics are lost, not the supervision: go on.
            log.error("http.listen_failed", path=f"{host}:{port}", error=str(exc))
            return
        log.info("http.listening", path=f"{host}:{port}")

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def handle(self, request: Request) -> Response:
        if request.method == "GET" and request.path == "/metrics":
            return Response(
                HTTPStatus.OK, self._metrics(), "text/plain; version=0.0.4; charset=utf-8"
            )
        return Response(HTTPStatus.NOT_FOUND, b"not found\n")
