"""`diversityctl plan`: how many layers fit, and where a card's memory goes.

    diversityctl plan --gguf PATH --ctx N [--parallel P] [--free-mib F] [--json]
    diversityctl plan [--config-dir DIR] [--gpu I] [--json]    # the card's budget

`--ctx` is the context per slot: the KV cache holds N x P tokens and llama-server is given
`-c N*P -np P`. Without `--free-mib` the free memory comes from NVML. This path stays fast
(an 8B model with a 128k vocabulary in well under a second): the GGUF reader skips the
vocabulary, and NVML, the configuration and json are imported only when used. The card's
budget is gpuplan.plan_gpus, the decision the daemon renders its units from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from diversityd.cardplan import (
    CardPlan,
    GpuReading,
    GpuServer,
    GpuSnapshot,
    ServerPlan,
    others_used_bytes,
    plan_card,
)
from diversityd.cli.common import run_click
from diversityd.errors import ConfigError, UsageError
from diversityd.gguf import GGUFError, read_model
from diversityd.gpuplan import GpuPlan, GpuSettings, plan_gpus
from diversityd.vram import (
    DEFAULT_OVERHEADS,
    LLAMA_SERVER_KINDS,
    LayerEstimate,
    MiB,
    ModelSpec,
    Placement,
    RunParams,
    choose_layers,
    describe_model,
    estimate_layers,
    kv_cells,
    kv_layer_bytes,
    run_params_for,
)

if TYPE_CHECKING:
    from diversityd.config import Config

CACHE_TYPES = ("f16", "q8_0", "q4_0")


def _gib(n: int) -> str:
    if abs(n) >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / MiB:.1f} MiB"


def server_args(server: str, run: RunParams, n_gpu_layers: int) -> list[str]:
    """What the unit gives the server for this plan."""
    if server == "llama-cpp-python":
        args = ["--n_ctx", str(run.ctx_total), "--n_gpu_layers", str(n_gpu_layers)]
    else:
        args = ["-c", str(run.ctx_total), "-np", str(run.parallel), "-ngl", str(n_gpu_layers)]
        if run.cache_type_k != "f16":
            args += ["-ctk", run.cache_type_k, "-ctv", run.cache_type_v]
    return args


def read_snapshot() -> GpuSnapshot:
    from diversityd.adapters.nvml import read_gpus

    return read_gpus()


def _read_spec(path: Path) -> ModelSpec:
    return describe_model(read_model(path))


# ---------------------------------------------------------------------------------------
# One model


def layer_rows(model: ModelSpec, run: RunParams, estimate: LayerEstimate) -> list[dict[str, Any]]:
    kv = kv_layer_bytes(model, run)
    rows: list[dict[str, Any]] = [
        {
            "layer": "input",
            "device": "CPU",
            "weights_bytes": model.input_bytes,
            "device_bytes": 0,
            "kv_bytes": 0,
        }
    ]
    for il in range(model.block_count):
        on_gpu = il >= estimate.first_gpu_block
        rows.append(
            {
                "layer": f"blk.{il}",
                "device": "GPU" if on_gpu else "CPU",
                "weights_bytes": model.block_bytes[il],
                "device_bytes": model.block_device_bytes[il] if on_gpu else 0,
                "kv_bytes": kv[il],
                "swa": model.swa_layers[il],
            }
        )
    rows.append(
        {
            "layer": "output",
            "device": "GPU" if estimate.output_on_gpu else "CPU",
            "weights_bytes": model.output_bytes,
            "device_bytes": model.output_device_bytes if estimate.output_on_gpu else 0,
            "kv_bytes": 0,
            "tied_embeddings": model.tied_embeddings,
        }
    )
    return rows


def model_plan(
    model: ModelSpec,
    run: RunParams,
    *,
    server: str,
    free_bytes: int,
    free_source: str,
    placement: Placement,
    n_gpu_layers: int | None,
    gpu: GpuReading | None,
    cpu_only_reason: str | None,
) -> dict[str, Any]:
    overheads = DEFAULT_OVERHEADS
    usable = max(0, free_bytes - overheads.margin_bytes)
    warnings: list[str] = []
    if n_gpu_layers is not None:
        estimate = estimate_layers(
            model, run, n_gpu_layers, placement=placement, overheads=overheads
        )
        fits = estimate.gpu_bytes <= usable
        if not fits:
            best = choose_layers(model, run, usable, placement=placement, overheads=overheads)
            warnings.append(
                f"-ngl {estimate.n_gpu_layers} needs {_gib(estimate.gpu_bytes)} on the GPU; "
                f"{_gib(usable)} are free after the {_gib(overheads.margin_bytes)} margin; "
                f"{best.n_gpu_layers} would fit"
            )
    else:
        estimate = choose_layers(model, run, usable, placement=placement, overheads=overheads)
        fits = True
    if cpu_only_reason:
        warnings.append(cpu_only_reason)
    if estimate.n_gpu_layers == 0 and not cpu_only_reason and n_gpu_layers is None:
        warnings.append("not even the output layer fits: CPU only")
    if model.n_ctx_train and run.ctx_per_slot > model.n_ctx_train:
        warnings.append(
            f"--ctx {run.ctx_per_slot} per slot exceeds the model's training context "
            f"{model.n_ctx_train}"
        )
    cells, streams = kv_cells(run)
    return {
        "model": model.path,
        "name": model.name,
        "arch": model.arch,
        "file_type": model.file_type,
        "block_count": model.block_count,
        "layer_count": model.layer_count,
        "n_vocab": model.n_vocab,
        "tied_embeddings": model.tied_embeddings,
        "sliding_window": model.n_swa,
        "server": server,
        "placement": str(placement),
        "ctx_per_slot": run.ctx_per_slot,
        "parallel": run.parallel,
        "ctx_total": run.ctx_total,
        "kv_cells_per_stream": cells,
        "kv_streams": streams,
        "cache_type_k": run.cache_type_k,
        "cache_type_v": run.cache_type_v,
        "flash_attn": run.flash_attn,
        "n_gpu_layers": estimate.n_gpu_layers,
        "user_set": n_gpu_layers is not None,
        "full_offload": estimate.full_offload,
        "cpu_only": estimate.n_gpu_layers == 0,
        "output_on_gpu": estimate.output_on_gpu,
        "gpu_blocks": estimate.gpu_blocks,
        "fits": fits,
        "weights_bytes": model.weights_bytes,
        "kv_bytes": sum(kv_layer_bytes(model, run)),
        "weights_gpu_bytes": estimate.weights_gpu_bytes,
        "kv_gpu_bytes": estimate.kv_gpu_bytes,
        "compute_bytes": estimate.compute_gpu_bytes,
        "reserve_bytes": estimate.context_bytes,
        "gpu_bytes": estimate.gpu_bytes,
        "weights_cpu_bytes": estimate.weights_cpu_bytes,
        "kv_cpu_bytes": estimate.kv_cpu_bytes,
        "compute_cpu_bytes": estimate.compute_cpu_bytes,
        "cpu_bytes": estimate.cpu_bytes,
        "margin_bytes": overheads.margin_bytes,
        "free_bytes": free_bytes,
        "free_source": free_source,
        "free_after_bytes": free_bytes - estimate.gpu_bytes,
        "gpu": None if gpu is None else gpu.index,
        "gpu_name": None if gpu is None else gpu.name,
        "args": server_args(server, run, estimate.n_gpu_layers),
        "hide_gpu": estimate.n_gpu_layers == 0,
        "warnings": warnings,
        "layers": layer_rows(model, run, estimate),
    }


def print_model_plan(plan: Mapping[str, Any]) -> None:
    echo = click.echo
    layers = plan["n_gpu_layers"]
    total = plan["layer_count"]
    what = (
        "full offload"
        if plan["full_offload"]
        else "CPU only"
        if plan["cpu_only"]
        else f"{plan['gpu_blocks']} of {plan['block_count']} blocks"
        + (" + output" if plan["output_on_gpu"] else "")
    )
    echo(f"model    {plan['model']}")
    echo(
        f"         {plan['arch']}, {plan['block_count']} blocks + output, {plan['file_type']}, "
        f"{_gib(plan['weights_bytes'])}, vocab {plan['n_vocab']}"
        + (", tied embeddings" if plan["tied_embeddings"] else "")
        + (f", sliding window {plan['sliding_window']}" if plan["sliding_window"] else "")
    )
    echo(
        f"context  {plan['ctx_per_slot']} per slot x {plan['parallel']} slots = "
        f"{plan['kv_streams']} x {plan['kv_cells_per_stream']} cells "
        f"({plan['cache_type_k']}/{plan['cache_type_v']} K/V, "
        f"flash attention {'on' if plan['flash_attn'] else 'off'})"
    )
    where = f"GPU {plan['gpu']} ({plan['gpu_name']})" if plan["gpu"] is not None else "GPU"
    echo(f"free     {_gib(plan['free_bytes'])} on {where}, from {plan['free_source']}")
    echo(
        f"plan     -ngl {layers} of {total} ({what}), {plan['placement']} placement"
        + ("" if plan["fits"] else "  DOES NOT FIT")
    )
    hidden = "  (GPU hidden: --device none / CUDA_VISIBLE_DEVICES=)" if plan["hide_gpu"] else ""
    echo(f"args     {plan['server']} {' '.join(plan['args'])}{hidden}")
    echo("")
    echo(f"{'':16}{'GPU':>12}{'CPU':>12}")
    rows = [
        ("weights", plan["weights_gpu_bytes"], plan["weights_cpu_bytes"]),
        ("KV cache", plan["kv_gpu_bytes"], plan["kv_cpu_bytes"]),
        ("compute", plan["compute_bytes"], plan["compute_cpu_bytes"]),
        ("CUDA context", plan["reserve_bytes"], 0),
    ]
    for label, gpu_bytes, cpu_bytes in rows:
        echo(f"{label:16}{_gib(gpu_bytes):>12}{_gib(cpu_bytes):>12}")
    echo(f"{'total':16}{_gib(plan['gpu_bytes']):>12}{_gib(plan['cpu_bytes']):>12}")
    echo(f"{'margin kept':16}{_gib(plan['margin_bytes']):>12}")
    echo(f"{'free after':16}{_gib(plan['free_after_bytes']):>12}")
    for warning in plan["warnings"]:
        echo(f"warning: {warning}", err=True)


# ---------------------------------------------------------------------------------------
# The card's budget: gpuplan.plan_gpus, the daemon's own decision, on this machine's readings


def read_owned_models(config: Config) -> dict[str, ModelSpec | str]:
    """Each owned llama server's model that runs on a GPU, described, or why it could not
    be read."""
    models: dict[str, ModelSpec | str] = {}
    for owned in config.settings.owned.values():
        if owned.server not in LLAMA_SERVER_KINDS or owned.gpu is None:
            continue
        try:
            models[owned.provider] = _read_spec(Path(os.path.expanduser(owned.model_path or "")))
        except GGUFError as exc:
            models[owned.provider] = str(exc)
    return models


def find_owned_pids(config: Config, snapshot: GpuSnapshot) -> dict[str, tuple[int, ...]]:
    """Best effort for the CLI (the daemon knows its units' pids): a GPU process whose
    command line names an owned server's port, else its model, is that server's."""
    ports: dict[str, tuple[str, ...]] = {}
    models: dict[str, tuple[str, ...]] = {}
    for owned in config.settings.owned.values():
        port = config.providers[owned.provider].address[1]
        ports[owned.provider] = (f"--port\0{port}\0", f"--port={port}")
        if owned.model_path:
            models[owned.provider] = (os.path.expanduser(owned.model_path),)

    def owner_of(cmdline: str) -> str | None:
        for marks in (ports, models):  # ports first: two servers may share a model
            for name, found in marks.items():
                if any(mark in cmdline for mark in found):
                    return name
        return None

    pids: dict[str, list[int]] = {}
    for reading in snapshot.gpus:
        for process in reading.processes:
            try:
                cmdline = Path(f"/proc/{process.pid}/cmdline").read_text(errors="replace")
            except OSError:
                continue
            owner = owner_of(cmdline + "\0")
            if owner is not None:
                pids.setdefault(owner, []).append(process.pid)
    return {name: tuple(found) for name, found in pids.items()}


def server_row(plan: ServerPlan, server: GpuServer, settings: GpuSettings) -> dict[str, Any]:
    row: dict[str, Any] = {
        "provider": plan.provider,
        "server": plan.server,
        "priority": plan.priority,
        "kind": str(plan.kind),
        "gpu_bytes": plan.gpu_bytes,
        "n_gpu_layers": plan.n_gpu_layers,
        "gpu_memory_utilization": plan.gpu_memory_utilization,
        "ollama_gpu_overhead_bytes": settings.ollama_gpu_overhead_bytes,
        "hide_gpu": settings.hide_gpu,
        "fits": plan.fits,
        "cpu_only": plan.cpu_only,
        "warnings": list(settings.warnings),
    }
    if server.model is not None:
        row["model"] = server.model.path
        row["block_count"] = server.model.block_count
    if server.run is not None and plan.n_gpu_layers is not None:
        row["args"] = server_args(plan.server, server.run, plan.n_gpu_layers)
    if plan.estimate is not None:
        row["weights_gpu_bytes"] = plan.estimate.weights_gpu_bytes
        row["kv_gpu_bytes"] = plan.estimate.kv_gpu_bytes
        row["compute_bytes"] = plan.estimate.compute_gpu_bytes
        row["reserve_bytes"] = plan.estimate.context_bytes
    return row


def card_json(card: CardPlan, gpu_plan: GpuPlan, name: str, free_bytes: int) -> dict[str, Any]:
    return {
        "gpu": card.index,
        "name": name,
        "total_bytes": card.total_bytes,
        "free_bytes": free_bytes,
        "others_bytes": card.others_bytes,
        "margin_bytes": card.margin_bytes,
        "budget_bytes": card.budget_bytes,
        "planned_bytes": card.planned_bytes,
        "unallocated_bytes": card.unallocated_bytes,
        "servers": [
            server_row(p, gpu_plan.servers[p.provider], gpu_plan.settings_for(p.provider))
            for p in card.servers
        ],
        "warnings": list(card.warnings),
    }


def print_card(card: Mapping[str, Any]) -> None:
    echo = click.echo
    echo(f"GPU {card['gpu']} ({card['name']}): {_gib(card['total_bytes'])} total")
    echo(f"  others (not owned)   {_gib(card['others_bytes']):>12}")
    echo(f"  margin               {_gib(card['margin_bytes']):>12}")
    echo(f"  budget               {_gib(card['budget_bytes']):>12}")
    if not card["servers"]:
        echo("  (no owned server uses this GPU)")
    for row in card["servers"]:
        what = ""
        if row.get("n_gpu_layers") is not None:
            what = f"-ngl {row['n_gpu_layers']}"
            if row.get("block_count") is not None:
                what += f" of {row['block_count'] + 1}"
        elif row.get("gpu_memory_utilization") is not None:
            what = f"--gpu-memory-utilization {row['gpu_memory_utilization']:.2f}"
        elif row.get("ollama_gpu_overhead_bytes") is not None:
            overhead = row["ollama_gpu_overhead_bytes"]
            what = f"OLLAMA_GPU_OVERHEAD={overhead} ({_gib(overhead)} kept free)"
        mark = "" if row["fits"] else "  DOES NOT FIT"
        echo(
            f"  {row['provider']:20} {_gib(row['gpu_bytes']):>12}  {row['server']}, "
            f"priority {row['priority']}, {row['kind']}: {what}{mark}"
        )
    echo(f"  unallocated          {_gib(card['unallocated_bytes']):>12}")
    for warning in card["warnings"]:
        echo(f"warning: {warning}", err=True)


def budget_plan(
    config_dir: Path | None,
    gpu: int | None,
    free_mib: float | None,
    placement: Placement,
) -> dict[str, Any]:
    from diversityd.config import load_config
    from diversityd.parts import default_config_dir

    directory = config_dir if config_dir is not None else default_config_dir()
    config, findings = load_config(directory)
    errors = [f for f in findings if f.severity.value == "error"]
    if config is None or errors:
        raise ConfigError(errors or findings)
    wanted = sorted({o.gpu for o in config.settings.owned.values() if o.gpu is not None})
    if gpu is not None:
        wanted = [gpu]
    result: dict[str, Any] = {"config_dir": str(directory), "gpus": [], "notes": []}
    result["cpu_servers"] = [o.provider for o in config.settings.owned.values() if o.gpu is None]
    if free_mib is not None:  # each wanted card, empty, of this size
        size = int(free_mib * MiB)
        snapshot = GpuSnapshot(
            tuple(GpuReading(i, "--free-mib", "", size, size, 0) for i in wanted)
        )
    elif wanted:
        snapshot = read_snapshot()
        if snapshot.cpu_only_reason:
            result["notes"].append(snapshot.cpu_only_reason)
    else:
        snapshot = GpuSnapshot((), "no owned server is set on a GPU")
    pids = find_owned_pids(config, snapshot)
    gpu_plan = plan_gpus(config, read_owned_models(config), snapshot, pids, placement=placement)
    for index in wanted:
        reading = snapshot.gpu(index)
        if reading is None:
            if not snapshot.cpu_only_reason:
                result["notes"].append(f"GPU {index} not found: its servers run on the CPU")
            continue
        card = gpu_plan.card(index)
        if card is None:  # --gpu names a card no owned server is set on
            ours = {pid: None for found in pids.values() for pid in found}
            card = plan_card(index, reading.total_bytes, others_used_bytes(reading, ours), [])
        result["gpus"].append(card_json(card, gpu_plan, reading.name, reading.free_bytes))
    result["settings"] = {name: asdict(s) for name, s in gpu_plan.settings.items()}
    return result


# ---------------------------------------------------------------------------------------
# The command


@click.command("plan")
@click.option(
    "--gguf",
    "gguf_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Plan this model alone; without it, the card's budget for the configured servers.",
)
@click.option("--ctx", type=click.IntRange(min=1), default=None, help="Context per slot.")
@click.option("--parallel", type=click.IntRange(min=1), default=None, help="Slots [default: 1].")
@click.option(
    "--free-mib",
    type=click.FloatRange(min=0),
    default=None,
    help="Free GPU memory to plan for, instead of asking NVML.",
)
@click.option("--gpu", type=click.IntRange(min=0), default=None, help="GPU index [default: 0].")
@click.option(
    "--placement",
    type=click.Choice([p.value for p in Placement]),
    default=Placement.OUTPUT_FIRST.value,
    show_default=True,
    help="llama.cpp's layer order: output-first since PR #18148, legacy before.",
)
@click.option(
    "--server",
    type=click.Choice(["llama-server", "llama-cpp-python"]),
    default="llama-server",
    show_default=True,
)
@click.option(
    "--n-gpu-layers",
    type=click.IntRange(min=-1),
    default=None,
    help="Check a layer count of your own (-1 = all) instead of choosing one.",
)
@click.option(
    "--cache-type",
    type=click.Choice(CACHE_TYPES),
    default="f16",
    show_default=True,
    help="KV cache type (llama-server -ctk/-ctv).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--config-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="DIVERSITYD_CONFIG_DIR",
    default=None,
    help="Directory holding the configuration [default: $XDG_CONFIG_HOME/diversityd].",
)
def plan(  # noqa: PLR0917 - click passes every option as an argument
    gguf_path: Path | None,
    ctx: int | None,
    parallel: int | None,
    free_mib: float | None,
    gpu: int | None,
    placement: str,
    server: str,
    n_gpu_layers: int | None,
    cache_type: str,
    as_json: bool,
    config_dir: Path | None,
) -> None:
    """Size --n-gpu-layers from free VRAM and the GGUF itself; or show a card's budget.

    --ctx is the context PER SLOT: the KV cache holds ctx x parallel tokens, and
    llama-server is given `-c ctx*parallel -np parallel`.
    """
    where = Placement(placement)
    if gguf_path is None:
        if ctx is not None or parallel is not None or n_gpu_layers is not None:
            raise UsageError(
                "--ctx, --parallel and --n-gpu-layers need --gguf",
                hint="without --gguf, plan uses each configured server's own settings",
            )
        budget = budget_plan(config_dir, gpu, free_mib, where)
        if as_json:
            click.echo(json.dumps(budget, indent=2))
            return
        for note in budget["notes"]:
            click.echo(f"note: {note}", err=True)
        for card in budget["gpus"]:
            print_card(card)
        if budget["cpu_servers"]:
            click.echo(f"CPU only: {', '.join(budget['cpu_servers'])}")
        if not budget["gpus"] and not budget["cpu_servers"]:
            click.echo("no owned servers are configured")
        return
    if ctx is None:
        raise UsageError("--gguf needs --ctx (the context per slot)", hint="e.g. --ctx 8192")
    if server == "llama-cpp-python" and cache_type != "f16":
        raise UsageError("--cache-type applies to llama-server only")
    model = _read_spec(gguf_path)
    run = run_params_for(server, ctx, parallel or 1, cache_type=cache_type)
    index = gpu or 0
    reading: GpuReading | None = None
    reason: str | None = None
    if free_mib is not None:
        free, source = int(free_mib * MiB), "--free-mib"
    else:
        snapshot = read_snapshot()
        reading = snapshot.gpu(index)
        if reading is None:
            reason = snapshot.cpu_only_reason or f"NVML has no GPU {index}: planning CPU only"
            free, source = 0, "NVML"
        else:
            free, source = reading.free_bytes, "NVML"
    result = model_plan(
        model,
        run,
        server=server,
        free_bytes=free,
        free_source=source,
        placement=where,
        n_gpu_layers=n_gpu_layers,
        gpu=reading,
        cpu_only_reason=reason,
    )
    if as_json:
        click.echo(json.dumps(result, indent=2))
        for warning in result["warnings"]:
            click.echo(f"warning: {warning}", err=True)
    else:
        print_model_plan(result)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m diversityd.cli.plan`: the command alone, with diversityctl's exit codes."""
    run_click(plan, "diversityctl plan", argv)


if __name__ == "__main__":
    main()
