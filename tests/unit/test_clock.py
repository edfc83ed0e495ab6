"""The clock fleet decisions read (issue 21): the machine's time plus a settable offset,
since the lab's hosts share one kernel clock and skew can be made nowhere else."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from diversityd import clock


@pytest.fixture
def restored_offset() -> Iterator[None]:
    before = clock.offset()
    try:
        yield
    finally:
        clock.set_offset(before)


def test_no_offset_is_the_machines_time(restored_offset: None) -> None:
    clock.set_offset(0)
    before = time.time()
    reading = clock.now()
    assert before <= reading <= time.time()


def test_an_offset_shifts_now_and_not_monotonic(restored_offset: None) -> None:
    clock.set_offset(-30.5)
    assert clock.offset() == -30.5
    assert abs(clock.now() - (time.time() - 30.5)) < 1.0
    assert abs(clock.monotonic() - time.monotonic()) < 1.0


@pytest.mark.parametrize(
    ("text", "expected"), [(None, 0.0), ("", 0.0), (" ", 0.0), ("2.5", 2.5), ("-7", -7.0)]
)
def test_offsets_parse(text: str | None, expected: float) -> None:
    assert clock.parse_offset(text) == expected


@pytest.mark.parametrize("text", ["soon", "nan", "inf", "-inf", "1e12"])
def test_a_bad_offset_is_refused_by_name(text: str) -> None:
    with pytest.raises(ValueError, match=clock.OFFSET_ENV):
        clock.parse_offset(text)


def test_the_environment_sets_a_process_offset() -> None:
    script = (
        "import time; from diversityd import clock; "
        "print(clock.offset(), clock.now() - time.time())"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={clock.OFFSET_ENV: "120", "PYTHONPATH": ":".join(sys.path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    offset, difference = (float(word) for word in result.stdout.split())
    assert offset == 120.0
    assert 119.0 < difference < 121.0
