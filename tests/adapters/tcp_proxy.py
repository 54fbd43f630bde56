"""A TCP proxy on loopback that can "take the database down" and bring it back on the same port.

Put it in front of PostgreSQL and point intake's storage URL at it (:meth:`TcpProxy.url_for`).
:meth:`stop` closes the listening socket (new connections are refused at once) and resets every
live connection in both directions (``SO_LINGER`` 0, so the peers see ``ECONNRESET``, not an
orderly end of stream): to intake this looks like a PostgreSQL server that died; PostgreSQL sees
its clients vanish and rolls their transactions back. :meth:`start` listens again on the same
port.

The proxy runs its own event loop in a thread of its own. It must not share the loop of the
code under test: intake's command-line and test helpers talk to the database synchronously from
the loop thread (``SqlStore.run_sync``), which would wait forever on a proxy that needs that
same loop to forward their bytes.

    proxy = TcpProxy("127.0.0.1", 5432)
    proxy.start()
    url = proxy.url_for("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ...
    proxy.stop()    # "PostgreSQL is down"
    proxy.start()   # "PostgreSQL is back", same port
    proxy.close()   # at the end: stop and end the thread
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import make_url

_CHUNK = 65536


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port  # 0 until the first start() picks a free port; kept for restarts
        self.accepted = 0  # connections accepted over the proxy's life
        self.resets = 0  # connections reset by stop()
        # Round trips: the times a client waited for PostgreSQL to answer, counted as the Sync
        # and simple Query messages clients sent (each asks for a ReadyForQuery, which the client
        # waits for). Counted from the client's own bytes, not from who wrote last: a Flush the
        # client sends right after its Sync, without waiting, may reach the proxy after the
        # server's answer and would look like a turn of its own (CI saw 2.2 for 2.0 that way).
        self.round_trips = 0
        self.unreadable = 0  # connections whose messages could not be followed (TLS): not counted
        self._server: asyncio.Server | None = None
        self._live: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()

    # -- control, from any thread --------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def live(self) -> int:
        return len(self._live)

    def start(self) -> None:
        self._call(self._start())

    def stop(self, *, reset: bool = True) -> int:
        """Stop listening and drop every live connection (RST if ``reset``); returns how many."""
        return int(self._call(self._stop(reset)))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def url_for(self, url: str) -> str:
        """``url`` with host and port replaced by the proxy's (the rest, query included, kept)."""
        return make_url(url).set(host=self.host, port=self.port).render_as_string(hide_password=False)

    @classmethod
    def in_front_of(cls, url: str) -> TcpProxy:
        """A started proxy in front of the server a database URL names."""
        u = make_url(url)
        proxy = cls(u.host or "127.0.0.1", u.port or 5432)
        proxy.start()
        return proxy

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- on the proxy's loop -------------------------------------------------------------------

    async def _start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the proxy is already listening")
        # reuse_address: the port is free again at once after stop() (no TIME_WAIT on it).
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _stop(self, reset: bool) -> int:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # the listening socket: new connections are refused from now on
        dropped = list(self._live)
        for writer in dropped:
            _drop(writer, reset)
        self._live.clear()
        self.resets += len(dropped)
        if server is not None:
            # wait_closed() also waits for the connection handlers, which end as their sockets die.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        return len(dropped) // 2

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            _drop(client_w, True)
            return
        if self._server is None:  # stopped while we were connecting upstream
            _drop(client_w, True)
            _drop(up_w, True)
            return
        self.accepted += 1
        self._live.update((client_w, up_w))
        frontend = _FrontendMessages()

        def client_sent(data: bytes) -> None:
            was_lost = frontend.lost
            self.round_trips += frontend.waits_in(data)
            self.unreadable += frontend.lost and not was_lost

        try:
            await asyncio.gather(_pipe(client_r, up_w, client_sent), _pipe(up_r, client_w, lambda _: None))
        finally:
            for w in (client_w, up_w):
                if w in self._live:
                    self._live.discard(w)
                    _drop(w, False)


class _FrontendMessages:
    """The client's side of PostgreSQL's wire protocol, message by message, across reads.

    A connection opens with untyped messages (length, then a request code): SSLRequest or
    GSSENCRequest, answered with one byte, then the StartupMessage; a CancelRequest is alone
    on its connection. After the StartupMessage every message is a type byte and a length
    that counts itself. Only the framing is read; the payloads are skipped. Bytes that do not
    frame (TLS after an accepted SSLRequest) make the connection ``lost``: nothing more counted.
    """

    _REQUESTS = (80877103, 80877104)  # SSLRequest, GSSENCRequest: more untyped messages follow
    _PROTOCOL_3 = 196608  # StartupMessage

    def __init__(self) -> None:
        self._buf = b""
        self._typed = False
        self.lost = False  # a cancel request, or bytes that do not frame: nothing more to read

    def waits_in(self, data: bytes) -> int:
        """How many Sync ('S') and Query ('Q') messages ``data`` completes."""
        if self.lost:
            return 0
        self._buf += data
        waits = 0
        while True:
            if not self._typed:
                if len(self._buf) < 8:
                    return waits
                length, code = struct.unpack("!ii", self._buf[:8])
                if not 8 <= length <= 10_000:
                    self.lost = True
                    return waits
                if len(self._buf) < length:
                    return waits
                self._buf = self._buf[length:]
                if code == self._PROTOCOL_3:
                    self._typed = True
                elif code not in self._REQUESTS:
                    self.lost = True
                    return waits
                continue
            if len(self._buf) < 5:
                return waits
            kind = self._buf[:1]
            (length,) = struct.unpack("!i", self._buf[1:5])
            if length < 4:
                self.lost = True
                return waits
            if len(self._buf) < 1 + length:
                return waits
            self._buf = self._buf[1 + length :]
            waits += kind in (b"S", b"Q")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Callable[[bytes], None]) -> None:
    try:
        while data := await reader.read(_CHUNK):
            seen(data)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        pass  # the other side, or stop(), ended it


def _drop(writer: asyncio.StreamWriter, reset: bool) -> None:
    transport = writer.transport
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                # Linger on, timeout 0: close() sends RST instead of FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()
