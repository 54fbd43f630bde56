"""Subprocesses for the benchmarks and the crash test.

Each runs in a process group of its own (our Ctrl-C does not reach it, and stopping it stops
its children: intake's outbox process and parsing workers), with its output in a log file
that the scripts search for "ready" lines and quote when something goes wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import ClassVar

REPO = Path(__file__).resolve().parents[1]


class ProcError(Exception):
    """A subprocess exited, or did not say it was ready in time."""


class Proc:
    """A subprocess in a process group of its own, output to a log file."""

    live: ClassVar[set[Proc]] = set()  # started and not yet stopped: for the last-resort cleanup

    def __init__(self, name: str, argv: list[str], logfile: Path, cwd: Path = REPO) -> None:
        self.name, self.argv, self.logfile, self.cwd = name, argv, logfile, cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.logfile, "wb") as out:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd,
                start_new_session=True,
            )  # fmt: skip
        Proc.live.add(self)

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 20) -> str:
        return "\n".join("    " + ln for ln in self.text().splitlines()[-lines:]) or "    (no output)"

    async def wait_for(self, pattern: re.Pattern[str], limit: float = 30.0) -> re.Match[str]:
        """The first match of ``pattern`` in the log, once it is there; ProcError if the
        process exits first or ``limit`` seconds pass."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            found = pattern.search(self.text())
            if found:
                return found
            if self.popen is not None and self.popen.poll() is not None:
                raise ProcError(f"{self.name} exited with status {self.popen.returncode}:\n{self.tail()}")
            await asyncio.sleep(0.05)
        raise ProcError(f"{self.name}: not ready within {limit:.0f}s:\n{self.tail()}")

    def signal_group(self, sig: int) -> None:
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group at once (the crash test's machine crash)."""
        self.signal_group(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait()

    def stop(self, timeout: float = 15.0) -> bool:
        """SIGTERM the group, SIGKILL what is left after ``timeout``; True if it left in time."""
        Proc.live.discard(self)
        if self.popen is None:
            return True
        clean = True
        if self.popen.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                clean = False
        self.signal_group(signal.SIGKILL)  # a child left behind, if any
        self.popen.wait()
        return clean

    @classmethod
    def stop_all(cls, timeout: float = 3.0) -> None:
        for proc in list(cls.live):
            proc.stop(timeout)


def serve_smtp(handler: object, port: int, server_hostname: str) -> None:
    """aiosmtpd with ``handler`` on 127.0.0.1:port, saying "listening on" once it is, until
    SIGTERM or SIGINT (the bare server under test and the relay stand-ins)."""
    from aiosmtpd.controller import Controller

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    # hostname= binds to loopback, and server_hostname= spares a getfqdn() per connection
    # (aiosmtpd builds one SMTP instance per connection).
    ctl = Controller(handler, hostname="127.0.0.1", port=port, server_hostname=server_hostname)
    ctl.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    try:
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
    finally:
        ctl.stop()
