#!/usr/bin/env python3
"""Crash test: two intake instances on one PostgreSQL database, killed with SIGKILL at random.

What it does:

1. creates a dedicated database (``intake_crash_<random>``) on the PostgreSQL server named by
   ``--pg`` (default $INTAKE_TEST_PG_URL or postgresql://postgres@127.0.0.1:5432/test), runs
   ``intake db upgrade`` once, and drops the database at the end (``--keep`` keeps it);
2. starts a relay stand-in (a subprocess of this script: aiosmtpd answering 250, offering
   PIPELINING as Postfix does) that appends
   every acknowledgement it accepts (time, Message-ID, To, the sender's EHLO name) to a file;
3. starts two ``intake --config C serve`` instances (each in its own process group: the
   listener and its outbox child process) on one database, each with its own port;
4. sends N messages (default 3,000; one connection per message, unique sender and
   Message-ID each) the way an MTA does: a 4xx reply, a refused or dropped connection or a
   timeout means "try again later", on the other instance, with the same bytes;
5. meanwhile kills a random instance's whole process group with SIGKILL every 0.3-1.5 s
   (``--kill-min``, ``--kill-max``; later where an instance takes longer than that to start,
   see ``kill_interval``) and starts it again at once (every incarnation gets its
   own EHLO name, ``a3.crash.test``, so each acknowledgement the relay receives names the
   incarnation that sent it);
6. once every message was answered 250 (or given up), lets the outboxes drain (leases of
   killed dispatchers run out after two minutes), stops everything and checks.

With ``--sqlite`` the same runs against one instance on a SQLite file in the work directory
(the embedded default: a SQLite file serves one instance).

With ``--relay-outages`` the relay also goes down now and then during the load (every 1-4 s,
for 0.5-2.5 s): it still greets, and answers every MAIL with 421, as a relay that is
shutting down or rate-limiting does. The outboxes then hold the email channel, check it and
probe it with one note; the targets are the same, and every acknowledgement must still arrive
(a message is recorded by the relay only when it answered 250 to its DATA).

Targets (exit status 1 when one is missed, 2 when the set-up failed):

* no message lost: every message answered 250 is stored, and every message got a 250;
* no duplicate ticket: one ticket per Message-ID;
* every ticket acknowledged;
* a crash test at all: at least ``--min-kills`` SIGKILLs (default 5) during the load;
* a duplicate acknowledgement only from a crash between the sending of a copy and the commit
  that records it: the incarnation that sent the earlier copy was SIGKILLed while that copy was
  on its way (it had written it whole; the relay took it in at most ``IN_FLIGHT`` seconds
  later) or after the relay accepted it; and every copy carries the same Message-ID as its
  twin.

    .venv/bin/python scripts/crash_test.py                      # 3,000 messages
    .venv/bin/python scripts/crash_test.py --sqlite -n 2000     # one instance on the embedded SQLite
    .venv/bin/python scripts/crash_test.py --sqlite --listener-processes 2   # two listeners on its port
    .venv/bin/python scripts/crash_test.py -n 300 --sessions 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from procs import Proc, ProcError, serve_smtp  # noqa: E402
from smtp_load import build_messages  # noqa: E402

READY_RE = re.compile(r"listening on\s+\[?([0-9A-Za-z.:_-]*?)\]?:(\d+)")
REFERENCE_RE = re.compile(r"stored as (\S+)")
# Seconds between an outbox process writing a copy whole and the relay stand-in taking it in
# (both on the same loaded cores): a SIGKILL that soon before the relay's record still came
# after the copy was sent. Seen: 3 ms.
IN_FLIGHT = 0.5
DEFAULT_PG = os.environ.get("INTAKE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


class SetupError(Exception):
    pass


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bare_mid(value: str | None) -> str:
    return (value or "").strip().strip("<>").strip()


# --------------------------------------------------------------------------- relay stand-in


def relay_main(port: int, record: Path, down_flag: Path | None = None) -> None:
    """aiosmtpd answering 250; one JSON line per accepted message, flushed at once. While
    ``down_flag`` exists, every MAIL gets 421 (the relay down: --relay-outages)."""
    from email.parser import BytesHeaderParser

    out = open(record, "a", buffering=1)  # lives as long as the process
    parser = BytesHeaderParser()

    class Handler:
        async def handle_EHLO(
            self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
        ) -> list[str]:
            # Offer PIPELINING, as Postfix does, so that the acknowledgements go out through
            # the sender's pipelined transaction, the one intake uses against real relays.
            session.host_name = hostname
            return [*responses[:-1], "250-PIPELINING", responses[-1]]

        async def handle_MAIL(
            self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
        ) -> str:
            if down_flag is not None and down_flag.exists():  # noqa: ASYNC240 - a stat, microseconds
                return "421 4.3.2 relay down for maintenance (crash test)"
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            return "250 OK"

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            headers = parser.parsebytes(bytes(envelope.original_content or envelope.content))
            out.write(
                json.dumps(
                    {
                        "t": time.time(),
                        "mid": bare_mid(headers.get("Message-ID")),
                        "to": list(envelope.rcpt_tos),
                        "helo": session.host_name,
                        "kind": headers.get("X-Intake-Kind", ""),
                        "subject": headers.get("Subject", ""),
                    }
                )
                + "\n"
            )
            out.flush()
            return "250 2.0.0 OK: queued"

    try:
        serve_smtp(Handler(), port, "relay.crash.test")
    finally:
        out.close()


# --------------------------------------------------------------------------- processes


class Server(Proc):
    """A subprocess that says "listening on HOST:PORT" when it is ready."""

    async def wait_ready(self, limit: float = 60.0) -> None:
        await self.wait_for(READY_RE, limit)


@dataclass
class Instance:
    """One intake instance; every (re)start is a new incarnation with its own EHLO name."""

    name: str
    port: int
    workdir: Path
    db_url: str
    relay_port: int
    intake: list[str]
    listeners: int = 1  # email.listener_processes: SIGKILL takes the whole process group
    generation: int = 0
    proc: Server | None = None
    kills: list[dict[str, Any]] = field(default_factory=list)

    @property
    def helo(self) -> str:
        return f"{self.name}{self.generation}.crash.test"

    def config(self) -> Path:
        path = self.workdir / f"{self.name}{self.generation}.toml"
        path.write_text(
            f"""
[storage]
url = "{self.db_url}"
[email]
listen_host = "127.0.0.1"
listen_port = {self.port}
support_address = "support@example.com"
hostname = "{self.helo}"
max_sessions = 500
max_sessions_per_client = 500
shutdown_grace = 5
listener_processes = {self.listeners}
[outbound]
relay_host = "127.0.0.1"
relay_port = {self.relay_port}
from_address = "support@example.com"
retry_base_seconds = 0.5
retry_cap_seconds = 2
timeout = 10
[log]
level = "WARNING"
"""
        )
        return path

    def start(self) -> Server:
        self.generation += 1
        cfg = self.config()
        self.proc = Server(self.helo, [*self.intake, "--config", str(cfg), "serve"], self.workdir / f"{self.helo}.log")
        self.proc.start()
        return self.proc

    def kill(self) -> dict[str, Any]:
        assert self.proc is not None
        event = {"t": time.time(), "helo": self.helo, "pid": self.proc.popen.pid if self.proc.popen else None}
        self.proc.kill()
        self.kills.append(event)
        return event


# --------------------------------------------------------------------------- the client


@dataclass
class Outcome:
    index: int
    mid: str
    sender: str
    attempts: list[str] = field(default_factory=list)  # "a:250", "b:451", "a:refused", ...
    reference: str | None = None
    answered: bool = False
    first_sent: float = 0.0
    answered_at: float = 0.0


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionResetError("connection closed")
        lines.append(line[4:].decode(errors="replace").strip())
        if line[3:4] != b"-":
            return int(line[:3]), " ".join(lines)


async def smtp_once(port: int, sender: str, data: bytes) -> tuple[int, str]:
    """One transaction; returns the reply to the final dot or the first refusal."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        code, text = await _reply(reader)
        if code != 220:
            return code, text
        for cmd, want in (
            (b"EHLO mta.crash.test\r\n", 250),
            (b"MAIL FROM:<" + sender.encode() + b">\r\n", 250),
            (b"RCPT TO:<support@example.com>\r\n", 250),
            (b"DATA\r\n", 354),
        ):
            writer.write(cmd)
            code, text = await _reply(reader)
            if code != want:
                return code, text
        writer.write(data)
        code, text = await _reply(reader)
        with contextlib.suppress(Exception):
            writer.write(b"QUIT\r\n")
            await asyncio.wait_for(_reply(reader), 2)
        return code, text
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def run_client(
    instances: list[Instance], n: int, sessions: int, run_id: str, *, give_up_after: float, per_try: float
) -> list[Outcome]:
    queue = list(enumerate(build_messages(n, size=2048, run_id=run_id)))
    queue.reverse()
    outcomes: list[Outcome] = []
    done = 0

    async def deliver(i: int, sender: str, data: bytes) -> None:
        nonlocal done
        mid = f"{run_id}.{i}@{sender.split('@')[1]}"
        o = Outcome(index=i, mid=mid, sender=sender, first_sent=time.time())
        outcomes.append(o)
        started = time.monotonic()
        attempt = 0
        while time.monotonic() - started < give_up_after:
            inst = instances[(i + attempt) % len(instances)]  # alternate, as an MTA with two MX hosts
            attempt += 1
            try:
                code, text = await asyncio.wait_for(smtp_once(inst.port, sender, data), per_try)
            except TimeoutError:
                o.attempts.append(f"{inst.name}:timeout")
            except ConnectionRefusedError:
                o.attempts.append(f"{inst.name}:refused")
            except (OSError, ValueError) as exc:
                o.attempts.append(f"{inst.name}:dropped({type(exc).__name__})")
            else:
                o.attempts.append(f"{inst.name}:{code}")
                if code == 250:
                    m = REFERENCE_RE.search(text)
                    o.reference = m.group(1) if m else None
                    o.answered, o.answered_at = True, time.time()
                    break
                if code >= 500:
                    break  # permanent: an MTA would bounce it; counted as not answered 250
            await asyncio.sleep(min(2.0, 0.05 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1.0))
        done += 1
        if done % 100 == 0:
            log(f"client: {done}/{n} messages settled")

    async def worker() -> None:
        while queue:
            i, (sender, data) = queue.pop()
            await deliver(i, sender, data)

    await asyncio.gather(*(worker() for _ in range(sessions)))
    outcomes.sort(key=lambda o: o.index)
    return outcomes


def kill_interval(lo: float, hi: float, startup: float) -> tuple[float, float]:
    """The SIGKILL interval to use: ``lo``-``hi``, or later where start-up takes longer than ``lo``.

    Kills spaced closer than an incarnation takes to start leave none up long enough to take
    mail: on a slow hour (start-up 1.7 s) the default 0.3-1.5 s made 990 kills and stored 267
    messages in 15 minutes, and the run never ended. The interval then starts at the start-up
    measured before the load, its width kept: an incarnation serves for up to that width.
    """
    if lo >= startup:
        return lo, hi
    lo, hi = startup, startup + max(0.0, hi - lo)
    log(f"start-up took {startup:.1f}s: killing every {lo:.1f}-{hi:.1f}s instead, so that incarnations serve")
    return lo, hi


async def no_outages() -> list[float]:
    return []


async def relay_chaos(down_flag: Path, stop: asyncio.Event) -> list[float]:
    """Take the relay down (421 to every MAIL) every 1-4 s for 0.5-2.5 s, until ``stop``; the
    outages' lengths. The relay is up again when this returns."""
    outages: list[float] = []
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), random.uniform(1.0, 4.0))
        if stop.is_set():
            break
        down = random.uniform(0.5, 2.5)
        down_flag.touch()  # noqa: ASYNC240 - an empty file, microseconds
        await asyncio.sleep(down)
        down_flag.unlink()  # noqa: ASYNC240
        outages.append(down)
        log(f"chaos: relay down (421 to every MAIL) for {down:.1f}s")
    return outages


async def chaos(instances: list[Instance], stop: asyncio.Event, lo: float, hi: float) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), random.uniform(lo, hi))
        if stop.is_set():
            break
        inst = random.choice(instances)
        event = inst.kill()
        event["ready_before_kill"] = bool(READY_RE.search(inst.proc.logfile.read_text(errors="replace")))
        events.append(event)
        inst.start()  # at once; the client meets refused connections meanwhile
        log(f"chaos: SIGKILL {event['helo']} (pid {event['pid']}); restarted as {inst.helo}")
    return events


# --------------------------------------------------------------------------- database


def pg_dsn(url: str) -> str:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return u.set(drivername="postgresql").render_as_string(hide_password=False)


def create_database(admin_url: str, workdir: Path, sqlite: bool) -> tuple[str, str]:
    """A fresh database for this run: (its name, its URL)."""
    if sqlite:
        path = workdir / "crash.db"
        return str(path), f"sqlite:///{path}"
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"intake_crash_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_dsn(admin_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)
    return name, url.render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    if name.endswith(".db"):
        return  # SQLite: the file goes with the work directory
    import psycopg

    with psycopg.connect(pg_dsn(admin_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def query(db_url: str, sql: str) -> list[tuple[Any, ...]]:
    if db_url.startswith("sqlite:///"):
        import sqlite3

        db = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=30)
        try:
            return list(db.execute(sql).fetchall())
        finally:
            db.close()
    import psycopg

    with psycopg.connect(pg_dsn(db_url), connect_timeout=5) as conn:
        return list(conn.execute(sql).fetchall())


async def drain(db_url: str, record: Path, limit: float) -> dict[str, int]:
    """Wait until no outbox entry is pending and the relay has been quiet for 3 s."""
    deadline = time.monotonic() + limit
    last_size, quiet_since = -1, time.monotonic()
    while True:
        status = dict(query(db_url, "SELECT status, count(*) FROM outbox GROUP BY status"))
        size = await asyncio.to_thread(lambda: record.stat().st_size if record.exists() else 0)
        if size != last_size:
            last_size, quiet_since = size, time.monotonic()
        if status.get("pending", 0) == 0 and time.monotonic() - quiet_since > 3:
            return status
        if time.monotonic() > deadline:
            log(f"drain: still pending after {limit:.0f}s: {status}")
            return status
        await asyncio.sleep(1.0)


# --------------------------------------------------------------------------- the checks


def analyse(
    outcomes: list[Outcome], db_url: str, record: Path, kills: list[dict[str, Any]], outbox_status: dict[str, int]
) -> dict[str, Any]:
    stored = query(db_url, "SELECT m.message_id, m.ticket_id, t.reference, t.requester FROM message m JOIN ticket t "
                           "ON t.id = m.ticket_id")  # fmt: skip
    n_tickets = query(db_url, "SELECT count(*) FROM ticket")[0][0]
    acks_db = query(db_url, "SELECT ticket_id, message_id, status, attempts FROM outbox WHERE kind = 'acknowledgement'")
    relay = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]

    by_mid: dict[str, list[tuple[int, str, str]]] = {}
    for mid, tid, ref, requester in stored:
        by_mid.setdefault(bare_mid(mid), []).append((tid, ref, requester))
    tickets_per_requester = Counter(r for _, _, _, r in stored)

    answered = [o for o in outcomes if o.answered]
    never = [o for o in outcomes if not o.answered]
    lost = [o for o in answered if o.mid not in by_mid]
    wrong_ref = [o for o in answered if o.mid in by_mid and o.reference and o.reference != by_mid[o.mid][0][1]]
    duplicate_tickets = {mid: rows for mid, rows in by_mid.items() if len({t for t, _, _ in rows}) > 1}
    stored_unanswered = [o for o in never if o.mid in by_mid]

    # Acknowledgements the relay received, per ticket (the To address is the ticket's requester:
    # every message has a sender of its own).
    ticket_of_requester = {r: tid for _, tid, _, r in stored}
    acks_per_ticket: dict[int, list[dict[str, Any]]] = {tid: [] for _, tid, _, _ in stored}
    strays = []
    for rec in relay:
        tid = ticket_of_requester.get(rec["to"][0] if rec["to"] else "")
        if tid is None:
            strays.append(rec)
        else:
            acks_per_ticket[tid].append(rec)
    hist = Counter(min(len(v), 2) for v in acks_per_ticket.values())
    unacked = [tid for tid, v in acks_per_ticket.items() if not v]
    outbox_mid = {tid: bare_mid(mid) for tid, mid, _, _ in acks_db}

    kills_by_helo = {k["helo"]: k for k in kills}
    duplicates = []
    for tid, recs in acks_per_ticket.items():
        if len(recs) < 2:
            continue
        recs.sort(key=lambda r: r["t"])
        mids = {r["mid"] for r in recs}
        explained = []
        for earlier, later in itertools.pairwise(recs):
            kill = kills_by_helo.get(earlier["helo"])
            # The incarnation that sent the earlier copy was SIGKILLed before the next copy went
            # out (which a new claim after the lease sent), and no sooner than IN_FLIGHT before
            # the relay took the earlier copy in: it had written the whole copy (in one write,
            # the relay pipelining) and died before it read the 250, or after, before it
            # recorded it. Either way it could not record the copy as sent.
            ok = kill is not None and earlier["t"] - IN_FLIGHT <= kill["t"] <= later["t"]
            explained.append(
                {
                    "sent_by": earlier["helo"],
                    "killed_after_s": round(kill["t"] - earlier["t"], 3) if kill else None,
                    "resent_after_s": round(later["t"] - earlier["t"], 1),
                    "resent_by": later["helo"],
                    "explained": ok,
                }
            )
        duplicates.append(
            {
                "ticket": tid,
                "copies": len(recs),
                "same_message_id": len(mids) == 1,
                "matches_outbox": mids == {outbox_mid.get(tid)},
                "pairs": explained,
            }
        )

    attempts = Counter(a.split(":", 1)[1] for o in outcomes for a in o.attempts)
    tries = Counter(len(o.attempts) for o in outcomes)
    result = {
        "messages_sent": len(outcomes),
        "answered_250": len(answered),
        "transactions": sum(len(o.attempts) for o in outcomes),
        "replies": dict(attempts),
        "attempts_per_message": {str(k): v for k, v in sorted(tries.items())},
        "tickets_stored": int(n_tickets),
        "messages_stored": len(stored),
        "duplicate_tickets": len(duplicate_tickets),
        "requesters_with_more_than_one_ticket": sum(1 for v in tickets_per_requester.values() if v > 1),
        "lost_answered_250_not_stored": len(lost),
        "lost_never_answered_250": len(never),
        "stored_but_never_answered_250": len(stored_unanswered),
        "reference_mismatch": len(wrong_ref),
        "acknowledgements_received": len(relay),
        "acknowledgements_per_ticket": {"0": hist.get(0, 0), "1": hist.get(1, 0), ">1": hist.get(2, 0)},
        "stray_acknowledgements": len(strays),
        "duplicate_acknowledgements": sum(d["copies"] - 1 for d in duplicates),
        "duplicates_same_message_id": all(d["same_message_id"] and d["matches_outbox"] for d in duplicates),
        "duplicates_explained_by_a_kill": all(p["explained"] for d in duplicates for p in d["pairs"]),
        "duplicates": duplicates,
        "outbox": outbox_status,
        "kills": len(kills),
        "unacknowledged_tickets": unacked[:20],
        "lost_examples": [o.__dict__ for o in lost[:5]],
        "never_answered_examples": [o.__dict__ for o in never[:5]],
    }
    problems = []
    if lost or never:
        problems.append(f"{len(lost)} answered 250 but not stored, {len(never)} never answered 250")
    if duplicate_tickets or result["requesters_with_more_than_one_ticket"]:
        problems.append(f"{len(duplicate_tickets)} Message-IDs with more than one ticket")
    if unacked:
        problems.append(f"{len(unacked)} ticket(s) never acknowledged")
    if not result["duplicates_same_message_id"]:
        problems.append("a duplicate acknowledgement carries another Message-ID than its twin")
    if not result["duplicates_explained_by_a_kill"]:
        problems.append("a duplicate acknowledgement without a crash between sending its twin and recording it")
    if wrong_ref:
        problems.append(f"{len(wrong_ref)} 250 replies named another reference than the stored ticket")
    if strays:
        problems.append(f"{len(strays)} acknowledgement(s) to addresses that opened no ticket")
    result["problems"] = problems
    result["ok"] = not problems
    return result


def print_report(r: dict[str, Any], elapsed: float, drained_in: float) -> None:
    per = r["acknowledgements_per_ticket"]
    lines = [
        "",
        f"messages sent                      {r['messages_sent']}",
        f"answered 250                       {r['answered_250']} (SMTP transactions: {r['transactions']}; "
        f"replies {r['replies']})",
        f"SIGKILLs                           {r['kills']} (instance process groups, every "
        f"{r['kill_every'][0]:g}-{r['kill_every'][1]:g} s)",
        f"tickets stored                     {r['tickets_stored']} (messages stored: {r['messages_stored']})",
        f"duplicate tickets                  {r['duplicate_tickets']}",
        f"lost: 250 but not stored           {r['lost_answered_250_not_stored']}",
        f"lost: never answered 250           {r['lost_never_answered_250']}",
        f"stored, 250 never seen             {r['stored_but_never_answered_250']}",
        f"acknowledgements per ticket        0: {per['0']}   1: {per['1']}   >1: {per['>1']}",
        f"acknowledgements received          {r['acknowledgements_received']} "
        f"(duplicates: {r['duplicate_acknowledgements']}, strays: {r['stray_acknowledgements']})",
        f"duplicates carry their twin's Message-ID      {r['duplicates_same_message_id']}",
        f"duplicates follow a SIGKILL of their sender   {r['duplicates_explained_by_a_kill']}",
        f"outbox at the end                  {r['outbox']}",
        f"relay outages during the load      {len(r['relay_outages'])} ({sum(r['relay_outages']):.1f}s in all)",
        f"load phase {elapsed:.1f}s, drain {drained_in:.1f}s",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for d in r["duplicates"]:
        for p in d["pairs"]:
            groups.setdefault((p["sent_by"], p["resent_by"]), []).append(p)
    for (sent_by, resent_by), pairs in groups.items():
        killed = [p["killed_after_s"] for p in pairs if p["killed_after_s"] is not None]
        resent = [p["resent_after_s"] for p in pairs]
        lines.append(
            f"  {len(pairs)} duplicate(s): first sent by {sent_by}, SIGKILLed "
            + (f"{min(killed):.3f}-{max(killed):.3f}s" if killed else "never")
            + f" after the relay's 250; sent again by {resent_by} {min(resent):.1f}-{max(resent):.1f}s later"
        )
    lines.append("RESULT: " + ("all targets met" if r["ok"] else "FAILED: " + "; ".join(r["problems"])))
    print("\n".join(lines))


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    intake = [str(REPO / ".venv/bin/intake")] if not args.intake_cmd else args.intake_cmd.split()
    db_name, db_url = create_database(args.pg, workdir, args.sqlite)
    log(f"database {db_name}; work directory {workdir}")
    procs: list[Server] = []
    instances: list[Instance] = []
    try:
        record = workdir / "relay.jsonl"
        down_flag = workdir / "relay.down"
        relay_port = free_port()
        argv = [sys.executable, __file__, "--relay", str(relay_port), str(record), "--relay-down-flag", str(down_flag)]
        relay = Server("relay", argv, workdir / "relay.log")
        relay.start()
        procs.append(relay)
        await relay.wait_ready()

        instances = [
            Instance(name, free_port(), workdir, db_url, relay_port, intake, args.listener_processes)
            for name in ("a", "b")[: args.instances]
        ]
        upgrade = await asyncio.to_thread(
            subprocess.run,
            [*intake, "--config", str(instances[0].config()), "db", "upgrade"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        if upgrade.returncode != 0:
            raise SetupError(f"intake db upgrade failed:\n{upgrade.stdout}{upgrade.stderr}")
        started = time.monotonic()
        for inst in instances:
            inst.start()
        for inst in instances:
            assert inst.proc is not None
            await inst.proc.wait_ready()
        kill_min, kill_max = kill_interval(args.kill_min, args.kill_max, time.monotonic() - started)
        log(f"instances on ports {[i.port for i in instances]}, relay on {relay_port}; sending {args.messages}")

        stop = asyncio.Event()
        chaos_task = asyncio.create_task(chaos(instances, stop, kill_min, kill_max))
        outages_task = asyncio.create_task(relay_chaos(down_flag, stop) if args.relay_outages else no_outages())
        t0 = time.monotonic()
        outcomes = await run_client(
            instances, args.messages, args.sessions, uuid.uuid4().hex[:10],
            give_up_after=args.give_up, per_try=args.timeout,
        )  # fmt: skip
        elapsed = time.monotonic() - t0
        stop.set()
        kills = await chaos_task
        outages: list[float] = await outages_task
        for inst in instances:
            assert inst.proc is not None
            await inst.proc.wait_ready()
        log(
            f"load done in {elapsed:.1f}s after {len(kills)} kills; draining the outbox"
            " (a dead dispatcher's claims end as its successor starts; leases last 2 min at most)"
        )
        t1 = time.monotonic()
        status = await drain(db_url, record, args.drain)
        drained_in = time.monotonic() - t1
        for inst in instances:
            assert inst.proc is not None
            if not inst.proc.stop():
                log(f"warning: {inst.helo} did not stop within 20s of SIGTERM")
        relay.stop()
        result = analyse(outcomes, db_url, record, [k for i in instances for k in i.kills], status)
        result["load_seconds"] = round(elapsed, 1)
        result["drain_seconds"] = round(drained_in, 1)
        result["database"] = db_name
        result["kill_every"] = [round(kill_min, 2), round(kill_max, 2)]
        result["relay_outages"] = [round(d, 2) for d in outages]
        if result["kills"] < args.min_kills:
            # A fast machine can take the whole load before the first kill: that proves nothing.
            result["problems"].append(
                f"only {result['kills']} SIGKILL(s) during the load, fewer than --min-kills {args.min_kills}: "
                "send more messages (-n) or kill more often (--kill-min, --kill-max)"
            )
            result["ok"] = False
        print_report(result, elapsed, drained_in) if not args.json else print(json.dumps(result, indent=2))
        return result
    finally:
        for inst in instances:
            if inst.proc is not None:
                inst.proc.stop(5)
        for p in procs:
            p.stop(5)
        if args.keep:
            log(f"kept database {db_name}")
        else:
            try:
                drop_database(args.pg, db_name)
            except Exception as exc:
                log(f"warning: could not drop database {db_name}: {exc}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--messages", type=int, default=3000)
    p.add_argument("--sessions", type=int, default=10, help="concurrent client sessions (default 10)")
    p.add_argument("--instances", type=int, default=2, choices=(1, 2))
    p.add_argument("--pg", default=DEFAULT_PG, help="a PostgreSQL URL whose server hosts the scratch database")
    p.add_argument("--sqlite", action="store_true", help="one instance on a SQLite file (the embedded default) instead")
    p.add_argument(
        "--listener-processes", type=int, default=1, help="email.listener_processes of each instance (default 1)"
    )
    # Every 1-4 s until the twelfth session: on a machine that fast, 1,000 messages were taken
    # in before the first or second kill.
    p.add_argument("--kill-min", type=float, default=0.3)
    p.add_argument("--kill-max", type=float, default=1.5)
    p.add_argument("--min-kills", type=int, default=5, help="fewer SIGKILLs during the load fail the run (default 5)")
    p.add_argument("--give-up", type=float, default=300.0, help="seconds after which a message is given up")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per SMTP transaction")
    p.add_argument("--drain", type=float, default=300.0, help="seconds to wait for the outbox to drain")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--intake-cmd", default="", help="how to run intake (default .venv/bin/intake)")
    p.add_argument("--keep", action="store_true", help="keep the database and the work directory")
    p.add_argument("--json", action="store_true")
    p.add_argument("--relay-outages", action="store_true", help="take the relay down (421 to every MAIL) now and then")
    p.add_argument("--relay", nargs=2, metavar=("PORT", "FILE"), help=argparse.SUPPRESS)
    p.add_argument("--relay-down-flag", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sqlite:
        args.instances = 1  # one SQLite file serves one instance (PostgreSQL is for several)
    if args.relay:
        relay_main(int(args.relay[0]), Path(args.relay[1]), args.relay_down_flag)
        return 0
    if args.seed is not None:
        random.seed(args.seed)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="intake-crash-"))
    try:
        result = asyncio.run(run(args, workdir))
    except (SetupError, ProcError) as exc:
        log(f"setup failed: {exc}")
        log(f"logs kept in {workdir}")
        return 2
    except KeyboardInterrupt:
        log(f"interrupted; logs kept in {workdir}")
        return 130
    if not args.keep and result["ok"]:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        log(f"logs kept in {workdir}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
