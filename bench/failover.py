"""Benchmark: the same faults under the same request stream, with LiteLLM alone, LiteLLM
tuned, and diversityd.

Sets up three private systemd --user managers side by side, each with the same servers
(the real llama-server and llama-cpp-python on a tiny GGUF behind an active link, the Ollama
and vLLM stand-ins) and a LiteLLM gateway; tears them down after.

- litellm_alone: the servers and LiteLLM as hand-made units with Restart=on-failure, no
  supervisor, a static config with the seeds' fallbacks (the chains of model-mappings.yaml)
  and LiteLLM's defaults: what the seeds ran.
- litellm_tuned: the same, with the config `diversityctl render` prints (its timeouts and
  cooldowns): what the config buys without the supervision.
- diversityd: the stack owned by diversityd (its units, probes, blue/green gateway).

Requests (the `openai` package, max_retries=0, a new connection each, loopback only):
4 a second, open loop, plain and streamed in turn, the models `llama-cpp-native`,
`llama-cpp-default` and `llama3.1:latest` in turn, each bounded to 30 s. Before each fault
the arm must be steady and route each model to its own server (a gateway that does not is
a finding, and is repaired first). Faults, on llama-server (the primary of
`llama-cpp-native`):
- kill: kill -9 of its main process;
- hang: SIGSTOP; the LiteLLM arms have no supervisor, so it is thawed (SIGCONT) after
  20 s; diversityd kills a hung server after `supervision.hung_grace_s` (3 s here) where it
  reads that setting, else it too is thawed after 20 s;
- restart: systemctl --user stop, 5 s later start;
- repoint: the active GGUF link re-pointed to the other tiny model; the LiteLLM arms then
  restart both llama servers by hand (as the seeds did); diversityd rolls them itself.
  Both llama servers are the faulty ones.

Per fault and arm (medians over repeats; 3, 1 with --quick): sent, failed, p50_ms,
p99_ms, max_ms (every request from 3 s before the fault until the arm has been steady for
3 s, for diversityd one gateway instance alive among them, and the faulty server answers
requests, plus 3 s); failover_s: from the fault to the end of the
last request that touched the faulty server (answered by it, or asked for its name and
failed or fell back) and was sent before it answered its own probe again; recovery_s: to
the end of the first request it answered that was sent after that (None: never within
120 s, or not 15 s after the arm said it was steady). Arms alternate: their order rotates
per fault and repeat.

`reload` (diversityd's gateway reloads during the faults): how many; how long two
instances lived at once, the new instance's CPU seconds then and the machine's CPU use;
the bystanders' latency (requests for `llama3.1:latest`, served by Ollama, which no fault
touches) while a new instance starts, in the 5 s after it takes over, and otherwise; the
bystanders' p99 in every arm; the findings.

Usage: python bench/failover.py [--quick]. A table on stderr; the last line of stdout is
one JSON object: {"faults": {FAULT: {ARM: {...}}}, "reload": {...}, "settings": {...}}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from diversityd.drill import percentile
from diversityd_lab.arms import ARM_NAMES, Arm, open_arms
from diversityd_lab.failovertrial import FAULTS, Trial, TrialSettings
from diversityd_lab.measure import emit

SETTINGS = TrialSettings(
    rate_per_s=4.0, timeout_s=30.0, hang_s=20.0, stop_s=5.0, pre_s=3.0, tail_s=3.0,
    max_window_s=120.0, stale_s=15.0, hold_s=3.0,
)  # fmt: skip
HUNG_GRACE_S = 3.0
WARM_UP_S = 8.0
KEYS = ("sent", "failed", "p50_ms", "p99_ms", "max_ms", "failover_s", "recovery_s")


def log(message: str) -> None:
    print(f"[failover {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def warm_up(arm: Arm) -> None:
    """The first requests after LiteLLM starts are slow (seconds): not the faults' cost."""
    with SETTINGS.stream(arm) as stream:
        time.sleep(WARM_UP_S)
    failed = [a.error for a in stream.answers if not a.ok]
    log(
        f"{arm.name}: warmed up ({len(stream.answers)} requests, {len(failed)} failed {failed[:2]})"
    )


def median(values: Sequence[float | int | None]) -> float | int | None:
    present = [v for v in values if v is not None]
    if len(present) < len(values) or not present:
        return None  # a repeat that never recovered says it all
    middle = statistics.median(present)
    return round(middle, 2) if isinstance(middle, float) else middle


def table(faults: dict[str, dict[str, dict[str, Any]]]) -> str:
    header = f"{'fault':<8} {'arm':<14}" + "".join(f"{k:>11}" for k in KEYS)
    lines = [header, "-" * len(header)]
    for fault, arms in faults.items():
        for arm, numbers in arms.items():
            cells = "".join(f"{'-' if numbers[k] is None else numbers[k]!s:>11}" for k in KEYS)
            lines.append(f"{fault:<8} {arm:<14}{cells}")
    return "\n".join(lines)


def latency_of(values: Sequence[float]) -> dict[str, float | int]:
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 0.5), 1),
        "p99_ms": round(percentile(values, 0.99), 1),
    }


def reload_summary(trials: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """diversityd's gateway reloads over all its trials; the bystanders' p99 in every arm."""
    bystanders = {
        arm: median([t["bystander_p99_ms"] for by_arm in trials.values() for t in by_arm[arm]])
        for arm in next(iter(trials.values()))
    }
    ours = [t for by_arm in trials.values() for t in by_arm.get("diversityd", [])]
    windows = [w for t in ours for w in t["windows"]]

    def middle(key: str) -> float | int | None:
        return median([w[key] for w in windows]) if windows else None

    return {
        "bystander_p99_ms": bystanders,
        "reloads": sum(t["reloads"] for t in ours),
        "overlaps": len(windows),
        "overlap_s": middle("length_s"),
        "new_instance_cpu_s": middle("new_cpu_s"),
        "machine_busy_pct": middle("machine_busy_pct"),
        "p99_ms_in_flight_during": max((w["p99_ms"] for w in windows), default=None),
        "by_phase": {
            phase: latency_of([v for t in ours for v in t["phases"][phase]])
            for phase in ("starting", "after_switch", "other")
        },
        "findings": [
            f
            for by_arm in trials.values()
            for runs in by_arm.values()
            for t in runs
            for f in t["findings"]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one repeat per fault and arm")
    parser.add_argument("--fault", action="append", choices=FAULTS, help="only these faults")
    parser.add_argument("--arm", action="append", choices=ARM_NAMES, help="only these arms")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    faults_run = tuple(args.fault or FAULTS)
    arms_run = tuple(args.arm or ARM_NAMES)
    started = time.monotonic()
    trials: dict[str, dict[str, list[dict[str, Any]]]] = {
        fault: {arm: [] for arm in arms_run} for fault in faults_run
    }
    with open_arms(arms_run, HUNG_GRACE_S, log) as arms:
        for arm in arms.values():
            warm_up(arm)
        for repeat in range(repeats):
            for index, fault in enumerate(faults_run):
                shift = (repeat + index) % len(arms_run)
                for name in arms_run[shift:] + arms_run[:shift]:
                    result = Trial(arms[name], fault, SETTINGS, log).run()
                    trials[fault][name].append(result)
                    shown = {k: result[k] for k in (*KEYS, "reloads", "settled_s", "note")}
                    log(f"{fault} {name}: {shown} errors={result['errors']}")
                    log(f"  slowest: {result['slowest']}")
        kills_hung = "diversityd" in arms and arms["diversityd"].kills_hung
    faults: dict[str, dict[str, dict[str, Any]]] = {}
    for fault, by_arm in trials.items():
        faults[fault] = {}
        for arm, runs in by_arm.items():
            faults[fault][arm] = {key: median([t[key] for t in runs]) for key in KEYS}
            if arm == "diversityd":
                faults[fault][arm]["reloads"] = median([t["reloads"] for t in runs])
    reload = reload_summary(trials)
    print(table(faults), file=sys.stderr)
    print(f"reload: {reload}", file=sys.stderr)
    log(f"done in {time.monotonic() - started:.0f} s")
    emit(
        {
            "faults": faults,
            "reload": reload,
            "settings": {
                "repeats": repeats,
                "rate_per_s": SETTINGS.rate_per_s,
                "timeout_s": SETTINGS.timeout_s,
                "hang_s": SETTINGS.hang_s,
                "hung_grace_s": HUNG_GRACE_S if kills_hung else None,
                "stop_s": SETTINGS.stop_s,
            },
        }
    )


if __name__ == "__main__":
    main()
