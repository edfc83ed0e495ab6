"""The maintainers' corpus of hand-made units (tests/corpus/units) read as systemd reads it
(issue 20, point 6): each unit loaded into a real user manager, whose ExecStartEx is the
truth; diversityd's own reading of the file (execline.py, where systemd cannot be asked)
must equal it, and `install --dry-run` (no configuration yet: point 7) must find each
server as systemd reads it, asked or not."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diversityd.adapters.discovery import specifiers
from diversityd.adapters.systemd import Systemd
from diversityd.foreignunits import LoadedUnit, parse_service
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.stack import ctl_env
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

CORPUS = REPO_ROOT / "tests" / "corpus" / "units"
# unit -> (program, port, model) as systemd reads the unit (the home folder: {home})
EXPECTED = {
    "escaped-model.service": ("/opt/llama/bin/llama-server", 18091, "/srv/models/my model.gguf"),
    "quoted-path.service": ("/opt/llama cpp/bin/llama-server", 18092, "/srv/models/a b.gguf"),
    "no-expand.service": ("/opt/llama/bin/llama-server", 18093, "${MODEL}"),
    "expanded.service": ("/opt/llama/bin/llama-server", 18094, "/srv/models/d e.gguf"),
    "octal-semicolon.service": ("/opt/llama/bin/llama-server", 18095, "/srv/café/f.gguf"),
    "specifiers.service": ("/opt/llama/bin/llama-server", 18096, "{home}/models/g.gguf"),
    "ambient-vllm.service": ("/opt/vllm/bin/vllm", 18097, "Qwen/Qwen2.5-Coder-7B-Instruct-AWQ"),
    "env-wrapper.service": ("/opt/llama/bin/llama-server", 18098, "/srv/models/h.gguf"),
    "python-server.service": ("/opt/venv/bin/python3", 18099, "/srv/models/i.gguf"),
    "ollama-host.service": ("/usr/local/bin/ollama", 18100, None),
    "unknown-escape.service": ("/opt/llama/bin/llama-server", 18101, "/srv/models/j\\qk.gguf"),
}


@pytest.fixture(scope="module")
def corpus_manager(shared_private_manager: PrivateManager) -> PrivateManager:
    manager = shared_private_manager
    for path in sorted(CORPUS.glob("*.service")):
        shutil.copy(path, manager.unit_dir / path.name)
    manager.systemctl("daemon-reload")
    return manager


def systemds_reading(manager: PrivateManager, names: list[str]) -> dict[str, LoadedUnit]:
    async def read() -> dict[str, LoadedUnit]:
        systemd = await Systemd.connect(manager.bus_address)
        try:
            units = {name: await systemd.managed_unit(name) for name in names}
        finally:
            systemd.disconnect()
        for name, unit in units.items():
            assert unit.load_state == "loaded", (name, unit.load_state)
            assert unit.loaded is not None
        return {name: unit.loaded for name, unit in units.items() if unit.loaded}

    return asyncio.run(read())


def test_the_corpus_reads_as_systemd_reads_it(corpus_manager: PrivateManager) -> None:
    names = sorted(p.name for p in CORPUS.glob("*.service"))
    assert set(names) == set(EXPECTED)
    truth = systemds_reading(corpus_manager, names)
    values = specifiers(corpus_manager.env)
    for name in names:
        ours = parse_service([(CORPUS / name).read_text()], values)
        assert ours.exec_problem is None, (name, ours.exec_problem)
        assert ours.exec_start == truth[name].commands, name


def dry_run(manager: PrivateManager, tmp_path: Path, *, with_bus: bool) -> str:
    config_dir = tmp_path / ("with-bus" if with_bus else "no-bus")
    config_dir.mkdir()
    env = ctl_env(manager)
    if not with_bus:
        env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={tmp_path / 'no-bus'}"
    result = subprocess.run(
        [sys.executable, "-m", "diversityd.cli", "install", "--dry-run", "--config-dir",
         str(config_dir)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert not list(config_dir.iterdir())  # a dry run writes nothing
    return result.stdout


@pytest.mark.parametrize("with_bus", [True, False], ids=["manager-asked", "file-read"])
def test_install_dry_run_finds_each_server_as_systemd_reads_it(
    corpus_manager: PrivateManager, tmp_path: Path, with_bus: bool
) -> None:
    out = dry_run(corpus_manager, tmp_path, with_bus=with_bus)
    home = corpus_manager.env["HOME"]
    how = "as the user manager parsed it" if with_bus else "as systemd reads it"
    for name, (program, port, model) in EXPECTED.items():
        line = next((x for x in out.splitlines() if x.startswith(f"  {name} (user unit")), None)
        assert line is not None, f"{name} not found:\n{out}"
        assert f", :{port}" in line, line
        if model is not None:
            assert f"model {model.replace('{home}', home)}" in line, line
        assert f"runs {program} ({how})" in out, name
    assert "Proposed providers.yaml:" in out
    assert "base_url: http://127.0.0.1:18091" in out
