"""The shared corpus of real-world mail is there, or the run says why not (tests/corpus.py)."""

from __future__ import annotations

import pytest

from tests.corpus import CORPUS, FOUND, REQUIRED, WHY_MISSING, corpus_files


def test_the_shared_corpus_is_there() -> None:
    if not FOUND:
        if REQUIRED:
            pytest.fail(f"INTAKE_REQUIRE_CORPUS is set but {WHY_MISSING}")
        pytest.skip(WHY_MISSING)
    files = corpus_files()
    assert len(files) > 100, f"{CORPUS} holds {len(files)} .eml files"
