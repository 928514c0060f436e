"""`nanoclaw groups …` and `nanoclaw skills`: agent groups, their models, token budgets,
`ncl` scope and skills (`groups update`), and which groups enable which skill."""

from __future__ import annotations

import json

from nanoclaw.agents.groups import ensure_group_folder, normalise_name
from nanoclaw.cli import skills
from nanoclaw.cli.common import table
from nanoclaw.cli.ops import arg, op, verb
from nanoclaw.errors import Refused
from nanoclaw.util import FOLDER_NAME

PROVIDERS = ["claude", "anthropic", "openai", "opencode"]


# ---- value parsers ------------------------------------------------------------------------
def budget_arg(text: str) -> int | None:
    """`--daily-token-budget`: N tokens a day, 0 for no limit, `none` for the default."""
    if text.strip().lower() in ("none", "default"):
        return None
    try:
        n = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        n = -1
    if n < 0:
        raise Refused(f"bad daily token budget {text!r}: give a whole number of tokens, 0 for"
                      " no limit, or none for the default")
    return n


def upstream_arg(text: str, settings, none_ok: bool) -> str | None:
    """`--upstream` / `--fallback-upstream`: a configured upstream's name; `default` (or
    `none` for the fallback) clears it."""
    from nanoclaw import upstreams

    name = text.strip().lower()
    if name in ("default",) + (("none",) if none_ok else ()):
        return None
    known = upstreams.configured(settings)
    if name not in known:
        raise Refused(f"unknown upstream {text!r} (configured: {', '.join(known)};"
                      " more in NANOCLAW_UPSTREAMS)")
    return name


def budget_text(own: int | None, default: int) -> str:
    if own is None:
        return (f"default, {default}" if default else "default, none") + \
            " (NANOCLAW_DAILY_TOKEN_BUDGET)"
    return str(own) if own else "none (this group is unlimited)"


def skills_arg(text: str) -> str:
    """`--skills all|none|a,b` → the JSON stored in container_configs.skills."""
    value = text.strip()
    if value.lower() in ("all", "none"):
        return json.dumps("all") if value.lower() == "all" else "[]"
    names = list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    known = skills.available()
    for n in names:
        if not skills.SKILL_NAME.match(n) or n not in known:
            raise Refused(f"unknown skill {n!r} (available: {', '.join(known) or 'none'};"
                          " or all, none)")
    return json.dumps(names) if names else "[]"


# ---- groups -------------------------------------------------------------------------------
verb("groups", "agent groups")


@op("groups", "list", read=True, agent=True, group_scope=True, own="group",
    args=[arg("--group", help="only this agent group")])
def groups_list(a, store, settings) -> None:
    from nanoclaw import upstreams

    only = store.find_agent_group(a.group)["id"] if a.group else None
    rows = store.groups_overview(only)
    for r in rows:
        own, default = r.pop("daily_token_budget"), settings.daily_token_budget
        r["daily_budget"] = (own if own is not None else default) or None
        r["fallback"] = r["fallback"] or settings.fallback_model or None
        r["upstream"] = r["upstream"] or f"({upstreams.default_for(r['provider'] or 'claude')})"
        r["fallback_upstream"] = r["fallback_upstream"] or settings.fallback_upstream or None
        r["web"] = store.web_policy(r["id"])
    table(rows, ["id", "name", "folder", "provider", "model", "fallback", "upstream",
                 "fallback_upstream", "daily_budget", "web"])


@op("groups", "add", read=False, agent=True, aliases=("create",),
    args=[arg("name"), arg("--folder"), arg("--provider", choices=PROVIDERS), arg("--model")])
def groups_add(a, store, settings) -> None:
    folder = a.folder or normalise_name(a.name)
    if not FOLDER_NAME.match(folder):
        raise Refused(f"bad folder name {folder!r}")
    if store.folder_taken(folder):
        raise Refused(f"folder {folder!r} is taken")
    ag = store.create_agent_group(a.name, folder, a.provider or settings.provider,
                                  a.model or settings.model, a.name)
    ensure_group_folder(settings, folder, a.name)
    print(ag)


@op("groups", "update", read=False, agent=True, group_scope=True, own="id", args=[
    arg("id"), arg("--name"), arg("--provider", choices=PROVIDERS), arg("--model"),
    arg("--daily-token-budget", metavar="N|none",
        help="tokens a day for this group (0: no limit; none: the default,"
             " NANOCLAW_DAILY_TOKEN_BUDGET)"),
    arg("--fallback-model", metavar="MODEL|none",
        help="answer with this model while the group's own stays overloaded"
             " (none: back to NANOCLAW_FALLBACK_MODEL)"),
    arg("--upstream", metavar="NAME|default",
        help="where the broker sends the group's model calls: anthropic, openai or a name"
             " from NANOCLAW_UPSTREAMS (default: its provider's)"),
    arg("--fallback-upstream", metavar="NAME|none",
        help="the upstream --fallback-model is on, when not the group's own (none: back"
             " to NANOCLAW_FALLBACK_UPSTREAM)"),
    arg("--cli-scope", choices=["disabled", "group", "global"],
        help="what the agent's in-sandbox `ncl` may reach (see README)"),
    arg("--skills", metavar="all|none|A,B",
        help="which skills of container/skills the agent gets (`nanoclaw skills` lists"
             " them); from its next start"),
    arg("--web", metavar="off|on|allow:A,B|deny:X",
        help="what the agent may reach on the web through the egress door: nothing,"
             " anything public, only these domains or all but these (subdomains match)")])
def groups_update(a, store, settings) -> None:
    g = store.find_agent_group(a.id)
    cols = {k: v for k, v in (("provider", a.provider), ("model", a.model),
                              ("cli_scope", a.cli_scope)) if v}
    note = ""
    if a.daily_token_budget is not None:
        cols["daily_token_budget"] = limit = budget_arg(a.daily_token_budget)
        note = f" (daily token budget: {budget_text(limit, settings.daily_token_budget)})"
    if a.skills is not None:
        cols["skills"] = skills_arg(a.skills)
    if a.fallback_model:  # none: back to NANOCLAW_FALLBACK_MODEL
        cols["fallback_model"] = None if a.fallback_model == "none" else a.fallback_model
    if a.upstream:
        cols["upstream"] = upstream_arg(a.upstream, settings, none_ok=False)
    if a.fallback_upstream:
        cols["fallback_upstream"] = upstream_arg(a.fallback_upstream, settings, none_ok=True)
    web = None
    if a.web is not None:
        from nanoclaw.broker.egress_policy import GroupPolicy

        try:
            web = str(GroupPolicy.parse(a.web))
        except ValueError as e:
            raise Refused(str(e)) from None
        note += f" (web: {web})"
    store.update_group_config(g["id"], name=a.name, **cols)
    if web is not None:
        store.set_web_policy(g["id"], web)
    print(f"updated {g['id']}{note}")


@op("groups", "remove", read=False, agent=True, group_scope=True, own="id", aliases=("delete",),
    args=[arg("id")])
def groups_remove(a, store, settings) -> None:
    g = store.find_agent_group(a.id)
    store.remove_agent_group(g["id"])
    print(f"removed {g['id']}")


# ---- skills -------------------------------------------------------------------------------
verb("skills", "the agent skills in container/skills and which groups enable them",
     default="list")


@op("skills", "list", read=True, never="the skills list is for the terminal only")
def skills_list(a, store, settings) -> None:
    """The skills in container/skills and the groups that enable them (at their next
    start; `groups update GROUP --skills`)."""
    offered = skills.available()
    users: dict[str, list[str]] = {n: [] for n in offered}
    for g in store.skills_by_group():
        names = skills.enabled(g["skills"])
        for n in offered if names is None else names:
            users.setdefault(n, []).append(g["folder"])
    rows = []
    for n, folders in users.items():
        text = offered[n] if n in offered else "(missing from container/skills)"
        rows.append({"name": n, "groups": ",".join(folders) or None,
                     "description": text if len(text) <= 70 else text[:69] + "…"})
    table(rows, ["name", "groups", "description"])
