"""One verdict on a configuration: parse findings + catalog + fallback graph. Pure."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diversityd.catalog import Catalog, build_catalog
from diversityd.config import SETTINGS_FILE, Config, Where, load_config
from diversityd.errors import ConfigError, Finding, Severity
from diversityd.fallbacks import check_graph
from diversityd.gateway import literal_secrets
from diversityd.secretpatterns import SECRET_FLAG, looks_like_secret, quoted, redact
from diversityd.units import EXEC_PREFIXES, UNSAFE_CHARACTERS
from diversityd.vram import LLAMA_SERVER_KINDS


@dataclass(frozen=True)
class Report:
    findings: tuple[Finding, ...]
    config: Config | None
    catalog: Catalog | None

    def of(self, severity: Severity) -> list[Finding]:
        return [f for f in self.findings if f.severity is severity]

    @property
    def ok(self) -> bool:
        return self.config is not None and not self.of(Severity.ERROR)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": [f.to_json() for f in self.of(Severity.ERROR)],
            "warnings": [f.to_json() for f in self.of(Severity.WARNING)],
            "info": [f.to_json() for f in self.of(Severity.INFO)],
        }


def check_config_dir(config_dir: Path, environ: Mapping[str, str]) -> Report:
    """Read the configuration directory and validate it (files unreadable or malformed
    included): the verdict `validate`, `reload` and the daemon's start act on."""
    try:
        config, parse_findings = load_config(config_dir)
    except ConfigError as exc:
        config, parse_findings = None, list(exc.findings)
    return validate(config, parse_findings, environ)


def validate(
    config: Config | None, parse_findings: Iterable[Finding], environ: Mapping[str, str]
) -> Report:
    findings = list(parse_findings)
    if config is None:
        return Report(tuple(findings), None, None)
    catalog = build_catalog(config)
    findings.extend(catalog.findings)
    findings.extend(check_graph(config, catalog, environ))
    findings.extend(_check_gateway_settings(config))
    findings.extend(_check_owned_models(config, catalog))
    findings.extend(_check_names(config))
    findings.extend(_check_owned_arguments(config))
    findings.extend(_check_unit_values(config))
    return Report(tuple(_dedupe(findings)), config, catalog)


def _check_gateway_settings(config: Config) -> Iterable[Finding]:
    gateway = config.settings.gateway
    settings_file = str(_settings_path(config))
    for section in ("litellm_settings", "router_settings", "general_settings"):
        values: Mapping[str, Any] = getattr(gateway, section)
        for path in literal_secrets(values, f"gateway.{section}"):
            keys = tuple(path.split("."))
            yield config.finding(
                Severity.ERROR,
                "secret-in-config",
                Where(settings_file, keys),
                "a literal secret in pass-through settings would be copied into the gateway config",
                f"write `{keys[-1]}: os.environ/NAME` and put the value in an environment file",
            )
    if "fallbacks" in gateway.router_settings:
        yield config.finding(
            Severity.WARNING,
            "ignored-key",
            Where(settings_file, ("gateway", "router_settings", "fallbacks")),
            "router_settings.fallbacks is generated from fallback_chains; this one is ignored",
            "move the chains to model-mappings.yaml `fallback_chains:`",
        )
    if "master_key" in gateway.general_settings:
        yield config.finding(
            Severity.WARNING,
            "ignored-key",
            Where(settings_file, ("gateway", "general_settings", "master_key")),
            "general_settings.master_key is always os.environ/LITELLM_MASTER_KEY",
            "name the key's file with `gateway.master_key_file` instead",
        )


def _check_owned_models(config: Config, catalog: Catalog) -> Iterable[Finding]:
    """An owned llama server serves one model (its alias): more names cannot all be true."""
    for name, owned in config.settings.owned.items():
        if owned.server not in LLAMA_SERVER_KINDS:
            continue
        models = catalog.models_of(name)
        if len(models) > 1:
            yield config.finding(
                Severity.ERROR,
                "owned-many-models",
                owned.where,
                f"{name} runs one {owned.server} process, which serves one model, but "
                f"{len(models)} names are configured for it: {', '.join(models)}",
                "keep one name for it (the others can be chains pointing at it)",
            )
        elif not models:
            yield config.finding(
                Severity.WARNING,
                "owned-no-model",
                owned.where,
                f"{name} is run by diversityd but serves no configured model name",
                f"add `models: [NAME]` to {name} in providers.yaml or an exact_matches entry",
            )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_IP_HINT = "an IP address, e.g. 127.0.0.1 or ::1 (systemd's ListenStream= takes no names)"


def _check_names(config: Config) -> Iterable[Finding]:
    """Names end up in unit files and their descriptions: a newline there would write
    directives of its own (ExecStartPre=...), so no control character is allowed."""
    named: list[tuple[str, Where, str]] = []
    for provider in config.providers.values():
        named.append((provider.name, provider.where, "provider name"))
        for model in provider.models:
            named.append((model.name, model.where, "model name"))
            if model.backend_model is not None:
                named.append((model.backend_model, model.where, "backend model name"))
    for match in config.exact_matches.values():
        named.append((match.name, match.where, "model name"))
    for chain in config.chains.values():
        named.append((chain.model, chain.where, "model name"))
        named += [(t, chain.target_where(i), "chain target") for i, t in enumerate(chain.targets)]
    for name, where, what in named:
        if _CONTROL.search(name):
            yield config.finding(
                Severity.ERROR,
                "control-character",
                where,
                f"the {what} {quoted(name)} holds a control character (a newline, a tab...)",
                "use letters, digits and punctuation only",
            )


def _check_owned_arguments(config: Config) -> Iterable[Finding]:
    for name, owned in config.settings.owned.items():
        for index, arg in enumerate(owned.extra_args):
            where = Where(owned.where.file, (*owned.where.path, "extra_args", index))
            if SECRET_FLAG.match(arg) or looks_like_secret(arg):
                shown = arg.partition("=")[0] if SECRET_FLAG.match(arg) else redact(arg)
                yield config.finding(
                    Severity.ERROR,
                    "secret-in-arguments",
                    where,
                    f"{name}: {shown!r} passes a secret on the command line, "
                    "which every user can read (/proc) and the unit file would keep",
                    "give it through `environment:` instead (written to a 0600 file), e.g. "
                    "LLAMA_API_KEY for llama-server, or drop it",
                )
            elif _CONTROL.search(arg):
                yield config.finding(
                    Severity.ERROR,
                    "control-character",
                    where,
                    f"{name}: an argument holds a control character",
                    "use one argument per list item",
                )


def _check_unit_values(config: Config) -> Iterable[Finding]:
    """Every other value that reaches a unit file, an environment file or the gateway's
    socket: one line each (no newline, no `\\r`, no control character), paths systemd
    accepts, an address ListenStream= reads."""
    settings_file = _settings_path(config)
    values: list[tuple[str, Where]] = []
    for owned in config.settings.owned.values():
        for key in ("executable", "model_path"):
            value = getattr(owned, key)
            if value is not None:
                values.append((value, Where(owned.where.file, (*owned.where.path, key))))
        values += [
            (value, Where(owned.where.file, (*owned.where.path, "environment", variable)))
            for variable, value in owned.environment.items()
        ]
        if owned.executable and owned.executable.startswith(tuple(EXEC_PREFIXES)):
            yield config.finding(
                Severity.ERROR,
                "unsafe-executable",
                Where(owned.where.file, (*owned.where.path, "executable")),
                f"the executable begins with {owned.executable[0]!r}, which systemd reads as "
                "a prefix of ExecStart= (ignore failures, another argv[0], ...)",
                "name the executable by its absolute path, e.g. /usr/local/bin/llama-server",
            )
    gateway = config.settings.gateway
    paths: list[tuple[str, Where]] = [
        (value, Where(settings_file, keys))
        for value, keys in (
            (gateway.master_key_file, ("gateway", "master_key_file")),
            (gateway.litellm_venv, ("gateway", "litellm_venv")),
            (config.settings.state_dir, ("state_dir",)),
            (config.settings.unit_dir, ("unit_dir",)),
            *_fleet_paths(config),
        )
        if value is not None
    ]
    paths += [
        (path, Where(settings_file, ("gateway", "environment_files", index)))
        for index, path in enumerate(gateway.environment_files)
    ]
    for value, where in [
        *values,
        *paths,
        (gateway.host, Where(settings_file, ("gateway", "host"))),
    ]:
        found = UNSAFE_CHARACTERS.search(value)
        if found:
            yield config.finding(
                Severity.ERROR,
                "control-character",
                where,
                f"the value holds the control character {found.group()!r}: in a unit or an "
                "environment file it would end the line and start a directive of its own",
                "write it on one line (a YAML `|` block keeps its newlines: use a plain or "
                "quoted string)",
            )
    for value, where in paths:
        if not UNSAFE_CHARACTERS.search(value) and not value.startswith(("/", "~/")):
            yield config.finding(
                Severity.ERROR,
                "relative-path",
                where,
                f"{quoted(value)} is not an absolute path (systemd reads only those)",
                "write the path from / (or from your home: ~/...)",
            )
    if not UNSAFE_CHARACTERS.search(gateway.host) and not _is_ip_address(gateway.host):
        yield config.finding(
            Severity.ERROR,
            "wrong-value",
            Where(settings_file, ("gateway", "host")),
            f"{quoted(gateway.host)} is not an IP address: the gateway's socket listens on one",
            _IP_HINT,
        )


def _fleet_paths(config: Config) -> list[tuple[str | None, tuple[str, ...]]]:
    """The fleet's files: the key reaches the gateway's ExecStart=."""
    fleet = config.settings.fleet
    if fleet is None:
        return []
    return [
        (fleet.key_file, ("fleet", "key_file")),
        (fleet.environment_file, ("fleet", "environment_file")),
    ]


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _settings_path(config: Config) -> str:
    for file in config.docs:
        if file.endswith(SETTINGS_FILE):
            return file
    return f"{config.config_dir}/{SETTINGS_FILE}"


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen: set[Finding] = set()
    unique = []
    for finding in findings:
        if finding not in seen:
            seen.add(finding)
            unique.append(finding)
    return unique
