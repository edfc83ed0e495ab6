"""What runs inside a LiteLLM proxy process beside LiteLLM itself.

Loaded by gatewaylauncher.py in LiteLLM's venv; imported by the daemon for the protocol
(`routes_digest`, `call`). Standard library only at import.

- **The control channel**: a unix socket (0600, in a 0700 folder) served on uvicorn's own
  event loop. One JSON object a line each way. `hello` says what the process runs;
  `routes` makes the router serve exactly the deployments and fallbacks given. The
  router's mutating methods never await, so a change lands between two requests' steps,
  never in the middle of one; nothing here touches the router from a thread.
- **Routes in-process** with LiteLLM 1.106's narrowest calls: `Router.delete_deployment`,
  `Router.upsert_deployment` (keyed by the `model_info.id` diversityd chose),
  `Router.update_settings(fallbacks=...)`, then the proxy's own `llm_model_list` is
  reassigned (`/v1/models` and LiteLLM's health checks read it, not the router).
  `os.environ/NAME` values are resolved as the proxy does at load time: `upsert` would
  send the literal string as a key.
- **The answer for a name no server can serve** (`model_info.diversityd_unavailable`): a
  503 with Retry-After naming the providers and their states, given here before LiteLLM
  routes the request, so it never leaves the process.
- **Requests in flight per deployment**, for the daemon's drain before a planned stop:
  LiteLLM's own counters do not serve (its parallel-request slot is released when
  `acompletion` returns, before a stream ends). A request is counted against the
  deployment the router picked for it (a CustomLogger's pre-call check: a request waiting
  on a one-at-a-time server counts too) until its last byte is sent or its client goes
  (an ASGI wrapper around the whole proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import json
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

PROTOCOL = 1
# what a client reads when the server under its stream ended it early (guard_truncated_streams)
TRUNCATED = "the server's stream ended before the answer did (no finish reason)"
MAX_LINE = 32 * 1024 * 1024  # a whole model list, with room
UNAVAILABLE_INFO = "diversityd_unavailable"  # as gateway.py writes it (the core)
PROVIDER_INFO = "diversityd_provider"
PEER_INFO = "diversityd_peer"  # a deployment answered by a peer's gateway (the fleet)
RETRY_AFTER_INFO = "retry_after_s"
HOLD_INFO = "diversityd_hold_s"  # hold the request this long for its server (a restart)
# Bearer for OpenAI-style clients; the others as LiteLLM's auth accepts them
KEY_HEADERS = (b"authorization", b"x-api-key", b"api-key", b"x-litellm-api-key")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ChannelError(RuntimeError):
    """A control request that could not be carried out (says why)."""


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def routes_digest(routes: Mapping[str, Any]) -> str:
    """Which routes a process serves, comparable across the daemon and the launcher."""
    body = {
        "model_list": routes.get("model_list") or [],
        "fallbacks": routes.get("fallbacks") or [],
    }
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def routes_in(document: Mapping[str, Any]) -> dict[str, Any]:
    """The routes of a whole LiteLLM config (as gateway.routes_of in the core)."""
    router = document.get("router_settings") or {}
    return {
        "model_list": list(document.get("model_list") or []),
        "fallbacks": list(router.get("fallbacks") or []) if isinstance(router, Mapping) else [],
    }


def unavailable_answers(model_list: list[Any]) -> dict[str, tuple[str, int, float]]:
    """Name -> (why, retry after s, hold s) for the names answered here, not by a server
    (held first while their server restarts on purpose)."""
    answers: dict[str, tuple[str, int, float]] = {}
    for entry in model_list:
        info = entry.get("model_info") if isinstance(entry, dict) else None
        if isinstance(info, dict) and info.get(UNAVAILABLE_INFO):
            reason = info[UNAVAILABLE_INFO]
            text = reason if isinstance(reason, str) else "no server can serve this model now"
            answers[str(entry.get("model_name"))] = (
                text,
                int(info.get(RETRY_AFTER_INFO, 10)),
                float(info.get(HOLD_INFO, 0) or 0),
            )
    return answers


def resolve_references(params: Mapping[str, Any]) -> dict[str, Any]:
    """`os.environ/NAME` values resolved as LiteLLM's Router.set_model_list does when the
    proxy loads a config (1.106: `get_secret`, leaving `*_ref` secret pointers alone)."""
    from litellm.types.router import holds_secret_pointer
    from litellm.utils import get_secret

    resolved = dict(params)
    for key, value in params.items():
        reference = isinstance(value, str) and value.startswith("os.environ/")
        if reference and not holds_secret_pointer(key):
            resolved[key] = get_secret(value)
    return resolved


def apply_routes(routes: Mapping[str, Any]) -> dict[str, list[str]]:
    """Make the proxy's router serve exactly these deployments and fallbacks. Synchronous
    and never awaiting: called on the proxy's event loop, it lands between requests."""
    from litellm.proxy import proxy_server
    from litellm.types.router import Deployment, LiteLLM_Params

    router = proxy_server.llm_router  # set during the proxy's startup: read it now
    if router is None:
        raise ChannelError("the proxy has no router yet")
    desired: dict[str, dict[str, Any]] = {}
    for entry in routes.get("model_list") or []:
        ident = (entry.get("model_info") or {}).get("id")
        if not ident:
            raise ChannelError(f"deployment of {entry.get('model_name')!r} has no model_info.id")
        desired[str(ident)] = entry
    # Built first: a deployment LiteLLM refuses leaves the router as it was.
    deployments = {
        ident: Deployment(
            model_name=str(entry["model_name"]),
            litellm_params=LiteLLM_Params(**resolve_references(entry["litellm_params"])),
            model_info=dict(entry.get("model_info") or {}),
        )
        for ident, entry in desired.items()
    }
    removed = [ident for ident in router.get_model_ids() if ident not in desired]
    for ident in removed:
        router.delete_deployment(id=ident)
    added: list[str] = []
    updated: list[str] = []
    for ident, deployment in deployments.items():
        existed = router.has_model_id(ident)
        if router.upsert_deployment(deployment) is not None:
            (updated if existed else added).append(ident)
    router.update_settings(fallbacks=list(routes.get("fallbacks") or []))
    proxy_server.llm_model_list = router.get_model_list()
    return {"added": added, "removed": removed, "updated": updated}


class RequestSlot:
    """One client request: the deployment it is counted against, if any yet."""

    __slots__ = ("deployment", "done")

    def __init__(self) -> None:
        self.deployment: str | None = None
        self.done = False


CURRENT_REQUEST: contextvars.ContextVar[RequestSlot | None] = contextvars.ContextVar(
    "diversityd_request", default=None
)


class InFlight:
    """Requests in flight per deployment id (only ever touched on the proxy's loop)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def assign(self, slot: RequestSlot, deployment: str) -> None:
        """The router picked `deployment` for this request (again, after a fallback)."""
        if slot.done or slot.deployment == deployment:
            return
        self._drop(slot)
        slot.deployment = deployment
        self.counts[deployment] = self.counts.get(deployment, 0) + 1

    def leave(self, slot: RequestSlot) -> None:
        if not slot.done:
            slot.done = True
            self._drop(slot)

    def _drop(self, slot: RequestSlot) -> None:
        if slot.deployment is not None:
            left = self.counts.get(slot.deployment, 0) - 1
            if left > 0:
                self.counts[slot.deployment] = left
            else:
                self.counts.pop(slot.deployment, None)
            slot.deployment = None


class CountInFlight:
    """ASGI wrapper: each request gets a slot, counted until its last byte or its end."""

    def __init__(self, app: ASGIApp, inflight: InFlight) -> None:
        self.app = app
        self.inflight = inflight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        slot = RequestSlot()
        token = CURRENT_REQUEST.set(slot)

        async def counted_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.inflight.leave(slot)  # the last byte is out

        try:
            await self.app(scope, receive, counted_send)
        finally:
            CURRENT_REQUEST.reset(token)
            self.inflight.leave(slot)  # ended otherwise: an error, the client went


class CloseWhenStopping:
    """ASGI wrapper: once this process is stopping (a switch to a new one), every answer
    says `Connection: close`, so a client's keep-alive connection ends with an answer, never
    under a request it is sending."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.runtime.stopping:
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"
                ]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing_send)


def in_flight_hook(inflight: InFlight) -> Any:
    """A LiteLLM CustomLogger whose pre-call check (called once the router picked a
    deployment, before the call) counts the request against it."""
    from litellm.integrations.custom_logger import CustomLogger

    class Counter(CustomLogger):  # type: ignore[misc]
        async def async_pre_call_check(
            self,
            deployment: dict[str, Any],
            parent_otel_span: Any,  # noqa: ARG002 - LiteLLM's signature
        ) -> dict[str, Any] | None:
            slot = CURRENT_REQUEST.get()
            ident = (deployment.get("model_info") or {}).get("id")
            if slot is not None and ident:
                inflight.assign(slot, str(ident))
            return None

    return Counter()


def guard_truncated_streams() -> None:
    """No half answer passed off as a whole one. LiteLLM 1.106 ends a stream whose upstream
    closed without a finish reason (a server stopped mid-answer: llama-cpp-python's closes
    its streams at SIGTERM) with a made-up `finish_reason: "stop"`. Here that end fails as
    a broken stream does, through the wrapper's own failure path, so it reaches the router
    as its mid-stream fallback error: before any content (the role chunk alone is none), the
    router answers from the model's chain; after some, the client gets an error event and
    no finish reason. (A plain raise here escapes from inside the wrapper's end-of-stream
    handler, past that path: the router then never falls back.)"""
    import litellm
    from litellm.litellm_core_utils.streaming_handler import CustomStreamWrapper

    made_up_stop = CustomStreamWrapper.finish_reason_handler
    if getattr(made_up_stop, "diversityd_guard", False):
        return

    def finish_reason_handler(self: Any) -> Any:
        if self.received_finish_reason is None and self.intermittent_finish_reason is None:
            self._log_stream_failure_and_raise(
                litellm.APIConnectionError(
                    message=TRUNCATED,
                    llm_provider=self.custom_llm_provider or "",
                    model=self.model or "",
                )
            )
        return made_up_stop(self)

    finish_reason_handler.diversityd_guard = True  # type: ignore[attr-defined]
    CustomStreamWrapper.finish_reason_handler = finish_reason_handler


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


class Runtime:
    """This process's routing as the daemon last set it, and the channel that sets it."""

    def __init__(self, document: Mapping[str, Any], *, launcher_sha: str, config: str) -> None:
        self.started_document = dict(document)
        self.launcher_sha = launcher_sha
        self.config = config
        routes = routes_in(document)
        self.digest = routes_digest(routes)
        self.unavailable = unavailable_answers(routes["model_list"])
        self.providers = providers_of(routes["model_list"])
        self.fleet = FleetRoutes.of(routes)
        self.changes = 0  # routes applied in-process since start
        self.server: asyncio.AbstractServer | None = None
        self.inflight = InFlight()
        self.stopping = False  # a switch: answers close their connections
        self.routes_changed = asyncio.Event()  # set (and replaced) at each routes change

    def hello(self) -> dict[str, Any]:
        version = "unknown"
        with contextlib.suppress(Exception):
            from importlib.metadata import version as package_version

            version = package_version("litellm")
        return {
            "protocol": PROTOCOL,
            "pid": os.getpid(),
            "litellm": version,
            "launcher_sha": self.launcher_sha,
            "config": self.config,
            "started_document": self.started_document,
            "routes_digest": self.digest,
            "changes": self.changes,
        }

    def set_routes(self, routes: Mapping[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        digest = routes_digest(routes)
        if digest == self.digest:
            return {"routes_digest": digest, "unchanged": True, "elapsed_ms": 0.0}
        changed = apply_routes(routes)
        self.digest = digest
        self.unavailable = unavailable_answers(list(routes.get("model_list") or []))
        self.providers.update(providers_of(list(routes.get("model_list") or [])))
        self.fleet = FleetRoutes.of(routes)
        self.changes += 1
        waiting, self.routes_changed = self.routes_changed, asyncio.Event()
        waiting.set()  # held requests look again
        return {
            "routes_digest": digest,
            **changed,
            "elapsed_ms": round((time.monotonic() - started) * 1000, 2),
        }

    def dispatch(self, request: Mapping[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "hello":
            return self.hello()
        if op == "inflight":
            return self.in_flight()
        if op == "routes":
            routes = request.get("routes")
            if not isinstance(routes, dict):
                raise ChannelError("routes: expected an object with model_list and fallbacks")
            return self.set_routes(routes)
        raise ChannelError(f"unknown op {op!r}")

    def in_flight(self) -> dict[str, Any]:
        """Requests in flight, per deployment and per provider (a deployment taken out of
        the routes still counts until its requests end)."""
        deployments = dict(self.inflight.counts)
        providers: dict[str, int] = {}
        for ident, count in deployments.items():
            provider = self.providers.get(ident, "")
            providers[provider] = providers.get(provider, 0) + count
        return {"deployments": deployments, "providers": providers}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if peer_uid(writer) not in (None, os.getuid()):
                return  # the socket is 0600; a peer of another user is refused all the same
            while line := await reader.readline():
                try:
                    answer = {"ok": True, **self.dispatch(json.loads(line))}
                except Exception as exc:  # noqa: BLE001 - the daemon is told, the proxy goes on
                    answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                writer.write(canonical_json(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def serve(self, path: str) -> None:
        """Listen on `path` (0600 in a 0700 folder); a stale socket from a killed process
        is replaced."""
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old_umask = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self.handle, path=path, limit=MAX_LINE)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)


class FleetRoutes:
    """What a request from a peer may use: this host's own deployments only."""

    def __init__(self, peer_only: frozenset[str], local_chains: list[dict[str, list[str]]]):
        self.peer_only = peer_only  # names every deployment of which is a peer's
        self.local_chains = local_chains  # the chains without any peer's group

    @classmethod
    def of(cls, routes: Mapping[str, Any]) -> FleetRoutes:
        own: set[str] = set()
        peer: set[str] = set()
        for entry in routes.get("model_list") or []:
            info = entry.get("model_info") or {}
            (peer if info.get(PEER_INFO) else own).add(str(entry.get("model_name")))
        chains = []
        for item in routes.get("fallbacks") or []:
            for name, targets in item.items():
                chains.append({name: [t for t in targets if t in own]})
        return cls(frozenset(peer - own), chains)


def providers_of(model_list: list[Any]) -> dict[str, str]:
    """Deployment id -> the provider whose server it reaches (model_info, as rendered)."""
    found: dict[str, str] = {}
    for entry in model_list:
        info = entry.get("model_info") if isinstance(entry, dict) else None
        if isinstance(info, dict) and info.get("id") and info.get(PROVIDER_INFO):
            found[str(info["id"])] = str(info[PROVIDER_INFO])
    return found


def presented_keys(scope: Scope) -> list[bytes]:
    keys: list[bytes] = []
    for name, value in scope.get("headers") or []:
        if name.lower() in KEY_HEADERS:
            keys.append(value.removeprefix(b"Bearer ").removeprefix(b"bearer ").strip())
    return keys


class UnavailableAnswer:
    """ASGI wrapper: a request for a name no server can serve now gets a 503 with
    Retry-After and the reason, from here (LiteLLM would route it to a dead address).
    Only for callers holding the master key; anyone else reaches LiteLLM's own 401."""

    def __init__(self, app: ASGIApp, runtime: Runtime, master_key: str) -> None:
        self.app = app
        self.runtime = runtime
        self.key = master_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not self.runtime.unavailable:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        first: Message = {"type": "http.request", "body": b"", "more_body": True}
        while first.get("more_body"):
            first = await receive()
            if first["type"] != "http.request":
                await self.app(scope, _replay([first], receive), send)
                return
            chunks.append(first.get("body", b""))
        body = b"".join(chunks)
        answer = await self._held(self._answer_for(scope, body))
        if answer is None:
            replayed = {"type": "http.request", "body": body, "more_body": False}
            await self.app(scope, _replay([replayed], receive), send)
            return
        reason, retry_after, _, _ = answer
        payload = json.dumps(
            {"error": {"message": reason, "type": "service_unavailable", "code": "503"}}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"retry-after", str(retry_after).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _held(self, answer: Answered | None) -> Answered | None:
        """A name whose server restarts on purpose is held: its request waits for the
        routes that serve it again (then None: LiteLLM routes it), bounded."""
        if answer is None or answer[2] <= 0:
            return answer
        model, runtime = answer[3], self.runtime
        deadline = asyncio.get_running_loop().time() + answer[2]
        while model in runtime.unavailable:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return answer
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(runtime.routes_changed.wait(), left)
        return None

    def _answer_for(self, scope: Scope, body: bytes) -> Answered | None:
        if not body.lstrip().startswith(b"{"):
            return None
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return None
        if not isinstance(model, str) or model not in self.runtime.unavailable:
            return None
        if not any(hmac.compare_digest(key, self.key) for key in presented_keys(scope)):
            return None
        return (*self.runtime.unavailable[model], model)


Answered = tuple[str, int, float, str]  # why, retry after s, hold s, the model


class PeerRequests:
    """ASGI wrapper: a request sent with the fleet's key comes from a peer's gateway. It is
    let in as the master key's (which peers never hold) and served by this host's own
    servers only: its chains lose every peer's group, and a name only peers serve here is
    answered 503, so no request ever travels on to a third host or back."""

    def __init__(self, app: ASGIApp, runtime: Runtime, fleet_key: str, master_key: str) -> None:
        self.app = app
        self.runtime = runtime
        self.fleet_key = fleet_key.encode()
        self.master = master_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        peer = scope["type"] == "http" and any(
            hmac.compare_digest(key, self.fleet_key) for key in presented_keys(scope)
        )
        if not peer:
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope.get("headers") or [] if k.lower() not in KEY_HEADERS]
        scope = {**scope, "headers": [*headers, (b"authorization", b"Bearer " + self.master)]}
        if scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        try:
            request = json.loads(body) if body.lstrip().startswith(b"{") else None
        except ValueError:
            request = None
        if isinstance(request, dict):
            if request.get("model") in self.runtime.fleet.peer_only:
                await _send_json(send, 503, "not served on this host (a peer asked for it)", 5)
                return
            request["fallbacks"] = self.runtime.fleet.local_chains
            request.pop("disable_fallbacks", None)
            body = json.dumps(request).encode()
            scope["headers"] = [
                (k, v) for k, v in scope["headers"] if k.lower() != b"content-length"
            ] + [(b"content-length", str(len(body)).encode())]
        replayed = {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, _replay([replayed], receive), send)


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = bool(message.get("more_body"))
    return b"".join(chunks)


async def _send_json(send: Send, status: int, message: str, retry_after: int) -> None:
    payload = json.dumps(
        {"error": {"message": message, "type": "service_unavailable", "code": str(status)}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"retry-after", str(retry_after).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _replay(first: list[Message], receive: Receive) -> Receive:
    pending = list(first)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def call(path: str, request: Mapping[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
    """One request on a control channel and its answer (the daemon's side)."""

    async def exchange() -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE)
        try:
            writer.write(canonical_json(dict(request)).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if not line:
            raise ChannelError(f"{path}: the gateway closed the channel without an answer")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise ChannelError(f"{path}: {answer.get('error', 'refused')}")
        return dict(answer)

    try:
        return await asyncio.wait_for(exchange(), timeout_s)
    except asyncio.TimeoutError as exc:  # noqa: UP041 - the launcher may run on Python 3.10
        raise ChannelError(f"{path}: no answer within {timeout_s:g} s") from exc
    except (OSError, ValueError) as exc:
        raise ChannelError(f"{path}: {type(exc).__name__}: {exc}") from exc
