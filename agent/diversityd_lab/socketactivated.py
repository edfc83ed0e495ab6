"""A process started with a listening socket as systemd passes one (fd 3, LISTEN_FDS=1,
LISTEN_PID its own pid), outside any manager: the gateway launcher in a test or a
benchmark that needs the process alone, not a whole stack. (`systemd-socket-activate`
would wait for the first connection before it starts the process, and clears the
environment.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

# Runs in the child: put the socket on fd 3, say it is ours, become the real command (the
# pid stays, so LISTEN_PID holds).
_EXEC_WITH_FD3 = (
    "import os, sys; fd = int(sys.argv[1]); "
    "fd == 3 or (os.dup2(fd, 3), os.close(fd)); os.set_inheritable(3, True); "
    "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def listening_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    listener = socket.create_server((host, port), backlog=128)
    listener.setblocking(False)
    return listener


def spawn_socket_activated(
    argv: Sequence[str],
    listener: socket.socket,
    *,
    env: Mapping[str, str],
    log: Path,
) -> subprocess.Popen[bytes]:
    """`argv` (argv[0] a path) with `listener` as its fd 3; output to `log`."""
    fd = listener.fileno()
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", _EXEC_WITH_FD3, str(fd), *argv],
            env=dict(env),
            pass_fds=(fd,),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def process_alive(process: subprocess.Popen[bytes]) -> bool:
    return process.poll() is None and os.path.exists(f"/proc/{process.pid}")
