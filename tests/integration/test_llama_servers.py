"""The real llama-server and llama-cpp-python server load ggufwriter's tiny models.

Each server runs as a plain subprocess on a free port and loads the model through the
symlink layout diversityd uses (`active/current.gguf -> ../tiny.gguf`), with an alias.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from diversityd import parts
from diversityd_lab.ggufwriter import Geometry, write_gguf
from diversityd_lab.stack import free_port
from tests.conftest import unavailable

pytestmark = pytest.mark.integration

ALIAS = "diversityd-tiny"
MAX_TOKENS = 12
READY_TIMEOUT_S = 30.0


@pytest.fixture(scope="module", params=["F32", "Q8_0", "Q4_0"])
def active_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<dir>/active/current.gguf`, a relative symlink to `<dir>/tiny.gguf`."""
    file_type: str = request.param
    root = tmp_path_factory.mktemp(f"models-{file_type}")
    write_gguf(root / "tiny.gguf", Geometry(file_type=file_type))
    (root / "active").mkdir()
    link = root / "active" / "current.gguf"
    link.symlink_to(Path("..") / "tiny.gguf")
    return link


@pytest.fixture(scope="module")
def llama_cpp_python_env() -> dict[str, str]:
    library_dir = parts.llama_bin_dir()
    if not (library_dir / "libllama.so").exists():
        unavailable(f"{library_dir}/libllama.so missing: run packaging/build-llama-server.sh")
    # The package was built with LLAMA_BUILD=OFF: it has no libraries of its own.
    return {**os.environ, "LLAMA_CPP_LIB_PATH": str(library_dir), "MTMD_CPP_LIB": str(library_dir)}


@contextmanager
def running_server(
    command: list[str], ready_path: str, port: int, log: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[str, int]]:
    """Start `command`, wait until GET ready_path answers 200, yield (base URL, pid); always
    stop the process, and show its log when it dies or never becomes ready."""
    base_url = f"http://127.0.0.1:{port}"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"{command[0]} exited {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(base_url + ready_path, timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{command[0]} not ready in {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.05)
        yield base_url, process.pid
        assert process.poll() is None, f"server died while serving:\n{log.read_text()[-3000:]}"
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def mapped_llama_libraries(pid: int) -> set[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {line.split()[-1] for line in maps.splitlines() if "libllama.so" in line}


def check_uses_the_one_build(pid: int) -> None:
    """Both servers run the llama.cpp that build-llama-server.sh compiled once."""
    libraries = mapped_llama_libraries(pid)
    assert libraries, "libllama is not mapped"
    assert {str(Path(library).parent) for library in libraries} == {str(parts.llama_bin_dir())}


def check_serves_alias_and_chat(base_url: str) -> None:
    models = httpx.get(f"{base_url}/v1/models", timeout=10).json()
    assert [model["id"] for model in models["data"]] == [ALIAS]

    request = {
        "model": ALIAS,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    replies = []
    for _ in range(2):
        response = httpx.post(f"{base_url}/v1/chat/completions", json=request, timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        choice = body["choices"][0]
        content = choice["message"]["content"]
        assert content.strip(), body
        assert content.isprintable(), content
        # Control, EOS and byte tokens have zero output rows: generation runs to the limit.
        assert choice["finish_reason"] == "length", body
        assert body["usage"]["completion_tokens"] == MAX_TOKENS, body
        replies.append(content)
    assert replies[0] == replies[1]  # temperature 0 is deterministic


def test_llama_server_serves_tiny_model_through_symlink(
    llama_server_bin: Path, active_model: Path, tmp_path: Path
) -> None:
    port = free_port()
    command = [
        str(llama_server_bin),
        "--model", str(active_model),
        "--alias", ALIAS,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--ctx-size", "256",
        "--n-gpu-layers", "0",
    ]  # fmt: skip
    log = tmp_path / "llama-server.log"
    with running_server(command, "/health", port, log) as (base_url, pid):
        check_serves_alias_and_chat(base_url)
        check_uses_the_one_build(pid)


def test_llama_cpp_python_serves_tiny_model_through_symlink(
    llama_cpp_python_interpreter: Path,
    llama_cpp_python_env: dict[str, str],
    active_model: Path,
    tmp_path: Path,
) -> None:
    port = free_port()
    command = [
        str(llama_cpp_python_interpreter), "-m", "llama_cpp.server",
        "--model", str(active_model),
        "--model_alias", ALIAS,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", "256",
    ]  # fmt: skip
    log = tmp_path / "llama-cpp-python.log"
    # No /health route here: /v1/models answering 200 means the model is loaded.
    with running_server(command, "/v1/models", port, log, env=llama_cpp_python_env) as (
        base_url,
        pid,
    ):
        check_serves_alias_and_chat(base_url)
        check_uses_the_one_build(pid)
