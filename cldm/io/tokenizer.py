"""The SD1.5 CLIP tokenizer, built offline from the BPE vocabulary that the open-clip-torch wheel ships, and the
check that refuses a tokenizer with no real vocabulary."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from cldm.errors import MissingWeightsError

# The real SD1.5 tokenizer: 256 byte symbols, the same with "</w>", 48894 merges, 2 specials.
CLIP_VOCAB_SIZE = 49408
CLIP_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 on."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return [chr(c) for c in chars]


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cldm" / "clip-vit-large-patch14-tokenizer"


def clip_tokenizer(cache_dir: str | os.PathLike | None = None, pad_token: str = "<|endoftext|>"):
    """The CLIP tokenizer of SD1.5 (and of SDXL's first encoder), built offline from the BPE vocabulary that the
    open-clip-torch wheel ships. The OpenCLIP encoders (SD2's, SDXL's second) pad with "!" (id 0) instead of the end
    token: `pad_token` says which (the family's `text_pads`)."""
    from transformers import CLIPTokenizer

    folder = Path(cache_dir) if cache_dir else _default_cache()
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_file.exists() and merges_file.exists()):
        try:
            import open_clip
        except ImportError as e:  # pragma: no cover - it is in requirements.txt
            raise MissingWeightsError(
                "The CLIP tokenizer needs the open-clip-torch package: pip install open-clip-torch"
            ) from e
        bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
        lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")
        merges = lines[1 : CLIP_MERGES + 1]
        alphabet = bytes_to_unicode()
        tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".tmp-{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        os.replace(tmp / "vocab.json", vocab_file)
        os.replace(tmp / "merges.txt", merges_file)
        tmp.rmdir()
    tok = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=77)
    check_tokenizer(tok, CLIP_VOCAB_SIZE)
    return tok


def check_tokenizer(tok, expected_size: int | None = None) -> None:
    """Refuse the degenerate tokenizer that transformers returns when nothing is cached (it maps every word to one id)."""
    size = len(tok)
    if size < 10 or (expected_size is not None and size != expected_size):
        raise MissingWeightsError(
            f"The CLIP tokenizer has {size} entries (expected {expected_size or 'a real vocabulary'}): "
            "its files are missing or broken. Point --base at a folder with tokenizer/vocab.json and merges.txt."
        )
