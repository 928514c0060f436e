"""`nanoclaw wire …`, `destinations …` and `init-first-agent`: which chats talk to which
agents, and the names an agent sends to. A change re-projects the group's destinations
into its live sessions."""

from __future__ import annotations

from nanoclaw.agents.groups import ensure_group_folder, normalise_name
from nanoclaw.cli.common import refresh, table
from nanoclaw.cli.ops import arg, op, verb
from nanoclaw.errors import Refused

ENGAGE = ["pattern", "mention", "mention-sticky"]
SESSION = ["shared", "per-thread", "agent-shared"]

# ---- wire ---------------------------------------------------------------------------------
verb("wire", "which chats talk to which agents")


@op("wire", "list", read=True, agent=True)
def wire_list(a, store, settings) -> None:
    table(store.wirings_overview(),
          ["id", "channel_type", "platform_id", "agent", "engage_mode", "engage_pattern",
           "sender_scope", "ignored", "session_mode", "priority"])


@op("wire", "add", read=False, agent=True, args=[
    arg("--channel", required=True),
    arg("--chat", required=True, help="the platform id, e.g. telegram:123"),
    arg("--agent", required=True, help="agent group id or folder"),
    arg("--name", help="the agent's name for this chat"),
    arg("--group", action="store_true", help="the chat is a group chat"),
    arg("--engage", choices=ENGAGE, default="pattern"),
    arg("--pattern", default="."),
    arg("--scope", choices=["all", "known"], default="all"),
    arg("--ignored", choices=["drop", "accumulate"], default="drop"),
    arg("--session", choices=SESSION, default="shared"),
    arg("--priority", type=int, default=0),
    arg("--policy", choices=["strict", "request_approval", "public"])])
def wire_add(a, store, settings) -> None:
    g = store.find_agent_group(a.agent)
    wid = store.wire_chat(
        a.channel, a.chat, g["id"], is_group=a.group, policy=a.policy,
        destination=a.name or normalise_name(a.chat), engage_mode=a.engage,
        engage_pattern=a.pattern if a.engage == "pattern" else None, sender_scope=a.scope,
        ignored=a.ignored, session_mode=a.session, priority=a.priority)
    refresh(store, settings, g["id"])
    print(wid)


@op("wire", "remove", read=False, agent=True, args=[arg("id")])
def wire_remove(a, store, settings) -> None:
    refresh(store, settings, store.remove_wiring(a.id))
    print(f"removed {a.id}")


# ---- destinations -------------------------------------------------------------------------
verb("destinations", "the names an agent sends to")


@op("destinations", "list", read=True, agent=True, group_scope=True, own="group", args=[arg("group")])
def destinations_list(a, store, settings) -> None:
    ag = store.find_agent_group(a.group)["id"]
    table(store.destinations(ag), ["name", "type", "channel_type", "platform_id"])


@op("destinations", "add", read=False, agent=True, group_scope=True, own="group", refs=("agent",), args=[
    arg("group"), arg("name"), arg("--chat", help="CHANNEL:PLATFORM_ID"),
    arg("--agent", help="another agent group")])
def destinations_add(a, store, settings) -> None:
    ag = store.find_agent_group(a.group)["id"]
    if bool(a.chat) == bool(a.agent):
        raise Refused("give exactly one of --chat CHANNEL:PLATFORM_ID or --agent GROUP")
    if a.agent:
        store.add_agent_destination(ag, a.name, store.find_agent_group(a.agent)["id"])
    else:
        channel, _, platform_id = a.chat.partition(":")
        store.add_chat_destination(ag, a.name, channel, platform_id)
    refresh(store, settings, ag)
    print(f"add {a.name}")


@op("destinations", "remove", read=False, agent=True, group_scope=True, own="group",
    args=[arg("group"), arg("name")])
def destinations_remove(a, store, settings) -> None:
    ag = store.find_agent_group(a.group)["id"]
    store.remove_destination(ag, a.name)
    refresh(store, settings, ag)
    print(f"remove {a.name}")


# ---- init-first-agent ---------------------------------------------------------------------
verb("init-first-agent", "create an agent, wire a chat, make its user the owner")


@op("init-first-agent", read=False, never="init-first-agent is for the terminal only", args=[
    arg("--name", default="main"), arg("--channel", required=True),
    arg("--chat", required=True, help="the platform id of the chat"),
    arg("--user", required=True, help="the owner's handle on that channel"),
    arg("--group", action="store_true")])
def init_first_agent(a, store, settings) -> None:
    """The install is one transaction (`Store.install_first_agent`), so a failure leaves
    no half install; the group folder and live sessions are brought in line after the
    commit (running the verb again finishes them: every step is find-or-create)."""
    folder = normalise_name(a.name)
    user = a.user if ":" in a.user else f"{a.channel}:{a.user}"
    ag = store.install_first_agent(
        a.name, folder, settings.provider, settings.model, user, a.channel, a.channel, a.chat,
        a.group, {"destination": normalise_name(a.chat),
                  "engage_mode": "mention" if a.group else "pattern",
                  "engage_pattern": None if a.group else "."})
    ensure_group_folder(settings, folder, a.name)
    refresh(store, settings, ag)
    print(f"agent {ag} ({folder}) wired to {a.channel} {a.chat}; owner {user}")
