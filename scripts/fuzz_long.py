#!/usr/bin/env python3
"""Soak: the property of tests/adapters/test_fuzz.py, for as long as you like.

    .venv/bin/python scripts/fuzz_long.py --minutes 10
    .venv/bin/python scripts/fuzz_long.py --minutes 60 --seed 7 --round 1000

One intake (listener, SQLite store, dispatcher, relay stand-in) runs for the whole soak, as in
the test. Hypothesis runs in rounds of ``--round`` examples, each round with its own seed
(``--seed`` + round number), until the time is up; failing examples are saved in
``.hypothesis/fuzz_long`` and replayed first by the next run. On a failure Hypothesis shrinks
the example and prints it; the script then exits 1. At the end the outbox must have settled
with no failures but the known ones (``KNOWN`` in the test module). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

from tests.adapters.test_fuzz import SEED_FILES, Example, LiveIntake, examples  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to fuzz (default 10)")
    parser.add_argument("--round", type=int, default=500, help="examples per Hypothesis run (default 500)")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="seed of the first round")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.WARNING)  # no handler: LiveIntake watches the records itself

    print(f"{len(SEED_FILES)} seed messages; seed {args.seed}; {args.minutes:g} minutes", file=sys.stderr)
    replies: Counter[str] = Counter()
    stop_at = time.monotonic() + args.minutes * 60
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="intake-fuzz-") as tmp, LiveIntake(Path(tmp)) as live:

        def prop(example: Example) -> None:
            reply = live.check(example)
            replies[re.sub(r" as \S+$", "", reply)] += 1  # "250 2.0.0 Ok: stored", "500 Line too long ..."

        for n in range(1_000_000):
            if time.monotonic() >= stop_at:
                break
            run = seed(args.seed + n)(
                settings(
                    max_examples=args.round,
                    deadline=None,
                    database=DirectoryBasedExampleDatabase(str(ROOT / ".hypothesis" / "fuzz_long")),
                    suppress_health_check=list(HealthCheck),
                    print_blob=True,
                )(given(example=examples())(prop))
            )
            try:
                run()
            except Exception:
                logging.getLogger("fuzz").critical("round %d (seed %d) failed", n, args.seed + n, exc_info=True)
                return 1
            total = sum(replies.values())
            rate = total / (time.monotonic() - started)
            print(f"round {n}: {total} examples, {rate:.0f}/s, {dict(replies)}", file=sys.stderr)

        known = live.check_outbox()
    print(f"done: {sum(replies.values())} examples in {time.monotonic() - started:.0f} s", file=sys.stderr)
    for what, count in replies.most_common():
        print(f"  {count:7d}  {what}", file=sys.stderr)
    for why, count in known.items():
        print(f"known finding, {count} time(s): {why}", file=sys.stderr)
    for what, count in live.tolerated.most_common():
        print(f"mail-parser failure caught by the fallback, {count} time(s): {what}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
