"""What the Ollama and vLLM stand-ins share.

The HTTP machinery: a threaded server that, when told to stop, accepts nothing new, finishes
the requests in flight (streams included), closes idle keep-alive connections and waits for
every request thread; systemd socket activation (LISTEN_FDS) and readiness (NOTIFY_SOCKET).
Then the fixed answer every stand-in gives, and the OpenAI-format bodies both servers speak.
Standard library only: the stand-ins run where nothing else may be installed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import urlsplit

JSONObject = dict[str, Any]

SD_LISTEN_FDS_START = 3
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
# An idle keep-alive connection is dropped after this long; stop() drops idle ones at once.
IDLE_TIMEOUT_S = 120.0
# How often serve_forever looks at its shutdown flag: bounds how long stop() waits for it.
POLL_INTERVAL_S = 0.05
# What diversityd probes every round: not a journal line each (issue 13)
PROBED_PATHS = frozenset({"/health", "/v1/models", "/api/tags", "/api/version"})


class BadRequestError(ValueError):
    """The request cannot be served as sent; the handler answers 400 with this message."""


@dataclass(frozen=True)
class Settings:
    """What one stand-in serves. `models` are the names as the server lists them."""

    flavor: str
    models: tuple[str, ...]
    ready_delay: float = 0.0
    chunk_delay: float = 0.0
    model_root: str | None = None
    log_requests: bool = True  # one stdout line per request
    # a file that gets one JSON line per POST (path, model, the key it came with): a
    # stand-in for a paid cloud counts what reached it
    record: str | None = None
    # streams end cleanly after this many SSE lines, with no finish reason and no [DONE],
    # as a server that closes its streams when told to stop (sse-starlette's shutdown)
    cut_streams_after: int | None = None


@dataclass(frozen=True)
class Answer:
    """The deterministic reply to one request, cut into the pieces a stream sends."""

    model: str  # as the client named it; echoed in every body
    pieces: tuple[str, ...]
    finish_reason: str  # "stop", or "length" where a token limit cut it
    prompt_tokens: int

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)


def reply_text(flavor: str, port: int, model: str) -> str:
    """The one text a stand-in answers: it names the server, its port and the model."""
    return f"Hello from the {flavor} stand-in on port {port}, model {model}."


def reply_pieces(text: str) -> tuple[str, ...]:
    """Words with their leading space, the way a tokenizer streams them."""
    words = text.split(" ")
    return (words[0], *(" " + word for word in words[1:]))


def make_answer(*, text: str, model: str, prompt_tokens: int, max_tokens: int | None) -> Answer:
    pieces = reply_pieces(text)
    finish_reason = "stop"
    if max_tokens is not None and 0 <= max_tokens < len(pieces):
        pieces = pieces[:max_tokens]
        finish_reason = "length"
    return Answer(model, pieces, finish_reason, prompt_tokens)


def count_words(value: object) -> int:
    """Whitespace-separated words in a prompt or in messages: a deterministic token count."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(count_words(item) for item in value)
    if isinstance(value, dict):
        return count_words(value.get("content")) + count_words(value.get("text"))
    return 0


def optional_int(request: Mapping[str, Any], *keys: str) -> int | None:
    """The first of `keys` present in `request`, which must be an integer."""
    for key in keys:
        value = request.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequestError(f"{key} must be an integer, not {value!r}")
        return value
    return None


def optional_bool(request: Mapping[str, Any], key: str, *, default: bool) -> bool:
    value = request.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequestError(f"{key} must be true or false, not {value!r}")
    return value


# --- OpenAI-format bodies (Ollama's /v1 and vLLM speak the same shapes) ---------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def openai_usage(answer: Answer) -> JSONObject:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


@dataclass(frozen=True)
class OpenAIFlavor:
    """Where the two servers' OpenAI bodies differ."""

    body_extra: Mapping[str, Any]  # Ollama: system_fingerprint
    choice_extra: Mapping[str, Any]  # vLLM: logprobs, stop_reason
    message_extra: Mapping[str, Any]  # vLLM: reasoning_content, tool_calls
    role_in_every_delta: bool  # Ollama repeats the role in each chunk; vLLM sends it first


def chat_completion_body(answer: Answer, flavor: OpenAIFlavor, completion_id: str) -> JSONObject:
    message = {"role": "assistant", "content": answer.text, **flavor.message_extra}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.model,
        **flavor.body_extra,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": answer.finish_reason,
                **flavor.choice_extra,
            }
        ],
        "usage": openai_usage(answer),
    }


def chat_completion_chunks(
    answer: Answer, flavor: OpenAIFlavor, completion_id: str, *, include_usage: bool
) -> list[JSONObject]:
    created = int(time.time())

    def chunk(delta: JSONObject, finish_reason: str | None) -> JSONObject:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": answer.model,
            **flavor.body_extra,
            "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish_reason, **flavor.choice_extra}
            ],
        }

    chunks = []
    if not flavor.role_in_every_delta:
        chunks.append(chunk({"role": "assistant", "content": ""}, None))
    for piece in answer.pieces:
        delta = {"content": piece}
        if flavor.role_in_every_delta:
            delta = {"role": "assistant", **delta}
        chunks.append(chunk(delta, None))
    last = {"role": "assistant", "content": ""} if flavor.role_in_every_delta else {"content": ""}
    chunks.append(chunk(last, answer.finish_reason))
    if include_usage:
        usage_chunk = chunk({}, None)
        usage_chunk["choices"] = []
        usage_chunk["usage"] = openai_usage(answer)
        chunks.append(usage_chunk)
    return chunks


def text_completion_body(answer: Answer, flavor: OpenAIFlavor, completion_id: str) -> JSONObject:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": answer.model,
        **flavor.body_extra,
        "choices": [
            {
                "index": 0,
                "text": answer.text,
                "logprobs": None,
                "finish_reason": answer.finish_reason,
                **flavor.choice_extra,
            }
        ],
        "usage": openai_usage(answer),
    }


def text_completion_chunks(
    answer: Answer, flavor: OpenAIFlavor, completion_id: str, *, include_usage: bool
) -> list[JSONObject]:
    created = int(time.time())

    def chunk(text: str, finish_reason: str | None) -> JSONObject:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": answer.model,
            **flavor.body_extra,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    **flavor.choice_extra,
                }
            ],
        }

    chunks = [chunk(piece, None) for piece in answer.pieces]
    chunks.append(chunk("", answer.finish_reason))
    if include_usage:
        usage_chunk = chunk("", None)
        usage_chunk["choices"] = []
        usage_chunk["usage"] = openai_usage(answer)
        chunks.append(usage_chunk)
    return chunks


def sse_lines(objects: Iterable[JSONObject]) -> list[bytes]:
    """Server-sent events as OpenAI streams them: one `data:` event each, then `[DONE]`."""
    lines = [b"data: " + json.dumps(obj).encode() + b"\n\n" for obj in objects]
    lines.append(b"data: [DONE]\n\n")
    return lines


def ndjson_lines(objects: Iterable[JSONObject]) -> list[bytes]:
    return [json.dumps(obj).encode() + b"\n" for obj in objects]


# --- The server --------------------------------------------------------------------------------


def shut_reading(conn: socket.socket) -> None:
    """Wake a thread blocked reading `conn`: it sees end-of-file and closes the connection.

    Only the reading side: a request already read in full can still be answered."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RD)


class StandinServer(ThreadingHTTPServer):
    """A threaded HTTP server that stops cleanly: see `stop`.

    Request threads are not daemons and `server_close` waits for them, so an answer being
    streamed when the stop begins is finished. Connections are tracked idle or busy under
    one lock; `stop` wakes the idle ones so their threads end instead of waiting for a
    client that keeps its pooled connection open.
    """

    daemon_threads = False
    block_on_close = True

    def __init__(
        self,
        listener: socket.socket,
        handler: type[StandinHandler],
        settings: Settings,
    ) -> None:
        address = listener.getsockname()
        super().__init__(address[:2], handler, bind_and_activate=False)
        self.socket.close()  # the unbound one TCPServer made; `listener` replaces it
        self.socket = listener
        self.server_address = address
        self.record_lock = threading.Lock()
        self.server_name = str(address[0])
        self.server_port = int(address[1])
        self.settings = settings
        self.ready_at = time.monotonic() + settings.ready_delay
        self._lock = threading.Lock()
        self._idle: set[socket.socket] = set()
        self._busy = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_port

    @property
    def url(self) -> str:
        host = self.server_name
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.server_port}"

    def is_ready(self) -> bool:
        return time.monotonic() >= self.ready_at

    def busy_count(self) -> int:
        with self._lock:
            return self._busy

    def start(self) -> StandinServer:
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL_S},
            name=f"{self.settings.flavor}-standin",
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Accept nothing new, finish what is in flight, then return."""
        with self._lock:
            self._stopping = True
            idle = list(self._idle)
        if self._thread is not None:
            self.shutdown()  # serve_forever returns: nothing new is accepted
        for conn in idle:
            shut_reading(conn)
        self.server_close()  # closes the listener and joins every request thread
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # Connection states, called by the handler. A connection is idle from accept until its
    # first request, and between requests; busy while one is read and answered.

    def track_connection(self, conn: socket.socket) -> None:
        with self._lock:
            self._idle.add(conn)
            if self._stopping:  # accepted as the stop began: nothing will be read from it
                shut_reading(conn)

    def mark_busy(self, conn: socket.socket) -> None:
        with self._lock:
            self._idle.discard(conn)
            self._busy += 1

    def mark_idle(self, conn: socket.socket) -> bool:
        """Back to idle after an answer; False when stopping (then the connection closes)."""
        with self._lock:
            self._busy -= 1
            if self._stopping:
                return False
            self._idle.add(conn)
            return True

    def forget_connection(self, conn: socket.socket) -> None:
        with self._lock:
            self._idle.discard(conn)


Route = Callable[[], None]


class StandinHandler(BaseHTTPRequestHandler):
    """Reads the body, finds the route, answers; the flavors add routes and error shapes."""

    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    server_version = "diversityd-standin"
    sys_version = ""

    openai_flavor: ClassVar[OpenAIFlavor]
    sse_content_type: ClassVar[str] = "text/event-stream"

    body = b""
    route_path = ""
    head_only = False
    status_sent = 0
    log_note = ""

    # What a flavor provides.

    def find_route(self, method: str, path: str) -> Route | None:
        raise NotImplementedError

    def send_no_route(self) -> None:
        raise NotImplementedError

    def send_not_ready(self) -> None:
        raise NotImplementedError

    def send_bad_request(self, message: str) -> None:
        raise NotImplementedError

    # The machinery.

    @property
    def standin(self) -> StandinServer:
        assert isinstance(self.server, StandinServer)
        return self.server

    @property
    def settings(self) -> Settings:
        return self.standin.settings

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in separate writes: without this, Nagle's algorithm and
        # the client's delayed ACK hold the body back ~40 ms. Go's and uvicorn's servers
        # set it too.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.standin.track_connection(self.connection)

    def finish(self) -> None:
        self.standin.forget_connection(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self.serve("GET")

    def do_HEAD(self) -> None:
        self.serve("HEAD")

    def do_POST(self) -> None:
        self.serve("POST")

    def do_PUT(self) -> None:
        self.serve("PUT")

    def do_DELETE(self) -> None:
        self.serve("DELETE")

    def serve(self, method: str) -> None:
        started = time.monotonic()
        self.head_only = method == "HEAD"
        self.status_sent = 0
        self.log_note = ""
        self.standin.mark_busy(self.connection)
        try:
            self.body = self.read_body()
            self.route_path = urlsplit(self.path).path
            if not self.standin.is_ready():
                self.send_not_ready()
            else:
                route = self.find_route("GET" if self.head_only else method, self.route_path)
                if route is None:
                    self.send_no_route()
                else:
                    route()
        except BadRequestError as exc:
            if self.status_sent:
                self.close_connection = True
            else:
                self.send_bad_request(str(exc))
        except (BrokenPipeError, ConnectionResetError):  # the client left mid-answer
            self.close_connection = True
        finally:
            if not self.standin.mark_idle(self.connection):
                self.close_connection = True
            elapsed_ms = (time.monotonic() - started) * 1000
            note = f" {self.log_note}" if self.log_note else ""
            if self.settings.record and method == "POST":
                self.record_request()
            if self.settings.log_requests and not (method == "GET" and self.path in PROBED_PATHS):
                say(
                    f"{self.settings.flavor} {self.client_address[0]} {method} {self.path} "
                    f"{self.status_sent}{note} {elapsed_ms:.1f}ms"
                )

    def record_request(self) -> None:
        try:
            model = json.loads(self.body or b"{}").get("model")
        except (ValueError, AttributeError):
            model = None
        line = json.dumps(
            {
                "path": self.route_path,
                "model": model,
                "authorization": self.headers.get("Authorization"),
                "status": self.status_sent,
            }
        )
        with self.standin.record_lock, open(self.settings.record or "", "a") as out:
            out.write(line + "\n")

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self.read_chunked_body()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            size = int(length)
        except ValueError:
            size = -1
        if size < 0:
            self.close_connection = True  # the body's end is unknown: drop the connection
            raise BadRequestError(f"bad Content-Length {length!r}")
        return self.rfile.read(size)

    def read_chunked_body(self) -> bytes:
        parts: list[bytes] = []
        while True:
            line = self.rfile.readline(65537)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise BadRequestError("bad chunk size in a chunked body") from None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline(65537)

    def json_body(self) -> JSONObject:
        try:
            data = json.loads(self.body or b"null")
        except ValueError as exc:
            raise BadRequestError(f"invalid JSON body: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequestError("the body must be a JSON object")
        return data

    def version_string(self) -> str:
        return self.server_version

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:  # noqa: ARG002 (the base signature)
        self.status_sent = int(code) if str(code).isdigit() else 0

    def log_message(self, format: str, *args: Any) -> None:
        if self.settings.log_requests:
            say(f"{self.settings.flavor} {self.client_address[0]} {format % args}")

    def send_bytes(
        self,
        status: int,
        data: bytes,
        content_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if data and not self.head_only:
            self.wfile.write(data)

    def send_json(self, status: int, obj: object) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), "application/json")

    def send_empty(self, status: int) -> None:
        self.send_bytes(status, b"", "application/json")

    def send_stream(self, content_type: str, lines: Sequence[bytes]) -> None:
        """Send `lines` as one chunked answer, `chunk_delay` apart, as a model generates."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        cut = self.settings.cut_streams_after
        for index, line in enumerate(lines):
            if cut is not None and index >= cut:
                break
            if index and self.settings.chunk_delay > 0:
                time.sleep(self.settings.chunk_delay)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.write(b"0\r\n\r\n")

    def send_openai(self, request: JSONObject, answer: Answer, *, chat: bool) -> None:
        """A chat or text completion, plain or (`stream: true`) as server-sent events."""
        completion_id = new_id("chatcmpl" if chat else "cmpl")
        if not optional_bool(request, "stream", default=False):
            body = (chat_completion_body if chat else text_completion_body)(
                answer, self.openai_flavor, completion_id
            )
            self.send_json(HTTPStatus.OK, body)
            return
        stream_options = request.get("stream_options") or {}
        include_usage = isinstance(stream_options, dict) and bool(
            stream_options.get("include_usage")
        )
        chunks = (chat_completion_chunks if chat else text_completion_chunks)(
            answer, self.openai_flavor, completion_id, include_usage=include_usage
        )
        self.send_stream(self.sse_content_type, sse_lines(chunks))


# --- Running one ----------------------------------------------------------------------------


def say(line: str) -> None:
    """One line to stdout (the journal, under systemd), flushed at once."""
    print(line, flush=True)


def inherited_listener() -> socket.socket | None:
    """The listening socket systemd passed (socket activation), if it passed one to us."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        return None
    listener = socket.socket(fileno=SD_LISTEN_FDS_START)
    os.set_inheritable(listener.fileno(), False)
    # systemd may share one socket among processes (NonBlocking=yes): an accept another
    # process won must not block serve_forever, which would then miss its stop.
    listener.setblocking(False)
    return listener


def open_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


def notify_systemd(state: str) -> None:
    """sd_notify(3) for Type=notify units; nothing without NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
    except OSError as exc:
        say(f"notify {state!r} failed: {exc}")


def add_common_arguments(parser: argparse.ArgumentParser, *, default_port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=default_port, help="port to listen on")
    parser.add_argument(
        "--ready-delay",
        type=non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="answer 503 until this long after start, as a server loading its model",
    )
    parser.add_argument(
        "--chunk-delay",
        type=non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="pause between the chunks of a streamed answer",
    )
    parser.add_argument(
        "--cut-streams-after",
        type=int,
        metavar="N",
        help="end every stream cleanly after N lines, without a finish reason or [DONE]",
    )
    parser.add_argument(
        "--record",
        metavar="FILE",
        help="append one JSON line per POST request to FILE (path, model, Authorization)",
    )


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def run_until_signalled(
    handler: type[StandinHandler], settings: Settings, host: str, port: int
) -> int:
    """The command's body: listen, say so, serve until SIGTERM/SIGINT, stop cleanly, 0."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    # Blocked before any thread starts, so every thread inherits the mask and the signals
    # wait for sigwait below instead of interrupting a request.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    listener = inherited_listener()
    activated = listener is not None
    if listener is None:
        listener = open_listener(host, port)
    server = StandinServer(listener, handler, settings).start()
    how = "socket from systemd" if activated else "own socket"
    say(
        f"{settings.flavor} stand-in listening on {server.url} ({how}), pid {os.getpid()}, "
        f"models {', '.join(settings.models)}, ready in {settings.ready_delay:g} s"
    )
    received: int | None = None
    remaining = server.ready_at - time.monotonic()
    if remaining > 0:
        info = signal.sigtimedwait(STOP_SIGNALS, remaining)
        received = info.si_signo if info is not None else None
    if received is None:
        say(f"{settings.flavor} stand-in ready")
        notify_systemd("READY=1")
        received = signal.sigwait(STOP_SIGNALS)
    notify_systemd("STOPPING=1")
    say(
        f"{settings.flavor} stand-in got {signal.Signals(received).name}: stopping, "
        f"{server.busy_count()} request(s) in flight"
    )
    server.stop()
    say(f"{settings.flavor} stand-in stopped")
    return 0
