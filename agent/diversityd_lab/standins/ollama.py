"""A stand-in for Ollama: its native /api routes and its OpenAI-compatible /v1 routes.

    python -m diversityd_lab.standins.ollama --host 127.0.0.1 --port 11434 --model llama3.1

The shapes follow Ollama's API (docs/api.md, docs/openai.md) closely enough for LiteLLM's
`ollama_chat/` (POST /api/chat) and `ollama/` (POST /api/generate) providers, which also
POST /api/show for a model's context length. A model named without a tag means `:latest`;
every answer is the fixed `reply_text`, streamed word by word where asked.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from diversityd_lab.standins.common import (
    Answer,
    BadRequestError,
    JSONObject,
    OpenAIFlavor,
    Route,
    Settings,
    StandinHandler,
    StandinServer,
    add_common_arguments,
    count_words,
    make_answer,
    ndjson_lines,
    open_listener,
    optional_bool,
    optional_int,
    reply_text,
    run_until_signalled,
)

FLAVOR = "ollama"
DEFAULT_PORT = 11434
VERSION = "0.9.0"
CONTEXT_LENGTH = 8192
OPENAI_FLAVOR = OpenAIFlavor(
    body_extra={"system_fingerprint": "fp_ollama"},
    choice_extra={},
    message_extra={},
    role_in_every_delta=True,
)
# Loaded "at" process start: /api/tags and /api/ps report the same times all along.
STARTED = datetime.now(UTC)


def normalize_model(name: str) -> str:
    """Ollama's rule: a name whose last path part has no tag means `NAME:latest`."""
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def model_digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def model_size(name: str) -> int:
    """A fixed, plausible size per name (bytes): 1-5 GB."""
    return 1_000_000_000 + int(model_digest(name)[:8], 16) % 4_000_000_000


def model_details() -> JSONObject:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "8.0B",
        "quantization_level": "Q4_K_M",
    }


def go_time(moment: datetime) -> str:
    """RFC 3339 with nanoseconds and a Z, as Go's time.Time marshals to JSON in UTC."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


def now_go() -> str:
    return go_time(datetime.now(UTC))


class OllamaHandler(StandinHandler):
    server_version = "ollama-standin"
    openai_flavor = OPENAI_FLAVOR

    def find_route(self, method: str, path: str) -> Route | None:
        match method, path:
            case "GET", "/":
                return self.get_root
            case "GET", "/api/version":
                return self.get_version
            case "GET", "/api/tags":
                return self.get_tags
            case "GET", "/api/ps":
                return self.get_ps
            case "POST", "/api/show":
                return self.post_show
            case "POST", "/api/chat":
                return self.post_chat
            case "POST", "/api/generate":
                return self.post_generate
            case "GET", "/v1/models":
                return self.get_openai_models
            case "POST", "/v1/chat/completions":
                return self.post_openai_chat
            case "POST", "/v1/completions":
                return self.post_openai_completions
            case "GET", _ if path.startswith("/v1/models/"):
                return self.get_openai_model
        return None

    # Errors: Ollama answers {"error": "..."} on /api, OpenAI's shape on /v1, and gin's
    # plain-text 404 for a route it does not have (any method).

    def send_error_json(self, status: int, message: str) -> None:
        if self.route_path.startswith("/v1/"):
            kind = "invalid_request_error" if status == HTTPStatus.BAD_REQUEST else "api_error"
            error = {"message": message, "type": kind, "param": None, "code": None}
            self.send_json(status, {"error": error})
        else:
            self.send_json(status, {"error": message})

    def send_no_route(self) -> None:
        self.send_bytes(HTTPStatus.NOT_FOUND, b"404 page not found", "text/plain")

    def send_not_ready(self) -> None:
        self.send_error_json(HTTPStatus.SERVICE_UNAVAILABLE, "server is starting")

    def send_bad_request(self, message: str) -> None:
        self.send_error_json(HTTPStatus.BAD_REQUEST, message)

    def send_model_not_found(self, name: str) -> None:
        self.send_error_json(
            HTTPStatus.NOT_FOUND, f'model "{name}" not found, try pulling it first'
        )

    def requested_model(self, request: JSONObject, *keys: str) -> tuple[str, str | None]:
        """The model name as sent, and the served name it means (None: not served)."""
        for key in keys:
            value = request.get(key)
            if isinstance(value, str) and value:
                self.log_note = f"model={value}"
                wanted = normalize_model(value)
                return value, wanted if wanted in self.settings.models else None
        raise BadRequestError("model is required")

    def answer_for(self, served: str, name: str, prompt_tokens: int, limit: int | None) -> Answer:
        text = reply_text(FLAVOR, self.standin.port, served)
        return make_answer(text=text, model=name, prompt_tokens=prompt_tokens, max_tokens=limit)

    # Native routes.

    def get_root(self) -> None:
        self.send_bytes(HTTPStatus.OK, b"Ollama is running", "text/plain; charset=utf-8")

    def get_version(self) -> None:
        self.send_json(HTTPStatus.OK, {"version": VERSION})

    def get_tags(self) -> None:
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": go_time(STARTED),
                "size": model_size(name),
                "digest": model_digest(name),
                "details": model_details(),
            }
            for name in self.settings.models
        ]
        self.send_json(HTTPStatus.OK, {"models": models})

    def get_ps(self) -> None:
        models = [
            {
                "name": name,
                "model": name,
                "size": model_size(name),
                "digest": model_digest(name),
                "details": model_details(),
                "expires_at": "2318-01-01T00:00:00Z",  # keep_alive -1: never unloaded
                "size_vram": 0,
                "context_length": CONTEXT_LENGTH,
            }
            for name in self.settings.models
        ]
        self.send_json(HTTPStatus.OK, {"models": models})

    def post_show(self) -> None:
        request = self.json_body()
        name, served = self.requested_model(request, "model", "name")
        if served is None:
            self.send_error_json(HTTPStatus.NOT_FOUND, f"model '{name}' not found")
            return
        self.send_json(
            HTTPStatus.OK,
            {
                "license": "",
                "modelfile": f"# Modelfile generated by the stand-in\nFROM {served}\n",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": model_details(),
                "model_info": {
                    "general.architecture": "llama",
                    "general.parameter_count": 8_030_261_248,
                    "llama.context_length": CONTEXT_LENGTH,
                },
                "capabilities": ["completion"],
                "modified_at": go_time(STARTED),
            },
        )

    def timings(self, started: float, answer: Answer) -> JSONObject:
        """The counts and durations (nanoseconds) on Ollama's final chunk."""
        # Built before a stream is sent: count the pauses the stream will take.
        streaming = self.settings.chunk_delay * answer.completion_tokens
        total = int((time.monotonic() - started + streaming) * 1e9)
        return {
            "total_duration": total,
            "load_duration": 0,
            "prompt_eval_count": answer.prompt_tokens,
            "prompt_eval_duration": total // 10,
            "eval_count": answer.completion_tokens,
            "eval_duration": total - total // 10,
        }

    def post_chat(self) -> None:
        started = time.monotonic()
        request = self.json_body()
        name, served = self.requested_model(request, "model")
        if served is None:
            self.send_model_not_found(name)
            return
        messages = request.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequestError("messages must be a list of objects")
        stream = optional_bool(request, "stream", default=True)
        options = request.get("options") or {}
        if not isinstance(options, dict):
            raise BadRequestError("options must be an object")
        if not messages:  # Ollama loads the model and says so
            self.send_native(stream, [self.chat_chunk(name, "", done_reason="load")])
            return
        limit = optional_int(options, "num_predict")
        answer = self.answer_for(served, name, count_words(messages), limit)
        if not stream:
            final = self.chat_chunk(name, answer.text, done_reason=answer.finish_reason)
            self.send_json(HTTPStatus.OK, final | self.timings(started, answer))
            return
        chunks = [self.chat_chunk(name, piece) for piece in answer.pieces]
        final = self.chat_chunk(name, "", done_reason=answer.finish_reason)
        chunks.append(final | self.timings(started, answer))
        self.send_native(stream, chunks)

    def chat_chunk(self, model: str, content: str, *, done_reason: str | None = None) -> JSONObject:
        chunk: JSONObject = {
            "model": model,
            "created_at": now_go(),
            "message": {"role": "assistant", "content": content},
        }
        if done_reason is not None:
            chunk["done_reason"] = done_reason
        chunk["done"] = done_reason is not None
        return chunk

    def post_generate(self) -> None:
        started = time.monotonic()
        request = self.json_body()
        name, served = self.requested_model(request, "model")
        if served is None:
            self.send_model_not_found(name)
            return
        prompt = request.get("prompt") or ""
        if not isinstance(prompt, str):
            raise BadRequestError("prompt must be a string")
        stream = optional_bool(request, "stream", default=True)
        options = request.get("options") or {}
        if not isinstance(options, dict):
            raise BadRequestError("options must be an object")
        if not prompt:
            self.send_native(stream, [self.generate_chunk(name, "", done_reason="load")])
            return
        limit = optional_int(options, "num_predict")
        answer = self.answer_for(served, name, count_words(prompt), limit)
        context = list(range(1, answer.prompt_tokens + answer.completion_tokens + 1))
        if not stream:
            final = self.generate_chunk(name, answer.text, done_reason=answer.finish_reason)
            final |= {"context": context} | self.timings(started, answer)
            self.send_json(HTTPStatus.OK, final)
            return
        chunks = [self.generate_chunk(name, piece) for piece in answer.pieces]
        final = self.generate_chunk(name, "", done_reason=answer.finish_reason)
        chunks.append(final | {"context": context} | self.timings(started, answer))
        self.send_native(stream, chunks)

    def generate_chunk(
        self, model: str, response: str, *, done_reason: str | None = None
    ) -> JSONObject:
        chunk: JSONObject = {"model": model, "created_at": now_go(), "response": response}
        if done_reason is not None:
            chunk["done_reason"] = done_reason
        chunk["done"] = done_reason is not None
        return chunk

    def send_native(self, stream: bool, chunks: list[JSONObject]) -> None:
        if stream:
            self.send_stream("application/x-ndjson", ndjson_lines(chunks))
        else:
            self.send_json(HTTPStatus.OK, chunks[-1])

    # OpenAI-compatible routes.

    def openai_model(self, name: str) -> JSONObject:
        owner = name.split("/", maxsplit=1)[0] if "/" in name else "library"
        created = int(STARTED.timestamp())
        return {"id": name, "object": "model", "created": created, "owned_by": owner}

    def get_openai_models(self) -> None:
        data = [self.openai_model(name) for name in self.settings.models]
        self.send_json(HTTPStatus.OK, {"object": "list", "data": data})

    def get_openai_model(self) -> None:
        name = self.route_path.removeprefix("/v1/models/")
        served = normalize_model(name)
        if served not in self.settings.models:
            self.send_model_not_found(name)
            return
        self.send_json(HTTPStatus.OK, self.openai_model(served))

    def post_openai_chat(self) -> None:
        request = self.json_body()
        name, served = self.requested_model(request, "model")
        if served is None:
            self.send_model_not_found(name)
            return
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequestError("[] is too short - 'messages'")
        limit = optional_int(request, "max_completion_tokens", "max_tokens")
        answer = self.answer_for(served, name, count_words(messages), limit)
        self.send_openai(request, answer, chat=True)

    def post_openai_completions(self) -> None:
        request = self.json_body()
        name, served = self.requested_model(request, "model")
        if served is None:
            self.send_model_not_found(name)
            return
        prompt = request.get("prompt")
        if not isinstance(prompt, str | list):
            raise BadRequestError("prompt is required")
        limit = optional_int(request, "max_tokens")
        answer = self.answer_for(served, name, count_words(prompt), limit)
        self.send_openai(request, answer, chat=False)


def settings_for(
    models: Sequence[str],
    *,
    ready_delay: float = 0.0,
    chunk_delay: float = 0.0,
    log_requests: bool = True,
    record: str | None = None,
) -> Settings:
    names = tuple(dict.fromkeys(normalize_model(name) for name in models))
    return Settings(
        FLAVOR,
        names,
        ready_delay=ready_delay,
        chunk_delay=chunk_delay,
        log_requests=log_requests,
        record=record,
    )


def start_ollama(
    models: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ready_delay: float = 0.0,
    chunk_delay: float = 0.0,
    log_requests: bool = False,
) -> StandinServer:
    """Serve in this process, on a thread (port 0: any free port); `stop()` ends it."""
    settings = settings_for(
        models, ready_delay=ready_delay, chunk_delay=chunk_delay, log_requests=log_requests
    )
    return StandinServer(open_listener(host, port), OllamaHandler, settings).start()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diversityd_lab.standins.ollama",
        description="A stand-in for Ollama that answers a fixed text for each model.",
    )
    add_common_arguments(parser, default_port=DEFAULT_PORT)
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        required=True,
        metavar="NAME",
        help="a model to serve (repeat for more); no tag means :latest",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    settings = settings_for(
        args.models, ready_delay=args.ready_delay, chunk_delay=args.chunk_delay, record=args.record
    )
    return run_until_signalled(OllamaHandler, settings, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
