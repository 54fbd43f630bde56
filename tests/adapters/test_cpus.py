"""adapters/cpus.py: which CPU each listener process gets with ``email.pin_listeners``."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from adapters import cpus
from adapters.settings import Settings, load_settings
from intake.errors import ConfigError

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[set[int]]:
    made: list[set[int]] = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, mask: made.append(set(mask)))
    # set, then removed: monkeypatch restores the variable's absence afterwards, even when
    # the code under test notes the CPUs in it (a value left behind would reach every process
    # the later tests start)
    monkeypatch.setenv("INTAKE_CPUS", "")
    monkeypatch.delenv("INTAKE_CPUS")
    return made


def test_listeners_take_the_allowed_cpus_in_turn(calls: list[set[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 5, 7})
    assert [cpus.pin_listener(n) for n in (1, 2, 3, 4)] == [2, 5, 7, 2]
    assert calls == [{2}, {5}, {7}, {2}]
    assert os.environ["INTAKE_CPUS"] == "2,5,7"  # noted for the children, before any pin


def test_a_child_pins_from_the_set_its_parent_noted(calls: list[set[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTAKE_CPUS", "0,1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # inherited from the pinned parent
    assert cpus.pin_listener(2) == 1
    cpus.unpin()  # the outbox, started by the pinned first listener
    assert calls == [{1}, {0, 1}]


def test_one_cpu_pins_nothing_and_unpinned_runs_leave_the_affinity_alone(
    calls: list[set[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert cpus.pin_listener(1) is None
    monkeypatch.delenv("INTAKE_CPUS")
    cpus.unpin()  # pin_listeners off: nothing was noted, nothing changes
    assert calls == []


def test_a_bad_noted_set_or_a_refused_pin_never_stops_a_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTAKE_CPUS", "0,1")

    def refuse(pid: int, mask: set[int]) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    assert cpus.pin_listener(2) is None
    cpus.unpin()  # logged, not raised
    monkeypatch.setenv("INTAKE_CPUS", "zero,one")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpus.allowed() == [0, 1]


@pytest.mark.parametrize(
    ("setting", "listeners", "affinity", "noted", "pinned"),
    [
        ("auto", 2, {0, 1}, None, True),  # two listeners, two CPUs: the default on a 2-core host
        ("auto", 4, {0, 1, 2, 3}, None, True),
        ("auto", 2, {0, 1, 2, 3}, None, False),  # CPUs to spare: the scheduler keeps the choice
        ("auto", 3, {0, 1}, None, False),  # more listeners than CPUs: two would share one
        ("auto", 1, {0}, None, False),
        ("auto", 2, {1}, "0,1", True),  # a child, pinned by inheritance: its parent's set counts
        ("auto", 2, {0, 1, 2}, "zero", False),  # a set that cannot be read: the process's own
        (True, 2, {0, 1, 2, 3}, None, True),
        (False, 2, {0, 1}, None, False),
    ],
)
def test_auto_pins_where_the_listeners_are_as_many_as_the_cpus(
    monkeypatch: pytest.MonkeyPatch,
    setting: bool | str,
    listeners: int,
    affinity: set[int],
    noted: str | None,
    pinned: bool,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity)
    if noted is None:
        monkeypatch.delenv("INTAKE_CPUS", raising=False)
    else:
        monkeypatch.setenv("INTAKE_CPUS", noted)
    assert cpus.wanted(setting, listeners) is pinned
    assert ("INTAKE_CPUS" in os.environ) is (noted is not None)  # deciding notes nothing


def test_the_setting_takes_auto_true_or_false_and_names_the_key_otherwise(tmp_path: Path) -> None:
    assert Settings().email.pin_listeners == "auto"
    config = tmp_path / "intake.toml"
    for text, value in (("true", True), ("false", False), ('"auto"', "auto")):
        config.write_text(f"[email]\npin_listeners = {text}\n")
        assert load_settings(config).email.pin_listeners == value
    config.write_text('[email]\npin_listeners = "sometimes"\n')
    with pytest.raises(ConfigError, match=re.escape('email.pin_listeners: Value error, must be true, false or "auto"')):
        load_settings(config)
