"""Mail out by SMTP (aiosmtplib): `EMAIL_SMTP_TLS` `starttls` (port 587, the default),
`tls` (implicit, port 465) or `none` (a relay on the same host); certificates checked
against the system's CAs, or `EMAIL_CA_FILE`. One connection per send.

The server's answer sorted by what the channel worker does next: a 4xx reply
(greylisting, a rate limit, a full queue) or a lost connection is worth retrying
(`SendError`); a 5xx reply (no such mailbox, refused as spam) fails the send for good; a
refused login is a bad setting, said so in the error.
"""

from __future__ import annotations

from email.message import EmailMessage

import aiosmtplib

from nanoclaw.channels.base import SendError
from nanoclaw.channels.email_imap import tls_context
from nanoclaw.config import Settings


def _code_error(code: int, message: str) -> SendError:
    text = f"SMTP {code} {message}".strip()[:300]
    return SendError(text, permanent=500 <= code < 600)


async def send(settings: Settings, msg: EmailMessage, sender: str, to: str) -> None:
    s = settings
    client = aiosmtplib.SMTP(
        hostname=s.email_smtp_host, port=s.email_smtp_port, timeout=60,
        use_tls=s.email_smtp_tls == "tls", start_tls=s.email_smtp_tls == "starttls",
        tls_context=tls_context(s) if s.email_smtp_tls != "none" else None)
    try:
        await client.connect()
        if s.email_username and s.email_password:
            await client.login(s.email_username, s.email_password)
        errors, _ = await client.send_message(msg, sender=sender, recipients=[to])
        if to in errors:
            code, text = errors[to]
            raise _code_error(code, text)
        try:
            await client.quit()
        except aiosmtplib.SMTPException:  # sent already; the goodbye does not matter
            pass
    except aiosmtplib.SMTPAuthenticationError as e:
        raise SendError(f"EMAIL_USERNAME/EMAIL_PASSWORD refused by {s.email_smtp_host}:"
                        f" SMTP {e.code} {e.message}"[:300], permanent=True) from None
    except aiosmtplib.SMTPRecipientsRefused as e:
        first = e.recipients[0] if e.recipients else None
        raise _code_error(first.code if first else 550, first.message if first else
                          "recipient refused") from None
    except aiosmtplib.SMTPResponseException as e:
        raise _code_error(e.code, e.message) from None
    except (aiosmtplib.SMTPException, OSError) as e:
        raise SendError(f"SMTP {s.email_smtp_host}:{s.email_smtp_port}: {type(e).__name__}:"
                        f" {e}"[:300]) from None
    finally:
        if client.is_connected:  # failed or cut off (a timeout): no goodbye awaited
            client.close()
