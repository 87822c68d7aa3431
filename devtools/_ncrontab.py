"""Timer-trigger schedules as the Functions host reads them.

* NCRONTAB: ``{second} {minute} {hour} {day} {month} {day-of-week}`` (6 fields; a classic 5-field
  expression is accepted too and fires at second 0). Each field takes ``*``, numbers, lists
  (``1,5``), ranges (``1-5``), steps (``*/5``, ``10-40/10``, ``5/15``) and, for month and
  day-of-week, names (``JAN``, ``MON``). Day-of-week is 0-6 with 0 = Sunday (7 is also Sunday).
  Like NCrontab, a time must match *both* the day-of-month and the day-of-week fields.
* TimeSpan: ``hh:mm:ss`` (or ``d.hh:mm:ss``): a constant interval between occurrences.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "CronSchedule",
    "IntervalSchedule",
    "Schedule",
    "parse_schedule",
    "parse_timespan",
]

_MONTHS = {
    name: i + 1
    for i, name in enumerate(
        ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
    )
}
_DAYS = {name: i for i, name in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])}

# (name, low, high, names)
_FIELDS: list[tuple[str, int, int, dict[str, int]]] = [
    ("second", 0, 59, {}),
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 7, _DAYS),
]

_TIMESPAN = re.compile(
    r"^(?P<neg>-)?(?:(?P<days>\d+)\.)?(?P<h>\d{1,2}):(?P<m>\d{1,2})"
    r"(?::(?P<s>\d{1,2})(?:\.(?P<frac>\d{1,7}))?)?$"
)


class Schedule(Protocol):
    def next_after(self, after: dt.datetime) -> dt.datetime:
        """The first occurrence strictly after ``after``."""
        ...


def parse_timespan(text: str) -> dt.timedelta:
    """Parse a .NET TimeSpan string (``[-][d.]hh:mm[:ss[.fffffff]]``)."""
    match = _TIMESPAN.match(text.strip())
    if match is None:
        raise ValueError(f"not a TimeSpan (expected hh:mm:ss): {text!r}")
    hours, minutes = int(match["h"]), int(match["m"])
    seconds = int(match["s"] or 0)
    if hours > 23 or minutes > 59 or seconds > 59:
        raise ValueError(f"TimeSpan component out of range: {text!r}")
    frac = match["frac"] or "0"
    delta = dt.timedelta(
        days=int(match["days"] or 0),
        hours=hours,
        minutes=minutes,
        seconds=seconds,
        microseconds=round(int(frac) * 10 ** (6 - len(frac))),
    )
    return -delta if match["neg"] else delta


def _value(token: str, low: int, high: int, names: dict[str, int], field: str) -> int:
    upper = token.upper()
    if upper in names:
        return names[upper]
    if not token.isdigit():
        raise ValueError(f"invalid {field} value {token!r}")
    number = int(token)
    if not low <= number <= high:
        raise ValueError(f"{field} value {number} out of range {low}-{high}")
    return number


def _parse_field(
    text: str, low: int, high: int, names: dict[str, int], field: str
) -> frozenset[int]:
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise ValueError(f"empty item in {field} field {text!r}")
        base, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"invalid step in {field} field {item!r}")
            step = int(step_text)
        if base == "*":
            start, end = low, high
        elif "-" in base:
            first, _, last = base.partition("-")
            start = _value(first, low, high, names, field)
            end = _value(last, low, high, names, field)
            if end < start:
                raise ValueError(f"descending range in {field} field {item!r}")
        else:
            start = _value(base, low, high, names, field)
            # ``5/15`` means every 15 starting at 5; a bare number is just that number.
            end = high if step_text else start
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class CronSchedule:
    """A parsed NCRONTAB expression (seconds resolution)."""

    expression: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    days_of_week: frozenset[int]

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        parts = expression.split()
        if len(parts) == 5:
            parts = ["0", *parts]
        if len(parts) != 6:
            raise ValueError(
                "NCRONTAB expression must have 6 fields ({second} {minute} {hour} {day} "
                f"{{month}} {{day-of-week}}): {expression!r}"
            )
        sets = [
            _parse_field(part, low, high, names, name)
            for part, (name, low, high, names) in zip(parts, _FIELDS, strict=True)
        ]
        dows = frozenset(0 if d == 7 else d for d in sets[5])
        return cls(expression, sets[0], sets[1], sets[2], sets[3], sets[4], dows)

    def matches(self, when: dt.datetime) -> bool:
        return (
            when.second in self.seconds
            and when.minute in self.minutes
            and when.hour in self.hours
            and when.day in self.days
            and when.month in self.months
            and (when.weekday() + 1) % 7 in self.days_of_week
        )

    def next_after(self, after: dt.datetime) -> dt.datetime:
        t = after.replace(microsecond=0) + dt.timedelta(seconds=1)
        limit = after + dt.timedelta(days=366 * 5)
        while t <= limit:
            if t.month not in self.months:
                year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
                t = t.replace(year=year, month=month, day=1, hour=0, minute=0, second=0)
            elif t.day not in self.days or (t.weekday() + 1) % 7 not in self.days_of_week:
                t = t.replace(hour=0, minute=0, second=0) + dt.timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0, second=0) + dt.timedelta(hours=1)
            elif t.minute not in self.minutes:
                t = t.replace(second=0) + dt.timedelta(minutes=1)
            elif t.second not in self.seconds:
                t += dt.timedelta(seconds=1)
            else:
                return t
        raise ValueError(f"schedule {self.expression!r} has no occurrence within 5 years")


@dataclass(frozen=True)
class IntervalSchedule:
    """A TimeSpan schedule: every ``interval`` after the previous occurrence."""

    interval: dt.timedelta

    def next_after(self, after: dt.datetime) -> dt.datetime:
        return after + self.interval


def parse_schedule(text: str) -> CronSchedule | IntervalSchedule:
    """NCRONTAB expression or TimeSpan (``hh:mm:ss``), as the timer trigger accepts."""
    stripped = text.strip()
    if _TIMESPAN.match(stripped):
        interval = parse_timespan(stripped)
        if interval <= dt.timedelta(0):
            raise ValueError(f"TimeSpan schedule must be positive: {text!r}")
        return IntervalSchedule(interval)
    return CronSchedule.parse(stripped)
