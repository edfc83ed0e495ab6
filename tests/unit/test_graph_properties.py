"""Properties of the fallback graph and the rendered gateway config (hypothesis)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from diversityd.catalog import build_catalog
from diversityd.config import parse_config
from diversityd.fallbacks import find_cycles
from diversityd.gateway import UNAVAILABLE_INFO, Availability, render_gateway

NAMES = [f"m{i}" for i in range(12)]


@st.composite
def dags(draw: st.DrawFn) -> dict[str, list[str]]:
    """Edges only from a lower to a higher position: acyclic by construction."""
    size = draw(st.integers(min_value=1, max_value=len(NAMES)))
    order = draw(st.permutations(NAMES[:size]))
    edges: dict[str, list[str]] = {}
    for position, name in enumerate(order):
        later = order[position + 1 :]
        edges[name] = draw(st.lists(st.sampled_from(later), unique=True)) if later else []
    return edges


def reaches(edges: Mapping[str, Sequence[str]], start: str, goal: str) -> bool:
    seen, pending = set(), [start]
    while pending:
        node = pending.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            pending.extend(edges.get(node, ()))
    return False


@given(dags())
def test_random_dags_are_never_reported_as_cycles(edges: dict[str, list[str]]) -> None:
    assert find_cycles(edges) == []


@given(dags(), st.data())
def test_every_planted_cycle_is_reported_as_a_real_cycle(
    edges: dict[str, list[str]], data: st.DataObject
) -> None:
    nodes = list(edges)
    planted_count = data.draw(st.integers(min_value=1, max_value=3))
    planted: list[list[str]] = []
    for _ in range(planted_count):
        cycle = data.draw(st.lists(st.sampled_from(nodes), min_size=1, max_size=5, unique=True))
        planted.append(cycle)
        for source, target in zip(cycle, cycle[1:] + cycle[:1], strict=True):
            if target not in edges[source]:
                edges[source].append(target)
    reported = find_cycles(edges)
    assert reported
    for cycle in reported:
        assert cycle[0] == cycle[-1]
        for source, target in itertools.pairwise(cycle):
            assert target in edges[source], (cycle, source, target)
    for cycle in planted:
        # its component is reported: some reported cycle is mutually reachable with it
        assert any(
            reaches(edges, c[0], cycle[0]) and reaches(edges, cycle[0], c[0]) for c in reported
        ), (cycle, reported)


@st.composite
def configurations(draw: st.DrawFn) -> tuple[str, str, list[str]]:
    """Random providers serving random names, acyclic chains, and a set of down providers."""
    provider_count = draw(st.integers(min_value=1, max_value=4))
    providers = [f"p{i}" for i in range(provider_count)]
    owner = {name: draw(st.sampled_from(providers)) for name in NAMES}
    provider_doc = {
        "providers": {
            p: {
                "type": draw(st.sampled_from(["ollama", "llama_cpp", "vllm"])),
                "base_url": f"http://127.0.0.1:{9000 + i}",
                "status": draw(st.sampled_from(["active", "active", "disabled"])),
                "models": [n for n in NAMES if owner[n] == p],
            }
            for i, p in enumerate(providers)
        }
    }
    edges = draw(dags())
    mappings_doc = {
        "fallback_chains": {name: {"chain": targets} for name, targets in edges.items()}
    }
    down = draw(st.lists(st.sampled_from(providers), unique=True))
    return yaml.safe_dump(provider_doc), yaml.safe_dump(mappings_doc), down


@settings(max_examples=150, deadline=None)
@given(configurations())
def test_every_fallback_target_is_in_the_model_list(case: tuple[str, str, list[str]]) -> None:
    providers_text, mappings_text, down = case
    config, findings = parse_config(
        {"providers.yaml": providers_text, "model-mappings.yaml": mappings_text},
        config_dir="/cfg",
        hostname="box",
    )
    assert config is not None, findings
    catalog = build_catalog(config)
    plan = render_gateway(config, catalog, Availability.all_up_except(config, frozenset(down)))
    served = [e for e in plan.document["model_list"] if UNAVAILABLE_INFO not in e["model_info"]]
    unavailable = {
        e["model_name"] for e in plan.document["model_list"] if UNAVAILABLE_INFO in e["model_info"]
    }
    assert unavailable == set(plan.left_out)  # listed, answered by the launcher: a 503
    listed = {entry["model_name"] for entry in served}
    for entry in plan.document["router_settings"]["fallbacks"]:
        ((source, targets),) = entry.items()
        assert source in listed
        assert source not in targets
        assert len(targets) == len(set(targets))
        assert set(targets) <= listed, (source, targets, listed)  # never a name nothing serves
    ids = [entry["model_info"]["id"] for entry in plan.document["model_list"]]
    assert len(ids) == len(set(ids))  # every deployment has its own stable id
    for entry in served:
        api_base = entry["litellm_params"]["api_base"]
        port = int(api_base.split(":")[2].split("/")[0])
        serving = f"p{port - 9000}"
        assert serving not in down
        assert config.providers[serving].active
    # a name of an up provider is always served by that provider itself
    for name, deployments in catalog.deployments.items():
        own = [d for d in deployments if d.provider.active and d.provider.name not in down]
        if own:
            assert plan.served_by[name] == tuple(d.provider.name for d in own)
            assert name not in plan.substituted
