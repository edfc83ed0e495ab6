"""The fallback graph: cycles, missing or disabled targets, and failure domains.

`chain: [b, c]` on `a` means: when `a` fails, try `b`, then `c` (LiteLLM's `fallbacks`).
The graph has the edges a->b and a->c. LiteLLM follows a fallback's own fallbacks too (up to
`max_fallbacks` deep), so a whole path matters, not only the first hop.

Failure domains are judged per dimension, by what really serves a model, never by its name:
- unit: the server process at one address (the seeds' `*-cloud` models go THROUGH the
  local Ollama, so they share its unit whatever their names say);
- host: the machine that server runs on;
- upstream: the remote service that really answers (ollama.com, api.openai.com; none for
  local inference);
- gpu: the card a local server computes on (information only on a one-GPU machine).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from diversityd.catalog import Catalog, Deployment
from diversityd.config import CLOUD_TYPES, MAPPINGS_FILE, PROVIDERS_FILE, Config, Where
from diversityd.errors import Finding, Severity


class Dimension(enum.StrEnum):
    UNIT = "unit"
    HOST = "host"
    UPSTREAM = "upstream"
    GPU = "gpu"


def chain_edges(config: Config) -> dict[str, tuple[str, ...]]:
    return {name: chain.targets for name, chain in config.chains.items()}


def find_cycles(edges: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one, as a path `[a, b, a]`.

    Iterative Tarjan (no recursion limit on long chains), then the shortest way back to the
    component's first node, so the printed path is a real cycle of the graph.
    """
    nodes: list[str] = list(edges)
    for targets in edges.values():
        nodes.extend(t for t in targets if t not in edges)
    index_of: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index_of:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, child_index = work.pop()
            if child_index == 0:
                index_of[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            children = edges.get(node, ())
            if child_index < len(children):
                work.append((node, child_index + 1))
                child = children[child_index]
                if child not in index_of:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index_of[child])
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index_of[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(component)
    cycles: list[list[str]] = []
    order = {name: position for position, name in enumerate(nodes)}
    for component in components:
        members = set(component)
        start = min(component, key=order.__getitem__)
        if len(component) == 1 and start not in edges.get(start, ()):
            continue
        cycles.append(_shortest_cycle(start, members, edges))
    cycles.sort(key=lambda cycle: order[cycle[0]])
    return cycles


def _shortest_cycle(start: str, members: set[str], edges: Mapping[str, Sequence[str]]) -> list[str]:
    previous: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        next_frontier = []
        for node in frontier:
            for child in edges.get(node, ()):
                if child == start:
                    path = [start]
                    cursor = node
                    while cursor != start:
                        path.append(cursor)
                        cursor = previous[cursor]
                    path.append(start)
                    return [start, *reversed(path[1:-1]), start]
                if child in members and child not in seen:
                    seen.add(child)
                    previous[child] = node
                    next_frontier.append(child)
        frontier = next_frontier
    raise AssertionError(f"{start} is in a cycle component but no way back was found")


def reachable(start: str, edges: Mapping[str, Sequence[str]]) -> list[str]:
    """Every name reachable from `start` through fallbacks, in walk order, without `start`."""
    seen = {start}
    order: list[str] = []
    pending = list(reversed(edges.get(start, ())))
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        order.append(node)
        pending.extend(reversed(edges.get(node, ())))
    return order


# ---------------------------------------------------------------------------------------
# Findings


def check_graph(config: Config, catalog: Catalog, environ: Mapping[str, str]) -> list[Finding]:
    """Every finding about chains, targets, keys and failure domains. Pure."""
    findings: list[Finding] = []
    edges = chain_edges(config)
    for cycle in find_cycles(edges):
        closing_source, closing_target = cycle[-2], cycle[-1]
        chain = config.chains[closing_source]
        findings.append(
            config.finding(
                Severity.ERROR,
                "fallback-cycle",
                chain.target_where(chain.targets.index(closing_target)),
                f"fallback cycle: {' -> '.join(cycle)}",
                f"remove {closing_target!r} from the chain of {closing_source!r} "
                "(or another edge of the cycle)",
            )
        )
    findings.extend(_check_targets(config, catalog))
    findings.extend(_check_keys(config, environ))
    findings.extend(check_domains(config, catalog))
    return findings


def _check_targets(config: Config, catalog: Catalog) -> Iterable[Finding]:
    for chain in config.chains.values():
        source_active = catalog.is_served(chain.model)
        if not catalog.is_known(chain.model):
            yield config.finding(
                Severity.WARNING,
                "chain-source-unserved",
                chain.where,
                f"a chain for {chain.model!r}, which no provider serves; it is never used",
                f"add {chain.model!r} to a provider's models in {PROVIDERS_FILE}, "
                "or delete this chain",
            )
        for index, target in enumerate(chain.targets):
            where = chain.target_where(index)
            if target == chain.model:
                continue  # reported as a cycle
            if target in config.remote_models() and not catalog.is_known(target):
                continue  # the fleet's peers serve it (`fleet.remote_models`)
            if not catalog.is_known(target):
                yield config.finding(
                    Severity.ERROR,
                    "missing-target",
                    where,
                    f"fallback target {target!r} of {chain.model!r} is served by no provider",
                    f"add {target!r} to a provider's `models:` in {PROVIDERS_FILE} or to "
                    f"`exact_matches:` in {MAPPINGS_FILE}, list it in diversityd.yaml's "
                    "`fleet.remote_models` if a peer serves it, or remove it from the chain",
                )
            elif source_active and not catalog.is_served(target):
                providers = sorted({d.provider.name for d in catalog.deployments[target]})
                yield config.finding(
                    Severity.WARNING,
                    "disabled-target",
                    where,
                    f"fallback target {target!r} of {chain.model!r} is served only by disabled "
                    f"provider {', '.join(providers)}; the gateway skips it",
                    f"set `status: active` on {', '.join(providers)}, or remove {target!r} "
                    "from this chain",
                )


def _check_keys(config: Config, environ: Mapping[str, str]) -> Iterable[Finding]:
    for provider in config.providers.values():
        if not provider.active or provider.api_key_env is None:
            continue
        if not environ.get(provider.api_key_env):
            yield config.finding(
                Severity.WARNING,
                "key-unset",
                Where(provider.where.file, (*provider.where.path, "api_key_env")),
                f"{provider.name} reads its key from ${provider.api_key_env}, which is not set",
                f"export {provider.api_key_env}=... (or list a file that sets it in "
                "diversityd.yaml `gateway.environment_files`)",
            )


@dataclass(frozen=True)
class _Domain:
    key: str
    label: str


def domain_of(config: Config, deployment: Deployment, dimension: Dimension) -> _Domain | None:
    """The failure domain of one deployment in one dimension; None: it has none there."""
    provider = deployment.provider
    host = config.host_of(provider)
    if dimension is Dimension.UNIT:
        address, port = provider.address
        sharing = sorted(
            p.name
            for p in config.providers.values()
            if (config.host_of(p), p.address[1]) == (host, port)
        )
        label = f"the server at {address}:{port} ({', '.join(sharing)})"
        return _Domain(f"{host}:{port}", label)
    if dimension is Dimension.HOST:
        return _Domain(host, f"host {host}")
    if dimension is Dimension.UPSTREAM:
        if deployment.upstream is None:
            return None
        return _Domain(deployment.upstream, f"upstream {deployment.upstream}")
    # GPU: local inference only; a cloud model forwarded by Ollama computes elsewhere.
    if provider.type in CLOUD_TYPES or deployment.upstream is not None:
        return None
    owned = config.settings.owned.get(provider.name)
    gpu = owned.gpu if owned is not None else (0 if config.settings.gpus >= 1 else None)
    if gpu is None or (owned is not None and owned.n_gpu_layers == 0):
        return None
    return _Domain(f"{host}/gpu{gpu}", f"GPU {gpu} of {host}")


def _severity(config: Config, dimension: Dimension, catalog: Catalog) -> Severity:
    if dimension is Dimension.GPU:
        return Severity.INFO if config.settings.gpus <= 1 else Severity.WARNING
    if dimension is Dimension.HOST and config.settings.fleet is not None:
        return Severity.WARNING  # a fleet: a chain that never leaves this host is a choice
    if dimension is Dimension.HOST:
        hosts = {
            config.host_of(d.provider)
            for deployments in catalog.deployments.values()
            for d in deployments
            if d.provider.active
        }
        return Severity.INFO if len(hosts) <= 1 else Severity.WARNING
    return Severity.WARNING


def _domains(
    config: Config, catalog: Catalog, model: str, dimension: Dimension
) -> set[_Domain | None]:
    if model in config.remote_models() and not catalog.is_known(model):
        # served by the fleet's peers: another host, other units and GPUs, none known here
        if dimension is Dimension.HOST:
            return {_Domain("fleet-peers", "the fleet's other hosts")}
        return {None}
    return {domain_of(config, d, dimension) for d in catalog.active(model)}


def check_domains(config: Config, catalog: Catalog) -> list[Finding]:
    findings: list[Finding] = []
    remote = set(config.remote_models())
    edges = {
        name: tuple(t for t in targets if catalog.is_served(t) or t in remote)
        for name, targets in chain_edges(config).items()
    }
    # Where a shared domain cannot be avoided (one host, one GPU) it is information, said once.
    summarized: dict[Dimension, list[str]] = {}
    summary_label: dict[Dimension, str] = {}
    for chain in config.chains.values():
        if not catalog.is_served(chain.model):
            continue
        fallbacks = [name for name in reachable(chain.model, edges) if name != chain.model]
        if not fallbacks:
            continue
        for dimension in Dimension:
            primary = _domains(config, catalog, chain.model, dimension) - {None}
            if not primary:
                continue
            if not all(_domains(config, catalog, name, dimension) <= primary for name in fallbacks):
                continue
            label = " / ".join(sorted(d.label for d in primary if d))
            severity = _severity(config, dimension, catalog)
            if severity is Severity.INFO:
                summarized.setdefault(dimension, []).append(chain.model)
                summary_label[dimension] = label
                continue
            findings.append(
                config.finding(
                    severity,
                    f"shared-{dimension.value}",
                    chain.where,
                    f"every fallback of {chain.model!r} ({', '.join(fallbacks)}) shares its "
                    f"{dimension.value}, {label}: when that fails, the whole chain fails",
                    _diversity_hint(dimension, chain.model),
                )
            )
    for dimension, models in summarized.items():
        only = "one host" if dimension is Dimension.HOST else "one GPU"
        findings.append(
            Finding(
                Severity.INFO,
                f"shared-{dimension.value}",
                f"{len(models)} chains run entirely on {summary_label[dimension]} "
                f"({', '.join(models)}); with {only} configured this is expected",
                file=_mappings_path(config),
                key_path="fallback_chains",
                line=_position(config, "fallback_chains")[0],
                column=_position(config, "fallback_chains")[1],
                hint=_diversity_hint(dimension, None) if dimension is Dimension.HOST else None,
            )
        )
    findings.extend(_check_terminals(config, catalog, edges))
    return findings


def _check_terminals(
    config: Config, catalog: Catalog, edges: Mapping[str, Sequence[str]]
) -> Iterable[Finding]:
    targets = {t for chain_targets in edges.values() for t in chain_targets}
    terminals = sorted(t for t in targets if not edges.get(t))
    if not terminals:
        return
    for dimension in Dimension:
        domains = set().union(*(_domains(config, catalog, t, dimension) for t in terminals))
        if len(domains) == 1 and None not in domains:
            (domain,) = domains
            assert domain is not None
            yield Finding(
                _severity(config, dimension, catalog),
                f"terminal-{dimension.value}",
                f"every terminal of the fallback graph ({', '.join(terminals)}) shares "
                f"{domain.label}: when it is down, every chain's last resort is gone",
                file=str(_mappings_path(config)),
                key_path="fallback_chains",
                line=_position(config, "fallback_chains")[0],
                column=_position(config, "fallback_chains")[1],
                hint=_diversity_hint(dimension, None),
            )


def _mappings_path(config: Config) -> str:
    for file in config.docs:
        if file.endswith(MAPPINGS_FILE):
            return file
    return MAPPINGS_FILE


def _position(config: Config, key: str) -> tuple[int | None, int | None]:
    doc = config.docs.get(_mappings_path(config))
    return doc.position((key,)) if doc else (None, None)


def _diversity_hint(dimension: Dimension, model: str | None) -> str:
    where = f"to the chain of {model!r}" if model else "as a terminal (a model with no chain)"
    return {
        Dimension.UNIT: f"add a model served by a different server {where}",
        Dimension.HOST: f"add a model served from another host {where}",
        Dimension.UPSTREAM: f"add a local model or another cloud service {where}",
        Dimension.GPU: f"add a model on another GPU or a CPU/cloud model {where}",
    }[dimension]
