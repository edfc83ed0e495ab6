"""Issue 19, point 4: one list of secret patterns for validation, adoption and the gateway's
pass-through settings, and a refused secret never echoed whole."""

from __future__ import annotations

import textwrap

import pytest

from diversityd import foreignunits, gateway
from diversityd.config import parse_config
from diversityd.errors import Severity
from diversityd.secretpatterns import is_secret, looks_like_secret, quoted, redact
from diversityd.validation import validate

KEYS = {
    "openai": "sk-proj-Abc123Def456Ghi789Jkl",
    "anthropic": "sk-ant-api03-AbCdEfGhIjKlMnOp",
    "google": "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUv",
    "gitlab": "glpat-AbCdEfGhIjKlMnOpQrSt",
    "github": "ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
    "github-fine-grained": "github_pat_11ABCDEFG0123456789_abcdefghij",
    "huggingface": "hf_AbCdEfGhIjKlMnOpQrStUvWxYz",
    "slack": "xoxb-1234567890-abcdefghijklmn",
    "groq": "gsk_AbCdEfGhIjKlMnOpQrStUvWx",
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
    "bearer": "Bearer abcdef",
    "url-with-password": "https://user:hunter2@proxy.example/v1",
}
ORDINARY = [
    "/models/active/current.gguf",
    "--flash-attn",
    "on",
    "llama3.1:latest",
    "Qwen/Qwen2.5-Coder-7B-Instruct-AWQ",
    "--sk-layers",
    "hf_cache",
    "sk-",
    "http://127.0.0.1:8080",
    "task-1234567890",
]


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_validation_and_adoption_know_the_same_secrets(kind: str) -> None:
    value = KEYS[kind]
    assert looks_like_secret(value)  # validation
    assert is_secret("ANYTHING", value)  # adoption
    assert looks_like_secret(f"--api-header={value}")  # inside an argument too
    assert foreignunits.is_secret is is_secret  # one list, not two that drift apart


@pytest.mark.parametrize("value", ORDINARY)
def test_ordinary_values_are_no_secrets(value: str) -> None:
    assert not looks_like_secret(value)


def test_a_secret_is_shown_by_its_first_characters_only() -> None:
    assert redact(KEYS["openai"]) == "sk-p... (29 characters)"
    assert KEYS["google"] not in quoted(KEYS["google"])
    assert quoted("x" * 1000).endswith("...")
    assert len(quoted("x" * 1000)) <= 60
    assert quoted("plain") == "'plain'"


def check(settings: str, providers: str | None = None):  # type: ignore[no-untyped-def]
    texts = {
        "providers.yaml": providers
        or "providers:\n  native:\n    type: llama_cpp\n"
        "    base_url: http://127.0.0.1:8080\n    models: [m]\n",
        "model-mappings.yaml": "fallback_chains: {}\n",
        "diversityd.yaml": textwrap.dedent(settings),
    }
    config, findings = parse_config(texts, config_dir="/cfg", hostname="box")
    return validate(config, findings, {})


@pytest.mark.parametrize("kind", ["google", "gitlab", "aws", "jwt", "slack", "groq"])
def test_validate_refuses_every_known_key_in_arguments_without_echoing_it(kind: str) -> None:
    """Before issue 19 validation knew sk-, hf_, ghp_ and xox[abp]- only: AIza..., glpat-...
    passed, and a bare key argument was echoed whole in the message."""
    report = check(
        f"""\
        providers:
          native:
            server: llama-server
            model_path: /m/x.gguf
            extra_args: ["--header", "{KEYS[kind]}"]
        """
    )
    (finding,) = report.of(Severity.ERROR)
    assert finding.code == "secret-in-arguments"
    assert finding.key_path == "providers.native.extra_args[1]"
    assert KEYS[kind] not in finding.format()
    assert KEYS[kind][:4] in finding.message


def test_a_key_in_pass_through_settings_is_found_by_its_shape_too() -> None:
    settings = {"callback_header": KEYS["gitlab"], "nested": {"url": KEYS["url-with-password"]}}
    assert list(gateway.literal_secrets(settings, "gateway.litellm_settings")) == [
        "gateway.litellm_settings.callback_header",
        "gateway.litellm_settings.nested.url",
    ]
    report = check(f"gateway:\n  litellm_settings: {{callback_header: {KEYS['gitlab']}}}\n")
    (finding,) = report.of(Severity.ERROR)
    assert finding.code == "secret-in-config"
    assert finding.key_path == "gateway.litellm_settings.callback_header"


def test_a_key_written_where_a_value_goes_is_not_echoed_whole() -> None:
    providers = (
        "providers:\n  native:\n    type: llama_cpp\n    base_url: http://127.0.0.1:8080\n"
        f"    status: {KEYS['openai']}\n    models: [m]\n"
    )
    report = check("", providers)
    (finding,) = report.of(Severity.ERROR)
    assert finding.key_path == "providers.native.status"
    assert KEYS["openai"] not in finding.format()
