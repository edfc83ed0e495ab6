"""Drill decisions and summaries (the drill itself runs in the integration tests)."""

from __future__ import annotations

from diversityd.catalog import build_catalog
from diversityd.config import parse_config
from diversityd.drill import (
    Answer,
    DrillMode,
    DrillReport,
    cloud_answered,
    local_fallbacks,
    overall_ok,
    percentile,
    unprotected_models,
)
from diversityd.gateway import Availability, render_gateway

PROVIDERS = """\
providers:
  a: {type: llama_cpp, base_url: "http://127.0.0.1:1", models: [a-model]}
  b: {type: llama_cpp, base_url: "http://127.0.0.1:2", models: [b-model]}
  c: {type: ollama, base_url: "http://127.0.0.1:3", models: [c-model, c-other]}
"""
MAPPINGS = """\
fallback_chains:
  a-model: {chain: [b-model]}
  c-model: {chain: [a-model]}
"""


def answer(started: float, *, ok: bool = True, fallbacks: int = 0, base: str = "x") -> Answer:
    return Answer("m", False, ok, 200 if ok else None, started, 10.0, base, fallbacks)


def test_unprotected_models_are_those_left_without_a_live_fallback() -> None:
    config, findings = parse_config(
        {"providers.yaml": PROVIDERS, "model-mappings.yaml": MAPPINGS},
        config_dir="/cfg",
        hostname="box",
    )
    assert config is not None, findings
    catalog = build_catalog(config)
    everyone = Availability.all_up_except(config)
    assert unprotected_models(config, catalog, everyone, "a") == []
    assert unprotected_models(config, catalog, everyone, "b") == ["b-model"]
    assert unprotected_models(config, catalog, everyone, "c") == ["c-other"]
    # with b already down, a's model has no live fallback either
    b_down = Availability.all_up_except(config, frozenset({"b"}))
    assert unprotected_models(config, catalog, b_down, "a") == ["a-model"]


CLOUDY_PROVIDERS = (
    PROVIDERS
    + """\
  paid: {type: openai, api_key_env: OPENAI_API_KEY, models: [gpt-4o-mini]}
"""
)
CLOUDY_MAPPINGS = """\
fallback_chains:
  a-model: {chain: [gpt-4o-mini, b-model]}
  b-model: {chain: [gpt-4o-mini]}
  c-model: {chain: [a-model]}
"""


def test_a_drill_never_counts_on_a_cloud_nor_asks_one() -> None:
    """Issue 17: no probe, warm-up or drill may spend a paid request. A drill's requests
    carry chains without the cloud names; a model only a cloud could take over is
    unprotected (the drill is refused without --force), and one a cloud answers is never
    asked."""
    config, findings = parse_config(
        {"providers.yaml": CLOUDY_PROVIDERS, "model-mappings.yaml": CLOUDY_MAPPINGS},
        config_dir="/cfg",
        hostname="box",
    )
    assert config is not None, findings
    catalog = build_catalog(config)
    everyone = Availability.all_up_except(config)
    plan = render_gateway(config, catalog, everyone)
    chains = {k: v for item in local_fallbacks(plan) for k, v in item.items()}
    assert chains["a-model"] == ["b-model"]  # gpt-4o-mini left out
    assert chains["b-model"] == []
    assert "gpt-4o-mini" not in chains
    # with a down, a-model is served by the first live member of its chain, the cloud: a
    # drill of a is refused, and even with --force a-model is never asked
    assert unprotected_models(config, catalog, everyone, "a") == ["a-model"]
    assert unprotected_models(config, catalog, everyone, "b") == ["b-model"]  # only the cloud
    a_down = Availability.all_up_except(config, frozenset({"a"}))
    down_plan = render_gateway(config, catalog, a_down)
    assert cloud_answered(down_plan, ["a-model", "c-model", "b-model"]) == ["a-model"]
    assert unprotected_models(config, catalog, everyone, "c") == ["c-other"]  # c-model: a-model


def test_settle_time_is_the_last_answer_that_needed_a_fallback() -> None:
    answers = (
        answer(99.0),
        answer(100.5, fallbacks=1),
        answer(102.0, fallbacks=1),
        answer(103.0),
        answer(104.0),
    )
    report = DrillReport("a", DrillMode.KILL, answers, 100.0, restored=True)
    assert report.settle_ms() == 2010.0  # started 2.0 s after, took 10 ms
    summary = report.to_json()
    assert summary["sent"] == 5
    assert summary["failed"] == 0
    assert summary["answered_by"] == {"x": 5}
    assert overall_ok([report])


def test_failures_and_missing_restore_fail_the_drill() -> None:
    failed = DrillReport("a", DrillMode.HANG, (answer(101.0, ok=False),), 100.0, restored=True)
    assert failed.to_json()["failed"] == 1
    assert not overall_ok([failed])
    unrestored = DrillReport("a", DrillMode.STOP, (answer(101.0),), 100.0, restored=False)
    assert not overall_ok([unrestored])
    assert not overall_ok([])


def test_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 51.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([], 0.99) == 0.0


def test_a_stream_cut_mid_answer_is_counted_apart_from_failures() -> None:
    cut = Answer("m", True, False, 200, 1.0, 10.0, "x", 0, "ReadError", cut=True)
    report = DrillReport("p", DrillMode.KILL, (answer(0.5), cut), 0.0, True)
    assert report.failed == []
    assert report.to_json()["cut_mid_stream"] == 1
    assert overall_ok([report])
    refused = answer(1.5, ok=False)
    assert not overall_ok([DrillReport("p", DrillMode.KILL, (cut, refused), 0.0, True)])
