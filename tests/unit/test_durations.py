"""``agent/durations.py``: Go-style duration strings and plain seconds in, short Go form out, pydantic type.

Go's own ``time.ParseDuration`` (``tests/oracles/duration``) is the oracle for the grammar where ``go`` is
installed.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from modelherd.agent.durations import Duration, format_duration, parse_duration
from pydantic import BaseModel, ValidationError

ORACLE_DIR = Path(__file__).resolve().parent.parent / "oracles" / "duration"
MAX_NS = 2**63 - 1


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("10m", 600.0),
        ("6h", 21600.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("2h45m30.5s", 9930.5),
        ("1m1m", 120.0),  # Go allows a unit twice and sums
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("250μs", 0.00025),
        ("7ns", 7e-9),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("+5s", 5.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("0h0m", 0.0),
        ("90", 90.0),
        ("2.5", 2.5),
        ("+3", 3.0),
        ("  10m \n", 600.0),
        (0, 0.0),
        (45, 45.0),
        (0.3, 0.3),
        (1.5, 1.5),
    ],
)
def test_parse_duration_accepts_go_strings_and_plain_seconds(value: str | int | float, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", "''"),
        ("   ", "'   '"),
        ("-1s", "negative"),
        ("-5", "negative"),
        ("-0.5", "negative"),
        (-1, "negative"),
        (-0.001, "negative"),
        ("abc", "'abc'"),
        ("1d", "'1d'"),  # Go has no days
        ("10M", "'10M'"),  # units are case-sensitive
        ("1H", "'1H'"),
        ("1h 30m", "'1h 30m'"),
        ("1h-30m", "'1h-30m'"),
        (".s", "'.s'"),
        ("s", "'s'"),
        ("1..5s", "'1..5s'"),
        ("1e3", "'1e3'"),
        ("1_000s", "'1_000s'"),
        ("nan", "'nan'"),
        ("inf", "'inf'"),
        ("++1s", "'++1s'"),
        ("10m!", "'10m!'"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (True, "True"),
        (None, "None"),
        (["10m"], "['10m']"),
        ("2562048h", "too long"),  # Go's Duration ends at 2562047h47m16.854775807s
        (10**12, "too long"),
    ],
)
def test_parse_duration_rejects_with_the_value_named(value: object, words: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(value)  # type: ignore[arg-type]
    assert words in str(caught.value)


def test_the_longest_go_duration_is_accepted() -> None:
    assert parse_duration("2562047h47m16.854775807s") == MAX_NS / 1_000_000_000


def test_each_part_is_truncated_to_nanoseconds_like_go() -> None:
    assert parse_duration("1.5ns1.5ns") == 2e-9
    assert parse_duration("0.9ns") == 0.0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0, "0s"),
        (7e-9, "7ns"),
        (0.0000015, "1.5µs"),
        (0.25, "250ms"),
        (0.0015, "1.5ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (30, "30s"),
        (60, "1m"),
        (90, "1m30s"),
        (600, "10m"),
        (3600, "1h"),
        (5400, "1h30m"),
        (3601, "1h1s"),
        (3661.25, "1h1m1.25s"),
        (86400, "24h"),
        (-90, "-1m30s"),
        (1.0000000001, "1s"),  # below a nanosecond: rounded away
    ],
)
def test_format_duration_writes_the_short_go_form(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "10m", True])
def test_format_duration_refuses_non_numbers(bad: object) -> None:
    with pytest.raises(ValueError):
        format_duration(bad)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=MAX_NS))
def test_format_then_parse_is_the_same_float(ns: int) -> None:
    seconds = parse_duration(f"{ns}ns")
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_plain_seconds_parse_to_the_nearest_nanosecond(seconds: float) -> None:
    got = parse_duration(seconds)
    assert abs(got - seconds) <= 0.5e-9 + abs(seconds) * 1e-15
    assert parse_duration(f"{seconds:.9f}") == got, "a numeric string and the number agree"


class _Knobs(BaseModel):
    resync: Duration = 600.0
    timeout: Duration


def test_duration_is_a_pydantic_field_type() -> None:
    assert _Knobs(timeout="1h30m").timeout == 5400.0
    assert _Knobs(timeout=15).timeout == 15.0
    assert _Knobs(timeout="15").timeout == 15.0
    assert _Knobs(timeout="2m", resync="500ms").resync == 0.5
    with pytest.raises(ValidationError) as caught:
        _Knobs(timeout="10 minutes")
    assert "10 minutes" in str(caught.value)
    with pytest.raises(ValidationError):
        _Knobs(timeout="-1s")


# -- Go's time.ParseDuration as the oracle ---------------------------------------------------------

TOKENS = ["0", "1", "5", "10", "42", "007", "9223372036", "854775807", ".", ".", "s", "m", "h", "ms", "us", "µs",
          "μs", "ns", "d", "M", "+", "-", "e", " ", "x", "mm", "1.5", ".25"]


def _random_inputs(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        out.append("".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 6))))
    return out


@pytest.fixture(scope="module")
def go_parse(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], list[int | None]]:
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not installed: the Go oracle cannot run")
    binary = tmp_path_factory.mktemp("oracle") / "duration"
    subprocess.run([go, "build", "-o", str(binary), "main.go"], cwd=ORACLE_DIR, check=True, timeout=180,
                   capture_output=True)

    def run(lines: list[str]) -> list[int | None]:
        done = subprocess.run([str(binary)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                              check=True, timeout=60)
        return [None if r == "ERR" else int(r) for r in done.stdout.splitlines()]

    return run


def test_go_strings_parse_exactly_as_go_parses_them(go_parse: Callable[[list[str]], list[int | None]]) -> None:
    inputs = [s for s in _random_inputs(20_000, seed=9) if s == s.strip()]
    expected = go_parse(inputs)
    assert len(expected) == len(inputs)
    checked_ok = checked_err = 0
    for text, go_ns in zip(inputs, expected, strict=True):
        try:
            ours: float | None = parse_duration(text)
        except ValueError:
            ours = None
        plain_number = go_ns is None and ours is not None and text.lstrip("+").replace(".", "", 1).isdigit()
        if plain_number:
            continue  # our extension: "90" is 90 s where Go wants a unit
        if text.startswith("-"):
            assert ours is None, text  # negative: Go may accept it, we refuse
            continue
        if go_ns is None:
            assert ours is None, f"{text!r}: Go refuses it, we returned {ours}"
            checked_err += 1
        else:
            assert ours is not None, f"{text!r}: Go accepts it ({go_ns} ns), we refused"
            assert ours == go_ns / 1_000_000_000, f"{text!r}: Go says {go_ns} ns, we say {ours} s"
            checked_ok += 1
    assert checked_ok > 500 and checked_err > 500  # the generator reaches both sides
