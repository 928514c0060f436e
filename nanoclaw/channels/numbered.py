"""Question cards on platforms without buttons (GitHub, Linear): the card goes out as a
numbered list, a bare number sent back answers the chat's latest unanswered card, and
the card is then edited to show the choice (an `edit` queued to the channel's own
outbox, so whichever process read the answer, the channel worker makes the edit)."""

from __future__ import annotations

from typing import Any

from nanoclaw.channels.text import Question, parse_question


def card_body(card: Question, chosen: str | None = None) -> str:
    """A question card as Markdown: a numbered list, and once answered, the choice."""
    head = f"**{card.title}**\n\n" if card.title else ""
    lines = "\n".join(f"{i + 1}. {o['label']}" for i, o in enumerate(card.options))
    tail = f"Chosen: **{chosen}**" if chosen else "Reply with the number."
    return f"{head}{card.question}\n\n{lines}\n\n{tail}"


def number_answer(host: Any, channel: str, platform_id: str,
                  text: str) -> tuple[Question, str] | None:
    """(card, option value) if `text` is a bare number answering the chat's latest card
    that is not answered yet; else None (the text is an ordinary message)."""
    n = text.strip().rstrip(".)")
    if not n.isdigit() or len(n) > 3 or int(n) < 1:
        return None
    store = host.store
    sent = store.latest_sent_question(channel, platform_id)
    latest = parse_question(sent) if sent else None
    if latest is None or store.card_answered(channel, platform_id, latest.question_id):
        return None
    card = parse_question(host.question(latest.question_id, platform_id) or {})
    option = card.value(int(n) - 1) if card else None
    return (card, option) if card and option is not None else None


def show_choice(host: Any, channel: str, platform_id: str, thread_id: str | None,
                key: str, card: Question, option: str, who: str) -> None:
    """Queue the edit that shows the choice on the card (once per answering message)."""
    store = host.store
    mid = store.sent_card_message_id(channel, card.question_id, platform_id)
    label = next((o["selectedLabel"] for o in card.options if o["value"] == option), option)
    if mid:
        store.enqueue_send(f"choice:{channel}:{key}", channel, platform_id, thread_id, "chat",
                           {"operation": "edit", "messageId": mid,
                            "text": card_body(card, chosen=f"{label} (by {who})")})
