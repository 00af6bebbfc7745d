"""Every scheduler kind through the scanned loop: the scheduler state (PNDM's epsilon history, DPM-Solver++'s
previous data prediction, step counters) rides the scan carry correctly, from the first step and from a
mid-schedule start (img2img), against diffusers' scheduler driven by the same analytic denoiser in a Python
loop; stochastic kinds draw reproducibly from the explicit key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.schedulers import SchedulerConfig, make_schedule
from sample.loop import denoise
from tests.conftest import max_abs
from tests.test_sample_captures import fake_model
from tests.test_sample_fixture import torch_one_thread  # noqa: F401 - fixture

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "steps_offset": 1, "skip_prk_steps": True, "set_alpha_to_one": False, "clip_sample": False}
DETERMINISTIC = ["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"]
STEPS = 8
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def fake_numpy(x: np.ndarray, t) -> np.ndarray:
    """``fake_model``'s output in float32 numpy, for the torch side."""
    return (0.3 * np.sin(2.0 * x + np.float32(float(t) / 1000.0))).astype(np.float32)


def ours(kind: str, x: np.ndarray, start: int = 0, key: int = 0) -> np.ndarray:
    schedule = make_schedule(SchedulerConfig.from_diffusers(SD_CONFIG, kind=kind), STEPS)
    run = jax.jit(lambda x: denoise(fake_model, schedule, x, guided=False, guidance=jnp.float32(1.0),
                                    key=jax.random.PRNGKey(key), start=start)[0])
    return np.asarray(run(jnp.asarray(x)))


@pytest.mark.parametrize("start", [0, 3])
@pytest.mark.parametrize("kind", DETERMINISTIC)
def test_loop_matches_diffusers_scheduler(kind, start):
    sched = getattr(diffusers, kind).from_config(SD_CONFIG)
    sched.set_timesteps(STEPS)
    if start and hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32) * float(sched.init_noise_sigma)
    xt = torch.from_numpy(x)
    for t in sched.timesteps[start:]:
        model_in = sched.scale_model_input(xt, t).numpy()
        xt = sched.step(torch.from_numpy(fake_numpy(model_in, t)), t, xt).prev_sample
    ref = xt.numpy()
    err = max_abs(ours(kind, x, start), ref, f"loop with {kind} from step {start}")
    print(f"{kind} from step {start}: {err:.2e} (ref std {ref.std():.3f})")
    assert err <= 1e-5 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("kind", ["DDPMScheduler", "EulerAncestralDiscreteScheduler"])
def test_stochastic_kinds_use_the_key(kind):
    x = np.random.default_rng(1).standard_normal((2, 4, 4, 3)).astype(np.float32)
    a, b, c = ours(kind, x, key=0), ours(kind, x, key=0), ours(kind, x, key=1)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2
    assert np.isfinite(ours(kind, x, start=3)).all()
