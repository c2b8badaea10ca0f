"""A tiny CLIP tokenizer whose words are the shapes captions' words, for the small text encoder.

It is a real `transformers.CLIPTokenizer` (byte-level BPE, "</w>" word ends, the CLIP specials), so TextEncoder,
`save_pretrained` and diffusers-format folders work with it unchanged. Its vocabulary is
    the 256 byte symbols, the same 256 with "</w>", the merged symbols, <|startoftext|>, <|endoftext|>
and its merges are learned here by plain BPE on CAPTION_WORDS until every caption word is ONE token. The byte
symbols keep any other text encodable (a user may type anything into the app): it comes out as letters the model
never saw, not as an error. Everything is derived from shapes.CAPTION_WORDS, so the tokenizer cannot drift from the
data; `save_pretrained()` writes it into a folder (tokenizer.json) that `CLIPTokenizer.from_pretrained` reads.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

from cldm.io.tokenizer import bytes_to_unicode
from cldm.training.shapes import CAPTION_WORDS

END_OF_WORD = "</w>"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 32  # the demo text encoder's context: the longest caption is 21 tokens with BOS/EOS (CLIP: 77)


def _symbols(word: str) -> tuple[str, ...]:
    return (*word[:-1], word[-1] + END_OF_WORD)


def learn_merges(words: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """BPE merges that build every word into one symbol: the most frequent pair first, ties by the pair itself.

    Encoding applies merges in this order, so it retraces exactly the segmentation seen here.
    """
    corpus = {w: _symbols(w) for w in dict.fromkeys(words)}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for syms in corpus.values() for p in zip(syms[:-1], syms[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, syms in corpus.items():
            out: list[str] = []
            i = 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            corpus[w] = tuple(out)


def vocabulary(words: tuple[str, ...] | list[str] = CAPTION_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges) for the given words; the ids of the byte symbols are the same as CLIP's."""
    alphabet = bytes_to_unicode()
    merges = learn_merges(words)
    tokens = alphabet + [a + END_OF_WORD for a in alphabet]
    tokens += [a + b for a, b in merges if a + b not in tokens]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


@lru_cache(maxsize=1)
def _cached():
    return vocabulary()


def shapes_tokenizer():
    """The CLIPTokenizer for the shapes captions (a new instance each call; building it takes milliseconds)."""
    from transformers import CLIPTokenizer

    vocab, merges = _cached()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=MAX_LENGTH,
    )


def vocab_size() -> int:
    return len(_cached()[0])
