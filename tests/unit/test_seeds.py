"""The seeds' configuration history, through `diversityctl validate` and `render`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests import seeds


def run_ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diversityd.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def validate_json(directory: Path) -> tuple[int, dict[str, Any]]:
    result = run_ctl("validate", "--config-dir", str(directory), "--json")
    return result.returncode, json.loads(result.stdout)


def model_names(rendered: dict[str, Any]) -> list[str]:
    return [entry["model_name"] for entry in rendered["model_list"]]


def test_v1711_is_accepted(tmp_path: Path) -> None:
    code, report = validate_json(seeds.v1711(tmp_path))
    assert code == 0, report["errors"]
    assert report["ok"] is True
    assert report["errors"] == []


def test_v171_before_hotfix_is_accepted_and_generates_llama_cpp_models(tmp_path: Path) -> None:
    """The v1.7.1 outage: llama_cpp providers without models: were silently dropped."""
    directory = seeds.v171_before_hotfix(tmp_path)
    code, report = validate_json(directory)
    assert code == 0, report["errors"]
    result = run_ctl("render", "--config-dir", str(directory))
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    names = model_names(rendered)
    assert "llama-cpp-default" in names
    assert "llama-cpp-native" in names
    by_name = {e["model_name"]: e["litellm_params"] for e in rendered["model_list"]}
    assert by_name["llama-cpp-default"]["api_base"] == "http://127.0.0.1:8000/v1"
    assert by_name["llama-cpp-native"]["api_base"] == "http://127.0.0.1:8080/v1"
    # every fallback target exists: the seeds' integration test that caught the outage
    for entry in rendered["router_settings"]["fallbacks"]:
        for source, targets in entry.items():
            assert source in names
            assert set(targets) <= set(names), (source, targets)


def test_deep_analysis_chains_are_rejected_with_the_cycle_as_a_path(tmp_path: Path) -> None:
    directory = seeds.deep_analysis(tmp_path)
    code, report = validate_json(directory)
    assert code == 2
    assert report["ok"] is False
    cycles = [e for e in report["errors"] if e["code"] == "fallback-cycle"]
    assert len(cycles) == 1, report["errors"]
    cycle = cycles[0]
    path = cycle["message"].split("fallback cycle: ", 1)[1].split(" -> ")
    assert path[0] == path[-1]
    assert set(path) == {"llama-cpp-default", "gpt-oss:20b-cloud"}
    assert cycle["file"] == str(directory / "model-mappings.yaml")
    assert cycle["line"] is not None
    assert cycle["key_path"].startswith("fallback_chains.")
    assert cycle["hint"]
    # the human form prints the same path
    human = run_ctl("validate", "--config-dir", str(directory))
    assert human.returncode == 2
    assert " -> ".join(path) in human.stdout
    # render refuses an invalid configuration
    assert run_ctl("render", "--config-dir", str(directory)).returncode == 2


def test_render_down_llama_cpp_python_serves_llama_cpp_default_from_llama_server(
    tmp_path: Path,
) -> None:
    directory = seeds.v1711(tmp_path)
    result = run_ctl("render", "--config-dir", str(directory), "--down", "llama_cpp_python")
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    entries = [e for e in rendered["model_list"] if e["model_name"] == "llama-cpp-default"]
    assert len(entries) == 1
    params = entries[0]["litellm_params"]
    assert params["api_base"] == "http://127.0.0.1:8080/v1"  # llama-server, not :8000
    assert params["model"] == "openai/llama-cpp-native"
    assert all(
        e["litellm_params"].get("api_base") != "http://127.0.0.1:8000/v1"
        for e in rendered["model_list"]
    )
    names = set(model_names(rendered))
    for entry in rendered["router_settings"]["fallbacks"]:
        for targets in entry.values():
            assert set(targets) <= names


def test_v171_terminal_warning_names_the_single_terminal(tmp_path: Path) -> None:
    """v1.7.1 has one terminal (llama-cpp-native): "Terminal diversity 1 -> 1"."""
    _, report = validate_json(seeds.v1711(tmp_path))
    terminal = [w for w in report["warnings"] if w["code"] == "terminal-unit"]
    assert len(terminal) == 1
    assert "llama-cpp-native" in terminal[0]["message"]


def test_cloud_models_share_ollamas_unit_whatever_their_names(tmp_path: Path) -> None:
    """`*-cloud` models go through the local Ollama: a chain of only them is one domain."""
    providers = seeds.providers_yaml(seeds.LLAMA_CPP_HOTFIXED)
    mappings = seeds.EXACT_MATCHES + (
        "\nfallback_chains:\n"
        '  "llama3.1:latest":\n'
        "    chain: [gpt-oss:20b-cloud, kimi-k2:1t-cloud]\n"
    )
    directory = seeds.write(tmp_path, providers, mappings)
    _, report = validate_json(directory)
    shared = [w for w in report["warnings"] if w["code"] == "shared-unit"]
    assert len(shared) == 1
    assert "llama3.1:latest" in shared[0]["message"]
    assert "127.0.0.1:11434" in shared[0]["message"]
