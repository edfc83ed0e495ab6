"""The daemon's decisions as pure functions (state.py, reconcile.py, drill.py, gpuplan.py):
no bus, no systemd, no asyncio."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from diversityd.cardplan import CardPlan, GpuReading, GpuSnapshot
from diversityd.config import Config, parse_config
from diversityd.drill import Answer, DrillMode, drill_settled
from diversityd.gpuplan import (
    GpuPlan,
    GpuSettings,
    gpu_recheck,
    unit_gpu_settings,
    vram_check_due,
)
from diversityd.reconcile import (
    ModelTarget,
    StartCandidate,
    TargetVerdict,
    hung_too_long,
    is_ready_since,
    judge_model_target,
    start_order,
    units_to_roll,
)
from diversityd.state import (
    MAX_PROBE_BACKOFF_S,
    STARTING_PROBE_S,
    Observed,
    ProbeOutcome,
    ProbeResult,
    ProviderState,
    UnitSnapshot,
    adopt_snapshot,
    apply_probe,
    apply_unit_change,
    is_serving,
    probe_interval,
    state_of,
)


def unit(active: str = "active", sub: str = "running", pid: int = 100, **more: Any) -> UnitSnapshot:
    return UnitSnapshot.from_properties(
        "diversityd-x.service",
        {"LoadState": "loaded", "ActiveState": active, "SubState": sub, "MainPID": pid, **more},
    )


def probe(outcome: ProbeOutcome = ProbeOutcome.OK, at: float = 1.0) -> ProbeResult:
    return ProbeResult(outcome, at, 3.0, None if outcome is ProbeOutcome.OK else "x")


# -- a unit change or a probe result -> a provider state ----------------------------------


def test_a_running_process_is_starting_until_it_answers() -> None:
    observed = Observed(unit=unit(pid=100))
    assert state_of(observed, owned=True) is ProviderState.STARTING
    observed = apply_probe(observed, probe(), pid=100)
    assert observed.answered_since_start
    assert state_of(observed, owned=True) is ProviderState.READY


def test_an_answer_from_a_replaced_process_proves_nothing() -> None:
    observed = Observed(unit=unit(pid=200))
    observed = apply_probe(observed, probe(), pid=100)  # sent while 100 ran
    assert not observed.answered_since_start
    assert state_of(observed, owned=True) is ProviderState.STARTING


def test_a_killed_process_is_down_at_once_and_its_pid_is_reported() -> None:
    observed = apply_probe(Observed(unit=unit(pid=100)), probe(), pid=100)
    observed, exited = apply_unit_change(
        observed, {"MainPID": 0, "SubState": "auto-restart", "ActiveState": "activating"}
    )
    assert exited == 100
    assert observed.answered_pid == -1
    assert state_of(observed, owned=True) is ProviderState.DOWN


def test_a_new_process_must_answer_again() -> None:
    observed = apply_probe(Observed(unit=unit(pid=100)), probe(), pid=100)
    observed, exited = apply_unit_change(observed, {"MainPID": 300})
    assert exited == 0  # replaced, not gone
    assert state_of(observed, owned=True) is ProviderState.STARTING


def test_a_probe_that_times_out_is_hung_and_refused_is_down() -> None:
    answered = apply_probe(Observed(unit=unit(pid=100)), probe(), pid=100)
    hung = apply_probe(answered, probe(ProbeOutcome.TIMEOUT), pid=100)
    assert state_of(hung, owned=True) is ProviderState.HUNG
    assert hung.failures == 1
    refused = apply_probe(hung, probe(ProbeOutcome.REFUSED), pid=100)
    assert state_of(refused, owned=True) is ProviderState.DOWN
    assert refused.failures == 2
    assert apply_probe(refused, probe(), pid=100).failures == 0


@pytest.mark.parametrize(
    ("active", "sub", "state"),
    [
        ("failed", "failed", ProviderState.FAILED),
        ("inactive", "dead", ProviderState.STOPPED),
        ("deactivating", "stop-sigterm", ProviderState.DOWN),
    ],
)
def test_what_systemd_alone_says(active: str, sub: str, state: ProviderState) -> None:
    observed = apply_probe(Observed(unit=unit(active, sub)), probe(), pid=100)
    assert state_of(observed, owned=True) is state


def test_a_watched_provider_is_what_its_probe_says() -> None:
    assert state_of(Observed(), owned=False) is ProviderState.UNKNOWN
    assert state_of(Observed(probe=probe()), owned=False) is ProviderState.READY
    timed_out = Observed(probe=probe(ProbeOutcome.TIMEOUT))
    assert state_of(timed_out, owned=False) is ProviderState.HUNG


def test_changes_sent_after_a_snapshot_was_read_go_on_top_of_it() -> None:
    read = unit(pid=100)
    early = [(1.0, {"MainPID": 50}), (3.0, {"MainPID": 0, "SubState": "auto-restart"})]
    adopted = adopt_snapshot(read, early, taken_at=2.0)
    assert adopted.main_pid == 0
    assert adopted.sub_state == "auto-restart"
    assert adopt_snapshot(read, early[:1], taken_at=2.0) == read


def test_probes_come_fast_while_starting_and_back_off_while_down() -> None:
    assert probe_interval(ProviderState.STARTING, 0, 2.0) == STARTING_PROBE_S
    assert probe_interval(ProviderState.READY, 0, 2.0) == 2.0
    assert probe_interval(ProviderState.DOWN, 1, 2.0) == 2.0
    assert probe_interval(ProviderState.DOWN, 3, 2.0) == 8.0
    assert probe_interval(ProviderState.DOWN, 40, 2.0) == MAX_PROBE_BACKOFF_S
    assert probe_interval(ProviderState.STOPPED, 9, 2.0) == 2.0


# -- which providers to start, and in which order ----------------------------------------


def test_start_order_highest_priority_first_skipping_what_runs() -> None:
    candidates = [
        StartCandidate("b", 0, unit("inactive", "dead")),
        StartCandidate("a", 0, unit("inactive", "dead")),
        StartCandidate("gpu-first", 10, unit("failed", "failed")),
        StartCandidate("running", 20, unit("active", "running")),
        StartCandidate("restarting", 20, unit("activating", "auto-restart")),
        StartCandidate("unread", 30, None),
        StartCandidate("port-taken", 30, unit("inactive", "dead")),
    ]
    steps = start_order(candidates, port_taken={"port-taken"})
    assert [s.name for s in steps] == ["gpu-first", "a", "b"]
    assert [s.reset_failed for s in steps] == [True, False, False]


def test_a_changed_unit_rolls_only_if_it_runs() -> None:
    units = {
        "up": unit("active"),
        "starting": unit("activating"),
        "stopped": unit("inactive", "dead"),
        "unread": None,
    }
    assert units_to_roll(["up", "stopped", "starting", "unread", "gone"], units) == [
        "up",
        "starting",
    ]


def test_a_restart_is_finished_only_by_a_new_ready() -> None:
    assert is_ready_since(ProviderState.READY, 5.0, 4.0)
    assert not is_ready_since(ProviderState.READY, 3.0, 4.0)  # ready from before the restart
    assert not is_ready_since(ProviderState.STARTING, 5.0, 4.0)
    assert is_ready_since(ProviderState.READY, None, 0.0)


# -- accept or refuse a model target ---------------------------------------------------------


def target(path: str = "/m/a.gguf", identity: int = 1, error: str | None = None) -> ModelTarget:
    return ModelTarget("/m/active/current.gguf", ("/m/active/current.gguf", path), path,
                       (1, identity, 10, 10), error)  # fmt: skip


def test_a_bad_target_is_refused_a_new_one_accepted_the_same_one_kept() -> None:
    accepted = target()
    assert judge_model_target(accepted, target(error="truncated")) is TargetVerdict.REFUSE
    assert judge_model_target(accepted, target("/m/b.gguf", 2)) is TargetVerdict.ACCEPT
    assert judge_model_target(accepted, target()) is TargetVerdict.KEEP
    assert judge_model_target(accepted, target(identity=3)) is TargetVerdict.ACCEPT  # rewritten
    assert judge_model_target(None, target()) is TargetVerdict.ACCEPT


# -- whether a drill has settled ---------------------------------------------------------------


def answer(started: float, *, ok: bool = True, fallbacks: int = 0) -> Answer:
    return Answer("m", False, ok, 200 if ok else 500, started, 5.0, "http://x", fallbacks)


def test_a_drill_settles_after_clean_answers_once_the_provider_was_seen_down() -> None:
    clean = [answer(10.0 + i) for i in range(5)]
    assert not drill_settled(clean, 9.0, seen_down=False, mode=DrillMode.STOP, gateway_settled=True)
    assert drill_settled(clean, 9.0, seen_down=True, mode=DrillMode.STOP, gateway_settled=True)
    # a killed provider may be back before the daemon saw it down
    assert drill_settled(clean, 9.0, seen_down=False, mode=DrillMode.KILL, gateway_settled=True)
    assert not drill_settled(clean, 9.0, seen_down=True, mode=DrillMode.STOP, gateway_settled=False)


def test_a_drill_has_not_settled_while_answers_still_need_fallbacks() -> None:
    answers = [answer(10.0 + i) for i in range(4)] + [answer(15.0, fallbacks=1)]
    assert not drill_settled(
        answers, 9.0, seen_down=True, mode=DrillMode.HANG, gateway_settled=True
    )
    failed = [answer(10.0 + i) for i in range(4)] + [answer(15.0, ok=False)]
    assert not drill_settled(failed, 9.0, seen_down=True, mode=DrillMode.HANG, gateway_settled=True)
    before_the_takedown = [answer(1.0 + i) for i in range(5)]
    assert not drill_settled(
        before_the_takedown, 9.0, seen_down=True, mode=DrillMode.HANG, gateway_settled=True
    )


# -- whether to re-plan VRAM ------------------------------------------------------------------


def gpu_plan(cpu_only_reason: str | None = None) -> GpuPlan:
    card = CardPlan(index=0, total_bytes=1 << 34, others_bytes=0, margin_bytes=0, servers=())
    return GpuPlan(settings={}, cards=(card,), cpu_only_reason=cpu_only_reason)


def test_vram_is_not_looked_at_while_something_moves() -> None:
    assert vram_check_due(restarting=False, gpu_unit_starting=False)
    assert not vram_check_due(restarting=True, gpu_unit_starting=False)
    assert not vram_check_due(restarting=False, gpu_unit_starting=True)


def reading(*gpus: GpuReading, reason: str | None = None) -> GpuSnapshot:
    return GpuSnapshot(gpus, reason)


CARD = GpuReading(0, "H200", "GPU-0", total_bytes=1 << 34, free_bytes=1 << 34, used_bytes=0)


def test_nvml_answering_again_or_a_card_appearing_brings_a_new_plan() -> None:
    # NVML failed at start: no plan in force (issue 10, scenario 6)
    assert gpu_recheck(None, reading(CARD), {}, 1.0).replan
    # a first plan made CPU only (no card then) is planned again once a card shows
    cpu_only = gpu_plan("NVML sees no GPU: planning CPU only")
    assert gpu_recheck(cpu_only, reading(CARD), {}, 1.0).replan
    assert not gpu_recheck(cpu_only, reading(reason="NVML sees no GPU"), {}, 1.0).replan
    # a plan on the card: the hysteresis decides
    assert not gpu_recheck(gpu_plan(), reading(CARD), {}, 1.0).replan


def small_config(tmp_path: Path, layers: int | None) -> Config:
    native = "    native: {server: llama-server, model_path: /m/x.gguf"
    native += f", n_gpu_layers: {layers}}}" if layers is not None else "}"
    config, findings = parse_config(
        {
            "providers.yaml": "providers:\n  native:\n    type: llama_cpp\n"
            "    base_url: http://127.0.0.1:8080\n    models: [m]\n",
            "model-mappings.yaml": "fallback_chains: {}\n",
            "diversityd.yaml": f"providers:\n{native}\n",
        },
        config_dir=str(tmp_path),
        hostname="box",
    )
    assert config is not None, findings
    return config


def test_before_a_plan_a_unit_gets_the_users_layers_or_the_cpu(tmp_path: Path) -> None:
    cpu = unit_gpu_settings(small_config(tmp_path, None), None, "native")
    assert (cpu.n_gpu_layers, cpu.hide_gpu) == (0, True)
    mine = unit_gpu_settings(small_config(tmp_path, 12), None, "native")
    assert (mine.n_gpu_layers, mine.hide_gpu) == (12, False)
    planned = GpuSettings("native", n_gpu_layers=33, hide_gpu=False, server="llama-server", gpu=0)
    plan = dataclasses.replace(gpu_plan(), settings={"native": planned})
    assert unit_gpu_settings(small_config(tmp_path, None), plan, "native") == planned


def test_the_last_plans_word_is_kept_when_nvml_fails_at_start(tmp_path: Path) -> None:
    config = small_config(tmp_path, None)
    last = GpuSettings("native", n_gpu_layers=33, hide_gpu=False, server="llama-server", gpu=0)
    assert unit_gpu_settings(config, None, "native", {"native": last}) == last
    # not for another server kind or another card
    other_card = dataclasses.replace(last, gpu=1)
    assert unit_gpu_settings(config, None, "native", {"native": other_card}).hide_gpu
    # a plan in force wins
    planned = dataclasses.replace(last, n_gpu_layers=7)
    plan = dataclasses.replace(gpu_plan(), settings={"native": planned})
    assert unit_gpu_settings(config, plan, "native", {"native": last}) == planned


def test_a_timed_out_probe_is_busy_while_the_cpu_works_and_hung_when_it_stands_still() -> None:
    ready = apply_probe(Observed(unit=unit(pid=100)), probe(), pid=100, cpu_s=5.0)
    working = apply_probe(ready, probe(ProbeOutcome.TIMEOUT), pid=100, cpu_s=5.9)
    assert state_of(working, owned=True) is ProviderState.BUSY
    assert is_serving(ProviderState.BUSY)
    frozen = apply_probe(working, probe(ProbeOutcome.TIMEOUT), pid=100, cpu_s=5.9)
    assert state_of(frozen, owned=True) is ProviderState.HUNG
    # CPU time of another process proves nothing about this one
    replaced = apply_probe(ready, probe(ProbeOutcome.TIMEOUT), pid=200, cpu_s=9.0)
    assert not replaced.progressing


def test_only_a_hung_server_past_its_grace_is_killed() -> None:
    assert hung_too_long(ProviderState.HUNG, 10.0, 12.5, 2.0)
    assert not hung_too_long(ProviderState.HUNG, 10.0, 11.0, 2.0)
    assert not hung_too_long(ProviderState.BUSY, 10.0, 99.0, 2.0)
    assert not hung_too_long(ProviderState.HUNG, None, 99.0, 2.0)


def test_a_process_silent_past_its_start_grace_is_hung_unless_it_works() -> None:
    """Found by bench/chaos.py: a server SIGSTOPped while loading stayed `down` for ever
    (refused: it never bound its port), never killed."""
    began = unit(pid=100)
    frozen = apply_probe(Observed(unit=began), probe(ProbeOutcome.REFUSED), pid=100, cpu_s=1.0)
    frozen = apply_probe(frozen, probe(ProbeOutcome.REFUSED), pid=100, cpu_s=1.0)
    assert state_of(frozen, owned=True) is ProviderState.STARTING  # within its grace
    assert state_of(frozen, owned=True, overdue=True) is ProviderState.HUNG
    loading = apply_probe(frozen, probe(ProbeOutcome.REFUSED), pid=100, cpu_s=3.0)
    assert state_of(loading, owned=True, overdue=True) is ProviderState.STARTING
