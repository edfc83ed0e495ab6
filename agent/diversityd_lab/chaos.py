"""What a chaos benchmark watches, apart from the daemon: which providers could answer each
model (its fallback chain, followed as the gateway follows it), a prober asking each
provider itself, a stream of requests through the gateway with the `openai` client (no
retries: no failure is hidden), and the daemon's jobs as its journal tells them."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import openai
import yaml
from openai.types.chat import ChatCompletionUserMessageParam

from diversityd.adapters.gatewayclient import HEADER_API_BASE
from diversityd.catalog import Catalog, build_catalog
from diversityd.config import Config, load_config

# The route that says a server is up and serving, per server kind, else per provider type.
SERVER_ROUTES = {
    "llama-server": "/health",
    "llama-cpp-python": "/v1/models",
    "ollama": "/api/tags",
    "vllm": "/health",
}
TYPE_ROUTES = {"llama_cpp": "/v1/models", "ollama": "/api/tags", "vllm": "/health"}
PROMPT: list[ChatCompletionUserMessageParam] = [{"role": "user", "content": "Say something."}]

# ------------------------------------------------------------------------------ the chains


@dataclass(frozen=True)
class Chain:
    """A model with a fallback chain: every name a request for it may be answered by."""

    model: str
    members: tuple[str, ...]  # the model, then every name its chain reaches, in order
    providers: tuple[str, ...]  # every active provider serving one of the members


def walk_chain(model: str, chains: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """`model`, then its chain's names in order, each followed by its own chain (depth
    first, each name once): the gateway falls back through a fallback's own chain too."""
    seen: list[str] = [model]

    def visit(name: str) -> None:
        for target in chains.get(name, ()):
            if target not in seen:
                seen.append(target)
                visit(target)

    visit(model)
    return tuple(seen)


def chains_of(config: Config, catalog: Catalog) -> dict[str, Chain]:
    """Every served model whose fallback chain is not empty."""
    targets = {name: chain.targets for name, chain in config.chains.items()}
    result: dict[str, Chain] = {}
    for name, chain in config.chains.items():
        if not chain.targets or not catalog.is_served(name):
            continue
        members = walk_chain(name, targets)
        providers: list[str] = []
        for member in members:
            for deployment in catalog.active(member):
                if deployment.provider.name not in providers:
                    providers.append(deployment.provider.name)
        result[name] = Chain(name, members, tuple(providers))
    return result


def probe_urls(config: Config) -> dict[str, str]:
    """Each active local provider's health (or model list) URL."""
    urls: dict[str, str] = {}
    for name, provider in config.providers.items():
        owned = config.settings.owned.get(name)
        route = SERVER_ROUTES.get(owned.server) if owned else TYPE_ROUTES.get(provider.type)
        if provider.active and route is not None:
            urls[name] = provider.base_url.removesuffix("/v1") + route
    return urls


def read_chains(config_dir: Path) -> tuple[dict[str, Chain], dict[str, str]]:
    """The chains and the providers' probe URLs, from the configuration files."""
    config, findings = load_config(config_dir)
    if config is None:
        raise ValueError("; ".join(f.format() for f in findings))
    return chains_of(config, build_catalog(config)), probe_urls(config)


# ------------------------------------------------------------------------------ the prober


@dataclass(frozen=True)
class Probe:
    started: float  # time.monotonic()
    ended: float
    ok: bool


class Prober:
    """Asks each provider, each from a thread of its own, every `interval_s`: answered
    (HTTP 200 within `timeout_s`) or not. Nothing goes through the daemon."""

    def __init__(self, urls: Mapping[str, str], interval_s: float = 0.15, timeout_s: float = 1.0):
        self.urls = dict(urls)
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.probes: dict[str, list[Probe]] = {name: [] for name in self.urls}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(name,), daemon=True) for name in self.urls
        ]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 5)

    def _run(self, name: str) -> None:
        url, probes = self.urls[name], self.probes[name]
        with httpx.Client(
            timeout=self.timeout_s,
            limits=httpx.Limits(max_keepalive_connections=0),
            trust_env=False,
        ) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    ok = client.get(url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                probes.append(Probe(started, time.monotonic(), ok))
                self._stop.wait(max(0.0, started + self.interval_s - time.monotonic()))

    def serving_throughout(self, name: str, start: float, end: float) -> bool:
        """Every probe of `name` from the last one begun by `start` to the first one begun
        after `end` answered (so at least one probe always counts)."""
        probes = self.probes.get(name, [])
        starts = [p.started for p in probes]
        first = max(0, bisect.bisect_right(starts, start) - 1)
        last = bisect.bisect_left(starts, end)
        window = probes[first : last + 1]
        return bool(window) and all(p.ok for p in window)

    def down_spans(self, name: str) -> list[tuple[float, float]]:
        """(first failed probe's start, next answered probe's start) of each outage."""
        spans: list[tuple[float, float]] = []
        began: float | None = None
        probes = self.probes.get(name, [])
        for probe in probes:
            if not probe.ok and began is None:
                began = probe.started
            elif probe.ok and began is not None:
                spans.append((began, probe.started))
                began = None
        if began is not None:
            spans.append((began, probes[-1].ended))
        return spans


# ------------------------------------------------------------------------------ the requests


@dataclass(frozen=True)
class Request:
    model: str
    stream: bool
    started: float  # time.monotonic()
    ended: float
    ok: bool
    api_base: str | None  # who answered (LiteLLM's header)
    error: str | None = None

    @property
    def latency_ms(self) -> float:
        return (self.ended - self.started) * 1000


def openai_client(base_url: str, key: str, timeout_s: float) -> openai.OpenAI:
    """The client applications use, with no retries. `Connection: close`: a new connection
    per request, as a kept-alive one closed by a draining proxy says nothing about the
    gateway."""
    return openai.OpenAI(
        base_url=f"{base_url}/v1",
        api_key=key,
        max_retries=0,
        timeout=timeout_s,
        default_headers={"Connection": "close"},
    )


def send(client: openai.OpenAI, model: str, *, stream: bool, max_tokens: int = 8) -> Request:
    """One chat; ok when an answer with content came back whole."""
    started = time.monotonic()
    api_base: str | None = None
    content = ""
    try:
        if stream:
            with client.chat.completions.create(
                model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0, stream=True
            ) as chunks:
                api_base = chunks.response.headers.get(HEADER_API_BASE)
                finished = False
                for chunk in chunks:
                    for choice in chunk.choices:
                        content += choice.delta.content or ""
                        finished = finished or choice.finish_reason is not None
            error = None if finished else "the stream ended without a finish_reason"
        else:
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0
            )
            api_base = raw.headers.get(HEADER_API_BASE)
            completion = raw.parse()
            content = (completion.choices[0].message.content or "") if completion.choices else ""
            error = None
    except Exception as exc:  # noqa: BLE001 - whatever broke, the request failed
        error = f"{type(exc).__name__}: {exc}"
    if error is None and not content:
        error = "no content in the answer"
    ended = time.monotonic()
    return Request(model, stream, started, ended, error is None, api_base, error)


class ChatStream:
    """`workers` threads, each sending requests for `models` in turn, plain and streamed
    alternately, one after the other; every request is kept."""

    def __init__(
        self,
        base_url: str,
        key: str,
        models: Sequence[str],
        *,
        workers: int = 2,
        timeout_s: float = 60.0,
        pause_s: float = 0.05,
    ) -> None:
        self.base_url, self.key, self.models = base_url, key, list(models)
        self.timeout_s, self.pause_s = timeout_s, pause_s
        self.requests: list[Request] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(index,), daemon=True)
            for index in range(workers)
        ]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 10)

    def _run(self, index: int) -> None:
        client = openai_client(self.base_url, self.key, self.timeout_s)
        turn = index  # the workers start on different models
        with client:
            while not self._stop.is_set():
                model = self.models[turn % len(self.models)]
                stream = (turn // len(self.models) + index) % 2 == 0
                turn += 1
                self.requests.append(send(client, model, stream=stream))
                self._stop.wait(self.pause_s)


def served_routes(base_url: str, key: str, timeout_s: float = 10) -> set[tuple[str, str]]:
    """(model name, api_base) of each deployment the serving gateway instance loaded
    (LiteLLM's /model/info): what it routes to, whatever the daemon believes."""
    response = httpx.get(
        f"{base_url}/model/info",
        headers={"Authorization": f"Bearer {key}"},
        timeout=timeout_s,
        trust_env=False,
    )
    response.raise_for_status()
    return {
        (str(d["model_name"]), str((d.get("litellm_params") or {}).get("api_base")))
        for d in response.json()["data"]
    }


def planned_routes(config_text: str) -> set[tuple[str, str]]:
    """(model name, api_base) of each deployment in a rendered gateway config."""
    document = yaml.safe_load(config_text)
    return {
        (str(d["model_name"]), str((d.get("litellm_params") or {}).get("api_base")))
        for d in document.get("model_list") or []
    }


# ------------------------------------------------------------------------------ the verdicts


@dataclass(frozen=True)
class Verdict:
    request: Request
    live: tuple[str, ...]  # providers of its chain serving throughout it
    at_gateway_kill: bool  # in flight when the serving gateway instance was killed


def judge(
    requests: Iterable[Request],
    chains: Mapping[str, Chain],
    prober: Prober,
    gateway_kills: Sequence[float],
) -> list[Verdict]:
    """Each failed request, with the members of its chain that served all along."""
    verdicts: list[Verdict] = []
    for request in requests:
        if request.ok:
            continue
        chain = chains[request.model]
        live = tuple(
            p
            for p in chain.providers
            if prober.serving_throughout(p, request.started, request.ended)
        )
        killed = any(request.started <= at <= request.ended for at in gateway_kills)
        verdicts.append(Verdict(request, live, killed))
    return verdicts


def in_flight(requests: Iterable[Request], at: float) -> list[Request]:
    return [r for r in requests if r.started <= at <= r.ended]


# ------------------------------------------------------------------------------ the jobs


@dataclass
class Job:
    """One daemon job as its journal events tell it: a restart job (one or more providers,
    one at a time) or a start (at start-up, a revival, `diversityctl start`)."""

    kind: str  # "restart" or "start"
    name: str  # the restart job's id, or "start <provider> (<why>)"
    daemon_pid: str
    began: float  # CLOCK_MONOTONIC, seconds
    ended: float | None = None
    ok: bool | None = None
    interrupted: bool = False  # its daemon was killed before it ended
    steps: list[str] = field(default_factory=list)

    def duration_s(self, now: float) -> float:
        return (self.ended if self.ended is not None else now) - self.began


RESTART_EVENTS = ("unit.restarting", "unit.restarted", "unit.restart_failed")
START_EVENTS = ("unit.starting", "unit.started", "unit.start_failed")
JOB_EVENTS = RESTART_EVENTS + START_EVENTS


def monotonic_s(entry: Mapping[str, Any]) -> float:
    return int(entry["__MONOTONIC_TIMESTAMP"]) / 1e6


def jobs_from_journal(entries: Iterable[Mapping[str, Any]]) -> list[Job]:
    """Restart jobs grouped by their JOB id (first `unit.restarting` to last end), and each
    `unit.starting` paired with the next `unit.started`/`unit.start_failed` of the same
    provider from the same daemon process. Ends not logged leave `ended` None."""
    jobs: dict[tuple[str, str], Job] = {}
    starts: dict[tuple[str, str], Job] = {}
    done: list[Job] = []
    for entry in sorted(entries, key=monotonic_s):
        event, pid, at = entry.get("EVENT", ""), str(entry.get("_PID", "")), monotonic_s(entry)
        provider = str(entry.get("PROVIDER", ""))
        if event in RESTART_EVENTS:
            key = (pid, str(entry.get("JOB", "")))
            job = jobs.setdefault(key, Job("restart", key[1], pid, at))
            if event == "unit.restarting":
                job.ended = None
                continue
            job.ended = at
            ok = event == "unit.restarted"
            job.ok = ok if job.ok is None else job.ok and ok
            seconds = float(entry.get("ELAPSED_MS", 0)) / 1000
            job.steps.append(f"{provider} {'back' if ok else 'NOT back'} in {seconds:.1f} s")
        elif event in START_EVENTS:
            key = (pid, provider)
            if event == "unit.starting":
                why = entry.get("STATE", "")
                starts[key] = Job("start", f"start {provider} ({why})", pid, at)
            elif key in starts:
                job = starts.pop(key)
                job.ended, job.ok = at, event == "unit.started" and _no_error(entry)
                done.append(job)
    return sorted([*jobs.values(), *done, *starts.values()], key=lambda j: j.began)


def close_interrupted(jobs: Iterable[Job], daemon_pid: int, kills: Sequence[float]) -> None:
    """Jobs never ended by a daemon that is gone end when it was killed (the first kill
    after they began)."""
    for job in jobs:
        if job.ended is not None or job.daemon_pid == str(daemon_pid):
            continue
        after = [at for at in kills if at >= job.began]
        job.interrupted = True
        job.ended = min(after) if after else job.began


def _no_error(entry: Mapping[str, Any]) -> bool:
    return entry.get("ERROR") in (None, "", "None")  # a None field is written as "None"
