"""A stand-in for vLLM's OpenAI-compatible server (`vllm serve`).

    python -m diversityd_lab.standins.vllm --host 127.0.0.1 --port 8001 --served-model-name qwen

GET /health is 200 with an empty body once ready (503 before `--ready-delay` is over, as
while vLLM loads its weights), GET /v1/models lists the served names (`owned_by: "vllm"`),
POST /v1/chat/completions and /v1/completions answer the fixed `reply_text`, plain or as
server-sent events. LiteLLM's `hosted_vllm/` provider posts to `{api_base}/chat/completions`
through the OpenAI client. Errors have OpenAI's shape; routes not served answer FastAPI's.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
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
    open_listener,
    optional_int,
    reply_text,
    run_until_signalled,
)

FLAVOR = "vllm"
DEFAULT_PORT = 8000
VERSION = "0.10.1"
MAX_MODEL_LEN = 8192
OPENAI_FLAVOR = OpenAIFlavor(
    body_extra={},
    choice_extra={"logprobs": None, "stop_reason": None},
    message_extra={"reasoning_content": None, "tool_calls": []},
    role_in_every_delta=False,
)
KNOWN_PATHS = frozenset(
    {"/health", "/version", "/v1/models", "/v1/chat/completions", "/v1/completions"}
)
STARTED = int(time.time())


class VLLMHandler(StandinHandler):
    server_version = "uvicorn"
    openai_flavor = OPENAI_FLAVOR
    sse_content_type = "text/event-stream; charset=utf-8"

    def find_route(self, method: str, path: str) -> Route | None:
        match method, path:
            case "GET", "/health":
                return self.get_health
            case "GET", "/version":
                return self.get_version
            case "GET", "/v1/models":
                return self.get_models
            case "POST", "/v1/chat/completions":
                return self.post_chat
            case "POST", "/v1/completions":
                return self.post_completions
        return None

    def send_error_json(self, status: HTTPStatus, message: str, param: str | None = None) -> None:
        kind = {
            HTTPStatus.BAD_REQUEST: "BadRequestError",
            HTTPStatus.NOT_FOUND: "NotFoundError",
            HTTPStatus.SERVICE_UNAVAILABLE: "ServiceUnavailableError",
        }.get(status, "InternalServerError")
        error = {"message": message, "type": kind, "param": param, "code": int(status)}
        self.send_json(status, {"error": error})

    def send_no_route(self) -> None:
        if self.route_path in KNOWN_PATHS:
            self.send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"detail": "Method Not Allowed"})
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"detail": "Not Found"})

    def send_not_ready(self) -> None:
        if self.route_path == "/health":
            self.send_empty(HTTPStatus.SERVICE_UNAVAILABLE)
        else:
            self.send_error_json(HTTPStatus.SERVICE_UNAVAILABLE, "the model is still loading")

    def send_bad_request(self, message: str) -> None:
        self.send_error_json(HTTPStatus.BAD_REQUEST, message)

    def requested_model(self, request: JSONObject) -> tuple[str, bool]:
        """The model as sent (the first served name when omitted), and whether it is served."""
        value = request.get("model")
        if value is None:
            value = self.settings.models[0]
        if not isinstance(value, str):
            raise BadRequestError("model must be a string")
        self.log_note = f"model={value}"
        return value, value in self.settings.models

    def send_model_not_found(self, name: str) -> None:
        self.send_error_json(HTTPStatus.NOT_FOUND, f"The model `{name}` does not exist.", "model")

    def answer_for(self, name: str, prompt_tokens: int, limit: int | None) -> Answer:
        text = reply_text(FLAVOR, self.standin.port, name)
        return make_answer(text=text, model=name, prompt_tokens=prompt_tokens, max_tokens=limit)

    def get_health(self) -> None:
        self.send_bytes(HTTPStatus.OK, b"", "application/json")

    def get_version(self) -> None:
        self.send_json(HTTPStatus.OK, {"version": VERSION})

    def get_models(self) -> None:
        root = self.settings.model_root
        data = [
            {
                "id": name,
                "object": "model",
                "created": STARTED,
                "owned_by": "vllm",
                "root": root or name,
                "parent": None,
                "max_model_len": MAX_MODEL_LEN,
            }
            for name in self.settings.models
        ]
        self.send_json(HTTPStatus.OK, {"object": "list", "data": data})

    def post_chat(self) -> None:
        request = self.json_body()
        name, served = self.requested_model(request)
        if not served:
            self.send_model_not_found(name)
            return
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequestError("messages must be a non-empty list")
        limit = optional_int(request, "max_completion_tokens", "max_tokens")
        self.send_openai(request, self.answer_for(name, count_words(messages), limit), chat=True)

    def post_completions(self) -> None:
        request = self.json_body()
        name, served = self.requested_model(request)
        if not served:
            self.send_model_not_found(name)
            return
        prompt = request.get("prompt")
        if not isinstance(prompt, str | list):
            raise BadRequestError("prompt is required")
        limit = optional_int(request, "max_tokens")
        self.send_openai(request, self.answer_for(name, count_words(prompt), limit), chat=False)


def settings_for(
    served_model_names: Sequence[str],
    *,
    model_root: str | None = None,
    ready_delay: float = 0.0,
    chunk_delay: float = 0.0,
    log_requests: bool = True,
    record: str | None = None,
    cut_streams_after: int | None = None,
) -> Settings:
    names = tuple(dict.fromkeys(served_model_names))
    return Settings(
        FLAVOR,
        names,
        ready_delay=ready_delay,
        chunk_delay=chunk_delay,
        model_root=model_root,
        log_requests=log_requests,
        record=record,
        cut_streams_after=cut_streams_after,
    )


def start_vllm(
    served_model_names: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    model_root: str | None = None,
    ready_delay: float = 0.0,
    chunk_delay: float = 0.0,
    log_requests: bool = False,
) -> StandinServer:
    """Serve in this process, on a thread (port 0: any free port); `stop()` ends it."""
    settings = settings_for(
        served_model_names,
        model_root=model_root,
        ready_delay=ready_delay,
        chunk_delay=chunk_delay,
        log_requests=log_requests,
    )
    return StandinServer(open_listener(host, port), VLLMHandler, settings).start()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diversityd_lab.standins.vllm",
        description="A stand-in for vLLM's OpenAI-compatible server; answers a fixed text.",
    )
    add_common_arguments(parser, default_port=DEFAULT_PORT)
    parser.add_argument(
        "--served-model-name",
        dest="names",
        action="extend",
        nargs="+",
        required=True,
        metavar="NAME",
        help="the model name(s) clients ask for, as vLLM's own option",
    )
    parser.add_argument(
        "--model",
        dest="model_root",
        metavar="PATH",
        help="the weights vLLM would load; only reported as `root` in /v1/models",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    settings = settings_for(
        args.names,
        model_root=args.model_root,
        ready_delay=args.ready_delay,
        chunk_delay=args.chunk_delay,
        record=args.record,
        cut_streams_after=args.cut_streams_after,
    )
    return run_until_signalled(VLLMHandler, settings, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
