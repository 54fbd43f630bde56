"""Where the shared real-world corpus of emails is, for the tests that read it.

``$INTAKE_CORPUS`` when set; else ``shared/corpus`` beside the checkout (the project's layout:
``../shared/corpus``); else ``/work/shared/corpus`` (this machine's, for a clone elsewhere).
Without it the corpus tests skip with that reason, except when ``$INTAKE_REQUIRE_CORPUS`` is
set (``.ci/run`` sets it): then they run and fail, and so does ``tests/test_corpus.py``, so a
CI run can never pass without the corpus.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("INTAKE_REQUIRE_CORPUS", "") not in ("", "0", "false", "no")


def _where() -> Path:
    named = os.environ.get("INTAKE_CORPUS")
    if named:
        return Path(named)
    for place in (ROOT.parent / "shared" / "corpus", Path("/work/shared/corpus")):
        if place.is_dir():
            return place
    return ROOT.parent / "shared" / "corpus"


CORPUS = _where()
FOUND = CORPUS.is_dir()
WHY_MISSING = f"the shared corpus is not at {CORPUS} (set INTAKE_CORPUS to where it is)"

# Skips a test without the corpus; where it is required, lets it run and fail on its absence.
needs_corpus = pytest.mark.skipif(not FOUND and not REQUIRED, reason=WHY_MISSING)


def corpus_files() -> list[Path]:
    """Every .eml of the corpus, sorted; [] without it (modules call this as they are collected)."""
    return sorted(CORPUS.rglob("*.eml")) if FOUND else []
