"""The pure parts every adapter shares: splitting long text, button data, cards; and the
registry's promise that platform libraries load only in their own worker."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from conftest import ROOT
from nanoclaw.channels.text import (card_text, decode_choice, encode_choice, parse_question,
                                    split_text)


def test_split_prefers_paragraph_then_line_then_space_then_hard_cut():
    para = "a" * 60 + "\n\n" + "b" * 30
    assert split_text(para, 80) == ["a" * 60, "b" * 30]
    lines = "a" * 60 + "\n" + "b" * 30
    assert split_text(lines, 80) == ["a" * 60, "b" * 30]
    words = "a" * 60 + " " + "b" * 30
    assert split_text(words, 80) == ["a" * 60, "b" * 30]
    assert split_text("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    assert split_text("short", 10) == ["short"] and split_text("", 10) == [""]
    # a paragraph break too early in the window is not worth a tiny chunk
    early = "a" * 5 + "\n\n" + "b" * 100 + " " + "c" * 10
    assert split_text(early, 110)[0] == "a" * 5 + "\n\n" + "b" * 100


def test_split_never_exceeds_the_limit_and_loses_only_separators():
    rng = random.Random(7)
    alphabet = ["word", " ", "\n", "\n\n", "x" * 50, "é", "🙂"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        limit = rng.choice([5, 17, 64, 200, 4096])
        chunks = split_text(text, limit)
        assert all(0 < len(c) <= limit for c in chunks) or chunks == [""]
        assert "".join(chunks).replace(" ", "").replace("\n", "") == \
            text.replace(" ", "").replace("\n", "")


def test_button_data_fits_64_bytes_and_round_trips():
    data = encode_choice("appr-1795516757987-ii5o1c", 3)
    assert data == "ncq:appr-1795516757987-ii5o1c:3" and len(data.encode()) <= 64
    assert decode_choice(data) == ("appr-1795516757987-ii5o1c", 3)
    assert decode_choice("ncq:a:b:12") == ("a:b", 12)
    with pytest.raises(ValueError):
        encode_choice("q" * 70, 0)
    for bad in (None, 5, "", "ncq:", "ncq:x", "ncq::1", "ncq:x:-1", "ncq:x:1e3", "other:x:1",
                "ncq:x:99999"):
        assert decode_choice(bad) is None


def test_cards_are_normalised():
    q = parse_question({"type": "ask_question", "questionId": "q1", "question": "Pick",
                        "options": ["A", {"label": "B", "value": "b"}, {"nope": 1}, 7]})
    assert q is not None and [o["value"] for o in q.options] == ["A", "b"]
    assert q.value(1) == "b" and q.value(2) is None and q.selected_label(0) == "A"
    assert parse_question({"type": "ask_question", "questionId": "q", "options": []}) is None
    assert parse_question({"type": "card"}) is None
    text = card_text({"type": "card", "card": {"title": "T", "description": "D", "actions": [
        {"label": "Open", "url": "https://example.com"}]}})
    assert text == "T\n\nD\n\nOpen: https://example.com"


def test_platform_libraries_load_only_in_their_worker():
    code = ("import sys; from nanoclaw import config; import workers;"
            " names = workers.channel_names(config.load());"
            " print(names, [m for m in ('telegram', 'discord', 'slack_sdk') if m in sys.modules])")
    env = {**os.environ, "TELEGRAM_BOT_TOKEN": "1:x", "DISCORD_BOT_TOKEN": "x",
           "SLACK_BOT_TOKEN": "xoxb", "SLACK_APP_TOKEN": "xapp"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['cli', 'discord', 'slack', 'telegram', 'web'] []"
