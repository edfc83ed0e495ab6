"""diversityctl uninstall: stop and remove every unit install wrote (and those the daemon
wrote: no unit of diversityd's is left, as a file or loaded; a unit of yours that merely
has a diversityd name is left alone), put back the files install changed, and the
hand-made units it adopted as they were: the same bytes (a symlink as a symlink), unmasked,
enabled and running as before, on their ports again, with the sockets and timers that
start them.

The manifest is found where the configuration keeps the state, else where install noted
it (when diversityd.yaml no longer reads), else in the default state directory. With
none, uninstall says so and fails rather than report a success that restored nothing.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from diversityd.cli.common import config_dir_option, resolve_config_dir
from diversityd.cli.handmade import (
    expand,
    file_sha,
    forget_pointer,
    install_dir,
    manifest_path,
    pointed_state_dir,
    read_manifest,
    restore_unit_file,
    unit_file_now,
    unmask,
    wait_for_ports,
)
from diversityd.errors import DiversitydError

if TYPE_CHECKING:
    from diversityd.adapters.systemd import Systemd
    from diversityd.config import Settings
    from diversityd.installation import AdoptedUnit, FileAction, Manifest, StateCheck


@dataclass
class UninstallPlan:
    unit_dir: Path
    state_dir: Path
    manifest: Manifest | None
    unit_files: list[Path]  # ours in unit_dir: unit files, drop-ins, enabling links
    foreign: list[Path]  # our names without our marker: left alone
    written: list[FileAction] = field(default_factory=list)
    adopted: list[FileAction] = field(default_factory=list)
    looked_in: list[Path] = field(default_factory=list)  # where a manifest was looked for
    config_problem: str | None = None  # why diversityd.yaml could not be read


def _settings(config_dir: Path | None) -> tuple[Settings | None, str | None]:
    """The configuration's settings, or why they cannot be read (uninstall must work on a
    configuration that no longer validates)."""
    from diversityd.config import load_config
    from diversityd.errors import ConfigError, Severity

    directory = resolve_config_dir(config_dir)
    try:
        config, findings = load_config(directory)
    except ConfigError as exc:
        return None, str(exc)
    if config is None:
        errors = [f.message for f in findings if f.severity is Severity.ERROR]
        return None, "; ".join(errors) or f"{directory} cannot be read"
    return config.settings, None


def find_manifest(
    config_dir: Path | None, state_dir_option: Path | None
) -> tuple[Manifest | None, Path, list[Path], str | None]:
    """(the manifest, its state directory, where it was looked for, why diversityd.yaml
    could not be read)."""
    from diversityd import parts

    settings, problem = _settings(config_dir)
    candidates: list[Path] = []
    if state_dir_option is not None:
        candidates.append(state_dir_option)
    else:
        if settings is not None:
            candidates.append(parts.state_dir(settings.state_dir))
        pointed = pointed_state_dir()
        if pointed is not None:
            candidates.append(pointed)
        candidates.append(parts.state_dir(None))
    looked = list(dict.fromkeys(candidates))
    for state_dir in looked:
        manifest = read_manifest(state_dir)
        if manifest is not None:
            return manifest, state_dir, looked, problem
    return None, looked[0], looked, problem


def our_unit_files(unit_dir: Path) -> tuple[list[Path], list[Path]]:
    """(diversityd's files in unit_dir, files of its names that are not its own)."""
    from diversityd.adapters.files import read_text_or_none
    from diversityd.installation import is_ours
    from diversityd.units import is_owned_text

    ours: list[Path] = []
    foreign: list[Path] = []
    if not unit_dir.is_dir():
        return ours, foreign
    for path in sorted(unit_dir.iterdir()):
        if not is_ours(path.name):
            continue
        if path.is_symlink():
            ours.append(path)
        elif path.is_dir():
            ours.append(path)  # a drop-in folder: its files are looked at one by one
        else:
            text = read_text_or_none(path)
            (ours if text is not None and is_owned_text(text) else foreign).append(path)
    for folder in sorted(unit_dir.glob("*.wants")) + sorted(unit_dir.glob("*.requires")):
        ours += [link for link in sorted(folder.iterdir()) if is_ours(link.name)]
    return ours, foreign


def make_plan(
    config_dir: Path | None, unit_dir_option: Path | None, state_dir_option: Path | None
) -> UninstallPlan:
    from diversityd import parts
    from diversityd.installation import plan_adopted_files, plan_written_files

    manifest, state_dir, looked, problem = find_manifest(config_dir, state_dir_option)
    settings, _ = _settings(config_dir)
    configured = settings.unit_dir if settings is not None else None
    unit_dir = unit_dir_option or (expand(configured) if configured else parts.default_unit_dir())
    if manifest is not None and unit_dir_option is None:
        unit_dir = Path(manifest.unit_dir)
    unit_files, foreign = our_unit_files(unit_dir)
    plan = UninstallPlan(
        unit_dir, state_dir, manifest, unit_files, foreign, looked_in=looked, config_problem=problem
    )
    if manifest is not None:
        current = {w.path: file_sha(Path(w.path)) for w in manifest.written}
        plan.written = plan_written_files(manifest, current)
        adopted = {a.path: unit_file_now(a) for a in manifest.adopted}
        plan.adopted = plan_adopted_files(manifest, adopted)
    return plan


def describe(plan: UninstallPlan) -> list[str]:
    from diversityd.installation import NOTHING

    lines = [f"Stop and remove diversityd's units in {plan.unit_dir}:"]
    lines += [f"  {path.name}" for path in plan.unit_files] or ["  (no unit file left)"]
    lines += [f"  {p}: not diversityd's (no marker): left alone" for p in plan.foreign]
    if plan.manifest is None:
        where = ", ".join(str(manifest_path(d)) for d in plan.looked_in)
        lines.append(f"No manifest at {where}: nothing to put back.")
        return lines
    lines.append(f"Manifest: {manifest_path(plan.state_dir)}")
    lines.append("Files install wrote:")
    lines += [f"  {a.path}: {a.action} ({a.reason})" for a in plan.written]
    lines.append("Adopted units to put back:")
    for unit, action in zip(plan.manifest.adopted, plan.adopted, strict=True):
        file_part = "file unchanged" if action.action == NOTHING else action.reason
        if unit.link_target is not None:
            file_part += f", a symlink to {unit.link_target}"
        if unit.masked:
            file_part += ", unmasked"
        ports = f"; port(s) {', '.join(map(str, unit.ports))}" if unit.ports else ""
        lines.append(
            f"  {unit.unit}: {file_part}; {unit.unit_file_state or 'unit file state unknown'}, "
            f"{unit.active_state or 'state unknown'} again{ports}"
        )
    return lines


async def ours_loaded(systemd: Systemd, plan: UninstallPlan) -> list[str]:
    """diversityd's units the manager has loaded: those whose file is one of ours (a
    template's instances by their template), or gone from our unit folder. A unit of
    yours with a diversityd name is not among them."""
    from diversityd.installation import is_ours

    files = {str(path) for path in plan.unit_files}
    names = [name for name, *_ in await systemd.list_units(["diversityd*"]) if is_ours(name)]
    ours = []
    for name in names:
        fragment = (await systemd.snapshot(name)).fragment_path
        if fragment in files or _gone_from(fragment, plan.unit_dir):
            ours.append(name)
    return ours


def _gone_from(fragment: str, unit_dir: Path) -> bool:
    """A unit still loaded from a file in our unit folder that is gone (removed by an
    earlier, interrupted uninstall)."""
    return bool(fragment) and Path(fragment).parent == unit_dir and not Path(fragment).exists()


async def stop_ours(systemd: Systemd, plan: UninstallPlan) -> list[str]:
    """Stop and disable every unit of diversityd's the manager has loaded or finds on disk."""
    from diversityd.adapters.systemd import SystemdError
    from diversityd.installation import stop_order

    files = [p.name for p in plan.unit_files if p.is_file() and not p.is_symlink()]
    stopped = []
    for name in stop_order(await ours_loaded(systemd, plan)):
        result = await systemd.stop(name, timeout_s=120)
        stopped.append(f"{name} ({result})")
    enableable = [name for name in files if not name.endswith("@.service")]
    if enableable:
        try:
            await systemd.disable(enableable)
        except SystemdError as exc:
            click.echo(f"note: disabling {', '.join(enableable)}: {exc}", err=True)
    return stopped


def remove_files(plan: UninstallPlan) -> None:
    """The files install wrote, then our unit files, drop-in folders and links."""
    from diversityd.adapters.files import write_atomic
    from diversityd.installation import REMOVE, RESTORE

    for action in plan.written:
        path = Path(action.path)
        if action.action == REMOVE:
            path.unlink(missing_ok=True)
        elif action.action == RESTORE and action.backup:
            mode = action.mode if action.mode is not None else 0o600
            write_atomic(path, Path(action.backup).read_bytes(), mode=mode)
    for path in plan.unit_files:
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        elif path.is_dir():
            if any(path.iterdir()):
                click.echo(f"note: {path} holds drop-ins of your own: left there", err=True)
            else:
                _rmdir(path)
    if plan.manifest is not None:
        for folder in plan.manifest.drop_in_dirs:
            _rmdir(Path(folder))
        for action in plan.written:
            _rmdir(Path(action.path).parent)  # e.g. the env/ folder, when now empty


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        return


def restore_adopted_files(plan: UninstallPlan) -> None:
    from diversityd.installation import RESTORE, missing_links

    manifest = plan.manifest
    assert manifest is not None
    for unit, action in zip(manifest.adopted, plan.adopted, strict=True):
        if action.action == RESTORE:
            note = restore_unit_file(unit, install_dir(plan.state_dir))
            if note:
                click.echo(f"note: {note}", err=True)
    links = {
        link: (os.readlink(link) if os.path.islink(link) else None)
        for unit in manifest.adopted
        for link, _ in unit.links
    }
    for todo in missing_links(manifest, links):
        link = Path(todo.link)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(todo.target)


async def restore_adopted_units(systemd: Systemd, plan: UninstallPlan) -> None:
    from diversityd.installation import TRIGGER

    manifest = plan.manifest
    assert manifest is not None
    await systemd.reload_manager()
    for unit in manifest.adopted:
        state = await systemd.unit_file_state(unit.unit)
        if unit.was_enabled and state not in ("enabled", "enabled-runtime", "linked", "alias"):
            await systemd.enable([unit.unit])
    # the servers first, then what starts them (a socket's first client would)
    for unit in sorted(manifest.adopted, key=lambda u: u.role == TRIGGER):
        if unit.was_running:
            await systemd.reset_failed(unit.unit)
            result = await systemd.start(unit.unit, timeout_s=120)
            if result != "done":
                click.echo(f"note: starting {unit.unit}: {result}", err=True)


async def check_after(systemd: Systemd, plan: UninstallPlan) -> tuple[list[StateCheck], list[str]]:
    from diversityd.installation import check_restored

    checks = []
    if plan.manifest is not None:
        for unit in plan.manifest.adopted:
            file_state = await systemd.unit_file_state(unit.unit)
            active = (await systemd.snapshot(unit.unit)).active_state
            checks.append(check_restored(unit, file_state, active))
    return checks, await ours_loaded(systemd, plan)


async def apply(plan: UninstallPlan) -> tuple[list[StateCheck], list[str]]:
    from diversityd.adapters.systemd import Systemd

    systemd = await Systemd.connect()
    try:
        for line in await stop_ours(systemd, plan):
            click.echo(f"stopped {line}")
        remove_files(plan)
        if plan.manifest is not None:
            await unmask(systemd, plan.manifest.adopted)  # before the files go back
        await systemd.reload_manager()
        for name in await ours_loaded(systemd, plan):
            await systemd.reset_failed(name)
        if plan.manifest is not None and plan.manifest.adopted:
            restore_adopted_files(plan)
            await restore_adopted_units(systemd, plan)
        return await check_after(systemd, plan)
    finally:
        systemd.disconnect()


def wait_ports_back(plan: UninstallPlan, timeout_s: float) -> list[str]:
    if plan.manifest is None:
        return []
    want: dict[int, str | None] = {
        port: unit.unit for unit in plan.manifest.adopted if unit.was_running for port in unit.ports
    }
    missing = wait_for_ports(want, timeout_s)
    return [f":{port} is not served by {want[port]} again" for port in missing]


def forget(plan: UninstallPlan) -> str | None:
    """The manifest goes; its backups too, unless a file install wrote was changed since
    (kept, not put back): then its original stays there. Returns that folder, if kept."""
    import shutil

    from diversityd.installation import BACKUP_DIR, KEEP

    manifest_path(plan.state_dir).unlink(missing_ok=True)
    forget_pointer(plan.state_dir)
    if any(a.action == KEEP and a.backup for a in plan.written):
        return str(install_dir(plan.state_dir) / BACKUP_DIR)
    shutil.rmtree(install_dir(plan.state_dir) / BACKUP_DIR, ignore_errors=True)
    _rmdir(install_dir(plan.state_dir))
    return None


def _refuse_blind(plan: UninstallPlan) -> None:
    """No manifest, and diversityd.yaml unreadable: where install kept it is unknown, and
    a success would put nothing back."""
    if plan.manifest is not None or plan.config_problem is None:
        return
    where = ", ".join(str(manifest_path(d)) for d in plan.looked_in)
    raise DiversitydError(
        f"no install manifest at {where}, and the configuration cannot be read "
        f"({plan.config_problem}): nothing was stopped, removed or put back",
        hint="fix diversityd.yaml, or name the state directory install used: "
        "diversityctl uninstall --state-dir DIR",
    )


def _adopted_problems(checks: list[StateCheck], plan: UninstallPlan) -> list[str]:
    problems = [f"{c.unit}: {'; '.join(c.problems)}" for c in checks if not c.ok]
    if plan.manifest is not None:
        problems += [
            f"{unit.unit}: its file is not back as it was ({unit.path})"
            for unit in plan.manifest.adopted
            if not _file_back(unit)
        ]
    return problems


def _file_back(unit: AdoptedUnit) -> bool:
    """The same bytes; a symlink as the same symlink (its target may be yours to change)."""
    if unit.link_target is not None:
        path = Path(unit.path)
        return path.is_symlink() and os.readlink(path) == unit.link_target
    return unit_file_now(unit) == unit.sha256


@click.command()
@config_dir_option
@click.option(
    "--unit-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where diversityd's units are [default: the one install recorded].",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where install kept its manifest [default: diversityd.yaml's state_dir, else where "
    "install noted it, else the default].",
)
@click.option("--dry-run", is_flag=True, help="Print what uninstall would do; change nothing.")
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds to wait for adopted units to serve their ports again.",
)
def uninstall(
    config_dir: Path | None,
    unit_dir: Path | None,
    state_dir: Path | None,
    dry_run: bool,
    wait_s: float,
) -> None:
    """Stop and remove diversityd's units; put back what install changed and adopted.

    Every unit install (or the daemon) wrote is stopped, disabled and removed; files install
    wrote are removed, or put back as they were; adopted hand-made units get their files
    back byte for byte (a symlink as a symlink), unmasked, their enabled and active state,
    their ports, and the sockets and timers that start them.
    """
    plan = make_plan(config_dir, unit_dir, state_dir)
    if dry_run:
        click.echo("diversityctl uninstall --dry-run: nothing is stopped or removed.\n")
        click.echo("\n".join(describe(plan)))
        return
    _refuse_blind(plan)
    checks, left = asyncio.run(apply(plan))
    problems = _adopted_problems(checks, plan)
    problems += wait_ports_back(plan, wait_s)
    problems += [f"{name} is still loaded" for name in left]
    remaining, _foreign = our_unit_files(plan.unit_dir)
    problems += [f"{path} is still there" for path in remaining]
    for check in checks:
        click.echo(f"restored {check.unit}: {check.now[0]}, {check.now[1]}")
    if problems:
        for problem in problems:
            click.echo(f"diversityctl: {problem}", err=True)
        raise DiversitydError(
            "uninstall did not put everything back",
            hint=f"the manifest and backups are kept in {install_dir(plan.state_dir)}",
        )
    kept = forget(plan)
    if kept:
        click.echo(f"note: the originals of files you changed since install are in {kept}")
    if plan.manifest is None:
        click.echo(
            f"uninstalled: no diversityd unit left in {plan.unit_dir} (no install manifest: "
            "nothing was put back)"
        )
        return
    click.echo(f"uninstalled: no diversityd unit left in {plan.unit_dir}")
