"""Benchmark: requests through the gateway while a seeded random schedule of faults runs.

Sets up a private systemd --user manager, the embedded stack with all four providers (real
llama-server behind a wrapper that can be made to crash, real llama-cpp-python, the Ollama
and vLLM stand-ins), the real LiteLLM gateway and diversityd (short supervision settings);
tears it down after. Two client threads with the `openai` package (max_retries=0, 60 s per
request, a new connection each) ask for every model that has a fallback chain, plain and
streamed in turn, while the faults run in a random order (each kind once with --quick,
three times without): kill -9, SIGSTOP (hang), stop and start of a provider; the GGUF link
re-pointed at the other model, and at a truncated file and back; kill -9 of the daemon, and
of the serving gateway instance; a good reload (a llama server's ctx) and a bad one (a
fallback cycle: refused, then the file restored); a crash loop (llama-server's wrapper
fails while a flag exists, until systemd gives up; then the flag is removed). The bench
probes every provider itself (its /health, /v1/models or /api/tags, every 0.15 s) to judge
each failed request: did a member of its chain (the model or a name its fallbacks reach)
answer every probe from before the request began to after it ended?

- requests, failed; failed_with_live_chain: failed while some member of the chain was
  serving throughout, leaving out those in flight when the gateway instance was killed;
- in_flight_at_gateway_kill: {in_flight, failed}: requests on the killed instance;
- p50_ms, p99_ms, max_ms: latency of every request;
- faults: kind -> how many were done;
- providers_left_down: providers not `ready` in `diversityctl status` 60 s after the last
  fault (the bench does nothing meanwhile);
- longest_job_s: the longest daemon job begun during the run, from the daemon's journal:
  a restart job from its first `unit.restarting` to its last `unit.restarted` or
  `unit.restart_failed`, a start (revival, start-up, `diversityctl start`) from
  `unit.starting` to `unit.started`/`unit.start_failed`; one never ended counts until the
  settle is over; one cut short by a daemon kill ends at the kill.
- seed: the schedule's seed (--seed, else a random one).
- also: faults_not_done (a target that never ran), left_down (name: state), jobs_unfinished,
  gateway_serves_plan (after the settle, the serving instance's deployments, from LiteLLM's
  /model/info, are those of the config `diversityctl status` says is in force).

A hang is ended by the daemon where it knows `supervision.hung_grace_s`; otherwise the
bench sends SIGCONT after the hang's hold (3-5 s). A table of faults, failures and jobs goes
to stderr.

Usage: python bench/chaos.py [--quick] [--seed N]. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from diversityd import parts
from diversityd.adapters.litellm import read_master_key
from diversityd.config import SupervisionSettings
from diversityd.drill import percentile
from diversityd_lab.chaos import (
    JOB_EVENTS,
    ChatStream,
    Job,
    Prober,
    Request,
    Verdict,
    close_interrupted,
    in_flight,
    jobs_from_journal,
    judge,
    planned_routes,
    read_chains,
    served_routes,
)
from diversityd_lab.embedded import LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM, StackSpec
from diversityd_lab.faults import FaultRecord, FaultRunner, plan_faults, write_crash_wrapper
from diversityd_lab.measure import emit
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.stack import RunningStack, free_port, temporary_stack

PROVIDERS = (LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM)
CRASHING = LLAMA_NATIVE  # the provider behind the wrapper
SUPERVISION: dict[str, float] = {
    "start_grace_s": 20,
    "ready_wait_s": 60,
    "revive_initial_s": 2,
    "revive_max_s": 8,
}
HUNG_GRACE_S = 2.0
WARMUP_S = 3.0
SETTLE_S = 60.0


def supervision() -> dict[str, float]:
    """Short settings; `hung_grace_s` only where this daemon knows it (unknown keys are
    refused)."""
    known = {f.name for f in dataclasses.fields(SupervisionSettings)}
    return {**SUPERVISION, **({"hung_grace_s": HUNG_GRACE_S} if "hung_grace_s" in known else {})}


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def read_jobs(running: RunningStack) -> list[Job]:
    entries = [e for event in JOB_EVENTS for e in running.journal_events(event)]
    return jobs_from_journal(entries)


def write_journal(running: RunningStack, path: Path, t0: float) -> None:
    """The manager's whole journal, times from the start of the traffic (to read failures
    against)."""
    assert isinstance(running.manager, PrivateManager)
    with path.open("w") as out:
        for entry in running.manager.journal(timeout=60):
            who = entry.get("_SYSTEMD_UNIT") or entry.get("SYSLOG_IDENTIFIER") or "-"
            message = entry.get("MESSAGE")
            if isinstance(message, list):  # journald's bytes (colours, say) as a list
                message = bytes(message).decode(errors="replace")
            text = str(message).replace("\n", " | ")
            out.write(f"{int(entry['__MONOTONIC_TIMESTAMP']) / 1e6 - t0:9.3f}  {who}  {text}\n")


def report(
    t0: float,
    *,
    records: list[FaultRecord],
    outages: dict[str, list[tuple[float, float]]],
    requests: list[Request],
    verdicts: list[Verdict],
    jobs: list[Job],
    document: dict[str, Any],
    settled_at: float,
) -> None:
    say(f"\n{'t (s)':>7}  {'fault':<13} {'target':<17} {'took':>6}  detail")
    for f in records:
        took = f"{f.ended - f.started:.1f}s"
        mark = "" if f.done else "NOT DONE: "
        say(
            f"{f.started - t0:7.1f}  {f.kind:<13} {f.target or '-':<17} {took:>6}  {mark}{f.detail}"
        )
    say("\noutages the bench's probes saw (s from the start of the traffic):")
    for name, spans in outages.items():
        seen = ", ".join(f"{a - t0:.1f}-{b - t0:.1f}" for a, b in spans) or "none"
        say(f"  {name:<17} {seen}")
    say(f"\nfailed requests ({len(verdicts)}{', the first 30' if len(verdicts) > 30 else ''}):")
    for v in verdicts[:30]:
        r = v.request
        why = "gateway killed" if v.at_gateway_kill else f"live: {', '.join(v.live) or 'none'}"
        say(
            f"{r.started - t0:7.1f}  {r.model:<17} {'stream' if r.stream else 'plain':<6} "
            f"{r.latency_ms:8.0f} ms  {why:<40} {(r.error or '')[:160]}"
        )
    say("\nslowest requests:")
    for r in sorted(requests, key=lambda r: r.latency_ms)[-5:]:
        say(
            f"{r.started - t0:7.1f}  {r.model:<17} {'stream' if r.stream else 'plain':<6} "
            f"{r.latency_ms:8.0f} ms  {'ok' if r.ok else 'FAILED'}  answered by {r.api_base}"
        )
    say("\ndaemon jobs begun during the run:")
    for job in jobs:
        state = "RUNNING" if job.ended is None else ("ok" if job.ok else "FAILED")
        state = "KILLED" if job.interrupted else state
        say(
            f"{job.began - t0:7.1f}  {job.duration_s(settled_at):6.1f} s  {state:<7} {job.name}"
            f"{'  ' + '; '.join(job.steps) if job.steps else ''}"
        )
    say("\nproviders after the settle:")
    for p in document["providers"]:
        say(f"  {p['name']:<17} {p['state']:<9} {p.get('error') or ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="each fault once (under 5 min)")
    parser.add_argument("--seed", type=int, default=None, help="the schedule's seed")
    parser.add_argument(
        "--journal", type=Path, default=None, help="write the stack's journal here (to debug)"
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    rounds, gaps = (1, (2.0, 5.0)) if args.quick else (3, (2.0, 8.0))

    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as scratch:
        flag = Path(scratch) / "broken"
        wrapper = write_crash_wrapper(
            Path(scratch) / "llama-server", parts.llama_server_binary(), flag
        )

        def spec(manager: PrivateManager) -> StackSpec:
            return StackSpec(
                ports={**{name: free_port() for name in PROVIDERS}, "gateway": free_port()},
                providers=PROVIDERS,
                unit_dir=manager.unit_dir,
                llama_server=wrapper,
                extra_settings={"supervision": supervision()},
            )

        with temporary_stack("bench-chaos-", spec) as running:
            gateway = running.wait_for(
                lambda d: d["gateway"].get("state") == "ready" and d["gateway"].get("in_sync"),
                timeout_s=180,
                poll_s=0.5,
            )["gateway"]
            chains, urls = read_chains(running.stack.config_dir)
            key = read_master_key(Path(gateway["key_file"]))
            hangs = "hung_grace_s" in supervision()
            runner = FaultRunner(running, crash_flag=flag, daemon_ends_hangs=hangs)
            plan = plan_faults(
                rng,
                rounds,
                PROVIDERS,
                ctx_providers=(LLAMA_NATIVE, LLAMA_PYTHON),
                crash_provider=CRASHING,
                gap_s=gaps,
            )
            say(f"seed {seed}: {len(plan)} faults; chains: ")
            for chain in chains.values():
                say(f"  {chain.model}: {' -> '.join(chain.members)} ({', '.join(chain.providers)})")
            with Prober(urls) as prober, ChatStream(gateway["url"], key, list(chains)) as sent:
                t0 = time.monotonic()
                try:
                    time.sleep(WARMUP_S)
                    for fault in plan:
                        record = runner.run(fault)
                        say(f"{record.started - t0:7.1f}  {record.kind:<13} {record.detail}")
                        time.sleep(fault.gap_s)
                    last_fault = max(r.ended for r in runner.records)
                    time.sleep(max(0.0, last_fault + SETTLE_S - time.monotonic()))
                    document = running.status()
                    settled_at = time.monotonic()
                    planned = planned_routes(Path(document["gateway"]["config"]).read_text())
                    try:
                        served: set[tuple[str, str]] | str = served_routes(gateway["url"], key)
                    except Exception as exc:
                        served = f"no answer: {type(exc).__name__}: {exc}"
                finally:
                    runner.thaw_all()
            requests = list(sent.requests)
            jobs = [j for j in read_jobs(running) if j.began >= t0]
            daemon_kills = [r.started for r in runner.records if r.kind == "daemon_kill"]
            close_interrupted(jobs, running.daemon_pid(), daemon_kills)
            if args.journal is not None:
                write_journal(running, args.journal, t0)

    verdicts = judge(requests, chains, prober, runner.gateway_kills)
    at_kill = [r for at in runner.gateway_kills for r in in_flight(requests, at)]
    latencies = [r.latency_ms for r in requests]
    left_down = {p["name"]: p["state"] for p in document["providers"] if p["state"] != "ready"}
    if served != planned:
        say(f"\nthe serving gateway routes {sorted(served) if isinstance(served, set) else served}")
        say(f"the config the daemon says is in force routes {sorted(planned)}")
    report(
        t0,
        records=runner.records,
        outages={name: prober.down_spans(name) for name in urls},
        requests=requests,
        verdicts=verdicts,
        jobs=jobs,
        document=document,
        settled_at=settled_at,
    )
    emit(
        {
            "requests": len(requests),
            "failed": len(verdicts),
            "failed_with_live_chain": sum(bool(v.live) and not v.at_gateway_kill for v in verdicts),
            "in_flight_at_gateway_kill": {
                "in_flight": len(at_kill),
                "failed": sum(not r.ok for r in at_kill),
            },
            "p50_ms": round(statistics.median(latencies), 1),
            "p99_ms": round(percentile(latencies, 0.99), 1),
            "max_ms": round(max(latencies), 1),
            "faults": dict(Counter(str(r.kind) for r in runner.records if r.done)),
            "faults_not_done": sum(not r.done for r in runner.records),
            "providers_left_down": len(left_down),
            "left_down": left_down,
            "gateway_serves_plan": served == planned,
            "longest_job_s": round(max((j.duration_s(settled_at) for j in jobs), default=0.0), 1),
            "jobs_unfinished": sum(j.ended is None for j in jobs),
            "seed": seed,
        }
    )


if __name__ == "__main__":
    main()
