"""Links: rates, time-of-day windows in the link's time zone, and the sharing of a budget by class
(sendense.links). Every expected number is computed by hand in the comment beside it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from sendense.links import Demand, LinkSpec, Weights, allocate, budget_at, demand_of, parse_rate, show_rate
from sendense.spec import format_validation_error

M = 1_000_000  # 1 MB/s


def rates(budget: int | None, *demands: Demand, weights: Weights | None = None) -> dict[str, int | None]:
    return {k: g.rate for k, g in allocate(budget, list(demands), weights).items()}


# ----------------------------------------------------------------------------------- allocate


def test_three_classes_share_by_weight() -> None:
    got = allocate(30 * M, [Demand("c", "critical"), Demand("n", "normal"), Demand("l", "low")])
    # 30 x 50/100, 30 x 30/100, 30 x 20/100
    assert {k: g.rate for k, g in got.items()} == {"c": 15 * M, "n": 9 * M, "l": 6 * M}
    assert {k: g.share for k, g in got.items()} == {"c": 0.5, "n": 0.3, "l": 0.2}


def test_a_class_without_copies_leaves_its_share_to_the_others() -> None:
    # no critical copy: 30 x 30/50 and 30 x 20/50
    assert rates(30 * M, Demand("n", "normal"), Demand("l", "low")) == {"n": 18 * M, "l": 12 * M}
    assert rates(30 * M, Demand("l", "low")) == {"l": 30 * M}


def test_a_capped_copy_leaves_the_rest_to_the_other_classes_by_weight() -> None:
    # critical capped at 5: the other 25 split 30:20 -> 15 and 10
    got = rates(30 * M, Demand("c", "critical", 5 * M), Demand("n", "normal"), Demand("l", "low"))
    assert got == {"c": 5 * M, "n": 15 * M, "l": 10 * M}


def test_a_class_shares_equally_among_its_copies() -> None:
    # critical 80 x 50/80 = 50; normal 80 x 30/80 = 30, two copies of 15
    got = rates(80 * M, Demand("c", "critical"), Demand("n1", "normal"), Demand("n2", "normal"))
    assert got == {"c": 50 * M, "n1": 15 * M, "n2": 15 * M}


def test_a_capped_copy_leaves_its_rest_to_its_own_class_first() -> None:
    # normal's 30 of 100: n1 capped at 5, n2 takes the other 25; critical and low keep 50 and 20
    got = rates(
        100 * M,
        Demand("c", "critical"),
        Demand("n1", "normal", 5 * M),
        Demand("n2", "normal"),
        Demand("l", "low"),
    )
    assert got == {"c": 50 * M, "n1": 5 * M, "n2": 25 * M, "l": 20 * M}


def test_a_class_capped_below_its_share_gives_the_rest_to_the_others() -> None:
    # normal would get 77 x 0.3 = 23.1 but is capped at 7; the other 70 split 50:20 -> 50 and 20
    got = rates(77 * M, Demand("c", "critical"), Demand("n", "normal", 7 * M), Demand("l", "low"))
    assert got == {"c": 50 * M, "n": 7 * M, "l": 20 * M}


def test_caps_cascade() -> None:
    # critical 10 (cap < 50), then normal 10 (cap < 90 x 30/50 = 54), low takes the 80 left
    got = rates(100 * M, Demand("c", "critical", 10 * M), Demand("n", "normal", 10 * M), Demand("l", "low"))
    assert got == {"c": 10 * M, "n": 10 * M, "l": 80 * M}


def test_a_cap_above_the_share_changes_nothing() -> None:
    got = rates(100 * M, Demand("c", "critical", 60 * M), Demand("n", "normal"), Demand("l", "low"))
    assert got == {"c": 50 * M, "n": 30 * M, "l": 20 * M}


def test_everything_capped_leaves_the_budget_unused() -> None:
    got = allocate(100 * M, [Demand("c", "critical", 10 * M), Demand("l", "low", 5 * M)])
    assert {k: g.rate for k, g in got.items()} == {"c": 10 * M, "l": 5 * M}
    assert got["c"].share == 0.1


def test_configured_weights() -> None:
    # 60:30:10 of 100
    w = Weights(critical=60, normal=30, low=10)
    got = rates(100 * M, Demand("c", "critical"), Demand("n", "normal"), Demand("l", "low"), weights=w)
    assert got == {"c": 60 * M, "n": 30 * M, "l": 10 * M}


def test_an_unlimited_budget_grants_each_its_cap() -> None:
    got = allocate(None, [Demand("c", "critical", 5 * M), Demand("n", "normal")])
    assert {k: (g.rate, g.share) for k, g in got.items()} == {"c": (5 * M, None), "n": (None, None)}


def test_grants_never_exceed_the_budget() -> None:
    ds = [Demand(f"d{i}", ("critical", "normal", "low")[i % 3]) for i in range(7)]
    got = allocate(10_000_001, ds)
    assert sum(g.rate or 0 for g in got.values()) <= 10_000_001
    assert sum(g.rate or 0 for g in got.values()) >= 10_000_001 - len(ds)


# ----------------------------------------------------------------------------- time of day


def berlin(*windows: dict[str, object], rate: object = "400Mbit") -> LinkSpec:
    return LinkSpec.model_validate(
        {"name": "wan", "rate": rate, "timezone": "Europe/Berlin", "windows": list(windows)}
    )


DAY = {"start": "08:00", "end": "18:00", "rate": "200Mbit"}


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("utc", "expected"),
    [
        ("2024-07-01T06:30:00", 25 * M),  # 08:30 CEST (UTC+2): inside
        ("2024-01-15T06:30:00", 50 * M),  # 07:30 CET (UTC+1): before the window
        ("2024-01-15T07:00:00", 25 * M),  # 08:00 CET: the start is inside
        ("2024-07-01T06:00:00", 25 * M),  # 08:00 CEST
        ("2024-07-01T05:59:59", 50 * M),  # 07:59:59 CEST
        ("2024-07-01T15:59:59", 25 * M),  # 17:59:59 CEST
        ("2024-07-01T16:00:00", 50 * M),  # 18:00 CEST: the end is outside
        ("2024-01-15T16:30:00", 25 * M),  # 17:30 CET: inside
        ("2024-01-15T17:00:00", 50 * M),  # 18:00 CET
    ],
)
def test_a_day_window_in_the_links_time_zone(utc: str, expected: int) -> None:
    assert budget_at(berlin(DAY), at(utc)) == expected


def test_a_window_across_midnight_and_unlimited_nights() -> None:
    link = berlin({"start": "22:00", "end": "06:00", "rate": "unlimited"}, DAY)
    # January: CET, UTC+1
    assert budget_at(link, at("2024-01-15T21:00:00")) is None  # 22:00
    assert budget_at(link, at("2024-01-15T20:59:59")) == 50 * M  # 21:59:59
    assert budget_at(link, at("2024-01-16T04:59:59")) is None  # 05:59:59
    assert budget_at(link, at("2024-01-16T05:00:00")) == 50 * M  # 06:00
    assert budget_at(link, at("2024-01-16T08:00:00")) == 25 * M  # 09:00


def test_days_a_window_starts_on() -> None:
    link = berlin(
        {**DAY, "days": "mon-fri"},
        {"start": "22:00", "end": "06:00", "rate": "800Mbit", "days": ["fri"]},
    )
    assert budget_at(link, at("2024-07-05T08:00:00")) == 25 * M  # Friday 10:00 CEST
    assert budget_at(link, at("2024-07-06T08:00:00")) == 50 * M  # Saturday 10:00: no window
    assert budget_at(link, at("2024-07-05T21:00:00")) == 100 * M  # Friday 23:00
    assert budget_at(link, at("2024-07-06T01:00:00")) == 100 * M  # Saturday 03:00: Friday's night
    assert budget_at(link, at("2024-07-05T01:00:00")) == 50 * M  # Friday 03:00: Thursday's night: none


def test_dst_change_day() -> None:
    # 2024-03-31 in Berlin: 02:00 CET becomes 03:00 CEST
    link = berlin({"start": "01:00", "end": "04:00", "rate": "100Mbit"})
    assert budget_at(link, at("2024-03-31T00:30:00")) == 12_500_000  # 01:30 CET
    assert budget_at(link, at("2024-03-31T01:30:00")) == 12_500_000  # 03:30 CEST
    assert budget_at(link, at("2024-03-31T02:00:00")) == 50 * M  # 04:00 CEST


def test_the_first_window_listed_wins_and_naive_times_are_refused() -> None:
    link = berlin({"start": "09:00", "end": "10:00", "rate": "10Mbit"}, DAY)
    assert budget_at(link, at("2024-07-01T07:30:00")) == 1_250_000  # 09:30 CEST: both match
    with pytest.raises(ValueError):
        budget_at(link, datetime(2024, 7, 1, 9, 30))


def test_seconds_in_window_bounds() -> None:
    link = LinkSpec(name="l", rate=None, windows=[{"start": "12:00:05", "end": "12:00:10", "rate": 2 * M}])
    base = at("2024-07-01T12:00:00")
    assert [budget_at(link, base + timedelta(seconds=s)) for s in (4, 5, 9, 10)] == [None, 2 * M, 2 * M, None]


# ------------------------------------------------------------------------------ the spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("400Mbit", 50 * M),
        ("200 Mbit/s", 25 * M),
        ("50MB", 50 * M),
        ("20MiB", 20 << 20),
        ("1.5Gbit", 187_500_000),
        ("12345", 12345),
        (12345, 12345),
        ("unlimited", None),
    ],
)
def test_rates(text: object, expected: int | None) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rate": "fast"}, "rate: not a rate"),
        ({"rate": "10 parsecs"}, "rate: not a rate"),
        ({"rate": 1000}, "rate: a rate must be 125000 bytes/s"),
        ({"timezone": "Mars/Olympus"}, "timezone: not an IANA time zone"),
        ({"timezone": "../../etc/passwd"}, "timezone: not an IANA time zone"),
        (
            {"windows": [{"start": "25:00", "end": "06:00", "rate": None}]},
            "windows.0.start: not a time of day",
        ),
        (
            {"windows": [{"start": "08:00", "end": "08:00", "rate": None}]},
            "windows.0: a window's start and end",
        ),
        ({"windows": [{"start": "08:00", "end": "18:00"}]}, "windows.0.rate: field required"),
        ({"windows": [{**DAY, "days": ["mon", "someday"]}]}, "windows.0.days.1:"),
        ({"weights": {"critical": 0}}, "weights.critical: Input should be greater than or equal to 1"),
        ({"weights": {"urgent": 5}}, "weights.urgent: unknown field"),
        ({"name": "WAN!"}, "name: must be 1-63 chars"),
        ({"colour": "red"}, "colour: unknown field"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as ei:
        LinkSpec.model_validate({"name": "wan", **data})
    assert format_validation_error(ei.value).startswith(message), format_validation_error(ei.value)


def test_show_rate() -> None:
    assert [show_rate(r) for r in (None, 50 * M, 25 * M, 125_000 * 10_000, 1000)] == [
        "unlimited",
        "400 Mbit/s",
        "200 Mbit/s",
        "10 Gbit/s",
        "1000 B/s",
    ]


def test_demand_of_a_copy_that_was_not_held_back() -> None:
    # held back 0.2 s of 1 s: it wants more (None); not held back: 1.25 x what it moved, at least 1 MiB/s
    assert demand_of(4 * M, 1.0, 0.2) is None
    assert demand_of(4 * M, 1.0, None) is None
    assert demand_of(4 * M, 1.0, 0.0) == 5 * M
    assert demand_of(8 * M, 2.0, 0.01) == 5 * M
    assert demand_of(0, 1.0, 0.0) == 1 << 20
    assert demand_of(0, 0.0, 0.0) is None
