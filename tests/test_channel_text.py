"""The pure parts every adapter shares: splitting long text, button data, cards, Markdown
rendered per platform and split without breaking its markup; and the registry's promise
that platform libraries load only in their own worker."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from conftest import ROOT, clean_env

from fakes.fake_telegram import parse_html
from nanoclaw.channels.markdown import discord_markdown, slack_mrkdwn, telegram_html
from nanoclaw.channels.text import (
    card_text,
    decode_choice,
    encode_choice,
    parse_question,
    split_text,
)


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
    code = ("import sys; from nanoclaw import config; from nanoclaw.host import registry;"
            " names = registry.channel_names(config.load());"
            " print(names, [m for m in ('telegram', 'discord', 'slack_sdk') if m in sys.modules])")
    env = clean_env(TELEGRAM_BOT_TOKEN="1:x", DISCORD_BOT_TOKEN="x", SLACK_BOT_TOKEN="xoxb",
                    SLACK_APP_TOKEN="xapp")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['cli', 'discord', 'slack', 'telegram', 'web'] []"


# ---- Markdown per platform ------------------------------------------------------------
MD = ("# Plan\n\nSome **bold**, *italic*, ~~old~~ and `a<b` with"
      " [docs](https://example.com/?a=1&b=2) and [a file](notes.md).\n\n"
      "- one\n- two\n  1. nested\n\n> quoted **line**\n\n"
      "```python\nif a < b and c & d:\n    pass\n```")


def test_markdown_becomes_telegram_html_with_a_plain_twin():
    [chunk] = telegram_html(MD, 4096)
    assert chunk.markup == (
        "<b>Plan</b>\n\nSome <b>bold</b>, <i>italic</i>, <s>old</s> and <code>a&lt;b</code> with"
        ' <a href="https://example.com/?a=1&amp;b=2">docs</a> and a file (notes.md).\n\n'
        "• one\n• two\n  1. nested\n\n<blockquote>quoted <b>line</b></blockquote>\n\n"
        '<pre><code class="language-python">if a &lt; b and c &amp; d:\n    pass</code></pre>')
    text, entities = parse_html(chunk.markup)  # what Telegram would show
    assert text.startswith("Plan\n\nSome bold, italic, old and a<b with docs and a file")
    assert {e["type"] for e in entities} >= {"bold", "italic", "strikethrough", "code",
                                              "text_link", "blockquote", "pre"}
    assert chunk.plain.startswith("Plan\n\nSome bold, italic, old and a<b with docs "
                                  "(https://example.com/?a=1&b=2) and a file (notes.md).")
    assert chunk.plain.endswith("quoted line\n\nif a < b and c & d:\n    pass")


def test_markdown_becomes_slack_mrkdwn():
    [text] = slack_mrkdwn(MD + "\n\nping <@U123> and <!here>", 40_000)
    assert text == (
        "*Plan*\n\nSome *bold*, _italic_, ~old~ and `a&lt;b` with"
        " <https://example.com/?a=1&amp;b=2|docs> and a file (notes.md).\n\n"
        "• one\n• two\n  1. nested\n\n> quoted *line*\n\n"
        "```\nif a &lt; b and c &amp; d:\n    pass\n```\n\nping <@U123> and <!here>")


def test_plain_text_renders_as_it_was_and_splits_as_before():
    words = random.Random(3).choices(["alpha", "beta", "gamma", "delta"], k=1300)
    text = " ".join(words[:500]) + "\n\n" + " ".join(words[500:])
    assert [c.markup for c in telegram_html(text, 4096)] == split_text(text, 4096)
    assert discord_markdown(MD, 2000) == [MD]  # Discord renders Markdown itself
    assert telegram_html("", 4096) == [] and slack_mrkdwn("  \n", 100) == []


def _utf16(s: str) -> int:
    return len(s.encode("utf-16-le")) // 2


def _fences_balanced(chunk: str) -> bool:
    return sum(1 for line in chunk.split("\n") if line.lstrip("> ").startswith("```")) % 2 == 0


def test_a_cut_code_block_is_closed_and_reopened():
    code = "\n".join(f"x{i} = f({i}) & g  # <{i}>" for i in range(300))
    md = f"Intro **bold**.\n\n```python\n{code}\n```\n\nAfter [link](https://e.com)."
    chunks = telegram_html(md, 1000)
    assert len(chunks) > 5 and all(len(c.markup) <= 1000 for c in chunks)
    shown = [parse_html(c.markup) for c in chunks]  # each chunk is valid HTML on its own
    pre = ["".join(t[e["offset"]:e["offset"] + e["length"]] for e in ents if e["type"] == "pre")
           for t, ents in shown]
    assert "\n".join(p for p in pre if p) == code  # only the newline at each cut is dropped
    assert all(c.markup.startswith('<pre><code class="language-python">') for c in chunks[1:-1])
    for chunks in (slack_mrkdwn(md, 1000), discord_markdown(md, 1000)):
        assert all(len(c) <= 1000 and _fences_balanced(c) for c in chunks)
    assert all(c.startswith("```python\n") for c in discord_markdown(md, 1000)[1:-1])


def test_rendered_chunks_never_exceed_the_limit_or_break_markup():
    rng = random.Random(11)
    parts = ["word ", "**bold text** ", "*it* ", "`co<de>` ", "a & b ", "é🙂🙂 ", "x" * 70,
             "[l](https://x.io/?q=1&r=2) ", "\n", "\n\n", "- item ", "> quote ",
             "\n```py\nx = 1 < 2\ny = 3\n```\n"]
    for _ in range(150):
        md = "".join(rng.choice(parts) for _ in range(rng.randint(1, 300)))
        limit = rng.choice([200, 333, 1000, 4096])
        whole = "".join(parse_html(c.markup)[0] for c in telegram_html(md, 1 << 30))
        chunks = telegram_html(md, limit)
        assert all(_utf16(c.markup) <= limit and _utf16(c.plain) <= limit for c in chunks)
        shown = "".join(parse_html(c.markup)[0] for c in chunks)  # raises on a broken tag
        assert "".join(shown.split()) == "".join(whole.split())  # only separators lost
        for c in slack_mrkdwn(md, limit):
            assert len(c) <= limit and _fences_balanced(c)
        for c in discord_markdown(md, limit):
            assert len(c) <= limit and _fences_balanced(c)
