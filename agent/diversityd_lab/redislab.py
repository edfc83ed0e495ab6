"""The lab's Redis: Debian's `/usr/bin/redis-server`, run by the lab in a namespace of its own.

The package's system Redis is never used (packaging/install-system-deps.sh keeps it from
starting): this one has its own config and folder, no persistence (nothing survives a kill,
so a restart is a fresh, empty Redis), and dies with the thread that started it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from diversityd.errors import DiversitydError
from diversityd_lab.netns import enter_preexec, run_in

REDIS_SERVER = Path("/usr/bin/redis-server")
REDIS_CLI = Path("/usr/bin/redis-cli")
REDIS_PORT = 6379


class RedisError(DiversitydError):
    """The lab's Redis could not be started or stopped."""


def redis_config(folder: Path, port: int) -> str:
    return "\n".join(
        [
            f"port {port}",
            "bind 0.0.0.0",  # one address per host link: every host reaches it on its own
            "protected-mode no",  # no password in the lab; reachable only inside the namespaces
            "daemonize no",
            'save ""',
            "appendonly no",
            f"dir {folder}",
            f"logfile {folder / 'redis.log'}",
            "",
        ]
    )


def ping(namespace: str, address: str, port: int = REDIS_PORT, timeout_s: float = 3.0) -> str:
    """`redis-cli PING` from inside `namespace`: "PONG", or what went wrong."""
    result = run_in(
        namespace,
        [str(REDIS_CLI), "-h", address, "-p", str(port), "PING"],
        timeout=timeout_s,
    )
    return (result.stdout.strip() or result.stderr.strip()) or f"exit {result.returncode}"


class RedisServer:
    """One redis-server in `namespace`; `start()` returns when it answers PING."""

    def __init__(self, folder: Path, namespace: str, port: int = REDIS_PORT) -> None:
        self.folder = folder
        self.namespace = namespace
        self.port = port
        self.config_path = folder / "redis.conf"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self, timeout_s: float = 10.0) -> None:
        if self.pid is not None:
            raise RedisError(f"redis-server already runs (pid {self.pid})")
        if not REDIS_SERVER.exists():
            raise RedisError(
                f"{REDIS_SERVER} is missing", hint="packaging/install-system-deps.sh installs it"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(redis_config(self.folder, self.port))
        with (self.folder / "redis.stdout").open("ab") as log:
            self._process = subprocess.Popen(
                [str(REDIS_SERVER), str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=enter_preexec(self.namespace, pdeathsig=True),  # noqa: PLW1509
            )
        deadline = time.monotonic() + timeout_s
        while (answer := ping(self.namespace, "127.0.0.1", self.port)) != "PONG":
            code = self._process.poll()
            if code is not None or time.monotonic() > deadline:
                self.kill()
                raise RedisError(
                    "redis-server "
                    + (f"exited with status {code}" if code is not None else "did not answer")
                    + f": {answer}",
                    hint=f"see {self.folder / 'redis.log'}",
                )
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, no goodbye to clients."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        process.wait()
        self._process = None
