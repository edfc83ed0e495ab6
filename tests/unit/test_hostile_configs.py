"""Issue 19: hostile configurations through `diversityctl validate` and `render`, and a
property: a configuration that passes validate always renders.

Every case must exit 2 with its finding's code, name the file (and the key, where there is
one), print no traceback, end in bounded time and memory, and leave every file as it was.
Before the issue, validate refused 6 of these 36 cases (an escape in extra_args, a model
name holding a `\\r`, the literal api_key, providers.yaml a directory, a file not UTF-8,
the alias bomb); the FIFO blocked it until the timeout.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diversityd.adapters.litellm import gateway_places
from diversityd.adapters.unitfiles import load_templates
from diversityd.config import parse_config
from diversityd.errors import Severity
from diversityd.gateway import Availability, render_gateway
from diversityd.gpuplan import GpuSettings
from diversityd.units import (
    UNSAFE_CHARACTERS,
    UnitContext,
    render_gateway_units,
    render_provider_unit,
)
from diversityd.validation import validate

PROVIDERS = """\
providers:
  native:
    type: llama_cpp
    base_url: http://127.0.0.1:8080
    models: [llama-cpp-native]
  ollama:
    type: ollama
    base_url: http://127.0.0.1:11434
    status: {status}
    models: ["llama3.1:latest"]
"""
MAPPINGS = """\
fallback_chains:
  "llama3.1:latest": {chain: [llama-cpp-native]}
"""
SETTINGS = """\
{top}
gateway:
  port: 4000
{gateway}
providers:
  native:
    server: llama-server
{native}
"""
MEMORY_LIMIT = 1 << 30  # address space of each run
TIME_LIMIT_S = 60


def settings_yaml(
    top: str = "", gateway: str = "", native: str = "    model_path: /models/current.gguf\n"
) -> str:
    return SETTINGS.format(top=top, gateway=gateway, native=native)


@dataclass(frozen=True)
class Case:
    name: str
    code: str  # the finding's code: refused for this reason, not another
    file: str  # the file the finding must name
    key: str | None  # the key path it must name (None: the whole file is refused)
    providers: str = PROVIDERS.format(status="active")
    mappings: str = MAPPINGS
    settings: str = field(default_factory=settings_yaml)
    secret: str | None = None  # must never appear whole in the output
    special: Callable[[Path], None] | None = None  # makes a file that is not text


def native(lines: str) -> str:
    if "model_path:" not in lines:
        lines += "\nmodel_path: /models/current.gguf"
    return settings_yaml(native="".join(f"    {line}\n" for line in lines.splitlines()))


def gateway(lines: str) -> str:
    return settings_yaml(gateway="".join(f"  {line}\n" for line in lines.splitlines()))


SECRETS = {
    "sk": "sk-proj-Abc123Def456Ghi789Jkl",
    "aiza": "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUv",
    "glpat": "glpat-AbCdEfGhIjKlMnOpQrSt",
    "ghp": "ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
    "hf": "hf_AbCdEfGhIjKlMnOpQrStUvWxYz",
    "xoxb": "xoxb-1234567890-abcdefghijklmn",
    "akia": "AKIAIOSFODNN7EXAMPLE",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
}


def dev_zero(directory: Path) -> None:
    (directory / "providers.yaml").unlink()
    (directory / "providers.yaml").symlink_to("/dev/zero")


def fifo(directory: Path) -> None:
    (directory / "model-mappings.yaml").unlink()
    os.mkfifo(directory / "model-mappings.yaml")


def huge(directory: Path) -> None:
    (directory / "diversityd.yaml").write_text("# padding\n" * 200_000)  # 2 MB


def a_directory(directory: Path) -> None:
    (directory / "providers.yaml").unlink()
    (directory / "providers.yaml").mkdir()


def not_utf8(directory: Path) -> None:
    (directory / "diversityd.yaml").write_bytes(b"host: \xff\xfe\n")


ALIAS_BOMB = "\n".join(
    ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    + ["providers: *a8", ""]
)

CASES = [
    # 1. every string bound for a unit, an environment file or the gateway's socket
    Case(
        "environment-newline-block",
        "control-character",
        "diversityd.yaml",
        "providers.native.environment.EVIL",
        settings=native("environment:\n  EVIL: |\n    x\n    ExecStartPre=/bin/evil"),
    ),
    Case(
        "environment-cr",
        "control-character",
        "diversityd.yaml",
        "providers.native.environment.EVIL",
        settings=native('environment: {EVIL: "x\\rExecStartPre=/bin/evil"}'),
    ),
    Case(
        "environment-nul",
        "control-character",
        "diversityd.yaml",
        "providers.native.environment.EVIL",
        settings=native('environment: {EVIL: "x\\0y"}'),
    ),
    Case(
        "environment-escape",
        "control-character",
        "diversityd.yaml",
        "providers.native.environment.EVIL",
        settings=native('environment: {EVIL: "\\e[2J"}'),
    ),
    Case(
        "executable-cr",
        "control-character",
        "diversityd.yaml",
        "providers.native.executable",
        settings=native('executable: "/usr/bin/llama-server\\rExecStartPre=/bin/evil"'),
    ),
    Case(
        "executable-newline",
        "control-character",
        "diversityd.yaml",
        "providers.native.executable",
        settings=native('executable: "/usr/bin/llama-server\\nExecStartPre=/bin/evil"'),
    ),
    Case(
        "executable-exec-prefix",
        "unsafe-executable",
        "diversityd.yaml",
        "providers.native.executable",
        settings=native('executable: "-/bin/sh"'),
    ),
    Case(
        "model-path-newline",
        "control-character",
        "diversityd.yaml",
        "providers.native.model_path",
        settings=native('model_path: "/m/x.gguf\\nExecStartPre=/bin/evil"'),
    ),
    Case(
        "model-path-nul",
        "control-character",
        "diversityd.yaml",
        "providers.native.model_path",
        settings=native('model_path: "/m/x\\0.gguf"'),
    ),
    Case(
        "extra-args-escape",
        "control-character",
        "diversityd.yaml",
        "providers.native.extra_args[1]",
        settings=native('extra_args: ["--flash-attn", "\\e]0;owned\\a"]'),
    ),
    Case(
        "gateway-host-newline",
        "control-character",
        "diversityd.yaml",
        "gateway.host",
        settings=gateway('host: "127.0.0.1\\nListenStream=0.0.0.0:22"'),
    ),
    Case(
        "gateway-host-a-path",
        "wrong-value",
        "diversityd.yaml",
        "gateway.host",
        settings=gateway("host: /run/user/1000/evil.sock"),
    ),
    Case(
        "environment-file-cr",
        "control-character",
        "diversityd.yaml",
        "gateway.environment_files[0]",
        settings=gateway('environment_files: ["/home/u/cloud.env\\rExecStartPre=/bin/evil"]'),
    ),
    Case(
        "environment-file-relative",
        "relative-path",
        "diversityd.yaml",
        "gateway.environment_files[0]",
        settings=gateway("environment_files: [cloud.env]"),
    ),
    Case(
        "master-key-file-newline",
        "control-character",
        "diversityd.yaml",
        "gateway.master_key_file",
        settings=gateway('master_key_file: "/k\\nExecStartPre=/bin/evil"'),
    ),
    Case(
        "litellm-venv-newline",
        "control-character",
        "diversityd.yaml",
        "gateway.litellm_venv",
        settings=gateway('litellm_venv: "/v\\nExecStartPre=/bin/evil"'),
    ),
    Case(
        "state-dir-newline",
        "control-character",
        "diversityd.yaml",
        "state_dir",
        settings=settings_yaml(top='state_dir: "/s\\nExecStartPre=/bin/evil"'),
    ),
    Case(
        "model-name-cr",
        "control-character",
        "providers.yaml",
        "providers.native.models[0]",
        providers=PROVIDERS.format(status="active").replace(
            "[llama-cpp-native]", '["llama-cpp-native\\rExecStartPre=/x"]'
        ),
    ),
    # 4. secrets: one list of patterns, never echoed whole
    *(
        Case(
            f"secret-in-arguments-{kind}",
            "secret-in-arguments",
            "diversityd.yaml",
            "providers.native.extra_args[1]",
            settings=native(f'extra_args: ["--header", "{secret}"]'),
            secret=secret,
        )
        for kind, secret in SECRETS.items()
    ),
    Case(
        "secret-in-litellm-settings-by-shape",
        "secret-in-config",
        "diversityd.yaml",
        "gateway.litellm_settings.callback_header",
        settings=gateway(f"litellm_settings: {{callback_header: {SECRETS['glpat']}}}"),
        secret=SECRETS["glpat"],
    ),
    Case(
        "literal-api-key",
        "secret-in-config",
        "providers.yaml",
        "providers.cloud.api_key",
        providers=PROVIDERS.format(status="active")
        + f"  cloud:\n    type: openai\n    api_key: {SECRETS['sk']}\n    models: [gpt-4o]\n",
        secret=SECRETS["sk"],
    ),
    Case(
        "secret-echoed-as-a-wrong-value",
        "wrong-value",
        "providers.yaml",
        "providers.ollama.status",
        providers=PROVIDERS.format(status=SECRETS["sk"]),
        secret=SECRETS["sk"],
    ),
    # 3. files read within bounds
    Case("providers-is-dev-zero", "unreadable-file", "providers.yaml", None, special=dev_zero),
    Case("mappings-is-a-fifo", "unreadable-file", "model-mappings.yaml", None, special=fifo),
    Case("settings-is-huge", "unreadable-file", "diversityd.yaml", None, special=huge),
    Case(
        "providers-is-a-directory", "unreadable-file", "providers.yaml", None, special=a_directory
    ),
    Case("settings-not-utf8", "unreadable-file", "diversityd.yaml", None, special=not_utf8),
    Case("deep-nesting", "yaml-too-deep", "providers.yaml", None, providers="[" * 100_000),
    Case("recursive-alias", "yaml-too-deep", "model-mappings.yaml", None, mappings="a: &a [*a]\n"),
    Case("alias-bomb", "yaml-too-big", "providers.yaml", None, providers=ALIAS_BOMB),
]


def write_case(case: Case, directory: Path) -> None:
    directory.mkdir()
    (directory / "providers.yaml").write_text(case.providers)
    (directory / "model-mappings.yaml").write_text(case.mappings)
    (directory / "diversityd.yaml").write_text(case.settings)
    if case.special is not None:
        case.special(directory)


def snapshot(directory: Path) -> dict[str, tuple[int, int, int, bytes | None]]:
    """Every entry as it is (not followed: a FIFO is never opened, /dev/zero never read)."""
    result = {}
    for entry in sorted(directory.iterdir()):
        status = entry.lstat()
        regular = entry.is_file() and not entry.is_symlink()
        content = entry.read_bytes() if regular else None
        result[entry.name] = (status.st_mode, status.st_size, status.st_mtime_ns, content)
    return result


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diversityd.cli", *args],
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT_S,
        preexec_fn=limit_memory,  # only setrlimit
        check=False,
    )


def test_the_corpus_covers_every_point_of_the_issue() -> None:
    assert len(CASES) >= 26
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.timeout(2 * TIME_LIMIT_S)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("command", ["validate", "render"])
def test_a_hostile_configuration_is_refused_cleanly(
    case: Case, command: str, tmp_path: Path
) -> None:
    directory = tmp_path / "config"
    write_case(case, directory)
    before = snapshot(directory)
    result = run_ctl(command, "--config-dir", str(directory))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert f"[{case.code}]" in output, output
    assert case.file in output, output
    if case.key is not None:
        assert f" {case.key}:" in output, output
    if case.secret is not None:
        assert case.secret not in output
        assert case.secret[:4] in output or "secret" in output
    assert snapshot(directory) == before
    assert not list(tmp_path.glob("config/.*"))  # no temporary file left behind either


# -- property: a configuration that passes validate never makes rendering raise -----------

EVIL = ["\n", "\r", "\x00", "\x1b", "\t", "\x7f", "-", "@", "~/", "%", "$", ";", '"', "'", "\\"]
HOSTILE = st.one_of(
    st.text(max_size=12),
    st.lists(st.sampled_from([*EVIL, "a", "/x", "sk-abcdefgh12345", ".."]), max_size=5).map(
        "".join
    ),
    st.sampled_from(["localhost", "::1", "0.0.0.0", "relative/path", "~"]),
)
PLAIN = {  # what each field holds in a sound configuration
    "model": st.sampled_from(["m", "llama3.1:latest", "Qwen/Qwen2.5-Coder-7B"]),
    "model_path": st.sampled_from(["/models/m.gguf", "~/models 100%/$HOME/m.gguf"]),
    "executable": st.sampled_from(["/opt/llama dir/bin/llama-server", "vllm", "~/bin/x"]),
    "environment": st.sampled_from(["1", 'it\'s "x" $HOME 100%', "", "a\tb"]),
    "variable": st.sampled_from(["GGML_CUDA_NO_PINNED", "HF_TOKEN", "A"]),
    "extra_args": st.sampled_from(["--flash-attn", "on", "a;b", "100%", "$X"]),
    "host": st.sampled_from(["127.0.0.1", "::1", "0.0.0.0"]),
    "path": st.sampled_from(["/s/x", "~/.config/diversityd/cloud.env", "/a b/%c"]),
    "setting": st.sampled_from(["cache", "x", "redis_host"]),
}


@st.composite
def configurations(draw: st.DrawFn) -> dict[str, str]:
    """A sound configuration with up to two of its fields hostile."""
    hostile = draw(st.sets(st.sampled_from(sorted(PLAIN)), max_size=2))

    def text(field: str) -> str:
        return draw(HOSTILE if field in hostile else PLAIN[field])

    server = draw(st.sampled_from(["llama-server", "llama-cpp-python", "ollama", "vllm"]))
    kind = {"llama-server": "llama_cpp", "llama-cpp-python": "llama_cpp"}.get(server, server)
    owned: dict[str, object] = {"server": server, "model_path": text("model_path")}
    if draw(st.booleans()):
        owned["executable"] = text("executable")
    if draw(st.booleans()):
        owned["environment"] = {text("variable"): text("environment") for _ in range(2)}
    if draw(st.booleans()):
        owned["extra_args"] = [text("extra_args") for _ in range(draw(st.integers(0, 3)))]
    gateway: dict[str, object] = {"host": text("host")}
    for key in ("master_key_file", "litellm_venv"):
        if draw(st.booleans()):
            gateway[key] = text("path")
    if draw(st.booleans()):
        gateway["environment_files"] = [text("path"), text("path")]
    if draw(st.booleans()):
        gateway["litellm_settings"] = {text("setting"): text("setting")}
    document: dict[str, object] = {"providers": {"p": owned}, "gateway": gateway}
    if draw(st.booleans()):
        document["state_dir"] = text("path")
    providers = {
        "providers": {
            "p": {"type": kind, "base_url": "http://127.0.0.1:8080", "models": [text("model")]},
        }
    }
    return {
        "providers.yaml": yaml.safe_dump(providers),
        "model-mappings.yaml": "fallback_chains: {}\n",
        "diversityd.yaml": yaml.safe_dump(document),
    }


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=configurations())
def test_a_configuration_that_passes_validate_always_renders(texts: dict[str, str]) -> None:
    config, findings = parse_config(texts, config_dir="/cfg", hostname="box")
    report = validate(config, findings, {})
    event("valid" if report.ok else "refused")
    if not report.ok:
        assert report.of(Severity.ERROR)
        return
    assert report.config is not None
    assert report.catalog is not None
    context = UnitContext(
        home="/home/user",
        templates=load_templates(),
        default_llama_server="/cache/llama-server",
        default_llama_python="/cache/python",
        llama_lib_dir="/cache/lib",
        python="/venv/bin/python",
        env_dir="/state/env",
        llama_python_launcher="/l/launcher.py",
    )
    for name, owned in report.config.settings.owned.items():
        gpu = GpuSettings(name, n_gpu_layers=0, hide_gpu=False, server=owned.server, gpu=0)
        unit = render_provider_unit(
            report.config, owned, report.catalog.backend_names_of(name), gpu, context
        )
        for text in (unit.text, unit.env_text or ""):
            assert not UNSAFE_CHARACTERS.search(text.replace("\n", "")), text
    _files, _key, paths = gateway_places(report.config.settings)
    for unit in render_gateway_units(report.config.settings.gateway, paths, context, 5.0):
        assert not UNSAFE_CHARACTERS.search(unit.text.replace("\n", ""))
    availability = Availability.all_up_except(report.config, frozenset())
    render_gateway(report.config, report.catalog, availability).text()
