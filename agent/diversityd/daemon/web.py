"""The daemon's HTTP endpoint (loopback, `http:` in diversityd.yaml): Prometheus' `/metrics`,
and `/unavailable/v1/...`, where the gateway sends the requests for a name no server and
no fallback can serve now: a 503 naming the providers and their states, which clients
retry (an unknown name would be a 400 they do not)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from http import HTTPStatus

from diversityd.adapters.httpserver import Request, Response, serve_http
from diversityd.daemon.store import Store
from diversityd.gateway import UNAVAILABLE_RETRY_S, why_unavailable
from diversityd.log import get_logger

log = get_logger()

UNAVAILABLE_PREFIX = "/unavailable/v1"


class Web:
    def __init__(self, store: Store, *, metrics: Callable[[], bytes]) -> None:
        self.store = store
        self._metrics = metrics  # the exposition, rendered at each scrape
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        try:
            self.server = await serve_http(host, port, self.handle)
        except OSError as exc:
            # Metrics and the retryable answers are lost, not the supervision: go on.
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
        if request.path.startswith(UNAVAILABLE_PREFIX):
            return self._unavailable(request)
        return Response(HTTPStatus.NOT_FOUND, b"not found\n")

    def _unavailable(self, request: Request) -> Response:
        try:
            name = str(json.loads(request.body or b"{}").get("model", ""))
        except (ValueError, AttributeError):
            name = ""
        store = self.store
        if store.config is None or store.report is None:
            message = "diversityd is starting; retry later"
        else:
            states = {n: r.state.value for n, r in store.records.items()}
            message = why_unavailable(store.config, store.catalog, name, states)
        body = {"error": {"message": message, "type": "service_unavailable", "code": "503"}}
        return Response(
            HTTPStatus.SERVICE_UNAVAILABLE,
            json.dumps(body).encode(),
            "application/json",
            {"Retry-After": str(UNAVAILABLE_RETRY_S)},
        )
