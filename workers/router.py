"""Worker `router`: platform events (central `inbound_events`) → session messages."""

from __future__ import annotations

from nanoclaw.channels import load_builtin

# installs the agent's "cli" action's approval handler: an approved `ncl` command runs
# in the process that takes the click (the action registry no longer imports it, M1)
from nanoclaw.cli import agent as agent_cli  # noqa: F401
from nanoclaw.db import sessionfile
from nanoclaw.db.store import Store
from nanoclaw.host.runner import Worker
from nanoclaw.log import logger
from nanoclaw.routing.router import Event, Router

MAX_ATTEMPTS = 3


KEPT = 32  # session DB connections kept open (sessionfile.keep_connections)


class RouterWorker(Worker):
    name = "router"

    def initialize(self) -> None:
        sessionfile.keep_connections(KEPT)  # on every message's path
        self.store = Store.open(self.settings.data_dir)
        self.router = Router(self.store, self.settings, load_builtin().threaded())
        self.version = -1

    def loop_once(self, now: float) -> bool:
        v = self.store.version()
        if v == self.version:
            return False
        self.version = v
        events = self.store.pending_inbound()
        for row in events:
            try:
                sessions = self.router.route(Event.from_row(row))
            except Exception as e:  # a bad event never kills the router
                final = row["attempts"] + 1 >= MAX_ATTEMPTS or isinstance(e, (ValueError, KeyError))
                logger.error("event {} from {}:{} not routed ({}): {}", row["id"],
                             row["channel_type"], row["platform_id"], type(e).__name__, e)
                self.store.mark_inbound_error(row["id"], f"{type(e).__name__}: {e}", final)
                if final:
                    self._tell_sender(row, e)
                self.version = -1
                continue
            self.store.mark_routed(row["id"])
            logger.debug("event {} routed to {}", row["id"], sessions or "nobody")
        return bool(events)

    def _tell_sender(self, row: dict, error: Exception) -> None:
        """A message that could not be routed is answered, not dropped in silence."""
        self.store.enqueue_send(
            f"route-failed:{row['id']}", row["channel_type"], row["platform_id"],
            row["thread_id"], "chat",
            {"text": "Sorry, your message could not be passed to the agent"
                     f" ({type(error).__name__}). The host's error log has the details."},
            in_reply_to=f"{row['message_id']}:")

    def shutdown(self) -> None:
        self.store.close()
