"""What outlives the daemon (issue 10): the state file's format, the choices made from it
at start, revival backoff, intent, history order. Pure, or plain files in tmp_path."""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diversityd.adapters.litellm import GatewayFiles
from diversityd.daemon.statefile import StateFile
from diversityd.gpuplan import GpuSettings
from diversityd.persisted import (
    FORMAT_VERSION,
    MAX_STATE_BYTES,
    Persisted,
    Revival,
    dump_persisted,
    load_persisted,
    revival_in_memory,
    revival_on_disk,
)
from diversityd.reconcile import (
    ModelTarget,
    RevivalPlan,
    choose_accepted,
    down_for_good,
    gave_up,
    revival_delay_s,
    rewritten_in_place,
    stopped_by_user,
    stops_unit,
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


def test_only_a_stop_job_diversityd_did_not_make_is_the_users_word() -> None:
    """Issue 20, point 1: a process that ended by itself (exit 0, a SIGTERM from outside:
    `success` to systemd) made no job and is no stop of the user's."""
    assert stopped_by_user(stop_job=True, ours=False, result="done")
    assert not stopped_by_user(stop_job=True, ours=True, result="done")  # a reload, a drill
    assert not stopped_by_user(stop_job=True, ours=False, result="canceled")  # a start won
    assert not stopped_by_user(stop_job=False, ours=False, result="done")  # a restart job
    # the job's type when it was read in time, else what the job left behind
    assert stops_unit("stop", "active")
    assert not stops_unit("restart", "inactive")  # a restart's stop phase is no stop job
    assert not stops_unit("start", "inactive")
    assert stops_unit(None, "inactive")
    assert stops_unit(None, "failed")
    assert not stops_unit(None, "active")
    assert not stops_unit(None, "activating")


def test_a_unit_is_down_for_good_when_failed_or_ended_and_settled() -> None:
    for state in (ProviderState.FAILED, ProviderState.STOPPED):
        assert not down_for_good(state, 10.0, 10.2)  # the instants of systemd's Restart=
        assert down_for_good(state, 10.0, 12.0)
        assert not down_for_good(state, None, 20.0)
    for state in (ProviderState.DOWN, ProviderState.READY, ProviderState.STARTING):
        assert not down_for_good(state, 10.0, 20.0)


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


# -- issue 19, point 5: a damaged state file is never a crash ----------------------------


def a_statefile(tmp_path: Path) -> StateFile:
    return StateFile(mock.Mock(), mock.Mock(), tmp_path)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge", "not-utf8", "directory"])
def test_a_state_file_of_any_kind_is_read_in_bounded_time(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "daemon-state.json"
    if kind == "fifo":
        os.mkfifo(path)  # before: blocked the daemon's start for ever
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")  # before: read until memory ran out
    elif kind == "huge":
        path.write_text(" " * (MAX_STATE_BYTES + 1))
    elif kind == "not-utf8":
        path.write_bytes(b'{"version": 1, "gateway_pin": "\xff"}')  # before: UnicodeDecodeError
    else:
        path.mkdir()
    assert a_statefile(tmp_path).load() == Persisted()


def test_a_revival_is_read_back_onto_the_monotonic_clock_clamped() -> None:
    """Issue 20, point 5: the file keeps wall-clock times; in memory a revival is due on
    the monotonic clock, never further off than the longest backoff (a clock set back, a
    damaged file) and never in the past."""
    wall, mono = 1_800_000_000.0, 5000.0

    def back(next_at: float) -> float:
        saved = Revival(3, next_at, "x")
        plan = revival_in_memory(saved, wall_now=wall, monotonic_now=mono, max_s=300.0)
        assert (plan.attempts, plan.last_failure) == (3, "x")
        return plan.due - mono

    assert back(wall + 42.0) == pytest.approx(42.0)
    assert back(wall + 8e6) == 300.0  # clamped to revive_max_s
    assert back(wall - 3600.0) == 0.0  # due now, not an hour ago
    # and out again: the same wall-clock time, whatever the two clocks' origins
    plan = RevivalPlan(2, mono + 10.0, None)
    saved = revival_on_disk(plan, wall_now=wall, monotonic_now=mono)
    assert saved == Revival(2, wall + 10.0, None)
    again = revival_in_memory(saved, wall_now=wall + 4.0, monotonic_now=77.0, max_s=300.0)
    assert again.due == pytest.approx(77.0 + 6.0)


def test_held_servers_survive_a_restart() -> None:
    """Issue 20, point 2: a server held while its model file is rewritten in place stays
    held by a new daemon (else it started it onto half a file)."""
    state = Persisted(held={"native": "/m/a.gguf is being rewritten in place"})
    text = dump_persisted(state)
    back, problems = load_persisted(text)
    assert problems == []
    assert back.held == {"native": "/m/a.gguf is being rewritten in place"}
    damaged, problems = load_persisted('{"version": 1, "held": {"a": "ok", "b": 3}}')
    assert damaged.held == {"a": "ok"}
    assert len(problems) == 1


@pytest.mark.parametrize(
    ("section", "damage"),
    [
        # before: IndexError out of _read_models (not caught: the daemon did not start)
        ("accepted_models", {"/m/active/current.gguf": {"target": "/m/a.gguf", "identity": [1]}}),
        # before: a string where a number goes reached the unit as `--n-gpu-layers abc`
        (
            "gpu_settings",
            {"llama_cpp_native": {"provider": "x", "n_gpu_layers": "abc", "hide_gpu": False}},
        ),
        (
            "gpu_settings",
            {"llama_cpp_native": {"provider": "x", "n_gpu_layers": 1, "hide_gpu": "yes"}},
        ),
        # before: a next try in the year 10^300: never revived, and status raised on it
        ("revivals", {"ollama": {"attempts": 1, "next_at": 1e300}}),
        ("revivals", {"ollama": {"attempts": 10**400, "next_at": 1.0}}),
        ("accepted_models", {"/m/x.gguf": {"target": "relative.gguf"}}),
        ("accepted_models", {"/m/x.gguf": {"target": "/m/a.gguf\nExecStartPre=/x"}}),
        ("stopped_by_user", ["vllm", {"a": 1}]),
        ("pending_rolls", {"llama_cpp_native": ["not", "a", "sha"]}),
        ("gateway_pin", "../../etc/passwd"),
    ],
)
def test_each_damaged_entry_is_dropped_alone_and_reported(section: str, damage: Any) -> None:
    document = json.loads(dump_persisted(full_state()))
    document[section] = damage
    state, problems = load_persisted(json.dumps(document))
    assert problems
    assert all(section in problem for problem in problems)
    assert state.gateway_pin == (None if section == "gateway_pin" else full_state().gateway_pin)
    assert load_persisted(dump_persisted(state)) == (state, [])


def test_a_state_file_nested_without_end_is_not_json_to_us() -> None:
    state, problems = load_persisted("[" * 100_000)  # before: RecursionError
    assert state == Persisted()
    assert "nested too deep" in problems[0]


FIELDS = {
    "version", "accepted_models", "pending_rolls", "stopped_by_user", "revivals",
    "gpu_settings", "gateway_pin", "hops", "target", "identity", "attempts", "next_at",
    "last_failure", "provider", "n_gpu_layers", "hide_gpu", "vram_bytes", "warnings",
    "server", "gpu",
}  # fmt: skip

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["/m/a.gguf", "llama_cpp_native", "ab" * 32, "\n", ""]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.sampled_from(list(FIELDS)), children, max_size=4)
    ),
    max_leaves=20,
)


def assert_well_formed(state: Persisted) -> None:
    """Every value of the types the daemon relies on (a unit gets a layer count from it)."""
    for path, target in state.accepted_models.items():
        assert isinstance(path, str)
        assert isinstance(target.target, str)
        assert target.target.startswith("/")
        assert all(isinstance(h, str) for h in target.hops)
        assert target.identity is None or all(isinstance(n, int) for n in target.identity)
    assert all(isinstance(v, str) for v in state.pending_rolls.values())
    assert all(isinstance(n, str) for n in state.stopped_by_user)
    for revival in state.revivals.values():
        assert isinstance(revival.attempts, int)
        assert math.isfinite(revival.next_at)
        datetime.fromtimestamp(revival.next_at, UTC)  # status prints it
    for gpu in state.gpu_settings.values():
        assert gpu.n_gpu_layers is None or type(gpu.n_gpu_layers) is int
        assert isinstance(gpu.hide_gpu, bool)
        assert all(isinstance(w, str) for w in gpu.warnings)
    assert state.gateway_pin is None or isinstance(state.gateway_pin, str)


@settings(max_examples=300, deadline=None)
@given(document=JSON)
def test_any_json_at_all_is_read_without_raising(document: Any) -> None:
    state, problems = load_persisted(json.dumps(document))
    assert_well_formed(state)
    assert isinstance(problems, list)


@settings(max_examples=300, deadline=None)
@given(
    section=st.sampled_from(
        ["accepted_models", "pending_rolls", "stopped_by_user", "revivals", "gpu_settings"]
    ),
    damage=JSON,
    data=st.data(),
)
def test_a_damaged_part_of_a_good_file_is_read_without_raising(
    section: str, damage: Any, data: st.DataObject
) -> None:
    """One entry of a good file replaced by any JSON: the rest still counts."""
    document = json.loads(dump_persisted(full_state()))
    entries = document[section]
    if isinstance(entries, dict):
        name = data.draw(st.sampled_from(sorted(entries)))
        entry = entries[name]
        if isinstance(entry, dict) and data.draw(st.booleans()):
            entry[data.draw(st.sampled_from(sorted(entry)))] = damage
        else:
            entries[name] = damage
    else:
        entries.append(damage)
    state, _problems = load_persisted(json.dumps(document))
    assert_well_formed(state)
    assert state.gateway_pin == full_state().gateway_pin
