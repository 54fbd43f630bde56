"""Tests of adapters.email.workers: what crosses between the listener and a parsing worker.

The worker packs the message and its assessment into plain values; the listener unpacks them.
Whatever the message, what arrives must equal what left (raw bytes included, though they are
sent back only when the worker changed them), and a real pool must answer as the listener's
own parse and assessment would.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import pickle
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from adapters.bootstrap import build_service
from adapters.email import workers
from adapters.email.parsing import parse_email
from adapters.settings import Settings
from intake.model import InboundMessage
from intake.service import Assessment, IntakeService
from tests.corpus import corpus_files

DATA = Path(__file__).resolve().parent.parent / "data" / "email"
FILES = [*corpus_files(), *sorted(DATA.glob("*.eml"))]


def settings(**email: Any) -> Settings:
    return Settings.model_validate({"email": {"trusted_authserv_ids": ["mx.example.com"], **email}})


@pytest.fixture(scope="module")
def service() -> IntakeService:
    # Authentication checked too, so that the assessment carries an AuthVerdict.
    return build_service(settings(), store=None)


def across(raw: bytes, message: InboundMessage, assessment: Assessment) -> tuple[InboundMessage, Assessment]:
    """The pair as the listener gets it back from a worker."""
    wire = pickle.dumps(workers._pack(message, assessment, raw), pickle.HIGHEST_PROTOCOL)
    return workers._unpack(pickle.loads(wire), raw)


KWARGS = {"recipient": "support@example.com", "envelope_sender": "someone@customer.example"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_message_and_assessment_arrive_equal(service: IntakeService, path: Path) -> None:
    raw = path.read_bytes()
    message = parse_email(raw, **KWARGS, max_attachment_bytes=2_000)  # some attachments cut out
    assessment = service.assess(message)
    assert across(raw, message, assessment) == (message, assessment)


def test_rule_hits_automation_and_cited_references_arrive_equal(service: IntakeService) -> None:
    reference = service.references.new()
    raw = (
        f"From: Alice <alice@customer.example>\r\nSubject: Re: [{reference}] data breach\r\n"
        "Auto-Submitted: auto-replied\r\nAuthentication-Results: mx.example.com; spf=pass "
        "smtp.mailfrom=customer.example\r\nDate: Mon, 2 Mar 2026 10:00:00 -0530\r\n\r\n"
        "We think there was a data breach on our tenant last night.\r\n"
    ).encode()
    message = parse_email(raw, **KWARGS)
    assessment = service.assess(message)
    assert assessment.verdict.hits and assessment.automation and assessment.cited and assessment.auth
    assert message.date is not None and message.date.utcoffset() is not None
    got, got_assessment = across(raw, message, assessment)
    assert (got, got_assessment) == (message, assessment)
    assert got.date is not None and got.date.tzname() == message.date.tzname()
    assert got_assessment.received_at.tzinfo == assessment.received_at.tzinfo


def test_raw_goes_back_only_when_the_worker_changed_it(service: IntakeService) -> None:
    raw = (DATA / "rfc2231_filename.eml").read_bytes()
    kept = parse_email(raw, **KWARGS)
    values, _ = workers._pack(kept, service.assess(kept), raw)
    assert raw not in values  # the listener has these bytes already
    cut = parse_email(raw, **KWARGS, max_attachment_bytes=0)
    assert cut.raw != raw
    values, _ = workers._pack(cut, service.assess(cut), raw)
    assert cut.raw in values
    assert workers._unpack(workers._pack(cut, service.assess(cut), raw), raw)[0].raw == cut.raw


def test_new_text_that_differs_from_the_body_arrives(service: IntakeService) -> None:
    raw = b"From: a@customer.example\r\nSubject: x\r\n\r\nThanks!\r\n\r\nOn Mon, 1 Jan 2024, b@c.de wrote:\r\n> old\r\n"
    message = parse_email(raw, **KWARGS)
    assert message.new_text != message.body
    assert across(raw, message, service.assess(message))[0] == message
    odd = replace(message, date=None, headers={"x-a": "1"})
    assert across(raw, odd, service.assess(odd))[0] == odd


def test_a_pool_answers_as_the_listener_would(service: IntakeService) -> None:
    pool = workers.ParsePool(settings(), 1)
    pool.start()
    try:
        raw = (DATA / "alternative.eml").read_bytes()
        got = asyncio.run(pool.parse(raw, **KWARGS))
    finally:
        pool.close()
    assert got is not None
    message, assessment = got
    assert message == parse_email(raw, **KWARGS)
    assert message.raw is raw  # the listener's own bytes, not a copy sent back
    expected = service.assess(message)
    assert replace(assessment, received_at=expected.received_at) == expected


def test_a_worker_that_dies_is_replaced_and_costs_no_message(service: IntakeService) -> None:
    raw = (DATA / "alternative.eml").read_bytes()

    async def scenario() -> None:
        pool = workers.ParsePool(settings(), 1)
        await asyncio.to_thread(pool.start)
        try:
            first = await pool.parse(raw, **KWARGS)
            assert first is not None
            [worker] = pool._pool
            worker.proc.kill()  # a crash (a bug in a parser, the OOM killer)
            await asyncio.to_thread(worker.proc.join, 5)
            assert await pool.parse(raw, **KWARGS) is None  # the caller parses it itself
            deadline = asyncio.get_running_loop().time() + 60
            while True:  # a new worker takes over
                again = await pool.parse(raw, **KWARGS)
                if again is not None:
                    break
                assert asyncio.get_running_loop().time() < deadline, "no worker replaced the dead one"
                await asyncio.sleep(0.2)
            assert again[0] == first[0]
            assert pool._pool and pool._pool[0] is not worker
        finally:
            await asyncio.to_thread(pool.close)

    asyncio.run(scenario())


async def abandon(pool: workers.ParsePool, raw: bytes) -> asyncio.Future[Any]:
    """A caller that sends ``raw`` and gives up before the answer (its client hung up)."""
    abandoned = asyncio.ensure_future(pool.parse(raw, **KWARGS))
    await asyncio.sleep(0)  # sent, not answered yet
    abandoned.cancel()
    return abandoned


def test_a_caller_that_gives_up_does_not_put_the_worker_out_of_step(service: IntakeService) -> None:
    """An SMTP client that hangs up cancels its session while the worker parses: the answer
    must still be read, or the next message would get this one's."""
    one = (DATA / "alternative.eml").read_bytes()
    other = b"From: b@customer.example\r\nSubject: second\r\n\r\nhello\r\n"

    async def scenario() -> None:
        pool = workers.ParsePool(settings(), 1)
        await asyncio.to_thread(pool.start)
        try:
            await abandon(pool, one)
            got = await pool.parse(other, **KWARGS)
            assert got is not None and got[0].subject == "second"
        finally:
            await asyncio.to_thread(pool.close)

    asyncio.run(scenario())


def test_large_requests_and_answers_cross_whole_and_in_order(service: IntakeService) -> None:
    """Requests larger than the socket's buffer go out in pieces as the worker reads them, and
    answers larger than one read (a long pasted log in the text) arrive in many: each caller
    still gets its own message, with several in flight at once."""
    blob = base64.encodebytes(random.Random(7).randbytes(3 * 1024 * 1024)).replace(b"\n", b"\r\n")
    log = "".join(f"2026-11-22 08:{i // 60 % 60:02d}:{i % 60:02d} worker {i} export step ok\r\n" for i in range(6000))

    def message(n: int) -> bytes:
        return (
            (
                f"From: c{n}@customer.example\r\nSubject: export {n}\r\nMessage-ID: <big{n}@customer.example>\r\n"
                'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
                f"Content-Type: text/plain\r\n\r\nThe export number {n} is attached.\r\n{log}--b\r\n"
                f'Content-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="e{n}.bin"\r\n'
                "Content-Transfer-Encoding: base64\r\n\r\n"
            ).encode()
            + blob
            + b"--b--\r\n"
        )

    raws = [message(n) for n in range(4)]
    cut = {**KWARGS, "max_attachment_bytes": 1024}  # the worker cuts the attachment: raw comes back

    async def scenario() -> list[Any]:
        pool = workers.ParsePool(settings(), 1)
        await asyncio.to_thread(pool.start)
        try:
            return await asyncio.gather(*(pool.parse(raw, **cut) for raw in raws))
        finally:
            await asyncio.to_thread(pool.close)

    got = asyncio.run(scenario())
    for n, (raw, answer) in enumerate(zip(raws, got, strict=True)):
        assert answer is not None
        expected = parse_email(raw, **cut)
        assert answer[0] == expected and answer[0].subject == f"export {n}"
        assert len(raw) > 4_000_000 and len(expected.raw) < len(raw)  # sent back, cut
        assert len(answer[0].body) > 256 * 1024


def test_an_abandoned_answer_that_fails_later_is_not_reported_as_never_retrieved() -> None:
    """A caller that gave up (the client hung up) leaves its answer behind; when the worker
    then dies, the failure set on that answer is nobody's: asyncio must not log it. The pool
    is closed while its replacement is still starting in a thread: that worker is stopped
    when it is ready, not left with an open socket (pytest reports the unclosed socket)."""
    raw = (DATA / "alternative.eml").read_bytes()
    unretrieved: list[str] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: unretrieved.append(context["message"]))
        pool = workers.ParsePool(settings(), 1)
        await asyncio.to_thread(pool.start)
        try:
            abandoned = await abandon(pool, raw)
            [worker] = pool._pool
            worker.proc.kill()  # its answer will never come: the reader fails what is pending
            await asyncio.to_thread(worker.proc.join, 5)
            deadline = loop.time() + 10
            while not worker.broken:
                assert loop.time() < deadline, "the reader never saw the worker die"
                await asyncio.sleep(0.01)
        finally:
            await asyncio.to_thread(pool.close)
        del abandoned
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert not [m for m in unretrieved if "never retrieved" in m], unretrieved
