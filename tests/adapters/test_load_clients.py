"""The benchmark's two load clients (bench/smtp_load.py and its C twin, smtp_load.c) against a
real aiosmtpd server: the same messages delivered once each, refusals counted alike.

bench_intake's figures are only as honest as its client: a message the client counts as
accepted must have been accepted, once, with the sender and bytes the Python client sends.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.adapters.conftest import RelayStandIn
from tests.conftest import free_port

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
try:
    import smtp_load
finally:
    sys.path.remove(str(BENCH))

needs_cc = pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc")), reason="the C load client needs a C compiler (cc or gcc)"
)


def _sent_by_python_client(count: int) -> dict[str, bytes]:
    """Sender -> message as the Python client builds it (the Message-ID's run id aside)."""
    return {sender: data for sender, data in smtp_load.build_messages(count, run_id="x")}


def _normal(content: bytes) -> bytes:
    """The message with what is made when the messages are built set aside: the run id in its
    Message-ID and the Date."""
    content = re.sub(rb"Message-ID: <[^.>]+\.", b"Message-ID: <x.", content, count=1)
    return re.sub(rb"Date: [^\r]*", b"Date: x", content, count=1)


@needs_cc
async def test_the_c_client_delivers_what_the_python_client_would(smtp_relay: RelayStandIn) -> None:
    res = await smtp_load.run_load_c(smtp_relay.host, smtp_relay.port, messages=60, sessions=7)

    assert (res.sent, res.ok, res.failed, res.codes) == (60, 60, 0, {"250": 60})
    assert 0 < res.p50 <= res.p99 <= res.max
    assert res.elapsed > 0 and res.rate == pytest.approx(60 / res.elapsed)
    assert res.cpu > 0
    captured = await smtp_relay.wait_for(60)
    expected = _sent_by_python_client(60)
    senders = Counter(m.mail_from for m in captured)
    assert senders == Counter(expected.keys()), "each message once, each from its own sender"
    for m in captured:
        assert m.rcpt_tos == ("support@example.com",)
        # The relay holds the content dot-unstuffed and without the final ".\r\n".
        assert _normal(m.content) + b".\r\n" == _normal(expected[m.mail_from])
    assert len({m.message["Message-ID"] for m in captured}) == 60


@needs_cc
async def test_the_two_clients_count_refusals_alike(smtp_relay: RelayStandIn) -> None:
    results = {}
    for name, run in (("python", smtp_load.run_load), ("c", smtp_load.run_load_c)):
        smtp_relay.fail_next("451 4.3.0 try again later", count=3, stage="DATA")
        smtp_relay.fail_next("550 5.1.1 no such user", count=2, stage="RCPT")
        smtp_relay.fail_next("421 4.3.2 closing", count=1, stage="MAIL")
        results[name] = await run(smtp_relay.host, smtp_relay.port, messages=20, sessions=3)

    for res in results.values():
        assert res.codes == {"250": 14, "451": 3, "RCPT:550": 2, "MAIL:421": 1}
        assert (res.sent, res.ok, res.failed) == (20, 14, 6)
    assert len(smtp_relay.messages) == 28  # only what got 250, from both clients


@needs_cc
async def test_the_c_client_shares_the_load_between_servers(
    smtp_relay_factory: Callable[..., RelayStandIn],
) -> None:
    first, second = smtp_relay_factory(), smtp_relay_factory()
    res = await smtp_load.run_load_c(first.host, first.port, messages=40, sessions=4, also_ports=[second.port])
    assert (res.ok, res.codes) == (40, {"250": 40})
    # Sessions 0 and 2 deliver to the first, 1 and 3 to the second; each session takes the
    # next message when it is done, so the split follows the servers' speed.
    for _ in range(100):
        if len(first.messages) + len(second.messages) >= 40:
            break
        await asyncio.sleep(0.02)
    one, two = [m.mail_from for m in first.messages], [m.mail_from for m in second.messages]
    assert one and two, "both servers got messages"
    assert sorted(one + two) == sorted(_sent_by_python_client(40)), "each message once, to one server"


@needs_cc
async def test_the_c_client_reports_a_server_that_is_not_there() -> None:
    port = free_port()
    res = await smtp_load.run_load_c("127.0.0.1", port, messages=5, sessions=2)
    assert (res.sent, res.ok, res.codes) == (5, 0, {"error:ConnectionRefusedError": 5})
    assert res.p99 == 0.0
