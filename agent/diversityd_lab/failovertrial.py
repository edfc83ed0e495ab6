"""One fault done to one arm under the steady request stream, for bench/failover.py: the
arm made steady and checked to route as configured, the stream started, the fault done
(`kill`, `hang`, `restart`, `repoint`), the wait until the faulty servers serve again, and
what the requests, the probes and the gateway processes' CPU show.

The faulty server is llama-server (`llama-cpp-native` is its name); a re-point faults both
llama servers. A hang is ended by the arm where it kills hung servers (diversityd with
`supervision.hung_grace_s`), else thawed (SIGCONT) after `hang_s`.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from diversityd.drill import Answer, percentile
from diversityd_lab.arms import Arm
from diversityd_lab.clients import OpenAIStream
from diversityd_lab.embedded import LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA
from diversityd_lab.faultwatch import (
    FaultyServer,
    ServerWatch,
    ended,
    served_since,
    trial_metrics,
)
from diversityd_lab.procstat import CpuSampler

FAULTS = ("kill", "hang", "restart", "repoint")
MODELS = ("llama-cpp-native", "llama-cpp-default", "llama3.1:latest")
# Who serves each model first (its own server); their fallbacks serve it when it is down.
FIRST_SERVER = {
    "llama-cpp-native": LLAMA_NATIVE,
    "llama-cpp-default": LLAMA_PYTHON,
    "llama3.1:latest": OLLAMA,
}


@dataclass(frozen=True)
class TrialSettings:
    rate_per_s: float = 4.0  # requests a second
    timeout_s: float = 30.0  # each request, start to last byte
    hang_s: float = 20.0  # a hang the arm does not end is thawed after this
    stop_s: float = 5.0  # restart: stopped this long
    pre_s: float = 3.0  # the stream runs this long before the fault
    tail_s: float = 3.0  # ... and this long after the arm is steady again
    max_window_s: float = 120.0  # a fault not recovered from by then is given up on
    stale_s: float = 15.0  # steady, the server back, and no request reaches it: given up
    hold_s: float = 3.0  # steady this long without a break (a reload may follow another)

    def stream(self, arm: Arm) -> OpenAIStream:
        return OpenAIStream(
            arm.gateway_url, arm.key, MODELS, rate_per_s=self.rate_per_s, timeout_s=self.timeout_s
        )


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def faulty_servers(arm: Arm, fault: str) -> list[FaultyServer]:
    names = (LLAMA_NATIVE, LLAMA_PYTHON) if fault == "repoint" else (LLAMA_NATIVE,)
    return [
        FaultyServer(
            name,
            arm.stack.base_url(name),
            frozenset(m for m, first in FIRST_SERVER.items() if first == name),
        )
        for name in names
    ]


def routing_problems(arm: Arm, settings: TrialSettings) -> list[str]:
    """A short burst: is each model answered by the server that serves it first?"""
    with settings.stream(arm) as stream:
        time.sleep(2.5)
    problems = []
    for model, provider in FIRST_SERVER.items():
        port = arm.stack.spec.ports[provider]
        seen = {a.api_base for a in stream.answers if a.model == model}
        if not any(base and urlsplit(base).port == port for base in seen):
            problems.append(f"{model} answered by {sorted(map(str, seen))}, not {provider}")
    return problems


def prepare(arm: Arm, settings: TrialSettings, log: Callable[[str], None]) -> list[str]:
    """Steady, and routing as configured. A gateway that routes otherwise while its arm says
    it is steady is a finding where the arm is diversityd (it is repaired, so that the next
    fault measures something); the LiteLLM arms are waited for (a cooldown may last)."""
    findings: list[str] = []
    for _ in range(4):
        arm.forgive()
        arm.wait_steady()
        problems = routing_problems(arm, settings)
        if not problems:
            return findings
        did = arm.repair_routing()
        if did:
            findings.append(f"{arm.name} steady but {'; '.join(problems)}; {did}")
            log(f"FINDING: {findings[-1]}")
        else:
            log(f"{arm.name}: {'; '.join(problems)}; waiting")
        time.sleep(5)
    raise RuntimeError(f"{arm.name}: it does not route as configured: {findings}")


@dataclass
class Trial:
    arm: Arm
    fault: str
    settings: TrialSettings
    log: Callable[[str], None]

    def run(self) -> dict[str, Any]:
        arm, settings = self.arm, self.settings
        findings = prepare(arm, settings, self.log)
        servers = faulty_servers(arm, self.fault)
        pids = {name: arm.main_pid(name) for name in (LLAMA_NATIVE, LLAMA_PYTHON)}
        reloads_before = arm.reloads()
        with (
            CpuSampler(arm.gateway_process) as sampler,
            ServerWatch(servers) as watch,
            settings.stream(arm) as stream,
        ):
            time.sleep(settings.pre_s)
            fault_at = time.monotonic()
            note = self.inject(pids, fault_at)
            problem = self.wait_recovered(servers, pids, watch, stream, fault_at)
            if problem.startswith("FINDING: "):
                findings.append(problem.removeprefix("FINDING: "))
            settled_s = time.monotonic() - fault_at
            time.sleep(settings.tail_s)
        answers = list(stream.answers)
        reloads = [(a, b) for a, b in arm.reload_events() if b >= fault_at - settings.pre_s]
        backs = {s.name: watch.back_at(s.name, fault_at) for s in servers}
        result: dict[str, Any] = dict(trial_metrics(answers, servers, fault_at, backs))
        result.update(
            reloads=arm.reloads() - reloads_before,
            settled_s=round(settled_s, 1),
            windows=reload_windows(sampler, answers),
            phases=reload_phases(reloads, answers),
            bystander_p99_ms=round(
                percentile([a.latency_ms for a in answers if a.model == BYSTANDER], 0.99), 1
            ),
            note=f"{note} {problem}".strip(),
            errors=sorted({(a.error or "")[:120] for a in answers if not a.ok})[:3],
            findings=findings,
            slowest=slowest(arm, answers, fault_at),
        )
        return result

    def inject(self, pids: dict[str, int], fault_at: float) -> str:
        """Do the fault (and the thaw of a hang the arm does not end). Returns a note."""
        arm, settings = self.arm, self.settings
        unit = arm.unit(LLAMA_NATIVE)
        pid = pids[LLAMA_NATIVE]
        if self.fault == "kill":
            os.kill(pid, signal.SIGKILL)
            return ""
        if self.fault == "hang":
            os.kill(pid, signal.SIGSTOP)
            while time.monotonic() < fault_at + settings.hang_s:
                if arm.kills_hung and not alive(pid):
                    return f"killed by the arm {time.monotonic() - fault_at:.1f} s after SIGSTOP"
                time.sleep(0.1)
            os.kill(pid, signal.SIGCONT)
            return f"thawed by the harness after {settings.hang_s:g} s"
        if self.fault == "restart":
            arm.manager.systemctl("stop", unit)
            time.sleep(settings.stop_s)
            arm.manager.systemctl("start", unit)
            return ""
        target = arm.other_model()
        arm.repoint(target)
        return f"-> {target}"

    def servers_back(
        self,
        servers: Sequence[FaultyServer],
        pids: dict[str, int],
        watch: ServerWatch,
        since: float,
    ) -> dict[str, float] | None:
        """When each faulty server answered its probe again (after a restart, where the fault
        restarts it); None while one has not."""
        backs = {}
        for server in servers:
            if self.fault != "hang" and self.arm.main_pid(server.name) in (0, pids[server.name]):
                return None
            back = watch.back_at(server.name, since)
            if back is None:
                return None
            backs[server.name] = back
        return backs

    def wait_recovered(
        self,
        servers: Sequence[FaultyServer],
        pids: dict[str, int],
        watch: ServerWatch,
        stream: OpenAIStream,
        fault_at: float,
    ) -> str:
        """Until each faulty server is back and answers requests through the gateway, and
        the arm is steady. Returns what kept it from recovering, if anything."""
        settings = self.settings
        steady_since: float | None = None  # steady without a break since
        first_steady: float | None = None
        while time.monotonic() < fault_at + settings.max_window_s:
            backs = self.servers_back(servers, pids, watch, fault_at)
            if backs is None or not self.arm.steady():
                steady_since = None
                time.sleep(0.5)
                continue
            now = time.monotonic()
            steady_since = steady_since or now
            first_steady = first_steady or now
            answers = list(stream.answers)
            unserved = [s.name for s in servers if not served_since(answers, s, backs[s.name])]
            if not unserved and now - steady_since >= settings.hold_s:
                return ""
            if unserved and now - first_steady > settings.stale_s:
                return (
                    f"FINDING: {self.arm.name}: {', '.join(unserved)} back and the arm"
                    f" steady for {settings.stale_s:g} s, but no request reached it"
                )
            time.sleep(0.5)
        return f"not recovered in {settings.max_window_s:g} s"


def reload_windows(
    sampler: CpuSampler, answers: Sequence[Answer]
) -> list[dict[str, float | int | None]]:
    """Each period two gateway instances lived at once (a blue/green reload): its length,
    the new instance's CPU time, the machine's CPU use, and the requests in flight."""
    windows = []
    for start, end in sampler.overlaps():
        newcomers = [life for life in sampler.lives.values() if start <= life.first_seen <= end]
        during = [a for a in answers if a.started < end and ended(a) > start]
        busy = sampler.machine_busy_fraction(start, end)
        windows.append(
            {
                "length_s": round(end - start, 1),
                "new_cpu_s": round(sum(life.cpu_s for life in newcomers), 1),
                "machine_busy_pct": None if busy is None else round(busy * 100),
                "requests": len(during),
                "p99_ms": round(percentile([a.latency_ms for a in during], 0.99), 1),
            }
        )
    return windows


AFTER_SWITCH_S = 5.0
BYSTANDER = "llama3.1:latest"  # served by Ollama, which no fault touches


def reload_phase(answer: Answer, reloads: Sequence[tuple[float, float]]) -> str:
    """`starting`: sent while a new gateway instance started (the old one serving);
    `after_switch`: sent in the AFTER_SWITCH_S after the new one took over (its first
    requests; the old one draining); else `other`."""
    for start, ready in reloads:
        if start <= answer.started < ready:
            return "starting"
        if ready <= answer.started < ready + AFTER_SWITCH_S:
            return "after_switch"
    return "other"


def reload_phases(
    reloads: Sequence[tuple[float, float]], answers: Sequence[Answer]
) -> dict[str, list[float]]:
    """Latencies of the bystanders (requests for BYSTANDER, whose server no fault touches)
    by reload phase (reload_phase): what a reload costs, apart from what the fault does."""
    phases: dict[str, list[float]] = {"starting": [], "after_switch": [], "other": []}
    for answer in answers:
        if answer.model == BYSTANDER:
            phases[reload_phase(answer, reloads)].append(answer.latency_ms)
    return phases


def slowest(arm: Arm, answers: Sequence[Answer], fault_at: float, count: int = 3) -> list[str]:
    """The slowest requests: when sent (from the fault), what, who answered, how long."""
    by_port = {port: name for name, port in arm.stack.spec.ports.items()}
    lines = []
    for a in sorted(answers, key=lambda a: -a.latency_ms)[:count]:
        port = urlsplit(a.api_base).port if a.api_base else None
        who = by_port.get(port, "-") if port else "-"
        kind = "stream" if a.stream else "plain"
        lines.append(
            f"t={a.started - fault_at:+.1f}s {a.model} {kind} by={who} fb={a.attempted_fallbacks}"
            f" {a.latency_ms:.0f}ms{'' if a.ok else ' FAILED'}"
        )
    return lines
