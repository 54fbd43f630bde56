"""Throughput of intake's SMTP intake against a bare aiosmtpd server, with the same client.

For each session count (default 10 and 50) and each run (default 3) it drives N messages
(default 2,000, one connection per ~4 KB message, see smtp_load.py; sent by its C twin,
smtp_load.c, unless ``--client python``) at

* ``bare``: aiosmtpd that answers 250 to everything and stores nothing (a subprocess), and
* ``intake``: ``intake serve --config`` on a fresh temporary SQLite database, restarted for every
  run, with an aiosmtpd stand-in answering 250 as its outbound relay,

each after a warm-up of 100 messages. It prints the median msg/s, p50 and p99 per server and
session count, and intake/bare ratios. After every intake run it asks ``intake stats --json``
whether every 250 became a stored ticket and every ticket has a queued (or sent)
acknowledgement; if not, or if any message was refused, it exits with status 1.

    .venv/bin/python bench/bench_intake.py                 # everything, ~2-5 minutes
    .venv/bin/python bench/bench_intake.py --bare-only     # the baseline only
    .venv/bin/python bench/bench_intake.py --sessions 10 --runs 1 --messages 500 --json

On PostgreSQL (``--postgres URL``: every intake run gets a database of its own, created on
that server and dropped afterwards), with one and with two intake processes on the one
database (``--instances 1,2``: the client's sessions alternate between the two listeners):

    .venv/bin/python bench/bench_intake.py --postgres postgresql://postgres@127.0.0.1/test --instances 1,2

Server CPU is the CPU of the intake processes' whole process groups (the listener and its
outbox child process); with ``--postgres``, "db CPU" is the CPU of the PostgreSQL backends
serving the run's database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from procs import Proc, ProcError, serve_smtp  # noqa: E402
from smtp_load import LoadResult, c_client, run_load, run_load_c  # noqa: E402

READY_RE = re.compile(r"listening on\s+\[?([0-9A-Za-z.:_-]*?)\]?:(\d+)")
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
BUSY_WARN = 0.25  # cores taken by other processes during a run before the run is flagged


class BenchError(Exception):
    """Setup went wrong (a server did not start, stats unreadable...): no figure to give."""


# --------------------------------------------------------------------------- null SMTP server


def serve_null(port: int) -> None:
    """Run aiosmtpd answering 250 to everything on 127.0.0.1:port until SIGTERM/SIGINT.

    Used both as the ``bare`` server under test and as intake's relay stand-in.
    """

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 OK"

    serve_smtp(Handler(), port, "bench.localhost")


# --------------------------------------------------------------------------- subprocesses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server(Proc):
    """A server subprocess that says "listening on HOST:PORT" when it is ready."""

    def __init__(self, name: str, argv: list[str], logfile: Path, cwd: Path = REPO) -> None:
        super().__init__(name, argv, logfile, cwd)
        self.host, self.port = "127.0.0.1", 0

    async def wait_ready(self, limit: float = 30.0) -> tuple[str, int]:
        """Wait for the "listening on HOST:PORT" line (stdout or stderr); return (host, port)."""
        found = await self.wait_for(READY_RE, limit)
        self.host, self.port = found.group(1) or "127.0.0.1", int(found.group(2))
        return self.host, self.port

    def cpu_seconds(self) -> float | None:
        """User+system CPU so far of every live process in the server's process group (intake's
        listener and its outbox child), all threads, from /proc; None if unknown."""
        if self.popen is None or self.popen.poll() is not None:
            return None
        return group_cpu(self.popen.pid)


def _proc_stat(pid: int | str) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()  # fields from the 3rd on: state, ppid, pgrp, ...


def proc_cpu(pid: int | str) -> float:
    fields = _proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK if fields else 0.0


def group_cpu(pgid: int) -> float | None:
    """CPU seconds of the live processes whose process group is ``pgid``."""
    total, seen = 0.0, False
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _proc_stat(entry)
            if fields and int(fields[2]) == pgid:
                total += (int(fields[11]) + int(fields[12])) / CLK_TCK
                seen = True
    return total if seen else None


def null_server(name: str, workdir: Path) -> Server:
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-null", str(port)]
    return Server(name, argv, workdir / f"{name}.log")


class SinkServer(Server):
    """Postfix's smtp-sink as the relay stand-in: a C server that accepts mail and discards it."""

    def __init__(self, name: str, workdir: Path) -> None:
        port = free_port()
        root = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
        super().__init__(name, [SMTP_SINK, *root, f"127.0.0.1:{port}", "256"], workdir / f"{name}.log")
        self.port = port

    async def wait_ready(self, limit: float = 30.0) -> tuple[str, int]:
        deadline = time.monotonic() + limit
        while True:
            if not self.alive:
                raise ProcError(f"{self.name} exited:\n{self.tail()}")
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise ProcError(f"{self.name} did not listen on :{self.port} within {limit:g}s") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return self.host, self.port


SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


def relay_server(args: argparse.Namespace, workdir: Path) -> Server:
    if args.relay == "smtp-sink":
        if not os.access(SMTP_SINK, os.X_OK):
            raise BenchError("--relay smtp-sink needs Postfix's smtp-sink (Debian: apt-get install postfix)")
        return SinkServer("relay", workdir)
    return null_server("relay", workdir)


# --------------------------------------------------------------------------- config


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Minimal TOML writer for the config (tables, scalars, lists, inline dicts in lists)."""
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, dict)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, dict)]
    out = []
    if scalars and prefix:
        out.append(f"[{prefix}]")
    out += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in scalars]
    for k, v in tables:
        out.append(dump_toml(v, f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k)))
    return "\n".join(x for x in out if x) + "\n"


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def intake_config(workdir: Path, listen_port: int, relay_port: int, extra: str) -> Path:
    cfg: dict[str, Any] = {
        "storage": {"url": f"sqlite:///{workdir / 'intake.db'}"},
        "email": {
            "listen_host": "127.0.0.1",
            "listen_port": listen_port,
            "protocol": "smtp",
            "support_address": "support@example.com",
            # The load client is one host opening up to 50 sessions at once; intake's default
            # per-client cap (20, Postfix's default concurrency per destination) would refuse it.
            "max_sessions_per_client": 200,
        },
        "outbound": {
            "relay_host": "127.0.0.1",
            "relay_port": relay_port,
            "from_address": "support@example.com",
        },
    }
    if extra:
        try:
            cfg = merge(cfg, tomllib.loads(extra.replace("{tmpdir}", str(workdir))))
        except tomllib.TOMLDecodeError as exc:
            raise BenchError(f"--config-extra is not valid TOML: {exc}") from exc
    path = workdir / "intake.toml"
    path.write_text(dump_toml(cfg))
    return path


# --------------------------------------------------------------------------- intake stats


def intake_argv(cmd: list[str], *words: str, config: Path) -> list[str]:
    """``intake --config PATH WORDS`` (``--config`` is an option of the ``intake`` group)."""
    return [*cmd, "--config", str(config), *words]


async def intake_stats(cmd: list[str], config: Path) -> dict[str, Any]:
    argv = intake_argv(cmd, "stats", "--json", config=config)
    try:
        proc = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=60, cwd=config.parent
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{shlex.join(argv)} took more than 60s") from exc
    if proc.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} exited with {proc.returncode}:\n{proc.stderr[-2000:]}")
    out = proc.stdout.strip()
    try:
        data = json.loads(out)
    except json.JSONDecodeError:  # tolerate log lines before the object
        start = out.rfind("\n{")
        try:
            data = json.loads(out[start + 1 :] if start >= 0 else out[out.index("{") :])
        except (ValueError, json.JSONDecodeError) as exc:
            raise BenchError(f"{shlex.join(argv)} printed no JSON object:\n{out[-2000:]}") from exc
    if not isinstance(data, dict) or "tickets" not in data or "outbox" not in data:
        raise BenchError(f"stats JSON lacks 'tickets' or 'outbox': {out[-2000:]}")
    return data


def outbox_total(stats: dict[str, Any]) -> int:
    """Entries in the outbox whatever their status (pending, sent, failed, suppressed, ...)."""
    box = stats.get("outbox") or {}
    return sum(int(v) for v in box.values() if isinstance(v, int | float))


# --------------------------------------------------------------------------- the benchmark


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _share(cpu: float | None, res: LoadResult) -> float | None:
    return None if cpu is None or not res.elapsed else round(cpu / res.elapsed, 3)


def _ms_per_message(cpu: float | None, res: LoadResult) -> float | None:
    return None if cpu is None or not res.ok else round(1000 * cpu / res.ok, 3)


def run_record(
    server: str, run: int, res: LoadResult, server_cpu: float | None, other: float | None, db: float | None = None
) -> dict:
    d = res.to_dict()
    d.update(server=server, run=run)
    d["server_cpu"] = None if server_cpu is None else round(server_cpu, 3)
    d["server_cpu_share"] = _share(server_cpu, res)
    # CPU per accepted message, all of the server's processes: steadier than the rate on a
    # machine whose speed drifts, and what a change to the per-message path moves first.
    d["server_cpu_ms_per_message"] = _ms_per_message(server_cpu, res)
    d["db_cpu_share"] = _share(db, res)  # PostgreSQL backends of the run's database
    d["other_cpu_share"] = _share(other, res)  # processes other than client, server(s), relay, db
    return d


def system_busy() -> float | None:
    """CPU seconds all cores spent busy since boot (/proc/stat), None where unknown."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) / CLK_TCK  # guest time is already counted in user


class DbWatch:
    """CPU of the PostgreSQL backends serving one database (None without --postgres)."""

    def __init__(self, admin_url: str | None, database: str | None) -> None:
        self.admin_url, self.database = admin_url, database
        self._start: dict[int, float] = {}

    def _pids(self) -> list[int]:
        import psycopg

        with psycopg.connect(pg_dsn(self.admin_url or ""), autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (self.database,)
            ).fetchall()
        return [int(r[0]) for r in rows]

    async def begin(self) -> None:
        if self.database:
            pids = await asyncio.to_thread(self._pids)
            self._start = {pid: proc_cpu(pid) for pid in pids}

    async def end(self) -> float | None:
        if not self.database:
            return None
        pids = await asyncio.to_thread(self._pids)
        # Backends that ended during the run are not counted (the pool keeps its connections).
        return sum(max(0.0, proc_cpu(pid) - self._start.get(pid, 0.0)) for pid in pids)


async def measure(
    proc: Server | list[Server],
    args: argparse.Namespace,
    sessions: int,
    helpers: tuple[Server, ...] = (),
    db: DbWatch | None = None,
    messages: int | None = None,
) -> tuple[LoadResult, float | None, float | None, float | None]:
    """One measured run: (client result, server CPU s, other processes' CPU s, database CPU s).

    With several servers the client's sessions alternate between them; their CPU is summed.
    """
    servers = proc if isinstance(proc, list) else [proc]
    everyone = (*servers, *helpers)
    cpu0 = [p.cpu_seconds() for p in everyone]
    if db is not None:
        await db.begin()
    busy0 = system_busy()
    res = await spread_load(
        [(p.host, p.port) for p in servers], messages=messages or args.messages, sessions=sessions, size=args.size
    )
    busy1 = system_busy()
    db_cpu = await db.end() if db is not None else None
    cpu1 = [p.cpu_seconds() for p in everyone]
    if None in cpu0 or None in cpu1:
        return res, None, None, db_cpu
    used = [b - a for a, b in zip(cpu0, cpu1, strict=True)]  # type: ignore[operator]
    other = None if busy0 is None or busy1 is None else max(0.0, busy1 - busy0 - res.cpu - sum(used) - (db_cpu or 0.0))
    return res, sum(used[: len(servers)]), other, db_cpu


CLIENT_PIPELINING = False  # set from --client-pipelining
CLIENT = "c"  # set from --client (the same default)


async def spread_load(targets: list[tuple[str, int]], *, messages: int, sessions: int, size: int) -> LoadResult:
    """smtp_load.run_load over several servers: session k delivers to server k mod n."""
    (host, port), *also = targets
    if CLIENT == "c":
        if any(h != host for h, _ in also):
            raise BenchError("--client c delivers to servers on one host")
        ports = [p for _, p in also]
        return await run_load_c(host, port, messages=messages, sessions=sessions, size=size, also_ports=ports)
    return await run_load(
        host, port, messages=messages, sessions=sessions, size=size, also=also, pipelining=CLIENT_PIPELINING
    )


# --------------------------------------------------------------------------- round trips


def _raw_message(i: int, run: str, *, subject: str | None = None, in_reply_to: str = "") -> bytes:
    extra = f"In-Reply-To: {in_reply_to}\r\n" if in_reply_to else ""
    return (
        f"From: Customer {i} <customer{i}@client{i % 500}.example.net>\r\nTo: support@example.com\r\n"
        f"Subject: {subject or f'Nightly export {i} keeps failing'}\r\nMessage-ID: <{run}.{i}@client.example.net>\r\n"
        f"Date: Sat, 21 Nov 2026 09:30:00 +0000\r\n{extra}MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\nHello,\r\nthe nightly export stops after a few minutes.\r\n"
    ).encode()


async def count_round_trips(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Statements and network round trips per message, intake's service and store in-process.

    Statements are counted where they are sent: SQLAlchemy's ``before_cursor_execute`` for the
    ones SQLAlchemy sends, and the store's ``statement_observers`` for the ones its PostgreSQL
    wire sends (BEGIN, COMMIT, the written-behind inserts, the lookups; ``storage/pgwire.py``);
    the writer's connection is in autocommit mode, so psycopg sends no BEGIN or COMMIT of its
    own. Round trips by a TCP proxy in front of PostgreSQL that counts client-to-server turns
    (``tests/adapters/tcp_proxy.py``): statements the wire pipelines without waiting for an
    answer share a turn.
    Sequential: one message at a time (a transaction each). Concurrent: ``--sessions`` messages
    submitted at once (group commit: one transaction for many).
    """
    sys.path.insert(0, str(REPO))
    from sqlalchemy import event

    from adapters import bootstrap
    from adapters.email.parsing import parse_email
    from adapters.settings import Settings
    from tests.adapters.tcp_proxy import TcpProxy

    db_name, db_url = create_database(args.postgres)
    proxy = TcpProxy.in_front_of(db_url)
    rows: list[dict[str, Any]] = []
    try:
        settings = Settings.model_validate(
            {
                "storage": {"url": proxy.url_for(db_url)},
                "email": {"support_address": "support@example.com"},
                "outbound": {"from_address": "support@example.com"},
            }
        )
        app = bootstrap.build(settings)
        store = app.store
        store.start()
        kinds: Counter[str] = Counter()

        def _kind(statement: str) -> str:
            words = statement.split()
            kind = words[0]
            if kind in ("INSERT", "UPDATE", "DELETE") or (kind == "WITH" and "INSERT" in statement):
                tables = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "INTO"]
                if kind == "WITH" or len(tables) > 1:
                    return f"INSERT ({' + '.join(tables)})"
                table = next((w for w in words[1:4] if w not in ("INTO", "FROM")), "?")
                return f"{kind} {table}"
            if kind == "SELECT" and "pg_try_advisory_xact_lock" in statement:
                return "SELECT (lock + duplicate + ids)" if "nextval" in statement else "SELECT (lock + duplicate)"
            if kind == "SELECT" and "(SELECT count(*) FROM outbox WHERE kind = 'acknowledgement'" in statement:
                return "SELECT (sender's tickets + acknowledgements)"
            if kind == "SELECT" and "FROM" in words:
                return f"SELECT {words[words.index('FROM') + 1]}"
            return kind

        def _count_sent(statement: str) -> None:  # what the store's PostgreSQL wire sends
            kinds[_kind(statement)] += 1

        @event.listens_for(store.engine, "before_cursor_execute")
        def _count(conn: Any, cursor: Any, statement: str, *_: Any) -> None:  # what SQLAlchemy sends
            kinds[_kind(statement)] += 1

        store.statement_observers.append(_count_sent)

        def inbound(raw: bytes, i: int) -> Any:
            return parse_email(
                raw, recipient="support@example.com", envelope_sender=f"customer{i}@client{i % 500}.example.net"
            )

        await app.service.receive(inbound(_raw_message(0, "warm"), 0))
        n = args.messages if args.messages < 2000 else 200
        run = uuid.uuid4().hex[:8]
        cases: list[tuple[str, list[Any], bool]] = [
            ("new, one at a time", [inbound(_raw_message(i, run + "s"), i) for i in range(1, n + 1)], False),
            ("new, concurrent", [inbound(_raw_message(i, run + "c"), i) for i in range(1, n + 1)], True),
            ("redelivery (duplicate)", [inbound(_raw_message(i, run + "s"), i) for i in range(1, n + 1)], False),
            (
                "follow-up by In-Reply-To",
                [
                    inbound(_raw_message(i, run + "f", in_reply_to=f"<{run}s.{i}@client.example.net>"), i)
                    for i in range(1, n + 1)
                ],
                False,
            ),
        ]
        for label, messages, concurrent in cases:
            kinds.clear()
            rt0, b0 = proxy.round_trips, store.batches
            t0 = time.perf_counter()
            if concurrent:
                for k in range(0, len(messages), max(1, args.sessions[0])):
                    chunk = messages[k : k + args.sessions[0]]
                    await asyncio.gather(*(app.service.receive(m) for m in chunk))
            else:
                for m in messages:
                    await app.service.receive(m)
            elapsed = time.perf_counter() - t0
            if proxy.unreadable:
                raise SystemExit("round trips: a connection could not be followed (TLS?), figures would be low")
            txns = store.batches - b0
            statements = sum(kinds.values())  # BEGIN and COMMIT included (the wire sends them)
            row = {
                "case": label,
                "messages": len(messages),
                "transactions_per_message": round(txns / len(messages), 3),
                "statements_per_message": round(statements / len(messages), 2),
                "round_trips_per_message": round((proxy.round_trips - rt0) / len(messages), 2),
                "ms_per_message": round(elapsed / len(messages) * 1000, 2),
                "statements": {k: round(v / len(messages), 2) for k, v in sorted(kinds.items())},
            }
            rows.append(row)
            log(
                f"  {label}: {row['statements_per_message']} statements, {row['round_trips_per_message']} round trips, "
                f"{row['transactions_per_message']} transactions, {row['ms_per_message']} ms per message; "
                + ", ".join(f"{k} {v}" for k, v in row["statements"].items())
            )
        await store.close()
    finally:
        proxy.close()
        if not args.keep:
            drop_database(args.postgres, db_name)
    return rows


# --------------------------------------------------------------------------- PostgreSQL


def pg_dsn(url: str) -> str:
    """A libpq URL (no SQLAlchemy driver suffix) for psycopg."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_database(admin_url: str) -> tuple[str, str]:
    """A new database on the server of ``admin_url``: (name, SQLAlchemy URL for intake)."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"intake_bench_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(pg_dsn(admin_url), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except Exception as exc:
        raise BenchError(f"cannot create a database on {admin_url}: {exc}") from exc
    url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)
    return name, url.render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    import psycopg

    try:
        with psycopg.connect(pg_dsn(admin_url), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception as exc:
        log(f"  warning: could not drop database {name}: {exc}")


def describe(
    server: str, run: int, res: LoadResult, server_cpu: float | None, other: float | None, db: float | None = None
) -> str:
    line = f"  {server:6} sessions={res.sessions:<3} run {run + 1}: {res.summary()}"
    if server_cpu is not None:
        line += f", server CPU {server_cpu:.2f}s ({server_cpu / res.elapsed:.2f} core"
        per_message = _ms_per_message(server_cpu, res)
        line += ")" if per_message is None else f", {per_message:.2f} ms/msg)"
    if db is not None:
        line += f", db CPU {db:.2f}s ({db / res.elapsed:.2f} core)"
    if other is not None and other / res.elapsed > BUSY_WARN:
        line += f"\n    warning: other processes took {other / res.elapsed:.2f} core during this run"
    return line


async def bench(args: argparse.Namespace, workdir: Path) -> tuple[list[dict], list[dict]]:
    runs: list[dict] = []
    checks: list[dict] = []
    intake_cmd = resolve_cmd(args.intake_cmd) if not args.bare_only else []
    # --compare-cmd: a second build measured in the same runs, the order alternating per run,
    # so that both see the same minutes of this machine (its speed drifts by tens of percent).
    # --compare-config: the same for a second configuration (merged over --config-extra).
    variants = [("", intake_cmd, args.config_extra)]
    if (args.compare_cmd or args.compare_config) and not args.bare_only:
        extra = args.config_extra
        if args.compare_config:
            extra = dump_toml(merge(tomllib.loads(extra) if extra else {}, tomllib.loads(args.compare_config)))
        variants.append(("-b", resolve_cmd(args.compare_cmd) if args.compare_cmd else intake_cmd, extra))

    bare = null_server("bare", workdir)
    bare.start()
    await bare.wait_ready()
    relay = None
    if not args.bare_only:
        relay = relay_server(args, workdir)
        relay.start()
        await relay.wait_ready()
    log(
        f"bare aiosmtpd on {bare.host}:{bare.port}"
        + (f", relay stand-in ({args.relay}) on :{relay.port}" if relay else "")
    )

    try:
        for sessions in args.sessions:
            await spread_load([(bare.host, bare.port)], messages=args.warmup, sessions=sessions, size=args.size)
            for run in range(args.runs):
                res, cpu, other, _ = await measure(bare, args, sessions)
                log(describe("bare", run, res, cpu, other))
                runs.append(run_record("bare", run, res, cpu, other))

                if relay is not None:
                    for suffix, cmd, extra in variants if run % 2 == 0 else variants[::-1]:
                        for n in args.instances:
                            rec, check = await intake_run(args, cmd, workdir, relay, sessions, run, n, suffix, extra)
                            runs.append(rec)
                            checks.append(check)
    finally:
        bare.stop()
        if relay is not None:
            relay.stop()
    return runs, checks


def server_label(args: argparse.Namespace, instances: int) -> str:
    label = "intake-pg" if args.postgres else "intake"
    return label if instances == 1 else f"{label}x{instances}"


# --------------------------------------------------------------------------- profiles

PROFILE_RATE = 100  # samples per second and thread
PROFILING = False  # set from --profile

# Where a sample's time goes: the first rule whose fragment occurs in the stack wins.
PROFILE_RULES = (
    ("parse (mail-parser, stdlib email)", ("adapters/email/parsing.py", "mailparser/")),
    ("classify, checks, language", ("intake/rules.py", "intake/hygiene.py", "IntakeService.assess", "intake/policy.py",
                                    "intake/reference.py", "adapters/language.py", "lingua")),
    ("render acknowledgement", ("intake/acknowledgement.py",)),
    ("database: psycopg (send, wait, convert)", ("psycopg/",)),
    ("database: SQLAlchemy Core", ("sqlalchemy/",)),
    ("unit of work (service, repository)", ("intake/service.py", "storage/")),
    ("acknowledgement MIME build", ("adapters/email/sender.py",)),
    ("SMTP client to the relay (aiosmtplib)", ("aiosmtplib/",)),
    ("SMTP server protocol (aiosmtpd)", ("aiosmtpd/",)),
    ("listener glue", ("adapters/email/listener.py",)),
    ("event loop (asyncio, selectors)", ("asyncio/", "selectors.py")),
)  # fmt: skip


class Profiler:
    def __init__(self, proc: subprocess.Popen[bytes], out: Path) -> None:
        self.proc, self.out = proc, out


def start_profiler(server: Server, out: Path) -> Profiler | None:
    """py-spy on the server and its children (the outbox process), raw stacks, per thread."""
    if not PROFILING or server.popen is None:
        return None
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        raise BenchError(f"--profile needs py-spy next to the interpreter ({spy})")
    # --gil: only the thread holding the GIL is sampled, so samples are Python CPU time (a
    # thread waiting for the GIL would otherwise count as busy, and be counted twice).
    argv = [str(spy), "record", "-r", str(PROFILE_RATE), "-f", "raw", "-s", "-t", "--gil", "--nonblocking"]
    argv += ["-o", str(out), "-p", str(server.popen.pid)]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # let it attach before the load starts
    return Profiler(p, out)


async def stop_profilers(spies: list[Profiler], messages: int) -> dict[str, Any] | None:
    if not spies:
        return None
    for s in spies:
        s.proc.send_signal(signal.SIGINT)
    for s in spies:
        await asyncio.to_thread(s.proc.wait, 30)
    return summarize_profile([s.out for s in spies], messages)


# Which process a sample came from, told by what its stacks show (children are all "spawn_main").
PROFILE_ROLES = (
    ("outbox process", ("_dispatcher_main", "intake/dispatch.py")),
    ("parse worker", ("adapters/email/workers.py",)),
)


def summarize_profile(paths: list[Path], messages: int) -> dict[str, Any]:
    """CPU per message by process role (intake, outbox child, parse worker), thread and category."""
    samples: list[tuple[list[str], str, int]] = []
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            stack, _, n = line.rpartition(" ")
            if n.isdigit():
                samples.append((stack.split(";"), stack, int(n)))
    # A child's role, from any of its stacks; then every sample of that child gets it.
    roles: dict[str, str] = {}
    for frames, stack, _ in samples:
        procs = [f for f in frames if f.startswith("process ")]
        if len(procs) > 1 and procs[-1] not in roles:
            role = next((r for r, frags in PROFILE_ROLES if any(x in stack for x in frags)), None)
            if role is not None:
                roles[procs[-1]] = role
    table: Counter[tuple[str, str, str]] = Counter()
    for frames, stack, n in samples:
        procs = [f for f in frames if f.startswith("process ")]
        role = "intake process" if len(procs) <= 1 else roles.get(procs[-1], "other child")
        thread = next((f.split(": ", 1)[-1] for f in frames if f.startswith("thread (")), "?")
        if thread not in ("MainThread", "intake-db-writer"):
            thread = "other threads"
        category = next((c for c, frags in PROFILE_RULES if any(x in stack for x in frags)), "other")
        table[(role, thread, category)] += n
    ms = 1000.0 / PROFILE_RATE / max(1, messages)
    rows = [
        {"role": r, "thread": t, "category": c, "samples": n, "ms_per_message": round(n * ms, 3)}
        for (r, t, c), n in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[1]))
    ]
    total = round(sum(table.values()) * ms, 3)
    return {"messages": messages, "rate": PROFILE_RATE, "rows": rows, "total_ms_per_message": total}


def format_profile(profile: dict[str, Any]) -> str:
    out = [f"    CPU per message from py-spy ({profile['total_ms_per_message']:.2f} ms in all):"]
    for r in profile["rows"]:
        if r["ms_per_message"] >= 0.01:
            out.append(f"      {r['role']:15} {r['thread']:17} {r['category']:42} {r['ms_per_message']:6.3f} ms")
    return "\n".join(out)


async def intake_run(
    args: argparse.Namespace,
    cmd: list[str],
    workdir: Path,
    relay: Server,
    sessions: int,
    run: int,
    instances: int = 1,
    suffix: str = "",
    extra: str | None = None,
) -> tuple[dict, dict]:
    label = server_label(args, instances) + suffix
    rundir = workdir / f"{label}-c{sessions}-r{run + 1}"
    rundir.mkdir()
    db_name = None
    extra = args.config_extra if extra is None else extra
    if args.postgres:
        db_name, db_url = create_database(args.postgres)
        extra = dump_toml(merge(tomllib.loads(extra) if extra else {}, {"storage": {"url": db_url}}))
    procs: list[Server] = []
    configs: list[Path] = []
    clean_exit = True
    try:
        for k in range(instances):
            instdir = rundir / f"i{k + 1}" if instances > 1 else rundir
            instdir.mkdir(exist_ok=True)
            configs.append(intake_config(instdir, free_port(), relay.port, extra))
        upgrade = await asyncio.create_subprocess_exec(
            *intake_argv(cmd, "db", "upgrade", config=configs[0]),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=configs[0].parent,
        )
        _, err = await asyncio.wait_for(upgrade.communicate(), 60)
        if upgrade.returncode != 0:
            raise BenchError(f"intake db upgrade failed: {err.decode(errors='replace')[-2000:]}")
        for k, config in enumerate(configs):
            # In the run's directory, not the repository's: `python -m adapters.cli` imports from
            # its working directory first, and --compare-cmd's PYTHONPATH must win.
            argv = intake_argv(cmd, "serve", config=config)
            proc = Server(f"intake{k + 1}", argv, config.parent / "intake.log", cwd=config.parent)
            proc.start()
            procs.append(proc)
        try:
            for proc in procs:
                await proc.wait_ready(args.ready_timeout)
            before = await intake_stats(cmd, configs[0])
            warm = await spread_load(
                [(p.host, p.port) for p in procs], messages=args.warmup, sessions=sessions, size=args.size
            )
            spies = [start_profiler(p, c.parent / "profile.txt") for p, c in zip(procs, configs, strict=True)]
            res, cpu, other, db_cpu = await measure(procs, args, sessions, (relay,), DbWatch(args.postgres, db_name))
            log(describe(label, run, res, cpu, other, db_cpu))
            profile = await stop_profilers([s for s in spies if s is not None], res.ok)
            if profile:
                log(format_profile(profile))
            # Let the outbox catch up before counting (acknowledgements are queued at commit).
            after = await intake_stats(cmd, configs[0])
        finally:
            for proc in procs:
                clean_exit = proc.stop() and clean_exit
    finally:
        if db_name is not None and not args.keep:
            drop_database(args.postgres, db_name)
    if not clean_exit:
        log("  warning: intake did not exit within 10s of SIGTERM (killed)")

    accepted = warm.ok + res.ok
    tickets = int(after["tickets"]) - int(before["tickets"])
    acks = outbox_total(after) - outbox_total(before)
    refused = warm.failed + res.failed
    problems = []
    if tickets < accepted:
        problems.append(f"{accepted - tickets} accepted message(s) became no ticket")
    if tickets > accepted:
        problems.append(f"{tickets - accepted} more ticket(s) than 250 answers")
    if acks < tickets:
        problems.append(f"{tickets - acks} ticket(s) without an acknowledgement in the outbox")
    if refused:
        problems.append(f"{refused} message(s) not accepted")
    ok = not problems
    check = {
        "server": label,
        "sessions": sessions,
        "run": run,
        "accepted": accepted,
        "refused": refused,
        "tickets": tickets,
        "messages": int(after.get("messages", 0)) - int(before.get("messages", 0)),
        "acknowledgements": acks,
        "outbox": after.get("outbox"),
        "outbox_by_kind": after.get("outbox_by_kind"),
        "clean_exit": clean_exit,
        "ok": ok,
        "problems": problems,
        "profile": profile,
    }
    log(
        f"  check: {accepted} accepted (250), {refused} refused -> {tickets} tickets, "
        f"{acks} outbox entries {after.get('outbox')}: " + ("OK" if ok else "FAILED: " + "; ".join(problems))
    )
    return run_record(label, run, res, cpu, other, db_cpu), check


def resolve_cmd(text: str) -> list[str]:
    cmd = shlex.split(text)
    if not cmd:
        raise BenchError("--intake-cmd is empty")
    exe = cmd[0]
    if "/" in exe and not os.path.isabs(exe):
        for base in (Path.cwd(), REPO):
            if (base / exe).exists():
                cmd[0] = str((base / exe).resolve())
                break
    if shutil.which(cmd[0]) is None:
        raise BenchError(f"intake command not found: {cmd[0]} (build it, pass --intake-cmd, or use --bare-only)")
    return cmd


def summarize(runs: list[dict], sessions_list: list[int]) -> list[dict]:
    rows = []
    for sessions in sessions_list:
        base = None
        for server in dict.fromkeys(r["server"] for r in runs):
            rs = [r for r in runs if r["server"] == server and r["sessions"] == sessions]
            if not rs:
                continue
            srv_cpu = [r["server_cpu_share"] for r in rs if r["server_cpu_share"] is not None]
            other = [r["other_cpu_share"] for r in rs if r["other_cpu_share"] is not None]
            db = [r["db_cpu_share"] for r in rs if r.get("db_cpu_share") is not None]
            per_msg = [r["server_cpu_ms_per_message"] for r in rs if r.get("server_cpu_ms_per_message") is not None]
            row = {
                "server": server,
                "sessions": sessions,
                "runs": len(rs),
                "rate": statistics.median(r["rate"] for r in rs),
                "p50": statistics.median(r["p50"] for r in rs),
                "p99": statistics.median(r["p99"] for r in rs),
                "failed": sum(r["failed"] for r in rs),
                "client_cpu_share": statistics.median(r["cpu_share"] for r in rs),
                "server_cpu_share": statistics.median(srv_cpu) if srv_cpu else None,
                "other_cpu_share": statistics.median(other) if other else None,
                "db_cpu_share": statistics.median(db) if db else None,
                "server_cpu_ms_per_message": statistics.median(per_msg) if per_msg else None,
            }
            if server == "bare":
                base = row
            elif base is not None:
                row["rate_ratio"] = row["rate"] / base["rate"] if base["rate"] else None
                row["p99_ratio"] = row["p99"] / base["p99"] if base["p99"] else None
            rows.append(row)
    return rows


def compare_pairs(runs: list[dict], sessions_list: list[int]) -> list[dict]:
    """intake-b against intake run by run (the two measured in the same minutes).

    On a machine whose speed drifts, the two medians of a few runs can differ by more than the
    change being measured; the share of pairs in which intake-b did better says how
    consistent a difference is (5 of 5 is still possible by chance in a disturbed set).
    """
    out = []
    for sessions in sessions_list:
        a = {r["run"]: r for r in runs if r["server"] == "intake" and r["sessions"] == sessions}
        b = {r["run"]: r for r in runs if r["server"] == "intake-b" and r["sessions"] == sessions}
        pairs = [(a[k], b[k]) for k in sorted(a) if k in b and a[k]["rate"]]
        if not pairs:
            continue
        rate = [rb["rate"] / ra["rate"] for ra, rb in pairs]
        cpu = [
            rb["server_cpu_ms_per_message"] / ra["server_cpu_ms_per_message"]
            for ra, rb in pairs
            if ra.get("server_cpu_ms_per_message") and rb.get("server_cpu_ms_per_message")
        ]
        out.append(
            {
                "sessions": sessions,
                "pairs": len(pairs),
                "rate_ratio_median": round(statistics.median(rate), 3),
                "rate_ratio_range": [round(min(rate), 3), round(max(rate), 3)],
                "b_faster": sum(x > 1 for x in rate),
                "cpu_ratio_median": round(statistics.median(cpu), 3) if cpu else None,
                "b_less_cpu": sum(x < 1 for x in cpu),
            }
        )
    return out


def print_pairs(pairs: list[dict]) -> None:
    for p in pairs:
        line = (
            f"intake-b / intake, {p['sessions']} sessions, {p['pairs']} pairs: rate x{p['rate_ratio_median']:.3f} "
            f"(pairs {p['rate_ratio_range'][0]:.2f}-{p['rate_ratio_range'][1]:.2f}; intake-b faster in "
            f"{p['b_faster']} of {p['pairs']})"
        )
        if p["cpu_ratio_median"] is not None:
            line += f", CPU per message x{p['cpu_ratio_median']:.3f} (less in {p['b_less_cpu']} of {p['pairs']})"
        print(line)


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    print(
        f"\n{args.messages} messages of ~{args.size} B per run, one connection each, "
        f"median of {args.runs} run(s); CPU in cores (of {os.cpu_count()})"
    )
    head = (
        "server",
        "sessions",
        "msg/s",
        "p50 ms",
        "p99 ms",
        "failed",
        "client CPU",
        "server CPU",
        "server ms/msg",
        "db CPU",
        "other CPU",
        "rate x bare",
        "p99 x bare",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(" --- " for _ in head) + "|")
    for r in rows:
        cells = (
            r["server"],
            str(r["sessions"]),
            f"{r['rate']:,.0f}",
            f"{r['p50']:.1f}",
            f"{r['p99']:.1f}",
            str(r["failed"]),
            f(r["client_cpu_share"], ".2f"),
            f(r["server_cpu_share"], ".2f"),
            f(r.get("server_cpu_ms_per_message"), ".2f"),
            f(r.get("db_cpu_share"), ".2f"),
            f(r["other_cpu_share"], ".2f"),
            f(r.get("rate_ratio"), ".2f"),
            f(r.get("p99_ratio"), ".2f"),
        )
        print("| " + " | ".join(cells) + " |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=2000, help="messages per measured run (default 2000)")
    p.add_argument(
        "--sessions",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[10, 50],
        help="comma-separated concurrent session counts (default 10,50)",
    )
    p.add_argument("--runs", type=int, default=3, help="runs per server and session count (default 3)")
    p.add_argument("--warmup", type=int, default=100, help="warm-up messages after each start (default 100)")
    p.add_argument("--size", type=int, default=4096, help="approximate message size in bytes")
    p.add_argument("--bare-only", action="store_true", help="measure the bare aiosmtpd server only")
    p.add_argument(
        "--intake-cmd",
        default=".venv/bin/intake",
        help="how to run intake (shell words; relative paths from cwd or the repo)",
    )
    p.add_argument(
        "--relay",
        choices=("aiosmtpd", "smtp-sink"),
        default="aiosmtpd",
        help="the stand-in for the outbound relay: a bare aiosmtpd (default) or Postfix's smtp-sink",
    )
    p.add_argument(
        "--client-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the event loop of the load client (and this harness): asyncio (default, as every "
        "figure in docs/benchmarks.md) or uvloop (about half the client's CPU)",
    )
    p.add_argument(
        "--client",
        choices=("python", "c"),
        default="c",
        help="the load client: c (default; smtp_load.c, built with the system's C compiler: the "
        "Python client's messages and dialogue, measured the same way, for a quarter of its CPU, as "
        "the issue's reference figures were taken with Postfix's C smtp-source) or python "
        "(smtp_load.py on --client-loop, as every figure in docs/benchmarks.md before the fourteenth session)",
    )
    p.add_argument(
        "--client-pipelining",
        action="store_true",
        help="the client sends MAIL, RCPT and DATA in one write to a server that offers PIPELINING, "
        "as Postfix and Exim do (intake offers it, the bare aiosmtpd does not); default: never, as "
        "Postfix's smtp-source, the issue's reference client",
    )
    p.add_argument(
        "--compare-cmd",
        default="",
        help="a second intake command measured in the same runs as 'intake-b' (A/B of two builds)",
    )
    p.add_argument(
        "--compare-config",
        default="",
        help="TOML merged over --config-extra for 'intake-b' only (A/B of two configurations); @FILE reads a file",
    )
    p.add_argument(
        "--config-extra",
        default="",
        help="TOML merged over the generated config ({tmpdir} = the run's directory); @FILE reads it from FILE",
    )
    p.add_argument(
        "--postgres",
        metavar="URL",
        default="",
        help="run intake on PostgreSQL: a new database on URL's server for every run (dropped afterwards)",
    )
    p.add_argument(
        "--instances",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1],
        help="comma-separated numbers of intake processes on one database (default 1; e.g. 1,2)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="sample every intake process (and its outbox child) with py-spy during the measured runs",
    )
    p.add_argument(
        "--round-trips",
        action="store_true",
        help="with --postgres: count statements and round trips per message in-process, no load",
    )
    p.add_argument("--ready-timeout", type=float, default=30.0, help='seconds to wait for "listening on"')
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    p.add_argument("--json", action="store_true", help="print machine-readable results on stdout")
    p.add_argument("--serve-null", type=int, metavar="PORT", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.config_extra.startswith("@"):
        a.config_extra = Path(a.config_extra[1:]).read_text()
    if a.compare_config.startswith("@"):
        a.compare_config = Path(a.compare_config[1:]).read_text()
    if any(n > 1 for n in a.instances) and not a.postgres:
        p.error("--instances above 1 needs --postgres (SQLite is one process's database)")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global PROFILING, CLIENT_PIPELINING, CLIENT
    PROFILING = args.profile
    CLIENT_PIPELINING = args.client_pipelining
    CLIENT = args.client
    if CLIENT == "c":
        if args.client_pipelining:
            raise SystemExit("--client c does not pipeline; leave out --client-pipelining")
        c_client()  # build it now: a compiler error is reported before any server starts
    if args.serve_null is not None:
        serve_null(args.serve_null)
        return 0

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    if args.round_trips:
        if not args.postgres:
            log("error: --round-trips needs --postgres URL")
            return 2
        rows = asyncio.run(count_round_trips(args))
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print("| case | statements / msg | round trips / msg | transactions / msg | ms / msg |")
            print("| --- | --- | --- | --- | --- |")
            for r in rows:
                print(
                    f"| {r['case']} | {r['statements_per_message']} | {r['round_trips_per_message']} | "
                    f"{r['transactions_per_message']} | {r['ms_per_message']} |"
                )
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="intake-bench-"))
    status = 0
    try:
        if args.client_loop == "uvloop":
            import uvloop

            runs, checks = uvloop.run(bench(args, workdir))
        else:
            runs, checks = asyncio.run(bench(args, workdir))
        rows = summarize(runs, args.sessions)
        failed_checks = [c for c in checks if not c["ok"]]
        refused = sum(r["failed"] for r in runs)
        status = 1 if failed_checks or refused else 0
        pairs = compare_pairs(runs, args.sessions)
        if args.json:
            print(
                json.dumps(
                    {"summary": rows, "pairs": pairs, "runs": runs, "checks": checks, "ok": status == 0}, indent=2
                )
            )
        else:
            print_table(rows, args)
            if pairs:
                print()
                print_pairs(pairs)
            if checks:
                print(
                    f"\nintake checks (tickets == 250s, one acknowledgement per ticket, nothing refused): "
                    f"{len(checks) - len(failed_checks)}/{len(checks)} passed"
                )
            if refused:
                print(f"{refused} message(s) were not accepted; see the codes above")
    except (BenchError, ProcError) as exc:
        log(f"error: {exc}")
        status = 2
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    finally:
        Proc.stop_all()
        if args.keep or status == 2:
            log(f"logs and databases kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
