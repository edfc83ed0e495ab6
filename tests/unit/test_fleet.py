"""The fleet's pure parts: records, how a peer is judged, and the peers' routes in the
rendered gateway (issue 22)."""

from __future__ import annotations

import textwrap
from typing import Any

from diversityd.adapters.gatewayruntime import FleetRoutes
from diversityd.catalog import build_catalog
from diversityd.config import Config, parse_config
from diversityd.fleet import (
    HostRecord,
    PeerRoute,
    PeerView,
    observe_record,
    parse_record,
    peer_routes,
    redacted,
)
from diversityd.gateway import PEER_INFO, Availability, render_gateway
from diversityd.validation import validate

PROVIDERS = """\
providers:
  a: {type: llama_cpp, base_url: "http://127.0.0.1:8000", models: [a-model]}
  v: {type: vllm, base_url: "http://127.0.0.1:8001", models: [v-model]}
"""
MAPPINGS = """\
fallback_chains:
  a-model: {chain: [v-model]}
  v-model: {chain: []}
"""
FLEET = """\
fleet:
  redis_url: redis://10.0.0.1:6379/0
  key_file: /home/me/.config/diversityd/fleet.key
  advertise_url: http://10.0.0.2:4000
  remote_models: [big-model]
"""


def load(settings: str = FLEET, mappings: str = MAPPINGS) -> Config:
    config, findings = parse_config(
        {
            "providers.yaml": PROVIDERS,
            "model-mappings.yaml": mappings,
            "diversityd.yaml": textwrap.dedent(settings),
        },
        config_dir="/cfg",
        hostname="h0",
    )
    assert config is not None, findings
    return config


def record(host: str, seq: int, *models: str) -> HostRecord:
    return HostRecord(host, f"http://{host}:4000", seq, models, {})


def test_a_record_reads_back_and_anything_else_is_refused() -> None:
    mine = record("h1", 7, "a-model", "v-model")
    assert parse_record(mine.to_json()) == mine
    assert parse_record(None) is None
    assert parse_record(b"not json") is None
    assert parse_record('{"schema": 2, "host": "h1"}') is None  # another schema
    assert parse_record('{"schema": 1, "host": "h1", "gateway_url": 3, "seq": 1}') is None
    assert parse_record(b"x" * (300 * 1024)) is None


def test_a_heartbeat_is_a_seq_that_moved_on_this_hosts_clock() -> None:
    """Two hosts' clocks are never compared: the reader times the peer's `seq`."""
    view = observe_record(None, record("h1", 1), now=100.0)
    observe_record(view, record("h1", 1), now=105.0)
    assert view.seq_seen_at == 100.0  # no beat for 5 s
    observe_record(view, record("h1", 2), now=106.0)
    assert view.seq_seen_at == 106.0


def test_a_peer_is_routed_to_while_its_gateway_answers_this_hosts_probes() -> None:
    """Trust what is measured: a peer whose daemon died (record expired) still serves
    through its gateway; one whose record lives but whose gateway is silent is out."""
    dead_daemon = PeerView(record("h1", 3, "a-model"), 0.0, in_redis=False)
    dead_daemon.probe_ok, dead_daemon.probe_at = True, 99.5
    frozen = PeerView(record("h2", 9, "a-model"), 99.9, in_redis=True)
    frozen.probe_ok, frozen.probe_at = False, 99.5
    stale = PeerView(record("h3", 9, "a-model"), 99.9)
    stale.probe_ok, stale.probe_at = True, 80.0  # no probe for 20 s says nothing now
    routes = peer_routes([dead_daemon, frozen, stale], now=100.0, probe_interval_s=1.0, own="h0")
    assert routes == {"a-model": (PeerRoute("h1", "http://h1:4000"),)}


def test_peers_are_last_in_a_chain_and_serve_a_name_nothing_here_can() -> None:
    config = load()
    catalog = build_catalog(config)
    peers = {
        "a-model": (PeerRoute("h1", "http://10.0.0.3:4000"),),
        "v-model": (PeerRoute("h1", "http://10.0.0.3:4000"),),
        "big-model": (PeerRoute("h1", "http://10.0.0.3:4000"),),
    }
    plan = render_gateway(config, catalog, Availability.all_up_except(config), peers=peers)
    assert plan.fallbacks["a-model"] == ("v-model", "a-model@h1")  # local first, then the peer
    assert plan.fallbacks["v-model"] == ("v-model@h1",)  # no local fallback: the peer
    assert plan.served_by["big-model"] == ("peer:h1",)  # only the peer serves it
    entries = {e["model_name"]: e for e in plan.document["model_list"]}
    peer = entries["a-model@h1"]
    assert peer["litellm_params"]["api_base"] == "http://10.0.0.3:4000/v1"
    assert peer["litellm_params"]["api_key"] == "os.environ/DIVERSITYD_FLEET_KEY"
    assert peer["model_info"][PEER_INFO] == "h1"
    assert peer["model_info"]["cooldown_time"] == 0
    assert "a-model@h1" not in plan.fallbacks  # a peer's group goes nowhere further
    # v's server down: v-model served by the peer, under its own name
    down = render_gateway(
        config, catalog, Availability.all_up_except(config, frozenset({"v"})), peers=peers
    )
    assert down.substituted["v-model"] == "v-model@h1"
    (served,) = [e for e in down.document["model_list"] if e["model_name"] == "v-model"]
    assert served["litellm_params"]["model"] == "openai/v-model"
    # without peers: nothing of theirs
    alone = render_gateway(config, catalog, Availability.all_up_except(config))
    assert not any("@h1" in e["model_name"] for e in alone.document["model_list"])


def test_a_peers_request_gets_chains_without_any_peer() -> None:
    """No ping-pong: a request that came from a peer is served here only."""
    config = load()
    peers = {
        "a-model": (PeerRoute("h1", "http://h1:4000"),),
        "big-model": (PeerRoute("h1", "http://h1:4000"),),
    }
    plan = render_gateway(
        config, build_catalog(config), Availability.all_up_except(config), peers=peers
    )
    fleet = FleetRoutes.of(plan.routes())
    chains: dict[str, Any] = {k: v for item in fleet.local_chains for k, v in item.items()}
    assert chains["a-model"] == ["v-model"]
    assert "big-model" in fleet.peer_only  # only a peer serves it here: refused to a peer
    assert "a-model" not in fleet.peer_only


def test_validate_accepts_a_target_only_peers_serve_and_says_so_of_one_host_chains() -> None:
    mappings = MAPPINGS + "  big-chain-source: {chain: []}\n"
    with_remote = load(mappings=MAPPINGS.replace("[v-model]}", "[v-model, big-model]}"))
    report = validate(with_remote, [], {})
    assert [f for f in report.findings if f.code == "missing-target"] == []
    without_fleet = load(settings="", mappings=mappings.replace("[v-model]}", "[big-model]}"))
    codes = [f.code for f in validate(without_fleet, [], {}).findings]
    assert "missing-target" in codes
    one_host = validate(load(), [], {})
    shared = [f for f in one_host.findings if f.code == "shared-host"]
    assert shared  # a fleet: a chain that never leaves this host is worth a warning
    assert all(f.severity.value == "warning" for f in shared)


def test_fleet_settings_are_checked() -> None:
    config, findings = parse_config(
        {
            "providers.yaml": PROVIDERS,
            "model-mappings.yaml": MAPPINGS,
            "diversityd.yaml": "fleet: {redis_url: 'http://x', key_file: /k, "
            "advertise_url: 'ftp://y', heartbeat_s: 2, ttl_s: 3}\n",
        },
        config_dir="/cfg",
        hostname="h0",
    )
    codes = sorted(f.code for f in findings)
    assert codes.count("wrong-value") == 2  # neither URL has the right scheme
    assert config is None or config.settings.fleet is None


def test_a_redis_password_never_shows() -> None:
    assert redacted("redis://:s3cret@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
    assert redacted("redis://10.0.0.1:6379/0") == "redis://10.0.0.1:6379/0"
