"""A private `systemd --user` manager, with its session bus and a journald.

Integration tests and the demo (on a host without a usable user manager) run diversityd
against a real manager started here as an ordinary child process. The facts this rests on
are in shared/recipes/private-systemd.md; the ones that shape the code:

- The manager must never start in the root cgroup: it would adopt the whole machine's tree.
  Its child joins `<unique>.slice/manager.slice` in every hierarchy systemd tracks processes
  in, before exec. Every folder above the manager ends in `.slice` so that journald sets
  `_SYSTEMD_UNIT` for its units.
- `/run/systemd/system` must exist (machine-wide; created, never removed).
- journald is machine-wide too. When none answers one is started by hand and shared by every
  private manager on the machine through leases (files under `/run/diversityd-private-manager`,
  one per holder process); the last holder to leave stops it and deletes what it left.
- A crashed run leaves empty slices, temp folders and perhaps a journald without holders:
  `sweep_stale()` removes them. Names carry the owner's PID (`<prefix>-<pid>-<hex>`) so a
  leftover is told from a parallel run's live one.
- With `netns`, the manager (and so every unit) runs in that network namespace: its child
  enters it with setns before exec (diversityd_lab.netns). Its READY=1 comes on a path
  socket: an abstract one belongs to one network namespace and would never hear it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from diversityd.errors import DiversitydError
from diversityd_lab.netns import enter_preexec

SYSTEMD_BINARY = Path("/usr/lib/systemd/systemd")
JOURNALD_BINARY = Path("/usr/lib/systemd/systemd-journald")
VENDOR_USER_UNIT_DIR = "/usr/lib/systemd/user"
BOOTED_MARKER = Path("/run/systemd/system")
JOURNAL_RUN_DIR = Path("/run/systemd/journal")
JOURNAL_SOCKET = JOURNAL_RUN_DIR / "socket"
JOURNAL_STDOUT = JOURNAL_RUN_DIR / "stdout"
VOLATILE_JOURNAL_DIR = Path("/run/log/journal")
CGROUP_ROOT = Path("/sys/fs/cgroup")
LEASE_DIR = Path("/run/diversityd-private-manager")
TEMP_DIR = Path("/tmp")  # noqa: S108  short on purpose: socket paths are limited to 107 bytes
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MANAGER_SLICE = "manager.slice"

# The runtime dir holds the manager's sockets ($XDG_RUNTIME_DIR/systemd/private, bus, units'
# sockets under it); sun_path is 108 bytes, so longer roots get a short one under /tmp.
MAX_RUNTIME_DIR_LEN = 64
PR_SET_PDEATHSIG = 1
NAME_PATTERN = re.compile(r"[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*")
LIVE_STATES = frozenset(
    {"initializing", "starting", "running", "degraded", "maintenance", "stopping"}
)


class PrivateManagerError(DiversitydError):
    """The private manager could not be started, queried or stopped."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        result: subprocess.CompletedProcess[str] | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.result = result

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (fix: {self.hint})" if self.hint else text


class PrivateManagerUnavailable(PrivateManagerError):  # noqa: N818  reads as a state, like the rest
    """This host cannot run a private manager at all (not a bug: tests skip on it)."""


def run_command(
    args: list[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    check: bool,
) -> subprocess.CompletedProcess[str]:
    """Every client command of this module goes through here: captured, text, bounded."""
    try:
        result = subprocess.run(
            args,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise PrivateManagerError(
            f"`{' '.join(args)}` did not finish within {timeout:g} s",
            hint="is the private manager still running? see its manager.log",
        ) from exc
    if check and result.returncode != 0:
        raise PrivateManagerError(
            f"`{' '.join(args)}` failed with exit status {result.returncode}: "
            f"{result.stderr.strip() or result.stdout.strip()}",
            result=result,
        )
    return result


# ----------------------------------------------------------------------------- processes


def read_start_time(pid: int) -> int | None:
    """The kernel's start time of a live process (clock ticks since boot); None when gone.

    Paired with the PID it names a process without the risk of PID reuse. Zombies count as
    gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in {"Z", "X"}:
        return None
    return int(fields[19])


def is_alive(pid: int, start_time: int | None = None) -> bool:
    started = read_start_time(pid)
    return started is not None and (start_time is None or started == start_time)


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while is_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ----------------------------------------------------------------------------- cgroups


def tracking_hierarchies() -> list[Path]:
    """The hierarchies systemd tracks processes in: the unified one and/or name=systemd."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]  # pure cgroup v2
    return [
        CGROUP_ROOT / sub
        for sub in ("systemd", "unified")
        if (CGROUP_ROOT / sub / "cgroup.procs").exists()
    ]


def all_hierarchies() -> list[Path]:
    """Every mounted hierarchy, v1 controllers included: where a manager may leave folders."""
    found = tracking_hierarchies()
    if CGROUP_ROOT not in found and CGROUP_ROOT.is_dir():
        found += [
            path
            for path in sorted(CGROUP_ROOT.iterdir())
            if path not in found and not path.is_symlink() and (path / "cgroup.procs").exists()
        ]
    return found


def list_cgroup_pids(top: Path) -> set[int]:
    pids: set[int] = set()
    for folder, _dirs, files in os.walk(top):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError):
                pids.update(int(line) for line in Path(folder, "cgroup.procs").read_text().split())
    return pids


def remove_cgroup_tree(top: Path, timeout_s: float = 3.0) -> None:
    """SIGKILL everything in the subtree, then rmdir it bottom-up."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = list_cgroup_pids(top)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not pids:
            try:
                for folder, _dirs, _files in os.walk(top, topdown=False):
                    Path(folder).rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
        elif time.monotonic() > deadline:
            raise PrivateManagerError(
                f"processes {sorted(pids)} are still in {top} after SIGKILL",
                hint="a process in uninterruptible sleep (D state)? look at /proc/PID/stack",
            )
        time.sleep(0.01)


# ----------------------------------------------------------------------------- journald


def journal_answers() -> bool:
    """A journald listens on the machine-wide native socket."""
    if not JOURNAL_SOCKET.is_socket() or not JOURNAL_STDOUT.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(str(JOURNAL_SOCKET))
        except OSError:
            return False
    return True


def read_machine_id() -> str | None:
    try:
        return Path("/etc/machine-id").read_text().strip() or None
    except OSError:
        return None


class _LeaseFiles:
    """Who holds the hand-started journald, and which process it is.

    `journald.pid` holds `PID START_TIME` of the journald this module started; `holders/`
    one file per lease named `PID-START_TIME-TOKEN` of the holding process. All reads and
    writes happen under `lock` (flock), so parallel runs agree.
    """

    lock = LEASE_DIR / "lock"
    pidfile = LEASE_DIR / "journald.pid"
    holders = LEASE_DIR / "holders"

    @classmethod
    @contextlib.contextmanager
    def locked(cls) -> Iterator[None]:
        try:
            cls.holders.mkdir(parents=True, exist_ok=True)
            fd = os.open(cls.lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise PrivateManagerUnavailable(
                f"cannot write {LEASE_DIR}: {exc.strerror}",
                hint="start a journald as root first, or run as root",
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @classmethod
    def writable(cls) -> bool:
        try:
            cls.holders.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        return os.access(cls.holders, os.W_OK)

    @classmethod
    def live_holders(cls) -> list[Path]:
        """Prunes the leases of dead processes, returns the live ones."""
        live = []
        for path in cls.holders.iterdir():
            pid, start = ([*path.name.split("-"), "", ""])[:2]
            if pid.isdigit() and start.isdigit() and is_alive(int(pid), int(start)):
                live.append(path)
            else:
                path.unlink(missing_ok=True)
        return live

    @classmethod
    def our_journald(cls) -> int | None:
        """The PID of the live journald this module started, if any."""
        try:
            pid, start = (int(word) for word in cls.pidfile.read_text().split())
        except (OSError, ValueError):
            return None
        if is_alive(pid, start) and Path(f"/proc/{pid}/exe").resolve() == JOURNALD_BINARY:
            return pid
        return None


_journald_children: dict[int, subprocess.Popen[bytes]] = {}  # to reap what we started


def acquire_journald(timeout_s: float = 5.0) -> str:
    """Takes a lease on a journald answering on /run/systemd/journal, starting one if none.

    Returns the lease token for release_journald(). A journald this module did not start
    (a real one, another tool's) is used and never stopped.
    """
    token = f"{os.getpid()}-{read_start_time(os.getpid())}-{secrets.token_hex(4)}"
    if not _LeaseFiles.writable() and journal_answers():
        return ""  # the host's own journald (a laptop, not root): nothing to hold
    with _LeaseFiles.locked():
        _LeaseFiles.live_holders()
        if not journal_answers():
            stale = _LeaseFiles.our_journald()
            if stale is not None:
                _stop_journald(stale)
            _start_journald(timeout_s)
        (_LeaseFiles.holders / token).touch()
    return token


def release_journald(token: str) -> list[str]:
    """Gives a lease back; the last holder stops the journald this module started."""
    if not token:
        return []
    with _LeaseFiles.locked():
        (_LeaseFiles.holders / token).unlink(missing_ok=True)
        return _stop_unheld_journald()


@contextlib.contextmanager
def hold_journald() -> Iterator[None]:
    """Keeps journald up across many managers (a test session) instead of one per manager."""
    token = acquire_journald()
    try:
        yield
    finally:
        release_journald(token)


def _stop_unheld_journald() -> list[str]:
    if _LeaseFiles.live_holders():
        return []
    pid = _LeaseFiles.our_journald()
    _LeaseFiles.pidfile.unlink(missing_ok=True)
    if pid is None:
        return []
    return [f"journald pid {pid}", *_stop_journald(pid)]


def _start_journald(timeout_s: float) -> None:
    if not JOURNALD_BINARY.exists():
        raise PrivateManagerUnavailable(
            f"no journald answers on {JOURNAL_SOCKET} and {JOURNALD_BINARY} is missing",
            hint="apt-get install systemd, or use PrivateManager(..., journald=False)",
        )
    for leftover in (JOURNAL_SOCKET, JOURNAL_STDOUT):  # of a dead journald: it cannot bind
        leftover.unlink(missing_ok=True)
    # No NOTIFY_SOCKET: journald would send every stream's fd to it (FDSTORE=1) and log
    # "Failed to send stream file descriptor" once the socket is gone. Ready = both sockets
    # answer. Shared by parallel runs, so no PDEATHSIG: a dead holder's lease lapses instead
    # and the next release or sweep_stale() stops it.
    process = subprocess.Popen(
        [str(JOURNALD_BINARY)],
        env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _journald_children[process.pid] = process
    deadline = time.monotonic() + timeout_s
    while not journal_answers():
        code = process.poll()
        if code is not None or time.monotonic() > deadline:
            _stop_journald(process.pid)
            raise PrivateManagerError(
                f"{JOURNALD_BINARY} "
                + (f"exited with status {code}" if code is not None else "did not answer")
                + f" on {JOURNAL_SOCKET} within {timeout_s:g} s",
                hint=f"run {JOURNALD_BINARY} by hand to see why",
            )
        time.sleep(0.01)
    start = read_start_time(process.pid)
    _LeaseFiles.pidfile.write_text(f"{process.pid} {start}\n")


def _stop_journald(pid: int) -> list[str]:
    """Stops a journald this module started and deletes what it left."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_gone(pid, 3.0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 2.0)
    child = _journald_children.pop(pid, None)
    if child is not None:
        child.wait()
    removed = []
    machine_id = read_machine_id()
    leftovers = [JOURNAL_RUN_DIR]
    if machine_id:
        leftovers.append(VOLATILE_JOURNAL_DIR / machine_id)
    for path in leftovers:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


# ----------------------------------------------------------------------------- readiness


def _make_preexec(
    procs_files: list[Path], parent_pid: int, netns: str | None = None
) -> Callable[[], None]:
    """What the manager's child does between fork and exec.

    Only async-signal-safe-ish steps: the libc functions are looked up here, in the parent.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    paths = [str(path) for path in procs_files]
    enter = enter_preexec(netns) if netns is not None else None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
        pid = str(os.getpid()).encode()
        for path in paths:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        if enter is not None:
            enter()

    return preexec


# ----------------------------------------------------------------------------- the manager


class PrivateManager:
    """One `systemd --user` in a private world under `root`, with its bus and a journald.

    `start()` returns when READY=1 arrived and org.freedesktop.systemd1 answers on the bus;
    `stop()` (idempotent) stops it, SIGKILLs what is left in its cgroups and removes them.
    Call start() from a thread that lives as long as the manager: the child gets SIGTERM
    (PR_SET_PDEATHSIG) when the forking thread ends.
    """

    def __init__(
        self,
        root: Path,
        *,
        journald: bool = True,
        name: str = "diversityd-test",
        netns: str | None = None,
        _unique: str | None = None,
    ) -> None:
        if not NAME_PATTERN.fullmatch(name):
            raise PrivateManagerError(
                f"manager name {name!r} is not usable in a cgroup slice name",
                hint="use letters, digits, '_' and single '-' between them",
            )
        self.name = name
        self.journald = journald
        self.netns = netns  # the network namespace it runs in (None: the machine's own)
        self.unique = _unique or f"{name}-{os.getpid()}-{secrets.token_hex(3)}"
        self.cgroup_name = f"{self.unique}.slice"
        self.cgroup_path = f"/{self.cgroup_name}/{MANAGER_SLICE}"
        self.root = root.absolute()
        self._owned_paths: list[Path] = [self.root] if _unique else []

        self.config_home = self.root / "config"
        self.unit_dir = self.config_home / "systemd" / "user"
        self.log_path = self.root / "manager.log"
        for sub in ("config", "data", "state", "cache", "home"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.unit_dir.mkdir(parents=True, exist_ok=True)
        self.runtime_dir = self._make_runtime_dir()
        (self.config_home / "systemd" / "user.conf").write_text(
            "[Manager]\nDefaultTimeoutStopSec=5s\n"
        )

        self.bus_address = f"unix:path={self.runtime_dir / 'bus'}"
        user = pwd.getpwuid(os.getuid()).pw_name
        self.env: dict[str, str] = {
            "HOME": str(self.root / "home"),
            "USER": user,
            "LOGNAME": user,
            "LANG": "C.UTF-8",
            "PATH": SYSTEM_PATH,
            "XDG_CONFIG_HOME": str(self.config_home),
            "XDG_DATA_HOME": str(self.root / "data"),
            "XDG_STATE_HOME": str(self.root / "state"),
            "XDG_CACHE_HOME": str(self.root / "cache"),
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "DBUS_SESSION_BUS_ADDRESS": self.bus_address,
            "SYSTEMD_UNIT_PATH": f"{self.unit_dir}:{VENDOR_USER_UNIT_DIR}",
        }
        self.manager_pid = 0
        self.start_cursor: str | None = None
        self._start_wallclock = 0.0
        self._process: subprocess.Popen[bytes] | None = None
        self._journald_token: str | None = None
        self._cgroups: list[Path] = []
        self._stopped = False

    @classmethod
    def temporary(cls, *, journald: bool = True, name: str = "diversityd-test") -> Self:
        """A manager whose root is a fresh folder under /tmp, removed by stop()."""
        unique = f"{name}-{os.getpid()}-{secrets.token_hex(3)}"
        root = TEMP_DIR / f"{unique}.root"
        root.mkdir(mode=0o700)
        return cls(root, journald=journald, name=name, _unique=unique)

    def _make_runtime_dir(self) -> Path:
        runtime = self.root / "xdg"
        if len(str(runtime)) > MAX_RUNTIME_DIR_LEN:
            short = TEMP_DIR / f"{self.unique}.run"
            short.mkdir(mode=0o700)
            self._owned_paths.append(short)
            if runtime.is_symlink() or runtime.exists():
                runtime.unlink()
            runtime.symlink_to(short)
            return short
        runtime.mkdir(mode=0o700, exist_ok=True)
        runtime.chmod(0o700)
        return runtime

    # -- lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout_s: float = 10.0) -> None:
        if self._process is not None or self._stopped:
            raise PrivateManagerError("a PrivateManager starts once", hint="make a new one")
        deadline = time.monotonic() + timeout_s
        self._check_host()
        try:
            BOOTED_MARKER.mkdir(parents=True, exist_ok=True)
            if self.journald:
                self._journald_token = acquire_journald()
            self._start_wallclock = time.time()
            self.start_cursor = self._journal_cursor() if self.journald else None
            self._make_cgroups()
            self._spawn(deadline)
            self._wait_for_bus(deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the manager and everything under it; sweeps its cgroups. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        problems: list[str] = []
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the manager stops its units, then exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout_s)
        for top in [path.parent for path in self._cgroups] + self._v1_leftovers():
            try:
                remove_cgroup_tree(top)
            except OSError as exc:
                problems.append(f"{top}: {exc}")
            except PrivateManagerError as exc:
                problems.append(str(exc))
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(2.0)
            if process.poll() is None:
                process.kill()
                process.wait()
        if self._journald_token is not None:
            release_journald(self._journald_token)
            self._journald_token = None
        for path in self._owned_paths:
            shutil.rmtree(path, ignore_errors=True)
        if problems:
            raise PrivateManagerError(
                "private manager stopped, but its cgroups could not all be removed: "
                + "; ".join(problems),
                hint="sweep_stale() retries once those processes are gone",
            )

    def _v1_leftovers(self) -> list[Path]:
        tracked = {path.parent for path in self._cgroups}
        return [
            hierarchy / self.cgroup_name
            for hierarchy in all_hierarchies()
            if (hierarchy / self.cgroup_name).exists()
            and hierarchy / self.cgroup_name not in tracked
        ]

    def _check_host(self) -> None:
        if not SYSTEMD_BINARY.exists():
            raise PrivateManagerUnavailable(
                f"{SYSTEMD_BINARY} is missing", hint="apt-get install systemd"
            )
        if not tracking_hierarchies():
            raise PrivateManagerUnavailable(
                f"no cgroup hierarchy systemd can track processes in under {CGROUP_ROOT}",
                hint="mount cgroup2 on /sys/fs/cgroup (or name=systemd on /sys/fs/cgroup/systemd)",
            )
        existing = next(path for path in BOOTED_MARKER.parents if path.exists())
        if not BOOTED_MARKER.is_dir() and not os.access(existing, os.W_OK):
            raise PrivateManagerUnavailable(
                f"cannot create {BOOTED_MARKER} (systemd --user refuses to run without it)",
                hint="run as root (a container or VM), or use the host's own user manager",
            )

    def _make_cgroups(self) -> None:
        for hierarchy in tracking_hierarchies():
            leaf = hierarchy / self.cgroup_name / MANAGER_SLICE
            try:
                leaf.mkdir(parents=True)
            except PermissionError as exc:
                raise PrivateManagerUnavailable(
                    f"cannot create cgroup {leaf}: permission denied",
                    hint="run as root in a container or VM, or inside a delegated scope "
                    "(systemd-run --user --scope -p Delegate=yes ...); or use the host's own "
                    "user manager (host_has_user_manager())",
                ) from exc
            self._cgroups.append(leaf)
            if not os.access(leaf / "cgroup.procs", os.W_OK):
                raise PrivateManagerUnavailable(
                    f"cannot write {leaf / 'cgroup.procs'}",
                    hint="run as root in a container or VM, or inside a delegated scope",
                )

    def _spawn(self, deadline: float) -> None:
        notify_path = self.runtime_dir / f"ready-{secrets.token_hex(3)}"
        env = dict(self.env)
        env["NOTIFY_SOCKET"] = str(notify_path)
        # "console" would mean /dev/console (the machine's), not stderr.
        env["SYSTEMD_LOG_TARGET"] = "journal" if self.journald else "null"
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
            self.log_path.open("ab") as log,
        ):
            notify.bind(str(notify_path))
            try:
                self._process = subprocess.Popen(
                    [str(SYSTEMD_BINARY), "--user"],
                    env=env,
                    cwd=self.env["HOME"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    # The cgroup must be joined between fork and exec (noqa: it does no
                    # allocation-heavy work, see _make_preexec).
                    preexec_fn=_make_preexec(  # noqa: PLW1509
                        [leaf / "cgroup.procs" for leaf in self._cgroups],
                        os.getpid(),
                        self.netns,
                    ),
                )
            except (subprocess.SubprocessError, OSError) as exc:
                notify_path.unlink(missing_ok=True)
                raise PrivateManagerError(
                    f"could not start {SYSTEMD_BINARY} in cgroups {self._cgroups}"
                    + (f" and network namespace {self.netns}" if self.netns else "")
                    + f": {exc}",
                    hint="are the cgroup.procs files writable? does /run/netns/NAME exist?",
                ) from exc
            self.manager_pid = self._process.pid
            try:
                self._wait_ready(notify, deadline)
            finally:
                notify_path.unlink(missing_ok=True)

    def _wait_ready(self, notify: socket.socket, deadline: float) -> None:
        """Waits for READY=1 on `notify` while watching for the manager's early exit."""
        assert self._process is not None
        notify.settimeout(0.02)
        while True:
            try:
                message = notify.recv(4096)
            except TimeoutError:
                message = b""
            if b"READY=1" in message.split(b"\n"):
                return
            code = self._process.poll()
            if code is not None:
                raise PrivateManagerError(
                    f"systemd --user exited with status {code} before it was ready"
                    + self._describe_failure(),
                    hint="a missing /run/systemd/system or a cgroup problem is typical",
                )
            if time.monotonic() > deadline:
                raise PrivateManagerError(
                    "systemd --user sent no READY=1 in time" + self._describe_failure(),
                    hint="the host may be overloaded: pass a longer timeout_s to start()",
                )

    def _describe_failure(self, lines: int = 20) -> str:
        """The manager's last words: its stderr and, with journald, its journal lines."""
        text = []
        with contextlib.suppress(OSError):
            text += self.log_path.read_text(errors="replace").splitlines()
        if self.journald and self.manager_pid:
            with contextlib.suppress(PrivateManagerError):
                text += run_command(
                    [
                        "journalctl",
                        "--no-pager",
                        "--quiet",
                        "--output=cat",
                        f"_PID={self.manager_pid}",
                        f"--lines={lines}",
                    ],
                    env=self.env,
                    timeout=5,
                    check=False,
                ).stdout.splitlines()
        if not text:  # errors before its log is open go to /dev/console, not to stderr
            return f" (nothing in {self.log_path} or the journal: see the machine's console)"
        return ":\n  " + "\n  ".join(text[-lines:])

    def _wait_for_bus(self, deadline: float) -> None:
        args = [
            "busctl",
            f"--address={self.bus_address}",
            "--auto-start=no",
            "--timeout=1",
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.DBus.Peer",
            "Ping",
        ]
        while True:
            result = run_command(args, env=self.env, timeout=5, check=False)
            if result.returncode == 0:
                return
            if self._process is not None and self._process.poll() is not None:
                raise PrivateManagerError(
                    f"systemd --user exited with status {self._process.returncode} while "
                    "waiting for its bus" + self._describe_failure()
                )
            if time.monotonic() > deadline:
                raise PrivateManagerError(
                    f"org.freedesktop.systemd1 did not answer on {self.bus_address}: "
                    f"{result.stderr.strip()}",
                    hint="`systemctl --user status dbus.socket dbus.service` with .env says why",
                )
            time.sleep(0.02)

    # -- clients

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """`systemctl --user ARGS` against this manager."""
        return run_command(
            ["systemctl", "--user", *args], env=self.env, timeout=timeout, check=check
        )

    def verify_units(self, *paths: Path, strict: bool = True) -> subprocess.CompletedProcess[str]:
        """`systemd-analyze --user verify --man=no PATHS`; rc 1 on errors (not raised).

        systemd 252 returns 0 for a misspelt key, an unknown section or an unparsable value
        (it logs "FILE:LINE: ..., ignoring." and goes on). With `strict` (the default) such a
        located complaint about one of PATHS or a unit in unit_dir turns rc 0 into 1.
        SYSTEMD_LOG_* are cleared: with a `null` target it prints nothing and returns 1.
        """
        env = {key: value for key, value in self.env.items() if not key.startswith("SYSTEMD_LOG_")}
        files = [str(path.absolute()) for path in paths]
        result = run_command(
            ["systemd-analyze", "--user", "verify", "--man=no", *files],
            env=env,
            timeout=60,
            check=False,
        )
        if strict and result.returncode == 0:
            ours = (*files, f"{self.unit_dir}/")
            located = [
                line
                for line in result.stderr.splitlines()
                if re.match(r"\S+:\d+: ", line) and line.startswith(ours)
            ]
            if located:
                note = "diversityd: strict verify: located warnings count as errors\n"
                return subprocess.CompletedProcess(
                    result.args, 1, result.stdout, result.stderr + note
                )
        return result

    def journal(
        self,
        *match: str,
        unit: str | None = None,
        since_cursor: str | None = None,
        timeout: float = 10,
        wait_s: float = 0.0,
    ) -> list[dict[str, Any]]:
        """This manager's journal entries (`journalctl -o json` MATCH...), oldest first.

        Only entries from processes in this manager's cgroups; with `unit`, those of the unit's
        processes (_SYSTEMD_UNIT) and the manager's lines about it (USER_UNIT). From
        `since_cursor` (exclusive), else from the manager's start. With `wait_s`, polls until
        at least one entry matches or the time is up.
        """
        if not self.journald:
            raise PrivateManagerError(
                "this private manager runs without journald", hint="make it with journald=True"
            )
        terms: list[str] = list(match)
        if unit is not None:
            terms = [*match, f"_SYSTEMD_UNIT={unit}", "+", *match, f"USER_UNIT={unit}"]
        cursor = since_cursor or self.start_cursor
        args = ["journalctl", "--no-pager", "--quiet", "--all", "--output=json"]
        if cursor:
            # Not --after-cursor: journalctl 252 then skips the first MATCHING entry after it.
            args.append(f"--cursor={cursor}")
        else:
            args.append(f"--since=@{int(self._start_wallclock) - 1}")
        prefix = f"/{self.cgroup_name}/"
        deadline = time.monotonic() + wait_s
        while True:
            result = run_command([*args, *terms], env=self.env, timeout=timeout, check=True)
            entries = []
            for line in result.stdout.splitlines():
                entry = json.loads(line)
                cgroup = entry.get("_SYSTEMD_CGROUP")
                if (
                    isinstance(cgroup, str)
                    and cgroup.startswith(prefix)
                    and entry.get("__CURSOR") != cursor
                ):
                    entries.append(entry)
            if entries or time.monotonic() >= deadline:
                return entries
            time.sleep(0.02)

    def _journal_cursor(self) -> str | None:
        result = run_command(
            ["journalctl", "--no-pager", "--quiet", "--lines=1", "--output=json"],
            env=self.env,
            timeout=10,
            check=False,
        )
        lines = result.stdout.splitlines()
        if result.returncode != 0 or not lines:
            return None
        cursor = json.loads(lines[-1]).get("__CURSOR")
        return cursor if isinstance(cursor, str) else None


# ----------------------------------------------------------------------------- leftovers


def sweep_stale(prefix: str = "diversityd-test") -> list[str]:
    """Removes what crashed runs of managers named `prefix` left; returns what it removed.

    A leftover is a slice or temp folder `<prefix>-<pid>-<hex>...` whose owner process is
    gone: its processes are SIGKILLed and its cgroups removed in every hierarchy. Also stops
    a journald this module started that nobody holds any more.
    """
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)-[0-9a-f]+\.(slice|root|run)")
    removed: list[str] = []

    def stale(name: str, kind: str) -> bool:
        found = pattern.fullmatch(name)
        return found is not None and found.group(2) == kind and not is_alive(int(found.group(1)))

    for hierarchy in all_hierarchies():
        for top in sorted(hierarchy.iterdir()):
            if top.is_dir() and stale(top.name, "slice"):
                pids = list_cgroup_pids(top)
                try:
                    remove_cgroup_tree(top)
                except PermissionError:
                    continue  # another user's leftover: not ours to remove
                removed.append(str(top) + (f" (killed {sorted(pids)})" if pids else ""))
    if TEMP_DIR.is_dir():
        for path in sorted(TEMP_DIR.iterdir()):
            if stale(path.name, path.suffix[1:]) and path.suffix != ".slice" and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    removed.append(str(path))
    if _LeaseFiles.holders.is_dir() and _LeaseFiles.writable():
        with _LeaseFiles.locked():
            removed += _stop_unheld_journald()
    return removed


def host_has_user_manager() -> bool:
    """The host runs a usable `systemd --user` for this user (a developer's laptop)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    private = Path(runtime) / "systemd" / "private"
    if not private.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(private))
        except OSError:
            return False
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "XDG_RUNTIME_DIR": runtime}
    try:
        result = run_command(
            ["systemctl", "--user", "is-system-running"], env=env, timeout=5, check=False
        )
    except PrivateManagerError:
        return False
    return result.stdout.strip() in LIVE_STATES
