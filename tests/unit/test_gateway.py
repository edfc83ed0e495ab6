"""The rendered LiteLLM config: params per provider type, substitution of dead names."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from diversityd.adapters import gatewaylauncher
from diversityd.catalog import build_catalog
from diversityd.config import Config, parse_config
from diversityd.gateway import (
    MASTER_KEY_REFERENCE,
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
        assert entry["model_info"]["cooldown_time"] > 0
        key = params.get("api_key")
        assert key is None or key == "none" or key.startswith("os.environ/")


def test_settings_pass_through_and_master_key_is_a_reference() -> None:
    document = render().document
    assert document["general_settings"]["master_key"] == MASTER_KEY_REFERENCE
    assert document["general_settings"]["alerting"] == ["slack"]
    # LiteLLM's own metrics by default (the dashboard's availability panels); yours win
    assert document["litellm_settings"] == {
        "callbacks": ["prometheus"],
        "require_auth_for_metrics_endpoint": False,
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
    names = {e["model_name"] for e in plan.document["model_list"]}
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


def test_a_name_nothing_serves_stays_listed_answered_by_the_daemon() -> None:
    config = load()
    down = Availability.all_up_except(config, frozenset({"b", "ollama"}))
    plan = render_gateway(
        config, build_catalog(config), down, unavailable_base="http://127.0.0.1:9478/x/v1"
    )
    (entry,) = [e for e in plan.document["model_list"] if e["model_name"] == "b-model"]
    assert entry["litellm_params"]["api_base"] == "http://127.0.0.1:9478/x/v1"
    assert entry["model_info"]["cooldown_time"] > 0  # then LiteLLM's 429 with Retry-After
    assert "b-model" in plan.left_out  # not served: status and drills still say so
    assert "b-model" not in fallbacks_of(plan)  # nothing falls back to it or from it
    for targets in fallbacks_of(plan).values():
        assert "b-model" not in targets


def test_the_gateway_warm_up_asks_every_served_name_and_not_the_unavailable_one(
    tmp_path: Path,
) -> None:
    # a warm-up request failing on the daemon's answer would put it in LiteLLM's cooldown
    config = load()
    down = Availability.all_up_except(config, frozenset({"b", "ollama"}))
    plan = render_gateway(
        config, build_catalog(config), down, unavailable_base="http://127.0.0.1:9478/x/v1"
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(plan.text())
    warmed = gatewaylauncher.models_to_warm(str(path))
    served = {e["model_name"] for e in plan.document["model_list"]} - set(plan.left_out)
    assert "b-model" not in warmed
    assert set(warmed) == served
    assert gatewaylauncher.models_to_warm(str(tmp_path / "missing.yaml")) == []


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
