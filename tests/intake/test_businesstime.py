"""Business time: due times on a working calendar, checked on fixed dates and against a
minute-by-minute reference (a minute is working time when the zone's clock then shows a
working day and a working hour)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from intake.businesstime import BusinessCalendar, BusinessTime, parse_hours, parse_target
from intake.errors import ConfigError
from intake.model import Severity
from intake.policy import DEFAULT_LEVELS, Level, Plan, Policy, describe_target

MADRID = ZoneInfo("Europe/Madrid")
NEW_YORK = ZoneInfo("America/New_York")


def madrid(*args: int) -> datetime:
    return datetime(*args, tzinfo=MADRID)  # type: ignore[misc]


def cal(zone: ZoneInfo = MADRID, **kw: object) -> BusinessCalendar:
    return BusinessCalendar(zone=zone, **kw)  # type: ignore[arg-type]


DAYS2 = BusinessTime(2, "day")
DAY1 = BusinessTime(1, "day")


def test_friday_evening_is_due_at_tuesdays_closing_not_on_sunday() -> None:
    # The case that calendar minutes get wrong: "2 days" from Friday 17:00 is Sunday 17:00.
    assert cal().add(madrid(2026, 11, 27, 17, 0), DAYS2) == madrid(2026, 12, 1, 17, 0)
    assert cal().add(madrid(2026, 11, 27, 16, 0), DAYS2) == madrid(2026, 12, 1, 16, 0)


def test_a_business_day_from_working_hours_is_the_same_time_the_next_working_day() -> None:
    assert cal().add(madrid(2026, 11, 24, 14, 0), DAY1) == madrid(2026, 11, 25, 14, 0)  # Tue -> Wed
    assert cal().add(madrid(2026, 11, 27, 14, 0), DAY1) == madrid(2026, 11, 30, 14, 0)  # Fri -> Mon


def test_outside_hours_counting_starts_at_the_next_opening_and_ends_at_a_closing() -> None:
    c = cal()
    assert c.add(madrid(2026, 11, 28, 10, 0), DAY1) == madrid(2026, 11, 30, 17, 0)  # Saturday
    assert c.add(madrid(2026, 11, 30, 7, 0), BusinessTime(4, "hour")) == madrid(2026, 11, 30, 13, 0)
    assert c.add(madrid(2026, 11, 30, 9, 0), DAY1) == madrid(2026, 11, 30, 17, 0)  # at the opening
    assert c.add(madrid(2026, 11, 30, 22, 0), BusinessTime(30, "minute")) == madrid(2026, 12, 1, 9, 30)


def test_seconds_are_kept() -> None:
    since = madrid(2026, 11, 30, 10, 0, 30)
    assert cal().add(since, BusinessTime(1, "minute")) == madrid(2026, 11, 30, 10, 1, 30)


def test_a_change_of_the_clocks_moves_no_due_time_off_its_hour() -> None:
    # Madrid goes to summer time on Sunday 29 March 2026 and back on Sunday 25 October.
    due = cal().add(madrid(2026, 3, 27, 14, 0), DAY1)
    assert due == madrid(2026, 3, 30, 14, 0) and due == datetime(2026, 3, 30, 12, 0, tzinfo=UTC)
    due = cal().add(madrid(2026, 10, 23, 10, 0), DAY1)
    assert due == madrid(2026, 10, 26, 10, 0) and due == datetime(2026, 10, 26, 9, 0, tzinfo=UTC)
    # A team that works on Sundays: the night's change comes before the opening.
    every_day = cal(days=frozenset(range(7)))
    assert every_day.add(madrid(2026, 3, 28, 10, 0), DAY1) == datetime(2026, 3, 29, 8, 0, tzinfo=UTC)  # 10:00
    assert every_day.add(madrid(2026, 10, 24, 10, 0), DAY1) == datetime(2026, 10, 25, 9, 0, tzinfo=UTC)  # 10:00
    # New York changes on 8 March 2026: 16 business hours from Friday 16:00 (21:00 UTC) is
    # Tuesday 16:00, now 20:00 UTC.
    since = datetime(2026, 3, 6, 16, 0, tzinfo=NEW_YORK)
    assert cal(NEW_YORK).add(since, BusinessTime(16, "hour")) == datetime(2026, 3, 10, 20, 0, tzinfo=UTC)


def test_holidays_and_the_end_of_a_year() -> None:
    c = cal(holidays=frozenset({date(2026, 12, 8), date(2026, 12, 25), date(2027, 1, 1), date(2027, 1, 6)}))
    assert c.add(madrid(2026, 12, 7, 16, 0), DAY1) == madrid(2026, 12, 9, 16, 0)  # Tuesday 8th off
    assert c.add(madrid(2026, 12, 31, 15, 0), DAY1) == madrid(2027, 1, 4, 15, 0)  # New Year, weekend
    assert c.add(madrid(2026, 12, 31, 15, 0), BusinessTime(4, "day")) == madrid(2027, 1, 8, 15, 0)  # 6th off
    assert c.add(madrid(2026, 12, 24, 18, 0), DAY1) == madrid(2026, 12, 28, 17, 0)  # 25th off


def test_a_split_day() -> None:
    c = cal(hours=((9 * 60, 13 * 60), (14 * 60, 18 * 60)))
    assert c.day_length == timedelta(hours=8)
    assert c.add(madrid(2026, 11, 30, 10, 0), DAY1) == madrid(2026, 12, 1, 10, 0)
    assert c.add(madrid(2026, 11, 30, 11, 0), BusinessTime(4, "hour")) == madrid(2026, 11, 30, 16, 0)
    # From the lunch break, counting starts at 14:00: one business day later is 13:00 next day.
    assert c.add(madrid(2026, 11, 30, 13, 30), DAY1) == madrid(2026, 12, 1, 13, 0)
    assert c.add(madrid(2026, 11, 30, 12, 30), BusinessTime(1, "hour")) == madrid(2026, 11, 30, 14, 30)


def test_a_day_the_zone_skipped_has_no_working_hours() -> None:
    # Samoa crossed the date line: Friday 30 December 2011 never happened there.
    apia = ZoneInfo("Pacific/Apia")
    since = datetime(2011, 12, 29, 10, 0, tzinfo=apia)
    assert cal(apia).add(since, DAY1) == datetime(2012, 1, 2, 10, 0, tzinfo=apia)


def test_a_calendar_needs_days_and_ordered_hours() -> None:
    with pytest.raises(ValueError, match="working day"):
        cal(days=frozenset())
    with pytest.raises(ValueError, match="in order"):
        cal(hours=((14 * 60, 18 * 60), (9 * 60, 13 * 60)))
    with pytest.raises(ValueError, match="positive"):
        BusinessTime(0, "day")


def test_targets_are_read_as_written() -> None:
    assert parse_target(60) == timedelta(minutes=60)
    assert parse_target("1 day") == timedelta(days=1)
    assert parse_target("8 hours") == timedelta(hours=8)
    assert parse_target("2 business days") == BusinessTime(2, "day")
    assert parse_target(" 1 Business Day ") == BusinessTime(1, "day")
    assert parse_target("4 business hours") == BusinessTime(4, "hour")
    assert parse_target("90 business minutes") == BusinessTime(90, "minute")
    for bad in ("2 bussiness days", "two days", "2 weeks", "0 business days", "", "1.5 hours"):
        with pytest.raises(ValueError, match=r"not a time|more than nothing"):
            parse_target(bad)
    for bad_minutes in (0, -5):
        with pytest.raises(ValueError, match="positive"):
            parse_target(bad_minutes)


def test_hours_are_read_as_written() -> None:
    assert parse_hours("09:00-17:00") == (540, 1020)
    assert parse_hours("8:30 - 24:00") == (510, 1440)
    for bad, why in (("9-17", "not a range"), ("17:00-09:00", "closes before"), ("09:00-24:30", "00:00 to 23:59")):
        with pytest.raises(ValueError, match=why):
            parse_hours(bad)


def test_targets_in_the_customers_words() -> None:
    assert describe_target(BusinessTime(2, "day")) == "2 business days"
    assert describe_target(BusinessTime(1, "day")) == "1 business day"
    assert describe_target(BusinessTime(4, "hour")) == "4 business hours"
    assert describe_target(BusinessTime(2, "day"), "es") == "2 días hábiles"
    assert describe_target(BusinessTime(1, "day"), "es") == "1 día hábil"
    assert describe_target(BusinessTime(1, "hour"), "es") == "1 hora hábil"
    assert describe_target(timedelta(hours=8)) == "8 hours"  # calendar time as before


MINDFUL = (
    Level(Severity.S1, "Critical", "", {"response": timedelta(hours=1), "restore": timedelta(hours=24)}),
    Level(Severity.S2, "High", "", {"response": timedelta(hours=4)}),
    Level(Severity.S3, "Medium", "", {"response": timedelta(days=1), "restore": BusinessTime(2, "day")}),
    Level(Severity.S4, "Low", "", {"response": BusinessTime(2, "day"), "restore": BusinessTime(4, "day")}),
)
PLANS = {
    "standard": Plan("standard", frozenset({"email"}), business_hours=True),
    "enterprise": Plan("enterprise", frozenset({"email"})),
}


def test_policy_due_times_count_business_targets_on_its_calendar() -> None:
    p = Policy(levels=MINDFUL, calendar=cal(), plans=PLANS)
    friday = madrid(2026, 11, 27, 17, 0)
    assert p.due(Severity.S4, friday) == madrid(2026, 12, 1, 17, 0)
    assert p.deadlines(Severity.S4, friday) == {
        "response": madrid(2026, 12, 1, 17, 0),
        "restore": madrid(2026, 12, 3, 17, 0),
    }
    # Calendar targets stay calendar time, beside business ones.
    assert p.deadlines(Severity.S3, friday) == {
        "response": friday + timedelta(days=1),
        "restore": madrid(2026, 12, 1, 17, 0),
    }


def test_a_business_hours_plan_counts_every_target_in_business_time() -> None:
    p = Policy(levels=MINDFUL, calendar=cal(), plans=PLANS)
    friday = madrid(2026, 11, 27, 16, 30)
    assert p.due(Severity.S1, friday, "enterprise") == friday + timedelta(hours=1)  # 24x7
    assert p.due(Severity.S1, friday, "standard") == madrid(2026, 11, 30, 9, 30)  # 1 business hour
    assert p.deadlines(Severity.S1, friday, "standard")["restore"] == madrid(2026, 11, 30, 16, 30)  # 1 day
    assert describe_target(p.target(Severity.S1, "standard")) == "1 business hour"
    assert describe_target(p.target(Severity.S3, "standard")) == "1 business day"
    assert describe_target(p.target(Severity.S3, "enterprise")) == "24 hours"


def test_business_targets_without_a_calendar_are_refused() -> None:
    with pytest.raises(ConfigError, match="no business calendar"):
        Policy(levels=MINDFUL)
    with pytest.raises(ConfigError, match="no business calendar"):
        Policy(plans=PLANS)
    assert Policy(levels=DEFAULT_LEVELS).calendar is None  # calendar time needs none


# --- properties, against a minute-by-minute reference ------------------------------------------

# Zones whose clocks change between 22:00 and 06:00 (when they change): the working hours drawn
# below never contain a change. Apia skipped a day; Lord Howe moves by 30 minutes; Chatham
# changes at 02:45; Kolkata and Tokyo never change.
ZONES = [
    "Europe/Madrid", "Europe/London", "America/New_York", "America/Sao_Paulo", "America/Santiago",
    "Australia/Sydney", "Australia/Lord_Howe", "Pacific/Chatham", "Pacific/Apia", "Asia/Tehran",
    "Asia/Kolkata", "Asia/Tokyo", "UTC",
]  # fmt: skip


@st.composite
def calendars(draw: st.DrawFn) -> BusinessCalendar:
    zone = ZoneInfo(draw(st.sampled_from(ZONES)))
    days = frozenset(draw(st.sets(st.integers(0, 6), min_size=1)))
    cuts = sorted(draw(st.sets(st.integers(6 * 4, 22 * 4), min_size=2, max_size=4)))  # quarter hours
    if len(cuts) % 2:
        cuts.pop()
    hours = tuple((cuts[i] * 15, cuts[i + 1] * 15) for i in range(0, len(cuts), 2))
    return BusinessCalendar(zone=zone, days=days, hours=hours)


def with_holidays(draw: st.DrawFn, c: BusinessCalendar, near: datetime) -> BusinessCalendar:
    offsets = draw(st.sets(st.integers(-1, 20), max_size=5))
    start = near.astimezone(c.zone).date()
    return BusinessCalendar(
        zone=c.zone, days=c.days, hours=c.hours, holidays=frozenset(start + timedelta(days=d) for d in offsets)
    )


ARRIVALS = st.datetimes(min_value=datetime(2005, 1, 1), max_value=datetime(2037, 12, 31)).map(
    lambda d: d.replace(second=0, microsecond=0, tzinfo=UTC)
)


def targets(c: BusinessCalendar) -> st.SearchStrategy[BusinessTime]:
    """Up to 3 business days, or hours and minutes up to two working days (the reference walks
    minute by minute)."""
    minutes = int(c.day_length.total_seconds() // 60)
    return st.one_of(
        st.builds(BusinessTime, st.integers(1, 3), st.just("day")),
        st.builds(BusinessTime, st.integers(1, max(1, 2 * minutes // 60)), st.just("hour")),
        st.builds(BusinessTime, st.integers(1, 2 * minutes), st.just("minute")),
    )


def exists(c: BusinessCalendar, day: date) -> bool:
    """Whether the zone's clocks showed ``day`` at all (Samoa skipped 30 December 2011)."""
    noon = datetime(day.year, day.month, day.day, 12, tzinfo=c.zone)
    return noon.astimezone(UTC).astimezone(c.zone).date() == day


def working(c: BusinessCalendar, t: datetime) -> bool:
    """The reference: the minute from ``t`` is working time when the zone's clock then shows a
    working day and a time within the working hours."""
    local = t.astimezone(c.zone)
    if local.weekday() not in c.days or local.date() in c.holidays:
        return False
    minute = local.hour * 60 + local.minute
    return any(opening <= minute < closing for opening, closing in c.hours)


@settings(max_examples=300, deadline=None)
@given(st.data(), calendars(), ARRIVALS)
def test_due_is_in_working_hours_or_at_a_closing_and_counts_exactly_the_target(
    data: st.DataObject, base: BusinessCalendar, arrival: datetime
) -> None:
    c = with_holidays(data.draw, base, arrival)
    target = data.draw(targets(c))
    due = c.add(arrival, target)
    assert due > arrival
    # Inside working hours, or exactly at a closing: the minute before it is working time.
    assert working(c, due - timedelta(minutes=1))
    # The working minutes from arrival to due are the target, no more, no less.
    minute, t, counted = timedelta(minutes=1), arrival, timedelta(0)
    while t < due:
        counted += minute if working(c, t) else timedelta(0)
        t += minute
    assert counted == c.duration(target)


@settings(max_examples=300, deadline=None)
@given(st.data(), calendars(), ARRIVALS, st.integers(1, 5))
def test_n_business_days_from_working_hours_is_the_same_wall_time_n_working_days_on(
    data: st.DataObject, base: BusinessCalendar, near: datetime, n: int
) -> None:
    c = with_holidays(data.draw, base, near)
    # An arrival strictly inside working hours (at an opening it is due at a closing: see the
    # fixed cases), on a working day the zone's clocks showed.
    day = near.astimezone(c.zone).date()
    while not (c.is_working_day(day) and exists(c, day)):
        day += timedelta(days=1)
    opening, closing = data.draw(st.sampled_from(c.hours))
    minute = data.draw(st.integers(opening + 1, closing - 1)) if closing - opening > 1 else opening
    assume(minute > opening)
    local = datetime(day.year, day.month, day.day, minute // 60, minute % 60, tzinfo=c.zone)
    for _ in range(n):
        day += timedelta(days=1)
        while not (c.is_working_day(day) and exists(c, day)):
            day += timedelta(days=1)
    due = c.add(local.astimezone(UTC), BusinessTime(n, "day")).astimezone(c.zone)
    assert (due.date(), due.time()) == (day, local.time())
