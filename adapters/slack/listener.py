"""The Slack listener: Events API over HTTP (or Socket Mode) in, InboundMessages to the service.

The listener translates and delegates, like the SMTP handler: :func:`to_inbound` turns one
``message`` event of a connected customer channel into the channel-neutral
:class:`~intake.model.InboundMessage` (a pure function), :meth:`IntakeService.receive` decides
and commits, and only then is Slack answered. A ``message_changed`` event (an edit) becomes an
:class:`~intake.model.InboundEdit` for :meth:`IntakeService.receive_edit` the same way.
slack-bolt's :class:`AsyncApp` does what it is good at (signature check, url_verification,
ssl_check, dropping our own events) and runs with ``process_before_response=True``, so the
answer *is* the outcome of the commit.

Answers (HTTP mode; in Socket Mode "200" is the envelope ack and anything else sends none,
which makes Slack redeliver the same way):

=====================  ======================================================================
200                    stored (committed), a redelivery or replay the core recognised as a
                       duplicate, an edit the core found changed no text, an event we ignore
                       on purpose (other channels, deletions, joins, bots and ourselves and
                       their edits, other event types), a malformed one (a subtype that is no
                       string: logged), and url_verification (with the challenge)
401                    bad or missing signature, or a timestamp more than 5 minutes off
                       (bolt's request verification)
400                    a body that is not UTF-8 / not parseable
503                    storage could not commit (StorageUnavailableError): Slack retries,
                       and the retry is stored once (dedup by ``external_id``)
500                    any other failure while storing: Slack retries as well
=====================  ======================================================================

Traps this module avoids (see NOTES.md): bolt answers 404 when no listener matches or a
middleware returns nothing, and Slack counts a 404 as a failure and retries; so one catch-all
listener acknowledges every event type. Bolt's single-team authorization calls ``auth.test``
on the first request and, when that call fails with a Slack error (``ratelimited``!), answers
200 with an apology: the event would be lost. So we pass our own ``authorize``, which never
touches the network: ``auth.test`` runs at start-up (and again in the background until it
works) only to learn our bot user id. Events are stored whether or not Slack's Web API is
reachable; our own posts always carry ``bot_id`` and are dropped by that alone.

Socket Mode: slack_sdk's aiohttp client has had silent-disconnect bugs (slack-sdk #1110,
#1446: after a reconnect fails half-way the client stays "connected" with no receiver). A
watchdog checks the connection every ``watchdog_interval`` seconds and, once it has looked
dead for ``grace`` seconds, throws the client away and connects a fresh one.

Tokens and the signing secret come as :class:`pydantic.SecretStr` and are unwrapped only where
a client needs them; nothing here logs them or puts them in an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.authorization.async_authorize import AsyncAuthorize
from slack_bolt.context.async_context import AsyncBoltContext
from slack_bolt.middleware.async_middleware import AsyncMiddleware
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.httpsite import start_site
from adapters.settings import SlackSettings
from intake.errors import StorageUnavailableError
from intake.headers import UNSTORABLE, storable_text, stored_name
from intake.model import Attachment, Channel, InboundEdit, InboundMessage, Route
from intake.service import IntakeService, Receipt

__all__ = ["Identity", "Ignored", "SlackListener", "slack_to_text", "split_quotes", "to_inbound"]

log = logging.getLogger("intake.slack")

# Message subtypes that are a person writing something new. message_changed is an edit (of one
# of these, by its author, or an unfurl or a bot's update); everything else (message_deleted,
# channel_join, bot_message, channel_topic, ...) is acknowledged and ignored.
AUTHORED_SUBTYPES = frozenset({None, "thread_broadcast", "file_share"})


# --------------------------------------------------------------------------------------------
# Translation: one Slack event in, one InboundMessage (or the reason to ignore it) out. Pure.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ignored:
    """An event acknowledged without effect, and why (logged at DEBUG, counted)."""

    reason: str

    @property
    def key(self) -> str:
        return self.reason.split(":", 1)[0]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who we are in Slack, from ``auth.test``."""

    team_id: str
    bot_user_id: str | None
    bot_id: str | None


_ANGLE = re.compile(r"<([^<>\n]*)>")
_QUOTE_LINE = re.compile(r"^(?:&gt;|>)(?!(?:&gt;|>){2}) ?")
_BLOCK_QUOTE = re.compile(r"^(?:&gt;|>){3} ?")


def _unescape(text: str) -> str:
    # Slack escapes exactly these three (https://api.slack.com/reference/surfaces/formatting).
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _angle(match: re.Match[str]) -> str:
    target, _, label = match.group(1).partition("|")
    label = _unescape(label)
    if target.startswith("@"):  # <@U123> or <@U123|alice>
        return "@" + (label or target[1:])
    if target.startswith("#"):  # <#C123|general>
        return "#" + (label or target[1:])
    if target.startswith("!"):  # <!here>, <!subteam^S1|@team>, <!date^1392734382^{date}|Feb 18>
        name = target[1:]
        if name.startswith("subteam^"):
            return label or "@team"
        if name.startswith("date^"):
            return label
        return "@" + (label or name.split("^", 1)[0])
    url = _unescape(target)
    if url.startswith("mailto:"):
        return label or url[len("mailto:") :]
    if label and label != url:
        return f"{label} ({url})"
    return url


def slack_to_text(text: str) -> str:
    """Slack's markup lightly turned into plain text: mentions, channels, links, entities."""
    return _unescape(_ANGLE.sub(_angle, text))


def split_quotes(text: str) -> tuple[str, str]:
    """Split raw Slack text into (what the author wrote now, quoted lines), still escaped.

    A line starting with ``>`` (Slack sends ``&gt;``) is a quote; ``>>>`` quotes the rest of
    the message. The quote markers are removed from the quoted part.
    """
    own: list[str] = []
    quoted: list[str] = []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        block = _BLOCK_QUOTE.match(line)
        if block:
            quoted.append(line[block.end() :])
            quoted.extend(lines[i + 1 :])
            break
        single = _QUOTE_LINE.match(line)
        if single:
            quoted.append(line[single.end() :])
        else:
            own.append(line)
    return "\n".join(own).strip("\n"), "\n".join(quoted).strip("\n")


def _date(ts: str) -> datetime | None:
    try:
        return datetime.fromtimestamp(float(ts), tz=UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _files(event: Mapping[str, Any]) -> tuple[Attachment, ...]:
    files = event.get("files")
    if not isinstance(files, list):
        return ()
    out = []
    for f in files:
        if isinstance(f, dict):
            size = f.get("size")
            out.append(
                Attachment(
                    filename=str(f.get("name") or f.get("title") or ""),
                    content_type=str(f.get("mimetype") or ""),
                    size=size if isinstance(size, int) else 0,
                    kept=False,  # we record that a file was shared; we do not download it
                )
            )
    return tuple(out)


def _display_name(event: Mapping[str, Any]) -> str:
    profile = event.get("user_profile")
    if isinstance(profile, dict):
        for key in ("display_name", "real_name", "name"):
            value = profile.get(key)
            if isinstance(value, str) and value.strip():
                return stored_name(value.strip())
    return ""


def _storable(value: Any) -> Any:
    """``value`` (decoded JSON) with every string storable (``intake.headers.storable_text``),
    as the email path makes the text of a message's bytes: JSON may escape a lone surrogate
    ("\\ud800") or a NUL ("\\u0000"), and such an event failed at every retry and was lost."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_storable(v) for v in value]
    return value


def to_inbound(
    envelope: Mapping[str, Any],
    *,
    settings: SlackSettings,
    bot_user_id: str | None = None,
) -> InboundMessage | InboundEdit | Ignored:
    """One Events API envelope as the core's InboundMessage (or InboundEdit, for an edit of a
    message), or why it is none of the core's business.

    ``subject`` stays empty: a Slack message has none, and the email heuristics that read a
    subject (auto-reply and bounce subjects, subject tags) must not read a chat line. ``raw`` is
    the envelope as JSON without its legacy verification ``token``.
    """
    if envelope.get("type") != "event_callback":
        return Ignored(f"payload type: {envelope.get('type')}")
    record = {k: v for k, v in envelope.items() if k != "token"}
    raw = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    # Rare: one search of the JSON spares a walk of every event. json writes a NUL escaped, as
    # the six characters \u0000, whatever ensure_ascii says.
    if UNSTORABLE.search(raw) is not None or "\\u0000" in raw:
        envelope = _storable(envelope)
        record = {k: v for k, v in envelope.items() if k != "token"}
        raw = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    event = envelope.get("event")
    if not isinstance(event, dict):
        return Ignored("no event")
    etype = event.get("type")
    if etype != "message":
        return Ignored(f"event type: {etype}")
    channel = event.get("channel")
    if not isinstance(channel, str) or channel not in settings.channels:
        return Ignored(f"unconnected channel: {channel}")
    subtype = event.get("subtype")
    if subtype is not None and not isinstance(subtype, str):  # a list or an object is no set member
        return Ignored(f"malformed: a message whose subtype is a {type(subtype).__name__}")
    if subtype == "message_changed":
        return _edit(envelope, event, channel, raw, settings=settings, bot_user_id=bot_user_id)
    if subtype == "message_deleted":
        # What was said stays on its ticket: a customer's deletion must not unsay a report (nor
        # would an intruder's). Logged at INFO, so that staff can see where a message went.
        return Ignored(f"deleted: message {event.get('deleted_ts')} was deleted in Slack; intake keeps what it stored")
    if subtype not in AUTHORED_SUBTYPES:
        return Ignored(f"subtype: {subtype}")
    if event.get("hidden"):
        return Ignored("hidden: message")
    unauthored = _no_person(event, bot_user_id)
    if unauthored is not None:
        return Ignored(unauthored)
    return _message(envelope, event, channel, raw, settings=settings)


def _no_person(event: Mapping[str, Any], bot_user_id: str | None) -> str | None:
    """Why this message (an event, or the message inside an edit) is no person's writing."""
    if event.get("bot_id") or event.get("bot_profile"):
        return "bot: message from a bot (ours or another)"
    user = event.get("user")
    if not isinstance(user, str) or not user:
        return "no user: message without an author"
    if bot_user_id and user == bot_user_id:
        return "ours: our own bot user"
    ts = event.get("ts")
    if not isinstance(ts, str) or not ts:
        return "no ts: message without a timestamp"
    return None


def _message(
    envelope: Mapping[str, Any], event: Mapping[str, Any], channel: str, raw: str, *, settings: SlackSettings
) -> InboundMessage:
    """The InboundMessage of a person's message (``_no_person`` found no reason against it)."""
    user, ts = str(event["user"]), str(event["ts"])
    team = str(envelope.get("team_id") or event.get("team") or "")
    thread_ts = event.get("thread_ts")
    if not isinstance(thread_ts, str) or not thread_ts or thread_ts == ts:
        thread_ts = None
    text = event.get("text")
    if not isinstance(text, str):
        text = ""
    own_raw, quoted_raw = split_quotes(text)
    user_team = event.get("user_team") or event.get("team")
    return InboundMessage(
        channel=Channel.SLACK,
        sender=user,
        sender_name=_display_name(event),
        recipient=f"slack:{team}/{channel}",
        subject="",
        body=slack_to_text(text).strip(),
        new_text=slack_to_text(own_raw).strip(),
        quoted=slack_to_text(quoted_raw).strip(),
        attachments=_files(event),
        date=_date(ts),
        raw=raw.encode("utf-8"),
        chat_channel=channel,
        chat_ts=ts,
        chat_thread_ts=thread_ts,
        thread_key=f"{team}/{channel}/{thread_ts or ts}",
        external_id=f"{team}/{channel}/{ts}",
        event_id=str(envelope.get("event_id") or "") or None,
        organisation=settings.channels[channel],
        author_team=str(user_team) if user_team else None,
        shared_channel=bool(envelope.get("is_ext_shared_channel")),
    )


def _edit(
    envelope: Mapping[str, Any],
    event: Mapping[str, Any],
    channel: str,
    raw: str,
    *,
    settings: SlackSettings,
    bot_user_id: str | None,
) -> InboundEdit | Ignored:
    """A ``message_changed`` event as the core's InboundEdit.

    Slack sends one (``hidden``) whenever anything of a message changes: its author edited it
    (``message.edited`` names the editor and when), a link in it was unfurled, a bot
    updated its post, a thread reply changed the root's reply count. ``message`` is the message
    as it is now, ``previous_message`` as it was (https://docs.slack.dev/reference/events/message/message_changed/).
    The edits of what would have been ignored when posted (bots, our own posts, joins) are
    ignored for the same reason; whether the text changed at all is the core's to see.
    ``previous`` is the message with the texts it had before (the core takes it in so when it
    never had the message), ``None`` when the event does not say.
    """
    inner = event.get("message")
    if not isinstance(inner, dict):
        return Ignored("edit: message_changed without its message")
    subtype = inner.get("subtype")
    if subtype is not None and not isinstance(subtype, str):
        return Ignored(f"malformed: an edit of a message whose subtype is a {type(subtype).__name__}")
    if subtype not in AUTHORED_SUBTYPES:
        return Ignored(f"subtype: edit of a {subtype} message")
    unauthored = _no_person(inner, bot_user_id)
    if unauthored is not None:
        return Ignored(f"{unauthored} (edited)")
    message = _message(envelope, inner, channel, raw, settings=settings)
    # The change's identity is the event's own ts (its event_ts too): one of its own for each
    # change, kept by Slack's retries of the event (as is the event_id, the last resort).
    # ``message.edited.ts`` is not one: Slack writes it in whole seconds ("1522268590.000000"
    # in an event of ts "1522268590.000239"), so two edits within a second share it; it says
    # when the message was edited, nothing more.
    for candidate in (event.get("ts"), event.get("event_ts"), envelope.get("event_id")):
        if isinstance(candidate, str) and candidate:
            edit_id = candidate[:64]
            break
    else:
        return Ignored("no ts: an edit without a timestamp")
    edited = inner.get("edited")
    edit_ts = edited.get("ts") if isinstance(edited, dict) else None
    edited_at = (_date(edit_ts) if isinstance(edit_ts, str) else None) or _date(edit_id)
    before = event.get("previous_message")
    previous = None
    if isinstance(before, dict) and isinstance(before.get("text"), str):
        own_raw, quoted_raw = split_quotes(before["text"])
        previous = replace(
            message,
            body=slack_to_text(before["text"]).strip(),
            new_text=slack_to_text(own_raw).strip(),
            quoted=slack_to_text(quoted_raw).strip(),
        )
    return InboundEdit(message=message, edit_id=edit_id, edited_at=edited_at, previous=previous)


# --------------------------------------------------------------------------------------------
# The listener
# --------------------------------------------------------------------------------------------


class SlackListener:
    """Slack intake on the caller's event loop: ``await start()``, ``await stop()``.

    HTTP mode serves the Events API at ``settings.events_path`` on ``listen_host:listen_port``
    (0 picks a free port; :attr:`port` holds the bound one after :meth:`start`). Socket Mode
    connects out with the app-level token instead and opens no port (:attr:`port` stays 0).
    """

    def __init__(
        self,
        *,
        service: IntakeService,
        settings: SlackSettings,
        ping_interval: float = 10.0,
        watchdog_interval: float = 15.0,
        grace: float | None = None,
        identity_timeout: float | None = None,
        shutdown_timeout: float = 10.0,
    ) -> None:
        if settings.bot_token is None:
            raise ValueError("SlackListener needs settings.bot_token")
        self.service = service
        self.settings = settings
        self.port = 0
        self.identity: Identity | None = None
        self.ping_interval = ping_interval
        self.watchdog_interval = watchdog_interval
        self.grace = grace if grace is not None else 2 * ping_interval + watchdog_interval
        self.identity_timeout = identity_timeout if identity_timeout is not None else min(settings.timeout, 5.0)
        self.shutdown_timeout = shutdown_timeout
        self.reconnects = 0  # how often the watchdog replaced a dead Socket Mode client
        self._session: aiohttp.ClientSession | None = None
        self._web: AsyncWebClient | None = None
        self._runner: web.AppRunner | None = None
        self._socket: Any | None = None  # slack_bolt AsyncSocketModeHandler
        self._connecting: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.app = self._make_app()

    # -- bolt ------------------------------------------------------------------------------

    def _make_app(self) -> AsyncApp:
        s = self.settings
        # The bolt app never calls Slack itself (replies go through the outbox), but its
        # client must point at the configured API all the same.
        client = AsyncWebClient(base_url=s.api_url, timeout=int(max(1, round(s.timeout))), retry_handlers=[])
        app = AsyncApp(
            name="intake",
            client=client,
            authorize=_Authorize(self),
            signing_secret=s.signing_secret.get_secret_value() if s.signing_secret else None,
            request_verification_enabled=s.mode == "http",
            process_before_response=True,  # answer Slack only after the commit
            logger=logging.getLogger("intake.slack.bolt"),
        )
        app.use(_EventsToIntake(self))
        return app

    async def handle_event(self, envelope: Mapping[str, Any], *, retry: str | None = None) -> BoltResponse | None:
        """Store one event. None means "acknowledge" (200); a BoltResponse is a failure answer."""
        started = time.perf_counter()
        ident = self.identity
        result = to_inbound(envelope, settings=self.settings, bot_user_id=ident.bot_user_id if ident else None)
        event_id = envelope.get("event_id")
        if isinstance(result, Ignored):
            self.service.recorder.inc("slack_events_ignored", result.key)
            # A malformed event is Slack's format changing under us, or a bug: worth a look.
            level = {"deleted": logging.INFO, "malformed": logging.WARNING}.get(result.key, logging.DEBUG)
            log.log(level, "slack event %s ignored: %s", event_id, result.reason)
            return None
        msg = result.message if isinstance(result, InboundEdit) else result
        try:
            if isinstance(result, InboundEdit):
                receipt = await self.service.receive_edit(result)
            else:
                receipt = await self.service.receive(result)
        except StorageUnavailableError as exc:
            log.warning("slack event %s (%s): storage unavailable, answering 503 so Slack retries: %s",
                        event_id, msg.external_id, exc)  # fmt: skip
            self._log(result, None, started, retry, "503")
            return BoltResponse(status=503, body="")
        except Exception:
            log.exception("slack event %s (%s): unexpected error, answering 500 so Slack retries",
                          event_id, msg.external_id)  # fmt: skip
            self._log(result, None, started, retry, "500")
            return BoltResponse(status=500, body="")
        self._log(result, receipt, started, retry, "200")
        return None

    def _log(
        self,
        result: InboundMessage | InboundEdit,
        receipt: Receipt | None,
        started: float,
        retry: str | None,
        answer: str,
    ) -> None:
        msg = result.message if isinstance(result, InboundEdit) else result
        log.info(
            "message edit received" if isinstance(result, InboundEdit) else "message received",
            extra={
                "channel": "slack",
                "reference": receipt.reference if receipt else None,
                "sender": msg.sender,
                "recipient": msg.recipient,
                "external_id": msg.external_id,
                "event_id": msg.event_id,
                "retry": retry,
                "outcome": receipt.route.value if receipt else "failed",
                "duplicate": receipt.route is Route.DUPLICATE if receipt else None,
                "acknowledgement": receipt.ack_note if receipt else None,
                "severity": receipt.known_severity if receipt else None,
                "reply": answer,
                "ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self._stopping = False
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=s.timeout))
        self._web = AsyncWebClient(
            base_url=s.api_url,
            timeout=int(max(1, round(s.timeout))),
            session=self._session,
            retry_handlers=[],
            logger=logging.getLogger("intake.slack.sdk"),
        )
        await self._first_identity()
        if s.mode == "socket":
            await self._start_socket()
        else:
            await self._start_http()

    async def stop(self) -> None:
        """Stop taking events; let the ones in flight finish (HTTP: up to ``shutdown_timeout``)."""
        self._stopping = True
        if self._runner is not None:
            await self._runner.cleanup()  # stops accepting, waits for in-flight requests
            self._runner = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self._drop_socket()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def describe(self) -> str:
        s = self.settings
        who = f" as {self.identity.bot_user_id}" if self.identity and self.identity.bot_user_id else ""
        if s.mode == "socket":
            return f"Socket Mode via {s.api_url}{who} ({len(s.channels)} connected channels)"
        return f"http://{s.listen_host}:{self.port}{s.events_path}{who} ({len(s.channels)} connected channels)"

    # -- identity (auth.test) ----------------------------------------------------------------

    async def _first_identity(self) -> None:
        if not self.settings.channels:
            log.warning("Slack: no connected channels ([slack.channels]); every message will be ignored")
        try:
            await asyncio.wait_for(self._learn_identity(), timeout=self.identity_timeout)
        except (TimeoutError, SlackApiError, aiohttp.ClientError, OSError) as exc:
            level = logging.ERROR if _is_token_problem(exc) else logging.WARNING
            log.log(level, "Slack auth.test failed at start-up (%s); events are taken all the same, "
                    "replies wait in the outbox; retrying in the background", _api_problem(exc))  # fmt: skip
            self._tasks.append(asyncio.create_task(self._identity_retry(), name="slack-auth-test"))

    async def _learn_identity(self) -> None:
        assert self._web is not None and self.settings.bot_token is not None
        resp = await self._web.auth_test(token=self.settings.bot_token.get_secret_value())
        self.identity = Identity(
            team_id=str(resp.get("team_id") or ""),
            bot_user_id=resp.get("user_id"),
            bot_id=resp.get("bot_id"),
        )
        log.info("Slack: bot user %s (bot %s) in team %s", self.identity.bot_user_id, self.identity.bot_id,
                 self.identity.team_id)  # fmt: skip

    async def _identity_retry(self) -> None:
        delay = 5.0
        while self.identity is None and not self._stopping:
            await asyncio.sleep(delay)
            try:
                await self._learn_identity()
            except (TimeoutError, SlackApiError, aiohttp.ClientError, OSError) as exc:
                log.warning("Slack auth.test failed again (%s); next try in %.0fs", _api_problem(exc), delay)
                delay = min(delay * 2, 300.0)

    # -- HTTP mode ---------------------------------------------------------------------------

    async def _start_http(self) -> None:
        s = self.settings
        web_app = web.Application()
        web_app.router.add_post(s.events_path, self._http)
        self._runner, self.port = await start_site(
            web_app, s.listen_host, s.listen_port, shutdown_timeout=self.shutdown_timeout
        )
        log.info("Slack events listening on %s", self.describe())

    async def _http(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            bolt_req = AsyncBoltRequest(
                body=raw.decode("utf-8"),
                query=request.query_string,
                headers=request.headers,  # type: ignore[arg-type]
            )
        except (UnicodeDecodeError, ValueError):
            return web.Response(status=400, text="invalid body")
        try:
            bolt_resp = await self.app.async_dispatch(bolt_req)
        except Exception:  # bolt handles its own; belt and braces
            log.exception("Slack request failed unexpectedly")
            return web.Response(status=500, text="")
        return await to_aiohttp_response(bolt_resp)

    # -- Socket Mode -----------------------------------------------------------------------

    async def _start_socket(self) -> None:
        self._new_socket()
        # Wait a little for the first connection (so that "ready" means ready when Slack is
        # reachable) but never refuse to start because Slack is not: email must run regardless.
        assert self._connecting is not None
        await asyncio.wait({self._connecting}, timeout=self.identity_timeout)
        if not await self._socket_healthy():
            log.warning("Slack Socket Mode: not connected yet; still trying in the background")
        self._tasks.append(asyncio.create_task(self._watchdog(), name="slack-socket-watchdog"))

    def _new_socket(self) -> None:
        from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

        assert self.settings.app_token is not None and self._web is not None
        handler = AsyncSocketModeHandler(
            self.app,
            app_token=self.settings.app_token.get_secret_value(),
            web_client=self._web,
            logger=logging.getLogger("intake.slack.socket"),
            ping_interval=self.ping_interval,
        )
        self._socket = handler
        connect: Callable[[], Coroutine[Any, Any, None]] = handler.connect_async
        self._connecting = asyncio.create_task(connect(), name="slack-socket-connect")

    async def _drop_socket(self) -> None:
        handler, self._socket = self._socket, None
        connecting, self._connecting = self._connecting, None
        if handler is not None:
            try:
                await asyncio.wait_for(handler.close_async(), timeout=5.0)
            except Exception as exc:  # a broken client may fail to close; it is dropped anyway
                log.debug("Slack Socket Mode: closing the old client failed: %s", type(exc).__name__)
        if connecting is not None and not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connecting

    async def _socket_healthy(self) -> bool:
        return (await self.socket_problem()) is None

    async def socket_problem(self) -> str | None:
        """Why the Socket Mode connection looks dead, or None when it looks alive."""
        handler = self._socket
        if handler is None:
            return "no client"
        client = handler.client
        if client.closed:
            return "client closed"
        if self._connecting is not None and not self._connecting.done():
            return "connecting"
        session = client.current_session
        if session is None or session.closed:
            return "no open session"
        for name in ("message_receiver", "current_session_monitor", "message_processor"):
            task = getattr(client, name, None)
            if task is None or task.done():
                return f"{name} is not running"
        last = client.last_ping_pong_time
        if last is not None and time.time() - last > 4 * self.ping_interval:
            return f"no pong for {time.time() - last:.0f}s"
        return None

    async def _watchdog(self) -> None:
        bad_since: float | None = None
        while not self._stopping:
            await asyncio.sleep(self.watchdog_interval)
            try:
                problem = await self.socket_problem()
                if problem is None:
                    bad_since = None
                    continue
                now = time.monotonic()
                if bad_since is None:
                    bad_since = now
                    log.info("Slack Socket Mode looks unhealthy (%s); watching", problem)
                if now - bad_since >= self.grace:
                    log.warning("Slack Socket Mode unhealthy for %.0fs (%s): replacing the client",
                                now - bad_since, problem)  # fmt: skip
                    await self._drop_socket()
                    if self._stopping:
                        return
                    self._new_socket()
                    self.reconnects += 1
                    bad_since = None
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Slack Socket Mode watchdog: unexpected error; continuing")


class _Authorize(AsyncAuthorize):
    """No network here: the identity was learnt at start-up (or is still being learnt).

    A subclass of bolt's AsyncAuthorize, not a plain function: bolt calls it as it is, where a
    function is called through its keyword-argument injection on every request.
    """

    def __init__(self, listener: SlackListener) -> None:
        self.listener = listener

    async def __call__(
        self,
        *,
        context: AsyncBoltContext,
        enterprise_id: str | None,
        team_id: str | None,
        user_id: str | None,
        **_: Any,
    ) -> AuthorizeResult:
        ident = self.listener.identity
        token = self.listener.settings.bot_token
        assert token is not None
        return AuthorizeResult(
            enterprise_id=enterprise_id,
            team_id=team_id,
            bot_token=token.get_secret_value(),
            bot_user_id=ident.bot_user_id if ident else None,
            bot_id=ident.bot_id if ident else None,
            user_id=user_id,
        )


class _EventsToIntake(AsyncMiddleware):
    """The last global middleware: every verified, authorised Events API payload goes to intake.

    Bolt's built-in middleware runs first (signature and timestamp check, authorisation,
    url_verification, our own bot's events dropped); what reaches this one is an event for
    :meth:`SlackListener.handle_event`, answered here with its 200 (or the 5xx that makes
    Slack retry). Going through bolt's listener registry instead cost ~10 % of the listener's
    CPU per event (matching, the listener runner, keyword-argument injection) for nothing it
    decides. Payloads that are not events go on to bolt, which answers 404 for what nobody
    handles, except those answered 200 here so that Slack does not retry them.
    """

    def __init__(self, listener: SlackListener) -> None:
        self.listener = listener

    @property
    def name(self) -> str:
        return "intake"

    async def async_process(
        self,
        *,
        req: AsyncBoltRequest,
        resp: BoltResponse,
        next: Callable[[], Awaitable[BoltResponse]],
    ) -> BoltResponse | None:
        body = req.body
        kind = body.get("type")
        if kind == "app_rate_limited":
            log.error(
                "Slack is rate-limiting event deliveries to intake (minute %s): events of that minute are lost",
                body.get("minute_rate_limited"),
            )
            return BoltResponse(status=200, body="")
        if kind != "event_callback":
            return await next()
        if not (isinstance(body.get("event"), dict) and "type" in body["event"]):
            return BoltResponse(status=200, body="")
        failure = await self.listener.handle_event(body, retry=_retry_of(req))
        return failure if failure is not None else BoltResponse(status=200, body="")


def _retry_of(request: AsyncBoltRequest) -> str | None:
    """Slack's retry number (X-Slack-Retry-Num; bolt mirrors Socket Mode's retry_attempt into it)."""
    headers: Mapping[str, Sequence[str]] = request.headers or {}
    values = headers.get("x-slack-retry-num")
    value = str(values[0]) if values else ""
    return value if value not in ("", "0") else None


def _is_token_problem(exc: BaseException) -> bool:
    if not isinstance(exc, SlackApiError):
        return False
    data = getattr(exc.response, "data", None)
    code = data.get("error") if isinstance(data, dict) else None
    return code in ("invalid_auth", "not_authed", "token_revoked", "token_expired", "account_inactive")


def _api_problem(exc: BaseException) -> str:
    """A failure of a Slack API call, named without anything that could carry a secret."""
    if isinstance(exc, SlackApiError):
        data = getattr(exc.response, "data", None)
        code = data.get("error") if isinstance(data, dict) else None
        return f"{code or 'error'} (HTTP {getattr(exc.response, 'status_code', '?')})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__
