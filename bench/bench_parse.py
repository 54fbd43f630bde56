"""CPU per message of what a parsing worker does: parse, assess, and the pickle round trip.

Measures, in this one process and with ``time.process_time`` (CPU, not wall time: the machine
is shared), the pieces :func:`adapters.email.workers._parse_and_assess` runs for each message:

* ``parse``: :func:`adapters.email.parsing.parse_email` (mail-parser, our extraction, the quote
  split, attachments);
* ``assess``: :meth:`intake.service.IntakeService.assess` of a worker's service (keyword rules,
  hygiene, references, the report checklist, language detection), built from default settings;
* ``pickle``: what crosses the process boundary, both ways (the raw bytes and arguments to the
  worker, the worker's answer back to the listener): packed (where the code packs it),
  dumped, loaded and unpacked;
* ``total``: the three together, each message parsed, assessed and sent across once (a little
  more than the sum: the pieces measured apart keep their data warm in the caches).

over two sets of messages:

* ``load``: the ~4 KB plain-text messages ``bench/bench_intake.py`` sends (``smtp_load.build_messages``);
* ``corpus``: every file of the shared corpus (``/work/shared/corpus`` or ``--corpus DIR``).

Each figure is the minimum over ``--repeats`` passes of the mean per message (the minimum is
the figure least disturbed by other work on the machine). A run takes about ten seconds of one
core with the defaults (three of them loading lingua's models). ``result B`` is the pickled
size of the worker's answer. To measure older code, copy this script into its checkout: it
falls back to the unpacked answer where ``workers._pack`` does not exist.

    .venv/bin/python bench/bench_parse.py [--repeats 7] [--load-messages 48] [--corpus DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from smtp_load import build_messages  # noqa: E402

from adapters.email import workers  # noqa: E402
from adapters.email.parsing import parse_email  # noqa: E402
from adapters.settings import Settings  # noqa: E402

DEFAULT_CORPUS = Path("/work/shared/corpus")
RCPT = "support@example.com"


def load_messages(count: int, size: int) -> list[tuple[bytes, dict[str, Any]]]:
    """The load client's messages as the listener hands them over (no final dot line)."""
    out = []
    for sender, data in build_messages(count, size=size, rcpt=RCPT, run_id="bench"):
        raw = data.removesuffix(b".\r\n")
        out.append((raw, _kwargs(sender)))
    return out


def corpus_messages(folder: Path) -> list[tuple[bytes, dict[str, Any]]]:
    files = sorted(p for p in folder.rglob("*.eml") if p.is_file())
    return [(p.read_bytes(), _kwargs("sender@example.net")) for p in files]


def _kwargs(sender: str) -> dict[str, Any]:
    return {
        "recipient": RCPT,
        "envelope_sender": sender,
        "max_attachment_bytes": 10 * 1024 * 1024,
        "max_attachments_total": 25 * 1024 * 1024,
    }


def _min_per_message(work: Callable[[], None], count: int, repeats: int) -> float:
    """µs of CPU per message: the fastest of ``repeats`` passes over all ``count`` messages."""
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        work()
        best = min(best, time.process_time() - started)
    return best / count * 1e6


def measure(messages: list[tuple[bytes, dict[str, Any]]], repeats: int) -> dict[str, float]:
    service = workers._ASSESSOR
    assert service is not None
    parsed = [parse_email(raw, **kw) for raw, kw in messages]
    for m in parsed:  # warm caches (lingua models, lazily built matchers)
        service.assess(m)
    count = len(messages)

    def parse() -> None:
        for raw, kw in messages:
            parse_email(raw, **kw)

    def assess() -> None:
        for m in parsed:
            service.assess(m)

    # What crosses the process boundary, as ProcessPoolExecutor sends it: the call (function,
    # raw bytes, kwargs) to the worker, the result back.
    calls = [(workers._parse_and_assess, raw, kw) for raw, kw in messages]
    # The parent turns the worker's answer back into a message and an assessment (before
    # workers packed their answers, the answer was the pair itself).
    pack = getattr(workers, "_pack", None) or (lambda message, assessment, raw: (message, assessment))
    restore = getattr(workers, "_unpack", None) or (lambda result, raw: result)
    answers = [(m, service.assess(m)) for m in parsed]
    results = [workers._parse_and_assess(raw, kw) for raw, kw in messages]

    def round_trip() -> None:
        dumps, loads = pickle.dumps, pickle.loads
        for call, (message, assessment) in zip(calls, answers, strict=True):
            loads(dumps(call, pickle.HIGHEST_PROTOCOL))
            back = loads(dumps(pack(message, assessment, call[1]), pickle.HIGHEST_PROTOCOL))
            restore(back, call[1])

    def total() -> None:
        dumps, loads = pickle.dumps, pickle.loads
        for call in calls:
            func, raw, kw = loads(dumps(call, pickle.HIGHEST_PROTOCOL))
            result = loads(dumps(func(raw, kw), pickle.HIGHEST_PROTOCOL))
            restore(result, call[1])

    figures = {
        "parse": _min_per_message(parse, count, repeats),
        "assess": _min_per_message(assess, count, repeats),
        "pickle": _min_per_message(round_trip, count, repeats),
        "total": _min_per_message(total, count, repeats),
    }
    sizes = [len(pickle.dumps(r, pickle.HIGHEST_PROTOCOL)) for r in results]
    figures["result_bytes"] = sum(sizes) / len(sizes)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="passes per figure; the fastest counts")
    p.add_argument("--load-messages", type=int, default=48, help="how many load-client messages")
    p.add_argument("--size", type=int, default=4096, help="approximate size of a load-client message")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    workers._init_worker(Settings())
    sets = {"load": load_messages(args.load_messages, args.size)}
    if args.corpus.is_dir():
        sets["corpus"] = corpus_messages(args.corpus)
    report = {name: measure(msgs, args.repeats) | {"messages": len(msgs)} for name, msgs in sets.items()}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"µs of CPU per message (min of {args.repeats} passes, time.process_time)")
    print(f"{'set':8} {'messages':>8} {'parse':>9} {'assess':>9} {'pickle':>9} {'total':>9} {'result B':>9}")
    for name, f in report.items():
        print(
            f"{name:8} {f['messages']:>8} {f['parse']:>9.0f} {f['assess']:>9.0f} {f['pickle']:>9.0f}"
            f" {f['total']:>9.0f} {f['result_bytes']:>9.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
