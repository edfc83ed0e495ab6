"""Several workstations, one fleet: what each host publishes in Redis, how peers are judged,
and which of their models this gateway may route to. Pure.

Each daemon keeps one record in the user's Redis (`{prefix}:v1:host:{name}`, a JSON value
Redis expires after `fleet.ttl_s` unless it is refreshed) and says on a channel
(`{prefix}:v1:changes`) when it changed. A record names the host's gateway URL for peers
and the models its own servers serve now (local inference only: a host never offers its
peers a cloud). `seq` grows at every refresh: a peer's heartbeat is a `seq` that moved,
timed on the reader's own monotonic clock; no two hosts' clocks are ever compared.

Whether a peer is used is measured here, not only told: its gateway answers this host's
own probes (`/health/liveliness`, which asks no model). A peer whose daemon died (its
record expired) still serves through its gateway while probes succeed; a peer whose record
lives but whose gateway does not answer (frozen, cut off) is out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

SCHEMA = 1
MAX_RECORD_BYTES = 256 * 1024
PROBE_FRESH_INTERVALS = 3  # a probe older than this many intervals says nothing any more


def redacted(url: str) -> str:
    """A Redis URL without its password, for logs and status."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def record_key(prefix: str, host: str) -> str:
    return f"{prefix}:v{SCHEMA}:host:{host}"


def record_pattern(prefix: str) -> str:
    return f"{prefix}:v{SCHEMA}:host:*"


def changes_channel(prefix: str) -> str:
    return f"{prefix}:v{SCHEMA}:changes"


def peer_group(model: str, host: str) -> str:
    """The gateway's own name for `model` as `host` serves it (a fallback target)."""
    return f"{model}@{host}"


@dataclass(frozen=True)
class HostRecord:
    host: str
    gateway_url: str
    seq: int
    models: tuple[str, ...]  # served now by the host's own servers, local inference
    providers: Mapping[str, str] = field(default_factory=dict)  # provider -> state (shown)

    def to_json(self) -> str:
        return json.dumps(
            {
                "schema": SCHEMA,
                "host": self.host,
                "gateway_url": self.gateway_url,
                "seq": self.seq,
                "models": list(self.models),
                "providers": dict(self.providers),
            },
            sort_keys=True,
        )


def parse_record(raw: bytes | str | None) -> HostRecord | None:
    """A peer's record, or None for anything else (another schema, damage, too big)."""
    if raw is None or len(raw) > MAX_RECORD_BYTES:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return None
    host, url, seq = data.get("host"), data.get("gateway_url"), data.get("seq")
    models, providers = data.get("models"), data.get("providers") or {}
    if not (isinstance(host, str) and isinstance(url, str) and isinstance(seq, int)):
        return None
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        return None
    if not isinstance(providers, dict):
        return None
    states = {str(k): str(v) for k, v in providers.items()}
    return HostRecord(host, url, seq, tuple(models), states)


@dataclass
class PeerView:
    """What this host knows of one peer (written only in the daemon's state loop)."""

    record: HostRecord  # the last one read (kept when Redis dropped it: the daemon died)
    seq_seen_at: float  # monotonic: when its `seq` last moved (its heartbeat)
    in_redis: bool = True  # False: its record expired, or Redis cannot be read
    probe_ok: bool | None = None
    probe_at: float | None = None  # monotonic
    probe_error: str | None = None
    probe_ms: float | None = None

    def usable(self, now: float, probe_interval_s: float) -> bool:
        """Routed to: its gateway answered this host's last probe, and recently."""
        fresh = (
            self.probe_at is not None
            and now - self.probe_at <= PROBE_FRESH_INTERVALS * probe_interval_s + 1.0
        )
        return bool(self.probe_ok) and fresh

    def to_status(self, now: float, probe_interval_s: float) -> dict[str, Any]:
        return {
            "host": self.record.host,
            "gateway_url": self.record.gateway_url,
            "heartbeat_age_s": round(now - self.seq_seen_at, 1),
            "in_redis": self.in_redis,
            "probe": {
                "ok": self.probe_ok,
                "age_s": None if self.probe_at is None else round(now - self.probe_at, 1),
                "ms": self.probe_ms,
                "error": self.probe_error,
            },
            "usable": self.usable(now, probe_interval_s),
            "models": list(self.record.models),
            "providers": dict(self.record.providers),
        }


def observe_record(view: PeerView | None, record: HostRecord, now: float) -> PeerView:
    """A record read from Redis: its heartbeat moved if its `seq` did."""
    if view is None:
        return PeerView(record, seq_seen_at=now)
    if record.seq != view.record.seq:
        view.seq_seen_at = now
    view.record, view.in_redis = record, True
    return view


@dataclass(frozen=True)
class PeerRoute:
    """A usable peer that serves a model: where this gateway sends requests for it."""

    host: str
    gateway_url: str


def peer_routes(
    peers: Iterable[PeerView], now: float, probe_interval_s: float, own: str
) -> dict[str, tuple[PeerRoute, ...]]:
    """Model -> the usable peers serving it (never this host itself), by host name."""
    routes: dict[str, list[PeerRoute]] = {}
    for view in sorted(peers, key=lambda v: v.record.host):
        record = view.record
        if record.host == own or not view.usable(now, probe_interval_s):
            continue
        for model in record.models:
            routes.setdefault(model, []).append(PeerRoute(record.host, record.gateway_url))
    return {model: tuple(found) for model, found in routes.items()}


def own_record(
    name: str,
    gateway_url: str,
    seq: int,
    served_locally: Iterable[str],
    states: Mapping[str, str],
) -> HostRecord:
    return HostRecord(name, gateway_url, seq, tuple(sorted(set(served_locally))), dict(states))


@dataclass
class FleetState:
    """The fleet as this host sees it (written only in the daemon's state loop)."""

    name: str = ""
    redis_ok: bool | None = None  # None: not tried yet
    redis_error: str | None = None
    redis_down_since: float | None = None  # monotonic
    seq: int = 0  # this host's record's
    peers: dict[str, PeerView] = field(default_factory=dict)

    def routes(self, now: float, probe_interval_s: float) -> dict[str, tuple[PeerRoute, ...]]:
        return peer_routes(self.peers.values(), now, probe_interval_s, self.name)

    def to_status(self, now: float, probe_interval_s: float, redis_url: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "redis": {
                "url": redis_url,
                "ok": self.redis_ok,
                "error": self.redis_error,
                "down_s": None
                if self.redis_down_since is None
                else round(now - self.redis_down_since, 1),
            },
            "peers": [
                view.to_status(now, probe_interval_s) for _, view in sorted(self.peers.items())
            ],
        }
