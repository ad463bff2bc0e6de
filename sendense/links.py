"""Site links and their bandwidth budget: what `sendense link` writes, and the pure rules that share
a link's budget among the copies that cross it (no I/O, no clock: the governor workflow,
workflows/governor.py, calls them with workflow time).

- A link has a rate (bytes/s; None = unlimited) and time-of-day windows that override it, in the
  link's own time zone (DST included): `08:00-18:00=200Mbit` on weekdays, unlimited at night.
- The budget at an instant is shared by priority class (critical, normal, low; weights 50/30/20
  by default), work-conserving: a class with no copies, or whose copies are all capped below its
  share, leaves the rest to the other classes by their weights; within a class the copies share
  equally, each within its own cap (the job's `tuning.bandwidth_limit`), the rest going to the
  class's other copies first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from sendense.models import JOB_NAME, Priority, Strict, Wire

__all__ = ["Priority", "PRIORITIES", "LinkSpec", "Window", "Weights", "budget_at", "allocate", "parse_rate"]

PRIORITIES: tuple[Priority, ...] = ("critical", "normal", "low")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

RATE_MIN, RATE_MAX = 125_000, 1 << 40  # bytes/s: 1 Mbit/s .. 1 TiB/s

# bytes per unit; bit units are decimal (a link is sold in Mbit/s), byte units as written
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "kbit": 1000 / 8,
    "mbit": 1000**2 / 8,
    "gbit": 1000**3 / 8,
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*(?:/s|ps)?\s*\Z", re.I)
_BAD_RATE = "not a rate (bytes/s, or e.g. 400Mbit, 50MB, 20MiB; 'unlimited')"


def parse_rate(value: Any) -> Any:
    """`400Mbit`, `200 Mbit/s`, `50MB`, `20MiB`, `1.5Gbit`, a plain number of bytes/s, or
    `unlimited` (None). Errors name the rule, not the value."""
    if value is None or isinstance(value, bool):
        if value is None:
            return None
        raise ValueError(_BAD_RATE)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(_BAD_RATE)
        return int(value)
    if isinstance(value, str):
        if value.strip().lower() in ("unlimited", "none", "0"):
            return None
        m = _RATE.match(value)
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            raise ValueError(_BAD_RATE)
        return int(float(m.group(1)) * _UNITS[unit])
    raise ValueError(_BAD_RATE)


def _bounded(v: int | None) -> int | None:
    if v is not None and not RATE_MIN <= v <= RATE_MAX:
        raise ValueError(f"a rate must be {RATE_MIN} bytes/s (1 Mbit/s) to {RATE_MAX} bytes/s, or unlimited")
    return v


Rate = Annotated[int | None, BeforeValidator(parse_rate), AfterValidator(_bounded)]

_TIME = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?\Z")


def parse_time(text: str) -> int:
    """`HH:MM` or `HH:MM:SS` as seconds since midnight (24:00 is the end of the day)."""
    m = _TIME.match(text.strip())
    if m is None:
        raise ValueError("not a time of day (HH:MM or HH:MM:SS)")
    h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if mi > 59 or s > 59 or h > 24 or (h == 24 and (mi or s)):
        raise ValueError("not a time of day (00:00 to 24:00)")
    return h * 3600 + mi * 60 + s


def _day_list(v: Any) -> Any:
    """`days: weekdays`, `weekend`, `mon-fri`, or a list of mon..sun."""
    if isinstance(v, str):
        word = v.strip().lower()
        if word == "weekdays":
            return list(DAYS[:5])
        if word == "weekend":
            return list(DAYS[5:])
        if "-" in word:
            a, _, b = word.partition("-")
            if a in DAYS and b in DAYS and DAYS.index(a) <= DAYS.index(b):
                return list(DAYS[DAYS.index(a) : DAYS.index(b) + 1])
        return [d.strip() for d in word.split(",")]
    return v


Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class Window(Strict):
    """A time of day with a rate of its own, in the link's time zone: from `start` (included) to `end`
    (excluded); an end at or before the start crosses midnight. `days`: the days it starts on (all
    by default)."""

    start: str
    end: str
    rate: Rate = Field(description="bytes/s in the window; None: unlimited")
    days: Annotated[list[Day] | None, BeforeValidator(_day_list)] = None

    @field_validator("start", "end")
    @classmethod
    def _time(cls, v: str) -> str:
        parse_time(v)
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> Window:
        if parse_time(self.start) >= 86400:
            raise ValueError("start: a window starts before 24:00")
        if parse_time(self.start) == parse_time(self.end):
            raise ValueError("a window's start and end are the same time (an empty window)")
        return self

    def contains(self, seconds: int, weekday: int) -> bool:
        """Whether the local wall time `seconds` since midnight on `weekday` (0 = Monday) is inside."""
        start, end = parse_time(self.start), parse_time(self.end)
        days = None if self.days is None else {DAYS.index(d) for d in self.days}
        if start < end:
            return start <= seconds < end and (days is None or weekday in days)
        # crosses midnight: the evening part on a day it starts, the morning part on the day after one
        if seconds >= start:
            return days is None or weekday in days
        return seconds < end and (days is None or (weekday - 1) % 7 in days)

    def describe(self) -> str:
        days = "" if self.days is None else f" {','.join(self.days)}"
        return f"{self.start}-{self.end}={show_rate(self.rate)}{days}"


class Weights(Strict):
    critical: int = Field(default=50, ge=1, le=1000)
    normal: int = Field(default=30, ge=1, le=1000)
    low: int = Field(default=20, ge=1, le=1000)

    def of(self, priority: str) -> int:
        return int(getattr(self, priority))


def _check_zone(v: str) -> str:
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError("not an IANA time zone (e.g. UTC, Europe/Berlin, America/New_York)") from None
    return v


class LinkSpec(Strict):
    """A site link: its budget, its time-of-day windows and how its classes share it."""

    name: str
    rate: Rate = Field(default=None, description="bytes/s outside any window; None: unlimited")
    timezone: Annotated[str, AfterValidator(_check_zone)] = Field(
        default="UTC", description="the windows' time zone (IANA)"
    )
    windows: list[Window] = Field(default_factory=list, max_length=64, description="the first that matches")
    weights: Weights = Field(default_factory=Weights)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not JOB_NAME.match(v):
            raise ValueError("must be 1-63 chars of a-z 0-9 _ - starting with a letter or digit")
        return v


def window_at(link: LinkSpec, when: datetime) -> Window | None:
    """The window in force at `when` (an aware datetime), in the link's time zone: the first listed."""
    if when.tzinfo is None:
        raise ValueError("budget_at needs an aware datetime")
    local = when.astimezone(ZoneInfo(link.timezone))
    seconds = local.hour * 3600 + local.minute * 60 + local.second
    for w in link.windows:
        if w.contains(seconds, local.weekday()):
            return w
    return None


def budget_at(link: LinkSpec, when: datetime) -> int | None:
    """The link's budget in bytes/s at `when` (None: unlimited)."""
    w = window_at(link, when)
    return link.rate if w is None else w.rate


def show_rate(rate: int | None) -> str:
    """A rate for people: `unlimited`, `200 Mbit/s` (what links are sold in), bytes/s below 1 Mbit/s."""
    if rate is None:
        return "unlimited"
    bits = rate * 8
    for unit, n in (("Gbit/s", 1000**3), ("Mbit/s", 1000**2)):
        if bits >= n:
            return f"{bits / n:.4g} {unit}"
    return f"{rate} B/s"


# ------------------------------------------------------------------------------------- sharing


@dataclass(frozen=True)
class Demand:
    """One copy asking for a share: its id (a lease holder), class and cap (bytes/s; None: none)."""

    id: str
    priority: Priority
    cap: int | None = None


@dataclass(frozen=True)
class Grant:
    rate: int | None  # bytes/s; None: unlimited
    share: float | None  # of the budget; None: the budget is unlimited


def _fill(amount: float, items: list[tuple[str, float, float | None]]) -> dict[str, float]:
    """Weighted water-filling: `amount` split among (key, weight, ceiling) items by weight, none above
    its ceiling; what a capped item cannot take goes to the others, by their weights."""
    out: dict[str, float] = {}
    active = list(items)
    left = amount
    while active:
        total = sum(w for _, w, _ in active)
        capped = [(k, w, c) for k, w, c in active if c is not None and c <= left * w / total]
        if not capped:
            for k, w, _ in active:
                out[k] = left * w / total
            break
        for k, _, c in capped:
            out[k] = float(c)  # type: ignore[arg-type]
            left -= c  # type: ignore[operator]
        active = [i for i in active if i not in capped]
    return out


def allocate(budget: int | None, demands: list[Demand], weights: Weights | None = None) -> dict[str, Grant]:
    """Each demand's grant of `budget` (bytes/s): by class weight across the classes that have
    demands, equally within a class, each within its cap; what a class or a copy cannot use goes to
    the others (work-conserving). Unlimited budget: every demand gets its cap."""
    weights = weights or Weights()
    if budget is None:
        return {d.id: Grant(rate=d.cap, share=None) for d in demands}
    classes: dict[str, list[Demand]] = {}
    for d in demands:
        classes.setdefault(d.priority, []).append(d)

    def ceiling(ds: list[Demand]) -> float | None:
        caps = [d.cap for d in ds]
        return None if any(c is None for c in caps) else float(sum(caps))  # type: ignore[arg-type]

    per_class = _fill(float(budget), [(p, weights.of(p), ceiling(ds)) for p, ds in classes.items()])
    grants: dict[str, Grant] = {}
    for p, ds in classes.items():
        within = _fill(per_class[p], [(d.id, 1.0, None if d.cap is None else float(d.cap)) for d in ds])
        for d in ds:
            rate = int(within[d.id])
            grants[d.id] = Grant(rate=rate, share=rate / budget)
    return grants


HELD_BACK = 0.05  # a copy whose throttle held it back this fraction of a report's time wants more
HEADROOM = 1.25  # a copy that was not held back is granted this much above what it moved
DEMAND_MIN = 1 << 20  # bytes/s: never less, so that a copy that just started can speed up


def demand_of(moved: int, seconds: float, waited: float | None) -> int | None:
    """What a copy can use, from its last report: None (all it gets) if its throttle held it back, or
    if it did not say; else a little more than it moved (a slow source, a copy that is mostly
    comparing): the rest of its share goes to the others, and once it is held back again (it sped
    up) it gets its whole share back at its next renewal."""
    if waited is None or seconds <= 0 or waited >= HELD_BACK * seconds:
        return None
    return max(int(moved / seconds * HEADROOM), DEMAND_MIN)


def lower_cap(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


# ------------------------------------------------------------------------ the governor's messages


class LeaseRequest(Wire):
    """A copy's lease on its link's budget, renewed every LEASE_PERIOD while it runs."""

    holder: str = Field(description="the copy: job, activity and attempt")
    job: str
    job_id: str = Field(
        default="", description="the job's unique id (a job re-created under its name differs)"
    )
    priority: str = "normal"
    cap: int | None = Field(default=None, description="the job's own limit, bytes/s")
    bytes: int = Field(default=0, ge=0, description="bytes it moved since its last lease")
    seconds: float = Field(default=0.0, ge=0, description="over how long (its own clock)")
    waited: float | None = Field(
        default=None,
        ge=0,
        description="seconds its throttle held it back meanwhile: about 0 means it moves less than its "
        "grant (a slow source) and its share goes to others; None: not said",
    )


class LeaseGrant(Wire):
    rate: int | None = Field(description="bytes/s it may move now; None: unlimited")
    share: float | None = Field(default=None, description="of the link's budget; None: unlimited budget")
    budget: int | None = None
    priority: str = Field(default="normal", description="the class it is counted in (the job's current one)")
    valid_for: float = Field(description="seconds: keep this rate no longer without a renewal")


class LeaseRelease(Wire):
    holder: str
    bytes: int = 0
    seconds: float = 0.0


class JobPriority(Wire):
    """A job's priority changed (`job settings --priority`): its running copies move class."""

    job: str
    priority: str
    job_id: str = ""


class ClassChange(Wire):
    """A job's class as `job settings --priority` last set it, and when (workflow time)."""

    priority: str
    at: datetime


class LinkChange(Wire):
    """`link set`: the whole new spec, validated by the update's validator (one line, naming the field)."""

    spec: dict[str, Any]


class HolderStatus(Wire):
    holder: str
    job: str
    priority: str
    cap: int | None = None
    rate: int | None = None
    share: float | None = None
    measured_rate: float | None = Field(default=None, description="bytes/s it reported over the last seconds")
    demand: int | None = Field(
        default=None, description="bytes/s it can use now (it moved less than its grant); None: all it gets"
    )
    bytes: int = Field(default=0, description="bytes it reported in all")
    since: datetime
    last_seen: datetime


class LinkStatus(Wire):
    spec: dict[str, Any]
    at: datetime
    budget: int | None
    window: str | None = Field(default=None, description="the window in force, if any")
    holders: list[HolderStatus] = Field(default_factory=list)


class GovernorInput(Wire):
    """What a link's governor carries across continue-as-new."""

    spec: dict[str, Any]
    holders: list[HolderStatus] = Field(default_factory=list)
    samples: dict[str, list[tuple[float, float]]] = Field(default_factory=dict)
    priorities: dict[str, ClassChange] = Field(default_factory=dict, description="by job id (or name)")
    max_updates: int = Field(default=500, description="continue-as-new after this many lease updates")
