"""Tools that talk to people: send_message, send_file, edit_message, add_reaction,
send_card, ask_user_question.

Each writes one `messages_out` row at once (the host delivers it within milliseconds),
addressed like a reply: the named destination or the conversation's own chat, with the
thread and `in_reply_to` of the row being answered. A message is named by the `id` the
agent saw (its seq); edits and reactions need the platform's id, which is looked up here
so the host gets a row it can act on without guessing.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from typing import Any

from agent_runner.db import Address, new_out_id
from agent_runner.tools.base import Tool, ToolContext, ToolError, new_id, obj, string

MAX_FILE_BYTES = 50 * 1024 * 1024
QUESTION_TIMEOUT_S = 300
QUESTION_POLL_S = 0.2
UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._\- ()+@,=]")


def safe_name(name: str) -> str:
    base = UNSAFE_NAME.sub("_", os.path.basename(name.strip())).strip(" .")
    if not base:
        raise ToolError(f"{name!r} is not a usable file name")
    return base[:200]


def _send_message(ctx: ToolContext, args: dict[str, Any]) -> str:
    address, reply_id = ctx.resolve(args.get("to"))
    _, seq = ctx.write("chat", {"text": args["text"]}, address, reply_id)
    ctx.sent += 1
    return f"Message sent (id {seq})."


def _send_file(ctx: ToolContext, args: dict[str, Any]) -> str:
    src = ctx.path(args["path"])
    if not os.path.isfile(src):
        raise ToolError(f"{args['path']} is not a file")
    size = os.path.getsize(src)
    if size > MAX_FILE_BYTES:
        raise ToolError(f"{args['path']} is too big to send ({size} bytes; the limit is "
                        f"{MAX_FILE_BYTES})")
    name = safe_name(args.get("filename") or src)
    address, reply_id = ctx.resolve(args.get("to"))
    out_id = new_out_id()
    folder = os.path.join(ctx.config.session_dir, "outbox", out_id)
    os.makedirs(folder)
    try:
        shutil.copyfile(src, os.path.join(folder, name))
        content: dict[str, Any] = {"files": [name]}
        if args.get("text"):
            content["text"] = args["text"]
        _, seq = ctx.write("chat", content, address, reply_id, out_id=out_id)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    ctx.sent += 1
    return f"File {name} sent (id {seq})."


def _target(ctx: ToolContext, seq: int) -> tuple[str, Address, bool]:
    """(platform message id, its chat, whether the agent wrote it) for a message id."""
    if abs(seq) >= 1 << 63:  # past SQLite's integers: no row has it
        raise ToolError(f"there is no message with id {seq}")
    if seq % 2:  # odd: one of ours
        row = ctx.outbound.by_seq(seq)
        if row is None:
            raise ToolError(f"there is no message with id {seq}")
        delivery = ctx.inbound.delivery(row["id"])
        if delivery is None or delivery[0] != "delivered" or not delivery[1]:
            state = "failed to deliver" if delivery else "has not been delivered yet"
            raise ToolError(f"message {seq} {state}, so it cannot be changed"
                            + ("" if delivery else "; try again in a moment"))
        return delivery[1], Address(row["channel_type"], row["platform_id"],
                                    row["thread_id"]), True
    inbound = ctx.inbound.by_seq(seq)
    if inbound is None or inbound.kind not in ("chat", "chat-sdk"):
        raise ToolError(f"there is no chat message with id {seq}")
    platform_id = inbound.id
    suffix = f":{ctx.config.agent_group_id}"
    if ctx.config.agent_group_id and platform_id.endswith(suffix):
        platform_id = platform_id[: -len(suffix)]
    return platform_id, Address(inbound.channel_type, inbound.platform_id,
                                inbound.thread_id), False


def _edit_message(ctx: ToolContext, args: dict[str, Any]) -> str:
    platform_id, address, ours = _target(ctx, args["messageId"])
    if not ours:
        raise ToolError(f"message {args['messageId']} was not sent by you; you can only edit"
                        " your own messages")
    ctx.write("chat", {"operation": "edit", "messageId": platform_id, "text": args["text"]},
              address, ctx.batch.asker_id)
    return f"Edit of message {args['messageId']} sent."


def _add_reaction(ctx: ToolContext, args: dict[str, Any]) -> str:
    platform_id, address, _ = _target(ctx, args["messageId"])
    ctx.write("chat", {"operation": "reaction", "messageId": platform_id,
                       "emoji": args["emoji"].strip()}, address, ctx.batch.asker_id)
    return f"Reaction {args['emoji'].strip()} added to message {args['messageId']}."


def _fallback_text(card: dict[str, Any]) -> str:
    parts = [str(card[k]) for k in ("title", "description") if card.get(k)]
    for child in card.get("children") or []:
        if isinstance(child, dict) and child.get("text"):
            parts.append(str(child["text"]))
        elif isinstance(child, str):
            parts.append(child)
    parts += [f"{a.get('label') or a['url']}: {a['url']}" for a in card.get("actions") or []]
    return "\n\n".join(parts)


def _send_card(ctx: ToolContext, args: dict[str, Any]) -> str:
    card = args["card"]
    if not any(card.get(k) for k in ("title", "description", "children")):
        raise ToolError("`card` needs a title, a description or children")
    for action in card.get("actions") or []:
        if not str(action["url"]).startswith(("http://", "https://")):
            raise ToolError(f"card action {action['label']!r}: `url` must start with "
                            "http:// or https://")
    address, reply_id = ctx.resolve(None)
    fallback = args.get("fallbackText") or _fallback_text(card)
    _, seq = ctx.write("chat-sdk", {"type": "card", "card": card, "fallbackText": fallback},
                       address, reply_id)
    ctx.sent += 1
    return f"Card sent (id {seq})."


def _options(raw: list[Any]) -> list[dict[str, str]]:
    options, seen = [], set()
    for i, opt in enumerate(raw):
        if isinstance(opt, str):
            opt = {"label": opt}
        label = str(opt.get("label") or "").strip()
        if not label:
            raise ToolError(f"`options[{i}]` needs a non-empty label")
        value = str(opt.get("value") or label)
        if value in seen:
            raise ToolError(f"`options[{i}]`: the value {value!r} is used twice")
        seen.add(value)
        options.append({"label": label, "selectedLabel": str(opt.get("selectedLabel") or label),
                        "value": value})
    return options


def _ask_user_question(ctx: ToolContext, args: dict[str, Any]) -> str:
    """Write a question card, then wait for the host to bring back the click."""
    options = _options(args["options"])
    timeout = int(args.get("timeout") or QUESTION_TIMEOUT_S)
    qid = new_id("q")
    address, reply_id = ctx.resolve(None)
    ctx.write("chat-sdk", {"type": "ask_question", "questionId": qid, "title": args["title"],
                           "question": args["question"], "options": options},
              address, reply_id)
    ctx.sent += 1
    deadline = time.monotonic() + timeout
    last_beat = 0.0
    while True:
        answer = ctx.inbound.system_reply("question_response", "questionId", qid)
        if answer is not None:
            ctx.outbound.complete([answer.id])
            value = str(answer.content.get("selectedOption") or "")
            label = next((o["label"] for o in options if o["value"] == value), value)
            who = answer.content.get("userId")
            return (f"selectedOption: {value}" + (f" (label: {label})" if label != value else "")
                    + (f"\nanswered by: {who}" if who else ""))
        now = time.monotonic()
        if now >= deadline:
            return (f"No answer within {timeout} seconds; the question (id {qid}) has expired."
                    " Carry on without it, or ask again if you still need to know.")
        if ctx.should_stop():
            raise ToolError("stopped: the agent is shutting down before an answer came")
        if now - last_beat >= 1.0:  # waiting for a person is progress, not a hang
            ctx.heartbeat()
            last_beat = now
        time.sleep(min(QUESTION_POLL_S, max(deadline - now, 0.01)))


TO = string("a destination name; default: the conversation you are in")
MESSAGE_ID = {"type": "integer", "description": "the message's id as shown to you "
                                                "(<message id=…> or a tool's reply)"}
CARD = {"type": "object", "description": "the card to show", "properties": {
    "title": {"type": "string"}, "description": {"type": "string"},
    "children": {"type": "array", "items": {"type": ["string", "object"]}},
    "actions": {"type": "array", "maxItems": 10, "items": obj({
        "label": string(minLength=1), "url": string(minLength=1),
        "style": {"type": "string", "enum": ["primary", "danger", "default"]}},
        ("label", "url"))}},
    "additionalProperties": False}
OPTION = {"type": ["string", "object"], "description": "a label, or {label, value?, "
          "selectedLabel?}", "properties": {"label": {"type": "string"}, "value": {
              "type": "string"}, "selectedLabel": {"type": "string"}},
          "additionalProperties": False}

TOOLS = [
    Tool("send_message", "Send a chat message right away (e.g. a progress update during long"
         " work, or a message to another destination). Returns the message id.",
         obj({"to": TO, "text": string("the message", minLength=1)}, ("text",)),
         _send_message, sends=True),
    Tool("send_file", "Send a file from your workspace as an attachment, with optional text.",
         obj({"path": string("the file to send", minLength=1), "to": TO,
              "text": string("a caption"), "filename": string("the name the recipient sees")},
             ("path",)), _send_file, sends=True),
    Tool("edit_message", "Change the text of a message you sent earlier.",
         obj({"messageId": MESSAGE_ID, "text": string("the new text", minLength=1)},
             ("messageId", "text")), _edit_message),
    Tool("add_reaction", "React to a message with an emoji.",
         obj({"messageId": MESSAGE_ID, "emoji": string("e.g. 👍", minLength=1, maxLength=64)},
             ("messageId", "emoji")), _add_reaction),
    Tool("send_card", "Send a display card (title, description, link buttons) to the"
         " conversation.", obj({"card": CARD, "fallbackText": string(
             "plain text for platforms without cards")}, ("card",)), _send_card, sends=True),
    Tool("ask_user_question", "Ask the user a multiple-choice question with buttons and wait"
         " for the answer (blocks until they click or the timeout passes). Returns the"
         " chosen option's value.",
         obj({"title": string("a short heading", minLength=1),
              "question": string("the question", minLength=1),
              "options": {"type": "array", "minItems": 1, "maxItems": 10, "items": OPTION},
              "timeout": {"type": "integer", "minimum": 1, "maximum": 3600,
                          "description": f"seconds to wait (default {QUESTION_TIMEOUT_S})"}},
             ("title", "question", "options")), _ask_user_question, sends=True,
         timeout_s=lambda a: int(a.get("timeout") or QUESTION_TIMEOUT_S) + 10),
]
