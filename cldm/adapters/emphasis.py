"""A1111's prompt emphasis: `(word)`, `(word:1.3)`, `[word]`, backslash escapes and `BREAK`.

The rules, as A1111's `modules/prompt_parser.py` (parse_prompt_attention) and `sd_hijack_clip.py` apply them:
- `(text)` multiplies the weight of its text by 1.1, `[text]` divides it by 1.1; they nest, so `((text))` is 1.21.
- `(text:w)` multiplies it by w instead (`(text:0.5)` halves it).
- A bracket left open at the end applies to everything after it; a closing bracket with no opening one is text.
- `\\(`, `\\)`, `\\[`, `\\]` are literal brackets, `\\\\` a literal backslash.
- `BREAK` (a word of its own, upper case) ends the current 75-token chunk: what follows starts a new one.
- Neighbouring pieces of equal weight are joined, so a prompt with no brackets is one piece of weight 1 and is
  tokenized exactly as before.
- Encoding: each token's hidden state is multiplied by its weight, then the whole chunk is rescaled so that its mean
  is what it was before the weights (`z * w`, then `* (mean before / mean after)`).
"""

from __future__ import annotations

import re

import torch

from cldm.errors import InputError

BREAK = "BREAK"
MAX_PROMPT_CHARS = 10_000  # the longest prompt (LoRA tags included) any parser here takes: about 30 chunks of 75 tokens
EMPHASIS = 1.1
# The largest weight a piece may come to. Prompts weigh words 0.5..1.5, rarely past 2; 48 nested or unclosed brackets
# pass 100, and 9985 unclosed ones make 1.1 ** 9985 = inf, which the chunk's rescale turns into a NaN picture.
MAX_WEIGHT = 100.0
# one token of the prompt's syntax: an escape, a bracket, ":weight)", a run of plain text, or a lone colon
_TOKEN = re.compile(
    r"\\[()\[\]\\]"  # escaped bracket or backslash
    r"|\\"  # a lone backslash
    r"|\(|\["  # opening brackets
    r"|:\s*([+-]?[.\d]+)\s*\)"  # ":1.3)" closes a round bracket with a weight
    r"|\)|\]"  # closing brackets
    r"|[^\\()\[\]:]+"  # plain text
    r"|:"
)
_BREAK = re.compile(r"\bBREAK\b")  # the spaces around it go too (stripped: a regex \s*...\s* is quadratic)
COMMA_BACKTRACK = 20  # A1111: a full chunk moves its words after the last comma, if at most this many, to the next


def parse(text: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) pieces; a BREAK is the piece ("BREAK", -1)."""
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            pieces.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(pieces))
        elif tok == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            try:
                scale(round_open.pop(), float(weight))
            except ValueError:  # "1.2.3": not a number, so the piece is text
                pieces.append([tok, 1.0])
        elif tok == ")" and round_open:
            scale(round_open.pop(), EMPHASIS)
        elif tok == "]" and square_open:
            scale(square_open.pop(), 1 / EMPHASIS)
        else:
            parts = _BREAK.split(tok)
            for i, part in enumerate(parts):
                if i > 0:
                    pieces.append([BREAK, -1.0])
                    part = part.lstrip()
                pieces.append([part.rstrip() if i < len(parts) - 1 else part, 1.0])
    for start in round_open:
        scale(start, EMPHASIS)
    for start in square_open:
        scale(start, 1 / EMPHASIS)
    if not pieces:
        return [("", 1.0)]
    for text_, weight in pieces:
        if not abs(weight) <= MAX_WEIGHT:  # inf and NaN too
            raise InputError(
                f'The emphasis on "{text_.strip()[:40]}" comes to {weight:.3g}; at most {MAX_WEIGHT:g}. Each "(" left '
                'open multiplies the rest of the prompt by 1.1: close it with ")", or write \\( for a bracket.'
            )
    merged: list[list] = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1] and piece[1] != -1.0:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


def is_plain(pieces: list[tuple[str, float]]) -> bool:
    """One piece of weight 1: no emphasis, no BREAK (the prompt encodes exactly as it did before emphasis existed)."""
    return len(pieces) == 1 and pieces[0][1] == 1.0


def chunked(
    pieces: list[tuple[str, float]], tokenize, per_chunk: int, comma: int | None = None
) -> list[tuple[list, list[float]]]:
    """(tokens, weights) of each chunk of at most `per_chunk` prompt tokens, by A1111's rules: BREAK closes a chunk
    (a chunk left empty at the end is dropped); a full chunk whose last comma is at most COMMA_BACKTRACK tokens from
    its end moves the words after that comma to the next chunk (`comma`: the comma's token id).

    `tokenize(text)` gives token ids, and (n, width) tensors for embeddings: their n rows stay in one chunk."""
    chunks: list[tuple[list, list[float]]] = [([], [])]
    last_comma = -1

    def next_chunk(backtrack: bool = False) -> None:
        nonlocal last_comma
        ids, ws = chunks[-1]
        if backtrack and len(ids) == per_chunk and last_comma >= 0 and len(ids) - last_comma <= COMMA_BACKTRACK:
            cut = last_comma + 1
            chunks[-1] = (ids[:cut], ws[:cut])
            chunks.append((ids[cut:], ws[cut:]))
        else:
            chunks.append(([], []))
        last_comma = -1

    for text, weight in pieces:
        if weight == -1.0:  # BREAK
            next_chunk()
            continue
        for token in tokenize(text):
            rows = list(token) if isinstance(token, torch.Tensor) else [token]
            if len(chunks[-1][0]) + len(rows) > per_chunk and chunks[-1][0]:
                next_chunk()
            for row in rows:
                is_comma = comma is not None and not isinstance(row, torch.Tensor) and row == comma
                if len(chunks[-1][0]) == per_chunk:
                    next_chunk(backtrack=not is_comma and len(rows) == 1)
                if is_comma:
                    last_comma = len(chunks[-1][0])
                chunks[-1][0].append(row)
                chunks[-1][1].append(weight)
    if len(chunks) > 1 and not chunks[-1][0]:
        chunks.pop()
    return chunks


def apply(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Hidden states (tokens, width) of one chunk times their weights (tokens,), rescaled to the chunk's old mean."""
    before = z.float().mean()
    out = z.float() * weights[:, None].to(z.device, torch.float32)
    after = out.mean()
    return (out * (before / after)).to(z.dtype)
