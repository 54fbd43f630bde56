"""Parsing and assessing messages in worker processes, beside the listener's event loop.

mail-parser and the pure assessment (keyword rules, hygiene, language, the report checklist)
cost about as much CPU as aiosmtpd's whole SMTP session. In the listener's process they take
turns with it for one GIL; in worker processes they run on the machine's other core. What
travels is the raw bytes one way and the parsed message with its assessment the other (both
plain picklable values); the decision itself still happens in the core's service, in the
parent, inside the unit of work.

A worker that dies (BrokenProcessPool) is replaced, and the message in hand is parsed in the
parent instead: a crash of a worker never costs a message or an SMTP session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from adapters.email.parsing import parse_email
from adapters.settings import Settings
from intake.model import InboundMessage
from intake.service import Assessment, IntakeService

log = logging.getLogger("intake.smtp")

_ASSESSOR: IntakeService | None = None


def _init_worker(settings: Settings) -> None:
    """Each worker builds its own rules, detector and policy from the same settings."""
    global _ASSESSOR
    from adapters.bootstrap import build_service

    logging.getLogger("mailparser").setLevel(logging.CRITICAL)
    _ASSESSOR = build_service(settings, store=None)


def _parse_and_assess(raw: bytes, kwargs: dict[str, Any]) -> tuple[InboundMessage, Assessment]:
    assert _ASSESSOR is not None
    message = parse_email(raw, **kwargs)
    return message, _ASSESSOR.assess(message)


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
            return await loop.run_in_executor(pool, _parse_and_assess, raw, kwargs)
        except BrokenProcessPool:
            log.error("a parsing worker died; starting new workers, parsing this message here")
            self._restart(pool)
            return None

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
