"""Parsing and assessing messages in worker processes, beside the listener's event loop.

mail-parser and the pure assessment (keyword rules, hygiene, language, the report checklist)
cost about as much CPU as aiosmtpd's whole SMTP session. In the listener's process they take
turns with it for one GIL; in worker processes they run on the machine's other core. What
travels is the raw bytes one way and the parsed message with its assessment the other (both
plain picklable values); the decision itself still happens in the core's service, in the
parent, inside the unit of work.

A worker that dies (BrokenProcessPool) is replaced, and the message in hand is parsed in the
parent instead: a crash of a worker never costs a message or an SMTP session.

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
import concurrent.futures
import dataclasses
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from typing import Any

from adapters.email.parsing import parse_email
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


def _pack_plan(p: Plan) -> tuple[str, tuple[str, ...]]:
    return (p.name, tuple(p.channels))


def _unpack_plan(t: tuple[str, tuple[str, ...]]) -> Plan:
    return Plan(t[0], frozenset(t[1]))


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


class ParsePool:
    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def start(self) -> None:
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.settings,),
        )
        # Start the workers now (imports, rules, language models), not on the first message.
        for f in [self._pool.submit(int, 0) for _ in range(self.workers)]:
            f.result(timeout=120)

    async def parse(self, raw: bytes, **kwargs: Any) -> tuple[InboundMessage, Assessment] | None:
        """The parsed message and its assessment, or None when the pool cannot serve (then the
        caller parses in its own process)."""
        pool = self._pool
        if pool is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            packed = await loop.run_in_executor(pool, _parse_and_assess, raw, kwargs)
        except BrokenProcessPool:
            log.error("a parsing worker died; starting new workers, parsing this message here")
            self._restart(pool)
            return None
        return _unpack(packed, raw)

    def _restart(self, broken: concurrent.futures.ProcessPoolExecutor) -> None:
        if self._pool is not broken:
            return  # someone restarted it already
        self._pool = None
        broken.shutdown(wait=False, cancel_futures=True)
        try:
            self.start()
        except Exception:
            log.exception("parsing workers could not be restarted; parsing in the listener's process")
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
