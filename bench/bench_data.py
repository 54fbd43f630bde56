"""What reading the message after DATA costs: aiosmtpd's line-by-line reader against intake's
chunked one (adapters/email/smtpdata.py).

One process, one loop: an aiosmtpd server of each kind on loopback, and one client session per
kind that sends the same messages (MAIL, RCPT, DATA, the message, the reply; again). The CPU
time of the process for each kind is printed; the client's share is the same for both, so the
difference is the servers' reading. On uvloop, as ``intake serve`` runs, unless ``--asyncio``.
Run: ``.venv/bin/python bench/bench_data.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from aiosmtpd.smtp import SMTP
from smtp_load import build_messages

from adapters.email.smtpdata import ChunkedData


class Sink:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


class Chunked(ChunkedData, SMTP):
    pass


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if line[3:4] != b"-":
            return line


async def session(port: int, messages: list[bytes]) -> float:
    """CPU seconds of this process while one session sends ``messages``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader)
    writer.write(b"EHLO bench.example\r\n")
    await _reply(reader)
    started = time.process_time()
    for data in messages:
        writer.write(b"MAIL FROM:<bench@client.example>\r\n")
        await _reply(reader)
        writer.write(b"RCPT TO:<support@example.com>\r\n")
        await _reply(reader)
        writer.write(b"DATA\r\n")
        await _reply(reader)
        writer.write(data)
        reply = await _reply(reader)
        assert reply.startswith(b"250"), reply
    took = time.process_time() - started
    writer.write(b"QUIT\r\n")
    await _reply(reader)
    writer.close()
    return took


async def main(count: int, big_mb: int) -> None:
    loop = asyncio.get_running_loop()
    small = [data for _, data in build_messages(count)]
    line = b"A" * 76 + b"\r\n"
    big = [line * (big_mb * 1024 * 1024 // len(line)) + b".\r\n"]
    servers = {}
    for name, cls in (("aiosmtpd, line by line", SMTP), ("intake, chunked", Chunked)):
        server = await loop.create_server(
            lambda cls=cls: cls(Sink(), data_size_limit=64 * 1024 * 1024, loop=loop), "127.0.0.1", 0
        )
        servers[name] = server
    print(f"{count} messages of ~4 KB (54 lines), and one of {big_mb} MB ({len(big[0]) // len(line):,} lines)")
    for name, server in servers.items():
        port = server.sockets[0].getsockname()[1]
        await session(port, small[:100])  # warm-up
        per = await session(port, small) / count * 1e6
        whole = await session(port, big)
        print(f"  {name:24s} {per:7.1f} µs of CPU a 4 KB message (client included)   {whole:6.2f} s for {big_mb} MB")
    for server in servers.values():
        server.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--big-mb", type=int, default=25)
    p.add_argument("--asyncio", action="store_true", help="asyncio's own loop instead of uvloop (intake's default)")
    a = p.parse_args()
    if a.asyncio:
        asyncio.run(main(a.messages, a.big_mb))
    else:
        import uvloop

        uvloop.run(main(a.messages, a.big_mb))
