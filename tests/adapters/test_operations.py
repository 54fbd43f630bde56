"""What an operator runs into: the database gone or unreadable, a listener that does not start,
a terminal that hangs up. Each must end in a clear line (and, for mail, a 4xx), never a
traceback or a 250 for a message that is not stored."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapters.cli import main
from intake.errors import StorageUnavailableError
from storage.store import SqlStore
from tests.adapters.conftest import RelayStandIn
from tests.adapters.harness import mail, running_intake, settings_for
from tests.conftest import free_port
from tests.storage.test_store import store_message

INTAKE = [sys.executable, "-m", "adapters.cli"]


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def _config(tmp_path: Path, url: str, extra: str = "") -> Path:
    cfg = tmp_path / "intake.toml"
    cfg.write_text(f'[storage]\nurl = "{url}"\n[email]\nlisten_port = {free_port()}\n{extra}')
    return cfg


async def test_a_database_file_deleted_while_serving_answers_try_again_not_250(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    """`rm intake.db` (a cleanup script, a mistaken restore) while intake ran: every message
    after it was answered "250 stored as SUP-..." into the deleted file, and lost at the next
    stop, without a log line. It must be 451, so that the sender keeps it."""
    import aiosmtplib

    settings = settings_for(tmp_path, relay_port=smtp_relay.port)
    async with running_intake(settings) as h:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port, timeout=10)
        await client.connect()
        _, reply = await client.sendmail("alice@acme.com", ["support@example.com"], mail(subject="one").as_bytes())
        assert "stored as SUP-" in reply
        for name in ("intake.db", "intake.db-wal", "intake.db-shm"):
            (tmp_path / name).unlink(missing_ok=True)
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.sendmail("bob@acme.com", ["support@example.com"], mail(subject="two").as_bytes())
        assert refused.value.code == 451
        with pytest.raises(aiosmtplib.SMTPDataError) as again:  # still: no empty database made meanwhile
            await client.sendmail("bob@acme.com", ["support@example.com"], mail(subject="three").as_bytes())
        assert again.value.code == 451
        await client.quit()
    assert not (tmp_path / "intake.db").exists()


async def test_a_database_file_replaced_while_open_refuses_commits_until_restarted(tmp_path: Path) -> None:
    """A restore by `mv backup.db intake.db` while intake runs: what the store commits into the
    file it still has open is lost with it, so that group is told to try again; and the new
    file is not opened beside the old one's write-ahead log (its pages would be read as the
    new file's): commits are refused until a restart, with what to remove first."""
    db = tmp_path / "intake.db"
    store = SqlStore(f"sqlite:///{db}", create=True)
    other = SqlStore(f"sqlite:///{tmp_path}/restored.db", create=True)
    try:
        await store.transact(lambda uow: store_message(uow, "<before@x>"))
        await other.close()
        os.replace(tmp_path / "restored.db", db)
        with pytest.raises(StorageUnavailableError, match="deleted or replaced"):
            await store.transact(lambda uow: store_message(uow, "<lost@x>"))
        with pytest.raises(StorageUnavailableError, match="replaced while intake ran: stop intake, remove its -wal"):
            await store.transact(lambda uow: store_message(uow, "<refused@x>"))
    finally:
        await store.close()
    for stale in ("intake.db-wal", "intake.db-shm"):  # as the message says: SQLite leaves them behind
        (tmp_path / stale).unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM message").fetchone()[0] == 0  # the restored file, untouched
