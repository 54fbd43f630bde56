"""adapters.heap: the start-up heap is frozen, and what is made afterwards is still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from adapters.heap import settle_heap


@pytest.fixture
def frozen() -> Iterator[None]:
    settle_heap()
    try:
        yield
    finally:
        gc.unfreeze()


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_the_start_up_heap_is_frozen(frozen: None) -> None:
    assert gc.get_freeze_count() > 1000  # the interpreter, pytest and our modules
    assert gc.get_count()[0] < 100  # generation 0 starts empty after the collection


def test_cycles_made_after_the_freeze_are_still_collected(frozen: None) -> None:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    watch = weakref.ref(a)
    del a, b
    gc.collect()
    assert watch() is None
