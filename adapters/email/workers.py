"""Parsing and assessing messages in worker processes, beside the listener's event loop.

mail-parser and the pure assessment (keyword rules, hygiene, language, the report checklist)
cost about as much CPU as aiosmtpd's whole SMTP session. In the listener's process they take
turns with it for one GIL; in worker processes they run on the machine's other core. What
travels is the raw bytes one way and the parsed message with its assessment the other (both
plain picklable values); the decision itself still happens in the core's service, in the
parent, inside the unit of work.

A worker that dies is replaced, and the message in hand is parsed in the parent instead: a
crash of a worker never costs a message or an SMTP session.

What comes back is packed (:func:`_pack`, :func:`_unpack`) into tuples of plain values rather
than pickled as objects: pickle spends most of its time per object, not per byte (each
dataclass goes through ``copyreg`` and a Python ``__setstate__``, each class and enum is looked
up by name), and the parent, whose event loop is the bottleneck, pays for the unpickling. The
raw bytes are not sent back when the parent's copy is still the message's (no attachment cut
out), nor ``new_text`` when it is the whole body. Unpacking rebuilds equal values through the
classes' own constructors.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.process
import pickle
import signal
import socket
import struct
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from adapters import cpus
from adapters.email.parsing import parse_email
from adapters.heap import settle_heap
from adapters.settings import Settings
from intake.hygiene import Automation, AutomationKind
from intake.model import Attachment, Channel, InboundMessage, RuleHit, Severity, Verdict
from intake.policy import Plan
from intake.service import Assessment, IntakeService

log = logging.getLogger("intake.smtp")

_ASSESSOR: IntakeService | None = None


def _init_worker(settings: Settings) -> None:
    """Each worker builds its own rules, detector and policy from the same settings."""
    global _ASSESSOR
    from adapters.bootstrap import build_service

    logging.getLogger("mailparser").setLevel(logging.CRITICAL)
    _ASSESSOR = build_service(settings, store=None)


def _parse_and_assess(raw: bytes, kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    assert _ASSESSOR is not None
    message = parse_email(raw, **kwargs)
    return _pack(message, _ASSESSOR.assess(message), raw)


# --------------------------------------------------------------------------------------------
# What crosses the process boundary
# --------------------------------------------------------------------------------------------

_SAME = None  # in a packed message: "the parent has this already" (raw) / "same as body" (new_text)


def _pack_datetime(value: datetime | None) -> datetime | str | None:
    """An ISO string when it reads back identical (fixed-offset zones, as parsing and the system
    clock make them); otherwise the datetime itself, pickled as such."""
    if value is None or type(value.tzinfo) is not timezone or value.fold:
        return value
    text = value.isoformat()
    back = datetime.fromisoformat(text)
    if back.utcoffset() != value.utcoffset() or back.tzname() != value.tzname() or back != value:
        return value
    return text


def _unpack_datetime(value: datetime | str | None) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _pack_hit(hit: RuleHit) -> tuple[Any, ...]:
    return (hit.rule, hit.phrase, hit.field, hit.excerpt, hit.negated, int(hit.severity), hit.tags)


def _unpack_hit(t: tuple[Any, ...]) -> RuleHit:
    rule, phrase, field, excerpt, negated, severity, tags = t
    return RuleHit(rule, phrase, field, excerpt, negated, Severity(severity), tags)


def _pack_verdict(v: Verdict) -> tuple[Any, ...]:
    severity = None if v.severity is None else int(v.severity)
    return (severity, v.security, tuple(_pack_hit(h) for h in v.hits))


def _unpack_verdict(t: tuple[Any, ...]) -> Verdict:
    severity, security, hits = t
    return Verdict(None if severity is None else Severity(severity), security, tuple(_unpack_hit(h) for h in hits))


def _pack_automation(a: Automation | None) -> tuple[str, str] | None:
    return None if a is None else (a.kind.value, a.reason)


def _unpack_automation(t: tuple[str, str] | None) -> Automation | None:
    return None if t is None else Automation(AutomationKind(t[0]), t[1])


def _pack_plan(p: Plan) -> tuple[str, tuple[str, ...], bool]:
    return (p.name, tuple(p.channels), p.business_hours)


def _unpack_plan(t: tuple[str, tuple[str, ...], bool]) -> Plan:
    return Plan(t[0], frozenset(t[1]), t[2])


_CHANNELS = {c.value: c for c in Channel}
_MESSAGE_FIELDS = tuple(f.name for f in dataclasses.fields(InboundMessage))
_ASSESSMENT_FIELDS = tuple(f.name for f in dataclasses.fields(Assessment))
# Field -> (pack, unpack); the other fields are plain values (str, tuples of str, ...) or are
# pickled as they are.
_MESSAGE_CODECS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "channel": (lambda c: c.value, _CHANNELS.__getitem__),
    "attachments": (
        lambda atts: tuple((a.filename, a.content_type, a.size, a.kept) for a in atts),
        lambda ts: tuple(Attachment(*t) for t in ts),
    ),
    "date": (_pack_datetime, _unpack_datetime),
    "headers": (dict, lambda d: d),  # frozen again by InboundMessage itself
}
_ASSESSMENT_CODECS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "verdict": (_pack_verdict, _unpack_verdict),
    "automation": (_pack_automation, _unpack_automation),
    "received_at": (_pack_datetime, _unpack_datetime),
    "plan": (_pack_plan, _unpack_plan),
}


def _pack(message: InboundMessage, assessment: Assessment, raw: bytes) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The message and its assessment as tuples of plain values (see the module docstring);
    ``raw`` is what the parent sent, so it need not come back when the message still holds it."""
    values: list[Any] = []
    for name in _MESSAGE_FIELDS:
        value = getattr(message, name)
        codec = _MESSAGE_CODECS.get(name)
        if codec is not None:
            value = codec[0](value)
        elif name == "raw" and value is raw:
            value = _SAME
        elif name == "new_text" and value == message.body:
            value = _SAME
        values.append(value)
    packed: list[Any] = []
    for name in _ASSESSMENT_FIELDS:
        value = getattr(assessment, name)
        codec = _ASSESSMENT_CODECS.get(name)
        packed.append(codec[0](value) if codec is not None else value)
    return tuple(values), tuple(packed)


def _unpack(packed: tuple[tuple[Any, ...], tuple[Any, ...]], raw: bytes) -> tuple[InboundMessage, Assessment]:
    """What :func:`_pack` made of a message and its assessment, rebuilt in the parent."""
    message_values, assessment_values = packed
    fields = dict(zip(_MESSAGE_FIELDS, message_values, strict=True))
    for name, (_, unpack) in _MESSAGE_CODECS.items():
        fields[name] = unpack(fields[name])
    if fields["raw"] is _SAME:
        fields["raw"] = raw
    if fields["new_text"] is _SAME:
        fields["new_text"] = fields["body"]
    assessment = dict(zip(_ASSESSMENT_FIELDS, assessment_values, strict=True))
    for name, (_, unpack) in _ASSESSMENT_CODECS.items():
        assessment[name] = unpack(assessment[name])
    return InboundMessage(**fields), Assessment(**assessment)


class _Worker:
    """One worker process and the parent's end of its socket.

    Requests are written as they come (under ``sending``, so that two never interleave) and the
    worker answers them in order: the reader task resolves ``pending`` first in, first out.
    """

    def __init__(self, proc: multiprocessing.process.BaseProcess, sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.sending: asyncio.Lock | None = None
        self.reader: asyncio.Task[None] | None = None
        self.broken = False

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


class ParsePool:
    """Worker processes that parse and assess, driven from the listener's event loop.

    Each worker has a socket pair with the parent; a request is the raw bytes and the parsing
    options, the answer the packed message and assessment, each one length-prefixed pickle.
    The parent writes and reads them with the loop's own socket calls: no thread stands
    between the loop and a worker (concurrent.futures' process pool hands every item through
    two threads of the parent, each hand-off a wait for the GIL the loop holds). Requests are
    sent at once, so a worker always has the next one queued; a message goes to the worker
    with the fewest requests in hand.
    """

    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self._ctx = multiprocessing.get_context("spawn")
        self._pool: list[_Worker] = []
        self._replacing: set[asyncio.Task[None]] = set()
        self._closed = False
        self._closing = threading.Lock()  # close() against a replacement finished in its thread

    def start(self) -> None:
        """Start the workers and wait until each is ready (imports, rules, language models)."""
        self._closed = False
        self._pool = [self._spawn_ready() for _ in range(self.workers)]

    def _spawn(self) -> _Worker:
        parent, child = socket.socketpair()
        proc = self._ctx.Process(target=_worker_main, args=(child, self.settings), name="intake-parse", daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _spawn_ready(self) -> _Worker:
        worker = self._spawn()
        try:
            worker.sock.settimeout(120)
            if _read_frame_blocking(worker.sock) != _READY:
                raise RuntimeError("a parsing worker did not start")
            worker.sock.setblocking(False)
        except BaseException:
            worker.close()
            raise
        return worker

    async def parse(self, raw: bytes, **kwargs: Any) -> tuple[InboundMessage, Assessment] | None:
        """The parsed message and its assessment, or None when the pool cannot serve (then the
        caller parses in its own process)."""
        live = [w for w in self._pool if not w.broken]
        if self._closed or not live:
            return None  # closed, or every worker is being replaced
        worker = min(live, key=lambda w: len(w.pending))
        loop = asyncio.get_running_loop()
        if worker.reader is None:
            worker.sending = asyncio.Lock()
            worker.reader = loop.create_task(self._read_answers(worker), name="intake-parse-reader")
        answer: asyncio.Future[Any] = loop.create_future()
        request = pickle.dumps((raw, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        worker.pending.append(answer)
        # Sent whole even if the caller is cancelled meanwhile (the client hung up): half a
        # request would put the stream out of step. Its answer is read and dropped.
        send = asyncio.ensure_future(self._send(worker, _HEADER.pack(len(request)) + request))
        try:
            await asyncio.shield(send)
            packed = await answer
        except (OSError, EOFError, pickle.PickleError, _WorkerFailed) as exc:
            log.error("a parsing worker failed (%s); parsing this message in the listener's process", exc)
            return None
        finally:
            # Left before the answer came (the send failed, the caller gave up): the reader
            # drops a cancelled answer when it comes, and a failure set on it meanwhile is
            # taken here, not reported later as "never retrieved".
            if not answer.done():
                answer.cancel()
            elif not answer.cancelled():
                answer.exception()
        return _unpack(packed, raw)

    async def _send(self, worker: _Worker, data: bytes) -> None:
        assert worker.sending is not None
        async with worker.sending:
            try:
                await asyncio.get_running_loop().sock_sendall(worker.sock, data)
            except OSError as exc:
                self._broken(worker, exc)
                raise

    async def _read_answers(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                (size,) = _HEADER.unpack(await _read_exact(loop, worker.sock, _HEADER.size))
                status, value = pickle.loads(await _read_exact(loop, worker.sock, size))
                answer = worker.pending.popleft()
                if answer.done():
                    continue  # its caller gave up
                if status == "ok":
                    answer.set_result(value)
                else:
                    answer.set_exception(_WorkerFailed(value))
        except (OSError, EOFError, pickle.PickleError, IndexError) as exc:
            self._broken(worker, exc)

    def _broken(self, worker: _Worker, exc: BaseException) -> None:
        """A worker died or its stream broke: fail what it had in hand, start another."""
        if worker.broken:
            return
        worker.broken = True
        while worker.pending:
            answer = worker.pending.popleft()
            if not answer.done():
                answer.set_exception(EOFError(f"the parsing worker is gone ({exc})"))
        if worker.reader is not None and worker.reader is not asyncio.current_task():
            worker.reader.cancel()
        if worker in self._pool:
            self._pool.remove(worker)
        loop = asyncio.get_running_loop()
        loop.run_in_executor(None, worker.close)
        if not self._closed:
            log.error("a parsing worker is gone (%s); starting a new one", exc)
            task = loop.create_task(self._replace())
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def _replace(self) -> None:
        """Start a worker in place of a broken one (off the loop: it takes seconds to load)."""
        try:
            await asyncio.to_thread(self._spawn_replacement)
        except Exception:
            log.exception("a parsing worker could not be restarted; parsing in the listener's process")

    def _spawn_replacement(self) -> None:
        # The thread itself joins the new worker to the pool, or stops it if the pool was
        # closed meanwhile: a task awaiting it may be cancelled at shutdown (asyncio.run
        # cancels what is left), and the worker's process and socket would be nobody's.
        fresh = self._spawn_ready()
        with self._closing:
            if not self._closed:
                self._pool.append(fresh)
                return
        fresh.close()

    def close(self) -> None:
        with self._closing:
            self._closed = True
            pool, self._pool = self._pool, []
        for worker in pool:
            with contextlib.suppress(OSError):
                worker.sock.setblocking(True)
                worker.sock.sendall(_HEADER.pack(0))  # a request of 0 bytes: stop
            worker.close()


class _WorkerFailed(Exception):
    """The worker answered with an error instead of a parsed message."""


_HEADER = struct.Struct("!I")
_READY = b"ready"


async def _read_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            raise EOFError("the parsing worker closed its socket")
        got += n
    return bytes(buf)


def _read_frame_blocking(sock: socket.socket) -> bytes:
    def exact(size: int) -> bytes:
        chunks, got = [], 0
        while got < size:
            chunk = sock.recv(size - got)
            if not chunk:
                raise EOFError("the parsing worker closed its socket")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    (size,) = _HEADER.unpack(exact(_HEADER.size))
    return exact(size)


def _worker_main(sock: socket.socket, settings: Settings) -> None:
    """A worker: set up, say ready, then answer requests until a request of 0 bytes or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and a hang-up are the parent's to handle
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cpus.unpin()  # (email.pin_listeners) started by a pinned listener: free to run anywhere
    _init_worker(settings)
    settle_heap()
    sock.sendall(_HEADER.pack(len(_READY)) + _READY)
    while True:
        try:
            request = _read_frame_blocking(sock)
        except (EOFError, OSError):
            return
        if not request:
            return
        raw, kwargs = pickle.loads(request)
        try:
            answer: tuple[str, Any] = ("ok", _parse_and_assess(raw, kwargs))
        except Exception as exc:  # parse_email does not raise; answer rather than die
            answer = ("error", f"{type(exc).__name__}: {exc}")
        data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        sock.sendall(_HEADER.pack(len(data)) + data)
