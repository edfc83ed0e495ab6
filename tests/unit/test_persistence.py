"""What outlives the daemon (issue 10): the state file's format, the choices made from it
at start, revival backoff, intent, history order. Pure, or plain files in tmp_path."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

from diversityd.adapters.litellm import GatewayFiles
from diversityd.gpuplan import GpuSettings
from diversityd.persisted import (
    FORMAT_VERSION,
    Persisted,
    Revival,
    dump_persisted,
    load_persisted,
)
from diversityd.reconcile import (
    ModelTarget,
    choose_accepted,
    gave_up,
    revival_delay_s,
    rewritten_in_place,
    stopped_on_purpose,
    units_to_retire,
)
from diversityd.state import ProviderState, UnitSnapshot, start_overdue
from diversityd.units import command_line, exec_start_args, model_file_of

GOOD = ModelTarget("/m/active/current.gguf", ("/m/active/current.gguf", "/m/a.gguf"),
                   "/m/a.gguf", (1, 2, 3, 4))  # fmt: skip
BAD = ModelTarget("/m/active/current.gguf", ("/m/active/current.gguf", "/m/x.gguf"),
                  "/m/x.gguf", (1, 5, 3, 4), "/m/x.gguf: not a GGUF file")  # fmt: skip


def full_state() -> Persisted:
    return Persisted(
        accepted_models={GOOD.path: GOOD},
        pending_rolls={"llama_cpp_native": "ab" * 32},
        stopped_by_user=frozenset({"vllm"}),
        revivals={"ollama": Revival(3, 1_800_000_000.5, "unit failed (exit-code)")},
        gpu_settings={
            "llama_cpp_native": GpuSettings(
                "llama_cpp_native",
                33,
                False,
                vram_bytes=5 << 30,
                warnings=("w",),
                server="llama-server",
                gpu=0,
            )
        },
        gateway_pin="000004-20261130T101010000000Z-0123abcd",
    )


def test_the_state_file_round_trips_everything_it_keeps() -> None:
    state = full_state()
    text = dump_persisted(state)
    assert json.loads(text)["version"] == FORMAT_VERSION
    again, problems = load_persisted(text)
    assert problems == []
    assert again == state


def test_a_refused_target_is_never_written_as_accepted() -> None:
    text = dump_persisted(Persisted(accepted_models={BAD.path: BAD}))
    assert load_persisted(text)[0].accepted_models == {}


def test_a_damaged_file_is_reported_and_the_rest_still_counts() -> None:
    document = json.loads(dump_persisted(full_state()))
    document["revivals"] = {"ollama": {"attempts": "many"}}
    state, problems = load_persisted(json.dumps(document))
    assert state.revivals == {}
    assert state.stopped_by_user == {"vllm"}
    assert len(problems) == 1
    assert "revivals" in problems[0]
    for garbage in ("{not json", "[1, 2]", ""):
        state, problems = load_persisted(garbage)
        assert state == Persisted()
        assert problems


def test_an_older_file_reads_and_a_newer_one_reads_what_it_knows() -> None:
    old = json.dumps({"version": 1, "stopped_by_user": ["vllm"]})
    state, problems = load_persisted(old)
    assert (state.stopped_by_user, problems) == ({"vllm"}, [])
    newer = json.dumps({"version": FORMAT_VERSION + 1, "gateway_pin": "p", "future": {"x": 1}})
    state, problems = load_persisted(newer)
    assert state.gateway_pin == "p"
    assert any("newer" in p for p in problems)


def test_a_bad_link_at_start_keeps_the_target_accepted_before() -> None:
    assert choose_accepted(BAD, GOOD) == GOOD  # issue 10, scenario 1
    assert choose_accepted(BAD, None) is None
    moved = ModelTarget(GOOD.path, GOOD.hops, "/m/b.gguf", (1, 9, 3, 4))
    assert choose_accepted(moved, GOOD) == moved


def test_the_accepted_model_is_read_back_from_the_unit_file() -> None:
    args = ["/opt/llama server/bin/llama-server", "--model", "/m/100% $HOME.gguf", "--port", "8"]
    text = f"[Service]\nType=exec\nExecStart={command_line(args)}\nRestart=on-failure\n"
    assert exec_start_args(text) == args
    assert model_file_of(text) == "/m/100% $HOME.gguf"
    assert model_file_of("[Service]\nExecStart=/bin/ollama serve\n") is None
    assert exec_start_args("[Unit]\n") is None


def test_removed_providers_are_stopped_before_their_files_go() -> None:
    on_disk = ["diversityd-old.service", "diversityd-kept.service"]
    assert units_to_retire(on_disk, {"diversityd-kept.service"}) == ["diversityd-old.service"]


def test_only_an_outside_stop_of_a_running_unit_is_the_users_word() -> None:
    ready, stopped = ProviderState.READY, ProviderState.STOPPED
    assert stopped_on_purpose(ready, stopped, ours=False, busy=False, clean=True)
    assert stopped_on_purpose(ProviderState.DOWN, stopped, ours=False, busy=False, clean=True)
    # a reload or a drill; a job's restart; the inactive step of systemd's own Restart=
    assert not stopped_on_purpose(ready, stopped, ours=True, busy=False, clean=True)
    assert not stopped_on_purpose(ready, stopped, ours=False, busy=True, clean=True)
    assert not stopped_on_purpose(ProviderState.DOWN, stopped, ours=False, busy=False, clean=False)
    failed = ProviderState.FAILED
    assert not stopped_on_purpose(failed, stopped, ours=False, busy=False, clean=True)
    assert not stopped_on_purpose(ready, failed, ours=False, busy=False, clean=True)


def test_systemd_gave_up_only_when_failed_stays() -> None:
    assert not gave_up(ProviderState.FAILED, 10.0, 10.2)  # the instant before a Restart=
    assert gave_up(ProviderState.FAILED, 10.0, 12.0)
    assert not gave_up(ProviderState.DOWN, 10.0, 20.0)
    assert not gave_up(ProviderState.FAILED, None, 20.0)


def test_revivals_back_off_from_the_initial_delay_to_the_cap() -> None:
    delays = [revival_delay_s(n, 10, 300) for n in range(7)]
    assert delays == [10, 20, 40, 80, 160, 300, 300]
    assert revival_delay_s(10_000, 10, 300) == 300


def test_no_process_stays_starting_for_ever() -> None:
    began = UnitSnapshot.from_properties(
        "u", {"ActiveState": "active", "MainPID": 5, "ActiveEnterTimestamp": 1_000_000_000}
    )
    assert not start_overdue(began, 1_000 + 299, 300)
    assert start_overdue(began, 1_000 + 301, 300)
    assert not start_overdue(None, 1e9, 300)


def test_history_keeps_the_newest_even_after_the_clock_steps_back(tmp_path: Path) -> None:
    files = GatewayFiles(tmp_path, keep=2)
    first = files.archive("one: 1\n")
    second = files.archive("two: 2\n")
    past = datetime(2020, 1, 1, tzinfo=UTC)
    with mock.patch("diversityd.adapters.litellm.datetime", wraps=datetime) as clock:
        clock.now.return_value = past  # issue 10, scenario 9: the clock stepped back
        third = files.archive("three: 3\n")
    kept = [e.id for e in files.history()]
    assert kept == [third.id, second.id]
    assert not first.path.exists()
    assert files.find(third.id) == files.history()[0]


def test_history_written_by_an_older_version_sorts_before_numbered_entries(
    tmp_path: Path,
) -> None:
    files = GatewayFiles(tmp_path, keep=5)
    files.history_dir.mkdir(parents=True)
    (files.history_dir / "20991231T235959000000Z-0123abcd.yaml").write_text("old: 1\n")
    new = files.archive("new: 1\n")
    assert files.history()[0].id == new.id


def test_the_accepted_file_rewritten_in_place_is_told_from_a_re_point() -> None:
    half = ModelTarget(GOOD.path, GOOD.hops, GOOD.target, (1, 2, 9, 9), "truncated")
    assert rewritten_in_place(GOOD, half)
    elsewhere = ModelTarget(GOOD.path, BAD.hops, BAD.target, BAD.identity, BAD.error)
    assert not rewritten_in_place(GOOD, elsewhere)  # a bad re-point: refused, not held
    assert not rewritten_in_place(None, half)
    whole = ModelTarget(GOOD.path, GOOD.hops, GOOD.target, (1, 2, 9, 9))
    assert not rewritten_in_place(GOOD, whole)  # whole again: accepted, not held
