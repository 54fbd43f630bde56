"""`intake serve` as a user runs it: a real process, SIGTERM, the outbox in its own process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.adapters.conftest import RelayStandIn
from tests.adapters.harness import mail, wait_until
from tests.conftest import free_port

INTAKE = [sys.executable, "-m", "adapters.cli"]


def _sent(tmp_path: Path) -> int:
    """Outbox entries recorded as sent, read as another process would."""
    with contextlib.closing(sqlite3.connect(f"file:{tmp_path}/intake.db?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM outbox WHERE status = 'sent'").fetchone()[0])


def _config(tmp_path: Path, relay_port: int, port: int, extra: str = "") -> Path:
    cfg = tmp_path / "intake.toml"
    cfg.write_text(
        f'[storage]\nurl = "sqlite:///{tmp_path}/intake.db"\n'
        f"[email]\nlisten_port = {port}\n"
        f"[outbound]\nrelay_port = {relay_port}\n{extra}"
    )
    return cfg


@pytest.mark.parametrize(("dispatcher", "event_loop"), [("process", "uvloop"), ("inline", "asyncio")])
async def test_serve_takes_mail_acknowledges_and_stops_on_sigterm(
    tmp_path: Path, smtp_relay: RelayStandIn, dispatcher: str, event_loop: str
) -> None:
    import aiosmtplib

    port = free_port()
    extra = f'dispatcher = "{dispatcher}"\n[server]\nevent_loop = "{event_loop}"\n'
    cfg = _config(tmp_path, smtp_relay.port, port, extra)
    refused = await asyncio.to_thread(
        subprocess.run, [*INTAKE, "--config", str(cfg), "serve"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "intake db upgrade" in refused.stderr  # no database yet: refuse
    assert "no database at" in refused.stderr and not (tmp_path / "intake.db").exists()  # and make none
    await asyncio.to_thread(
        subprocess.run, [*INTAKE, "--config", str(cfg), "db", "upgrade"], check=True, capture_output=True, timeout=60
    )
    proc = await asyncio.create_subprocess_exec(
        *INTAKE, "--config", str(cfg), "serve",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"listening on 127.0.0.1:%d" % port in line
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
        await client.connect()
        _, reply = await client.sendmail("alice@acme.com", ["support@example.com"], mail().as_bytes())
        await client.quit()
        assert "stored as SUP-" in reply
        [ack] = await smtp_relay.wait_for(1, timeout=15)
        assert ack.rcpt_tos == ("alice@acme.com",)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"intake stopped" in out
    assert b"Traceback" not in err


async def test_a_killed_outbox_process_is_restarted_and_delivers_what_waited(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    """Killed (SIGKILL, no goodbye), the outbox process is started again within a second or so,
    and the acknowledgement committed while it was gone (its wake-up lost) goes out."""
    import aiosmtplib

    port = free_port()
    cfg = _config(tmp_path, smtp_relay.port, port, 'dispatcher = "process"\n')
    await asyncio.to_thread(
        subprocess.run, [*INTAKE, "--config", str(cfg), "db", "upgrade"], check=True, capture_output=True, timeout=60
    )
    proc = await asyncio.create_subprocess_exec(
        *INTAKE, "--config", str(cfg), "serve",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    seen: list[str] = []

    async def log_line(pattern: str) -> re.Match[str]:
        assert proc.stderr is not None
        while True:
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "intake exited:\n" + "".join(seen[-20:])
            seen.append(line)
            if found := re.search(pattern, line):
                return found

    async def send(n: int) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
        await client.connect()
        message = mail(sender=f"C{n} <c{n}@acme.com>", subject=f"Printer {n} on fire").as_bytes()
        _, reply = await client.sendmail(f"c{n}@acme.com", ["support@example.com"], message)
        await client.quit()
        assert "stored as SUP-" in reply

    try:
        first = int((await log_line(r"outbox dispatcher process started \(pid (\d+)\)"))[1])
        await asyncio.wait_for(proc.stdout.readline(), 30)  # listening
        await send(1)
        await smtp_relay.wait_for(1, timeout=15)
        # Killed once its send is recorded: one killed between the relay's 250 and that record
        # (0.1 s) would send it again as it restarts (README, "After a crash").
        await wait_until(lambda: _sent(tmp_path) == 1)
        os.kill(first, signal.SIGKILL)
        await send(2)  # committed while the outbox is gone: its wake-up finds no one
        await log_line(r"outbox dispatcher process exited .*; restarting it")
        second = int((await log_line(r"outbox dispatcher process started \(pid (\d+)\)"))[1])
        assert second != first
        acks = await smtp_relay.wait_for(2, timeout=15)
        assert sorted(a.rcpt_tos for a in acks) == [("c1@acme.com",), ("c2@acme.com",)]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, "".join(seen[-20:]) + err.decode()[-2000:]
    assert "Traceback" not in "".join(seen) + err.decode()


@pytest.mark.parametrize("dispatcher", ["process", "inline"])
async def test_notes_claimed_by_a_dispatcher_that_is_gone_go_at_start(
    tmp_path: Path, smtp_relay: RelayStandIn, dispatcher: str
) -> None:
    """An acknowledgement claimed by a dispatcher that was killed (its lease, two minutes, still
    running) goes as soon as intake starts again on the same host, not when the lease ends."""
    from datetime import UTC, datetime, timedelta

    from adapters.leases import owner_id
    from intake.model import Channel, OutgoingEmail, Severity
    from intake.ports import NewTicket, OutboxEntry
    from intake.reference import References
    from storage.store import SqlStore

    port = free_port()
    cfg = _config(tmp_path, smtp_relay.port, port, f'dispatcher = "{dispatcher}"\n')
    await asyncio.to_thread(
        subprocess.run, [*INTAKE, "--config", str(cfg), "db", "upgrade"], check=True, capture_output=True, timeout=60
    )
    dead = await asyncio.create_subprocess_exec("true")  # a process of this host that has ended
    await dead.wait()
    now = datetime.now(UTC)
    store = SqlStore(f"sqlite:///{tmp_path}/intake.db")
    try:
        ticket = NewTicket(
            reference=References().new(), subject="printer", channel=Channel.EMAIL, requester="alice@acme.com",
            requester_name="Alice", organisation=None, severity=Severity.S3, security=False, created_at=now,
            response_due=now + timedelta(hours=8),
        )  # fmt: skip
        tid = await store.transact(lambda uow: uow.create_ticket(ticket).id)
        note = OutgoingEmail(to=("alice@acme.com",), subject="s", body="b", message_id="m@intake", from_address="s@x")
        entry = OutboxEntry(ticket_id=tid, kind="acknowledgement", payload=note, created_at=now)
        await store.transact(lambda uow: uow.enqueue(entry))
        claimed = await store.transact(
            lambda uow: uow.claim_outbox(
                now=now, owner=owner_id(pid=dead.pid), lease_until=now + timedelta(minutes=2), limit=1
            )
        )
        assert len(claimed) == 1
    finally:
        await store.close()
    proc = await asyncio.create_subprocess_exec(
        *INTAKE, "--config", str(cfg), "serve",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        [ack] = await smtp_relay.wait_for(1, timeout=20)
        assert ack.rcpt_tos == ("alice@acme.com",)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert f"claimed by a dispatcher that is gone ({owner_id(pid=dead.pid)})" in err.decode()
