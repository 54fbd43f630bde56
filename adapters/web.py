"""The triage page, health check and metrics: a small aiohttp server on the intake loop.

Routes and who may see them:

===============================  ==========================================================
``GET /``                        open tickets, security first, then severity and due time
``GET /tickets/<REFERENCE>``     one ticket: facts, rule evidence, notes, thread, outbox
``GET /metrics``                 Prometheus text exposition (counters, gauges, histograms)
``GET /healthz``                 JSON: listener, database, relay; 200 or 503; **no auth**
===============================  ==========================================================

Everything but ``/healthz`` needs a credential (``[web] token`` and/or ``username`` +
``password``): ``Authorization: Bearer TOKEN``, HTTP basic auth, or ``?token=TOKEN`` once,
which sets a cookie (HttpOnly, SameSite=Strict) and redirects to the same page without the
token, so it stays out of the address bar, history and logs. The cookie holds an HMAC of the
token, not the token. Secrets are compared with :func:`hmac.compare_digest`. ``/healthz`` is
open because load balancers and orchestrators probe without credentials; it says only
ok/failed and a generic reason per check (no host names, no exception texts). It answers 503
only when this instance cannot take messages in (listener or database down). A relay that is
down makes it "degraded" with 200: intake still stores every message and the outbox sends the
acknowledgements when the relay is back, while a 503 would make a load balancer take every
instance (they share the relay) out of service and turn late acknowledgements into refused
mail and failed Slack events.

The server only reads: every page is one ``store.transact`` of the repository's read methods.
Everything that comes from customers goes through :func:`html.escape`; the Content-Security-
Policy allows no script at all and only the one inline style sheet (by its hash), so even a
missed escape could not run script.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import html
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from aiohttp import web

from adapters.httpsite import start_site
from intake.dispatch import acknowledgement_state, pending_wait
from intake.errors import StorageUnavailableError
from intake.ports import Histogram
from intake.reference import References

if TYPE_CHECKING:
    from adapters.bootstrap import App

log = logging.getLogger("intake.web")

COOKIE = "intake_session"
COOKIE_MAX_AGE = 24 * 3600
CHECK_TIMEOUT = 2.0  # seconds for each health check
READ_TIMEOUT = 10.0  # seconds for a page's database read
HEALTH_REUSE = 1.0  # seconds a health result is shared by concurrent and repeated probes
LIST_LIMIT = 1000
REFRESH_SECONDS = 30
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- presentation ------------------------------------------------------------------------------

CSS = """
:root{--fg:#1e293b;--muted:#64748b;--line:#e2e8f0;--bg:#f4f6f9;--card:#fff;--head:#0f172a;
--s1:#b91c1c;--s2:#c2410c;--s3:#a16207;--s4:#475569;--sec:#dc2626;--ok:#15803d;--warn:#b45309}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Helvetica Neue",Arial,sans-serif}
a{color:#1d4ed8;text-decoration:none}a:hover{text-decoration:underline}
.top{background:var(--head);color:#cbd5e1;padding:12px 32px;display:flex;align-items:baseline;gap:20px}
.top .brand{color:#fff;font-weight:700;font-size:17px;letter-spacing:.01em}
.top .meta{margin-left:auto;font-size:13px}
main{max-width:1440px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:22px;line-height:1.3;margin:0 0 6px;font-weight:650;overflow-wrap:anywhere}
h2{font-size:13px;text-transform:uppercase;letter-spacing:.06em;color:var(--muted);margin:28px 0 10px}
.summary{display:flex;gap:10px;flex-wrap:wrap;margin:0 0 18px}
.chip{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:6px 12px;font-size:13px}
.chip b{font-size:16px;margin-right:4px;font-variant-numeric:tabular-nums}
.chip.alert{border-color:#fca5a5;background:#fef2f2;color:var(--s1)}
table{width:100%;border-collapse:separate;border-spacing:0;background:var(--card);border:1px solid var(--line);
border-radius:10px;overflow:hidden}
th{text-align:left;font-size:11.5px;font-weight:600;text-transform:uppercase;letter-spacing:.05em;color:var(--muted);
background:#f8fafc;padding:9px 12px;border-bottom:1px solid var(--line);white-space:nowrap}
td{padding:10px 12px;border-bottom:1px solid var(--line);vertical-align:top}
tbody tr:last-child td{border-bottom:0}
tbody tr:hover td{background:#f8fafc}
tr.security td{background:#fef2f2}
tr.security:hover td{background:#fee2e2}
tr.security td:first-child{box-shadow:inset 4px 0 0 var(--sec)}
table.evidence td,table.outbox td{font-size:14px}
td.subject{max-width:460px;overflow-wrap:anywhere}
td.subject a{color:var(--fg);font-weight:550}
.num{text-align:right;font-variant-numeric:tabular-nums}
.nowrap{white-space:nowrap}
.ref{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;font-size:13px;
white-space:nowrap}
.muted{color:var(--muted)}.small{font-size:13px}
.sev{display:inline-block;min-width:44px;text-align:center;padding:1px 8px;border-radius:999px;font-weight:650;
font-size:12px;color:#fff;white-space:nowrap}
.sev-1{background:var(--s1)}.sev-2{background:var(--s2)}.sev-3{background:var(--s3)}.sev-4{background:var(--s4)}
.badge{display:inline-block;font-size:11px;font-weight:700;letter-spacing:.06em;padding:1px 6px;border-radius:4px;
vertical-align:1px;margin-right:6px;white-space:nowrap}
.badge.security{background:var(--sec);color:#fff}
.badge.neg{background:#fef3c7;color:#92400e}
.badge.auto{background:#e0e7ff;color:#3730a3}
.badge.edit{background:#fef9c3;color:#854d0e}
.overdue{color:var(--s1);font-weight:650}
.due-soon{color:var(--warn);font-weight:600}
.st{font-weight:600}.st-sent{color:var(--ok)}.st-waiting,.st-queued{color:var(--warn)}
.st-failed,.st-undeliverable{color:var(--s1)}.st-suppressed{color:var(--muted);font-weight:500}
.empty{background:var(--card);border:1px dashed var(--line);border-radius:10px;padding:40px;text-align:center;
color:var(--muted)}
.facts{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:1px;background:var(--line);
border:1px solid var(--line);border-radius:10px;overflow:hidden;margin-top:14px}
.facts div{background:var(--card);padding:10px 14px;overflow-wrap:anywhere}
.facts dt{font-size:11.5px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.facts dd{margin:2px 0 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;margin:0 0 14px;overflow:hidden}
.card .head{padding:10px 16px;border-bottom:1px solid var(--line);background:#f8fafc;display:flex;gap:14px;
flex-wrap:wrap;align-items:baseline}
.card .head .who{font-weight:600}
.card .why{padding:8px 16px 0;font-size:13px;color:var(--muted)}
.text{margin:0;padding:12px 16px 16px;white-space:pre-wrap;overflow-wrap:anywhere;
font:14px/1.55 ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace}
details{padding:0 16px 12px}summary{cursor:pointer;color:var(--muted);font-size:13px}
details .text{padding:8px 0 0}
.dir{font-size:11.5px;text-transform:uppercase;letter-spacing:.05em;font-weight:650;color:var(--muted)}
.dir-inbound{color:#1d4ed8}.dir-staff{color:var(--ok)}
ul.notes{background:var(--card);border:1px solid var(--line);border-radius:10px;margin:0;padding:10px 16px 10px 36px}
ul.notes li{margin:4px 0}
ul.att{margin:0;padding:8px 16px 0 36px;font-size:13px}
mark{background:#fde68a;color:inherit;padding:0 1px;border-radius:2px}
.back{font-size:13px;display:inline-block;margin-bottom:10px}
"""

# The only style the pages may use: this sheet, by hash. No script may run at all.
_CSS_HASH = base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def esc(value: object) -> str:
    """Text for HTML, attribute-safe. Everything from a customer goes through here."""
    return html.escape("" if value is None else str(value), quote=True)


def when(dt: datetime | None) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if dt else "—"


def span(seconds: float) -> str:
    """A short duration: 45s, 12m, 3h 05m, 2d 4h."""
    s = int(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {(s % 3600) // 60:02d}m"
    return f"{s // 86400}d {(s % 86400) // 3600}h"


def time_left(due: datetime | None, now: datetime, responded: datetime | None = None) -> str:
    """The response clock as HTML: "in 25m", or "overdue 12m" in red; stopped once answered."""
    if responded is not None:
        late = due is not None and responded > due
        cls, text = ("overdue", "responded late") if late else ("muted", "responded")
        return f'<span class="{cls}" title="first response {esc(when(responded))}">{text}</span>'
    if due is None:
        return '<span class="muted">—</span>'
    left = (due - now).total_seconds()
    title = f' title="due {esc(when(due))}"'
    if left < 0:
        return f'<span class="overdue"{title}>overdue {span(left)}</span>'
    cls = ' class="due-soon"' if left < 15 * 60 else ""
    return f"<span{cls}{title}>in {span(left)}</span>"


def severity_pill(severity: int) -> str:
    n = int(severity)
    return f'<span class="sev sev-{n}" title="Severity {n}">Sev {n}</span>'


SECURITY_BADGE = '<span class="badge security" title="Suspected security incident">SECURITY</span>'


def customer_of(row: Mapping[str, Any]) -> str:
    org = row.get("organisation")
    if org:
        return str(org)
    requester = str(row.get("requester") or "")
    return requester.rpartition("@")[2] if "@" in requester else ""


def ack_state(row: Mapping[str, Any]) -> tuple[str, str]:
    """(css state, text) of the acknowledgement: queued / sent / failed / undeliverable / suppressed."""
    # ack_delivery: the acknowledgement's outbox status, when the read side gives it.
    state = acknowledgement_state(row.get("ack_status"), row.get("ack_delivery"))
    if state.startswith("suppressed"):
        reason = state.partition(":")[2].strip()
        return "suppressed", f"not sent: {reason}" if reason else "not sent"
    return state, state


def outbox_state(entry: Mapping[str, Any], *, now: datetime) -> tuple[str, str]:
    """(state, HTML detail) of one outbox entry: sent / queued / waiting / failed / undeliverable."""
    status = str(entry.get("status") or "")
    error = entry.get("last_error")
    err = f"<br>{esc(error)}" if error else ""
    attempts = int(entry.get("attempts") or 0)
    if status == "sent":
        return "sent", f"at {esc(when(entry.get('sent_at')))}"
    if status == "pending" and entry.get("next_attempt_at") is not None:
        wait = pending_wait(entry["next_attempt_at"], error, now)
        tries = f"{attempts} {'attempt' if attempts == 1 else 'attempts'}, " if attempts else ""
        if wait.kind == "held":
            return "waiting", f"{tries}{esc(wait.error)}"
        if wait.kind == "due":
            return ("waiting" if attempts else "queued"), f"{tries}due since {esc(when(wait.at))}{err}"
        if attempts == 0:
            return "queued", f"first attempt {esc(when(wait.at))}"
        return "waiting", f"{tries}next {esc(when(wait.at))}{err}"
    if status == "failed":
        return "failed", f"after {attempts} {'attempt' if attempts == 1 else 'attempts'}{err}"
    if status == "undeliverable":
        return "undeliverable", err.removeprefix("<br>")
    return "queued", esc(status)


def highlight(excerpt: str, phrase: str) -> str:
    """The excerpt, escaped, with the rule's phrase marked where it occurs.

    A rule phrase matches words across any punctuation or line break ("data\\n breach") and
    ends in ``*`` when it also matches continuations ("breach*": breaches, breached).
    """
    words = re.findall(r"\w+", phrase)
    if not words:
        return esc(excerpt)
    tail = r"\w*" if phrase.rstrip().endswith("*") else r"\b"
    found = re.search(r"\b" + r"[\W_]+".join(map(re.escape, words)) + tail, excerpt, re.IGNORECASE)
    if found is None:
        return esc(excerpt)
    at, end = found.span()
    return f"{esc(excerpt[:at])}<mark>{esc(excerpt[at:end])}</mark>{esc(excerpt[end:])}"


def page(title: str, body: str, *, now: datetime, refresh: bool = False) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="referrer" content="no-referrer">{meta}<title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body>"
        '<header class="top"><a class="brand" href="/">intake · triage</a>'
        f'<span class="meta">{esc(when(now))}</span></header>'
        f"<main>{body}</main></body></html>"
    )


def render_list(rows: Sequence[Mapping[str, Any]], *, now: datetime, truncated: bool) -> str:
    security = sum(1 for r in rows if r.get("security"))
    overdue = sum(1 for r in rows if not r.get("responded_at") and r.get("response_due") and r["response_due"] < now)
    by_sev = {n: sum(1 for r in rows if int(r["severity"]) == n) for n in (1, 2, 3, 4)}
    chips = [f'<span class="chip"><b>{len(rows)}</b>open</span>']
    if security:
        chips.append(f'<span class="chip alert"><b>{security}</b>security</span>')
    if overdue:
        chips.append(f'<span class="chip alert"><b>{overdue}</b>overdue</span>')
    chips += [f'<span class="chip">{severity_pill(n)} <b>{c}</b></span>' for n, c in by_sev.items() if c]
    parts = ['<h1>Open tickets</h1><div class="summary">', *chips, "</div>"]
    if not rows:
        parts.append('<div class="empty">No open tickets.</div>')
        return page("intake · triage", "".join(parts), now=now, refresh=True)
    parts.append(
        "<table><thead><tr><th>Severity</th><th>Reference</th><th>Subject</th><th>Customer</th><th>Requester</th>"
        '<th>Channel</th><th class="num">Msgs</th><th>Response due</th><th>Acknowledgement</th></tr></thead><tbody>'
    )
    for r in rows:
        href = "/tickets/" + quote(str(r["reference"]), safe="")
        sec = bool(r.get("security"))
        name = str(r.get("requester_name") or "")
        requester = str(r.get("requester") or "")
        who = f'{esc(name)}<br><span class="muted small">{esc(requester)}</span>' if name else esc(requester)
        state, text = ack_state(r)
        subject = str(r.get("subject") or "") or "(no subject)"
        parts.append(
            f'<tr class="ticket{" security" if sec else ""}" data-reference="{esc(r["reference"])}" '
            f'data-severity="{int(r["severity"])}" data-security="{"yes" if sec else "no"}">'
            f'<td class="nowrap">{severity_pill(r["severity"])}</td>'
            f'<td><a class="ref" href="{esc(href)}">{esc(r["reference"])}</a></td>'
            f'<td class="subject">{SECURITY_BADGE if sec else ""}<a href="{esc(href)}">{esc(subject)}</a></td>'
            f"<td>{esc(customer_of(r)) or '<span class=muted>—</span>'}</td>"
            f'<td class="small">{who}</td>'
            f"<td>{esc(r.get('channel'))}</td>"
            f'<td class="num">{int(r.get("message_count") or 0)}</td>'
            f'<td class="nowrap">{time_left(r.get("response_due"), now, r.get("responded_at"))}</td>'
            f'<td class="small"><span class="st st-{esc(state)}">{esc(text)}</span></td></tr>'
        )
    parts.append("</tbody></table>")
    if truncated:
        parts.append(f'<p class="muted small">Showing the first {LIST_LIMIT} open tickets.</p>')
    return page("intake · triage", "".join(parts), now=now, refresh=True)


def render_ticket(d: Mapping[str, Any], *, now: datetime) -> str:
    ref = str(d["reference"])
    sec = bool(d.get("security"))
    subject = str(d.get("subject") or "") or "(no subject)"
    state, ack_text = ack_state(d)  # ticket_detail gives ack_delivery, as list_tickets does
    name = str(d.get("requester_name") or "")
    requester = f"{name} <{d.get('requester')}>" if name else str(d.get("requester") or "")
    facts = [
        ("Severity", severity_pill(d["severity"]) + (" " + SECURITY_BADGE if sec else "")),
        ("Status", esc(d.get("status"))),
        (
            "Response due",
            f"{time_left(d.get('response_due'), now, d.get('responded_at'))}<br>"
            f"<span class='muted small'>{esc(when(d.get('response_due')))}</span>",
        ),
        ("Acknowledgement", f'<span class="st st-{esc(state)}">{esc(ack_text)}</span>'),
        ("Customer", esc(customer_of(d)) or "—"),
        ("Requester", esc(requester)),
        ("Channel", esc(d.get("channel"))),
        ("Opened", esc(when(d.get("created_at")))),
    ]
    parts = [
        '<a class="back" href="/">← all open tickets</a>',
        f"<h1>{SECURITY_BADGE if sec else ''}{esc(subject)}</h1>",
        f'<div class="ref muted">{esc(ref)}</div>',
        '<dl class="facts">',
        *(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in facts),
        "</dl>",
    ]
    participants = d.get("participants") or []
    if participants:
        parts.append(f'<p class="small muted">Participants: {esc(", ".join(map(str, participants)))}</p>')

    evidence = d.get("evidence") or []
    parts.append(f"<h2>Rule evidence ({len(evidence)})</h2>")
    if evidence:
        parts.append(
            "<table class='evidence'><thead><tr><th>Rule</th><th>Field</th><th>Phrase</th><th>Excerpt</th>"
            "<th>Severity</th></tr></thead><tbody>"
        )
        for h in evidence:
            neg = (
                '<span class="badge neg" title="a negation word stands shortly before the phrase">'
                "possibly negated</span>"
                if h.get("negated")
                else ""
            )
            tags = " ".join(f'<span class="muted small">#{esc(t)}</span>' for t in h.get("tags") or ())
            parts.append(
                f'<tr class="hit"><td class="ref">{esc(h.get("rule"))} {tags}</td><td>{esc(h.get("field"))}</td>'
                f"<td>{neg}{esc(h.get('phrase'))}</td>"
                f'<td class="small">{highlight(str(h.get("excerpt") or ""), str(h.get("phrase") or ""))}</td>'
                f"<td>{severity_pill(h.get('severity') or 1)}</td></tr>"
            )
        parts.append("</tbody></table>")
    else:
        parts.append('<p class="muted small">No rule matched.</p>')

    notes = d.get("notes") or []
    if notes:
        parts.append(f"<h2>Notes ({len(notes)})</h2><ul class='notes'>")
        for n in notes:
            at = n.get("at") if isinstance(n, Mapping) else None
            text = n.get("text") if isinstance(n, Mapping) else n
            parts.append(f"<li>{f'<span class=muted>{esc(at)}</span> ' if at else ''}{esc(text)}</li>")
        parts.append("</ul>")

    messages = d.get("messages") or []
    parts.append(f"<h2>Thread ({len(messages)})</h2>")
    for m in messages:
        parts.append(_render_message(m))

    entries = d.get("outbox") or []
    parts.append(f"<h2>Outbox ({len(entries)})</h2>")
    if entries:
        parts.append(
            "<table class='outbox'><thead><tr><th>Kind</th><th>To</th><th>Subject</th><th>Status</th>"
            "<th>Queued</th></tr></thead><tbody>"
        )
        for e in entries:
            st, detail = outbox_state(e, now=now)
            parts.append(
                f'<tr class="outbox-entry" data-status="{esc(st)}"><td class="small">{esc(e.get("kind"))}</td>'
                f'<td class="small">{esc(e.get("recipient"))}</td>'
                f'<td class="subject small">{esc(e.get("subject"))}</td>'
                f'<td class="small"><span class="st st-{esc(st)}">{esc(st)}</span>'
                f'<div class="muted">{detail}</div></td>'
                f'<td class="small nowrap">{esc(when(e.get("created_at")))}</td></tr>'
            )
        parts.append("</tbody></table>")
    else:
        parts.append('<p class="muted small">Nothing queued for this ticket.</p>')
    return page(f"{ref} · {subject}", "".join(parts), now=now)


def _render_message(m: Mapping[str, Any]) -> str:
    direction = str(m.get("direction") or "")
    name = str(m.get("sender_name") or "")
    sender = f"{name} <{m.get('sender')}>" if name else str(m.get("sender") or "")
    head = [
        f'<span class="dir dir-{esc(direction)}">{esc(direction)}</span>',
        f'<span class="who">{esc(sender)}</span>',
        f'<span class="muted small">{esc(when(m.get("received_at")))}</span>',
        f'<span class="muted small">via {esc(m.get("channel"))} to {esc(m.get("recipient"))}</span>',
    ]
    if m.get("automation"):
        head.append(f'<span class="badge auto" title="automated mail">{esc(m["automation"])}</span>')
    if m.get("edit_of") is not None:  # its author's edit of a message above, which stays as it was
        made = esc(when(m.get("sent_date")))
        head.append(f'<span class="badge edit">edit of message {esc(m["edit_of"])}, made {made}</span>')
    elif m.get("edits"):
        head.append('<span class="badge edit">edited later: see below</span>')
    why = f"route <b>{esc(m.get('route'))}</b>"
    if m.get("route_note"):
        why += f": {esc(m['route_note'])}"
    if m.get("automation"):
        why += f" · automation: {esc(m['automation'])}"
    if m.get("parse_problem"):
        why += f" · parse problem: {esc(m['parse_problem'])}"
    if m.get("html"):
        why += " · text rendered from the HTML part"
    if m.get("subject"):
        why += f" · subject: {esc(m['subject'])}"
    parts = [
        f'<article class="card message" data-direction="{esc(direction)}">',
        f'<div class="head">{"".join(head)}</div>',
        f'<div class="why">{why}</div>',
    ]
    attachments = m.get("attachments") or []
    if attachments:
        parts.append('<ul class="att">')
        for a in attachments:
            kept = "" if a.get("kept", True) else ' <span class="muted">(not kept: over the size limit)</span>'
            parts.append(
                f"<li>{esc(a.get('filename') or '(unnamed)')} "
                f'<span class="muted">{esc(a.get("content_type"))}, {_size(a.get("size"))}</span>{kept}</li>'
            )
        parts.append("</ul>")
    new_text = str(m.get("new_text") or "")
    body = str(m.get("body") or "")
    parts.append(f'<pre class="text">{esc(new_text or body) or "<span class=muted>(empty)</span>"}</pre>')
    if body and new_text and body.strip() != new_text.strip():
        parts.append(
            f'<details><summary>Whole message, with quoted text</summary><pre class="text">{esc(body)}</pre></details>'
        )
    parts.append("</article>")
    return "".join(parts)


def _size(n: object) -> str:
    try:
        size = int(str(n))
    except (TypeError, ValueError):
        return "?"
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KB"
    return f"{size / 1024 / 1024:.1f} MB"


def message_page(title: str, text: str, *, now: datetime) -> str:
    return page(title, f"<h1>{esc(title)}</h1><p>{esc(text)}</p>", now=now)


# -- metrics -------------------------------------------------------------------------------------


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in pairs) + "}" if pairs else ""


def _number(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if isinstance(v, float) and not v.is_integer() else str(int(v))


class Exposition:
    """Prometheus text format 0.0.4, written by hand: HELP and TYPE once per family."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: Sequence[tuple[str, str]] = ()) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def histogram(self, name: str, help_text: str, hist: Histogram | None) -> None:
        self.family(name, "histogram", help_text)
        hist = hist or Histogram()
        running = 0
        for bound, count in zip(hist.buckets, hist.counts, strict=False):
            running += count
            self.sample(f"{name}_bucket", running, [("le", repr(float(bound)))])
        self.sample(f"{name}_bucket", hist.n, [("le", "+Inf")])
        self.sample(f"{name}_sum", hist.total)
        self.sample(f"{name}_count", hist.n)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


# Recorder key -> (metric, label names, help). Keys are ("name", *label values).
COUNTERS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("messages", "intake_messages_received_total", ("channel", "outcome"),
     "Messages received, by channel and outcome (new, reference, header, thread, duplicate, ignored, failed)."),
    ("message_edits", "intake_message_edits_total", ("channel", "outcome"),
     "Edits of messages (Slack), by outcome (recorded, unchanged, duplicate, taken_in, failed)."),
    ("tickets_created", "intake_tickets_created_total", ("channel",), "Tickets opened."),
    ("security_incidents", "intake_security_incidents_total", ("channel",),
     "Tickets marked as security incidents (the IRT lead was alerted)."),
    ("outbox_sent", "intake_outbox_sent_total", ("kind",), "Outbox entries delivered."),
    ("outbox_failed", "intake_outbox_failed_total", ("kind",), "Outbox entries given up on."),
    ("outbox_retry", "intake_outbox_retries_total", ("kind",), "Outbox deliveries that will be retried."),
    ("slack_events_ignored", "intake_slack_events_ignored_total", ("reason",), "Slack events not taken in."),
)  # fmt: skip


def render_metrics(app: App, stats: Mapping[str, Any], *, now: datetime) -> str:
    counts = dict(app.recorder.counts)  # a copy: the loop may move them while we write
    out = Exposition()
    for key, name, label_names, help_text in COUNTERS:
        out.family(name, "counter", help_text)
        for k, v in sorted(counts.items()):
            if k[0] == key and len(k) == 1 + len(label_names):
                out.sample(name, v, list(zip(label_names, k[1:], strict=True)))

    out.family(
        "intake_acknowledgements_total",
        "counter",
        "Acknowledgements: queued, sent, failed, or suppressed (with the reason).",
    )
    out.sample("intake_acknowledgements_total", counts.get(("acknowledgements_queued",), 0), [("result", "queued")])
    out.sample("intake_acknowledgements_total", counts.get(("outbox_sent", "acknowledgement"), 0), [("result", "sent")])
    out.sample(
        "intake_acknowledgements_total", counts.get(("outbox_failed", "acknowledgement"), 0), [("result", "failed")]
    )
    for k, v in sorted(counts.items()):
        if k[0] == "acknowledgements_suppressed" and len(k) == 2:
            out.sample("intake_acknowledgements_total", v, [("result", "suppressed"), ("reason", k[1])])

    outbox = stats.get("outbox") or {}
    out.family("intake_outbox_depth", "gauge", "Outbox entries waiting to be sent.")
    out.sample("intake_outbox_depth", int(outbox.get("pending", 0)))
    out.family("intake_outbox_entries", "gauge", "Outbox entries by status.")
    for status in ("pending", "sent", "failed", "undeliverable"):
        out.sample("intake_outbox_entries", int(outbox.get(status, 0)), [("status", status)])
    oldest = stats.get("outbox_oldest_pending")
    out.family("intake_outbox_oldest_pending_seconds", "gauge", "Age of the oldest waiting outbox entry (0: none).")
    out.sample("intake_outbox_oldest_pending_seconds", max(0.0, (now - oldest).total_seconds()) if oldest else 0)
    out.family("intake_tickets", "gauge", "Tickets stored.")
    out.sample("intake_tickets", int(stats.get("tickets", 0)))
    out.family("intake_security_tickets", "gauge", "Tickets marked as security incidents.")
    out.sample("intake_security_tickets", int(stats.get("security_tickets", 0)))

    sessions = len(app.email_listener.tracker.active) if app.email_listener is not None else 0
    if app.listeners is not None:  # email.listener_processes: the other listeners' last reports
        sessions += app.listeners.sessions
    out.family("intake_smtp_sessions_active", "gauge", "Open SMTP/LMTP sessions.")
    out.sample("intake_smtp_sessions_active", sessions)

    hists = app.recorder.histograms
    out.histogram(
        "intake_classification_seconds", "Time to run the keyword rules on a message.", hists.get("classification")
    )
    out.histogram(
        "intake_storage_seconds", "Time from queueing a message's unit of work to its commit.", hists.get("storage")
    )
    return out.text()


# -- health --------------------------------------------------------------------------------------


async def smtp_probe(host: str, port: int, *, timeout: float = CHECK_TIMEOUT) -> tuple[bool, str]:  # noqa: ASYNC109
    """Connect, read the greeting, say QUIT. (ok, detail); the detail names no host."""
    started = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            code = b""
            while True:  # a greeting may span lines: "220-..." then "220 ..."
                line = await reader.readline()
                if not line:
                    return False, "connection closed before the greeting"
                code = line[:3]
                if line[3:4] != b"-":
                    break
            writer.write(b"QUIT\r\n")
            await writer.drain()
    except TimeoutError:
        return False, f"no greeting within {timeout:g}s"
    except ConnectionRefusedError:
        return False, "connection refused"
    except OSError as exc:
        return False, f"cannot connect ({type(exc).__name__})"
    finally:
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), timeout=0.5)
            except (TimeoutError, OSError):
                pass
    ms = (time.perf_counter() - started) * 1000
    if code != b"220":
        return False, f"greeting code {code.decode('ascii', 'replace')} (not 220)"
    return True, f"greeting in {ms:.0f} ms"


def _select_one(uow: Any) -> Any:
    """The cheapest round trip through the store's writer thread and the database."""
    return uow.conn.exec_driver_sql("SELECT 1").scalar()


def _probe_host(host: str) -> str:
    """Where to reach a listener bound to ``host``: a wildcard address is reached on loopback."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


# -- the server ------------------------------------------------------------------------------------


class WebServer:
    """The aiohttp server; ``start()``/``stop()`` on the intake loop; ``port`` once started."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.settings = app.settings.web
        self.port = self.settings.listen_port
        self.references = References(app.settings.email.reference_prefix)
        s = self.settings
        self._token = s.token.get_secret_value().encode() if s.token else None
        self._user = s.username.encode() if s.username and s.password else None
        self._password = s.password.get_secret_value().encode() if s.password and s.username else None
        # The cookie carries a value derived from the token, never the token itself.
        self._cookie = (
            hmac.new(self._token, b"intake-web-session-v1", hashlib.sha256).hexdigest() if self._token else None
        )
        self._runner: web.AppRunner | None = None
        self._health: tuple[float, asyncio.Task[tuple[int, dict[str, Any]]]] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        web_app = web.Application(middlewares=[self._errors, self._auth])
        web_app.router.add_get("/", self.index)
        web_app.router.add_get("/tickets/{reference}", self.ticket)
        web_app.router.add_get("/metrics", self.metrics)
        web_app.router.add_get("/healthz", self.healthz)
        return web_app

    async def start(self) -> None:
        self._runner, self.port = await start_site(
            self.make_app(), self.settings.listen_host, self.settings.listen_port, shutdown_timeout=2.0
        )
        log.info("triage page on %s", self.describe())

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._health is not None and not self._health[1].done():
            self._health[1].cancel()
        self._health = None

    def describe(self) -> str:
        s = self.settings
        url = f"http://{s.listen_host}:{self.port}/"
        methods = " or ".join(m for m, on in (("bearer token", self._token), ("basic auth", self._user)) if on)
        public = f" (public URL {s.public_url})" if s.public_url else ""
        return f"{url}{public}; {methods}; /healthz open, /metrics with the same credentials"

    # -- middleware ------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        response: web.StreamResponse
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status != 404:
                raise
            response = self._html(message_page("Not found", "There is nothing here.", now=self._now()), status=404)
        except (StorageUnavailableError, TimeoutError):
            log.warning("web: the database did not answer for %s", request.path)
            text = "The database did not answer; try again in a moment."
            response = self._html(message_page("Database unavailable", text, now=self._now()), status=503)
        except Exception:
            log.exception("web: %s failed", request.path)
            text = "Something went wrong; the log says what."
            response = self._html(message_page("Error", text, now=self._now()), status=500)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.path == "/healthz":
            return await handler(request)
        query_token = request.query.get("token")
        if query_token is not None:
            if not self._token_ok(query_token):
                return self._unauthorised()
            if request.path == "/metrics":  # scrapers follow no cookies: take it as it is
                return await handler(request)
            # Trade the token for the cookie and drop it from the address bar and history.
            rest = [(k, v) for k, v in request.query.items() if k != "token"]
            # The path as it came (percent-encoded); never "//host", which would lead off site.
            target = "/" + request.rel_url.raw_path.lstrip("/") + ("?" + urlencode(rest) if rest else "")
            response = web.Response(status=303, headers={"Location": target})
            assert self._cookie is not None
            response.set_cookie(
                COOKIE,
                self._cookie,
                max_age=COOKIE_MAX_AGE,
                path="/",
                httponly=True,
                samesite="Strict",
                secure=request.secure or self.settings.public_url.startswith("https:"),
            )
            return response
        if self._authorised(request):
            return await handler(request)
        return self._unauthorised()

    def _token_ok(self, given: str) -> bool:
        return self._token is not None and hmac.compare_digest(given.encode(), self._token)

    def _authorised(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials:
            return self._token_ok(credentials.strip())
        if scheme.lower() == "basic" and credentials and self._user is not None and self._password is not None:
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True)
            except (binascii.Error, ValueError):
                return False
            user, colon, password = decoded.partition(b":")
            # Both comparisons always run: the time taken says nothing about which one failed.
            user_ok = hmac.compare_digest(user, self._user)
            password_ok = hmac.compare_digest(password, self._password)
            return bool(colon) and user_ok and password_ok
        cookie = request.cookies.get(COOKIE)
        return bool(cookie and self._cookie and hmac.compare_digest(cookie.encode(), self._cookie.encode()))

    def _unauthorised(self) -> web.Response:
        challenges = []
        if self._token is not None:
            challenges.append('Bearer realm="intake"')
        if self._user is not None:
            challenges.append('Basic realm="intake", charset="UTF-8"')
        how = "Open this page once with ?token=YOUR-TOKEN" if self._token else "Sign in with your user name"
        text = f"{how}, or send the credentials in an Authorization header."
        response = self._html(message_page("Authentication required", text, now=self._now()), status=401)
        for c in challenges:
            response.headers.add("WWW-Authenticate", c)
        return response

    # -- handlers --------------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        rows = await self._read(lambda uow: uow.list_tickets(status="open", limit=LIST_LIMIT))
        far = datetime.max.replace(tzinfo=UTC)
        # Security first, then severity; among equals the unanswered whose clock runs out first.
        rows.sort(
            key=lambda r: (
                not r.get("security"),
                int(r["severity"]),
                r.get("responded_at") is not None,
                r.get("response_due") or far,
            )
        )
        return self._html(render_list(rows, now=self._now(), truncated=len(rows) >= LIST_LIMIT))

    async def ticket(self, request: web.Request) -> web.Response:
        given = request.match_info["reference"]
        reference = self.references.normalise(given)
        if reference is None:
            raise web.HTTPNotFound()
        if reference != given:  # sup-abcd-efgh, a typo the check character forgives: the canonical URL
            raise web.HTTPPermanentRedirect(location="/tickets/" + quote(reference, safe=""))
        detail = await self._read(lambda uow: uow.ticket_detail(reference))
        if detail is None:
            raise web.HTTPNotFound()
        return self._html(render_ticket(detail, now=self._now()))

    async def metrics(self, request: web.Request) -> web.Response:
        stats = await self._read(lambda uow: uow.stats())
        text = render_metrics(self.app, stats, now=self._now())
        return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def healthz(self, request: web.Request) -> web.Response:
        # Probes arriving together (or within HEALTH_REUSE s) share one run of the checks: an
        # unauthenticated caller cannot make us open connections to the relay at its own pace.
        loop = asyncio.get_running_loop()
        if self._health is None or (self._health[1].done() and loop.time() - self._health[0] > HEALTH_REUSE):
            self._health = (loop.time(), asyncio.create_task(self._checks()))
        status, body = await asyncio.shield(self._health[1])
        return web.Response(
            status=status,
            text=json.dumps(body),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def _checks(self) -> tuple[int, dict[str, Any]]:
        listener, database, relay = await asyncio.gather(
            self._check_listener(), self._check_database(), self._check_relay()
        )
        checks = {"listener": listener, "database": database, "relay": relay}
        if not (listener["ok"] and database["ok"]):
            return 503, {"status": "failed", "checks": checks}
        return 200, {"status": "ok" if relay["ok"] else "degraded", "checks": checks}

    async def _check_listener(self) -> dict[str, Any]:
        listener = self.app.email_listener
        if listener is None:
            return {"ok": False, "detail": "not started"}
        if listener.tracker.closing:
            return {"ok": False, "detail": "shutting down"}
        ok, detail = await smtp_probe(_probe_host(listener.host), listener.port)
        return {"ok": ok, "detail": detail}

    async def _check_database(self) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            await self._read(_select_one, timeout=CHECK_TIMEOUT)
        except TimeoutError:
            return {"ok": False, "detail": f"no answer within {CHECK_TIMEOUT:g}s"}
        except Exception as exc:  # any failure is the answer; its text may name hosts or users
            log.warning("health: database check failed: %s", exc)
            return {"ok": False, "detail": f"query failed ({type(exc).__name__})"}
        return {"ok": True, "detail": f"SELECT 1 in {(time.perf_counter() - started) * 1000:.0f} ms"}

    async def _check_relay(self) -> dict[str, Any]:
        ob = self.app.settings.outbound
        ok, detail = await smtp_probe(ob.relay_host, ob.relay_port)
        if not ok:
            log.warning("health: relay %s:%s: %s", ob.relay_host, ob.relay_port, detail)
        return {"ok": ok, "detail": detail}

    # -- helpers ---------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[Any], Any], *, timeout: float = READ_TIMEOUT) -> Any:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            return await self.app.store.transact(fn)

    def _now(self) -> datetime:
        return self.app.service.clock.now()

    @staticmethod
    def _html(text: str, *, status: int = 200) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")
