"""Enhanced status codes (RFC 2034, RFC 3463) on every reply the listener sends.

RFC 2033 section 5 requires an LMTP server to implement ENHANCEDSTATUSCODES, and Postfix,
Exim and Dovecot offer it over SMTP as well: a sending MTA then logs and bounces with a
machine-readable reason ("5.1.1" an unknown mailbox, "4.3.0" try again) instead of guessing
from the text. intake's own replies carry their codes in their texts (listener.py); aiosmtpd's
("250 OK", "503 Error: need MAIL command", "501 Syntax: DATA"...) do not, so
:func:`enhance` adds one as the reply leaves, chosen by the reply code (RFC 3463's
classes: X.5.x a protocol error, X.7.x security, X.3.4 too big...).

RFC 2034 section 3: every 2xx, 4xx and 5xx reply carries one, "except the initial greeting
and any response to HELO or EHLO" (LHLO in LMTP); the listener skips those itself.
"""

from __future__ import annotations

import re

# The reply code -> its enhanced status code, where a more precise one than X.0.0 fits.
_BY_CODE = {
    "220": "2.0.0",  # STARTTLS's "Ready to start TLS" (the greeting gets none)
    "221": "2.0.0",
    "235": "2.7.0",
    "250": "2.0.0",
    "251": "2.1.5",
    "252": "2.0.0",  # VRFY: cannot verify, will accept
    "421": "4.3.0",
    "432": "4.7.12",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",  # a command that could not be interpreted (syntax, unknown, too long)
    "501": "5.5.4",  # invalid arguments
    "502": "5.5.1",  # not implemented
    "503": "5.5.1",  # out of sequence
    "504": "5.5.4",
    "530": "5.7.0",
    "534": "5.7.9",
    "535": "5.7.8",
    "538": "5.7.11",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.7.0",  # aiosmtpd's only 554: "Command refused due to lack of security"
    "555": "5.5.4",  # MAIL FROM / RCPT TO parameters not recognized
}
_CLASS = {"2": "2.0.0", "4": "4.0.0", "5": "5.0.0"}
# "250 2.1.5 ..." / "250-2.0.0 ..." / "250 2.0.0": a reply that already has one.
_HAS_CODE = re.compile(r"[0-9]{3}[ -][245]\.[0-9]{1,3}\.[0-9]{1,3}(?: |$)")


def enhance(line: str) -> str:
    """One reply line with its enhanced status code: added when a 2xx/4xx/5xx line has none.

    >>> enhance("250 OK"), enhance("503 Error: need MAIL command"), enhance("354 End data")
    ('250 2.0.0 OK', '503 5.5.1 Error: need MAIL command', '354 End data')
    """
    if len(line) < 3 or line[0] not in _CLASS or not line[:3].isdigit() or _HAS_CODE.match(line):
        return line
    code = line[:3]
    status = _BY_CODE.get(code, _CLASS[line[0]])
    if len(line) == 3:
        return f"{code} {status}"
    if line[3] not in " -":
        return line  # not a reply line
    return f"{line[:4]}{status} {line[4:]}" if line[4:] else f"{line[:4]}{status}"
