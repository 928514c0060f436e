"""Attachments the agent can open: make sure each one is a file under `<session>/inbox/`.

The host may already have saved a file (`localPath`, relative to the session folder or a
host path inside it) or may pass it inline as base64 `data`; inline data is written to
`inbox/<message id>/<safe name>` with exclusive create, never through a symlink and never
outside the folder. Either way the row's content then names the path as the agent sees it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import os
import re

from agent_runner.db import InboundRow

log = logging.getLogger("agent_runner")

UNSAFE = re.compile(r"[^A-Za-z0-9._\-]")


def _safe(name: str, fallback: str) -> str:
    base = UNSAFE.sub("_", os.path.basename(str(name or ""))).strip("._")
    return base[:120] or fallback


def _within(root: str, path: str) -> bool:
    root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real.startswith(root + os.sep)


def _save(session_dir: str, row_id: str, index: int, att: dict) -> str | None:
    folder = os.path.join(session_dir, "inbox", _safe(row_id, f"msg{index}"))
    name = _safe(att.get("name") or att.get("filename") or "", f"file{index}")
    try:
        data = base64.b64decode(att["data"], validate=False)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        if not _within(os.path.join(session_dir, "inbox"), path):
            return None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        return path
    except (OSError, binascii.Error, ValueError, TypeError) as exc:
        log.warning("attachment not saved row=%s error=%s", row_id, exc)
        return None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def prepare(row: InboundRow, session_dir: str) -> InboundRow:
    atts = row.content.get("attachments")
    if not isinstance(atts, list) or not atts:
        return row
    inbox = os.path.join(session_dir, "inbox")
    out = []
    for i, att in enumerate(atts):
        if not isinstance(att, dict):
            continue
        att = dict(att)
        local = att.get("localPath") or att.get("local_path")
        if local:
            path = local if os.path.isabs(local) else os.path.join(session_dir, local)
            if os.path.isabs(local) and not os.path.exists(path) and "/inbox/" in local:
                path = os.path.join(inbox, local.rsplit("/inbox/", 1)[1])  # a host path
            if not (os.path.isabs(local) and path == local) and not _within(inbox, path):
                path = None
            att["localPath"] = path if path and os.path.exists(path) else None
        elif att.get("data"):
            att["localPath"] = _save(session_dir, row.id, i, att)
        att.pop("data", None)
        out.append(att)
    return dataclasses.replace(row, content={**row.content, "attachments": out})
