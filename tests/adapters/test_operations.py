"""What an operator runs into: the database gone or unreadable, a listener that does not start,
a terminal that hangs up. Each must end in a clear line (and, for mail, a 4xx), never a
traceback or a 250 for a message that is not stored."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from adapters import bootstrap
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


def test_serve_on_a_file_that_is_not_a_database_says_so_without_a_traceback(tmp_path: Path) -> None:
    """A database file replaced by something else (a truncated copy, the wrong file restored):
    `serve` printed 120 lines of SQLAlchemy traceback; the read commands said it in one line."""
    db = tmp_path / "intake.db"
    db.write_bytes(b"this is not an SQLite database, just some text " * 100)
    cfg = _config(tmp_path, f"sqlite:///{db}")
    code, out = cli("--config", str(cfg), "serve")
    assert code == 2, out
    assert "Traceback" not in out
    assert f"cannot open the database sqlite:///{db}" in out and "file is not a database" in out


def test_serve_on_an_unreachable_postgresql_says_so_without_a_traceback(tmp_path: Path) -> None:
    cfg = _config(tmp_path, f"postgresql+psycopg://intake:secret@127.0.0.1:{free_port()}/intake")
    code, out = cli("--config", str(cfg), "serve")
    assert code == 2, out
    assert "Traceback" not in out and "secret" not in out
    assert "cannot open the database postgresql+psycopg://intake:***@127.0.0.1" in out


def test_serve_refuses_a_database_it_cannot_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database (or its directory) read-only for the service user: serve listened all the
    same and answered 451 to every message, "attempt to write a readonly database" in its log.
    (The tests run as root, for whom chmod changes nothing: os.access answers as for another user.)"""
    db = tmp_path / "intake.db"
    cfg = _config(tmp_path, f"sqlite:///{db}")
    assert cli("--config", str(cfg), "db", "upgrade")[0] == 0
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == db else real_access(p, mode))
    code, out = cli("--config", str(cfg), "serve")
    assert code == 2, out
    assert f"cannot write {db}: it or its directory is read-only for this user" in out


def test_db_upgrade_names_a_missing_directory(tmp_path: Path) -> None:
    """`serve` says `intake db upgrade` creates the database; in a directory that does not
    exist, `db upgrade` then said only SQLite's "unable to open database file"."""
    db = tmp_path / "nodir" / "intake.db"
    cfg = _config(tmp_path, f"sqlite:///{db}")
    code, out = cli("--config", str(cfg), "db", "upgrade")
    assert code == 2, out
    assert f"the directory {db.parent} does not exist" in out
    assert not db.parent.exists()  # said, not guessed: the operator chooses where it goes


def test_a_listener_process_that_does_not_start_is_named_not_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second listener process that died while starting (its interpreter not executable by
    the service user, say) ended `serve` with "cannot listen on 127.0.0.1:2525: None"."""
    cfg = _config(tmp_path, f"sqlite:///{tmp_path}/intake.db")
    assert cli("--config", str(cfg), "db", "upgrade")[0] == 0

    def run_loop(settings: Any, coro: Any) -> None:
        coro.close()
        raise OSError("email listener 2 did not start: it exited while starting")

    monkeypatch.setattr(bootstrap, "run_loop", run_loop)
    code, out = cli("--config", str(cfg), "serve")
    assert code == 2, out
    assert "None" not in out
    assert "email listener 2 did not start: it exited while starting" in out


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


@pytest.mark.parametrize("hangup", ["serving process", "process group"])
async def test_sighup_stops_cleanly_and_says_why(tmp_path: Path, smtp_relay: RelayStandIn, hangup: str) -> None:
    """SIGHUP (the terminal of `./scripts/run` closed, or a `kill -HUP` meant as "reload")
    killed the serving process on the spot: no log line, no 421 to sessions in flight, and the
    listener and outbox processes died under it or were left to notice it was gone."""
    port = free_port()
    cfg = tmp_path / "intake.toml"
    cfg.write_text(
        f'[storage]\nurl = "sqlite:///{tmp_path}/intake.db"\n[email]\nlisten_port = {port}\nlistener_processes = 2\n'
        f'[outbound]\nrelay_port = {smtp_relay.port}\ndispatcher = "process"\n'
    )
    await asyncio.to_thread(
        subprocess.run, [*INTAKE, "--config", str(cfg), "db", "upgrade"], check=True, capture_output=True, timeout=60
    )
    proc = await asyncio.create_subprocess_exec(
        *INTAKE, "--config", str(cfg), "serve",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert b"listening on" in line
        while b"email listener 2 started" not in await asyncio.wait_for(proc.stderr.readline(), 60):
            pass
        if hangup == "process group":
            os.killpg(proc.pid, signal.SIGHUP)
        else:
            proc.send_signal(signal.SIGHUP)
        out, err = await asyncio.wait_for(proc.communicate(), 40)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"SIGHUP" in err and b"shutting down" in err
    assert b"intake stopped" in out
    assert b"restarting it" not in err and b"Traceback" not in err
