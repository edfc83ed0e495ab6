"""Benchmark: what the daemon itself costs, with every provider up, at the default probe
interval.

Sets up a private systemd --user manager and the embedded stack with every provider (the
real llama-server and llama-cpp-python, the Ollama and vLLM stand-ins, the LiteLLM gateway),
its diversityd.yaml without `probes:` (the daemon's defaults); `diversityctl install --now`
starts diversityd, which starts the rest. Tears it all down after.

- ready_s: systemd's timestamps of diversityd.service (Type=notify): the main process
  started (ExecMainStartTimestampMonotonic) -> active, i.e. READY=1
  (ActiveEnterTimestampMonotonic).
- serving_s: the main process started -> every provider `ready` and the gateway `ready` and
  `in_sync` (`diversityctl status --json`, polled every POLL_S: that is its resolution, and
  the polls' CPU is part of the machine's load meanwhile).
- idle_cpu_pct: the main process's CPU time (user + system, its threads, its reaped
  children) over IDLE_S (10 s with --quick) of wall time, SETTLE_S after serving, nothing
  polling it; 100 = one core.
- rss_mib: VmRSS of the main process after that window.
- after_restart: ready_s and serving_s again for `systemctl --user restart diversityd`
  (the providers and the gateway keep running and are adopted).
Targets: rss_mib <= 60, idle_cpu_pct <= 1.

Usage: python bench/footprint.py [--quick]. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from diversityd.adapters.files import write_atomic
from diversityd.config import SETTINGS_FILE, load_config
from diversityd.units import DAEMON_UNIT
from diversityd_lab.arms import PROVIDERS
from diversityd_lab.embedded import StackSpec, write_stack
from diversityd_lab.measure import emit
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.procstat import cpu_seconds, monotonic_s, rss_mib
from diversityd_lab.stack import RunningStack, free_port

POLL_S = 0.5
SETTLE_S = 10.0
TARGETS = {"rss_mib": 60, "idle_cpu_pct": 1.0}


def log(message: str) -> None:
    print(f"[footprint {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def serving(document: dict[str, Any]) -> bool:
    gateway = document["gateway"]
    return bool(
        document["daemon"].get("running")
        and all(p["state"] == "ready" for p in document["providers"])
        and gateway.get("state") == "ready"
        and gateway.get("in_sync")
    )


def start_times(running: RunningStack, since: float) -> tuple[float, float]:
    """(ready_s, serving_s) of the daemon started after `since` (monotonic seconds)."""
    document = running.wait_for(serving, timeout_s=300, poll_s=POLL_S)
    served_at = time.monotonic()
    show = running.manager.systemctl(
        "show", "-p", "ExecMainStartTimestampMonotonic,ActiveEnterTimestampMonotonic", DAEMON_UNIT
    ).stdout
    values = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
    started = monotonic_s(values["ExecMainStartTimestampMonotonic"])
    active = monotonic_s(values["ActiveEnterTimestampMonotonic"])
    assert started is not None, values
    assert active is not None, values
    assert started >= since, values
    log(f"serving: {[(p['name'], p['state']) for p in document['providers']]}")
    return round(active - started, 2), round(served_at - started, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a 10 s idle window, not 60 s")
    args = parser.parse_args()
    idle_s = 10.0 if args.quick else 60.0
    root = Path(tempfile.mkdtemp(prefix="bench-footprint-"))
    manager = PrivateManager(root / "pm")
    manager.start()
    try:
        spec = StackSpec(
            ports={**{name: free_port() for name in PROVIDERS}, "gateway": free_port()},
            providers=PROVIDERS,
            unit_dir=manager.unit_dir,
        )
        stack = write_stack(root / "stack", spec)
        settings_file = stack.config_dir / SETTINGS_FILE
        document = yaml.safe_load(settings_file.read_text())
        del document["probes"]  # the daemon's own defaults
        write_atomic(settings_file, yaml.safe_dump(document, sort_keys=False), mode=0o600)
        config, _ = load_config(stack.config_dir)
        assert config is not None
        interval = config.settings.probe_interval_s
        running = RunningStack(manager, stack)

        since = time.monotonic()
        installed = running.ctl("install", "--config-dir", str(stack.config_dir), "--now")
        assert installed.returncode == 0, installed.stdout + installed.stderr
        ready_s, serving_s = start_times(running, since)
        log(f"ready_s={ready_s} serving_s={serving_s}; settling {SETTLE_S:g} s")

        time.sleep(SETTLE_S)
        pid = running.daemon_pid()
        cpu_before, wall_before = cpu_seconds(pid, children=True), time.monotonic()
        time.sleep(idle_s)
        cpu_after, wall_after = cpu_seconds(pid, children=True), time.monotonic()
        rss = rss_mib(pid)
        idle_cpu_pct = 100 * (cpu_after - cpu_before) / (wall_after - wall_before)
        log(f"idle: {cpu_after - cpu_before:.2f} s CPU in {wall_after - wall_before:.1f} s")

        since = time.monotonic()
        manager.systemctl("restart", DAEMON_UNIT, timeout=120)
        again_ready_s, again_serving_s = start_times(running, since)
        manager.systemctl("stop", DAEMON_UNIT, check=False)
    finally:
        manager.stop()
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "rss_mib": round(rss, 1),
        "idle_cpu_pct": round(idle_cpu_pct, 2),
        "ready_s": ready_s,
        "serving_s": serving_s,
        "idle_window_s": idle_s,
        "probe_interval_s": interval,
        "after_restart": {"ready_s": again_ready_s, "serving_s": again_serving_s},
        "targets_met": {
            "rss_mib": rss <= TARGETS["rss_mib"],
            "idle_cpu_pct": idle_cpu_pct <= TARGETS["idle_cpu_pct"],
        },
    }
    print(
        f"rss_mib {result['rss_mib']} (target <= {TARGETS['rss_mib']}), idle_cpu_pct "
        f"{result['idle_cpu_pct']} (target <= {TARGETS['idle_cpu_pct']}), ready_s {ready_s}, "
        f"serving_s {serving_s}; after a restart: ready_s {again_ready_s}, "
        f"serving_s {again_serving_s}",
        file=sys.stderr,
    )
    emit(result)


if __name__ == "__main__":
    main()
