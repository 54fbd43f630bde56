"""adapters/cpus.py: which CPU each listener process gets with ``email.pin_listeners``."""

from __future__ import annotations

import os

import pytest

from adapters import cpus

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[set[int]]:
    made: list[set[int]] = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, mask: made.append(set(mask)))
    monkeypatch.delenv("INTAKE_CPUS", raising=False)
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
