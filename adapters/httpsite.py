"""Serve an aiohttp application on a TCP port: the Slack Events API and the triage page both do."""

from __future__ import annotations

from aiohttp import web


async def start_site(
    app: web.Application, host: str, port: int, *, shutdown_timeout: float
) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (port 0: any free one) without aiohttp's access log or
    signal handlers (the process has its own); return the runner, for ``cleanup()`` at stop,
    and the port bound. An address that cannot be bound raises OSError with nothing left
    running."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])
