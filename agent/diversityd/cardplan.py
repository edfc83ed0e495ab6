"""One VRAM budget per GPU card, shared by every owned server on it, and when to plan again
(hysteresis). Pure, no I/O: the NVML adapter fills in the observations (`GpuSnapshot`);
the per-model estimate is vram.py's.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diversityd.vram import (
    DEFAULT_OVERHEADS,
    DEFAULT_PLACEMENT,
    LLAMA_SERVER_KINDS,
    GiB,
    LayerEstimate,
    MiB,
    ModelSpec,
    Overheads,
    Placement,
    RunParams,
    choose_layers,
    estimate_layers,
    run_params_for,
)

if TYPE_CHECKING:  # the configuration's types only: importing config pulls in YAML
    from diversityd.config import OwnedServer, Provider


# ---------------------------------------------------------------------------------------
# Observations (the NVML adapter fills these in)


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None  # None where the driver cannot say (WDDM, some containers)


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    uuid: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    processes: tuple[GpuProcess, ...] = ()


@dataclass(frozen=True)
class GpuSnapshot:
    """One look at every GPU; `cpu_only_reason` says why there are none to use."""

    gpus: tuple[GpuReading, ...]
    cpu_only_reason: str | None = None

    def gpu(self, index: int) -> GpuReading | None:
        return next((g for g in self.gpus if g.index == index), None)


def others_used_bytes(reading: GpuReading, owned: Mapping[int, int | None]) -> int:
    """What the card's users other than diversityd's own servers hold: everything used (the
    driver's reserve and processes NVML cannot see included) minus the owned processes'.

    `owned`: the owned servers' pids, each with the bytes to assume when NVML reports no
    number for it (None: assume 0)."""
    by_pid = {p.pid: p.used_bytes for p in reading.processes}
    mine = 0
    for pid, fallback in owned.items():
        used = by_pid.get(pid)
        if used is None and pid in by_pid:
            used = fallback
        mine += used or 0
    used_total = reading.total_bytes - reading.free_bytes
    return max(0, used_total - mine)


# ---------------------------------------------------------------------------------------
# One budget per card


class Elastic(enum.StrEnum):
    """How a server's share is decided."""

    SIZED = "sized"  # a llama server: as many layers as fit, in priority order
    FIXED = "fixed"  # a size the user set (layers, vLLM utilization, Ollama vram_mib)
    SHARE = "share"  # vLLM or Ollama with no size: an equal share of what is left


@dataclass(frozen=True)
class GpuServer:
    """One owned server that uses a card, as the budget sees it."""

    provider: str
    server: str  # config.SERVER_KINDS
    priority: int = 0  # higher gets VRAM first
    model: ModelSpec | None = None  # llama servers; None: the model could not be read
    run: RunParams | None = None  # llama servers
    n_gpu_layers: int | None = None  # set by the user: wins, warned about when it won't fit
    gpu_memory_utilization: float | None = None  # vLLM, set by the user
    vram_bytes: int | None = None  # Ollama: what it may use (vram_mib)
    placement: Placement = DEFAULT_PLACEMENT
    model_problem: str | None = None  # why `model` is None


@dataclass(frozen=True)
class ServerPlan:
    provider: str
    server: str
    priority: int
    kind: Elastic
    gpu_bytes: int  # what the server may take on the card, its CUDA context included
    n_gpu_layers: int | None = None  # llama servers: what their units are given
    gpu_memory_utilization: float | None = None  # vLLM: what its unit is given
    estimate: LayerEstimate | None = None
    fits: bool = True
    warnings: tuple[str, ...] = ()

    @property
    def cpu_only(self) -> bool:
        """A llama server planned with 0 layers: start it with the GPU hidden."""
        return self.n_gpu_layers == 0

    @property
    def can_grow(self) -> bool:
        if self.kind is Elastic.SHARE:
            return True
        return (
            self.kind is Elastic.SIZED
            and self.estimate is not None
            and not self.estimate.full_offload
        )


@dataclass(frozen=True)
class CardPlan:
    index: int
    total_bytes: int
    others_bytes: int  # held by processes diversityd does not own, when the plan was made
    margin_bytes: int
    servers: tuple[ServerPlan, ...]
    warnings: tuple[str, ...] = ()

    @property
    def budget_bytes(self) -> int:
        """What diversityd's servers may share: the card minus others minus the margin."""
        return max(0, self.total_bytes - self.others_bytes - self.margin_bytes)

    @property
    def planned_bytes(self) -> int:
        return sum(s.gpu_bytes for s in self.servers)

    @property
    def unallocated_bytes(self) -> int:
        return self.budget_bytes - self.planned_bytes

    @property
    def can_grow(self) -> bool:
        return any(s.can_grow for s in self.servers)

    def server(self, provider: str) -> ServerPlan | None:
        return next((s for s in self.servers if s.provider == provider), None)


def _mib(n: int) -> str:
    return f"{n / MiB:,.0f} MiB"


def _kind_of(server: GpuServer) -> Elastic:
    if server.server in LLAMA_SERVER_KINDS:
        return Elastic.FIXED if server.n_gpu_layers is not None else Elastic.SIZED
    if server.server == "vllm":
        return Elastic.FIXED if server.gpu_memory_utilization is not None else Elastic.SHARE
    return Elastic.FIXED if server.vram_bytes is not None else Elastic.SHARE


def _plan_llama(server: GpuServer, left: int, overheads: Overheads) -> ServerPlan:
    kind = _kind_of(server)
    if server.model is None or server.run is None:
        reason = server.model_problem or "the model could not be read"
        layers = server.n_gpu_layers if server.n_gpu_layers is not None else 0
        note = f"{server.provider}: {reason}; "
        note += (
            f"keeping the n_gpu_layers {layers} you set, unchecked"
            if server.n_gpu_layers is not None
            else "planned on the CPU"
        )
        return ServerPlan(
            server.provider,
            server.server,
            server.priority,
            kind,
            gpu_bytes=0,
            n_gpu_layers=layers,
            fits=server.n_gpu_layers is None,
            warnings=(note,),
        )
    if server.n_gpu_layers is not None:
        estimate = estimate_layers(
            server.model,
            server.run,
            server.n_gpu_layers,
            placement=server.placement,
            overheads=overheads,
        )
        fits = estimate.gpu_bytes <= left
        warnings: tuple[str, ...] = ()
        if not fits:
            best = choose_layers(
                server.model, server.run, left, placement=server.placement, overheads=overheads
            )
            warnings = (
                (
                    f"{server.provider}: n_gpu_layers {server.n_gpu_layers} (set by you) "
                    f"needs {_mib(estimate.gpu_bytes)} on the card, {_mib(max(left, 0))} are "
                    f"left; it may fail to load (out of memory). {best.n_gpu_layers} would fit."
                ),
            )
        return ServerPlan(
            server.provider,
            server.server,
            server.priority,
            kind,
            gpu_bytes=estimate.gpu_bytes,
            n_gpu_layers=estimate.n_gpu_layers,
            estimate=estimate,
            fits=fits,
            warnings=warnings,
        )
    estimate = choose_layers(
        server.model, server.run, max(left, 0), placement=server.placement, overheads=overheads
    )
    notes: tuple[str, ...] = ()
    if estimate.n_gpu_layers == 0:
        notes = (f"{server.provider}: not even the output layer fits; planned on the CPU",)
    return ServerPlan(
        server.provider,
        server.server,
        server.priority,
        kind,
        gpu_bytes=estimate.gpu_bytes,
        n_gpu_layers=estimate.n_gpu_layers,
        estimate=estimate,
        warnings=notes,
    )


def gpu_server_from_config(
    owned: OwnedServer,
    provider: Provider,
    model: ModelSpec | None,
    *,
    placement: Placement = DEFAULT_PLACEMENT,
    model_problem: str | None = None,
) -> GpuServer:
    """How the budget sees one owned server. The layer count the user set wins:
    diversityd.yaml's `n_gpu_layers`, else providers.yaml's `configuration: n_gpu_layers`.
    `model`: the described GGUF of a llama server (None with `model_problem` when it could
    not be read)."""
    layers = owned.n_gpu_layers if owned.n_gpu_layers is not None else provider.n_gpu_layers
    run = None
    if owned.server in LLAMA_SERVER_KINDS:
        run = run_params_for(owned.server, owned.ctx, owned.parallel)
    return GpuServer(
        provider=owned.provider,
        server=owned.server,
        priority=owned.vram_priority,
        model=model,
        run=run,
        n_gpu_layers=layers,
        gpu_memory_utilization=owned.gpu_memory_utilization,
        vram_bytes=owned.vram_mib * MiB if owned.vram_mib is not None else None,
        placement=placement,
        model_problem=model_problem,
    )


def _plan_fixed(server: GpuServer, left: int, total: int) -> ServerPlan:
    if server.server == "vllm":
        assert server.gpu_memory_utilization is not None
        claim = int(server.gpu_memory_utilization * total)
        what = f"gpu_memory_utilization {server.gpu_memory_utilization}"
    else:
        assert server.vram_bytes is not None
        claim = server.vram_bytes
        what = f"vram_mib {server.vram_bytes // MiB}"
    fits = claim <= left
    warnings: tuple[str, ...] = ()
    if not fits:
        warnings = (
            (
                f"{server.provider}: {what} (set by you) claims {_mib(claim)}, "
                f"{_mib(max(left, 0))} are left on the card"
            ),
        )
    return ServerPlan(
        server.provider,
        server.server,
        server.priority,
        Elastic.FIXED,
        gpu_bytes=claim,
        gpu_memory_utilization=server.gpu_memory_utilization,
        fits=fits,
        warnings=warnings,
    )


def _plan_share(server: GpuServer, share: int, total: int) -> ServerPlan:
    warnings: tuple[str, ...] = ()
    if server.server == "vllm":
        # vLLM takes utilization x total; round down so it never exceeds its share
        utilization = int(share * 100 / total) / 100 if total else 0.0
        claim = int(utilization * total)
        if utilization < 0.05:
            warnings = (
                (
                    f"{server.provider}: vLLM's share is {_mib(share)} "
                    f"(gpu_memory_utilization {utilization:.2f}); it will not start"
                ),
            )
        return ServerPlan(
            server.provider,
            server.server,
            server.priority,
            Elastic.SHARE,
            gpu_bytes=claim,
            gpu_memory_utilization=utilization,
            fits=utilization >= 0.05,
            warnings=warnings,
        )
    return ServerPlan(
        server.provider,
        server.server,
        server.priority,
        Elastic.SHARE,
        gpu_bytes=share,
    )


def plan_card(
    index: int,
    total_bytes: int,
    others_bytes: int,
    servers: Iterable[GpuServer],
    *,
    overheads: Overheads = DEFAULT_OVERHEADS,
) -> CardPlan:
    """One budget for every owned server on a card.

    The card minus what others hold minus the margin is shared in two passes. First, in
    order of vram_priority (highest first; ties by name), llama servers take as many layers
    as fit in what is left and sizes the user set (layers, vLLM utilization, Ollama
    vram_mib) are taken as they are, with a warning when they do not fit. Then vLLM and
    Ollama servers without a size share what remains equally.
    """
    ordered = sorted(servers, key=lambda s: (-s.priority, s.provider))
    budget = max(0, total_bytes - others_bytes - overheads.margin_bytes)
    left = budget
    plans: dict[str, ServerPlan] = {}
    shares: list[GpuServer] = []
    for server in ordered:
        kind = _kind_of(server)
        if kind is Elastic.SHARE:
            shares.append(server)
            continue
        if server.server in LLAMA_SERVER_KINDS:
            plan = _plan_llama(server, left, overheads)
        else:
            plan = _plan_fixed(server, left, total_bytes)
        plans[server.provider] = plan
        left -= plan.gpu_bytes
    if shares:
        each = max(0, left) // len(shares)
        for server in shares:
            plans[server.provider] = _plan_share(server, each, total_bytes)
    warnings: list[str] = []
    if budget == 0:
        warnings.append(
            f"GPU {index}: others hold {_mib(others_bytes)} of {_mib(total_bytes)}; "
            "nothing is left for diversityd's servers"
        )
    for plan in plans.values():
        warnings.extend(plan.warnings)
    return CardPlan(
        index=index,
        total_bytes=total_bytes,
        others_bytes=others_bytes,
        margin_bytes=overheads.margin_bytes,
        servers=tuple(plans[s.provider] for s in ordered),
        warnings=tuple(warnings),
    )


# ---------------------------------------------------------------------------------------
# When to plan again


@dataclass(frozen=True)
class Hysteresis:
    """No restart storms: small moves of others' VRAM change nothing.

    A plan shrinks at once when others grow past what it left unallocated plus
    `shrink_tolerance_bytes` (half the default margin: the margin absorbs that much). It
    grows only when others have freed at least `grow_bytes`, something can use it, and the
    plan is at least `min_interval_s` old."""

    grow_bytes: int = 1 * GiB
    shrink_tolerance_bytes: int = 256 * MiB
    min_interval_s: float = 300.0


DEFAULT_HYSTERESIS = Hysteresis()


@dataclass(frozen=True)
class Replan:
    replan: bool
    reason: str


def should_replan(
    plan: CardPlan,
    others_bytes: int,
    *,
    plan_age_s: float,
    hysteresis: Hysteresis = DEFAULT_HYSTERESIS,
) -> Replan:
    """Whether a new look at the card (others now hold `others_bytes`) warrants a new plan.
    A changed model or configuration always does; the daemon checks that itself."""
    grown = others_bytes - plan.others_bytes
    headroom = max(plan.unallocated_bytes, 0) + hysteresis.shrink_tolerance_bytes
    if grown > headroom:
        return Replan(
            True,
            f"others hold {_mib(grown)} more than when planned; "
            f"the plan had {_mib(headroom)} to spare",
        )
    if -grown >= hysteresis.grow_bytes:
        if not plan.can_grow:
            return Replan(False, "others freed memory, but every server already has all it needs")
        if plan_age_s < hysteresis.min_interval_s:
            return Replan(
                False,
                f"others freed {_mib(-grown)}; waiting until the plan is "
                f"{hysteresis.min_interval_s:.0f} s old",
            )
        return Replan(True, f"others freed {_mib(-grown)}; servers can take more layers")
    return Replan(False, f"others moved by {_mib(grown)}: within the hysteresis")


__all__ = [
    "DEFAULT_HYSTERESIS",
    "CardPlan",
    "Elastic",
    "GpuProcess",
    "GpuReading",
    "GpuServer",
    "GpuSnapshot",
    "Hysteresis",
    "Replan",
    "ServerPlan",
    "gpu_server_from_config",
    "others_used_bytes",
    "plan_card",
    "should_replan",
]
