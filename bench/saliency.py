"""Cost of Abs-Grad-SAM's exact saliency (one VJP per latent element, :mod:`jaxdiff.steer.abs_grad_sam`).

    python -m bench.saliency                                  # the embedded ShapesWorld model, SD1.5 at 32x32
    python -m bench.saliency --configs shapesworld --repeats 5
    python -m bench.saliency --configs sd15 --latent 64       # the reference's 16,384 VJPs (GPU-sized)

Per config: one jitted saliency of one subject word at the default site (the last up-block cross-attention),
batch 1, float32, against one jitted UNet forward of the same inputs (the ratio is the saliency's cost in UNet
evaluations). Per image = three replacement steps (the reference's count). The SD1.5-size UNet has random
weights (``jaxdiff.nn.random_maker``; the cost does not depend on the values). Prints one JSON line per config
and a markdown table; the load average is recorded next to every figure (CPU shared with other work).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench import measure


def config_and_params(name: str):
    import jax.numpy as jnp

    from jaxdiff.checkpoint import param_template
    from jaxdiff.nn import random_maker
    from jaxdiff.unet import UNetConfig

    if name == "shapesworld":
        from sample.cli import load_model
        model = load_model(None, "float32")
        return model.configs["unet"], model.params["unet"]
    from weights_convert.single_file import read_preset
    cfg = UNetConfig.from_diffusers(dict(read_preset("sd15")["unet"]))
    params = param_template("unet", cfg, random_maker(0))
    import jax
    return cfg, jax.tree.map(jnp.asarray, params)


def measure_config(name: str, latent: int | None, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.hooks import UNetEdits
    from jaxdiff.steer import abs_grad_sam as ags
    from jaxdiff.unet import apply_unet
    from sample.background import resolve_sites

    cfg, params = config_and_params(name)
    size = latent or cfg.sample_size
    site = resolve_sites(cfg, ())[0]
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (1, size, size, cfg.in_channels))
    ctx = jax.random.normal(jax.random.fold_in(key, 1), (1, 77, cfg.cross_attention_dim))
    t = jnp.float32(500.0)
    onehot = jnp.zeros((1, 4, 77)).at[0, 0, 2].set(1.0)
    weights = jnp.zeros((1, 4, 4)).at[0, 0, 0].set(1.0)
    scfg = ags.SaliencyConfig((site,))

    def forward(p, x):
        return apply_unet(p, x, t, ctx, config=cfg)[0]

    def saliency(p, x):
        def model(z, tt, edits, capture):
            return apply_unet(p, z, tt, ctx, config=cfg, edits=edits, capture=capture)
        return ags.denoiser_saliency(model, x, t, UNetEdits(), onehot, weights, scfg)

    out = {"config": name, "latent": size, "elements": size * size * cfg.in_channels, "site": site.path}
    for what, fn in (("forward", jax.jit(forward)), ("saliency", jax.jit(saliency))):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, x))
        out[f"{what}_compile_s"] = time.perf_counter() - t0
        load = measure.loadavg()
        times = measure.time_calls(lambda: jax.block_until_ready(fn(params, x)), repeats, warmup=0)
        out[f"{what}_s"] = float(np.median(times))
        out[f"{what}_load"] = load
    out["saliency_per_image_s"] = 3 * out["saliency_s"]
    out["forwards_per_saliency"] = out["saliency_s"] / out["forward_s"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.saliency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["shapesworld", "sd15"], choices=["shapesworld", "sd15"])
    ap.add_argument("--latent", type=int, default=None, help="latent size of sd15 (default 32)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    rows = []
    for name in args.configs:
        latent = args.latent if name == "sd15" else None
        res = measure_config(name, latent or (32 if name == "sd15" else None), args.repeats)
        print(measure.RESULT_PREFIX + json.dumps(res), flush=True)
        rows.append(res)
    print("| UNet | latent | VJPs (elements) | saliency s / replacement step | s / image (3 steps) | "
          "UNet forwards per saliency | compile s | load |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['latent']}x{r['latent']} | {r['elements']} | {r['saliency_s']:.2f} | "
              f"{r['saliency_per_image_s']:.2f} | {r['forwards_per_saliency']:.0f} | {r['saliency_compile_s']:.1f} | "
              f"{r['saliency_load']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
