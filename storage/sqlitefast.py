"""SQLite: the hot statements of a unit of work straight through the sqlite3 cursor.

A new message costs nine small statements on SQLite. Through SQLAlchemy each took ~100 us of
CPU on the listener's event loop (execution context, parameter and result processing) around
~10 us in SQLite itself: most of the unit of work, in the process that also speaks SMTP.

:class:`FastPath` runs the same prebuilt Core statements on the same connection, in the same
transaction, for a fraction of that: each statement is compiled once by SQLAlchemy for the
SQLite dialect (the SQL text, the order of its parameters, and SQLAlchemy's own bind
processors for their types: the UTC timestamps, JSON, booleans), so the values written are
exactly the ones SQLAlchemy would write (``tests/storage/test_sqlitefast.py`` compares them).
Errors come back as SQLAlchemy's exceptions (``IntegrityError``, ``OperationalError``...), so
the store handles them as before. Statements whose parameters it cannot fill (a column
default computed by a function) are left to SQLAlchemy.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement

_DIALECT = sqlite.dialect(paramstyle="qmark")

# (SQL, [(parameter name, bind processor or None, default when the name is not given)])
_Plan = tuple[str, list[tuple[str, Callable[[Any], Any] | None, Any]]]
_MISSING = object()
_PLANS: dict[tuple[int, tuple[str, ...]], _Plan | None] = {}
_KEEP: list[ClauseElement] = []  # the statements planned (their ids key _PLANS: keep them alive)


def _plan(statement: ClauseElement, keys: tuple[str, ...]) -> _Plan | None:
    compiled: Any = statement.compile(dialect=_DIALECT, column_keys=list(keys))  # an SQLCompiler
    table = getattr(statement, "table", None)
    insert = bool(getattr(statement, "is_insert", False))
    params: list[tuple[str, Callable[[Any], Any] | None, Any]] = []
    for name in compiled.positiontup or ():
        bind = compiled.binds[name]
        processor = bind.type.dialect_impl(_DIALECT).bind_processor(_DIALECT)
        default: Any = _MISSING
        if name not in keys:
            column = table.c.get(name) if table is not None else None
            if (column is None or not insert) and not bind.required and bind.callable is None:
                # A literal written in the statement ("pending", an UPDATE's SET status = "sent",
                # LIMIT's OFFSET 0), unless SQLAlchemy computes the value at execution.
                if column is not None and column.onupdate is not None:
                    return None
                default = bind.value
            else:
                column_default = getattr(column, "default", None)
                if column_default is None or not column_default.is_scalar:
                    return None  # a default SQLAlchemy computes at execution: leave it the statement
                default = column_default.arg
        params.append((name, processor, default))
    return str(compiled), params


class FastPath:
    """Prebuilt statements executed on the raw sqlite3 connection under a SQLAlchemy transaction."""

    __slots__ = ("db",)

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, statement: ClauseElement, values: Mapping[str, Any]) -> sqlite3.Cursor | None:
        """Run ``statement`` with ``values``; None when it must go through SQLAlchemy."""
        keys = tuple(values)
        key = (id(statement), keys)
        try:
            plan = _PLANS[key]
        except KeyError:
            plan = _PLANS[key] = _plan(statement, keys)
            _KEEP.append(statement)
        if plan is None:
            return None
        sql, params = plan
        args: list[Any] = []
        for name, processor, default in params:
            value = values[name] if default is _MISSING else values.get(name, default)
            args.append(value if processor is None else processor(value))
        try:
            return self.db.execute(sql, args)
        except sqlite3.Error as exc:
            raise DBAPIError.instance(sql, args, exc, sqlite3.Error, hide_parameters=True) from None
