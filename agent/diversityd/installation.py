"""What `diversityctl install` wrote and adopted, and how `uninstall` undoes it. Pure.

The manifest (`<state_dir>/install/manifest.json`, 0600) records every file install wrote
(with the sha256 of its bytes and a backup of what was there before) and every hand-made
unit it adopted: the unit file's bytes (sha256 and a backup copy), its enabled state and the
symlinks that made it so, its active state and its ports. Uninstall decides from the
manifest and what is on disk now: files still as install wrote them are removed (or their
backup put back), files changed since are left alone, adopted unit files are put back byte
for byte, their links re-made, and those that ran are started again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from diversityd.errors import DiversitydError
from diversityd.units import DAEMON_UNIT, GATEWAY_SOCKET, UNIT_PREFIX

MANIFEST_VERSION = 1
INSTALL_DIR = "install"  # under the state directory
MANIFEST_FILE = "manifest.json"
BACKUP_DIR = "backup"
# In the default state directory's install folder: where the manifest is when the
# configuration puts the state elsewhere (uninstall finds it when diversityd.yaml no
# longer reads).
POINTER_FILE = "manifest-location"
SERVER, TRIGGER = "server", "trigger"  # an adopted unit, or a unit that would start it


class ManifestError(DiversitydError):
    """The manifest cannot be read: names the file and the fix."""


_HINT = (
    "restore {path} from a backup, or move it away: uninstall then removes diversityd's "
    "units but cannot put adopted units back"
)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class WrittenFile:
    path: str
    sha256: str  # of the bytes install wrote last
    backup: str | None = None  # a copy of what was there before; None: install created it
    mode: int = 0o644
    backup_mode: int | None = None  # the mode of what was there before


@dataclass(frozen=True)
class AdoptedUnit:
    unit: str
    path: str  # the unit file
    sha256: str
    backup: str  # a copy of the unit file (0600: it may hold secrets)
    unit_file_state: str  # enabled, disabled, static, linked, ... (systemd's word)
    active_state: str  # active, inactive, failed, ...
    links: tuple[tuple[str, str], ...] = ()  # (symlink, target) that enabled it
    ports: tuple[int, ...] = ()
    replaced_by: str | None = None  # diversityd's unit serving its port
    mode: int = 0o644  # the unit file's
    role: str = SERVER  # or TRIGGER: a socket, timer or path unit that would start one
    link_target: str | None = None  # the unit file was a symlink to this
    moved: bool = False  # install took the file out of the unit folder (for the mask)
    masked: bool = False  # install masked it: nothing starts it (Wants=, a socket, a timer)

    @property
    def was_enabled(self) -> bool:
        return self.unit_file_state in ("enabled", "enabled-runtime", "linked", "alias")

    @property
    def was_running(self) -> bool:
        return self.active_state in ("active", "activating", "reloading")


@dataclass(frozen=True)
class Manifest:
    config_dir: str
    unit_dir: str
    written: tuple[WrittenFile, ...] = ()
    adopted: tuple[AdoptedUnit, ...] = ()
    drop_in_dirs: tuple[str, ...] = ()  # directories install created for its drop-ins
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        document = {
            "version": self.version,
            "config_dir": self.config_dir,
            "unit_dir": self.unit_dir,
            "written": [vars(w) for w in self.written],
            "adopted": [
                {**vars(a), "links": [list(link) for link in a.links], "ports": list(a.ports)}
                for a in self.adopted
            ],
            "drop_in_dirs": list(self.drop_in_dirs),
        }
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, path: str) -> Manifest:
        try:
            data = json.loads(text)
            version = data.get("version")
        except (ValueError, AttributeError) as exc:
            raise ManifestError(
                f"{path}: not a diversityd install manifest ({exc})", hint=_HINT.format(path=path)
            ) from None
        if version != MANIFEST_VERSION:
            raise ManifestError(
                f"{path}: manifest version {version!r}, this diversityctl reads {MANIFEST_VERSION}",
                hint="use the diversityctl that installed it (or a newer one)",
            )
        try:
            return cls(
                config_dir=str(data["config_dir"]),
                unit_dir=str(data["unit_dir"]),
                written=tuple(WrittenFile(**w) for w in data.get("written", [])),
                adopted=tuple(
                    AdoptedUnit(
                        **{
                            **a,
                            "links": tuple(tuple(link) for link in a.get("links", [])),
                            "ports": tuple(int(p) for p in a.get("ports", [])),
                        }
                    )
                    for a in data.get("adopted", [])
                ),
                drop_in_dirs=tuple(data.get("drop_in_dirs", [])),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ManifestError(
                f"{path}: not a diversityd install manifest ({type(exc).__name__}: {exc})",
                hint=_HINT.format(path=path),
            ) from None

    def with_written(self, files: Iterable[WrittenFile]) -> Manifest:
        """Record files written now. A file written before keeps its first backup (what was
        there before diversityd), so a second install never loses the user's original."""
        written = {w.path: w for w in self.written}
        for new in files:
            old = written.get(new.path)
            written[new.path] = (
                new if old is None else replace(new, backup=old.backup, backup_mode=old.backup_mode)
            )
        return replace(self, written=tuple(written.values()))

    def with_adopted(self, units: Iterable[AdoptedUnit]) -> Manifest:
        """Record adopted units; one adopted before keeps its first record (its state then)."""
        adopted = {a.unit: a for a in self.adopted}
        for unit in units:
            adopted.setdefault(unit.unit, unit)
        return replace(self, adopted=tuple(adopted.values()))

    def with_drop_in_dirs(self, dirs: Iterable[str]) -> Manifest:
        merged = list(self.drop_in_dirs)
        merged += [d for d in dirs if d not in merged]
        return replace(self, drop_in_dirs=tuple(merged))

    def adopted_names(self) -> frozenset[str]:
        return frozenset(a.unit for a in self.adopted)


# ---------------------------------------------------------------------------------------
# Uninstall's decisions

REMOVE, RESTORE, KEEP, NOTHING = "remove", "restore", "keep", "nothing"


@dataclass(frozen=True)
class FileAction:
    path: str
    action: str  # remove | restore | keep | nothing
    backup: str | None = None
    reason: str = ""
    mode: int | None = None  # to put back with


def plan_written_files(manifest: Manifest, current: Mapping[str, str | None]) -> list[FileAction]:
    """For each file install wrote: `current` maps its path to the sha256 of what is there
    now (None: gone)."""
    actions = []
    for written in manifest.written:
        now = current.get(written.path)
        if now is None:
            if written.backup:
                actions.append(
                    FileAction(
                        written.path,
                        RESTORE,
                        written.backup,
                        "gone; put back as before",
                        written.backup_mode,
                    )
                )
            else:
                actions.append(FileAction(written.path, NOTHING, reason="already gone"))
        elif now == written.sha256:
            if written.backup:
                actions.append(
                    FileAction(
                        written.path,
                        RESTORE,
                        written.backup,
                        "put back as before install",
                        written.backup_mode,
                    )
                )
            else:
                actions.append(FileAction(written.path, REMOVE, reason="written by install"))
        else:
            actions.append(
                FileAction(
                    written.path,
                    KEEP,
                    written.backup,
                    "changed since install: left as it is"
                    + (f" (the original is in {written.backup})" if written.backup else ""),
                )
            )
    return actions


def plan_adopted_files(manifest: Manifest, current: Mapping[str, str | None]) -> list[FileAction]:
    """Adopted unit files are put back byte for byte where they changed or went."""
    actions = []
    for unit in manifest.adopted:
        now = current.get(unit.path)
        if now == unit.sha256:
            actions.append(FileAction(unit.path, NOTHING, unit.backup, "unchanged"))
        else:
            reason = "gone" if now is None else "changed"
            actions.append(
                FileAction(unit.path, RESTORE, unit.backup, f"{reason}; put back from the backup")
            )
    return actions


@dataclass(frozen=True)
class LinkAction:
    link: str
    target: str


def missing_links(manifest: Manifest, current: Mapping[str, str | None]) -> list[LinkAction]:
    """The enabling symlinks of adopted units to re-make (`current`: link -> its target
    now, None when absent)."""
    return [
        LinkAction(link, target)
        for unit in manifest.adopted
        for link, target in unit.links
        if current.get(link) != target
    ]


def is_ours(name: str) -> bool:
    return name == DAEMON_UNIT or name.startswith(UNIT_PREFIX)


def stop_order(names: Iterable[str]) -> list[str]:
    """diversityd first (it would start the others again), then the gateway's instances,
    its socket, and the providers."""

    def rank(name: str) -> tuple[int, str]:
        if name == DAEMON_UNIT:
            return 0, name
        if name.startswith("diversityd-gateway@"):
            return 1, name
        if name == GATEWAY_SOCKET:
            return 2, name
        return 3, name

    return sorted(set(names), key=rank)


@dataclass(frozen=True)
class StateCheck:
    """An adopted unit after uninstall: what it was and what it is."""

    unit: str
    was: tuple[str, str]  # (unit file state, active state) at install
    now: tuple[str, str]
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems


def check_restored(unit: AdoptedUnit, unit_file_state: str, active_state: str) -> StateCheck:
    problems = []
    if unit.was_enabled != (unit_file_state in ("enabled", "enabled-runtime", "linked", "alias")):
        problems.append(f"was {unit.unit_file_state}, is {unit_file_state}")
    if unit.was_running and active_state not in ("active", "activating", "reloading"):
        problems.append(f"was {unit.active_state}, is {active_state}")
    return StateCheck(
        unit.unit,
        (unit.unit_file_state, unit.active_state),
        (unit_file_state, active_state),
        tuple(problems),
    )
