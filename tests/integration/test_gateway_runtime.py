"""The gateway launcher's runtime inside a real LiteLLM 1.106.2 proxy (issue 17): the control
channel, routes in-process, the daemon's judgement over LiteLLM's cooldowns, the answer for
a name no server can serve, a warm-up that spends nothing, and every private name of
LiteLLM the launcher relies on (a LiteLLM upgrade that breaks one fails here, not a user).

One proxy for the module (it takes ~12 s to start), outside any manager: the socket is
handed to it as systemd would (diversityd_lab.socketactivated). Behind it, stand-ins that
record every request they get: a local server, a second local server that starts dead, and
a "paid cloud" that must never be asked by anything but a client.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from diversityd.adapters import gatewaylauncher
from diversityd.adapters.gatewaychannel import hello, push_routes, routes_digest
from diversityd.adapters.gatewayruntime import ChannelError, call
from diversityd.catalog import build_catalog
from diversityd.config import Config, parse_config
from diversityd.gateway import UNAVAILABLE_INFO, Availability, GatewayPlan, render_gateway
from diversityd_lab.socketactivated import listening_socket, spawn_socket_activated
from diversityd_lab.stack import free_port

pytestmark = pytest.mark.integration

MASTER_KEY = "sk-runtime-contract-key"
CLOUD_KEY = "sk-paid-cloud-secret-0123456789"
START_LIMIT_S = 90.0


@dataclass
class Proxy:
    url: str
    control: str
    config: Config
    records: dict[str, Path]  # stand-in -> its request record
    ports: dict[str, int]
    work: Path
    standins: dict[str, subprocess.Popen[bytes]]

    def requests_to(self, standin: str) -> list[dict[str, Any]]:
        path = self.records[standin]
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def render(
        self, *down: str, lonely: bool = False, holding: dict[str, float] | None = None
    ) -> GatewayPlan:
        """`lonely` is down (no server, no fallback: answered by the launcher) unless
        `lonely` says it serves."""
        gone = frozenset({*down} if lonely else {"lonely", *down})
        availability = Availability.all_up_except(self.config, gone)
        states = {name: "failed" if name == "lonely" else "stopped" for name in gone}
        catalog = build_catalog(self.config)
        return render_gateway(self.config, catalog, availability, states=states, holding=holding)

    def start_standin(self, name: str, model: str, *extra: str) -> None:
        argv = [
            sys.executable,
            "-m", "diversityd_lab.standins.vllm",
            "--port", str(self.ports[name]),
            "--served-model-name", model,
            "--record", str(self.records[name]),
            *extra,
        ]  # fmt: skip
        with (self.work / f"{name}.log").open("ab") as log:
            self.standins[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: port_answers(self.ports[name]), 20)

    def stop_standin(self, name: str) -> None:
        process = self.standins.pop(name)
        process.send_signal(signal.SIGTERM)
        process.wait(10)


def port_answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def wait_until(predicate: Any, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {limit_s} s: {predicate}")


def configuration(ports: dict[str, int]) -> Config:
    providers = f"""\
providers:
  local: {{type: vllm, base_url: "http://127.0.0.1:{ports["local"]}", models: [local-model]}}
  spare: {{type: vllm, base_url: "http://127.0.0.1:{ports["spare"]}", models: [spare-model]}}
  paid:
    type: openai_compatible
    base_url: "http://127.0.0.1:{ports["paid"]}/v1"
    api_key_env: CLOUD_KEY
    models: [paid-model]
  lonely: {{type: llama_cpp, base_url: "http://127.0.0.1:{ports["lonely"]}", models: [lonely]}}
  ghost: {{type: llama_cpp, base_url: "http://127.0.0.1:{ports["ghost"]}", models: [ghost-model]}}
  cutter: {{type: vllm, base_url: "http://127.0.0.1:{ports["cutter"]}", models: [cut-model]}}
  mute: {{type: vllm, base_url: "http://127.0.0.1:{ports["mute"]}", models: [mute-model]}}
  slow: {{type: vllm, base_url: "http://127.0.0.1:{ports["slow"]}", models: [slow-model]}}
"""
    mappings = """\
fallback_chains:
  spare-model: {chain: [local-model, paid-model]}
  local-model: {chain: [paid-model]}
  ghost-model: {chain: [paid-model]}
  cut-model: {chain: [local-model]}
  mute-model: {chain: [local-model]}
"""
    config, findings = parse_config(
        {"providers.yaml": providers, "model-mappings.yaml": mappings},
        config_dir="/cfg",
        hostname="box",
    )
    assert config is not None, findings
    return config


@pytest.fixture(scope="module")
def proxy(litellm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    work = tmp_path_factory.mktemp("runtime")
    names = ("local", "spare", "paid", "lonely", "ghost", "cutter", "mute", "slow")
    ports = {name: free_port() for name in names}
    config = configuration(ports)
    records = {name: work / f"{name}.jsonl" for name in ports}
    listener = listening_socket()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    control = str(work / "control" / "blue.sock")
    running = Proxy(url, control, config, records, ports, work, {})
    running.start_standin("local", "local-model")
    running.start_standin("paid", "paid-model")
    # servers that close every stream cleanly mid-answer (after some content; before any)
    running.start_standin("cutter", "cut-model", "--cut-streams-after", "3")
    running.start_standin("mute", "mute-model", "--cut-streams-after", "1")
    running.start_standin("slow", "slow-model", "--chunk-delay", "0.3")
    # spare and ghost never answer at start, though routed (as if up): the warm-up tries
    # them and fails; ghost's chain leads straight to the paid cloud, which the warm-up
    # must not reach
    config_file = work / "blue.yaml"
    config_file.write_text(running.render().text())
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(work),
        "LITELLM_MASTER_KEY": MASTER_KEY,
        "CLOUD_KEY": CLOUD_KEY,
    }
    argv = [str(litellm_python), gatewaylauncher.__file__, "--config", str(config_file),
            "--control", control]  # fmt: skip
    log = work / "proxy.log"
    process = spawn_socket_activated(argv, listener, env=env, log=log)
    try:
        deadline = time.monotonic() + START_LIMIT_S
        while not os.path.exists(control) or not liveliness(url):
            assert process.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        for name in list(running.standins):
            running.stop_standin(name)
        listener.close()


def liveliness(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/liveliness", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def chat(proxy: Proxy, model: str, *, key: str = MASTER_KEY, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(
        f"{proxy.url}/v1/chat/completions",
        json={**body, **extra},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def listed(proxy: Proxy) -> set[str]:
    answer = httpx.get(
        f"{proxy.url}/v1/models", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=10
    )
    return {m["id"] for m in answer.json()["data"]}


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_the_warm_up_asks_local_servers_and_never_the_paid_cloud(proxy: Proxy) -> None:
    """Issue 17: a new process's warm-up sent real completions to every model, clouds
    included, and a failing local one fell back to its cloud fallback. Now: local names
    only, fallbacks off. (Checked first, before any test asks anything.)"""
    local = [r for r in proxy.requests_to("local") if r["path"] == "/v1/chat/completions"]
    assert len(local) >= 2  # one plain and one streamed warm-up request
    assert proxy.requests_to("paid") == []  # ghost-model failed, its chain was not followed


def test_the_channel_is_private_and_says_what_runs(proxy: Proxy) -> None:
    mode = os.stat(proxy.control).st_mode
    assert stat.S_ISSOCK(mode)
    assert mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(proxy.control)).st_mode & 0o077 == 0
    view = run(hello("blue", proxy.control))
    assert view.answered, view.error
    assert view.litellm == "1.106.2"  # the pinned version (packaging/versions.sh)
    assert view.launcher_sha == gatewaylauncher.code_sha(os.path.dirname(gatewaylauncher.__file__))
    assert view.routes_digest == routes_digest(proxy.render().routes())
    with pytest.raises(ChannelError, match="unknown op"):
        run(call(proxy.control, {"op": "no-such-op"}))


def test_routes_change_in_process_and_models_follow(proxy: Proxy) -> None:
    """A deployment taken out and put back, with no new process: the router and the
    proxy's own model list (what /v1/models reads) both follow."""
    before = listed(proxy)
    assert {"local-model", "spare-model", "paid-model", "lonely"} <= before
    without_spare = proxy.render("spare")
    answer = run(push_routes(proxy.control, without_spare.routes()))
    assert answer["removed"] == ["spare-model@spare"]
    # spare-model is now served by local's server (the first live member of its chain)
    assert "spare-model@local:local-model" in answer["added"]
    served = chat(proxy, "spare-model")
    assert served.status_code == 200, served.text
    assert served.headers["x-litellm-model-id"] == "spare-model@local:local-model"
    back = run(push_routes(proxy.control, proxy.render().routes()))
    assert back["added"] == ["spare-model@spare"]
    assert listed(proxy) == before
    again = run(push_routes(proxy.control, proxy.render().routes()))
    assert again.get("unchanged") is True  # the same routes: nothing touched


def test_a_bad_deployment_leaves_the_router_as_it_was(proxy: Proxy) -> None:
    routes = proxy.render().routes()
    broken = {**routes, "model_list": [*routes["model_list"], {"model_name": "x"}]}
    with pytest.raises(ChannelError):
        run(push_routes(proxy.control, broken))
    assert run(hello("blue", proxy.control)).routes_digest == routes_digest(routes)
    assert chat(proxy, "local-model").status_code == 200


def test_a_key_by_reference_is_resolved_as_the_proxy_does_at_load(proxy: Proxy) -> None:
    """`upsert_deployment` does not resolve `os.environ/NAME`: the key would go out as
    that literal string."""
    run(push_routes(proxy.control, proxy.render("paid").routes()))  # paid-model out
    run(push_routes(proxy.control, proxy.render().routes()))  # and in again
    before = len(proxy.requests_to("paid"))
    assert chat(proxy, "paid-model").status_code == 200
    (request,) = proxy.requests_to("paid")[before:]
    assert request["authorization"] == f"Bearer {CLOUD_KEY}"


def test_a_server_the_daemon_judges_is_never_cooled_down_by_litellm(proxy: Proxy) -> None:
    """Issue 17 (chaos seed 799709): LiteLLM put a deployment in cooldown on its own guess
    and answered 429 'All deployments ... in cooldown', or kept away from a server that
    served again. A local deployment has cooldown_time 0: every request may try it (the
    daemon takes it out of the routes when it is down), and it serves the instant it is
    back."""
    for _ in range(4):  # spare is dead: each request falls back to local-model, never 429
        answer = chat(proxy, "spare-model", fallbacks=[{"spare-model": ["local-model"]}])
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-litellm-model-id"] == "local-model@local"
    proxy.start_standin("spare", "spare-model")
    try:
        answer = chat(proxy, "spare-model")
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-litellm-model-id"] == "spare-model@spare"  # no cooldown left
    finally:
        proxy.stop_standin("spare")


def test_per_request_chains_keep_a_drill_off_the_cloud(proxy: Proxy) -> None:
    """What drills rely on: LiteLLM takes a request's own `fallbacks` over the router's,
    and `disable_fallbacks` (the warm-up's) stops them."""
    before = len(proxy.requests_to("paid"))
    failed = chat(proxy, "spare-model", fallbacks=[{"spare-model": []}])
    assert failed.status_code >= 400
    off = chat(proxy, "spare-model", disable_fallbacks=True)
    assert off.status_code >= 400
    assert len(proxy.requests_to("paid")) == before


def test_a_name_no_server_can_serve_is_answered_inside_the_gateway(proxy: Proxy) -> None:
    """Retryable (503 with Retry-After), listed, and naming why; never sent anywhere (the
    daemon's loopback port, which another local user could hold, is not involved)."""
    (entry,) = [e for e in proxy.render().document["model_list"] if e["model_name"] == "lonely"]
    assert UNAVAILABLE_INFO in entry["model_info"]
    run(push_routes(proxy.control, proxy.render().routes()))
    answer = chat(proxy, "lonely")
    assert answer.status_code == 503
    assert int(answer.headers["retry-after"]) > 0
    assert "lonely is failed" in answer.json()["error"]["message"]
    assert "lonely" in listed(proxy)
    streamed = chat(proxy, "lonely", stream=True)
    assert streamed.status_code == 503
    stranger = chat(proxy, "lonely", key="sk-wrong")  # LiteLLM's own refusal, not our answer
    assert stranger.status_code in (400, 401), stranger.text
    assert "lonely is failed" not in stranger.text


def test_every_private_name_the_launcher_relies_on_is_there(litellm_python: Path) -> None:
    """A LiteLLM upgrade that renames any of these fails here."""
    check = """
import inspect, litellm
from litellm.proxy import proxy_server
from litellm.router import Router
from litellm.types.router import Deployment, LiteLLM_Params, holds_secret_pointer
from litellm.utils import get_secret
from litellm.constants import RUNTIME_UPDATABLE_ROUTER_SETTINGS
from litellm.router_utils import cooldown_handlers
assert hasattr(proxy_server, "llm_router") and hasattr(proxy_server, "llm_model_list")
assert hasattr(proxy_server, "app")
for name in ("upsert_deployment", "delete_deployment", "update_settings", "get_model_ids",
             "has_model_id", "get_model_list"):
    method = getattr(Router, name)
    assert not inspect.iscoroutinefunction(method), name  # never awaits: lands between requests
assert "fallbacks" in RUNTIME_UPDATABLE_ROUTER_SETTINGS
# model_info.cooldown_time 0 means: no cooldown for that deployment
source = inspect.getsource(cooldown_handlers._should_run_cooldown_logic)
assert "time_to_cooldown" in source and "isclose" in source
assert "disable_fallbacks" in inspect.getsource(Router.async_function_with_fallbacks)
# the guard against a made-up finish reason (gatewayruntime.guard_truncated_streams)
from litellm.litellm_core_utils.streaming_handler import CustomStreamWrapper
made_up = inspect.getsource(CustomStreamWrapper.finish_reason_handler)
assert "received_finish_reason" in made_up and "intermittent_finish_reason" in made_up
# ... which fails through the wrapper's own path, to the router's mid-stream fallback
assert "_handle_stream_fallback_error" in inspect.getsource(
    CustomStreamWrapper._log_stream_failure_and_raise
)
assert "is_pre_first_chunk" in inspect.getsource(Router._acompletion_streaming_iterator)
assert '"stop"' in made_up
# the count of requests in flight (gatewayruntime.in_flight_hook)
from litellm.integrations.custom_logger import CustomLogger
assert inspect.iscoroutinefunction(CustomLogger.async_pre_call_check)
assert "async_pre_call_check" in inspect.getsource(Router.async_routing_strategy_pre_call_checks)
assert isinstance(litellm.callbacks, list)
print("ok")
"""
    result = subprocess.run(
        [str(litellm_python), "-c", check],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def read_stream(proxy: Proxy, model: str) -> tuple[str, str | None, str | None, str | None]:
    """(content, finish reason, the error that ended it if any, who answered)."""
    import openai

    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=MASTER_KEY, max_retries=0)
    content, finish, error = "", None, None
    with client.chat.completions.with_streaming_response.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=64,
        stream=True,
    ) as response:
        answered = response.headers.get("x-litellm-model-id")
        try:
            for chunk in response.parse():
                for choice in chunk.choices:
                    content += choice.delta.content or ""
                    finish = choice.finish_reason or finish
        except openai.APIError as exc:
            error = str(exc)
    return content, finish, error, answered


def test_a_stream_cut_mid_answer_is_never_passed_off_as_whole(proxy: Proxy) -> None:
    """Issue 18: when the server under a stream closed it early (as llama-cpp-python does
    when stopped), LiteLLM ended the stream with `finish_reason: "stop"` and no error: the
    client took half an answer for a whole one. Now the client sees an error event."""
    content, finish, error, _ = read_stream(proxy, "cut-model")
    assert content  # some of the answer came
    assert finish is None, (content, finish)
    assert error is not None
    assert "ended before the answer" in error


def test_a_stream_cut_before_any_content_is_answered_by_the_chain(proxy: Proxy) -> None:
    """Cut before the first word (the server sent its role chunk, then closed: an outside
    stop of llama-cpp-python does this): LiteLLM made that an empty, finished answer, and
    with the guard raising plainly the client got an error (CI, issue 18). The router's
    mid-stream fallback takes it now: the chain's next server answers the same stream."""
    content, finish, error, _ = read_stream(proxy, "mute-model")
    assert error is None, error
    assert finish in ("stop", "length")
    assert content
    # the whole answer is the fallback's: nothing of the mute server's came before it
    assert content == read_stream(proxy, "local-model")[0]


def in_flight(proxy: Proxy) -> dict[str, Any]:
    return dict(run(call(proxy.control, {"op": "inflight"})))


def test_requests_in_flight_are_counted_per_deployment_until_their_last_byte(
    proxy: Proxy,
) -> None:
    """Issue 18: what the drain waits on. A stream counts against the deployment the router
    picked from then until its last byte, then not at all."""
    import threading

    assert in_flight(proxy)["providers"].get("slow", 0) == 0
    done = threading.Event()
    outcome: list[tuple[str, str | None, str | None, str | None]] = []

    def stream() -> None:
        outcome.append(read_stream(proxy, "slow-model"))
        done.set()

    worker = threading.Thread(target=stream)
    worker.start()
    seen: list[dict[str, Any]] = []
    while not done.is_set():
        seen.append(in_flight(proxy))
        time.sleep(0.1)
    worker.join()
    during = [s for s in seen if s["providers"].get("slow")]
    assert during, seen[:5]  # counted while it streamed (~2 s of chunks)
    assert during[0]["deployments"] == {"slow-model@slow": 1}
    content, finish, error, _ = outcome[0]
    assert content
    assert error is None, error
    assert finish == "stop"
    after = in_flight(proxy)
    assert after["providers"].get("slow", 0) == 0  # its last byte: no longer in flight
    assert after["deployments"].get("slow-model@slow", 0) == 0


def test_a_model_whose_only_server_restarts_on_purpose_is_held_not_failed(
    proxy: Proxy,
) -> None:
    """Issue 18: while its only server restarts on purpose, a request for the model waits
    in the gateway and is answered by the server once the routes serve it again; bounded,
    then the usual retryable 503."""
    import threading

    run(push_routes(proxy.control, proxy.render(holding={"lonely": 1.0}).routes()))
    started = time.monotonic()
    timed_out = chat(proxy, "lonely")  # held its second, then answered 503
    assert timed_out.status_code == 503
    assert time.monotonic() - started >= 1.0
    run(push_routes(proxy.control, proxy.render(holding={"lonely": 30.0}).routes()))
    answers: list[httpx.Response] = []
    asking = threading.Thread(target=lambda: answers.append(chat(proxy, "lonely")))
    asking.start()
    time.sleep(1.5)
    assert not answers  # held
    proxy.start_standin("lonely", "lonely")
    try:
        run(push_routes(proxy.control, proxy.render(lonely=True).routes()))
        asking.join(30)
        assert answers
        assert answers[0].status_code == 200, answers[0].text
        assert answers[0].headers["x-litellm-model-id"] == "lonely@lonely"
    finally:
        run(push_routes(proxy.control, proxy.render().routes()))
        proxy.stop_standin("lonely")
