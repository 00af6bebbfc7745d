"""Per-layer profile of one UNet forward, jaxdiff vs diffusers' PyTorch: where does the time go?

    python -m bench.unet_blocks --weights /tmp/jaxdiff-bench/sd15 [--batch 1] [--repeats 3]

Runs diffusers' ``UNet2DConditionModel`` once with forward pre-hooks on every ResnetBlock2D, Transformer2D,
Downsample2D and Upsample2D to record their actual inputs, then times each of these layers on those inputs:
the torch module (fp32, threads = cores, inference_mode) and the matching jaxdiff function, jitted alone
(``resnet`` / ``transformer2d`` / ``downsample`` / ``upsample`` on the converted params, NHWC). Prints one row
per layer with both times, their ratio and the layer's analytic FLOPs, then totals per layer kind. Both
frameworks share one process here (timing only; bench/unet_step.py measures memory separately).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np

from bench import measure
from bench.inputs import unet_inputs


def record_layer_inputs(model, raw: dict) -> list[tuple[str, str, tuple, dict]]:
    """(module path, kind, args, kwargs) of every resnet / transformer / resampler call, in call order."""
    import torch
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    kinds = {ResnetBlock2D: "resnet", Transformer2DModel: "transformer", Downsample2D: "downsample",
             Upsample2D: "upsample"}
    calls, handles = [], []
    for name, mod in model.named_modules():
        kind = kinds.get(type(mod))
        if kind:
            def hook(m, args, kwargs, name=name, kind=kind):
                calls.append((name, kind, args, dict(kwargs)))
            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.inference_mode():
        model(torch.from_numpy(raw["sample"]), torch.from_numpy(raw["timestep"]), torch.from_numpy(raw["context"]))
    for h in handles:
        h.remove()
    return calls


def _nhwc(t):
    return np.transpose(t.numpy(), (0, 2, 3, 1))


def jax_layer(name: str, kind: str, args: tuple, kwargs: dict, params: dict, cfg):
    """The jitted jaxdiff function and its (NHWC) inputs for one recorded torch call."""
    import jax

    from jaxdiff.conv_blocks import downsample, resnet, upsample
    from jaxdiff.unet_blocks import transformer2d

    p = params
    for key in _param_path(name).split("/"):   # down_blocks.0.resnets.1 -> params["down_blocks_0"]["resnets_1"]
        p = p[key]
    x = _nhwc(args[0])
    if kind == "resnet":
        fn = jax.jit(partial(resnet, groups=cfg.norm_num_groups, eps=cfg.norm_eps))
        return fn, (p, x, args[1].numpy())
    if kind == "transformer":
        spec = _transformer_spec(name, cfg)
        fn = jax.jit(partial(transformer2d, spec=spec))
        return fn, (p, x, kwargs["encoder_hidden_states"].numpy())
    if kind == "downsample":
        return jax.jit(downsample), (p, x)
    size = kwargs.get("output_size") or (len(args) > 1 and args[1]) or None
    return jax.jit(partial(upsample, size=tuple(size) if size else None)), (p, x)


def _run_jax(fn, args):
    import jax

    return jax.block_until_ready(fn(*args))


def _transformer_spec(name: str, cfg):
    keys = name.split(".")
    if keys[0] == "mid_block":
        return cfg.mid_spec().transformer
    specs = cfg.down_specs() if keys[0] == "down_blocks" else cfg.up_specs()
    return specs[int(keys[1])].transformer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.unet_blocks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="folder with unet/ (written by bench.unet_step)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import torch
    from diffusers import UNet2DConditionModel

    from jaxdiff.flops import unet_flops
    from weights_convert.components import load_component

    torch.set_num_threads(os.cpu_count())
    folder = Path(args.weights) / "unet"
    model = UNet2DConditionModel.from_pretrained(folder).eval()
    cfg, params = load_component(folder, "unet")
    raw = unet_inputs(dict(model.config), args.batch)
    calls = record_layer_inputs(model, raw)
    n = raw["sample"].shape[-1]
    ops = unet_flops(cfg, args.batch, n, n, raw["context"].shape[1]).ops
    totals = defaultdict(lambda: [0.0, 0.0, 0.0])
    print("| layer | kind | torch s | jaxdiff s | torch/jax | GFLOP | jax GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for name, kind, targs, tkw in calls:
        mod = model.get_submodule(name)
        with torch.inference_mode():
            t_torch = min(measure.time_calls(partial(mod, *targs, **tkw), args.repeats, 1))
        fn, jargs = jax_layer(name, kind, targs, tkw, params, cfg)
        t_jax = min(measure.time_calls(partial(_run_jax, fn, jargs), args.repeats, 1))
        prefix = _param_path(name) + "/"
        gf = sum(op.flops for op in ops if op.path.startswith(prefix)) / 1e9
        tot = totals[kind]
        tot[0] += t_torch
        tot[1] += t_jax
        tot[2] += gf
        print(f"| {name} | {kind} | {t_torch:.4f} | {t_jax:.4f} | {t_torch / t_jax:.2f} | {gf:.1f} | "
              f"{gf / t_jax:.0f} |", flush=True)
    print("\n| kind | torch s | jaxdiff s | torch/jax | GFLOP |")
    print("|---|---|---|---|---|")
    for kind, (tt, tj, gf) in totals.items():
        print(f"| {kind} | {tt:.3f} | {tj:.3f} | {tt / tj:.2f} | {gf:.0f} |")
    tt, tj = sum(v[0] for v in totals.values()), sum(v[1] for v in totals.values())
    print(f"| all | {tt:.3f} | {tj:.3f} | {tt / tj:.2f} | {sum(v[2] for v in totals.values()):.0f} |")
    return 0


def _param_path(name: str) -> str:
    """torch module path -> the prefix of jaxdiff.flops op paths of that layer."""
    keys = name.split(".")
    out, i = [], 0
    while i < len(keys):
        if i + 1 < len(keys) and keys[i + 1].isdigit():
            out.append(f"{keys[i]}_{keys[i + 1]}")
            i += 2
        else:
            out.append(keys[i])
            i += 1
    return "/".join(out)


if __name__ == "__main__":
    sys.exit(main())
