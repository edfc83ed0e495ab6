"""The Ollama and vLLM stand-ins over real sockets: every route, plain and streamed, the error
answers, readiness, socket activation, and a clean stop on SIGTERM with a stream in flight."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from diversityd_lab.stack import free_port
from diversityd_lab.standins import ollama, vllm
from diversityd_lab.standins.common import StandinServer, make_answer, reply_pieces, reply_text

OLLAMA_MODELS = ("llama3.1", "qwen2:7b")
VLLM_NAMES = ("qwen", "qwen-alias")
WORDS_IN_REPLY = 10  # "Hello from the F stand-in on port P, model M."
CHAT = [{"role": "user", "content": "Say who you are"}]


@pytest.fixture(scope="module")
def ollama_server() -> Iterator[StandinServer]:
    server = ollama.start_ollama(OLLAMA_MODELS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vllm_server() -> Iterator[StandinServer]:
    server = vllm.start_vllm(VLLM_NAMES, model_root="/models/qwen2.5-0.5b.gguf")
    yield server
    server.stop()


@pytest.fixture
def oc(ollama_server: StandinServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ollama_server.url, timeout=5) as client:
        yield client


@pytest.fixture
def vc(vllm_server: StandinServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vllm_server.url, timeout=5) as client:
        yield client


def ollama_text(server: StandinServer, model: str = "llama3.1:latest") -> str:
    return reply_text("ollama", server.port, model)


def vllm_text(server: StandinServer, model: str = "qwen") -> str:
    return reply_text("vllm", server.port, model)


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines() if line]


def sse(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an event stream, each event ended by a blank line."""
    events = response.text.split("\n\n")
    assert events[-1] == ""
    assert all(event.startswith("data: ") for event in events[:-1])
    return [event.removeprefix("data: ") for event in events[:-1]]


def sse_chunks(response: httpx.Response) -> list[dict[str, Any]]:
    payloads = sse(response)
    assert payloads[-1] == "[DONE]"
    return [json.loads(payload) for payload in payloads[:-1]]


# --- The shared pieces -------------------------------------------------------------------------


def test_reply_pieces_join_to_the_text_word_by_word() -> None:
    text = reply_text("vllm", 8001, "qwen")
    assert text == "Hello from the vllm stand-in on port 8001, model qwen."
    pieces = reply_pieces(text)
    assert "".join(pieces) == text
    assert len(pieces) == WORDS_IN_REPLY


def test_answer_is_cut_by_the_token_limit() -> None:
    text = reply_text("ollama", 1, "m:latest")
    assert make_answer(text=text, model="m", prompt_tokens=2, max_tokens=None).finish_reason == (
        "stop"
    )
    cut = make_answer(text=text, model="m", prompt_tokens=2, max_tokens=3)
    assert (cut.text, cut.finish_reason, cut.completion_tokens) == ("Hello from the", "length", 3)
    assert make_answer(text=text, model="m", prompt_tokens=2, max_tokens=99).finish_reason == "stop"


@pytest.mark.parametrize(
    ("name", "served"),
    [
        ("llama3.1", "llama3.1:latest"),
        ("qwen2:7b", "qwen2:7b"),
        ("library/llama3.1", "library/llama3.1:latest"),
        ("registry.local:5000/team/llama3.1", "registry.local:5000/team/llama3.1:latest"),
        ("hf.co/org/model:Q4_K_M", "hf.co/org/model:Q4_K_M"),
    ],
)
def test_ollama_names_without_tag_mean_latest(name: str, served: str) -> None:
    assert ollama.normalize_model(name) == served


def test_commands_require_a_model() -> None:
    with pytest.raises(SystemExit) as exited:
        ollama.build_parser().parse_args(["--port", "1"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        vllm.build_parser().parse_args(["--ready-delay", "-1", "--served-model-name", "x"])
    assert exited.value.code == 2
    args = vllm.build_parser().parse_args(["--served-model-name", "a", "b"])
    assert args.names == ["a", "b"]


# --- Ollama: native routes -----------------------------------------------------------------------


def test_ollama_root_and_version(oc: httpx.Client) -> None:
    root = oc.get("/")
    assert (root.status_code, root.text) == (200, "Ollama is running")
    head = oc.head("/")
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == str(len("Ollama is running"))
    version = oc.get("/api/version")
    assert version.status_code == 200
    assert version.json()["version"].count(".") == 2


def test_ollama_tags_list_models_with_their_tags(oc: httpx.Client) -> None:
    response = oc.get("/api/tags")
    assert response.status_code == 200
    models = response.json()["models"]
    assert [m["name"] for m in models] == ["llama3.1:latest", "qwen2:7b"]
    for model in models:
        assert model["model"] == model["name"]
        assert model["modified_at"].endswith("Z")
        assert isinstance(model["size"], int)
        assert model["size"] > 0
        assert len(model["digest"]) == 64
        int(model["digest"], 16)
        assert model["details"]["format"] == "gguf"
    assert models[0]["digest"] != models[1]["digest"]


def test_ollama_ps_lists_the_loaded_models(oc: httpx.Client) -> None:
    models = oc.get("/api/ps").json()["models"]
    assert [m["name"] for m in models] == ["llama3.1:latest", "qwen2:7b"]
    assert all("expires_at" in m and "size_vram" in m for m in models)


@pytest.mark.parametrize("body", [{"name": "llama3.1"}, {"model": "llama3.1:latest"}])
def test_ollama_show_gives_the_context_length(oc: httpx.Client, body: dict[str, str]) -> None:
    response = oc.post("/api/show", json=body)
    assert response.status_code == 200
    shown = response.json()
    assert shown["model_info"]["llama.context_length"] == ollama.CONTEXT_LENGTH
    assert shown["details"]["family"] == "llama"
    assert "completion" in shown["capabilities"]


def test_ollama_show_unknown_model_is_404(oc: httpx.Client) -> None:
    response = oc.post("/api/show", json={"name": "mistral"})
    assert response.status_code == 404
    assert response.json() == {"error": "model 'mistral' not found"}


def test_ollama_chat_streams_ndjson_by_default(
    oc: httpx.Client, ollama_server: StandinServer
) -> None:
    response = oc.post("/api/chat", json={"model": "llama3.1", "messages": CHAT})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.headers["transfer-encoding"] == "chunked"
    chunks = ndjson(response)
    assert len(chunks) == WORDS_IN_REPLY + 1
    *pieces, final = chunks
    assert all(c["done"] is False and c["model"] == "llama3.1" for c in pieces)
    assert all(c["message"]["role"] == "assistant" for c in chunks)
    text = "".join(c["message"]["content"] for c in pieces)
    assert text == ollama_text(ollama_server)
    assert final["done"] is True
    assert final["done_reason"] == "stop"
    assert final["message"] == {"role": "assistant", "content": ""}
    assert final["eval_count"] == WORDS_IN_REPLY
    assert final["prompt_eval_count"] == 4  # words in CHAT
    assert isinstance(final["total_duration"], int)


def test_ollama_chat_plain_is_one_object(oc: httpx.Client, ollama_server: StandinServer) -> None:
    response = oc.post("/api/chat", json={"model": "qwen2:7b", "messages": CHAT, "stream": False})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["message"] == {
        "role": "assistant",
        "content": ollama_text(ollama_server, "qwen2:7b"),
    }
    assert (body["done"], body["done_reason"], body["eval_count"]) == (True, "stop", 10)
    assert body["created_at"].endswith("Z")


def test_ollama_chat_honours_num_predict(oc: httpx.Client) -> None:
    body = oc.post(
        "/api/chat",
        json={
            "model": "llama3.1",
            "messages": CHAT,
            "stream": False,
            "options": {"num_predict": 2},
        },
    ).json()
    assert body["message"]["content"] == "Hello from"
    assert (body["done_reason"], body["eval_count"]) == ("length", 2)


def test_ollama_chat_without_messages_loads_the_model(oc: httpx.Client) -> None:
    chunks = ndjson(oc.post("/api/chat", json={"model": "llama3.1"}))
    assert len(chunks) == 1
    assert chunks[0]["done"] is True
    assert chunks[0]["done_reason"] == "load"


def test_ollama_generate_streams_and_answers_plain(
    oc: httpx.Client, ollama_server: StandinServer
) -> None:
    streamed = oc.post("/api/generate", json={"model": "llama3.1", "prompt": "Who are you?"})
    assert streamed.headers["content-type"] == "application/x-ndjson"
    *pieces, final = ndjson(streamed)
    assert "".join(str(c["response"]) for c in pieces) == ollama_text(ollama_server)
    assert (final["done"], final["response"], final["eval_count"]) == (True, "", 10)
    assert final["prompt_eval_count"] == 3
    assert isinstance(final["context"], list)

    plain = oc.post(
        "/api/generate", json={"model": "llama3.1:latest", "prompt": "hi", "stream": False}
    ).json()
    assert plain["response"] == ollama_text(ollama_server)
    assert (plain["done"], plain["done_reason"], plain["model"]) == (
        True,
        "stop",
        "llama3.1:latest",
    )


@pytest.mark.parametrize("route", ["/api/chat", "/api/generate"])
def test_ollama_unknown_model_is_404_with_ollama_error(oc: httpx.Client, route: str) -> None:
    response = oc.post(route, json={"model": "mistral", "messages": CHAT, "prompt": "x"})
    assert response.status_code == 404
    assert response.json() == {"error": 'model "mistral" not found, try pulling it first'}


def test_ollama_bad_requests_are_400(oc: httpx.Client) -> None:
    no_model = oc.post("/api/chat", json={"messages": CHAT})
    assert (no_model.status_code, no_model.json()) == (400, {"error": "model is required"})
    not_json = oc.post("/api/chat", content=b"{nope")
    assert not_json.status_code == 400
    assert "invalid JSON" in not_json.json()["error"]
    bad_stream = oc.post("/api/chat", json={"model": "llama3.1", "stream": "yes"})
    assert bad_stream.status_code == 400
    # The connection is still good after the errors.
    assert oc.get("/").status_code == 200


def test_ollama_unknown_route_is_gins_404(oc: httpx.Client) -> None:
    for response in (oc.get("/api/nothing"), oc.post("/api/tags"), oc.get("/api/chat")):
        assert (response.status_code, response.text) == (404, "404 page not found")


# --- Ollama: OpenAI-compatible routes ------------------------------------------------------------


def test_ollama_openai_models(oc: httpx.Client) -> None:
    body = oc.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["llama3.1:latest", "qwen2:7b"]
    assert {m["owned_by"] for m in body["data"]} == {"library"}
    assert oc.get("/v1/models/llama3.1").json()["id"] == "llama3.1:latest"
    assert oc.get("/v1/models/mistral").status_code == 404


def test_ollama_openai_chat_plain(oc: httpx.Client, ollama_server: StandinServer) -> None:
    response = oc.post("/v1/chat/completions", json={"model": "llama3.1", "messages": CHAT})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "llama3.1"
    assert body["system_fingerprint"] == "fp_ollama"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": ollama_text(ollama_server)}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 10, "total_tokens": 14}


def test_ollama_openai_chat_streams_sse(oc: httpx.Client, ollama_server: StandinServer) -> None:
    response = oc.post(
        "/v1/chat/completions",
        json={
            "model": "llama3.1",
            "messages": CHAT,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = sse_chunks(response)
    *content, finish, usage = chunks
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in content]
    assert "".join(d["content"] for d in deltas) == ollama_text(ollama_server)
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 4, "completion_tokens": 10, "total_tokens": 14}


def test_ollama_openai_completions(oc: httpx.Client, ollama_server: StandinServer) -> None:
    plain = oc.post("/v1/completions", json={"model": "qwen2:7b", "prompt": "Hi"}).json()
    assert plain["object"] == "text_completion"
    assert plain["choices"][0]["text"] == ollama_text(ollama_server, "qwen2:7b")
    streamed = sse_chunks(
        oc.post(
            "/v1/completions",
            json={"model": "qwen2:7b", "prompt": "Hi", "stream": True, "max_tokens": 4},
        )
    )
    assert "".join(c["choices"][0]["text"] for c in streamed) == "Hello from the ollama"
    assert streamed[-1]["choices"][0]["finish_reason"] == "length"


def test_ollama_openai_errors(oc: httpx.Client) -> None:
    missing = oc.post("/v1/chat/completions", json={"model": "mistral", "messages": CHAT})
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["message"] == 'model "mistral" not found, try pulling it first'
    assert error["type"] == "api_error"
    empty = oc.post("/v1/chat/completions", json={"model": "llama3.1", "messages": []})
    assert empty.status_code == 400
    assert empty.json()["error"]["type"] == "invalid_request_error"


# --- vLLM ---------------------------------------------------------------------------------------


def test_vllm_health_is_an_empty_200(vc: httpx.Client) -> None:
    response = vc.get("/health")
    assert (response.status_code, response.content) == (200, b"")
    assert vc.get("/version").json()["version"].count(".") == 2


def test_vllm_models_list_the_served_names(vc: httpx.Client) -> None:
    body = vc.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["qwen", "qwen-alias"]
    for model in body["data"]:
        assert model["object"] == "model"
        assert model["owned_by"] == "vllm"
        assert model["root"] == "/models/qwen2.5-0.5b.gguf"
        assert model["max_model_len"] == vllm.MAX_MODEL_LEN


def test_vllm_chat_plain(vc: httpx.Client, vllm_server: StandinServer) -> None:
    response = vc.post("/v1/chat/completions", json={"model": "qwen-alias", "messages": CHAT})
    assert response.status_code == 200
    body = response.json()
    assert (body["object"], body["model"]) == ("chat.completion", "qwen-alias")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == vllm_text(vllm_server, "qwen-alias")
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", None)
    assert body["usage"]["completion_tokens"] == WORDS_IN_REPLY


def test_vllm_chat_without_model_uses_the_first_name(
    vc: httpx.Client, vllm_server: StandinServer
) -> None:
    body = vc.post("/v1/chat/completions", json={"messages": CHAT}).json()
    assert body["model"] == "qwen"
    assert body["choices"][0]["message"]["content"] == vllm_text(vllm_server)


def test_vllm_chat_streams_sse(vc: httpx.Client, vllm_server: StandinServer) -> None:
    response = vc.post(
        "/v1/chat/completions", json={"model": "qwen", "messages": CHAT, "stream": True}
    )
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    chunks = sse_chunks(response)
    first, *content, finish = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert text == vllm_text(vllm_server)
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)


def test_vllm_chat_stream_with_usage(vc: httpx.Client) -> None:
    chunks = sse_chunks(
        vc.post(
            "/v1/chat/completions",
            json={
                "model": "qwen",
                "messages": CHAT,
                "stream": True,
                "max_completion_tokens": 3,
                "stream_options": {"include_usage": True},
            },
        )
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


def test_vllm_completions(vc: httpx.Client, vllm_server: StandinServer) -> None:
    plain = vc.post("/v1/completions", json={"model": "qwen", "prompt": "Hi there"}).json()
    assert plain["object"] == "text_completion"
    assert plain["choices"][0]["text"] == vllm_text(vllm_server)
    assert plain["usage"]["prompt_tokens"] == 2
    streamed = sse_chunks(
        vc.post("/v1/completions", json={"model": "qwen", "prompt": "Hi", "stream": True})
    )
    assert "".join(c["choices"][0]["text"] for c in streamed) == vllm_text(vllm_server)


def test_vllm_unknown_model_is_an_openai_404(vc: httpx.Client) -> None:
    for route in ("/v1/chat/completions", "/v1/completions"):
        response = vc.post(route, json={"model": "llama", "messages": CHAT, "prompt": "x"})
        assert response.status_code == 404
        assert response.json() == {
            "error": {
                "message": "The model `llama` does not exist.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
        }


def test_vllm_bad_requests_and_routes(vc: httpx.Client) -> None:
    no_messages = vc.post("/v1/chat/completions", json={"model": "qwen"})
    assert no_messages.status_code == 400
    assert no_messages.json()["error"]["type"] == "BadRequestError"
    bad_limit = vc.post(
        "/v1/chat/completions", json={"model": "qwen", "messages": CHAT, "max_tokens": "9"}
    )
    assert bad_limit.status_code == 400
    assert vc.post("/v1/chat/completions", content=b"[1, 2]").status_code == 400
    wrong_method = vc.get("/v1/chat/completions")
    assert (wrong_method.status_code, wrong_method.json()) == (
        405,
        {"detail": "Method Not Allowed"},
    )
    unknown = vc.get("/api/tags")
    assert (unknown.status_code, unknown.json()) == (404, {"detail": "Not Found"})


def test_a_chunked_request_body_is_read(vc: httpx.Client) -> None:
    body = json.dumps({"model": "qwen", "messages": CHAT}).encode()
    response = vc.post("/v1/chat/completions", content=iter([body[:10], body[10:]]))
    assert response.status_code == 200
    assert response.json()["model"] == "qwen"


def test_ready_delay_answers_503_until_over() -> None:
    server = ollama.start_ollama(["m"], ready_delay=0.4)
    try:
        with httpx.Client(base_url=server.url, timeout=5) as client:
            early = client.get("/")
            assert early.status_code == 503
            assert early.json() == {"error": "server is starting"}
            time.sleep(0.45)
            assert client.get("/").status_code == 200
    finally:
        server.stop()


def test_stop_finishes_a_stream_in_flight_in_process() -> None:
    server = vllm.start_vllm(["m"], chunk_delay=0.03)
    with (
        httpx.Client(base_url=server.url, timeout=5) as client,
        httpx.Client(base_url=server.url, timeout=5) as idle,
    ):
        assert idle.get("/health").status_code == 200  # then idle in its pool
        with client.stream(
            "POST", "/v1/chat/completions", json={"messages": CHAT, "stream": True}
        ) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            stopper = threading.Thread(target=server.stop)
            stopper.start()
            rest = list(lines)
        stopper.join(timeout=5)
        assert not stopper.is_alive()
    assert rest[-2:] == ["data: [DONE]", ""]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=1)


# --- As commands: SIGTERM, socket activation, readiness ------------------------------------------


@contextmanager
def command(
    module: str, args: list[str], log: Path, *, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m diversityd_lab.standins.MODULE ARGS`, stdout to `log`; killed if still running."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", f"diversityd_lab.standins.{module}", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until the startup line is out (flushed: stdout is the journal under systemd)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        if f"stand-in listening on http://127.0.0.1:{port} " in log.read_text():
            return
        time.sleep(0.02)
    pytest.fail(f"no startup line for port {port}:\n{log.read_text()}")


STREAMS = {
    "ollama": ("/api/chat", {"model": "m", "messages": CHAT}),
    "vllm": ("/v1/chat/completions", {"model": "m", "messages": CHAT, "stream": True}),
}


@pytest.mark.parametrize("flavor", ["ollama", "vllm"])
def test_sigterm_finishes_the_stream_then_exits_0(flavor: str, tmp_path: Path) -> None:
    port = free_port()
    model_option = "--model" if flavor == "ollama" else "--served-model-name"
    args = ["--host", "127.0.0.1", "--port", str(port), model_option, "m", "--chunk-delay", "0.05"]
    log = tmp_path / "standin.log"
    route, body = STREAMS[flavor]
    with (
        command(flavor, args, log) as process,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client,
    ):
        wait_listening(port, process, log)
        # A second client holds an idle keep-alive connection: it must not delay the exit.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as idle:
            assert idle.get("/v1/models").status_code == 200
            with client.stream("POST", route, json=body) as response:
                lines = response.iter_lines()
                first = next(lines)
                signalled = time.monotonic()
                process.send_signal(signal.SIGTERM)
                rest = list(lines)
            streamed_s = time.monotonic() - signalled
            code = process.wait(timeout=5)
            exited_s = time.monotonic() - signalled
    assert code == 0
    # The stream took its full course after the signal (11 more chunks, 0.05 s apart)...
    assert streamed_s > 0.4
    # ...and the process left right after it.
    assert exited_s - streamed_s < 1.0, (streamed_s, exited_s)
    lines_all = [first, *rest]
    if flavor == "ollama":
        assert json.loads(lines_all[-1])["done"] is True
    else:
        assert [line for line in lines_all if line][-1] == "data: [DONE]"
    output = log.read_text()
    assert output.startswith(f"{flavor} stand-in listening on http://127.0.0.1:{port} ")
    assert "got SIGTERM: stopping, 1 request(s) in flight" in output
    assert output.rstrip().endswith(f"{flavor} stand-in stopped")


def test_socket_activation_uses_fd_3(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    passed = fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)  # never 3 itself
    listener.close()
    log = tmp_path / "standin.log"
    # LISTEN_PID must be the server's own pid: a shell sets it to its $$ and execs into it,
    # with the socket moved to fd 3 as systemd passes it.
    script = (
        f"LISTEN_PID=$$ LISTEN_FDS=1 exec {sys.executable} -m diversityd_lab.standins.ollama "
        f"--port 1 --model m 3<&{passed} {passed}<&-"
    )
    try:
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["bash", "-c", script], stdout=out, stderr=subprocess.STDOUT, pass_fds=[passed]
            )
    finally:
        os.close(passed)  # only the stand-in holds it now
    try:
        wait_listening(port, process, log)
        response = httpx.get(f"http://127.0.0.1:{port}/api/tags", timeout=5)
        assert response.json()["models"][0]["name"] == "m:latest"
        assert f"127.0.0.1:{port} (socket from systemd)" in log.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_ready_delay_and_systemd_notification(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(5)
        port = free_port()
        log = tmp_path / "standin.log"
        args = ["--port", str(port), "--served-model-name", "m", "--ready-delay", "0.5"]
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        with command("vllm", args, log, env=env) as process:
            wait_listening(port, process, log)
            started = time.monotonic()
            early = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            assert (early.status_code, early.content) == (503, b"")
            not_yet = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
            assert not_yet.status_code == 503
            assert notify.recv(100) == b"READY=1"
            assert time.monotonic() - started > 0.2
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            process.send_signal(signal.SIGTERM)
            assert notify.recv(100) == b"STOPPING=1"
            assert process.wait(timeout=5) == 0
