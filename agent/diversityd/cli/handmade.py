"""Hand-made units as the user manager sees them, taken over by `install --adopt` and given
back by `uninstall`; and the install manifest both read.

Taking over: every socket, timer or path unit that would start an adopted unit is stopped
and disabled; the unit is stopped and disabled, its file taken out of the user's unit
folder (a backup is in the manifest) and the unit masked, so that nothing starts it again
behind diversityd's back (another unit's `Wants=`, a socket, a timer). Giving back undoes
each step: unmask, the file (a symlink as a symlink), its enabling links, enabled and
running as before, the triggers too.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from diversityd.errors import DiversitydError

if TYPE_CHECKING:
    from diversityd.adapters.systemd import ManagedUnit, Systemd
    from diversityd.installation import AdoptedUnit, Manifest

MASK_TARGET = "/dev/null"
ANY = "*"  # a port held by anyone (a socket systemd itself holds)


# ---------------------------------------------------------------------------------------
# The manifest and its files


def expand(path: str) -> Path:
    return Path(os.path.expanduser(path))


def install_dir(state_dir: Path) -> Path:
    from diversityd.installation import INSTALL_DIR

    return state_dir / INSTALL_DIR


def manifest_path(state_dir: Path) -> Path:
    from diversityd.installation import MANIFEST_FILE

    return install_dir(state_dir) / MANIFEST_FILE


def pointer_path() -> Path:
    """Where install notes a manifest kept outside the default state directory."""
    from diversityd import parts
    from diversityd.installation import POINTER_FILE

    return install_dir(parts.state_dir(None)) / POINTER_FILE


def read_manifest(state_dir: Path) -> Manifest | None:
    from diversityd.installation import Manifest

    path = manifest_path(state_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DiversitydError(f"cannot read {path}: {exc.strerror}") from None
    return Manifest.from_json(text, str(path))


def pointed_state_dir() -> Path | None:
    """The state directory the pointer names, if there is one."""
    try:
        text = pointer_path().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return Path(text) if text.startswith("/") else None


def write_manifest(state_dir: Path, manifest: Manifest) -> None:
    from diversityd import parts
    from diversityd.adapters.files import write_atomic

    install_dir(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(manifest_path(state_dir), manifest.to_json(), mode=0o600)
    if state_dir.resolve() != parts.state_dir(None).resolve():
        write_atomic(pointer_path(), f"{state_dir}\n", mode=0o600)


def forget_pointer(state_dir: Path) -> None:
    if pointed_state_dir() == state_dir:
        pointer_path().unlink(missing_ok=True)


def file_sha(path: Path) -> str | None:
    from diversityd.installation import sha256_bytes

    try:
        return sha256_bytes(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def is_mask(path: Path) -> bool:
    return path.is_symlink() and os.readlink(path) == MASK_TARGET


def unit_file_now(unit: AdoptedUnit) -> str | None:
    """The sha256 of an adopted unit's file as the unit finds it now; None when it is gone,
    is install's mask, or (a symlink at install) no longer links where it did."""
    path = Path(unit.path)
    if is_mask(path):
        return None
    if unit.link_target is not None and (
        not path.is_symlink() or os.readlink(path) != unit.link_target
    ):
        return None
    return file_sha(path)


def symlinks_to(unit_dir: Path, unit: str) -> list[tuple[str, str]]:
    """The symlinks that enable `unit` in the user's unit dir (`*.wants/`, ...)."""
    links = []
    for folder in (
        sorted(unit_dir.glob("*.wants"))
        + sorted(unit_dir.glob("*.requires"))
        + sorted(unit_dir.glob("*.upholds"))
    ):
        link = folder / unit
        if link.is_symlink():
            links.append((str(link), os.readlink(link)))
    return links


def enabling_links(unit_dir: Path, unit_file: Path, unit: str) -> list[tuple[str, str]]:
    """Where `systemctl --user enable` put links (the user's config dir), and beside the
    unit file and diversityd's unit dir, when those differ."""
    from diversityd import parts

    links: list[tuple[str, str]] = []
    for folder in dict.fromkeys([parts.default_unit_dir(), unit_file.parent, unit_dir]):
        links += [link for link in symlinks_to(folder, unit) if link not in links]
    return links


# ---------------------------------------------------------------------------------------
# Reading the manager


def read_managed(names: Sequence[str]) -> tuple[dict[str, ManagedUnit], str | None]:
    """What the user manager says of these units and of the units that trigger them
    (states, ExecStart as systemd parsed it); and why it could not be asked."""
    from diversityd.adapters.systemd import Systemd, SystemdError

    async def read() -> dict[str, ManagedUnit]:
        systemd = await Systemd.connect()
        try:
            managed: dict[str, ManagedUnit] = {}
            for name in names:
                managed[name] = await systemd.managed_unit(name)
            for unit in list(managed.values()):
                for trigger in unit.triggered_by:
                    if trigger not in managed:
                        managed[trigger] = await systemd.managed_unit(trigger)
            return managed
        finally:
            systemd.disconnect()

    if not names:
        return {}, None
    try:
        return asyncio.run(read()), None
    except SystemdError as exc:
        return {}, str(exc)


def wait_for_ports(want: Mapping[int, str | None], timeout_s: float) -> list[int]:
    """Wait until each port is held by a process of the unit `want[port]` (ANY: by anyone;
    None: by no one). Returns the ports that never got there."""
    from diversityd.adapters.discovery import listening_holders

    deadline = time.monotonic() + timeout_s
    while True:
        holders = listening_holders(want)
        pending = []
        for port, wanted in want.items():
            units = [h.unit for h in holders.get(port, [])]
            if wanted is None:
                ok = port not in holders
            elif wanted == ANY:
                ok = port in holders
            else:
                ok = wanted in units
            if not ok:
                pending.append(port)
        if not pending or time.monotonic() > deadline:
            return pending
        time.sleep(0.25)


# ---------------------------------------------------------------------------------------
# Taking over, giving back


async def take_over(systemd: Systemd, units: Iterable[AdoptedUnit]) -> None:
    """Stop and disable each (its triggers first: they would start it again); an adopted
    server's file leaves the unit folder and the unit is masked."""
    from diversityd.installation import TRIGGER

    ordered = sorted(units, key=lambda u: u.role != TRIGGER)
    for unit in ordered:
        result = await systemd.stop(unit.unit, timeout_s=120)
        if result != "done":
            raise DiversitydError(
                f"{unit.unit} did not stop ({result}); what was changed so far is in the manifest",
                hint=f"journalctl --user -u {unit.unit}; then diversityctl uninstall puts "
                "everything back",
            )
        await systemd.disable([unit.unit])
    for unit in ordered:
        if unit.moved:
            _remove(Path(unit.path))  # its bytes are in the backup
        if unit.masked:
            await systemd.mask([unit.unit])


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def restore_unit_file(unit: AdoptedUnit, keep_dir: Path) -> str | None:
    """Put an adopted unit's file back (a symlink as the symlink it was); a file changed
    since install is kept in `keep_dir` first. Returns a note for the user, if any."""
    from diversityd.adapters.files import write_atomic

    path = Path(unit.path)
    backup = Path(unit.backup).read_bytes()
    note = None
    if is_mask(path):
        path.unlink()  # install's mask, if unmasking left it
    if unit.link_target is not None:
        target = path.parent / unit.link_target
        if not target.exists():
            write_atomic(target, backup, mode=unit.mode)
        elif hashlib.sha256(target.read_bytes()).hexdigest() != unit.sha256:
            note = f"{target} (the link's target) changed since install: left as it is"
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(unit.link_target)
        return note
    if path.exists() or path.is_symlink():
        keep = keep_dir / f"{path.name}.changed-after-install"
        if path.exists():
            write_atomic(keep, path.read_bytes(), mode=0o600)
            note = f"{path} had changed; that version is kept at {keep}"
        path.unlink()
    write_atomic(path, backup, mode=unit.mode)
    return note


async def unmask(systemd: Systemd, units: Iterable[AdoptedUnit]) -> None:
    masked = [u.unit for u in units if u.masked]
    if masked:
        await systemd.unmask(masked)


def stop_order_of(units: Iterable[AdoptedUnit]) -> list[AdoptedUnit]:
    """Servers before their triggers (a socket's first connection would start one)."""
    from diversityd.installation import TRIGGER

    return sorted(units, key=lambda u: u.role == TRIGGER)
