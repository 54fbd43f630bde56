"""The ``intake`` command line (click): serve, tickets, stats, rules.

Every command reads the same settings (``--config PATH`` or $INTAKE_CONFIG, else defaults).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from adapters.settings import Settings, load_settings
from intake.dispatch import acknowledgement_state, pending_wait
from intake.errors import ConfigError, IntakeError

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


# Control characters in a log line's text: a client's bytes (aiosmtpd logs an unknown command
# as sent; a sender or a Message-ID) could otherwise end a line and write one that looks like
# ours, or make the log a binary file to grep.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _escape(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text) if _CONTROL.search(text) else text


class _TextFormatter(logging.Formatter):
    """One line a record (a traceback follows on lines of its own): the message and the
    extras with control characters escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        return _escape(line)

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = {k: v for k, v in record.__dict__.items() if k not in _RESERVED}
        if extra:
            fields = _escape(" ".join(f"{k}={v}" for k, v in extra.items() if v not in (None, "")))
            head, newline, rest = base.partition("\n")  # after the message, before any traceback
            base = f"{head} {fields}{newline}{rest}"
        return base


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log.level)
    # mail-parser warns on ordinary multiparts; aiosmtpd logs every peer at INFO.
    logging.getLogger("mailparser").setLevel(logging.CRITICAL)
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.obj["settings"]
    return settings


def _fail(exc: Exception) -> None:
    click.echo(f"intake: {exc}", err=True)
    sys.exit(2)


@click.group()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML settings file (default: $INTAKE_CONFIG, else built-in defaults).",
)
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """intake: support messages in, tracked tickets out."""
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        _fail(exc)
    ctx.ensure_object(dict)
    ctx.obj["settings"] = settings


@main.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the email listener and the outbox dispatcher until Ctrl-C / SIGTERM."""
    from sqlalchemy.exc import SQLAlchemyError

    from adapters import bootstrap

    settings = _settings(ctx)
    setup_logging(settings)
    _require_database(settings)
    path = _sqlite_file(settings)
    if path is not None and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)):
        # It would listen, and answer 451 to every message ("attempt to write a readonly database").
        _fail(
            IntakeError(
                f"cannot write {path}: it or its directory is read-only for this user (SQLite also writes"
                f" {path.name}-wal and {path.name}-shm beside it)"
            )
        )
    try:
        app = bootstrap.build(settings, create_tables=False)
    except IntakeError as exc:
        _fail(exc)
    except SQLAlchemyError as exc:  # unreachable, unreadable, not a database: one line, as the read commands say it
        where = bootstrap.redact(settings.storage.url)
        _fail(IntakeError(f"cannot open the database {where}: {_db_problem(settings, exc)}"))

    def ready(line: str) -> None:
        click.echo(line, err=False)
        sys.stdout.flush()

    try:
        bootstrap.run_loop(settings, bootstrap.serve(app, ready=ready))
    except OSError as exc:
        if exc.strerror is None:  # not the socket's own error: a listener process that did not start, say
            _fail(IntakeError(str(exc)))
        _fail(
            ConfigError(f"cannot listen on {settings.email.listen_host}:{settings.email.listen_port}: {exc.strerror}")
        )
    click.echo("intake stopped")


def _require_database(settings: Settings) -> None:
    """Only `intake db upgrade` creates a database: opening a SQLite file that is not there
    would leave an empty one behind, in whatever directory the command ran."""
    path = _sqlite_file(settings)
    if path is not None and not path.exists():
        _fail(IntakeError(f"no database at {path.resolve()}: `intake db upgrade` creates it"))


def _sqlite_file(settings: Settings) -> Path | None:
    """The database file of a SQLite URL (None for PostgreSQL, an in-memory or URI database)."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.storage.url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") and "uri" not in url.query:
        return Path(url.database).absolute()
    return None


def _db_problem(settings: Settings, exc: BaseException) -> str:
    """The first line of the driver's error, and for SQLite's "unable to open database file"
    what is wrong with the directory (it says neither which nor why)."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    problem = (text[0] if text else type(exc).__name__)[:200]
    path = _sqlite_file(settings)
    if path is not None and "unable to open" in problem:
        if not path.parent.is_dir():
            problem += f" (the directory {path.parent} does not exist)"
        elif not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            problem += (
                f" ({path} or its directory is not writable by this user: SQLite writes"
                f" {path.name}-wal and {path.name}-shm beside it)"
            )
    return problem


def _store(settings: Settings) -> Any:
    """The store for a command that reads (and `intake db` has made)."""
    from storage import schema
    from storage.store import SqlStore

    _require_database(settings)
    store = SqlStore(settings.storage.url, lock_timeout=settings.storage.lock_timeout)
    try:
        schema.check(store.engine)
    except IntakeError as exc:
        store.dispose()
        _fail(exc)
    except Exception as exc:  # the database is unreachable
        store.dispose()
        _fail(IntakeError(f"cannot open the database: {_db_problem(settings, exc)}"))
    return store


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Create the schema, or bring it to this version's migrations."""
    from adapters.bootstrap import redact
    from storage import schema
    from storage.store import make_engine

    settings = _settings(ctx)
    path = _sqlite_file(settings)
    if path is not None and not path.parent.is_dir():  # SQLite would say only "unable to open database file"
        _fail(
            IntakeError(
                f"cannot create {path}: the directory {path.parent} does not exist (create it, owned by the user"
                " intake runs as)"
            )
        )
    engine = make_engine(settings.storage.url)
    try:
        before, after = schema.upgrade(engine)
    except Exception as exc:
        _fail(IntakeError(f"cannot upgrade {redact(settings.storage.url)}: {_db_problem(settings, exc)}"))
    finally:
        engine.dispose()
    if before == after:
        click.echo(f"{redact(settings.storage.url)}: schema already at {after}")
    else:
        click.echo(f"{redact(settings.storage.url)}: schema upgraded from {before or 'nothing'} to {after}")


def _iso(value: Any) -> Any:
    return value.isoformat(timespec="seconds") if isinstance(value, datetime) else value


def _ticket_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "reference": row["reference"],
        "subject": row["subject"],
        "severity": int(row["severity"]),
        "security": bool(row["security"]),
        "channel": row["channel"],
        "requester": row["requester"],
        "organisation": row.get("organisation"),
        "status": row["status"],
        "message_count": int(row.get("message_count", 0)),
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row.get("updated_at")),
        "response_due": _iso(row["response_due"]),
        "acknowledgement": acknowledgement_state(row.get("ack_status"), row.get("ack_delivery")),
        "plan": row.get("plan"),
        "language": row.get("language"),
    }


@main.group()
def tickets() -> None:
    """List and show tickets."""


@tickets.command("list")
@click.option("--json", "as_json", is_flag=True, help="An array of ticket objects.")
@click.option("--status", default=None, help="Only tickets with this status (open, ...).")
@click.pass_context
def tickets_list(ctx: click.Context, as_json: bool, status: str | None) -> None:
    store = _store(_settings(ctx))
    rows = store.run_sync(lambda uow: uow.list_tickets(status=status))
    store.dispose()
    items = [_ticket_json(r) for r in rows]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    if not items:
        click.echo("no tickets")
        return
    now = datetime.now(UTC)
    header = (
        f"{'REFERENCE':<15} {'SEV':<4} {'SEC':<4} {'CHANNEL':<7} {'MSGS':>4}  {'DUE IN':>8}  {'REQUESTER':<28} SUBJECT"
    )
    click.echo(header)
    for t, r in zip(items, rows, strict=True):
        left = (r["response_due"] - now).total_seconds()
        due = _human_delta(left)
        subj = (t["subject"] or "(no subject)").replace("\n", " ")[:50]
        click.echo(
            f"{t['reference']:<15} {t['severity']:<4} {'yes' if t['security'] else '':<4} {t['channel']:<7} "
            f"{t['message_count']:>4}  {due:>8}  {t['requester'][:28]:<28} {subj}"
        )


def _human_delta(seconds: float) -> str:
    sign = "-" if seconds < 0 else ""
    s = abs(int(seconds))
    if s >= 86400:
        return f"{sign}{s // 86400}d{(s % 86400) // 3600}h"
    if s >= 3600:
        return f"{sign}{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{sign}{s // 60}m"


@tickets.command("show")
@click.argument("reference")
@click.option("--json", "as_json", is_flag=True, help="The ticket object with a messages array.")
@click.pass_context
def tickets_show(ctx: click.Context, reference: str, as_json: bool) -> None:
    from intake.reference import References

    settings = _settings(ctx)
    ref = References(settings.email.reference_prefix).normalise(reference)
    if ref is None:
        _fail(IntakeError(f"{reference!r} is not a valid reference (mistyped? the last character is a check)"))
    store = _store(settings)
    detail = store.run_sync(lambda uow: uow.ticket_detail(ref))
    store.dispose()
    if detail is None:
        _fail(IntakeError(f"no ticket {ref}"))
    count = sum(1 for m in detail["messages"] if m["edit_of"] is None)  # an edit is a version of one
    out = _ticket_json({**detail, "message_count": count})
    out["participants"] = detail["participants"]
    out["notes"] = detail["notes"]
    out["evidence"] = detail["evidence"]
    out["messages"] = [
        {
            "id": m["id"],
            "direction": m["direction"],
            "route": m["route"],
            "why": m["route_note"],
            "channel": m["channel"],
            "sender": m["sender"],
            "sender_name": m["sender_name"],
            "recipient": m["recipient"],
            "subject": m["subject"],
            "message_id": m["message_id"],
            "received_at": _iso(m["received_at"]),
            "date": _iso(m["sent_date"]),
            "automation": m["automation"],
            "parse_problem": m["parse_problem"],
            "html": bool(m["html"]),  # the text was rendered from HTML
            "attachments": m["attachments"],
            "hits": m["hits"],
            "text": m["new_text"] or m["body"],
            "raw_size": m["raw_size"],
            "edit_of": m["edit_of"],  # an edit (its own row): the message it changes, which stays as it was
            "edits": m["edits"],
        }
        for m in detail["messages"]
    ]
    out["outbox"] = [{k: _iso(v) for k, v in n.items()} for n in detail["outbox"]]
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
        return
    sec = "  SECURITY INCIDENT" if out["security"] else ""
    click.echo(f"{out['reference']}  Severity {out['severity']}{sec}  [{out['status']}]  via {out['channel']}")
    click.echo(f"Subject:      {out['subject']}")
    name = detail["requester_name"]
    requester = f"{name} <{out['requester']}>" if name else out["requester"]
    click.echo(f"Requester:    {requester}  org: {out['organisation'] or '-'}")
    click.echo(f"Participants: {', '.join(out['participants'])}")
    click.echo(f"Created:      {out['created_at']}   response due: {out['response_due']}")
    click.echo(f"Acknowledgement: {out['acknowledgement']}")
    for n in out["notes"]:
        click.echo(f"Note ({n.get('at')}): {n.get('text')}")
    for h in out["evidence"]:
        neg = " [possibly negated]" if h.get("negated") else ""
        click.echo(f'Evidence: {h["rule"]} in {h["field"]}: "{h["phrase"]}"{neg} ... {h["excerpt"]} ...')
    for m in out["messages"]:
        click.echo("")
        what = f"edit of message {m['edit_of']}" if m["edit_of"] is not None else f"message {m['id']}"
        at = f"edited {m['date']}, received {m['received_at']}" if m["edit_of"] is not None else m["received_at"]
        click.echo(f"--- {what} {m['direction']} from {m['sender'] or '?'} at {at}")
        click.echo(f"    route: {m['route']} ({m['why']})")
        if m["edits"]:
            click.echo(f"    edited later: see the edit(s) below ({', '.join(map(str, m['edits']))})")
        if m["automation"]:
            click.echo(f"    automated: {m['automation']}")
        if m["parse_problem"]:
            click.echo(f"    parse problem: {m['parse_problem']}")
        if m["html"]:
            click.echo("    text rendered from the HTML part")
        for a in m["attachments"]:
            kept = "" if a.get("kept", True) else " (not kept: over the size cap)"
            click.echo(f"    attachment: {a['filename']} {a['content_type']} {a['size']} bytes{kept}")
        click.echo("    " + (m["text"] or "").strip().replace("\n", "\n    ")[:2000])
    if out["outbox"]:
        click.echo("")
        click.echo("Outgoing:")
        now = datetime.now(UTC)
        for n, row in zip(out["outbox"], detail["outbox"], strict=True):
            extra = ""
            if n["status"] == "pending":
                wait = pending_wait(row["next_attempt_at"], row["last_error"], now)
                if wait.kind == "held":
                    extra = f" - {wait.error}"  # held with its channel: why, and since when
                else:
                    when = n["next_attempt_at"]
                    due = f"due since {when}, waiting for the outbox to send it"
                    extra = f" - {due}" if wait.kind == "due" else f" - waiting, next attempt {when}"
                    if wait.error:
                        extra += f", last error: {wait.error}"
            elif n["status"] in ("failed", "undeliverable"):
                extra = f" - {n['last_error']}"
            click.echo(f"  {n['kind']} to {n['recipient']}: {n['status']} after {n['attempts']} attempt(s){extra}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="An array of ticket objects with their targets.")
@click.pass_context
def sla(ctx: click.Context, as_json: bool) -> None:
    """Open tickets by time left on their response clock, overdue first."""
    store = _store(_settings(ctx))
    rows = store.run_sync(lambda uow: uow.list_tickets(status="open"))
    store.dispose()
    now = datetime.now(UTC)
    rows = [r for r in rows if r.get("responded_at") is None]
    rows.sort(key=lambda r: r["response_due"])
    items = []
    for r in rows:
        item = _ticket_json(r)
        item["seconds_left"] = int((r["response_due"] - now).total_seconds())
        item["overdue"] = item["seconds_left"] < 0
        item["targets"] = r.get("targets") or {}
        items.append(item)
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    if not items:
        click.echo("no open tickets waiting for a first response")
        return
    click.echo(f"{'REFERENCE':<15} {'SEV':<4} {'TIME LEFT':>10}  {'DUE (UTC)':<17} {'CUSTOMER':<20} SUBJECT")
    for t in items:
        left = "OVERDUE " + _human_delta(-t["seconds_left"]) if t["overdue"] else _human_delta(t["seconds_left"])
        due = (t["response_due"] or "")[:16].replace("T", " ")
        customer = (t["organisation"] or t["requester"].rpartition("@")[2])[:20]
        click.echo(
            f"{t['reference']:<15} {t['severity']:<4} {left:>10}  {due:<17} {customer:<20} {(t['subject'] or '')[:50]}"
        )


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Counts of tickets, messages and outbox entries."""
    store = _store(_settings(ctx))
    data = store.run_sync(lambda uow: uow.stats())
    store.dispose()
    data["outbox_oldest_pending"] = _iso(data["outbox_oldest_pending"])
    if as_json:
        click.echo(json.dumps(data))
    else:
        for k, v in data.items():
            click.echo(f"{k}: {v}")


@main.group()
def rules() -> None:
    """Check messages against the keyword rules; lint a rules file."""


@rules.command("check")
@click.argument("source", type=click.Path(allow_dash=True))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rules_check(ctx: click.Context, source: str, as_json: bool) -> None:
    """Classify an .eml file or plain text (- for standard input)."""
    from adapters.bootstrap import load_rules
    from adapters.email.parsing import parse_email
    from intake.rules import format_verdict
    from intake.text import split_message

    settings = _settings(ctx)
    try:
        ruleset = load_rules(settings)
    except IntakeError as exc:
        _fail(exc)
    data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    looks_like_mail = source.endswith(".eml") or _looks_like_headers(data)
    if looks_like_mail:
        msg = parse_email(data, recipient=settings.email.support_address)
        verdict = ruleset.classify(
            subject=msg.subject,
            body=msg.new_text,
            quoted=msg.quoted,
            attachments=[a.filename for a in msg.attachments],
        )
    else:
        split = split_message(data.decode("utf-8", "replace"))
        verdict = ruleset.classify(body=split.new, quoted=split.quoted)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "severity": int(verdict.severity) if verdict.severity else None,
                    "security": verdict.security,
                    "hits": [h.to_dict() for h in verdict.hits],
                },
                indent=2,
            )
        )
    else:
        click.echo(format_verdict(verdict))


def _looks_like_headers(data: bytes) -> bool:
    head = data[:2000].split(b"\n\n", 1)[0].split(b"\n")
    return bool(head) and all(b":" in line or line[:1] in (b" ", b"\t") for line in head[:3] if line.strip())


@rules.command("lint")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@click.pass_context
def rules_lint(ctx: click.Context, path: str | None) -> None:
    """Validate a rules file (default: the configured or shipped rules)."""
    from intake.rules import default_rules_path, lint

    settings = _settings(ctx)
    target = path or settings.rules.path or str(default_rules_path())
    try:
        summary = lint(target)
    except IntakeError as exc:
        _fail(exc)
    click.echo("\n".join(summary) if isinstance(summary, list) else f"{target}: ok; {summary}")


@main.command("demo")
@click.option(
    "--keep",
    "keep",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the demo's database (and a config file for it) in this directory.",
)
@click.pass_context
def demo(ctx: click.Context, keep: Path | None) -> None:
    """Run intake on this machine with a scripted story (a few seconds; nothing configured).

    A temporary database, the listener on a free loopback port and a built-in relay that
    captures outgoing mail; six real emails show tickets, acknowledgements, the IRT alert,
    auto-reply handling and a refused stranger. Your configured rules and templates are used
    (nothing else of your configuration). Exits 1 if anything did not happen as it should.
    """
    # The demo runs the whole product (listener, store, outbox): loaded only when it runs, so
    # that `intake tickets list` and the other quick commands do not pay for its imports.
    from adapters import demo as demo_module

    demo_module.main(ctx, keep)


if __name__ == "__main__":  # pragma: no cover
    main()
