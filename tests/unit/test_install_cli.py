"""diversityctl install --dry-run (no user bus needed), uninstall --dry-run, env, completion,
the man page, and discovery's reading of unit directories, PATH, ports."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from diversityd.adapters.discovery import (
    interpreter_of,
    listening_holders,
    read_units,
    unit_of_pid,
    user_unit_dirs,
)
from tests.conftest import REPO_ROOT
from tests.unit.test_adoption import HF_TOKEN, LITELLM, MASTER_KEY, NATIVE, OLLAMA, PYTHON

SECRETS = (HF_TOKEN, MASTER_KEY)


def scratch_env(root: Path) -> dict[str, str]:
    """A home of its own, no user bus, system units in a folder of the test's."""
    env = {
        "HOME": str(root / "home"),
        "USER": "miko",
        "PATH": os.environ["PATH"],
        "LANG": "C.UTF-8",
        "XDG_CONFIG_HOME": str(root / "home" / ".config"),
        "XDG_STATE_HOME": str(root / "home" / ".local" / "state"),
        "XDG_RUNTIME_DIR": str(root / "run"),
        "DBUS_SESSION_BUS_ADDRESS": f"unix:path={root / 'no-bus'}",
        "DIVERSITYD_SYSTEM_UNIT_PATH": str(root / "system"),
        "DIVERSITYD_CACHE_DIR": str(root / "cache"),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }
    for key in ("HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR", "DIVERSITYD_SYSTEM_UNIT_PATH"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


def ctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diversityd.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def snapshot(*roots: Path) -> dict[str, bytes | str]:
    seen: dict[str, bytes | str] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                seen[str(path)] = "-> " + os.readlink(path)
            elif path.is_file():
                seen[str(path)] = path.read_bytes()
            else:
                seen[str(path)] = "dir"
    return seen


@pytest.fixture
def seeds_home(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The seeds' hand-made units (with the user's home as this test's) and the example
    providers.yaml + model-mappings.yaml, without a diversityd.yaml."""
    env = scratch_env(tmp_path)
    home = env["HOME"]
    unit_dir = Path(env["XDG_CONFIG_HOME"]) / "systemd" / "user"
    unit_dir.mkdir(parents=True)
    for name, text in (
        ("llama-cpp-native.service", NATIVE),
        ("llamacpp-python.service", PYTHON),
        ("litellm.service", LITELLM),
    ):
        (unit_dir / name).write_text(text.replace("/home/miko", home))
    (Path(env["DIVERSITYD_SYSTEM_UNIT_PATH"]) / "ollama.service").write_text(OLLAMA)
    config_dir = Path(env["XDG_CONFIG_HOME"]) / "diversityd"
    config_dir.mkdir()
    for name in ("providers.yaml", "model-mappings.yaml"):
        shutil.copy(REPO_ROOT / "config" / name, config_dir / name)
    return env, config_dir


def test_dry_run_names_every_unit_and_writes_nothing(
    seeds_home: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, config_dir = seeds_home
    before = snapshot(tmp_path)
    result = ctl(env, "install", "--dry-run", "--config-dir", str(config_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for unit in ("llama-cpp-native.service", "llamacpp-python.service", "litellm.service"):
        assert f"{unit} (user unit, state unknown)" in out
    assert "ollama.service (system unit)" in out
    assert "ollama.service -> providers.ollama: watched (owned: false)" in out
    assert (
        "llama-cpp-native.service -> providers.llama_cpp_native: "
        "diversityd-llama_cpp_native.service serves :8080" in out
    )
    assert "the unit says --n-gpu-layers 40; --keep-gpu-layers copies it" in out
    assert "litellm.service -> diversityd's gateway (diversityd-gateway.socket) on :4000" in out
    assert "--adopt would back up, stop, disable and mask: litellm.service" in out
    assert "variables HF_TOKEN" in out
    assert "unit states unknown" in out
    assert "Proposed diversityd.yaml (written with --adopt):" in out
    for secret in SECRETS:
        assert secret not in out + result.stderr
    assert snapshot(tmp_path) == before


def test_adopt_without_a_user_manager_changes_nothing(
    seeds_home: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, config_dir = seeds_home
    before = snapshot(tmp_path)
    result = ctl(env, "install", "--adopt", "--config-dir", str(config_dir))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot read the old units' state from systemd" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


def test_a_bad_configuration_exits_2_and_changes_nothing(
    seeds_home: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, config_dir = seeds_home
    (config_dir / "diversityd.yaml").write_text("gatway: {port: 4000}\n")
    before = snapshot(tmp_path)
    result = ctl(env, "install", "--adopt", "--config-dir", str(config_dir))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "diversityd.yaml" in result.stderr
    assert "did you mean 'gateway'?" in result.stderr
    assert snapshot(tmp_path) == before


def test_uninstall_dry_run_without_a_manifest(seeds_home: tuple[dict[str, str], Path]) -> None:
    env, config_dir = seeds_home
    result = ctl(env, "uninstall", "--dry-run", "--config-dir", str(config_dir))
    assert result.returncode == 0, result.stderr
    assert "No manifest at" in result.stdout


def test_dry_run_with_no_configuration_yet_proposes_the_files_to_start_from(
    seeds_home: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    """Issue 20, point 7: with hand-made units and no providers.yaml, the dry run exited 2
    ("cannot be read; nothing installed") and said nothing of what it found."""
    env, config_dir = seeds_home
    for name in ("providers.yaml", "model-mappings.yaml"):
        (config_dir / name).unlink()
    before = snapshot(tmp_path)
    result = ctl(env, "install", "--dry-run", "--config-dir", str(config_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "llama-cpp-native.service (user unit, state unknown)" in out
    assert "No configuration in" in out
    assert "Proposed providers.yaml:" in out
    assert "base_url: http://127.0.0.1:8080" in out
    assert "Proposed model-mappings.yaml:" in out
    assert "llama-cpp-native.service -> providers.llama_cpp_native" in out
    for secret in SECRETS:
        assert secret not in out + result.stderr
    assert snapshot(tmp_path) == before
    # a real install without the files refuses, and says where to start
    refused = ctl(env, "install", "--config-dir", str(config_dir))
    assert refused.returncode == 2
    assert "install --dry-run` proposes both" in refused.stderr
    assert snapshot(tmp_path) == before


def test_uninstall_never_reports_a_success_that_put_nothing_back(
    seeds_home: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    """Issue 20, point 6: with diversityd.yaml unreadable uninstall looked in the default
    state directory only, found no manifest, and said "uninstalled" having restored
    nothing."""
    env, config_dir = seeds_home
    (config_dir / "diversityd.yaml").write_text("state_dir: [unclosed\n")
    before = snapshot(tmp_path)
    result = ctl(env, "uninstall", "--config-dir", str(config_dir))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "uninstalled" not in result.stdout
    assert "nothing was stopped, removed or put back" in result.stderr
    assert "--state-dir" in result.stderr
    assert snapshot(tmp_path) == before


# -- env --------------------------------------------------------------------------------


def env_config(root: Path, key_file: Path) -> Path:
    config_dir = root / "cfg"
    config_dir.mkdir()
    for name in ("providers.yaml", "model-mappings.yaml"):
        shutil.copy(REPO_ROOT / "config" / name, config_dir / name)
    (config_dir / "diversityd.yaml").write_text(
        f"gateway: {{host: 0.0.0.0, port: 4100, master_key_file: {key_file}}}\n"
    )
    return config_dir


def test_env_prints_the_url_and_where_the_key_is(tmp_path: Path) -> None:
    env = scratch_env(tmp_path)
    key_file = tmp_path / "master.key"
    config_dir = env_config(tmp_path, key_file)
    result = ctl(env, "env", "--config-dir", str(config_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "export OPENAI_BASE_URL=http://127.0.0.1:4100/v1"
    assert str(key_file) in result.stdout
    assert "--show-key" in result.stdout
    missing = ctl(env, "env", "--show-key", "--config-dir", str(config_dir))
    assert missing.returncode == 1
    assert f"no key file at {key_file}" in missing.stderr

    key_file.write_text("LITELLM_MASTER_KEY=sk-it's-$secret\n")
    key_file.chmod(0o600)
    shown = ctl(env, "env", "--show-key", "--config-dir", str(config_dir))
    assert shown.returncode == 0, shown.stderr
    script = shown.stdout + 'printf "%s|%s" "$OPENAI_BASE_URL" "$OPENAI_API_KEY"\n'
    evaluated = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, check=True, timeout=10
    )
    assert evaluated.stdout == "http://127.0.0.1:4100/v1|sk-it's-$secret"


# -- completion and the man page -----------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(tmp_path: Path, shell: str) -> None:
    result = ctl(scratch_env(tmp_path), "completion", shell)
    assert result.returncode == 0, result.stderr
    assert "diversityctl" in result.stdout
    assert "_DIVERSITYCTL_COMPLETE" in result.stdout


def test_completion_answers(tmp_path: Path) -> None:
    env = {
        **scratch_env(tmp_path),
        "COMP_WORDS": "diversityctl unin",
        "COMP_CWORD": "1",
        "_DIVERSITYCTL_COMPLETE": "bash_complete",
    }
    result = ctl(env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["plain,uninstall"]


def test_the_man_page(tmp_path: Path) -> None:
    page = tmp_path / "diversityctl.1"
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "packaging" / "make-manpage.py"), "-o", str(page)],
        check=True,
        timeout=60,
        env={**os.environ, "SOURCE_DATE_EPOCH": "1767225600"},
    )
    troff = page.read_text()
    assert troff.startswith('.TH DIVERSITYCTL 1 "2026-01-01"')
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "EXIT STATUS", "FILES"):
        assert f"\n.SH {heading}\n" in troff
    for command in ("install", "uninstall", "env", "completion", "validate", "status"):
        assert f"\n.SS {command}\n" in troff
    assert "\\-\\-dry\\-run" in troff
    if shutil.which("man") is None:
        return
    shown = subprocess.run(
        ["man", "-l", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MANWIDTH": "100", "MANPAGER": "cat", "PAGER": "cat"},
        check=True,
    )
    assert "DIVERSITYCTL(1)" in shown.stdout
    assert "--keep-gpu-layers" in shown.stdout.replace("\u2010", "-")


# -- discovery ------------------------------------------------------------------------------


def test_unit_directories_in_systemds_order(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
    (first / "llama.service").write_text("[Service]\nExecStart=/opt/llama-server --port 1\n")
    (second / "llama.service").write_text("[Service]\nExecStart=/opt/llama-server --port 2\n")
    (second / "llama.service.d").mkdir()
    (second / "llama.service.d" / "port.conf").write_text("[Service]\nEnvironment=X=1\n")
    (second / "web.service").write_text("[Service]\nExecStart=/usr/bin/nginx\n")
    (second / "diversityd-x.service").write_text("[Service]\nExecStart=/opt/llama-server\n")
    (unit,) = read_units([first, second], "user")
    assert (unit.name, unit.path) == ("llama.service", str(first / "llama.service"))
    assert [path for path, _ in unit.drop_ins] == [str(second / "llama.service.d" / "port.conf")]
    env = {"HOME": "/h", "SYSTEMD_UNIT_PATH": "/x:/y:"}
    dirs = [str(p) for p in user_unit_dirs(env)]
    assert dirs[:3] == ["/x", "/y", "/h/.config/systemd/user"]
    assert "/usr/lib/systemd/user" in dirs


def test_the_interpreter_of_a_console_script(tmp_path: Path) -> None:
    script = tmp_path / "litellm"
    script.write_text("#!/opt/venv/bin/python3\nimport sys\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    assert interpreter_of(str(script), None) == "/opt/venv/bin/python3"
    assert interpreter_of("litellm", str(tmp_path)) == "/opt/venv/bin/python3"
    assert interpreter_of("/nowhere/litellm", None) is None


def test_who_listens_on_a_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        found = listening_holders([port])
    assert [h.pid for h in found[port]] == [os.getpid()]
    assert unit_of_pid(os.getpid()) is None or unit_of_pid(os.getpid()).endswith(".service")  # type: ignore[union-attr]
