"""What each owned server's unit says about the GPU: configuration + observations -> GpuPlan.

Pure: no I/O, no asyncio. The daemon reads the models (gguf.read_model + describe_model) and
NVML (adapters.nvml.read_gpus), knows its units' pids, and calls `plan_gpus`; it renders each
unit from `GpuPlan.settings_for(provider)`. Between plans it asks `replan_needed` whether
NVML's numbers moved enough to matter (hysteresis: no restart storms).

The sizing is cardplan.py's (on vram.py's estimate): one budget per card, shared in
vram_priority order. This module groups the owned servers per card, takes our own processes
out of "others", reads the flags in `extra_args` that change memory, and turns each
server's share into what its unit says:
`-ngl` for llama servers, `--gpu-memory-utilization` for vLLM, OLLAMA_GPU_OVERHEAD for
Ollama, and a hidden GPU for whatever runs on the CPU.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from diversityd.cardplan import (
    DEFAULT_HYSTERESIS,
    CardPlan,
    GpuServer,
    GpuSnapshot,
    Hysteresis,
    Replan,
    ServerPlan,
    gpu_server_from_config,
    others_used_bytes,
    plan_card,
    should_replan,
)
from diversityd.gguf import GGML_TYPE_IDS, GGML_TYPES
from diversityd.vram import (
    DEFAULT_OVERHEADS,
    DEFAULT_PLACEMENT,
    LLAMA_SERVER_KINDS,
    MiB,
    ModelSpec,
    Overheads,
    Placement,
    RunParams,
)

if TYPE_CHECKING:  # the configuration's types only: importing config pulls in YAML
    from diversityd.config import Config, OwnedServer, Provider

# Ollama reads an empty CUDA_VISIBLE_DEVICES as unset (and then uses every GPU); its docs
# say to force the CPU with an invalid id.
OLLAMA_HIDDEN_GPU = "-1"
# Ollama keeps this much of each CUDA card for itself (its GPU "minimum memory") before it
# places a single layer
OLLAMA_MINIMUM_BYTES = 457 * MiB


@dataclass(frozen=True)
class GpuSettings:
    """What one owned server's unit must say about the GPU."""

    provider: str
    n_gpu_layers: int | None  # llama servers: the count to pass (-ngl / --n_gpu_layers)
    hide_gpu: bool  # run on the CPU with the GPU hidden (CUDA_VISIBLE_DEVICES=""): a CUDA
    # build then puts nothing on the card, not even a context or compute buffers
    gpu_memory_utilization: float | None = None  # vLLM's --gpu-memory-utilization
    ollama_gpu_overhead_bytes: int | None = None  # Ollama: OLLAMA_GPU_OVERHEAD
    vram_bytes: int | None = None  # planned GPU bytes (status: vram_mib); None: no plan
    warnings: tuple[str, ...] = ()
    server: str = ""  # config.SERVER_KINDS; "" for a provider the plan does not know
    gpu: int | None = None  # the card it was planned on

    @property
    def environment(self) -> dict[str, str]:
        """The unit's environment entries this plan needs (the user's own still win)."""
        env: dict[str, str] = {}
        if self.hide_gpu:
            env["CUDA_VISIBLE_DEVICES"] = OLLAMA_HIDDEN_GPU if self.server == "ollama" else ""
        if self.ollama_gpu_overhead_bytes is not None:
            env["OLLAMA_GPU_OVERHEAD"] = str(self.ollama_gpu_overhead_bytes)
        return env

    def same_unit_settings(self, other: GpuSettings) -> bool:
        """Whether both render the same unit: only these changes need a restart (warnings
        and the planned bytes are for status)."""
        return (
            self.n_gpu_layers,
            self.hide_gpu,
            self.gpu_memory_utilization,
            self.ollama_gpu_overhead_bytes,
            self.gpu,
        ) == (
            other.n_gpu_layers,
            other.hide_gpu,
            other.gpu_memory_utilization,
            other.ollama_gpu_overhead_bytes,
            other.gpu,
        )


@dataclass(frozen=True)
class GpuPlan:
    settings: Mapping[str, GpuSettings]  # by provider name, one per active owned server
    cards: tuple[CardPlan, ...]  # one per card NVML showed that an owned server is set on
    cpu_only_reason: str | None  # no NVML / no GPU: llama servers get 0 layers, hidden GPU
    servers: Mapping[str, GpuServer] = field(default_factory=dict)  # what the budget saw
    gpus_not_seen: tuple[int, ...] = ()  # cards servers are set on that NVML did not show

    def settings_for(self, provider: str) -> GpuSettings:
        """The provider's settings; on the CPU with the GPU hidden when the plan has none
        (CPU always fits)."""
        found = self.settings.get(provider)
        if found is not None:
            return found
        return GpuSettings(
            provider,
            n_gpu_layers=0,
            hide_gpu=True,
            warnings=(f"{provider}: not in the GPU plan; planned on the CPU",),
        )

    def card(self, index: int) -> CardPlan | None:
        return next((c for c in self.cards if c.index == index), None)

    @property
    def warnings(self) -> tuple[str, ...]:
        """Every warning once: the CPU-only reason, the cards', each server's."""
        found = [self.cpu_only_reason] if self.cpu_only_reason else []
        for card in self.cards:
            found.extend(card.warnings)
        for settings in self.settings.values():
            found.extend(settings.warnings)
        return tuple(dict.fromkeys(found))


# ---------------------------------------------------------------------------------------
# extra_args that change memory


@dataclass(frozen=True)
class MemoryArgs:
    """What a llama server's extra_args say about memory; None: not said (the default)."""

    flash_attn: bool | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    kv_offload: bool | None = None
    ctx_total: int | None = None  # 0: the model's training context
    parallel: int | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    kv_unified: bool | None = None
    swa_full: bool | None = None
    op_offload: bool | None = None
    warnings: tuple[str, ...] = ()


_TRUE = frozenset({"1", "on", "t", "true", "y", "yes", "enabled"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no", "disabled"})
# llama-server's `-fa auto` turns flash attention on where the backend has it (CUDA does)
_FLASH_ATTN_VALUES = _TRUE | _FALSE | {"auto"}

# llama-server (pinned build): option -> (MemoryArgs field, value kind)
_LLAMA_SERVER_OPTIONS: Mapping[str, tuple[str, str]] = {
    "-fa": ("flash_attn", "flash"),
    "--flash-attn": ("flash_attn", "flash"),
    "-ctk": ("cache_type_k", "type"),
    "--cache-type-k": ("cache_type_k", "type"),
    "-ctv": ("cache_type_v", "type"),
    "--cache-type-v": ("cache_type_v", "type"),
    "-nkvo": ("kv_offload", "off"),
    "--no-kv-offload": ("kv_offload", "off"),
    "-kvo": ("kv_offload", "on"),
    "--kv-offload": ("kv_offload", "on"),
    "-c": ("ctx_total", "ctx"),
    "--ctx-size": ("ctx_total", "ctx"),
    "-np": ("parallel", "int"),
    "--parallel": ("parallel", "int"),
    "-b": ("n_batch", "int"),
    "--batch-size": ("n_batch", "int"),
    "-ub": ("n_ubatch", "int"),
    "--ubatch-size": ("n_ubatch", "int"),
    "-kvu": ("kv_unified", "on"),
    "--kv-unified": ("kv_unified", "on"),
    "-no-kvu": ("kv_unified", "off"),
    "--no-kv-unified": ("kv_unified", "off"),
    "--swa-full": ("swa_full", "on"),
    "--op-offload": ("op_offload", "on"),
    "--no-op-offload": ("op_offload", "off"),
}
# llama-cpp-python's server (pydantic settings as argparse options; booleans take a value,
# KV cache types are ggml type ids)
_LLAMA_CPP_PYTHON_OPTIONS: Mapping[str, tuple[str, str]] = {
    "--flash_attn": ("flash_attn", "bool"),
    "--type_k": ("cache_type_k", "type_id"),
    "--type_v": ("cache_type_v", "type_id"),
    "--offload_kqv": ("kv_offload", "bool"),
    "--n_ctx": ("ctx_total", "ctx"),
    "--n_batch": ("n_batch", "int"),
    "--n_ubatch": ("n_ubatch", "int"),
}


def read_memory_args(server: str, extra_args: Sequence[str]) -> MemoryArgs:
    """The memory-relevant flags in a llama server's extra_args (the last one wins, as in
    both servers' parsers). Values that cannot be read are warned about and ignored."""
    options = _LLAMA_CPP_PYTHON_OPTIONS if server == "llama-cpp-python" else _LLAMA_SERVER_OPTIONS
    values: dict[str, object] = {}
    warnings: list[str] = []
    i = 0
    while i < len(extra_args):
        token = extra_args[i]
        i += 1
        name, inline = token, None
        if token.startswith("--") and "=" in token:
            name, inline = token.split("=", 1)
        if name not in options:
            continue
        key, kind = options[name]
        if kind in ("on", "off"):
            values[key] = kind == "on"
            continue
        value = inline
        nxt = extra_args[i] if i < len(extra_args) else None
        if value is None and kind == "flash":
            # `-fa` alone (older builds) means on; a following on|off|auto is its value
            if nxt is not None and nxt.lower() in _FLASH_ATTN_VALUES:
                value, i = nxt, i + 1
            else:
                value = "on"
        elif value is None:
            if nxt is None:
                warnings.append(f"extra_args: {name} has no value")
                continue
            value, i = nxt, i + 1
        parsed = _parse_value(kind, value.strip())
        if parsed is None:
            warnings.append(f"extra_args: {name} {value!r} is not understood; planned without it")
        else:
            values[key] = parsed
    # each value's type follows its option's kind (_parse_value); mypy cannot see that
    return MemoryArgs(**values, warnings=tuple(warnings))  # type: ignore[arg-type]


def _parse_value(kind: str, value: str) -> object | None:
    lowered = value.lower()
    if kind == "flash":
        return None if lowered not in _FLASH_ATTN_VALUES else lowered not in _FALSE
    if kind == "bool":
        return True if lowered in _TRUE else False if lowered in _FALSE else None
    if kind == "type":
        return lowered if lowered.upper() in GGML_TYPE_IDS else None
    if kind == "type_id":
        entry = GGML_TYPES.get(int(value)) if value.isdigit() else None
        return entry[0].lower() if entry else None
    if kind in ("int", "ctx"):
        try:
            number = int(value)
        except ValueError:
            return None
        # a context of 0 is the model's own; other counts below 1 (-1: auto) are not planned
        return number if number >= 1 or (kind == "ctx" and number == 0) else None
    raise AssertionError(kind)


def apply_memory_args(
    run: RunParams, args: MemoryArgs, *, n_ctx_train: int = 0
) -> tuple[RunParams, tuple[str, ...]]:
    """The run as the server will really be started, extra_args included. `n_ctx_train`:
    the model's training context, what a context of 0 means."""
    warnings: list[str] = list(args.warnings)
    parallel = args.parallel or run.parallel
    ctx_total = args.ctx_total or run.ctx_total
    if args.ctx_total == 0:
        if n_ctx_train:
            ctx_total = n_ctx_train
        else:
            warnings.append("extra_args: a context of 0 (the model's) is unknown here")
    n_batch = args.n_batch or run.n_batch
    changes: dict[str, object] = {
        # a total that does not divide evenly is rounded up: a slightly larger estimate
        "ctx_per_slot": -(-ctx_total // parallel),
        "parallel": parallel,
        "n_batch": n_batch,
        "n_ubatch": args.n_ubatch or run.n_ubatch,
    }
    if run.n_outputs is not None:  # llama-cpp-python reserves logits for a whole batch
        changes["n_outputs"] = n_batch
    for key in ("flash_attn", "cache_type_k", "cache_type_v", "kv_unified", "swa_full"):
        value = getattr(args, key)
        if value is not None:
            changes[key] = value
    if args.op_offload is not None:
        changes["op_offload"] = args.op_offload
    try:
        return replace(run, **changes), tuple(warnings)  # type: ignore[arg-type]
    except ValueError as exc:
        # a quantized V cache without flash attention: llama.cpp refuses it; plan the
        # (larger) f16 V cache rather than nothing
        warnings.append(f"extra_args: {exc}; the server will likely fail to start")
        changes["cache_type_v"] = "f16"
        return replace(run, **changes), tuple(warnings)  # type: ignore[arg-type]


def _kv_in_host_memory(model: ModelSpec) -> ModelSpec:
    """--no-kv-offload keeps every layer's KV cache in host memory: for the GPU budget the
    model has no KV cache (its CPU-side figures are then an underestimate)."""
    return replace(model, n_head_kv=(0,) * model.block_count)


# ---------------------------------------------------------------------------------------
# The plan


def gpu_server_for(
    owned: OwnedServer,
    provider: Provider,
    model: ModelSpec | str | None,
    *,
    placement: Placement = DEFAULT_PLACEMENT,
) -> tuple[GpuServer, tuple[str, ...]]:
    """How the budget sees one owned server, extra_args included, and what could not be
    read of them. `model`: a llama server's described GGUF, or why it could not be read."""
    spec = model if isinstance(model, ModelSpec) else None
    problem: str | None = None
    if owned.server in LLAMA_SERVER_KINDS and spec is None:
        problem = model if isinstance(model, str) else "its model has not been read"
    server = gpu_server_from_config(
        owned, provider, spec, placement=placement, model_problem=problem
    )
    if server.run is None:
        return server, ()
    args = read_memory_args(owned.server, owned.extra_args)
    n_ctx_train = spec.n_ctx_train if spec is not None else 0
    run, warnings = apply_memory_args(server.run, args, n_ctx_train=n_ctx_train)
    if args.kv_offload is False and spec is not None:
        spec = _kv_in_host_memory(spec)
    notes = tuple(f"{owned.provider}: {w}" for w in warnings)
    return replace(server, run=run, model=spec), notes


def _owned_pids_by_pid(
    owned_pids: Mapping[str, int | Collection[int]], previous: GpuPlan | None
) -> dict[int, int | None]:
    """pid -> bytes to assume when NVML has no number for it: what the previous plan gave
    its server (the daemon's own estimate beats counting it as someone else's)."""
    by_pid: dict[int, int | None] = {}
    for provider, pids in owned_pids.items():
        fallback = previous.settings_for(provider).vram_bytes if previous else None
        for pid in (pids,) if isinstance(pids, int) else pids:
            by_pid[pid] = fallback
    return by_pid


def _no_gpu_settings(owned: OwnedServer, server: GpuServer, reason: str) -> GpuSettings:
    """A server set on a card NVML does not show: what the user set passes through
    (unchecked); llama servers otherwise run on the CPU with the GPU hidden."""
    name = owned.provider
    if owned.server in LLAMA_SERVER_KINDS:
        if server.n_gpu_layers is not None:
            return GpuSettings(
                name,
                n_gpu_layers=server.n_gpu_layers,
                hide_gpu=server.n_gpu_layers == 0,
                warnings=(
                    (
                        f"{name}: no GPU seen ({reason}); keeping the n_gpu_layers "
                        f"{server.n_gpu_layers} you set, unchecked"
                    ),
                ),
                server=owned.server,
                gpu=owned.gpu,
            )
        return GpuSettings(
            name,
            n_gpu_layers=0,
            hide_gpu=True,
            warnings=(f"{name}: planned on the CPU: {reason}",),
            server=owned.server,
        )
    # vLLM and Ollama find their GPUs themselves; hiding one NVML cannot see gains nothing
    # and would break them where only NVML is missing
    return GpuSettings(
        name,
        n_gpu_layers=None,
        hide_gpu=False,
        gpu_memory_utilization=server.gpu_memory_utilization,
        warnings=(f"{name}: no GPU seen ({reason}); {owned.server} is left to its defaults",),
        server=owned.server,
        gpu=owned.gpu,
    )


def _cpu_settings(owned: OwnedServer, server: GpuServer) -> GpuSettings:
    """`gpu: none`: the server runs on the CPU, whatever layer count is also set."""
    llama = owned.server in LLAMA_SERVER_KINDS
    warnings: tuple[str, ...] = ()
    if server.n_gpu_layers not in (None, 0):
        warnings = (
            (
                f"{owned.provider}: n_gpu_layers {server.n_gpu_layers} is ignored: "
                "`gpu: none` runs it on the CPU"
            ),
        )
    return GpuSettings(
        owned.provider,
        n_gpu_layers=0 if llama else None,
        hide_gpu=True,
        warnings=warnings,
        server=owned.server,
    )


def _card_settings(plan: ServerPlan, card: CardPlan, notes: tuple[str, ...]) -> GpuSettings:
    overhead: int | None = None
    if plan.server == "ollama":
        # Ollama may use what is free when it loads a model, minus OLLAMA_GPU_OVERHEAD.
        # With others and our other servers as planned, what is free then is its share
        # plus what the plan keeps free (margin + unallocated): reserve exactly the latter.
        overhead = max(0, card.total_bytes - card.others_bytes - card.planned_bytes)
        if plan.gpu_bytes < OLLAMA_MINIMUM_BYTES:
            crumb = (
                f"{plan.provider}: Ollama's share is {plan.gpu_bytes / MiB:,.0f} MiB, less "
                f"than the {OLLAMA_MINIMUM_BYTES // MiB} MiB it keeps for itself: its models "
                "run on the CPU"
            )
            notes = (*notes, crumb)
    llama = plan.server in LLAMA_SERVER_KINDS
    return GpuSettings(
        plan.provider,
        n_gpu_layers=plan.n_gpu_layers if llama else None,
        hide_gpu=llama and plan.n_gpu_layers == 0,
        gpu_memory_utilization=plan.gpu_memory_utilization,
        ollama_gpu_overhead_bytes=overhead,
        vram_bytes=plan.gpu_bytes,
        warnings=(*plan.warnings, *notes),
        server=plan.server,
        gpu=card.index,
    )


def plan_gpus(
    config: Config,
    models: Mapping[str, ModelSpec | str],
    snapshot: GpuSnapshot,
    owned_pids: Mapping[str, int | Collection[int]],
    *,
    overheads: Overheads = DEFAULT_OVERHEADS,
    placement: Placement | str = DEFAULT_PLACEMENT,
    previous: GpuPlan | None = None,
) -> GpuPlan:
    """What every active owned server's unit says about the GPU.

    `models`: each owned llama server's described GGUF by provider, or why it could not be
    read (that server then gets 0 layers and a warning). `owned_pids`: each running owned
    unit's pids (the main pid, or all pids of its cgroup: Ollama's runners and vLLM's
    engine core are children that NVML lists instead); their memory is not "others".
    `previous`: the plan in force, whose sizes stand in for owned processes NVML gives no
    number for. Servers share each card in vram_priority order (cardplan.plan_card); the
    layer count, vLLM utilization or Ollama vram_mib the user set wins, with a warning
    when it does not fit.
    """
    where = Placement(placement)
    owned = [
        o
        for o in config.settings.owned.values()
        if o.provider in config.providers and config.providers[o.provider].active
    ]
    servers: dict[str, GpuServer] = {}
    notes: dict[str, tuple[str, ...]] = {}
    for o in owned:
        servers[o.provider], notes[o.provider] = gpu_server_for(
            o, config.providers[o.provider], models.get(o.provider), placement=where
        )
    cpu_only_reason = snapshot.cpu_only_reason
    if cpu_only_reason is None and not snapshot.gpus:
        cpu_only_reason = "NVML shows no GPU: planning CPU only"
    settings: dict[str, GpuSettings] = {}
    on_cards: dict[int, list[OwnedServer]] = {}
    for o in owned:
        if o.gpu is None:
            cpu = _cpu_settings(o, servers[o.provider])
            settings[o.provider] = replace(cpu, warnings=cpu.warnings + notes[o.provider])
        else:
            on_cards.setdefault(o.gpu, []).append(o)
    cards: list[CardPlan] = []
    not_seen: list[int] = []
    by_pid = _owned_pids_by_pid(owned_pids, previous)
    for index in sorted(on_cards):
        reading = None if cpu_only_reason else snapshot.gpu(index)
        if reading is None:
            not_seen.append(index)
            reason = cpu_only_reason or f"NVML shows no GPU {index}"
            for o in on_cards[index]:
                found = _no_gpu_settings(o, servers[o.provider], reason)
                settings[o.provider] = replace(found, warnings=found.warnings + notes[o.provider])
            continue
        card = plan_card(
            index,
            reading.total_bytes,
            others_used_bytes(reading, by_pid),
            [servers[o.provider] for o in on_cards[index]],
            overheads=overheads,
        )
        cards.append(card)
        for plan in card.servers:
            settings[plan.provider] = _card_settings(plan, card, notes[plan.provider])
    return GpuPlan(
        settings={o.provider: settings[o.provider] for o in owned},
        cards=tuple(cards),
        cpu_only_reason=cpu_only_reason,
        servers=servers,
        gpus_not_seen=tuple(not_seen),
    )


def unit_gpu_settings(
    config: Config,
    plan: GpuPlan | None,
    provider: str,
    kept: Mapping[str, GpuSettings] | None = None,
) -> GpuSettings:
    """What one owned unit says about the GPU: the plan's word when it has one for it.
    Before the first plan: the last plan's word, `kept` across a daemon restart (NVML may
    fail at start: the servers keep what they run), when it is for the same server on the
    same card. Else the user's own layer count, else the CPU with the GPU hidden, which
    always fits."""
    if plan is not None and provider in plan.settings:
        return plan.settings_for(provider)
    owned = config.settings.owned[provider]
    last = (kept or {}).get(provider)
    if plan is None and last is not None and (last.server, last.gpu) == (owned.server, owned.gpu):
        return last
    user_layers = owned.n_gpu_layers
    if user_layers is None:
        user_layers = config.providers[provider].n_gpu_layers
    llama = owned.server in LLAMA_SERVER_KINDS
    return GpuSettings(
        provider=provider,
        n_gpu_layers=(user_layers if user_layers is not None else 0) if llama else None,
        hide_gpu=llama and user_layers is None,
        server=owned.server,
        gpu=owned.gpu,
    )


# ---------------------------------------------------------------------------------------
# When to plan again


def vram_check_due(*, restarting: bool, gpu_unit_starting: bool) -> bool:
    """Whether to look at the cards for a re-plan now: never while a restart rolls or an
    owned server starts (a process on its way in or out is nobody's, and its memory would
    read as others')."""
    return not restarting and not gpu_unit_starting


def gpu_recheck(
    plan: GpuPlan | None,
    snapshot: GpuSnapshot,
    owned_pids: Mapping[str, int | Collection[int]],
    plan_age_s: float,
    hysteresis: Hysteresis = DEFAULT_HYSTERESIS,
) -> Replan:
    """Whether a new NVML reading warrants a new plan: there is none in force yet (NVML
    failed until now), a CPU-only plan now has cards to use, or (replan_needed) a card
    changed or others' use moved past the hysteresis."""
    if plan is None:
        return Replan(True, "NVML answers: planning the cards (none was planned yet)")
    if plan.cpu_only_reason:
        if snapshot.cpu_only_reason is None and snapshot.gpus:
            return Replan(True, "NVML shows GPUs now; the plan in force is CPU only")
        return Replan(False, f"still CPU only: {snapshot.cpu_only_reason or 'no GPU'}")
    return replan_needed(plan, snapshot, owned_pids, plan_age_s, hysteresis)


def replan_needed(
    previous: GpuPlan,
    snapshot: GpuSnapshot,
    owned_pids: Mapping[str, int | Collection[int]],
    plan_age_s: float,
    hysteresis: Hysteresis = DEFAULT_HYSTERESIS,
) -> Replan:
    """Whether a new look at the GPUs warrants a new plan: a card appeared, went away or
    changed, or others' use moved past the hysteresis on any card (cardplan.should_replan).
    A changed configuration or model always does; the daemon knows those itself. Ask only
    while no owned GPU unit is starting or stopping: a process on its way out is nobody's
    and would read as others'."""
    for index in previous.gpus_not_seen:
        if snapshot.gpu(index) is not None:
            return Replan(True, f"GPU {index} is seen now; its servers were planned without it")
    by_pid = _owned_pids_by_pid(owned_pids, previous)
    reasons: list[str] = []
    for card in previous.cards:
        reading = snapshot.gpu(card.index)
        if reading is None:
            why = snapshot.cpu_only_reason or "NVML does not show it"
            return Replan(True, f"GPU {card.index} is gone: {why}")
        if reading.total_bytes != card.total_bytes:
            return Replan(True, f"GPU {card.index} is another card now ({reading.name})")
        decision = should_replan(
            card,
            others_used_bytes(reading, by_pid),
            plan_age_s=plan_age_s,
            hysteresis=hysteresis,
        )
        if decision.replan:
            return Replan(True, f"GPU {card.index}: {decision.reason}")
        reasons.append(f"GPU {card.index}: {decision.reason}")
    return Replan(False, "; ".join(reasons) or "no owned server uses a GPU NVML shows")


__all__ = [
    "GpuPlan",
    "GpuSettings",
    "MemoryArgs",
    "apply_memory_args",
    "gpu_recheck",
    "gpu_server_for",
    "plan_gpus",
    "read_memory_args",
    "replan_needed",
    "unit_gpu_settings",
    "vram_check_due",
]
