"""RespoDiff: Vadakkeeveetil Sreelatha et al., "Dual-Module Bottleneck Transformation for Responsible & Faithful
T2I Generation" (NeurIPS 2025, arXiv 2509.15257).

Two h-shaped modules per concept (a free spatial tensor each, like SDisc's vector), added to h at the mid-block
seam on the conditional rows: RAM (responsible alignment) ``r_c`` and SAM (semantic alignment) ``s_c``. Sampling
adds ``r_c + s_c``; the table stores that sum (kind ``"spatial"``), so it samples exactly like an SDisc table.

Training ("score matching", the paper's sec. 3 / the released ``train_respodiff_fair.py``) needs no images. One
step, for a batch whose rows each carry a concept ``c``:

1. draw ``t_enc ~ U{0 .. S-2}`` (one per batch, S = 50 DDIM steps) and fresh noise ``z_T``;
2. the *anchor*: roll the neutral prompt's DDIM trajectory (guidance 3) from ``z_T`` for ``t_enc`` steps with
   the current ``r_c + s_c`` on the conditional rows, under ``stop_gradient`` (a ``lax`` loop inside the step);
   ``z`` sits at the schedule's timestep ``t = timesteps[t_enc]``;
3. target ``e* = e(z, t, base) + w (e(z, t, pos) - e(z, t, base))``: fairness ``base = ""``, ``pos`` = the
   attribute prompt, ``w = 4``; safety ``base`` = the unsafe word ("red"), ``pos`` = the neutral prompt, ``w = 12``;
4. ``L_resp = || e(z, t, neutral; h + r_c) - e* ||^2`` steps the RAM optimizer (Adam);
5. ``L_sem = lambda || e(z, t, neutral; h + r_c' + s_c) - e(z, t, neutral) ||^2`` with the RAM just updated
   (``r_c'``, the reference's alternation) steps the SAM optimizer. RAM also has a gradient here; like the
   reference (which zeroes it before RAM's next step) it is not used.

``e`` is the model's own output (noise, or v for v-prediction models; guidance is linear in either).

Deviation from the reference, on purpose: the anchor's training timestep is the schedule's own ``timesteps[t_enc]``
(the noise level ``z`` is at), where the reference indexes a 1000-step DDIM list at ``20 t_enc`` (ESD's
convention, ~20 timesteps off). Every concept of a group trains in one batched step (the reference: one concept,
batch 1, one run per concept); ``t_enc`` is shared by the batch so the rollout is one loop of ``t_enc`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.hooks import UNetEdits
from jaxdiff.schedulers import Schedule, init_state, scale_model_input, step
from jaxdiff.steer.concepts import concept_shape, delta_edit, guidance_layout, row_mask
from jaxdiff.steer.objective import predict, weighted_mse
from jaxdiff.unet import UNetConfig

Array = jax.Array
METHOD, KIND, DEFAULT_SCALE, DEFAULT_ROWS = "respodiff", "spatial", 1.0, "cond"


@dataclass(frozen=True)
class RespoDiffTraining:
    """Hyper-parameters (the paper's defaults; the released scripts' learning rates per concept set are in the
    project's methods spec, sec. 3.2). ``lam = 0`` trains RAM only (the paper's ablation)."""

    lam: float = 0.5
    ram_lr: float = 1e-1
    sam_lr: float = 1e-2
    rollout_guidance: float = 3.0

    def __post_init__(self):
        if self.lam < 0:
            raise ValueError(f"RespoDiff lambda must be >= 0, got {self.lam}")
        if self.ram_lr <= 0 or self.sam_lr <= 0:
            raise ValueError("RespoDiff learning rates must be > 0")

    def optimizers(self) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
        """(RAM's, SAM's) Adam, betas (0.9, 0.999), eps 1e-8, no weight decay (the released code)."""
        return optax.adam(self.ram_lr), optax.adam(self.sam_lr)


def init_modules(n: int, h_shape) -> dict:
    """``{"ram": (n, h, w, C), "sam": (n, h, w, C)}`` zeros: the unsteered model (the reference's bias-free
    linear maps of a one-hot start from a small random init; zero makes step 0 the unsteered anchor)."""
    z = np.zeros((n, *concept_shape(KIND, h_shape)), np.float32)
    return {"ram": z, "sam": z.copy()}


def table_vectors(modules: dict) -> np.ndarray:
    """What sampling adds per concept: ``ram + sam``."""
    return np.asarray(modules["ram"], np.float32) + np.asarray(modules["sam"], np.float32)


def init_opt_state(modules: dict, cfg: RespoDiffTraining) -> tuple:
    ram_tx, sam_tx = cfg.optimizers()
    return ram_tx.init(modules["ram"]), sam_tx.init(modules["sam"])


def cond_edits(deltas: Array) -> UNetEdits:
    """``h += deltas[b]`` on the conditional half of a guided ``[uncond, cond]`` batch of 2B rows (the sampler's
    :func:`jaxdiff.steer.concepts.concept_edits` with rows ``"cond"``)."""
    return UNetEdits(hspace=delta_edit(guidance_layout(deltas, True), row_mask(deltas.shape[0], "cond", True)))


def anchor_rollout(deltas: Array, z_T: Array, n_steps: Array, frozen: dict, *, unet: UNetConfig,
                   neutral: Array, uncond: Array, guidance: float) -> Array:
    """The first ``n_steps`` (traced) steps of the neutral prompt's guided trajectory from ``z_T`` with ``deltas``
    (B, h, w, C) on the conditional rows, on ``frozen["schedule"]``: what the sampler computes for the same
    prompts, noise and concept edit. ``neutral``/``uncond``: (B,) caption indices into ``frozen``."""
    schedule: Schedule = frozen["schedule"]
    captions = jnp.concatenate([uncond, neutral])
    edits = cond_edits(deltas)
    g = jnp.float32(guidance)

    def body(i, carry):
        x, state = carry
        x_in = scale_model_input(schedule, x, i)
        u, c = jnp.split(predict(frozen, unet, jnp.concatenate([x_in, x_in]), schedule.timesteps[i], captions,
                                 edits), 2)
        return step(schedule, state, i, u + g * (c - u), x)

    x0 = jnp.asarray(z_T, jnp.float32)
    x, _ = jax.lax.fori_loop(0, n_steps, body, (x0, init_state(schedule, x0)))
    return x


def draw(key: Array, shape: tuple[int, ...], schedule_len: int) -> tuple[Array, Array]:
    """``(t_enc, z_T)``: the batch's anchor depth, uniform in ``[0, S - 1)`` (the reference: ``randint(0, 49)``
    of 50), and fresh starting noise."""
    k_t, k_z = jax.random.split(key)
    t_enc = jax.random.randint(k_t, (), 0, schedule_len - 1)
    return t_enc, jax.random.normal(k_z, shape, jnp.float32)


def score_target(frozen: dict, unet: UNetConfig, z: Array, t: Array, batch: dict) -> tuple[Array, Array]:
    """``(e*, e(z, t, neutral))`` without gradient, from one UNet call over 3B rows: ``e* = e(base) + w (e(pos) -
    e(base))`` per row (``batch["w"]`` (B,)) and the unsteered neutral prediction SAM is pulled back to."""
    out = predict(frozen, unet, jnp.concatenate([z, z, z]), t,
                  jnp.concatenate([batch["base"], batch["pos"], batch["neutral"]]))
    base, pos, neutral = jnp.split(out, 3)
    w = batch["w"][:, None, None, None]
    return jax.lax.stop_gradient(base + w * (pos - base)), jax.lax.stop_gradient(neutral)


def resp_loss(ram: Array, sam: Array, z: Array, t: Array, target: Array, batch: dict, frozen: dict, *,
              unet: UNetConfig) -> Array:
    """``L_resp``: the neutral prediction with RAM alone against the attribute target (``sam`` unused: the
    signature matches :func:`sem_loss`)."""
    del sam
    pred = predict(frozen, unet, z, t, batch["neutral"], UNetEdits(hspace=delta_edit(ram[batch["label"]])))
    return weighted_mse(pred, target)[0]


def sem_loss(ram: Array, sam: Array, z: Array, t: Array, neutral_out: Array, batch: dict, frozen: dict, *,
             unet: UNetConfig, lam: float) -> Array:
    """``L_sem`` (with ``lambda``): the neutral prediction with RAM + SAM against the unsteered one."""
    delta = ram[batch["label"]] + sam[batch["label"]]
    pred = predict(frozen, unet, z, t, batch["neutral"], UNetEdits(hspace=delta_edit(delta)))
    return jnp.float32(lam) * weighted_mse(pred, neutral_out)[0]


def train_step(modules: dict, opt_state: tuple, batch: dict, key: Array, frozen: dict, *, unet: UNetConfig,
               cfg: RespoDiffTraining, latent_shape: tuple[int, int, int]) -> tuple[dict, tuple, Array, dict]:
    """One alternating step (module docstring): ``(modules, opt_state, L_resp + L_sem, metrics)``.

    ``batch = {"label": (B,) concept, "neutral", "uncond", "base", "pos": (B,) caption indices, "w": (B,)
    target guidance}``; ``frozen``: :mod:`jaxdiff.steer.objective`'s plus ``"schedule"`` (the anchor's DDIM
    schedule, 50 steps in the paper); ``latent_shape``: (h, w, C) of the model's latents."""
    ram_tx, sam_tx = cfg.optimizers()
    ram_state, sam_state = opt_state
    schedule = frozen["schedule"]
    b = batch["label"].shape[0]
    t_enc, z_T = draw(key, (b, *latent_shape), len(schedule))
    deltas = modules["ram"][batch["label"]] + modules["sam"][batch["label"]]
    z = jax.lax.stop_gradient(anchor_rollout(deltas, z_T, t_enc, frozen, unet=unet,
                                             neutral=batch["neutral"], uncond=batch["uncond"],
                                             guidance=cfg.rollout_guidance))
    t = schedule.timesteps[t_enc]
    target, neutral_out = score_target(frozen, unet, z, t, batch)
    l_resp, g_ram = jax.value_and_grad(resp_loss)(modules["ram"], modules["sam"], z, t, target, batch, frozen,
                                                  unet=unet)
    upd, ram_state = ram_tx.update(g_ram, ram_state, modules["ram"])
    ram = optax.apply_updates(modules["ram"], upd)
    l_sem, g_sam = jax.value_and_grad(sem_loss, argnums=1)(ram, modules["sam"], z, t, neutral_out, batch, frozen,
                                                           unet=unet, lam=cfg.lam)
    upd, sam_state = sam_tx.update(g_sam, sam_state, modules["sam"])
    sam = optax.apply_updates(modules["sam"], upd)
    metrics = {"l_resp": l_resp, "l_sem": l_sem, "t_enc": t_enc.astype(jnp.float32),
               "grad_norm": optax.tree.norm(g_ram)}
    return {"ram": ram, "sam": sam}, (ram_state, sam_state), l_resp + l_sem, metrics
