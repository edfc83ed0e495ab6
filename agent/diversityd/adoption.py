"""Found servers + the user's providers -> what diversityd would adopt. Pure.

`propose` matches the servers hand-made units run (`foreignunits.find_server`) to the
providers of providers.yaml (same port, a local address, a type the server can serve) and
proposes a diversityd.yaml document, 0600 environment files for the secrets, and drop-ins
naming those files. A user unit is owned (diversityd's unit takes over its port), a system
unit watched (`owned: false`); a LiteLLM unit becomes diversityd's gateway on its port, its
master key moved to a 0600 key file. An old unit's fixed `--n-gpu-layers` is shown beside the
plan's `auto`, copied only when asked (`keep_gpu_layers`).
"""

from __future__ import annotations

import copy
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from diversityd.config import LOOPBACK_HOSTS, SERVER_KIND_TYPE
from diversityd.foreignunits import LITELLM, FoundServer, parse_int
from diversityd.gateway import literal_secrets
from diversityd.units import unit_name

MASTER_KEY = "LITELLM_MASTER_KEY"
ADOPTED_DROP_IN = "50-adopted-environment.conf"
ENV_DIR = "env"  # under the config directory: the adopted units' environment files


@dataclass(frozen=True)
class ProviderAddress:
    """A provider of providers.yaml, as far as matching a unit to it needs."""

    name: str
    type: str
    host: str
    port: int
    active: bool = True


@dataclass(frozen=True)
class SecretFile:
    """A 0600 environment file to write: its variables' names may be shown, never `text`."""

    path: str
    names: tuple[str, ...]
    text: str = field(repr=False)


@dataclass(frozen=True)
class DropIn:
    """`<unit>.d/<name>`: references environment files only, never a value."""

    unit: str
    name: str
    text: str


OWN, WATCH, GATEWAY, SKIP = "own", "watch", "gateway", "skip"
SYSTEM_SERVICE_NOTE = (
    "a system service: a user daemon cannot own it; watched (probed, never started or stopped)"
)


@dataclass(frozen=True)
class Adoption:
    found: FoundServer
    action: str  # own | watch | gateway | skip
    provider: str | None = None  # the providers.yaml name it serves (None: the gateway)
    entry: Mapping[str, Any] = field(default_factory=dict)  # what diversityd.yaml says
    kept_existing: bool = False  # diversityd.yaml already had it: left as it is
    reason: str | None = None  # why skipped
    notes: tuple[str, ...] = ()

    @property
    def takes_over(self) -> bool:
        """A user unit diversityd's own unit replaces (stopped and disabled with --adopt)."""
        return self.found.scope == "user" and self.action in (OWN, GATEWAY)

    @property
    def new_unit(self) -> str | None:
        if self.action == OWN and self.provider:
            return unit_name(self.provider)
        if self.action == GATEWAY:
            return "diversityd-gateway.socket"
        return None


@dataclass(frozen=True)
class Proposal:
    adoptions: tuple[Adoption, ...]
    settings: Mapping[str, Any]  # the whole proposed diversityd.yaml document
    changed: bool  # differs from the existing document
    secret_files: tuple[SecretFile, ...] = ()
    drop_ins: tuple[DropIn, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def taking_over(self) -> list[Adoption]:
        return [a for a in self.adoptions if a.takes_over]


@dataclass(frozen=True)
class ProposalInputs:
    """What the caller read from the machine, for `propose`."""

    config_dir: str
    home: str
    existing_settings: Mapping[str, Any] | None = None  # diversityd.yaml as it is
    keep_gpu_layers: bool = False
    litellm_venvs: Mapping[str, str] = field(default_factory=dict)  # unit -> usable venv
    litellm_configs: Mapping[str, Any] = field(default_factory=dict)  # path -> parsed YAML
    served_models: frozenset[str] = frozenset()  # what diversityd's gateway would serve
    present_files: frozenset[str] = frozenset()  # expanded paths that exist
    running_units: frozenset[str] = frozenset()  # hand-made units active now


def expand_home(path: str, home: str) -> str:
    if path == "~" or path.startswith("~/"):
        return home + path[1:]
    return path


def match_provider(
    found: FoundServer, providers: Sequence[ProviderAddress]
) -> list[ProviderAddress]:
    """The providers a found server serves: same port, a local address, a type its kind
    can serve. Active ones first."""
    wanted_type = SERVER_KIND_TYPE.get(found.kind)
    matches = [
        p
        for p in providers
        if p.port == found.port and p.host in LOOPBACK_HOSTS and p.type == wanted_type
    ]
    return sorted(matches, key=lambda p: not p.active)


def provider_snippet(found: FoundServer) -> str:
    """What to add to providers.yaml for a unit no provider matches."""
    provider_type = SERVER_KIND_TYPE.get(found.kind, "llama_cpp")
    name = found.unit.removesuffix(".service").replace("-", "_")
    return (
        f"{name}: {{type: {provider_type}, base_url: 'http://127.0.0.1:{found.port}', "
        f"models: [{found.alias or name}]}}"
    )


def propose(
    found: Sequence[FoundServer], providers: Sequence[ProviderAddress], inputs: ProposalInputs
) -> Proposal:
    """Which found servers diversityd would own, watch or leave, and the diversityd.yaml,
    environment files and drop-ins that says so."""
    existing = dict(inputs.existing_settings or {})
    document: dict[str, Any] = copy.deepcopy(existing)
    existing_owned = existing.get("providers") or {}
    adoptions: list[Adoption] = []
    secret_files: list[SecretFile] = []
    drop_ins: list[DropIn] = []
    notes: list[str] = []
    claimed: dict[str, str] = {}  # provider (or "(gateway)") -> the unit adopted for it
    # user units first, and of two on one port the one running now
    for server in adoption_order(found, inputs.running_units):
        if server.kind == LITELLM:
            adoption, files = _adopt_gateway(server, document, existing, inputs, claimed)
            adoptions.append(adoption)
            secret_files += files
            continue
        adoption = _adopt_server(server, providers, existing_owned, inputs, claimed)
        adoptions.append(adoption)
        if adoption.action == WATCH and not adoption.kept_existing:
            for provider in match_provider(server, providers):
                document.setdefault("providers", {})[provider.name] = {"owned": False}
        if adoption.action != OWN or adoption.provider is None:
            continue
        if not adoption.kept_existing:
            document.setdefault("providers", {})[adoption.provider] = dict(adoption.entry)
        files, drop_in = _server_secrets(server, adoption.provider, inputs.config_dir)
        secret_files += files
        if drop_in is not None:
            drop_ins.append(drop_in)
    if not any(a.action == GATEWAY for a in adoptions) and found:
        notes.append("no LiteLLM unit found: diversityd's gateway takes gateway.port as it is")
    return Proposal(
        adoptions=tuple(adoptions),
        settings=document,
        changed=document != existing,
        secret_files=tuple(secret_files),
        drop_ins=tuple(drop_ins),
        notes=tuple(notes),
    )


def adoption_order(found: Sequence[FoundServer], running: frozenset[str]) -> list[FoundServer]:
    """User units before system ones; of two on one port, the one running now first."""
    return sorted(found, key=lambda s: (s.scope != "user", s.unit not in running, s.unit))


def _adopt_server(
    server: FoundServer,
    providers: Sequence[ProviderAddress],
    existing_owned: Mapping[str, Any],
    inputs: ProposalInputs,
    claimed: dict[str, str],
) -> Adoption:
    matching = match_provider(server, providers)
    matches = [p for p in matching if p.name not in claimed]
    taken = [claimed[p.name] for p in matching if p.name in claimed]
    if not matches and taken:
        running = " (running)" if taken[0] in inputs.running_units else ""
        return Adoption(
            server,
            SKIP,
            reason=f"{taken[0]}{running} serves :{server.port} too and is the one adopted; "
            "this one is left as it is (do not start it: it would compete for the port)",
        )
    if not matches:
        return Adoption(
            server,
            SKIP,
            reason=(
                f"no provider in providers.yaml listens on :{server.port} with type "
                f"{SERVER_KIND_TYPE.get(server.kind)}; to adopt it add one, e.g. "
                f"{provider_snippet(server)}"
            ),
        )
    provider = matches[0]
    claimed[provider.name] = server.unit
    notes: list[str] = []
    current = existing_owned.get(provider.name)
    if server.scope == "system":
        names = ", ".join(p.name for p in matches)
        return Adoption(
            server,
            WATCH,
            provider.name,
            {"owned": False},
            kept_existing=isinstance(current, Mapping) and current.get("owned") is False,
            notes=(f"{SYSTEM_SERVICE_NOTE}: {names}",),
        )
    if len(matches) > 1:
        others = ", ".join(p.name for p in matches[1:])
        notes.append(f"{others} also listen on :{server.port}; {provider.name} is adopted")
    if isinstance(current, Mapping) and current.get("owned") is False:
        return Adoption(
            server,
            SKIP,
            provider.name,
            dict(current),
            kept_existing=True,
            reason=f"diversityd.yaml says providers.{provider.name}.owned: false (watched)",
        )
    if server.problems:
        return Adoption(server, SKIP, provider.name, reason="; ".join(server.problems))
    entry = server_entry(server, inputs.keep_gpu_layers)
    if server.host and server.host != provider.host:
        notes.append(
            f"listened on {server.host}; diversityd's unit listens on {provider.host} "
            "(providers.yaml base_url)"
        )
    if isinstance(current, Mapping):
        notes += [
            f"diversityd.yaml already sets {key}: {current[key]!r} (the unit says {value!r})"
            for key, value in entry.items()
            if key in current
            and key != "n_gpu_layers"
            and current[key] != value
            and expand_home(str(current[key]), inputs.home) != value
        ]
        notes += [
            f"the unit also says {key}: {value!r}; diversityd.yaml's entry does not"
            for key, value in entry.items()
            if key not in current and key not in ("n_gpu_layers", "executable")
        ]
        return Adoption(
            server, OWN, provider.name, dict(current), kept_existing=True, notes=(*notes,)
        )
    return Adoption(server, OWN, provider.name, entry, notes=(*server.notes, *notes))


def server_entry(server: FoundServer, keep_gpu_layers: bool) -> dict[str, Any]:
    """The diversityd.yaml `providers.<name>` entry that runs what the unit ran."""
    entry: dict[str, Any] = {"server": server.kind, "executable": server.executable}
    if server.model_path:
        entry["model_path"] = server.model_path
    if server.ctx is not None:
        entry["ctx"] = server.ctx
    if server.parallel is not None:
        entry["parallel"] = server.parallel
    if server.threads is not None:
        entry["threads"] = server.threads
    if server.kind in ("llama-server", "llama-cpp-python"):
        entry["n_gpu_layers"] = "auto"
        if keep_gpu_layers and server.n_gpu_layers is not None:
            layers = parse_int(server.n_gpu_layers)
            if layers is None and server.n_gpu_layers in ("all", "max"):
                layers = -1
            if layers is not None:
                entry["n_gpu_layers"] = layers
    if server.gpu is not None:
        entry["gpu"] = "none" if server.gpu == "none" else int(server.gpu)
    if server.extra_args:
        entry["extra_args"] = list(server.extra_args)
    if server.environment:
        entry["environment"] = dict(server.environment)
    return entry


def environment_file_text(values: Mapping[str, str]) -> str:
    lines = ["# Written by diversityctl install from a hand-made unit (mode 0600)."]
    for name, value in sorted(values.items()):
        quoted = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'{name}="{quoted}"')
    return "\n".join(lines) + "\n"


def adopted_env_path(config_dir: str, unit: str) -> str:
    return posixpath.join(config_dir, ENV_DIR, unit.removesuffix(".service") + ".env")


def _server_secrets(
    server: FoundServer, provider: str, config_dir: str
) -> tuple[list[SecretFile], DropIn | None]:
    files: list[SecretFile] = []
    lines: list[str] = []
    if server.secrets:
        path = adopted_env_path(config_dir, server.unit)
        files.append(
            SecretFile(path, tuple(sorted(server.secrets)), environment_file_text(server.secrets))
        )
        lines.append(f"EnvironmentFile={path.replace('%', '%%')}")
    lines += [f"EnvironmentFile={p.replace('%', '%%')}" for p in server.environment_files]
    if not lines:
        return files, None
    text = (
        f"# Written by diversityctl install: the environment files {server.unit} used\n"
        "# (secrets live there, mode 0600, never in diversityd.yaml).\n"
        "[Service]\n" + "\n".join(lines) + "\n"
    )
    return files, DropIn(unit_name(provider), ADOPTED_DROP_IN, text)


def _adopt_gateway(
    server: FoundServer,
    document: dict[str, Any],
    existing: Mapping[str, Any],
    inputs: ProposalInputs,
    claimed: dict[str, str],
) -> tuple[Adoption, list[SecretFile]]:
    existing_gateway = existing.get("gateway") or {}
    if "(gateway)" in claimed:
        return Adoption(server, SKIP, reason="another LiteLLM unit is adopted as the gateway"), []
    if existing_gateway.get("owned") is False:
        return Adoption(server, SKIP, reason="diversityd.yaml says gateway.owned: false"), []
    if server.problems:
        return Adoption(server, SKIP, reason="; ".join(server.problems)), []
    if server.scope == "system":
        return Adoption(
            server,
            SKIP,
            reason=f"a system service: diversityd's gateway needs :{server.port}; stop it "
            f"yourself (sudo systemctl disable --now {server.unit}) or set gateway.port",
        ), []
    claimed["(gateway)"] = server.unit
    gateway: dict[str, Any] = document.setdefault("gateway", {})
    notes: list[str] = list(server.notes)
    port = existing_gateway.get("port")
    if port is not None and port != server.port:
        notes.append(f"diversityd.yaml keeps gateway.port {port} (the unit served :{server.port})")
    else:
        gateway["port"] = server.port
    # the gateway's socket takes an IP address (ListenStream= resolves no names)
    host = server.host and {"localhost": "127.0.0.1", "ip6-localhost": "::1"}.get(
        server.host, server.host
    )
    if host and host not in ("127.0.0.1", existing_gateway.get("host")):
        gateway.setdefault("host", host)
    elif not server.host:
        notes.append(
            "LiteLLM listened on every address (its default); diversityd's gateway listens "
            "on 127.0.0.1: set gateway.host: 0.0.0.0 to keep that"
        )
    venv = inputs.litellm_venvs.get(server.unit)
    if venv and "litellm_venv" not in existing_gateway:
        gateway["litellm_venv"] = venv
    files: list[SecretFile] = []
    values = {**server.environment, **server.secrets}
    config = inputs.litellm_configs.get(server.config_file or "")
    key = _master_key(values, config)
    values.pop(MASTER_KEY, None)
    if key is not None:
        key_file, note = _key_file(existing_gateway, key, inputs)
        notes.append(note)
        if key_file is not None:
            gateway["master_key_file"] = key_file.path
            files.append(key_file)
    else:
        notes.append(
            "the unit sets no master key: diversityd's gateway requires one "
            "(`diversityctl env` says where it is)"
        )
    env_files = list(existing_gateway.get("environment_files") or [])
    if values:
        path = adopted_env_path(inputs.config_dir, server.unit)
        files.append(SecretFile(path, tuple(sorted(values)), environment_file_text(values)))
        if path not in env_files:
            env_files.append(path)
    env_files += [p.lstrip("-") for p in server.environment_files if p.lstrip("-") not in env_files]
    if env_files and env_files != list(existing_gateway.get("environment_files") or []):
        gateway["environment_files"] = env_files
    if isinstance(config, Mapping):
        notes += _carry_settings(config, gateway, existing_gateway, inputs.served_models)
    if not gateway:
        document.pop("gateway", None)
    return Adoption(server, GATEWAY, None, dict(gateway), notes=tuple(notes)), files


def _master_key(values: Mapping[str, str], config: Any) -> str | None:
    if values.get(MASTER_KEY):
        return values[MASTER_KEY]
    general = config.get("general_settings") if isinstance(config, Mapping) else None
    named = general.get("master_key") if isinstance(general, Mapping) else None
    if isinstance(named, str) and named:
        if named.startswith("os.environ/"):
            return values.get(named.removeprefix("os.environ/")) or None
        return named
    return None


def _key_file(
    existing_gateway: Mapping[str, Any], key: str, inputs: ProposalInputs
) -> tuple[SecretFile | None, str]:
    configured = existing_gateway.get("master_key_file")
    path = configured or posixpath.join(inputs.config_dir, "master.key")
    if expand_home(path, inputs.home) in inputs.present_files:
        return None, (
            f"the gateway keeps the key in {path} (it exists); clients that used the old "
            f"unit's key need that one: `diversityctl env --show-key`"
        )
    secret = SecretFile(path, (MASTER_KEY,), f"{key}\n")  # bare, as diversityd writes it
    return secret, f"the old unit's master key moves to {path} (0600): clients keep their key"


def _carry_settings(
    config: Mapping[str, Any],
    gateway: dict[str, Any],
    existing_gateway: Mapping[str, Any],
    served: frozenset[str],
) -> list[str]:
    """The user's LiteLLM config: its litellm_settings/router_settings (without literal
    secrets), and the models it served that diversityd's gateway would not."""
    notes: list[str] = []
    for section in ("litellm_settings", "router_settings"):
        values = config.get(section)
        if not isinstance(values, Mapping) or section in existing_gateway or not values:
            continue
        kept = copy.deepcopy(dict(values))
        if section == "router_settings":
            kept.pop("fallbacks", None)  # generated from fallback_chains
        for path in list(literal_secrets(kept, section)):
            _drop(kept, path.split(".")[1:])
            notes.append(f"{path} held a literal secret: not copied (use os.environ/NAME)")
        if kept:
            gateway[section] = kept
    model_list = config.get("model_list")
    names = {
        str(item["model_name"])
        for item in (model_list if isinstance(model_list, list) else [])
        if isinstance(item, Mapping) and "model_name" in item
    }
    missing = sorted(names - served) if served else []
    if missing:
        notes.append(
            "your LiteLLM config served models diversityd's gateway would not: "
            + ", ".join(missing)
            + " (add them to providers.yaml or model-mappings.yaml)"
        )
    return notes


def _drop(values: dict[str, Any], keys: Sequence[str]) -> None:
    for key in keys[:-1]:
        inner = values.get(key)
        if not isinstance(inner, dict):
            return
        values = inner
    values.pop(keys[-1], None)


SETTINGS_HEADER = (
    "# diversityd's own settings (proposed by `diversityctl install --adopt` from the units\n"
    "# it found; edit freely). Secrets are in 0600 environment files, never here.\n"
)


def render_settings(document: Mapping[str, Any]) -> str:
    return SETTINGS_HEADER + yaml.safe_dump(
        dict(document), sort_keys=False, default_flow_style=False, allow_unicode=True
    )


STARTING_HEADER = (
    "# Proposed by `diversityctl install --dry-run` from the hand-made units it found (no\n"
    "# configuration yet): check the model names, add your clouds, then install.\n"
)


@dataclass(frozen=True)
class StartingFiles:
    """providers.yaml and model-mappings.yaml to start from, for a machine with none."""

    providers: str
    mappings: str


def starting_files(found: Sequence[FoundServer], running: frozenset[str]) -> StartingFiles:
    """One provider per port a found server listens on (the running unit's, where two
    share one), named after its unit, serving the name it answers to."""
    providers: dict[str, Any] = {}
    exact: dict[str, Any] = {}
    ports: set[int] = set()
    for server in adoption_order(found, running):
        if server.kind == LITELLM or server.port in ports or not server.port:
            continue
        ports.add(server.port)
        name = server.unit.removesuffix(".service").replace("-", "_").replace("@", "_")
        model = server.alias or name
        providers[name] = {
            "type": SERVER_KIND_TYPE.get(server.kind, "llama_cpp"),
            "base_url": f"http://127.0.0.1:{server.port}",
            "status": "active",
            "models": [model],
        }
        exact[model] = {"provider": name}
    return StartingFiles(
        providers=STARTING_HEADER + _yaml({"providers": providers}),
        mappings=STARTING_HEADER + _yaml({"exact_matches": exact, "fallback_chains": {}}),
    )


def _yaml(document: Mapping[str, Any]) -> str:
    return yaml.safe_dump(
        dict(document), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
