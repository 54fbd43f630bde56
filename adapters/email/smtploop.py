"""aiosmtpd's command loop, replies and silence timer, with less work per command.

aiosmtpd (1.4.6) does some work on every command that a busy listener pays for and that
changes nothing it sends:

* **log calls**: its loop formats two log records per command line through
  ``sanitized_log`` (a list comprehension and a pattern match over the line) whether or not
  the ``mail.log`` logger will emit them. Here they run only when that logger is enabled for
  their level, with the same texts.
* **replies**: each ``push`` goes through the ``StreamWriter`` and awaits ``drain()``, which
  has nothing to wait for while the transport is open and not paused. Here the reply is
  written to the transport directly then; when the transport is closing, paused (a client
  that does not read its replies) or failed, aiosmtpd's own ``push`` runs, so its flow
  control and its ``ConnectionResetError`` are unchanged.
* **pipelined replies** (RFC 2920, which the listener offers): when a client sends MAIL,
  RCPT and DATA at once, aiosmtpd answers each in a write (a system call and a segment) of
  its own. Here the replies to MAIL, RCPT and RSET are held while the next command line is
  already in the buffer, and go out with the next reply; nothing is held while the loop
  would wait for input. The bytes sent are the same, in fewer writes.
* **the silence timer**: ``_reset_timeout`` cancels a timer and makes a new one on every
  command (and, in the listener, on every chunk of DATA). Here one timer is kept and the
  deadline moved; when it fires before the deadline it is set again for the rest. It is
  remade only when a deadline comes earlier than the timer.

One thing more, only when asked: :meth:`LeanLoop.renew_command_budget` gives the session its
whole ``command_call_limit`` budget again (aiosmtpd keeps it in a local of its loop, per
session). The listener calls it after each message it took in: an MTA that keeps its
connection for the next message sends RSET before each one (Postfix, checking a cached
connection), and with a budget per session the 21st RSET, or the 201st MAIL, was answered
``421`` (Postfix's own server resets its junk-command count once mail is delivered, too).

``bench/bench_smtp_loop.py`` measures what it saves: the server's CPU for whole sessions
over loopback, with and without this mixin. ``tests/adapters/test_smtploop.py`` holds the
loop to aiosmtpd's: the same command sequences sent to a plain aiosmtpd server and to one
with this mixin must get the same replies, byte for byte.

A server with a PROXY protocol header to read (``proxy_protocol_timeout``) or with STARTTLS
(``tls_context``; intake's listener has neither) runs aiosmtpd's own loop.

**Only for the aiosmtpd it was checked against.** The loop is aiosmtpd's, copied; a later
aiosmtpd may change it (a security fix, say). So the mixin is active only while the source
of the aiosmtpd methods it stands in for is the source it was reviewed against
(:data:`REVIEWED`, a hash); otherwise every method here defers to aiosmtpd's own, and a
test fails so that whoever upgrades aiosmtpd reviews the copy and the hash.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import inspect
import logging
from typing import Any

from aiosmtpd.smtp import (
    ALLOWED_BEFORE_STARTTLS,
    BOGUS_LIMIT,
    SMTP,
    sanitized_log,
)

log = logging.getLogger("mail.log")  # aiosmtpd's own logger: these are its messages

_DEBUG = logging.DEBUG
_INFO = logging.INFO

# Commands whose replies may be held and sent with the next one (RFC 2920 3.2: never EHLO,
# DATA, VRFY, EXPN, TURN, QUIT, NOOP, nor an unknown command).
_GROUPABLE = frozenset({"MAIL", "RCPT", "RSET"})

# aiosmtpd's methods that LeanLoop stands in for or relies on, and the SHA-256 of their source
# in the aiosmtpd reviewed (1.4.6).
STOOD_IN_FOR = ("_handle_client", "push", "_reset_timeout", "_timeout_cb", "connection_made", "connection_lost")
REVIEWED = "b8d7467ad41c027e90be6c54612d8a354a281e263550c2062579d469854463fb"


def source_hash() -> str | None:
    """The hash of the installed aiosmtpd's :data:`STOOD_IN_FOR` methods (None: no source)."""
    try:
        source = "".join(inspect.getsource(getattr(SMTP, name)) for name in STOOD_IN_FOR)
    except (OSError, TypeError):
        return None
    return hashlib.sha256(source.encode()).hexdigest()


@functools.cache
def active() -> bool:
    """Whether the installed aiosmtpd is the one LeanLoop was reviewed against."""
    found = source_hash()
    if found != REVIEWED:
        log.warning("aiosmtpd's command loop is not the one LeanLoop was checked against: using aiosmtpd's own")
    return found == REVIEWED


class LeanLoop:
    """Mixed in before aiosmtpd's ``SMTP`` (or ``LMTP``): see the module's docstring."""

    # Attributes of aiosmtpd's SMTP used here (for the type checker).
    session: Any
    transport: Any
    loop: asyncio.AbstractEventLoop
    hostname: str
    enable_SMTPUTF8: bool
    command_size_limit: int
    command_size_limits: dict[str, int]
    require_starttls: Any
    tls_context: Any
    _reader: asyncio.StreamReader
    _writer: asyncio.StreamWriter
    _proxy_timeout: float | None
    _tls_handshake_okay: bool
    _tls_protocol: Any
    _enforce_call_limit: bool
    _call_limit_default: int
    _call_limit_base: dict[str, int]
    _smtp_methods: dict[str, Any]
    _timeout_duration: float
    _timeout_handle: asyncio.TimerHandle | None
    _paused: bool
    __ident__: str
    _silence_deadline: float = 0.0
    _call_budget: Any = None  # what is left of each command's call limit (this loop's only)
    _silence_timer_at: float | None = None  # when the live timer fires; None: none is set
    _groupable: bool = False  # the command being answered may have its reply held (PIPELINING)
    _held: list[bytes] | None = None  # replies held to go out with the next one

    def flush_held(self) -> None:
        """Write the replies held back for grouping now (before anything else is written)."""
        held = self._held
        if held:
            self._held = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"".join(held))

    async def push(self, status: Any) -> None:
        transport = self.transport
        if (
            transport is None
            or transport.is_closing()
            or self._paused
            or self._reader.exception() is not None
            or not active()
        ):
            self.flush_held()
            await super().push(status)  # type: ignore[misc]
            return
        if isinstance(status, str):
            response = bytes(status, "utf-8" if self.enable_SMTPUTF8 else "ascii")
        else:
            response = status
        if log.isEnabledFor(_DEBUG):
            log.debug("%r << %r", self.session.peer, response)
        if self._groupable and b"\n" in self._reader._buffer:  # type: ignore[attr-defined]
            # RFC 2920 3.2: the replies to a group of MAIL, RCPT and RSET commands the client
            # sent at once go out together. The next command is already here (a whole line),
            # so the loop reads it without waiting, and its reply carries this one.
            if self._held is None:
                self._held = []
            self._held.append(response + b"\r\n")
            return
        if self._held:
            held, self._held = self._held, None
            transport.write(b"".join([*held, response, b"\r\n"]))
        else:
            transport.write(response + b"\r\n")

    def renew_command_budget(self) -> None:
        """Every command's call limit in full again, from now on (see the module's docstring);
        nothing under aiosmtpd's own loop, whose budget is out of reach."""
        budget = self._call_budget
        if budget is not None and self._enforce_call_limit:
            budget.clear()
            budget.update(self._call_limit_base)

    def _reset_timeout(self, duration: float | None = None) -> None:
        if not active():
            super()._reset_timeout(duration)  # type: ignore[misc]
            return
        loop = self.loop
        deadline = loop.time() + (duration or self._timeout_duration)
        self._silence_deadline = deadline
        at = self._silence_timer_at
        if at is not None and at <= deadline:
            return  # the timer fires first and sets itself again for the rest
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._silence_timer_at = deadline
        self._timeout_handle = loop.call_at(deadline, self._silence_check)

    def _silence_check(self) -> None:
        self._silence_timer_at = None
        deadline = self._silence_deadline
        if deadline > self.loop.time():
            self._silence_timer_at = deadline
            self._timeout_handle = self.loop.call_at(deadline, self._silence_check)
            return
        self._timeout_cb()  # type: ignore[attr-defined]

    async def _handle_client(self) -> None:
        """aiosmtpd's ``SMTP._handle_client`` (1.4.6), step for step, minus unused log work."""
        if self._proxy_timeout is not None or self.tls_context or not active():
            await super()._handle_client()  # type: ignore[misc]
            return
        assert self.session is not None
        if log.isEnabledFor(_INFO):
            log.info("%r handling connection", self.session.peer)
        await self.push(f"220 {self.hostname} {self.__ident__}")
        call_limit: Any
        if self._enforce_call_limit:
            call_limit = collections.defaultdict(lambda: self._call_limit_default, self._call_limit_base)
        else:
            call_limit = {}
        self._call_budget = call_limit
        bogus_budget = BOGUS_LIMIT
        reader = self._reader
        while self.transport is not None:  # pragma: no branch
            try:
                if self._held and b"\n" not in reader._buffer:  # type: ignore[attr-defined]
                    self.flush_held()  # never wait for input with replies unsent (RFC 2920 3.2)
                try:
                    line: bytes = await reader.readuntil()
                except asyncio.LimitOverrunError as error:
                    # Line too long. Read until end of line before sending 500.
                    await reader.read(error.consumed)
                    while True:
                        try:
                            await reader.readuntil()
                            break
                        except asyncio.LimitOverrunError as e:
                            await reader.read(e.consumed)
                    await self.push("500 Command line too long")
                    continue
                if log.isEnabledFor(_DEBUG):
                    sanitized_log(log.debug, "_handle_client readline: %r", line)
                line = line.rstrip(b"\r\n")
                if log.isEnabledFor(_INFO):
                    sanitized_log(log.info, "%r >> %r", self.session.peer, line)
                if not line:
                    await self.push("500 Error: bad syntax")
                    continue
                command_bytes, _, arg_bytes = line.partition(b" ")
                try:
                    command = command_bytes.upper().decode(encoding="ascii")
                except UnicodeDecodeError:
                    await self.push("500 Error: bad syntax")
                    continue
                arg: str | None
                if not arg_bytes:
                    arg = None
                else:
                    arg_bytes = arg_bytes.strip()
                    if self.enable_SMTPUTF8:
                        arg = str(arg_bytes, encoding="utf-8", errors="surrogateescape")
                    else:
                        try:
                            arg = str(arg_bytes, encoding="ascii", errors="strict")
                        except UnicodeDecodeError:
                            await self.push("500 Error: strict ASCII mode")
                            continue
                max_sz = self.command_size_limits[command] if self.session.extended_smtp else self.command_size_limit
                if len(line) > max_sz:
                    await self.push("500 Command line too long")
                    continue
                if not self._tls_handshake_okay and command != "QUIT":
                    await self.push("554 Command refused due to lack of security")
                    continue
                if self.require_starttls and not self._tls_protocol and command not in ALLOWED_BEFORE_STARTTLS:
                    await self.push("530 Must issue a STARTTLS command first")
                    continue
                if self._enforce_call_limit:
                    budget = call_limit[command]
                    if budget < 1:
                        log.warning("%r over limit for %s", self.session.peer, command)
                        await self.push(f"421 4.7.0 {command} sent too many times")
                        self.transport.close()
                        continue
                    call_limit[command] = budget - 1
                method = self._smtp_methods.get(command)
                if method is None:
                    log.warning("%r unrecognised: %s", self.session.peer, command)
                    bogus_budget -= 1
                    if bogus_budget < 1:
                        log.warning("%r too many bogus commands", self.session.peer)
                        await self.push("502 5.5.1 Too many unrecognized commands, goodbye.")
                        self.transport.close()
                        continue
                    await self.push(f'500 Error: command "{command}" not recognized')
                    continue
                self._reset_timeout()
                self._groupable = command in _GROUPABLE
                try:
                    await method(arg)
                finally:
                    self._groupable = False
            except asyncio.CancelledError:
                # The connection got reset during the DATA command (or QUIT ended the session).
                if log.isEnabledFor(_INFO):
                    log.info("%r Connection lost during _handle_client()", self.session.peer)
                self._writer.close()
                raise
            except ConnectionResetError:
                if log.isEnabledFor(_INFO):
                    log.info("%r Connection lost during _handle_client()", self.session.peer)
                self._writer.close()
                raise
            except Exception as error:
                status = None
                try:
                    status = await self.handle_exception(error)  # type: ignore[attr-defined]
                except Exception as inner_error:
                    try:
                        log.exception("%r Exception in handle_exception()", self.session.peer)
                        status = f"500 Error: ({inner_error.__class__.__name__}) {inner_error}"
                    except Exception:
                        status = "500 Error: Cannot describe error"
                finally:
                    await self.push(status)
