"""Freezing a whole cgroup subtree through the unified hierarchy's `cgroup.freeze`.

On this machine kind the cgroups are a v1/v2 hybrid (v1 controllers, `name=systemd`, and
cgroup2 on /sys/fs/cgroup/unified). The private manager joins only `name=systemd` and the
unified hierarchy, not the v1 freezer; but the v2 freezer is part of cgroup2's core, not a
controller, so it works on the unified side in hybrid mode too: writing 1 stops every
process of the subtree (a fatal signal still kills them) and `cgroup.events` reads
`frozen 1` once all have stopped. The v1 freezer is never needed.
"""

from __future__ import annotations

import time
from pathlib import Path

from diversityd.errors import DiversitydError
from diversityd_lab.privatemanager import CGROUP_ROOT, tracking_hierarchies


class FreezeError(DiversitydError):
    """A cgroup could not be frozen or thawed."""


def unified_hierarchy() -> Path | None:
    """The cgroup2 hierarchy (pure v2: /sys/fs/cgroup; hybrid: /sys/fs/cgroup/unified)."""
    for hierarchy in tracking_hierarchies():
        if hierarchy == CGROUP_ROOT or hierarchy.name == "unified":
            return hierarchy
    return None


def freeze_file(cgroup: Path) -> Path:
    path = cgroup / "cgroup.freeze"
    if not path.exists():
        raise FreezeError(
            f"{path} is missing: no cgroup2 freezer for {cgroup}",
            hint="the v2 freezer needs Linux 5.2 or newer and the cgroup in the unified tree",
        )
    return path


def is_frozen(cgroup: Path) -> bool:
    """Every process of the subtree has stopped (`frozen 1` in cgroup.events)."""
    events = (cgroup / "cgroup.events").read_text().split("\n")
    return "frozen 1" in events


def set_frozen(cgroup: Path, frozen: bool, timeout_s: float = 10.0) -> None:
    """Freezes or thaws the subtree and waits until the kernel says it is done."""
    freeze_file(cgroup).write_text("1" if frozen else "0")
    deadline = time.monotonic() + timeout_s
    while is_frozen(cgroup) != frozen:
        if time.monotonic() > deadline:
            raise FreezeError(
                f"{cgroup} is not {'frozen' if frozen else 'thawed'} after {timeout_s:g} s",
                hint="a process in uninterruptible sleep delays freezing",
            )
        time.sleep(0.01)
