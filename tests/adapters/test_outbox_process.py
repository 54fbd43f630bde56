"""The outbox process: woken at most once per wake_every (never forgetting a wake-up), and run
at a lower priority than the listener."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from adapters.bootstrap import OutboxProcess, build, outbox_settings
from adapters.settings import OutboundSettings
from tests.adapters.harness import settings_for


class _Pipe:
    def __init__(self) -> None:
        self.sent: list[float] = []

    def send_bytes(self, data: bytes) -> None:
        assert data == b"."
        self.sent.append(asyncio.get_running_loop().time())


def test_the_outbox_builds_no_language_detector(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, relay_port=1)
    listener, outbox = build(settings), build(outbox_settings(settings))
    listener.store.dispose()
    outbox.store.dispose()
    assert listener.service.detector is not None  # the listener's: it takes messages in
    assert outbox.service.detector is None  # lingua's models stay out of the outbox's memory
    assert outbox_settings(settings).storage == settings.storage  # the rest is the same
    assert outbox_settings(settings).outbound == settings.outbound


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


@pytest.mark.parametrize(("niceness", "expected"), [(0, 0), (7, 7)])
def test_the_dispatcher_process_lowers_its_own_priority(niceness: int, expected: int) -> None:
    code = (
        "import os\nfrom adapters.bootstrap import _lower_priority\n"
        f"before = os.nice(0)\n_lower_priority({niceness})\nprint(os.nice(0) - before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=os.getcwd())
    assert int(out.stdout.strip()) == expected


def test_process_nice_is_checked() -> None:
    assert OutboundSettings().process_nice == 10
    with pytest.raises(ValidationError, match="process_nice"):
        OutboundSettings(process_nice=20)
