"""One batch of inbound rows and the addressing decisions that depend on it.

Pure: where a reply to a destination goes (the thread and `in_reply_to` of the latest
row from that channel), where an error or a bare-text fallback goes (the origin), which
row asked (the host reads the asker of a system action from `in_reply_to`), and whether
the origin is unambiguous. Host notes (channel `agent`, platform `system`) are never a
place to answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from agent_runner.db import Address, Destination, InboundRow

Channel = tuple[str | None, str | None]
HOST_NOTE: Channel = ("agent", "system")


def answerable(row: InboundRow) -> bool:
    return bool(row.channel_type) and row.channel != HOST_NOTE


@dataclass(frozen=True)
class Batch:
    rows: list[InboundRow]
    destinations: list[Destination]
    routing: Address | None

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.rows]

    @property
    def latest_id(self) -> str | None:
        return self.rows[-1].id if self.rows else None

    @property
    def asker_id(self) -> str | None:
        """The latest row that woke the agent (what a tool's row answers)."""
        for row in reversed(self.rows):
            if row.trigger:
                return row.id
        return self.latest_id

    def extend(self, rows: list[InboundRow], destinations: list[Destination] | None = None,
               routing: Address | None = None) -> "Batch":
        return replace(self, rows=self.rows + rows,
                       destinations=self.destinations if destinations is None else destinations,
                       routing=routing or self.routing)

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations if d.name == name), None)

    def address_for(self, channel: Channel) -> tuple[Address, str | None]:
        """The address (with thread) for a channel, and the row it answers, if any."""
        for row in reversed(self.rows):
            if row.channel_type and row.channel == channel:
                return Address(row.channel_type, row.platform_id, row.thread_id), row.id
        if self.routing and self.routing.channel == channel:
            return self.routing, None
        return Address(channel[0], channel[1]), None

    def _channels(self) -> list[Channel]:
        seen: list[Channel] = []
        for row in self.rows:
            if answerable(row) and row.channel not in seen:
                seen.append(row.channel)
        return seen

    def origin(self) -> tuple[Address, str | None] | None:
        """Where errors and notices go: the latest triggering row's channel, else the
        session's default address, else the only destination."""
        for row in reversed(sorted(self.rows, key=lambda r: r.trigger)):
            if answerable(row):
                return self.address_for(row.channel)
        if self.routing:
            return self.routing, self.asker_id
        if len(self.destinations) == 1:
            return self.address_for(self.destinations[0].channel)[0], self.asker_id
        return None

    def sole_origin(self) -> tuple[Address, str | None] | None:
        """The origin only when it is the one plausible place (all rows share a channel)."""
        return self.origin() if len(self._channels()) <= 1 else None
