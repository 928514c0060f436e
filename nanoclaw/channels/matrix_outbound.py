"""Matrix's outbound half (`MatrixOutbound`, a mixin of `MatrixChannel`): a message, an
edit (`m.replace`), a reaction (`m.annotation`), typing, or a DM, with the homeserver's
errors sorted into the worker's vocabulary (429 waits its `retry_after_ms`, 5xx and
network errors are retried, other refusals fail the send now, a revoked token stops the
worker).

Every event is sent with `PUT …/send/{type}/{txnId}` where the txnId is the part's key
(`OutboundMessage.part_key`): the homeserver answers a repeated txnId with the event it
already made, so a send cut off after it landed is never shown twice. Agent Markdown goes
out as sanitised HTML (`formatted_body`: markdown-it with raw HTML off, so HTML the agent
writes is shown as text, and links only for http, https and mailto) beside its plain
`body`, split at 8,000 UTF-16 units of markup (an event may not pass 64 KiB). A question
card is a numbered list (`numbered.card_body`); files go to the media repository
(encrypted in an encrypted room) within the server's `m.upload.size`. In an encrypted
room, keys go to every device of its members, verified or not, so a reply never fails
with OlmUnverifiedDeviceError.
"""

from __future__ import annotations

import asyncio
import html
import io
import mimetypes
from typing import Any, Callable

from nanoclaw.channels.base import OutboundMessage, RetryAfter, SendError, Unavailable
from nanoclaw.channels.markdown import Chunk
from nanoclaw.channels.markdown_pack import Wrap, pack
from nanoclaw.channels.markdown_walk import Dialect, Walker
from nanoclaw.channels.numbered import card_body
from nanoclaw.channels.text import load_files, parse_question, plain_text, reply_target

LIMIT = 8_000
LINKABLE = ("http://", "https://", "mailto:")


def _esc(s: str) -> str:
    return html.escape(s, quote=False)


def _link(url: str, auto: bool) -> Wrap:
    note = "" if auto else f" ({url})"
    if url.startswith(LINKABLE):
        return Wrap(f'<a href="{html.escape(url)}">', "</a>", note)
    return Wrap("", _esc(note), note)


def _pre(lang: str) -> Wrap:
    import re

    if re.fullmatch(r"[\w#+.-]{1,32}", lang):
        return Wrap(f'<pre><code class="language-{lang}">', "</code></pre>")
    return Wrap("<pre><code>", "</code></pre>")


MATRIX = Dialect(Wrap("<strong>", "</strong>"), Wrap("<em>", "</em>"), Wrap("<del>", "</del>"),
                 Wrap("<code>", "</code>"), _pre, _link,
                 Wrap("<blockquote>", "</blockquote>"), _esc)


def matrix_html(text: str, limit: int = LIMIT) -> list[Chunk]:
    """Markdown as Matrix HTML chunks (markup within `limit` UTF-16 units) with their
    plain twins; line breaks become `<br>` (Matrix HTML is not whitespace-preserving)."""
    out = []
    for c in pack(Walker(MATRIX).render(text), MATRIX.escape, limit, utf16=True):
        out.append(Chunk(_breaks(c.markup), c.plain))
    return out


def _breaks(markup: str) -> str:
    """Newlines outside <pre> as <br/>, so paragraphs show as written."""
    parts = markup.split("<pre")
    head = [parts[0].replace("\n", "<br/>")]
    for p in parts[1:]:
        inner, sep, rest = p.partition("</pre>")
        head.append(inner + sep + rest.replace("\n", "<br/>"))
    return "<pre".join(head)


def message_content(chunk: Chunk, notice: bool = False) -> dict[str, Any]:
    c: dict[str, Any] = {"msgtype": "m.notice" if notice else "m.text", "body": chunk.plain}
    if chunk.markup != _esc(chunk.plain):
        c.update(format="org.matrix.custom.html", formatted_body=chunk.markup)
    return c


class MatrixError(Exception):
    def __init__(self, status: Any, code: str, message: str, retry_after_ms: Any = None):
        super().__init__(f"{status} {code}: {message}"[:300])
        self.status, self.code, self.retry_after_ms = status, code, retry_after_ms


class MatrixOutbound:
    """The sends; the connection they use (client, halt...) is the channel's."""

    client: Any
    host: Any
    settings: Any
    upload_limit: int
    halt: Callable[[str], None]
    _pending_invites: Callable[[], dict[str, dict[str, Any]]]
    _join_due: Callable[[], Any]

    def _room(self, platform_id: str) -> str:
        room = platform_id.removeprefix("matrix:")
        # a room id is `!opaque:server`, or `!opaque` alone from room version 12 on
        if not platform_id.startswith("matrix:") or not room.startswith("!") or len(room) < 2:
            raise SendError(f"not a Matrix room: {platform_id[:80]!r}", permanent=True)
        return room

    async def deliver(self, platform_id: str, thread_id: str | None,
                      message: OutboundMessage) -> str | None:
        room = self._room(platform_id)
        if getattr(self, "client", None) is None:
            raise Unavailable("not set up yet")
        try:
            await self._joined(room)
            return await self._deliver(room, thread_id, message)
        except MatrixError as e:
            raise self._mapped(e) from None
        except (SendError, Unavailable, RetryAfter):
            raise
        except (OSError, asyncio.TimeoutError) as e:
            raise SendError(f"matrix: {type(e).__name__}: {e}") from None
        except Exception as e:
            from aiohttp import ClientError
            from nio import LocalProtocolError, SendRetryError

            if isinstance(e, ClientError):
                raise SendError(f"matrix: {type(e).__name__}: {e}") from None
            if isinstance(e, (LocalProtocolError, SendRetryError)):
                raise SendError(f"matrix: {e}") from None  # e.g. a room not synced yet
            raise

    async def _joined(self, room: str) -> None:
        """A room whose invite the owner has just approved is joined before the first
        send (the answer to the held message may come before the join loop's next turn)."""
        pending = self._pending_invites().get(room)
        if pending is None or pending.get("joined"):
            return
        await self._join_due()
        now = self._pending_invites().get(room)  # gone: the invite was withdrawn
        if now is not None and not now.get("joined") and \
                self.host.store.is_wired("matrix", f"matrix:{room}"):
            raise Unavailable(f"not in {room} yet (the join is retried)")
        # not approved: sent as is, and refused by the server (the send fails, saying so)

    def _mapped(self, e: MatrixError) -> Exception:
        if e.status == 429 or e.code == "M_LIMIT_EXCEEDED":
            ms = e.retry_after_ms if isinstance(e.retry_after_ms, (int, float)) else 5000
            return RetryAfter(max(0.0, ms / 1000), f"matrix rate limit: {e}")
        if e.code == "M_UNKNOWN_TOKEN":
            self.halt(f"the Matrix access token was refused: {e}")
            return Unavailable("token refused")
        if not isinstance(e.status, int) or e.status >= 500:
            return SendError(f"matrix: {e}")
        return SendError(f"matrix refused: {e}", permanent=True)

    async def _send(self, room: str, etype: str, content: dict[str, Any], txn: str) -> str:
        from nio import RoomSendResponse

        got = await self.client.room_send(room, etype, content, tx_id=txn,
                                          ignore_unverified_devices=True)
        if isinstance(got, RoomSendResponse):
            return got.event_id
        raise _error(got)

    async def _deliver(self, room: str, thread: str | None, message: OutboundMessage) -> str:
        c, op = message.content, message.content.get("operation")
        if op == "edit":
            mid = str(c.get("messageId") or "")
            text = str(c.get("text") or "")
            if not mid.startswith("$") or not text:
                raise SendError("an edit needs a Matrix event id and a text", permanent=True)
            chunk = matrix_html(text)[0]
            new = message_content(chunk)
            content = {**new, "body": f"* {chunk.plain}", "m.new_content": new,
                       "m.relates_to": {"rel_type": "m.replace", "event_id": mid}}
            if "formatted_body" in new:
                content["formatted_body"] = f"* {new['formatted_body']}"
            await self._send(room, "m.room.message", content, message.part_key(0))
            return mid
        if op == "reaction":
            mid = str(c.get("messageId") or "")
            if not mid.startswith("$"):
                raise SendError("a reaction needs a Matrix event id", permanent=True)
            await self._send(room, "m.reaction", {"m.relates_to": {
                "rel_type": "m.annotation", "event_id": mid,
                "key": str(c.get("emoji") or "👍")[:64]}}, message.part_key(0))
            return mid
        if op:
            raise SendError(f"unknown operation {op!r}", permanent=True)
        q = parse_question(c)
        text = card_body(q) if q else plain_text(c)
        chunks = matrix_html(text) if text.strip() else []
        files = load_files(c)  # a bad file is a permanent SendError
        target = self._answering(room, reply_target(message.in_reply_to))
        done = message.parts
        for i, chunk in enumerate(chunks):
            if i < len(done):
                continue
            content = message_content(chunk, notice=bool(c.get("notice")))
            content.update(_relation(thread, target if i == 0 else None))
            message.sent(await self._send(room, "m.room.message", content, message.part_key(i)))
        for j, f in enumerate(files):
            if len(chunks) + j < len(done):
                continue
            content = await self._upload(room, f.name, f.data)
            content.update(_relation(thread, None))
            message.sent(await self._send(room, "m.room.message", content,
                                          message.part_key(len(chunks) + j)))
        if not done:
            raise SendError("empty message", permanent=True)
        return done[0]

    def _answering(self, room: str, target: str | None) -> str | None:
        """The event a reply answers: a user's edit is answered on the message edited."""
        if not target or not target.startswith("$"):
            return None
        try:
            store = self.host.store
            got = store.inbound_payload("matrix", f"matrix:{room}", target)
        except Exception:
            got = None
        edit_of = (got or {}).get("edit_of")
        return edit_of if isinstance(edit_of, str) and edit_of.startswith("$") else target

    async def _upload(self, room: str, name: str, data: bytes) -> dict[str, Any]:
        from nio import UploadResponse

        if len(data) > self.upload_limit:
            raise SendError(f"file {name} is larger than the server's upload limit"
                            f" ({self.upload_limit} bytes)", permanent=True)
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        r = self.client.rooms.get(room)
        encrypt = bool(getattr(r, "encrypted", False))
        got, keys = await self.client.upload(lambda *_: io.BytesIO(data), content_type=mime,
                                             filename=name, encrypt=encrypt,
                                             filesize=len(data))
        if not isinstance(got, UploadResponse):
            raise _error(got)
        kind = "m.image" if mime.startswith("image/") else "m.file"
        content: dict[str, Any] = {"msgtype": kind, "body": name, "filename": name,
                                   "info": {"mimetype": mime, "size": len(data)}}
        if encrypt and keys:
            content["file"] = {**keys, "url": got.content_uri}
        else:
            content["url"] = got.content_uri
        return content

    async def set_typing(self, platform_id: str, thread_id: str | None) -> None:
        got = await self.client.room_typing(self._room(platform_id), True, timeout=6000)
        if getattr(got, "status_code", None):
            raise _error(got)

    async def open_dm(self, handle: str) -> str:
        """A user (`matrix:@user:server` as `sender_id` names them, or a bare mxid) → a
        direct room with them: one we share already, else a new one (encrypted when
        MATRIX_E2EE is on) flagged `is_direct`."""
        from nio import RoomCreateResponse

        user = handle.removeprefix("matrix:")
        if not (user.startswith("@") and ":" in user):
            raise SendError(f"not a Matrix user: {handle[:80]!r}", permanent=True)
        for rid, r in self.client.rooms.items():
            members = set(getattr(r, "users", {})) | set(getattr(r, "invited_users", {}))
            if user in members and len(members) == 2:
                return f"matrix:{rid}"
        state = [{"type": "m.room.encryption", "state_key": "",
                  "content": {"algorithm": "m.megolm.v1.aes-sha2"}}] \
            if self.settings.matrix_e2ee else []
        from nio import RoomPreset

        got = await self.client.room_create(is_direct=True, invite=[user], initial_state=state,
                                            preset=RoomPreset.trusted_private_chat)
        if not isinstance(got, RoomCreateResponse):
            raise self._mapped(_error(got))
        for _ in range(50 if state else 0):  # an encrypted send needs the room synced
            if got.room_id in self.client.rooms:
                break
            await asyncio.sleep(0.1)
        return f"matrix:{got.room_id}"


def _relation(thread: str | None, target: str | None) -> dict[str, Any]:
    """`m.relates_to` for a message in a thread (with the reply fallback clients without
    threads show) or answering one message."""
    if thread:
        return {"m.relates_to": {"rel_type": "m.thread", "event_id": thread,
                                 "is_falling_back": target is None,
                                 "m.in_reply_to": {"event_id": target or thread}}}
    if target:
        return {"m.relates_to": {"m.in_reply_to": {"event_id": target}}}
    return {}


def _error(got: Any) -> MatrixError:
    code = str(getattr(got, "status_code", "") or "")
    status = getattr(getattr(got, "transport_response", None), "status", None)
    if status is None and code.isdigit():
        status = int(code)
    return MatrixError(status, code, str(getattr(got, "message", "") or type(got).__name__),
                       getattr(got, "retry_after_ms", None))
