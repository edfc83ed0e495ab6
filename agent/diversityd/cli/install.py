"""diversityctl install: write and enable diversityd.service for a configuration; look at
what is already there first, say what it would do (`--dry-run`), and take over hand-made
units (`--adopt`) in a way `diversityctl uninstall` undoes.

What install wrote and adopted is recorded in `<state_dir>/install/manifest.json` (0600),
with backups beside it, before anything is changed. Install is idempotent: run again (after
`pipx upgrade diversityd`, say) it re-renders diversityd.service, writes it only when it
changed, and restarts a running daemon on the new unit.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from diversityd.cli.common import config_dir_option, print_findings, resolve_config_dir
from diversityd.cli.handmade import (
    ANY,
    enabling_links,
    expand,
    file_sha,
    install_dir,
    manifest_path,
    read_managed,
    read_manifest,
    take_over,
    wait_for_ports,
    write_manifest,
)
from diversityd.errors import DiversitydError, Severity, UsageError

if TYPE_CHECKING:
    from diversityd.adapters.discovery import Machine
    from diversityd.adapters.systemd import ManagedUnit
    from diversityd.adoption import Adoption, Proposal, StartingFiles
    from diversityd.installation import AdoptedUnit, Manifest
    from diversityd.validation import Report

PORT_WAIT_S = 30.0  # for an old unit's port to be free once it stopped
RUNNING_STATES = ("active", "activating", "reloading")


# ---------------------------------------------------------------------------------------
# The plan


@dataclass
class PlannedFile:
    path: Path
    data: bytes = field(repr=False)
    mode: int
    what: str
    names: tuple[str, ...] = ()  # variables in it (secrets: names only)

    def status(self) -> str:
        from diversityd.installation import sha256_bytes

        current = file_sha(self.path)
        if current is None:
            return "new"
        return "unchanged" if current == sha256_bytes(self.data) else "changed"


@dataclass
class InstallPlan:
    directory: Path
    unit_dir: Path
    state_dir: Path
    report: Report
    machine: Machine
    proposal: Proposal
    states: dict[str, tuple[str, str]]
    states_problem: str | None
    manifest: Manifest | None
    files: list[PlannedFile]  # what this run writes, the daemon's unit last
    adopt_files: list[PlannedFile]  # what --adopt writes (shown by a dry run without it)
    adopt: bool
    now: bool
    managed: dict[str, ManagedUnit] = field(default_factory=dict)  # as the manager has them
    starting: StartingFiles | None = None  # no configuration yet: the files proposed

    @property
    def taking_over(self) -> list[Adoption]:
        adopted = self.manifest.adopted_names() if self.manifest else frozenset()
        return [a for a in self.proposal.taking_over if a.found.unit not in adopted]


def _providers(config: Any) -> list[Any]:
    from diversityd.adoption import ProviderAddress

    return [
        ProviderAddress(p.name, p.type, p.address[0], p.address[1], p.active)
        for p in config.providers.values()
        if p.is_local
    ]


def _served(report: Report) -> frozenset[str]:
    catalog = report.catalog
    if catalog is None:
        return frozenset()
    return frozenset(name for name in catalog.deployments if catalog.is_served(name))


def _parse_settings(text: str | None, path: Path) -> dict[str, Any] | None:
    import yaml

    if text is None:
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None  # validation reports it, with its line
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            f"{path}: expected a mapping of settings",
            hint="diversityd.yaml holds keys such as `providers:` and `gateway:`",
        )
    return data


def _litellm_configs(found: Sequence[Any]) -> dict[str, Any]:
    import yaml

    configs: dict[str, Any] = {}
    for server in found:
        if not server.config_file:
            continue
        try:
            configs[server.config_file] = yaml.safe_load(
                Path(server.config_file).read_text(encoding="utf-8")
            )
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # its models are not compared; the dry run says nothing about them
    return configs


def _validate(texts: Mapping[str, str | None], directory: Path) -> Report:
    import socket

    from diversityd.config import parse_config
    from diversityd.validation import validate

    config, findings = parse_config(texts, config_dir=str(directory), hostname=socket.gethostname())
    return validate(config, findings, os.environ)


def make_plan(
    directory: Path,
    *,
    adopt: bool,
    now: bool,
    keep_gpu_layers: bool,
    unit_dir_option: Path | None,
) -> InstallPlan:
    """Everything install would do, decided before anything is written."""
    from diversityd import parts
    from diversityd.adapters import discovery
    from diversityd.adapters.unitfiles import daemon_unit as render_own_unit
    from diversityd.adoption import ProposalInputs, propose, render_settings, starting_files
    from diversityd.config import MAPPINGS_FILE, PROVIDERS_FILE, SETTINGS_FILE, read_config_texts

    texts = read_config_texts(directory)
    # The hand-made units, and what the user manager says of them: their states, what
    # triggers them, and their command lines as systemd itself parsed them.
    units = discovery.hand_made_units(os.environ)
    managed, problem = read_managed([u.name for u in units if u.scope == "user"])
    loaded = {name: unit.loaded for name, unit in managed.items() if unit.loaded}
    running = frozenset(n for n, u in managed.items() if u.active_state in RUNNING_STATES)
    starting = None
    if texts.get(PROVIDERS_FILE) is None and texts.get(MAPPINGS_FILE) is None:
        # No configuration yet: start from what the machine runs.
        starting = starting_files(discovery.find_servers(os.environ, units, loaded), running)
        texts = {**texts, PROVIDERS_FILE: starting.providers, MAPPINGS_FILE: starting.mappings}
    current = _validate(texts, directory)
    if current.config is None:
        print_findings(current.of(Severity.ERROR))
        raise UsageError(f"the configuration in {directory} cannot be read; nothing installed")
    config = current.config
    settings_path = directory / SETTINGS_FILE
    existing = _parse_settings(texts.get(SETTINGS_FILE), settings_path)
    owned_models = [o.model_path for o in config.settings.owned.values() if o.model_path]
    ports = [p.address[1] for p in config.providers.values() if p.is_local]
    ports.append(config.settings.gateway.port)
    machine = discovery.look(
        os.environ,
        ports,
        [m for m in owned_models if m.startswith(("/", "~"))],
        units=units,
        loaded=loaded,
    )
    home = str(Path.home())
    key_candidates = [directory / "master.key"]
    if config.settings.gateway.master_key_file:
        key_candidates.append(expand(config.settings.gateway.master_key_file))
    proposal = propose(
        machine.found,
        _providers(config),
        ProposalInputs(
            config_dir=str(directory),
            home=home,
            existing_settings=existing,
            keep_gpu_layers=keep_gpu_layers,
            litellm_venvs={
                unit: found.venv
                for unit, found in machine.litellm.items()
                if found.venv and found.version
            },
            litellm_configs=_litellm_configs(machine.found),
            served_models=_served(current),
            present_files=frozenset(str(p) for p in key_candidates if p.exists()),
            running_units=running,
        ),
    )
    report = current
    if proposal.changed and adopt:
        report = _validate({**texts, SETTINGS_FILE: render_settings(proposal.settings)}, directory)
    settings = (report.config or config).settings
    unit_dir = unit_dir_option or (
        expand(settings.unit_dir) if settings.unit_dir else parts.default_unit_dir()
    )
    state_dir = parts.state_dir(settings.state_dir)
    adopt_files: list[PlannedFile] = []
    if proposal.changed:
        adopt_files.append(
            PlannedFile(
                settings_path,
                str(render_settings(proposal.settings)).encode(),
                0o600,
                "diversityd.yaml, with the adopted units"
                + ("; its comments are not kept" if existing is not None else ""),
            )
        )
    adopt_files += [
        PlannedFile(expand(s.path), s.text.encode(), 0o600, "secrets (0600)", s.names)
        for s in proposal.secret_files
    ]
    adopt_files += [
        PlannedFile(
            unit_dir / f"{d.unit}.d" / d.name, d.text.encode(), 0o644, "drop-in (file names)"
        )
        for d in proposal.drop_ins
    ]
    files = list(adopt_files) if adopt else []
    daemon_unit = render_own_unit(str(directory), sys.executable)
    files.append(
        PlannedFile(unit_dir / daemon_unit.name, daemon_unit.text.encode(), 0o644, "the daemon")
    )
    states = {name: (u.unit_file_state, u.active_state) for name, u in managed.items()}
    return InstallPlan(
        directory=directory,
        unit_dir=unit_dir,
        state_dir=state_dir,
        report=report,
        machine=machine,
        proposal=proposal,
        states=states,
        states_problem=problem,
        manifest=read_manifest(state_dir),
        files=files,
        adopt_files=adopt_files,
        adopt=adopt,
        now=now or adopt,
        managed=managed,
        starting=starting,
    )


# ---------------------------------------------------------------------------------------
# Saying it


def _state_text(plan: InstallPlan, unit: str) -> str:
    state = plan.states.get(unit)
    if state is None:
        return "state unknown"
    return f"{state[0] or 'no unit file state'}, {state[1]}"


def describe_machine(plan: InstallPlan) -> list[str]:
    machine = plan.machine
    lines = ["Found on this machine"]
    if not machine.found:
        lines.append(
            "  no hand-made unit running llama-server, llama-cpp-python, Ollama, vLLM or LiteLLM"
        )
    for server in machine.found:
        where = f"{server.scope} unit"
        if server.scope == "user":
            where += f", {_state_text(plan, server.unit)}"
        lines.append(f"  {server.unit} ({where}): {server.describe()}")
        read = "as the user manager parsed it" if server.read_by_systemd else "as systemd reads it"
        lines.append(f"      {server.path}: runs {server.executable} ({read})")
        triggers = plan.managed[server.unit].triggered_by if server.unit in plan.managed else ()
        if triggers:
            lines.append(f"      started by {', '.join(triggers)} too")
    if plan.states_problem:
        lines.append(f"  (unit states unknown: {plan.states_problem})")
    for name, path in machine.binaries.items():
        if name == "llama-server":
            cached = machine.cached_llama_server
            used = (
                f"{path} (on PATH: used rather than a build)"
                if path
                else f"{cached} (packaging/'s build)"
                if cached
                else "none: put it on PATH or run packaging/setup.sh"
            )
            lines.append(f"  llama-server (for providers without `executable`): {used}")
        else:
            lines.append(f"  {name}: {path or 'not on PATH'}")
    lines += _executable_notes(plan)
    for unit, found in machine.litellm.items():
        source = "on PATH" if unit == "PATH" else f"{unit}'s"
        if found.version:
            lines.append(
                f"  LiteLLM: {source} {found.python} can run the gateway (litellm {found.version})"
            )
        else:
            lines.append(f"  LiteLLM: {source} {found.python}: {found.problem}")
    if not any(f.version and f.venv for f in machine.litellm.values()):
        lines.append(
            "  LiteLLM for the gateway: "
            + (
                f"{machine.default_litellm} (packaging/'s venv)"
                if machine.default_litellm
                else "none: run packaging/install-litellm.sh or set gateway.litellm_venv"
            )
        )
    for path, (target, problem) in machine.models.items():
        lines.append(f"  model: {problem}" if problem else f"  model {path} -> {target} (a GGUF)")
    lines.append(f"  GPUs: {machine.gpus}")
    for port in sorted(machine.ports):
        holder = machine.ports[port]
        who = holder.unit or holder.process or "a process of another user"
        lines.append(
            f"  port {port}: held by {who}" + (f" (pid {holder.pid})" if holder.pid else "")
        )
    if machine.linger is None:
        lines.append("  lingering: unknown (no /var/lib/systemd/linger on this machine)")
    elif machine.linger:
        lines.append("  lingering: on (your user services run without a login)")
    else:
        lines.append(
            "  lingering: OFF: your user services stop when you log out; "
            f"fix: sudo loginctl enable-linger {machine.user}"
        )
    return lines


def _executable_notes(plan: InstallPlan) -> list[str]:
    """Owned servers without `executable`: what they run, and a binary on PATH to prefer."""
    config = plan.report.config
    if config is None:
        return []
    machine = plan.machine
    defaults = {
        "llama-server": machine.cached_llama_server,
        "ollama": "/usr/local/bin/ollama",
        "vllm": None,
    }
    lines = []
    for name, owned in config.settings.owned.items():
        if owned.executable or owned.server not in defaults:
            continue
        on_path = machine.binaries.get(owned.server)
        default = defaults[owned.server]
        if on_path and on_path != default:
            lines.append(
                f"  providers.{name} names no executable: set `executable: {on_path}` to run "
                f"the {owned.server} on PATH" + (f" rather than {default}" if default else "")
            )
        elif not on_path and not (default and Path(default).exists()):
            lines.append(
                f"  providers.{name} names no executable and no {owned.server} is found: put "
                "it on PATH (or run packaging/setup.sh) and set `executable:`"
            )
    return lines


def describe_adoption(plan: InstallPlan) -> list[str]:
    from diversityd.adoption import GATEWAY, OWN, SKIP, WATCH

    proposal = plan.proposal
    if not proposal.adoptions:
        return []
    adopted = plan.manifest.adopted_names() if plan.manifest else frozenset()
    title = "Adopt" if plan.adopt else "With --adopt (not asked: these units are left as they are)"
    lines = [title]
    for adoption in proposal.adoptions:
        found = adoption.found
        if adoption.action == OWN:
            lines.append(
                f"  {found.unit} -> providers.{adoption.provider}: {adoption.new_unit} "
                f"serves :{found.port}"
                + (" (diversityd.yaml's entry kept)" if adoption.kept_existing else "")
            )
            entry = adoption.entry
            if found.n_gpu_layers is not None and "n_gpu_layers" in entry:
                layers = entry["n_gpu_layers"]
                if layers == "auto":
                    lines.append(
                        f"      n_gpu_layers: auto, sized from free VRAM (the unit says "
                        f"--n-gpu-layers {found.n_gpu_layers}; --keep-gpu-layers copies it)"
                    )
                else:
                    lines.append(
                        f"      n_gpu_layers: {layers} (the unit's; the plan would size it: auto)"
                    )
        elif adoption.action == GATEWAY:
            lines.append(
                f"  {found.unit} -> diversityd's gateway (diversityd-gateway.socket) on "
                f":{adoption.entry.get('port', found.port)}"
            )
        elif adoption.action == WATCH:
            lines.append(f"  {found.unit} -> providers.{adoption.provider}: watched (owned: false)")
        elif adoption.action == SKIP:
            lines.append(f"  {found.unit}: left alone: {adoption.reason}")
        if found.unit in adopted:
            lines.append("      adopted by an earlier install (recorded in the manifest)")
        lines += [f"      note: {note}" for note in adoption.notes]
    lines += [f"  note: {note}" for note in proposal.notes]
    if not plan.adopt and plan.adopt_files:
        lines.append("  --adopt would also write:")
        lines += ["  " + line for line in describe_files(plan, plan.adopt_files)]
    if not plan.adopt and plan.taking_over:
        lines.append(
            "  --adopt would back up, stop, disable and mask: "
            + ", ".join(a.found.unit for a in plan.taking_over)
        )
    return lines


def describe_files(plan: InstallPlan, files: Sequence[PlannedFile]) -> list[str]:
    from diversityd.installation import BACKUP_DIR

    lines = []
    for planned in files:
        status = planned.status()
        extra = f"; variables {', '.join(planned.names)}" if planned.names else ""
        backup = ""
        if status == "changed":
            backup = (
                f"; the present file is backed up to {install_dir(plan.state_dir) / BACKUP_DIR}"
            )
        lines.append(f"  {planned.path} ({status}: {planned.what}{extra}{backup})")
    return lines


def describe_actions(plan: InstallPlan) -> list[str]:
    from diversityd.installation import BACKUP_DIR

    lines = ["Write", *describe_files(plan, plan.files)]
    lines.append(f"  {manifest_path(plan.state_dir)} (what install wrote and adopted, 0600)")
    taking = plan.taking_over
    if plan.adopt and taking:
        lines.append(
            f"Back up to {install_dir(plan.state_dir) / BACKUP_DIR}, stop, disable and mask: "
            + ", ".join(a.found.unit for a in taking)
        )
    lines.append(
        "Enable diversityd.service"
        + (" and (re)start it: it starts its units on their ports" if plan.now else "")
    )
    return lines


def print_dry_run(plan: InstallPlan) -> None:
    from diversityd.adoption import render_settings

    click.echo("diversityctl install --dry-run: nothing is written, started or stopped.\n")
    for block in (describe_machine(plan), describe_adoption(plan), describe_actions(plan)):
        if block:
            click.echo("\n".join(block) + "\n")
    if plan.starting is not None:
        from diversityd.config import MAPPINGS_FILE, PROVIDERS_FILE

        click.echo(
            f"No configuration in {plan.directory} yet: write these two files there to start "
            "from (what the proposal above assumes), then run install again.\n"
        )
        click.echo(f"Proposed {PROVIDERS_FILE}:")
        click.echo(plan.starting.providers)
        click.echo(f"Proposed {MAPPINGS_FILE}:")
        click.echo(plan.starting.mappings)
    if plan.proposal.changed:
        click.echo(
            "Proposed diversityd.yaml" + ("" if plan.adopt else " (written with --adopt)") + ":"
        )
        click.echo(render_settings(plan.proposal.settings))


# ---------------------------------------------------------------------------------------
# Doing it


def _backup(state_dir: Path, path: Path, data: bytes, mode: int) -> str:
    from diversityd.adapters.files import write_atomic
    from diversityd.installation import BACKUP_DIR, sha256_bytes

    folder = install_dir(state_dir) / BACKUP_DIR
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = folder / f"{path.name}.{sha256_bytes(data)[:12]}"
    write_atomic(target, data, mode=mode)
    return str(target)


def record_adopted(plan: InstallPlan, adoptions: Sequence[Adoption]) -> list[AdoptedUnit]:
    """What uninstall needs to give each unit back: its file's bytes (a backup), a symlink's
    target, its states and enabling links, and the units that would start it (a socket,
    a timer: stopped and disabled with it, given back with it)."""
    from diversityd import parts
    from diversityd.installation import SERVER, TRIGGER

    records: list[AdoptedUnit] = []
    for adoption in adoptions:
        found = adoption.found
        path = Path(found.path)
        # A file in the user's own unit folder leaves it, or the mask could not be made
        # (a mask elsewhere would not shadow it); one in a folder below is shadowed.
        moved = path.parent == parts.default_unit_dir()
        records.append(
            _record(
                plan,
                found.unit,
                path,
                role=SERVER,
                port=found.port,
                replaced_by=adoption.new_unit,
                moved=moved,
            )
        )
        managed = plan.managed.get(found.unit)
        for trigger in managed.triggered_by if managed is not None else ():
            trigger_unit = plan.managed.get(trigger)
            if trigger_unit is None or not trigger_unit.fragment_path:
                continue
            if any(r.unit == trigger for r in records):
                continue  # it starts two adopted units
            fragment = Path(trigger_unit.fragment_path)
            records.append(
                _record(
                    plan, trigger, fragment, role=TRIGGER, port=None, replaced_by=None, moved=False
                )
            )
    return records


def _record(
    plan: InstallPlan,
    unit: str,
    path: Path,
    *,
    role: str,
    port: int | None,
    replaced_by: str | None,
    moved: bool,
) -> AdoptedUnit:
    from diversityd.installation import SERVER, AdoptedUnit, sha256_bytes

    data = path.read_bytes()
    state = plan.states.get(unit, ("", ""))
    return AdoptedUnit(
        unit=unit,
        path=str(path),
        sha256=sha256_bytes(data),
        backup=_backup(plan.state_dir, path, data, 0o600),
        unit_file_state=state[0],
        active_state=state[1],
        links=tuple(enabling_links(plan.unit_dir, path, unit)),
        ports=(port,) if port else (),
        replaced_by=replaced_by,
        mode=path.stat().st_mode & 0o7777,
        role=role,
        link_target=os.readlink(path) if path.is_symlink() else None,
        moved=moved,
        masked=role == SERVER,
    )


def write_files(plan: InstallPlan, manifest: Manifest) -> Manifest:
    """Record, then write (a crash in between leaves files uninstall knows about)."""
    from diversityd.adapters.files import write_atomic
    from diversityd.installation import WrittenFile, sha256_bytes

    written = []
    drop_in_dirs = []
    for planned in plan.files:
        backup = None
        backup_mode = None
        if planned.path.exists():
            old = planned.path.read_bytes()
            if old != planned.data:
                backup = _backup(plan.state_dir, planned.path, old, 0o600)
                backup_mode = stat.S_IMODE(planned.path.stat().st_mode)
        if planned.path.suffix == ".conf" and not planned.path.parent.exists():
            drop_in_dirs.append(str(planned.path.parent))
        written.append(
            WrittenFile(
                str(planned.path), sha256_bytes(planned.data), backup, planned.mode, backup_mode
            )
        )
    manifest = manifest.with_written(written).with_drop_in_dirs(drop_in_dirs)
    write_manifest(plan.state_dir, manifest)
    for planned in plan.files:
        if planned.status() != "unchanged":
            if planned.mode == 0o600:
                planned.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(planned.path, planned.data, mode=planned.mode)
    return manifest


async def apply_systemd(
    plan: InstallPlan,
    taking: Sequence[Adoption],
    records: Sequence[AdoptedUnit],
    daemon_changed: bool,
) -> str:
    from diversityd.adapters.systemd import Systemd
    from diversityd.units import DAEMON_UNIT

    systemd = await Systemd.connect()
    try:
        await take_over(systemd, records)
        await systemd.reload_manager()
        await systemd.enable([DAEMON_UNIT])
        active = (await systemd.snapshot(DAEMON_UNIT)).active_state == "active"
        if plan.now or (active and daemon_changed):
            if taking:
                stuck = wait_for_ports({a.found.port: None for a in taking}, PORT_WAIT_S)
                if stuck:
                    raise DiversitydError(
                        f"port(s) {', '.join(map(str, stuck))} still held after the old units "
                        "stopped",
                        hint="see who holds them: ss -ltnp; diversityctl uninstall puts the old "
                        "units back",
                    )
            result = await systemd.restart(DAEMON_UNIT, timeout_s=120)
            if result != "done":
                raise DiversitydError(
                    f"diversityd.service did not start ({result})",
                    hint="journalctl --user -u diversityd",
                )
            return "restarted" if active else "started"
        return "enabled"
    finally:
        systemd.disconnect()


def check_takeover(plan: InstallPlan, taking: Sequence[Adoption], timeout_s: float) -> None:
    from diversityd.adoption import GATEWAY

    want: dict[int, str | None] = {}
    for adoption in taking:
        # The gateway's socket is held by systemd itself (and every instance on it).
        want[adoption.found.port] = ANY if adoption.action == GATEWAY else adoption.new_unit
    missing = wait_for_ports(want, timeout_s)
    if missing:
        raise DiversitydError(
            f"diversityd's units do not serve port(s) {', '.join(map(str, missing))} after "
            f"{timeout_s:g} s",
            hint=f"diversityctl status --config-dir {plan.directory}; "
            "`diversityctl uninstall` puts the old units back",
        )
    for adoption in taking:
        click.echo(
            f"  :{adoption.found.port} served by {adoption.new_unit} (was {adoption.found.unit})"
        )


@click.command()
@config_dir_option
@click.option("--now", is_flag=True, help="Also start (or restart) diversityd.service.")
@click.option(
    "--unit-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where diversityd.service is written [default: diversityd.yaml `unit_dir`, else "
    "$XDG_CONFIG_HOME/systemd/user]; the daemon writes the providers' units to `unit_dir`.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print what install finds and would write, start, stop and adopt; change nothing.",
)
@click.option(
    "--adopt",
    is_flag=True,
    help="Take over the hand-made units found: write their diversityd.yaml entries, back "
    "them up, stop and disable them; diversityd's units serve on the same ports (implies "
    "--now). `diversityctl uninstall` puts them back.",
)
@click.option(
    "--keep-gpu-layers",
    is_flag=True,
    help="Copy an adopted unit's fixed --n-gpu-layers as your own count instead of `auto`.",
)
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=600.0,
    show_default=True,
    help="With --adopt: seconds to wait for diversityd's units to serve the old ports.",
)
def install(  # noqa: PLR0917 - click passes every option as an argument
    config_dir: Path | None,
    now: bool,
    unit_dir: Path | None,
    dry_run: bool,
    adopt: bool,
    keep_gpu_layers: bool,
    wait_s: float,
) -> None:
    """Write and enable diversityd.service (a systemd user unit) for this configuration.

    It looks first at what is there: hand-made user and system units running llama-server,
    llama-cpp-python, Ollama, vLLM or LiteLLM (by their ExecStart and port), binaries on
    the PATH, LiteLLM, the model links, NVML, the ports, lingering. With --adopt, the user
    units become diversityd's on the same ports (a system unit, Ollama's say, is watched).
    Run it again after an upgrade: it is idempotent.
    """
    from diversityd.installation import Manifest

    directory = resolve_config_dir(config_dir).resolve()
    plan = make_plan(
        directory, adopt=adopt, now=now, keep_gpu_layers=keep_gpu_layers, unit_dir_option=unit_dir
    )
    if dry_run:
        print_dry_run(plan)
        if not plan.report.ok:
            print_findings(plan.report.of(Severity.ERROR))
            raise UsageError(
                "the configuration"
                + (" proposed" if plan.adopt and plan.proposal.changed else "")
                + " is invalid: install would refuse"
            )
        return
    if plan.starting is not None:
        raise UsageError(
            f"no configuration in {directory} yet (providers.yaml, model-mappings.yaml); "
            "nothing installed",
            hint="`diversityctl install --dry-run` proposes both from the units it finds",
        )
    if not plan.report.ok:
        print_findings(plan.report.of(Severity.ERROR))
        proposed = adopt and plan.proposal.changed
        raise UsageError(
            ("the proposed configuration" if proposed else "the configuration")
            + " is invalid; nothing installed",
            hint="the lines above are those of the proposed diversityd.yaml: see it with "
            "--dry-run --adopt"
            if proposed
            else None,
        )
    taking = plan.taking_over if adopt else []
    if adopt and plan.states_problem and taking:
        raise DiversitydError(
            f"cannot read the old units' state from systemd: {plan.states_problem}",
            hint="run it in your user session (systemctl --user must work)",
        )
    if not adopt:
        _warn_conflicts(plan)
    manifest = plan.manifest or Manifest(config_dir=str(directory), unit_dir=str(plan.unit_dir))
    records = record_adopted(plan, taking) if taking else []
    manifest = manifest.with_adopted(records)
    daemon_file = plan.files[-1]
    statuses = {planned.path: planned.status() for planned in plan.files}
    daemon_changed = statuses[daemon_file.path] != "unchanged"
    manifest = write_files(plan, manifest)
    for path, status in statuses.items():
        if status != "unchanged" and path != daemon_file.path:
            click.echo(f"wrote {path} ({status})")
    result = asyncio.run(apply_systemd(plan, taking, records, daemon_changed))
    for record in records:
        what = "stopped, disabled and masked" if record.masked else "stopped and disabled"
        click.echo(f"{what} {record.unit} (backed up; uninstall gives it back)")
    click.echo(
        f"installed {daemon_file.path} ({statuses[daemon_file.path]}); diversityd.service {result}"
    )
    if taking:
        check_takeover(plan, taking, wait_s)
    if plan.machine.linger is False:
        click.echo(
            f"note: lingering is off: your user services stop when you log out; fix: "
            f"sudo loginctl enable-linger {plan.machine.user}",
            err=True,
        )


def _warn_conflicts(plan: InstallPlan) -> None:
    found = plan.proposal.taking_over
    adopted = plan.manifest.adopted_names() if plan.manifest else frozenset()
    for adoption in found:
        if adoption.found.unit in adopted:
            continue
        holder = plan.machine.ports.get(adoption.found.port)
        if holder is not None and holder.unit == adoption.found.unit:
            click.echo(
                f"note: {adoption.found.unit} holds :{adoption.found.port}, where diversityd "
                f"would serve; take it over with `diversityctl install --adopt` (see "
                "--dry-run), or stop it",
                err=True,
            )
