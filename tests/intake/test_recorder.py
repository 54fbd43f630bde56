"""Recorder: what another process counted can be carried over and added (listener children)."""

from __future__ import annotations

from intake.ports import Recorder


def test_what_moved_since_a_copy_adds_up_to_the_same_counts() -> None:
    child, parent = Recorder(), Recorder()
    parent.inc("messages", "email", "new")
    child.inc("messages", "email", "new", by=2)
    child.observe("storage", 0.004)
    sent = child.copy()
    child.inc("messages", "email", "new")
    child.inc("messages", "email", "duplicate")
    child.observe("storage", 0.3)
    child.observe("classification", 0.0001)

    first = sent.since(Recorder())
    moved = child.since(sent)
    assert moved.counts == {("messages", "email", "new"): 1, ("messages", "email", "duplicate"): 1}
    assert moved.histograms["storage"].n == 1 and abs(moved.histograms["storage"].total - 0.3) < 1e-9
    assert child.since(child.copy()).counts == {} and child.since(child.copy()).histograms == {}

    parent.add(first)
    parent.add(moved)
    assert parent.counts == {("messages", "email", "new"): 4, ("messages", "email", "duplicate"): 1}
    storage = parent.histograms["storage"]
    assert storage.n == 2 and storage.counts == child.histograms["storage"].counts
    assert parent.histograms["classification"].n == 1
