"""Throughput of RuleSet.classify: MB/s on realistic bodies, and how it scales with phrases.

Run: .venv/bin/python bench/bench_classify.py [--mb 8] [--repeat 3]

Bodies are generated support mail in English and Spanish (2 % of it reporting an incident,
some with a forwarded message pasted in) and the text parts of the real-world messages in
/work/shared/corpus (spam, bounces, newsletters, helpdesk mail), several MB in all. Each rule set
classifies every body; the figure is megabytes of UTF-8 per second of CPU time (best of
``--repeat``), which other load on the machine disturbs less than wall time (also shown).

Targets (intake/rules.py): at least 50 MB/s with the default rules; 10,000 phrases no more than
2x slower than 10 (the Aho-Corasick scan does not grow with the number of phrases).
"""

from __future__ import annotations

import argparse
import email
import email.policy
import html
import pathlib
import random
import re
import sys
import time
from collections.abc import Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from intake.model import Severity  # noqa: E402
from intake.rules import Rule, RuleSet  # noqa: E402

CORPUS = pathlib.Path("/work/shared/corpus")
_TAG = re.compile(r"<[^>]{0,2000}>")  # fixed, bounded: strip HTML tags of corpus mail

EN_OPENINGS = ["Hi team,", "Hello,", "Dear Support,", "Good morning,", "Hi there,"]
EN_SENTENCES = [
    "Since this morning our users cannot log in to the dashboard (error 502).",
    "We tried clearing caches, restarting the app and re-deploying version {v} -- no luck.",
    "Could you please take a look? Our reference is {ref}.",
    "The export to CSV fails for reports larger than {n:,} rows; smaller exports work fine.",
    "I would like to reset my password, the link in the email seems to have expired.",
    "Can you confirm whether invoice {ref} has been paid? Accounting says it went out on the 2nd.",
    "After upgrading to {v} the scheduler runs every job twice.",
    "Steps to reproduce:\n 1. Open Reports\n 2. Choose 'All time'\n 3. Click Export > CSV",
    "The API returns 429 Too Many Requests although we send fewer than {n} calls per minute.",
    "Our SSO integration stopped working after we rotated the SAML certificate.",
    "We need to add {n} more seats to our plan before the end of the quarter.",
    "The mobile app crashes on start on Android 14; logs attached.",
]
EN_INCIDENTS = [
    "We believe there was a data breach: customer emails appeared on a paste site.",
    "Our admin account was hacked and someone changed the billing details.",
    "We received a phishing email that looks exactly like your login page.",
    "We noticed unauthorized access to the reporting API from an unknown IP.",
]
ES_OPENINGS = ["Hola equipo,", "Buenos días,", "Estimado soporte,", "Hola:"]
ES_SENTENCES = [
    "Desde esta mañana no podemos iniciar sesión en el panel (error 502).",
    "La exportación a CSV falla con más de {n:,} filas; las exportaciones pequeñas funcionan.",
    "¿Podrían revisar la configuración? Nuestra referencia es {ref}.",
    "Necesito restablecer mi contraseña, el enlace caducó.",
    "Después de actualizar a la versión {v}, el programador ejecuta cada tarea dos veces.",
    "Los datos filtrados por fecha no aparecen en el informe mensual.",
    "¿Pueden confirmar si la factura {ref} está pagada? Contabilidad dice que sí.",
]
ES_INCIDENTS = [
    "Creemos que hubo una filtración de datos de clientes.",
    "Detectamos un acceso no autorizado a la consola de administración.",
]
EN_CLOSINGS = ["Thanks,\nJane Doe | Acme Corp.", "Best regards,\nMark", "Kind regards,\nPriya\n-- \nSent from my phone"]
ES_CLOSINGS = ["Saludos cordiales,\nJosé Pérez | Compañía Ñandú S.A.", "Gracias,\nLucía"]


def corpus_texts() -> list[str]:
    """Text of every text/* part of every corpus message, decoded leniently."""
    texts: list[str] = []
    for path in sorted(CORPUS.rglob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
        for part in message.walk():
            if part.get_content_maintype() != "text":
                continue
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes) or not payload:
                continue
            try:
                text = payload.decode(part.get_content_charset() or "utf-8", "replace")
            except LookupError:  # a charset Python does not know (ansi_x3.110-1983, uft-8)
                text = payload.decode("latin-1")
            if part.get_content_subtype() == "html":
                text = html.unescape(_TAG.sub(" ", text))
            texts.append(text)
    return texts


def support_mail(rng: random.Random) -> str:
    """One generated support message, English or Spanish, sometimes reporting an incident."""
    spanish = rng.random() < 0.25
    openings, sentences, incidents, closings = (
        (ES_OPENINGS, ES_SENTENCES, ES_INCIDENTS, ES_CLOSINGS)
        if spanish
        else (EN_OPENINGS, EN_SENTENCES, EN_INCIDENTS, EN_CLOSINGS)
    )
    fill = {"v": f"{rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}", "n": rng.randint(10, 50_000)}
    fill["ref"] = f"ABC-{rng.randint(1000, 99999)}"
    paragraphs = []
    for _ in range(rng.randint(1, 6)):
        paragraphs.append(" ".join(rng.choice(sentences).format(**fill) for _ in range(rng.randint(1, 5))))
    if rng.random() < 0.02:  # a suspected incident in 2 % of support mail
        paragraphs.insert(rng.randint(0, len(paragraphs)), rng.choice(incidents))
    return f"{rng.choice(openings)}\r\n\r\n" + "\r\n\r\n".join(paragraphs) + f"\r\n\r\n{rng.choice(closings)}\r\n"


def realistic_bodies(total_mb: float, rng: random.Random) -> list[str]:
    """One body per message, ``total_mb`` MB in all: generated support mail (a few paragraphs,
    sometimes with a long log or a forwarded corpus message pasted in) and corpus texts as
    they are (spam, bounces, newsletters)."""
    corpus = corpus_texts()
    bodies: list[str] = []
    size = 0
    while size < total_mb * 1_000_000:
        roll = rng.random()
        if roll < 0.25:
            body = rng.choice(corpus)
        else:
            body = support_mail(rng)
            if roll > 0.85:  # pasted logs or a forwarded message make some bodies long
                body += "\r\n\r\n---------- Forwarded message ---------\r\n" + rng.choice(corpus)
        bodies.append(body)
        size += len(body.encode("utf-8"))
    return bodies


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable non-word ("vokuzari"): 3-4 syllables, so it does not occur in real mail."""
    return "".join(rng.choice("bdfgkmprtvz") + rng.choice("aeiou") for _ in range(rng.randint(3, 4)))


def synthetic_rules(phrases: int, rng: random.Random) -> RuleSet:
    """``phrases`` phrases of 1-3 pseudo-words (a fifth with a trailing *), 100 per rule."""
    words = [pseudo_word(rng) for _ in range(max(50, phrases))]
    made: list[str] = []
    for _ in range(phrases):
        phrase = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        made.append(phrase + "*" if rng.random() < 0.2 else phrase)
    rules = [
        Rule(name=f"synthetic-{i // 100}", phrases=tuple(made[i : i + 100]), severity=Severity.S3)
        for i in range(0, phrases, 100)
    ]
    return RuleSet(rules, source=f"<synthetic {phrases}>")


def measure(rule_set: RuleSet, bodies: Sequence[str], repeat: int) -> tuple[float, float, int]:
    """(best CPU seconds, best wall seconds, bodies with hits) for classifying every body."""
    best_cpu = best_wall = float("inf")
    with_hits = 0
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        with_hits = sum(1 for body in bodies if rule_set.classify(subject="Re: ticket", body=body).hits)
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return best_cpu, best_wall, with_hits


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=8.0, help="megabytes of bodies (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per rule set, best is kept (default 3)")
    args = parser.parse_args(argv)

    rng = random.Random(20240611)
    started = time.perf_counter()
    bodies = realistic_bodies(args.mb, rng)
    megabytes = sum(len(b.encode("utf-8")) for b in bodies) / 1e6
    non_ascii = sum(1 for b in bodies if not b.isascii())
    print(
        f"{len(bodies):,} bodies, {megabytes:.1f} MB (average {megabytes * 1000 / len(bodies):.1f} KB), "
        f"{non_ascii:,} with non-ASCII text; plus all of them joined into one 10 MB body"
    )
    big = " ".join(bodies)
    while len(big.encode("utf-8")) < 10_000_000:
        big += " " + big
    big = big[:10_000_000]
    big_mb = len(big.encode("utf-8")) / 1e6

    rule_sets = [("default rules", RuleSet.default())]
    rule_sets += [(f"synthetic {n:,}", synthetic_rules(n, rng)) for n in (10, 1_000, 10_000)]

    print()
    print(f"{'':<16} {'':>8}   {'many bodies (MB/s)':^26}   {'one 10 MB body (MB/s)':^21}")
    print(f"{'rule set':<16} {'phrases':>8}   {'cpu':>7} {'wall':>7} {'hit':>10}   {'cpu':>10} {'wall':>10}")
    many: dict[str, float] = {}
    one: dict[str, float] = {}
    for label, rule_set in rule_sets:
        cpu, wall, with_hits = measure(rule_set, bodies, args.repeat)
        big_cpu, big_wall, _ = measure(rule_set, [big], args.repeat)
        many[label], one[label] = megabytes / cpu, big_mb / big_cpu
        print(
            f"{label:<16} {rule_set.phrase_count:>8,}   {megabytes / cpu:>7.1f} {megabytes / wall:>7.1f} "
            f"{with_hits:>10,}   {big_mb / big_cpu:>10.1f} {big_mb / big_wall:>10.1f}"
        )

    print()
    print("cpu: MB per second of this process's CPU time; wall: per second of elapsed time;")
    print("hit: bodies with at least one hit. Best of", args.repeat, "runs.")
    print(
        f"10,000 phrases vs 10: {many['synthetic 10'] / many['synthetic 10,000']:.2f}x the time on many bodies, "
        f"{one['synthetic 10'] / one['synthetic 10,000']:.2f}x on one body (target: at most 2x)"
    )
    print(
        f"default rules: {many['default rules']:.1f} MB/s on many bodies, {one['default rules']:.1f} MB/s "
        "on one body (target: at least 50 MB/s)"
    )
    print(f"(ran in {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
