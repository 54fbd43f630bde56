"""A small stand-in for Slack on loopback: the Web API, Socket Mode, and signed Events API posts.

:class:`FakeSlack` is a real aiohttp server on 127.0.0.1 (a free port) that the real
``slack_sdk`` clients reach through ``api_url`` (``fake.api_url``). It serves ``auth.test``,
``chat.postMessage`` and ``apps.connections.open`` under ``/api/``, and a Socket Mode
WebSocket under ``/socket``. Every Web API call is recorded (:class:`Call`: method, params
from the form or JSON body, headers); ``fail_next`` makes the next calls of a method answer
an HTTP status and a Slack error (429 with Retry-After by default).

:func:`signed_post` signs an Events API body exactly as Slack does (``v0`` HMAC-SHA256 of
``v0:{timestamp}:{body}`` with the signing secret, headers ``X-Slack-Signature`` and
``X-Slack-Request-Timestamp``) and POSTs it with aiohttp's client. :func:`message_event`
builds a realistic ``event_callback`` envelope for a channel message, :func:`edit_event` the
``message_changed`` one of a change to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

BOT_TOKEN = "xoxb-0000000000-fake-bot-token-never-logged"
APP_TOKEN = "xapp-1-A0FAKE-0000-fake-app-token-never-logged"
SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
TEAM = "T0CUSTOMR"  # the workspace intake is installed in (envelope team_id)
BOT_USER = "U0INTAKE"
BOT_ID = "B0INTAKE"


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    params: Mapping[str, Any]
    headers: Mapping[str, str]
    status: int  # what the fake answered


@dataclass(slots=True)
class _Failure:
    status: int
    error: str
    retry_after: float | None
    remaining: int


@dataclass(slots=True)
class SocketPeer:
    """One Socket Mode connection the fake accepted."""

    ws: web.WebSocketResponse
    acks: list[dict[str, Any]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class FakeSlack:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.peers: list[SocketPeer] = []
        self.answer_pings = True
        self._failures: dict[str, list[_Failure]] = {}
        self._ts = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._peer_added = asyncio.Event()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/socket", self._socket)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        for peer in self.peers:
            if not peer.ws.closed:
                await peer.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- control ---------------------------------------------------------------------------

    def fail_next(
        self,
        method: str,
        *,
        count: int = 1,
        status: int = 429,
        error: str = "ratelimited",
        retry_after: float | None = 1,
    ) -> None:
        """Answer the next ``count`` calls of ``method`` with ``status`` and Slack ``error``."""
        self._failures.setdefault(method, []).append(_Failure(status, error, retry_after, count))

    def posts(self, channel: str | None = None) -> list[Call]:
        """The chat.postMessage calls the fake accepted (status 200), to ``channel`` if given."""
        return [
            c
            for c in self.calls
            if c.method == "chat.postMessage"
            and c.status == 200
            and (channel is None or c.params["channel"] == channel)
        ]

    def count(self, method: str) -> int:
        return sum(1 for c in self.calls if c.method == method)

    # A timeout parameter, not asyncio.timeout(): the failure must say what was posted.
    async def wait_posts(self, n: int, channel: str | None = None, timeout: float = 5.0) -> list[Call]:  # noqa: ASYNC109
        """Wait until exactly ``n`` posts (to ``channel``) were accepted; fail on more or on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.posts(channel)
            if len(got) > n:
                raise AssertionError(f"expected {n} posts, got {len(got)}: {[dict(c.params) for c in got]}")
            if len(got) == n:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {n} posts within {timeout}s, got {[dict(c.params) for c in got]}")
            await asyncio.sleep(0.02)

    async def wait_peer(self, n: int, timeout: float = 5.0) -> SocketPeer:  # noqa: ASYNC109
        """Wait until the ``n``-th Socket Mode connection (1-based) is open; return it."""
        deadline = time.monotonic() + timeout
        while len(self.peers) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected socket connection #{n} within {timeout}s, have {len(self.peers)}")
            await asyncio.sleep(0.02)
        return self.peers[n - 1]

    # -- Web API -----------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            params.update(await request.json())
        else:
            params.update(await request.post())
        headers = {k.lower(): v for k, v in request.headers.items()}
        failures = self._failures.get(method)
        if failures:
            failure = failures[0]
            failure.remaining -= 1
            if failure.remaining == 0:
                failures.pop(0)
            self.calls.append(Call(method, params, headers, failure.status))
            extra = {"Retry-After": f"{failure.retry_after:g}"} if failure.retry_after is not None else {}
            return web.json_response({"ok": False, "error": failure.error}, status=failure.status, headers=extra)
        expected = APP_TOKEN if method == "apps.connections.open" else BOT_TOKEN
        if headers.get("authorization") != f"Bearer {expected}":
            self.calls.append(Call(method, params, headers, 200))
            return web.json_response({"ok": False, "error": "invalid_auth"})
        self.calls.append(Call(method, params, headers, 200))
        if method == "auth.test":
            return web.json_response(
                {"ok": True, "url": "https://customer.slack.test/", "team": "Customer", "user": "intake",
                 "team_id": TEAM, "user_id": BOT_USER, "bot_id": BOT_ID, "is_enterprise_install": False}
            )  # fmt: skip
        if method == "chat.postMessage":
            ts = f"{int(time.time())}.{next(self._ts):06d}"
            return web.json_response(
                {"ok": True, "channel": params.get("channel"), "ts": ts,
                 "message": {"type": "message", "text": params.get("text"), "bot_id": BOT_ID, "ts": ts}}
            )  # fmt: skip
        if method == "apps.connections.open":
            return web.json_response({"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket"})
        return web.json_response({"ok": False, "error": "unknown_method"}, status=404)

    # -- Socket Mode -------------------------------------------------------------------------

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        peer = SocketPeer(ws)
        self.peers.append(peer)
        await ws.send_json({"type": "hello", "num_connections": len(self.peers),
                            "connection_info": {"app_id": "A0FAKE"}})  # fmt: skip
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.PING:
                    if self.answer_pings:
                        await ws.pong(msg.data)
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if "envelope_id" in data:
                        peer.acks.append(data)
        finally:
            peer.closed.set()
        return ws

    async def push_event(self, peer: SocketPeer, envelope: Mapping[str, Any], *, envelope_id: str,
                         retry_attempt: int = 0) -> None:  # fmt: skip
        """Deliver an Events API envelope over Socket Mode, as Slack frames it."""
        await peer.ws.send_json(
            {"envelope_id": envelope_id, "type": "events_api", "payload": dict(envelope),
             "accepts_response_payload": False, "retry_attempt": retry_attempt,
             "retry_reason": "timeout" if retry_attempt else ""}
        )  # fmt: skip


# -- Events API requests ---------------------------------------------------------------------

_event_ids = itertools.count(1)
_ts_seq = itertools.count(1)


def new_ts() -> str:
    """A fresh, unique Slack ts ("seconds.micro-sequence") near now."""
    return f"{int(time.time())}.{next(_ts_seq):06d}"


def message_event(
    *,
    text: str,
    channel: str = "C0123ABCD",
    user: str | None = "U0ALICE",
    ts: str | None = None,
    thread_ts: str | None = None,
    subtype: str | None = None,
    team: str = TEAM,
    user_team: str | None = None,
    ext_shared: bool = False,
    event_id: str | None = None,
    **event_extra: Any,
) -> dict[str, Any]:
    """An ``event_callback`` envelope carrying one channel ``message`` event."""
    event: dict[str, Any] = {
        "type": "message",
        "channel": channel,
        "text": text,
        "ts": ts or new_ts(),
        "channel_type": "channel",
        "event_ts": ts or new_ts(),
    }
    if user is not None:
        event["user"] = user
        event["team"] = user_team or team
    if user_team is not None:
        event["user_team"] = user_team
        event["source_team"] = user_team
    if thread_ts is not None:
        event["thread_ts"] = thread_ts
    if subtype is not None:
        event["subtype"] = subtype
    event.update(event_extra)
    return envelope(event, team=team, ext_shared=ext_shared, event_id=event_id)


def edit_event(
    posted: Mapping[str, Any],
    *,
    text: str,
    previous_text: str | None = None,
    edited: bool = True,
    edit_ts: str | None = None,
    event_id: str | None = None,
    **message_extra: Any,
) -> dict[str, Any]:
    """The ``message_changed`` envelope Slack sends when the message ``posted`` (an envelope
    from :func:`message_event`) changes, now reading ``text``.

    As Slack builds it (https://docs.slack.dev/reference/events/message/message_changed/): a
    hidden event whose own ``ts`` (and ``event_ts``) is the change's, ``edit_ts``, unique;
    ``message`` the message as it is now (its ``ts``, ``user``, ``thread_ts`` unchanged;
    ``edited`` with the editor and when, when its author edited it: ``edited=False`` for a
    change Slack or an app made, an unfurl say), ``previous_message`` as it was
    (``previous_text``, by default the text ``posted`` had). ``message_extra`` goes into
    ``message`` (``attachments`` of an unfurl, ``bot_id``...).

    ``edited.ts`` is in whole seconds, as Slack writes it (an event of ts "1522268590.000239"
    carries ``"edited": {"ts": "1522268590.000000"}``): two edits within a second share it.
    """
    old = dict(posted["event"])
    ts = edit_ts or new_ts()
    keep = {k: v for k, v in old.items() if k not in ("channel", "event_ts", "channel_type")}
    message: dict[str, Any] = {**keep, "text": text}
    if edited:
        message["edited"] = {"user": old.get("user"), "ts": f"{ts.partition('.')[0]}.000000"}
    message.update(message_extra)
    previous = {**keep, "text": old.get("text", "") if previous_text is None else previous_text}
    event = {
        "type": "message",
        "subtype": "message_changed",
        "hidden": True,
        "channel": old["channel"],
        "ts": ts,
        "event_ts": ts,
        "channel_type": old.get("channel_type", "channel"),
        "message": message,
        "previous_message": previous,
    }
    return envelope(event, team=posted["team_id"], ext_shared=posted["is_ext_shared_channel"], event_id=event_id)


def envelope(event: Mapping[str, Any], *, team: str = TEAM, ext_shared: bool = False,
             event_id: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "token": "legacy-verification-token",
        "team_id": team,
        "context_team_id": team,
        "api_app_id": "A0FAKE",
        "event": dict(event),
        "type": "event_callback",
        "event_id": event_id or f"Ev{next(_event_ids):08d}",
        "event_time": int(time.time()),
        "authorizations": [{"enterprise_id": None, "team_id": team, "user_id": BOT_USER, "is_bot": True}],
        "is_ext_shared_channel": ext_shared,
    }


def sign(body: str, *, secret: str = SIGNING_SECRET, timestamp: int | None = None) -> dict[str, str]:
    """The headers Slack sends with a request body: v0 HMAC-SHA256 over "v0:{ts}:{body}"."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}"}


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


async def signed_post(
    session: aiohttp.ClientSession,
    url: str,
    payload: Mapping[str, Any] | str,
    *,
    secret: str = SIGNING_SECRET,
    timestamp: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """POST ``payload`` to intake's Events API endpoint, signed as Slack signs it."""
    body = payload if isinstance(payload, str) else json.dumps(payload)
    all_headers = {"Content-Type": "application/json", "User-Agent": "Slackbot 1.0 (+https://api.slack.com/robots)"}
    all_headers.update(sign(body, secret=secret, timestamp=timestamp))
    all_headers.update(headers or {})
    async with session.post(url, data=body.encode(), headers=all_headers) as resp:
        return Answer(resp.status, await resp.text())
