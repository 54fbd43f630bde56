"""A good mail citizen: flood limits, no backscatter, our own loops, IRT alert ceiling, once-only alerts."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests.adapters.conftest import CapturedMessage, RelayStandIn
from tests.adapters.harness import Harness, mail, ref_of, running_intake, settings_for
from tests.adapters.test_cli import cli

BREACH = "We think there was a data breach: unauthorized access to our admin account last night."


async def test_acknowledgements_per_sender_are_limited_with_one_last_notice(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    extra = "[limits]\nacks_per_sender = 3\ntickets_per_sender = 100\nack_period_minutes = 90\n"
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra)) as h:
        for i in range(6):
            assert (await h.send(mail(subject=f"problem {i}"))).code == 250
        await h.outbox_settled()
        acks = await smtp_relay.wait_for(3)
        assert "last automatic reply" in acks[2].message.get_content()
        # It says for how long, as configured (it said "today" of a 60-minute window).
        assert "will follow for up to 90 minutes." in " ".join(acks[2].message.get_content().split())
        assert "last automatic reply" not in acks[0].message.get_content()
        tickets = h.tickets()
        assert len(tickets) == 6  # still stored, each its own ticket
        suppressed = [t for t in tickets if t["ack_status"].startswith("suppressed: flood limit")]
        assert len(suppressed) == 3
        # Another sender is not affected.
        await h.send(mail(sender="bob@acme.com"))
        await smtp_relay.wait_for(4)


async def test_new_tickets_per_sender_are_limited(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    extra = "[limits]\ntickets_per_sender = 2\n"
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra)) as h:
        refs = [ref_of((await h.send(mail(sender="flood@acme.com", subject=f"spam {i}"))).text) for i in range(5)]
        assert len(set(refs)) == 2  # the flood became two tickets' worth of noise
        assert refs[2:] == [refs[1]] * 3
        detail = h.detail(refs[1])
        assert [m["route"] for m in detail["messages"]] == ["new", "flood", "flood", "flood"]
        assert "flood limit" in detail["messages"][1]["route_note"]
        await h.outbox_settled()
        await smtp_relay.wait_for(2)  # no acknowledgement for the flood


async def test_reply_to_is_not_identity(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    extra = "[limits]\nacks_per_sender = 1\n"
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra)) as h:
        await h.send(mail(sender="eve@acme.com", headers={"Reply-To": "a@acme.com"}))
        await h.send(mail(sender="eve@acme.com", headers={"Reply-To": "b@acme.com"}))
        await h.outbox_settled()
        [ack] = await smtp_relay.wait_for(1)  # the limit counts the From address, whatever Reply-To says
        assert ack.rcpt_tos == ("eve@acme.com",)


AUTH = '[email]\ntrusted_authserv_ids = ["mx.example.com"]\n'


async def test_no_backscatter_to_forged_senders(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=AUTH)) as h:
        # Unauthenticated stranger: a ticket, no acknowledgement, and the ticket says why.
        r1 = await h.send(mail(sender="forged@victim.example"))
        # A forged Authentication-Results from outside (wrong authserv-id) counts for nothing.
        r2 = await h.send(
            mail(
                sender="forged2@victim.example",
                headers={"Authentication-Results": "evil.example; spf=pass smtp.mailfrom=victim.example"},
            )
        )
        # SPF pass reported by our own MTA: acknowledged.
        r3 = await h.send(
            mail(
                sender="real@partner.example",
                headers={"Authentication-Results": "mx.example.com; spf=pass smtp.mailfrom=partner.example"},
            )
        )
        # A known customer organisation (configured domain) is acknowledged without authentication.
        r4 = await h.send(mail(sender="alice@acme.com"))
        await h.outbox_settled()
        acks = await smtp_relay.wait_for(2)
        assert sorted(a.rcpt_tos[0] for a in acks) == ["alice@acme.com", "real@partner.example"]
        for r in (r1, r2):
            status = h.detail(ref_of(r.text))["ack_status"]
            assert status.startswith("suppressed: sender not authenticated"), status
        assert h.detail(ref_of(r3.text))["ack_status"] == "queued"
        assert h.detail(ref_of(r4.text))["ack_status"] == "queued"


async def test_an_earlier_participant_counts_as_known(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=AUTH)) as h:
        authed = {"Authentication-Results": "mx.example.com; dkim=pass header.d=partner.example"}
        await h.send(mail(sender="carol@partner.example", headers=authed))
        await h.outbox_settled()
        await smtp_relay.wait_for(1)
        # Later, her mail arrives without a usable Authentication-Results: she is a known participant.
        await h.send(mail(sender="carol@partner.example", subject="another thing"))
        await h.outbox_settled()
        await smtp_relay.wait_for(2)


async def test_our_own_loop_marker_is_never_acknowledged(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        await h.send(mail())
        await h.outbox_settled()
        [ack] = await smtp_relay.wait_for(1)
        # Our acknowledgement comes back (a forwarding loop): stored, not acknowledged.
        reply = await h.send(ack.content, mail_from="alice@acme.com")
        assert reply.code == 250
        await asyncio.sleep(0.3)
        await smtp_relay.wait_for(1)
        # Mail "from" our own support address is never answered either.
        await h.send(mail(sender="support@example.com", subject="hello"), mail_from="support@example.com")
        await asyncio.sleep(0.3)
        await smtp_relay.wait_for(1)


async def test_security_alert_once_per_ticket_and_raised_by_follow_up(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        ref = ref_of((await h.send(mail(subject="Export is slow", message_id="<s1@acme.com>"))).text)
        await h.outbox_settled()
        [ack] = await smtp_relay.wait_for(1)
        assert h.detail(ref)["severity"] == 3
        # A follow-up newly reports a breach: Severity 1, alert once (and the customer told once).
        await h.send(mail(subject=f"Re: Export is slow [{ref}]", body=BREACH))
        await h.outbox_settled()
        msgs = await smtp_relay.wait_for(3)
        [alert] = [m for m in msgs[1:] if m.rcpt_tos == ("irt-lead@example.com",)]
        assert [m.rcpt_tos for m in msgs[1:] if m is not alert] == [("alice@acme.com",)]
        assert ref in alert.message["Subject"] and "SECURITY" in alert.message["Subject"]
        body = alert.message.get_content()
        assert "unauthorized access" in body.lower() and "intake tickets show " + ref in body
        detail = h.detail(ref)
        assert detail["severity"] == 1 and detail["security"]
        # More matching follow-ups, and a reply quoting our Severity 1 words: no new page.
        await h.send(mail(subject=f"Re: [{ref}]", body="Also: ransomware note found on one server."))
        quoted = "Thanks.\n\n> " + ack.message.get_content().replace("\n", "\n> ")
        await h.send(mail(subject=f"Re: [{ref}]", body=quoted, in_reply_to=ack.message["Message-ID"]))
        await h.outbox_settled()
        await asyncio.sleep(0.3)
        await smtp_relay.wait_for(3)
        # Severity is never lowered by a quiet follow-up.
        await h.send(mail(subject=f"Re: [{ref}]", body="All good now, thanks."))
        assert h.detail(ref)["severity"] == 1


async def test_new_security_ticket_acknowledges_severity_1_and_alerts(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        reply = await h.send(mail(subject="Posible brecha de seguridad", body="Hubo acceso no autorizado a la cuenta."))
        ref = ref_of(reply.text)
        await h.outbox_settled()
        msgs = await smtp_relay.wait_for(2)
        ack = next(m for m in msgs if m.rcpt_tos == ("alice@acme.com",))
        alert = next(m for m in msgs if m.rcpt_tos == ("irt-lead@example.com",))
        # Written in Spanish, so answered in Spanish.
        text = " ".join(ack.message.get_content().split())
        assert "Severidad 1" in text and "Equipo de Respuesta a Incidentes (IRT)" in text
        assert ref in alert.message["Subject"]
        [t] = h.tickets()
        assert t["severity"] == 1 and t["security"]


async def test_irt_alert_ceiling_sends_one_summary(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    extra = "[limits]\nirt_alerts_per_hour = 2\nacks_per_sender = 100\ntickets_per_sender = 100\n"
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra)) as h:
        for i in range(5):
            await h.send(mail(sender=f"user{i}@acme.com", subject=f"data breach {i}", body=BREACH))
        await h.outbox_settled()
        msgs = await smtp_relay.wait_for(5 + 3)  # five acknowledgements, two alerts, one summary
        to_irt = [m for m in msgs if m.rcpt_tos == ("irt-lead@example.com",)]
        assert len(to_irt) == 3
        assert sum("ceiling reached" in m.message["Subject"] for m in to_irt) == 1
        assert all(t["security"] and t["severity"] == 1 for t in h.tickets())


async def test_a_follow_up_that_raises_its_ticket_to_severity_1_is_answered_once(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    """The policy: "If you suspect a security or data incident please highlight this issue
    directly on the ticket or email. The IRT lead will reach out directly." A follow-up that
    reports one raises its ticket to Severity 1 and alerts the lead; the customer, who got no
    acknowledgement for a follow-up, is now told so once, threaded under their message, and the
    alert says truly whether they were (it said "The customer was told" also when they were
    not). An automated follow-up raises and alerts, but is not answered."""
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        await h.send(mail(sender="Bob <bob@acme.com>", subject="Data breach", body=BREACH))
        ref = ref_of((await h.send(mail(subject="Export is slow"))).text)
        await h.outbox_settled()
        msgs = await smtp_relay.wait_for(3)
        [new_alert] = [m for m in msgs if m.rcpt_tos == ("irt-lead@example.com",)]
        new_text = " ".join(new_alert.message.get_content().split())
        assert "The customer was told that the IRT lead will reach out directly." in new_text

        follow_up = mail(subject=f"Re: Export is slow [{ref}]", body=BREACH, message_id="<raise-1@acme.com>")
        await h.send(follow_up)
        await h.outbox_settled()
        later = (await smtp_relay.wait_for(5))[3:]
        [raised] = [m for m in later if m.rcpt_tos == ("irt-lead@example.com",)]
        [notice] = [m for m in later if m.rcpt_tos == ("alice@acme.com",)]
        text = " ".join(raised.message.get_content().split())
        assert "The customer was told that the IRT lead will reach out directly." in text
        told = notice.message
        assert told["In-Reply-To"] == "<raise-1@acme.com>" and ref in told["Subject"]
        assert told["Auto-Submitted"] == "auto-replied"
        body = " ".join(told.get_content().split())
        assert f"ticket {ref}" in body and "Severity 1" in body and "will reach out to you directly" in body
        # Each piece of evidence marks a cut with one ellipsis, not "...…" nor "…...".
        for alert_text in (new_text, text):
            assert "unauthorized access" in alert_text
            assert "...…" not in alert_text and "…..." not in alert_text

        # Once: a second report on the ticket, already Severity 1, is neither alerted nor answered.
        await h.send(mail(subject=f"Re: Export is slow [{ref}]", body=BREACH + "\nStill going on.\n"))
        await h.outbox_settled()
        await asyncio.sleep(0.3)
        assert len(smtp_relay.messages) == 5

        # An automated follow-up (an out-of-office reply quoting nothing of ours) raises and
        # alerts, and is not answered; the alert says why.
        other = ref_of((await h.send(mail(subject="Report layout", sender="carol@acme.com"))).text)
        await smtp_relay.wait_for(6)
        auto = mail(
            subject=f"Automatic reply: Report layout [{other}]",
            body=BREACH,
            sender="carol@acme.com",
            headers={"Auto-Submitted": "auto-replied"},
        )
        await h.send(auto)
        await h.outbox_settled()
        [alert3] = (await smtp_relay.wait_for(7))[6:]
        assert alert3.rcpt_tos == ("irt-lead@example.com",)
        text3 = " ".join(alert3.message.get_content().split())
        assert "The customer has not been told that the IRT lead will reach out (automated mail" in text3
        await asyncio.sleep(0.3)
        assert len(smtp_relay.messages) == 7


async def test_our_irt_alert_coming_back_joins_its_ticket_and_pages_no_one(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        ref = ref_of((await h.send(mail(subject="help", body=BREACH))).text)
        await h.outbox_settled()
        msgs = await smtp_relay.wait_for(2)
        alert = next(m for m in msgs if m.rcpt_tos == ("irt-lead@example.com",))
        # The IRT lead's mailbox redirects mail to a shared inbox that is support: our own alert
        # (its words are a security incident's) comes back, Message-ID and loop marker intact.
        reply = await h.send(alert.content, mail_from="irt-lead@example.com")
        assert reply.code == 250 and ref in reply.text
        # The lead answers the alert: a follow-up on the ticket, no page about their own words.
        answer = mail(
            sender="IRT Lead <irt-lead@example.com>",
            subject="Re: " + alert.message["Subject"],
            body="On it: is this a data breach of the EU tenant?",
            in_reply_to=alert.message["Message-ID"],
        )
        reply = await h.send(answer, mail_from="irt-lead@example.com")
        assert reply.code == 250 and ref in reply.text
        await h.outbox_settled()
        await asyncio.sleep(0.3)
        await smtp_relay.wait_for(2)  # no new page: an alert loop would page on every turn
        [ticket] = h.tickets()
        assert ticket["reference"] == ref
        # (the lead is one of our own: their answer joins by the reference in its subject)
        assert [m["route"] for m in h.detail(ref)["messages"]] == ["new", "header", "reference"]


async def test_an_alert_held_by_the_ceiling_then_sent_does_not_say_what_it_cannot_know(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    """A ticket that opened as a security incident while the hourly alert ceiling held its page
    is alerted by the customer's next security follow-up. Whether the customer was told then
    depends on its acknowledgement: the alert says to look, and no second notice goes."""
    from tests.adapters.test_policy import DrivenClock

    clock = DrivenClock()
    settings = settings_for(tmp_path, relay_port=smtp_relay.port, extra="[limits]\nirt_alerts_per_hour = 1\n")
    async with running_intake(settings, clock=clock) as h:
        await h.send(mail(sender="bob@acme.com", subject="Data breach", body=BREACH))
        ref = ref_of((await h.send(mail(sender="carol@acme.com", subject="Breach too", body=BREACH))).text)
        await h.outbox_settled()
        held = await smtp_relay.wait_for(4)  # Bob's ack and alert, Carol's ack, the ceiling's summary
        assert sum(m.rcpt_tos == ("irt-lead@example.com",) for m in held) == 2
        clock.advance(hours=2)
        await h.send(mail(sender="carol@acme.com", subject=f"Re: Breach too [{ref}]", body="Ransomware note found."))
        await h.outbox_settled()
        [alert] = (await smtp_relay.wait_for(5))[4:]
        assert alert.rcpt_tos == ("irt-lead@example.com",) and ref in alert.message["Subject"]
        text = " ".join(alert.message.get_content().split())
        assert "The ticket was a security incident before this message, and no alert went then" in text
        assert "The customer was told" not in text and "has not been told" not in text
        await asyncio.sleep(0.3)
        assert len(smtp_relay.messages) == 5  # no security notice to Carol: she was a security ticket already


def _to_lead(msgs: list[CapturedMessage]) -> list[CapturedMessage]:
    return [m for m in msgs if m.rcpt_tos == ("irt-lead@example.com",)]


def _notes(h: Harness, ref: str) -> list[str]:
    return [n["text"] for n in h.detail(ref)["notes"]]


SHARES = "[limits]\nirt_alerts_per_organisation_per_hour = 2\nacks_per_sender = 100\ntickets_per_sender = 100\n"


def passed(domain: str) -> dict[str, str]:
    """The Authentication-Results our MTA (AUTH) writes for mail it authenticated as ``domain``."""
    return {"Authentication-Results": f"mx.example.com; spf=pass smtp.mailfrom={domain}"}


async def test_one_organisation_s_flood_stops_paging_after_its_share_while_another_s_incident_pages(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    """A scanner at one organisation forwards its findings to support from addresses of its own
    domain, authenticated: after the organisation's share (2 here), its incidents are Severity 1
    on their tickets but page no more, one summary names it, and another customer's incident
    in the same hour still pages (it did not: one global ceiling held every organisation)."""
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=AUTH + SHARES)) as h:
        refs = []
        for i in range(5):  # addresses, case: one organisation, scanner.example
            sender, subject = f"Scanner <host{i}@Scanner.example>", f"Breach finding {i}"
            found = mail(sender=sender, subject=subject, body=BREACH, headers=passed("scanner.example"))
            refs.append(ref_of((await h.send(found)).text))
        other = ref_of((await h.send(mail(sender="carol@acme.com", subject="We were hacked", body=BREACH))).text)
        await h.outbox_settled()
        msgs = await smtp_relay.wait_for(6 + 2 + 1 + 1)  # acknowledgements, 2 alerts, 1 summary, acme's alert
        to_lead = _to_lead(msgs)
        alerts = [m for m in to_lead if "held" not in m.message["Subject"]]
        assert sorted(ref_of(m.message["Subject"]) for m in alerts) == sorted([*refs[:2], other])
        [summary] = [m for m in to_lead if "held" in m.message["Subject"]]
        assert (
            summary.message["Subject"]
            == "[SECURITY] IRT alerts for scanner.example held after 2 paged in the last hour"
        )
        body = " ".join(summary.message.get_content().split())
        assert f"The first one not paged: {refs[2]}" in body and "Other organisations still page" in body
        assert all(t["security"] and t["severity"] == 1 for t in h.tickets())

        # Each held ticket says truly why it was not paged: the organisation's share, not the ceiling.
        [held] = [n for n in _notes(h, refs[2]) if "not paged" in n]
        assert held.startswith("IRT alert not paged: scanner.example has had its share (2 alerts for it")
        assert "other organisations still page" in held and "a summary naming scanner.example goes" in held
        [later] = [n for n in _notes(h, refs[4]) if "not paged" in n]
        assert "the lead was sent this hour's summary for scanner.example" in later
        assert not [n for n in _notes(h, other) if "not paged" in n]

        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[storage]\nurl = "{h.settings.storage.url}"\n')
        code, out = cli("--config", str(cfg), "tickets", "show", refs[2])
        assert code == 0 and "SECURITY INCIDENT" in out
        assert "IRT alert not paged: scanner.example has had its share" in out
        assert "irt-org-summary to irt-lead@example.com: sent" in out


async def test_one_tenant_of_a_shared_mail_host_does_not_hold_another_s_alerts(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    """contoso.onmicrosoft.com and trial123.onmicrosoft.com are two organisations (anyone can
    open a trial tenant), though one registrable domain; two users of posteo.de are two
    senders: an authenticated flood from one of them past its share (2) leaves the other's
    incident paging."""
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=AUTH + SHARES)) as h:
        refs = []
        for flooder, victim in (
            ("a@trial123.onmicrosoft.com", "it@contoso.onmicrosoft.com"),
            ("attacker@posteo.de", "alice@posteo.de"),
        ):
            for i in range(3):
                flood = mail(sender=flooder, subject=f"Hacked {i}", body=BREACH, headers=passed(flooder.split("@")[1]))
                await h.send(flood)
            real = mail(sender=victim, body=BREACH, headers=passed(victim.split("@")[1]))
            refs.append(ref_of((await h.send(real)).text))
        await h.outbox_settled()
        for ref in refs:
            assert not [n for n in _notes(h, ref) if "not paged" in n]
        msgs = await smtp_relay.wait_for(2 * (4 + 3 + 1))  # acknowledgements; the alerts; the flooder's summary
        subjects = " ".join(m.message["Subject"] for m in _to_lead(msgs))
        assert all(ref in subjects for ref in refs)


async def test_the_global_ceiling_still_holds_every_organisation_and_says_so(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    """Many senders at once: three within their shares of 2 reach the ceiling of 3; past it
    nobody pages, one summary says the ceiling was reached, and the held tickets name the
    ceiling, not their sender's share."""
    extra = SHARES + "irt_alerts_per_hour = 3\n"
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra)) as h:
        refs = []
        for sender in ("a@one.example", "b@two.example", "c@three.example", "d@four.example", "e@one.example"):
            refs.append(ref_of((await h.send(mail(sender=sender, subject="Breach", body=BREACH))).text))
        await h.outbox_settled()
        msgs = await smtp_relay.wait_for(5 + 3 + 1)
        to_lead = _to_lead(msgs)
        assert sum("ceiling reached" in m.message["Subject"] for m in to_lead) == 1
        assert sorted(ref_of(m.message["Subject"]) for m in to_lead if "ceiling" not in m.message["Subject"]) == sorted(
            refs[:3]
        )
        for ref, org in ((refs[3], "d@four.example"), (refs[4], "e@one.example")):  # mail not authenticated
            [held] = [n for n in _notes(h, ref) if "not paged" in n]
            assert held.startswith("IRT alert not paged: the global ceiling is reached (3 alerts in the last hour")
            assert f"of them for {org}" in held and "has had its share" not in held


async def test_one_summary_per_organisation_per_hour(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    """A flood that goes on for hours: each hour its organisation pages up to its share again
    and the lead gets one summary naming it, not one per held incident. Two people at one
    public mail provider are two organisations; one person's +tag aliases are one."""
    from tests.adapters.test_policy import DrivenClock

    clock = DrivenClock()
    extra = SHARES.replace("= 2", "= 1", 1)
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra), clock=clock) as h:
        for hour in range(2):
            for i in range(3):
                await h.send(mail(sender=f"loop+{hour}{i}@gmail.com", subject=f"Hacked {hour}.{i}", body=BREACH))
                clock.advance(minutes=5)
            await h.send(mail(sender="dora@gmail.com", subject=f"Ransomware {hour}", body=BREACH))
            clock.advance(minutes=50)
        await h.outbox_settled()
        msgs = await smtp_relay.wait_for(8 + 2 * (1 + 1 + 1))  # per hour: loop's alert and summary, dora's alert
        to_lead = _to_lead(msgs)
        summaries = [m.message["Subject"] for m in to_lead if "held" in m.message["Subject"]]
        assert summaries == ["[SECURITY] IRT alerts for loop@gmail.com held after 1 paged in the last hour"] * 2
        paged = [m for m in to_lead if "held" not in m.message["Subject"]]
        assert len(paged) == 4  # loop's first of each hour, and dora's each hour


def test_the_organisation_share_defaults_to_five_and_is_part_of_the_ceiling(tmp_path: Path) -> None:
    from adapters.bootstrap import make_limits
    from adapters.settings import Settings, load_settings
    from intake.errors import ConfigError

    assert make_limits(Settings()).irt_alerts_per_organisation == 5
    config = tmp_path / "intake.toml"
    # A file written before the share existed keeps working: a ceiling under 5 is the share too.
    config.write_text("[limits]\nirt_alerts_per_hour = 3\n")
    assert make_limits(load_settings(config)).irt_alerts_per_organisation == 3
    config.write_text("[limits]\nirt_alerts_per_organisation_per_hour = 8\n")
    limits = make_limits(load_settings(config))
    assert (limits.irt_alerts_per_organisation, limits.irt_alerts_per_hour) == (8, 20)
    config.write_text("[limits]\nirt_alerts_per_hour = 10\nirt_alerts_per_organisation_per_hour = 12\n")
    with pytest.raises(ConfigError, match=re.escape("limits.irt_alerts_per_organisation_per_hour: Value error, 12 is")):
        load_settings(config)
    with pytest.raises(ConfigError, match="more than irt_alerts_per_hour \\(10\\): an organisation's share is part"):
        load_settings(config)
    config.write_text("[limits]\nirt_alerts_per_organisation_per_hour = 0\n")
    with pytest.raises(ConfigError, match="irt_alerts_per_organisation_per_hour: Input should be greater than"):
        load_settings(config)
