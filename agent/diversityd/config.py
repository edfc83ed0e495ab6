"""The user's files -> one frozen configuration, with located errors.

Reads the user's own `providers.yaml` and `model-mappings.yaml` as they are (extra keys such
as `tier`, `description`, `tags` are tolerated) and diversityd's own `diversityd.yaml`
(strict: a misspelt key is an error). `parse_config` is pure; `load_config` reads the files.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from diversityd.errors import ConfigError, Finding, Severity
from diversityd.secretpatterns import quoted
from diversityd.yamlfile import MAX_BYTES, KeyPath, LoadedYaml, parse_yaml

PROVIDERS_FILE = "providers.yaml"
MAPPINGS_FILE = "model-mappings.yaml"
SETTINGS_FILE = "diversityd.yaml"

LOCAL_TYPES = frozenset({"ollama", "llama_cpp", "vllm"})


@dataclass(frozen=True)
class CloudType:
    litellm_prefix: str
    key_env: str | None
    api_base: str | None


# Cloud provider types: the LiteLLM model prefix, the conventional key variable, the API.
CLOUD_TYPES: Mapping[str, CloudType] = {
    "openai": CloudType("openai", "OPENAI_API_KEY", "https://api.openai.com/v1"),
    "anthropic": CloudType("anthropic", "ANTHROPIC_API_KEY", "https://api.anthropic.com"),
    "openai_compatible": CloudType("openai", None, None),
    "groq": CloudType("groq", "GROQ_API_KEY", "https://api.groq.com/openai/v1"),
    "mistral": CloudType("mistral", "MISTRAL_API_KEY", "https://api.mistral.ai/v1"),
    "deepseek": CloudType("deepseek", "DEEPSEEK_API_KEY", "https://api.deepseek.com"),
    "openrouter": CloudType("openrouter", "OPENROUTER_API_KEY", "https://openrouter.ai/api/v1"),
    "together_ai": CloudType("together_ai", "TOGETHERAI_API_KEY", "https://api.together.xyz/v1"),
    "gemini": CloudType("gemini", "GEMINI_API_KEY", "https://generativelanguage.googleapis.com"),
}
PROVIDER_TYPES = tuple(sorted(LOCAL_TYPES | set(CLOUD_TYPES)))

# Ollama serves `*-cloud` / `*:cloud` models by forwarding them to ollama.com.
OLLAMA_CLOUD_NAME = re.compile(r"(?:[-:])cloud$")
OLLAMA_CLOUD_UPSTREAM = "ollama.com"

# Addresses that mean "this machine" (names to recognise, never to bind).
LOOPBACK_HOSTS = frozenset(
    {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::", "ip6-localhost"}  # noqa: S104
)
ENV_REFERENCE = re.compile(r"^os\.environ/([A-Za-z_][A-Za-z0-9_]*)$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

SERVER_KINDS = ("llama-server", "llama-cpp-python", "ollama", "vllm")
SERVER_KIND_TYPE = {
    "llama-server": "llama_cpp",
    "llama-cpp-python": "llama_cpp",
    "ollama": "ollama",
    "vllm": "vllm",
}


@dataclass(frozen=True)
class Where:
    """Where an entity was declared: a file and a key path inside it."""

    file: str
    path: KeyPath


@dataclass(frozen=True)
class ModelEntry:
    name: str
    backend_model: str | None  # `model:`: the name the backend knows it by
    upstream: str | None
    where: Where


@dataclass(frozen=True)
class Provider:
    name: str
    type: str
    base_url: str
    active: bool
    models: tuple[ModelEntry, ...]
    api_key_env: str | None
    upstream: str | None
    n_gpu_layers: int | None  # `configuration: n_gpu_layers`: the user's own layer count
    where: Where

    @property
    def is_local(self) -> bool:
        return self.type in LOCAL_TYPES

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.base_url)
        default_port = 443 if parts.scheme == "https" else 80
        return (parts.hostname or "", parts.port or default_port)


@dataclass(frozen=True)
class ExactMatch:
    name: str
    providers: tuple[str, ...]
    backend_model: str | None
    where: Where


@dataclass(frozen=True)
class Chain:
    model: str
    targets: tuple[str, ...]
    where: Where

    def target_where(self, index: int) -> Where:
        return Where(self.where.file, (*self.where.path, "chain", index))


@dataclass(frozen=True)
class OwnedServer:
    """How diversityd runs one provider it owns (from diversityd.yaml `providers:`)."""

    provider: str
    server: str  # one of SERVER_KINDS
    executable: str | None  # binary; for llama-cpp-python the Python interpreter
    model_path: str | None  # GGUF (usually the active symlink); vLLM: a model id or path
    ctx: int  # context per slot; the server gets ctx * parallel in total
    parallel: int
    threads: int | None
    n_gpu_layers: int | None  # None = sized from VRAM
    gpu: int | None  # None = CPU only
    vram_priority: int
    gpu_memory_utilization: float | None  # vLLM; None = sized from the budget
    vram_mib: int | None  # Ollama: what it may use on the card
    extra_args: tuple[str, ...]
    environment: Mapping[str, str]
    where: Where
    # what the server writes to the journal: `info` adds llama-server's per-request timing
    # lines, `debug` everything; probes are never logged line by line below `debug`
    log_level: str = "warning"


SERVER_LOG_LEVELS = ("error", "warning", "info", "debug")


@dataclass(frozen=True)
class GatewaySettings:
    owned: bool = True
    host: str = "127.0.0.1"
    port: int = 4000
    master_key_file: str | None = None
    environment_files: tuple[str, ...] = ()
    litellm_venv: str | None = None
    keep_configs: int = 5
    # LiteLLM processes serving on the one socket, both kept current in-process: 2 costs a
    # second process's memory (~400 MiB) and makes a killed instance cost milliseconds, not
    # the seconds a new LiteLLM takes to start
    instances: int = 1
    litellm_settings: Mapping[str, Any] = field(default_factory=dict)
    router_settings: Mapping[str, Any] = field(default_factory=dict)
    general_settings: Mapping[str, Any] = field(default_factory=dict)
    # per provider type (llama_cpp, vllm, ollama, cloud): timeout_s, stream_timeout_s, cooldown_s
    timeouts: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class SupervisionSettings:
    """How patient the daemon is with its servers (short values make the tests quick)."""

    start_grace_s: float = 300.0  # a process not answering yet is loading this long
    ready_wait_s: float = 300.0  # a start or restart waits this long for an answer
    revive_initial_s: float = 10.0  # a unit systemd gave up on is started again after this,
    revive_max_s: float = 300.0  # doubling each time up to this
    hung_grace_s: float = 10.0  # an owned server hung this long (no CPU progress) is killed
    # before a planned stop, a server leaves the gateway's routes and its requests in flight
    # get this long to finish (None: its type's whole-answer timeout, gateway.timeouts)
    drain_s: float | None = None


@dataclass(frozen=True)
class HttpSettings:
    """The daemon's own HTTP endpoint (loopback): `/metrics` for Prometheus, and the answer
    the gateway gets for a model no server can serve now. Port 0: none."""

    host: str = "127.0.0.1"
    port: int = 9478

    @property
    def url(self) -> str | None:
        if not self.port:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class FleetSettings:
    """Several workstations, one fleet: daemons share what they serve through the user's
    Redis, and each gateway fails over to the others' gateways."""

    redis_url: str  # redis://HOST:PORT/DB (rediss:// for TLS)
    key_file: str  # the fleet's shared key (0600, the same on every host): peers' requests
    advertise_url: str  # where the peers reach this host's gateway
    name: str  # this host in the fleet (default: `host`)
    redis_password_env: str | None = None  # the variable in `environment_file` holding it
    environment_file: str | None = None  # 0600, read by the daemon (the Redis password)
    remote_models: tuple[str, ...] = ()  # names only peers serve: chains may name them
    prefix: str = "diversityd"  # of every Redis key and channel
    heartbeat_s: float = 1.0  # how often this host's record is refreshed
    ttl_s: float = 5.0  # Redis drops a record not refreshed this long
    probe_interval_s: float = 1.0  # each peer's gateway is probed this often...
    probe_timeout_s: float = 1.0  # ...and is out after no answer this long (a frozen host)


@dataclass(frozen=True)
class Settings:
    host: str  # this machine's name in failure-domain reports
    gpus: int  # GPUs on this machine (domain report only; the planner reads NVML)
    unit_dir: str | None
    state_dir: str | None
    probe_interval_s: float
    probe_timeout_s: float
    owned: Mapping[str, OwnedServer]
    gateway: GatewaySettings
    supervision: SupervisionSettings = field(default_factory=SupervisionSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    fleet: FleetSettings | None = None


@dataclass(frozen=True)
class Config:
    config_dir: str
    providers: Mapping[str, Provider]
    exact_matches: Mapping[str, ExactMatch]
    chains: Mapping[str, Chain]
    settings: Settings
    docs: Mapping[str, LoadedYaml]

    def finding(
        self,
        severity: Severity,
        code: str,
        where: Where,
        message: str,
        hint: str | None = None,
    ) -> Finding:
        doc = self.docs.get(where.file)
        if doc is None:
            return Finding(severity, code, message, file=where.file, hint=hint)
        return doc.finding(severity, code, where.path, message, hint)

    def remote_models(self) -> tuple[str, ...]:
        """Names only the fleet's peers serve (`fleet.remote_models`)."""
        fleet = self.settings.fleet
        return fleet.remote_models if fleet is not None else ()

    def host_of(self, provider: Provider) -> str:
        """The machine a provider runs on; loopback addresses mean this machine."""
        host = provider.address[0]
        return self.settings.host if host in LOOPBACK_HOSTS else host

    def upstream_of(self, provider: Provider, entry_upstream: str | None, model: str) -> str | None:
        """The remote service a model's answers really come from; None for local inference."""
        if entry_upstream:
            return entry_upstream
        if provider.upstream:
            return provider.upstream
        if provider.type == "ollama" and OLLAMA_CLOUD_NAME.search(model):
            return OLLAMA_CLOUD_UPSTREAM
        if provider.type in CLOUD_TYPES:
            return provider.address[0]
        return None


# ---------------------------------------------------------------------------------------
# Parsing


class _Reader:
    """Walks one parsed document, checking types and collecting located findings."""

    def __init__(self, doc: LoadedYaml, findings: list[Finding]) -> None:
        self.doc = doc
        self.findings = findings

    def error(self, path: KeyPath, code: str, message: str, hint: str | None = None) -> None:
        self.findings.append(self.doc.finding(Severity.ERROR, code, path, message, hint))

    def warn(self, path: KeyPath, code: str, message: str, hint: str | None = None) -> None:
        self.findings.append(self.doc.finding(Severity.WARNING, code, path, message, hint))

    def mapping(self, path: KeyPath, value: Any, hint: str) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        if isinstance(value, list):
            self.error(path, "expected-mapping", "a list where a mapping is expected", hint)
        else:
            self.error(
                path,
                "wrong-type",
                f"expected a mapping, found {_kind(value)} {quoted(value)}",
                hint,
            )
        return None

    def sequence(self, path: KeyPath, value: Any, hint: str) -> list[Any] | None:
        if value is None:
            return []
        if isinstance(value, list):
            return value
        if isinstance(value, dict):
            self.error(path, "expected-list", "a mapping where a list is expected", hint)
        else:
            self.error(
                path, "wrong-type", f"expected a list, found {_kind(value)} {quoted(value)}", hint
            )
        return None

    def string(self, path: KeyPath, value: Any, hint: str) -> str | None:
        if isinstance(value, str) and value:
            return value
        self.error(path, "wrong-type", f"expected a non-empty string, found {_kind(value)}", hint)
        return None

    def integer(
        self, path: KeyPath, value: Any, hint: str, minimum: int | None = None
    ) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, "wrong-type", f"expected an integer, found {_kind(value)}", hint)
            return None
        if minimum is not None and value < minimum:
            self.error(path, "out-of-range", f"{value} is below the minimum {minimum}", hint)
            return None
        return value

    def number(self, path: KeyPath, value: Any, hint: str) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(path, "wrong-type", f"expected a number, found {_kind(value)}", hint)
            return None
        return float(value)

    def unknown_keys(self, path: KeyPath, value: Mapping[str, Any], known: tuple[str, ...]) -> None:
        for key in value:
            if key not in known:
                close = _closest(key, known)
                hint = f"did you mean {close!r}?" if close else f"known keys: {', '.join(known)}"
                self.error((*path, key), "unknown-key", f"unknown key {quoted(key)}", hint)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _closest(word: str, candidates: tuple[str, ...]) -> str | None:
    matches = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _parse_api_key_env(
    reader: _Reader, path: KeyPath, raw: Mapping[str, Any], default: str | None
) -> str | None:
    """`api_key_env: NAME` or `api_key: os.environ/NAME`; a literal key is refused."""
    if "api_key_env" in raw:
        name = reader.string(
            (*path, "api_key_env"), raw["api_key_env"], "name the variable, e.g. OPENAI_API_KEY"
        )
        if name and not ENV_NAME.match(name):
            reader.error(
                (*path, "api_key_env"),
                "wrong-type",
                f"{quoted(name)} is not an environment variable name",
                "use letters, digits and '_' only, e.g. OPENAI_API_KEY",
            )
            return None
        return name
    if "api_key" in raw:
        value = raw["api_key"]
        match = ENV_REFERENCE.match(value) if isinstance(value, str) else None
        if match:
            return match.group(1)
        reader.error(
            (*path, "api_key"),
            "secret-in-config",
            "a literal API key in the configuration; diversityd never copies secrets into files",
            "put the key in an environment variable and write `api_key_env: NAME` "
            "(or `api_key: os.environ/NAME`)",
        )
        return None
    return default


def _parse_providers(doc: LoadedYaml, findings: list[Finding]) -> dict[str, Provider]:
    reader = _Reader(doc, findings)
    top = reader.mapping((), doc.data, "the file must start with `providers:`")
    if top is None:
        return {}
    raw_providers = top.get("providers")
    if raw_providers is None:
        reader.error(
            (), "missing-key", "no `providers:` section", "add `providers:` with one entry each"
        )
        return {}
    providers_map = reader.mapping(
        ("providers",),
        raw_providers,
        "write providers as a mapping: `providers: {ollama: {type: ollama, base_url: ...}}`",
    )
    if providers_map is None:
        return {}
    result: dict[str, Provider] = {}
    for name, raw in providers_map.items():
        path: KeyPath = ("providers", name)
        provider = _parse_provider(reader, path, name, raw)
        if provider is not None:
            result[name] = provider
    return result


def _parse_provider(reader: _Reader, path: KeyPath, name: str, raw: Any) -> Provider | None:
    body = reader.mapping(path, raw, "give each provider `type`, `base_url`, `status`, `models`")
    if body is None:
        return None
    ok = True
    type_ = body.get("type")
    if type_ not in PROVIDER_TYPES:
        ok = False
        shown = "missing" if type_ is None else quoted(type_)
        reader.error(
            (*path, "type"),
            "unknown-type" if type_ is not None else "missing-key",
            f"provider type is {shown}",
            f"use one of: {', '.join(PROVIDER_TYPES)}",
        )
    status = body.get("status", "active")
    if status not in ("active", "disabled"):
        ok = False
        reader.error(
            (*path, "status"),
            "wrong-value",
            f"status {quoted(status)} is neither 'active' nor 'disabled'",
            "write `status: active` or `status: disabled`",
        )
    cloud = CLOUD_TYPES.get(type_) if isinstance(type_, str) else None
    base_url = body.get("base_url", cloud.api_base if cloud else None)
    if not isinstance(base_url, str) or urlsplit(base_url).scheme not in ("http", "https"):
        ok = False
        reader.error(
            (*path, "base_url"),
            "missing-key" if base_url is None else "wrong-value",
            f"base_url is {quoted(base_url)}, not an http(s) URL",
            "write the server's address, e.g. `base_url: http://127.0.0.1:8080`",
        )
    else:
        try:
            urlsplit(base_url).port  # noqa: B018 - raises on a bad port
        except ValueError:
            ok = False
            reader.error(
                (*path, "base_url"),
                "wrong-value",
                f"base_url {quoted(base_url)} has an invalid port",
                "use a port between 1 and 65535",
            )
    models = _parse_models(reader, (*path, "models"), body.get("models"))
    if models is None:
        ok = False
    api_key_env = _parse_api_key_env(reader, path, body, cloud.key_env if cloud else None)
    upstream = body.get("upstream")
    if upstream is not None and not isinstance(upstream, str):
        ok = False
        reader.error(
            (*path, "upstream"), "wrong-type", "upstream must be a string", "e.g. ollama.com"
        )
        upstream = None
    n_gpu_layers: int | None = None
    configuration = body.get("configuration")
    if configuration is not None:
        conf = reader.mapping(
            (*path, "configuration"), configuration, "write `configuration:` as a mapping"
        )
        if conf is None:
            ok = False
        elif "n_gpu_layers" in conf:
            value = conf["n_gpu_layers"]
            n_gpu_layers = reader.integer(
                (*path, "configuration", "n_gpu_layers"),
                value,
                "a layer count; -1 means all layers",
                minimum=-1,
            )
            if n_gpu_layers is None:
                ok = False
    if not ok or models is None:
        return None
    return Provider(
        name=name,
        type=str(type_),
        base_url=str(base_url).rstrip("/"),
        active=status == "active",
        models=models,
        api_key_env=api_key_env,
        upstream=upstream,
        n_gpu_layers=n_gpu_layers,
        where=Where(reader.doc.file, path),
    )


def _parse_models(reader: _Reader, path: KeyPath, raw: Any) -> tuple[ModelEntry, ...] | None:
    items = reader.sequence(
        path,
        raw,
        "write models as a list: `models: [name, {name: other, model: backend-name}]`",
    )
    if items is None:
        return None
    entries: list[ModelEntry] = []
    ok = True
    for index, item in enumerate(items):
        item_path = (*path, index)
        if isinstance(item, str) and item:
            entries.append(ModelEntry(item, None, None, Where(reader.doc.file, item_path)))
            continue
        if isinstance(item, int | float) and not isinstance(item, bool):
            # `- 3.1` parses as a number; a model name is meant.
            entries.append(ModelEntry(str(item), None, None, Where(reader.doc.file, item_path)))
            continue
        body = reader.mapping(item_path, item, "each model is a name or `{name: ..., model: ...}`")
        if body is None:
            ok = False
            continue
        name = reader.string((*item_path, "name"), body.get("name"), "give the model a `name:`")
        backend = body.get("model")
        if backend is not None and not isinstance(backend, str):
            reader.error(
                (*item_path, "model"), "wrong-type", "model: must be a string", "the backend's name"
            )
            ok = False
            continue
        upstream = body.get("upstream")
        if upstream is not None and not isinstance(upstream, str):
            reader.error((*item_path, "upstream"), "wrong-type", "upstream must be a string")
            ok = False
            continue
        if name is None:
            ok = False
            continue
        entries.append(ModelEntry(name, backend, upstream, Where(reader.doc.file, item_path)))
    return tuple(entries) if ok else None


def _parse_mappings(
    doc: LoadedYaml, findings: list[Finding]
) -> tuple[dict[str, ExactMatch], dict[str, Chain]]:
    reader = _Reader(doc, findings)
    if doc.data is None:
        return {}, {}
    top = reader.mapping((), doc.data, "the file holds `exact_matches:` and `fallback_chains:`")
    if top is None:
        return {}, {}
    exact: dict[str, ExactMatch] = {}
    raw_exact = top.get("exact_matches")
    if raw_exact is not None:
        exact_map = reader.mapping(
            ("exact_matches",),
            raw_exact,
            "write exact_matches as a mapping: `exact_matches: {NAME: {provider: P}}`",
        )
        for name, raw in (exact_map or {}).items():
            match = _parse_exact_match(reader, ("exact_matches", name), name, raw)
            if match is not None:
                exact[name] = match
    chains: dict[str, Chain] = {}
    raw_chains = top.get("fallback_chains")
    if raw_chains is not None:
        chains_map = reader.mapping(
            ("fallback_chains",),
            raw_chains,
            "write fallback_chains as a mapping: `fallback_chains: {NAME: {chain: [a, b]}}`",
        )
        for name, raw in (chains_map or {}).items():
            chain = _parse_chain(reader, ("fallback_chains", name), name, raw)
            if chain is not None:
                chains[name] = chain
    return exact, chains


def _provider_names(reader: _Reader, path: KeyPath, body: Mapping[str, Any]) -> tuple[str, ...]:
    names: list[str] = []
    if "provider" in body and body["provider"] is not None:
        one = reader.string(
            (*path, "provider"), body["provider"], "name one provider, or use `providers: [x, y]`"
        )
        if one:
            names.append(one)
    if "providers" in body:
        many = reader.sequence(
            (*path, "providers"), body["providers"], "write `providers: [x, y]` as a list"
        )
        for index, item in enumerate(many or []):
            one = reader.string((*path, "providers", index), item, "a provider name")
            if one and one not in names:
                names.append(one)
    return tuple(names)


def _parse_exact_match(reader: _Reader, path: KeyPath, name: str, raw: Any) -> ExactMatch | None:
    body = reader.mapping(path, raw, "write `NAME: {provider: P}`")
    if body is None:
        return None
    providers = _provider_names(reader, path, body)
    if not providers:
        reader.error(
            path,
            "missing-key",
            f"exact_matches entry {quoted(name)} names no provider",
            "add `provider: NAME` (or `providers: [x, y]` to balance between two)",
        )
        return None
    backend = body.get("model")
    if backend is not None and not isinstance(backend, str):
        reader.error(
            (*path, "model"), "wrong-type", "model: must be a string", "the backend's name"
        )
        return None
    legacy_fallback = body.get("fallback")
    if legacy_fallback is not None:
        reader.warn(
            (*path, "fallback"),
            "ignored-key",
            "`fallback:` inside exact_matches is not used for routing",
            f'put the fallback under `fallback_chains: {{"{name}": {{chain: [...]}}}}`',
        )
    return ExactMatch(name, providers, backend, Where(reader.doc.file, path))


def _parse_chain(reader: _Reader, path: KeyPath, name: str, raw: Any) -> Chain | None:
    if raw is None:
        return Chain(name, (), Where(reader.doc.file, path))
    if isinstance(raw, list):
        reader.error(
            path,
            "expected-mapping",
            "a list where a mapping is expected",
            f'write `"{name}": {{chain: [...]}}`: the list goes under `chain:`',
        )
        return None
    body = reader.mapping(path, raw, f'write `"{name}": {{chain: [a, b]}}`')
    if body is None:
        return None
    items = reader.sequence(
        (*path, "chain"), body.get("chain"), "write the chain as a list: `chain: [a, b]`"
    )
    if items is None:
        return None
    targets: list[str] = []
    ok = True
    for index, item in enumerate(items):
        target = reader.string((*path, "chain", index), item, "each chain entry is a model name")
        if target is None:
            ok = False
        else:
            targets.append(target)
    if not ok:
        return None
    return Chain(name, tuple(targets), Where(reader.doc.file, path))


# diversityd.yaml -----------------------------------------------------------------------

_SETTINGS_KEYS = (
    "host",
    "gpus",
    "unit_dir",
    "state_dir",
    "probes",
    "supervision",
    "http",
    "gateway",
    "providers",
    "fleet",
)
_PROBE_KEYS = ("interval_s", "timeout_s")
_MAY_BE_ZERO: tuple[str, ...] = ("drain_s",)  # 0: stopped at once, no drain
_SUPERVISION_KEYS = (
    "start_grace_s",
    "ready_wait_s",
    "revive_initial_s",
    "revive_max_s",
    "hung_grace_s",
    "drain_s",
)
# Accepted from older configurations, with a warning: what they did is no longer done.
_RETIRED_SUPERVISION_KEYS = {
    "restart_grace_s": "routing follows the servers' state in-process now: a restarting "
    "server leaves the gateway at once and comes back as soon as it answers",
}
_GATEWAY_KEYS = (
    "owned",
    "host",
    "port",
    "master_key_file",
    "environment_files",
    "litellm_venv",
    "keep_configs",
    "instances",
    "litellm_settings",
    "router_settings",
    "general_settings",
    "timeouts",
)
TIMEOUT_KINDS = ("llama_cpp", "vllm", "ollama", "cloud")
TIMEOUT_KEYS = ("timeout_s", "stream_timeout_s", "cooldown_s")
_OWNED_KEYS = (
    "owned",
    "server",
    "executable",
    "model_path",
    "ctx",
    "parallel",
    "threads",
    "n_gpu_layers",
    "gpu",
    "vram_priority",
    "gpu_memory_utilization",
    "vram_mib",
    "extra_args",
    "environment",
    "log_level",
)


def _parse_settings(
    doc: LoadedYaml | None,
    providers: Mapping[str, Provider],
    broken_providers: set[str],
    hostname: str,
    findings: list[Finding],
) -> Settings:
    defaults = Settings(
        host=hostname,
        gpus=1,
        unit_dir=None,
        state_dir=None,
        probe_interval_s=2.0,
        probe_timeout_s=1.0,
        owned={},
        gateway=GatewaySettings(),
    )
    if doc is None or doc.data is None:
        return defaults
    reader = _Reader(doc, findings)
    top = reader.mapping((), doc.data, "diversityd.yaml holds a mapping of settings")
    if top is None:
        return defaults
    reader.unknown_keys((), top, _SETTINGS_KEYS)
    host = top.get("host", hostname)
    if not isinstance(host, str) or not host:
        reader.error(("host",), "wrong-type", "host must be a name", "e.g. `host: workstation`")
        host = hostname
    gpus = reader.integer(("gpus",), top.get("gpus", 1), "the number of GPUs", minimum=0)
    paths: dict[str, str | None] = {}
    for key in ("unit_dir", "state_dir"):
        value = top.get(key)
        paths[key] = value if isinstance(value, str) and value else None
        if value is not None and paths[key] is None:
            reader.error((key,), "wrong-type", f"{key} must be a path", "write a directory path")
    interval, timeout = 2.0, 1.0
    if "probes" in top:
        probes = reader.mapping(("probes",), top["probes"], "write `probes: {interval_s: 2}`")
        if probes is not None:
            reader.unknown_keys(("probes",), probes, _PROBE_KEYS)
            if "interval_s" in probes:
                interval = (
                    reader.number(("probes", "interval_s"), probes["interval_s"], "seconds")
                    or interval
                )
            if "timeout_s" in probes:
                timeout = (
                    reader.number(("probes", "timeout_s"), probes["timeout_s"], "seconds")
                    or timeout
                )
    gateway = _parse_gateway(reader, top.get("gateway"))
    supervision = _parse_supervision(reader, top.get("supervision"))
    http = _parse_http(reader, top.get("http"))
    fleet = _parse_fleet(reader, top.get("fleet"), host if isinstance(host, str) else hostname)
    owned: dict[str, OwnedServer] = {}
    if "providers" in top:
        raw_owned = reader.mapping(
            ("providers",), top["providers"], "write `providers: {NAME: {server: llama-server}}`"
        )
        for name, raw in (raw_owned or {}).items():
            server = _parse_owned(reader, name, raw, providers, broken_providers)
            if server is not None:
                owned[name] = server
    return Settings(
        host=host,
        gpus=gpus if gpus is not None else 1,
        unit_dir=paths["unit_dir"],
        state_dir=paths["state_dir"],
        probe_interval_s=interval,
        probe_timeout_s=timeout,
        owned=owned,
        gateway=gateway,
        supervision=supervision,
        http=http,
        fleet=fleet,
    )


_FLEET_KEYS = (
    "redis_url", "key_file", "advertise_url", "name", "redis_password_env",
    "environment_file", "remote_models", "prefix", "heartbeat_s", "ttl_s",
    "probe_interval_s", "probe_timeout_s",
)  # fmt: skip
_FLEET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _parse_fleet(reader: _Reader, raw: Any, host: str) -> FleetSettings | None:
    if raw is None:
        return None
    hint = "write `fleet: {redis_url: redis://..., key_file: ..., advertise_url: http://...}`"
    body = reader.mapping(("fleet",), raw, hint)
    if body is None:
        return None
    reader.unknown_keys(("fleet",), body, _FLEET_KEYS)
    values: dict[str, Any] = {}
    for key in ("redis_url", "key_file", "advertise_url"):
        if key not in body:
            reader.error(("fleet",), "missing-key", f"fleet needs {key}", hint)
            continue
        values[key] = reader.string(("fleet", key), body[key], f"write {key} as a string")
    for key in ("name", "redis_password_env", "environment_file", "prefix"):
        if key in body:
            values[key] = reader.string(("fleet", key), body[key], f"write {key} as a string")
    for key, schemes in (("redis_url", ("redis", "rediss")), ("advertise_url", ("http", "https"))):
        value = values.get(key)
        if isinstance(value, str):
            parts = urlsplit(value)
            if parts.scheme not in schemes or not parts.hostname:
                reader.error(
                    ("fleet", key),
                    "wrong-value",
                    f"{key} is not a {'/'.join(schemes)} URL",
                    f"e.g. {schemes[0]}://10.0.0.2:{6379 if key == 'redis_url' else 4000}",
                )
                values[key] = None
    name = values.get("name") or host
    if not _FLEET_NAME.match(str(name)):
        reader.error(
            ("fleet", "name"),
            "wrong-value",
            f"{name!r} cannot name a host in the fleet",
            "letters, digits, '.', '_' and '-'",
        )
    values["name"] = str(name)
    if "remote_models" in body:
        models = reader.sequence(("fleet", "remote_models"), body["remote_models"], "a list")
        values["remote_models"] = tuple(str(m) for m in models or () if isinstance(m, str))
    for key in ("heartbeat_s", "ttl_s", "probe_interval_s", "probe_timeout_s"):
        if key in body:
            number = reader.number(("fleet", key), body[key], "seconds")
            if number is not None and number <= 0:
                reader.error(("fleet", key), "out-of-range", "must be above 0", "e.g. 1")
            elif number is not None:
                values[key] = number
    required = ("redis_url", "key_file", "advertise_url")
    if any(not values.get(key) for key in required) or any(
        v is None for k, v in values.items() if k not in required
    ):
        return None
    fleet = FleetSettings(**values)
    if fleet.ttl_s < 2 * fleet.heartbeat_s:
        reader.error(
            ("fleet", "ttl_s"),
            "out-of-range",
            "ttl_s is under two heartbeats: a live host's record could expire",
            f"use at least {2 * fleet.heartbeat_s:g}",
        )
    return fleet


def _parse_http(reader: _Reader, raw: Any) -> HttpSettings:
    if raw is None:
        return HttpSettings()
    body = reader.mapping(("http",), raw, "write `http: {port: 9478}` (port 0: none)")
    if body is None:
        return HttpSettings()
    reader.unknown_keys(("http",), body, ("host", "port"))
    values: dict[str, Any] = {}
    if "host" in body:
        host = reader.string(("http", "host"), body["host"], "a loopback address")
        if host is not None and host not in ("127.0.0.1", "::1", "localhost"):
            reader.error(
                ("http", "host"),
                "not-loopback",
                f"{host} is not a loopback address: metrics and answers stay on this machine",
                "use 127.0.0.1 (or ::1)",
            )
        elif host is not None:
            values["host"] = host
    if "port" in body:
        port = reader.integer(("http", "port"), body["port"], "a TCP port (0: none)", minimum=0)
        if port is not None and port > 65535:
            reader.error(("http", "port"), "out-of-range", "port above 65535", "use 1-65535")
        elif port is not None:
            values["port"] = port
    return HttpSettings(**values)


def _parse_supervision(reader: _Reader, raw: Any) -> SupervisionSettings:
    if raw is None:
        return SupervisionSettings()
    body = reader.mapping(("supervision",), raw, "write `supervision: {revive_initial_s: 10}`")
    if body is None:
        return SupervisionSettings()
    reader.unknown_keys(("supervision",), body, (*_SUPERVISION_KEYS, *_RETIRED_SUPERVISION_KEYS))
    for key, why in _RETIRED_SUPERVISION_KEYS.items():
        if key in body:
            reader.warn(("supervision", key), "retired-key", f"{key} is no longer used: {why}",
                        f"remove {key}")  # fmt: skip
    values: dict[str, float] = {}
    for key in _SUPERVISION_KEYS:
        if key not in body:
            continue
        number = reader.number(("supervision", key), body[key], "seconds")
        if number is not None and key in _MAY_BE_ZERO and number < 0:
            reader.error(("supervision", key), "out-of-range", "must be 0 or more", "0: none")
        elif number is not None and key not in _MAY_BE_ZERO and number <= 0:
            reader.error(("supervision", key), "out-of-range", "must be above 0", "e.g. 10")
        elif number is not None:
            values[key] = number
    settings = SupervisionSettings(**values)
    if settings.revive_max_s < settings.revive_initial_s:
        reader.error(
            ("supervision", "revive_max_s"),
            "out-of-range",
            "revive_max_s is below revive_initial_s",
            f"use at least {settings.revive_initial_s:g}",
        )
        return SupervisionSettings()
    return settings


def _parse_gateway(reader: _Reader, raw: Any) -> GatewaySettings:
    if raw is None:
        return GatewaySettings()
    body = reader.mapping(("gateway",), raw, "write `gateway: {port: 4000}`")
    if body is None:
        return GatewaySettings()
    reader.unknown_keys(("gateway",), body, _GATEWAY_KEYS)
    values: dict[str, Any] = {}
    if "owned" in body:
        if isinstance(body["owned"], bool):
            values["owned"] = body["owned"]
        else:
            reader.error(("gateway", "owned"), "wrong-type", "owned is true or false")
    for key in ("host", "master_key_file", "litellm_venv"):
        if key in body:
            value = reader.string(("gateway", key), body[key], f"write {key} as a string")
            if value is not None:
                values[key] = value
    if "port" in body:
        port = reader.integer(("gateway", "port"), body["port"], "a TCP port", minimum=1)
        if port is not None and port > 65535:
            reader.error(("gateway", "port"), "out-of-range", "port above 65535", "use 1-65535")
        elif port is not None:
            values["port"] = port
    if "keep_configs" in body:
        keep = reader.integer(
            ("gateway", "keep_configs"), body["keep_configs"], "how many old configs", minimum=1
        )
        if keep is not None:
            values["keep_configs"] = keep
    if "instances" in body:
        count = reader.integer(
            ("gateway", "instances"), body["instances"], "1 or 2 LiteLLM processes", minimum=1
        )
        if count is not None and count > 2:
            reader.error(
                ("gateway", "instances"), "out-of-range", "instances is 1 or 2", "use 1 or 2"
            )
        elif count is not None:
            values["instances"] = count
    if "environment_files" in body:
        files = reader.sequence(
            ("gateway", "environment_files"),
            body["environment_files"],
            "write `environment_files: [~/.config/diversityd/cloud.env]`",
        )
        clean = [
            f
            for index, f in enumerate(files or [])
            if reader.string(("gateway", "environment_files", index), f, "a file path")
        ]
        values["environment_files"] = tuple(clean)
    for key in ("litellm_settings", "router_settings", "general_settings"):
        if key in body:
            section = reader.mapping(("gateway", key), body[key], f"write `{key}:` as a mapping")
            if section is not None:
                values[key] = section
    if "timeouts" in body:
        values["timeouts"] = _parse_timeouts(reader, body["timeouts"])
    return GatewaySettings(**values)


def _parse_timeouts(reader: _Reader, raw: Any) -> dict[str, dict[str, float]]:
    path: KeyPath = ("gateway", "timeouts")
    body = reader.mapping(path, raw, "write `timeouts: {llama_cpp: {timeout_s: 30}}`")
    result: dict[str, dict[str, float]] = {}
    if body is None:
        return result
    reader.unknown_keys(path, body, TIMEOUT_KINDS)
    for kind, values in body.items():
        if kind not in TIMEOUT_KINDS:
            continue
        section = reader.mapping((*path, kind), values, f"write `{kind}: {{timeout_s: 30}}`")
        if section is None:
            continue
        reader.unknown_keys((*path, kind), section, TIMEOUT_KEYS)
        for key, value in section.items():
            if key not in TIMEOUT_KEYS:
                continue
            number = reader.number((*path, kind, key), value, "seconds")
            if number is not None and number <= 0:
                reader.error((*path, kind, key), "out-of-range", "must be above 0", "e.g. 30")
            elif number is not None:
                result.setdefault(kind, {})[key] = number
    return result


def _parse_owned(
    reader: _Reader,
    name: str,
    raw: Any,
    providers: Mapping[str, Provider],
    broken_providers: set[str],
) -> OwnedServer | None:
    path: KeyPath = ("providers", name)
    body = reader.mapping(path, raw, "write `NAME: {server: llama-server, model_path: ...}`")
    if body is None:
        return None
    reader.unknown_keys(path, body, _OWNED_KEYS)
    provider = providers.get(name)
    if provider is None:
        if name not in broken_providers:
            reader.error(
                path,
                "unknown-provider",
                f"{quoted(name)} is not a provider in {PROVIDERS_FILE}",
                f"use a name from {PROVIDERS_FILE}: {', '.join(sorted(providers)) or '(none)'}",
            )
        return None
    owned = body.get("owned", True)
    if not isinstance(owned, bool):
        reader.error((*path, "owned"), "wrong-type", "owned is true or false")
        return None
    if not owned:
        return None  # watched only: probed, never started or stopped
    default_server = {"ollama": "ollama", "vllm": "vllm"}.get(provider.type)
    server = body.get("server", default_server)
    if server not in SERVER_KINDS:
        reader.error(
            (*path, "server"),
            "missing-key" if server is None else "wrong-value",
            f"server is {quoted(server)}",
            f"say how {name} runs: one of {', '.join(SERVER_KINDS)}",
        )
        return None
    if SERVER_KIND_TYPE[server] != provider.type:
        reader.error(
            (*path, "server"),
            "wrong-value",
            f"server {quoted(server)} cannot serve a provider of type {provider.type!r}",
            "match the provider's type in providers.yaml",
        )
        return None
    if provider.address[0] not in LOOPBACK_HOSTS:
        reader.error(
            path,
            "remote-owned",
            f"{name} listens on {provider.address[0]}, not on this machine; "
            "diversityd owns only local units",
            "set `owned: false` to watch it, or run diversityd on that host",
        )
        return None
    ok = True

    def optional_int(key: str, hint: str, minimum: int) -> int | None:
        nonlocal ok
        if key not in body or body[key] is None:
            return None
        value = reader.integer((*path, key), body[key], hint, minimum=minimum)
        ok = ok and value is not None
        return value

    ctx = optional_int("ctx", "tokens of context per slot", 1) or 4096
    parallel = optional_int("parallel", "slots served at once", 1) or 1
    threads = optional_int("threads", "CPU threads", 1)
    n_gpu_layers: int | None = None
    if body.get("n_gpu_layers", "auto") != "auto":
        n_gpu_layers = optional_int("n_gpu_layers", "a layer count or `auto`", -1)
    gpu: int | None = 0
    if "gpu" in body:
        gpu = (
            None
            if body["gpu"] in (None, "none", "cpu")
            else optional_int("gpu", "a GPU index or `none`", 0)
        )
    vram_priority = optional_int("vram_priority", "higher gets VRAM first", -1000) or 0
    vram_mib = optional_int("vram_mib", "MiB Ollama may use", 0)
    utilization: float | None = None
    if body.get("gpu_memory_utilization") is not None:
        utilization = reader.number(
            (*path, "gpu_memory_utilization"), body["gpu_memory_utilization"], "a fraction"
        )
        if utilization is not None and not 0 < utilization <= 1:
            reader.error(
                (*path, "gpu_memory_utilization"), "out-of-range", "must be in (0, 1]", "e.g. 0.45"
            )
            utilization = None
        ok = ok and utilization is not None
    strings: dict[str, str | None] = {}
    for key in ("executable", "model_path"):
        value = body.get(key)
        if value is None:
            strings[key] = None
        else:
            strings[key] = reader.string((*path, key), value, f"write {key} as a path")
            ok = ok and strings[key] is not None
    extra = reader.sequence(
        (*path, "extra_args"), body.get("extra_args"), 'write `extra_args: ["--flag", "value"]`'
    )
    extra_args: list[str] = []
    for index, arg in enumerate(extra or []):
        if isinstance(arg, str | int | float) and not isinstance(arg, bool):
            extra_args.append(str(arg))
        else:
            reader.error((*path, "extra_args", index), "wrong-type", "arguments are strings")
            ok = False
    environment: dict[str, str] = {}
    if body.get("environment") is not None:
        env = reader.mapping(
            (*path, "environment"), body["environment"], "write `environment: {NAME: value}`"
        )
        for key, value in (env or {}).items():
            if not ENV_NAME.match(key) or isinstance(value, dict | list):
                reader.error(
                    (*path, "environment", key),
                    "wrong-type",
                    "environment maps variable names to plain values",
                )
                ok = False
            else:
                environment[key] = (
                    ""
                    if value is None
                    else str(value).lower()
                    if isinstance(value, bool)
                    else str(value)
                )
        ok = ok and env is not None
    if extra is None:
        ok = False
    log_level = body.get("log_level", "warning")
    if log_level not in SERVER_LOG_LEVELS:
        reader.error(
            (*path, "log_level"),
            "wrong-value",
            f"log_level is {quoted(log_level)}",
            f"one of {', '.join(SERVER_LOG_LEVELS)} (info adds llama-server's timing lines)",
        )
        ok = False
    if server in ("llama-server", "llama-cpp-python", "vllm") and strings["model_path"] is None:
        reader.error(
            path,
            "missing-key",
            f"{name} runs {server} but names no model_path",
            "add `model_path:` (for llama servers the active symlink, e.g. "
            "~/models/active/current.gguf)",
        )
        ok = False
    if not ok:
        return None
    return OwnedServer(
        provider=name,
        server=server,
        executable=strings["executable"],
        model_path=strings["model_path"],
        ctx=ctx,
        parallel=parallel,
        threads=threads,
        n_gpu_layers=n_gpu_layers,
        gpu=gpu,
        vram_priority=vram_priority,
        gpu_memory_utilization=utilization,
        vram_mib=vram_mib,
        extra_args=tuple(extra_args),
        environment=environment,
        where=Where(reader.doc.file, path),
        log_level=str(log_level),
    )


# ---------------------------------------------------------------------------------------
# Entry points


def parse_config(
    texts: Mapping[str, str | None], *, config_dir: str, hostname: str
) -> tuple[Config | None, list[Finding]]:
    """Parse the three files (by file name; None = absent). Pure.

    Returns the configuration (None when a file could not be parsed at all) and the
    findings of parsing: errors in types and shapes, warnings about ignored keys.
    """
    findings: list[Finding] = []
    docs: dict[str, LoadedYaml] = {}
    for name in (PROVIDERS_FILE, MAPPINGS_FILE, SETTINGS_FILE):
        text = texts.get(name)
        path = str(Path(config_dir) / name)
        if text is None:
            if name != SETTINGS_FILE:
                findings.append(
                    Finding(
                        Severity.ERROR,
                        "missing-file",
                        f"{name} not found in {config_dir}",
                        file=path,
                        hint=f"create {path}, or pass --config-dir with the directory holding it",
                    )
                )
            continue
        try:
            docs[name] = parse_yaml(text, path)
        except ConfigError as exc:
            findings.extend(exc.findings)
    if any(f.severity is Severity.ERROR for f in findings):
        return None, findings
    providers = _parse_providers(docs[PROVIDERS_FILE], findings)
    raw_names = (docs[PROVIDERS_FILE].data or {}).get("providers")
    broken = set(raw_names) - set(providers) if isinstance(raw_names, dict) else set()
    exact, chains = _parse_mappings(docs[MAPPINGS_FILE], findings)
    settings = _parse_settings(docs.get(SETTINGS_FILE), providers, broken, hostname, findings)
    config = Config(
        config_dir=config_dir,
        providers=providers,
        exact_matches=exact,
        chains=chains,
        settings=settings,
        docs={doc.file: doc for doc in docs.values()},
    )
    return config, findings


class FileRefusedError(OSError):
    """A file that is not read at all: not a regular file, or larger than allowed."""


def read_bounded(path: Path, max_bytes: int) -> bytes | None:
    """The bytes of a regular file of at most `max_bytes`; None when there is none. What it
    is and how big is checked BEFORE reading (FileRefusedError): a link to /dev/zero would
    read until memory runs out, a FIFO would block until a writer comes."""
    try:
        before = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    _check_regular(before, max_bytes)
    # O_NONBLOCK: a FIFO swapped in after the check still cannot block the open
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        _check_regular(os.fstat(fd), max_bytes)
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 16, max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:  # it grew while being read
                raise FileRefusedError(f"it grew past {max_bytes:,} bytes while being read")
    finally:
        os.close(fd)
    return b"".join(chunks)


def _check_regular(status: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(status.st_mode):
        kinds = {
            stat.S_IFDIR: "a directory",
            stat.S_IFIFO: "a FIFO",
            stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device",
            stat.S_IFSOCK: "a socket",
        }
        kind = kinds.get(stat.S_IFMT(status.st_mode), "not a regular file")
        raise FileRefusedError(f"it is {kind}, not a regular file")
    if status.st_size > max_bytes:
        raise FileRefusedError(
            f"it holds {status.st_size:,} bytes; a configuration file holds at most {max_bytes:,}"
        )


def read_config_texts(config_dir: Path) -> dict[str, str | None]:
    """The three files' texts (None: absent), each checked before it is read."""
    texts: dict[str, str | None] = {}
    for name in (PROVIDERS_FILE, MAPPINGS_FILE, SETTINGS_FILE):
        path = config_dir / name
        try:
            data = read_bounded(path, MAX_BYTES)
            texts[name] = None if data is None else data.decode("utf-8")
        except FileRefusedError as exc:
            raise ConfigError(
                [
                    Finding(
                        Severity.ERROR,
                        "unreadable-file",
                        f"{path} is not read: {exc}",
                        file=str(path),
                        hint="point it at a regular YAML file of at most "
                        f"{MAX_BYTES // (1 << 20)} MiB",
                    )
                ]
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                [
                    Finding(
                        Severity.ERROR,
                        "unreadable-file",
                        f"cannot read {path}: {exc}",
                        file=str(path),
                        hint="check the file's permissions and encoding (UTF-8)",
                    )
                ]
            ) from None
    return texts


def load_config(config_dir: Path) -> tuple[Config | None, list[Finding]]:
    """Read and parse the configuration directory (the thin I/O edge of parse_config)."""
    texts = read_config_texts(config_dir)
    return parse_config(texts, config_dir=str(config_dir), hostname=socket.gethostname())
