"""Language detection with lingua (a maintained library, not a word list).

Only the languages we have templates for are loaded, which keeps memory small and makes the
choice among them sharper. Short or ambiguous texts come back as None (the default language).

lingua costs ~1 µs a character (300-400 µs for the 300 characters the service passes), as
much as the rest of the assessment together. Most support mail is plainly English, so when
the languages are English and Spanish (the templates shipped) that case is answered first,
without lingua, by a rule (:func:`_surely_english`): ASCII-only text (no accent, no "ñ", "¿"
or "¡") with enough English function words among its words, no Spanish (or other Romance or
German) function word, and nearly all its letters in plain words, not in host names,
identifiers or encoded blobs (lingua reads those letters too). The rule only ever answers
"en", and only for text that lingua itself calls English (with a confidence above
``min_confidence`` on all but three windows of the texts below). When it was written (six
function words) it was checked against lingua on some 60,000 texts (the shared corpus, the
test messages, templates and support policies, windows and mixtures of them) and 6,000
English texts with blobs, paths and Spanish-looking identifiers mixed in: it never answered
where lingua said otherwise. Five function words (so that a short chat message such as "the
dashboard shows no data since this morning for our team" is answered too: lingua was 15 % of
the Slack listener's CPU) were checked again on 28,170 texts, those texts and windows of 4
to 20 words of them: no disagreement, and the lowest confidence lingua gave a text the rule
answers was 0.72.

The first list held only the words first picked, and plain support mail with many nouns
("Same filters, same recipients, same time zone as before; nothing else changed") fell below
the 0.3 share and went to lingua: the rule answered 41 of the 120 English texts of the
shared corpus, and half of the load client's messages. The list now also holds the English
stop words (NLTK's list) that are not function words of the languages below, and more
pronouns, modals and adverbs of the same kind ("a", "in", "on", "or", "as", "no", "so",
"he", "me", "do" stay out: they are words of those languages too).
``scripts/check_english_rule.py`` checked it against lingua twice, each time on some 150,000
texts and windows of 5 to 40 words of them (the corpus, the tests and the load client's
mail, the standard library's docstrings, manual pages in English, Spanish, Portuguese,
French, Italian and German; the samples differ): the rule answered 8,400-8,600 of them,
never one that lingua gives another language; on three windows of mixed text or code lingua
is undecided (English at 0.55-0.60, just below ``min_confidence``: the default language),
and the first list answered two of those too. On English texts it answers 13-16 % instead of
9-13 % (most windows are too short for five function words), 46 of the corpus's 120 mails,
and every message of the load client. Taking in the load client's messages in-process
(parse, assessment, unit of work, commit) costs 10 % less CPU a message under cachegrind
(600 messages: 36.6 against 40.7 ms a message; it runs them instruction by instruction, so
the machine's drift does not show).

tests/adapters/test_language.py keeps checking it on the texts in the repository and on
chat-sized windows of them. Anything else, Spanish or not, goes to lingua. It remains a rule,
not lingua: text made to fool it (English function words strung between Spanish nouns) can
get "en" where lingua would say "es".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

# English words that are not words of Spanish (nor of the other languages listed below): the
# words first picked, then NLTK's English stop words that are not function words there, and
# more pronouns, modals and adverbs of the kind (checked: scripts/check_english_rule.py).
_ENGLISH = frozenset(
    """
    the and is are was were this that with have has not you your our we it of to for be can
    will would could please thanks thank hello hi since from after when what which there they
    but if my an at by does did been just about any should into only also here their them then
    than these those who why how its us i
    myself ours ourselves yours yourself yourselves him his himself she hers herself itself theirs
    themselves whom being had having doing because until while against between through during
    before above below up down out off over under again further all both each few other some nor
    own same too very now where isn aren wasn weren hasn haven hadn doesn didn couldn wouldn
    shouldn won must may might shall either neither every many much another whether though
    although unless however instead else ever never always often already something anything
    nothing everything someone anyone everyone
    """.split()
)
# Function words of Spanish, and of Portuguese, Italian, French and German (which lingua, with
# only English and Spanish loaded, might call Spanish): any of them and lingua decides.
_NOT_ENGLISH = frozenset(
    """
    de la el que los las por para con una del se es en y lo al como pero muy este esta hola
    gracias buenos buenas favor desde su sus mi mis nos le les ya hay son fue ha han sin sobre
    entre cuando donde porque todo tambien usted ustedes estamos tenemos puede pueden un uno unos
    unas esto eso ese esa esos esas estos estas todos todas nada algo bien aqui ahora tiene tienen
    tengo estoy soy somos ser estar hace hacer otro otra mismo cual quien asi mas menos mucho
    muchas hasta durante segun hacia
    o os da das dos em um uma com mais seu sua voce obrigado
    il di che sono della gli ma si io ho grazie
    les des du est et dans pas sur avec nous vous mais ce cette au aux je elle merci
    der das und ist nicht mit den dem ein eine zu von auf ich sie wir bitte danke hallo
    """.split()
)
# A word of lower-cased text: letters alone, not part of an address, a host name, a path or an
# identifier ("example.com", "a@b.es", "/usr/lib", "x-de-y", "utf8").
_WORD = re.compile(r"(?<![\w.@/\\-])[a-z]++(?![\w@/\\-]|\.\w)")
_MIN_HITS = 5  # English function words in the text
_MIN_DISTINCT = 4  # different ones among them
_MIN_SHARE = 0.3  # of all its words
# Letters in those words, of all the letters of the text: lingua reads the letters of host
# names, identifiers and base64 too, and enough of them can make it say Spanish.
_MIN_COVERAGE = 0.8
_NOT_LETTERS = bytes(c for c in range(128) if not chr(c).isalpha())
# The rule stands in for lingua only up to this min_confidence (see the module docstring).
_RULE_MAX_CONFIDENCE = 0.7


def _surely_english(text: str) -> bool:
    """Plain English by the rule in the module docstring (never a reason to say "not English")."""
    if not text.isascii():
        return False
    words = _WORD.findall(text.lower())
    if len(words) < _MIN_HITS or not _NOT_ENGLISH.isdisjoint(words):
        return False
    hits = [word for word in words if word in _ENGLISH]
    if len(hits) < _MIN_HITS or len(hits) < _MIN_SHARE * len(words) or len(set(hits)) < _MIN_DISTINCT:
        return False
    letters = len(text.encode("ascii").translate(None, _NOT_LETTERS))
    return sum(map(len, words)) >= _MIN_COVERAGE * letters


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
        # The English rule was checked against lingua choosing between English and Spanish.
        self._rule = set(known) == {Language.ENGLISH, Language.SPANISH} and min_confidence <= _RULE_MAX_CONFIDENCE

    def detect(self, text: str) -> str | None:
        if self._rule and _surely_english(text):  # only with lingua loaded; five words at least
            return "en"
        return self.lingua(text)

    def lingua(self, text: str) -> str | None:
        """lingua's own answer, without the English rule (what the rule is checked against)."""
        if self._detector is None or len(text.strip()) < 3:
            return None
        values = self._detector.compute_language_confidence_values(text)
        if not values or values[0].value < self._min:
            return None
        return values[0].language.iso_code_639_1.name.lower()
