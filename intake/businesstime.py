"""Targets counted in business time: "2 business days", "4 business hours".

Two of the policies state targets in working time (Mindful: Low, "2 business days";
HotSchedules/Fourth: "Emails/Web Tickets – up to 1 Business Day"). A :class:`BusinessTime`
is such a target; a :class:`BusinessCalendar` (time zone, working days, working hours,
holidays) turns it into a due time.

What a business day is: the working time of one working day, so that "1 business day" from a
working moment is the same time on the next working day. Counting starts at arrival, or at
the next opening when the message came outside working hours. A due time is the first moment
at which the target's working time has passed: always inside working hours or exactly at a
closing time (a ticket in on Saturday with "1 business day" is due at Monday's closing, not at
Tuesday's opening, so "about to miss" comes while someone is there).

Working hours are wall-clock times in the calendar's zone; the walk itself runs in UTC, so a
change of the clocks (outside working hours, as everywhere but on a night shift) moves no
due time off its wall-clock hour. Working hours that contain a change count the time that
really passes in them. A zone object comes from the caller (``zoneinfo`` reads the tz
database: that is the edge's business); nothing here reads anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Literal

Unit = Literal["day", "hour", "minute"]

WEEKDAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, slots=True)
class BusinessTime:
    """A target counted in working time, as the contract words it: ``BusinessTime(2, "day")``."""

    amount: int
    unit: Unit

    def __post_init__(self) -> None:
        if self.amount <= 0:
            raise ValueError("a business-time target must be positive")


# A target: calendar time (what integer minutes always meant) or business time.
Target = timedelta | BusinessTime

_UNITS: dict[str, Unit] = {"day": "day", "hour": "hour", "minute": "minute"}
_MINUTES = {"day": 24 * 60, "hour": 60, "minute": 1}
# Five years: past it a target is a typo (and a due time near the calendar's end overflows).
MAX_TARGET_MINUTES = 5 * 365 * 24 * 60
_TARGET = re.compile(r"\s*(\d{1,6})\s+(business\s+)?(minute|hour|day)s?\s*", re.IGNORECASE)


def parse_target(value: int | str) -> Target:
    """60 (minutes), "8 hours", "1 day", "2 business days", "4 business hours".

    Raises ValueError with what was wrong, for the settings to name the key.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f'{value!r} is not a time: write minutes (60) or a text such as "2 business days"')
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be a positive number of minutes")
        if value > MAX_TARGET_MINUTES:
            raise ValueError(f"{value} minutes: a target of more than five years is no target")
        return timedelta(minutes=value)
    m = _TARGET.fullmatch(value)
    if m is None:
        raise ValueError(
            f'{value!r} is not a time: write minutes (60) or "N [business] minutes|hours|days", '
            'such as "2 business days"'
        )
    amount, business, unit = int(m[1]), m[2], m[3].lower()
    if amount <= 0:
        raise ValueError(f"{value!r}: a target must be more than nothing")
    if amount * _MINUTES[unit] > MAX_TARGET_MINUTES:
        raise ValueError(f"{value!r}: a target of more than five years is no target")
    if business:
        return BusinessTime(amount, _UNITS[unit])
    return timedelta(minutes=amount * _MINUTES[unit])


def as_business_time(delta: timedelta) -> BusinessTime:
    """A calendar target read as business time (a plan whose support runs in business hours):
    whole days become business days, whole hours business hours, anything else minutes."""
    minutes = int(delta.total_seconds() // 60)
    if minutes % (24 * 60) == 0:
        return BusinessTime(minutes // (24 * 60), "day")
    if minutes % 60 == 0:
        return BusinessTime(minutes // 60, "hour")
    return BusinessTime(max(minutes, 1), "minute")


_HOURS = re.compile(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*")


def parse_hours(text: str) -> tuple[int, int]:
    """Opening and closing of "09:00-17:00" in minutes after midnight: (540, 1020) ("24:00" ends
    the day). Raises ValueError with what was wrong."""
    m = _HOURS.fullmatch(text)
    if m is None:
        raise ValueError(f'{text!r} is not a range of hours: write "HH:MM-HH:MM", such as "09:00-17:00"')
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2):
        raise ValueError(f"{text!r} is not a range of hours: a time is 00:00 to 23:59 (or 24:00 to end the day)")
    opening, closing = h1 * 60 + m1, h2 * 60 + m2
    if closing <= opening:
        raise ValueError(f"{text!r} closes before it opens (a range ends on the day it starts)")
    return opening, closing


@dataclass(frozen=True, slots=True, kw_only=True)
class BusinessCalendar:
    """When the support team works: a zone, working weekdays, the same hours each working day
    (one range or a split day), holidays (dates in the zone)."""

    zone: tzinfo
    days: frozenset[int] = frozenset(range(5))  # date.weekday(): Monday is 0
    hours: tuple[tuple[int, int], ...] = ((9 * 60, 17 * 60),)  # minutes after midnight: [opening, closing)
    holidays: frozenset[date] = frozenset()

    def __post_init__(self) -> None:
        if not self.days or not self.days <= set(range(7)):
            raise ValueError("a calendar needs at least one working day (0-6, Monday is 0)")
        if not self.hours:
            raise ValueError("a calendar needs working hours")
        end = 0
        for opening, closing in self.hours:
            if not end <= opening < closing <= 24 * 60:
                raise ValueError("working hours must be ranges within a day, in order, not overlapping")
            end = closing

    @property
    def day_length(self) -> timedelta:
        """The working time of one working day (a business day)."""
        return timedelta(minutes=sum(closing - opening for opening, closing in self.hours))

    def is_working_day(self, day: date) -> bool:
        return day.weekday() in self.days and day not in self.holidays

    def duration(self, target: BusinessTime) -> timedelta:
        if target.unit == "day":
            return target.amount * self.day_length
        return timedelta(hours=target.amount) if target.unit == "hour" else timedelta(minutes=target.amount)

    def add(self, since: datetime, target: BusinessTime) -> datetime:
        """The first moment (UTC) at which ``target``'s working time has passed since ``since``."""
        left = self.duration(target)
        for opening, closing in self.periods(since):
            start = max(opening, since)
            if left <= closing - start:
                return start + left
            left -= closing - start
        raise AssertionError("unreachable: working periods never end")

    def periods(self, since: datetime) -> Iterator[tuple[datetime, datetime]]:
        """Working periods (opening, closing), in UTC and in order, that close after ``since``.

        Endless: every week has a working day, and holidays are finitely many.
        """
        day = since.astimezone(self.zone).date()
        while True:
            if self.is_working_day(day):
                for opening, closing in self.hours:
                    start, end = self._instant(day, opening), self._instant(day, closing)
                    # A day the zone skipped (Samoa's 30 December 2011) has no hours of its own:
                    # its wall times are the next day's.
                    if end > since and end > start and start.astimezone(self.zone).date() == day:
                        yield start, end
            day += timedelta(days=1)

    def _instant(self, day: date, minute: int) -> datetime:
        # Aware arithmetic on one zone is wall-clock arithmetic: midnight plus the minutes is the
        # wall time wanted (24:00 the next midnight), then placed on the UTC time line. A wall
        # time the clocks skip is read with the offset before the change (fold=0).
        wall = datetime(day.year, day.month, day.day, tzinfo=self.zone) + timedelta(minutes=minute)
        return wall.astimezone(UTC)


_UNIT_WORDS: dict[str, dict[Unit, tuple[str, str]]] = {
    "en": {
        "day": ("business day", "business days"),
        "hour": ("business hour", "business hours"),
        "minute": ("business minute", "business minutes"),
    },
    "es": {
        "day": ("día hábil", "días hábiles"),
        "hour": ("hora hábil", "horas hábiles"),
        "minute": ("minuto hábil", "minutos hábiles"),
    },
}


def describe_business_time(target: BusinessTime, language: str = "en") -> str:
    """'2 business days', '1 business hour'; in Spanish '2 días hábiles', '1 hora hábil'."""
    one, many = _UNIT_WORDS.get(language, _UNIT_WORDS["en"])[target.unit]
    return f"{target.amount} {one if target.amount == 1 else many}"
