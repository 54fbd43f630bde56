"""Slack intake end to end: signed Events API posts in, a real store, replies to a fake Slack API.

Everything runs on loopback: intake's own aiohttp endpoint, the fake Web API and Socket Mode
server of ``tests.adapters.fake_slack`` (the real slack_sdk clients reach it through
``api_url``), and the SMTP relay stand-in for the IRT email alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from adapters.settings import SlackSettings
from adapters.slack.listener import Ignored, SlackListener, slack_to_text, split_quotes, to_inbound
from adapters.slack.sender import SlackChatSender
from adapters.web import render_ticket
from intake.errors import PermanentSendError, TransientSendError
from intake.model import Channel, InboundEdit, InboundMessage, OutgoingChat
from tests.adapters.conftest import RelayStandIn
from tests.adapters.fake_slack import (
    APP_TOKEN,
    BOT_ID,
    BOT_TOKEN,
    BOT_USER,
    SIGNING_SECRET,
    TEAM,
    Answer,
    FakeSlack,
    edit_event,
    envelope,
    message_event,
    new_ts,
    signed_post,
)
from tests.adapters.harness import Harness, mail, ref_of, running_intake, settings_for, wait_until
from tests.adapters.test_cli import cli

CHANNEL = "C0123ABCD"
IRT_USER = "U0IRTLEAD"


def slack_toml(fake: FakeSlack, extra: str = "") -> str:
    return f"""
[slack]
enabled = true
mode = "http"
listen_host = "127.0.0.1"
listen_port = 0
events_path = "/slack/events"
api_url = "{fake.api_url}"
bot_token = "{BOT_TOKEN}"
signing_secret = "{SIGNING_SECRET}"
staff_users = ["U0STAFF"]
home_team = "T0HOME"
timeout = 5
[slack.channels]
{CHANNEL} = "acme"
C0SHARED1 = "acme"
[irt]
slack_user = "{IRT_USER}"
{extra}
"""


@dataclass
class Slack:
    """Slack's side of the conversation with a running intake."""

    h: Harness
    fake: FakeSlack
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        listener = self.h.app.slack_listener
        return f"http://127.0.0.1:{listener.port}/slack/events"

    async def post(self, payload: dict[str, Any] | str, **kw: Any) -> Answer:
        return await signed_post(self.http, self.url, payload, **kw)

    async def say(self, text: str, **kw: Any) -> tuple[dict[str, Any], Answer]:
        """Post a new message event; returns the envelope and intake's answer."""
        env = message_event(text=text, **kw)
        return env, await self.post(env)

    async def settled(self) -> None:
        await self.h.outbox_settled()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@contextlib.asynccontextmanager
async def slack_intake(
    tmp_path: Path,
    relay: RelayStandIn,
    fake: FakeSlack,
    http: aiohttp.ClientSession,
    extra: str = "",
    db_url: str | None = None,
) -> AsyncIterator[Slack]:
    settings = settings_for(tmp_path, relay_port=relay.port, db_url=db_url, extra=slack_toml(fake, extra))
    async with running_intake(settings) as h:
        assert isinstance(h.app.slack_listener, SlackListener)
        yield Slack(h, fake, http)


@pytest.fixture
async def slack(tmp_path: Path, smtp_relay: RelayStandIn, fake: FakeSlack, http: aiohttp.ClientSession):  # type: ignore[no-untyped-def]
    async with slack_intake(tmp_path, smtp_relay, fake, http) as s:
        yield s


@pytest.fixture
async def slack_on_db(  # type: ignore[no-untyped-def]
    tmp_path: Path, smtp_relay: RelayStandIn, fake: FakeSlack, http: aiohttp.ClientSession, db_url: str
):
    """``slack``, once on SQLite and once on PostgreSQL (tests of what storage holds)."""
    async with slack_intake(tmp_path, smtp_relay, fake, http, db_url=db_url) as s:
        yield s


# -- the Events API endpoint -------------------------------------------------------------------


async def test_url_verification_and_start_up(slack: Slack) -> None:
    answer = await slack.post({"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
                               "type": "url_verification"})  # fmt: skip
    assert answer.status == 200
    assert answer.json() == {"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}
    listener = slack.h.app.slack_listener
    assert listener.port > 0 and str(listener.port) in listener.describe()
    # auth.test ran once, at start-up, with the bot token; it taught us our own ids.
    [auth] = [c for c in slack.fake.calls if c.method == "auth.test"]
    assert auth.headers["authorization"] == f"Bearer {BOT_TOKEN}"
    assert listener.identity.bot_user_id == BOT_USER and listener.identity.bot_id == BOT_ID
    assert BOT_TOKEN not in repr(slack.h.app.chat_sender)


async def test_new_message_opens_a_ticket_and_replies_in_its_thread(
    slack: Slack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env, answer = await slack.say(
        "Hi <@U0INTAKE>, the <https://app.example.com/d/7|revenue dashboard> shows no data since 10:30 &amp; "
        "exports fail for <!here>\n&gt; yesterday it worked"
    )
    assert answer.status == 200
    ts = env["event"]["ts"]
    [t] = slack.h.tickets()
    assert t["channel"] == "slack" and t["requester"] == "U0ALICE" and t["organisation"] == "acme"
    assert t["message_count"] == 1
    [reply] = await slack.fake.wait_posts(1)
    assert reply.params["channel"] == CHANNEL and reply.params["thread_ts"] == ts
    assert t["reference"] in reply.params["text"]
    assert f"Assessed as Severity {t['severity']} (" in reply.params["text"]  # not "Severity: Severity 3"
    assert "This first assessment is automatic: a support specialist confirms the severity" in reply.params["text"]
    assert reply.headers["authorization"] == f"Bearer {BOT_TOKEN}"
    [m] = slack.h.detail(t["reference"])["messages"]
    assert m["route"] == "new" and m["external_id"] == f"{TEAM}/{CHANNEL}/{ts}"
    assert m["new_text"] == (
        "Hi @U0INTAKE, the revenue dashboard (https://app.example.com/d/7) shows no data since 10:30 & "
        "exports fail for @here"
    )
    assert m["body"].endswith("> yesterday it worked")
    await slack.settled()
    assert slack.h.detail(t["reference"])["outbox"][0]["status"] == "sent"
    # Secrets never reach the logs, at any level.
    for secret in (BOT_TOKEN, SIGNING_SECRET):
        assert secret not in caplog.text


async def test_thread_reply_joins_without_a_second_reply(slack: Slack) -> None:
    env, _ = await slack.say("Our nightly sync fails with error E1042")
    root = env["event"]["ts"]
    await slack.fake.wait_posts(1)
    _, answer = await slack.say("It failed again tonight", thread_ts=root, user="U0BOB")
    assert answer.status == 200
    [t] = slack.h.tickets()
    assert t["message_count"] == 2
    assert [m["route"] for m in slack.h.detail(t["reference"])["messages"]] == ["new", "thread"]
    await slack.settled()
    await asyncio.sleep(0.3)
    await slack.fake.wait_posts(1)  # still the one acknowledgement


async def test_reply_in_a_thread_that_is_no_ticket_yet_is_answered_at_its_root(slack: Slack) -> None:
    # Staff start a thread (no ticket); a customer answers in it: a new ticket, whose reply must
    # go to the thread's root (Slack: "avoid using a reply's ts value; use its parent instead").
    announcement, _ = await slack.say("Maintenance tonight at 22:00 UTC", user="U0STAFF")
    root = announcement["event"]["ts"]
    _, answer = await slack.say("Will the API be down too? Our sync runs at 22:30", thread_ts=root)
    assert answer.status == 200
    [ack] = await slack.fake.wait_posts(1)
    assert ack.params["thread_ts"] == root
    _, _ = await slack.say("Also the webhooks?", thread_ts=root, user="U0BOB")
    [t] = slack.h.tickets()
    assert t["message_count"] == 2
    await slack.settled()
    await slack.fake.wait_posts(1)


async def test_top_level_message_citing_the_reference_joins(slack: Slack) -> None:
    await slack.say("The export button does nothing")
    [ack] = await slack.fake.wait_posts(1)
    ref = ref_of(ack.params["text"])
    _, answer = await slack.say(f"Any news on {ref}? Still broken.", user="U0CAROL")
    assert answer.status == 200
    [t] = slack.h.tickets()
    assert t["reference"] == ref and t["message_count"] == 2
    assert slack.h.detail(ref)["messages"][1]["route"] == "reference"
    await slack.settled()
    await slack.fake.wait_posts(1)


async def test_retries_and_replays_are_answered_200_without_effect(slack: Slack) -> None:
    env = message_event(text="Login page times out for everyone in our team")
    first = await slack.post(env)
    retry = await slack.post(env, headers={"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"})
    replay = await slack.post(json.dumps(env), timestamp=int(time.time()) - 200)  # within the 5-minute window
    assert (first.status, retry.status, replay.status) == (200, 200, 200)
    [t] = slack.h.tickets()
    assert t["message_count"] == 1
    await slack.settled()
    await asyncio.sleep(0.3)
    await slack.fake.wait_posts(1)


async def test_stale_or_badly_signed_requests_get_401(slack: Slack) -> None:
    env = message_event(text="please help")
    stale = await slack.post(env, timestamp=int(time.time()) - 301)
    forged = await slack.post(env, secret="not-the-signing-secret")
    unsigned = await slack.http.post(slack.url, json=env)
    assert (stale.status, forged.status, unsigned.status) == (401, 401, 401)
    assert slack.h.stats()["tickets"] == 0


async def test_text_no_database_stores_is_made_storable_not_refused(slack: Slack) -> None:
    """JSON may carry a lone surrogate (``\\ud800``) or a NUL (``\\u0000``): no database stores
    the first, PostgreSQL refuses the second in text. The event was answered 500 at every retry
    and then lost. A lone surrogate becomes U+FFFD and a NUL goes, as in email."""
    text = "the export fails \ud800 here\x00 and there"
    env, answer = await slack.say(text, user_profile={"display_name": "Al\udcffice"})
    assert answer.status == 200
    [t] = slack.h.tickets()
    [m] = slack.h.detail(t["reference"])["messages"]
    assert m["body"] == "the export fails \ufffd here and there"
    assert t["requester_name"] == "Al\ufffdice"
    retry = await slack.post(env, headers={"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"})
    assert retry.status == 200
    assert [t["message_count"] for t in slack.h.tickets()] == [1]
    # A NUL alone (json writes it escaped, "\\u0000", so a search of the text did not see it).
    await slack.say("the import stops\x00 at row 7", user_profile={"display_name": "Bo\x00b"})
    stored = [slack.h.detail(t["reference"]) for t in slack.h.tickets()]
    bodies = sorted(m["body"] for d in stored for m in d["messages"])
    assert "the import stops at row 7" in bodies, bodies
    assert sorted(d["requester_name"] for d in stored) == ["Al\ufffdice", "Bob"]


async def test_deletions_joins_bots_and_other_channels_are_ignored(slack: Slack) -> None:
    env, _ = await slack.say("Reports are empty")
    ts = env["event"]["ts"]
    await slack.fake.wait_posts(1)
    events = [
        message_event(text="", subtype="message_deleted", user=None, deleted_ts=ts, previous_message={"ts": ts}),
        message_event(text="<@U0NEW> has joined the channel", user="U0NEW", subtype="channel_join"),
        message_event(text="Build #42 failed: data breach drill", user="U0JENKINS", bot_id="B0JENKINS"),
        message_event(text="Deploy finished", user=None, subtype="bot_message", bot_id="B0DEPLOY"),
        message_event(text="Thanks, we have opened ticket SUP for this", user=BOT_USER, bot_id=BOT_ID),
        message_event(text="our own user id, no bot_id", user=BOT_USER),
        message_event(text="We have an outage", channel="C0NOTOURS"),
        envelope({"type": "reaction_added", "user": "U0ALICE", "reaction": "eyes",
                  "item": {"type": "message", "channel": CHANNEL, "ts": ts}, "event_ts": new_ts()}),
        envelope({"type": "member_joined_channel", "user": BOT_USER, "channel": CHANNEL, "event_ts": new_ts()}),
        {"token": "x", "type": "app_rate_limited", "team_id": TEAM, "minute_rate_limited": 1518467820,
         "api_app_id": "A0FAKE"},
    ]  # fmt: skip
    answers = [await slack.post(e) for e in events]
    assert [a.status for a in answers] == [200] * len(events)
    [t] = slack.h.tickets()
    assert t["message_count"] == 1 and slack.h.stats()["messages"] == 1
    await slack.settled()
    await asyncio.sleep(0.3)
    await slack.fake.wait_posts(1)


async def test_rate_limited_reply_is_delivered_once_after_retry_after(slack: Slack) -> None:
    slack.fake.fail_next("chat.postMessage", status=429, error="ratelimited", retry_after=1)
    env, answer = await slack.say("Can't invite new users")
    assert answer.status == 200
    await slack.settled()
    [reply] = await slack.fake.wait_posts(1)
    assert reply.params["thread_ts"] == env["event"]["ts"]
    tries = [c for c in slack.fake.calls if c.method == "chat.postMessage"]
    assert [c.status for c in tries] == [429, 200]
    [note] = slack.h.detail(slack.h.tickets()[0]["reference"])["outbox"]
    assert note["status"] == "sent" and note["attempts"] == 2
    assert (note["sent_at"] - note["created_at"]).total_seconds() >= 0.9  # honoured Retry-After: 1


async def test_security_message_pages_the_irt_lead_once(slack: Slack, smtp_relay: RelayStandIn) -> None:
    text = "we found unauthorized access to our account, possible data breach"
    env, answer = await slack.say(text)
    assert answer.status == 200
    [t] = slack.h.tickets()
    assert t["severity"] == 1 and t["security"]
    [dm] = await slack.fake.wait_posts(1, channel=IRT_USER)
    assert t["reference"] in dm.params["text"] and not dm.params.get("thread_ts")
    [ack] = await slack.fake.wait_posts(1, channel=CHANNEL)
    assert ack.params["thread_ts"] == env["event"]["ts"]
    assert "first assessment" not in ack.params["text"]  # Severity 1 is the policy's own call
    [alert] = await smtp_relay.wait_for(1)
    assert alert.rcpt_tos == ("irt-lead@example.com",) and t["reference"] in alert.message["Subject"]
    # A follow-up in the thread does not page again.
    await slack.say("also the audit log shows a data breach", thread_ts=env["event"]["ts"])
    await slack.settled()
    await asyncio.sleep(0.3)
    await slack.fake.wait_posts(1, channel=IRT_USER)
    await smtp_relay.wait_for(1)
    # Same words by email: the same decision (adapters translate, the core decides).
    await slack.h.send(mail(subject="", body=text + "\n", sender="dan@acme.com"))
    by_email = [x for x in slack.h.tickets() if x["channel"] == "email"]
    assert [(x["severity"], x["security"]) for x in by_email] == [(1, True)]


BREACH = "We think there was a data breach: unauthorized access to our admin account last night."


def paging_notes(s: Slack, channel: str) -> list[str]:
    """The IRT paging notes ("... not paged ...") of the one ticket opened from ``channel``."""
    [t] = [x for x in s.h.tickets() if x["channel"] == channel]
    assert t["severity"] == 1 and t["security"]
    return [n["text"] for n in s.h.detail(t["reference"])["notes"] if "not paged" in n["text"]]


async def test_forged_mail_naming_a_customer_does_not_silence_its_slack_incident(
    tmp_path: Path, smtp_relay: RelayStandIn, fake: FakeSlack, http: aiohttp.ClientSession
) -> None:
    """No authentication is checked by default: anyone can send mail From x@acme.com. Five such
    mails (acme's share is 5) must not keep acme's own incident in its Slack channel from
    paging the IRT lead for the hour; they did, as they counted as acme. A forged address has
    a share of its own, and the ceiling (20) holds as it did before there were shares."""
    async with slack_intake(tmp_path, smtp_relay, fake, http) as s:
        for i in range(5):
            forged = mail(sender=f"x{i}@acme.com", subject="Breach", body=BREACH)
            assert (await s.h.send(forged, mail_from=f"x{i}@evil.example")).code == 250
        assert (await s.say("URGENT: we were hacked, someone is in our admin account"))[1].status == 200
        await s.settled()
        await fake.wait_posts(5 + 1, channel=IRT_USER)
        assert paging_notes(s, "slack") == []
        assert all(t["security"] and t["severity"] == 1 for t in s.h.tickets())


async def test_a_customer_s_authenticated_mail_and_its_slack_channel_share_its_alerts(
    tmp_path: Path, smtp_relay: RelayStandIn, fake: FakeSlack, http: aiohttp.ClientSession
) -> None:
    """What does use acme's share: its Slack channels and its mail whose authentication our MTA
    checked and passed. Past the share (2 here) acme's Slack incident is held and says so; a
    mail that failed the check, though From names acme, used a share of its own. So also when
    acknowledgements do not require authentication (then the check was skipped, and the forgery
    took acme's share: 2 pages, not 3); that setting still acknowledges a stranger who failed."""
    extra = (
        '[email]\ntrusted_authserv_ids = ["mx.example.com"]\nrequire_authentication = false\n'
        "[limits]\nirt_alerts_per_organisation_per_hour = 2\n"
    )
    passed = {"Authentication-Results": "mx.example.com; dkim=pass header.d=acme.com; spf=pass smtp.mailfrom=acme.com"}
    failed = {"Authentication-Results": "mx.example.com; dkim=fail header.d=acme.com; spf=fail smtp.mailfrom=acme.com"}
    async with slack_intake(tmp_path, smtp_relay, fake, http, extra=extra) as s:
        await s.h.send(mail(sender="mallory@acme.com", subject="Breach", body=BREACH, headers=failed))
        for who in ("ciso", "cto"):
            await s.h.send(mail(sender=f"{who}@acme.com", subject="Breach", body=BREACH, headers=passed))
        await s.say("URGENT: we were hacked, someone is in our admin account")
        stranger = await s.h.send(mail(sender="eve@stranger.example", headers=failed), mail_from="eve@stranger.example")
        await s.settled()
        await fake.wait_posts(3, channel=IRT_USER)  # the forgery's and the two authenticated mails'
        [held] = paging_notes(s, "slack")
        assert held.startswith("IRT alert not paged: acme has had its share (2 alerts for it in the last hour")
        assert s.h.detail(ref_of(stranger.text))["ack_status"] == "queued"


async def test_a_thread_reply_that_raises_its_ticket_is_answered_in_the_thread_once(slack: Slack) -> None:
    """As by email: a follow-up that reports a security incident raises the ticket to
    Severity 1, pages the lead, and tells the customer in their thread that the IRT lead will
    reach out; a second such reply does neither again."""
    env, _ = await slack.say("The dashboard export is slow today")
    ts = env["event"]["ts"]
    await slack.fake.wait_posts(1, channel=CHANNEL)
    await slack.say("update: someone got unauthorized access to our account", thread_ts=ts)
    [dm] = await slack.fake.wait_posts(1, channel=IRT_USER)
    [_, notice] = await slack.fake.wait_posts(2, channel=CHANNEL)
    [t] = slack.h.tickets()
    assert (t["severity"], t["security"]) == (1, True) and t["reference"] in dm.params["text"]
    assert notice.params["thread_ts"] == ts and "Severity 1" in notice.params["text"]
    assert "will reach out to you directly" in notice.params["text"]
    await slack.say("and a data breach too", thread_ts=ts)
    await slack.settled()
    await asyncio.sleep(0.3)
    await slack.fake.wait_posts(1, channel=IRT_USER)
    await slack.fake.wait_posts(2, channel=CHANNEL)


# -- edits and deletions -----------------------------------------------------------------------


def versions(s: Slack, reference: str) -> list[tuple[str, str, int | None]]:
    """The ticket's message rows as (route, body, id of the message an edit changes)."""
    return [(m["route"], m["body"], m["edit_of"]) for m in s.h.detail(reference)["messages"]]


def edit_outcomes(s: Slack) -> dict[str, int]:
    return {k[2]: v for k, v in s.h.app.service.recorder.counts.items() if k[:2] == ("message_edits", "slack")}


async def test_an_edit_that_reports_an_incident_raises_the_ticket_as_a_follow_up_would(
    slack_on_db: Slack, smtp_relay: RelayStandIn, tmp_path: Path
) -> None:
    """A harmless report, then edited to add that they were hacked: Severity 1, the IRT lead
    paged (email and Slack), the customer told in the thread that the lead will reach out,
    as for a follow-up. The edit is stored beside the message, which keeps what it first said;
    staff see both. No second acknowledgement."""
    slack = slack_on_db
    env, _ = await slack.say("login page shows an error")
    ts = env["event"]["ts"]
    await slack.fake.wait_posts(1, channel=CHANNEL)
    [t] = slack.h.tickets()
    assert not t["security"] and t["severity"] > 1
    edit = edit_event(env, text="login page shows an error. Update: we were hacked")
    assert (await slack.post(edit)).status == 200
    [t] = slack.h.tickets()
    assert (t["severity"], t["security"], t["message_count"]) == (1, True, 1)
    [dm] = await slack.fake.wait_posts(1, channel=IRT_USER)
    assert t["reference"] in dm.params["text"] and "we were hacked" in dm.params["text"]
    [alert] = await smtp_relay.wait_for(1)
    assert alert.rcpt_tos == ("irt-lead@example.com",) and t["reference"] in alert.message["Subject"]
    assert "will reach out" in alert.message.get_content()  # the alert says the customer was told
    [_, notice] = await slack.fake.wait_posts(2, channel=CHANNEL)
    assert notice.params["thread_ts"] == ts and "Severity 1" in notice.params["text"]
    assert "will reach out to you directly" in notice.params["text"]
    detail = slack.h.detail(t["reference"])
    first, changed = detail["messages"]
    assert (first["route"], first["body"], first["edits"]) == ("new", "login page shows an error", [changed["id"]])
    assert (changed["route"], changed["edit_of"], changed["direction"], changed["sender"]) == (
        "edit", first["id"], "inbound", "U0ALICE"
    )  # fmt: skip
    assert changed["body"] == "login page shows an error. Update: we were hacked"
    assert changed["sent_date"].timestamp() == pytest.approx(float(edit["event"]["ts"]))  # when it was edited
    assert [h["rule"] for h in changed["hits"]] == ["account-compromise"]
    assert [h["rule"] for h in detail["evidence"]] == ["account-compromise"]
    assert any(n["text"] == "raised to Severity 1 by an edit" for n in detail["notes"])
    assert edit_outcomes(slack) == {"recorded": 1}
    # A second edit that keeps the words changes the text, not the ticket: no second page or
    # notice, and no second copy of the evidence it already has.
    fix = edit_event(env, text="login page shows an error. Update: we were hacked!", previous_text=changed["body"])
    assert (await slack.post(fix)).status == 200
    await slack.settled()
    await asyncio.sleep(0.3)
    await slack.fake.wait_posts(2, channel=CHANNEL)
    await slack.fake.wait_posts(1, channel=IRT_USER)
    await smtp_relay.wait_for(1)
    detail = slack.h.detail(t["reference"])
    assert [m["route"] for m in detail["messages"]] == ["new", "edit", "edit"]
    assert [h["rule"] for h in detail["evidence"]] == ["account-compromise"]
    # What staff read: the triage page and `tickets show` give each version, marked.
    page = render_ticket(detail, now=datetime.now(UTC))
    assert page.count(f"edit of message {first['id']}, made ") == 2 and "edited later: see below" in page
    assert ">login page shows an error</pre>" in page and "Update: we were hacked!</pre>" in page
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\nurl = "{slack.h.settings.storage.url}"\n')
    code, out = cli("--config", str(cfg), "tickets", "show", t["reference"])
    assert code == 0 and f"--- edit of message {first['id']} inbound from U0ALICE at edited " in out, out
    code, out = cli("--config", str(cfg), "tickets", "show", t["reference"], "--json")
    shown = json.loads(out)
    assert shown["message_count"] == 1
    assert [(m["edit_of"], m["edits"]) for m in shown["messages"]] == [
        (None, [m["id"] for m in detail["messages"][1:]]), (first["id"], []), (first["id"], [])
    ]  # fmt: skip


async def test_a_retried_edit_changes_nothing_and_two_edits_both_count(slack_on_db: Slack) -> None:
    """Slack retries an event with the same event_id and the same edit: stored once. Two edits
    of one message are two, whatever order they come in; the message reads as the latest."""
    slack = slack_on_db
    env, _ = await slack.say("Exports time out")
    ts = env["event"]["ts"]
    await slack.fake.wait_posts(1)
    second = int(float(ts)) + 1
    texts = [
        "Exports time out",
        "Exports time out after 30 s",
        "Exports time out after 30 s (CSV)",
        "Exports of CSV time out",
    ]
    a, b, c = (
        edit_event(env, text=texts[i + 1], previous_text=texts[i], edit_ts=f"{second + i}.000100") for i in range(3)
    )
    retry = {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
    answers = [
        await slack.post(a),
        await slack.post(a, headers=retry),
        await slack.post(c),  # the third edit before the second (the second's delivery was retried)
        await slack.post(b, headers=retry),
        await slack.post(json.dumps(a), timestamp=int(time.time()) - 200),  # a replay, within the window
        await slack.post(c, headers={"X-Slack-Retry-Num": "2", "X-Slack-Retry-Reason": "http_timeout"}),
    ]
    assert [x.status for x in answers] == [200] * 6
    [t] = slack.h.tickets()
    first_id = slack.h.detail(t["reference"])["messages"][0]["id"]
    assert versions(slack, t["reference"]) == [
        ("new", texts[0], None), ("edit", texts[1], first_id), ("edit", texts[3], first_id),
        ("edit", texts[2], first_id),
    ]  # fmt: skip
    assert t["message_count"] == 1 and slack.h.stats()["message_edits"] == 3
    assert edit_outcomes(slack) == {"recorded": 3, "duplicate": 3}
    # What an edit is compared with: the text of the latest edit, by when it was made.
    now = slack.h.read(lambda uow: uow.stored_message(f"slack:{TEAM}/{CHANNEL}", f"ext:{TEAM}/{CHANNEL}/{ts}"))
    assert now is not None and now.text == texts[3] and now.id == first_id
    await slack.settled()
    await asyncio.sleep(0.3)
    await slack.fake.wait_posts(1)  # an edit is never acknowledged


async def test_a_change_that_keeps_the_text_changes_nothing(slack: Slack) -> None:
    """Slack sends message_changed when it unfurls a link (attachments added, no ``edited``)
    or updates a thread's reply count: the text is as it was, so nothing is stored, assessed or
    answered, whatever the preview says. A real edit in between is recorded."""
    env, _ = await slack.say("The guide at <https://docs.acme.test/sso> says to restart SSO")
    text = env["event"]["text"]
    await slack.fake.wait_posts(1)
    preview = {"attachments": [{"id": 1, "from_url": "https://docs.acme.test/sso", "service_name": "Acme docs",
                                "title": "SSO", "text": "What to do after a data breach"}]}  # fmt: skip
    unfurl = edit_event(env, text=text, edited=False, **preview)
    no_before = edit_event(env, text=text, edited=False, reply_count=1)  # Slack gave no previous_message
    del no_before["event"]["previous_message"]
    edited = text + " but it did not help"
    edit = edit_event(env, text=edited)
    # The edited message's link previewed again: it keeps its `edited`, and its text.
    again = edit_event(env, text=edited, previous_text=edited, edited=False, **preview)
    again["event"]["message"]["edited"] = edit["event"]["message"]["edited"]
    answers = [await slack.post(e) for e in (unfurl, no_before, edit, again)]
    assert [x.status for x in answers] == [200] * 4
    [t] = slack.h.tickets()
    ref = t["reference"]
    assert [(route, body) for route, body, _ in versions(slack, ref)] == [
        ("new", "The guide at https://docs.acme.test/sso says to restart SSO"),
        ("edit", "The guide at https://docs.acme.test/sso says to restart SSO but it did not help"),
    ]
    assert not t["security"] and slack.h.detail(ref)["evidence"] == []
    assert edit_outcomes(slack) == {"unchanged": 3, "recorded": 1}
    await slack.settled()
    await asyncio.sleep(0.3)
    await slack.fake.wait_posts(1)


async def test_edits_by_bots_and_by_us_change_nothing(slack: Slack) -> None:
    """A bot's post (in the channel, in a ticket's thread; ours too) is no customer's: neither
    is its update, whatever it says. A person's edit of their message, in the same thread, is."""
    env, _ = await slack.say("Nightly sync fails with E1042")
    root = env["event"]["ts"]
    await slack.fake.wait_posts(1)
    posts = [
        message_event(text="Deploy started", user=None, subtype="bot_message", bot_id="B0DEPLOY"),
        message_event(text="Build #42 running", user="U0JENKINS", bot_id="B0JENKINS", thread_ts=root),
        message_event(text="Thanks, we have opened a ticket", user=BOT_USER, bot_id=BOT_ID, thread_ts=root),
    ]
    edits = [
        edit_event(posts[0], text="Deploy failed: data breach drill", edited=False),
        edit_event(posts[1], text="Build #42: we were hacked"),
        edit_event(posts[2], text="we were hacked", edited=False),
    ]
    reply, _ = await slack.say("It failed again tonight", thread_ts=root)
    person = edit_event(reply, text="It failed again tonight, and the night before")
    answers = [await slack.post(e) for e in (*posts, *edits, person)]
    assert [x.status for x in answers] == [200] * 7
    [t] = slack.h.tickets()
    assert not t["security"] and t["message_count"] == 2
    assert [route for route, _, _ in versions(slack, t["reference"])] == ["new", "thread", "edit"]
    assert edit_outcomes(slack) == {"recorded": 1}
    await slack.settled()
    await asyncio.sleep(0.3)
    await slack.fake.wait_posts(1)


async def test_two_edits_within_one_second_are_two(slack_on_db: Slack) -> None:
    """Slack writes when a message was edited (``edited.ts``) in whole seconds, so two edits
    made within one second carry the same; each change's event has a ts of its own. Both are
    stored, each once however often Slack retries it, and the second, which reports an
    incident, raises the ticket."""
    slack = slack_on_db
    env, _ = await slack.say("Exports time out")
    await slack.fake.wait_posts(1)
    second = int(float(env["event"]["ts"])) + 5
    texts = ["Exports time out", "Exports time out (CSV)", "Exports time out (CSV). Update: we were hacked"]
    first, then = (
        edit_event(env, text=texts[i + 1], previous_text=texts[i], edit_ts=f"{second}.00{i + 1}00") for i in range(2)
    )
    assert first["event"]["message"]["edited"] == then["event"]["message"]["edited"]  # as Slack sends them
    retry = {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
    answers = [
        await slack.post(first),
        await slack.post(then),
        await slack.post(then, headers=retry),
        await slack.post(first, headers=retry),
    ]
    assert [x.status for x in answers] == [200] * 4
    [t] = slack.h.tickets()
    first_id = slack.h.detail(t["reference"])["messages"][0]["id"]
    assert versions(slack, t["reference"]) == [
        ("new", texts[0], None), ("edit", texts[1], first_id), ("edit", texts[2], first_id)
    ]  # fmt: skip
    assert (t["severity"], t["security"]) == (1, True)
    assert edit_outcomes(slack) == {"recorded": 2, "duplicate": 2}
    await slack.fake.wait_posts(1, channel=IRT_USER)


async def test_an_edit_of_a_message_intake_never_stored_brings_in_the_message_as_posted(
    slack_on_db: Slack,
) -> None:
    """A message posted before intake was in the channel (its event never came), then edited:
    its words are addressed to support, so the edit brings the message in as it read before
    (Slack's ``previous_message``), on the path of a new message, and is stored beside it as
    an edit, assessed as one: here it reports an incident, so the ticket is Severity 1 and the
    IRT lead paged. One acknowledgement, in the message's thread, gives the ticket as it then
    stands. Retries, the original's event coming late, a later edit and its retry change
    nothing more than they should. In a ticket's thread such a message is a follow-up."""
    slack = slack_on_db
    posted = message_event(text="Invoices show the wrong currency")  # never delivered to intake
    ts = posted["event"]["ts"]
    edit = edit_event(posted, text="Invoices show the wrong currency. We were hacked last night")
    assert (await slack.post(edit)).status == 200
    [t] = slack.h.tickets()
    assert (t["severity"], t["security"], t["requester"], t["message_count"]) == (1, True, "U0ALICE", 1)
    [ack] = await slack.fake.wait_posts(1, channel=CHANNEL)
    assert ack.params["thread_ts"] == ts and t["reference"] in ack.params["text"]
    said = " ".join(ack.params["text"].split())
    assert "Severity 1" in said and "will reach out to you directly" in said
    [dm] = await slack.fake.wait_posts(1, channel=IRT_USER)
    assert "We were hacked" in dm.params["text"]
    m, e = slack.h.detail(t["reference"])["messages"]
    assert (m["route"], m["body"], m["external_id"], m["edit_of"]) == (
        "new", "Invoices show the wrong currency", f"{TEAM}/{CHANNEL}/{ts}", None
    )  # fmt: skip
    assert "intake first saw it as an edit" in m["route_note"]
    assert (e["route"], e["body"], e["edit_of"]) == ("edit", edit["event"]["message"]["text"], m["id"])
    assert [h["rule"] for h in e["hits"]] == ["account-compromise"]
    later = edit_event(posted, text="Invoices show EUR, not USD. We were hacked last night", previous_text=e["body"])
    retry = {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
    late = [
        await slack.post(edit, headers=retry),
        await slack.post(posted, headers={"X-Slack-Retry-Num": "3", "X-Slack-Retry-Reason": "http_error"}),
        await slack.post(later),
        await slack.post(edit, headers={"X-Slack-Retry-Num": "2", "X-Slack-Retry-Reason": "http_timeout"}),
    ]
    # In the thread of a ticket: a follow-up, no acknowledgement.
    reply = message_event(text="Also the tax column is empty", thread_ts=ts, user="U0BOB")
    late.append(await slack.post(edit_event(reply, text="Also the tax column is empty since Monday")))
    assert [x.status for x in late] == [200] * 5
    [t] = slack.h.tickets()
    rows = slack.h.detail(t["reference"])["messages"]
    assert [(r["route"], r["body"], r["edit_of"]) for r in rows] == [
        ("new", "Invoices show the wrong currency", None),
        ("edit", edit["event"]["message"]["text"], m["id"]),
        ("edit", later["event"]["message"]["text"], m["id"]),
        ("thread", "Also the tax column is empty", None),
        ("edit", "Also the tax column is empty since Monday", rows[3]["id"]),
    ]
    assert edit_outcomes(slack) == {"taken_in": 2, "duplicate": 2, "recorded": 1}
    await slack.settled()
    await asyncio.sleep(0.3)
    await slack.fake.wait_posts(1, channel=CHANNEL)  # no notice beside the acknowledgement
    await slack.fake.wait_posts(1, channel=IRT_USER)


async def test_an_edit_of_a_report_never_stored_does_not_unsay_it(slack_on_db: Slack, smtp_relay: RelayStandIn) -> None:
    """The report of an incident never reached intake (intake down past Slack's retries); its
    author then edits it away. The report is taken in as it was posted: a security incident,
    the IRT lead paged with its words, the customer told; the edit is stored beside it and
    lowers nothing. The report's own event, coming late, is a duplicate."""
    slack = slack_on_db
    report = "We were hacked: someone logged into our admin account"
    posted = message_event(text=report)
    edit = edit_event(posted, text="Please ignore, wrong channel")
    assert (await slack.post(edit)).status == 200
    late = await slack.post(posted, headers={"X-Slack-Retry-Num": "3", "X-Slack-Retry-Reason": "http_error"})
    assert late.status == 200
    [t] = slack.h.tickets()
    assert (t["severity"], t["security"], t["message_count"]) == (1, True, 1)
    m, e = slack.h.detail(t["reference"])["messages"]
    assert (m["route"], m["body"]) == ("new", report) and "account-compromise" in [h["rule"] for h in m["hits"]]
    assert (e["route"], e["body"], e["edit_of"], e["hits"]) == ("edit", "Please ignore, wrong channel", m["id"], [])
    [dm] = await slack.fake.wait_posts(1, channel=IRT_USER)
    assert report in dm.params["text"]
    [alert] = await smtp_relay.wait_for(1)
    assert t["reference"] in alert.message["Subject"] and "will reach out" in alert.message.get_content()
    [ack] = await slack.fake.wait_posts(1, channel=CHANNEL)
    assert "will reach out to you directly" in " ".join(ack.params["text"].split())
    counts = slack.h.app.service.recorder.counts
    assert counts[("messages", "slack", "duplicate")] == 1 and edit_outcomes(slack) == {"taken_in": 1}


async def test_an_edit_taken_in_without_how_it_read_before_is_stored_once(slack_on_db: Slack) -> None:
    """When the event does not say how the message read before, the message is taken in as it
    now reads; the edit's retry, after a later edit, is known again: the message is not stored
    a second time as an edit of itself."""
    slack = slack_on_db
    posted = message_event(text="Invoices show the wrong currency")  # never delivered to intake
    edit = edit_event(posted, text="Invoices show the wrong currency since Monday")
    del edit["event"]["previous_message"]
    later = edit_event(
        posted, text="Invoices show EUR, not USD, since Monday", previous_text=edit["event"]["message"]["text"]
    )
    retry = {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
    answers = [await slack.post(edit), await slack.post(later), await slack.post(edit, headers=retry)]
    assert [x.status for x in answers] == [200] * 3
    [t] = slack.h.tickets()
    m, *_ = rows = slack.h.detail(t["reference"])["messages"]
    assert [(r["route"], r["body"], r["edit_of"]) for r in rows] == [
        ("new", "Invoices show the wrong currency since Monday", None),
        ("edit", "Invoices show EUR, not USD, since Monday", m["id"]),
    ]
    assert "how it read before is unknown" in m["route_note"]
    assert edit_outcomes(slack) == {"taken_in": 1, "recorded": 1, "duplicate": 1}


async def test_an_event_whose_subtype_is_no_string_is_ignored_and_logged(
    slack: Slack, caplog: pytest.LogCaptureFixture
) -> None:
    """A subtype that is a list or an object (an edit's, or the event's own) is no subtype we
    know: acknowledged (200: Slack does not retry it), ignored, a warning logged; not a 500."""
    caplog.set_level(logging.INFO, logger="intake.slack")
    env, _ = await slack.say("Exports time out")
    await slack.fake.wait_posts(1)
    edit = edit_event(env, text="Exports time out. We were hacked")
    edit["event"]["message"]["subtype"] = ["file_share"]
    odd = [edit, message_event(text="we were hacked"), message_event(text="we were hacked")]
    odd[1]["event"]["subtype"] = ["file_share"]
    odd[2]["event"]["subtype"] = {"name": "file_share"}
    answers = [await slack.post(e) for e in odd]
    assert [x.status for x in answers] == [200] * 3
    [t] = slack.h.tickets()
    assert not t["security"] and versions(slack, t["reference"]) == [("new", "Exports time out", None)]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert all(any(e["event_id"] in w and "malformed" in w for w in warned) for e in odd), warned
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_staff_edits_are_recorded_never_assessed(slack: Slack) -> None:
    env, _ = await slack.say("SAML login fails for new users")
    root = env["event"]["ts"]
    await slack.fake.wait_posts(1)
    staff, _ = await slack.say("Looking into it", user="U0STAFF", thread_ts=root)
    answer = await slack.post(edit_event(staff, text="Looking into it: no sign of a data breach or of hacked accounts"))
    assert answer.status == 200
    [t] = slack.h.tickets()
    assert not t["security"] and t["severity"] > 1
    msgs = slack.h.detail(t["reference"])["messages"]
    assert [(m["route"], m["direction"], m["hits"]) for m in msgs] == [
        ("new", "inbound", []), ("thread", "staff", []), ("edit", "staff", [])
    ]  # fmt: skip
    await slack.settled()
    await asyncio.sleep(0.3)
    await slack.fake.wait_posts(1)


async def test_a_deletion_keeps_what_was_said_and_is_logged(slack: Slack, caplog: pytest.LogCaptureFixture) -> None:
    """What a customer said stays on the ticket when they delete it in Slack (a report of an
    incident must not be unsaid, by them or by whoever has their account); the log says."""
    caplog.set_level(logging.INFO, logger="intake.slack")
    env, _ = await slack.say("we were hacked, please call")
    ts = env["event"]["ts"]
    await slack.fake.wait_posts(1, channel=CHANNEL)
    before = {"type": "message", "user": "U0ALICE", "text": "we were hacked, please call", "ts": ts}
    deleted = message_event(
        text="", user=None, subtype="message_deleted", hidden=True, deleted_ts=ts, previous_message=before
    )
    assert (await slack.post(deleted)).status == 200
    [t] = slack.h.tickets()
    assert t["security"] and versions(slack, t["reference"]) == [("new", "we were hacked, please call", None)]
    [line] = [r for r in caplog.records if "deleted in Slack" in r.getMessage()]
    assert line.levelno == logging.INFO and ts in line.getMessage() and deleted["event_id"] in line.getMessage()


async def test_the_irt_direct_message_shows_a_customers_markup_as_text(slack: Slack) -> None:
    # An emailed report whose words carry Slack markup: in the lead's direct message it must
    # stay text, not become a link dressed as our own "open the ticket" nor an @channel.
    body = "We were hacked.\n<https://evil.example/sso|Open the ticket in intake> <!channel> <@U0IRTLEAD> & more\n"
    await slack.h.send(mail(subject="urgent <!here>", body=body, sender="dan@acme.com"))
    [dm] = await slack.fake.wait_posts(1, channel=IRT_USER)
    text = dm.params["text"]
    assert "&lt;https://evil.example/sso|Open the ticket in intake&gt;" in text
    assert "&lt;!channel&gt; &lt;@U0IRTLEAD&gt; &amp; more" in text and "urgent &lt;!here&gt;" in text
    assert "<https://evil" not in text and "<!" not in text and "<@" not in text
    # Slack's own escaping of what a customer typed in a channel is kept as sent, not undone.
    await slack.say("data breach: see &lt;https://evil.example|the audit log&gt;")
    [_, dm2] = await slack.fake.wait_posts(2, channel=IRT_USER)
    assert "&lt;https://evil.example|the audit log&gt;" in dm2.params["text"]


async def test_the_triage_channel_post_shows_a_customers_markup_as_text(
    tmp_path: Path, smtp_relay: RelayStandIn, fake: FakeSlack, http: aiohttp.ClientSession
) -> None:
    """The new-ticket post to the team's triage channel carries the customer's subject and
    words: an emailed <!channel> pinged the whole channel, and a <url|label> became a link
    dressed as ours. The email to the triage address keeps the text as written."""
    extra = '[triage]\nemail = "triage@example.com"\nslack_channel = "C0TRIAGE"\n'
    async with slack_intake(tmp_path, smtp_relay, fake, http, extra=extra) as s:
        body = "Exports fail.\n<https://evil.example/sso|Open the ticket> <!channel> <@U0STAFF> & more\n"
        await s.h.send(mail(subject="urgent <!here>", body=body, sender="dan@acme.com"))
        [post] = await fake.wait_posts(1, channel="C0TRIAGE")
        text = post.params["text"]
        assert "&lt;https://evil.example/sso|Open the ticket&gt; &lt;!channel&gt; &lt;@U0STAFF&gt; &amp; more" in text
        assert "urgent &lt;!here&gt;" in text and "<!" not in text and "<@" not in text and "<https" not in text
        triage = [m for m in await smtp_relay.wait_for(2) if m.rcpt_tos == ("triage@example.com",)]
        assert "<!channel> <@U0STAFF> & more" in triage[0].message.get_content()


async def test_storage_failure_answers_5xx_and_the_retry_is_stored_once(
    tmp_path: Path, smtp_relay: RelayStandIn, fake: FakeSlack, http: aiohttp.ClientSession
) -> None:
    async with slack_intake(tmp_path, smtp_relay, fake, http, extra="[storage]\nlock_timeout = 0.3\n") as slack:
        env = message_event(text="SSO login loops forever")
        # Another process holds the write lock: a real database failure, not a mock.
        blocker = sqlite3.connect(tmp_path / "intake.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            failed = await slack.post(env)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert failed.status == 503 and "sqlite" not in failed.text.lower()
        assert slack.h.stats()["tickets"] == 0 and slack.h.stats()["messages"] == 0
        retry = await slack.post(env, headers={"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_error"})
        again = await slack.post(env, headers={"X-Slack-Retry-Num": "2", "X-Slack-Retry-Reason": "http_error"})
        assert (retry.status, again.status) == (200, 200)
        assert slack.h.stats()["tickets"] == 1 and slack.h.stats()["messages"] == 1
        await slack.settled()
        await fake.wait_posts(1)


async def test_staff_replies_are_recorded_not_acknowledged(slack: Slack) -> None:
    env, _ = await slack.say("Our SAML certificate expires tomorrow, what do we do?")
    root = env["event"]["ts"]
    await slack.fake.wait_posts(1)
    _, a1 = await slack.say("Looking into it now", user="U0STAFF", thread_ts=root)
    # In a Slack Connect channel, a member of our home workspace is staff too.
    _, a2 = await slack.say("Upload the new one under Settings > SSO", user="U0HOMEMATE", user_team="T0HOME",
                            ext_shared=True, thread_ts=root)  # fmt: skip
    # A staff message outside any ticket opens nothing.
    _, a3 = await slack.say("Morning all, maintenance window tonight at 22:00", user="U0STAFF")
    assert (a1.status, a2.status, a3.status) == (200, 200, 200)
    [t] = slack.h.tickets()
    msgs = slack.h.detail(t["reference"])["messages"]
    assert [(m["sender"], m["direction"]) for m in msgs] == [
        ("U0ALICE", "inbound"), ("U0STAFF", "staff"), ("U0HOMEMATE", "staff")
    ]  # fmt: skip
    await slack.settled()
    await asyncio.sleep(0.3)
    await slack.fake.wait_posts(1)


class Failing:
    """The real service behind a switch that makes ``receive`` raise (a bug, not a storage failure)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.recorder = real.recorder
        self.failing = True

    async def receive(self, message: Any) -> Any:
        if self.failing:
            raise RuntimeError("secret internal detail")
        return await self.real.receive(message)


async def test_unexpected_error_answers_500_neutrally_and_keeps_serving(slack: Slack) -> None:
    listener = slack.h.app.slack_listener
    listener.service = failing = Failing(listener.service)
    env, answer = await slack.say("help")
    assert answer.status == 500 and "secret" not in answer.text and "RuntimeError" not in answer.text
    failing.failing = False
    assert (await slack.post(env, headers={"X-Slack-Retry-Num": "1"})).status == 200
    assert slack.h.stats()["tickets"] == 1


# -- Socket Mode --------------------------------------------------------------------------------


def socket_settings(fake: FakeSlack) -> SlackSettings:
    return SlackSettings(
        enabled=True,
        mode="socket",
        api_url=fake.api_url,
        bot_token=SecretStr(BOT_TOKEN),
        app_token=SecretStr(APP_TOKEN),
        channels={CHANNEL: "acme"},
    )


async def test_socket_mode_acks_only_what_is_stored(slack: Slack, tmp_path: Path) -> None:
    fake = slack.fake
    failing = Failing(slack.h.app.service)
    failing.failing = False
    listener = SlackListener(service=failing, settings=socket_settings(fake), ping_interval=0.5)  # type: ignore[arg-type]
    await listener.start()
    try:
        peer = await fake.wait_peer(1)
        [opened] = [c for c in fake.calls if c.method == "apps.connections.open"]
        assert opened.headers["authorization"] == f"Bearer {APP_TOKEN}"
        assert listener.port == 0 and "Socket Mode" in listener.describe()
        env = message_event(text="Socket mode: the importer is stuck")
        await fake.push_event(peer, env, envelope_id="env-1")
        await wait_until(lambda: len(peer.acks) == 1)
        assert peer.acks == [{"envelope_id": "env-1"}]
        [t] = slack.h.tickets()
        assert t["organisation"] == "acme"
        await fake.wait_posts(1)
        # A failure to store sends no ack, so Slack redelivers; the redelivery is stored once.
        failing.failing = True
        env2 = message_event(text="Socket mode: second problem")
        await fake.push_event(peer, env2, envelope_id="env-2")
        await asyncio.sleep(0.3)
        assert len(peer.acks) == 1 and len(slack.h.tickets()) == 1
        failing.failing = False
        await fake.push_event(peer, env2, envelope_id="env-3", retry_attempt=1)
        await wait_until(lambda: len(peer.acks) == 2)
        assert len(slack.h.tickets()) == 2
    finally:
        await listener.stop()


async def test_socket_mode_watchdog_replaces_a_silently_dead_client(slack: Slack) -> None:
    fake = slack.fake
    listener = SlackListener(
        service=slack.h.app.service,
        settings=socket_settings(fake),
        ping_interval=0.3,
        watchdog_interval=0.1,
        grace=0.3,
    )
    await listener.start()
    try:
        await fake.wait_peer(1)
        assert await listener.socket_problem() is None
        # The known failure: the client's receive and monitor loops are gone, the socket looks
        # open, nothing arrives and nothing reconnects (slack-sdk #1110, #1446).
        client = listener._socket.client
        client.message_receiver.cancel()
        client.current_session_monitor.cancel()
        second = await fake.wait_peer(2, timeout=5)
        assert listener.reconnects == 1
        env = message_event(text="Socket mode: after the reconnect")
        await fake.push_event(second, env, envelope_id="env-after")
        await wait_until(lambda: len(second.acks) == 1)
        assert len(slack.h.tickets()) == 1
    finally:
        await listener.stop()


# -- the sender, against the fake API ----------------------------------------------------------


async def test_sender_maps_slack_failures(fake: FakeSlack) -> None:
    sender = SlackChatSender(token=BOT_TOKEN, api_url=fake.api_url, timeout=2)
    note = OutgoingChat(channel=CHANNEL, text="hello", thread_ts="1700000000.000100")
    try:
        await sender.send(note)
        [ok] = fake.posts()
        assert ok.params == {"channel": CHANNEL, "text": "hello", "thread_ts": "1700000000.000100",
                             "unfurl_links": False, "unfurl_media": False}  # fmt: skip
        cases: list[tuple[int, str, float | None, type[Exception]]] = [
            (429, "ratelimited", 7, TransientSendError),
            (200, "channel_not_found", None, PermanentSendError),
            (200, "not_in_channel", None, PermanentSendError),
            (200, "is_archived", None, PermanentSendError),
            (200, "invalid_auth", None, TransientSendError),  # an operator fixes the token; keep the note
            (200, "account_inactive", None, TransientSendError),
            (500, "internal_error", None, TransientSendError),
            (503, "service_unavailable", None, TransientSendError),
        ]
        for status, error, retry_after, kind in cases:
            fake.fail_next("chat.postMessage", status=status, error=error, retry_after=retry_after)
            with pytest.raises(kind) as caught:
                await sender.send(note)
            assert error in str(caught.value) and BOT_TOKEN not in str(caught.value)
            if status == 429:
                assert caught.value.retry_after == 7  # type: ignore[attr-defined]
    finally:
        await sender.close()
    # Nothing listening: a network error is transient, and names no token.
    port = fake.port
    await fake.stop()
    down = SlackChatSender(token=BOT_TOKEN, api_url=f"http://127.0.0.1:{port}/api/", timeout=2)
    try:
        with pytest.raises(TransientSendError) as caught:
            await down.send(note)
        assert BOT_TOKEN not in str(caught.value)
    finally:
        await down.close()


# -- translation (pure) ------------------------------------------------------------------------


def test_slack_markup_to_plain_text() -> None:
    assert slack_to_text("<@U1> and <@U2|bob> in <#C1|general>") == "@U1 and @bob in #general"
    assert slack_to_text("<!here> <!channel> <!subteam^S1|@oncall>") == "@here @channel @oncall"
    assert slack_to_text("<https://x.test/a?b=1&amp;c=2|the docs> <https://y.test>") == (
        "the docs (https://x.test/a?b=1&c=2) https://y.test"
    )
    assert slack_to_text("<mailto:a@acme.com|a@acme.com> 1 &lt; 2 &amp;&amp; 3 &gt; 2") == "a@acme.com 1 < 2 && 3 > 2"
    assert slack_to_text("<!date^1392734382^{date_num}|2014-02-18>") == "2014-02-18"
    new, quoted = split_quotes("see below\n&gt; old line one\n&gt; old line two\nmy answer")
    assert (new, quoted) == ("see below\nmy answer", "old line one\nold line two")
    assert split_quotes("intro\n&gt;&gt;&gt; all of\nthis is quoted") == ("intro", "all of\nthis is quoted")


def test_to_inbound_fields() -> None:
    settings = socket_settings(FakeSlack())
    settings = settings.model_copy(update={"staff_users": ["U0STAFF"], "home_team": "T0HOME"})
    env = message_event(text="hi <@U9>", ts="1700000000.000200", thread_ts="1700000000.000100",
                        user_profile={"display_name": "Alice", "real_name": "Alice A."},
                        files=[{"name": "trace.har", "mimetype": "application/json", "size": 1234}])  # fmt: skip
    m = to_inbound(env, settings=settings, bot_user_id=BOT_USER)
    assert not isinstance(m, Ignored)
    assert (m.sender, m.sender_name, m.subject, m.body, m.new_text) == ("U0ALICE", "Alice", "", "hi @U9", "hi @U9")
    assert m.recipient == f"slack:{TEAM}/{CHANNEL}" and m.organisation == "acme" and not m.staff
    assert m.chat_channel == CHANNEL and m.chat_ts == "1700000000.000200"
    assert m.chat_thread_ts == "1700000000.000100"
    assert m.thread_key == f"{TEAM}/{CHANNEL}/1700000000.000100"
    assert m.external_id == f"{TEAM}/{CHANNEL}/1700000000.000200" and m.event_id == env["event_id"]
    assert m.date is not None and m.date.timestamp() == pytest.approx(1700000000.0002)
    assert [(a.filename, a.size, a.kept) for a in m.attachments] == [("trace.har", 1234, False)]
    raw = json.loads(m.raw)
    assert raw["event"]["ts"] == "1700000000.000200" and "token" not in raw
    top = to_inbound(message_event(text="x", ts="1700000000.000300"), settings=settings)
    assert not isinstance(top, Ignored)
    assert top.chat_thread_ts is None and top.thread_key == f"{TEAM}/{CHANNEL}/1700000000.000300"
    # The adapter reports the facts (author's workspace, shared channel); the core decides who
    # is staff (test_the_core_decides_who_is_staff and the staff-reply test above).
    home = {"user": "U0HOME1", "user_team": "T0HOME"}
    shared = to_inbound(message_event(text="x", ext_shared=True, **home), settings=settings)
    own_ws = to_inbound(message_event(text="x", ext_shared=False, **home), settings=settings)
    assert not isinstance(shared, Ignored) and not isinstance(own_ws, Ignored)
    assert (shared.author_team, shared.shared_channel, shared.staff) == ("T0HOME", True, False)
    assert (own_ws.author_team, own_ws.shared_channel) == ("T0HOME", False)


def test_to_inbound_of_an_edit() -> None:
    """message_changed becomes the core's InboundEdit: the message as it now reads, with the ids
    of the message edited, how it read before, and the edit's own ts."""
    settings = socket_settings(FakeSlack())
    posted = message_event(text="hi <@U9>", ts="1700000000.000200", thread_ts="1700000000.000100")
    env = edit_event(posted, text="hi <@U9|bob>, we were hacked\n&gt; quoted", edit_ts="1700000100.000300")
    edit = to_inbound(env, settings=settings, bot_user_id=BOT_USER)
    assert isinstance(edit, InboundEdit)
    m = edit.message
    assert (m.sender, m.body, m.new_text, m.quoted) == (
        "U0ALICE", "hi @bob, we were hacked\n> quoted", "hi @bob, we were hacked", "quoted"
    )  # fmt: skip
    assert m.external_id == f"{TEAM}/{CHANNEL}/1700000000.000200" and m.chat_ts == "1700000000.000200"
    assert m.thread_key == f"{TEAM}/{CHANNEL}/1700000000.000100" and m.organisation == "acme"
    assert m.event_id == env["event_id"] and json.loads(m.raw)["event"]["subtype"] == "message_changed"
    # The change is known by the event's own ts; when it was made, by ``edited.ts`` (seconds).
    assert env["event"]["message"]["edited"]["ts"] == "1700000100.000000"
    assert edit.edit_id == "1700000100.000300" and edit.edited_at == datetime.fromtimestamp(1700000100, UTC)
    assert edit.previous is not None and edit.previous.body == "hi @U9" and not edit.text_unchanged
    assert edit.dedup_key == f"edit:ext:{TEAM}/{CHANNEL}/1700000000.000200@1700000100.000300"
    unfurl = to_inbound(edit_event(posted, text="hi <@U9>", edited=False), settings=settings)
    assert isinstance(unfurl, InboundEdit) and unfurl.text_unchanged  # the core sees it changed nothing
    no_message = edit_event(posted, text="y")
    del no_message["event"]["message"]
    odd_subtype = edit_event(posted, text="y")
    odd_subtype["event"]["message"]["subtype"] = ["file_share"]
    ignored = {
        "bot": edit_event(message_event(text="x", user="U0JENKINS", bot_id="B0JENKINS"), text="y"),
        "subtype": edit_event(message_event(text="x", user=None, subtype="bot_message", bot_id="B1"), text="y"),
        "ours": edit_event(message_event(text="x", user=BOT_USER), text="y", edited=False),
        "unconnected channel": edit_event(message_event(text="x", channel="C0NOTOURS"), text="y"),
        "edit": no_message,
        "malformed": odd_subtype,
        "deleted": message_event(text="", user=None, subtype="message_deleted", deleted_ts="1700000000.000200"),
    }
    for key, event in ignored.items():
        result = to_inbound(event, settings=settings, bot_user_id=BOT_USER)
        assert isinstance(result, Ignored) and result.key == key, (key, result)


def test_the_core_decides_who_is_staff() -> None:
    from adapters.bootstrap import build_service
    from adapters.settings import Settings

    settings = Settings.model_validate(
        {
            "slack": {"staff_users": ["U0STAFF"], "home_team": "T0HOME"},
            "staff": {"addresses": ["agent@example.com"]},
        }
    )
    service = build_service(settings, store=None)

    def chat(user: str, team: str | None = None, shared: bool = False) -> InboundMessage:
        return InboundMessage(
            channel=Channel.SLACK, sender=user, chat_channel=CHANNEL, author_team=team, shared_channel=shared
        )

    assert service.is_staff(chat("U0STAFF"))  # a configured staff user, anywhere
    assert service.is_staff(chat("U0HOME1", team="T0HOME", shared=True))  # our workspace, shared channel
    assert not service.is_staff(chat("U0HOME1", team="T0HOME", shared=False))  # our workspace's own channel
    assert not service.is_staff(chat("U0ALICE", team="T0CUSTOMR", shared=True))  # the customer's people
    assert service.is_staff(InboundMessage(channel=Channel.EMAIL, sender="agent@example.com"))
    assert not service.is_staff(InboundMessage(channel=Channel.EMAIL, sender="U0STAFF"))  # chat ids: chat only
