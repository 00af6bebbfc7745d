"""Stage 1: the AutoencoderKL (Rombach et al. 2022, sec. 3; Kingma & Welling 2014) on rendered scenes.

Loss per image, normalised by the number of pixel values P = H*W*3:

    L = (1/P) sum w * |x - D(z)|  +  kl_weight * (1/P) * KL(q(z|x) || N(0, I)),   z = mean + std * eps,
    KL = 1/2 sum (mean^2 + var - 1 - log var)   (summed over latent elements)

which is LDM's autoencoder objective (summed L1 + 1e-6 x summed KL) without its perceptual and GAN terms, with
a per-pixel weight w = 1 + ``object_weight`` on the objects and their edges (:func:`train.data.object_weights`;
the world's ground-truth masks). Why: with L1 alone a short run spends its capacity on the textured
backgrounds and blurs the 12-px shapes' corners (measured: judge shape accuracy 77% on reconstructions of
held-out scenes after 1500 steps, PSNR 27.7 dB), and no diffusion model can be sharper than its decoder.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.checkpoint import config_from_dict, param_template
from jaxdiff.vae import VAEConfig, vae_decode, vae_encode
from train import data, loop
from train.config import Plan, fingerprint
from train.init import init_params


def vae_loss(params: dict, batch: dict, key, *, config: VAEConfig, kl_weight: float):
    x = batch["images"]
    mean, logvar = vae_encode(params["vae"], x, config=config)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    rec = vae_decode(params["vae"], z, config=config)
    pixels = x[0].size
    err = jnp.abs(rec - x)
    weighted = jnp.mean(batch["weight"] * err)
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar) / (x.shape[0] * pixels)
    mse = jnp.mean(jnp.square(rec - x))
    return weighted + kl_weight * kl, {"l1": jnp.mean(err), "kl": kl, "psnr": 10 * jnp.log10(4.0 / mse)}


@functools.lru_cache(maxsize=8)
def loss_for(config: VAEConfig, kl_weight: float):
    """One loss callable per (config, weight), so :func:`train.loop.compiled_step` reuses its compilation."""
    return functools.partial(vae_loss, config=config, kl_weight=kl_weight)


def vae_config(plan: Plan) -> VAEConfig:
    return config_from_dict("vae", plan.models["vae"])


def initial_params(plan: Plan) -> dict:
    return {"vae": init_params(param_template("vae", vae_config(plan)), seed=plan.vae.loop.seed)}


def train(plan: Plan, workdir: str | Path, *, mesh=None, stop_after: int | None = None, out=None):
    """Run (or resume) the VAE stage in ``workdir/vae``; returns the final :class:`train.loop.TrainState`."""
    cfg = plan.vae.loop
    return loop.run("vae", Path(workdir) / "vae", initial_params(plan),
                    loss_for(vae_config(plan), plan.vae.kl_weight),
                    functools.partial(data.vae_batch, batch=cfg.batch, object_weight=plan.vae.object_weight), cfg,
                    config_fingerprint=fingerprint({"vae": plan.vae, "model": plan.models["vae"]}),
                    mesh=mesh, stop_after=stop_after, out=out)


# A warm start from an exported model (:func:`train.main.warm_start_from_export`) puts that model's VAE here, as a
# diffusers component folder, in place of this stage's checkpoints.
EXPORTED = "vae_exported"


def exported_vae(workdir: str | Path) -> Path | None:
    """The warm-start export's VAE folder in ``workdir`` when there is one (this stage is then not trained)."""
    folder = Path(workdir) / EXPORTED
    return folder if folder.is_dir() else None


def trained_params(plan: Plan, workdir: str | Path) -> dict:
    """EMA params of the finished VAE stage (or the VAE of the export a warm start began from)."""
    if (folder := exported_vae(workdir)) is not None:
        from weights_convert.components import load_component
        return load_component(folder, "vae")[1]
    template = {"vae": param_template("vae", vae_config(plan))}
    return loop.trained_ema("vae", Path(workdir) / "vae", template, plan.vae.loop)["vae"]


def reconstruction_report(params: dict, config: VAEConfig, n: int = 120) -> dict:
    """Judge accuracy and PSNR of the VAE's reconstructions (posterior mean, decoded) of ``n`` held-out eval
    scenes: the ceiling of what any diffusion model decoded by this VAE can score."""
    from jaxdiff.shapesworld import make_eval_scene, score_caption

    scenes = [make_eval_scene(i) for i in range(n)]
    x = data.to_signed(np.stack([s.image for s in scenes]))
    mean, _ = data.encode_images(params, x, config=config)
    rec = np.asarray(jax.jit(vae_decode, static_argnames="config")(params, mean, config=config))
    images = np.clip(np.round((rec / 2 + 0.5) * 255), 0, 255).astype(np.uint8)
    hits: dict = {}
    for image, scene in zip(images, scenes):
        for name, check in score_caption(image, scene.caption).checks.items():
            hits.setdefault(name, []).append(check.passed)
    return {"scenes": n, "psnr": float(10 * np.log10(4.0 / np.mean((rec - x) ** 2))),
            "judge_accuracy": {k: float(np.mean(v)) for k, v in hits.items()}}
