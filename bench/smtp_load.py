"""Asyncio SMTP load client: N messages over C concurrent sessions, one connection per message.

Each message is delivered the way an MTA delivers it: connect, read the 220 greeting, EHLO,
MAIL FROM, RCPT TO, DATA, the body, ".", QUIT. There is no retry and, unless asked for
(``pipelining``: MAIL, RCPT and DATA in one write when the server offers it), no pipelining: a reply
other than 250 to the final dot (or an earlier refusal, a timeout, a dropped connection) counts
as a failure and shows up in the ``codes`` histogram.

The client is written on raw asyncio streams (not smtplib, not aiosmtplib) and the message
bodies are encoded once per run, so that the client takes as little of the CPU it shares with
the server under test as a Python client can. ``LoadResult.cpu`` reports what it did take.

As a module::

    result = await run_load("127.0.0.1", 2525, messages=2000, sessions=10)
    print(result.rate, result.p50, result.p99, result.codes)

As a command::

    .venv/bin/python bench/smtp_load.py --port 2525 -n 2000 -c 10 [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from pathlib import Path

__all__ = ["LoadResult", "build_messages", "c_client", "run_load", "run_load_c"]

N_DOMAINS = 500

# Realistic support requests. They avoid anything a triage rule could take for a security
# incident (no paging during a benchmark) and anything that looks like a ticket reference.
_SUBJECTS = (
    "Nightly export to the warehouse keeps failing",
    "Cannot add new users to our workspace",
    "Invoice for last month shows the wrong plan",
    "Dashboard very slow since the weekend",
    "API returns 502 for bulk uploads",
    "Question about data retention settings",
    "Webhook events arrive twice",
    "Notification emails never arrive",
    "SSO login loops back to the start page",
    "CSV import rejects files with accents",
    "Scheduled reports went out empty",
    "Mobile app crashes when opening attachments",
)

_PARAGRAPHS = (
    "Since this morning the nightly export of our orders to the data warehouse stops after a "
    "few minutes. Nothing changed on our side as far as I know: same settings, same schedule, "
    "same target bucket. The job status page says 'interrupted' without any further detail. We "
    "rely on this export for the daily sales report, so the finance team is waiting on it.",
    "When I try to invite new colleagues to our workspace, the invitation form spins for a while "
    "and then says 'something went wrong'. Existing users can still sign in and work normally. "
    "We have plenty of seats left on the plan. I tried from two browsers and two networks with "
    "the same result. Could you check whether something is wrong with our workspace?",
    "The dashboards that used to load in a second or two now take close to a minute, and some "
    "widgets time out completely. It started on Saturday. Our data volume has not grown much "
    "this month. Below is an excerpt of what the browser console and our integration log show "
    "while a dashboard is loading, in case it helps your engineers narrow it down.",
    "Our integration posts batches of about five hundred records to the bulk endpoint every ten "
    "minutes. Since yesterday roughly one batch in three fails with a 502 from your side, and the "
    "retry usually succeeds. We would like to understand whether this is a known problem and "
    "whether we should lower the batch size until it is fixed.",
)

_LOG_LINE = (
    "2024-05-14 02:{m:02d}:{s:02d} INFO worker-{w} batch {b} processed {r} rows in {t}.{f:02d}s, "
    "queue depth {q}, retries 0\n"
)


@dataclass
class LoadResult:
    """Outcome of one :func:`run_load` call. Times in seconds, latencies in milliseconds."""

    host: str
    port: int
    messages: int  # asked for
    sessions: int
    size: int  # approximate bytes per message
    sent: int = 0  # transactions attempted (connections opened or tried)
    ok: int = 0  # 250 after the final dot
    failed: int = 0  # everything else
    elapsed: float = 0.0  # wall clock of the whole run
    rate: float = 0.0  # ok / elapsed, messages per second
    p50: float = 0.0  # latency of accepted messages: connect .. 250 after the final dot
    p99: float = 0.0
    max: float = 0.0
    codes: dict[str, int] = field(default_factory=dict)  # "250", "451", "RCPT:550", "error:timeout"
    cpu_user: float = 0.0  # CPU seconds this (client) process used during the run
    cpu_system: float = 0.0

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_system

    @property
    def cpu_share(self) -> float:
        """Client CPU as a fraction of one core over the run (0.5 = half a core)."""
        return self.cpu / self.elapsed if self.elapsed else 0.0

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["cpu"] = round(self.cpu, 3)
        d["cpu_share"] = round(self.cpu_share, 3)
        for k in ("elapsed", "rate", "p50", "p99", "max", "cpu_user", "cpu_system"):
            d[k] = round(d[k], 3)
        return d

    def summary(self) -> str:
        codes = " ".join(f"{k}={v}" for k, v in sorted(self.codes.items()))
        return (
            f"{self.ok}/{self.sent} ok in {self.elapsed:.2f}s = {self.rate:.0f} msg/s, "
            f"p50 {self.p50:.1f} ms, p99 {self.p99:.1f} ms, max {self.max:.1f} ms, "
            f"client CPU {self.cpu:.2f}s ({self.cpu_share:.2f} core) [{codes}]"
        )


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def _bodies(size: int, variants: int = 8) -> list[bytes]:
    """A few ~``size``-byte plain-text bodies, CRLF line ends, already dot-safe, in bytes."""
    bodies = []
    for v in range(variants):
        text = (
            "Hello support team,\n\n"
            + _PARAGRAPHS[v % len(_PARAGRAPHS)]
            + "\n\nHere is the relevant part of our log:\n\n"
        )
        closing = "\nThanks in advance for looking into this.\n\nBest regards,\nA. Customer\n"
        target = size - 440  # the header and the final dot take about 440 bytes
        n = 0
        # Bytes once encoded, every "\n" becoming "\r\n".
        while len(text) + text.count("\n") + len(closing) + closing.count("\n") < target:
            text += _LOG_LINE.format(
                m=(n * 7 + v) % 60,
                s=(n * 13) % 60,
                w=n % 8,
                b=1000 + n * 3 + v,
                r=480 + (n * 11) % 40,
                t=1 + n % 4,
                f=(n * 37) % 100,
                q=(n * 5) % 17,
            )
            n += 1
        text += closing
        lines = text.split("\n")
        # Dot-stuffing (RFC 5321 4.5.2), though none of the lines above starts with a dot.
        lines = ["." + ln if ln.startswith(".") else ln for ln in lines]
        bodies.append("\r\n".join(lines).encode("ascii"))
    return bodies


def build_messages(count: int, *, size: int = 4096, rcpt: str = "support@example.com", run_id: str | None = None):
    """Yield ``(sender, data)`` for ``count`` messages; ``data`` ends with the final ``.\\r\\n``.

    Senders are ``customer{i}@client{i % 500}.example.net``; Message-IDs are unique across runs
    (``run_id`` defaults to a random value) so that deduplication by Message-ID never swallows
    a message from a later run against the same database.
    """
    run_id = run_id or uuid.uuid4().hex[:12]
    bodies = _bodies(size)
    date = formatdate(localtime=False)
    for i in range(count):
        domain = f"client{i % N_DOMAINS}.example.net"
        sender = f"customer{i}@{domain}"
        header = (
            f"From: Customer {i} <{sender}>\r\n"
            f"To: Support <{rcpt}>\r\n"
            f"Subject: {_SUBJECTS[i % len(_SUBJECTS)]} ({domain})\r\n"
            f"Date: {date}\r\n"
            f"Message-ID: <{run_id}.{i}@{domain}>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "Content-Transfer-Encoding: 7bit\r\n"
            "\r\n"
        ).encode("ascii")
        yield sender, header + bodies[i % len(bodies)] + b"\r\n.\r\n"


class _Refused(Exception):
    def __init__(self, stage: str, code: int) -> None:
        super().__init__(stage, code)
        self.key = f"{stage}:{code}"


async def _reply_lines(reader: asyncio.StreamReader) -> list[bytes]:
    """The lines of one (possibly multi-line) reply."""
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionResetError("connection closed by server")
        lines.append(line)
        if line[3:4] != b"-":
            return lines


async def _reply(reader: asyncio.StreamReader) -> int:
    """Read one (possibly multi-line) reply and return its code."""
    return int((await _reply_lines(reader))[-1][:3])


async def _expect(reader: asyncio.StreamReader, stage: str, want: int) -> None:
    code = await _reply(reader)
    if code != want:
        raise _Refused(stage, code)


async def _ehlo_reply(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """The EHLO reply's code, and whether it offers PIPELINING."""
    lines = await _reply_lines(reader)
    return int(lines[-1][:3]), any(line[4:].strip().upper() == b"PIPELINING" for line in lines)


async def _deliver(
    host: str, port: int, sender: str, rcpt_cmd: bytes, data: bytes, ehlo: bytes, pipelining: bool = False
) -> tuple[str, float]:
    """One SMTP transaction on its own connection; returns (code key, latency in seconds).

    With ``pipelining``, MAIL, RCPT and DATA go out in one write when the server offers
    PIPELINING (RFC 2920), as Postfix's and Exim's clients send them."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _expect(reader, "connect", 220)
        writer.write(ehlo)
        code, offered = await _ehlo_reply(reader)
        if code != 250:
            raise _Refused("EHLO", code)
        steps = ((b"MAIL FROM:<" + sender.encode("ascii") + b">\r\n", "MAIL", 250), (rcpt_cmd, "RCPT", 250),
                 (b"DATA\r\n", "DATA", 354))  # fmt: skip
        together = pipelining and offered  # RFC 2920: the three in one write
        if together:
            writer.write(b"".join(command for command, _, _ in steps))
        for command, stage, want in steps:
            if not together:
                writer.write(command)
            await _expect(reader, stage, want)
        writer.write(data)
        code = await _reply(reader)
        latency = time.perf_counter() - t0
        writer.write(b"QUIT\r\n")
        try:
            await _reply(reader)
        except (ConnectionError, ValueError):
            pass  # the message is settled; a rude hang-up after it is not our business
        return str(code), latency
    except _Refused:
        try:
            writer.write(b"QUIT\r\n")
        except ConnectionError:
            pass
        raise
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def run_load(
    host: str,
    port: int,
    *,
    messages: int,
    sessions: int,
    size: int = 4096,
    rcpt: str = "support@example.com",
    transaction_timeout: float = 60.0,
    helo: str = "loadgen.example.net",
    greeting: str = "EHLO",
    also: Sequence[tuple[str, int]] = (),
    pipelining: bool = False,
) -> LoadResult:
    """Deliver ``messages`` messages with ``sessions`` concurrent connections; no retries.

    ``also``: more servers (host, port) to share the load with: session k delivers to server
    k mod n of ``(host, port), *also`` (several intake instances behind one MX).

    ``transaction_timeout`` (seconds) bounds one whole transaction, connect .. reply to the
    final dot. ``greeting="HELO"`` instead of EHLO gets a one-line reply, as Postfix's
    smtp-source does (aiosmtpd sends each line of its EHLO reply in its own write).
    ``pipelining``: send MAIL, RCPT and DATA in one write to a server that offers PIPELINING
    (Postfix's and Exim's clients do; smtp-source, the issue's reference client, does not).
    """
    result = LoadResult(host=host, port=port, messages=messages, sessions=sessions, size=size)
    ehlo = greeting.encode("ascii") + b" " + helo.encode("ascii") + b"\r\n"
    rcpt_cmd = b"RCPT TO:<" + rcpt.encode("ascii") + b">\r\n"
    source = iter(build_messages(messages, size=size, rcpt=rcpt))
    codes: Counter[str] = Counter()
    latencies: list[float] = []

    targets = [(host, port), *also]

    async def session(k: int) -> None:
        target_host, target_port = targets[k % len(targets)]
        for sender, data in source:  # shared iterator: each worker takes the next message
            result.sent += 1
            try:
                async with asyncio.timeout(transaction_timeout):
                    key, latency = await _deliver(target_host, target_port, sender, rcpt_cmd, data, ehlo, pipelining)
            except _Refused as exc:
                key = exc.key
            except TimeoutError:
                key = "error:timeout"
            except (OSError, ValueError) as exc:
                key = f"error:{type(exc).__name__}"
            else:
                if key == "250":
                    latencies.append(latency)
            codes[key] += 1

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    await asyncio.gather(*(session(k) for k in range(max(1, sessions))))
    result.elapsed = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)

    result.cpu_user = ru1.ru_utime - ru0.ru_utime
    result.cpu_system = ru1.ru_stime - ru0.ru_stime
    return _settle(result, dict(codes), latencies)


def _settle(result: LoadResult, codes: dict[str, int], latencies: list[float]) -> LoadResult:
    """Fill in what follows from the reply codes and the latencies (seconds) of a finished run."""
    result.codes = codes
    result.ok = codes.get("250", 0)
    result.failed = result.sent - result.ok
    result.rate = result.ok / result.elapsed if result.elapsed else 0.0
    latencies.sort()
    result.p50 = _percentile(latencies, 50) * 1000
    result.p99 = _percentile(latencies, 99) * 1000
    result.max = (latencies[-1] if latencies else 0.0) * 1000
    return result


C_SOURCE = Path(__file__).with_name("smtp_load.c")


def c_client() -> Path:
    """The C client (smtp_load.c), compiled once per version of its source into a cache."""
    digest = hashlib.sha256(C_SOURCE.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "intake-bench"
    binary = cache / f"smtp_load_c-{digest}"
    if binary.exists():
        return binary
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("the C client needs a C compiler (cc or gcc) to build bench/smtp_load.c")
    cache.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([cc, "-O2", "-o", str(partial), str(C_SOURCE)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building {C_SOURCE.name} failed:\n{done.stderr}")
    partial.replace(binary)
    return binary


async def run_load_c(
    host: str,
    port: int,
    *,
    messages: int,
    sessions: int,
    size: int = 4096,
    rcpt: str = "support@example.com",
    transaction_timeout: float = 60.0,
    helo: str = "loadgen.example.net",
    also_ports: Sequence[int] = (),
) -> LoadResult:
    """:func:`run_load` through the C client: the same messages and dialogue, measured the same
    way, for a client that takes almost no CPU from the server under test (smtp_load.c).

    ``also_ports``: more servers on ``host`` to share the load with (session k delivers to
    port k mod n of ``port, *also_ports``), as ``run_load``'s ``also``."""
    result = LoadResult(host=host, port=port, messages=messages, sessions=sessions, size=size)
    binary = c_client()
    with tempfile.NamedTemporaryFile(prefix="smtp-load-", suffix=".bin") as f:
        for sender, data in build_messages(messages, size=size, rcpt=rcpt):
            raw = sender.encode("ascii")
            f.write(struct.pack("<I", len(raw)) + raw + struct.pack("<I", len(data)) + data)
        f.flush()
        ports = ",".join(str(p) for p in (port, *also_ports))
        argv = [str(binary), host, ports, str(max(1, sessions)), f.name, str(transaction_timeout), helo, rcpt]
        pipe = asyncio.subprocess.PIPE
        proc = await asyncio.create_subprocess_exec(*argv, stdout=pipe, stderr=pipe)
        out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the C client failed ({proc.returncode}): {err.decode(errors='replace').strip()}")
    latencies: list[float] = []
    codes: dict[str, int] = {}
    for line in out.decode("ascii").splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "L":
            latencies.append(int(rest) / 1e9)
        elif kind == "C":
            key, _, n = rest.rpartition(" ")
            codes[key] = int(n)
        elif kind == "T":
            sent, elapsed_ns, user, system = rest.split()
            result.sent, result.elapsed = int(sent), int(elapsed_ns) / 1e9
            result.cpu_user, result.cpu_system = float(user), float(system)
    return _settle(result, codes, latencies)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2525)
    p.add_argument("-n", "--messages", type=int, default=2000)
    p.add_argument("-c", "--sessions", type=int, default=10, help="concurrent connections")
    p.add_argument("-s", "--size", type=int, default=4096, help="approximate message size in bytes")
    p.add_argument("--rcpt", default="support@example.com")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per transaction")
    p.add_argument("--helo", action="store_true", help="HELO instead of EHLO (as smtp-source)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--c-client", action="store_true", help="deliver through the C client (smtp_load.c)")
    a = p.parse_args(argv)
    common = dict(messages=a.messages, sessions=a.sessions, size=a.size, rcpt=a.rcpt, transaction_timeout=a.timeout)
    if a.c_client:
        if a.helo:
            p.error("the C client always sends EHLO; leave out --helo")
        res = asyncio.run(run_load_c(a.host, a.port, **common))  # type: ignore[arg-type]
    else:
        res = asyncio.run(run_load(a.host, a.port, greeting="HELO" if a.helo else "EHLO", **common))  # type: ignore[arg-type]
    print(json.dumps(res.to_dict(), indent=2) if a.json else res.summary())
    return 0 if res.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
