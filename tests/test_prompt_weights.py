"""A1111's prompt emphasis: the parser on A1111's documented examples, and the mean-restoring rule in the encoder."""

from __future__ import annotations

import pytest
import torch

from cldm.adapters.emphasis import parse
from cldm.pipeline import prompts

# A1111's documented examples (modules/prompt_parser.py, parse_prompt_attention), as (prompt, pieces)
EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),  # fmt: skip
    ("[faded]", [("faded", 1 / 1.1)]),
    ("(a:1.2) BREAK b", [("a", 1.2), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),  # A1111 keeps the empty piece
    ("one BREAK two", [("one", 1.0), ("BREAK", -1.0), ("two", 1.0)]),
    ("a : b) c]", [("a : b) c]", 1.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("prompt, pieces", EXAMPLES)
def test_parser_follows_a1111(prompt, pieces):
    got = parse(prompt)
    assert [t for t, _ in got] == [t for t, _ in pieces]
    assert [w for _, w in got] == pytest.approx([w for _, w in pieces])


def test_encoder_applies_weights_and_restores_the_mean(ours):
    sd, _ = ours
    text = sd.text
    plain = prompts.encode(text, ["a red house"])
    literal = prompts.encode(text, ["a red house"], emphasis=False)
    assert torch.equal(plain, literal)  # no syntax: exactly as before
    ids, weights, _ = prompts.weighted_chunks(text, ["a (red:1.5) house"])
    plain_ids, none, _ = prompts.weighted_chunks(text, ["a red house"])
    assert none is None and torch.equal(ids, plain_ids)  # the same tokens, with weights
    red = weights[0, 0] == 1.5
    assert int(red.sum()) == len(prompts.tokenize(text, "red"))
    z = text(plain_ids[0], 1)[0]  # the unweighted hidden states (77, width)
    expected = z * weights[0, 0][:, None]
    expected = expected * (z.mean() / expected.mean())
    got = prompts.encode(text, ["a (red:1.5) house"])[0]
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.mean(), z.mean(), atol=1e-6) and not torch.allclose(got, z)


def test_break_starts_a_new_chunk(ours):
    text = ours[0].text
    n = text.cfg.max_length
    assert prompts.encode(text, ["a house"]).shape[1] == n
    both = prompts.encode(text, ["a house BREAK a tree"])
    assert both.shape[1] == 2 * n
    first = prompts.encode(text, ["a house"])
    assert torch.allclose(both[:, :n], first, atol=1e-6)  # the chunk before BREAK is "a house" alone


def test_a1111_chunking_rules(ours):
    """A1111's chunks: a trailing BREAK adds no chunk; a full chunk moves the words after its last comma (at most 20
    tokens back) to the next chunk."""
    text = ours[0].text
    per = prompts.chunk_tokens(text)
    assert prompts.weighted_chunks(text, ["a cat BREAK"])[0].shape[1] == 1
    assert prompts.weighted_chunks(text, ["BREAK"])[0].shape[1] == 1
    assert prompts.weighted_chunks(text, ["a BREAK BREAK b"])[0].shape[1] == 3
    one = len(prompts.tokenize(text, "ab"))
    words = [f"ab{'c' * (i % 3)}" for i in range(200)]  # no commas: cut at exactly `per` tokens
    ids = prompts.weighted_chunks(text, [" ".join(words) + " (x:1.1)"])[0]
    assert (ids[0, 0, 1 : 1 + per] != text.tokenizer.pad_token_id).all()
    comma = text.tokenizer.get_vocab()[",</w>"]
    prompt = ", ".join(["ab"] * 60)  # "ab , ab , ...": a comma every one + `one` tokens
    ids = prompts.weighted_chunks(text, [prompt])[0]
    first = ids[0, 0, 1 : 1 + per].tolist()
    filled = [t for t in first if t != text.tokenizer.pad_token_id]
    assert filled[-1] == comma and len(filled) <= per and len(filled) > per - 20 - one  # cut after a comma
    assert parse("a" + " " * 5 + "BREAK" + " " * 5 + "b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
