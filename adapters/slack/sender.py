"""Outbound chat: post an :class:`OutgoingChat` with Slack's ``chat.postMessage``.

The outbox dispatcher owns retries and back-off (it honours ``retry_after``), so the Web API
client here retries nothing itself: no ``AsyncRateLimitErrorRetryHandler``, and not even the
SDK's default connection-error retry. One attempt per call, every failure mapped onto the
send errors of :mod:`intake.errors`::

    SendError
     ├── TransientSendError   try again later: HTTP 429 / ``ratelimited`` (retry_after =
     │    │                   Retry-After seconds; Slack limits posts per channel), a proxy's 4xx
     │    └── ChannelUnavailableError  Slack itself, for every post: network errors and
     │                          timeouts, HTTP 5xx, Slack's own ``internal_error`` /
     │                          ``fatal_error`` / ``service_unavailable``, and the token family
     │                          (``invalid_auth``, ``not_authed``, ``token_revoked``,
     │                          ``token_expired``, ``account_inactive``, ``missing_scope``, ...):
     │                          an operator fixes those with a new token or a reinstall and a
     │                          restart. The outbox holds every chat note until
     │                          :meth:`SlackChatSender.check` (``auth.test``) passes, and what
     │                          waited is then delivered instead of lost
     └── PermanentSendError   retrying cannot help this note: ``channel_not_found``,
                              ``not_in_channel``, ``is_archived``, ``msg_too_long``,
                              ``user_not_found``, ... and any other error code Slack answers

Error texts name the API method, the HTTP status and Slack's error code; never the token (it
only travels in the Authorization header, and :func:`_scrub` removes it from any text that
reaches an error anyway).
"""

from __future__ import annotations

import logging

import aiohttp
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web.async_client import AsyncWebClient

from intake.errors import ChannelUnavailableError, PermanentSendError, TransientSendError
from intake.model import OutgoingChat

__all__ = ["SlackChatSender", "classify_api_error"]

log = logging.getLogger("intake.slack.sender")

# Slack error codes that a retry (possibly after an operator fixed the token) can cure.
TRANSIENT_ERRORS = frozenset(
    {
        "ratelimited",
        "rate_limited",
        "internal_error",
        "fatal_error",
        "service_unavailable",
        "request_timeout",
        "team_added_to_org",  # the workspace is migrating; Slack says: retry later
        # The token family: operator-fixable, and the notes must wait for the fix, not vanish.
        "invalid_auth",
        "not_authed",
        "token_revoked",
        "token_expired",
        "account_inactive",
        "missing_scope",
        "no_permission",
        "ekm_access_denied",
    }
)


# Slack not reached: network errors and timeouts (asyncio.TimeoutError is TimeoutError on 3.11+).
_UNREACHABLE = (TimeoutError, aiohttp.ClientError, OSError, SlackClientError)


class SlackChatSender:
    """Implements :class:`intake.ports.ChatSender` over Slack's Web API.

    The aiohttp session (one connection pool for every post) is made on first use, inside the
    running loop; :meth:`close` releases it.
    """

    def __init__(self, *, token: str, api_url: str, timeout: float = 10.0) -> None:
        self._token = token
        self.api_url = api_url
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._client: AsyncWebClient | None = None

    def __repr__(self) -> str:  # never shows the token
        return f"SlackChatSender(api_url={self.api_url!r})"

    def _web(self) -> AsyncWebClient:
        if self._client is None or self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
            self._client = AsyncWebClient(
                token=self._token,
                base_url=self.api_url,
                timeout=int(max(1, round(self.timeout))),
                session=self._session,
                retry_handlers=[],  # the outbox retries (and honours Retry-After)
                logger=logging.getLogger("intake.slack.sdk"),
            )
        return self._client

    async def send(self, message: OutgoingChat) -> None:
        try:
            await self._web().chat_postMessage(
                channel=message.channel,
                text=message.text,
                thread_ts=message.thread_ts,
                unfurl_links=False,
                unfurl_media=False,
            )
        except SlackApiError as exc:
            raise classify_api_error(exc, "chat.postMessage", token=self._token) from None
        except _UNREACHABLE as exc:
            raise self._unreachable("chat.postMessage", exc) from None

    async def check(self) -> None:
        """Return when Slack would take a post now (``auth.test`` answers ok for our token);
        raise ChannelUnavailableError if not (the outbox's check of a chat channel it holds)."""
        try:
            await self._web().auth_test()
        except SlackApiError as exc:
            error = classify_api_error(exc, "auth.test", token=self._token)
            raise ChannelUnavailableError(str(error), retry_after=error.retry_after) from None
        except _UNREACHABLE as exc:
            raise self._unreachable("auth.test", exc) from None

    def _unreachable(self, method: str, exc: BaseException) -> ChannelUnavailableError:
        if isinstance(exc, TimeoutError):
            return ChannelUnavailableError(f"{method}: timed out after {self.timeout:g}s")
        text = _scrub(str(exc), self._token)
        return ChannelUnavailableError(f"{method}: {type(exc).__name__}: {text}"[:300])

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
        self._client = None


def classify_api_error(exc: SlackApiError, method: str, *, token: str = "") -> TransientSendError | PermanentSendError:
    """Map a Web API failure onto a send error (pure: tests call it with built responses)."""
    response = exc.response
    status = int(getattr(response, "status_code", 0) or 0)
    data = getattr(response, "data", None)
    code = str(data.get("error", "")) if isinstance(data, dict) else ""
    what = _scrub(f"{method}: {code or 'no error code'} (HTTP {status})", token)
    if status == 429 or code in ("ratelimited", "rate_limited"):
        return TransientSendError(f"{what}: rate limited", retry_after=_retry_after(response))
    if status >= 500 or status == 0 or code in TRANSIENT_ERRORS:
        return ChannelUnavailableError(what)
    if not code and status != 200:  # a proxy's 4xx page, not Slack speaking: do not give up on it
        return TransientSendError(what)
    return PermanentSendError(what)


def _retry_after(response: object) -> float | None:
    headers = getattr(response, "headers", None) or {}
    value = None
    for key in ("Retry-After", "retry-after"):
        if key in headers:
            value = headers[key]
            break
    if isinstance(value, list):  # slack_sdk keeps a list per header in some versions
        value = value[0] if value else None
    try:
        seconds = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    if seconds is None or seconds != seconds or seconds < 0:  # NaN or negative: ignore it
        return None
    return min(seconds, 3600.0)


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "[token]") if token else text
