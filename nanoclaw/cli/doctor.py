"""`nanoclaw doctor`: checks the installation and says what is wrong in plain words:
the settings, the sandbox user, which runtime agents get here (and why not the others),
the agent image, the warm pool, the host, its database and workers, and each model
upstream (one cheap request through the broker, and which groups use it); and, with the
fix for each (`doctor_checks.py`), the credential, each channel's token, the webhook door,
free disk and the size of logs/."""

from __future__ import annotations

import argparse
import os

from nanoclaw import config
from nanoclaw.cli import doctor_checks
from nanoclaw.cli.common import CliError, open_store
from nanoclaw.cli.host import host_pid
from nanoclaw.config import Settings, SettingsError


def probe_runtimes(settings: Settings) -> tuple[dict[str, bool], str]:
    """Which sandbox runtimes work here, and the one `auto` picks."""
    from nanoclaw.log import logger
    from nanoclaw.runtime import AUTO_ORDER, RUNTIMES

    logger.disable("nanoclaw.runtime")  # the probes' debug lines are not for this screen
    try:
        usable = {n: bool(RUNTIMES[n].available(settings)) for n in AUTO_ORDER}
    finally:
        logger.enable("nanoclaw.runtime")
    return usable, next((n for n in AUTO_ORDER if usable[n]), "process")


def image_label(settings: Settings, name: str) -> str | None:
    from nanoclaw.runtime import docker as docker_rt

    try:
        return (docker_rt.client(timeout=5).images.get(settings.image).labels or {}).get(name)
    except Exception:  # noqa: BLE001 - no engine or no image: nothing to read
        return None


def runtime_report(settings: Settings) -> list[tuple[bool | None, str]]:
    """Which runtime agents get here and why not the others; whether the warm pool is in
    effect. (ok, line) pairs; ok None is a plain note."""
    from nanoclaw.runtime import WHY_NOT, mountns

    usable, auto = probe_runtimes(settings)
    out: list[tuple[bool | None, str]] = []
    for n, ok in usable.items():
        if not ok:
            out.append((None, f"runtime {n} is not usable: " + WHY_NOT[n].format(
                image=settings.image)))
    chosen = settings.runtime if settings.runtime != "auto" else auto
    if settings.runtime == "auto":
        out.append((auto != "process", f"runtime auto picks {auto} here" + (
            ": agents run WITHOUT isolation (development only)" if auto == "process" else "")))
    elif settings.runtime != "process" and not usable[settings.runtime]:
        out.append((False, f"runtime {settings.runtime} (NANOCLAW_RUNTIME) cannot run here;"
                    f" auto would pick {auto}"))
        return out
    else:
        out.append((True, f"runtime {chosen} (NANOCLAW_RUNTIME; auto would pick {auto})" + (
            ": agents run WITHOUT isolation" if chosen == "process" else "")))
    if chosen == "docker":
        out.append(image_freshness(settings))
    n = settings.warm_pool
    if chosen == "process" and settings.zygote:
        out.append((True, "zygote on: process agents are forked from one that imported the"
                    " runner (NANOCLAW_ZYGOTE)"))
    elif n <= 0:
        out.append((None, "warm pool off (NANOCLAW_WARM_POOL=0): every agent starts cold"))
    elif chosen in ("bwrap", "docker") and not mountns.can_mount():
        out.append((None, f"warm pool off: {chosen} hands a session to a waiting sandbox"
                    " only when the host runs as root; every agent starts cold"))
    else:
        out.append((True, f"warm pool on: {n} {chosen} agent(s) started ahead"
                    " (NANOCLAW_WARM_POOL)"))
    return out


def image_freshness(settings: Settings) -> tuple[bool | None, str]:
    """Whether the agent image was built from the recipe in container/ as it is now."""
    from nanoclaw.lifecycle.containers import RUNNER_DIR
    from nanoclaw.runtime import docker as docker_rt
    from nanoclaw.runtime import sandbox

    want = sandbox.image_hash(RUNNER_DIR)
    try:
        labels = docker_rt.client(timeout=5).images.get(settings.image).labels or {}
    except Exception as e:  # noqa: BLE001 - the report says what it could not see
        return None, f"image {settings.image}: cannot inspect it ({e})"
    have = labels.get("nanoclaw.image-hash")
    if have == want:
        return True, f"image {settings.image} is up to date ({want})"
    return None, (f"image {settings.image} was built from another recipe ({have or 'unknown'},"
                  f" container/ is now {want}): run make image")


def upstream_report(settings: Settings, store, host_up: bool) -> list[tuple[bool | None, str]]:
    """Each configured model upstream, which groups use it, and — with the host up — how
    it answers one cheap request (its model list) sent through the broker with its key."""
    import json
    import urllib.error
    import urllib.request

    from nanoclaw import upstreams
    from nanoclaw.broker.proxy import CHECK_HEADER, CHECK_PATH, CHECK_STATE

    users: dict[str, list[str]] = {}
    for g in store.groups_overview():
        up, fb = upstreams.group_upstreams(g["provider"] or settings.provider, g, settings)
        users.setdefault(up, []).append(g["folder"])
        if fb:
            users.setdefault(fb, []).append(f"{g['folder']} (fallback)")
    default_openai = type(settings).model_fields["openai_base_url"].default
    broker_url = store.get_state("broker_url") if host_up else None
    token = store.get_state(CHECK_STATE) if host_up else None
    out: list[tuple[bool | None, str]] = []
    for up in upstreams.configured(settings).values():
        if up.name == "openai" and up.name not in users and not settings.openai_api_key \
                and up.url == default_openai:
            continue  # not set up, and nobody uses it
        who = ", ".join(users.get(up.name, [])) or "no group"
        what = f"upstream {up.name} ({up.api}-style, {up.url}; used by {who})"
        if not (broker_url and token):
            out.append((None, f"{what}: not checked (the host's broker is not running)"))
            continue
        req = urllib.request.Request(broker_url + CHECK_PATH.format(name=up.name),
                                     headers={CHECK_HEADER: token})
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                found = json.loads(resp.read())
        except (OSError, ValueError) as e:
            out.append((False, f"{what}: the broker did not answer the check ({e})"))
            continue
        if found.get("ok"):
            out.append((True, f"{what} answers"))
        elif found.get("status") is None:
            out.append((False, f"{what} is unreachable: {found.get('detail')}"))
        else:
            out.append((False, f"{what} answered HTTP {found['status']}"
                        f"{' (check its key; fix: nanoclaw setup)' if found['status'] in (401, 403) else ''}:"
                        f" {str(found.get('detail'))[:160]}"))
    return out


def door_report(settings: Settings) -> list[str]:
    """The webhook door's address and each platform's path on it; a linked channel's
    last state (logged out, conflict: what to do is in it)."""
    from nanoclaw.channels import webhook_names
    from nanoclaw.cli.channels import LOGINS, door_url, status_of

    out = []
    hooks = webhook_names(settings)
    if hooks:
        url = door_url(settings)
        out.append(f"webhook door {url} (publish only /webhook/<channel> on it: README)")
        out += [f"  {name} is called at {url}/webhook/{name}" for name in hooks]
    for name in LOGINS:
        st = status_of(settings, name)
        if st:
            out.append(f"channel {name}: {st}")
    return out


def cmd_doctor(args: argparse.Namespace) -> int:
    problems = 0

    def say(ok: bool, text: str) -> None:
        nonlocal problems
        problems += 0 if ok else 1
        print(f"{'ok ' if ok else 'BAD'}  {text}")

    try:
        s = config.load()
        say(True, "settings are valid")
    except SettingsError as e:
        say(False, str(e))
        return 1
    problem = s.agent_uid_problem()
    say(problem is None, problem or (f"agent uid {s.agent_uid} belongs to no local account"
                                     if os.geteuid() == 0 else
                                     "sandboxes run as this user (the host is not root)"))
    for ok, line in runtime_report(s):
        if ok is None:
            print(f"{'-':<3}  {line}")
        else:
            say(ok, line)
    pid = host_pid(s)
    say(bool(pid), f"host {'running, pid ' + str(pid) if pid else 'is not running (make run)'}")
    for ok, line in doctor_checks.report(s, bool(pid)):  # credential, tokens, door, disk, logs
        if ok is None:
            print(f"{'-':<3}  {line}")
        else:
            say(ok, line)
    if s.db_path.exists():
        try:
            store = open_store(s)
            say(True, f"database {s.db_path} opens and passes its check")
            bad = [w for w in store.workers() if w["state"] in ("BACKOFF", "FATAL")]
            for w in bad:
                say(False, f"worker {w['name']} is {w['state']} (last exit: {w['last_exit']});"
                    " see logs/nanoclaw.error.log")
            failed = store.count_sends("failed")
            say(failed == 0, f"{failed} send(s) failed for good")
            runtime = s.runtime if s.runtime != "auto" else probe_runtimes(s)[1]
            for ok, line in upstream_report(s, store, bool(pid)) + doctor_checks.cjk_fonts(
                    s, store.recent_texts(), image_label(s, "nanoclaw.cjk-fonts"), runtime):
                if ok is None:
                    print(f"{'-':<3}  {line}")
                else:
                    say(ok, line)
        except CliError as e:
            say(False, str(e))
    else:
        say(False, f"no database yet at {s.db_path} (start the host once)")
    say(s.cli_socket.exists() or not pid, f"terminal socket {s.cli_socket}")
    for line in door_report(s):
        print(f"{'-':<3}  {line}")
    return 1 if problems else 0
