"""The store: every unit of work in one transaction, concurrent units in one commit.

Design (see docs/benchmarks.md for the figures behind it): units of work submitted from the
event loop queue up; the store takes all that are waiting, runs them in one transaction,
commits once (one fsync for the whole group) and hands every result back to its caller's loop
in one wake-up. The group runs first without savepoints; on any failure it is rolled back and
run again with a SAVEPOINT per unit, so a unit that fails rolls back alone. A failed commit
fails the whole group with :class:`StorageUnavailableError` and nothing of it is stored. A unit
that hits a unique constraint (another instance stored the same message a moment earlier) is
run again, and then finds the duplicate.

On SQLite the whole group runs on the event loop, after a few turns of the loop that let the
sessions whose data already arrived queue their units too: BEGIN IMMEDIATE fails at once when another
process (another listener, the outbox) holds the write lock, and the store awaits a short pause and tries again;
the group is what has queued once the lock is ours (the units that came while another process
wrote join it); the units run; COMMIT runs on the loop too, or in the store's thread while the
disk syncs slowly. The store syncs the write-ahead log itself, right after COMMIT and before any
caller is answered (see :meth:`SqlStore._sync_wal`): the durability of ``synchronous=FULL``, with
the write lock free during the sync. On PostgreSQL one writer thread owns the connection and
runs the groups.

On PostgreSQL the writer's transaction goes through a :class:`storage.pgwire.PgWire`: BEGIN
travels with the first statement, each unit's inserts are one statement sent with the next
unit's first (or with the COMMIT), so that a new message costs three round trips alone and
about two in a group (docs/benchmarks-postgres.md).

The event loop never waits for a lock: it appends to a queue and awaits a future, and on SQLite
it spends only the units' own work and the fsync on the database.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from intake.errors import StorageUnavailableError
from intake.ports import UnitOfWork
from storage.pgwire import IdPool, PgWire
from storage.repository import SqlUnitOfWork

log = logging.getLogger("intake.storage")
T = TypeVar("T")

_CONFLICT_RETRIES = 3


def normalise_url(url: str) -> str:
    """Map the URLs people write to the driver this store runs (sync drivers in the writer)."""
    for prefix in ("postgresql+asyncpg://", "postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if url.startswith("sqlite+aiosqlite://"):
        return "sqlite://" + url[len("sqlite+aiosqlite://") :]
    return url


def make_engine(url: str, *, writer: bool = True, lock_timeout: float = 5.0) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": lock_timeout})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy drive transactions (the sqlite3 module's own handling breaks
            # SAVEPOINT), WAL so readers never block the writer, full sync for durability.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            # A writer waits for the write lock in _sqlite_begin, not in SQLite's busy handler.
            cur.execute(f"PRAGMA busy_timeout={0 if writer else int(lock_timeout * 1000)}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            if not writer:
                conn.exec_driver_sql("BEGIN")
                return
            if conn.info.pop(_LOCK_TAKEN, False):  # SqlStore._take_write_lock sent BEGIN IMMEDIATE
                return
            if not _begin_immediate(conn.connection.driver_connection, lock_timeout):
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # a last try: SQLAlchemy raises its error

        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=2,
        connect_args={"connect_timeout": max(1, int(lock_timeout))},
    )


_COMMIT_ON_LOOP_MAX = 0.003  # seconds: a slower average COMMIT runs in the store's thread
# Turns of the event loop a group waits before it starts (SQLite, on the loop). A message
# needs about three to go from its socket to the queue (the read wakes its session's task,
# which parses, assesses and queues the unit). bench_intake, 10 sessions, four pairs each: 3
# turns against none, 8 % more messages a second and 8 % less CPU per message (4 of 4; two
# units a group instead of 1.5); 1 turn and 6 turns did no better than 3.
_GATHER_TURNS = 3
_LOCK_TAKEN = "intake_write_lock_taken"  # Connection.info key: BEGIN IMMEDIATE already sent
_LOCK_PAUSE_FIRST = 0.0002  # seconds between attempts at the write lock: 0.2 ms, doubling...
_LOCK_PAUSE_MAX = 0.002  # ...up to 2 ms


def _lock_pauses(lock_timeout: float) -> Iterator[float]:
    """The pauses between attempts at SQLite's write lock, until ``lock_timeout`` has passed.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25... ms between attempts: with the
    outbox process and intake's listener taking turns at one database, a listener that found
    the lock taken slept through most of the turns that followed, and every SMTP session in
    its group commit waited with it. Short pauses (from 0.2 ms, the time a group's commit
    takes here) take the lock about as soon as it is free. On uvloop, whose timers count
    whole milliseconds, the waits come out as a turn of the loop twice, then 1.15 and 2.2 ms
    (measured); a notice on release that wakes the waiter at once did not make the wait
    shorter under load (docs/benchmarks.md, ninth session).
    """
    pause = _LOCK_PAUSE_FIRST
    deadline = time.monotonic() + lock_timeout
    while time.monotonic() < deadline:
        yield pause
        pause = min(pause * 2, _LOCK_PAUSE_MAX)


def _try_write_lock(db: Any) -> sqlite3.OperationalError | None:
    """BEGIN IMMEDIATE once: None when the lock is ours, SQLite's error when another process
    holds it; any other failure is raised."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return exc
        raise
    return None


def _begin_immediate(db: Any, lock_timeout: float) -> bool:
    """BEGIN IMMEDIATE, sleeping between attempts (callers off the event loop: migrations,
    command-line tools); False if the lock stayed taken or BEGIN failed otherwise."""
    pauses = _lock_pauses(lock_timeout)
    try:
        while _try_write_lock(db) is not None:
            pause = next(pauses, None)
            if pause is None:
                return False
            time.sleep(pause)
    except sqlite3.Error:
        return False
    return True


def _defer_wal_sync(conn: Connection) -> str | None:
    """On a connection to a database file in WAL mode: ``synchronous=NORMAL``, so that COMMIT
    does not sync the log inside the write lock, and the log's path, which the store syncs after
    COMMIT instead (:meth:`SqlStore._sync_wal`). Anything else (an in-memory database, another
    journal mode) keeps ``synchronous=FULL`` and gets None."""
    db: Any = conn.connection.driver_connection  # the sqlite3 connection
    mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    files = {name: path for _, name, path in db.execute("PRAGMA database_list").fetchall()}
    path = files.get("main") or ""
    if str(mode).lower() != "wal" or not path:
        return None
    db.execute("PRAGMA synchronous=NORMAL")
    return f"{path}-wal"


def _database_file(conn: Connection) -> tuple[str | None, tuple[int, int] | None]:
    """The main database file of a SQLite connection and its (device, inode); (None, None) for
    an in-memory database."""
    db: Any = conn.connection.driver_connection
    files = {name: path for _, name, path in db.execute("PRAGMA database_list").fetchall()}
    path = files.get("main") or ""
    if not path:
        return None, None
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return path, (st.st_dev, st.st_ino)


def create_schema(engine: Engine) -> None:
    """Create or upgrade the schema through the migrations (the same path as `intake db upgrade`)."""
    from storage import schema

    schema.upgrade(engine)


@dataclass(slots=True)
class _Job:
    work: Callable[[UnitOfWork], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _resolve(batch: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, value, exc in batch:
        if fut.done():  # the caller gave up (cancelled); the work is committed all the same
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)


def _expire(fut: asyncio.Future[Any], timeout: float) -> None:
    """``commit_timeout`` passed: the caller stops waiting with StorageUnavailableError.

    The unit may still commit later (the database hangs); the sender retries and the retry
    finds it as a duplicate. Answering "try again" now beats hanging the session.
    """
    if not fut.done():
        fut.set_exception(StorageUnavailableError(f"no commit within {timeout:g}s"))


class SqlStore:
    """Implements :class:`intake.ports.Store` over SQLite or PostgreSQL."""

    def __init__(
        self,
        url: str,
        *,
        max_batch: int = 256,
        create: bool = False,
        lock_timeout: float = 5.0,
        commit_timeout: float = 10.0,
    ) -> None:
        self.url = normalise_url(url)
        self.commit_timeout = commit_timeout
        self.lock_timeout = lock_timeout
        self._read_engine: Engine | None = None
        self.engine = make_engine(self.url, lock_timeout=lock_timeout)
        self.max_batch = max_batch
        self._pending: list[_Job] = []
        self._cond = threading.Condition()
        self._closing = False
        self._conn: Connection | None = None
        self._thread: threading.Thread | None = None
        # SQLite: groups run on the caller's loop (see _take_write_lock). A writer thread that
        # ran the units spent most of its time waiting for the GIL the listener held, and
        # stretched a 1 ms unit to 7 ms under load. PostgreSQL keeps the writer thread, whose
        # statements are network round trips the loop must not wait for.
        self.on_loop = self.engine.dialect.name == "sqlite"
        self._loop_pending: list[_Job] = []
        self._loop_task: asyncio.Task[None] | None = None
        # SQLite: COMMIT on a slow disk, and closing the connection.
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="intake-db-io")
        self.batches = 0
        self.commit_seconds = 0.0  # SQLite: moving average of a COMMIT's own duration, its sync included
        self._wal_path: str | None = None  # SQLite in WAL mode: the log the store syncs after COMMIT
        self._wal_fd: int | None = None  # open on _wal_path while the store's connection is
        # SQLite: the database file the writer's connection opened, and its (device, inode): a
        # file deleted or replaced under an open connection takes every later commit with it.
        self._db_file: str | None = None
        self._db_id: tuple[int, int] | None = None
        self.units = 0
        # PostgreSQL: the writer's connection runs in autocommit mode and a PgWire drives its
        # transaction (BEGIN with the first statement, inserts written behind, COMMIT with the
        # last ones; see storage/pgwire.py). SQLAlchemy's transaction events map onto it, and a
        # statement SQLAlchemy sends first sends what the wire holds.
        self._wired = self.engine.dialect.name == "postgresql" and self.engine.dialect.driver == "psycopg"
        self._wire: PgWire | None = None
        self._ids = IdPool()
        self.statement_observers: list[Callable[[str], None]] = []  # called with each statement the wire sends
        if self._wired:
            event.listen(self.engine, "begin", self._wire_begin)
            event.listen(self.engine, "commit", self._wire_commit)
            event.listen(self.engine, "rollback", self._wire_rollback)
            event.listen(self.engine, "before_cursor_execute", self._wire_before_statement)
        if create:
            create_schema(self.engine)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def start(self) -> None:
        if self._thread is None and not self.on_loop:
            self._thread = threading.Thread(target=self._writer, name="intake-db-writer", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._loop_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._loop_task), timeout=30)
            except TimeoutError:
                log.error("storage: pending commits did not finish within 30s of shutdown")
        if self.on_loop and self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._io, self._conn.close)
            self._conn = None
        self._close_wal()
        self._io.shutdown(wait=False)
        if self._read_engine is not None:
            self._read_engine.dispose()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None
        self.engine.dispose()

    async def transact(self, work: Callable[[UnitOfWork], T]) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if self.on_loop:
            if self._closing:
                raise StorageUnavailableError("storage is shutting down")
            self._loop_pending.append(_Job(work, fut, loop))
            if self._loop_task is None:
                self._loop_task = loop.create_task(self._drain(), name="intake-db-group-commit")
        else:
            if self._thread is None:
                self.start()
            with self._cond:
                if self._closing:
                    raise StorageUnavailableError("storage is shutting down")
                self._pending.append(_Job(work, fut, loop))
                self._cond.notify()
        # The caller awaits the job's own future: the group resolves it and the caller's task
        # runs at the next turn of the loop. (wait_for(shield(fut)) took three turns, each
        # behind every other session's work queued meanwhile.) A caller that gives up cancels
        # the future, and the group skips it (_resolve); its unit is committed all the same.
        timer = loop.call_later(self.commit_timeout, _expire, fut, self.commit_timeout)
        try:
            return await fut
        finally:
            timer.cancel()

    def dispose(self) -> None:
        """Close the connections of a store used only through run_sync (command-line tools)."""
        if self._read_engine is not None:
            self._read_engine.dispose()
        self.engine.dispose()

    def run_sync(self, work: Callable[[SqlUnitOfWork], T]) -> T:
        """Run one reading unit in the calling thread (command-line tools, tests).

        On SQLite it reads through a connection that does not take the write lock (WAL lets
        readers run beside the writer), so it never waits for a group being committed.
        """
        if self._read_engine is None:
            self._read_engine = make_engine(self.url, writer=False, lock_timeout=self.lock_timeout)
        with self._read_engine.connect() as conn, conn.begin():
            return work(SqlUnitOfWork(conn))

    # -- group commit on the loop (SQLite) ----------------------------------------------------

    async def _drain(self) -> None:
        try:
            while self._loop_pending:
                # The group's work and its COMMIT run on the loop and hold it: what other
                # sessions sent meanwhile waits, unread, in their sockets. A few turns of the
                # loop first let it read them and bring their units into this group.
                for _ in range(_GATHER_TURNS):
                    await asyncio.sleep(0)
                outcomes = await self._batch_on_loop()
                self.batches += 1
                self.units += len(outcomes)
                _resolve([(job.future, value, failure) for job, value, failure in outcomes])
        finally:
            self._loop_task = None

    async def _take_write_lock(self, conn: Connection) -> None:
        """BEGIN IMMEDIATE on the loop, awaiting short pauses while another process writes.

        The writer's busy_timeout is 0, so a taken lock answers at once and the loop never
        blocks on it. COMMIT runs on the loop too while the disk is fast (see _commit): its WAL
        write and fsync take 0.2-1 ms here, less than the two hand-offs to a thread and back
        that BEGIN and COMMIT used to cost (1.4 ms each under load). bench_intake, 10
        sessions: time from parsed to committed 15 -> 10 ms; three interleaved pairs, p99
        52.7 -> 47.7 ms at the same rate.
        """
        db: Any = conn.connection.driver_connection  # the sqlite3 connection
        pauses = _lock_pauses(self.lock_timeout)
        try:
            while (busy := _try_write_lock(db)) is not None:
                pause = next(pauses, None)
                if pause is None:
                    raise OperationalError("BEGIN IMMEDIATE", {}, busy) from busy
                await asyncio.sleep(pause)
        except sqlite3.Error as exc:
            raise OperationalError("BEGIN IMMEDIATE", {}, exc) from exc
        conn.info[_LOCK_TAKEN] = True

    async def _commit(self, trans: Any) -> None:
        """COMMIT and the log's sync, on the loop while the disk syncs fast; in the thread when
        it does not.

        Here a COMMIT (WAL write and fsync) takes 0.2-1 ms, less than a hand-off to a thread
        and back. On a disk whose fsync takes 10 ms or more, the loop would spend most of its
        time waiting in COMMIT and serve no session meanwhile: when the average commit passes
        ``_COMMIT_ON_LOOP_MAX`` it goes to the thread, until the disk is fast again.
        """

        def timed() -> float:
            started = time.perf_counter()
            trans.commit()
            self._sync_wal()
            self._check_same_file()
            return time.perf_counter() - started

        if self.commit_seconds <= _COMMIT_ON_LOOP_MAX:
            took = timed()
        else:
            took = await asyncio.get_running_loop().run_in_executor(self._io, timed)
        self.commit_seconds += (took - self.commit_seconds) * 0.1

    def _sync_wal(self) -> None:
        """fdatasync the write-ahead log: after COMMIT, before any caller of the group is answered.

        With ``synchronous=FULL`` SQLite syncs the log inside COMMIT, while it holds the write
        lock that every other listener process and the outbox wait for. The store's connection
        runs ``synchronous=NORMAL`` (COMMIT writes the log and lets go of the lock) and syncs
        the log here, so another process commits while this one waits for the disk. What a
        caller is told is as durable as before: its group's frames are in the log file when
        COMMIT returns, and the sync of the file takes them to the disk, with every frame
        written before them. Another process may read a commit before its sync (for a moment,
        visible is not yet durable), but whatever it does with it goes through a transaction
        of its own that it syncs before acting: the redelivery found as a duplicate is
        answered after the second listener's own COMMIT and sync, and the outbox sends a note
        only once its claim has committed and synced. A
        checkpoint in NORMAL mode syncs the log before it copies pages and the database after,
        and syncs the log's header when the log starts over, so a sync of the file always
        covers what a caller was told. bench_intake, ten pairs at 10 sessions: p99 18.8
        against 23.8 ms, lower in all ten (docs/benchmarks.md, fourteenth session).

        A failed sync fails the group: its callers get 451 and retry, and the retry finds any
        unit that did reach the disk as a duplicate.
        """
        if self._wal_path is None:
            return
        if self._wal_fd is None:
            # Opened once per connection: SQLite removes or replaces the log only when the
            # last connection to the database closes, and ours is open until _drop_connection
            # or close(), which close this descriptor with it.
            try:
                self._wal_fd = os.open(self._wal_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return  # no log, so no frames of ours waiting for the disk
        try:
            os.fdatasync(self._wal_fd)
        except OSError as exc:
            raise OSError(exc.errno, f"committed, but the sync of the write-ahead log failed: {exc.strerror}") from exc

    def _check_same_file(self) -> None:
        """Raise unless the file at the database's path is still the one the connection has open.

        After `rm intake.db` (or a backup moved over it) SQLite goes on committing into the
        file it holds open, which is gone from the directory: nothing of it survives the
        connection. A group that committed there must be told to try again, not 250; the next
        connection opens whatever is at the path (one stat a group: microseconds).
        """
        if self._db_file is None:
            return
        try:
            st = os.stat(self._db_file)
        except FileNotFoundError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != self._db_id:
            raise OSError(
                f"{self._db_file} was deleted or replaced while intake had it open: this commit went to the old file"
            )

    def _refuse_another_file(self) -> None:
        """Before the writer connects again: the file at the path must be the one it had.

        Missing, connecting would make a new, empty database (no schema) in its place. Replaced
        (a backup moved over it while intake ran), a connection to the new file would read the
        old file's write-ahead log, still at the same path, as its own (SQLite leaves that log
        behind when its database was moved or deleted). Until intake is restarted, every commit
        is refused (451: the senders keep their messages), and the log says what to remove.
        """
        assert self._db_file is not None
        try:
            st = os.stat(self._db_file)
        except FileNotFoundError:
            raise OSError(
                f"{self._db_file} is gone (deleted while intake ran?): stop intake, remove its -wal and -shm"
                " files, restore it or run `intake db upgrade`"
            ) from None
        if (st.st_dev, st.st_ino) != self._db_id:
            raise OSError(
                f"{self._db_file} was replaced while intake ran: stop intake, remove its -wal and -shm files"
                " (the old file's), start it"
            )

    def _close_wal(self) -> None:
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    def _take_batch(self) -> list[_Job]:
        batch = self._loop_pending[: self.max_batch]
        del self._loop_pending[: self.max_batch]
        return batch

    async def _batch_on_loop(self) -> list[tuple[_Job, Any, BaseException | None]]:
        started = time.perf_counter()
        outcomes: list[tuple[_Job, Any, BaseException | None]]
        batch: list[_Job] = []
        try:
            conn = self._connection()
            await self._take_write_lock(conn)
            # The group is what waits once the lock is ours: the units queued while another
            # process held it join this commit instead of waiting for a commit of their own.
            batch = self._take_batch()
            trans = conn.begin()
            try:
                try:
                    outcomes = [(job, job.work(SqlUnitOfWork(conn)), None) for job in batch]
                except (OperationalError, OSError):
                    raise
                except Exception:  # run again with a savepoint per unit (see _run_batch)
                    trans.rollback()
                    await self._take_write_lock(conn)
                    trans = conn.begin()
                    outcomes = [self._run_unit(conn, job) for job in batch]
                await self._commit(trans)
            except BaseException:
                if trans.is_active:
                    trans.rollback()
                raise
        except (OperationalError, DBAPIError, OSError) as exc:
            batch = batch or self._take_batch()  # no lock, no connection: the waiting group fails
            log.error("storage: commit of %d unit(s) failed: %s", len(batch), _short(exc))
            self._drop_connection()
            error = StorageUnavailableError(f"database unavailable: {_short(exc)}")
            outcomes = [(job, None, error) for job in batch]
        except Exception as exc:  # a bug: fail the group, keep serving
            batch = batch or self._take_batch()
            log.exception("storage: unexpected error in a batch of %d", len(batch))
            self._drop_connection()
            error = StorageUnavailableError(f"storage error: {type(exc).__name__}")
            outcomes = [(job, None, error) for job in batch]
        elapsed = time.perf_counter() - started
        if elapsed > 1.0:
            log.warning("storage: a batch of %d unit(s) took %.2fs", len(batch), elapsed)
        return outcomes

    # -- the writer thread (PostgreSQL) --------------------------------------------------------

    def _writer(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending and self._closing:
                    break
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
            self._run_batch(batch)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            if self._db_file is not None:
                self._refuse_another_file()
            conn = self.engine.connect()
            if self.on_loop:
                self._close_wal()  # a descriptor from the connection before belongs to its log
                self._wal_path = _defer_wal_sync(conn)
                self._db_file, self._db_id = _database_file(conn)
            if self._wired:
                conn.execution_options(isolation_level="AUTOCOMMIT")  # the wire sends BEGIN and COMMIT
                pg: Any = conn.connection.driver_connection  # psycopg's Connection
                self._wire = PgWire(pg, self._ids, self.statement_observers)
            self._conn = conn
        return self._conn

    # SQLAlchemy's events on the writer's connection, mapped onto its wire (PostgreSQL).

    def _wire_of(self, conn: Connection) -> PgWire | None:
        return self._wire if conn is self._conn else None

    def _wire_begin(self, conn: Connection) -> None:
        if wire := self._wire_of(conn):
            wire.begin()

    def _wire_commit(self, conn: Connection) -> None:
        if wire := self._wire_of(conn):
            wire.commit()  # psycopg's commit() that follows finds no transaction left to end

    def _wire_rollback(self, conn: Connection) -> None:
        if wire := self._wire_of(conn):
            wire.discard()  # psycopg's rollback() that follows ends the transaction, if it began

    def _wire_before_statement(self, conn: Connection, *_: Any) -> None:
        if wire := self._wire_of(conn):
            wire.sync()

    def _run_batch(self, batch: list[_Job]) -> None:
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        started = time.perf_counter()
        try:
            conn = self._connection()
            try:
                # Optimistic: every unit in one transaction, no savepoints (two statements fewer
                # per unit). Units are re-runnable, so on any failure the group is rolled back and
                # run again with a savepoint per unit, where a failing unit fails alone.
                # The wire sends BEGIN with the first unit's first statement, each unit's inserts
                # with the next unit's first, and the last unit's with the COMMIT.
                with conn.begin():
                    for job in batch:
                        uow = SqlUnitOfWork(conn, self._wire)
                        outcomes.append((job, job.work(uow), None))
                        uow.flush()
            except (OperationalError, OSError):
                raise
            except Exception:
                outcomes = []
                with conn.begin():
                    for job in batch:
                        outcomes.append(self._run_unit(conn, job))
        except (OperationalError, DBAPIError, OSError) as exc:
            log.error("storage: commit of %d unit(s) failed: %s", len(batch), _short(exc))
            self._drop_connection()
            error = StorageUnavailableError(f"database unavailable: {_short(exc)}")
            outcomes = [(job, None, error) for job in batch]
        except Exception as exc:  # a bug: fail the group, keep the writer alive
            log.exception("storage: unexpected error in a batch of %d", len(batch))
            self._drop_connection()
            error = StorageUnavailableError(f"storage error: {type(exc).__name__}")
            outcomes = [(job, None, error) for job in batch]
        self.batches += 1
        self.units += len(batch)
        elapsed = time.perf_counter() - started
        if elapsed > 1.0:
            log.warning("storage: a batch of %d unit(s) took %.2fs", len(batch), elapsed)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        for job, value, failure in outcomes:
            by_loop.setdefault(job.loop, []).append((job.future, value, failure))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:  # the loop closed meanwhile; nobody is waiting any more
                pass

    def _run_unit(self, conn: Connection, job: _Job) -> tuple[_Job, Any, BaseException | None]:
        wire = self._wire  # None on SQLite
        for attempt in range(_CONFLICT_RETRIES):
            savepoint = conn.begin_nested()
            try:
                uow = SqlUnitOfWork(conn, wire)
                value = job.work(uow)
                uow.sync()  # its writes reach the database inside its savepoint: their conflicts are its own
            except IntegrityError as exc:
                if wire is not None:
                    wire.forget_unsent()
                savepoint.rollback()
                if attempt + 1 == _CONFLICT_RETRIES:
                    log.error("storage: unit kept conflicting: %s", _short(exc))
                    return job, None, StorageUnavailableError("conflicting concurrent writes; try again")
                continue
            except (OperationalError, DBAPIError):
                raise  # the connection or the database is in trouble: fail the group
            except Exception as exc:
                if wire is not None:
                    wire.forget_unsent()
                savepoint.rollback()
                return job, None, exc
            savepoint.commit()
            return job, value, None
        raise AssertionError("unreachable")

    def _drop_connection(self) -> None:
        self._wire = None
        self._close_wal()
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            except Exception:  # already broken
                pass
            self._conn = None


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
