"""A1111's "Key: value, Key: "quoted, value", ..." lists, as its PNG parameters write them: the key-value line (the
last line of the text) and a ControlNet unit's own list. `infotext` reads the fields from these pairs.

Each scanner returns exactly what `re.findall` returns for A1111's pattern (below), in time linear in the text's
length, so that a hostile PNG of a few KB cannot hold the server for minutes.
"""

from __future__ import annotations

import math
import re

# A1111's patterns. A value is a JSON-quoted string (it may hold commas), a tuple such as "starting/ending: (0, 1)"
# (the old extension wrote those inside a unit) or runs to the next comma. Run by `re.findall`, they take time growing
# with the cube of a run of spaces: the engine tries them again at every position, and `\s*([^:,]+?)\s*` splits a run
# three ways. The scanners below find the same pairs trying each run once.
#   key-value line:  \s*(\w[\w /-]+):\s*("(?:[^"\\]|\\.)+"|[^,]*)(?:,|$)
#   inside a unit:   \s*([^:,]+?)\s*:\s*(\([^()]*\)|"(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)
_SPACES = re.compile(r"\s*")
_KEY = re.compile(r"\w[\w /-]*")  # a key of the key-value line (at least two characters: checked apart)
_QUOTED = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON-quoted value: no quote inside but escaped ones
_TUPLE = re.compile(r"\([^()]*\)")
_KEY_END = re.compile(r"[:,]")


def _value_end(text: str, at: int) -> int | None:
    """Where a match of A1111's patterns ends when its value ends at `at`: after the comma there, or at the end
    (`$`: the text's end, or just before a newline that ends it); None when neither is there."""
    if at < len(text) and text[at] == ",":
        return at + 1
    if at == len(text) or at == len(text) - 1 and text[at] == "\n":
        return at
    return None


def _plain_value(text: str, at: int) -> tuple[str, int]:
    """A value that runs to the next comma: (the value, where the match ends)."""
    comma = text.find(",", at)
    return (text[at:], len(text)) if comma < 0 else (text[at:comma], comma + 1)


def line_pairs(line: str) -> list[tuple[str, str]]:
    """The (key, value) pairs of the key-value line, as `re.findall` finds A1111's pattern (see above)."""
    out, i, n = [], 0, len(line)
    while i < n:
        j = _SPACES.match(line, i).end()
        key = _KEY.match(line, j)
        if key is None:  # every start up to j finds the same character there
            i = j + 1
            continue
        k = key.end()
        if k - j < 2 or k == n or line[k] != ":":  # and every start inside the key ends at the same place
            i = k
            continue
        v = _SPACES.match(line, k + 1).end()
        quoted = _QUOTED.match(line, v)
        end = _value_end(line, quoted.end()) if quoted is not None and quoted.end() - v > 2 else None
        value, end = (quoted.group(), end) if end is not None else _plain_value(line, v)
        out.append((line[j:k], value))
        i = end
    return out


def unit_pairs(text: str) -> list[tuple[str, str]]:
    """The (key, value) pairs of a unit's text, as `re.findall` finds the extension's pattern (see above)."""
    out, i, n = [], 0, len(text)
    while i < n:
        stop = _KEY_END.search(text, i)
        c = n if stop is None else stop.start()
        if c == n or text[c] == ",":  # every start up to the comma fails the same way
            i = c + 1
            continue
        if c == i:  # a colon with no key before it
            i += 1
            continue
        j = _SPACES.match(text, i, c).end()
        key = text[j:c].rstrip() if j < c else text[c - 1]  # only spaces before the colon: the key is the last one
        v = _SPACES.match(text, c + 1).end()
        end = None
        if (tup := _TUPLE.match(text, v)) or (tup := _QUOTED.match(text, v)):
            end = _value_end(text, tup.end())
        value, end = (tup.group(), end) if end is not None else _plain_value(text, v)
        out.append((key, value))
        i = end
    return out


def finite_number(value: str | None) -> float | None:
    """A value of the text as a finite number; None when it is missing, not a number, NaN or infinite."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
