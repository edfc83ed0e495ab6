"""packaging/prometheus and packaging/grafana: promtool accepts the scrape config and the
alert rules, the rules' own tests pass and cover every alert both ways, and the dashboard
and the rules use only metrics that exist (diversityd's metricspec, LiteLLM's /metrics/)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from diversityd.metricspec import METRIC_NAMES, METRICS, Kind
from tests.conftest import REPO_ROOT, unavailable

PROMETHEUS_DIR = REPO_ROOT / "packaging" / "prometheus"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
DASHBOARD = REPO_ROOT / "packaging" / "grafana" / "diversityd.json"

# LiteLLM 1.106.2's metrics as its /metrics/ exposes them: names and labels from
# litellm/types/integrations/prometheus.py, kinds from litellm/integrations/prometheus.py
# (prometheus-client adds `_total` to a Counter, `_bucket`/`_sum`/`_count` to a Histogram).
# Seen in generate_latest() output of its PrometheusLogger, with prometheus-client 0.26.0.
LITELLM_METRICS = frozenset(
    {
        "litellm_proxy_total_requests_metric_total",  # Counter; status_code "200" or the error's
        "litellm_proxy_failed_requests_metric_total",  # Counter; exception_status, _class
        "litellm_deployment_successful_fallbacks_total",  # Counter; requested/fallback_model
        "litellm_deployment_failed_fallbacks_total",  # Counter; same labels
        "litellm_deployment_success_responses_total",  # Counter; api_base, model_group
        "litellm_deployment_failure_responses_total",  # Counter
        "litellm_deployment_total_requests_total",  # Counter
        "litellm_deployment_cooled_down_total",  # Counter
        "litellm_deployment_state",  # Gauge: 0 healthy, 1 partial outage, 2 complete outage
        "litellm_request_total_latency_metric_bucket",  # Histogram
        "litellm_request_total_latency_metric_sum",
        "litellm_request_total_latency_metric_count",
    }
)

# A histogram's bare name selects no series: only its suffixed ones exist.
HISTOGRAMS = frozenset(metric.name for metric in METRICS if metric.kind == Kind.HISTOGRAM)
DIVERSITYD_SERIES = (METRIC_NAMES - HISTOGRAMS) | frozenset(
    name + suffix for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
)

METRIC_NAME = re.compile(r"\b(?:diversityd|litellm)_[A-Za-z0-9_]+")
PADDING = re.compile(r"\bor\s+vector\s*\(")
# What Grafana puts in a query before it reaches Prometheus, enough for promtool to parse it.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$provider": ".*",
    "$gpu": "0",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        unavailable("promtool missing: run packaging/install-system-deps.sh (Debian's prometheus)")
    return path


def run_promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def alert_names() -> set[str]:
    return {rule["alert"] for rule in alert_rules()}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    # A collapsed row keeps its panels inside it.
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_queries() -> list[str]:
    """Every PromQL text in the dashboard: panel targets, annotations, variables."""
    found: list[str] = []

    def walk(node: object, key: str = "") -> None:
        if isinstance(node, dict):
            for child_key, child in node.items():
                walk(child, child_key)
        elif isinstance(node, list):
            for child in node:
                walk(child, key)
        elif isinstance(node, str) and key in {"expr", "definition"}:
            found.append(node)

    walk(dashboard())
    return found


def rule_queries() -> list[str]:
    return [rule["expr"] for rule in alert_rules()]


def test_scrape_config_is_valid(promtool: str, tmp_path: Path) -> None:
    # promtool wants the key file to exist: the one the user names, here a stand-in
    key_file = tmp_path / "master.key"
    key_file.write_text("sk-test\n")
    text = SCRAPE_CONFIG.read_text().replace(
        "/home/YOU/.local/state/diversityd/master.key", str(key_file)
    )
    (tmp_path / "prometheus.yml").write_text(text)
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    result = run_promtool(promtool, "check", "config", tmp_path / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_targets() -> None:
    jobs = {job["job_name"]: job for job in load_yaml(SCRAPE_CONFIG)["scrape_configs"]}
    assert jobs["diversityd"]["static_configs"][0]["targets"] == ["127.0.0.1:9478"]
    gateway = jobs["litellm-gateway"]
    assert gateway["static_configs"][0]["targets"] == ["127.0.0.1:4000"]
    assert gateway["metrics_path"] == "/metrics/"  # /metrics is a redirect
    # LiteLLM's metrics want the master key (issue 20, point 8): the key file is the token
    assert gateway["authorization"]["credentials_file"].endswith("/diversityd/master.key")
    assert load_yaml(SCRAPE_CONFIG)["rule_files"] == ["alerts.yml"]


def test_rules_are_valid(promtool: str) -> None:
    result = run_promtool(promtool, "check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_pass_their_tests(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", ALERTS_TEST)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_rules_refuses_a_broken_expression(promtool: str, tmp_path: Path) -> None:
    text = ALERTS.read_text(encoding="utf-8")
    assert "expr: diversityd_model_servable == 0\n" in text
    broken = tmp_path / "alerts.yml"
    broken.write_text(
        text.replace("diversityd_model_servable == 0", "diversityd_model_servable ==")
    )
    result = run_promtool(promtool, "check", "rules", broken)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "parse error" in result.stdout + result.stderr


def test_rule_tests_catch_an_alert_that_forgets_a_stopped_provider(
    promtool: str, tmp_path: Path
) -> None:
    text = ALERTS.read_text(encoding="utf-8")
    forgetful = re.sub(r"\n\s*unless diversityd_provider_stopped_by_user == 1", "", text)
    assert forgetful != text
    (tmp_path / "alerts.yml").write_text(forgetful)
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    result = run_promtool(promtool, "test", "rules", tmp_path / "alerts_test.yml")
    assert result.returncode != 0, result.stdout + result.stderr
    assert "DiversitydProviderDown" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alert_names() - firing == set(), "alerts with no case that expects them to fire"
    assert alert_names() - quiet == set(), "alerts with no near-miss case"
    assert (firing | quiet) - alert_names() == set(), "cases for alerts that do not exist"


def test_every_alert_says_how_bad_and_what_to_do() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"], rule["alert"]
        assert annotations["description"], rule["alert"]
        assert "diversityctl" in annotations["runbook"], rule["alert"]


def test_dashboard_is_a_grafana_10_dashboard() -> None:
    board = dashboard()
    assert board["title"] == "diversityd - Provider Diversity"
    assert board["uid"]
    assert board["schemaVersion"] >= 38
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in all_panels(board["panels"])]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_every_panel_queries_prometheus() -> None:
    for panel in all_panels(dashboard()["panels"]):
        if panel["type"] == "row":  # a heading, not a panel of its own
            continue
        targets = panel.get("targets", [])
        assert any(target.get("expr", "").strip() for target in targets), panel["title"]
        for target in targets:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_no_query_pads_with_vector() -> None:
    for query in dashboard_queries() + rule_queries():
        assert not PADDING.search(query), query


def test_dashboard_queries_are_promql(promtool: str, tmp_path: Path) -> None:
    rules = []
    for number, query in enumerate(dashboard_queries()):
        if query.startswith("label_values("):  # Grafana's own, for variables
            continue
        expanded = query
        for variable, value in GRAFANA_VARIABLES.items():
            expanded = expanded.replace(variable, value)
        rules.append({"record": f"dashboard:query_{number}", "expr": expanded})
    assert rules
    rule_file = tmp_path / "dashboard.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool(promtool, "check", "rules", rule_file)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("source", "queries"),
    [("dashboard", dashboard_queries), ("alerts", rule_queries)],
)
def test_every_metric_exists(source: str, queries: Callable[[], list[str]]) -> None:
    used = {name for query in queries() for name in METRIC_NAME.findall(query)}
    assert any(name.startswith("diversityd_") for name in used), f"{source}: no metric found"
    assert any(name.startswith("litellm_") for name in used), f"{source}: no LiteLLM metric found"
    unknown = used - DIVERSITYD_SERIES - LITELLM_METRICS
    assert unknown == set(), f"{source} uses metrics nobody exposes: {sorted(unknown)}"


def test_metric_name_pattern_reads_promql() -> None:
    query = (
        'sum(rate(diversityd_probe_duration_seconds_bucket{provider=~"$provider"}[5m]))'
        ' / litellm_proxy_total_requests_metric_total{job=~"diversityd|litellm-gateway"}'
    )
    assert METRIC_NAME.findall(query) == [
        "diversityd_probe_duration_seconds_bucket",
        "litellm_proxy_total_requests_metric_total",
    ]
