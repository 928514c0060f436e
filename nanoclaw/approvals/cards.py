"""A click on an approval card, or the terminal's `approvals approve|reject`: which kind
of approval it decides, told by the card id alone.

Why a module of its own: agent requests (`appr-…`) are `approvals`'; sender and chat
approvals (`snd-…`, `chan-…`) are `registration`'s, which uses `approvals` to find and
ask approvers. When `approvals` dispatched to `registration` the two imported each
other (architecture review §1.4, M3); here, above both, neither needs the other.
"""

from __future__ import annotations

from nanoclaw.approvals import registration
from nanoclaw.approvals import requests as approvals
from nanoclaw.approvals.registration import Replay
from nanoclaw.config import Settings
from nanoclaw.db.store import Store
from nanoclaw.errors import Refused
from nanoclaw.log import logger


class NotOffered(Refused):
    """A click names an option its card never offered (a forged or stale click)."""

REQUEST_PREFIX = "appr-"  # an agent's request; every other approval card is registration's


def decide(store: Store, settings: Settings, card_id: str, option: str,
           clicker: str | None, replay: Replay) -> str:
    """Apply a decision on any kind of approval; returns what happened (one line).
    `replay` routes a sender's or chat's approved message (`registration.decide`).

    Raises NotAllowed for a clicker who may not decide, NotFound for an unknown
    or already decided approval, `registration.StillOpen` for one that cannot be applied
    as asked (nothing written)."""
    if card_id.startswith(REQUEST_PREFIX):
        return approvals.decide(store, settings, card_id, option, clicker)
    return registration.decide(store, settings, card_id, option, clicker, replay)


def click(store: Store, settings: Settings, card_id: str, option: str,
          clicker: str | None, replay: Replay) -> str:
    """A click on an approval card: `decide`, once the option is one the card offered
    (a forged click cannot pick, say, a `connect:` to an agent the card did not name).

    Raises NotOffered for an option not on the card, as well as `decide`'s errors."""
    offered = approvals.card_options(store, card_id)
    if offered is not None and option not in offered:
        logger.warning("click on approval {} with option {!r} not on its card; ignored",
                       card_id, option)
        raise NotOffered(f"{option!r} is not an option of this card")
    return decide(store, settings, card_id, option, clicker, replay)
