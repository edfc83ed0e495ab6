"""The dashboard and the alert rules against a real Prometheus (Debian's) scraping a real
daemon and its real gateway: every panel built on diversityd's own metrics returns series
that change while faults are made, and the alerts fire live."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from diversityd.adapters.litellm import read_master_key
from diversityd_lab.embedded import LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM, StackSpec, free_port
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.stack import RunningStack, start_stack
from diversityd_lab.traffic import GatewayStream
from tests.conftest import REPO_ROOT, unavailable
from tests.nvmlshim.build import build_shim

pytestmark = pytest.mark.integration

PROVIDERS = (LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM)
DASHBOARD = REPO_ROOT / "packaging" / "grafana" / "diversityd.json"
ALERTS = REPO_ROOT / "packaging" / "prometheus" / "alerts.yml"
CARD = "device Test_GPU total_mib=16384 used_mib=512\n"
# A panel whose value cannot change with a fault: the daemon's version (1 with a label).
CONSTANT_PANELS = {"diversityd version"}


def panels() -> list[tuple[str, list[str]]]:
    """(title, expressions) of every panel built on diversityd's own metrics."""

    def walk(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from walk(item.get("panels", []))

    found = []
    for panel in walk(json.loads(DASHBOARD.read_text())["panels"]):
        exprs = [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
        if exprs and all("diversityd_" in e for e in exprs):
            found.append((str(panel["title"]), exprs))
    return found


def concrete(expr: str) -> str:
    """Grafana's variables as a query would have them."""
    return (
        expr.replace('"$provider"', '".*"')
        .replace("$provider", ".*")
        .replace('"$gpu"', '"0"')
        .replace("$__rate_interval", "20s")
        .replace("$__range", "10m")
    )


class Prometheus:
    def __init__(self, root: Path, daemon_port: int, gateway_port: int, key_file: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        rules = yaml.safe_load(ALERTS.read_text())
        for group in rules["groups"]:
            group["interval"] = "1s"
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = "2s"  # the same expressions, fired in seconds
        (root / "alerts.yml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(root / "alerts.yml")],
            "scrape_configs": [
                {
                    "job_name": "diversityd",
                    "static_configs": [{"targets": [f"127.0.0.1:{daemon_port}"]}],
                },
                {
                    "job_name": "litellm-gateway",
                    "metrics_path": "/metrics/",
                    # as packaging/prometheus/prometheus.yml: the key file is the token
                    "authorization": {"credentials_file": str(key_file)},
                    "static_configs": [{"targets": [f"127.0.0.1:{gateway_port}"]}],
                },
            ],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = root / "prometheus.log"
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.api("query", query="up")
                return
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"prometheus did not start:\n{self.log.read_text()[-2000:]}")

    def firing(self) -> set[tuple[str, str]]:
        alerts = self.api("alerts")["alerts"]
        return {
            (a["labels"]["alertname"], a["labels"].get("provider") or a["labels"].get("model", ""))
            for a in alerts
            if a["state"] == "firing"
        }

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log_file.close()


@pytest.fixture
def observed_stack(
    private_manager: PrivateManager,
    tmp_path: Path,
    llama_server_bin: Path,
    llama_cpp_python_interpreter: Path,
    litellm_python: Path,
) -> Iterator[tuple[RunningStack, Path]]:
    if shutil.which("prometheus") is None:
        unavailable("Debian's prometheus is not installed: run packaging/install-system-deps.sh")
    shim_config = tmp_path / "nvml.conf"
    shim_config.write_text(CARD)
    drop_in = private_manager.unit_dir / "diversityd.service.d" / "nvml.conf"
    drop_in.parent.mkdir(parents=True)
    drop_in.write_text(
        "[Service]\n"
        f'Environment="LD_LIBRARY_PATH={build_shim()}"\n'
        f'Environment="NVMLSHIM_CONFIG={shim_config}"\n'
    )
    spec = StackSpec(
        ports={
            **{name: free_port() for name in PROVIDERS},
            "gateway": free_port(),
            "http": free_port(),
        },
        providers=PROVIDERS,
        unit_dir=private_manager.unit_dir,
        extra_settings={
            "supervision": {"revive_initial_s": 2, "revive_max_s": 4, "hung_grace_s": 2}
        },
    )
    running = start_stack(private_manager, tmp_path / "stack", spec)
    try:
        running.wait_for(
            lambda d: (
                all(p["state"] == "ready" for p in d["providers"])
                and d["gateway"]["state"] == "ready"
                and d["gateway"]["in_sync"]
            ),
            timeout_s=180,
            poll_s=0.5,
        )
        yield running, shim_config
    finally:
        private_manager.systemctl("stop", "diversityd.service", check=False)


def test_panels_return_changing_series_and_alerts_fire_live(
    observed_stack: tuple[RunningStack, Path], tmp_path: Path
) -> None:
    running, shim_config = observed_stack
    spec = running.stack.spec
    gateway = running.status()["gateway"]
    key_file = Path(gateway["key_file"])
    # LiteLLM's metrics are not open to every local user (issue 20, point 8)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{gateway['url']}/metrics/", timeout=10)
    assert refused.value.code == 401
    prometheus = Prometheus(
        tmp_path / "prometheus", spec.ports["http"], spec.ports["gateway"], key_file
    )
    try:
        prometheus.wait_ready()
        started = time.time()
        key = read_master_key(key_file)
        with GatewayStream(gateway["url"], key, ["llama3.1:latest", "llama-cpp-default"]):
            make_faults(running, shim_config, prometheus)
            time.sleep(3)
        ended = time.time()
        unchanged, empty = [], []
        for title, exprs in panels():
            series = []
            for expr in exprs:
                result = prometheus.api(
                    "query_range",
                    query=concrete(expr),
                    start=str(started),
                    end=str(ended),
                    step="1",
                )["result"]
                series += result
            if not series:
                empty.append(title)
            elif title not in CONSTANT_PANELS and not changed(series, started):
                unchanged.append(title)
        assert not empty, f"panels with no series: {empty}"
        assert not unchanged, f"panels whose series never changed under the faults: {unchanged}"
        gateway_metrics = prometheus.api("query", query="litellm_proxy_total_requests_metric_total")
        assert gateway_metrics["result"], "LiteLLM's own metrics are not scraped"
    finally:
        prometheus.stop()


def changed(series: list[dict[str, Any]], started: float) -> bool:
    """Some series' value moved, or a series came (or went) within the window."""
    for each in series:
        values = each["values"]
        if len({v for _, v in values}) > 1 or float(values[0][0]) > started + 5:
            return True
    ends = {float(s["values"][-1][0]) for s in series}
    return len(ends) > 1


def make_faults(running: RunningStack, shim_config: Path, prometheus: Prometheus) -> None:
    """One of each: a crash, a unit systemd gives up on (alerts), a restart, a drill, a
    rollback's pin, VRAM moves and an NVML error."""
    # a crash (exits, state changes, probe failures)
    pid = running.provider(LLAMA_NATIVE)["pid"]
    os.kill(pid, signal.SIGKILL)
    running.wait_for(lambda d: running.provider(LLAMA_NATIVE, d)["pid"] not in (None, pid), 30)
    # vLLM fails for good: its model's chain is all down; alerts fire; then it is revived
    vllm_exe = Path(running.stack.spec.standin_executables[VLLM])
    good = vllm_exe.read_text()
    vllm_exe.write_text("#!/bin/sh\nexit 3\n")
    try:
        os.kill(running.provider(VLLM)["pid"], signal.SIGKILL)
        running.wait_for(lambda d: running.provider(VLLM, d)["state"] == "failed", 60)
        deadline = time.monotonic() + 60
        wanted = {("DiversitydProviderDown", VLLM), ("DiversitydChainAllDown", "qwen-coder-vllm")}
        while time.monotonic() < deadline and not wanted <= prometheus.firing():
            time.sleep(1)
        assert wanted <= prometheus.firing(), prometheus.firing()
    finally:
        vllm_exe.write_text(good)
    running.wait_for(lambda d: running.provider(VLLM, d)["state"] == "ready", 60)
    # the gateway crashes: one instance, so it is down until systemd's Restart= brings it
    # back (a switch or a route change never takes it down: no other fault here moves it)
    gateway_pid = running.status()["gateway"]["pid"]
    os.kill(gateway_pid, signal.SIGKILL)
    running.wait_for(lambda d: d["gateway"]["state"] != "ready", 30, poll_s=0.1)
    time.sleep(2)  # two scrapes of the gateway down
    running.wait_for(
        lambda d: (
            d["gateway"]["state"] == "ready"
            and d["gateway"]["pid"] not in (None, gateway_pid)
            and d["gateway"]["in_sync"]
        ),
        120,
    )
    # a restart by diversityd, and a drill through the gateway
    assert running.ctl("restart", LLAMA_PYTHON).returncode == 0
    drill = running.ctl("failover-test", LLAMA_PYTHON, "--mode", "kill", timeout=600)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    # a rollback pins the gateway; a reload unpins it. A second config in the history
    # first: a setting a LiteLLM process reads at start (the routes change in-process)
    settings_file = running.stack.config_dir / "diversityd.yaml"
    original = settings_file.read_text()
    settings = yaml.safe_load(original)
    settings["gateway"]["litellm_settings"] = {"drop_params": True}
    settings_file.write_text(yaml.safe_dump(settings))
    assert running.ctl("reload").returncode == 0
    running.wait_for(lambda d: d["gateway"]["reloads"] >= 2 and d["gateway"]["in_sync"], 120)
    settings_file.write_text(original)
    history = json.loads(running.ctl("history", "--json").stdout)["history"]
    older = next(e for e in history if not e["current"])
    assert running.ctl("rollback", older["id"], timeout=300).returncode == 0
    assert running.status()["gateway"]["pinned"]
    time.sleep(3)  # two scrapes of the pin: a reload right after lifts it within a second
    assert running.ctl("reload").returncode == 0
    # others take VRAM (the plan shrinks onto the CPU), then NVML fails once
    shim_config.write_text("device Test_GPU total_mib=16384 used_mib=16300\n")
    running.wait_for(lambda d: running.provider(LLAMA_NATIVE, d)["n_gpu_layers"] == 0, 90)
    shim_config.write_text(CARD + "error memory 15\n")
    running.wait_for(lambda d: "GPU_IS_LOST" in (d["gpus"]["error"] or ""), 60)
    shim_config.write_text(CARD)
    running.wait_for(lambda d: d["gpus"]["error"] is None, 60)
    time.sleep(3)  # two scrapes of the last state
