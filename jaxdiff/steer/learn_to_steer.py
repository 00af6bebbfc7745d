"""Learn-to-Steer: test-time optimisation of the latents against a learned relation loss.

Yiflach, Atzmon & Chechik, "Data-Driven Loss Functions for Inference-Time Optimization in Text-to-Image"
(WACV 2026), as specified in ../shared/docs/methods.md §4.4. Before the normal step ``i`` of sampling, for
``i < tto_steps`` (the reference: the first half of the schedule), up to ``max_updates`` refinements::

    z <- z - eta * grad_z CE(classifier(maps(z), tau_i), target)

where ``maps(z)`` are the per-object cross-attention maps of one UNet call on the *conditional rows only*
(:mod:`jaxdiff.steer.relation_maps`), ``tau_i`` the classifier's step index for step ``i`` (the smallest
trained index at or after the 50-step index of the same timestep), and the loop stops when the loss falls to
the step's threshold (1e-5, 3e-5, 5e-5, then 7e-5). The gradient step is plain: no normalisation.

Here it is a :class:`~jaxdiff.steering.Steering` pre-step hook, one bounded ``lax.while_loop`` inside the one
compiled sampling program, **batched with per-row stopping** (the reference runs batch 1): a row that reached
its threshold is frozen (never updated again) while the others go on; the loop ends when every row stopped or
after ``max_updates + 1`` evaluations. Several relations per prompt cycle with the iteration counter (the
reference's rule: triplet ``k mod n`` at iteration ``k``).

A **handcrafted baseline** runs in the same loop (``loss="centroid"``): a hinge on the two objects' attention
centroids along the relation's axis, ``relu(margin - s (c_A - c_B)[axis])`` with ``s`` = -1 for left/above and
+1 for right/below (image y grows downwards), the maps averaged over channels. It is zero once the centroids
are ``margin`` (a fraction of the image) apart the right way. The "is" class has no geometry: zero loss.

Every value (token weights, targets, learning rate, step range, thresholds, classifier weights) is a traced
leaf: new prompts, relations and settings never retrace. Per step the hook reports per-row stats
(``aux["hooks"]["relations"]``): refinements made, the last evaluated loss and target probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.schedulers import scale_model_input
from jaxdiff.steer.relation_classifier import ClassifierConfig, predict
from jaxdiff.steer.relation_maps import MapLayout, object_maps
from jaxdiff.steering import StepContext, StepHook, Steering, cond_half_edits

Array = jax.Array

THRESHOLDS = (1e-5, 3e-5, 5e-5, 7e-5)    # loss targets of steps 0, 1, 2 and >= 3 (reference code)
MAX_UPDATES = 15                          # refinements per step (the reference evaluates 16 times)
ETA = {"sd1": 7.5, "sd2": 5.0}            # the reference's step sizes (SD1.4, SD2.1)
LOSSES = ("learned", "centroid")
CENTROID_MARGIN = 0.1
# (axis, sign) of each spatial class in RELATION_CLASSES order: x = 0, y = 1 (downwards).
_AXIS_SIGN = np.asarray([[0, -1], [0, 1], [1, -1], [1, 1], [0, 0]], np.int32)


# ------------------------------------------------------------------------------------------------ losses
def classifier_ce(logits: Array, target: Array) -> tuple[Array, Array]:
    """Per-row cross-entropy and target probability: logits (B, K), target (B,) int."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]
    return -lp, jnp.exp(lp)


def centroids(maps: Array) -> Array:
    """(B, 2, C, G, G) maps -> (B, 2, 2) centroids (x, y) in [0, 1] image units of the channel-mean map."""
    m = maps.mean(axis=2)
    m = m / (m.sum(axis=(-2, -1), keepdims=True) + 1e-12)
    g = m.shape[-1]
    coords = (jnp.arange(g, dtype=jnp.float32) + 0.5) / g
    cx = jnp.einsum("boyx,x->bo", m, coords)
    cy = jnp.einsum("boyx,y->bo", m, coords)
    return jnp.stack([cx, cy], axis=-1)


def centroid_hinge(maps: Array, target: Array, margin: float | Array = CENTROID_MARGIN) -> Array:
    """Per-row handcrafted relation loss: ``relu(margin - sign * (c_A - c_B)[axis])`` (0 for "is")."""
    c = centroids(maps)
    d = c[:, 0] - c[:, 1]                                     # (B, 2): offset of A from B
    axis_sign = jnp.asarray(_AXIS_SIGN)[target]               # (B, 2)
    along = jnp.take_along_axis(d, axis_sign[:, :1], axis=-1)[:, 0]
    sign = axis_sign[:, 1].astype(jnp.float32)
    return jnp.where(sign == 0, 0.0, jax.nn.relu(margin - sign * along))


# ------------------------------------------------------------------------------------------------ the hook
@dataclass(frozen=True)
class RelationTTO:
    """The static part of the test-time optimisation hook (hashable: equal instances share a program).

    ``layout``: the model's map layout (the classifier's channels); ``config``: the classifier's config (None
    for the centroid loss); ``loss``: "learned" or "centroid"."""

    layout: MapLayout
    config: ClassifierConfig | None
    loss: str = "learned"

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"relation loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss == "learned" and self.config is None:
            raise ValueError("the learned relation loss needs a classifier config")

    def row_losses(self, z: Array, ctx: StepContext, p: dict, k: Array) -> tuple[Array, tuple[Array, Array]]:
        """Sum over rows of the loss (rows are independent, so its gradient is every row's own), and per-row
        (loss, target probability; NaN for the centroid loss) at iteration ``k``."""
        b = z.shape[0]
        r = k % p["n_rel"]                                                        # (B,) triplet per row
        weights = jnp.take_along_axis(p["weights"], r[:, None, None, None], axis=1)[:, 0]   # (B, 2, K)
        target = jnp.take_along_axis(p["target"], r[:, None], axis=1)[:, 0]                  # (B,)
        rows = b * (2 if ctx.guided else 1)
        edits = cond_half_edits(ctx.edits, rows) if ctx.guided else ctx.edits
        _, aux = ctx.cond_model(scale_model_input(ctx.schedule, z, ctx.i), ctx.t, edits, self.layout.capture)
        maps = object_maps(aux["attn"], self.layout, weights)
        if self.loss == "learned":
            tau = jnp.broadcast_to(p["tau"][ctx.i], (b,))
            ce, prob = classifier_ce(predict(p["classifier"], self.config, maps, tau), target)
        else:
            ce, prob = centroid_hinge(maps, target, p["margin"]), jnp.full((b,), jnp.nan, jnp.float32)
        return ce.sum(), (ce, prob)

    def __call__(self, x: Array, ctx: StepContext, p: dict):
        b = x.shape[0]
        on = ctx.i < p["tto_steps"]
        threshold = p["thresholds"][ctx.i]
        grad_fn = jax.value_and_grad(lambda z, k: self.row_losses(z, ctx, p, k), has_aux=True)

        def cond(s):
            k, _, done, *_ = s
            return on & (k <= p["max_updates"]) & ~jnp.all(done)

        def body(s):
            k, z, done, used, loss, prob = s
            (_, (ce, pr)), g = grad_fn(z, k)
            # Record the evaluation for rows still running; stop rows at their threshold or the update budget.
            loss, prob = jnp.where(done, loss, ce), jnp.where(done, prob, pr)
            done = done | (ce <= threshold) | (k >= p["max_updates"])
            step = ~done
            z = jnp.where(step[:, None, None, None], z - p["eta"] * g.astype(z.dtype), z)
            return k + 1, z, done, used + step.astype(jnp.int32), loss, prob

        nan = jnp.full((b,), jnp.nan, jnp.float32)
        init = (jnp.int32(0), x, ~jnp.asarray(p["rows"], bool), jnp.zeros((b,), jnp.int32), nan, nan)
        _, z, _, used, loss, prob = jax.lax.while_loop(cond, body, init)
        return z, {"relations": {"refinements": used, "loss": loss, "prob": prob}}


# ------------------------------------------------------------------------------------------------ building
def thresholds_for(num_steps: int, values: tuple[float, ...] = THRESHOLDS) -> np.ndarray:
    """(num_steps,) loss thresholds: ``values[i]`` for the first steps, the last value afterwards."""
    return np.asarray([values[min(i, len(values) - 1)] for i in range(num_steps)], np.float32)


def classifier_steps(timesteps, reference_timesteps, trained: tuple[int, ...]) -> np.ndarray:
    """(N,) classifier step index per sampling step: the index of the nearest timestep in the classifier's
    reference schedule (the 50-step DDIM schedule its data was recorded with), rounded up to the smallest
    trained index at or after it (methods.md §4.4: i <= 5 -> 5, 6..10 -> 10, ...), the last one beyond."""
    t, ref = np.asarray(timesteps, np.float64), np.asarray(reference_timesteps, np.float64)
    nearest = np.abs(t[:, None] - ref[None, :]).argmin(axis=1)
    trained = np.sort(np.asarray(trained))
    pos = np.minimum(np.searchsorted(trained, nearest, side="left"), len(trained) - 1)
    return trained[pos].astype(np.int32)


def relation_params(weights: np.ndarray, targets: np.ndarray, n_rel: np.ndarray, *, num_steps: int,
                    tto_steps: int, eta: float, tau: np.ndarray | None = None, classifier: Any = None,
                    max_updates: int = MAX_UPDATES, rows: np.ndarray | None = None,
                    thresholds: tuple[float, ...] = THRESHOLDS, margin: float = CENTROID_MARGIN) -> dict:
    """The hook's traced parameters.

    Args:
      weights: (B, R, 2, K) token weights of each row's R triplets (:func:`relation_maps.token_weights`);
      targets: (B, R) class indices; n_rel: (B,) triplets per row (>= 1; rows cycle over their first n_rel);
      tto_steps: optimise before steps ``0 .. tto_steps - 1``; eta: gradient step; max_updates: per step;
      tau: (num_steps,) classifier step index per step (:func:`classifier_steps`); classifier: its params;
      rows: (B,) bool, rows to steer (default all).
    """
    b = weights.shape[0]
    n_rel = np.asarray(n_rel, np.int32)
    if weights.ndim != 4 or weights.shape[2] != 2 or targets.shape != weights.shape[:2] or n_rel.shape != (b,):
        raise ValueError(f"relation params: weights (B, R, 2, K), targets (B, R), n_rel (B,); got "
                         f"{weights.shape}, {targets.shape}, {n_rel.shape}")
    if np.any(n_rel < 1) or np.any(n_rel > weights.shape[1]):
        raise ValueError(f"n_rel must be in 1..{weights.shape[1]}, got {n_rel.tolist()}")
    return {"weights": jnp.asarray(weights, jnp.float32), "target": jnp.asarray(targets, jnp.int32),
            "n_rel": jnp.asarray(n_rel), "tto_steps": jnp.int32(tto_steps), "eta": jnp.float32(eta),
            "max_updates": jnp.int32(max_updates), "thresholds": jnp.asarray(thresholds_for(num_steps, thresholds)),
            "tau": jnp.asarray(np.zeros(num_steps, np.int32) if tau is None else tau, jnp.int32),
            "rows": jnp.asarray(np.ones(b, bool) if rows is None else rows, bool),
            "margin": jnp.float32(margin), "classifier": classifier}


def relation_steering(hook: RelationTTO, params: dict) -> Steering:
    """A :class:`~jaxdiff.steering.Steering` running the test-time optimisation before each step."""
    return Steering(pre=(StepHook(hook, params),))
