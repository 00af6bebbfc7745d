"""Abs-Grad-SAM: gradient x attention saliency of the subject words, subject masks, and background latent
replacement during sampling (Pathania, "Enhancing Conditional Image Generation with Explainable Latent Space
Manipulation", arXiv 2408.16232; methods.md §5, in the clean formulation of §5.3).

Task: draw the prompt's subject into a reference image while its background stays the reference's. Sampling
starts from the reference noised to the run's first step (img2img); after the chosen steps, every latent element
the subject words do not explain is overwritten by the reference latents noised to that step.

**Importance** (Grad-SAM, Barkan et al. arXiv 2204.11073, with |.| instead of ReLU): for a cross-attention site
with softmax probabilities A[h, q, k] (heads h, queries q, text tokens k) and every element o of the conditional
noise prediction eps_c (h x w x C latent elements),

    I_s(o) = sum_{h,q} A[h,q,s] |d eps_c(o) / d A[h,q,s]|                                  (Grad-SAM, abs)

summed over the chosen sites, and averaged over the tokens of a multi-token subject word. Computed exactly:
the probabilities are multiplied by ``1 + delta @ onehot(subject tokens)`` (an :class:`AttnEdit` probability
scale, the identity at delta = 0), so d eps_c(o) / d delta[h,q,s] = A[h,q,s] d eps_c(o) / d A[h,q,s] (A >= 0,
hence |A g| = A |g| and relu(A g) = A relu(g)). One vector-Jacobian product per output element o with a one-hot
cotangent, vmapped over chunks of elements (memory-bounded); JAX's VJP only runs the part of the UNet after the
site. Rows are independent, so one cotangent holding the same element in every row serves the whole batch.

Variants, for comparison with the released code (methods.md §5.2): ``variant="relu"`` (ReLU of the gradient,
the code's choice; the sign then depends on eps vs the denoised latent, §5.3) and ``cotangent="random"``
(standard-normal cotangents, one fresh draw per "element", as the code's batched ``grad_outputs``: random
projections of the Jacobian, not per-element gradients).

**Masks**: per subject, a Gaussian blur over the latent grid, the threshold mean + k std (k = 0.5) per latent
channel, then a binary 3x3 dilation repeated n times; union over subjects. Per latent element (the reference) or
per position (scores summed over the channels, one mask for all channels).

**Replacement** (post-step hook): after the step producing the latents of a replacement index r (counted in the
steps the run executes), z[~mask] <- add_noise(z_ref, n, r) with one shared noise draw n (the run's img2img
noise). The reference's pure-noise start (its code overwrites the img2img start) is a pre-step option.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.hooks import AttnEdit, AttnSite, CaptureSpec, UNetEdits, merge_edits
from jaxdiff.schedulers import add_noise_at_step, scale_model_input
from jaxdiff.steering import StepContext, StepHook, Steering, cond_half_edits

Array = jax.Array

VARIANTS = ("abs", "relu")
COTANGENTS = ("exact", "random")
# The reference's replacement indices in its 45 executed steps (50-step DDPM at strength 0.9).
REFERENCE_STEPS, REFERENCE_RUN = (5, 18, 28), 45
CHUNK_BYTES = 256 * 2 ** 20     # float32 probability cotangents held per chunk of VJPs (sizes the chunk)


# ------------------------------------------------------------------------------------------------ saliency
@dataclass(frozen=True)
class SaliencyConfig:
    """Static saliency settings: the cross-attention ``sites`` (scores summed over them), ``variant`` ("abs" or
    "relu"), ``cotangent`` ("exact" one-hot or "random" projections) and the VJPs vmapped per chunk (None: sized
    so the chunk's probability cotangents stay within :data:`CHUNK_BYTES`).

    The default is one VJP at a time (``chunk=1``, a sequential ``lax.map``): jaxlib 0.10's CPU compiler
    miscompiles this vmapped VJP at 8 or more cotangents (its YNNPACK "reduce" fusion: 13% relative error
    against op-by-op evaluation, in float32 and float64 alike; exact with
    ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce``, a flag jaxdiff does not set globally because it
    changes the rounding of every other program). Larger chunks are faster where the compiler is sound (check
    with ``tests/test_abs_grad_sam.py``, which compares against a brute-force Jacobian)."""

    sites: tuple[AttnSite, ...]
    variant: str = "abs"
    cotangent: str = "exact"
    chunk: int | None = 1

    def __post_init__(self):
        if not self.sites or any(s.kind != "cross" for s in self.sites):
            raise ValueError(f"saliency sites must be cross-attention sites, got {self.sites}")
        if self.variant not in VARIANTS:
            raise ValueError(f"saliency variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.cotangent not in COTANGENTS:
            raise ValueError(f"saliency cotangent must be one of {COTANGENTS}, got {self.cotangent!r}")


def subject_prob_scale(delta_BHQT: Array, onehot_BTK: Array) -> Array:
    """(B, H, Q, K) probability scale ``1 + delta @ onehot``: the identity at delta = 0; its derivative in
    delta[..., t] is the probability of token ``onehot[t]``'s times the derivative in that probability."""
    return 1.0 + jnp.einsum("bhqt,btk->bhqk", delta_BHQT, onehot_BTK)


def _chunk_size(cfg: SaliencyConfig, n: int, probs_per_vjp: int) -> int:
    if cfg.chunk is not None:
        return max(1, min(cfg.chunk, n))
    return int(max(1, min(n, CHUNK_BYTES // (4 * probs_per_vjp))))


def saliency(eps_fn, delta_shapes: dict, onehot: Array, subject_weights: Array, cfg: SaliencyConfig,
             key: Array | None = None) -> Array:
    """Importance of every subject word for every element of ``eps_fn``'s output.

    Args:
      eps_fn: ``deltas -> eps`` (B, h, w, C), the conditional noise prediction with the probabilities of each
        site multiplied by :func:`subject_prob_scale` of ``deltas[site]``.
      delta_shapes: site -> (B, H, Q, T) of that site's delta (T subject tokens).
      onehot: (B, T, K) the subject tokens' positions among the K text tokens.
      subject_weights: (B, J, T) word j's average over its tokens (rows of 1/n; zero rows for padding).
      key: PRNG key of the random-projection variant.

    Returns (B, J, h, w, C) float32 scores.
    """
    zeros = {s: jnp.zeros(shape, jnp.float32) for s, shape in delta_shapes.items()}
    eps, vjp = jax.vjp(eps_fn, zeros)
    b, elem_shape = eps.shape[0], eps.shape[1:]
    n = int(np.prod(elem_shape))
    chunk = _chunk_size(cfg, n, sum(int(np.prod(s)) * onehot.shape[-1] // max(1, s[-1])
                                    for s in delta_shapes.values()))
    n_chunks = -(-n // chunk)
    index = (jnp.arange(n_chunks * chunk) % n).reshape(n_chunks, chunk)   # padded with repeats, dropped below

    def cotangent(o):
        if cfg.cotangent == "random":
            return jax.random.normal(jax.random.fold_in(key, o), eps.shape, eps.dtype)
        return jnp.broadcast_to(jax.nn.one_hot(o, n, dtype=eps.dtype).reshape(elem_shape), eps.shape)

    def reduce(g):                                   # (chunk, B, H, Q, T) -> (chunk, B, T)
        g = jnp.abs(g) if cfg.variant == "abs" else jnp.maximum(g, 0.0)
        return g.sum(axis=(2, 3))

    def one_chunk(idx):
        (grads,) = jax.vmap(vjp)(jax.vmap(cotangent)(idx))
        return sum(reduce(grads[s]) for s in delta_shapes)

    per_token = jax.lax.map(one_chunk, index).reshape(n_chunks * chunk, b, -1)[:n]   # (n, B, T)
    per_word = jnp.einsum("nbt,bjt->bjn", per_token, subject_weights)
    return per_word.reshape(b, subject_weights.shape[1], *elem_shape)


def denoiser_saliency(model, z: Array, t: Array, edits: UNetEdits, onehot: Array, subject_weights: Array,
                      cfg: SaliencyConfig, key: Array | None = None) -> Array:
    """:func:`saliency` of a denoiser ``model(x, t, edits, capture) -> (eps, aux)`` at model input ``z``, under
    ``edits`` (a method's edits stay in force); the sites' delta shapes come from one abstract capture."""
    capture = CaptureSpec.of(cfg.sites, mode="heads")
    probs = jax.eval_shape(lambda zz: model(zz, t, edits, capture)[1]["attn"], z)
    shapes = {s: (*probs[s].shape[:3], onehot.shape[1]) for s in cfg.sites}

    def eps_fn(deltas):
        scale = UNetEdits(attn={s: AttnEdit(prob_scale=subject_prob_scale(d, onehot)) for s, d in deltas.items()})
        return model(z, t, merge_edits(edits, scale), CaptureSpec())[0].astype(jnp.float32)

    return saliency(eps_fn, shapes, onehot, subject_weights, cfg, key)


def step_saliency(x: Array, ctx: StepContext, onehot: Array, subject_weights: Array, cfg: SaliencyConfig) -> Array:
    """:func:`denoiser_saliency` of the conditional noise prediction of step ``ctx.i`` at latents ``x`` (the
    step's input), under the step's own edits (composed methods stay in force)."""
    rows = x.shape[0] * (2 if ctx.guided else 1)
    edits = cond_half_edits(ctx.edits, rows) if ctx.guided else ctx.edits
    return denoiser_saliency(ctx.cond_model, scale_model_input(ctx.schedule, x, ctx.i), ctx.t, edits, onehot,
                             subject_weights, cfg, ctx.key)


# ------------------------------------------------------------------------------------------------ masks
@dataclass(frozen=True)
class MaskConfig:
    """Static mask settings: Gaussian ``blur`` kernel size (odd; 1 = none), binary 3x3 ``dilation`` iterations,
    ``per_position`` (one mask over all channels). The blur sigma and the threshold's std multiple are traced
    (hook params)."""

    blur: int = 3
    dilation: int = 1
    per_position: bool = False

    def __post_init__(self):
        if self.blur < 1 or self.blur % 2 == 0:
            raise ValueError(f"mask blur kernel must be odd and >= 1, got {self.blur}")
        if self.dilation < 0:
            raise ValueError(f"mask dilation iterations must be >= 0, got {self.dilation}")


def gaussian_blur(s: Array, size: int, sigma: Array) -> Array:
    """Separable Gaussian blur of ``s`` (..., h, w, C) over (h, w), normalised taps, edge-replicated borders."""
    if size == 1:
        return s
    r = size // 2
    taps = jnp.exp(-0.5 * (jnp.arange(-r, r + 1, dtype=jnp.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    nd = s.ndim
    for axis in (nd - 3, nd - 2):
        pad = [(0, 0)] * nd
        pad[axis] = (r, r)
        p = jnp.pad(s, pad, mode="edge")
        length = s.shape[axis]
        s = sum(taps[k] * jax.lax.slice_in_dim(p, k, k + length, axis=axis) for k in range(size))
    return s


def dilate(mask: Array, iterations: int) -> Array:
    """Binary dilation of ``mask`` (..., h, w, C) with a 3x3 square, ``iterations`` times (outside = False)."""
    nd = mask.ndim
    for _ in range(iterations):
        pad = [(0, 0)] * nd
        pad[nd - 3] = pad[nd - 2] = (1, 1)
        p = jnp.pad(mask, pad)
        h, w = mask.shape[nd - 3], mask.shape[nd - 2]
        mask = jnp.any(jnp.stack([jax.lax.slice_in_dim(jax.lax.slice_in_dim(p, dy, dy + h, axis=nd - 3),
                                                       dx, dx + w, axis=nd - 2)
                                  for dy in range(3) for dx in range(3)]), axis=0)
    return mask


def threshold(s: Array, k: Array) -> Array:
    """``s > mean + k std`` per channel, statistics over the (h, w) grid of ``s`` (..., h, w, C)."""
    mean = s.mean(axis=(-3, -2), keepdims=True)
    std = s.std(axis=(-3, -2), keepdims=True)
    return s > mean + k * std


def subject_mask(scores: Array, valid: Array, cfg: MaskConfig, sigma: Array, k: Array) -> Array:
    """(B, h, w, C) bool (C = 1 per position), True = subject: blur, threshold, dilate each word's scores
    (B, J, h, w, C), then the union over the valid words (B, J)."""
    if cfg.per_position:
        scores = scores.sum(axis=-1, keepdims=True)
    m = dilate(threshold(gaussian_blur(scores, cfg.blur, sigma), k), cfg.dilation)
    return jnp.any(m & valid[:, :, None, None, None], axis=1)


# ------------------------------------------------------------------------------------------------ the hooks
@dataclass(frozen=True)
class KeepBackground:
    """Post-step hook: at the replacement steps, saliency from the step's input, the subject mask, and the
    background of the step's output replaced by the noised reference. Reports per step the mask ("mask",
    (B, h, w, C) bool, all False on other steps) and whether the step replaced ("replaced", (B,)), under "background"."""

    saliency: SaliencyConfig
    mask: MaskConfig = MaskConfig()

    def __call__(self, x_in: Array, x_out: Array, captures: dict, ctx: StepContext, p: dict):
        # latents index of this step's output; the final output (index N) is never a replacement step, the clamp
        # only keeps the untaken branch's gather in range
        j = jnp.minimum(ctx.i + 1, p["replace"].shape[0] - 2)
        do = p["replace"][ctx.i + 1]

        def replace(_):
            scores = step_saliency(x_in, ctx, p["onehot"], p["subject_weights"], self.saliency)
            m = subject_mask(scores, p["valid"], self.mask, p["sigma"], p["k_std"])
            m = jnp.broadcast_to(m, x_out.shape)
            reference = add_noise_at_step(ctx.schedule, p["reference"], p["noise"], j)
            return jnp.where(m, x_out, reference.astype(x_out.dtype)), m

        def keep(_):
            return x_out, jnp.zeros(x_out.shape, bool)

        x_new, m = jax.lax.cond(do, replace, keep, None)
        return x_new, {"background": {"mask": m, "replaced": jnp.broadcast_to(do, x_out.shape[:1])}}


def noise_start(x: Array, ctx: StepContext, p: dict) -> Array:
    """Pre-step hook, the reference code's start: at the first step run, the latents are the shared noise
    (scaled by the schedule's initial sigma) instead of the noised reference."""
    first = ctx.i == p["start"]
    return jnp.where(first, p["noise"] * ctx.schedule.init_noise_sigma, x)


def replace_mask(num_steps: int, start: int, replace_steps) -> np.ndarray:
    """(num_steps + 1,) bool over schedule indices of the latents: True at ``start + r`` for each run-relative
    replacement index r (the latents after r executed steps)."""
    out = np.zeros(num_steps + 1, bool)
    for r in replace_steps:
        out[start + int(r)] = True
    return out


def scaled_steps(run_steps: int, reference=REFERENCE_STEPS, reference_run: int = REFERENCE_RUN) -> tuple[int, ...]:
    """The reference's replacement indices scaled from its 45 executed steps to ``run_steps`` (rounded, kept in
    1 .. run_steps - 1, duplicates dropped)."""
    out = sorted({min(max(1, round(r * run_steps / reference_run)), run_steps - 1) for r in reference})
    return tuple(out) if run_steps >= 2 else ()


def background_params(*, reference: Array, noise: Array, replace: np.ndarray, onehot: np.ndarray,
                      subject_weights: np.ndarray, start: int, sigma: float = 1.0, k_std: float = 0.5) -> dict:
    """The hooks' traced parameters: ``reference`` (B, h, w, C) clean reference latents, ``noise`` (B, h, w, C)
    the shared noise draw, ``replace`` from :func:`replace_mask`, the subject tokens (``onehot`` (B, T, K),
    ``subject_weights`` (B, J, T)), the first step run, the blur sigma and the threshold's std multiple."""
    w = jnp.asarray(subject_weights, jnp.float32)
    return {"reference": jnp.asarray(reference, jnp.float32), "noise": jnp.asarray(noise, jnp.float32),
            "replace": jnp.asarray(replace, bool), "onehot": jnp.asarray(onehot, jnp.float32),
            "subject_weights": w, "valid": w.sum(-1) > 0, "start": jnp.int32(start),
            "sigma": jnp.float32(sigma), "k_std": jnp.float32(k_std)}


def background_steering(hook: KeepBackground, params: dict, *, from_noise: bool = False) -> Steering:
    """The :class:`Steering` of a background-keeping run (with the pure-noise start when ``from_noise``)."""
    pre = (StepHook(noise_start, params),) if from_noise else ()
    return Steering(pre=pre, post=(StepHook(hook, params),))
