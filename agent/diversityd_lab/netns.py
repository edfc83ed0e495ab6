"""Network namespaces and veth links for the lab's hosts, through iproute2's `ip`.

The facts this rests on (tests/integration/test_fleet_lab.py proves each):

- A process enters a namespace with `setns(fd, CLONE_NEWNET)` between fork and exec
  (`enter_preexec`). Not `ip netns exec`: that also makes a mount namespace and remounts
  `/sys`, which hides the cgroup mounts the private manager joins and writes.
- `lo` starts down in a new namespace: `add_namespace` brings it up.
- Links are made straight inside their two namespaces (`ip link add ... netns A type veth
  peer ... netns B`), so they never appear in the machine's own namespace and deleting a
  namespace deletes its ends of them.
- No nft or iptables here: a link is cut by taking its interfaces down (the connected route
  goes with them, so a connect fails at once with "Network is unreachable").

Names carry the owner's PID (`<prefix>-<pid>-<hex>-<node>`) so `sweep_stale_namespaces` tells a
crashed run's leftovers from a parallel run's live ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from diversityd.errors import DiversitydError

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 15  # the longest interface name the kernel takes
PR_SET_PDEATHSIG = 1


class NetnsError(DiversitydError):
    """A namespace or link could not be made, changed or removed."""

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (fix: {self.hint})" if self.hint else text


def run_ip(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    """Every `ip` command of the lab goes through here: captured, text, bounded."""
    try:
        result = subprocess.run(
            ["ip", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise NetnsError("`ip` is missing", hint="apt-get install iproute2") from exc
    if check and result.returncode != 0:
        raise NetnsError(
            f"`ip {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}",
            hint="the lab needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)",
        )
    return result


# ----------------------------------------------------------------------------- namespaces


def list_namespaces() -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(path.name for path in NETNS_DIR.iterdir())


def add_namespace(name: str) -> None:
    """A new network namespace `name`, with `lo` up (it starts down)."""
    run_ip("netns", "add", name)
    run_ip("-n", name, "link", "set", "lo", "up")


def namespace_pids(name: str) -> list[int]:
    result = run_ip("netns", "pids", name, check=False)
    return [int(pid) for pid in result.stdout.split()]


def delete_namespace(name: str, timeout_s: float = 5.0) -> None:
    """SIGKILLs whatever still runs in `name`, then deletes it (and so its links' ends)."""
    if name not in list_namespaces():
        return
    deadline = time.monotonic() + timeout_s
    while pids := namespace_pids(name):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise NetnsError(
                f"processes {pids} still run in namespace {name} after SIGKILL",
                hint="a process in uninterruptible sleep (D state)? or a frozen cgroup: thaw it",
            )
        time.sleep(0.02)
    run_ip("netns", "delete", name)


def sweep_stale_namespaces(prefix: str) -> list[str]:
    """Deletes namespaces `<prefix>-<pid>-...` whose owner process is gone; returns them."""
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)-[0-9a-f]+-\S+")
    removed = []
    for name in list_namespaces():
        found = pattern.fullmatch(name)
        if found is None or _pid_alive(int(found.group(1))):
            continue
        delete_namespace(name)
        removed.append(f"netns {name}")
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- links


def add_link(
    first: tuple[str, str, str], second: tuple[str, str, str], prefix_len: int = 30
) -> None:
    """A veth pair between two namespaces, each end `(namespace, interface, address)`, up."""
    (ns_a, if_a, addr_a), (ns_b, if_b, addr_b) = first, second
    for ifname in (if_a, if_b):
        if len(ifname) > IFNAMSIZ:
            raise NetnsError(f"interface name {ifname!r} is longer than {IFNAMSIZ} characters")
    run_ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
    for namespace, ifname, address in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
        run_ip("-n", namespace, "address", "add", f"{address}/{prefix_len}", "dev", ifname)
        run_ip("-n", namespace, "link", "set", ifname, "up")


def set_link_up(namespace: str, ifname: str, up: bool) -> None:
    run_ip("-n", namespace, "link", "set", ifname, "up" if up else "down")


def link_state(namespace: str, ifname: str) -> str:
    """The interface's operational state as the kernel says it: UP, DOWN, LOWERLAYERDOWN..."""
    result = run_ip("-j", "-n", namespace, "link", "show", "dev", ifname)
    (entry,) = json.loads(result.stdout)
    return str(entry["operstate"])


def wait_link_state(namespace: str, ifname: str, wanted: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (state := link_state(namespace, ifname)) != wanted:
        if time.monotonic() > deadline:
            raise NetnsError(
                f"{ifname} in {namespace} is {state}, not {wanted}, after {timeout_s} s"
            )
        time.sleep(0.02)


# ----------------------------------------------------------------------------- entering


def enter_preexec(
    namespace: str, *, then: Callable[[], None] | None = None, pdeathsig: bool = False
) -> Callable[[], None]:
    """What a child does between fork and exec to run in `namespace` (setns; then `then`).

    The libc functions are looked up here, in the parent; the child only makes syscalls.
    With `pdeathsig`, the child gets SIGTERM when the forking thread ends.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    path = str(NETNS_DIR / namespace)

    def preexec() -> None:
        if pdeathsig:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                number = ctypes.get_errno()
                raise OSError(number, f"setns({path}): {os.strerror(number)}")
        finally:
            os.close(fd)
        if then is not None:
            then()

    return preexec


def run_in(
    namespace: str,
    args: list[str],
    *,
    timeout: float = 30,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`args` run inside `namespace` (setns, no new mount namespace): captured, text, bounded.

    A timeout is returned as exit status 124, as timeout(1) does, rather than raised: for
    the lab a command that hangs is an observation.
    """
    try:
        return subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env),
            preexec_fn=enter_preexec(namespace),  # setns must happen between fork and exec
        )
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(
            args, 124, _text(exc.stdout), _text(exc.stderr) + f"timed out after {timeout:g} s"
        )


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def spawn_in(namespace: str, args: list[str]) -> subprocess.Popen[str]:
    """`args` started inside `namespace`, its stdout a pipe of text lines (a client that
    runs while a test or benchmark watches)."""
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        preexec_fn=enter_preexec(namespace),  # noqa: PLW1509 - setns between fork and exec
    )
