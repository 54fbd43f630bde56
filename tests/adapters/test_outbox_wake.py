"""The listener wakes the outbox process at most once per wake_every, and never forgets one."""

from __future__ import annotations

import asyncio
from pathlib import Path

from adapters.bootstrap import OutboxProcess
from tests.adapters.harness import settings_for


class _Pipe:
    def __init__(self) -> None:
        self.sent: list[float] = []

    def send_bytes(self, data: bytes) -> None:
        assert data == b"."
        self.sent.append(asyncio.get_running_loop().time())


async def test_a_burst_of_commits_makes_two_wake_ups_not_one_each(tmp_path: Path) -> None:
    outbox = OutboxProcess(settings_for(tmp_path, relay_port=1))
    pipe = outbox._writer = _Pipe()
    for _ in range(500):
        outbox.wake()  # 500 commits within one window
    assert len(pipe.sent) == 1  # the first one at once: an idle dispatcher starts sending
    await asyncio.sleep(outbox.wake_every * 3)
    assert len(pipe.sent) == 2  # the rest in one wake-up at the end of the window
    assert pipe.sent[1] - pipe.sent[0] >= outbox.wake_every * 0.9


async def test_a_commit_after_a_quiet_spell_wakes_at_once(tmp_path: Path) -> None:
    outbox = OutboxProcess(settings_for(tmp_path, relay_port=1))
    pipe = outbox._writer = _Pipe()
    outbox.wake()
    await asyncio.sleep(outbox.wake_every * 2)
    outbox.wake()
    assert len(pipe.sent) == 2


async def test_stopping_cancels_a_wake_up_still_due(tmp_path: Path) -> None:
    outbox = OutboxProcess(settings_for(tmp_path, relay_port=1))
    pipe = outbox._writer = _Pipe()
    outbox.wake()
    outbox.wake()
    await outbox.stop()  # no child was started: stop only forgets the pending wake-up
    await asyncio.sleep(outbox.wake_every * 2)
    assert len(pipe.sent) == 1
