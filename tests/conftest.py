"""Shared fixtures: database URLs for SQLite and PostgreSQL, free ports.

PostgreSQL tests use the server named by $INTAKE_TEST_PG_URL (default: the local one on
127.0.0.1:5432, database ``test``, user ``postgres``). Each test gets a schema of its own.
Without a reachable server they skip with the reason, except when $INTAKE_REQUIRE_POSTGRES
is set (CI sets it): then they fail, so a CI run can never pass with them skipped.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import uuid
from collections.abc import Iterator

import pytest

PG_URL = os.environ.get("INTAKE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("INTAKE_REQUIRE_POSTGRES", "") not in ("", "0", "false", "no")

_pg_problem: str | None = None
_pg_checked = False


def postgres_problem() -> str | None:
    """None when PostgreSQL is reachable, else why not (checked once per run)."""
    global _pg_checked, _pg_problem
    if not _pg_checked:
        _pg_checked = True
        try:
            import psycopg

            dsn = PG_URL.replace("postgresql+psycopg://", "postgresql://")
            with psycopg.connect(dsn, connect_timeout=3) as conn:
                conn.execute("select 1")
        except Exception as exc:  # any failure means: not usable here
            _pg_problem = f"PostgreSQL at {PG_URL} is not reachable ({type(exc).__name__}: {str(exc)[:120]})"
    return _pg_problem


def need_postgres() -> None:
    problem = postgres_problem()
    if problem:
        if REQUIRE_PG:
            pytest.fail(f"INTAKE_REQUIRE_POSTGRES is set but {problem}")
        pytest.skip(problem)


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards (skips, or
    fails in CI, without a server: see need_postgres)."""
    need_postgres()
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    dsn = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    with pg_schema() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    return f"sqlite:///{tmp_path}/intake.db"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Run the test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands out on its own (to outgoing connections, to bind(0))."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


_FLOOR = _ephemeral_floor()
_ports = random.Random()


def free_port() -> int:
    """A loopback TCP port that is free now, for a server a test starts a little later.

    Chosen below the kernel's ephemeral range where it can: a port from bind(0) is one the
    kernel also gives to outgoing connections, so one of the test's own clients (the relay
    sender, a load client) could take it before the server binds it, and the start failed
    with EADDRINUSE (seen once in CI). Ports 15000 up to that range are not handed out so.
    """
    if _FLOOR > 16000:
        for _ in range(200):
            port = _ports.randrange(15000, _FLOOR)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
