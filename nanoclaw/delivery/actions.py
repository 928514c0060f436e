"""System actions an agent asks of the host (`messages_out` rows of kind `system`,
content `{"action": name, ...}`), run by the delivery worker. A registry of handlers by
name; every check runs here on the host — nothing the container says about who asked
is trusted: the asker is the sender of the inbound row the action answers.

A handler returns a note for the agent (or None) and raises ActionError for a refusal
or a bad request; either way the agent hears about failures, never silence.

Here: the task and agent handlers. The registry and its `Ctx` are `registry.py`, what an
approval card shows `card_text.py`, and the actions that need an admin's approval
(packages, MCP servers) `selfmod.py`, imported below so they register with the rest.
"""

from __future__ import annotations

import time

from nanoclaw.agents import scheduling
from nanoclaw.agents.groups import normalise_name
from nanoclaw.config import Settings
from nanoclaw.db.session import SessionInbound, of
from nanoclaw.db.store import Store
from nanoclaw.delivery.card_text import BLANK, card_problem, code, shown, shown_line
from nanoclaw.delivery.registry import ACTIONS, ActionError, Ctx, action, run
from nanoclaw.delivery.selfmod import APT_NAME, NPM_NAME
from nanoclaw.log import logger

# the registry (`registry`), the card text (`card_text`) and the self-modification
# actions (`selfmod`, imported here so they register) are reached through this module too
__all__ = ["ACTIONS", "APT_NAME", "BLANK", "NPM_NAME", "ActionError", "Ctx", "action",
           "card_problem", "code", "new_agent_group", "refresh_destinations", "run", "shown",
           "shown_line"]


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

