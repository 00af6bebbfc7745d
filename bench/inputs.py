"""Deterministic UNet benchmark inputs, identical for every framework (numpy only, so the diffusers-Flax peer
can import it from its own virtualenv).

Layout is PyTorch's NCHW; JAX children transpose latents to NHWC themselves. Timestep 500 for every row,
77 text tokens (CLIP's context length), SDXL micro-conditioning for a 1024x1024 image.
"""

from __future__ import annotations

import numpy as np

CONTEXT_LEN = 77
TIMESTEP = 500.0


def latent_size(unet_config: dict) -> int:
    size = unet_config.get("sample_size", 64)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def cross_dim(unet_config: dict) -> int:
    d = unet_config.get("cross_attention_dim", 1280)
    return int(d[0] if isinstance(d, (list, tuple)) else d)


def unet_inputs(unet_config: dict, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``sample`` (B, C, H, W), ``timestep`` (B,), ``context`` (B, 77, D) float32 standard normal; for SDXL
    (``addition_embed_type == "text_time"``) also ``text_embeds`` (B, pooled dim) and ``time_ids`` (B, 6)."""
    rng = np.random.default_rng(seed)
    n, c = latent_size(unet_config), int(unet_config.get("in_channels", 4))
    out = {"sample": rng.standard_normal((batch, c, n, n), dtype=np.float32),
           "timestep": np.full((batch,), TIMESTEP, np.float32),
           "context": rng.standard_normal((batch, CONTEXT_LEN, cross_dim(unet_config)), dtype=np.float32)}
    if unet_config.get("addition_embed_type") == "text_time":
        pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
        out["text_embeds"] = rng.standard_normal((batch, pooled), dtype=np.float32)
        out["time_ids"] = np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (batch, 1))
    return out


def compare(out: np.ndarray, ref: np.ndarray) -> dict:
    """Agreement of two outputs of the same function: max-abs error and that relative to the reference std."""
    err = float(np.max(np.abs(out.astype(np.float64) - ref.astype(np.float64))))
    return {"max_abs": err, "ref_std": float(ref.std()), "rel": err / float(ref.std())}
