"""Five-field cron specs evaluated in UTC ("minute hour day-of-month month day-of-week"; `*`, lists,
ranges, steps, month/day names, @hourly/@daily/@weekly/@monthly/@yearly): when the scheduler's jobs
are due. Classic cron semantics: when both day of month and day of week are restricted, either may
match; 0 and 7 both mean Sunday."""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import datetime, timedelta

from registry.models import as_utc

_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_FIELDS = ("minute", "hour", "day of month", "month", "day of week")
_MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_abbr) if name}
_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
           "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}


def _value(token: str, index: int) -> int:
    names = _MONTHS if index == 3 else _DAYS if index == 4 else {}
    t = token.lower()
    if t in names:
        return names[t]
    if not t.isdigit():
        raise ValueError(f"cron: bad {_FIELDS[index]} value {token!r}")
    lo, hi = _RANGES[index]
    v = int(t)
    if not lo <= v <= hi:
        raise ValueError(f"cron: {_FIELDS[index]} {v} is outside {lo}..{hi}")
    return v


def _field(text: str, index: int) -> tuple[frozenset[int], bool]:
    """The set of values a field allows, and whether it is restricted (not a bare '*')."""
    lo, hi = _RANGES[index]
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise ValueError(f"cron: empty list item in {_FIELDS[index]} {text!r}")
        body, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"cron: bad step {step_text!r} in {_FIELDS[index]}")
            step = int(step_text)
        if body == "*":
            start, end = lo, hi
        elif "-" in body:
            a, b = body.split("-", 1)
            start, end = _value(a, index), _value(b, index)
            if end < start:
                raise ValueError(f"cron: range {body!r} in {_FIELDS[index]} runs backwards")
        else:
            start = _value(body, index)
            end = hi if step_text else start
        values.update(range(start, end + 1, step))
    if index == 4 and 7 in values:  # both 0 and 7 mean Sunday
        values.discard(7)
        values.add(0)
    return frozenset(values), text != "*"


@dataclass(frozen=True)
class CronSpec:
    """A parsed five-field cron expression, evaluated in UTC."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    @classmethod
    def parse(cls, text: str) -> CronSpec:
        expanded = _MACROS.get(text.strip().lower(), text)
        parts = expanded.split()
        if len(parts) != 5:
            raise ValueError(f"cron: expected 5 fields (minute hour day month weekday), got {text!r}")
        (mi, _), (ho, _), (dom, dom_r), (mo, _), (dow, dow_r) = (_field(p, i) for i, p in enumerate(parts))
        return cls(text.strip(), mi, ho, dom, mo, dow, dom_r, dow_r)

    def _day_matches(self, dt: datetime) -> bool:
        dom = dt.day in self.days
        dow = (dt.weekday() + 1) % 7 in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return dom or dow  # classic cron: either restriction may match
        return dom and dow

    def matches(self, dt: datetime) -> bool:
        """Whether the minute containing `dt` (taken in UTC) is a scheduled minute."""
        t = as_utc(dt)
        return (t.minute in self.minutes and t.hour in self.hours and t.month in self.months
                and self._day_matches(t))

    def next_after(self, dt: datetime) -> datetime:
        """The first scheduled minute strictly after `dt` (UTC). ValueError when there is none
        within five years (e.g. 30 February)."""
        t = as_utc(dt).replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = t + timedelta(days=366 * 5)
        while t <= limit:
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
                continue
            if not self._day_matches(t):
                t = t.replace(hour=0, minute=0) + timedelta(days=1)
                continue
            if t.hour not in self.hours:
                t = t.replace(minute=0) + timedelta(hours=1)
                continue
            if t.minute not in self.minutes:
                t += timedelta(minutes=1)
                continue
            return t
        raise ValueError(f"cron: {self.text!r} never matches")
