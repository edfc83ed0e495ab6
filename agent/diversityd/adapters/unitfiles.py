"""Owned unit files on disk: templates in, files out, hand edits put back.

A file is ours only when it starts with the ownership marker. A file of one of our names
without the marker (the user's own) is reported and left alone; drop-ins in `<unit>.d/` are
the user's and are never read or written here (systemd merges them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from diversityd import __version__, parts
from diversityd.adapters import llamacpplauncher
from diversityd.adapters.files import read_text_or_none, write_atomic
from diversityd.units import (
    DAEMON_UNIT,
    UNIT_PREFIX,
    RenderedUnit,
    UnitContext,
    is_owned_text,
    render_daemon_unit,
)


def load_templates() -> dict[str, str]:
    folder = resources.files("diversityd") / "data" / "units"
    return {item.name: item.read_text(encoding="utf-8") for item in folder.iterdir()}


def machine_context(python: str, env_dir: Path | None = None) -> UnitContext:
    """What this machine gives rendering; `env_dir`: where the units' environment files go
    (default: the state directory's `env/`)."""
    return UnitContext(
        home=str(Path.home()),
        templates=load_templates(),
        default_llama_server=str(parts.llama_server_binary()),
        default_llama_python=str(parts.llama_cpp_python_interpreter()),
        llama_lib_dir=str(parts.llama_bin_dir()),
        python=python,
        env_dir=str(env_dir or parts.default_state_dir() / "env"),
        llama_python_launcher=str(Path(llamacpplauncher.__file__).resolve()),
    )


def daemon_unit(config_dir: str, python: str) -> RenderedUnit:
    """diversityd.service as `diversityctl install` writes it, run by `python`."""
    return render_daemon_unit(
        config_dir,
        machine_context(python),
        environment={"DIVERSITYD_CACHE_DIR": str(parts.cache_root())},
    )


def own_unit_staleness(unit_dir: Path, config_dir: str, python: str) -> str | None:
    """Why the installed diversityd.service is not what this version would install (after a
    pip or pipx upgrade changed its template); None when it is, or it is not ours."""
    path = unit_dir / DAEMON_UNIT
    text = read_text_or_none(path)
    if text is None or not is_owned_text(text) or text == daemon_unit(config_dir, python).text:
        return None
    return (
        f"{path} is not what diversityd {__version__} installs; "
        "run `diversityctl install` to re-render it"
    )


@dataclass
class SyncResult:
    written: list[str] = field(default_factory=list)  # new or changed by us
    restored: list[str] = field(default_factory=list)  # ours, edited by hand, put back
    foreign: list[str] = field(default_factory=list)  # our name, not our file: left alone
    removed: list[str] = field(default_factory=list)  # ours, no longer configured
    # units whose environment file changed (no daemon-reload needed: read at each start)
    environment_written: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.written or self.restored or self.removed)


def sync_units(
    unit_dir: Path,
    units: Iterable[RenderedUnit],
    *,
    previous: Mapping[str, str] | None = None,
    remove_stale: bool = False,
) -> SyncResult:
    """Write every rendered unit whose bytes differ from the file (ours only).

    `previous` maps unit name -> the text diversityd last wrote; a file that differs from it
    was edited by hand (reported as restored rather than merely rewritten).
    """
    result = SyncResult()
    wanted: set[str] = set()
    units = list(units)
    result.environment_written = write_environment_files(units)
    for unit in units:
        wanted.add(unit.name)
        path = unit_dir / unit.name
        current = read_text_or_none(path)
        if current == unit.text:
            continue
        if current is not None and not is_owned_text(current):
            result.foreign.append(unit.name)
            continue
        write_atomic(path, unit.text, mode=0o644)
        if current is not None and previous is not None and current != previous.get(unit.name):
            result.restored.append(unit.name)
        else:
            result.written.append(unit.name)
    if remove_stale:
        for name in owned_provider_units(unit_dir):
            if name not in wanted:
                (unit_dir / name).unlink()
                result.removed.append(name)
    return result


def owned_provider_units(unit_dir: Path) -> list[str]:
    """The providers' unit files in `unit_dir` that diversityd wrote (its marker first)."""
    if not unit_dir.is_dir():
        return []
    names = []
    for path in sorted(unit_dir.glob(f"{UNIT_PREFIX}*.service")):
        if "@" in path.name:
            continue
        text = read_text_or_none(path)
        if text is not None and is_owned_text(text):
            names.append(path.name)
    return names


def write_environment_files(units: Iterable[RenderedUnit]) -> list[str]:
    """Each unit's environment file (0600: it may hold tokens), before the unit naming it.
    Returns the units whose file's text changed."""
    changed = []
    for unit in units:
        if unit.env_file is None or unit.env_text is None:
            continue
        path = Path(unit.env_file)
        current = read_text_or_none(path)
        if current != unit.env_text or path.stat().st_mode & 0o077:
            write_atomic(path, unit.env_text, mode=0o600)
        if current != unit.env_text:
            changed.append(unit.name)
    return changed
