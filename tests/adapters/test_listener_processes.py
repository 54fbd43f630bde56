"""`email.listener_processes`: several listeners on one port, as a user runs `intake serve`.

Each test runs the real command with two listener processes (one shared listening socket), real SMTP
clients, and a relay stand-in that receives the acknowledgements: every message is stored
once and acknowledged once whichever process took it, a listener that dies is replaced, and
nothing outlives the serving process, however it ends.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.adapters.conftest import RelayStandIn
from tests.adapters.harness import mail
from tests.conftest import free_port

INTAKE = [sys.executable, "-m", "adapters.cli"]
TOKEN = "listeners-test"
pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="reads processes from /proc (Linux)")


def _config(tmp_path: Path, relay_port: int, port: int, web_port: int | None = None) -> Path:
    cfg = tmp_path / "intake.toml"
    web = f'[web]\nenabled = true\nlisten_port = {web_port}\ntoken = "{TOKEN}"\n' if web_port else ""
    cfg.write_text(
        f'[storage]\nurl = "sqlite:///{tmp_path}/intake.db"\n'
        f"[email]\nlisten_port = {port}\nlistener_processes = 2\nparse_workers = 0\n"
        f"[outbound]\nrelay_port = {relay_port}\n{web}"
    )
    subprocess.run([*INTAKE, "--config", str(cfg), "db", "upgrade"], check=True, capture_output=True, timeout=60)
    return cfg


async def _serve(cfg: Path, port: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *INTAKE, "--config", str(cfg), "serve",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert b"listening on 127.0.0.1:%d" % port in line, line
    return proc


async def _send(port: int, n: int, tag: str) -> list[str]:
    """n messages over 10 concurrent connections (the per-client cap is 20 per process)."""
    import aiosmtplib

    gate = asyncio.Semaphore(10)

    async def one(i: int) -> str:
        message = mail(sender=f"Customer {i} <c{i}@cust{i}.example>", message_id=f"<{tag}.{i}@cust.example>")
        async with gate:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=20)
            await client.connect()
            try:
                _, reply = await client.sendmail(f"c{i}@cust{i}.example", ["support@example.com"], message.as_bytes())
            finally:
                await client.quit()
        return reply

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def _messages_counted(web_port: int) -> dict[str, int]:
    url = f"http://127.0.0.1:{web_port}/metrics?token={TOKEN}"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = re.findall(r'intake_messages_received_total\{channel="email",outcome="(\w+)"\} (\d+)', text)
    return {outcome: int(n) for outcome, n in found}


def _metric(web_port: int, name: str) -> int:
    url = f"http://127.0.0.1:{web_port}/metrics?token={TOKEN}"
    with urllib.request.urlopen(url, timeout=10) as response:
        found = re.search(rf"^{name} (\d+)$", response.read().decode(), re.M)
    assert found is not None, name
    return int(found.group(1))


async def _wait_for_sessions(web_port: int, expected: int) -> None:
    deadline = time.monotonic() + 10
    while (n := await asyncio.to_thread(_metric, web_port, "intake_smtp_sessions_active")) != expected:
        assert time.monotonic() < deadline, f"{n} open sessions in /metrics, expected {expected}"
        await asyncio.sleep(0.2)


def _stats(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INTAKE, "--config", str(cfg), "stats", "--json"], capture_output=True, text=True)


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


async def _gone(pids: set[int], within: float) -> set[int]:
    deadline = time.monotonic() + within
    while (alive := {p for p in pids if _alive(p)}) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)  # other processes: no event to wait on
    return alive


async def test_both_listeners_take_mail_and_every_message_is_stored_and_acknowledged_once(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    port, web_port = free_port(), free_port()
    cfg = _config(tmp_path, smtp_relay.port, port, web_port)
    proc = await _serve(cfg, port)
    try:
        replies = await _send(port, 60, "spread")
        assert all("stored as SUP-" in r for r in replies)
        assert len({re.search(r"SUP-\S+", r).group() for r in replies}) == 60  # type: ignore[union-attr]
        acks = await smtp_relay.wait_for(60, timeout=30)  # acks of the child's messages too
        assert sorted(a.rcpt_tos[0] for a in acks) == sorted(f"c{i}@cust{i}.example" for i in range(60))
        # Redelivered, whichever listener takes it this time: a duplicate, not a ticket.
        again = await _send(port, 60, "spread")
        assert all("already stored as SUP-" in r for r in again), again[:3]
        # /metrics (served by the first process) counts every listener's messages: the second
        # sends what its counters moved once a second.
        deadline = time.monotonic() + 10
        while (counted := await asyncio.to_thread(_messages_counted, web_port)) != {"new": 60, "duplicate": 60}:
            assert time.monotonic() < deadline, counted
            await asyncio.sleep(0.2)
        # Open sessions: those in either process (the child reports its own once a second).
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(8)]
        for reader, _ in idle:
            assert (await reader.readline()).startswith(b"220")
        await _wait_for_sessions(web_port, 8)
        for _, writer in idle:
            writer.close()
        await _wait_for_sessions(web_port, 0)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 40)
    assert proc.returncode == 0, err.decode()[-2000:]
    log = err.decode()
    assert "Traceback" not in log
    took = re.findall(r"message received .*", log)
    by_child = [line for line in took if "listener=2" in line]
    assert len(took) == 120 and 0 < len(by_child) < 120  # both processes accepted connections
    stats = await asyncio.to_thread(_stats, cfg)
    assert '"tickets": 60' in stats.stdout
    await asyncio.sleep(0.5)
    assert len(smtp_relay.messages) == 60  # no second acknowledgement for the redeliveries


async def test_a_listener_that_dies_is_replaced_and_nothing_outlives_the_service(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    port, web_port = free_port(), free_port()
    cfg = _config(tmp_path, smtp_relay.port, port, web_port)
    proc = await _serve(cfg, port)
    children: set[int] = set()
    try:
        assert proc.stderr is not None
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(8)]
        for reader, _ in idle:
            assert (await reader.readline()).startswith(b"220")
        await _wait_for_sessions(web_port, 8)
        children = _children(proc.pid)
        assert len(children) >= 2  # the outbox and the second listener (and multiprocessing's tracker)
        started = re.compile(rb"email listener 2 started \(pid (\d+)\)")
        text = b""
        while not (found := started.search(text)):
            text += await asyncio.wait_for(proc.stderr.readline(), 30)
        listener = int(found.group(1))
        os.kill(listener, signal.SIGKILL)
        while not (again := started.search(text, found.end())):
            text += await asyncio.wait_for(proc.stderr.readline(), 30)
        replacement = int(again.group(1))
        assert replacement != listener and _alive(replacement)
        # The dead listener's sessions are gone, and so is its last report of them.
        survivors = 0
        for reader, writer in idle:
            writer.write(b"NOOP\r\n")
            try:
                survivors += (await asyncio.wait_for(reader.readline(), 5)).startswith(b"250")
            except (ConnectionError, TimeoutError):
                pass
        assert survivors < 8  # the kernel gave the dead listener some of them
        await _wait_for_sessions(web_port, survivors)
        for _, writer in idle:
            writer.close()
        assert all("stored as SUP-" in r for r in await _send(port, 20, "after"))
        children = _children(proc.pid)
        # The serving process is killed outright: its children stop on their own.
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        assert not await _gone(children, within=15), "a child outlived the serving process"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    stats = await asyncio.to_thread(_stats, cfg)
    assert '"tickets": 20' in stats.stdout


def test_the_setting_is_checked(tmp_path: Path) -> None:
    from adapters.settings import load_settings
    from intake.errors import ConfigError

    cfg = tmp_path / "bad.toml"
    cfg.write_text("[email]\nlistener_processes = 0\n")
    with pytest.raises(ConfigError, match="listener_processes"):
        load_settings(cfg)


@pytest.mark.parametrize(("cores", "expected"), [({0}, 1), ({0, 1}, 2), (set(range(16)), 2)])
def test_the_default_is_two_listeners_where_two_cores_may_run_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cores: set[int], expected: int
) -> None:
    from adapters.settings import load_settings

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: cores)  # as under taskset / a cgroup's cpuset
    cfg = tmp_path / "none.toml"
    cfg.write_text('[email]\nsupport_address = "help@example.com"\n')
    email = load_settings(cfg).email
    assert (email.listener_processes, email.parse_workers) == (expected, 0)
    cfg.write_text("[email]\nlistener_processes = 1\n")
    assert load_settings(cfg).email.listener_processes == 1  # a value given is kept


async def test_a_listener_that_cannot_listen_fails_the_start_and_leaves_no_process(tmp_path: Path) -> None:
    from adapters.bootstrap import ListenerProcesses, build
    from intake.ports import Recorder
    from tests.adapters.harness import settings_for

    settings = settings_for(tmp_path, relay_port=1, extra="[email]\nlistener_processes = 3\nparse_workers = 0\n")
    build(settings, create_tables=True).store.dispose()  # the schema, as `intake db upgrade` makes it
    datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # no stream socket: nobody can accept from it
    datagram.bind(("127.0.0.1", 0))
    port = datagram.getsockname()[1]
    listeners = ListenerProcesses(settings, [datagram], lambda: None, Recorder())
    with pytest.raises(OSError, match=f"cannot listen on :{port}"):
        await listeners.start()
    assert listeners._children == {}
    assert datagram.fileno() == -1  # the failed start closed what it was given
    await asyncio.sleep(0.5)
    assert not [p for p in _children(os.getpid()) if _alive(p) and b"spawn_main" in _cmdline(p)]


def _niceness(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def _cpus_allowed(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(line.split(":", 1)[1].strip() for line in status if line.startswith("Cpus_allowed_list"))


@pytest.mark.skipif(
    hasattr(os, "sched_getaffinity") and os.sched_getaffinity(0) != {0, 1},
    reason="checks the pinning on CPUs 0 and 1 exactly (a 2-core machine, as CI's)",
)
@pytest.mark.parametrize("setting", ["pin_listeners = true\n", "", "pin_listeners = false\n"])
async def test_pin_listeners_puts_each_listener_on_its_own_cpu_and_leaves_the_outbox_free(
    tmp_path: Path, smtp_relay: RelayStandIn, setting: str
) -> None:
    """Pinned by ``true`` and by the default ``"auto"`` (two listeners, two CPUs); ``false``
    leaves every process on both CPUs."""
    port = free_port()
    cfg = _config(tmp_path, smtp_relay.port, port)
    cfg.write_text(cfg.read_text().replace("listener_processes = 2\n", f"listener_processes = 2\n{setting}"))
    pinned = setting != "pin_listeners = false\n"
    proc = await _serve(cfg, port)
    try:
        replies = await _send(port, 4, "pinned")
        assert len(replies) == 4 and all(r.startswith("2.0.0") for r in replies), replies
        children = [pid for pid in _children(proc.pid) if b"spawn_main" in _cmdline(pid)]
        allowed = {pid: _cpus_allowed(pid) for pid in children}
        assert _cpus_allowed(proc.pid) == ("0" if pinned else "0-1")  # the first listener
        # The second listener on CPU 1 (pinned); the outbox (10 nicer than the rest) anywhere.
        # Relative to this test's own niceness: under `nice` the whole tree starts higher.
        nice = {pid: _niceness(pid) for pid in children}
        second = "1" if pinned else "0-1"
        base = os.getpriority(os.PRIO_PROCESS, 0)
        expected = sorted([(base, second), (min(base + 10, 19), "0-1")])
        assert sorted((nice[pid], allowed[pid]) for pid in children) == expected, (allowed, nice)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
