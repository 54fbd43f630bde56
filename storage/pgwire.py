"""PostgreSQL: the writer's transaction in as few network round trips as possible.

On PostgreSQL every statement is a round trip, and the SQLAlchemy + psycopg defaults add two
per transaction (``BEGIN`` before the first statement, ``COMMIT`` at the end). The writer's
connection therefore runs in psycopg's autocommit mode and :class:`PgWire` drives its
transaction itself, with libpq's pipeline mode:

* ``BEGIN`` is queued, not sent: it travels with the transaction's first statement.
* Inserts are written behind (:class:`Rows`): a unit's new ticket, participant, message,
  Message-IDs and outbox entries become ONE statement (a data-modifying CTE), queued when the
  unit ends (or before any statement that must see them) and sent with the next statement
  whose result is needed: the next unit's duplicate lookup, or the ``COMMIT``.
* ``COMMIT`` travels with the last unit's inserts.

Ids of the written-behind rows are drawn from the tables' sequences ahead of time
(:class:`IdPool`, refilled by the duplicate lookup in the same statement), so that a unit gets
its ticket's id at once without a statement of its own.

Nothing changes in what is atomic: the units still run in one transaction and a unit's inserts
are one statement. A queued statement that fails is reported when the pipeline carrying it is
read, that is by the next unit's lookup or by the COMMIT (which then does not happen); the
store rolls the group back and runs its units again, each in a savepoint and each sending its
writes before its savepoint is released, so that a conflict is reported as its own unit's
(see ``storage/store.py``). A transaction in which anything failed is never committed, even if
a unit swallowed the error (PostgreSQL would answer COMMIT with a silent ROLLBACK).

Statements executed through SQLAlchemy on the same connection (the less frequent paths: follow-
ups, the outbox dispatcher, the SLA clocks) first send whatever is queued (the store calls
:meth:`PgWire.sync` from SQLAlchemy's ``before_cursor_execute`` event), so they always see the
writes before them; SQLAlchemy's ``begin`` / ``commit`` / ``rollback`` events map to
:meth:`PgWire.begin` / :meth:`PgWire.commit` / :meth:`PgWire.discard`.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import JSON
from sqlalchemy.exc import DBAPIError

from storage.tables import UTCDateTime, message, message_id, outbox, participant, stored_utc, ticket

if TYPE_CHECKING:  # psycopg is imported when PostgreSQL is used: SQLite never loads it
    import psycopg

Params = Sequence[Any] | dict[str, Any] | None

# -- ids ahead of the inserts ---------------------------------------------------------------

SEQUENCED = ("ticket", "message", "outbox")


class IdPool:
    """Ids taken from the tables' sequences ahead of the inserts that will use them.

    Sequence values are never handed out twice, whether or not the transaction that fetched
    them commits; ids a process fetched and never used are gaps, as rolled-back inserts leave.
    """

    LOW: ClassVar[dict[str, int]] = {"ticket": 2, "message": 2, "outbox": 4}  # refill below this many
    BLOCK: ClassVar[dict[str, int]] = {"ticket": 8, "message": 8, "outbox": 16}  # this many at a time

    def __init__(self) -> None:
        self.free: dict[str, deque[int]] = {name: deque() for name in SEQUENCED}

    def wanted(self) -> list[int]:
        """How many ids of each table (in SEQUENCED order) to fetch next (0: enough in stock)."""
        return [self.BLOCK[name] if len(self.free[name]) < self.LOW[name] else 0 for name in SEQUENCED]

    def add(self, fetched: Sequence[Sequence[int] | None]) -> None:
        for name, ids in zip(SEQUENCED, fetched, strict=True):
            if ids:
                self.free[name].extend(sorted(int(i) for i in ids))

    def take(self, name: str) -> int | None:
        free = self.free[name]
        return free.popleft() if free else None


# SELECT list items that fetch ``%s`` new ids of each table (an empty array for 0).
NEXT_IDS = ", ".join(
    f"ARRAY(SELECT nextval(pg_get_serial_sequence('{name}', 'id')::regclass) FROM generate_series(1, %s::int))"
    for name in SEQUENCED
)
_REFILL = f"SELECT {NEXT_IDS}"


# -- inserts written behind -----------------------------------------------------------------


def _json(value: Any) -> Any:
    from psycopg.types.json import Json  # as SQLAlchemy's psycopg dialect binds JSON

    return Json(value)


def _columns(table: Any, names: Sequence[str]) -> tuple[tuple[str, Callable[[Any], Any] | None], ...]:
    """(column, bind conversion) in insert order, conversions as SQLAlchemy's types do them."""
    out: list[tuple[str, Callable[[Any], Any] | None]] = []
    for name in names:
        kind = table.c[name].type
        out.append((name, stored_utc if isinstance(kind, UTCDateTime) else _json if isinstance(kind, JSON) else None))
    return tuple(out)


TICKET_COLUMNS = _columns(
    ticket,
    (
        "id", "reference", "subject", "channel", "requester", "requester_name", "organisation", "severity",
        "security", "status", "alerted", "ack_status", "thread_key", "created_at", "updated_at", "response_due",
        "notes", "evidence", "plan", "language", "targets", "escalation_step", "responded_at", "escalated_at",
        "sla_warned_at", "sla_missed_at",
    ),
)  # fmt: skip
MESSAGE_COLUMNS = _columns(
    message,
    (
        "id", "ticket_id", "direction", "route", "route_note", "channel", "recipient", "dedup_key", "message_id",
        "sender", "sender_name", "subject", "body", "new_text", "html", "attachments", "hits", "automation",
        "parse_problem", "external_id", "received_at", "sent_date", "raw", "edit_of",
    ),
)  # fmt: skip
OUTBOX_COLUMNS = _columns(
    outbox,
    (
        "id", "ticket_id", "kind", "channel", "recipient", "message_id", "payload", "status", "attempts",
        "next_attempt_at", "created_at", "organisation_key",
    ),
)  # fmt: skip
PARTICIPANT_COLUMNS = _columns(participant, ("ticket_id", "address"))
MESSAGE_ID_COLUMNS = _columns(message_id, ("message_id", "ticket_id", "ours"))

# A statement carries at most this many parameters (PostgreSQL's limit is 65,535).
_MAX_PARAMS = 20_000


class Rows:
    """Inserts not sent yet, by table. Tickets stay dicts until sent: an update of a ticket
    this transaction is still to insert changes the row to insert instead of costing a
    statement."""

    def __init__(self) -> None:
        self.tickets: dict[int, dict[str, Any]] = {}
        self.participants: dict[tuple[int, str], None] = {}
        self.messages: list[dict[str, Any]] = []
        self.message_ids: dict[tuple[str, int], bool] = {}
        self.outbox: list[dict[str, Any]] = []
        self.params = 0

    def __bool__(self) -> bool:
        return bool(self.tickets or self.participants or self.messages or self.message_ids or self.outbox)

    def statement(self) -> tuple[str, list[Any]]:
        """One INSERT, or one data-modifying CTE of several, for every row held."""
        parts: list[tuple[str, str, int, int]] = []  # table, ON CONFLICT clause, rows, columns
        params: list[Any] = []
        for name, rows, columns, conflict in (
            ("ticket", list(self.tickets.values()), TICKET_COLUMNS, ""),
            (
                "participant",
                [{"ticket_id": t, "address": a} for t, a in self.participants],
                PARTICIPANT_COLUMNS,
                " ON CONFLICT DO NOTHING",
            ),
            ("message", self.messages, MESSAGE_COLUMNS, ""),
            (
                "message_id",
                [{"message_id": m, "ticket_id": t, "ours": o} for (m, t), o in self.message_ids.items()],
                MESSAGE_ID_COLUMNS,
                " ON CONFLICT DO NOTHING",
            ),
            ("outbox", self.outbox, OUTBOX_COLUMNS, ""),
        ):
            if not rows:
                continue
            for row in rows:
                params.extend(
                    (convert(row.get(col)) if convert is not None else row.get(col)) for col, convert in columns
                )
            parts.append((name, conflict, len(rows), len(columns)))
        return _insert_sql(tuple(parts)), params


_SQL_CACHE: dict[tuple[tuple[str, str, int, int], ...], str] = {}


def _insert_sql(shape: tuple[tuple[str, str, int, int], ...]) -> str:
    """The SQL text of one shape (tables, row counts), built once."""
    sql = _SQL_CACHE.get(shape)
    if sql is not None:
        return sql
    columns = {
        "ticket": TICKET_COLUMNS,
        "participant": PARTICIPANT_COLUMNS,
        "message": MESSAGE_COLUMNS,
        "message_id": MESSAGE_ID_COLUMNS,
        "outbox": OUTBOX_COLUMNS,
    }
    inserts = []
    for name, conflict, n_rows, n_cols in shape:
        row = "(" + ", ".join(["%s"] * n_cols) + ")"
        names = ", ".join(col for col, _ in columns[name])
        inserts.append(f"INSERT INTO {name} ({names}) VALUES {', '.join([row] * n_rows)}{conflict}")
    # Data-modifying CTEs: one statement, so one round trip and all or nothing. Foreign keys are
    # checked at the end of the statement, so the order of the parts does not matter.
    *first, last = inserts
    sql = "WITH " + ", ".join(f"w{i} AS ({stmt})" for i, stmt in enumerate(first)) + " " + last if first else last
    if len(_SQL_CACHE) > 256:  # unusual shapes (many outbox entries in one unit) must not pile up
        _SQL_CACHE.clear()
    _SQL_CACHE[shape] = sql
    return sql


# -- the wire ------------------------------------------------------------------------------------


class TransactionAborted(Exception):
    """The transaction cannot commit: one of its statements failed (and the error was swallowed)."""


class PgWire:
    """The writer connection's transaction: queued statements, inserts written behind.

    Used by one thread (the store's writer). ``observers`` are called with the text of every
    statement sent (benchmarks count them).
    """

    def __init__(
        self, conn: psycopg.Connection[Any], ids: IdPool, observers: Sequence[Callable[[str], None]] = ()
    ) -> None:
        import psycopg

        self._psycopg = psycopg
        self.pg = conn
        self.ids = ids
        self.observers = observers
        self.rows = Rows()
        self._queue: list[tuple[str, Params]] = []
        self._begun = False  # a transaction of ours is open (its BEGIN queued or sent)
        self._unsent_begin = False  # its BEGIN is queued, not sent yet
        self._failed = False  # a statement of it failed: it is aborted
        self._cursor = conn.cursor()
        self._results = conn.cursor()
        # libpq before 14 has no pipeline mode (psycopg[binary] brings its own, newer libpq):
        # then the queued statements go one by one, with the same effect and more round trips.
        self._pipelined = psycopg.Pipeline.is_supported()

    # -- transaction ---------------------------------------------------------------------------

    def begin(self) -> None:
        self.discard()
        self._queue.append(("BEGIN", None))
        self._begun = self._unsent_begin = True

    def commit(self) -> None:
        """Send what is queued with COMMIT, in one round trip (nothing if nothing was done)."""
        self.flush()
        begun, self._begun = self._begun, False
        if not begun:
            return  # no transaction of ours
        if self._failed or self.pg.info.transaction_status == self._psycopg.pq.TransactionStatus.INERROR:
            self.discard()
            with contextlib.suppress(self._psycopg.Error):
                self.pg.rollback()
            raise TransactionAborted("a statement of this transaction failed; it was rolled back")
        if self._unsent_begin and self._queue == [("BEGIN", None)]:
            self._queue.clear()  # nothing was done: nothing to send
            self._unsent_begin = False
            return
        self._queue.append(("COMMIT", None))
        try:
            self._send(None)
        except BaseException:
            # A statement before the COMMIT failed and the pipeline skipped the COMMIT: the
            # transaction is still open (aborted). SQLAlchemy takes a failed commit as the end of
            # the transaction and will not roll back; end it here.
            with contextlib.suppress(self._psycopg.Error):
                self.pg.rollback()
            raise

    def discard(self) -> None:
        """Forget what is queued (the transaction is being rolled back)."""
        self._queue.clear()
        self.rows = Rows()
        self._begun = self._unsent_begin = self._failed = False

    def forget_unsent(self) -> None:
        """Drop the writes not sent yet: the unit that made them failed, its savepoint is rolled back."""
        self.rows = Rows()
        self._queue = [("BEGIN", None)] if self._unsent_begin else []
        self._failed = False  # the savepoint's rollback ends the failure

    # -- statements ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Turn the inserts held into one queued statement (nothing is sent)."""
        if self.rows:
            sql, params = self.rows.statement()
            self.rows = Rows()
            self._queue.append((sql, params))

    def added(self, n_params: int) -> None:
        """Note the parameters of a row just held; flush before a statement grows too big."""
        self.rows.params += n_params
        if self.rows.params > _MAX_PARAMS:
            self.flush()

    def sync(self) -> None:
        """Send everything queued and wait (before a statement sent some other way)."""
        self.flush()
        if self._queue:
            self._send(None)

    def query(self, sql: str, params: Params = None) -> list[tuple[Any, ...]]:
        """Run one statement and return its rows; what is queued goes first, in the same round trip."""
        self.flush()
        return self._send((sql, params))

    def next_id(self, table: str) -> int:
        """An id for a row of ``table`` this transaction is about to insert."""
        got = self.ids.take(table)
        if got is None:  # the pool ran dry between lookups: one statement to refill it
            self.ids.add(self.query(_REFILL, self.ids.wanted())[0])
            got = self.ids.take(table)
            assert got is not None
        return got

    def _send(self, last: tuple[str, Params] | None) -> list[tuple[Any, ...]]:
        commands = self._queue
        self._queue = []
        self._unsent_begin = False
        if last is not None:
            commands.append(last)
        for observe in self.observers:
            for sql, _ in commands:
                observe(sql)
        try:
            # One pipeline: libpq sends every command without waiting for the ones before it;
            # leaving the block sends one Sync and reads every result (one round trip). Even a
            # lone command goes in one: outside a pipeline, psycopg prepares a statement (on its
            # fifth use) in a round trip of its own.
            with self.pg.pipeline() if self._pipelined else contextlib.nullcontext():
                for sql, params in commands[:-1] if last is not None else commands:
                    self._cursor.execute(sql, params)
                if last is not None:
                    self._results.execute(last[0], last[1])
            return self._results.fetchall() if last is not None else []
        except self._psycopg.Error as exc:
            self._failed = True
            statement = "; ".join(sql if len(sql) < 200 else sql[:200] + " ..." for sql, _ in commands)
            raise DBAPIError.instance(statement, None, exc, self._psycopg.Error, hide_parameters=True) from None
