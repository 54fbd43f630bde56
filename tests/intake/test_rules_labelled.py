"""The shipped security rules against a labelled set of realistic messages (tests/data/security_labelled.toml).

Every case must get its labelled verdict, except the ``accepted`` ones, which must keep the
other verdict: a documented choice or a known miss, pinned so that changing it is a decision.
Run with ``-s`` to see the confusion counts.
"""

from __future__ import annotations

import pathlib
import tomllib
from typing import Any

import pytest

from intake.rules import RuleSet
from intake.text import split_message

CASES: list[dict[str, Any]] = tomllib.loads(
    (pathlib.Path(__file__).parent.parent / "data" / "security_labelled.toml").read_text(encoding="utf-8")
)["case"]
DEFAULT = RuleSet.default()


def alerts(case: dict[str, Any]) -> bool:
    split = split_message(case["text"])
    return DEFAULT.classify(subject=case.get("subject", ""), body=split.new, quoted=split.quoted).security


def test_the_set_is_large_and_bilingual() -> None:
    langs = [c["lang"] for c in CASES]
    assert len(CASES) >= 60 and set(langs) == {"en", "es"}
    assert abs(langs.count("en") - langs.count("es")) <= 2
    for case in CASES:
        assert set(case) <= {"lang", "subject", "text", "alert", "reason", "accepted"}, case
        assert isinstance(case["alert"], bool) and case["reason"], case


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['lang']}-{c['text'][:40]}")
def test_labelled_verdict(case: dict[str, Any]) -> None:
    expected = case["alert"] if "accepted" not in case else not case["alert"]
    assert alerts(case) is expected, case["reason"]


def test_confusion_counts() -> None:
    counts = {"tp": 0, "fn": 0, "fp": 0, "tn": 0}
    for case in CASES:
        got = alerts(case)
        counts[("t" if got == case["alert"] else "f") + ("p" if got else "n")] += 1
    print(f"\nlabelled security set ({len(CASES)} cases, against the labels): {counts}")
    accepted = sum(1 for c in CASES if "accepted" in c)
    assert counts["fn"] + counts["fp"] == accepted
