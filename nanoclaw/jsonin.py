"""JSON from outside, parsed with a bound on nesting depth.

`json.loads` recurses once per nested array or object, so `[` * 100000 raises
RecursionError (not ValueError): a handler that catches ValueError for bad input lets
it through as a traceback or an HTTP 500. `loads` here scans the text first (cheaply:
bracket counts, then two regex passes only when there are many brackets) and refuses
anything nested deeper than `MAX_DEPTH`, so every failure is one `BadJSON` with a
one-line reason.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

MAX_DEPTH = 64

# JSON strings (an unterminated one runs to the end) and whatever is not a bracket:
# removed before counting, so brackets inside strings do not count. Both regexes are
# linear, and the count runs in C (accumulate), so 1 MiB of brackets takes ~50 ms.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class BadJSON(ValueError):
    """Input that is not JSON we accept; the message is one line."""


class TooDeep(BadJSON):
    """Nested deeper than the limit."""


def _text(data: str | bytes | bytearray) -> str:
    if isinstance(data, str):
        return data
    # as json.loads decodes bytes; undecodable bytes become U+FFFD, which is never a
    # quote, backslash or bracket, so the scan agrees with json.loads wherever it decodes
    return bytes(data).decode(json.detect_encoding(data), "replace")


def check_depth(data: str | bytes | bytearray, limit: int = MAX_DEPTH) -> None:
    """Raise TooDeep when arrays/objects in `data` nest deeper than `limit`.

    Up to the first syntax error the scan sees the same strings and brackets that
    json.loads does (so the running count is its depth, never negative), and json.loads
    stops there: it never recurses deeper than the count's maximum. For valid JSON the
    two agree exactly. Never raises anything but TooDeep, whatever `data` holds."""
    if not isinstance(data, str) and data.count(b"[") + data.count(b"{") <= limit:
        return  # every bracket character has a bracket byte in any encoding json reads
    text = _text(data)
    if text.count("[") + text.count("{") <= limit:
        return  # the common case: too few brackets to nest that deep
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > limit:
        raise TooDeep(f"JSON nested deeper than {limit} levels")


def loads(data: str | bytes | bytearray, limit: int = MAX_DEPTH) -> Any:
    """json.loads for untrusted input: raises BadJSON (one line) for anything malformed,
    badly encoded or nested deeper than `limit`, and nothing else."""
    if not isinstance(data, (str, bytes, bytearray)):
        raise BadJSON(f"malformed JSON: {type(data).__name__} is not text")
    check_depth(data, limit)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadJSON(f"malformed JSON: {e}") from None
    except (ValueError, TypeError, RecursionError) as e:  # RecursionError: a limit set too high
        raise BadJSON(f"malformed JSON: {type(e).__name__}") from None
