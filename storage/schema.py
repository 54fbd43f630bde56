"""Schema migrations (Alembic) for SQLite and PostgreSQL.

``upgrade`` creates or upgrades the schema (``intake db upgrade``); ``check`` tells whether a
database is at the code's head revision, so that ``intake serve`` refuses to run on a schema
that is behind, with the command to run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

from intake.errors import SchemaBehindError

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")

# The newest migration's revision. ``check`` (run by `intake serve` and every read command)
# compares the database with it without loading Alembic, a fifth of `intake tickets list`'s
# start-up; tests/storage/test_store.py holds it to Alembic's own head, so a new migration
# that is not named here fails the tests.
HEAD = "0004"
_VERSION_TABLE = "alembic_version"  # Alembic's default


def _config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head() -> str:
    """The head revision as Alembic finds it in the migration scripts."""
    from alembic.script import ScriptDirectory

    rev = ScriptDirectory.from_config(_config()).get_current_head()
    assert rev is not None
    return rev


def current(engine: Engine) -> str | None:
    """The database's revision (None: no intake schema), read as Alembic stores it."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(_VERSION_TABLE):
            return None
        versions = [row[0] for row in conn.execute(text(f"SELECT version_num FROM {_VERSION_TABLE}"))]
    if len(versions) > 1:
        raise SchemaBehindError(f"the database has several schema heads ({', '.join(sorted(versions))})")
    return versions[0] if versions else None


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Bring the schema to ``revision``; returns (before, after)."""
    from alembic import command

    before = current(engine)
    cfg = _config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return before, current(engine) or ""


def check(engine: Engine) -> None:
    """Raise SchemaBehindError unless the database is at the head revision."""
    have, want = current(engine), HEAD
    if have == want:
        return
    if have is None:
        raise SchemaBehindError("the database has no intake schema yet: run `intake db upgrade`")
    raise SchemaBehindError(
        f"the database schema is at revision {have}, this intake needs {want}: run `intake db upgrade`"
    )
