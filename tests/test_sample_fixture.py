"""The tiny SD1 model every ``test_sample_*`` file samples from, built once per session, and its sanity checks.

The model is :func:`sample.demo.random_demo_model` (SD1 architecture, 32x32 pixels, 16x16 latents, random
weights of std 0.05, a CLIP-BPE vocabulary) exported as a real diffusers folder and read back through
``weights_convert.pipeline.load_any``, the path a downloaded checkpoint takes. One change: the UNet's
``conv_out`` is scaled by 0.1. A random UNet with O(1) outputs makes 10 guided DDIM steps chaotic (a 1e-6
perturbation of the initial latents grows ~1000x, and diffusers itself differs by 6e-4 between batch sizes),
so no implementation could match another to 1e-5; with a small predicted noise every layer is still exercised
at full scale but the dynamics stay tame. DDIM inversion of such a model converges too.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest

from jaxdiff.checkpoint import StableDiffusionModel

PROMPTS = ["a red circle above a blue square", "a green triangle on the grass"]
NEGATIVES = ["water", "sky"]
EPS_SCALE = 0.1   # UNet conv_out scale (see the module docstring)


def tiny_folder(root) -> str:
    """Write the tiny model as a diffusers folder under ``root``; returns its path."""
    from sample.demo import random_demo_model
    from weights_convert.export import export_diffusers_folder

    model = damp_unet_output(random_demo_model(root / "src", seed=0))
    return str(export_diffusers_folder(model, root / "diffusers"))


def damp_unet_output(model: StableDiffusionModel) -> StableDiffusionModel:
    """``model`` with the UNet's ``conv_out`` scaled by ``EPS_SCALE`` (see the module docstring)."""
    unet = dict(model.params["unet"])
    unet["conv_out"] = {k: v * EPS_SCALE for k, v in unet["conv_out"].items()}
    return dataclasses.replace(model, params={**model.params, "unet": unet})


def sample_images() -> np.ndarray:
    """Two 32x32 uint8 images: colour gradients with a disc and a bar, so the VAE sees structure."""
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    a = np.stack([xx, yy, 1 - xx], -1)
    a[(yy - 0.4) ** 2 + (xx - 0.6) ** 2 < 0.05] = (1.0, 0.1, 0.1)
    b = np.stack([yy, 0.5 + 0 * xx, xx * yy], -1)
    b[10:16, 4:28] = (0.1, 0.2, 0.9)
    return (np.stack([a, b]) * 255).round().astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _tiny_sd(basetemp: str) -> tuple[StableDiffusionModel, str]:
    from weights_convert.pipeline import load_any

    folder = tiny_folder(Path(basetemp) / "tiny_sd")
    return load_any(folder), folder


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> tuple[StableDiffusionModel, str]:
    """(model loaded with load_any, diffusers folder path). Every module that imports this fixture gets its own
    copy of the definition, so the build is memoised per session's temporary folder to happen once."""
    return _tiny_sd(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def torch_one_thread():
    """The PyTorch reference on one thread for the module: the tiny models gain nothing from more, and on a
    shared 2-core machine OpenMP threads spin against other processes (a 10-step tiny pipeline took 5 s with 2
    threads under load, 0.2 s with 1)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_model_is_not_trivial(tiny_sd):
    from sample.pipeline import generate
    from sample.spec import SampleSpec

    model, _ = tiny_sd
    assert not model.is_sdxl and model.configs["unet"].sample_size == 16
    spec = SampleSpec(steps=10, scheduler="ddim")
    res = generate(model, PROMPTS, spec=spec, negative_prompts=NEGATIVES, seed=0)
    other = generate(model, PROMPTS, spec=spec, seed=0)   # same noise, "" instead of the negative prompts
    assert res.images.shape == (2, 32, 32, 3) and res.images.dtype == np.uint8
    assert res.latents.shape == res.init_latents.shape == (2, 16, 16, 4)
    print(f"image std {res.images.std():.1f}, latent std {res.latents.std():.3f}, negative prompt moves latents "
          f"by {np.abs(res.latents - other.latents).max():.3f}")
    assert res.images.std() > 20 and res.latents.std() > 0.1
    assert np.abs(res.latents - other.latents).max() > 1e-2
