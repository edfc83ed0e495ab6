"""Configuration parsing and validation: every finding names file, key path and a fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from diversityd.config import parse_config
from diversityd.errors import Finding, Severity
from diversityd.validation import Report, validate

PROVIDERS = """\
providers:
  ollama:
    type: ollama
    base_url: http://127.0.0.1:11434
    status: active
    models: [llama3.1:latest, gpt-oss:20b-cloud]
  native:
    type: llama_cpp
    base_url: http://127.0.0.1:8080
    status: active
    models: [llama-cpp-native]
"""
MAPPINGS = """\
fallback_chains:
  "llama3.1:latest":
    chain: [llama-cpp-native]
"""


def check(
    providers: str = PROVIDERS,
    mappings: str = MAPPINGS,
    settings: str | None = None,
    environ: dict[str, str] | None = None,
) -> Report:
    texts = {
        "providers.yaml": textwrap.dedent(providers),
        "model-mappings.yaml": textwrap.dedent(mappings),
        "diversityd.yaml": None if settings is None else textwrap.dedent(settings),
    }
    config, findings = parse_config(texts, config_dir="/cfg", hostname="box")
    return validate(config, findings, environ or {})


def codes(report: Report, severity: Severity = Severity.ERROR) -> list[str]:
    return [f.code for f in report.of(severity)]


def only(report: Report, code: str, severity: Severity = Severity.ERROR) -> Finding:
    matches = [f for f in report.of(severity) if f.code == code]
    assert len(matches) == 1, report.findings
    return matches[0]


def test_sound_configuration_has_no_errors() -> None:
    report = check()
    assert report.ok, report.findings


def test_malformed_yaml_reports_line_and_column() -> None:
    report = check(mappings='fallback_chains:\n  "a":\n    chain: [b, c\n')
    finding = only(report, "yaml-syntax")
    assert finding.file == "/cfg/model-mappings.yaml"
    assert finding.line is not None
    assert finding.line >= 3
    assert finding.column is not None
    assert finding.hint


def test_missing_file_is_an_error_naming_the_path() -> None:
    config, findings = parse_config(
        {"providers.yaml": PROVIDERS, "model-mappings.yaml": None, "diversityd.yaml": None},
        config_dir="/cfg",
        hostname="box",
    )
    assert config is None
    assert findings[0].code == "missing-file"
    assert findings[0].file == "/cfg/model-mappings.yaml"


def test_mapping_where_a_list_is_expected() -> None:
    report = check(mappings='fallback_chains:\n  "llama3.1:latest":\n    chain: {a: b}\n')
    finding = only(report, "expected-list")
    assert finding.key_path == 'fallback_chains."llama3.1:latest".chain'
    assert finding.line == 3
    assert "list" in (finding.hint or "")


def test_list_where_a_mapping_is_expected() -> None:
    report = check(mappings='fallback_chains:\n  "llama3.1:latest": [llama-cpp-native]\n')
    finding = only(report, "expected-mapping")
    assert finding.key_path == 'fallback_chains."llama3.1:latest"'
    assert "chain:" in (finding.hint or "")


def test_models_as_a_mapping_is_rejected() -> None:
    providers = PROVIDERS.replace(
        "models: [llama-cpp-native]", "models:\n      llama-cpp-native: {}"
    )
    report = check(providers=providers)
    finding = only(report, "expected-list")
    assert finding.key_path == "providers.native.models"


def test_wrong_types_are_located() -> None:
    providers = PROVIDERS.replace("type: llama_cpp", "type: llamacpp").replace(
        "base_url: http://127.0.0.1:11434", "base_url: 11434"
    )
    report = check(providers=providers)
    assert only(report, "unknown-type").key_path == "providers.native.type"
    assert only(report, "wrong-value").key_path == "providers.ollama.base_url"


def test_duplicate_yaml_key_is_an_error() -> None:
    providers = PROVIDERS + "  native:\n    type: vllm\n    base_url: http://127.0.0.1:1\n"
    report = check(providers=providers)
    finding = only(report, "duplicate-key")
    assert finding.key_path == "providers.native"


def test_missing_target_is_an_error_at_the_chain_entry() -> None:
    report = check(mappings='fallback_chains:\n  "llama3.1:latest":\n    chain: [nowhere]\n')
    finding = only(report, "missing-target")
    assert finding.key_path == 'fallback_chains."llama3.1:latest".chain[0]'
    assert finding.line == 3
    assert "nowhere" in finding.message


def test_exact_match_naming_unknown_provider() -> None:
    mappings = MAPPINGS + 'exact_matches:\n  "x":\n    provider: nobody\n'
    report = check(mappings=mappings)
    finding = only(report, "unknown-provider")
    assert finding.key_path == "exact_matches.x.provider"
    assert "ollama" in (finding.hint or "")


def test_name_served_by_two_providers_needs_a_balance_entry() -> None:
    providers = PROVIDERS.replace("models: [llama-cpp-native]", "models: [llama3.1:latest]")
    mappings = 'fallback_chains:\n  "llama3.1:latest":\n    chain: []\n'
    report = check(providers=providers, mappings=mappings)
    finding = only(report, "model-served-twice")
    assert "ollama and native" in finding.message
    assert "providers: [ollama, native]" in (finding.hint or "")
    balanced = mappings + 'exact_matches:\n  "llama3.1:latest":\n    providers: [ollama, native]\n'
    assert check(providers=providers, mappings=balanced).ok


def test_exact_match_missing_from_models_is_still_served() -> None:
    """Regression for the seeds' v1.7.1 outage."""
    providers = PROVIDERS.replace("    models: [llama-cpp-native]\n", "")
    mappings = MAPPINGS + 'exact_matches:\n  "llama-cpp-native":\n    provider: native\n'
    report = check(providers=providers, mappings=mappings)
    assert report.ok, report.findings
    assert report.catalog is not None
    assert report.catalog.is_served("llama-cpp-native")


def test_disabled_target_in_active_chain_is_a_warning() -> None:
    providers = PROVIDERS.replace(
        "base_url: http://127.0.0.1:8080\n    status: active",
        "base_url: http://127.0.0.1:8080\n    status: disabled",
    )
    report = check(providers=providers)
    assert report.ok
    finding = only(report, "disabled-target", Severity.WARNING)
    assert finding.key_path == 'fallback_chains."llama3.1:latest".chain[0]'


def test_unset_key_variable_is_a_warning_and_set_one_is_not() -> None:
    providers = PROVIDERS + (
        "  cloud:\n    type: openai\n    api_key_env: MY_OPENAI_KEY\n    models: [gpt-4o]\n"
    )
    warning = only(check(providers=providers), "key-unset", Severity.WARNING)
    assert "MY_OPENAI_KEY" in warning.message
    assert "key-unset" not in codes(
        check(providers=providers, environ={"MY_OPENAI_KEY": "x"}), Severity.WARNING
    )


def test_literal_api_key_is_refused() -> None:
    providers = PROVIDERS + (
        "  cloud:\n    type: openai\n    api_key: sk-live-123\n    models: [gpt-4o]\n"
    )
    finding = only(check(providers=providers), "secret-in-config")
    assert finding.key_path == "providers.cloud.api_key"
    assert "sk-live-123" not in finding.message


def test_api_key_reference_is_accepted() -> None:
    providers = PROVIDERS + (
        "  cloud:\n    type: openai\n    api_key: os.environ/OPENAI_API_KEY\n    models: [gpt-4o]\n"
    )
    report = check(providers=providers, environ={"OPENAI_API_KEY": "x"})
    assert report.ok, report.findings


def test_unknown_settings_key_suggests_the_right_one() -> None:
    report = check(settings="gateway:\n  prot: 4000\n")
    finding = only(report, "unknown-key")
    assert finding.file == "/cfg/diversityd.yaml"
    assert finding.key_path == "gateway.prot"
    assert "port" in (finding.hint or "")


def test_the_retired_restart_grace_is_a_warning_and_waits_may_not_be_zero() -> None:
    retired = only(
        check(settings="supervision:\n  restart_grace_s: 10\n"), "retired-key", Severity.WARNING
    )
    assert retired.severity is Severity.WARNING
    assert retired.key_path == "supervision.restart_grace_s"
    assert retired.file == "/cfg/diversityd.yaml"
    zero_hang = only(check(settings="supervision:\n  hung_grace_s: 0\n"), "out-of-range")
    assert zero_hang.key_path == "supervision.hung_grace_s"


def test_owned_provider_must_exist_and_match_its_type() -> None:
    report = check(settings="providers:\n  nope:\n    server: llama-server\n")
    assert only(report, "unknown-provider").key_path == "providers.nope"
    report = check(settings="providers:\n  native:\n    server: vllm\n    model_path: x\n")
    assert only(report, "wrong-value").key_path == "providers.native.server"


def test_owned_llama_server_needs_a_model_path() -> None:
    report = check(settings="providers:\n  native:\n    server: llama-server\n")
    finding = only(report, "missing-key")
    assert "model_path" in finding.message


def test_literal_secret_in_pass_through_settings_is_refused() -> None:
    report = check(settings="gateway:\n  router_settings:\n    redis_password: hunter2\n")
    finding = only(report, "secret-in-config")
    assert finding.key_path == "gateway.router_settings.redis_password"
    assert check(
        settings="gateway:\n  router_settings:\n    redis_password: os.environ/REDIS_PASSWORD\n"
    ).ok


@pytest.mark.parametrize(
    "mappings",
    [
        'fallback_chains:\n  "a": {chain: [a]}\n',
        'fallback_chains:\n  "a": {chain: [b]}\n  "b": {chain: [a]}\n',
    ],
)
def test_cycles_print_as_a_path(mappings: str) -> None:
    providers = PROVIDERS.replace("models: [llama-cpp-native]", "models: [a, b]")
    finding = only(check(providers=providers, mappings=mappings), "fallback-cycle")
    path = finding.message.removeprefix("fallback cycle: ").split(" -> ")
    assert path[0] == path[-1]
    assert len(path) >= 2


ALIAS_BOMB = "\n".join(
    ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    + ["providers: *a8", ""]
)


@pytest.mark.timeout(20)  # before the bound it ran for minutes (issue 11, scenario 3)
def test_an_alias_bomb_is_refused_at_once_naming_the_file(tmp_path: Path) -> None:
    from diversityd.errors import ConfigError
    from diversityd.yamlfile import parse_yaml

    with pytest.raises(ConfigError) as refused:
        parse_yaml(ALIAS_BOMB, "providers.yaml")
    (finding,) = refused.value.findings
    assert finding.code == "yaml-too-big"
    assert finding.file == "providers.yaml"
    assert "alias" in finding.message
    with pytest.raises(ConfigError) as huge:
        parse_yaml("x: 1\n" * 300_000, "providers.yaml")
    assert huge.value.findings[0].code == "yaml-too-big"


@pytest.mark.timeout(60)
def test_validate_refuses_an_alias_bomb_with_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "providers.yaml").write_text(ALIAS_BOMB)
    (tmp_path / "model-mappings.yaml").write_text("fallback_chains: {}\n")
    result = subprocess.run(
        [sys.executable, "-m", "diversityd.cli", "validate", "--config-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "providers.yaml" in result.stdout + result.stderr
    assert "alias" in result.stdout + result.stderr


def test_names_with_control_characters_and_secrets_in_arguments_are_refused() -> None:
    """Issue 11, scenario 7: a newline in a name wrote a directive into a unit, and
    `--api-key` values went into world-readable unit files; validate passed both."""
    report = check(
        providers=textwrap.dedent(
            """\
            providers:
              "native\\nExecStartPre=/bin/sh":
                type: llama_cpp
                base_url: http://127.0.0.1:8080
                models: ["tiny\\tmodel"]
            """
        ),
        mappings="fallback_chains: {}\n",
        settings=textwrap.dedent(
            """\
            providers:
              "native\\nExecStartPre=/bin/sh":
                server: llama-server
                model_path: /m/x.gguf
                extra_args: ["--api-key", "sk-abcdefghijklmnop", "--token=xyz"]
            """
        ),
    )
    codes = [f.code for f in report.of(Severity.ERROR)]
    assert codes.count("control-character") >= 2
    assert codes.count("secret-in-arguments") == 3  # the flag, its sk- value, the =form
    secret = next(f for f in report.of(Severity.ERROR) if f.code == "secret-in-arguments")
    assert secret.file is not None
    assert secret.file.endswith("diversityd.yaml")
    assert "environment" in (secret.hint or "")
    assert "sk-abcdefghijklmnop" not in secret.format()  # the finding never repeats it


def test_the_daemons_http_endpoint_stays_on_loopback() -> None:
    report = check(settings="http: {host: 0.0.0.0, port: 9478}\n")
    assert only(report, "not-loopback").key_path == "http.host"
    report = check(settings="http: {port: 0}\n")
    assert report.ok
    assert report.config is not None
    assert report.config.settings.http.url is None  # none at all
    assert check(settings="").config is not None


# -- issue 19, point 3: files read within bounds ----------------------------------------


def nesting_depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((nesting_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((nesting_depth(v) for v in value), default=0)
    return 0


def test_the_seeds_and_the_example_sit_well_inside_the_limits(tmp_path: Path) -> None:
    """1 MiB per file and 64 levels: the configurations diversityd was made for use a
    sixty-fourth of the first and a fourth of the second."""
    from diversityd.yamlfile import MAX_BYTES, MAX_DEPTH, parse_yaml
    from tests import seeds
    from tests.conftest import REPO_ROOT

    directories = [
        seeds.v1711(tmp_path / "a"),
        seeds.v171_before_hotfix(tmp_path / "b"),
        seeds.deep_analysis(tmp_path / "c"),
        REPO_ROOT / "config",
    ]
    files = [path for directory in directories for path in sorted(directory.glob("*.yaml"))]
    assert len(files) >= 7
    for path in files:
        assert path.stat().st_size < MAX_BYTES // 64, path
        data = parse_yaml(path.read_text(), str(path)).data
        assert nesting_depth(data) <= MAX_DEPTH // 4, path


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("[" * 100_000, "yaml-too-deep"),  # before: RecursionError (a traceback)
        ("a: " + "{a: " * 10_000, "yaml-too-deep"),
        ("a: &a [*a]\n", "yaml-too-deep"),  # an alias holding itself: nests without end
        (
            "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 2000)),
            "yaml-too-deep",
        ),
        ("? [a, b]\n: x\n", "yaml-syntax"),  # a key that is a list
    ],
)
def test_nesting_is_bounded(text: str, code: str) -> None:
    from diversityd.errors import ConfigError
    from diversityd.yamlfile import parse_yaml

    with pytest.raises(ConfigError) as refused:
        parse_yaml(text, "providers.yaml")
    (finding,) = refused.value.findings
    assert finding.code == code
    assert finding.file == "providers.yaml"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge", "directory", "socket"])
def test_a_configuration_file_is_checked_before_it_is_read(tmp_path: Path, kind: str) -> None:
    """A providers.yaml linked to /dev/zero ran to MemoryError, a FIFO blocked validate for
    ever: both are refused before a byte is read, naming the file."""
    import os
    import socket

    from diversityd.config import load_config
    from diversityd.errors import ConfigError

    (tmp_path / "model-mappings.yaml").write_text("fallback_chains: {}\n")
    path = tmp_path / "providers.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "huge":
        with path.open("wb") as handle:
            handle.truncate(64 << 30)  # sparse: 64 GiB that no one should read
    elif kind == "directory":
        path.mkdir()
    else:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listener.close()
    with pytest.raises(ConfigError) as refused:
        load_config(tmp_path)
    (finding,) = refused.value.findings
    assert finding.code == "unreadable-file"
    assert finding.file == str(path)
    assert "1 MiB" in (finding.hint or "")
