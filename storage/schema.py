"""Schema migrations (Alembic) for SQLite and PostgreSQL.

``upgrade`` creates or upgrades the schema (``intake db upgrade``); ``check`` tells whether a
database is at the code's head revision, so that ``intake serve`` refuses to run on a schema
that is behind, with the command to run.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from intake.errors import SchemaBehindError

MIGRATIONS = Path(__file__).with_name("migrations")


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head() -> str:
    rev = ScriptDirectory.from_config(_config()).get_current_head()
    assert rev is not None
    return rev


def current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Bring the schema to ``revision``; returns (before, after)."""
    before = current(engine)
    cfg = _config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return before, current(engine) or ""


def check(engine: Engine) -> None:
    """Raise SchemaBehindError unless the database is at the head revision."""
    have, want = current(engine), head()
    if have == want:
        return
    if have is None:
        raise SchemaBehindError("the database has no intake schema yet: run `intake db upgrade`")
    raise SchemaBehindError(
        f"the database schema is at revision {have}, this intake needs {want}: run `intake db upgrade`"
    )
