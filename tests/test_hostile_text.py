"""Issue 24, hostile text: every pattern run on what a user sends (prompts, LoRA tags, a PNG's parameters) takes time
linear in its length, or a length check refuses the text first; prompts may not weigh a word to infinity nor take
unbounded 75-token chunks; LoRA tags count in the prompt's length and are capped; damaged LoRA files are named.

The hostile inputs are sizes where the old code ran for minutes (or hours) and the new one takes milliseconds: each
runs under a deadline far above the new time, so a slow machine cannot make them fail and the old code cannot pass.
"""

from __future__ import annotations

import json
import random
import re
import signal
import struct
import zlib
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from cldm.adapters import emphasis, lora
from cldm.adapters.emphasis import MAX_PROMPT_CHARS
from cldm.adapters.lora import MAX_REQUEST_LORAS
from cldm.errors import InputError
from cldm.io import files
from cldm.pipeline import infotext, key_values, prompts
from cldm.pipeline.request import GenerationRequest, LoraUnit

DEADLINE_S = 5.0  # the new code takes milliseconds on every input here; the old one took minutes


@contextmanager
def deadline(seconds: float = DEADLINE_S):
    """Fail the block when it runs longer than `seconds` (the regex engine checks for signals as it runs)."""

    def expire(signum, frame):
        raise TimeoutError(f"took over {seconds:g} s: the time grows faster than the input")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------ LoRA tags
def test_the_tag_clean_up_is_linear_in_runs_of_spaces(monkeypatch):
    """A prompt with a long run of spaces before a comma: the clean-up's `\\s*,` was tried again at every position
    of the run, so its time grew with the run's length squared (issue 24: 7.4 s at 90,000 spaces)."""
    monkeypatch.setattr(lora, "MAX_PROMPT_CHARS", 10**7, raising=False)  # the patterns themselves, past the limit
    with deadline():
        clean, tags = lora.prompt_tags("a" + " " * 1_000_000 + ",blue circle <lora:red:1>")
        assert (clean, tags) == ("a,blue circle", [("red", 1.0, 1.0)])
        lora.prompt_tags("<lora:" * 200_000)  # each try of the tag pattern scanned to the end of the prompt
        lora.prompt_tags("<lora:x>," + " " * 1_000_000 + "x")


def test_the_prompt_limit_counts_the_lora_tags():
    """4000 x <lora:red:0.01> (60 KB) was accepted, the tags taken out before the 10,000-character check."""
    with pytest.raises(InputError, match=rf"60000 characters long \(LoRA tags included\); at most {MAX_PROMPT_CHARS}"):
        lora.prompt_tags("<lora:red:0.01>" * 4000)
    with deadline(), pytest.raises(InputError, match="characters long"):
        lora.prompt_tags("a" + " " * 1_000_000 + ",blue circle <lora:red:1>")  # refused before any pattern runs


def test_a_repeated_lora_is_one_merge_and_distinct_ones_are_capped():
    """A name given twice is one LoRA with the weights added (each its own: the UNet's and the text encoder's), so
    660 tags of one LoRA inside the length limit cost one merge; more than MAX_REQUEST_LORAS names are refused."""
    assert lora.prompt_tags("<lora:a:0.5> x, <lora:b> <lora:a:0.25:0.125>") == (
        "x",
        [("a", 0.625, 0.75), ("b", 1.0, 1.0)],
    )
    assert lora.prompt_tags("<lora:red:0.01>" * 660)[1] == [("red", pytest.approx(6.6), pytest.approx(6.6))]
    names = " ".join(f"<lora:l{i}>" for i in range(MAX_REQUEST_LORAS + 1))
    with pytest.raises(InputError, match=rf"names {MAX_REQUEST_LORAS + 1} LoRAs; at most {MAX_REQUEST_LORAS}"):
        lora.prompt_tags(names)
    units = tuple(LoraUnit(f"l{i}.safetensors", 0.1) for i in range(MAX_REQUEST_LORAS + 1))
    with pytest.raises(InputError, match=rf"at most {MAX_REQUEST_LORAS} LoRAs per request \(got 17\)"):
        GenerationRequest("a", units=(), loras=units).validate()


def test_the_studio_refuses_a_long_prompt_before_any_work(tmp_path):
    from studio.service import Studio
    from studio.settings import Settings

    manager = type("M", (), {"device": torch.device("cpu"), "base_path": "sd"})()
    studio = Studio(manager, str(tmp_path), str(tmp_path / "out"))
    studio.check_work([], Settings(prompt="<lora:red:0.01>" * 600))  # 9,000 characters: allowed
    for field in ("prompt", "added_prompt", "negative_prompt"):
        with pytest.raises(InputError, match=rf"60000 characters long, tags included; at most {MAX_PROMPT_CHARS}"):
            studio.check_work([], replace(Settings(), **{field: "<lora:red:0.01>" * 4000}))


# ------------------------------------------------------------------------------------ PNG parameters text
HEAD = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, "


@pytest.mark.parametrize(
    "text",
    [
        HEAD + 'ControlNet 0: "' + " " * 1000 + '"',  # 107 s before; it grew like the length ** 3.5
        HEAD + 'ControlNet 0: "' + " " * 25_000 + '"',
        HEAD + "ControlNet 0: " + json.dumps("Model: a" + " " * 29_000 + "x"),  # the model's " [hash]" pattern
        HEAD + "ab " * 9_000,  # a key pattern tried at every word
        HEAD + "a-" * 14_000,
    ],
    ids=["unit-spaces-1000", "unit-spaces-25000", "model-spaces", "words", "dashes"],
)
def test_hostile_parameters_texts_are_read_in_linear_time(text):
    with deadline():
        info = infotext.parse_parameters(text)
    assert info.prompt == "a cat" and info.steps == 20


def test_the_longest_parameters_this_app_writes_are_read_back():
    """Two prompts at the length limit, of the characters the patterns care about (quotes, backslashes, colons,
    brackets, commas, runs of spaces), written by `parameters` and read back whole: the old 12,000-character cap
    refused what the app itself wrote."""
    from cldm.pipeline.stages import parameters

    rng = random.Random(7)
    prompt, negative = ("".join(rng.choice('a (b:1.2) \\"c", :: ((d)) [e]  ') for _ in range(MAX_PROMPT_CHARS))
                        for _ in range(2))  # fmt: skip
    prompt, negative = "x" + prompt[2:] + "x", "y" + negative[2:] + "y"  # nothing stripped at the ends
    request = GenerationRequest(prompt, negative, units=(), emphasis=False)
    model = SimpleNamespace(source="models/sd15.safetensors", native_size=512)  # all `parameters` reads of a model here
    with deadline():
        info = infotext.parse_parameters(parameters(model, request))
    assert (info.prompt, info.negative_prompt, info.steps, info.seed) == (prompt, negative, 20, request.seed)


def test_a_parameters_text_over_the_cap_is_refused_with_what_to_do():
    with deadline(), pytest.raises(InputError, match=r"1000000 characters long; at most \d+ are read .*Use a PNG"):
        infotext.parse_parameters("x" * 1_000_000)


# A1111's patterns, which the scanners must agree with (findall on the key-value line and on a unit's text).
A1111_FIELD = re.compile(r'\s*(\w[\w /-]+):\s*("(?:[^"\\]|\\.)+"|[^,]*)(?:,|$)')
A1111_UNIT_PAIR = re.compile(r'\s*([^:,]+?)\s*:\s*(\([^()]*\)|"(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)')
A1111_HASH = re.compile(r"\s*\[[0-9A-Za-z]+\]$")


def test_the_linear_scanners_read_what_a1111s_patterns_read():
    """On random short texts of the characters that matter (spaces, tabs, newlines, quotes, backslashes, colons,
    commas, brackets, key characters, a non-ASCII letter), the pairs are exactly those of A1111's patterns."""
    rng = random.Random(24)
    alphabet = list('ab :,"\\-/()\t\n[]é_1') + [" ", "a", ":", ","]
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        line = text.replace("\n", "")  # the key-value line is one line
        assert key_values.line_pairs(line) == A1111_FIELD.findall(line), repr(line)
        assert key_values.unit_pairs(text) == A1111_UNIT_PAIR.findall(text), repr(text)
        assert infotext._HASH.sub("", text) == A1111_HASH.sub("", text), repr(text)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_png_info_reads_the_text_of_a_picture_claiming_20000x20000():
    """Only the text chunks are read, never the pixels: a header's huge size is no reason to refuse (it answered
    "Internal error (DecompressionBombError)")."""
    from cldm.io.images import read_parameters

    text = HEAD + "Seed: 1"
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
            + _chunk(b"tEXt", b"parameters\0" + text.encode("latin-1")) + _chunk(b"IDAT", zlib.compress(b""))
            + _chunk(b"IEND", b""))  # fmt: skip
    assert read_parameters(data) == text and infotext.parse_parameters(text).seed == 1
    with pytest.raises(InputError, match="Cannot read the picture"):
        read_parameters(data[:40])  # cut inside the text chunk


# ----------------------------------------------------------------------------------------------- emphasis
def test_unclosed_brackets_cannot_weigh_a_word_to_infinity():
    """9985 open brackets, then words: each multiplies what follows by 1.1, 1.1 ** 9985 = inf, and the chunk's
    rescale made the picture NaN. The weight is refused with what to do, by the request check before any model
    runs."""
    with deadline(), pytest.raises(InputError, match=r'emphasis on "a cat" comes to inf; at most 100.*close it'):
        emphasis.parse("(" * 9985 + "a cat")
    with pytest.raises(InputError, match="prompt: The emphasis"):
        GenerationRequest("(" * 9985 + "a cat", units=()).validate()
    with pytest.raises(InputError, match=r"negative_prompt: The emphasis on .ugly. comes to 1e\+06"):
        GenerationRequest("a", "(ugly:1000000)", units=()).validate()
    assert emphasis.parse("(" * 48 + "a") == [("a", pytest.approx(1.1**48))]  # 97: still allowed
    GenerationRequest("(" * 9985 + "a cat", units=(), emphasis=False).validate()  # taken literally: no weights


def test_a_prompt_may_take_at_most_max_chunks(ours):
    """BREAK x 1663 made 1663 chunks of 77 tokens (a 13-18x slower picture); the text encoder refuses past
    MAX_CHUNKS, with how many there were."""
    from cldm.pipeline.prompts import MAX_CHUNKS

    text = ours[0].text
    assert prompts.weighted_chunks(text, ["a BREAK " * (MAX_CHUNKS - 1) + "a"])[0].shape[1] == MAX_CHUNKS
    with pytest.raises(InputError, match=rf"A prompt is 1663 chunks .*at most {MAX_CHUNKS}.*fewer BREAKs"):
        prompts.encode(text, ["a", "BREAK " * 1663])


# ---------------------------------------------------------------------------------------- damaged LoRA files
def _read_back(state: dict, tmp_path, name: str) -> dict:
    """The state dict written as a .safetensors file and read as the manager reads one."""
    from safetensors.torch import save_file

    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return files.read_file(path)


def test_a_rank_0_lora_is_named_as_damaged(ours, tmp_path):
    """A rank-0 file (down 0 x n, up n x 0) answered "Internal error (ZeroDivisionError)"."""
    from tiny import lora_state

    sd = ours[0]
    state = _read_back(lora_state(sd, rank=0), tmp_path, "empty_rank")
    with pytest.raises(InputError, match=r"empty_rank: layer lora_\w+ is damaged \(up \(\d+, 0.* x down \(0, "):
        lora.parse(state, sd, "empty_rank")


def test_an_absurd_alpha_is_refused_when_read(ours, tmp_path):
    """alpha 1e30 on a rank-4 layer: a scale of 2.5e29, which merged to weights that made every picture NaN."""
    from tiny import lora_state

    sd = ours[0]
    state = lora_state(sd)
    state[next(k for k in state if k.endswith(".alpha"))] = torch.tensor(1e30)
    with pytest.raises(InputError, match=r"huge_alpha: layer lora_\w+ has alpha 1e\+30 for rank 4 .*damaged"):
        lora.parse(_read_back(state, tmp_path, "huge_alpha"), sd, "huge_alpha")


def test_a_merge_that_overflows_is_refused_and_the_base_restored_exactly(ours, tmp_path):
    """Finite values whose product overflows float32 (1e20 x 1e20): the merge is refused, naming the LoRA, and
    every weight is put back bit for bit."""
    from tiny import lora_state

    sd = ours[0]
    state = lora_state(sd)
    last = [k for k in state if k.endswith(".lora_up.weight")][-1]  # the last layer: every other one merged first
    state[last] = torch.full_like(state[last], 1e20)
    state[last.replace("lora_up", "lora_down")] = torch.full_like(state[last.replace("lora_up", "lora_down")], 1e20)
    bad = lora.parse(_read_back(state, tmp_path, "overflow"), sd, "overflow")
    good = lora.parse(lora_state(sd, seed=1), sd, "fine")
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (sd.unet, sd.text)]
    with pytest.raises(InputError, match=r"LoRA overflow at weight 0.5 makes the .* infinite, NaN or past 65504"):
        lora.apply(sd, [(good, 1.0), (bad, 0.5)])
    for old, module in zip(before, (sd.unet, sd.text)):
        assert all(torch.equal(old[k], v) for k, v in module.state_dict().items())
