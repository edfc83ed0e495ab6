"""A real LiteLLM proxy in front of the Ollama and vLLM stand-ins, all real processes.

One proxy for the module (it takes ~11 s to start): `ollama_chat/` and `ollama/` deployments
point at the Ollama stand-in, `hosted_vllm/` at the vLLM stand-in. Through the proxy, plain
and streamed chat completions must come back with the stand-in's own text, and LiteLLM's
`x-litellm-model-api-base` header must name the stand-in that answered. The stand-ins' request
logs then say which of their routes LiteLLM used.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from diversityd_lab.stack import free_port
from diversityd_lab.standins.common import reply_text

pytestmark = pytest.mark.integration

MASTER_KEY = "sk-standins-integration"
OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_MASTER_KEY": MASTER_KEY,
}
PROXY_START_LIMIT_S = 60.0
OLLAMA_MODEL = "llama3.1"  # served as llama3.1:latest
VLLM_MODEL = "qwen2.5-0.5b-instruct"
REQUEST_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Deployment:
    model_name: str  # what a client asks the proxy for
    api_base: str  # what x-litellm-model-api-base must say
    text: str  # what the stand-in behind it answers


@dataclass(frozen=True)
class Stack:
    proxy_url: str
    deployments: dict[str, Deployment]
    ollama_log: Path
    vllm_log: Path
    proxy_start_s: float


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def standin(flavor: str, port: int) -> list[str]:
    module = f"diversityd_lab.standins.{flavor}"
    return [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port)]


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group we started, then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_http(
    url: str, process: subprocess.Popen[bytes], log: Path, limit_s: float, headers: dict[str, str]
) -> float:
    """Poll `url` until 200; the seconds it took. Fails with the log if the process dies."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if process.poll() is not None:
            pytest.fail(f"{process.args!r} exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, headers=headers, timeout=1.0).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} not ready after {limit_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def stack(litellm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("standins-litellm")
    ollama_port, vllm_port, proxy_port = free_port(), free_port(), free_port()
    ollama_base = f"http://127.0.0.1:{ollama_port}"
    vllm_base = f"http://127.0.0.1:{vllm_port}/v1"
    ollama_text = reply_text("ollama", ollama_port, f"{OLLAMA_MODEL}:latest")
    vllm_text = reply_text("vllm", vllm_port, VLLM_MODEL)
    deployments = {
        "standin-ollama-chat": Deployment("standin-ollama-chat", ollama_base, ollama_text),
        "standin-ollama-generate": Deployment("standin-ollama-generate", ollama_base, ollama_text),
        "standin-vllm": Deployment("standin-vllm", vllm_base, vllm_text),
    }
    timeouts = {"timeout": REQUEST_TIMEOUT_S, "stream_timeout": REQUEST_TIMEOUT_S}
    config = {
        "model_list": [
            {
                "model_name": "standin-ollama-chat",
                "litellm_params": {
                    "model": f"ollama_chat/{OLLAMA_MODEL}",
                    "api_base": ollama_base,
                    **timeouts,
                },
            },
            {
                "model_name": "standin-ollama-generate",
                "litellm_params": {
                    "model": f"ollama/{OLLAMA_MODEL}",
                    "api_base": ollama_base,
                    **timeouts,
                },
            },
            {
                "model_name": "standin-vllm",
                "litellm_params": {
                    "model": f"hosted_vllm/{VLLM_MODEL}",
                    "api_base": vllm_base,
                    **timeouts,
                },
            },
            # Deployments naming a model the stand-in does not serve: the 404 must come through.
            {
                "model_name": "missing-ollama",
                "litellm_params": {
                    "model": "ollama_chat/not-pulled",
                    "api_base": ollama_base,
                    **timeouts,
                },
            },
            {
                "model_name": "missing-vllm",
                "litellm_params": {
                    "model": "hosted_vllm/not-served",
                    "api_base": vllm_base,
                    **timeouts,
                },
            },
        ],
        "router_settings": {"num_retries": 0},
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
    }
    config_path = work / "litellm.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    ollama_log, vllm_log, proxy_log = work / "ollama.log", work / "vllm.log", work / "proxy.log"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # The stand-ins and the proxy start together: the proxy's ~11 s hides theirs.
        ollama = spawn(
            [*standin("ollama", ollama_port), "--model", OLLAMA_MODEL],
            ollama_log,
        )
        processes.append(ollama)
        vllm = spawn(
            [*standin("vllm", vllm_port), "--served-model-name", VLLM_MODEL],
            vllm_log,
        )
        processes.append(vllm)
        proxy_cli = [str(litellm_python), "-m", "litellm.proxy.proxy_cli"]
        proxy = spawn(
            [
                *proxy_cli,
                "--config",
                str(config_path),
                "--host",
                "127.0.0.1",
                "--port",
                str(proxy_port),
            ],
            proxy_log,
            env={**os.environ, **OFFLINE_ENV},
        )
        processes.append(proxy)
        wait_http(f"{ollama_base}/", ollama, ollama_log, 10, {})
        wait_http(f"http://127.0.0.1:{vllm_port}/health", vllm, vllm_log, 10, {})
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        proxy_start_s = wait_http(
            f"{proxy_url}/health/liveliness", proxy, proxy_log, PROXY_START_LIMIT_S, {}
        )
        print(f"\nproxy ready {proxy_start_s:.2f} s after spawn")
        yield Stack(proxy_url, deployments, ollama_log, vllm_log, proxy_start_s)
    finally:
        for process in reversed(processes):
            stop(process)
    # After every test of the module: the stand-ins must have ended cleanly on SIGTERM.
    for process, log in zip(processes[:2], (ollama_log, vllm_log), strict=True):
        assert process.returncode == 0, log.read_text()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {MASTER_KEY}"}


def chat_request(model: str, *, stream: bool) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Who are you?"}],
        "stream": stream,
    }


@pytest.mark.parametrize(
    "model_name", ["standin-ollama-chat", "standin-ollama-generate", "standin-vllm"]
)
def test_plain_chat_through_proxy(stack: Stack, model_name: str) -> None:
    deployment = stack.deployments[model_name]
    started = time.monotonic()
    response = httpx.post(
        f"{stack.proxy_url}/v1/chat/completions",
        json=chat_request(model_name, stream=False),
        headers=auth(),
        timeout=30,
    )
    elapsed_ms = (time.monotonic() - started) * 1000
    print(f"\n{model_name} plain: {response.status_code} in {elapsed_ms:.0f} ms")
    assert response.status_code == 200, response.text
    assert response.headers["x-litellm-model-api-base"] == deployment.api_base
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == deployment.text
    assert body["choices"][0]["finish_reason"] == "stop"
    # The stand-ins report a count per word; LiteLLM passes them on.
    assert body["usage"]["completion_tokens"] == len(deployment.text.split(" "))


@pytest.mark.parametrize(
    "model_name", ["standin-ollama-chat", "standin-ollama-generate", "standin-vllm"]
)
def test_streamed_chat_through_proxy(stack: Stack, model_name: str) -> None:
    deployment = stack.deployments[model_name]
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{stack.proxy_url}/v1/chat/completions",
        json=chat_request(model_name, stream=True),
        headers=auth(),
        timeout=30,
    ) as response:
        assert response.status_code == 200, response.read().decode()
        assert response.headers["x-litellm-model-api-base"] == deployment.api_base
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    elapsed_ms = (time.monotonic() - started) * 1000
    print(f"\n{model_name} streamed: {len(events)} events in {elapsed_ms:.0f} ms")
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(
        choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]
    )
    assert text == deployment.text
    reasons = [c.get("finish_reason") for chunk in chunks for c in chunk["choices"]]
    assert reasons.count("stop") == 1
    # More than one content chunk: the proxy streamed, it did not wait and send it whole.
    with_content = [c for c in chunks for ch in c["choices"] if ch["delta"].get("content")]
    assert len(with_content) > 1


@pytest.mark.parametrize("model_name", ["missing-ollama", "missing-vllm"])
def test_model_not_served_comes_back_as_404(stack: Stack, model_name: str) -> None:
    response = httpx.post(
        f"{stack.proxy_url}/v1/chat/completions",
        json=chat_request(model_name, stream=False),
        headers=auth(),
        timeout=30,
    )
    assert response.status_code == 404, response.text
    assert "not" in response.json()["error"]["message"]


def logged_routes(log: Path) -> set[str]:
    """`METHOD PATH` of every request a stand-in logged (`FLAVOR ADDR METHOD PATH STATUS`)."""
    routes = set()
    for line in log.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[2] in {"GET", "POST", "HEAD"}:
            routes.add(f"{fields[2]} {fields[3]}")
    return routes


def test_proxy_used_the_native_routes(stack: Stack) -> None:
    """Runs last in the module: by now every kind of request above has gone through."""
    ollama_routes = logged_routes(stack.ollama_log)
    vllm_routes = logged_routes(stack.vllm_log)
    print(f"\nollama stand-in saw {sorted(ollama_routes)}\nvllm stand-in saw {sorted(vllm_routes)}")
    assert {"POST /api/chat", "POST /api/generate"} <= ollama_routes
    assert "POST /v1/chat/completions" not in ollama_routes
    assert "POST /v1/chat/completions" in vllm_routes
