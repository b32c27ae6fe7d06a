from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from modelherd.coordination.microtime import format_microtime, now_microtime, parse_microtime


def test_format_always_has_six_fractional_digits_and_z() -> None:
    assert format_microtime(datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)) == "2024-05-01T12:00:00.000000Z"
    assert format_microtime(datetime(2024, 5, 1, 12, 0, 0, 5, tzinfo=UTC)) == "2024-05-01T12:00:00.000005Z"


def test_format_converts_other_offsets_to_utc() -> None:
    plus2 = timezone(timedelta(hours=2))
    assert format_microtime(datetime(2024, 5, 1, 1, 30, 0, 123456, tzinfo=plus2)) == ("2024-04-30T23:30:00.123456Z")


def test_format_rejects_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="naive"):
        format_microtime(datetime(2024, 5, 1, 12, 0, 0))


def test_parse_returns_aware_utc() -> None:
    got = parse_microtime("2024-05-01T12:00:00.123456Z")
    assert got == datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert got.tzinfo is UTC


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),  # metav1.Time: no fraction
        ("2024-05-01T12:00:00.5Z", datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC)),
        ("2024-05-01T12:00:00.123456789Z", datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2024-05-01T14:00:00.000001+02:00", datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=UTC)),
    ],
)
def test_parse_accepts_rfc3339_variants(text: str, expected: datetime) -> None:
    assert parse_microtime(text) == expected


@pytest.mark.parametrize("text", ["2024-05-01T12:00:00", "2024-05-01 12:00:00Z", "yesterday", ""])
def test_parse_rejects_timestamps_without_offset_or_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_microtime(text)


def test_round_trip_is_exact() -> None:
    dt = datetime(2031, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert parse_microtime(format_microtime(dt)) == dt
    now = now_microtime()
    assert format_microtime(parse_microtime(now)) == now


def test_api_client_serializes_every_datetime_with_six_digits() -> None:
    from kubernetes import client

    from tests.kube_microtime import MicroTimeApiClient

    api = MicroTimeApiClient()
    lease = client.V1Lease(
        metadata=client.V1ObjectMeta(name="x"),
        spec=client.V1LeaseSpec(renew_time=datetime(2024, 5, 1, 12, tzinfo=UTC)),
    )
    assert api.sanitize_for_serialization(lease)["spec"]["renewTime"] == "2024-05-01T12:00:00.000000Z"
    assert api.sanitize_for_serialization({"t": [datetime(2024, 5, 1, 12, 0, 0, 7, tzinfo=UTC)]}) == {
        "t": ["2024-05-01T12:00:00.000007Z"]
    }
    with pytest.raises(ValueError, match="naive"):
        api.sanitize_for_serialization({"t": datetime(2024, 5, 1, 12)})
