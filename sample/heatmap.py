"""DAAM-style word heat maps (Tang et al. 2023, "What the DAAM: Interpreting Stable Diffusion Using Cross
Attention", Sec. 3): a word's cross-attention probabilities, summed over heads, layers and denoising steps,
each layer's map upsampled to the image size first, then normalised to [0, 1] and overlaid on the image."""

from __future__ import annotations

import numpy as np
from PIL import Image


def word_token_indices(tokenizer, prompt: str, word: str, max_length: int = 77) -> list[int]:
    """Positions of ``word``'s BPE tokens in the tokenized prompt (BOS at 0), first occurrence
    (:func:`jaxdiff.steer.relation_maps.word_span`). A word may span several tokens (e.g. "skateboard" ->
    "skate", "board</w>"); DAAM sums their maps. Raises ValueError if absent."""
    from jaxdiff.steer.relation_maps import WordNotInPromptError, word_span

    try:
        return word_span(tokenizer, prompt, word, max_length=max_length)
    except WordNotInPromptError:
        raise ValueError(f"--heatmap word {word!r} does not occur in the prompt {prompt!r}") from None


def resize_map(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of one float32 (h, w) map (PIL mode "F": no 8-bit quantisation)."""
    return np.asarray(Image.fromarray(np.asarray(m, np.float32), mode="F").resize((width, height), Image.BICUBIC))


def word_heatmap(grids: list[np.ndarray], token_indices: list[int], height: int, width: int) -> np.ndarray:
    """Sum of the word's maps over layers: ``grids`` holds one (h_l, w_l, K) array of attention probabilities
    per layer (already summed over steps and averaged over heads). Returns (height, width) in [0, 1]."""
    heat = np.zeros((height, width), np.float32)
    for g in grids:
        heat += resize_map(np.asarray(g)[..., token_indices].sum(-1), height, width)
    heat = np.maximum(heat, 0)   # bicubic overshoot
    return heat / heat.max() if heat.max() > 0 else heat


def overlay(image_u8: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend a [0, 1] heat map over an RGB uint8 image with a black-red-yellow colour ramp."""
    if heat.shape != image_u8.shape[:2]:
        heat = np.clip(resize_map(heat, *image_u8.shape[:2]), 0, 1)
    ramp = np.stack([np.clip(3 * heat, 0, 1), np.clip(3 * heat - 1, 0, 1), np.clip(3 * heat - 2, 0, 1)], -1) * 255
    a = alpha * heat[..., None]
    return (image_u8 * (1 - a) + ramp * a).clip(0, 255).round().astype(np.uint8)
