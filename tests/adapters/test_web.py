"""The triage page, /metrics and /healthz: a whole intake with [web] on, real SMTP in, real HTTP out.

The page is also rendered by a real headless Chromium (Debian's ``chromium``): the DOM it builds
must show the tickets in severity order with the security incident first and marked. With
$INTAKE_SCREENSHOTS naming a directory, its screenshots are kept there (intake-triage.png,
intake-ticket.png) for a person to look at.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from adapters.web import render_ticket, time_left
from tests.adapters.conftest import RelayStandIn
from tests.adapters.harness import Harness, mail, ref_of, running_intake, settings_for

TOKEN = "s3cret"
USER, PASSWORD = "triage", "correct horse battery"
WEB = f"""
[web]
enabled = true
listen_port = 0
token = "{TOKEN}"
username = "{USER}"
password = "{PASSWORD}"
"""
BEARER = {"Authorization": f"Bearer {TOKEN}"}
SECURITY_SUBJECT = "Possible data breach, unauthorized access to our account"
INJECTION = "<script>alert(1)</script> & <b>bold</b>"
CHROMIUM = Path("/usr/bin/chromium")
DATA = Path(__file__).resolve().parent.parent / "data" / "email"
SCREENSHOTS = os.environ.get("INTAKE_SCREENSHOTS")  # where to keep the screenshots, if anywhere


class ShiftedClock:
    """The system clock moved by ``offset``: lets a test write a ticket in the past."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Web:
    h: Harness
    clock: ShiftedClock

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.h.app.web.port}"

    async def get(
        self, path: str, headers: dict[str, str] | None = None, cookies: dict[str, str] | None = None
    ) -> tuple[int, CIMultiDictProxy[str], str]:
        async with (
            aiohttp.ClientSession(cookies=cookies) as session,
            session.get(self.base + path, headers=headers, allow_redirects=False) as resp,
        ):
            return resp.status, resp.headers, await resp.text()

    async def page(self, path: str) -> str:
        status, _, text = await self.get(path, BEARER)
        assert status == 200, (path, status, text[:300])
        return text


@pytest.fixture
async def web(tmp_path: Path, smtp_relay: RelayStandIn) -> AsyncIterator[Web]:
    clock = ShiftedClock()
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=WEB), clock=clock) as h:
        yield Web(h, clock)


async def seed(w: Web) -> dict[str, str]:
    """Four tickets: an overdue ordinary one (written 9 hours ago), a security incident, an
    ordinary one, and one whose subject and body try HTML injection. Returns name -> reference."""
    refs: dict[str, str] = {}
    w.clock.offset = -timedelta(hours=9)  # Severity 3 allows 8 hours: overdue by about an hour
    reply = await w.h.send(
        mail(subject="Invoice export stuck since yesterday", sender="Dana Ops <dana@globex.test>"),
        mail_from="dana@globex.test",
    )
    refs["overdue"] = ref_of(reply.text)
    w.clock.offset = timedelta(0)
    reply = await w.h.send(
        mail(
            subject=SECURITY_SUBJECT,
            body="Hello,\nwe saw logins from an unknown country this morning.\nPlease call us.\n",
        )
    )
    refs["security"] = ref_of(reply.text)
    reply = await w.h.send(
        mail(subject="Dashboard shows no data", sender="Bob Builder <bob@acme.com>"), mail_from="bob@acme.com"
    )
    refs["ordinary"] = ref_of(reply.text)
    reply = await w.h.send(
        mail(
            subject=INJECTION,
            body='Look: <img src=x onerror="alert(2)"> and </pre><script>alert(3)</script>\n',
            sender='"<i>Mallory</i>" <mallory@initech.test>',
        ),
        mail_from="mallory@initech.test",
    )
    refs["injection"] = ref_of(reply.text)
    return refs


ROW = re.compile(r'<tr class="ticket[^"]*" data-reference="([^"]+)" data-severity="(\d)" data-security="(yes|no)"')


def rows_of(page: str) -> list[tuple[str, int, bool]]:
    return [(ref, int(sev), sec == "yes") for ref, sev, sec in ROW.findall(page)]


def assert_triage_order(rows: list[tuple[str, int, bool]], refs: dict[str, str]) -> None:
    assert len(rows) == 4, rows
    assert rows[0] == (refs["security"], 1, True), rows
    assert [sev for _, sev, _ in rows] == sorted(sev for _, sev, _ in rows)
    assert not any(sec for _, _, sec in rows[1:])
    # Among equals, the one whose response clock runs out first comes first.
    assert rows[1][0] == refs["overdue"], rows


# -- auth --------------------------------------------------------------------------------------


async def test_auth_is_enforced_on_pages_and_metrics(web: Web) -> None:
    for path in ("/", "/metrics", "/tickets/SUP-0000-0000", "/no-such-page"):
        status, headers, body = await web.get(path)
        assert status == 401, path
        challenges = headers.getall("WWW-Authenticate")
        assert 'Bearer realm="intake"' in challenges and any(c.startswith("Basic ") for c in challenges)
        assert TOKEN not in body and PASSWORD not in body

    assert (await web.get("/", {"Authorization": "Bearer wrong"}))[0] == 401
    assert (await web.get("/", {"Authorization": f"Bearer {TOKEN}x"}))[0] == 401
    assert (await web.get("/?token=nope"))[0] == 401
    assert (await web.get("/", cookies={"intake_session": TOKEN}))[0] == 401  # the cookie is not the token
    status, headers, _ = await web.get("/", BEARER)
    assert status == 200
    assert (
        "script-src" not in headers["Content-Security-Policy"]
        and "default-src 'none'" in headers["Content-Security-Policy"]
    )
    assert headers["Cache-Control"] == "no-store"

    def basic(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    assert (await web.get("/", basic(USER, PASSWORD)))[0] == 200
    assert (await web.get("/metrics", basic(USER, PASSWORD)))[0] == 200
    assert (await web.get("/", basic(USER, "wrong")))[0] == 401
    assert (await web.get("/", basic("root", PASSWORD)))[0] == 401
    assert (await web.get("/", {"Authorization": "Basic !!!not-base64"}))[0] == 401

    # ?token= once: a cookie, and a redirect to the same page without the token.
    status, headers, _ = await web.get("/?token=s3cret&x=1")
    assert status == 303 and headers["Location"] == "/?x=1"
    cookie = headers["Set-Cookie"]
    assert cookie.startswith("intake_session=") and TOKEN not in cookie.split(";")[0]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    assert (await web.get("/", cookies={"intake_session": value}))[0] == 200
    tampered = value[:-1] + ("0" if value[-1] != "0" else "1")
    assert (await web.get("/", cookies={"intake_session": tampered}))[0] == 401
    assert (await web.get("/", cookies={"intake_session": "x" * len(value)}))[0] == 401
    status, headers, _ = await web.get("//evil.example/?token=s3cret")
    assert status == 303 and headers["Location"] == "/evil.example/"
    # Scrapers may pass the token as a parameter; no redirect for them.
    assert (await web.get("/metrics?token=s3cret"))[0] == 200

    # Health is open, and says nothing secret.
    status, _, body = await web.get("/healthz")
    assert status == 200
    assert TOKEN not in body and "127.0.0.1" not in body and str(web.h.settings.outbound.relay_port) not in body


# -- pages -------------------------------------------------------------------------------------


async def test_list_puts_the_security_incident_first_and_escapes_customers(web: Web) -> None:
    refs = await seed(web)
    page = await web.page("/")
    assert_triage_order(rows_of(page), refs)
    first_row = page[page.index(f'data-reference="{refs["security"]}"') :].split("</tr>")[0]
    assert "SECURITY" in first_row and "Sev 1" in first_row and "acme" in first_row
    overdue_row = page[page.index(f'data-reference="{refs["overdue"]}"') :].split("</tr>")[0]
    assert re.search(r'<span class="overdue"[^>]*>overdue \d+h \d\dm</span>', overdue_row), overdue_row
    assert f'href="/tickets/{refs["ordinary"]}"' in page
    assert 'http-equiv="refresh" content="30"' in page
    # Customer text is text: never markup.
    assert "<script>alert(1)</script>" not in page and "<b>bold</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "<script" not in page.lower()


async def test_ticket_page_shows_thread_evidence_and_outbox(web: Web, smtp_relay: RelayStandIn) -> None:
    refs = await seed(web)
    await web.h.outbox_settled()
    page = await web.page(f"/tickets/{refs['security']}")
    assert SECURITY_SUBJECT in page and "SECURITY" in page
    # The thread: direction, sender, how it was routed, the text.
    assert 'data-direction="inbound"' in page and "alice@acme.com" in page
    assert "route <b>new</b>" in page
    assert "we saw logins from an unknown country this morning." in page
    # The rules' evidence.
    assert "security-breach" in page and "unauthorized-access" in page
    assert "<mark>data breach</mark>" in page
    # The outbox: the acknowledgement and the IRT alert, both delivered to the relay.
    assert page.count('class="outbox-entry" data-status="sent"') == 2, page
    assert "irt-alert" in page and "irt-lead@example.com" in page

    page = await web.page(f"/tickets/{refs['injection']}")
    assert "<script" not in page.lower() and "<img" not in page.lower() and "<i>Mallory" not in page
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in page

    # A reference typed in lower case is taken to its canonical address; nonsense is a 404.
    status, headers, _ = await web.get(f"/tickets/{refs['ordinary'].lower()}", BEARER)
    assert status == 308 and headers["Location"] == f"/tickets/{refs['ordinary']}"
    assert (await web.get("/tickets/SUP-0000-0000", BEARER))[0] == 404
    assert (await web.get("/tickets/%3Cscript%3E", BEARER))[0] == 404


async def test_ticket_page_says_when_the_text_was_rendered_from_html(web: Web) -> None:
    """The placeholder plain part ("This message is in HTML format") gave way to the HTML: the
    page shows the report and says where its text came from."""
    raw = (DATA / "alt_placeholder_entourage.eml").read_bytes()
    behind = ref_of((await web.h.send(raw)).text)
    plain = ref_of((await web.h.send(mail(subject="Dashboard shows no data"))).text)
    page = await web.page(f"/tickets/{behind}")
    assert "text rendered from the HTML part" in page and "I think we were hacked overnight." in page
    assert "This message is in HTML format" not in page
    assert "rendered from the HTML" not in await web.page(f"/tickets/{plain}")


def test_ticket_page_marks_negated_evidence_and_waiting_deliveries() -> None:
    now = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
    detail = {
        "reference": "SUP-TEST-0001",
        "subject": "Question",
        "severity": 1,
        "security": True,
        "status": "open",
        "channel": "email",
        "requester": "eve@example.org",
        "requester_name": "",
        "organisation": None,
        "ack_status": "suppressed: automated mail",
        "created_at": now - timedelta(hours=1),
        "response_due": now - timedelta(minutes=12),
        "participants": ["eve@example.org"],
        "notes": [{"at": "2026-11-21T09:00:00+00:00", "text": "<b>note</b>"}],
        "evidence": [
            {
                "rule": "security-breach",
                "phrase": "data breach*",
                "field": "body",
                "negated": True,
                "excerpt": "we had no data breach <ever>",
                "severity": 1,
                "tags": ["security"],
            },
        ],
        "messages": [],
        "outbox": [
            {
                "kind": "irt-alert",
                "recipient": "irt@example.com",
                "status": "pending",
                "attempts": 2,
                "next_attempt_at": now + timedelta(minutes=1),
                "last_error": "421 <busy>",
                "created_at": now,
                "sent_at": None,
                "subject": "alert",
            },
            {
                "kind": "notice",
                "recipient": "x@example.com",
                "status": "undeliverable",
                "attempts": 1,
                "next_attempt_at": now,
                "last_error": "bounced: 550",
                "created_at": now,
                "sent_at": None,
                "subject": "n",
            },
        ],
    }
    page = render_ticket(detail, now=now)
    assert "possibly negated" in page and "<mark>data breach</mark> &lt;ever&gt;" in page
    assert "overdue 12m" in page and "not sent: automated mail" in page
    assert (
        'data-status="waiting"' in page
        and "2 attempts, next 2026-11-21 10:01 UTC" in page
        and "421 &lt;busy&gt;" in page
    )
    assert 'data-status="undeliverable"' in page and "bounced: 550" in page
    assert "&lt;b&gt;note&lt;/b&gt;" in page
    assert "in 5m" in time_left(now + timedelta(minutes=5, seconds=30), now)
    assert "overdue 1d 2h" in time_left(now - timedelta(days=1, hours=2), now)
    assert ">responded<" in time_left(now - timedelta(minutes=1), now, responded=now - timedelta(minutes=5))
    assert "responded late" in time_left(now - timedelta(minutes=5), now, responded=now - timedelta(minutes=1))


# -- metrics -----------------------------------------------------------------------------------

SAMPLE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*\})?'
    r" (-?[0-9.e+-]+|\+Inf|-Inf|NaN)$"
)


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample as 'name{labels}' -> value; fails on a line that is not exposition format."""
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            assert name not in typed, f"TYPE twice for {name}"
            typed.add(name)
            continue
        assert SAMPLE.match(line), f"not a sample line: {line!r}"
        key, value = line.rsplit(" ", 1)
        samples[key] = float(value)
    return samples


async def test_metrics_move_as_messages_arrive(web: Web, smtp_relay: RelayStandIn) -> None:
    status, headers, before_text = await web.get("/metrics", BEARER)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    before = parse_metrics(before_text)
    assert before["intake_outbox_depth"] == 0
    assert before['intake_classification_seconds_bucket{le="+Inf"}'] == 0

    await seed(web)
    # A duplicate delivery, and an auto-reply that gets no acknowledgement.
    await web.h.send(mail(subject="Dashboard shows no data", message_id="<dup@acme.com>"))
    await web.h.send(mail(subject="Dashboard shows no data", message_id="<dup@acme.com>"))
    await web.h.send(mail(subject="Out of office", headers={"Auto-Submitted": "auto-replied"}))
    await web.h.outbox_settled()
    after = parse_metrics((await web.get("/metrics", BEARER))[2])

    def moved(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert moved('intake_messages_received_total{channel="email",outcome="new"}') == 6
    assert moved('intake_messages_received_total{channel="email",outcome="duplicate"}') == 1
    assert moved('intake_tickets_created_total{channel="email"}') == 6
    assert moved('intake_security_incidents_total{channel="email"}') == 1
    assert moved('intake_acknowledgements_total{result="queued"}') == 5
    assert moved('intake_acknowledgements_total{result="sent"}') == 5
    assert moved('intake_acknowledgements_total{result="failed"}') == 0
    suppressed = [k for k in after if k.startswith('intake_acknowledgements_total{result="suppressed",reason=')]
    assert sum(after[k] for k in suppressed) == 1, suppressed
    assert moved('intake_outbox_sent_total{kind="irt-alert"}') == 1
    assert after["intake_outbox_depth"] == 0 and after["intake_outbox_oldest_pending_seconds"] == 0
    assert after['intake_outbox_entries{status="sent"}'] == 6
    assert after["intake_smtp_sessions_active"] == 0
    for name in ("intake_classification_seconds", "intake_storage_seconds"):
        assert after[f"{name}_count"] == 7 and after[f'{name}_bucket{{le="+Inf"}}'] == 7
        assert after[f"{name}_sum"] > 0
        buckets = [v for k, v in after.items() if k.startswith(f"{name}_bucket")]
        assert buckets == sorted(buckets), "buckets are cumulative"
    assert 'le="0.0005"' in (await web.get("/metrics", BEARER))[2]


async def test_metrics_show_retries_and_a_waiting_outbox(web: Web, smtp_relay: RelayStandIn) -> None:
    smtp_relay.fail_next("451 4.3.0 try later", count=50)
    await web.h.send(mail(subject="Dashboard shows no data"))
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        m = parse_metrics((await web.get("/metrics", BEARER))[2])
        if m.get('intake_outbox_retries_total{kind="acknowledgement"}', 0) >= 1:
            break
        assert asyncio.get_running_loop().time() < deadline, "no retry recorded"
        await asyncio.sleep(0.05)
    assert m["intake_outbox_depth"] == 1
    assert m["intake_outbox_oldest_pending_seconds"] >= 0
    [row] = rows_of(await web.page("/"))
    while True:  # the counter moves at the send; the outcome is recorded a moment later
        page = await web.page(f"/tickets/{row[0]}")
        if "451" in page:
            break
        assert asyncio.get_running_loop().time() < deadline, "the failed attempt was not recorded"
        await asyncio.sleep(0.05)
    assert 'data-status="waiting"' in page


# -- health ------------------------------------------------------------------------------------


async def test_healthz_reports_each_check_and_the_relay_going_down(web: Web, smtp_relay: RelayStandIn) -> None:
    status, headers, body = await web.get("/healthz")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    data = json.loads(body)
    assert data["status"] == "ok"
    assert set(data["checks"]) == {"listener", "database", "relay"}
    assert all(c["ok"] for c in data["checks"].values()), data

    # The relay down: degraded but still in service (200): intake takes mail and the outbox
    # waits, and every instance shares the relay, so a 503 would take them all out.
    smtp_relay.stop()
    deadline = asyncio.get_running_loop().time() + 5
    while True:  # a result is shared for a second: wait for a fresh one
        status, _, body = await web.get("/healthz")
        data = json.loads(body)
        if data["status"] != "ok":
            break
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.2)
    assert status == 200 and data["status"] == "degraded"
    assert data["checks"]["relay"] == {"ok": False, "detail": "connection refused"}
    assert data["checks"]["listener"]["ok"] and data["checks"]["database"]["ok"]
    smtp_relay.start()


async def test_healthz_fails_when_this_instance_cannot_take_mail(web: Web) -> None:
    await web.h.app.email_listener.stop(grace=0.1)
    deadline = asyncio.get_running_loop().time() + 5
    while True:  # a result is shared for a second: wait for a fresh one
        status, _, body = await web.get("/healthz")
        if status != 200:
            break
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.2)
    data = json.loads(body)
    assert status == 503 and data["status"] == "failed"
    assert data["checks"]["listener"] == {"ok": False, "detail": "shutting down"}
    assert data["checks"]["database"]["ok"] and data["checks"]["relay"]["ok"]


# -- a real browser --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium, installed on first use when we may (root with apt-get)."""
    if not CHROMIUM.exists():
        problem = _install_chromium()
        if problem:
            if os.environ.get("CI"):
                pytest.fail(f"CI is set and headless Chromium is not available: {problem}")
            pytest.skip(f"headless Chromium is not available: {problem}")
    return CHROMIUM


def _install_chromium() -> str | None:
    if shutil.which("apt-get") is None:
        return f"{CHROMIUM} is missing and apt-get is not available"
    if os.geteuid() != 0:
        return f"{CHROMIUM} is missing and installing it needs root (apt-get install chromium)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
            if done.returncode != 0:
                return f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired as exc:
        return f"{' '.join(map(str, exc.cmd))} took longer than 10 minutes"
    return None if CHROMIUM.exists() else f"apt-get install chromium did not install {CHROMIUM}"


async def run_chromium(chromium: Path, profile: Path, *args: str) -> str:
    # On the test's loop without blocking it: the intake under test answers on this very loop.
    proc = await asyncio.create_subprocess_exec(
        str(chromium),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("chromium did not finish within 60 s") from None
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


async def test_headless_chromium_renders_the_triage_page(web: Web, chromium: Path, tmp_path: Path) -> None:
    refs = await seed(web)
    await web.h.outbox_settled()
    url = f"{web.base}/?token={TOKEN}"
    dom = await run_chromium(chromium, tmp_path / "profile-dom", "--dump-dom", url)
    # The browser followed the redirect with its new cookie and rendered the list.
    assert "<table" in dom, dom[:2000]
    assert_triage_order(rows_of(dom), refs)
    first_row = dom[dom.index(f'data-reference="{refs["security"]}"') :].split("</tr>")[0]
    assert "SECURITY" in first_row
    assert "<script>alert(1)</script>" not in dom and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom

    shot = tmp_path / "triage.png"
    await run_chromium(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", url)
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000, f"screenshot only {shot.stat().st_size} bytes: an empty page?"
    if SCREENSHOTS:
        shutil.copyfile(shot, Path(SCREENSHOTS) / "intake-triage.png")

    detail_shot = tmp_path / "ticket.png"
    await run_chromium(
        chromium,
        tmp_path / "profile-ticket",
        f"--screenshot={detail_shot}",
        f"{web.base}/tickets/{refs['security']}?token={TOKEN}",
    )
    assert detail_shot.stat().st_size > 10_000
    if SCREENSHOTS:
        shutil.copyfile(detail_shot, Path(SCREENSHOTS) / "intake-ticket.png")


def test_ticket_page_says_what_a_pending_note_waits_for() -> None:
    """The same words as `intake tickets show` (intake.dispatch.pending_wait): a note held with
    its channel shows why; one due by now shows since when, not a "next" time past."""
    from adapters.web import outbox_state

    now = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
    held = {
        "status": "pending", "attempts": 0, "next_attempt_at": now - timedelta(minutes=3),
        "last_error": "waiting: email unavailable since 2026-11-21 09:57:00 UTC: relay down",
    }  # fmt: skip
    assert outbox_state(held, now=now) == (
        "waiting",
        "waiting: email unavailable since 2026-11-21 09:57:00 UTC: relay down",
    )
    due = {"status": "pending", "attempts": 1, "next_attempt_at": now - timedelta(seconds=40), "last_error": "421"}
    assert outbox_state(due, now=now) == ("waiting", "1 attempt, due since 2026-11-21 09:59 UTC<br>421")
    new = {"status": "pending", "attempts": 0, "next_attempt_at": now, "last_error": None}
    assert outbox_state(new, now=now) == ("queued", "due since 2026-11-21 10:00 UTC")
