"""CLIP tokenizer wrapper: transformers' ``CLIPTokenizer`` loaded from a folder, padded to 77 like the SD pipelines.

Never builds ``CLIPTokenizer(vocab_file=..., merges_file=...)``: transformers 5 silently ignores those files.
Imports no torch.
"""

from __future__ import annotations

import os

from pathlib import Path

import numpy as np


class TokenizerError(ValueError):
    """A tokenizer folder is missing or has no vocabulary."""


class PromptTooLongError(ValueError):
    """A prompt needs more tokens than ``max_length`` (and truncation was not asked for)."""


def load_tokenizer(folder, model_max_length: int = 77):
    """``CLIPTokenizer.from_pretrained(folder)`` for a folder with ``vocab.json`` + ``merges.txt`` or ``tokenizer.json``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder {str(folder)!r} does not exist")
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        raise TokenizerError(f"tokenizer folder {str(folder)!r} has no vocabulary "
                             "(needs vocab.json + merges.txt, or tokenizer.json)")
    # transformers announces "PyTorch was not found" at import (an advisory warning): noise to a JAX user, who
    # only needs its tokenizer. A caller's own setting of the variable wins.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)
    except Exception as e:  # noqa: BLE001 - re-raised with the folder named
        raise TokenizerError(f"could not load a CLIP tokenizer from {str(folder)!r}: {e}") from e


def tokenize(tokenizer, prompts, max_length: int = 77, truncate: bool = False) -> np.ndarray:
    """Prompts (str or list of str) -> ``np.int32`` (B, max_length), BOS ... EOS then the tokenizer's pad token."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not truncate:
        full = tokenizer(prompts, padding=False, truncation=False)["input_ids"]
        for p, ids in zip(prompts, full):
            if len(ids) > max_length:
                shown = p if len(p) <= 60 else p[:57] + "..."
                raise PromptTooLongError(f"prompt {shown!r} has {len(ids)} tokens (with BOS/EOS); the limit is "
                                         f"{max_length}. Shorten it or pass truncate=True.")
    out = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    return np.asarray(out, dtype=np.int32).reshape(len(prompts), max_length)
