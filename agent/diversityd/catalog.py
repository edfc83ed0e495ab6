"""Which provider serves which model name: the configuration's answer, before any probe.

A provider serves the names in its `models:` list AND every `exact_matches` name that names
it. The second half is what the seeds' v1.7.1 generator forgot: llama_cpp providers without
`models:` were dropped, and every chain through them failed at request time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from diversityd.config import MAPPINGS_FILE, PROVIDERS_FILE, Config, Provider, Where
from diversityd.errors import Finding, Severity


@dataclass(frozen=True)
class Deployment:
    """One provider serving one model name."""

    model: str  # the name clients ask the gateway for
    provider: Provider
    backend_model: str  # the name the backend knows it by
    upstream: str | None  # remote service that really answers (None: local inference)
    where: Where


@dataclass(frozen=True)
class Catalog:
    deployments: Mapping[str, tuple[Deployment, ...]]  # every name, active or disabled providers
    findings: tuple[Finding, ...]

    def active(self, model: str) -> tuple[Deployment, ...]:
        return tuple(d for d in self.deployments.get(model, ()) if d.provider.active)

    def is_served(self, model: str) -> bool:
        return bool(self.active(model))

    def is_known(self, model: str) -> bool:
        return model in self.deployments

    def backend_names_of(self, provider: str) -> tuple[str, ...]:
        """The names this provider's server must answer to (what the gateway asks it for):
        for an owned server, its --alias / --served-model-name."""
        names: list[str] = []
        for deployments in self.deployments.values():
            for d in deployments:
                if d.provider.name == provider and d.backend_model not in names:
                    names.append(d.backend_model)
        return tuple(names)

    def models_of(self, provider: str) -> tuple[str, ...]:
        return tuple(
            name
            for name, deps in self.deployments.items()
            if any(d.provider.name == provider for d in deps)
        )


def build_catalog(config: Config) -> Catalog:
    findings: list[Finding] = []
    by_name: dict[str, list[Deployment]] = {}

    for match in config.exact_matches.values():
        for provider_name in match.providers:
            if provider_name not in config.providers:
                findings.append(
                    config.finding(
                        Severity.ERROR,
                        "unknown-provider",
                        _provider_key(match.where, match.providers, provider_name),
                        f"exact_matches entry {match.name!r} names provider {provider_name!r}, "
                        f"which {PROVIDERS_FILE} does not define",
                        _known_providers_hint(config),
                    )
                )

    for provider in config.providers.values():
        listed: set[str] = set()
        for entry in provider.models:
            if entry.name in listed:
                findings.append(
                    config.finding(
                        Severity.ERROR,
                        "duplicate-model",
                        entry.where,
                        f"{provider.name} lists {entry.name!r} twice",
                        "remove one of the two entries",
                    )
                )
                continue
            listed.add(entry.name)
            entry_match = config.exact_matches.get(entry.name)
            backend = entry.backend_model or (
                entry_match.backend_model
                if entry_match and provider.name in entry_match.providers
                else None
            )
            by_name.setdefault(entry.name, []).append(
                Deployment(
                    model=entry.name,
                    provider=provider,
                    backend_model=backend or entry.name,
                    upstream=config.upstream_of(provider, entry.upstream, entry.name),
                    where=entry.where,
                )
            )
        # exact_matches names that this provider does not list are served all the same
        for match in config.exact_matches.values():
            if provider.name in match.providers and match.name not in listed:
                by_name.setdefault(match.name, []).append(
                    Deployment(
                        model=match.name,
                        provider=provider,
                        backend_model=match.backend_model or match.name,
                        upstream=config.upstream_of(provider, None, match.name),
                        where=match.where,
                    )
                )

    for name, deployments in by_name.items():
        providers = [d.provider.name for d in deployments]
        if len(providers) < 2:
            continue
        balancing = config.exact_matches.get(name)
        balanced = set(balancing.providers) if balancing else set()
        if set(providers) <= balanced:
            continue
        outside = [d for d in deployments if d.provider.name not in balanced]
        second = outside[-1] if outside else deployments[1]
        findings.append(
            config.finding(
                Severity.ERROR,
                "model-served-twice",
                second.where,
                f"{name!r} is served by {' and '.join(providers)} without saying so",
                "rename one of them, or balance between them with "
                f'`exact_matches: {{"{name}": {{providers: [{", ".join(providers)}]}}}}` '
                f"in {MAPPINGS_FILE}",
            )
        )
    return Catalog(
        deployments={name: tuple(deps) for name, deps in by_name.items()},
        findings=tuple(findings),
    )


def _provider_key(where: Where, providers: tuple[str, ...], name: str) -> Where:
    doc_key = "providers" if len(providers) > 1 else "provider"
    index = providers.index(name)
    path = (*where.path, doc_key, index) if doc_key == "providers" else (*where.path, doc_key)
    return Where(where.file, path)


def _known_providers_hint(config: Config) -> str:
    names = ", ".join(config.providers) or "(none)"
    return f"use one of the providers defined in {PROVIDERS_FILE}: {names}"
