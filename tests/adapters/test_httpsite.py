"""start_site: the one way the Slack Events API and the triage page take their port."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from aiohttp import web

from adapters.httpsite import start_site


def _app() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    return app


async def test_port_zero_serves_on_the_port_it_returns_until_cleanup() -> None:
    runner, port = await start_site(_app(), "127.0.0.1", 0, shutdown_timeout=1.0)
    try:
        assert port > 0
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/") as resp:
            assert (resp.status, await resp.text()) == (200, "hello")
    finally:
        await runner.cleanup()
    with pytest.raises(OSError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_a_port_in_use_raises_and_leaves_nothing_running() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    app = _app()
    cleaned: list[web.Application] = []

    async def on_cleanup(app: web.Application) -> None:
        cleaned.append(app)

    app.on_cleanup.append(on_cleanup)
    try:
        with pytest.raises(OSError):
            await start_site(app, "127.0.0.1", port, shutdown_timeout=1.0)
    finally:
        taken.close()
    assert cleaned == [app]  # the runner was cleaned up: the application's cleanup ran
