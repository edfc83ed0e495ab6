"""What the daemon knows about its gateway: the serving instance, the config in force, how
changes reached it. Written only inside the state loop (daemon/loop.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from diversityd.daemon.store import sha256_text
from diversityd.gateway import GatewayPlan
from diversityd.state import UnitSnapshot
from diversityd.statusdoc import GatewayChange, GatewayInstanceStatus, GatewayReload, GatewayStatus
from diversityd.timefmt import iso_time
from diversityd.units import GATEWAY_COLORS, gateway_instance


@dataclass
class GatewayRecord:
    """What the daemon knows about its gateway."""

    url: str
    key_file: str
    config_dir: str
    color: str | None = None  # the instance serving now
    snapshot: UnitSnapshot | None = None
    instances: dict[str, UnitSnapshot] = field(default_factory=dict)  # merged from signals
    applied_text: str | None = None
    applied_at: float | None = None
    history_id: str | None = None
    plan: GatewayPlan | None = None
    reloading: bool = False
    pinned: str | None = None  # a rollback's history id: no automatic reloads until `reload`
    failed_sha: str | None = None  # a config whose proxy would not start: not retried
    last_reload: GatewayReload | None = None
    reloads: int = 0  # new processes started for a change (blue/green), not route updates
    in_sync: bool = False  # the config in force is what the providers' state renders now
    warnings: list[str] = field(default_factory=list)
    route_updates: int = 0  # changes applied in-process, over the control channel
    last_change: GatewayChange | None = None  # how the last change reached the gateway
    routes_at: dict[str, str] = field(default_factory=dict)  # color -> routes digest it serves
    retiring: set[str] = field(default_factory=set)  # colours a switch is stopping/restarting

    @property
    def unit(self) -> str | None:
        return gateway_instance(self.color) if self.color else None

    def state(self) -> str:
        if self.reloading:
            return "reloading"
        if self.snapshot is None:
            return "unknown"
        return {
            "active": "ready",
            "activating": "starting",
            "deactivating": "down",
            "failed": "failed",
            "inactive": "stopped",
        }.get(self.snapshot.active_state, "unknown")

    def settled(self) -> bool:
        """Serving the config the providers' state renders now, no reload under way."""
        return self.in_sync and not self.reloading and self.state() == "ready"

    def running_colors(self, instances: int = 1) -> list[str]:
        """The colours whose instance serves and is kept current, the serving one last:
        with one instance wanted, the serving one only (another running is being stopped,
        or about to be); never one a switch is retiring."""
        running = [
            color
            for color in GATEWAY_COLORS
            if (snapshot := self.instances.get(gateway_instance(color))) is not None
            and snapshot.active_state == "active"
            and color not in self.retiring
            and (instances == 2 or color == self.color)
        ]
        return sorted(running, key=lambda c: c == self.color)

    def instance_status(self) -> list[GatewayInstanceStatus]:
        return [
            {
                "unit": unit,
                "state": snapshot.active_state,
                "pid": snapshot.main_pid or None,
                "routes_digest": self.routes_at.get(color),
            }
            for color in GATEWAY_COLORS
            if (snapshot := self.instances.get(unit := gateway_instance(color))) is not None
        ]

    def to_status(self) -> GatewayStatus:
        plan = self.plan
        return {
            "owned": True,
            "url": self.url,
            "state": self.state(),
            "unit": self.unit,
            "pid": self.snapshot.main_pid if self.snapshot and self.snapshot.main_pid else None,
            "config": f"{self.config_dir}/{self.color}.yaml" if self.color else None,
            "config_sha256": sha256_text(self.applied_text) if self.applied_text else None,
            "applied_at": iso_time(self.applied_at) if self.applied_at else None,
            "history_id": self.history_id,
            "key_file": self.key_file,
            "last_reload": self.last_reload,
            "reloads": self.reloads,
            "route_updates": self.route_updates,
            "last_change": self.last_change,
            "instances": self.instance_status(),
            "in_sync": self.in_sync,
            "pinned": self.pinned,
            "models": sorted(plan.served_by) if plan else [],
            "substituted": dict(plan.substituted) if plan else {},
            "left_out": list(plan.left_out) if plan else [],
            "warnings": list(self.warnings),
        }
