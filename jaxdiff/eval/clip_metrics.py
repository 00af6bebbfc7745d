"""CLIP metrics of the fairness papers (methods spec sections 1.2, 3.4 and 6), on uint8 images:

* **Zero-shot attribute classification** (Li et al. ``metrics/CLIP_classify.py``, RespoDiff ``CLIP_classify.py``):
  ``probs = softmax(logits_per_image)`` over the attribute phrases ("a woman", "a man"); an image counts for
  **every** attribute whose probability equals the row maximum (ties count for each).
* **Deviation ratio** per prompt group: counts n_c over C attributes, p_c = n_c / sum n,
  Delta = max_c |p_c - 1/C| / (1 - 1/C) (0 balanced, 1 all one attribute): :func:`deviation_ratio`, the same
  definition as :func:`jaxdiff.shapesworld.metrics.deviation_ratio` (reused).
* **CLIP score** = 100 x cos(image embedding, text embedding), i.e. ``logits_per_image`` with logit_scale fixed at
  ln 100 (openai/clip-vit-base-patch32's trained exp(logit_scale) is 100.0); **WinoAlign** = the mean CLIP score of
  each image with its own prompt.

:class:`CLIPScorer` runs the two towers jitted in fixed-size chunks (short ones padded: one program per tower).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import jax
import numpy as np

from jaxdiff.clip_model import CLIPModelConfig, image_embeds, logits_per_image, text_embeds
from jaxdiff.clip_preprocess import CLIPImagePreprocess, preprocess_images
from jaxdiff.shapesworld.metrics import deviation_ratio

CLIP_SCORE_SCALE = 100.0

__all__ = ["CLIP_SCORE_SCALE", "CLIPScorer", "attribute_counts", "clip_scores", "deviation_ratio", "max_winners",
           "softmax", "group_summary"]


def softmax(logits) -> np.ndarray:
    """Row softmax in float32 (the papers take ``logits_per_image.softmax(dim=1)`` of a float32 model)."""
    z = np.asarray(logits, np.float32)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def max_winners(probs) -> np.ndarray:
    """(B, C) bool: attribute c counts for image b iff ``probs[b, c]`` equals the row max (ties: each counts)."""
    p = np.asarray(probs)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probabilities must be (B, C) with C >= 2 attributes, got {p.shape}")
    return p >= p.max(axis=1, keepdims=True)


def attribute_counts(winners) -> np.ndarray:
    """(C,) int: images counted for each attribute."""
    return np.asarray(winners, bool).sum(axis=0).astype(np.int64)


def clip_scores(img_embeds, txt_embeds) -> np.ndarray:
    """(B,) 100 x cos between image b and text b (normalised embeddings, one prompt per image)."""
    a, b = np.asarray(img_embeds, np.float64), np.asarray(txt_embeds, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"one text embedding per image: got {a.shape} images and {b.shape} texts")
    return CLIP_SCORE_SCALE * np.sum(a * b, axis=-1)


def group_summary(winners, scores, attributes: Sequence[str]) -> dict:
    """One prompt group: ``counts`` {attribute: n}, ``deviation_ratio``, mean ``clip_score``, ``images``."""
    counts = attribute_counts(winners)
    if len(counts) != len(attributes):
        raise ValueError(f"{len(counts)} attribute columns for {len(attributes)} attributes")
    return {"images": int(np.shape(winners)[0]), "counts": dict(zip(attributes, counts.tolist())),
            "deviation_ratio": deviation_ratio(counts), "clip_score": float(np.mean(scores))}


@functools.partial(jax.jit, static_argnames="config")
def _image_embeds(params, pixels, *, config):
    return image_embeds(params, pixels, config=config)


@functools.partial(jax.jit, static_argnames="config")
def _text_embeds(params, ids, *, config):
    return text_embeds(params, ids, config=config)


def _chunked(fn, x: np.ndarray, batch: int) -> np.ndarray:
    """``fn`` over ``x`` in chunks of exactly ``batch`` rows (short ones padded with copies of their first row), so
    each tower compiles once whatever the number of inputs."""
    if len(x) == 0:
        raise ValueError("nothing to embed")
    out = []
    for lo in range(0, len(x), batch):
        chunk = x[lo:lo + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - n, axis=0)])
        out.append(np.asarray(fn(chunk))[:n])
    return np.concatenate(out)


@dataclass(frozen=True, eq=False)
class CLIPScorer:
    """A loaded two-tower CLIP: config, params (:mod:`weights_convert.clip_model`), its tokenizer and image
    preprocessing (:meth:`CLIPImagePreprocess.from_folder`)."""

    config: CLIPModelConfig
    params: dict
    tokenizer: object
    preprocess: CLIPImagePreprocess = CLIPImagePreprocess()
    batch: int = 32

    def image_embeds(self, images) -> np.ndarray:
        """(B, P) normalised embeddings of uint8 (H, W, 3) images (any sizes)."""
        pixels = preprocess_images(images, self.preprocess)
        return _chunked(lambda x: _image_embeds(self.params, x, config=self.config), pixels, self.batch)

    def text_embeds(self, texts: Sequence[str]) -> np.ndarray:
        """(T, P) normalised embeddings; each text padded to the text tower's length (pooling is at the EOS, and
        the causal mask keeps padding out of it, so this equals transformers' ``padding=True``)."""
        from jaxdiff.tokenizer import tokenize

        unique = list(dict.fromkeys(texts))
        ids = tokenize(self.tokenizer, unique, max_length=self.config.text.max_position_embeddings)
        emb = _chunked(lambda x: _text_embeds(self.params, x, config=self.config), ids, self.batch)
        return emb[[unique.index(t) for t in texts]]

    def attribute_probs(self, img_embeds, attributes: Sequence[str]) -> np.ndarray:
        """(B, C) zero-shot probabilities: softmax of ``logits_per_image`` (the model's own logit_scale)."""
        logits = logits_per_image(np.asarray(img_embeds), self.text_embeds(attributes), self.params["logit_scale"])
        return softmax(logits)

    def prompt_scores(self, img_embeds, prompts: Sequence[str]) -> np.ndarray:
        """(B,) CLIP score of image b with ``prompts[b]``."""
        return clip_scores(img_embeds, self.text_embeds(prompts))
