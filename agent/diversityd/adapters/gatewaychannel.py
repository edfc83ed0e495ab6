"""The daemon's end of a gateway instance's control channel (gatewayruntime.py serves it):
what runs there, and new routes for it."""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from typing import Any

from diversityd.adapters import gatewaylauncher
from diversityd.adapters.gatewayruntime import ChannelError, call, routes_digest
from diversityd.gatewaysync import InstanceView

HELLO_TIMEOUT_S = 2.0
ROUTES_TIMEOUT_S = 5.0

__all__ = [
    "ChannelError",
    "hello",
    "in_flight",
    "installed_litellm",
    "launcher_sha",
    "push_routes",
    "routes_digest",
]


async def hello(color: str, path: str, timeout_s: float = HELLO_TIMEOUT_S) -> InstanceView:
    try:
        answer = await call(path, {"op": "hello"}, timeout_s)
    except ChannelError as exc:
        return InstanceView(color, answered=False, error=str(exc))
    document = answer.get("started_document")
    return InstanceView(
        color,
        answered=True,
        started_document=document if isinstance(document, dict) else {},
        launcher_sha=str(answer.get("launcher_sha")),
        litellm=str(answer.get("litellm")),
        routes_digest=str(answer.get("routes_digest")),
        pid=int(answer["pid"]) if isinstance(answer.get("pid"), int) else None,
    )


async def push_routes(
    path: str, routes: Mapping[str, Any], timeout_s: float = ROUTES_TIMEOUT_S
) -> dict[str, Any]:
    """The instance serves exactly these routes when this returns (ChannelError if not)."""
    return await call(path, {"op": "routes", "routes": dict(routes)}, timeout_s)


async def in_flight(path: str, timeout_s: float = 0.5) -> dict[str, int]:
    """Requests in flight per provider in one instance."""
    answer = await call(path, {"op": "inflight"}, timeout_s)
    return {str(k): int(v) for k, v in (answer.get("providers") or {}).items()}


def launcher_sha() -> str:
    """The launcher code on disk now (a running instance reports the code it started with)."""
    return gatewaylauncher.code_sha(os.path.dirname(os.path.abspath(gatewaylauncher.__file__)))


def installed_litellm(python: str) -> str | None:
    """The LiteLLM version installed beside `python` (a venv's bin/python), from its
    dist-info folder; None when it cannot be told (then it is not compared)."""
    venv = os.path.dirname(os.path.dirname(python))
    found = sorted(
        glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "litellm-*.dist-info"))
    )
    if len(found) != 1:
        return None
    return os.path.basename(found[0]).removeprefix("litellm-").removesuffix(".dist-info")
