"""The rendered LiteLLM config: params per provider type, substitution of dead names."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from diversityd.adapters import gatewaylauncher
from diversityd.catalog import build_catalog
from diversityd.config import Config, parse_config
from diversityd.gateway import (
    HOLD_INFO,
    JUDGED_INFO,
    MASTER_KEY_REFERENCE,
    PROVIDER_INFO,
    UNAVAILABLE_API_BASE,
    UNAVAILABLE_INFO,
    Availability,
    GatewayPlan,
    render_gateway,
    why_unavailable,
)

PROVIDERS = """\
providers:
  ollama:
    type: ollama
    base_url: http://127.0.0.1:11434
    models:
      - llama3.1:latest
      - {name: coder, model: qwen2.5-coder:7b}
      - {name: raw, model: "ollama/raw:1b"}
  a: {type: llama_cpp, base_url: "http://127.0.0.1:8000", models: [a-model]}
  b: {type: llama_cpp, base_url: "http://127.0.0.1:8080/v1", models: [b-model]}
  v: {type: vllm, base_url: "http://127.0.0.1:8001", models: [{name: v-model, model: Qwen/Q-7B}]}
  oai: {type: openai, api_key_env: OPENAI_API_KEY, models: [gpt-4o-mini]}
  compat:
    type: openai_compatible
    base_url: "https://llm.example/v1"
    api_key_env: EX_KEY
    models: [ex]
"""
MAPPINGS = """\
fallback_chains:
  "llama3.1:latest": {chain: [a-model, v-model]}
  a-model: {chain: [b-model, gpt-4o-mini]}
  b-model: {chain: []}
  coder: {chain: [a-model]}
"""
SETTINGS = """\
gateway:
  litellm_settings: {cache: true}
  router_settings: {redis_host: 127.0.0.1}
  general_settings: {alerting: [slack]}
"""


def load(settings: str = SETTINGS) -> Config:
    config, findings = parse_config(
        {
            "providers.yaml": textwrap.dedent(PROVIDERS),
            "model-mappings.yaml": MAPPINGS,
            "diversityd.yaml": settings,
        },
        config_dir="/cfg",
        hostname="box",
    )
    assert config is not None, findings
    return config


def render(
    up: dict[str, frozenset[str] | None] | None = None, down: set[str] = frozenset()
) -> GatewayPlan:  # type: ignore[assignment]
    config = load()
    availability = (
        Availability(up=up)
        if up is not None
        else Availability.all_up_except(config, frozenset(down))
    )
    return render_gateway(config, build_catalog(config), availability)


def params_of(plan: GatewayPlan, name: str) -> list[dict[str, Any]]:
    return [e["litellm_params"] for e in plan.document["model_list"] if e["model_name"] == name]


def fallbacks_of(plan: GatewayPlan) -> dict[str, list[str]]:
    return {
        k: v for entry in plan.document["router_settings"]["fallbacks"] for k, v in entry.items()
    }


def test_params_per_provider_type() -> None:
    plan = render()
    (ollama,) = params_of(plan, "llama3.1:latest")
    assert ollama["model"] == "ollama_chat/llama3.1:latest"
    assert ollama["api_base"] == "http://127.0.0.1:11434"
    assert params_of(plan, "coder")[0]["model"] == "ollama_chat/qwen2.5-coder:7b"
    assert params_of(plan, "raw")[0]["model"] == "ollama/raw:1b"  # the entry's model: says so
    (a,) = params_of(plan, "a-model")
    assert a["model"] == "openai/a-model"
    assert a["api_base"] == "http://127.0.0.1:8000/v1"
    assert params_of(plan, "b-model")[0]["api_base"] == "http://127.0.0.1:8080/v1"
    (v,) = params_of(plan, "v-model")
    assert v["model"] == "hosted_vllm/Qwen/Q-7B"
    (oai,) = params_of(plan, "gpt-4o-mini")
    assert oai["model"] == "openai/gpt-4o-mini"
    assert oai["api_key"] == "os.environ/OPENAI_API_KEY"
    assert "api_base" not in oai
    (compat,) = params_of(plan, "ex")
    assert compat["api_base"] == "https://llm.example/v1"
    assert compat["api_key"] == "os.environ/EX_KEY"
    for entry in plan.document["model_list"]:
        params = entry["litellm_params"]
        assert params["timeout"] < 600  # never LiteLLM's 6000 s on a hung backend
        assert params["stream_timeout"] <= params["timeout"]
        key = params.get("api_key")
        assert key is None or key == "none" or key.startswith("os.environ/")


def test_settings_pass_through_and_master_key_is_a_reference() -> None:
    document = render().document
    assert document["general_settings"]["master_key"] == MASTER_KEY_REFERENCE
    assert document["general_settings"]["alerting"] == ["slack"]
    # LiteLLM's own metrics by default (the dashboard's availability panels), behind the
    # master key (issue 20, point 8: not open to every local user); yours win
    assert document["litellm_settings"] == {
        "callbacks": ["prometheus"],
        "require_auth_for_metrics_endpoint": True,
        "cache": True,
    }
    own = render_gateway(
        load('gateway: {litellm_settings: {callbacks: ["otel"]}}\n'),
        build_catalog(load()),
        Availability.all_up_except(load(), frozenset()),
    )
    assert own.document["litellm_settings"]["callbacks"] == ["otel"]
    router = document["router_settings"]
    assert router["redis_host"] == "127.0.0.1"
    assert router["num_retries"] == 0
    assert router["allowed_fails"] >= 1
    assert router["max_fallbacks"] >= 5


def test_a_down_providers_names_are_served_by_the_first_live_model_of_their_chain() -> None:
    plan = render(down=frozenset({"a"}))
    (substitute,) = params_of(plan, "a-model")
    assert substitute["api_base"] == "http://127.0.0.1:8080/v1"  # b, first in a-model's chain
    assert plan.substituted == {"a-model": "b-model"}
    fallbacks = fallbacks_of(plan)
    assert fallbacks["a-model"] == ["gpt-4o-mini"]  # the rest of its chain
    # llama3.1's chain [a-model, v-model]: a-model is dead, so its chain is walked in place
    assert fallbacks["llama3.1:latest"] == ["b-model", "gpt-4o-mini", "v-model"]


def test_a_name_with_no_live_fallback_is_left_out_and_nothing_points_at_it() -> None:
    plan = render(down=frozenset({"b", "ollama"}))
    names = {
        e["model_name"]
        for e in plan.document["model_list"]
        if UNAVAILABLE_INFO not in e["model_info"]
    }
    assert "b-model" not in names
    assert "b-model" in plan.left_out
    # llama3.1 (ollama down) is served by a-model, first in its chain
    assert plan.substituted["llama3.1:latest"] == "a-model"
    for targets in fallbacks_of(plan).values():
        assert set(targets) <= names


def test_probed_models_filter_the_configured_ones() -> None:
    """a configured model the server does not report counts as down for the gateway."""
    up: dict[str, frozenset[str] | None] = dict.fromkeys(("a", "b", "v", "oai", "compat"))
    up["ollama"] = frozenset({"llama3.1:latest"})  # coder (qwen2.5-coder:7b) not served
    plan = render(up=up)
    assert plan.served_by["llama3.1:latest"] == ("ollama",)
    assert plan.substituted["coder"] == "a-model"
    assert "raw" in plan.left_out


def test_rendering_is_deterministic() -> None:
    assert render(down=frozenset({"a"})).text() == render(down=frozenset({"a"})).text()


def test_a_name_nothing_serves_stays_listed_answered_inside_the_gateway() -> None:
    config = load()
    down = Availability.all_up_except(config, frozenset({"b", "ollama"}))
    states = {"b": "failed", "ollama": "down"}
    plan = render_gateway(config, build_catalog(config), down, states=states)
    (entry,) = [e for e in plan.document["model_list"] if e["model_name"] == "b-model"]
    # answered by the launcher (a 503 that says why); nothing may listen where it points
    assert entry["model_info"][UNAVAILABLE_INFO].startswith(
        "b-model cannot be served now: b is failed"
    )
    assert entry["litellm_params"]["api_base"] == UNAVAILABLE_API_BASE
    assert "b-model" in plan.left_out  # not served: status and drills still say so
    assert "b-model" not in fallbacks_of(plan)  # nothing falls back to it or from it
    for targets in fallbacks_of(plan).values():
        assert "b-model" not in targets
    hidden = render_gateway(config, build_catalog(config), down, unavailable=False)
    assert "b-model" not in {e["model_name"] for e in hidden.document["model_list"]}


def test_the_daemon_judges_local_servers_and_litellm_the_clouds() -> None:
    """Issue 17: LiteLLM's cooldown guesses answered 429 for a model whose fallback was up
    (chaos seed 799709). A server the daemon probes is never cooled down by LiteLLM: the
    daemon takes it out of the routes itself. A cloud (never probed: that would cost)
    keeps LiteLLM's cooldown."""
    plan = render()
    info = {e["model_name"]: e["model_info"] for e in plan.document["model_list"]}
    for local in ("llama3.1:latest", "a-model", "b-model", "v-model"):
        assert info[local]["cooldown_time"] == 0
        assert info[local][JUDGED_INFO] is True
    for cloud in ("gpt-4o-mini", "ex"):
        assert info[cloud]["cooldown_time"] > 0
        assert info[cloud][JUDGED_INFO] is False


def test_every_deployment_has_a_stable_id_across_states() -> None:
    ids_up = {
        (e["model_name"], e["model_info"][PROVIDER_INFO]): e["model_info"]["id"]
        for e in render().document["model_list"]
    }
    ids_down = {
        (e["model_name"], e["model_info"].get(PROVIDER_INFO)): e["model_info"]["id"]
        for e in render(down=frozenset({"ollama"})).document["model_list"]
    }
    assert len(set(ids_up.values())) == len(ids_up)
    for key, ident in ids_down.items():
        if key in ids_up:
            assert ids_up[key] == ident  # the same server for the same name: the same id
    # llama3.1 served by a's server while ollama is down: a deployment of its own
    assert ids_down[("llama3.1:latest", "a")] not in ids_up.values()


def test_only_the_routes_change_with_the_providers_state() -> None:
    """What a LiteLLM process fixes at start must not change with a provider's state, or
    every crash would cost a new process (max_fallbacks followed the live chains)."""
    all_up, some_down = render(), render(down=frozenset({"a", "ollama", "v"}))
    assert all_up.process_settings() == some_down.process_settings()
    assert all_up.routes() != some_down.routes()
    assert "model_list" not in all_up.process_settings()
    assert "fallbacks" not in all_up.process_settings()["router_settings"]
    assert set(all_up.routes()) == {"model_list", "fallbacks"}


def test_the_gateway_warm_up_asks_local_servers_only() -> None:
    """Issue 17: a new process's warm-up sent real completions to every served model, cloud
    models included (6 paid requests from 3 reloads). Only names served by local servers
    doing their own inference are warmed, never one answered for want of a server."""
    config = load()
    down = Availability.all_up_except(config, frozenset({"b", "ollama"}))
    plan = render_gateway(config, build_catalog(config), down)
    warmed = gatewaylauncher.models_to_warm(plan.document)
    assert "b-model" not in warmed  # unavailable: answered by the launcher
    assert "gpt-4o-mini" not in warmed
    assert "ex" not in warmed
    assert set(warmed) == {"a-model", "v-model", "llama3.1:latest", "coder"}
    assert gatewaylauncher.models_to_warm({}) == []


def test_the_answer_for_an_unservable_name_says_who_and_in_what_state() -> None:
    config = load()
    states = {"a": "failed", "b": "stopped", "v": "down", "oai": "ready"}
    text = why_unavailable(config, build_catalog(config), "a-model", states)
    assert text.startswith("a-model cannot be served now: a is failed")
    assert "b-model (b is stopped)" in text
    assert "gpt-4o-mini (oai is ready)" in text
    alone = why_unavailable(config, build_catalog(config), "b-model", states)
    assert "no fallback chain" in alone


def test_a_substituted_name_keeps_its_substitutes_fallbacks() -> None:
    """Found by bench/chaos.py: llama-cpp-default served by llama-cpp-native (its server
    down) had no fallback at all, though native's own chain was live."""
    plan = render(down=frozenset({"ollama"}))
    assert plan.substituted["llama3.1:latest"] == "a-model"
    # its own chain's rest (v-model), then what a-model falls back to (b-model, gpt-4o-mini)
    assert fallbacks_of(plan)["llama3.1:latest"] == ["v-model", "b-model", "gpt-4o-mini"]


def test_a_name_whose_only_server_restarts_on_purpose_is_held() -> None:
    """Issue 18: a planned restart of a model's only server holds its requests in the
    gateway (bounded), where a crash answers the retryable 503 at once."""
    config = load()
    down = Availability.all_up_except(config, frozenset({"b", "ollama"}))
    held = render_gateway(config, build_catalog(config), down, holding={"b": 30.0})
    (entry,) = [e for e in held.document["model_list"] if e["model_name"] == "b-model"]
    assert entry["model_info"][HOLD_INFO] == 30.0
    crashed = render_gateway(config, build_catalog(config), down)
    (entry,) = [e for e in crashed.document["model_list"] if e["model_name"] == "b-model"]
    assert HOLD_INFO not in entry["model_info"]
    # raw (ollama only) is held only if ollama is the one restarting on purpose
    (raw,) = [e for e in held.document["model_list"] if e["model_name"] == "raw"]
    assert HOLD_INFO not in raw["model_info"]


def test_the_generated_key_file_is_the_bare_key(tmp_path: Path) -> None:
    """Issue 20, point 8: LiteLLM's /metrics wants the master key, and Prometheus reads
    `credentials_file` as the token itself: the file holds the key and nothing else
    (0600); the launcher reads it so too."""
    from diversityd.adapters.gatewaylauncher import key_file_is_environment
    from diversityd.adapters.litellm import ensure_master_key, read_master_key

    key_file = tmp_path / "master.key"
    assert ensure_master_key(key_file)
    text = key_file.read_text()
    assert text.startswith("sk-")
    assert text.strip() == read_master_key(key_file)
    assert "=" not in text
    assert text.count("\n") == 1
    assert not key_file_is_environment(str(key_file))  # systemd never reads it
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert not ensure_master_key(key_file)  # kept: generated once
