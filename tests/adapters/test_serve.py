"""`intake serve` as a user runs it: a real process, SIGTERM, the outbox in its own process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.adapters.conftest import RelayStandIn
from tests.adapters.harness import mail
from tests.conftest import free_port

INTAKE = [sys.executable, "-m", "adapters.cli"]


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
    assert refused.returncode == 2 and "intake db upgrade" in refused.stderr  # no schema yet: refuse
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
