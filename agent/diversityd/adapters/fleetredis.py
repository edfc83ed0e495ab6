"""The fleet's records in the user's Redis (the `redis` package's asyncio client): this
host's record, refreshed before Redis expires it, and the peers' records, read whole after
a (re)connect and again the moment a peer says on the channel that its record changed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from diversityd.fleet import (
    HostRecord,
    changes_channel,
    parse_record,
    record_key,
    record_pattern,
    redacted,
)

CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 2.0


class FleetRedisError(RuntimeError):
    """Redis could not be reached or answered an error (says which, never the password)."""


class FleetRedis:
    def __init__(self, url: str, *, password: str | None, prefix: str, name: str) -> None:
        self.url = redacted(url)
        self.prefix, self.name = prefix, name
        self.client = aioredis.from_url(
            url,
            password=password,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=COMMAND_TIMEOUT_S,
            decode_responses=False,
        )

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()

    async def publish(self, record: HostRecord, ttl_s: float, *, announce: bool) -> None:
        """This host's record, which Redis drops after `ttl_s` unless refreshed; with
        `announce`, peers are told at once."""
        try:
            await self.client.set(record_key(self.prefix, self.name), record.to_json(),
                                  px=int(ttl_s * 1000))  # fmt: skip
            if announce:
                await self.client.publish(changes_channel(self.prefix), self.name)
        except (RedisError, OSError) as exc:
            raise FleetRedisError(f"{self.url}: {type(exc).__name__}: {exc}") from exc

    async def read_all(self) -> dict[str, HostRecord]:
        """Every record in Redis now (a peer whose record expired is not among them)."""
        try:
            keys = [key async for key in self.client.scan_iter(record_pattern(self.prefix))]
            values = await self.client.mget(keys) if keys else []
        except (RedisError, OSError) as exc:
            raise FleetRedisError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        records = {}
        for value in values:
            record = parse_record(value)
            if record is not None:
                records[record.host] = record
        return records

    async def listen(self, on_change: Callable[[str], None]) -> None:
        """Calls `on_change(host)` for every change a peer announces, until the connection
        is lost (then FleetRedisError)."""
        pubsub = self.client.pubsub()
        try:
            await pubsub.subscribe(changes_channel(self.prefix))
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                if message is not None and message.get("type") == "message":
                    data = message.get("data")
                    host = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
                    on_change(host)
                await asyncio.sleep(0)
        except (RedisError, OSError) as exc:
            raise FleetRedisError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
