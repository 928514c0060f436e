"""System actions an agent asks of the host (`messages_out` rows of kind `system`,
content `{"action": name, ...}`), run by the delivery worker. A registry of handlers by
name; every check runs here on the host — nothing the container says about who asked
is trusted: the asker is the sender of the inbound row the action answers.

A handler returns a note for the agent (or None) and raises ActionError for a refusal
or a bad request; either way the agent hears about failures, never silence.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from nanoclaw.agents import scheduling
from nanoclaw.agents.groups import normalise_name
from nanoclaw.config import Settings
from nanoclaw.db.session import SessionInbound, SessionPaths, of
from nanoclaw.db.store import Store
from nanoclaw.errors import Refused
from nanoclaw.log import logger


class ActionError(Refused):
    """Refused or malformed; the message is told to the agent."""


@dataclass
class Ctx:
    store: Store
    settings: Settings
    session: dict[str, Any]
    paths: SessionPaths
    row: dict[str, Any]          # the messages_out row
    content: dict[str, Any]

    @property
    def asker(self) -> str | None:
        """The user whose message the action answers (host-side truth), if any."""
        src = self.source()
        if src is None:
            return None
        try:
            return json.loads(src["content"]).get("senderId")
        except (ValueError, AttributeError):
            return None

    def source(self) -> dict[str, Any] | None:
        mid = self.row.get("in_reply_to")
        return SessionInbound(self.paths).message(mid) if mid else None

    def routing(self) -> tuple[str | None, str | None, str | None]:
        src = self.source()
        if src is not None and src["channel_type"] not in (None, "agent"):
            return (src["channel_type"], src["platform_id"], src["thread_id"])
        return SessionInbound(self.paths).routing()

    def str_arg(self, key: str, required: bool = True) -> str | None:
        v = self.content.get(key)
        if v is None and not required:
            return None
        if not isinstance(v, str) or (required and not v.strip()):
            raise ActionError(f"{key} must be a non-empty string")
        return v


Handler = Callable[[Ctx], "str | None"]
ACTIONS: dict[str, Handler] = {}


def action(name: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        if name in ACTIONS:
            raise ValueError(f"action {name!r} registered twice")
        ACTIONS[name] = fn
        return fn
    return deco


def run(ctx: Ctx) -> str | None:
    name = ctx.content.get("action") or ctx.content.get("type")
    fn = ACTIONS.get(name) if isinstance(name, str) else None
    if fn is None:
        raise ActionError(f"unknown action {name!r}")
    try:
        return fn(ctx)
    except scheduling.TaskError as e:
        raise ActionError(str(e)) from None


# ---- scheduling -------------------------------------------------------------------------
@action("schedule_task")
def _schedule(ctx: Ctx) -> str | None:
    tid = scheduling.schedule(
        ctx.paths, prompt=ctx.str_arg("prompt") or "",
        process_after=ctx.str_arg("processAfter", required=False),
        recurrence=ctx.str_arg("recurrence", required=False),
        script=ctx.str_arg("script", required=False), tz=ctx.settings.tz, now=time.time(),
        routing=ctx.routing())
    logger.info("session {}: task {} scheduled", ctx.session["id"], tid)
    return f"Task {tid} scheduled (use this id to update, pause, resume or cancel it)."


@action("cancel_task")
def _cancel(ctx: Ctx) -> str | None:
    scheduling.cancel(ctx.paths, ctx.str_arg("taskId") or "")
    return None


@action("pause_task")
def _pause(ctx: Ctx) -> str | None:
    scheduling.pause(ctx.paths, ctx.str_arg("taskId") or "")
    return None


@action("resume_task")
def _resume(ctx: Ctx) -> str | None:
    scheduling.resume(ctx.paths, ctx.str_arg("taskId") or "")
    return None


@action("update_task")
def _update(ctx: Ctx) -> str | None:
    scheduling.update(ctx.paths, ctx.str_arg("taskId") or "", tz=ctx.settings.tz,
                      prompt=ctx.str_arg("prompt", required=False),
                      recurrence=ctx.str_arg("recurrence", required=False),
                      process_after=ctx.str_arg("processAfter", required=False) or None,
                      script=ctx.str_arg("script", required=False))
    return None


# ---- agents -----------------------------------------------------------------------------
@action("create_agent")
def _create_agent(ctx: Ctx) -> str | None:
    ag = ctx.session["agent_group_id"]
    asker = ctx.asker
    if not asker or not ctx.store.is_admin(asker, ag):
        raise ActionError("create_agent needs the request of an admin of this agent group")
    name = normalise_name(ctx.str_arg("name") or "")
    if ctx.store.has_destination(ag, name):
        raise ActionError(f"you already have a destination named {name!r}")
    parent_cfg = ctx.store.container_config(ag)
    child, folder = new_agent_group(ctx.store, ctx.settings, name, parent_cfg.get("provider"),
                                    parent_cfg.get("model"))
    instructions = ctx.content.get("instructions")
    if isinstance(instructions, str) and instructions.strip():
        from nanoclaw.agents.groups import ensure_group_folder

        ensure_group_folder(ctx.settings, folder, name, f"# {name}\n\n{instructions}\n")
    ctx.store.add_agent_destination(ag, name, child)
    ctx.store.add_agent_destination(child, "parent", ag)
    refresh_destinations(ctx.store, ctx.settings, ag)
    logger.info("agent group {} created {} ({})", ag, child, name)
    return f"Agent {name!r} created; send it messages with to=\"{name}\"."


def new_agent_group(store: Store, settings: Settings, name: str, provider: str | None = None,
                    model: str | None = None) -> tuple[str, str]:
    """A new agent group called `name` (normalised) with a folder of its own; returns
    (id, folder)."""
    from nanoclaw.agents.groups import ensure_group_folder

    name = normalise_name(name)
    folder = store.free_folder(name)
    ag = store.create_agent_group(name, folder, provider or settings.provider,
                                  model or settings.model, name)
    ensure_group_folder(settings, folder, name)
    return ag, folder


def refresh_destinations(store: Store, settings: Settings, agent_group_id: str) -> None:
    """Re-project an agent's destinations into each of its active sessions."""
    dests = store.destinations(agent_group_id)
    for s in store.active_sessions(agent_group_id):
        inbound = SessionInbound(of(settings, s))
        try:
            inbound.write_routing(inbound.routing(), dests)
        except Exception as e:
            logger.error("cannot refresh destinations of session {}: {}", s["id"], e)


# ---- what the approver sees --------------------------------------------------------------
# An approval card must show the whole request, exactly as it will run, on every platform:
# nothing cut, nothing hidden by whitespace or formatting. The card (title, a blank line,
# the question) has to fit in one piece of the tightest place that shows it: a Discord
# message (channels/discord_channel.LIMIT, 2000 characters), a Slack section block
# (channels/slack.BLOCK_LIMIT, 3000 characters of mrkdwn; Slack cuts the rest), a
# Telegram message (channels/telegram.LIMIT, 4096 UTF-16 units of HTML). CARD_ROOM is
# kept free for the "✓ Approved" line a click adds. A request that does not fit is
# refused up front, so nothing is queued that an admin could not read whole.
CARD_LIMITS = {"discord": 2000, "slack": 3000, "telegram": 4096}
CARD_ROOM = 64
CARD_CHARS = CARD_LIMITS["discord"] - CARD_ROOM  # the plain-text bound told to the agent
BARE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
SPACES = re.compile(r" {2,}")
MARK_OPEN, MARK_CLOSE = "⟨", "⟩"  # only ever our own run-of-spaces marker on a card
# printable by Python's rules, yet drawn as nothing (fillers, blank braille, joiners)
BLANK = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0")


def shown(value: str) -> str:
    """One value as an approver sees it: bare when it is plainly safe, else quoted with
    every control, invisible or unusual whitespace character escaped (\\n, \\t,
    \\u200b, …) and runs of spaces counted (⟨560 spaces⟩). The result is one line with no
    backquote, so a `\\n\\n` cannot make a card look like prose, padding cannot push the
    rest out of sight and nothing can close the code block it is shown in; and it is
    unambiguous: the value can be read back from it exactly."""
    if BARE.fullmatch(value):
        return value
    out = []
    for ch in value:
        if ch in "\\'":
            out.append("\\" + ch)
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif ch == " " or (ch.isprintable() and ch not in BLANK
                           and ch not in "`" + MARK_OPEN + MARK_CLOSE):
            out.append(ch)
        else:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000
                       else f"\\U{o:08x}")
    text = SPACES.sub(lambda m: f"{MARK_OPEN}{len(m.group())} spaces{MARK_CLOSE}", "".join(out))
    return f"'{text}'"


def shown_line(words: list[str]) -> str:
    return " ".join(shown(w) for w in words)


def code(text: str) -> str:
    """A fenced block: shown literally by every channel (no emphasis, links or quotes).
    Its lines come from `shown`, which never contains a newline or a backquote."""
    return f"```\n{text}\n```"


def card_problem(title: str, question: str) -> str | None:
    """Why this card cannot be shown whole on every platform (one line), or None."""
    from nanoclaw.channels.markdown import discord_markdown, slack_mrkdwn, telegram_html

    text = f"{title}\n\n{question}" if title else question
    size = len(text)
    if size > CARD_CHARS:
        return (f"it is too long to show whole on an approval card ({size} characters as"
                f" shown, at most {CARD_CHARS})")
    fits = (len(discord_markdown(text, CARD_LIMITS["discord"] - CARD_ROOM)) == 1
            and len(slack_mrkdwn(text, CARD_LIMITS["slack"] - CARD_ROOM)) == 1
            and len(telegram_html(text, CARD_LIMITS["telegram"] - CARD_ROOM)) == 1)
    if not fits:
        return (f"it is too long to show whole on an approval card once formatted for chat"
                f" ({size} characters as shown)")
    return None


# ---- self-modification (admin approval first) -------------------------------------------
# fullmatch, never `^…$`: `$` also matches before a trailing newline ("x\n").
APT_NAME = re.compile(r"[a-z0-9][a-z0-9.+-]{0,62}")
NPM_NAME = re.compile(r"(@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]{0,213}")
MCP_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_PACKAGES = 20


def _list_arg(ctx: Ctx, key: str, what: str = "package names") -> list[str]:
    v = ctx.content.get(key) or []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ActionError(f"{key} must be a list of {what}")
    return v


@action("install_packages")
def _install_packages(ctx: Ctx) -> str | None:
    apt, npm = _list_arg(ctx, "apt"), _list_arg(ctx, "npm")
    if not apt and not npm:
        raise ActionError("name at least one package")
    if len(apt) + len(npm) > MAX_PACKAGES:
        raise ActionError(f"at most {MAX_PACKAGES} packages per request")
    bad = [p for p in apt if not APT_NAME.fullmatch(p)] + [
        p for p in npm if not NPM_NAME.fullmatch(p)]
    if bad:
        raise ActionError(f"invalid package names: {', '.join(bad)}")
    reason = str(ctx.content.get("reason") or "")[:500]
    return _ask(ctx, "install_packages", {"apt": apt, "npm": npm, "reason": reason},
                "Install packages",
                "The agent asks to install these packages:\n"
                + code(f"apt: {shown_line(apt) or '-'}\nnpm: {shown_line(npm) or '-'}")
                + f"\nIts reason: {shown(reason) if reason else '(none given)'}")


@action("add_mcp_server")
def _add_mcp_server(ctx: Ctx) -> str | None:
    name = ctx.str_arg("name") or ""
    if not MCP_NAME.fullmatch(name):
        raise ActionError("name must be 1-64 letters, digits, '-' or '_'")
    if name == "nanoclaw":
        raise ActionError("name 'nanoclaw' is the host's own server; choose another")
    command = ctx.str_arg("command") or ""
    args = _list_arg(ctx, "args", "strings")
    env = ctx.content.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ActionError("env must map names to strings")
    bad = [k for k in env if not ENV_NAME.fullmatch(k)]
    if bad:
        raise ActionError(f"env has invalid variable names: {shown_line(bad)}")
    env_line = " ".join(f"{k}={shown(v)}" for k, v in env.items())
    return _ask(ctx, "add_mcp_server", {"name": name, "command": command, "args": args,
                                        "env": env}, "Add an MCP server",
                f"The agent asks to add MCP server {name}, which runs in its sandbox as:\n"
                + code(f"command: {shown(command)}\nargs: {shown_line(args) or '(none)'}"
                       f"\nenv: {env_line or '(none)'}"))


def _ask(ctx: Ctx, action_name: str, payload: dict[str, Any], title: str,
         question: str) -> str:
    """Queue the approval card, unless it could not be shown whole (then nothing is asked)."""
    from nanoclaw.approvals import requests as approvals

    problem = card_problem(title, question)
    if problem:
        raise ActionError(f"{action_name} refused: {problem}; nothing was asked")
    payload["requestId"] = ctx.row["id"]
    try:
        aid = approvals.request(ctx.store, ctx.settings, ctx.session, action_name, payload,
                                title, question)
    except Refused as e:
        raise ActionError(str(e)) from None
    return f"Asked an admin to approve {action_name} (request {aid}); you will be told."


def _respawn_with_note(store: Store, settings: Settings, session_id: str, note: str) -> None:
    """Stop the agent and leave a note only a fresh agent's first poll reads."""
    s = store.session(session_id)
    if s is None:
        return
    SessionInbound(of(settings, s)).note(note, on_wake=True)
    store.request_container(session_id, "kill", "configuration changed")
    store.request_container(session_id, "wake", "configuration changed")


def _approved_packages(store: Store, settings: Settings, row: dict[str, Any],
                       payload: dict[str, Any]) -> str:
    ag = row["agent_group_id"]
    cfg = store.container_config(ag)
    apt = sorted(set(json.loads(cfg.get("packages_apt") or "[]")) | set(payload["apt"]))
    npm = sorted(set(json.loads(cfg.get("packages_npm") or "[]")) | set(payload["npm"]))
    if settings.runtime == "process":
        raise RuntimeError("the process runtime cannot install packages (no image to rebuild)")
    store.set_packages(ag, apt, npm)
    _respawn_with_note(store, settings, row["session_id"],
                       "Packages were approved and the image is being rebuilt:"
                       f" {', '.join(payload['apt'] + payload['npm'])}. Verify they work and"
                       " report to the user.")
    return "Packages approved; your container restarts with them."


def _approved_mcp(store: Store, settings: Settings, row: dict[str, Any],
                  payload: dict[str, Any]) -> str:
    ag = row["agent_group_id"]
    servers = json.loads(store.container_config(ag).get("mcp_servers") or "{}")
    servers[payload["name"]] = {"command": payload["command"], "args": payload["args"],
                                "env": payload["env"]}
    store.set_mcp_servers(ag, servers)
    _respawn_with_note(store, settings, row["session_id"],
                       f"MCP server {payload['name']!r} was added. Check that its tools work"
                       " and tell the user.")
    return f"MCP server {payload['name']!r} approved; your container restarts with it."


def _register_approval_handlers() -> None:
    from nanoclaw.approvals import requests as approvals

    approvals.on_approve("install_packages", _approved_packages)
    approvals.on_approve("add_mcp_server", _approved_mcp)


_register_approval_handlers()
