"""What aiosmtpd's protocol costs the listener per session, with and without LeanLoop.

The server is intake's listener (``EmailListener``: the protocol template, the session
limits, the chunked DATA reader) with a handler that stores nothing, on uvloop, in a process
of its own; ``lean`` is the listener as it is (adapters/email/smtploop.py mixed in),
``aiosmtpd`` the same classes without that mixin. The load client (bench/smtp_load.py) sends
whole sessions (connect, EHLO, MAIL, RCPT, DATA, the message, QUIT) over loopback from this
process; the server's CPU (user and system, from /proc) per session is printed for each
round, the two kinds alternating, then the medians.

Run: ``.venv/bin/python bench/bench_smtp_loop.py [--rounds 4] [--messages 5000]``; with
``--callgrind --messages 1000`` the server's instructions per session are counted instead
(valgrind; repeatable to a fraction of a per cent, unlike CPU time on a shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from smtp_load import run_load  # noqa: E402

KINDS = ("aiosmtpd", "lean")


def serve(port: int, kind: str) -> None:
    import uvloop
    from aiosmtpd.smtp import SMTP

    from adapters.email import listener
    from adapters.email.smtpdata import ChunkedData

    if kind == "aiosmtpd":

        class WithoutLean(listener._Limited, ChunkedData, SMTP):
            pass

        listener.IntakeSMTP = WithoutLean  # type: ignore[misc, assignment]

    class Sink:
        def __init__(self) -> None:
            self.tracker = listener.SessionTracker()

        async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
            envelope.rcpt_tos.append(address)
            return "250 OK"

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 2.0.0 Ok: stored as SUP-ABCD-EFGH"

    async def main() -> None:
        config = listener.ListenerConfig(addresses=("support@example.com",))
        server = listener.EmailListener(Sink(), config, host="127.0.0.1", port=port)  # type: ignore[arg-type]
        await server.start()
        print("ready", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(grace=1.0)

    sys.setswitchinterval(0.0005)  # as intake serve sets it
    uvloop.run(main())


def _cpu(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def measure(kind: str, messages: int, sessions: int) -> tuple[float, float, float]:
    """(user µs, system µs, msg/s) of the server per session."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--kind", kind], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        asyncio.run(run_load("127.0.0.1", port, messages=300, sessions=sessions))  # warm-up
        user0, sys0 = _cpu(proc.pid)
        res = asyncio.run(run_load("127.0.0.1", port, messages=messages, sessions=sessions))
        user1, sys1 = _cpu(proc.pid)
        _check(kind, res, messages)
        return (user1 - user0) / res.ok * 1e6, (sys1 - sys0) / res.ok * 1e6, res.rate
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def count_instructions(kind: str, messages: int, sessions: int, workdir: Path) -> float:
    """Instructions the server process runs per session, counted by callgrind (the same for
    the same code and inputs, whatever else the machine does; system calls' kernel work not
    included): counters zeroed after a warm-up, dumped after the measured sessions."""
    port = _free_port()
    out = workdir / f"callgrind.{kind}"
    proc = subprocess.Popen(
        [
            *("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", "--dump-instr=no"),
            *(sys.executable, __file__, "--serve", str(port), "--kind", kind),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        asyncio.run(run_load("127.0.0.1", port, messages=100, sessions=sessions))  # warm-up
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        res = asyncio.run(run_load("127.0.0.1", port, messages=messages, sessions=sessions))
        _check(kind, res, messages)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    dumps = sorted(workdir.glob(f"callgrind.{kind}.{proc.pid}.*"))
    totals = [int(line.split()[1]) for line in dumps[-1].read_text().splitlines() if line.startswith("summary:")]
    return totals[0] / messages


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check(kind: str, res: Any, messages: int) -> None:
    if res.ok != messages:
        raise SystemExit(f"{kind}: {res.ok} of {messages} accepted: {res.codes}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument(
        "--callgrind",
        action="store_true",
        help="count the server's instructions per session with valgrind's callgrind instead (one round)",
    )
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--kind", choices=KINDS, default="lean", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.kind)
        return
    if args.callgrind:
        with tempfile.TemporaryDirectory() as tmp:
            counts = {kind: count_instructions(kind, args.messages, args.sessions, Path(tmp)) for kind in KINDS}
        for kind in KINDS:
            print(f"{kind:8}: {counts[kind]:,.0f} instructions a session")
        print(f"lean / aiosmtpd: x{counts['lean'] / counts['aiosmtpd']:.3f}")
        return
    totals: dict[str, list[float]] = {k: [] for k in KINDS}
    for n in range(args.rounds):
        for kind in KINDS if n % 2 == 0 else reversed(KINDS):
            user, system, rate = measure(kind, args.messages, args.sessions)
            totals[kind].append(user + system)
            print(f"round {n + 1} {kind:8}: user {user:4.0f} µs, system {system:4.0f} µs a session ({rate:,.0f}/s)")
    for kind in KINDS:
        print(f"{kind:8}: median {statistics.median(totals[kind]):.0f} µs of server CPU a session")


if __name__ == "__main__":
    main()
