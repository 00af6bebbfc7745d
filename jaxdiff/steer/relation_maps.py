"""Words -> tokens -> per-object cross-attention maps: the input of Learn-to-Steer's relation classifier.

Yiflach, Atzmon & Chechik, "Data-Driven Loss Functions for Inference-Time Optimization in Text-to-Image"
(WACV 2026), as specified in ../shared/docs/methods.md §4.1:

* **tokens**: an object word's positions in the tokenized prompt, BOS included in the count (the
  probabilities' key axis starts with BOS), first occurrence; a word spanning several BPE tokens is the mean of
  its tokens' maps. The second object is searched after the first one's span first (so "a red circle above a
  blue circle" gives the two circles distinct tokens), then anywhere.
* **maps**: every cross-attention site, every head, conditional rows only. Per object: the word's probability
  column (B, heads, Q) at each site, bilinearly resized to a common ``grid`` x ``grid`` (half-pixel centres, no
  antialiasing: PyTorch's ``interpolate(mode="bilinear", align_corners=False)``), then renormalised to sum 1.
* **channel order** (:func:`map_layout`, the one place it is defined): sites by ascending resolution; within a
  resolution down -> mid -> up, and in UNet order within each part; within a site, heads in order. A classifier
  stores this layout and is refused by a model with another one.

Token positions enter the compiled programs as a (B, 2, K) weight matrix (each row averages the word's
tokens), so new prompts and new object words never retrace.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.hooks import AttnSite, CaptureSpec
from jaxdiff.unet import attn_sites

Array = jax.Array
_PART_ORDER = {"down": 0, "mid": 1, "up": 2}


class WordNotInPromptError(ValueError):
    """An object word of a relation is not in the prompt (one-line message)."""


# ------------------------------------------------------------------------------------------------ tokens
def word_span(tokenizer, prompt: str, word: str, *, after: int = 0, max_length: int = 77) -> list[int]:
    """Positions of ``word``'s BPE tokens in ``prompt`` tokenized with BOS (position 0): the first occurrence
    starting at or after position ``after`` (>= 1), else the first one anywhere. Raises
    :class:`WordNotInPromptError` if the word does not occur."""
    word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt, max_length=max_length, truncation=True)["input_ids"]
    if not word_ids:
        raise WordNotInPromptError(f"object word {word!r} is empty after tokenization")
    n = len(word_ids)
    starts = [s for s in range(1, len(ids) - n + 1) if ids[s:s + n] == word_ids]
    if not starts:
        raise WordNotInPromptError(f"object word {word!r} does not occur in the prompt {prompt!r}")
    later = [s for s in starts if s >= after]
    s = later[0] if later else starts[0]
    return list(range(s, s + n))


def token_weights(tokenizer, prompt: str, words: tuple[str, str], max_length: int = 77) -> np.ndarray:
    """(2, max_length) float32: row j averages the tokens of ``words[j]`` (weights 1/n on its n tokens)."""
    w = np.zeros((2, max_length), np.float32)
    first = word_span(tokenizer, prompt, words[0], max_length=max_length)
    second = word_span(tokenizer, prompt, words[1], after=first[-1] + 1, max_length=max_length)
    for row, span in enumerate((first, second)):
        w[row, span] = 1.0 / len(span)
    return w


# ------------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class MapSite:
    """One cross-attention site's contribution to the classifier channels: ``heads`` maps of ``height`` x
    ``width`` queries."""
    site: AttnSite
    heads: int
    height: int
    width: int

    def to_json(self) -> dict:
        return {"site": self.site.path, "heads": self.heads, "height": self.height, "width": self.width}


@dataclass(frozen=True)
class MapLayout:
    """The channel layout of a model's per-object maps (see the module docstring for the order)."""
    sites: tuple[MapSite, ...]
    grid: int = 16

    @property
    def channels(self) -> int:
        return sum(s.heads for s in self.sites)

    @property
    def capture(self) -> CaptureSpec:
        """The per-call capture of every site, all heads."""
        return CaptureSpec.of(tuple(s.site for s in self.sites), mode="heads")

    def to_json(self) -> list[dict]:
        return [dict(s.to_json(), grid=self.grid) for s in self.sites]


def map_layout(unet_params: dict, config, latent_hw: tuple[int, int], context_dim: int | None = None,
               grid: int = 16) -> MapLayout:
    """The :class:`MapLayout` of a UNet at latent size ``latent_hw``: sites and heads read from the shapes of
    one abstract UNet call (``jax.eval_shape``, no compute), so any SD1/SD2/SDXL config is handled alike."""
    from jaxdiff.unet import apply_unet

    sites = tuple(s for s in attn_sites(config) if s.kind == "cross")
    h, w = latent_hw
    dim = context_dim or config.cross_attention_dim
    added = None
    if config.is_sdxl:
        added = {"text_embeds": jax.ShapeDtypeStruct((1, config.projection_class_embeddings_input_dim
                                                      - 6 * config.addition_time_embed_dim), jnp.float32),
                 "time_ids": jax.ShapeDtypeStruct((1, 6), jnp.float32)}
    cap = CaptureSpec.of(sites, mode="heads")
    aux = jax.eval_shape(lambda p, x, c, a: apply_unet(p, x, jnp.float32(500.0), c, config=config, capture=cap,
                                                        added_cond=a)[1],
                         unet_params, jax.ShapeDtypeStruct((1, h, w, config.in_channels), jnp.float32),
                         jax.ShapeDtypeStruct((1, 77, dim), jnp.float32), added)
    found = []
    for s in sites:
        _, heads, q, _ = aux["attn"][s].shape
        f = int(round(np.sqrt(h * w / q)))
        if (h // f) * (w // f) != q:
            raise ValueError(f"cannot infer the grid of {s}: {q} queries for latents {h}x{w}")
        found.append(MapSite(s, heads, h // f, w // f))
    order = sorted(range(len(found)), key=lambda k: (found[k].height * found[k].width,
                                                     _PART_ORDER[found[k].site.part], k))
    return MapLayout(tuple(found[k] for k in order), grid)


# ------------------------------------------------------------------------------------------------ maps
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) interpolation weights of PyTorch's bilinear ``align_corners=False`` along one axis:
    source coordinate ``(i + 0.5) * n_in / n_out - 0.5``, clamped at 0, neighbours clamped at the edge."""
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[i, i0] += 1.0 - frac
        m[i, i1] += frac
    return m.astype(np.float32)


def object_maps(probs: dict, layout: MapLayout, weights: Array, eps: float = 1e-12) -> Array:
    """Per-object classifier input from one UNet call's captured cross-attention probabilities.

    Args:
      probs: ``{site: (B, heads, Q, K)}`` (conditional rows), as captured with ``layout.capture``.
      weights: (B, 2, K) token weights (:func:`token_weights` per row).

    Returns:
      (B, 2, C, grid, grid) float32, C = ``layout.channels``, each map summing to 1.
    """
    weights = jnp.asarray(weights, jnp.float32)
    g = layout.grid
    out = []
    for ms in layout.sites:
        p = jnp.asarray(probs[ms.site], jnp.float32)
        b, heads, q, _ = p.shape
        if (heads, q) != (ms.heads, ms.height * ms.width):
            raise ValueError(f"captured maps at {ms.site} have {heads} heads x {q} queries; the layout expects "
                             f"{ms.heads} x {ms.height * ms.width}")
        m = jnp.einsum("bhqk,bok->bohq", p, weights).reshape(b, 2, heads, ms.height, ms.width)
        ry, rx = bilinear_matrix(ms.height, g), bilinear_matrix(ms.width, g)
        m = jnp.einsum("yi,bohij,xj->bohyx", ry, m, rx)
        out.append(m / (m.sum(axis=(-2, -1), keepdims=True) + eps))
    return jnp.concatenate(out, axis=2)
