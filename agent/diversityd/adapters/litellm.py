"""The LiteLLM proxy as a process: offline environment, config check, master key, configs."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from diversityd import parts
from diversityd.adapters import gatewaylauncher
from diversityd.adapters.files import write_atomic
from diversityd.adapters.gatewaylauncher import OFFLINE_SWITCHES
from diversityd.adapters.gatewaylauncher import read_master_key as launcher_read_key
from diversityd.config import Settings
from diversityd.log import get_logger
from diversityd.units import GatewayPaths

log = get_logger()

# Without these LiteLLM fetches a price map (and four other files) from the internet at
# import, blocking 5 s on DNS on a machine that cannot reach it.
OFFLINE_ENV: Mapping[str, str] = dict.fromkeys(OFFLINE_SWITCHES, "True")


@dataclass(frozen=True)
class ConfigCheck:
    ok: bool
    output: str


def check_config_file(
    litellm_bin: Path, config_file: Path, env: Mapping[str, str], timeout_s: float = 120
) -> ConfigCheck:
    """`litellm --config X --validate_config`: LiteLLM's own (shape-only) verdict."""
    result = subprocess.run(
        [str(litellm_bin), "--config", str(config_file), "--validate_config"],
        env={**env, **OFFLINE_ENV},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return ConfigCheck(ok=result.returncode == 0, output=result.stdout + result.stderr)


# ---------------------------------------------------------------------------------------
# The master key: adopted or generated once, readable by the user alone, never logged.


def ensure_master_key(path: Path) -> bool:
    """Generate `sk-...` into `path` (0600) unless a key file is already there (adopted).
    Returns True when it generated one. The file holds the bare key: the launcher reads
    it, and a scraper sends it as it is (Prometheus' `credentials_file`); an older
    `LITELLM_MASTER_KEY=...` file still works for the gateway."""
    if path.exists():
        return False
    key = "sk-" + secrets.token_urlsafe(32)
    write_atomic(path, f"{key}\n", mode=0o600)
    return True


def key_file_problem(path: Path) -> str | None:
    """Why an adopted key file is unsafe or unusable, or None."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if mode & 0o077:
        return f"{path} is readable by others (mode {mode & 0o777:o}); run chmod 600 {path}"
    return None


def read_master_key(path: Path) -> str:
    return launcher_read_key(str(path))


# ---------------------------------------------------------------------------------------
# Config files: one per instance colour, and a short timestamped history.


@dataclass(frozen=True)
class HistoryEntry:
    id: str  # <sequence>-<UTC time>-<sha256 prefix>
    path: Path
    sha256: str
    created: str
    sequence: int  # the order entries were written in (the clock may step back)


_ENTRY = re.compile(r"^(?:(?P<seq>\d{6,})-)?(?P<stamp>\d{8}T\d{12}Z)-[0-9a-f]{8}$")


class GatewayFiles:
    def __init__(self, state_dir: Path, keep: int) -> None:
        self.config_dir = state_dir / "gateway"
        self.history_dir = self.config_dir / "history"
        self.keep = keep

    def config_path(self, color: str) -> Path:
        return self.config_dir / f"{color}.yaml"

    def write_config(self, color: str, text: str) -> Path:
        path = self.config_path(color)
        write_atomic(path, text, mode=0o600)
        return path

    def archive(self, text: str) -> HistoryEntry:
        """Keep a copy (the last `keep`), for `diversityctl history`/`rollback`. Entries are
        numbered: pruning goes by that order, not by the clock, which may step back."""
        digest = hashlib.sha256(text.encode()).hexdigest()
        now = datetime.now(UTC)
        entries = self.history()
        sequence = max((e.sequence for e in entries), default=0) + 1
        entry_id = f"{sequence:06d}-{now.strftime('%Y%m%dT%H%M%S%fZ')}-{digest[:8]}"
        path = self.history_dir / f"{entry_id}.yaml"
        write_atomic(path, text, mode=0o600)
        for old in self.history()[self.keep :]:
            old.path.unlink(missing_ok=True)
        return HistoryEntry(entry_id, path, digest, now.isoformat(timespec="seconds"), sequence)

    def history(self) -> list[HistoryEntry]:
        """Newest first (by sequence; entries of older versions, unnumbered, by time)."""
        entries = []
        for path in self.history_dir.glob("*.yaml"):
            match = _ENTRY.match(path.stem)
            if match is None:
                continue
            created = datetime.strptime(match["stamp"], "%Y%m%dT%H%M%S%fZ").replace(tzinfo=UTC)
            full = hashlib.sha256(path.read_bytes()).hexdigest()
            entries.append(
                HistoryEntry(
                    path.stem,
                    path,
                    full,
                    created.isoformat(timespec="seconds"),
                    int(match["seq"] or 0),
                )
            )
        return sorted(entries, key=lambda e: (e.sequence, e.id), reverse=True)

    def find(self, entry_id: str) -> HistoryEntry | None:
        """An entry by its id, or by a prefix of its id or sha256 that names only one."""
        entries = self.history()
        exact = [e for e in entries if e.id == entry_id]
        if exact:
            return exact[0]
        matches = [e for e in entries if e.id.startswith(entry_id) or e.sha256.startswith(entry_id)]
        return matches[0] if len(matches) == 1 else None


def prepare_key(key_file: Path) -> str | None:
    """Generate the master key once (0600), or adopt the file there: what is unsafe about
    it, if anything (logged)."""
    if ensure_master_key(key_file):
        log.info("gateway.key_generated", path=str(key_file))
        return None
    problem = key_file_problem(key_file)
    if problem:
        log.warning("gateway.key_unsafe", path=str(key_file), error=problem)
    return problem


def gateway_places(settings: Settings) -> tuple[GatewayFiles, Path, GatewayPaths]:
    """Where the gateway's configs, history and key live, and what its units name."""
    gateway = settings.gateway
    state_dir = parts.state_dir(settings.state_dir)
    files = GatewayFiles(state_dir, gateway.keep_configs)
    key_file = (
        Path(os.path.expanduser(gateway.master_key_file))
        if gateway.master_key_file
        else state_dir / "master.key"
    )
    python = (
        str(Path(os.path.expanduser(gateway.litellm_venv)) / "bin" / "python")
        if gateway.litellm_venv
        else str(parts.litellm_interpreter())
    )
    paths = GatewayPaths(
        config_dir=str(files.config_dir),
        key_file=str(key_file),
        environment_files=gateway.environment_files,
        litellm_python=python,
        launcher=str(Path(gatewaylauncher.__file__).resolve()),
        control_dir=control_dir(state_dir),
        fleet_key_file=os.path.expanduser(settings.fleet.key_file) if settings.fleet else None,
    )
    return files, key_file, paths


SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; `<color>.sock` and room to spare


def control_dir(state_dir: Path) -> str:
    """Where the instances' control sockets live: the state directory's `control/` (one per
    daemon, so two stacks never share one), or, where that path is too long for a unix
    socket, a folder of the runtime directory named after it."""
    preferred = state_dir / "control"
    if len(str(preferred)) + len("/green.sock") <= SOCKET_PATH_MAX:
        return str(preferred)
    runtime = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"  # noqa: S108 - a 0700 folder in it
    tag = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
    return f"{runtime}/diversityd-{tag}"
