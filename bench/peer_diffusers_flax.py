"""diffusers-Flax 0.39 peer for bench/unet_step.py: ``FlaxUNet2DConditionModel`` on the same weights and inputs.

Runs in ``bench/.venv-flax`` (created by ``bench/peer_diffusers_flax.sh``; diffusers 0.39 is the last release
with Flax and cannot share a virtualenv with the tests' 0.42), from the repository root:

    bench/.venv-flax/bin/python -m bench.peer_diffusers_flax --weights /tmp/jaxdiff-bench/sd15 --batch 1

Weights: the PyTorch-format safetensors written by bench/unet_step.py, renamed by diffusers' own
``convert_pytorch_state_dict_to_flax``. That function wants torch tensors and a randomly initialised model
(``init_weights``: ~1 min of Flax init for SD1.5 on 2 cores, only to read shapes); here it gets numpy arrays
behind a ``.numpy()`` shim and ``jax.eval_shape`` of ``init_weights`` (shapes for free). Prints one RESULT line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import measure
from bench.inputs import unet_inputs


class _NumpyTensor:
    """What ``convert_pytorch_state_dict_to_flax`` needs of a torch tensor: ``.numpy()``."""

    def __init__(self, array):
        self.array = array

    def numpy(self):
        return self.array


class _ShapeOnlyInit:
    """A stand-in model whose ``init_weights`` returns shapes (``jax.eval_shape``), not random arrays."""

    def __init__(self, model):
        self.model = model

    def init_weights(self, rng):
        import jax

        return jax.eval_shape(self.model.init_weights, rng)


def load_flax_unet(folder: Path):
    """-> (model, params) from a diffusers ``unet/`` folder (config.json + safetensors)."""
    from diffusers import FlaxUNet2DConditionModel
    from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    model = FlaxUNet2DConditionModel.from_config(config)
    state = {k: _NumpyTensor(v) for k, v in load_file(folder / "diffusion_pytorch_model.safetensors").items()}
    params = convert_pytorch_state_dict_to_flax(state, _ShapeOnlyInit(model))
    return model, config, params


def run(folder: Path, batch: int, repeats: int, warmup: int, save_output: str | None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    t0 = time.perf_counter()
    model, config, params = load_flax_unet(folder / "unet")
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    peak_load = measure.peak_rss_bytes()
    measure.reset_peak_rss()
    rss_before_run = measure.rss_bytes()

    raw = unet_inputs(config, batch)
    x, t, ctx = (jnp.asarray(raw[k]) for k in ("sample", "timestep", "context"))
    added = {k: jnp.asarray(raw[k]) for k in ("text_embeds", "time_ids")} if "time_ids" in raw else None

    def step(p, x, t, ctx, added):
        return model.apply({"params": p}, x, t, ctx, added_cond_kwargs=added).sample

    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(params, x, t, ctx, added).compile()
    compile_s = time.perf_counter() - t0
    times = measure.time_calls(lambda: compiled(params, x, t, ctx, added).block_until_ready(), repeats, warmup)
    if save_output:
        np.save(save_output, np.asarray(compiled(params, x, t, ctx, added), np.float32))
    return {"framework": "diffusers-flax-0.39", "backend": jax.default_backend(), "dtype": "float32",
            "batch": batch, "load_s": load_s, "compile_s": compile_s, "peak_rss_load": peak_load,
            "rss_before_run": rss_before_run,
            "peak_rss_run": measure.peak_rss_bytes(), "versions": measure.versions(("diffusers", "jax", "flax")),
            **measure.summarize(times)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peer_diffusers_flax", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="folder holding unet/ (written by bench.unet_step)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--save-output", help="write the NCHW output here (.npy)")
    args = ap.parse_args(argv)
    measure.emit_result(run(Path(args.weights), args.batch, args.repeats, args.warmup, args.save_output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
