"""The active model link: resolve each configured GGUF path, watch every hop of its chain,
and when it is re-pointed, accept a whole new file (the units change and roll) or refuse a
bad one (the servers keep the model they run)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from diversityd.adapters.modellink import LinkWatcher, resolve
from diversityd.daemon.loop import StateLoop
from diversityd.daemon.store import Store
from diversityd.log import get_logger
from diversityd.reconcile import ModelTarget, TargetVerdict, judge_model_target

log = get_logger()

RefreshUnits = Callable[[str], Awaitable[tuple[list[str], str | None]]]


class ModelLinks:
    def __init__(self, loop: StateLoop, store: Store, *, refresh_units: RefreshUnits) -> None:
        self.loop = loop
        self.store = store
        self._refresh_units = refresh_units  # rollout's: plan, render, write, roll
        self.watcher = LinkWatcher(self._on_link_changed)

    def start(self, event_loop: asyncio.AbstractEventLoop) -> None:
        self.watcher.start(event_loop)

    def close(self) -> None:
        self.watcher.close()

    async def watch_all(self) -> None:
        """Resolve each model path (the model in force) and watch every hop of its chain."""
        for path, names in self.store.model_paths().items():
            target = await asyncio.to_thread(resolve, path)

            def adopt(t: ModelTarget = target, providers: list[str] = names) -> None:
                for name in providers:
                    self.store.records[name].model = t
                    self.store.records[name].model_error = t.error

            await self.loop.call(adopt)
            self.watcher.watch(target)
            if not target.ok:
                log.error("model.invalid", path=path, error=target.error)

    def _on_link_changed(self, path: str) -> None:
        self.loop.spawn(self._check(path))

    async def _check(self, path: str) -> None:
        """The link (or a hop, or the file) changed: accept a good new target and restart the
        servers one at a time; refuse a bad one and keep serving the old model."""
        names = self.store.model_paths().get(path, [])
        if not names:
            return
        target = await asyncio.to_thread(resolve, path)
        self.watcher.watch(target)  # a new chain may pass through new folders
        verdict = judge_model_target(self.store.records[names[0]].model, target)
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
        if verdict is TargetVerdict.KEEP:
            return
        # The units name the accepted file, so they change; the new model's size moves the
        # card's budget, so plan again first. Then the servers roll one at a time.
        _, job_id = await self._refresh_units("model link re-pointed")
        log.info(
            "model.changed",
            path=path,
            model=target.target,
            provider=",".join(names),
            job=job_id,
        )
