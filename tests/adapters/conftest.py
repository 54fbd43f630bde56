"""Fixtures for adapter tests that talk to real servers on loopback.

``smtp_relay`` is a capturing stand-in for the outbound SMTP relay: a real aiosmtpd server
(in its own thread, as aiosmtpd's Controller runs it) that records every accepted message and
can be told to refuse, or be stopped and started again on the same port.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from typing import Any, Literal, cast

import pytest
from aiosmtpd.controller import Controller

from tests.adapters.fake_slack import FakeSlack
from tests.conftest import free_port

Stage = Literal["MAIL", "RCPT", "DATA"]


@dataclass(frozen=True, slots=True)
class CapturedMessage:
    """One message the relay accepted."""

    mail_from: str  # as aiosmtpd reports it: "<>" for the null reverse-path
    rcpt_tos: tuple[str, ...]
    content: bytes  # exactly as received after DATA (CRLF line endings, dot-unstuffed)
    tls: bool  # the session had upgraded to TLS
    message: EmailMessage  # content parsed with policy.default (encoded words decoded)


@dataclass(slots=True)
class _Failure:
    stage: Stage
    reply: str
    remaining: int


class RelayStandIn:
    """A real SMTP server on 127.0.0.1 that captures what it accepts.

    ``messages``: the accepted messages, in order. ``fail_next(reply, count=, stage=)``: answer
    ``reply`` at ``stage`` in the next ``count`` transactions (a transaction starts at MAIL; at
    RCPT every recipient of the transaction gets the reply). ``reject_recipient(address, reply)``:
    always refuse that one recipient. ``stop()`` / ``start()``: take the relay down and bring it
    back on the same port. ``await wait_for(n)``: the captured messages once there are exactly n.
    ``pipelining``: whether EHLO offers PIPELINING (RFC 2920), as Postfix and Exim do; aiosmtpd
    itself does not offer it, but reads pipelined commands in order as RFC 2920 asks.
    """

    def __init__(self, port: int, *, pipelining: bool = True, tls_context: ssl.SSLContext | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.pipelining = pipelining
        self.tls_context = tls_context  # set: STARTTLS offered and required before MAIL
        self.messages: list[CapturedMessage] = []
        self.transactions = 0  # MAIL commands seen, refused ones included
        self._lock = threading.Lock()
        self._failures: list[_Failure] = []
        self._rejected: dict[str, str] = {}
        self._controller: Controller | None = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> None:
        if self._controller is not None:
            raise RuntimeError("the relay stand-in is already running")
        controller = Controller(
            _Handler(self),
            hostname=self.host,
            port=self.port,
            server_hostname="relay.test",
            tls_context=self.tls_context,
            require_starttls=self.tls_context is not None,
        )
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def fail_next(self, reply: str, *, count: int = 1, stage: Stage = "DATA") -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            self._failures.append(_Failure(stage=stage, reply=reply, remaining=count))

    def clear_failures(self) -> None:
        """Forget the failures fail_next() asked for that have not happened yet."""
        with self._lock:
            self._failures.clear()

    def reject_recipient(self, address: str, reply: str = "550 5.1.1 no such user") -> None:
        with self._lock:
            self._rejected[address.lower()] = reply

    # A timeout parameter, not asyncio.timeout(): the failure must say what was captured.
    async def wait_for(self, count: int, timeout: float = 5.0) -> list[CapturedMessage]:  # noqa: ASYNC109
        """Wait until exactly ``count`` messages were captured; fail loudly on more or on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            captured = list(self.messages)
            if len(captured) > count:
                raise AssertionError(f"expected {count} messages, the relay captured {_summary(captured)}")
            if len(captured) == count:
                return captured
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected {count} messages within {timeout}s, the relay captured {_summary(captured)}"
                )
            await asyncio.sleep(0.01)

    # Called from the server thread by _Handler.
    def _begin_transaction(self) -> _Failure | None:
        with self._lock:
            self.transactions += 1
            if not self._failures:
                return None
            failure = self._failures[0]
            failure.remaining -= 1
            if failure.remaining == 0:
                self._failures.pop(0)
            return failure

    def _rejection(self, address: str) -> str | None:
        with self._lock:
            return self._rejected.get(address.lower())


def _summary(captured: list[CapturedMessage]) -> str:
    subjects = [str(m.message.get("Subject", "")) for m in captured]
    return f"{len(captured)}: {subjects!r}"


class _Handler:
    """aiosmtpd handler: hook names and signatures are aiosmtpd's."""

    def __init__(self, relay: RelayStandIn) -> None:
        self._relay = relay

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves it to a handler that has this hook
        if self._relay.pipelining:
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]) -> str:
        failure = self._relay._begin_transaction()
        if failure is not None and failure.stage == "MAIL":
            return failure.reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.stand_in_failure = failure
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]) -> str:
        failure = getattr(envelope, "stand_in_failure", None)
        if failure is not None and failure.stage == "RCPT":
            return cast(str, failure.reply)
        rejection = self._relay._rejection(address)
        if rejection is not None:
            return rejection
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        failure = getattr(envelope, "stand_in_failure", None)
        if failure is not None and failure.stage == "DATA":
            return cast(str, failure.reply)
        content = bytes(envelope.original_content or envelope.content)
        message = message_from_bytes(content, policy=email_policy.default)
        self._relay.messages.append(
            CapturedMessage(
                mail_from=envelope.mail_from,
                rcpt_tos=tuple(envelope.rcpt_tos),
                content=content,
                tls=session.ssl is not None,
                message=message,
            )
        )
        return "250 2.0.0 OK: queued"


@pytest.fixture
def smtp_relay_factory() -> Iterator[Callable[..., RelayStandIn]]:
    """Make running relay stand-ins on free loopback ports; all are stopped at teardown."""
    relays: list[RelayStandIn] = []

    def make(*, pipelining: bool = True, tls_context: ssl.SSLContext | None = None) -> RelayStandIn:
        # aiosmtpd's Controller cannot start on port 0 (NOTES.md): a free port is asked for first.
        relay = RelayStandIn(free_port(), pipelining=pipelining, tls_context=tls_context)
        relay.start()
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        relay.stop()


@pytest.fixture
def smtp_relay(smtp_relay_factory: Callable[..., RelayStandIn]) -> RelayStandIn:
    """One running relay stand-in that offers PIPELINING (see RelayStandIn)."""
    return smtp_relay_factory()


@pytest.fixture
def smtp_relay_without_pipelining(smtp_relay_factory: Callable[..., RelayStandIn]) -> RelayStandIn:
    """One running relay stand-in that does not offer PIPELINING: aiosmtplib's own transaction."""
    return smtp_relay_factory(pipelining=False)


@pytest.fixture
def silent_listener() -> Iterator[tuple[str, int]]:
    """A socket that accepts connections (kernel backlog) but never says a word: a hung relay."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield "127.0.0.1", int(listener.getsockname()[1])


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    """The fake Slack Web API (and Socket Mode endpoint) on loopback."""
    server = FakeSlack()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
