"""The one status document: built typed, printed as the table."""

from __future__ import annotations

from datetime import UTC, datetime

from diversityd.state import ProbeOutcome, ProbeResult
from diversityd.statusdoc import (
    NO_GPU_STATUS,
    ProviderStatus,
    StatusDocument,
    format_status,
    probe_status,
    uptime,
)


def provider(name: str, **more: object) -> ProviderStatus:
    entry: ProviderStatus = {
        "name": name,
        "owned": True,
        "unit": f"diversityd-{name}.service",
        "state": "ready",
        "pid": 42,
        "since": None,
        "models": ["m"],
        "probe": probe_status(
            ProbeResult(ProbeOutcome.OK, 10.0, 7.4, None, frozenset({"m"})), 12.0
        ),
        "n_gpu_layers": 33,
        "vram_mib": 5120,
        "gpu_warnings": [],
        "error": None,
        "type": "llama_cpp",
        "base_url": "http://127.0.0.1:8080",
        "state_since": None,
        "restarts": 0,
        "last_unit_event_monotonic": None,
        "last_state_change_monotonic": None,
        "last_exit_monotonic": None,
        "left_ready_monotonic": None,
        "models_missing": [],
        "models_extra": [],
        "model_file": None,
        "stopped_by_user": False,
        "revival": None,
    }
    entry.update(more)  # type: ignore[typeddict-item]
    return entry


def document(*providers: ProviderStatus, running: bool = True) -> StatusDocument:
    return {
        "daemon": {
            "running": running,
            "reason": None if running else "diversityd is not running on the user bus",
            "pid": 7 if running else None,
            "version": "0.1.0",
            "since": "2026-11-30T00:00:00+00:00" if running else None,
            "config_dir": "/c",
            "unit_dir": "/u",
            "host": "box",
            "last_reload": None,
            "jobs_running": [],
            "unit_files_error": None,
        },
        "providers": list(providers),
        "gpus": NO_GPU_STATUS,
        "gateway": {"owned": False, "state": "unknown"},
    }


def test_the_table_shows_every_provider_and_what_is_wrong() -> None:
    text = format_status(
        document(
            provider("native"),
            provider(
                "python",
                state="failed",
                pid=None,
                probe=None,
                error="unit failed (exit-code)",
                n_gpu_layers=None,
                vram_mib=None,
                model_file={"path": "/l", "target": "/m/a.gguf", "error": "truncated"},
            ),
        )
    )
    lines = text.splitlines()
    assert lines[0].split() == [
        "PROVIDER", "UNIT", "STATE", "PID", "UPTIME", "PROBE", "IN-FLIGHT", "MODELS", "GPU",
        "LAYERS", "VRAM",
    ]  # fmt: skip
    assert lines[1].split()[:4] == ["native", "diversityd-native.service", "ready", "42"]
    assert "ok 7ms" in lines[1]
    assert "5120 MiB" in lines[1]
    assert lines[2].split()[:4] == ["python", "diversityd-python.service", "failed", "-"]
    assert "daemon: running (pid 7" in text
    assert "  python: unit failed (exit-code)" in text
    assert "model file refused: truncated (still serving /m/a.gguf)" in text
    assert "gateway: unknown (not owned)" in text


def test_a_daemon_that_is_down_says_why() -> None:
    text = format_status(document(provider("native"), running=False))
    assert "daemon: DOWN (diversityd is not running on the user bus)" in text


def test_uptime_is_short_and_human() -> None:
    now = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
    assert uptime("2026-11-30T11:59:30+00:00", now) == "30s"
    assert uptime("2026-11-30T11:58:00+00:00", now) == "2m00s"
    assert uptime("2026-11-29T10:00:00+00:00", now) == "1d2h"
    assert uptime(None, now) == "-"
    assert uptime("2026-11-30T12:00:30+00:00", now) == "-"
