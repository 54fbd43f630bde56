"""Tests of intake.policy's checklist ("How to Report a Problem"): which details a message lacks.

The scans are written for speed (a literal search before a case-insensitive pattern, a
look-behind after the first character, ASCII words by bytes); each is checked here against
the plain way of writing it, on random text made of the characters that matter.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from intake import policy
from intake.model import Channel, InboundMessage
from intake.policy import missing_details

# The plain ways (the references).
PHONE = re.compile(r"(?<!\d)\+?\(?\d(?:[ ().\-/]{0,2}\d){6,14}(?!\d)")
URL = re.compile(r"https?://|\bwww\.", re.IGNORECASE)
WORDS = re.compile(r"[^\W_]+")


def has_time(folded: str) -> bool:
    return bool(policy._CLOCK_OR_DATE.search(folded)) or not policy._TIME_WORDS.isdisjoint(WORDS.findall(folded))


_PIECES = st.sampled_from(
    [
        "a", "W", "w", "ww", "www.", "WwW.", "http", "HTTPS", "httpſ", "://", ":/", "/", " ", "\n", "1", "12", "2024",
        "-", ":", ".", "(", ")", "+", "_", "é", "İ", "ß", "jan", "Lunes", "mañana", "am", "PM", "x", "\u2028", "٣",
        "١٢", "ﬀ", "\t", "word ", "on ",
    ]
)  # fmt: skip
TEXT = st.lists(_PIECES, max_size=40).map("".join)


@settings(max_examples=1000, deadline=None)
@given(TEXT)
def test_scans_find_what_the_plain_patterns_find(text: str) -> None:
    assert policy._has_url(text) == bool(URL.search(text))
    assert policy._has_phone(text) == bool(PHONE.search(text))
    folded = policy._fold(text)
    assert folded == text.casefold().translate(policy._ACCENTS)
    assert policy._has_time(folded) == has_time(folded)


def message(body: str, *, subject: str = "Help", sender: str = "a@gmail.com", name: str = "") -> InboundMessage:
    return InboundMessage(
        channel=Channel.EMAIL, sender=sender, sender_name=name, subject=subject, body=body, new_text=body
    )


def test_a_full_report_lacks_nothing() -> None:
    body = (
        "Since yesterday at 10:30 the export on https://app.example.com/reports fails with error 502 "
        "for every report we try to open, and the retry button does nothing at all. It worked fine "
        "last week. Please have a look.\n\nJane Doe\nAcme Company\n+1 (555) 123-4567"
    )
    assert missing_details(message(body, name="Jane Doe"), organisation=None) == ()


def test_a_short_note_lacks_everything() -> None:
    assert missing_details(message("it is broken"), organisation=None) == (
        "company",
        "contact_name",
        "phone",
        "when",
        "description",
        "url",
    )


def test_each_detail_on_its_own() -> None:
    def lacks(body: str) -> set[str]:
        return set(missing_details(message(body, sender="a@corp.example", name="A"), organisation=None))

    words = " ".join(["word"] * 24)
    assert "description" in lacks(words)
    assert "description" not in lacks(words + " more")
    assert "url" not in lacks("see WWW.example.com")
    assert "url" in lacks("see awww.example.com")
    assert "url" not in lacks("HTTPS://example.com")
    assert "when" not in lacks("it happened on Lunes")
    assert "when" not in lacks("it happened at 9:15")
    assert "when" in lacks("it happened recently")
    assert "phone" not in lacks("call 91 123 45 67")
    assert "phone" in lacks("ticket 123456")


def test_a_mailbox_at_a_providers_country_domain_is_asked_for_its_company() -> None:
    # The same rule as entitlement's (routing): hotmail.fr is no company, acme.fr is.
    assert "company" in missing_details(message("it is broken", sender="jo@hotmail.fr"), organisation=None)
    assert "company" in missing_details(message("it is broken", sender="jo@yahoo.com.br"), organisation=None)
    assert "company" not in missing_details(message("it is broken", sender="jo@acme.fr"), organisation=None)


def test_a_url_written_without_its_scheme_is_a_url() -> None:
    # People paste the address bar's text without "https://": the request must not ask for a
    # URL the message plainly gives (it did, for "app.example.com/settings/connectors").
    def lacks(body: str) -> set[str]:
        return set(missing_details(message(body, sender="a@corp.example", name="A"), organisation=None))

    assert "url" not in lacks("from the settings page app.example.com/settings/connectors. Marketing")
    assert "url" not in lacks("Please see app.example.com/contacts?view=all")
    assert "url" not in lacks("The integration page (app.example.co.uk/integrations/slack) still says")
    assert "url" not in lacks("on acme.example.com:8443/login only")
    assert "url" not in lacks("URL:app.example.com/reports")
    from intake.policy import _has_host_path

    assert _has_host_path("/ the page app.example.com/settings fails")  # a "/" first: looked past
    # Not an address: a date, a fraction, a mail address, words with a slash.
    assert "url" in lacks("on 03/12 at 14:05, 1.5/2 of the users, and/or the admins")
    assert "url" in lacks("write to jo@example.com/ or call")
    assert "url" in lacks("the example.com domain")


def test_a_company_named_with_its_legal_form_is_a_company() -> None:
    # A signature names the company with its legal form, even from a personal mailbox.
    def lacks_company(body: str) -> bool:
        return "company" in missing_details(message(body, name="Priya"), organisation=None)

    assert not lacks_company("Priya Raman\nMarketing Operations Lead, Globex Corporation\n+44 7700 900123")
    assert not lacks_company("Javier Ortega\nIT Manager | Iberlogística S.L.\n+34 91 123 45 67")
    assert not lacks_company("Ken Sato\nSakura Trading Co., Ltd. +81 3-1234-5678")
    assert not lacks_company("Hannah\nContoso GmbH")
    assert not lacks_company("Pablo\nConstructora Herrera S.A. de C.V.")
    assert not lacks_company("Tom\nBrightPath Analytics LLC")
    assert lacks_company("it is broken. Thanks, Tom")
    assert lacks_company("the ltd edition and the corp. rate")  # lower case: words, not a company
    # A number, a lone letter or a word joined on is no company name.
    for words in ("we have 2 AB tests", "I AG ree", "the Team Co-op plan", "on Windows 10 SA edition"):
        assert lacks_company(words), words


def test_chat_notices_show_what_a_customer_wrote_as_text() -> None:
    """A triage or response-clock notice posted to a chat channel carries the customer's subject
    (and, for triage, their words): an emailed <!channel> would ping the channel and a
    <url|label> would be a link dressed as ours. The email versions keep the text as written."""
    from dataclasses import replace

    from intake.acknowledgement import TemplateBook, render_sla_notice, render_triage
    from intake.model import Channel, InboundMessage
    from intake.policy import Policy
    from tests.intake.test_routing import NOW
    from tests.intake.test_routing import ticket as routing_ticket

    subject = "urgent <!here> & <https://evil.example|open>"
    ticket = replace(routing_ticket("SUP-7K3M-9QX4", requester="dan@acme.com", org=None), subject=subject)
    message = InboundMessage(
        channel=Channel.EMAIL,
        sender="dan@acme.com",
        recipient="support@example.com",
        subject=subject,
        body="see <!channel>",
        new_text="see <!channel>",
    )
    templates, policy = TemplateBook.load().get(None), Policy()
    for chat in (False, True):
        _, triage = render_triage(
            templates=templates, policy=policy, message=message, ticket=ticket, plan=policy.plan_of(None), chat=chat
        )
        _, clock = render_sla_notice(
            templates=templates,
            policy=policy,
            what="overdue",
            ticket=ticket,
            requester="dan@acme.com",
            target="initial_response",
            due=NOW,
            chat=chat,
        )
        for text in (triage, clock):
            if chat:
                assert "urgent &lt;!here&gt; &amp; &lt;https://evil.example|open&gt;" in text
                assert "<!" not in text and "<https" not in text
            else:
                assert subject in text
        assert ("see &lt;!channel&gt;" if chat else "see <!channel>") in triage
