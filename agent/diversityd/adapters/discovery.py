"""What is already on this machine, for `diversityctl install`: hand-made user and system
units serving LLM servers, their binaries on the PATH, a LiteLLM install able to run the
gateway, the model links, NVML, who holds which port, lingering. Reads only.

What a unit runs is decided by the core (`foreignunits.find_server`); this module finds the
files, reads them and their EnvironmentFile=s, and asks the machine the rest. Secret values
read here travel in `FoundServer.secrets` only: nothing here prints or logs them.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from diversityd import parts
from diversityd.foreignunits import (
    LITELLM,
    FoundServer,
    LoadedUnit,
    UnitText,
    find_server,
    is_own_unit,
    parse_environment_file,
    parse_service,
)

# Only files that mention one of these are parsed (a system has hundreds of units).
KEYWORDS = re.compile(r"llama|ollama|vllm|litellm", re.IGNORECASE)
SYSTEM_UNIT_DIRS = (
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
)
# For tests: where system units are looked for instead (":"-separated).
SYSTEM_PATH_VARIABLE = "DIVERSITYD_SYSTEM_UNIT_PATH"
LINGER_DIR = Path("/var/lib/systemd/linger")
BINARIES = ("llama-server", "ollama", "vllm", "litellm")
LITELLM_CHECK = (
    "import importlib.util as u, importlib.metadata as m\n"
    "ok = u.find_spec('litellm') and u.find_spec('uvicorn')\n"
    "print(m.version('litellm') if ok else '')\n"
)


def _xdg(environ: Mapping[str, str], name: str, fallback: str) -> str:
    home = environ.get("HOME") or str(Path.home())
    return environ.get(name) or str(Path(home) / fallback)


def user_unit_dirs(environ: Mapping[str, str]) -> list[Path]:
    """Where the user manager reads units: `$SYSTEMD_UNIT_PATH` when set (a trailing ":"
    adds the defaults), else systemd's own list for user units."""
    config = _xdg(environ, "XDG_CONFIG_HOME", ".config")
    data = _xdg(environ, "XDG_DATA_HOME", ".local/share")
    defaults = [
        f"{config}/systemd/user",
        "/etc/systemd/user",
        f"{environ.get('XDG_RUNTIME_DIR', f'/run/user/{os.getuid()}')}/systemd/user",
        f"{data}/systemd/user",
        "/usr/local/lib/systemd/user",
        "/usr/lib/systemd/user",
    ]
    configured = environ.get("SYSTEMD_UNIT_PATH")
    if configured is None:
        return [Path(p) for p in defaults]
    chosen = [p for p in configured.split(":") if p]
    if configured.endswith(":"):
        chosen += defaults
    return [Path(p) for p in chosen]


def system_unit_dirs(environ: Mapping[str, str]) -> list[Path]:
    configured = environ.get(SYSTEM_PATH_VARIABLE)
    if configured is not None:
        return [Path(p) for p in configured.split(":") if p]
    return [Path(p) for p in SYSTEM_UNIT_DIRS]


def specifiers(environ: Mapping[str, str]) -> dict[str, str]:
    user = pwd.getpwuid(os.getuid())
    home = environ.get("HOME") or user.pw_dir
    return {
        "h": home,
        "u": environ.get("USER") or user.pw_name,
        "U": str(os.getuid()),
        "E": _xdg(environ, "XDG_CONFIG_HOME", ".config"),
        "S": _xdg(environ, "XDG_STATE_HOME", ".local/state"),
        "C": _xdg(environ, "XDG_CACHE_HOME", ".cache"),
        "t": environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}"),
    }


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def read_units(dirs: Sequence[Path], scope: str) -> list[UnitText]:
    """Service units in `dirs` (the first directory holding a name wins, as in systemd)
    that mention an LLM server, with their drop-ins (`<name>.d/*.conf`, every directory,
    sorted by file name). diversityd's own units are skipped."""
    seen: dict[str, Path] = {}
    for directory in dirs:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.service")):
            if path.name not in seen and "@" not in path.name:
                seen[path.name] = path
    units = []
    for name, path in sorted(seen.items()):
        text = _read(path)
        if text is None or is_own_unit(name, text):
            continue
        drop_ins = _drop_ins(dirs, name)
        if not KEYWORDS.search(text) and not any(KEYWORDS.search(t) for _, t in drop_ins):
            continue
        units.append(UnitText(name, str(path), text, scope, tuple(drop_ins)))
    return units


def _drop_ins(dirs: Sequence[Path], name: str) -> list[tuple[str, str]]:
    found: dict[str, Path] = {}
    for directory in dirs:
        folder = directory / f"{name}.d"
        if folder.is_dir():
            for path in folder.glob("*.conf"):
                found.setdefault(path.name, path)
    texts = []
    for file_name in sorted(found):
        text = _read(found[file_name])
        if text is not None:
            texts.append((str(found[file_name]), text))
    return texts


def environment_files_of(
    units: Iterable[UnitText], specifier_values: Mapping[str, str]
) -> dict[str, dict[str, str]]:
    """The parsed contents of every readable EnvironmentFile= the units name."""
    contents: dict[str, dict[str, str]] = {}
    for unit in units:
        texts = [unit.text, *(t for _, t in unit.drop_ins)]
        for named in parse_service(texts, specifier_values).environment_files:
            path = named.lstrip("-")
            if path in contents:
                continue
            text = _read(Path(path))
            if text is not None:
                contents[path] = parse_environment_file(text)
    return contents


def hand_made_units(environ: Mapping[str, str]) -> list[UnitText]:
    """Every hand-made user and system unit that mentions an LLM server."""
    return read_units(user_unit_dirs(environ), "user") + read_units(
        system_unit_dirs(environ), "system"
    )


def find_servers(
    environ: Mapping[str, str],
    units: Sequence[UnitText] | None = None,
    loaded: Mapping[str, LoadedUnit] | None = None,
) -> list[FoundServer]:
    """Every hand-made user and system unit serving one of the known servers; a user unit
    the manager has loaded (`loaded`) as systemd parsed it."""
    values = specifiers(environ)
    units = list(units) if units is not None else hand_made_units(environ)
    files = environment_files_of(units, values)
    found = []
    for unit in units:
        systemds = (loaded or {}).get(unit.name) if unit.scope == "user" else None
        server = find_server(unit, values, files, systemds)
        if server is not None:
            found.append(server)
    return found


# ---------------------------------------------------------------------------------------
# The rest of the machine


@dataclass(frozen=True)
class PortHolder:
    port: int
    pid: int | None
    process: str | None
    unit: str | None  # from the process's cgroup


def unit_of_pid(pid: int) -> str | None:
    """The service a process runs in, from its cgroup (the innermost `*.service`)."""
    text = _read(Path(f"/proc/{pid}/cgroup"))
    if text is None:
        return None
    for line in text.splitlines():
        _hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers not in ("", "name=systemd"):
            continue
        services = [part for part in path.split("/") if part.endswith(".service")]
        if services:
            return services[-1]
    return None


def listening_holders(ports: Iterable[int]) -> dict[int, list[PortHolder]]:
    """Every process listening on each of `ports` (TCP, any address; a socket systemd
    passes on is held by several)."""
    import psutil  # noqa: PLC0415 - only install's look at the machine needs it

    wanted = set(ports)
    holders: dict[int, list[PortHolder]] = {}
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return holders
    for conn in connections:
        if conn.status != psutil.CONN_LISTEN or not conn.laddr:
            continue
        port = int(conn.laddr.port)
        if port not in wanted:
            continue
        name = None
        if conn.pid:
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.Error:
                name = None
        unit = unit_of_pid(conn.pid) if conn.pid else None
        holders.setdefault(port, []).append(PortHolder(port, conn.pid, name, unit))
    return holders


def listening_ports(ports: Iterable[int]) -> dict[int, PortHolder]:
    """Who listens on each of `ports` (a service's process before systemd's own)."""
    return {
        port: min(found, key=lambda h: h.unit is None)
        for port, found in listening_holders(ports).items()
    }


def linger_enabled(user: str) -> bool | None:
    """Whether the user's manager outlives their sessions; None when unknown (no logind)."""
    if not LINGER_DIR.is_dir():
        return None
    return (LINGER_DIR / user).exists()


def which_all(names: Iterable[str], path: str | None) -> dict[str, str | None]:
    return {name: shutil.which(name, path=path) for name in names}


@dataclass(frozen=True)
class LiteLLMInstall:
    python: str
    venv: str | None  # usable as gateway.litellm_venv (has bin/python)
    version: str | None  # None: it cannot run the gateway launcher
    problem: str | None = None


def interpreter_of(executable: str, search_path: str | None) -> str | None:
    """The Python a console script (`litellm`) runs with: its `#!` line."""
    name = Path(executable).name
    if re.match(r"^python(\d+(\.\d+)?)?$", name):
        return shutil.which(executable, path=search_path) or executable
    resolved = (
        executable if os.path.isabs(executable) else shutil.which(executable, path=search_path)
    )
    if resolved is None:
        return None
    try:
        with open(resolved, "rb") as handle:
            first = handle.readline(512).decode("utf-8", "replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    words = first[2:].split()
    if not words:
        return None
    if Path(words[0]).name == "env" and len(words) > 1:
        return shutil.which(words[1], path=search_path)
    return words[0]


def check_litellm(python: str, timeout_s: float = 30) -> LiteLLMInstall:
    """Can this interpreter run the gateway launcher (LiteLLM and uvicorn importable)?"""
    venv_root = Path(python).parent.parent
    venv = str(venv_root) if (venv_root / "bin" / "python").exists() else None
    try:
        result = subprocess.run(
            [python, "-c", LITELLM_CHECK],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return LiteLLMInstall(python, venv, None, f"{python}: {exc}")
    version = result.stdout.strip() or None
    problem = None if version else f"{python} cannot import litellm and uvicorn"
    return LiteLLMInstall(python, venv, version, problem)


def gpu_summary() -> str:
    from diversityd.adapters.nvml import NvmlError, read_gpus  # noqa: PLC0415 - pynvml

    try:
        snapshot = read_gpus()
    except NvmlError as exc:
        return f"NVML failed: {exc}"
    if not snapshot.gpus:
        return snapshot.cpu_only_reason or "no GPU"
    return "; ".join(
        f"GPU {g.index} {g.name}: {g.free_bytes // 2**20} MiB free of {g.total_bytes // 2**20}"
        for g in snapshot.gpus
    )


def model_problem(path: str) -> tuple[str | None, str | None]:
    """(the file a model path leads to, what is wrong with it)."""
    from diversityd.adapters.modellink import resolve  # noqa: PLC0415

    target = resolve(os.path.expanduser(path))
    return target.target, target.error


@dataclass(frozen=True)
class Machine:
    """Everything install looks at besides the configuration."""

    found: tuple[FoundServer, ...]
    binaries: Mapping[str, str | None]
    cached_llama_server: str | None  # packaging/'s build, when present
    litellm: Mapping[str, LiteLLMInstall]  # unit name (or "PATH") -> what it can do
    default_litellm: str | None  # packaging/'s LiteLLM venv, when present
    ports: Mapping[int, PortHolder]
    linger: bool | None
    user: str
    gpus: str
    models: Mapping[str, tuple[str | None, str | None]] = field(default_factory=dict)


def look(
    environ: Mapping[str, str],
    ports: Iterable[int],
    models: Iterable[str],
    *,
    units: Sequence[UnitText] | None = None,
    loaded: Mapping[str, LoadedUnit] | None = None,
) -> Machine:
    found = tuple(find_servers(environ, units, loaded))
    search_path = environ.get("PATH")
    binaries = which_all(BINARIES, search_path)
    litellm: dict[str, LiteLLMInstall] = {}
    for server in found:
        if server.kind != LITELLM or server.scope != "user":
            continue
        unit_path = server.environment.get("PATH") or search_path
        python = interpreter_of(server.executable, unit_path)
        if python is not None:
            litellm[server.unit] = check_litellm(python)
    if not litellm and binaries.get("litellm"):
        python = interpreter_of(str(binaries["litellm"]), search_path)
        if python is not None:
            litellm["PATH"] = check_litellm(python)
    cached = parts.llama_server_binary()
    default_litellm = parts.litellm_venv()
    all_ports = set(ports) | {s.port for s in found}
    model_paths = {os.path.expanduser(m) for m in models} | {
        s.model_path
        for s in found
        if s.model_path and s.kind in ("llama-server", "llama-cpp-python")
    }
    user = environ.get("USER") or pwd.getpwuid(os.getuid()).pw_name
    return Machine(
        found=found,
        binaries=binaries,
        cached_llama_server=str(cached) if cached.exists() else None,
        litellm=litellm,
        default_litellm=str(default_litellm)
        if (default_litellm / "bin" / "python").exists()
        else None,
        ports=listening_ports(all_ports),
        linger=linger_enabled(user),
        user=user,
        gpus=gpu_summary(),
        models={path: model_problem(path) for path in sorted(model_paths)},
    )
