"""Latency of intake's Slack Events API endpoint under concurrent signed events.

For each mode, concurrency (default 50) and run (default 3) it starts, as subprocesses,

* a fake Slack Web API (``tests.adapters.fake_slack.FakeSlack``: auth.test, chat.postMessage),
* intake itself (``bootstrap.serve``: Slack over HTTP on a free port, email listener, outbox
  dispatcher) on a fresh temporary SQLite database,

warms up with 100 events, then POSTs N new-message events (default 2,000; each opens a ticket
and queues an in-thread acknowledgement that the dispatcher posts to the fake API while the
load runs), signed exactly as Slack signs them, keeping ``concurrency`` requests in flight over
keep-alive connections. It reports the time from sending a request to reading the answer
(p50, p90, p99, max) and events per second, and the medians over the runs. After each run it
reads the database: every 200 must be a stored ticket with a queued or sent acknowledgement,
and nothing may be answered other than 200. It then waits for the dispatcher (which runs at a
lower priority than the listener, so under this load the replies lag behind the events) and
reports how long after the last event every reply had been posted; more than 60 s is a
failure too. On any failure it exits with status 1.

    .venv/bin/python bench/bench_slack.py                      # 3 runs per mode at 50 in flight, ~1-2 min
    .venv/bin/python bench/bench_slack.py --concurrency 10,50 --runs 1 --events 1000 --json

Modes: ``full`` is the whole intake; ``adapter`` replaces the intake service with one that
answers at once and stores nothing, which isolates the Slack adapter's own cost (aiohttp, bolt's
signature check and middleware, the translation, the log line) from the core and storage.

The load client runs on the same machine (and competes for its cores), so the figures are an
upper bound on the server's own latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))

from procs import Proc, ProcError  # noqa: E402 - bench/ is this script's directory

READY_FAKE = re.compile(r"fake slack listening on 127\.0\.0\.1:(\d+)")
READY_SLACK = re.compile(r"intake Slack events: (http://\S+)")
TARGET_P99_MS = 100.0
SIGNING_SECRET = "bench-signing-secret-0123456789abcdef"
CHANNEL = "C0BENCH01"


class BenchError(Exception):
    """Setup went wrong; there is no figure to give."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- subprocess roles


def serve_fake() -> None:
    from tests.adapters.fake_slack import FakeSlack

    async def main() -> None:
        fake = FakeSlack()
        await fake.start()
        print(f"fake slack listening on 127.0.0.1:{fake.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        posts = len(fake.posts())
        print(f"fake slack: {posts} chat.postMessage accepted", flush=True)
        await fake.stop()

    asyncio.run(main())


class NullService:
    """Stands in for IntakeService in ``--adapter-only`` runs: answers at once, stores nothing."""

    def __init__(self, real: Any) -> None:
        from intake.model import Route, Severity
        from intake.service import Receipt

        self.recorder = real.recorder
        self.receipt = Receipt(
            route=Route.NEW, ticket_id=1, reference="SUP-0000-0000", created=True, severity=Severity.S3,
            security=False, acknowledged=True, ack_note="queued", alerted=False, note="adapter-only bench",
        )  # fmt: skip
        self.count = 0

    async def receive(self, message: Any) -> Any:
        self.count += 1
        return self.receipt


def serve_intake(config: str, *, adapter_only: bool) -> None:
    from adapters import bootstrap
    from adapters.cli import setup_logging
    from adapters.settings import load_settings

    settings = load_settings(config)
    setup_logging(settings)
    app = bootstrap.build(settings)
    if adapter_only:
        app.service = NullService(app.service)  # type: ignore[assignment]
    bootstrap.run_loop(app.settings, bootstrap.serve(app, ready=lambda line: print(line, flush=True)))


# --------------------------------------------------------------------------- configuration


def write_config(workdir: Path, fake_port: int) -> Path:
    from tests.adapters.fake_slack import BOT_TOKEN

    path = workdir / "intake.toml"
    path.write_text(
        f"""
[storage]
url = "sqlite:///{workdir / "intake.db"}"
[email]
listen_host = "127.0.0.1"
listen_port = {free_port()}
[outbound]
relay_host = "127.0.0.1"
relay_port = {free_port()}
[log]
level = "INFO"
[slack]
enabled = true
listen_host = "127.0.0.1"
listen_port = 0
api_url = "http://127.0.0.1:{fake_port}/api/"
bot_token = "{BOT_TOKEN}"
signing_secret = "{SIGNING_SECRET}"
[slack.channels]
{CHANNEL} = "bench-customer"
"""
    )
    return path


# --------------------------------------------------------------------------- load


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


async def drive(url: str, *, events: int, concurrency: int, first: int) -> dict[str, Any]:
    import aiohttp

    from tests.adapters.fake_slack import message_event, sign

    bodies = []
    for i in range(events):
        env = message_event(
            text=f"Bench {first + i}: the revenue dashboard shows no data since this morning for our team",
            channel=CHANNEL,
            user=f"U{(first + i) % 997:07d}",
            ts=f"{int(time.time())}.{first + i:06d}",
        )
        bodies.append(json.dumps(env))
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[str] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while True:
                try:
                    body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                headers = {"Content-Type": "application/json", **sign(body, secret=SIGNING_SECRET)}
                data = body.encode()
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=data, headers=headers) as resp:
                        await resp.read()
                        status = resp.status
                except aiohttp.ClientError:
                    status = 0
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = [x * 1000 for x in latencies]
    return {
        "events": events,
        "concurrency": concurrency,
        "elapsed_s": round(elapsed, 3),
        "events_per_s": round(events / elapsed, 1),
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def db_stats(workdir: Path) -> dict[str, Any]:
    from storage.store import SqlStore

    store = SqlStore(f"sqlite:///{workdir / 'intake.db'}")
    try:
        stats: dict[str, Any] = store.run_sync(lambda uow: uow.stats())
        return stats
    finally:
        store.dispose()


async def one_run(args: argparse.Namespace, mode: str, concurrency: int, run: int) -> dict[str, Any]:
    adapter_only = mode == "adapter"
    with tempfile.TemporaryDirectory(prefix="bench-slack-") as tmp:
        workdir = Path(tmp)
        me = str(BENCH_DIR / "bench_slack.py")
        fake = Proc("fake slack", [sys.executable, me, "--serve-fake"], workdir / "fake.log")
        fake.start()
        intake: Proc | None = None
        try:
            port = int((await fake.wait_for(READY_FAKE)).group(1))
            config = write_config(workdir, port)
            argv = [sys.executable, me, "--serve-intake", str(config)] + (["--adapter-only"] if adapter_only else [])
            intake = Proc("intake", argv, workdir / "intake.log")
            intake.start()
            url = (await intake.wait_for(READY_SLACK)).group(1)
            warm = await drive(url, events=args.warmup, concurrency=concurrency, first=0)
            result = await drive(url, events=args.events, concurrency=concurrency, first=args.warmup)
            # The dispatcher runs at a lower priority than the listener (outbound.process_nice):
            # under this load replies lag behind the events. How long until all are posted?
            drained_at = None
            burst_end = time.perf_counter()
            while time.perf_counter() - burst_end < 60:
                stats = db_stats(workdir)
                if adapter_only or not stats["outbox"]["pending"]:
                    drained_at = time.perf_counter() - burst_end
                    break
                await asyncio.sleep(0.1)
            result["replies_drained_s"] = None if drained_at is None else round(drained_at, 2)
        finally:
            if intake is not None:
                intake.stop()
            fake.stop()
        posted = re.search(r"(\d+) chat.postMessage accepted", fake.text())
        ok = result["statuses"].get("200", 0) + warm["statuses"].get("200", 0)
        acks = int(stats.get("outbox_by_kind", {}).get("acknowledgement", 0))
        result.update(
            mode=mode,
            run=run,
            tickets=stats["tickets"],
            answered_200=ok,
            acknowledgements_queued=acks,
            acknowledgements_posted=int(posted.group(1)) if posted else None,
        )
        problems = []
        if ok != args.warmup + args.events:
            problems.append(f"only {ok} of {args.warmup + args.events} events answered 200: {result['statuses']}")
        if adapter_only:
            pass  # nothing is stored on purpose
        elif stats["tickets"] != ok:
            problems.append(f"{ok} answered 200 but {stats['tickets']} tickets stored")
        if not adapter_only and result["replies_drained_s"] is None:
            problems.append("replies still pending 60 s after the last event")
        if not adapter_only and acks != stats["tickets"]:
            problems.append(f"{stats['tickets']} tickets but {acks} acknowledgements queued")
        result["problems"] = problems
        return result


async def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for mode in args.modes:
        for concurrency in args.concurrency:
            for run in range(1, args.runs + 1):
                r = await one_run(args, mode, concurrency, run)
                results.append(r)
                log(
                    f"{mode} run {run} at {concurrency} in flight: {r['events_per_s']:.0f} events/s, "
                    f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms; "
                    f"{r['tickets']} tickets"
                    + (
                        ""
                        if mode != "full"
                        else f", every reply posted {r['replies_drained_s']:.1f} s after the last event"
                        if r["replies_drained_s"] is not None
                        else f", replies still pending 60 s after the last event ({r['acknowledgements_posted']})"
                    )
                    + ("; PROBLEMS: " + "; ".join(r["problems"]) if r["problems"] else "")
                )
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[50])
    p.add_argument(
        "--modes",
        type=lambda s: [m.strip() for m in s.split(",")],
        default=["full", "adapter"],
        help="full: the whole intake; adapter: the service replaced by one that stores nothing "
        "(the Slack adapter's own cost). Default: full,adapter",
    )
    p.add_argument("--json", action="store_true", help="print every run as JSON too")
    p.add_argument("--adapter-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-intake", metavar="CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_fake:
        serve_fake()
        return 0
    if args.serve_intake:
        serve_intake(args.serve_intake, adapter_only=args.adapter_only)
        return 0
    if not set(args.modes) <= {"full", "adapter"}:
        p.error("--modes takes full and/or adapter")
    try:
        results = asyncio.run(bench(args))
    except (BenchError, ProcError) as exc:
        log(f"bench_slack: {exc}")
        return 2
    print(f"\nSlack Events API, {args.events} new-message events per run, {args.runs} run(s), median of runs:")
    columns = ("in flight", "events/s", "p50 ms", "p90 ms", "p99 ms", "max ms")
    print(f"{'mode':>8} " + " ".join(f"{c:>9}" for c in columns) + "  replies done  p99 target")
    failed = False
    keys = ("events_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms")
    for mode in args.modes:
        for c in args.concurrency:
            rs = [r for r in results if r["concurrency"] == c and r["mode"] == mode]
            med = {k: statistics.median(r[k] for r in rs) for k in keys}
            verdict = "met" if med["p99_ms"] < TARGET_P99_MS else "MISSED"
            drained = [r["replies_drained_s"] for r in rs if r["replies_drained_s"] is not None]
            done = f"+{statistics.median(drained):.1f} s" if mode == "full" and drained else "-"
            print(
                f"{mode:>8} {c:>9} {med['events_per_s']:>9.0f} {med['p50_ms']:>9.1f} {med['p90_ms']:>9.1f} "
                f"{med['p99_ms']:>9.1f} {med['max_ms']:>9.1f}  {done:>12}  < {TARGET_P99_MS:.0f} ms: {verdict}"
            )
            failed = failed or any(r["problems"] for r in rs)
    if args.json:
        print(json.dumps(results, indent=2))
    if failed:
        print("FAILED: some events were not answered 200 or not stored (see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
