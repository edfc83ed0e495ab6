"""The active model link: resolve each configured GGUF path, watch every hop of its chain,
and when it is re-pointed, accept a whole new file (the units change and roll) or refuse a
bad one (the servers keep the model they run).

A server moves only to a target that was checked and accepted, across daemon restarts and
reloads too: when the link is bad at such a time, the target accepted before stays (from
the state file, else read back from the unit file the server runs)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from diversityd.adapters.files import read_text_or_none
from diversityd.adapters.modellink import LinkWatcher, resolve
from diversityd.daemon.loop import StateLoop
from diversityd.daemon.store import Store
from diversityd.log import get_logger
from diversityd.reconcile import (
    ModelTarget,
    TargetVerdict,
    choose_accepted,
    judge_model_target,
    rewritten_in_place,
)
from diversityd.units import model_file_of

log = get_logger()

RefreshUnits = Callable[[str], Awaitable[tuple[list[str], str | None]]]
Hold = Callable[[list[str], str], Awaitable[None]]
Release = Callable[[list[str]], Awaitable[None]]


class ModelLinks:
    def __init__(
        self,
        loop: StateLoop,
        store: Store,
        unit_dir: Path,
        *,
        refresh_units: RefreshUnits,
        hold: Hold,
        release: Release,
    ) -> None:
        self.loop = loop
        self.store = store
        self.unit_dir = unit_dir
        self._refresh_units = refresh_units  # rollout's: plan, render, write, roll
        self._hold = hold  # the starter's: keep servers stopped while their file is rewritten
        self._release = release
        self.watcher = LinkWatcher(self._on_link_changed)
        # One check of a path at a time, each resolving afresh once it holds the lock: two
        # re-points in quick succession can never be applied out of order (A after B).
        self._checking: dict[str, asyncio.Lock] = {}

    def start(self, event_loop: asyncio.AbstractEventLoop) -> None:
        self.watcher.start(event_loop)

    def close(self) -> None:
        self.watcher.close()

    async def watch_all(self, remembered: Mapping[str, ModelTarget] | None = None) -> None:
        """Resolve each model path and watch every hop of its chain. At start `remembered`
        holds the targets accepted before (the state file); on a reload, the ones in force."""
        for path, names in self.store.model_paths().items():
            seen = await asyncio.to_thread(resolve, path)
            before = (remembered or {}).get(path) or self.store.records[names[0]].model
            if before is None and not seen.ok:
                before = await asyncio.to_thread(self._from_unit_file, path, names[0])
            accepted = choose_accepted(seen, before)

            def adopt(
                providers: list[str] = names,
                model: ModelTarget | None = accepted,
                error: str | None = seen.error,
                whole: bool = seen.ok,
            ) -> list[str]:
                released = []
                for name in providers:
                    record = self.store.records[name]
                    record.model, record.model_error = model, error
                    if whole and record.held is not None:
                        record.held = None  # held by an earlier daemon: whole again now
                        released.append(name)
                return released

            released = await self.loop.call(adopt)
            if released:
                log.info("unit.released", provider=",".join(released))
            self.watcher.watch(seen)
            if rewritten_in_place(before, seen):
                # still (or again) being rewritten, as the daemon starts or reloads
                await self._hold(names, _rewritten(seen))
            if not seen.ok:
                kept = accepted.target if accepted else None
                log.error("model.invalid", path=path, model=kept, error=seen.error)

    def _from_unit_file(self, path: str, provider: str) -> ModelTarget | None:
        """(In a worker thread.) The GGUF the provider's unit file names, if it is whole:
        what its server runs, when no record of the accepted target survived."""
        unit = self.store.records[provider].unit
        text = read_text_or_none(self.unit_dir / unit) if unit else None
        file = model_file_of(text) if text else None
        if file is None or file == path:
            return None
        found = resolve(file)
        return dataclasses.replace(found, path=path) if found.ok else None

    def _on_link_changed(self, path: str) -> None:
        self.loop.spawn(self._check(path))

    async def _check(self, path: str) -> None:
        async with self._checking.setdefault(path, asyncio.Lock()):
            await self._check_now(path)

    async def _check_now(self, path: str) -> None:
        """The link (or a hop, or the file) changed: accept a good new target and restart the
        servers one at a time; refuse a bad one and keep serving the old model."""
        names = self.store.model_paths().get(path, [])
        if not names:
            return
        target = await asyncio.to_thread(resolve, path)
        self.watcher.watch(target)  # a new chain may pass through new folders
        accepted = self.store.records[names[0]].model
        verdict = judge_model_target(accepted, target)
        if rewritten_in_place(accepted, target):
            await self._hold(names, _rewritten(target))
        if verdict is TargetVerdict.REFUSE:

            def refuse(error: str | None = target.error) -> None:
                for name in names:
                    self.store.records[name].model_error = error

            await self.loop.call(refuse)
            log.error(
                "model.rejected",
                path=path,
                model=target.target,
                provider=",".join(names),
                error=f"{target.error}; the servers keep the model they run",
            )
            return

        def accept() -> None:
            for name in names:
                self.store.records[name].model = target
                self.store.records[name].model_error = None

        await self.loop.call(accept)
        held = [n for n in names if self.store.records[n].held is not None]
        if verdict is TargetVerdict.KEEP:
            await self._release(held)
            return
        # The units name the accepted file, so they change; the new model's size moves the
        # card's budget, so plan again first. Then the servers roll one at a time (the
        # state file keeps the accepted target and the pending restarts first).
        _, job_id = await self._refresh_units("model link re-pointed")
        await self._release(held)
        log.info(
            "model.changed",
            path=path,
            model=target.target,
            provider=",".join(names),
            job=job_id,
        )


def _rewritten(target: ModelTarget) -> str:
    return (
        f"{target.target} is being rewritten in place; the servers stay stopped until it is "
        "whole again (re-point the link instead of overwriting)"
    )
