"""Adopting hand-made units: the seeds' units parsed, secrets split out, a proposal for the
user's three hand-made units (+ Ollama's system service), the GPU layers shown, not copied."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from diversityd.adoption import (
    ADOPTED_DROP_IN,
    GATEWAY,
    OWN,
    SKIP,
    WATCH,
    ProposalInputs,
    ProviderAddress,
    propose,
    render_settings,
)
from diversityd.config import parse_config
from diversityd.foreignunits import (
    FoundServer,
    UnitText,
    expand_specifiers,
    find_server,
    is_own_unit,
    is_secret,
    parse_environment_file,
    unit_lines,
)
from diversityd.validation import validate
from tests.conftest import REPO_ROOT

HOME = "/home/miko"
SPECIFIERS = {"h": HOME, "u": "miko", "E": f"{HOME}/.config"}
MASTER_KEY = "sk-litellm-0123456789abcdefghij"
HF_TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345"
OPENAI_KEY = "sk-proj-zyxwvutsrqponmlkjihgfedcba9876"

# The seeds' own llama-cpp-native.service (004, "Service Configuration"), whole.
NATIVE = textwrap.dedent(
    """\
    [Unit]
    Description=llama.cpp native server (llama-server)
    After=network.target

    [Service]
    Type=simple
    ExecStart=/home/miko/LAB/ai/services/openwebui/backends/llama.cpp/build/bin/llama-server \\
        --model /home/miko/LAB/models/gguf/active/current.gguf \\
        --host 0.0.0.0 \\
        --port 8080 \\
        --ctx-size 4096 \\
        --n-gpu-layers 40 \\
        --threads 12 \\
        --parallel 2
    Restart=always

    [Install]
    WantedBy=default.target
    """
)
# llamacpp-python.service on :8000 as the seeds describe it (n_gpu_layers -1, 8192 tokens).
PYTHON = textwrap.dedent(
    f"""\
    [Unit]
    Description=llama-cpp-python server

    [Service]
    WorkingDirectory=%h/LAB/ai-backend-unified
    Environment=CUDA_VISIBLE_DEVICES=0 "HF_TOKEN={HF_TOKEN}"
    Environment=LLAMA_CPP_LIB_PATH=%h/LAB/llama.cpp/build/bin
    ExecStart=%h/LAB/venvs/llama/bin/python3 -m llama_cpp.server \\
        --model %h/LAB/models/gguf/active/current.gguf \\
        --model_alias llama-cpp-default \\
        --host 127.0.0.1 --port 8000 \\
        --n_ctx=8192 --n_gpu_layers -1 --n_threads 12 --chat_format llama-3
    Restart=on-failure

    [Install]
    WantedBy=default.target
    """
)
# litellm.service on :4000, the key in the unit, the config they generated.
LITELLM = textwrap.dedent(
    f"""\
    [Unit]
    Description=LiteLLM proxy (routing v1.7.1)

    [Service]
    WorkingDirectory=%h/LAB/ai-backend-unified
    Environment="LITELLM_MASTER_KEY={MASTER_KEY}" "OPENAI_API_KEY={OPENAI_KEY}"
    Environment=LITELLM_LOG=INFO PORT=4000
    ExecStart=/bin/bash -c 'source venv/bin/activate && exec %h/LAB/venvs/litellm/bin/litellm \\
        --config runtime/config/litellm.yaml --port ${{PORT}}'

    [Install]
    WantedBy=default.target
    """
)
# Ollama's install script's system unit.
OLLAMA = textwrap.dedent(
    """\
    [Unit]
    Description=Ollama Service
    After=network-online.target

    [Service]
    ExecStart=/usr/local/bin/ollama serve
    User=ollama
    Group=ollama
    Restart=always
    RestartSec=3
    Environment="PATH=/usr/local/bin:/usr/bin:/bin" "OLLAMA_HOST=0.0.0.0"

    [Install]
    WantedBy=default.target
    """
)
VLLM = textwrap.dedent(
    """\
    [Service]
    Environment=VLLM_API_KEY=token-abc123def456ghi789jkl012mno345
    ExecStart=/home/miko/.local/bin/vllm serve Qwen/Qwen2.5-Coder-7B-Instruct-AWQ \\
      --port 8001 --max-model-len 8192 --max_num_seqs 4 --gpu-memory-utilization 0.35
    """
)


def found(name: str, text: str, scope: str = "user", **files: dict[str, str]) -> FoundServer:
    server = find_server(
        UnitText(name, f"{HOME}/.config/systemd/user/{name}", text, scope),
        SPECIFIERS,
        {path.replace("__", "/"): values for path, values in files.items()},
    )
    assert server is not None
    return server


# -- one unit file -> what it runs -------------------------------------------------------


def test_the_seeds_llama_server_unit() -> None:
    server = found("llama-cpp-native.service", NATIVE)
    assert server.kind == "llama-server"
    assert server.executable.endswith("/llama.cpp/build/bin/llama-server")
    assert server.port == 8080
    assert server.host == "0.0.0.0"
    assert server.model_path == "/home/miko/LAB/models/gguf/active/current.gguf"
    # -c is the total over the slots: 4096 tokens for 2 slots is 2048 per slot.
    assert (server.ctx, server.parallel, server.total_ctx) == (2048, 2, 4096)
    assert server.threads == 12
    assert server.n_gpu_layers == "40"
    assert server.extra_args == ()
    assert not server.secrets
    assert not server.problems


def test_the_llama_cpp_python_unit() -> None:
    server = found("llamacpp-python.service", PYTHON)
    assert server.kind == "llama-cpp-python"
    assert server.executable == f"{HOME}/LAB/venvs/llama/bin/python3"
    assert (server.port, server.ctx, server.parallel, server.threads) == (8000, 8192, 1, 12)
    assert server.n_gpu_layers == "-1"
    assert server.alias == "llama-cpp-default"
    assert server.model_path == f"{HOME}/LAB/models/gguf/active/current.gguf"
    assert server.gpu == "0"  # CUDA_VISIBLE_DEVICES becomes `gpu:`, not an env value
    assert server.environment == {"LLAMA_CPP_LIB_PATH": f"{HOME}/LAB/llama.cpp/build/bin"}
    assert server.secrets == {"HF_TOKEN": HF_TOKEN}
    assert server.extra_args == ("--chat_format", "llama-3")


def test_the_litellm_unit_through_a_shell() -> None:
    server = found("litellm.service", LITELLM)
    assert server.kind == "litellm"
    assert server.executable == f"{HOME}/LAB/venvs/litellm/bin/litellm"
    assert server.port == 4000  # ${PORT} from Environment=
    assert server.host is None
    assert server.config_file == f"{HOME}/LAB/ai-backend-unified/runtime/config/litellm.yaml"
    assert server.secrets == {"LITELLM_MASTER_KEY": MASTER_KEY, "OPENAI_API_KEY": OPENAI_KEY}
    assert server.environment == {"LITELLM_LOG": "INFO", "PORT": "4000"}


def test_ollamas_system_unit() -> None:
    server = found("ollama.service", OLLAMA, scope="system")
    assert (server.kind, server.scope, server.port, server.host) == (
        "ollama",
        "system",
        11434,
        "0.0.0.0",
    )
    assert "OLLAMA_HOST" not in server.environment


def test_a_vllm_unit() -> None:
    server = found("vllm.service", VLLM)
    assert server.kind == "vllm"
    assert server.model_path == "Qwen/Qwen2.5-Coder-7B-Instruct-AWQ"
    assert (server.port, server.ctx, server.parallel) == (8001, 8192, 4)  # --max_num_seqs too
    assert server.secrets == {"VLLM_API_KEY": "token-abc123def456ghi789jkl012mno345"}
    assert server.extra_args == ("--gpu-memory-utilization", "0.35")


def test_secret_arguments_move_to_the_environment() -> None:
    text = (
        "[Service]\nExecStart=/opt/llama-server -m /m.gguf --api-key sk-abcdef123456 --port 9000\n"
    )
    server = found("x.service", text)
    assert server.secrets == {"LLAMA_API_KEY": "sk-abcdef123456"}
    assert "sk-abcdef123456" not in " ".join(server.extra_args)
    assert "sk-abcdef123456" not in repr(server)


def test_units_that_run_no_server_are_not_found() -> None:
    for text in (
        "[Service]\nExecStart=/usr/bin/sleep 1000\n",
        "[Unit]\nDescription=no service\n",
        "[Service]\nExecStart=/usr/bin/python3 -m http.server 8000\n",
    ):
        assert find_server(UnitText("x.service", "/x", text), SPECIFIERS) is None


@pytest.mark.parametrize(
    ("exec_start", "port", "kind"),
    [
        ("/usr/bin/env LLAMA_ARG_PORT=9001 /opt/bin/llama-server -m /m.gguf", 9001, "llama-server"),
        ("-/opt/bin/llama-server --port=9002 -m /m.gguf", 9002, "llama-server"),
        ("@/opt/bin/llama-server my-llama --port 9003 -m /m.gguf", 9003, "llama-server"),
        ("/usr/bin/nice -n 5 /opt/bin/llama-server --port 9004 -m /m.gguf", 9004, "llama-server"),
        ("/bin/sh -c 'cd /srv && exec ollama serve'", 11434, "ollama"),
        (
            "/v/bin/python -u -m vllm.entrypoints.openai.api_server --model m --port 9005",
            9005,
            "vllm",
        ),
        ("/v/bin/python -m litellm --config /c.yaml", 4000, "litellm"),
    ],
)
def test_command_lines(exec_start: str, port: int, kind: str) -> None:
    server = found("x.service", f"[Service]\nExecStart={exec_start}\n")
    assert (server.kind, server.port) == (kind, port)


def test_vllm_through_python_is_run_as_vllm_serve() -> None:
    server = found(
        "x.service",
        "[Service]\nExecStart=/v/bin/python -m vllm.entrypoints.openai.api_server --model m\n",
    )
    assert server.executable == "/v/bin/vllm"
    assert server.model_path == "m"


def test_drop_ins_override_and_reset() -> None:
    unit = UnitText(
        "llama.service",
        "/u/llama.service",
        "[Service]\nExecStart=/opt/llama-server --port 8080 -m /a.gguf\nEnvironment=A=1\n",
        drop_ins=(
            (
                "/u/llama.service.d/x.conf",
                "[Service]\nExecStart=\nExecStart=/opt/llama-server --port 8090 -m /b.gguf\n",
            ),
        ),
    )
    server = find_server(unit, SPECIFIERS)
    assert server is not None
    assert (server.port, server.model_path, server.environment) == (8090, "/b.gguf", {"A": "1"})


def test_environment_files_are_read_and_stay_files() -> None:
    text = (
        "[Service]\nEnvironmentFile=-%h/llm.env\n"
        "ExecStart=/opt/llama-server -m $MODEL --port ${PORT}\n"
    )
    server = found(
        "x.service",
        text,
        **{"__home__miko__llm.env": {"MODEL": "/m.gguf", "PORT": "8123", "TOKEN": "t"}},
    )
    assert (server.model_path, server.port) == ("/m.gguf", 8123)
    assert server.environment_files == ("-/home/miko/llm.env",)
    assert not server.secrets  # TOKEN stays in its file, which the adopted unit names


def test_unit_file_syntax() -> None:
    text = "[Service]\n# comment\nExecStart=/a \\\n# inside\n  b \\\n  c\n; other\nUser=x\n"
    assert list(unit_lines(text)) == [("Service", "ExecStart", "/a b c"), ("Service", "User", "x")]
    assert expand_specifiers("%h/x%%y%z", {"h": "/home/u"}) == "/home/u/x%y%z"
    assert parse_environment_file("# c\nexport A='1 2'\nB=\"x=y\"\nnot a line\n") == {
        "A": "1 2",
        "B": "x=y",
    }


def test_diversityds_own_units_are_never_adopted() -> None:
    assert is_own_unit("diversityd.service", "")
    assert is_own_unit("diversityd-native.service", "")
    assert is_own_unit("mine.service", "# diversityd:owned native\n")
    assert not is_own_unit("llama-cpp-native.service", NATIVE)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OPENAI_API_KEY", "x"),
        ("HF_TOKEN", "abc"),
        ("DB_PASSWORD", "hunter2"),
        ("CLIENT_SECRET", "s"),
        ("ANYTHING", "sk-abc"),
        ("ANYTHING", "hf_abcdef"),
        ("DATABASE_URL", "postgres://user:pw@db:5432/x"),
        ("ANYTHING", "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZg"),
    ],
)
def test_secret_looking_values(name: str, value: str) -> None:
    assert is_secret(name, value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CUDA_VISIBLE_DEVICES", "0"),
        ("OLLAMA_KEEP_ALIVE", "24h"),
        ("LLAMA_CPP_LIB_PATH", "/home/miko/LAB/llama.cpp/build/bin/with/a/very/long/path"),
        ("LITELLM_LOG", "INFO"),
        ("DATABASE_URL", "postgres://db:5432/x"),
        ("HF_TOKEN", ""),
    ],
)
def test_plain_values(name: str, value: str) -> None:
    assert not is_secret(name, value)


# -- the proposal --------------------------------------------------------------------------

PROVIDERS = [
    ProviderAddress("ollama", "ollama", "127.0.0.1", 11434),
    ProviderAddress("ollama_cloud", "ollama", "127.0.0.1", 11434),
    ProviderAddress("llama_cpp_python", "llama_cpp", "127.0.0.1", 8000),
    ProviderAddress("llama_cpp_native", "llama_cpp", "127.0.0.1", 8080),
    ProviderAddress("vllm", "vllm", "127.0.0.1", 8001),
]
LITELLM_CONFIG = {
    "model_list": [
        {"model_name": "llama-cpp-native", "litellm_params": {"model": "openai/x"}},
        {"model_name": "an-old-model", "litellm_params": {"model": "openai/y"}},
    ],
    "litellm_settings": {"cache": True, "cache_params": {"type": "redis", "password": "pw123"}},
    "router_settings": {"redis_host": "127.0.0.1", "fallbacks": [{"a": ["b"]}]},
    "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
}
CONFIG_DIR = f"{HOME}/.config/diversityd"


def seeds_found() -> list[FoundServer]:
    return [
        found("llama-cpp-native.service", NATIVE),
        found("llamacpp-python.service", PYTHON),
        found("litellm.service", LITELLM),
        found("ollama.service", OLLAMA, scope="system"),
    ]


def inputs(**changes: object) -> ProposalInputs:
    values: dict[str, object] = {
        "config_dir": CONFIG_DIR,
        "home": HOME,
        "litellm_venvs": {"litellm.service": f"{HOME}/LAB/venvs/litellm"},
        "litellm_configs": {
            f"{HOME}/LAB/ai-backend-unified/runtime/config/litellm.yaml": LITELLM_CONFIG
        },
        "served_models": frozenset({"llama-cpp-native", "llama-cpp-default"}),
    }
    values.update(changes)
    return ProposalInputs(**values)  # type: ignore[arg-type]


def by_unit(proposal_adoptions: tuple[object, ...]) -> dict[str, object]:
    return {a.found.unit: a for a in proposal_adoptions}  # type: ignore[attr-defined]


def test_proposal_for_the_three_hand_made_units_and_ollama() -> None:
    proposal = propose(seeds_found(), PROVIDERS, inputs())
    adoptions = {a.found.unit: a for a in proposal.adoptions}
    native = adoptions["llama-cpp-native.service"]
    assert (native.action, native.provider, native.new_unit) == (
        OWN,
        "llama_cpp_native",
        "diversityd-llama_cpp_native.service",
    )
    assert native.entry == {
        "server": "llama-server",
        "executable": f"{HOME}/LAB/ai/services/openwebui/backends/llama.cpp/build/bin/llama-server",
        "model_path": "/home/miko/LAB/models/gguf/active/current.gguf",
        "ctx": 2048,
        "parallel": 2,
        "threads": 12,
        "n_gpu_layers": "auto",  # the unit's 40 is shown beside it, not copied
    }
    assert any("0.0.0.0" in note for note in native.notes)
    python = adoptions["llamacpp-python.service"]
    assert python.action == OWN
    assert python.entry["gpu"] == 0
    assert python.entry["environment"] == {"LLAMA_CPP_LIB_PATH": f"{HOME}/LAB/llama.cpp/build/bin"}
    assert python.entry["extra_args"] == ["--chat_format", "llama-3"]
    gateway = adoptions["litellm.service"]
    assert gateway.action == GATEWAY
    assert gateway.takes_over
    ollama = adoptions["ollama.service"]
    assert ollama.action == WATCH
    assert not ollama.takes_over
    assert [a.found.unit for a in proposal.taking_over] == [
        "litellm.service",
        "llama-cpp-native.service",
        "llamacpp-python.service",
    ]

    settings = proposal.settings
    assert settings["providers"]["ollama"] == {"owned": False}
    assert settings["providers"]["ollama_cloud"] == {"owned": False}
    assert settings["gateway"]["port"] == 4000
    assert settings["gateway"]["litellm_venv"] == f"{HOME}/LAB/venvs/litellm"
    assert settings["gateway"]["master_key_file"] == f"{CONFIG_DIR}/master.key"
    assert settings["gateway"]["environment_files"] == [f"{CONFIG_DIR}/env/litellm.env"]
    assert settings["gateway"]["router_settings"] == {"redis_host": "127.0.0.1"}
    assert settings["gateway"]["litellm_settings"] == {
        "cache": True,
        "cache_params": {"type": "redis"},
    }
    assert any("an-old-model" in note for note in gateway.notes)
    assert any("password" in note for note in gateway.notes)
    assert proposal.changed


def test_secrets_go_to_0600_files_never_into_yaml_or_units() -> None:
    proposal = propose(seeds_found(), PROVIDERS, inputs())
    text = render_settings(proposal.settings)
    files = {s.path: s for s in proposal.secret_files}
    for secret in (MASTER_KEY, HF_TOKEN, OPENAI_KEY):
        assert secret not in text
        assert all(secret not in d.text for d in proposal.drop_ins)
        assert secret not in repr(proposal.adoptions)
        assert secret not in repr(proposal.secret_files)
    key_file = files[f"{CONFIG_DIR}/master.key"]
    assert key_file.text == f"{MASTER_KEY}\n"  # bare: a scraper's credentials_file too
    gateway_env = files[f"{CONFIG_DIR}/env/litellm.env"]
    assert gateway_env.names == ("LITELLM_LOG", "OPENAI_API_KEY", "PORT")
    assert f'OPENAI_API_KEY="{OPENAI_KEY}"' in gateway_env.text
    assert "LITELLM_MASTER_KEY" not in gateway_env.text
    python_env = files[f"{CONFIG_DIR}/env/llamacpp-python.env"]
    assert python_env.names == ("HF_TOKEN",)
    (drop_in,) = proposal.drop_ins
    assert (drop_in.unit, drop_in.name) == ("diversityd-llama_cpp_python.service", ADOPTED_DROP_IN)
    assert f"EnvironmentFile={CONFIG_DIR}/env/llamacpp-python.env" in drop_in.text


def test_gpu_layers_are_copied_only_when_asked() -> None:
    proposal = propose(seeds_found(), PROVIDERS, inputs(keep_gpu_layers=True))
    owned = proposal.settings["providers"]
    assert owned["llama_cpp_native"]["n_gpu_layers"] == 40
    assert owned["llama_cpp_python"]["n_gpu_layers"] == -1


def test_the_proposal_is_a_valid_diversityd_yaml() -> None:
    proposal = propose(seeds_found(), PROVIDERS, inputs())
    texts = {
        "providers.yaml": (REPO_ROOT / "config" / "providers.yaml").read_text(),
        "model-mappings.yaml": (REPO_ROOT / "config" / "model-mappings.yaml").read_text(),
        "diversityd.yaml": render_settings(proposal.settings),
    }
    config, findings = parse_config(texts, config_dir=CONFIG_DIR, hostname="h")
    report = validate(config, findings, {"OPENAI_API_KEY": "x"})
    assert report.ok, [f.format() for f in report.findings]
    assert config is not None
    assert set(config.settings.owned) == {"llama_cpp_native", "llama_cpp_python"}
    assert config.settings.owned["llama_cpp_native"].n_gpu_layers is None  # auto


def test_an_existing_diversityd_yaml_is_kept_and_differences_shown() -> None:
    existing = yaml.safe_load((REPO_ROOT / "config" / "diversityd.yaml").read_text())
    proposal = propose(seeds_found(), PROVIDERS, inputs(existing_settings=existing))
    adoptions = {a.found.unit: a for a in proposal.adoptions}
    native = adoptions["llama-cpp-native.service"]
    assert native.action == OWN
    assert native.kept_existing
    assert native.entry == existing["providers"]["llama_cpp_native"]
    assert any("ctx: 4096" in note and "2048" in note for note in native.notes)
    assert (
        proposal.settings["providers"]["llama_cpp_native"]
        == existing["providers"]["llama_cpp_native"]
    )
    # The example names ~/.config/diversityd/master.key: the old key goes there.
    assert proposal.settings["gateway"]["master_key_file"] == "~/.config/diversityd/master.key"
    # Its own gateway sections win over the LiteLLM config's.
    assert proposal.settings["gateway"]["router_settings"] == existing["gateway"]["router_settings"]


def test_an_existing_key_file_is_kept() -> None:
    existing = {"gateway": {"master_key_file": "~/keys/gw.key"}}
    proposal = propose(
        seeds_found(),
        PROVIDERS,
        inputs(existing_settings=existing, present_files=frozenset({f"{HOME}/keys/gw.key"})),
    )
    assert all(not s.path.endswith(".key") for s in proposal.secret_files)
    gateway = next(a for a in proposal.adoptions if a.action == GATEWAY)
    assert any("~/keys/gw.key" in note and "exists" in note for note in gateway.notes)


def test_a_unit_no_provider_matches_is_left_alone_with_a_snippet() -> None:
    other = found(
        "my-llama.service",
        "[Service]\nExecStart=/opt/llama-server -m /m.gguf --port 9999 -a mine\n",
    )
    proposal = propose([other], PROVIDERS, inputs())
    (adoption,) = proposal.adoptions
    assert adoption.action == SKIP
    assert not adoption.takes_over
    assert adoption.reason is not None
    assert "base_url: 'http://127.0.0.1:9999'" in adoption.reason
    assert "models: [mine]" in adoption.reason
    assert not proposal.changed


def test_a_watched_provider_in_diversityd_yaml_is_not_taken_over() -> None:
    existing = {"providers": {"llama_cpp_native": {"owned": False}}}
    proposal = propose(seeds_found()[:1], PROVIDERS, inputs(existing_settings=existing))
    (adoption,) = proposal.adoptions
    assert adoption.action == SKIP
    assert "owned: false" in (adoption.reason or "")


def test_a_hugging_face_model_cannot_be_owned_as_it_is() -> None:
    hf = found("hf.service", "[Service]\nExecStart=/opt/llama-server -hf org/repo --port 8080\n")
    (adoption,) = propose([hf], PROVIDERS, inputs()).adoptions
    assert adoption.action == SKIP
    assert "Hugging Face" in (adoption.reason or "")


def test_proposing_again_over_its_own_result_changes_nothing() -> None:
    first = propose(seeds_found(), PROVIDERS, inputs())
    again = propose(
        seeds_found(),
        PROVIDERS,
        inputs(
            existing_settings=yaml.safe_load(render_settings(first.settings)),
            present_files=frozenset({f"{CONFIG_DIR}/master.key"}),
        ),
    )
    assert not again.changed
    assert all(a.kept_existing for a in again.adoptions if a.action == OWN)
    assert {s.path for s in again.secret_files} == {
        f"{CONFIG_DIR}/env/litellm.env",
        f"{CONFIG_DIR}/env/llamacpp-python.env",
    }


@pytest.mark.parametrize(
    ("host", "proposed"), [("localhost", None), ("192.168.1.5", "192.168.1.5")]
)
def test_the_gateway_host_proposed_is_an_address_the_socket_takes(
    host: str, proposed: str | None
) -> None:
    """Issue 19: gateway.host goes into ListenStream=, which resolves no names; validate now
    refuses `localhost` there, so adoption must not propose it."""
    unit = LITELLM.replace("--port ${PORT}", f"--host {host} --port ${{PORT}}")
    servers = [found("litellm.service", unit)]
    proposal = propose(servers, PROVIDERS, inputs())
    assert proposal.settings["gateway"].get("host") == proposed


# -- issue 20, point 6: as systemd reads units --------------------------------------------


def test_prefixes_and_escapes_as_systemd_reads_them() -> None:
    """`@-/usr/bin/llama-server` kept a `-` in the program, `my\\x20model.gguf` became
    `myx20model.gguf` (shlex's escapes, not systemd's)."""
    server = found(
        "x.service",
        "[Service]\n"
        "ExecStart=@-/usr/bin/llama-server llama-server -m /m/my\\x20model.gguf --port 9010\n",
    )
    assert server.executable == "/usr/bin/llama-server"
    assert server.model_path == "/m/my model.gguf"
    assert server.port == 9010
    quoted = found(
        "y.service",
        '[Service]\nEnvironment="MODEL=/m/a b.gguf" PORT=9011\n'
        'ExecStart=:+"/opt/llama cpp/llama-server" -m ${MODEL} --port $PORT\n',
    )
    # `:` says: no $ expansion (systemd passes `${MODEL}` on as it is)
    assert quoted.executable == "/opt/llama cpp/llama-server"
    assert quoted.model_path == "${MODEL}"
    assert quoted.problems  # `$PORT` is no port


def test_the_manager_parse_wins_over_the_file() -> None:
    """Where the user manager has the unit loaded, its own ExecStartEx and Environment (all
    drop-ins merged, every escape systemd knows) are what is read."""
    from diversityd.execline import ExecCommand
    from diversityd.foreignunits import LoadedUnit

    unit = UnitText("x.service", "/u/x.service", "[Service]\nExecStart=/opt/llama-server -m a\n")
    loaded = LoadedUnit(
        commands=(
            ExecCommand("/opt/bin/llama-server", ("llama", "--port", "9012", "-m", "/m/b.gguf")),
        ),
        environment=("LLAMA_ARG_CTX_SIZE=2048",),
    )
    server = find_server(unit, SPECIFIERS, None, loaded)
    assert server is not None
    assert (server.executable, server.port, server.model_path) == (
        "/opt/bin/llama-server",
        9012,
        "/m/b.gguf",
    )
    assert server.total_ctx == 2048
    assert server.read_by_systemd


def test_of_two_units_on_one_port_the_running_one_is_adopted() -> None:
    old = found("a-old-llama.service", "[Service]\nExecStart=/opt/llama-server --port 8080 -m /m\n")
    new = found("z-llama.service", "[Service]\nExecStart=/opt/llama-server --port 8080 -m /n\n")
    proposal = propose([old, new], PROVIDERS, inputs(running_units=frozenset({"z-llama.service"})))
    by_unit = {a.found.unit: a for a in proposal.adoptions}
    assert by_unit["z-llama.service"].action == "own"
    assert by_unit["a-old-llama.service"].action == "skip"
    assert "z-llama.service (running) serves :8080 too" in (
        by_unit["a-old-llama.service"].reason or ""
    )
    assert [a.found.unit for a in proposal.taking_over] == ["z-llama.service"]


def test_starting_files_from_the_units_found() -> None:
    """Point 7: with no providers.yaml yet, what install found is where to start from: a
    provider per port, the running unit's where two share one; they validate."""
    from diversityd.adoption import starting_files

    servers = [
        found("llama-cpp-native.service", NATIVE),
        found("llamacpp-python.service", PYTHON),
        found("old.service", "[Service]\nExecStart=/opt/llama-server --port 8080 -m /x\n"),
    ]
    files = starting_files(servers, frozenset({"llama-cpp-native.service"}))
    providers = yaml.safe_load(files.providers)["providers"]
    assert set(providers) == {"llama_cpp_native", "llamacpp_python"}
    assert providers["llama_cpp_native"]["base_url"] == "http://127.0.0.1:8080"
    config, findings = parse_config(
        {"providers.yaml": files.providers, "model-mappings.yaml": files.mappings},
        config_dir=CONFIG_DIR,
        hostname="box",
    )
    report = validate(config, findings, {})
    assert report.ok, [f.format() for f in report.findings]
