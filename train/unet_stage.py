"""Stage 3: the UNet and the CLIP text encoder, trained jointly from scratch on the latent dataset.

Objective (Ho et al. 2020, eq. 14, "L_simple", epsilon prediction; latent diffusion, Rombach et al. 2022):

    z0 = scaling_factor * (mean + std * n),   t ~ U{0..999},   eps ~ N(0, I)
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps                      (Ho et al. eq. 4)
    L = E[ w(t) * || eps - eps_theta(z_t, t, tau(y)) ||^2 ],   w(t) = min(SNR_t, gamma) / SNR_t

with SD's scaled_linear abar, SNR_t = abar_t / (1 - abar_t), and the min-SNR-gamma weight of Hang et al. 2023
("Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 9 for epsilon prediction; gamma = 0 gives
plain L_simple). It caps the weight of nearly clean timesteps, which speeds convergence of the coarse layout
and colour content that ShapesWorld is judged on. The caption y is the empty prompt for ``p_uncond`` of the
rows (classifier-free guidance, Ho & Salimans 2022; drawn in :func:`train.data.unet_batch`).

Why train the text encoder jointly (as LDM trains its text transformer tau_theta jointly, Rombach et al. 2022
sec. 3.3) rather than freeze a random one: a random causal transformer does give every token a distinct
vector, but the words that must *compose* ("a red circle above a blue square" vs "a blue square above a red
circle") reach the UNet only through a fixed random mixing of positions; a trained encoder can learn which
object a colour binds to and which object is the subject of a relation. The UNet reads ``last_hidden_state``
(all 77 positions, padding included) through cross-attention, exactly as SD1.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxdiff.checkpoint import config_from_dict, param_template
from jaxdiff.clip import CLIPTextConfig, apply_clip_text
from jaxdiff.schedulers import SchedulerConfig
from jaxdiff.schedulers.common import alphas_cumprod_np
from jaxdiff.unet import UNetConfig, apply_unet
from train import data, loop
from train.config import Plan, fingerprint
from train.init import UNET_ZERO, init_params


def unet_loss(params: dict, batch: dict, key, *, unet: UNetConfig, text: CLIPTextConfig,
              scheduler: SchedulerConfig, scaling_factor: float, min_snr_gamma: float):
    k_post, k_t, k_eps = jax.random.split(key, 3)
    mean = batch["mean"]
    z0 = (mean + batch["std"] * jax.random.normal(k_post, mean.shape, mean.dtype)) * scaling_factor
    abar_table = jnp.asarray(alphas_cumprod_np(scheduler))          # (1000,) float32 constant
    t = jax.random.randint(k_t, (mean.shape[0],), 0, abar_table.shape[0])
    eps = jax.random.normal(k_eps, z0.shape, z0.dtype)
    abar = abar_table[t][:, None, None, None]
    zt = jnp.sqrt(abar) * z0 + jnp.sqrt(1.0 - abar) * eps
    ctx, _ = apply_clip_text(params["text_encoder"], batch["ids"], config=text)
    pred, _ = apply_unet(params["unet"], zt, t, ctx, config=unet)
    per_row = jnp.mean(jnp.square(pred - eps), axis=(1, 2, 3))
    if min_snr_gamma > 0:
        snr = abar[:, 0, 0, 0] / (1.0 - abar[:, 0, 0, 0])
        weight = jnp.minimum(snr, min_snr_gamma) / snr
    else:
        weight = jnp.ones_like(per_row)
    return jnp.mean(weight * per_row), {"mse": jnp.mean(per_row)}


@functools.lru_cache(maxsize=8)
def loss_for(unet: UNetConfig, text: CLIPTextConfig, scheduler: SchedulerConfig, scaling_factor: float,
             min_snr_gamma: float):
    """One loss callable per configuration, so :func:`train.loop.compiled_step` reuses its compilation."""
    return functools.partial(unet_loss, unet=unet, text=text, scheduler=scheduler, scaling_factor=scaling_factor,
                             min_snr_gamma=min_snr_gamma)


def configs(plan: Plan, text_encoder: dict) -> tuple[UNetConfig, CLIPTextConfig, SchedulerConfig]:
    return (config_from_dict("unet", plan.models["unet"]), config_from_dict("text_encoder", text_encoder),
            SchedulerConfig.from_diffusers(plan.scheduler))


def initial_params(plan: Plan, text_encoder: dict) -> dict:
    unet, text, _ = configs(plan, text_encoder)
    seed = plan.unet.loop.seed
    return {"unet": init_params(param_template("unet", unet), seed, zero=UNET_ZERO),
            "text_encoder": init_params(param_template("text_encoder", text), seed + 1)}


def train(plan: Plan, workdir: str | Path, text_encoder: dict, dataset: data.LatentDataset, *, mesh=None,
          stop_after: int | None = None, out=None, init: dict | None = None, init_tag: str | None = None):
    """Run (or resume) the UNet stage in ``workdir/unet``. ``text_encoder`` is the config dict completed with
    the vocabulary (:func:`train.architecture.write_tokenizer`). ``init``: starting ``{"unet", "text_encoder"}``
    params instead of the random init (a warm start), identified by ``init_tag`` in the resume fingerprint."""
    cfg, stage = plan.unet.loop, plan.unet
    unet, text, sched = configs(plan, text_encoder)
    batch_fn = functools.partial(data.unet_batch, dataset, batch=cfg.batch, seed=cfg.seed, p_uncond=stage.p_uncond)
    identity = {"unet": stage, "models": [plan.models["unet"], text_encoder], "scheduler": plan.scheduler,
                "scaling_factor": dataset.scaling_factor}
    fp = fingerprint(identity if init_tag is None else dict(identity, init=init_tag))
    return loop.run("unet", Path(workdir) / "unet", initial_params(plan, text_encoder) if init is None else init,
                    loss_for(unet, text, sched, dataset.scaling_factor, stage.min_snr_gamma), batch_fn, cfg,
                    config_fingerprint=fp, mesh=mesh, stop_after=stop_after, out=out)


def trained_params(plan: Plan, workdir: str | Path, text_encoder: dict) -> dict:
    """EMA params ``{"unet", "text_encoder"}`` of the finished UNet stage."""
    unet, text, _ = configs(plan, text_encoder)
    template = {"unet": param_template("unet", unet), "text_encoder": param_template("text_encoder", text)}
    return loop.trained_ema("unet", Path(workdir) / "unet", template, plan.unet.loop)
