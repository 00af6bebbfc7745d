"""Build a small CLIP-BPE-compatible vocabulary (``vocab.json`` + ``merges.txt``) for a closed word list.

Real SD checkpoints ship OpenAI CLIP's 49,408-token vocabulary. Models this project builds itself (tests, the
demo, the embedded default model) need a vocabulary that transformers' ``CLIPTokenizer`` reads like the real one
but is tiny. The layout is CLIP's: the 256 byte symbols, the same with the end-of-word marker ``</w>``, one entry
per BPE merge, then ``<|startoftext|>`` and ``<|endoftext|>``. Merges are chosen so that every listed word is a
single token; any other text still tokenizes (into bytes), as with CLIP.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _symbols(word: str) -> list[str]:
    enc = bytes_to_unicode()
    chars = [enc[b] for b in word.encode("utf-8")]
    chars[-1] += "</w>"
    return chars


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE: repeatedly merge the adjacent pair with the lowest rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def build_merges(words) -> list[tuple[str, str]]:
    """Merges making each word one token. New merges are appended (highest rank), and a word once merged has
    no pairs left, so later additions never change how earlier words tokenize."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        symbols = _apply_bpe(_symbols(word), ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = _apply_bpe(symbols, ranks)
    return merges


def write_clip_vocab(folder: str | Path, words, model_max_length: int = 77, pad_token: str = EOS) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and a ``tokenizer_config.json`` for ``CLIPTokenizer.from_pretrained``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = build_merges(words)
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "bos_token": BOS,
        "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token, "do_lower_case": True}, indent=2))
    return folder
