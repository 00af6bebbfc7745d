"""Time the pipeline's pieces at full size, to size a :class:`train.config.Plan` for a machine.

    python -m train.calibrate [--plan cpu] [--steps 5] [--vae-batch 16] [--unet-batch 32]

Prints seconds per step of the VAE and UNet training steps (compiled; compile time reported separately),
scene rendering and latent-encoding throughput, and the wall time the plan would take at those rates.
Random data of the right shapes is enough: the step's cost does not depend on the values.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time

import jax
import numpy as np

from train import architecture, data, loop, unet_stage, vae_stage
from train.config import PLANS, Plan


def time_steps(step_fn, state, batch: dict, steps: int) -> tuple[float, float]:
    """(compile + first step seconds, mean seconds of the next ``steps`` steps)."""
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    return first, (time.perf_counter() - t0) / steps


def calibrate(plan: Plan, steps: int, mesh=None) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    t0 = time.perf_counter()
    images, _ = data.scene_images(range(64))
    out["render_s_per_scene"] = (time.perf_counter() - t0) / 64

    vb = plan.vae.loop.batch
    vae_batch = {"images": data.to_signed(np.concatenate([images] * (vb // 64 + 1))[:vb])}
    state = loop.init_state(vae_stage.initial_params(plan), plan.vae.loop)
    loss = vae_stage.loss_for(vae_stage.vae_config(plan), plan.vae.kl_weight)
    out["vae_compile_s"], out["vae_s_per_step"] = time_steps(loop.compiled_step(loss, plan.vae.loop, mesh), state,
                                                             vae_batch, steps)
    signed = data.to_signed(images)
    for _ in range(2):                                  # the first call compiles
        t0 = time.perf_counter()
        jax.block_until_ready(data.encode_images(state.params["vae"], signed, config=vae_stage.vae_config(plan)))
    out["encode_s_per_scene"] = (time.perf_counter() - t0) / 64

    with tempfile.TemporaryDirectory() as tmp:
        text = architecture.write_tokenizer(tmp, plan.models["text_encoder"])
    unet_cfg, text_cfg, sched = unet_stage.configs(plan, text)
    ub = plan.unet.loop.batch
    shape = (ub, unet_cfg.sample_size, unet_cfg.sample_size, unet_cfg.in_channels)
    unet_batch = {"mean": rng.standard_normal(shape, np.float32), "std": np.full(shape, 0.01, np.float32),
                  "ids": rng.integers(0, text["vocab_size"], (ub, architecture.MAX_TOKENS)).astype(np.int32)}
    state = loop.init_state(unet_stage.initial_params(plan, text), plan.unet.loop)
    loss = unet_stage.loss_for(unet_cfg, text_cfg, sched, 1.0, plan.unet.min_snr_gamma)
    out["unet_compile_s"], out["unet_s_per_step"] = time_steps(loop.compiled_step(loss, plan.unet.loop, mesh), state,
                                                               unet_batch, steps)
    n = plan.unet.dataset_size
    out["plan_minutes"] = {
        "vae": plan.vae.loop.steps * (out["vae_s_per_step"] + vb * out["render_s_per_scene"]) / 60,
        "latents": n * (out["render_s_per_scene"] + out["encode_s_per_scene"]) / 60,
        "unet": plan.unet.loop.steps * out["unet_s_per_step"] / 60}
    out["plan_minutes"]["total"] = sum(out["plan_minutes"].values())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default="cpu", choices=sorted(PLANS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--vae-batch", type=int)
    ap.add_argument("--unet-batch", type=int)
    args = ap.parse_args(argv)
    plan = PLANS[args.plan]
    if args.vae_batch:
        plan = dataclasses.replace(plan, vae=dataclasses.replace(
            plan.vae, loop=dataclasses.replace(plan.vae.loop, batch=args.vae_batch)))
    if args.unet_batch:
        plan = dataclasses.replace(plan, unet=dataclasses.replace(
            plan.unet, loop=dataclasses.replace(plan.unet.loop, batch=args.unet_batch)))
    from sample.sharding import resolve_mesh

    mesh = resolve_mesh(None, min(plan.vae.loop.batch, plan.unet.loop.batch))   # all local devices, if several
    print(f"devices: {jax.local_device_count()} ({'data-parallel mesh' if mesh is not None else 'no mesh'})")
    for k, v in calibrate(plan, args.steps, mesh).items():
        print(f"{k}: {v if not isinstance(v, float) else round(v, 4)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
