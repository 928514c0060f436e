"""Email for the channel contract, over real servers: a private Dovecot (IMAP, the bot's
mailbox; tests/servers/dovecot.py, one per test run) and an `aiosmtpd` SMTP sink on
127.0.0.1 that records what the bot sends and misbehaves on cue.

A user "writes" by an IMAP APPEND to the bot's INBOX, as the receiving server delivers:
with the `Authentication-Results` it adds (`mx.bot.test`, dkim and spf pass for the From
domain unless a test forges it). The sink takes every mail; its fault rules (FakeServer's
`Rule`, method "send", matched on `to`) answer the DATA command: `status` 429 as a
rate-limit reply (`451 4.7.1`), another status as that SMTP code (4xx or 5xx), `stall`
(no answer until released), `drop` (the connection closed), `land_then_stall` (the mail
is kept, so the user has it, and the answer never comes).

Email in the contract's terms: a chat is the user's address, a thread a reply chain (the
first Message-ID of `References`); users post only in threads of their own mail (every
message is in one: `top_level` false); no edits of either side, no reactions, no typing;
a card is a numbered list answered by a bare number. A resent mail carries the same
Message-ID (a mail program shows it once) but the sink sees it twice, so sends count as
at least once (`idempotent_sends` false).
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import ipaddress
import itertools
import os
import ssl
import tempfile
import threading
import time
import uuid
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import formatdate
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult

from fakes.base import Call, Rule
from fakes.contract import PlatformFake, Sent

AUTHSERV = "mx.bot.test"
PASSWORD = "bot-password"
_DOVECOT: Any = None
_USERS = itertools.count(1)
MAILBOXES = [f"bot{i}" for i in range(1, 9)]


def dovecot() -> Any:
    """The run's Dovecot (started on first use, stopped at exit)."""
    global _DOVECOT
    if _DOVECOT is None:
        from servers.dovecot import Dovecot

        _DOVECOT = Dovecot({u: PASSWORD for u in MAILBOXES}).start()
        atexit.register(_DOVECOT.stop)
    return _DOVECOT


def make_cert(directory: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert file, key file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cf, kf = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cf, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(kf, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cf, kf


class SmtpSink:
    """An aiosmtpd server in its own thread: records mails and calls, applies rules.
    `tls`: None (plain), "starttls" (offers and requires STARTTLS) or "tls" (implicit)."""

    def __init__(self, tls: str | None = None, user: str = "", password: str = "") -> None:
        self.tls, self.user, self.password = tls, user, password
        self.calls: list[Call] = []
        self.rules: list[Rule] = []
        self.mails: list[tuple[str, bytes, float]] = []  # (to, raw, when)
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self.cert: tuple[str, str] | None = None
        self._release: asyncio.Event | None = None
        self._ready = threading.Event()

    def start(self) -> "SmtpSink":
        if self.tls:
            self.cert = make_cert(tempfile.mkdtemp(prefix="nc-smtp-"))
        threading.Thread(target=self._serve, daemon=True).start()
        if not self._ready.wait(10):
            raise RuntimeError("smtp sink did not start")
        return self

    def _ctx(self) -> ssl.SSLContext:
        assert self.cert
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*self.cert)
        return ctx

    def _serve(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._release = asyncio.Event()

        def factory() -> SMTP:
            return SMTP(self, hostname="sink.test", auth_require_tls=False,
                        authenticator=self._auth,
                        tls_context=self._ctx() if self.tls == "starttls" else None,
                        require_starttls=self.tls == "starttls")

        server = self.loop.run_until_complete(self.loop.create_server(
            factory, "127.0.0.1", 0, ssl=self._ctx() if self.tls == "tls" else None))
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        self._ready.set()
        self.loop.run_forever()
        server.close()
        self.loop.close()

    def stop(self) -> None:
        if self.loop is not None:
            self.release()
            self.loop.call_soon_threadsafe(self.loop.stop)

    def _auth(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        login = getattr(auth_data, "login", b"") or b""
        pw = getattr(auth_data, "password", b"") or b""
        ok = login.decode() == self.user and pw.decode() == self.password
        return AuthResult(success=ok, handled=False)

    # ---- rules -----------------------------------------------------------------------------
    def inject(self, count: int = 1, status: int | None = None, stall: bool = False,
               drop: bool = False, land_then_stall: bool = False, **match: Any) -> Rule:
        rule = Rule("send", count, status, None, stall, drop, land_then_stall, match)
        with self.lock:
            self.rules.append(rule)
        return rule

    def _take(self, to: str) -> Rule | None:
        with self.lock:
            for r in self.rules:
                if r.count > 0 and all(str({"to": to}.get(k)) == str(v)
                                       for k, v in r.match.items()):
                    r.count -= 1
                    r.hits += 1
                    return r
        return None

    def release(self) -> None:
        if self.loop is not None:
            def _rel() -> None:
                assert self._release is not None
                self._release.set()
                self._release = asyncio.Event()
            self.loop.call_soon_threadsafe(_rel)

    def record(self, to: str, outcome: str) -> None:
        with self.lock:
            self.calls.append(Call("send", {"to": to}, time.time(), outcome))

    # ---- aiosmtpd hooks ----------------------------------------------------------------------
    async def handle_DATA(self, server, session, envelope) -> str:
        to = (envelope.rcpt_tos or ["?"])[0].lower()
        raw = envelope.original_content or envelope.content or b""
        rule = self._take(to)
        if rule is not None:
            release = self._release
            assert release is not None
            if rule.land_then_stall:
                with self.lock:
                    self.mails.append((to, raw, time.time()))
                self.record(to, "landed-stalled")
                await release.wait()
                server.transport.abort()
                return "421 4.4.2 gone"
            if rule.stall:
                self.record(to, "stalled")
                await release.wait()
                return "451 4.4.2 timeout"
            if rule.drop:
                self.record(to, "dropped")
                server.transport.abort()
                return "421 4.4.2 dropped"
            self.record(to, f"injected:{rule.status}")
            if rule.status == 429:
                return "451 4.7.1 Rate limit exceeded, try again later"
            code = rule.status or 451
            return f"{code} {'4.3.0 Temporary failure' if code < 500 else '5.1.1 Refused'}"
        with self.lock:
            self.mails.append((to, raw, time.time()))
        self.record(to, "ok")
        return "250 2.0.0 Ok: queued"

    # ---- what was sent -------------------------------------------------------------------------
    def sent_to(self, to: str | None = None) -> list[EmailMessage]:
        with self.lock:
            got = [raw for t, raw, _ in self.mails if to is None or t == to.lower()]
        return [BytesParser(policy=policy.default).parsebytes(r) for r in got]  # type: ignore


def text_of(msg: EmailMessage) -> str:
    body = msg.get_body(preferencelist=("plain",))
    return body.get_content().replace("\r\n", "\n").rstrip("\n") if body else ""


def ids(value: Any) -> list[str]:
    import re

    return re.findall(r"<([^<>\s]+)>", str(value or ""))


def as_sent(msg: EmailMessage) -> Sent:
    mid = (ids(msg["Message-ID"]) or [""])[0]
    refs = ids(msg["References"])
    text = text_of(msg)
    buttons = [(line.split(". ", 1)[1], line.split(". ", 1)[0]) for line in text.splitlines()
               if line[:1].isdigit() and ". " in line] if "Reply with the number." in text else []
    files = [(str(a.get_filename()), a.get_payload(decode=True)) for a in msg.iter_attachments()]
    return Sent(mid, text, refs[0] if refs else mid, (ids(msg["In-Reply-To"]) or [None])[0],
                buttons, files, [], {k.lower(): str(v) for k, v in msg.items()})


def user_mail(sender: str, to: str, text: str, *, name: str = "Ann", subject: str = "Hello",
              in_reply_to: str | None = None, references: list[str] | None = None,
              auth: str | None = "pass", file: tuple[str, bytes, str] | None = None,
              headers: dict[str, str] | None = None, mid: str | None = None,
              html: str | None = None) -> tuple[str, bytes]:
    """A mail as the bot's receiving server would store it: (Message-ID, raw bytes)."""
    domain = sender.rpartition("@")[2]
    mid = mid or f"{uuid.uuid4().hex}@{domain}"
    msg = EmailMessage()
    if auth:
        msg["Authentication-Results"] = (f"{AUTHSERV}; dkim={auth} header.d={domain};"
                                         f" spf={auth} smtp.mailfrom={sender}")
    msg["Return-Path"] = f"<{sender}>"
    msg["From"] = f"{name} <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = f"<{mid}>"
    if in_reply_to:
        msg["In-Reply-To"] = f"<{in_reply_to}>"
        msg["References"] = " ".join(f"<{r}>" for r in (references or [in_reply_to]))
    for k, v in (headers or {}).items():
        msg[k] = v
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    if file:
        main, _, sub = file[2].partition("/")
        msg.add_attachment(file[1], maintype=main, subtype=sub, filename=file[0])
    return mid, msg.as_bytes()


class FakeEmail(PlatformFake):
    channel = "email"
    limit = 50_000          # email_compose.LIMIT: a longer reply goes as several mails
    typing = False          # mail has no typing indicator
    reply_refs = True       # a reply's In-Reply-To names the user's mail
    threads = True          # a reply chain
    edit_events = False     # a sent mail cannot be edited
    bot_edits = False
    bot_reactions = False
    top_level = False       # every mail starts or continues a reply chain: its thread
    idempotent_sends = False  # the sink sees a resent mail twice (same Message-ID)

    def __init__(self, smtp_tls: str | None = None) -> None:
        self.smtp_tls = smtp_tls
        self.user = ""
        self.last: bytes | None = None
        self.sink: SmtpSink | None = None

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> "FakeEmail":
        self.dovecot = dovecot()
        self.mailbox = MAILBOXES[(next(_USERS) - 1) % len(MAILBOXES)]
        self.address = f"{self.mailbox}@bot.test"
        self.sink = SmtpSink(self.smtp_tls, self.mailbox, PASSWORD).start()
        return self

    def stop(self) -> None:
        if self.sink is not None:
            self.sink.stop()

    def release(self) -> None:
        assert self.sink is not None
        self.sink.release()

    def host_env(self) -> dict[str, str]:
        assert self.sink is not None
        env = {"EMAIL_IMAP_HOST": "127.0.0.1", "EMAIL_IMAP_PORT": str(self.dovecot.port),
               "EMAIL_IMAP_TLS": "none", "EMAIL_SMTP_HOST": "127.0.0.1",
               "EMAIL_SMTP_PORT": str(self.sink.port), "EMAIL_SMTP_TLS": self.smtp_tls or "none",
               "EMAIL_USERNAME": self.mailbox, "EMAIL_PASSWORD": PASSWORD,
               "EMAIL_ADDRESS": self.address, "EMAIL_FROM_NAME": "Andy",
               "EMAIL_AUTHSERV_ID": AUTHSERV}
        if self.sink.cert:
            env["EMAIL_CA_FILE"] = self.sink.cert[0]
        return env

    def connected(self, host: Any) -> bool:
        try:
            rows = host.q("SELECT value FROM host_state WHERE key LIKE 'email:imap:%'")
        except Exception:
            return False
        return bool(rows) and f"Login: user=<{self.mailbox}>" in self.dovecot.log()

    # ---- users ------------------------------------------------------------------------------
    def clicker(self, chat: str) -> str:
        return chat  # the address that answered the card

    def chat(self, n: int) -> str:
        return f"ann{n}@example.org"

    def new_thread(self, chat: str) -> str:
        return f"root-{uuid.uuid4().hex}@example.org"  # the user's earlier mail's id

    def deliver(self, raw: bytes) -> None:
        self.last = raw
        self.dovecot.deliver(self.mailbox, raw)

    def user_says(self, chat: str, text: str, *, thread: str | None = None,
                  file: tuple[str, bytes, str] | None = None, **kw: Any) -> str:
        mid, raw = user_mail(chat, self.address, text, in_reply_to=thread, file=file,
                             subject="Re: Hello" if thread else "Hello", **kw)
        self.deliver(raw)
        return mid

    def user_edits(self, chat: str, message_id: str, text: str) -> str:
        raise NotImplementedError("mail cannot be edited")

    def redeliver_last(self) -> None:
        assert self.last is not None
        self.dovecot.deliver(self.mailbox, self.last)  # a second copy, same Message-ID

    def press(self, chat: str, card: Sent, index: int) -> None:
        """Ann answers the card by replying with its number (above the quoted card)."""
        refs = ids(card.raw.get("references")) + [card.id]
        quoted = "\n".join("> " + line for line in card.text.splitlines())
        _, raw = user_mail(chat, self.address, f"{index + 1}\n\nOn Sun, 6 Dec 2026, Andy"
                           f" <{self.address}> wrote:\n{quoted}\n", in_reply_to=card.id,
                           references=refs, subject="Re: card")
        self.deliver(raw)

    # ---- what the bot did -------------------------------------------------------------------
    def bot_sent(self, chat: str, thread: str | None = None) -> list[Sent]:
        assert self.sink is not None
        out = [as_sent(m) for m in self.sink.sent_to(chat)]
        return [s for s in out if thread is None or s.thread == thread]

    def send_calls(self, chat: str) -> list[Call]:
        assert self.sink is not None
        with self.sink.lock:
            return [c for c in self.sink.calls if c.params.get("to") == chat.lower()]

    def typing_calls(self, chat: str) -> list[Call]:
        return []

    def rate_limit(self, chat: str, seconds: float) -> Rule:
        assert self.sink is not None
        return self.sink.inject(status=429, to=chat.lower())

    def fail_sends(self, chat: str, count: int) -> Rule:
        assert self.sink is not None
        return self.sink.inject(count=count, status=451, to=chat.lower())

    def refuse_sends(self, chat: str) -> Rule:
        assert self.sink is not None
        return self.sink.inject(status=550, to=chat.lower())

    def land_then_stall(self, chat: str) -> Rule:
        assert self.sink is not None
        return self.sink.inject(land_then_stall=True, to=chat.lower())
