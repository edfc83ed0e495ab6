"""One LiteLLM proxy instance on the listening socket systemd passes (fd 3).

Run by `diversityd-gateway@.service` with the LiteLLM venv's interpreter, as a script
(`python .../gatewaylauncher.py --config X --control SOCKET`): standard library only at
import; LiteLLM, uvicorn, httpx and yaml (LiteLLM's own dependencies) are imported from that
venv, and gatewayruntime.py (beside this file: the control channel, routes in-process, the
answer for a name no server can serve) is loaded by path. It tells systemd `READY=1` once
uvicorn serves (after LiteLLM has loaded the config, the channel listens, and each name
served by a local server has answered one request in-process), so a start job ends exactly
when the new proxy can answer at full speed.
"""

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import socket
import sys
from types import ModuleType
from typing import Any, TextIO

OFFLINE_SWITCHES = (
    "LITELLM_LOCAL_MODEL_COST_MAP",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS",
    "LITELLM_LOCAL_BLOG_POSTS",
    "LITELLM_LOCAL_POLICY_TEMPLATES",
)
SYSTEMD_FIRST_FD = 3
# CSI sequences (colours, cursor moves): LiteLLM prints its banner and model list in green
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Proxy", "LiteLLM Router")
# A fresh LiteLLM spends ~1 s of CPU on its first requests (lazy imports, clients per
# deployment): paid here, before the socket is accepted from, not by a client's request.
WARM_UP_BUDGET_S = 6.0
WARM_UP_REQUEST_TIMEOUT_S = 3.0
# Clients drop an idle keep-alive connection after 5 s (httpx's default, the openai
# package's): the server keeps one longer, so the client always lets go first and never
# sends on a connection the server is closing.
KEEP_ALIVE_S = 75
# At a switch, idle connections stay open this long (past the clients' 5 s) before they
# are closed: a client that reuses one meanwhile is answered, with `Connection: close`.
IDLE_GRACE_S = 6.0
UNAVAILABLE_MARK = "diversityd_unavailable"  # model_info: answered here, not by a server
JUDGED_MARK = "diversityd_judged"  # model_info: a local server doing its own inference
RUNTIME_FILE = "gatewayruntime.py"


class PlainText:
    """A text stream that drops ANSI escapes: the journal shows them as `[32m` noise."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(ANSI_ESCAPE.sub("", text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def one_line_failures(debug: bool) -> None:
    """LiteLLM logs a traceback with each failed call to a deployment: one per request while
    a server is down or cooling down, and the router's list of deployments in cooldown. The
    message already names the error; the rest is kept for debug level (LITELLM_LOG=DEBUG)."""
    if debug:
        return
    make_record = logging.getLogRecordFactory()

    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        made = make_record(*args, **kwargs)
        if made.name.split(".")[0] in LITELLM_LOGGERS and made.levelno < logging.CRITICAL:
            made.exc_info, made.exc_text = None, None
            if isinstance(made.msg, str):
                for tail in ("Traceback (most recent call last)", "\nDebug Information:"):
                    made.msg = made.msg.split(tail)[0].rstrip()
        return made

    logging.setLogRecordFactory(record)


def notify(*fields: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto("\n".join(fields).encode(), address)


class KeyFileError(ValueError):
    """The key file holds no usable key (says which file; never its contents)."""


def key_file_is_environment(path: str) -> bool:
    """Whether the file is in `LITELLM_MASTER_KEY=...` form (systemd's EnvironmentFile=
    reads it as it is); a bare key is read by this launcher alone."""
    try:
        with open(path, encoding="utf-8") as handle:
            return any(
                line.strip().removeprefix("export ").startswith("LITELLM_MASTER_KEY=")
                for line in handle
            )
    except OSError:
        return False


FLEET_KEY_NAME = "DIVERSITYD_FLEET_KEY"


def read_master_key(path: str) -> str:
    """A key file holds `LITELLM_MASTER_KEY=sk-...` or the bare key (what diversityd
    writes, an adopted file); either way the value never leaves this process's
    environment."""
    return read_key(path, "LITELLM_MASTER_KEY")


def read_key(path: str, variable: str) -> str:
    """The key in a file: the bare key, or `VARIABLE=key`."""
    with open(path, encoding="utf-8") as handle:
        for raw in handle:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if "=" in line:
                name, _, value = line.partition("=")
                if name.strip().removeprefix("export ").strip() == variable:
                    return value.strip().strip("'\"")
                continue
            return line
    raise KeyFileError(f"{path}: no key in the file (write the key, or {variable}=..., in it)")


def listening_fd() -> int:
    ours = os.environ.get("LISTEN_PID") == str(os.getpid())
    if not ours or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        raise SystemExit(
            "no listening socket from systemd (LISTEN_FDS); start this through "
            "diversityd-gateway.socket"
        )
    return SYSTEMD_FIRST_FD


def read_document(config_path: str) -> dict[str, Any]:
    """The config this process starts on (empty if it cannot be read: LiteLLM says why)."""
    try:
        import yaml  # LiteLLM's own dependency

        with open(config_path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle) or {}
    except Exception:  # noqa: BLE001 - no warm-up is better than no gateway
        return {}
    return document if isinstance(document, dict) else {}


def models_to_warm(document: dict[str, Any]) -> list[str]:
    """The names every deployment of which is a local server doing its own inference: a
    warm-up must never spend a request on a cloud (or a local server relaying one), nor ask
    the names answered here for want of a server."""
    verdicts: dict[str, bool] = {}
    for entry in document.get("model_list") or []:
        if not isinstance(entry, dict):
            continue
        info = entry.get("model_info")
        info = info if isinstance(info, dict) else {}
        name = str(entry.get("model_name", ""))
        local = bool(info.get(JUDGED_MARK)) and not info.get(UNAVAILABLE_MARK)
        if name:
            verdicts[name] = verdicts.get(name, True) and local
    return [name for name, local in verdicts.items() if local]


def load_runtime() -> ModuleType:
    """gatewayruntime.py, beside this file, under a name of its own (this folder is not on
    sys.path: its modules would shadow LiteLLM's)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), RUNTIME_FILE)
    spec = importlib.util.spec_from_file_location("diversityd_gatewayruntime", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def launcher_sha() -> str:
    """What code this process runs besides LiteLLM: a change means a new process."""
    return code_sha(os.path.dirname(os.path.abspath(__file__)))


def code_sha(folder: str) -> str:
    digest = hashlib.sha256()
    for name in (os.path.basename(__file__), RUNTIME_FILE):
        with open(os.path.join(folder, name), "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()


async def warm_up(app: Any, key: str, models: list[str], budget_s: float = WARM_UP_BUDGET_S) -> str:
    """One plain and one streamed one-token completion per local model, sent in-process to
    the app (no socket), all at once, bounded, with fallbacks off (a failing local server
    must not pass the request on to a cloud). They reach the servers: LiteLLM's own
    `mock_response` is dropped by the proxy, and a warm-up inside the router alone still
    left 0.6 s on the first request. Measured on LiteLLM 1.106: a fresh instance's first
    request took 1.0-1.2 s cold, 25-35 ms after this."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://warm-up",
        headers=headers,
        timeout=WARM_UP_REQUEST_TIMEOUT_S,
    ) as client:

        async def complete(model: str, stream: bool) -> bool:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1,
                "stream": stream,
                "disable_fallbacks": True,
            }
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
                    await answer.aread()
                    return answer.status_code == 200
            except (httpx.HTTPError, OSError):
                return False

        async def every_model() -> list[bool]:
            await client.get("/v1/models")
            return list(
                await asyncio.gather(
                    *(complete(m, stream) for m in models for stream in (False, True))
                )
            )

        try:  # wait_for, not asyncio.timeout: an adopted LiteLLM may run on Python 3.10
            answered = await asyncio.wait_for(every_model(), budget_s)
        except (asyncio.TimeoutError, httpx.HTTPError, OSError, ValueError):  # noqa: UP041
            return "warm-up cut short"
    return f"warmed {sum(answered)}/{len(answered)} requests"


class WarmServer:
    """uvicorn's Server, with the control channel and a warm-up between LiteLLM's startup
    and the first accept."""

    @staticmethod
    def make(
        config: Any, models: list[str], runtime_module: Any, runtime: Any, control: str | None
    ) -> Any:
        import uvicorn

        class Server(uvicorn.Server):  # type: ignore[misc]
            async def startup(self, sockets: Any = None) -> None:
                started = self.lifespan.startup

                async def started_then_warm() -> None:
                    await started()
                    if self.lifespan.should_exit:
                        return
                    import litellm

                    litellm.callbacks.append(runtime_module.in_flight_hook(runtime.inflight))
                    if control:
                        # On uvicorn's own loop: the router changes between requests.
                        await runtime.serve(control)
                    key = os.environ.get("LITELLM_MASTER_KEY", "")
                    outcome = await warm_up(self.config.loaded_app, key, models)
                    print(f"gateway {outcome}", file=sys.stderr, flush=True)

                self.lifespan.startup = started_then_warm
                await super().startup(sockets)

            async def shutdown(self, sockets: Any = None) -> None:
                runtime.stopping = True
                for server in self.servers:
                    server.close()  # our copy of the shared socket: the new process accepts
                deadline = asyncio.get_running_loop().time() + IDLE_GRACE_S
                while (  # noqa: ASYNC110 - uvicorn's connection set has no event; polled as uvicorn does
                    self.server_state.connections and asyncio.get_running_loop().time() < deadline
                ):
                    await asyncio.sleep(0.1)
                await super().shutdown(sockets)

        return Server(config)


async def serve(server: "object", announce: str) -> None:
    import uvicorn

    assert isinstance(server, uvicorn.Server)
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        if serving.done():
            await serving  # startup failed: surface uvicorn's exit
            return
        await asyncio.sleep(0.05)
    notify("READY=1", f"STATUS={announce}")
    await serving
    notify("STOPPING=1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="the LiteLLM config this instance serves")
    parser.add_argument("--key-file", help="file holding the master key")
    parser.add_argument("--graceful-s", type=float, default=120.0, help="drain time on SIGTERM")
    parser.add_argument("--control", help="unix socket for diversityd's control channel")
    parser.add_argument("--fleet-key-file", help="the fleet's shared key (peers' requests)")
    args = parser.parse_args()
    sys.stdout = PlainText(sys.stdout)
    sys.stderr = PlainText(sys.stderr)
    os.environ.setdefault("NO_COLOR", "1")
    one_line_failures(debug=os.environ.get("LITELLM_LOG", "").upper() == "DEBUG")
    # Run as a script, this file's folder (the diversityd package) comes first on sys.path,
    # and its modules (config, gateway, state, ...) could shadow LiteLLM's own imports.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    if not os.environ.get("LITELLM_MASTER_KEY"):
        if not args.key_file:
            raise SystemExit("no master key: give --key-file or set LITELLM_MASTER_KEY")
        try:
            os.environ["LITELLM_MASTER_KEY"] = read_master_key(args.key_file)
        except (KeyFileError, OSError) as exc:
            raise SystemExit(str(exc)) from None
    for switch in OFFLINE_SWITCHES:
        os.environ.setdefault(switch, "True")
    os.environ["CONFIG_FILE_PATH"] = args.config
    fd = listening_fd()

    import uvicorn
    from litellm.proxy.proxy_server import app

    document = read_document(args.config)
    runtime_module = load_runtime()
    runtime_module.guard_truncated_streams()
    runtime = runtime_module.Runtime(document, launcher_sha=launcher_sha(), config=args.config)
    master = os.environ["LITELLM_MASTER_KEY"]
    answered = runtime_module.UnavailableAnswer(app, runtime, master)
    if args.fleet_key_file:
        # a peer's gateway asks with it; ours send it to the peers (os.environ/..., resolved)
        try:
            os.environ["DIVERSITYD_FLEET_KEY"] = read_key(args.fleet_key_file, FLEET_KEY_NAME)
        except (KeyFileError, OSError) as exc:
            raise SystemExit(str(exc)) from None
        answered = runtime_module.PeerRequests(
            answered, runtime, os.environ["DIVERSITYD_FLEET_KEY"], master
        )
    counted = runtime_module.CountInFlight(answered, runtime.inflight)
    config = uvicorn.Config(
        runtime_module.CloseWhenStopping(counted, runtime),
        timeout_keep_alive=KEEP_ALIVE_S,
        fd=fd,
        timeout_graceful_shutdown=int(args.graceful_s),
        log_level="warning",
        access_log=False,
    )
    asyncio.run(
        serve(
            WarmServer.make(
                config, models_to_warm(document), runtime_module, runtime, args.control
            ),
            f"serving {os.path.basename(args.config)}",
        )
    )


if __name__ == "__main__":
    main()
