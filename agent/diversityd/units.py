"""Owned providers -> the text of their systemd user units. Pure.

Templates (units/*.service.in) hold `@NAME@` placeholders, so systemd's own `$VAR` and `%x`
syntax never collides with ours. Every value is escaped for systemd: `%` (specifiers) always,
`$` (variable expansion) in command lines, and arguments with spaces or quotes are quoted.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from diversityd.config import Config, GatewaySettings, OwnedServer, Provider
from diversityd.errors import DiversitydError
from diversityd.gpuplan import GpuSettings

UNIT_PREFIX = "diversityd-"
DAEMON_UNIT = "diversityd.service"
GATEWAY_SOCKET = "diversityd-gateway.socket"
GATEWAY_TEMPLATE = "diversityd-gateway@.service"
GATEWAY_COLORS = ("blue", "green")  # two instances take turns on the one socket
_INSTANCE = "@@INSTANCE@@"  # stands for systemd's %i until the line is quoted
MARKER = "# diversityd:owned"
HEADER_TEMPLATE = (
    MARKER + " {provider}\n"
    "# Written by diversityd; changes to this file are put back. To change this unit, add a\n"
    "# drop-in: {unit}.d/override.conf (yours; diversityd never touches it).\n"
)
TEMPLATE_OF_SERVER = {
    "llama-server": "llama-server.service.in",
    "llama-cpp-python": "llama-cpp-python.service.in",
    "ollama": "ollama.service.in",
    "vllm": "vllm.service.in",
}
_UNIT_NAME_CHARS = re.compile(r"[^A-Za-z0-9:_.\-]")
_NEEDS_QUOTES = re.compile(r"[\s\"'\\;]")
# Characters no value may carry into a unit, an environment or a socket file: systemd ends
# a line at `\n` and at `\r`, a NUL cuts it, an escape sequence rewrites a terminal that
# shows it. A tab is kept: inside quotes systemd reads it as it is.
UNSAFE_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# ExecStart='s first word may begin with prefixes that change how systemd runs it
# (`-` ignores a failure, `@` sets argv[0], `+`/`!` drop the sandbox, `:` no expansion).
EXEC_PREFIXES = "-@+!:|"


class UnitRenderError(DiversitydError, ValueError):
    """A value that cannot be written into a unit safely. Validation refuses such values
    first (naming file and key); this is the second line of defence."""

    exit_code = 2


def refuse_unsafe(text: str, what: str) -> str:
    """`text` as it is, or UnitRenderError naming `what` (never the value: it may be a
    secret)."""
    found = UNSAFE_CHARACTERS.search(text)
    if found:
        raise UnitRenderError(
            f"{what} holds the control character {found.group()!r}: in a unit file it "
            "would end the line (and start a directive of its own)",
            hint="run `diversityctl validate`: it names the key to fix",
        )
    return text


@dataclass(frozen=True)
class UnitContext:
    """What the machine provides to rendering (read by adapters, passed in)."""

    home: str
    templates: Mapping[str, str]  # template file name -> text
    default_llama_server: str
    default_llama_python: str
    llama_lib_dir: str  # the shared llama.cpp libraries llama-cpp-python loads
    python: str  # diversityd's own interpreter (for diversityd.service)
    # where each unit's `environment:` from diversityd.yaml is written, mode 0600: values
    # there may be secrets, and unit files are world-readable
    env_dir: str = ""
    # runs llama-cpp-python's server at a log level (its own `-m llama_cpp.server` logs
    # every request); empty: the plain module, as a hand-made unit runs it
    llama_python_launcher: str = ""


# llama-server's --log-verbosity for each log_level (3, its default, prints the timings
# of every request)
LLAMA_SERVER_VERBOSITY = {"error": 1, "warning": 2, "info": 3, "debug": 5}


@dataclass(frozen=True)
class RenderedUnit:
    name: str
    provider: str | None  # None for diversityd's own units (the daemon, the gateway)
    text: str
    env_file: str | None = None  # the user's environment for it, written 0600 ...
    env_text: str | None = None  # ... with this text (EnvironmentFile= names it)


def env_file_text(environment: Mapping[str, str]) -> str:
    """An EnvironmentFile= for systemd: single quotes keep a value as it is; a value with a
    single quote is double-quoted with `\\`, `"`, `$` and `` ` `` escaped. A newline cannot
    be written (it would end the assignment): refused."""
    lines = []
    for name, value in sorted(environment.items()):
        refuse_unsafe(value, f"the value of environment {name}")
        if "'" not in value:
            lines.append(f"{name}='{value}'")
        else:
            escaped = "".join(f"\\{c}" if c in '\\"$`' else c for c in value)
            lines.append(f'{name}="{escaped}"')
    return "".join(f"{line}\n" for line in lines)


def unit_name(provider: str) -> str:
    return f"{UNIT_PREFIX}{_UNIT_NAME_CHARS.sub('-', provider)}.service"


def quote_arg(arg: str, *, executable: bool = False) -> str:
    """One ExecStart= word: specifiers (and, in arguments, variables) escaped, quoted when
    needed. systemd expands `$VAR` in the arguments but never in the executable's path, so
    `$` is doubled only in arguments (checked against systemd 252)."""
    refuse_unsafe(arg, "the executable" if executable else "a command-line argument")
    if executable and arg.startswith(tuple(EXEC_PREFIXES)):
        raise UnitRenderError(
            f"the executable begins with {arg[0]!r}, which systemd reads as a prefix of "
            "ExecStart=, not as part of the path",
            hint="name the executable by its absolute path",
        )
    escaped = arg.replace("%", "%%")
    if not executable:
        escaped = escaped.replace("$", "$$")
    if escaped and not _NEEDS_QUOTES.search(escaped):
        return escaped
    inner = escaped.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{inner}"'


def command_line(args: Sequence[str]) -> str:
    return " ".join(quote_arg(arg, executable=index == 0) for index, arg in enumerate(args))


def environment_line(name: str, value: str) -> str:
    """`Environment="NAME=value"`: no `$` expansion happens here, but specifiers do."""
    refuse_unsafe(f"{name}={value}", f"the environment entry {name}")
    text = f"{name}={value}".replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'Environment="{text}"'


def expand_home(path: str, home: str) -> str:
    if path == "~":
        return home
    if path.startswith("~/"):
        return str(PurePosixPath(home) / path[2:])
    return path


def served_model_name(provider: Provider, backend_names: Sequence[str]) -> str:
    """The one name an owned server answers to (--alias, --model_alias, --served-model-name):
    the name the gateway asks it for (an entry's `model:`, else its name). Validation makes
    sure an owned llama server has exactly one."""
    return backend_names[0] if backend_names else provider.name


def server_arguments(
    owned: OwnedServer,
    provider: Provider,
    model_name: str,
    gpu: GpuSettings,
    context: UnitContext,
    *,
    model_file: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one owned server, with the GPU plan's part.
    `model_file`: the GGUF the model path led to when last checked (else the path)."""
    n_gpu_layers = gpu.n_gpu_layers if gpu.n_gpu_layers is not None else 0
    host, port = provider.address
    model_path = model_file or expand_home(owned.model_path or "", context.home)
    total_ctx = owned.ctx * owned.parallel
    environment: dict[str, str] = {}
    if owned.server == "llama-server":
        binary = expand_home(owned.executable or context.default_llama_server, context.home)
        args = [
            binary,
            "--model", model_path,
            "--alias", model_name,
            "--host", host,
            "--port", str(port),
            "--ctx-size", str(total_ctx),
            "--parallel", str(owned.parallel),
            "--n-gpu-layers", str(n_gpu_layers),
            "--log-verbosity", str(LLAMA_SERVER_VERBOSITY[owned.log_level]),
        ]  # fmt: skip
        if owned.threads:
            args += ["--threads", str(owned.threads)]
    elif owned.server == "llama-cpp-python":
        python = expand_home(owned.executable or context.default_llama_python, context.home)
        if context.llama_python_launcher:
            args = [python, context.llama_python_launcher, "--log-level", owned.log_level]
        else:
            args = [python, "-m", "llama_cpp.server"]
        args += [
            "--model", model_path,
            "--model_alias", model_name,
            "--host", host,
            "--port", str(port),
            "--n_ctx", str(total_ctx),
            "--n_gpu_layers", str(n_gpu_layers),
        ]  # fmt: skip
        if owned.threads:
            args += ["--n_threads", str(owned.threads)]
        # llama.cpp's load report and per-request timings
        args += ["--verbose", str(owned.log_level in ("info", "debug"))]
        # Its default cuts a running stream short whenever another request arrives: behind
        # a gateway (concurrent clients, fallbacks landing here) that breaks streams.
        args += ["--interrupt_requests", "False"]
        # llama-cpp-python was installed without its own llama.cpp build: it loads ours.
        environment["LLAMA_CPP_LIB_PATH"] = context.llama_lib_dir
    elif owned.server == "ollama":
        binary = expand_home(owned.executable or "/usr/local/bin/ollama", context.home)
        args = [binary, "serve"]
        environment["OLLAMA_NUM_PARALLEL"] = str(owned.parallel)
        environment["OLLAMA_CONTEXT_LENGTH"] = str(owned.ctx)
        if owned.log_level == "debug":
            environment["OLLAMA_DEBUG"] = "1"
    else:  # vllm
        binary = expand_home(owned.executable or "vllm", context.home)
        args = [
            binary, "serve", model_path,
            "--host", host,
            "--port", str(port),
            "--served-model-name", model_name,
            "--max-model-len", str(owned.ctx),
            "--max-num-seqs", str(owned.parallel),
        ]  # fmt: skip
        utilization = gpu.gpu_memory_utilization or owned.gpu_memory_utilization
        if utilization is not None:
            args += ["--gpu-memory-utilization", f"{utilization:g}"]
        if owned.log_level != "debug":
            args += ["--disable-uvicorn-access-log"]  # a line per request, probes included
        if owned.log_level in ("error", "warning"):
            args += ["--disable-log-stats"]  # throughput lines every 10 s
        environment["VLLM_LOGGING_LEVEL"] = owned.log_level.upper()
    if owned.gpu is not None and not gpu.hide_gpu:
        environment["CUDA_VISIBLE_DEVICES"] = str(owned.gpu)  # one card per server
    environment.update(gpu.environment)  # hidden GPU, Ollama's cap
    args += list(owned.extra_args)
    return args, environment


def fill_template(template: str, values: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"template placeholder @{key}@ has no value")
        return values[key]

    text = re.sub(r"@([A-Z_]+)@", replace, template)
    # An empty @ENVIRONMENT@ leaves a blank line; keep files tidy.
    return re.sub(r"\n{3,}", "\n\n", text)


def render_provider_unit(
    config: Config,
    owned: OwnedServer,
    backend_names: Sequence[str],
    gpu: GpuSettings,
    context: UnitContext,
    *,
    model_file: str | None = None,
) -> RenderedUnit:
    provider = config.providers[owned.provider]
    name = unit_name(owned.provider)
    model_name = served_model_name(provider, backend_names)
    args, environment = server_arguments(
        owned, provider, model_name, gpu, context, model_file=model_file
    )
    host, port = provider.address
    lines = [environment_line(k, v) for k, v in sorted(environment.items())]
    env_file = env_text = None
    if owned.environment:
        # The user's own environment: in a 0600 file (it may hold tokens), read after the
        # Environment= lines, so it wins over the plan's (systemd's order).
        if not context.env_dir:
            raise ValueError("the unit context names no env_dir for the user's environment")
        env_file = str(PurePosixPath(context.env_dir) / f"{name.removesuffix('.service')}.env")
        env_text = env_file_text(owned.environment)
        lines.append(f"EnvironmentFile={_file_path(env_file, 'the environment file')}")
    values = {
        "HEADER": HEADER_TEMPLATE.format(provider=owned.provider, unit=name).rstrip("\n"),
        "PROVIDER": refuse_unsafe(owned.provider, "the provider name").replace("%", "%%"),
        "MODEL_NAME": refuse_unsafe(model_name, "the model name").replace("%", "%%"),
        "EXEC_START": command_line(args),
        "ENVIRONMENT": "\n".join(lines),
        "UNIT_BASENAME": name.removesuffix(".service"),
        "HOST_PORT": listen_address(host, port),
    }
    text = fill_template(context.templates[TEMPLATE_OF_SERVER[owned.server]], values)
    return RenderedUnit(name, owned.provider, text, env_file=env_file, env_text=env_text)


def _file_path(path: str, what: str) -> str:
    """A path for `EnvironmentFile=`: whole on its line, specifiers escaped."""
    return refuse_unsafe(path, what).replace("%", "%%")


def render_daemon_unit(
    config_dir: str, context: UnitContext, environment: Mapping[str, str] | None = None
) -> RenderedUnit:
    values = {
        "HEADER": HEADER_TEMPLATE.format(provider="(daemon)", unit=DAEMON_UNIT).rstrip("\n"),
        "EXEC_START": command_line(
            [context.python, "-m", "diversityd.daemon", "--config-dir", config_dir]
        ),
        "EXEC_RELOAD": command_line(
            [context.python, "-m", "diversityd.cli", "reload", "--config-dir", config_dir]
        ),
        "ENVIRONMENT": "\n".join(
            environment_line(k, v) for k, v in sorted((environment or {}).items())
        ),
    }
    text = fill_template(context.templates["diversityd.service.in"], values)
    return RenderedUnit(name=DAEMON_UNIT, provider=None, text=text)


def is_owned_text(text: str) -> bool:
    return text.startswith(MARKER)


def exec_start_args(text: str) -> list[str] | None:
    """The command line of a unit's ExecStart= (as `command_line` quoted it), or None."""
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            try:
                words = shlex.split(line.removeprefix("ExecStart="))
            except ValueError:
                return None
            return [
                word.replace("%%", "%")
                if index == 0
                else word.replace("%%", "%").replace("$$", "$")
                for index, word in enumerate(words)
            ]
    return None


def model_file_of(text: str) -> str | None:
    """The GGUF a llama server's unit loads (`--model`): what its process runs now, when the
    daemon's own record of it is lost."""
    args = exec_start_args(text) or []
    for flag, value in itertools.pairwise(args):
        if flag == "--model":
            return value
    return None


def gateway_instance(color: str) -> str:
    return f"diversityd-gateway@{color}.service"


@dataclass(frozen=True)
class GatewayPaths:
    """Files the gateway units name (the daemon decides where they live)."""

    config_dir: str  # holds <color>.yaml, the config each instance serves
    key_file: str  # LITELLM_MASTER_KEY=... (or an adopted bare key), mode 0600
    environment_files: tuple[str, ...]  # the user's cloud keys
    litellm_python: str
    launcher: str  # gatewaylauncher.py
    key_is_environment: bool = True  # LITELLM_MASTER_KEY=... form: EnvironmentFile= reads it
    # the instances' control sockets, `{control_dir}/<color>.sock` (a private folder)
    control_dir: str = ""
    fleet_key_file: str | None = None  # the fleet's shared key: peers' requests, and ours

    def control_socket(self, color: str) -> str:
        return f"{self.control_dir}/{color}.sock"


def listen_address(host: str, port: int) -> str:
    refuse_unsafe(host, "the host")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _socket_address(host: str, port: int) -> str:
    """`ListenStream=`'s address: an IP literal (systemd resolves no names, and a path would
    make a Unix socket of it)."""
    try:
        ipaddress.ip_address(refuse_unsafe(host, "the gateway's host"))
    except ValueError:
        raise UnitRenderError(
            "the gateway's host is not an IP address", hint="e.g. 127.0.0.1 or ::1"
        ) from None
    return listen_address(host, port)


def render_gateway_units(
    gateway: GatewaySettings, paths: GatewayPaths, context: UnitContext, graceful_s: float
) -> list[RenderedUnit]:
    """The socket holding the gateway's port and the template its instances run from."""
    header = HEADER_TEMPLATE.format(provider="(gateway)", unit=GATEWAY_SOCKET).rstrip("\n")
    socket_text = fill_template(
        context.templates["gateway.socket.in"],
        {
            "HEADER": header,
            "LISTEN": _socket_address(gateway.host, gateway.port),
            "FALLBACK_INSTANCE": gateway_instance(GATEWAY_COLORS[0]),
        },
    )
    exec_start = command_line(
        [
            paths.litellm_python,
            paths.launcher,
            "--config", f"{paths.config_dir}/{_INSTANCE}.yaml",
            "--key-file", paths.key_file,
            "--graceful-s", f"{graceful_s:g}",
            "--control", paths.control_socket(_INSTANCE),
            *(["--fleet-key-file", paths.fleet_key_file] if paths.fleet_key_file else []),
        ]
    ).replace(_INSTANCE, "%i")  # fmt: skip
    # A bare adopted key is read by the launcher only: systemd would log part of it.
    key_files = [paths.key_file] if paths.key_is_environment else []
    environment_files = [
        f"EnvironmentFile=-{_file_path(path, 'the master key file')}" for path in key_files
    ] + [
        f"EnvironmentFile=-{_file_path(expand_home(path, context.home), 'an environment file')}"
        for path in paths.environment_files
    ]
    service_text = fill_template(
        context.templates["gateway@.service.in"],
        {
            "HEADER": HEADER_TEMPLATE.format(provider="(gateway)", unit=GATEWAY_TEMPLATE).rstrip(
                "\n"
            ),
            "SOCKET_UNIT": GATEWAY_SOCKET,
            "EXEC_START": exec_start,
            "ENVIRONMENT": environment_line("PYTHONUNBUFFERED", "1"),
            "ENVIRONMENT_FILES": "\n".join(environment_files),
            "STOP_TIMEOUT": f"{graceful_s + 30:g}",
        },
    )
    return [
        RenderedUnit(name=GATEWAY_SOCKET, provider=None, text=socket_text),
        RenderedUnit(name=GATEWAY_TEMPLATE, provider=None, text=service_text),
    ]
