"""Hand-made units -> the servers they run. Pure.

`find_server` says which server a hand-made unit runs: llama-server, the llama-cpp-python
server, Ollama, vLLM or the LiteLLM proxy, on which port, with which model, context per slot,
slots, GPU layers and environment. Its command line is the one systemd itself parsed when
the unit is loaded in the user manager (`LoadedUnit`: the D-Bus `ExecStartEx` and
`Environment`), else the unit file's (and its drop-ins') read as systemd reads it: line
continuations, ExecStart='s prefixes, quotes and C escapes (`execline.py`), specifiers,
then `$VAR`, and wrappers such as `env`, `nice` and `sh -c`. Values that look like keys or
tokens are set apart (`FoundServer.secrets`): they never reach YAML, a unit file or a log
line.
"""

from __future__ import annotations

import dataclasses
import itertools
import posixpath
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from diversityd.config import SERVER_KINDS
from diversityd.execline import (
    NO_ENV_EXPAND,
    ExecCommand,
    ExecLineError,
    expand_specifiers,
    parse_exec,
    split_words,
)
from diversityd.secretpatterns import is_secret
from diversityd.units import DAEMON_UNIT, UNIT_PREFIX, is_owned_text

LITELLM = "litellm"
KINDS = (*SERVER_KINDS, LITELLM)
DEFAULT_PORTS = {
    "llama-server": 8080,
    "llama-cpp-python": 8000,
    "ollama": 11434,
    "vllm": 8000,
    LITELLM: 4000,
}
# What each server uses when its unit does not say (what the adopted unit must keep).
DEFAULT_TOTAL_CTX = {"llama-server": 4096, "llama-cpp-python": 2048}

_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\$")
_SHELLS = frozenset({"sh", "bash", "dash", "zsh"})
_PYTHON = re.compile(r"^python(?:\d+(?:\.\d+)?)?$")


# ---------------------------------------------------------------------------------------
# Unit files


@dataclass(frozen=True)
class UnitText:
    """One unit file as found: its name, where, its text and its drop-ins' texts."""

    name: str
    path: str
    text: str = field(repr=False)
    scope: str = "user"  # user | system
    drop_ins: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (path, text)


@dataclass(frozen=True)
class ServiceSection:
    exec_start: tuple[ExecCommand, ...]  # specifiers resolved, `$` not yet expanded
    environment: Mapping[str, str] = field(repr=False)
    environment_files: tuple[str, ...]  # as written ("-" = optional)
    working_directory: str | None
    user: str | None
    exec_problem: str | None = None  # why systemd would refuse its ExecStart=


@dataclass(frozen=True)
class LoadedUnit:
    """A unit as the user manager has it loaded (its D-Bus properties): systemd's own
    parse of every file and drop-in, which wins over ours."""

    commands: tuple[ExecCommand, ...]  # ExecStartEx (ExecStart on an older systemd)
    environment: tuple[str, ...] = field(default=(), repr=False)  # NAME=value, in order


def unit_lines(text: str) -> Iterable[tuple[str, str, str]]:
    """(section, key, value) of a unit file: comments skipped, continuations joined."""
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if pending and line[:1] in ("#", ";"):
            continue  # a comment inside a continued line is dropped (systemd >= 248)
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line = pending + line
        pending = ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if sep:
            yield section, key.strip(), value.strip()
    if pending:
        key, sep, value = pending.partition("=")
        if sep:
            yield section, key.strip(), value.strip()


def parse_service(texts: Sequence[str], specifiers: Mapping[str, str]) -> ServiceSection:
    """The [Service] section of a unit and its drop-ins, in order (later ones win; an empty
    `ExecStart=` or `Environment=`... resets as systemd does)."""
    exec_start: list[ExecCommand] = []
    exec_problem: str | None = None
    environment: dict[str, str] = {}
    environment_files: list[str] = []
    working_directory: str | None = None
    user: str | None = None
    for text in texts:
        for section, key, value in unit_lines(text):
            if section != "Service":
                continue
            if key == "ExecStart":
                if not value:
                    exec_start, exec_problem = [], None
                    continue
                try:
                    exec_start += parse_exec(value, specifiers)
                except ExecLineError as exc:
                    exec_problem = f"ExecStart={value}: {exc} (systemd refuses it)"
            elif key == "Environment":
                if not value:
                    environment.clear()
                environment.update(_assignments(_words(value), specifiers))
            elif key == "EnvironmentFile":
                if not value:
                    environment_files.clear()
                else:
                    environment_files.append(expand_specifiers(value, specifiers))
            elif key == "WorkingDirectory":
                working_directory = expand_specifiers(value, specifiers).lstrip("-") or None
            elif key == "User":
                user = value or None
    return ServiceSection(
        tuple(exec_start),
        environment,
        tuple(environment_files),
        working_directory,
        user,
        exec_problem,
    )


def _words(value: str) -> list[str]:
    try:
        return split_words(value)
    except ExecLineError:
        return []  # systemd ignores the line (unbalanced quotes)


def _assignments(words: Iterable[str], specifiers: Mapping[str, str] | None) -> dict[str, str]:
    """NAME=value words (specifiers resolved first, unless None: systemd's own values)."""
    values = {}
    for word in words:
        match = _ASSIGNMENT.match(
            word if specifiers is None else expand_specifiers(word, specifiers)
        )
        if match:
            values[match.group(1)] = match.group(2)
    return values


def parse_environment_file(text: str) -> dict[str, str]:
    """An EnvironmentFile= (NAME=value lines, `export`, quotes, comments)."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        line = line.removeprefix("export ").strip()
        name, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name.strip()):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def expand_variables(words: Sequence[str], environment: Mapping[str, str]) -> list[str]:
    """ExecStart's `$NAME` (a word of its own: split on whitespace) and `${NAME}`."""
    out: list[str] = []
    for index, word in enumerate(words):
        bare = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if bare and index > 0:
            out.extend(environment.get(bare.group(1), "").split())
            continue

        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            return environment.get(match.group(1), "")

        out.append(_VARIABLE.sub(replace, word) if index > 0 else word)
    return out


# ---------------------------------------------------------------------------------------
# What a command line runs


@dataclass(frozen=True)
class FoundServer:
    """A server a unit runs. `secrets` are never printed: show their names only."""

    unit: str
    path: str
    scope: str
    kind: str  # one of KINDS
    executable: str  # the binary, or the interpreter of `python -m ...`
    host: str | None  # as given; None: the server's default
    port: int
    model_path: str | None = None
    ctx: int | None = None  # per slot
    parallel: int | None = None
    threads: int | None = None
    n_gpu_layers: str | None = None  # as written in the unit
    alias: str | None = None
    gpu: str | None = None  # from CUDA_VISIBLE_DEVICES: "0", "none"; None: not said
    extra_args: tuple[str, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    environment_files: tuple[str, ...] = ()
    config_file: str | None = None  # LiteLLM's --config
    working_directory: str | None = None
    problems: tuple[str, ...] = ()  # why it cannot be owned as it is
    notes: tuple[str, ...] = ()
    read_by_systemd: bool = False  # its command line as the user manager parsed it

    @property
    def total_ctx(self) -> int | None:
        if self.ctx is None:
            return None
        return self.ctx * (self.parallel or 1)

    def describe(self) -> str:
        """One line on what it runs (names of secrets only)."""
        parts = [self.kind, f":{self.port}"]
        if self.model_path:
            parts.append(f"model {self.model_path}")
        if self.ctx is not None:
            parts.append(f"ctx {self.ctx} x {self.parallel or 1} slot(s)")
        if self.threads:
            parts.append(f"threads {self.threads}")
        if self.n_gpu_layers is not None:
            parts.append(f"--n-gpu-layers {self.n_gpu_layers}")
        if self.config_file:
            parts.append(f"config {self.config_file}")
        if self.secrets:
            parts.append(f"secrets {', '.join(sorted(self.secrets))}")
        return ", ".join(parts)


def _unwrap(argv: list[str], environment: dict[str, str], depth: int = 0) -> list[str]:
    """Look through `env A=1 cmd`, `sh -c '... && exec cmd'`, `exec`, `nice -n N`."""
    if not argv or depth > 4:
        return argv
    name = posixpath.basename(argv[0])
    if name == "exec":
        return _unwrap(argv[1:], environment, depth + 1)
    if name == "env":
        rest = argv[1:]
        while rest and (rest[0].startswith("-") or _ASSIGNMENT.match(rest[0])):
            match = _ASSIGNMENT.match(rest[0])
            if match:
                environment[match.group(1)] = match.group(2)
            rest = rest[1:]
        return _unwrap(rest, environment, depth + 1)
    if name == "nice":
        rest = argv[1:]
        if rest[:1] == ["-n"]:
            rest = rest[2:]
        elif rest[:1] and rest[0].startswith("-"):
            rest = rest[1:]
        return _unwrap(rest, environment, depth + 1)
    if name in _SHELLS:
        for index, word in enumerate(argv[1:-1], start=1):
            if word.startswith("-") and "c" in word[1:]:
                return _unwrap(_last_command(argv[index + 1]), environment, depth + 1)
    return argv


def _last_command(script: str) -> list[str]:
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:
        return script.split()
    commands = [
        list(group)
        for is_operator, group in itertools.groupby(tokens, key=lambda t: t in {"&&", "||", ";"})
        if not is_operator
    ]
    return commands[-1] if commands else []


def _pairs(args: Sequence[str]) -> list[str]:
    """`--flag=value` -> `--flag`, `value` (values with `=` in them stay whole)."""
    out: list[str] = []
    for arg in args:
        if arg.startswith("--") and "=" in arg:
            flag, _, value = arg.partition("=")
            out += [flag, value]
        else:
            out.append(arg)
    return out


def _take(
    args: Sequence[str], flags: Mapping[str, str], *, dashes: bool = False
) -> tuple[dict[str, str], list[str]]:
    """Values of the known value-taking flags (`flags`: flag -> field), and the rest in
    order. With `dashes`, `--max_model_len` and `--max-model-len` are one flag (vLLM)."""
    values: dict[str, str] = {}
    rest: list[str] = []
    words = _pairs(args)
    index = 0
    while index < len(words):
        word = words[index]
        key = word.replace("_", "-") if dashes and word.startswith("--") else word
        if key in flags and index + 1 < len(words):
            values[flags[key]] = words[index + 1]
            index += 2
            continue
        rest.append(word)
        index += 1
    return values, rest


def parse_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


_LLAMA_SERVER_FLAGS = {
    "-m": "model",
    "--model": "model",
    "--host": "host",
    "--port": "port",
    "-c": "ctx",
    "--ctx-size": "ctx",
    "-np": "parallel",
    "--parallel": "parallel",
    "-ngl": "ngl",
    "--n-gpu-layers": "ngl",
    "--gpu-layers": "ngl",
    "-t": "threads",
    "--threads": "threads",
    "-a": "alias",
    "--alias": "alias",
    "--api-key": "api_key",
    "-hf": "hf",
    "-hfr": "hf",
    "--hf-repo": "hf",
    "-mu": "url",
    "--model-url": "url",
}
# llama-server reads these when the flag is not given.
_LLAMA_ARG_ENV = {
    "LLAMA_ARG_MODEL": "model",
    "LLAMA_ARG_HOST": "host",
    "LLAMA_ARG_PORT": "port",
    "LLAMA_ARG_CTX_SIZE": "ctx",
    "LLAMA_ARG_N_PARALLEL": "parallel",
    "LLAMA_ARG_N_GPU_LAYERS": "ngl",
    "LLAMA_ARG_THREADS": "threads",
    "LLAMA_ARG_ALIAS": "alias",
    "LLAMA_API_KEY": "api_key",
}
_LLAMA_PYTHON_FLAGS = {
    "--model": "model",
    "--host": "host",
    "--port": "port",
    "--n_ctx": "ctx",
    "--n_gpu_layers": "ngl",
    "--n_threads": "threads",
    "--model_alias": "alias",
    "--api_key": "api_key",
    "--config_file": "config",
    "--interrupt_requests": "interrupt",  # diversityd sets it
}
_VLLM_FLAGS = {
    "--model": "model",
    "--host": "host",
    "--port": "port",
    "--max-model-len": "ctx",
    "--max-num-seqs": "parallel",
    "--served-model-name": "alias",
    "--api-key": "api_key",
    "--gpu-memory-utilization": "utilization",
}
_LITELLM_FLAGS = {"--config": "config", "-c": "config", "--host": "host", "--port": "port"}
# The environment variable each server reads its API key from (moved out of ExecStart).
_KEY_ENV = {"llama-server": "LLAMA_API_KEY", "llama-cpp-python": "API_KEY", "vllm": "VLLM_API_KEY"}


def identify(argv: Sequence[str]) -> tuple[str, str, list[str]] | None:
    """(kind, executable, arguments) of a command line, or None when it runs none of them."""
    if not argv:
        return None
    exe = argv[0]
    name = posixpath.basename(exe)
    args = list(argv[1:])
    if name.startswith("llama-server") or (name == "server" and "llama" in exe):
        return "llama-server", exe, args
    if name == "ollama" and "serve" in args[:1]:
        return "ollama", exe, args[1:]
    if name == "vllm" and "serve" in args[:1]:
        return "vllm", exe, args[1:]
    if name in ("litellm", "litellm-proxy"):
        return LITELLM, exe, args
    if _PYTHON.match(name):
        rest = list(args)
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            rest = rest[1:]
        if rest[:1] == ["-m"] and len(rest) > 1:
            module, module_args = rest[1], rest[2:]
            if module == "llama_cpp.server":
                return "llama-cpp-python", exe, module_args
            if module.startswith("vllm.entrypoints"):
                return "vllm", exe, module_args
            if module in ("litellm", "litellm.proxy.proxy_cli"):
                return LITELLM, exe, module_args
        elif rest and posixpath.basename(rest[0]) in ("litellm", "litellm-proxy"):
            return LITELLM, exe, rest[1:]
    return None


def find_server(
    unit: UnitText,
    specifiers: Mapping[str, str],
    file_environment: Mapping[str, Mapping[str, str]] | None = None,
    loaded: LoadedUnit | None = None,
) -> FoundServer | None:
    """The server a unit runs, or None. `file_environment`: the parsed contents of the
    unit's EnvironmentFile=s (by path as written, "-" stripped), read by the caller;
    `loaded`: what the user manager says of the unit, when it has it loaded."""
    service = parse_service([unit.text, *(text for _, text in unit.drop_ins)], specifiers)
    if loaded is not None and loaded.commands:
        service = dataclasses.replace(
            service,
            exec_start=loaded.commands,
            environment=_assignments(loaded.environment, None),
            exec_problem=None,
        )
    command = next(
        (
            command
            for command in service.exec_start
            if identify(_unwrap([command.path, *command.arguments], {})) is not None
        ),
        service.exec_start[0] if service.exec_start else None,
    )
    if command is None:
        return None
    words = [command.path, *command.arguments]
    environment = dict(service.environment)
    for path in service.environment_files:
        environment.update((file_environment or {}).get(path.lstrip("-"), {}))
    if NO_ENV_EXPAND not in command.flags:  # `:` asks systemd not to expand `$`
        words = expand_variables(words, environment)
    wrapper_environment: dict[str, str] = {}  # `env A=1 cmd`: what the unit says, too
    argv = _unwrap(words, wrapper_environment)
    identified = identify(argv)
    if identified is None:
        return None
    kind, executable, args = identified
    builder = _Builder(unit, kind, executable, {**environment, **wrapper_environment}, service)
    builder.environment.update(wrapper_environment)
    if kind == "llama-server":
        builder.llama_server(args)
    elif kind == "llama-cpp-python":
        builder.llama_python(args)
    elif kind == "ollama":
        builder.ollama(args)
    elif kind == "vllm":
        builder.vllm(args)
    else:
        builder.litellm(args)
    server = builder.build()
    if loaded is not None and loaded.commands:
        server = dataclasses.replace(server, read_by_systemd=True)
    return server


class _Builder:
    """Fills one FoundServer from a command line and its environment."""

    def __init__(
        self,
        unit: UnitText,
        kind: str,
        executable: str,
        environment: dict[str, str],
        service: ServiceSection,
    ) -> None:
        self.unit = unit
        self.kind = kind
        self.executable = executable
        self.service = service
        # Only what the unit itself says goes on; an EnvironmentFile= stays where it is.
        self.environment = dict(service.environment)
        self.lookup = environment  # everything the process sees (for $VAR and defaults)
        self.values: dict[str, Any] = {"port": DEFAULT_PORTS[kind]}
        self.extra: list[str] = []
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.secret_args: dict[str, str] = {}

    def _apply(self, taken: Mapping[str, str]) -> None:
        for key, value in taken.items():
            if key == "api_key":
                self.secret_args[_KEY_ENV.get(self.kind, "API_KEY")] = value
            else:
                self.values[key] = value

    def llama_server(self, args: list[str]) -> None:
        for name, key in _LLAMA_ARG_ENV.items():
            if name in self.environment:
                value = self.environment.pop(name)
                if key == "api_key":
                    self.secret_args[name] = value
                else:
                    self.values[key] = value  # a flag given too wins (applied after)
        taken, rest = _take(args, _LLAMA_SERVER_FLAGS)
        self._apply(taken)
        self.extra = rest
        if "hf" in self.values or "url" in self.values:
            self.problems.append(
                "loads its model from Hugging Face or a URL (-hf, --model-url); "
                "diversityd runs a local GGUF: set model_path to the downloaded file"
            )
        parallel = parse_int(self.values.get("parallel"))
        if parallel is None or parallel < 1:
            if "parallel" in self.values:
                self.notes.append(f"--parallel {self.values['parallel']}: taken as 1 slot")
            parallel = 1
        total = parse_int(self.values.get("ctx"))
        if total is None or total <= 0:
            if "ctx" in self.values:
                self.notes.append(
                    f"--ctx-size {self.values['ctx']} (the model's own length) is not a number "
                    f"diversityd can split into slots; {DEFAULT_TOTAL_CTX['llama-server']} used"
                )
            total = DEFAULT_TOTAL_CTX["llama-server"]
        if total % parallel:
            self.notes.append(
                f"--ctx-size {total} does not divide into {parallel} slots: "
                f"{total // parallel} per slot"
            )
        self.values["ctx"] = str(max(1, total // parallel))
        self.values["parallel"] = str(parallel)

    def llama_python(self, args: list[str]) -> None:
        taken, rest = _take(args, _LLAMA_PYTHON_FLAGS)
        self._apply(taken)
        self.values.pop("interrupt", None)
        self.extra = rest
        if "config" in self.values:
            self.problems.append(
                f"serves the models of its --config_file {self.values['config']}; diversityd "
                "runs one model per server: adopt it by hand (one provider per model)"
            )
        total = parse_int(self.values.get("ctx"))
        if total is None or total <= 0:
            total = DEFAULT_TOTAL_CTX["llama-cpp-python"]
        self.values["ctx"] = str(total)
        self.values["parallel"] = "1"

    def ollama(self, args: list[str]) -> None:
        self.extra = list(args)
        host = self.lookup.get("OLLAMA_HOST")
        if host:
            host_part, port = _host_port(host, DEFAULT_PORTS["ollama"])
            self.values["host"], self.values["port"] = host_part, str(port)
            self.environment.pop("OLLAMA_HOST", None)
        for name, key in (("OLLAMA_CONTEXT_LENGTH", "ctx"), ("OLLAMA_NUM_PARALLEL", "parallel")):
            if name in self.environment:
                self.values[key] = self.environment.pop(name)

    def vllm(self, args: list[str]) -> None:
        positional = args[0] if args and not args[0].startswith("-") else None
        taken, rest = _take(args[1:] if positional else args, _VLLM_FLAGS, dashes=True)
        self._apply(taken)
        if positional:
            self.values.setdefault("model", positional)
        if posixpath.basename(self.executable) != "vllm":
            # `python -m vllm.entrypoints...`: diversityd runs `vllm serve` from that venv.
            self.executable = posixpath.join(posixpath.dirname(self.executable), "vllm")
        utilization = self.values.pop("utilization", None)
        if utilization is not None:
            rest += ["--gpu-memory-utilization", utilization]
            self.notes.append(
                "--gpu-memory-utilization is kept as the unit says; remove it from extra_args "
                "to let diversityd size it from the card's budget"
            )
        self.extra = rest

    def litellm(self, args: list[str]) -> None:
        taken, rest = _take(args, _LITELLM_FLAGS)
        self._apply(taken)
        self.extra = rest
        config = self.values.get("config")
        if config and not config.startswith("/") and self.service.working_directory:
            self.values["config"] = posixpath.join(self.service.working_directory, config)

    def build(self) -> FoundServer:
        port = parse_int(self.values.get("port"))
        if port is None or not 0 < port < 65536:
            self.problems.append(f"port {self.values.get('port')!r} is not a TCP port")
            port = 0
        plain: dict[str, str] = {}
        secrets: dict[str, str] = dict(self.secret_args)
        gpu: str | None = None
        for name, value in self.environment.items():
            if name == "CUDA_VISIBLE_DEVICES" and self.kind != LITELLM:
                gpu = _gpu_of(value)
                if gpu is not None:
                    continue
            if is_secret(name, value):
                secrets[name] = value
            else:
                plain[name] = value
        extra = list(self.extra)
        for index, arg in enumerate(extra):
            if is_secret("", arg):
                self.problems.append(
                    f"argument {index + 1} after the command looks like a key or token; "
                    "move it into an environment variable first"
                )
        return FoundServer(
            unit=self.unit.name,
            path=self.unit.path,
            scope=self.unit.scope,
            kind=self.kind,
            executable=self.executable,
            host=self.values.get("host"),
            port=port,
            model_path=self.values.get("model"),
            ctx=parse_int(self.values.get("ctx")),
            parallel=parse_int(self.values.get("parallel")),
            threads=parse_int(self.values.get("threads")),
            n_gpu_layers=self.values.get("ngl"),
            alias=self.values.get("alias"),
            gpu=gpu,
            extra_args=tuple(extra),
            environment=plain,
            secrets=secrets,
            environment_files=self.service.environment_files,
            config_file=self.values.get("config") if self.kind == LITELLM else None,
            working_directory=self.service.working_directory,
            problems=tuple(self.problems),
            notes=tuple(self.notes),
        )


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    text = text.split("://", 1)[-1]
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, parse_int(rest.lstrip(":")) or default_port
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    return host or "127.0.0.1", parse_int(port) or default_port


def _gpu_of(value: str) -> str | None:
    value = value.strip()
    if value in ("", "-1", "none", "NoDevFiles"):
        return "none"
    if value.isdigit():
        return value
    return None  # several cards or UUIDs: kept in the environment as it is


def is_own_unit(name: str, text: str) -> bool:
    """diversityd's own units are never adopted."""
    return name.startswith(UNIT_PREFIX) or name == DAEMON_UNIT or is_owned_text(text)
