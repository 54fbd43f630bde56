"""Check the plain-English rule of adapters/language.py against lingua on many natural texts.

The rule (``_surely_english``) answers "en" without lingua. It must never answer where lingua,
choosing between English and Spanish as the service does, would say anything else. This
script is how a change to the rule's word lists or thresholds is checked before it is made:

    .venv/bin/python scripts/check_english_rule.py [--limit-per-source N] [--json]

Texts, as the service hands them to the detector (the first 300 characters) and as windows of
5 to 40 words of them (chat messages are short, and the rule's thresholds sit closest to
lingua's doubt there):

* the shared corpus, the project's test messages and the load client's messages;
* docstrings of Python's standard library (English, with code, paths and identifiers mixed in);
* manual pages in English, Spanish, Portuguese, French, Italian and German, when the machine
  has them (Debian: ``apt-get install manpages-es manpages-fr manpages-de manpages-it
  manpages-pt-br``; English ones come with the packages);
* mixtures, when ``/usr/share/dict/spanish`` exists (Debian ``wspanish``): English function
  words strung between Spanish words, the case the module docstring admits the rule can get
  wrong. They are counted apart and do not fail the check.

It prints, per source, how many texts it checked, how many the rule answered, how many of
those lingua answered otherwise (printed: another language, or undecided, below
``min_confidence``), and, for English texts, the share the rule answered (what it saves).
Exit status 1 if the rule answers a natural text that lingua gives another language. An
undecided lingua means the default language; such texts are counted and shown, not failed
(three windows of mixed text or code on 2026-12-02, two of them answered by the first list
too).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import random
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.email.parsing import parse_email  # noqa: E402
from adapters.language import _ENGLISH, LinguaDetector, _surely_english  # noqa: E402
from intake.service import language_sample  # noqa: E402

CORPUS = Path("/work/shared/corpus")
MAN = Path("/usr/share/man")
WINDOWS = (5, 7, 9, 12, 20, 40)

# roff: requests and macros at the start of a line, escapes, fonts, comments.
_ROFF_LINE = re.compile(r"^[.'].*$", re.M)
_ROFF_ESCAPE = re.compile(r"\\(f[BIRP]|f\(..|f\[[^]]*\]|s[-+]?\d|\(..|\[[^]]*\]|\*.|e|-|&|\^|\||0|c|%|:|~)")


def _mail_texts() -> Iterator[str]:
    mails = [*sorted(CORPUS.rglob("*.eml")), *sorted((ROOT / "tests" / "data" / "email").glob("*.eml"))]
    for path in mails:
        m = parse_email(path.read_bytes(), recipient="support@example.com")
        yield language_sample(m)
    sys.path.insert(0, str(ROOT / "bench"))
    from smtp_load import build_messages  # type: ignore[import-not-found]

    for _, data in build_messages(48):
        m = parse_email(data, recipient="support@example.com")
        yield language_sample(m)
    for module in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) > 15:
                yield node.value.strip()[:300]


def _docstrings() -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    yield doc


def _man_paragraphs(lang: str) -> Iterator[str]:
    base = MAN if lang == "en" else MAN / lang
    pages = sorted(base.glob("man[1-8]/*.gz"))
    for page in pages:
        try:
            text = gzip.decompress(page.read_bytes()).decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        text = _ROFF_ESCAPE.sub("", _ROFF_LINE.sub("", text))
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if len(para) > 60:
                yield para


def _variants(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        yield text[:300]
        words = text.split()
        for k in WINDOWS:
            if len(words) > k:
                yield from (" ".join(words[i : i + k]) for i in range(0, len(words) - k, k))


def _mixtures(count: int, rng: random.Random) -> Iterator[str]:
    words = [
        w.strip()
        for w in Path("/usr/share/dict/spanish").read_text(encoding="latin-1").splitlines()
        if w.strip().isascii() and w.strip().isalpha() and len(w.strip()) > 3
    ]
    function = sorted(_ENGLISH)
    for _ in range(count):
        n = rng.randint(6, 40)
        share = rng.choice((0.3, 0.4, 0.5, 0.6))
        yield " ".join(rng.choice(function) if rng.random() < share else rng.choice(words).lower() for _ in range(n))


def check(name: str, texts: Iterable[str], detector: LinguaDetector, *, english: bool | None) -> dict[str, object]:
    seen: set[str] = set()
    checked = ruled = lingua_en = ruled_of_en = other = 0
    wrong: list[str] = []
    for text in texts:
        if not text.strip() or text in seen:
            continue
        seen.add(text)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            continue
        checked += 1
        rule = _surely_english(text)
        if english is None and not rule:
            continue  # only the rule's answers need lingua
        alone = detector.lingua(text)
        if alone == "en":
            lingua_en += 1
            ruled_of_en += rule
        if rule:
            ruled += 1
            if alone != "en":
                wrong.append(text)
                other += alone is not None
    result: dict[str, object] = {
        "source": name,
        "texts": checked,
        "ruled": ruled,
        "disagreements": len(wrong),
        "lingua_other_language": other,  # the rest: lingua undecided (below min_confidence)
    }
    if english is not None:
        result["lingua_en"] = lingua_en
        result["ruled_of_lingua_en"] = ruled_of_en
    result["examples"] = wrong[:5]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-per-source", type=int, default=20_000, help="texts taken per source (default 20000)")
    parser.add_argument("--mixtures", type=int, default=20_000, help="generated mixtures (default 20000)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(1)
    detector = LinguaDetector(["en", "es"])

    def limited(texts: Iterable[str]) -> list[str]:
        items = list(texts)
        rng.shuffle(items)
        return items[: args.limit_per_source]

    sources: list[tuple[str, list[str], bool | None]] = [
        ("mail (corpus, tests, load client)", limited(_variants(_mail_texts())), True),
        ("stdlib docstrings", limited(_variants(_docstrings())), True),
    ]
    for lang in ("en", "es", "pt", "pt_BR", "fr", "it", "de"):
        if (MAN / lang).is_dir() or lang == "en":
            texts = limited(_variants(_man_paragraphs(lang)))
            if texts:
                sources.append((f"manual pages ({lang})", texts, True if lang == "en" else None))
    results = [check(name, texts, detector, english=english) for name, texts, english in sources]
    failed = sum(int(r["lingua_other_language"]) for r in results)  # type: ignore[call-overload]
    if Path("/usr/share/dict/spanish").exists() and args.mixtures:
        mixed = check("mixtures (not natural: reported only)", _mixtures(args.mixtures, rng), detector, english=None)
        results.append(mixed)
    if args.json:
        print(json.dumps({"results": results, "ok": failed == 0}, indent=2))
    else:
        for r in results:
            line = (
                f"{r['source']:38s} texts {r['texts']:6d}  rule answered {r['ruled']:6d}"
                f"  disagreements {r['disagreements']} ({r['lingua_other_language']} another language)"
            )
            if "lingua_en" in r:
                share = int(r["ruled_of_lingua_en"]) / max(1, int(r["lingua_en"]))  # type: ignore[call-overload]
                line += f"  (of {r['lingua_en']} lingua calls English: {share:.0%})"
            print(line)
            for example in r["examples"]:  # type: ignore[attr-defined]
                print(f"    {example[:160]!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
