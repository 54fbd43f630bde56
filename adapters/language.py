"""Language detection with lingua (a maintained library, not a word list).

Only the languages we have templates for are loaded, which keeps memory small and makes the
choice among them sharper. Short or ambiguous texts come back as None (the default language).
"""

from __future__ import annotations

from collections.abc import Sequence

from lingua import IsoCode639_1, Language, LanguageDetectorBuilder


class LinguaDetector:
    def __init__(self, languages: Sequence[str], *, min_confidence: float = 0.6) -> None:
        known = []
        for code in languages:
            try:
                known.append(Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper())))
            except AttributeError:
                continue
        self._languages = known
        self._min = min_confidence
        self._detector = (
            LanguageDetectorBuilder.from_languages(*known).with_preloaded_language_models().build()
            if len(known) >= 2
            else None
        )

    def detect(self, text: str) -> str | None:
        if self._detector is None or len(text.strip()) < 3:
            return None
        values = self._detector.compute_language_confidence_values(text)
        if not values or values[0].value < self._min:
            return None
        return values[0].language.iso_code_639_1.name.lower()
