"""A jobs file's rows, read as a stream: CSV (.csv, .tsv, with a header row) or JSON Lines (.jsonl: one object per
line). Memory does not grow with the file: a line is read at most MAX_ROW_CHARS at a time, and a row that cannot be
read (too long, not UTF-8, not JSON, a CSV cell over the csv module's limit, nested too deeply) is a string saying
why, in its place; the rows after it are read as usual.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from cldm.errors import InputError

JSON_SUFFIXES, CSV_SUFFIXES = (".jsonl", ".json", ".ndjson"), (".csv", ".tsv", ".txt")
MAX_ROWS = 1_000_000  # a batch remembers each row's file name (an 8-byte hash): this bounds that memory
# A row is a few settings and two prompts of at most MAX_PROMPT_CHARS: a longer line (or CSV row over several lines)
# is refused as that row's error, and is never held in memory whole.
MAX_ROW_CHARS = 1_000_000
_SKIP_CHARS = 1 << 16  # the rest of a line too long is read past in pieces of this size
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of bytes that are not UTF-8


class _Unreadable(Exception):
    """One row that cannot be read (too long, not UTF-8); reading goes on at the next line."""


class _Lines:
    """A text file's lines, each at most MAX_ROW_CHARS long (the rest of a longer one is skipped unread) and UTF-8;
    a bad line raises _Unreadable once. `row_chars` counts the characters since the caller last set it to 0: a CSV
    row over several lines is bounded too."""

    def __init__(self, f: TextIO):
        self.f, self.number, self.row_chars = f, 0, 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.f.readline(MAX_ROW_CHARS + 1)
        if not line:
            raise StopIteration
        self.number += 1
        self.row_chars += len(line)
        if len(line) > MAX_ROW_CHARS and line[-1] not in "\r\n":
            while (rest := self.f.readline(_SKIP_CHARS)) and rest[-1] not in "\r\n":
                pass
            raise _Unreadable(f"longer than {MAX_ROW_CHARS} characters")
        if self.row_chars > MAX_ROW_CHARS:
            raise _Unreadable(f"a row longer than {MAX_ROW_CHARS} characters")
        if _NOT_UTF8.search(line):
            raise _Unreadable("not UTF-8 text")
        return line


def _json_rows(lines: _Lines) -> Iterator[dict[str, object] | str]:
    while True:
        lines.row_chars = 0
        try:
            line = next(lines)
        except StopIteration:
            return
        except _Unreadable as e:
            yield f"line {lines.number} is {e}"
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield f"line {lines.number} is not JSON: {e.msg}"
            continue
        except RecursionError:
            yield f"line {lines.number} is not a row: its JSON is nested too deeply"
            continue
        except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
            yield f"line {lines.number} holds a number too long to read"
            continue
        yield row if isinstance(row, dict) else f"line {lines.number} is not a JSON object"


def _csv_rows(lines: _Lines, reader, header: list[str]) -> Iterator[dict[str, object] | str]:
    while True:
        lines.row_chars = 0
        try:
            cells = next(reader)
        except StopIteration:
            return
        except _Unreadable as e:
            yield f"line {lines.number} is {e}"
            continue
        except csv.Error as e:  # a cell over csv.field_size_limit(); the reader goes on at the next line
            yield f"line {lines.number} cannot be read as CSV: {e}"
            continue
        if cells:  # a blank line is no row
            yield dict(zip(header, cells))  # cells past the header's are dropped; missing ones take the default


def iter_rows(path: str | Path) -> Iterator[dict[str, object] | str]:
    """The file's rows as dicts, one at a time: CSV (.csv, .tsv, with a header row) or JSON Lines (.jsonl, .json:
    one object per line). A row that cannot be read is a string saying why. The file is opened and its header
    read now (InputError if that fails); the rows as they are asked for."""
    path, suffix = Path(path), Path(path).suffix.lower()
    if suffix not in JSON_SUFFIXES + CSV_SUFFIXES:
        raise InputError(f"jobs file {path}: give a .csv, .tsv or .jsonl file (got {suffix or 'no extension'})")
    try:  # undecodable bytes become lone surrogates, which _Lines turns into that row's error
        f = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="" if suffix in CSV_SUFFIXES else None)
    except FileNotFoundError:
        raise InputError(f"jobs file {path} does not exist") from None
    except OSError as e:
        raise InputError(f"jobs file {path} cannot be read: {e.strerror}") from None
    lines = _Lines(f)
    if suffix in JSON_SUFFIXES:
        return _bounded(f, lines, _json_rows(lines))
    reader = csv.reader(lines, delimiter="\t" if suffix == ".tsv" else ",")
    try:
        header = [h.strip() for h in next(reader, [])]
    except (csv.Error, _Unreadable) as e:
        f.close()
        raise InputError(f"jobs file {path}: its header row cannot be read ({e})") from None
    if not any(header):
        f.close()
        raise InputError(f"jobs file {path} has no header row (e.g. hint,controlnet,prompt,seed)")
    return _bounded(f, lines, _csv_rows(lines, reader, header))


def _bounded(f: TextIO, lines: _Lines, rows: Iterator[dict[str, object] | str]) -> Iterator[dict[str, object] | str]:
    """At most MAX_ROWS rows, then one saying where reading stopped; the file is closed at the end."""
    with f:
        for n, row in enumerate(rows):
            if n == MAX_ROWS:
                yield f"line {lines.number} and later are not read: at most {MAX_ROWS} rows per jobs file; split it"
                return
            yield row
