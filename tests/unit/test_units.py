"""Unit rendering: systemd quoting, specifiers, every server kind."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest

from diversityd.adapters.unitfiles import (
    daemon_unit,
    load_templates,
    own_unit_staleness,
    sync_units,
)
from diversityd.catalog import build_catalog
from diversityd.config import parse_config
from diversityd.gpuplan import GpuSettings
from diversityd.units import (
    MARKER,
    RenderedUnit,
    UnitContext,
    UnitRenderError,
    command_line,
    env_file_text,
    environment_line,
    model_file_of,
    quote_arg,
    render_daemon_unit,
    render_provider_unit,
    unit_name,
)

PROVIDERS = """\
providers:
  native: {type: llama_cpp, base_url: "http://127.0.0.1:8080", models: [llama-cpp-native]}
  python: {type: llama_cpp, base_url: "http://127.0.0.1:8000", models: [llama-cpp-default]}
  ollama: {type: ollama, base_url: "http://127.0.0.1:11434", models: [llama3.1:latest]}
  vllm:
    type: vllm
    base_url: "http://127.0.0.1:8001"
    models: [{name: qwen-coder-vllm, model: Qwen/Qwen2.5-Coder-7B-Instruct-AWQ}]
"""
SETTINGS = """\
providers:
  native:
    server: llama-server
    executable: "/opt/llama dir/bin/llama-server"
    model_path: "~/models 100%/$HOME/active/current.gguf"
    ctx: 1024
    parallel: 2
    threads: 3
    extra_args: ["--flash-attn", "on", "--log-prefix", "a;b"]
    environment: {GGML_CUDA_NO_PINNED: 1}
  python:
    server: llama-cpp-python
    executable: /venv/bin/python
    model_path: /models/active/current.gguf
    ctx: 4096
  ollama:
    server: ollama
    executable: /usr/local/bin/ollama
    parallel: 4
  vllm:
    server: vllm
    executable: /usr/local/bin/vllm
    model_path: Qwen/Qwen2.5-Coder-7B-Instruct-AWQ
    ctx: 8192
    gpu_memory_utilization: 0.35
"""


def context() -> UnitContext:
    return UnitContext(
        home="/home/user",
        templates=load_templates(),
        default_llama_server="/cache/llama-server",
        default_llama_python="/cache/python",
        llama_lib_dir="/cache/lib",
        python="/venv/bin/python",
        env_dir="/state/env",
    )


def rendered() -> dict[str, RenderedUnit]:
    config, findings = parse_config(
        {
            "providers.yaml": PROVIDERS,
            "model-mappings.yaml": "fallback_chains: {}\n",
            "diversityd.yaml": SETTINGS,
        },
        config_dir="/cfg",
        hostname="box",
    )
    assert config is not None, findings
    catalog = build_catalog(config)
    return {
        name: render_provider_unit(
            config,
            owned,
            catalog.backend_names_of(name),
            GpuSettings(name, n_gpu_layers=7, hide_gpu=False, server=owned.server, gpu=0),
            context(),
        )
        for name, owned in config.settings.owned.items()
    }


def systemd_unquote(line: str) -> list[str]:
    """Undo our escaping the way systemd does (for the characters we produce)."""
    words = shlex.split(line.replace("$$", "$"), posix=True)
    return [w.replace("%%", "%") for w in words]


@pytest.mark.parametrize(
    "arg",
    ["plain", "with space", "100%", "$HOME", 'quo"te', "back\\slash", "a;b", "", "tab\there"],
)
def test_quoted_arguments_round_trip(arg: str) -> None:
    assert systemd_unquote(quote_arg(arg)) == [arg]


def test_command_line_keeps_argument_boundaries() -> None:
    args = ["/opt/llama dir/bin/llama-server", "--model", "/m 100%/$x.gguf", "--alias", "x"]
    assert systemd_unquote(command_line(args)) == args


def test_environment_line_escapes_specifiers_and_quotes() -> None:
    assert environment_line("A", 'x y "%z"') == 'Environment="A=x y \\"%%z\\""'


def test_llama_server_unit() -> None:
    unit = rendered()["native"]
    assert unit.name == "diversityd-native.service"
    assert unit.text.startswith(MARKER)
    exec_line = next(line for line in unit.text.splitlines() if line.startswith("ExecStart="))
    args = systemd_unquote(exec_line.removeprefix("ExecStart="))
    assert args[0] == "/opt/llama dir/bin/llama-server"
    assert args[args.index("--model") + 1] == "/home/user/models 100%/$HOME/active/current.gguf"
    assert args[args.index("--alias") + 1] == "llama-cpp-native"
    assert args[args.index("--ctx-size") + 1] == "2048"  # ctx per slot x parallel
    assert args[args.index("--parallel") + 1] == "2"
    assert args[args.index("--n-gpu-layers") + 1] == "7"
    assert args[args.index("--threads") + 1] == "3"
    assert args[args.index("--port") + 1] == "8080"
    assert args[-4:] == ["--flash-attn", "on", "--log-prefix", "a;b"]
    # the user's environment is in a 0600 file the unit names, never in the unit itself
    assert "GGML_CUDA_NO_PINNED" not in unit.text
    assert "EnvironmentFile=/state/env/diversityd-native.env" in unit.text
    assert unit.env_file == "/state/env/diversityd-native.env"
    assert unit.env_text == "GGML_CUDA_NO_PINNED='1'\n"
    assert "Restart=on-failure" in unit.text


def test_llama_cpp_python_unit_uses_the_shared_libraries() -> None:
    unit = rendered()["python"]
    exec_line = next(line for line in unit.text.splitlines() if line.startswith("ExecStart="))
    args = systemd_unquote(exec_line.removeprefix("ExecStart="))
    assert args[:3] == ["/venv/bin/python", "-m", "llama_cpp.server"]
    assert args[args.index("--model_alias") + 1] == "llama-cpp-default"
    assert args[args.index("--n_ctx") + 1] == "4096"
    assert 'Environment="LLAMA_CPP_LIB_PATH=/cache/lib"' in unit.text
    # its default interrupts a running stream when another request arrives
    assert args[args.index("--interrupt_requests") + 1] == "False"


def test_ollama_and_vllm_units() -> None:
    units = rendered()
    ollama = units["ollama"].text
    assert "ExecStart=/usr/local/bin/ollama serve" in ollama
    assert "Environment=OLLAMA_HOST=127.0.0.1:11434" in ollama
    assert 'Environment="OLLAMA_NUM_PARALLEL=4"' in ollama
    vllm_exec = next(
        line for line in units["vllm"].text.splitlines() if line.startswith("ExecStart=")
    )
    args = systemd_unquote(vllm_exec.removeprefix("ExecStart="))
    assert args[:3] == ["/usr/local/bin/vllm", "serve", "Qwen/Qwen2.5-Coder-7B-Instruct-AWQ"]
    # the name the gateway asks vLLM for: the entry's `model:`
    assert args[args.index("--served-model-name") + 1] == "Qwen/Qwen2.5-Coder-7B-Instruct-AWQ"
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.35"
    assert args[args.index("--max-model-len") + 1] == "8192"


def test_daemon_unit_is_notify_with_watchdog() -> None:
    unit = render_daemon_unit("/cfg dir", context())
    assert "Type=notify" in unit.text
    assert "WatchdogSec=" in unit.text
    assert "Restart=on-failure" in unit.text
    assert 'ExecStart=/venv/bin/python -m diversityd.daemon --config-dir "/cfg dir"' in unit.text
    assert "ExecReload=" in unit.text


def test_unit_names_are_valid_for_any_provider_name() -> None:
    assert unit_name("vllm-qwen") == "diversityd-vllm-qwen.service"
    assert unit_name("a/b c") == "diversityd-a-b-c.service"


def test_sync_writes_only_changes_and_never_foreign_files(tmp_path: pytest.TempPathFactory) -> None:
    from pathlib import Path

    unit_dir = Path(str(tmp_path))
    units = list(rendered().values())
    first = sync_units(unit_dir, units)
    assert sorted(first.written) == sorted(u.name for u in units)
    assert not sync_units(unit_dir, units).changed  # nothing differs: no daemon-reload
    foreign = unit_dir / units[0].name
    foreign.write_text("[Service]\nExecStart=/bin/true\n")  # the user's own file, no marker
    second = sync_units(unit_dir, units)
    assert second.foreign == [units[0].name]
    assert foreign.read_text() == "[Service]\nExecStart=/bin/true\n"
    edited = unit_dir / units[1].name
    edited.write_text(edited.read_text() + "# edited\n")
    third = sync_units(unit_dir, units, previous={u.name: u.text for u in units})
    assert third.restored == [units[1].name]
    assert edited.read_text() == units[1].text
    assert (edited.stat().st_mode & 0o777) == 0o644


def test_the_executable_path_is_never_variable_expanded() -> None:
    """systemd expands `$VAR` in arguments only: `$$` in the path would stay `$$`."""
    assert command_line(["/x $y/bin", "$y"]) == '"/x $y/bin" $$y'


def test_a_cpu_plan_hides_the_gpu_and_the_plan_sets_vllms_share() -> None:
    config, _ = parse_config(
        {"providers.yaml": PROVIDERS, "model-mappings.yaml": "{}\n", "diversityd.yaml": SETTINGS},
        config_dir="/cfg",
        hostname="box",
    )
    assert config is not None
    catalog = build_catalog(config)
    native = config.settings.owned["native"]
    hidden = render_provider_unit(
        config,
        native,
        catalog.backend_names_of("native"),
        GpuSettings("native", n_gpu_layers=0, hide_gpu=True, server="llama-server", gpu=0),
        context(),
    )
    assert 'Environment="CUDA_VISIBLE_DEVICES="' in hidden.text
    assert "--n-gpu-layers 0" in hidden.text
    vllm = render_provider_unit(
        config,
        config.settings.owned["vllm"],
        catalog.backend_names_of("vllm"),
        GpuSettings(
            "vllm", n_gpu_layers=None, hide_gpu=False, gpu_memory_utilization=0.21, server="vllm"
        ),
        context(),
    )
    assert "--gpu-memory-utilization 0.21" in vllm.text
    assert 'Environment="CUDA_VISIBLE_DEVICES=0"' in vllm.text
    ollama = render_provider_unit(
        config,
        config.settings.owned["ollama"],
        catalog.backend_names_of("ollama"),
        GpuSettings(
            "ollama",
            n_gpu_layers=None,
            hide_gpu=False,
            ollama_gpu_overhead_bytes=3 << 30,
            server="ollama",
        ),
        context(),
    )
    assert f'Environment="OLLAMA_GPU_OVERHEAD={3 << 30}"' in ollama.text


def test_environment_files_keep_values_as_they_are() -> None:
    text = env_file_text({"TOKEN": "hf_abc $HOME 100%", "Q": 'it\'s "x" \\ $Y'})
    assert text == 'Q="it\'s \\"x\\" \\\\ \\$Y"\nTOKEN=\'hf_abc $HOME 100%\'\n'
    for evil in ("x\nExecStartPre=/bin/evil", "x\rExecStartPre=/bin/evil", "x\x00y"):
        with pytest.raises(UnitRenderError, match="control character"):
            env_file_text({"A": evil})


def test_a_newline_in_a_name_never_reaches_a_directive() -> None:
    config, _ = parse_config(
        {
            "providers.yaml": PROVIDERS,
            "model-mappings.yaml": "fallback_chains: {}\n",
            "diversityd.yaml": SETTINGS,
        },
        config_dir="/cfg",
        hostname="box",
    )
    assert config is not None
    owned = config.settings.owned["native"]
    with pytest.raises(UnitRenderError, match="model name"):  # issue 19: refused, not mended
        render_provider_unit(
            config,
            owned,
            ["bad\nExecStartPre=/x"],
            GpuSettings("native", n_gpu_layers=0, hide_gpu=True, server=owned.server, gpu=None),
            context(),
        )


def exec_args(unit: RenderedUnit) -> list[str]:
    line = next(line for line in unit.text.splitlines() if line.startswith("ExecStart="))
    return systemd_unquote(line.removeprefix("ExecStart="))


def rendered_at(log_level: str, launcher: str = "") -> dict[str, RenderedUnit]:
    settings = SETTINGS
    for name in ("native", "python", "ollama", "vllm"):
        settings = settings.replace(f"  {name}:\n", f"  {name}:\n    log_level: {log_level}\n")
    config, findings = parse_config(
        {
            "providers.yaml": PROVIDERS,
            "model-mappings.yaml": "fallback_chains: {}\n",
            "diversityd.yaml": settings,
        },
        config_dir="/cfg",
        hostname="box",
    )
    assert config is not None, findings
    catalog = build_catalog(config)
    machine = dataclasses.replace(context(), llama_python_launcher=launcher)
    return {
        name: render_provider_unit(
            config, owned, catalog.backend_names_of(name),
            GpuSettings(name, n_gpu_layers=7, hide_gpu=False, server=owned.server, gpu=0),
            machine,
        )
        for name, owned in config.settings.owned.items()
    }  # fmt: skip


def test_servers_log_at_the_level_chosen_warning_by_default() -> None:
    """Issue 13: llama-server's per-request timing lines at info only; no access log line
    per probe from llama-cpp-python or vLLM below debug."""
    quiet, chatty = rendered(), rendered_at("info")
    verbosity = {"error": "1", "warning": "2", "info": "3", "debug": "5"}
    for level, expected in verbosity.items():
        native = exec_args(rendered_at(level)["native"])
        assert native[native.index("--log-verbosity") + 1] == expected
    native = exec_args(quiet["native"])
    assert native[native.index("--log-verbosity") + 1] == "2"  # the default: warning
    python = exec_args(quiet["python"])
    assert python[python.index("--verbose") + 1] == "False"
    assert exec_args(chatty["python"])[exec_args(chatty["python"]).index("--verbose") + 1] == (
        "True"
    )
    vllm = exec_args(quiet["vllm"])
    assert "--disable-uvicorn-access-log" in vllm
    assert "--disable-log-stats" in vllm
    assert "--disable-log-stats" not in exec_args(chatty["vllm"])
    assert "--disable-uvicorn-access-log" not in exec_args(rendered_at("debug")["vllm"])
    assert "OLLAMA_DEBUG" in rendered_at("debug")["ollama"].text
    assert "OLLAMA_DEBUG" not in quiet["ollama"].text


def test_llama_cpp_python_runs_through_the_launcher_when_there_is_one() -> None:
    args = exec_args(rendered_at("info", launcher="/pkg/llamacpplauncher.py")["python"])
    assert args[:4] == ["/venv/bin/python", "/pkg/llamacpplauncher.py", "--log-level", "info"]
    assert args[args.index("--model") + 1] == "/models/active/current.gguf"
    assert model_file_of("\n".join(["ExecStart=" + command_line(args)])) == (
        "/models/active/current.gguf"
    )


def test_an_unknown_log_level_is_refused_naming_the_key() -> None:
    config, findings = parse_config(
        {
            "providers.yaml": PROVIDERS,
            "model-mappings.yaml": "fallback_chains: {}\n",
            "diversityd.yaml": SETTINGS.replace("  native:\n", "  native:\n    log_level: loud\n"),
        },
        config_dir="/cfg",
        hostname="box",
    )
    problem = next(f for f in findings if "log_level" in (f.key_path or ""))
    assert problem.severity == "error"
    assert config is None or "native" not in config.settings.owned
    assert "loud" in problem.message
    assert "info" in (problem.hint or "")


def test_the_daemon_says_when_its_own_unit_is_older_than_this_version(tmp_path: Path) -> None:
    """Issue 13: after a pip/pipx upgrade changed the template, the installed unit is stale
    until `diversityctl install` re-renders it; a current one, or the user's own, is not."""
    current = daemon_unit("/cfg", "/venv/bin/python")
    assert own_unit_staleness(tmp_path, "/cfg", "/venv/bin/python") is None  # none installed
    installed = tmp_path / current.name
    installed.write_text(current.text)
    assert own_unit_staleness(tmp_path, "/cfg", "/venv/bin/python") is None
    installed.write_text(current.text.replace("WatchdogSec=", "# WatchdogSec="))  # older
    stale = own_unit_staleness(tmp_path, "/cfg", "/venv/bin/python")
    assert stale is not None
    assert str(installed) in stale
    assert "diversityctl install" in stale
    installed.write_text("[Service]\nExecStart=/bin/true\n")  # the user's own file
    assert own_unit_staleness(tmp_path, "/cfg", "/venv/bin/python") is None


@pytest.mark.parametrize(
    "evil", ["\rExecStartPre=/bin/evil", "\nExecStartPre=/x", "a\x00b", "\x1b[2J"]
)
def test_no_control_character_reaches_a_command_line_or_an_environment_line(evil: str) -> None:
    """Issue 19: quote_arg escaped `\\n` but not `\\r`, which ends a line for systemd too:
    an executable holding `\\rExecStartPre=...` rendered a second directive."""
    with pytest.raises(UnitRenderError, match="control character"):
        quote_arg(f"/bin/x{evil}", executable=True)
    with pytest.raises(UnitRenderError, match="control character"):
        command_line(["/bin/x", "--model", f"/m{evil}.gguf"])
    with pytest.raises(UnitRenderError, match="control character"):
        environment_line("A", evil)


@pytest.mark.parametrize("prefix", list("-@+!:|"))
def test_an_executable_never_starts_with_an_exec_prefix(prefix: str) -> None:
    with pytest.raises(UnitRenderError, match="prefix"):
        quote_arg(f"{prefix}/bin/sh", executable=True)
    assert systemd_unquote(quote_arg(f"{prefix}x")) == [f"{prefix}x"]  # an argument may


def test_the_gateway_units_refuse_control_characters_in_their_paths() -> None:
    from diversityd.config import GatewaySettings
    from diversityd.units import GatewayPaths, render_gateway_units

    paths = GatewayPaths("/s/gw", "/s/master.key", ("~/cloud.env",), "/venv/bin/python", "/l.py")
    assert render_gateway_units(GatewaySettings(), paths, context(), 5.0)
    for evil in (
        dataclasses.replace(paths, environment_files=("~/c.env\rExecStartPre=/x",)),
        dataclasses.replace(paths, key_file="/k\nExecStartPre=/x"),
        dataclasses.replace(paths, litellm_python="/v\r/bin/python"),
    ):
        with pytest.raises(UnitRenderError):
            render_gateway_units(GatewaySettings(), evil, context(), 5.0)
    for host in ("127.0.0.1\nListenStream=0.0.0.0:22", "/run/x.sock", "localhost"):
        with pytest.raises(UnitRenderError):
            render_gateway_units(GatewaySettings(host=host), paths, context(), 5.0)
