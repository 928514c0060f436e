"""Whether a mail's From address may be believed: the receiving server's verdict in its
`Authentication-Results` header (RFC 8601), read, never recomputed.

Only one header counts: the topmost one (the receiving server adds its own above all
the others), or with `EMAIL_AUTHSERV_ID` the topmost naming that server. A sender can
write any Authentication-Results it likes further down; they are never read. The From
address counts as authenticated when that header shows `dkim=pass` with `header.d`
aligned to the From domain, or `spf=pass` with `smtp.mailfrom` aligned (relaxed
alignment: the same domain or one a parent of the other), as `EMAIL_REQUIRE_AUTH` asks:
`dkim`, `spf`, `dkim_or_spf` (default) or `none` (believe every From: only for a
mailbox nobody else can write to). Pure functions; bad input is "not authenticated".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

MODES = ("dkim", "spf", "dkim_or_spf", "none")
_COMMENT = re.compile(r"\([^()]*\)")
_TOKEN = re.compile(r'([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;]+)')


@dataclass
class Result:
    method: str
    result: str
    props: dict[str, str] = field(default_factory=dict)


@dataclass
class Verdict:
    authserv_id: str
    results: list[Result]


def parse(header: str) -> Verdict | None:
    """One Authentication-Results value, or None where it is not one."""
    if not isinstance(header, str) or len(header) > 16_384:
        return None
    text = header
    for _ in range(4):  # nested comments, a level at a time
        text = _COMMENT.sub(" ", text)
    parts = [p.strip() for p in text.split(";")]
    head = parts[0].split()
    if not head or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,255}", head[0]):
        return None
    out = []
    for part in parts[1:]:
        tokens = _TOKEN.findall(part)
        if not tokens:
            continue
        method, result = tokens[0]
        props = {k.lower(): v.strip('"').lower() for k, v in tokens[1:]}
        out.append(Result(method.lower().split("/")[0], result.strip('"').lower(), props))
    return Verdict(head[0].lower(), out)


def pick(headers: Iterable[str], authserv_id: str = "") -> Verdict | None:
    """The receiving server's verdict among a mail's headers, topmost first."""
    for h in headers:
        v = parse(str(h))
        if v is None:
            if not authserv_id:
                return None  # the topmost is unreadable: nothing else is trusted
            continue
        if not authserv_id or v.authserv_id == authserv_id.lower():
            return v
    return None


def _domain(value: str) -> str:
    value = value.strip().strip("<>").lower()
    return value.rpartition("@")[2].rstrip(".")


def aligned(a: str, b: str) -> bool:
    """Relaxed alignment: the same domain, or one a subdomain of the other (never a bare
    top-level domain)."""
    if not a or not b or "." not in a or "." not in b:
        return False
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def authenticated(headers: Iterable[str], from_addr: str, require: str = "dkim_or_spf",
                  authserv_id: str = "") -> bool:
    if require == "none":
        return True
    v = pick(headers, authserv_id)
    dom = _domain(from_addr)
    if v is None or not dom:
        return False
    dkim = any(r.method == "dkim" and r.result == "pass"
               and aligned(_domain(r.props.get("header.d", "") or r.props.get("header.i", "")),
                           dom) for r in v.results)
    spf = any(r.method == "spf" and r.result == "pass"
              and aligned(_domain(r.props.get("smtp.mailfrom", "")), dom) for r in v.results)
    return {"dkim": dkim, "spf": spf}.get(require, dkim or spf)
