"""Several workstations, one fleet (issue 22), on the lab's two hosts: each a network
namespace with its own private systemd manager, servers, LiteLLM gateway and diversityd;
the user's Redis in a namespace of its own. Every fault is made by the lab and observed
from the other host, the way a user's client sees it: the real `openai` package through
that host's gateway.

h1's clock runs an hour ahead of h0's the whole time: no fleet decision compares two hosts'
clocks, so nothing here notices.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from diversityd_lab.embedded import VLLM
from diversityd_lab.fleet import Fleet, FleetSpec, missing_capabilities
from tests.conftest import unavailable

pytestmark = pytest.mark.integration

VLLM_UNIT = f"diversityd-{VLLM}.service"
SKEW_S = 3600.0
FLEET = {"heartbeat_s": 0.5, "ttl_s": 3.0, "probe_interval_s": 0.5, "probe_timeout_s": 1.0}


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    missing = missing_capabilities()
    if missing:
        unavailable("a fleet needs: " + "; ".join(missing))
    with Fleet(
        FleetSpec(hosts=2, fleet=True, fleet_settings=FLEET, clock_offsets_s={"h1": SKEW_S})
    ) as running:
        for host in running.hosts:
            wait_status(running, host, lambda d: bool(peers_routed(d)), timeout_s=60)
        yield running


def status(fleet: Fleet, host: str) -> dict[str, Any]:
    return fleet.running(host).status()


def wait_status(
    fleet: Fleet,
    host: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout_s: float = 30,
) -> tuple[dict[str, Any], float]:
    """The first status of `host` that satisfies `predicate`, and how long it took."""
    started = time.monotonic()
    document: dict[str, Any] = {}
    while time.monotonic() - started < timeout_s:
        document = status(fleet, host)
        if predicate(document):
            return document, time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"{host}: not within {timeout_s} s: {json.dumps(document.get('fleet'))}")


def peers_routed(document: dict[str, Any]) -> list[str]:
    fleet = document.get("fleet") or {}
    return [p["host"] for p in fleet.get("peers", []) if p["usable"]]


def peer(document: dict[str, Any], host: str) -> dict[str, Any]:
    return next(p for p in document["fleet"]["peers"] if p["host"] == host)


def ask(fleet: Fleet, host: str, model: str, *, stream: bool = False) -> tuple[bool, str]:
    """One chat through `host`'s gateway, from inside `host`: (ok, who answered or why)."""
    key_file = status(fleet, host)["gateway"]["key_file"]
    script = f"""
import json, sys, openai
key = open({key_file!r}).read().strip().split("=", 1)[-1]
client = openai.OpenAI(base_url="http://127.0.0.1:4000/v1", api_key=key, max_retries=0,
                       timeout=30)
try:
    raw = client.chat.completions.with_raw_response.create(
        model={model!r}, messages=[{{"role": "user", "content": "hi"}}], max_tokens=8,
        stream={stream!r})
    answer = raw.parse()
    if {stream!r}:
        text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
    else:
        text = answer.choices[0].message.content
    print(json.dumps({{"ok": bool(text), "by": raw.headers.get("x-litellm-model-api-base")}}))
except Exception as exc:
    print(json.dumps({{"ok": False, "by": f"{{type(exc).__name__}}: {{exc}}"[:300]}}))
"""
    result = fleet.run_in(host, [fleet_python(), "-c", script], timeout=60)
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    return bool(answer["ok"]), str(answer["by"])


def fleet_python() -> str:
    import sys

    return sys.executable


def test_each_host_hears_the_other_and_lists_its_models_last_in_the_chains(
    fleet: Fleet,
) -> None:
    for host, other in (("h0", "h1"), ("h1", "h0")):
        document = status(fleet, host)
        view = peer(document, other)
        assert view["usable"] is True
        assert view["in_redis"] is True
        assert "qwen-coder-vllm" in view["models"]
        assert view["heartbeat_age_s"] < 5  # h1's clock is an hour off: never compared
        assert document["fleet"]["redis"]["ok"] is True
        assert f"qwen-coder-vllm@{other}" in document["gateway"]["models"]


def test_a_model_whose_local_servers_are_down_is_served_by_the_peer(fleet: Fleet) -> None:
    """vLLM's model has no fallback on its own host: with vLLM stopped there, the other
    host's gateway answers it (after the local ones, in-process, no new process)."""
    manager = fleet.running("h0").manager
    manager.systemctl("stop", VLLM_UNIT)
    try:
        wait_status(
            fleet,
            "h0",
            lambda d: d["gateway"]["substituted"].get("qwen-coder-vllm") == "qwen-coder-vllm@h1",
        )
        for stream in (False, True):
            ok, by = ask(fleet, "h0", "qwen-coder-vllm", stream=stream)
            assert ok, by
            assert by.startswith(fleet.gateway_url("h1", seen_from="h0")), by
    finally:
        manager.systemctl("start", VLLM_UNIT)
        wait_status(fleet, "h0", lambda d: "qwen-coder-vllm" not in d["gateway"]["substituted"])


def test_a_frozen_host_leaves_the_peers_routes_in_seconds_and_comes_back(fleet: Fleet) -> None:
    """A frozen host still completes TCP handshakes: only the probe's timeout finds it."""
    fleet.freeze("h1")
    try:
        _, out_s = wait_status(fleet, "h0", lambda d: "h1" not in peers_routed(d), timeout_s=30)
        assert out_s < 10  # the benchmark measures it; this only says it is not minutes
        assert "qwen-coder-vllm@h1" not in status(fleet, "h0")["gateway"]["models"]
        ok, by = ask(fleet, "h0", "llama-cpp-native")  # local serving goes on
        assert ok, by
    finally:
        fleet.thaw("h1")
    wait_status(fleet, "h0", lambda d: "h1" in peers_routed(d), timeout_s=30)


def test_a_cut_link_takes_the_peer_out_and_mending_it_brings_it_back(fleet: Fleet) -> None:
    fleet.cut_link("h0", "h1")
    try:
        wait_status(fleet, "h0", lambda d: "h1" not in peers_routed(d), timeout_s=30)
        wait_status(fleet, "h1", lambda d: "h0" not in peers_routed(d), timeout_s=30)
        document = status(fleet, "h0")
        assert peer(document, "h1")["in_redis"] is True  # Redis still says it lives
        assert document["fleet"]["redis"]["ok"] is True
    finally:
        fleet.mend_link("h0", "h1")
    wait_status(fleet, "h0", lambda d: "h1" in peers_routed(d), timeout_s=30)


def test_a_peer_whose_daemon_is_gone_is_still_routed_to_while_its_gateway_answers(
    fleet: Fleet,
) -> None:
    manager = fleet.running("h1").manager
    manager.systemctl("stop", "diversityd.service")
    try:
        document, _ = wait_status(
            fleet, "h0", lambda d: peer(d, "h1")["in_redis"] is False, timeout_s=30
        )
        assert peer(document, "h1")["usable"] is True  # its gateway still serves
        assert "qwen-coder-vllm@h1" in document["gateway"]["models"]
    finally:
        manager.systemctl("start", "diversityd.service")
    wait_status(fleet, "h0", lambda d: peer(d, "h1")["in_redis"] is True, timeout_s=60)


def test_redis_killed_changes_nothing_local_and_comes_back_by_itself(fleet: Fleet) -> None:
    fleet.kill_redis()
    try:
        document, _ = wait_status(
            fleet, "h0", lambda d: d["fleet"]["redis"]["ok"] is False, timeout_s=30
        )
        assert "h1" in peers_routed(document)  # peers as last probed
        ok, by = ask(fleet, "h0", "llama-cpp-native")
        assert ok, by
        events = fleet.running("h0").journal_events("fleet.redis_down")
        assert events
    finally:
        fleet.start_redis()
    for host in ("h0", "h1"):
        wait_status(fleet, host, lambda d: d["fleet"]["redis"]["ok"] is True, timeout_s=60)
    wait_status(fleet, "h0", lambda d: peer(d, "h1")["in_redis"] is True, timeout_s=60)


def test_redis_cut_off_from_one_host_leaves_the_other_routing_to_it(fleet: Fleet) -> None:
    fleet.cut_redis("h0")
    try:
        wait_status(fleet, "h0", lambda d: d["fleet"]["redis"]["ok"] is False, timeout_s=30)
        # h0's record expires for h1, but h0's gateway answers h1's probes
        document, _ = wait_status(
            fleet, "h1", lambda d: peer(d, "h0")["in_redis"] is False, timeout_s=30
        )
        assert peer(document, "h0")["usable"] is True
        assert "h1" in peers_routed(status(fleet, "h0"))
    finally:
        fleet.mend_redis("h0")
    wait_status(fleet, "h0", lambda d: d["fleet"]["redis"]["ok"] is True, timeout_s=60)
    wait_status(fleet, "h1", lambda d: peer(d, "h0")["in_redis"] is True, timeout_s=60)


def test_a_peer_that_comes_back_with_other_models_is_routed_as_it_is_now(
    fleet: Fleet,
) -> None:
    manager = fleet.running("h1").manager
    manager.systemctl("stop", VLLM_UNIT)
    try:
        document, _ = wait_status(
            fleet, "h0", lambda d: "qwen-coder-vllm" not in peer(d, "h1")["models"]
        )
        assert "qwen-coder-vllm@h1" not in document["gateway"]["models"]
        assert "llama-cpp-native@h1" in document["gateway"]["models"]
    finally:
        manager.systemctl("start", VLLM_UNIT)
    wait_status(fleet, "h0", lambda d: "qwen-coder-vllm@h1" in d["gateway"]["models"])


def test_a_peers_request_is_served_locally_only(fleet: Fleet) -> None:
    """No ping-pong: h1 asks h0 for a model only h0's peers serve there: refused, never
    sent on (nor back)."""
    key = fleet.fleet_key_file.read_text().strip()
    url = fleet.gateway_url("h0", seen_from="h1")
    script = f"""
import json, urllib.request, urllib.error
body = json.dumps({{"model": "qwen-coder-vllm@h1", "messages": [{{"role": "user",
    "content": "hi"}}], "max_tokens": 4}}).encode()
request = urllib.request.Request({url!r} + "/v1/chat/completions", data=body,
    headers={{"Authorization": "Bearer {key}", "Content-Type": "application/json"}})
try:
    print(urllib.request.urlopen(request, timeout=20).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
"""
    result = fleet.run_in("h1", [fleet_python(), "-c", script], timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "503", result.stdout + result.stderr
