"""`nanoclaw users …`, `roles …`, `members …`: people, their owner and admin roles, and
who may talk to an agent group. A change made for an agent's `ncl` is recorded as made by
the admin who approved it (`common.actor`)."""

from __future__ import annotations

from nanoclaw.cli.common import actor, table
from nanoclaw.cli.ops import arg, op, verb
from nanoclaw.errors import Refused

# ---- users --------------------------------------------------------------------------------
verb("users", "people")


@op("users", "list", read=True, agent=True)
def users_list(a, store, settings) -> None:
    table(store.users_overview(), ["id", "kind", "display_name", "created_at"])


@op("users", "add", read=False, agent=True, args=[arg("id", help="<channel>:<handle>"), arg("--name")])
def users_add(a, store, settings) -> None:
    if ":" not in a.id:
        raise Refused("a user id is <channel>:<handle>")
    store.ensure_user(a.id, a.id.split(":", 1)[0], a.name)
    print(a.id)


@op("users", "remove", read=False, agent=True, args=[arg("id")])
def users_remove(a, store, settings) -> None:
    store.remove_user(a.id)
    print(f"removed {a.id}")


# ---- roles --------------------------------------------------------------------------------
verb("roles", "owner and admin roles")
ROLE_ARGS = [arg("user"), arg("role", choices=["owner", "admin"]),
             arg("--group", help="scope an admin role to one agent group")]


@op("roles", "list", read=True, agent=True)
def roles_list(a, store, settings) -> None:
    table(store.roles_overview(), ["user_id", "role", "agent_group_id", "granted_by",
                                   "granted_at"])


def _role(a, store) -> str | None:
    """The role's agent group (None: global), after checking user and scope."""
    store.find_user(a.user)
    ag = store.find_agent_group(a.group)["id"] if a.group else None
    if a.role == "owner" and ag:
        raise Refused("an owner role is global: drop --group")
    return ag


@op("roles", "grant", read=False, agent=True, args=ROLE_ARGS)
def roles_grant(a, store, settings) -> None:
    ag = _role(a, store)
    store.grant_role(a.user, a.role, ag, granted_by=actor(a))
    print(f"grant {a.role} {a.user}" + (f" on {ag}" if ag else ""))


@op("roles", "revoke", read=False, agent=True, args=ROLE_ARGS)
def roles_revoke(a, store, settings) -> None:
    ag = _role(a, store)
    store.revoke_role(a.user, a.role, ag)
    print(f"revoke {a.role} {a.user}" + (f" on {ag}" if ag else ""))


# ---- members ------------------------------------------------------------------------------
verb("members", "who may talk to an agent group")


@op("members", "list", read=True, agent=True, group_scope=True, own="group", args=[arg("--group")])
def members_list(a, store, settings) -> None:
    ag = store.find_agent_group(a.group)["id"] if a.group else None
    table(store.members_overview(ag), ["user_id", "agent_group_id", "added_by", "added_at"])


@op("members", "add", read=False, agent=True, group_scope=True, own="group",
    args=[arg("user"), arg("group")])
def members_add(a, store, settings) -> None:
    store.find_user(a.user)
    ag = store.find_agent_group(a.group)["id"]
    store.add_member(a.user, ag, actor(a))
    print(f"add {a.user} {ag}")


@op("members", "remove", read=False, agent=True, group_scope=True, own="group",
    args=[arg("user"), arg("group")])
def members_remove(a, store, settings) -> None:
    store.find_user(a.user)
    ag = store.find_agent_group(a.group)["id"]
    store.remove_member(a.user, ag)
    print(f"remove {a.user} {ag}")
