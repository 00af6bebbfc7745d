"""The compiled sampling program is reused across calls that change only traced inputs: prompts (same batch
size), negative prompts, guidance scale (still > 1), seed, initial latents, edit values, the active step range
and latent-hook parameters."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff.hooks import AttnEdit, AttnSite, UNetEdits, add_vector
from sample.pipeline import generate, sample_program
from sample.spec import SampleSpec
from sample.steering import Steering, StepHook
from tests.test_sample_fixture import tiny_sd  # noqa: F401 - fixture

TRACES: list = []
SITE = AttnSite("up", 1, 1, 0, "cross")


def counted_edits(i, t, values) -> UNetEdits:
    TRACES.append(1)   # runs only while tracing
    return UNetEdits(hspace=add_vector(values["direction"], scale=values["scale"]),
                     attn={SITE: AttnEdit(logit_bias=values["bias"])})


def nudge(x_in, x_out, captures, ctx, params):
    return x_out + params["shift"] * (ctx.i == params["at"])


def steering(scale: float, lo: int, hi: int, shift: float, seed: int) -> Steering:
    rng = np.random.default_rng(seed)
    values = {"direction": jnp.asarray(rng.standard_normal(64), jnp.float32), "scale": jnp.float32(scale),
              "bias": jnp.asarray(rng.standard_normal((1, 1, 1, 77)), jnp.float32)}
    return Steering(edits=values, edit_fn=counted_edits, active=(np.arange(6) >= lo) & (np.arange(6) < hi),
                    post=(StepHook(nudge, {"shift": jnp.float32(shift), "at": jnp.int32(2)}),))


def spec(guidance: float) -> SampleSpec:
    return SampleSpec(steps=6, guidance=guidance, scheduler="ddim")


def test_new_values_do_not_retrace(tiny_sd):
    model, _ = tiny_sd
    first = generate(model, ["a red circle", "a blue square"], spec=spec(7.5), seed=0,
                     edits=steering(1.0, 0, 3, 0.1, 0))
    traces, cache = len(TRACES), sample_program._cache_size()
    assert traces >= 1
    second = generate(model, ["a green triangle on the grass", "the sky"], spec=spec(3.0),
                      negative_prompts=["water"], seed=1, edits=steering(-2.0, 2, 6, -0.3, 1))
    third = generate(model, ["a photo", "sand"], spec=spec(12.0), init_latents=second.init_latents * 0.5,
                     edits=steering(0.5, 1, 2, 0.0, 2))
    assert len(TRACES) == traces and sample_program._cache_size() == cache
    assert first.timings["compiled"] == 1.0 and second.timings["compiled"] == third.timings["compiled"] == 0.0
    assert not np.array_equal(first.images, second.images) and not np.array_equal(second.images, third.images)
