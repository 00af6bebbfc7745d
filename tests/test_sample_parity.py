"""End-to-end parity of the compiled sampling program with diffusers' pipelines (PyTorch CPU, float32).

The tiny SD1 model (tests/test_sample_fixture.py) is loaded by diffusers from its diffusers folder and by us
through ``load_any``; both get the same prompts, negative prompts and initial noise. Compared: the final
latents (diffusers ``output_type="latent"``) and the uint8 images. For reference each test also logs
diffusers against itself run with batch 1 instead of 2 (different kernel blocking), the floating-point noise
floor of the comparison.
"""

from __future__ import annotations

import numpy as np
import pytest

from sample.pipeline import generate, img2img
from sample.spec import SampleSpec
from tests.conftest import max_abs, nchw_to_nhwc, nhwc_to_nchw
from tests.test_sample_fixture import (NEGATIVES, PROMPTS, sample_images, tiny_sd,  # noqa: F401 - fixtures
                                      torch_one_thread)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

LATENT_TOL = 1e-4        # measured 2e-5 (DDIM), see the parity table; diffusers vs itself: ~1e-5
PIXEL_TOL, PIXEL_FRACTION = 1, 0.99
STEPS, GUIDANCE, STRENGTH = 10, 7.5, 0.6


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def pipes(tiny_sd):
    _, folder = tiny_sd
    txt = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                            requires_safety_checker=False)
    txt.set_progress_bar_config(disable=True)
    i2i = diffusers.StableDiffusionImg2ImgPipeline(**txt.components)
    i2i.set_progress_bar_config(disable=True)
    return txt, i2i


def _with_scheduler(pipe, cls_name):
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config)
    return pipe


def _torch_run(pipe, prompts, negatives, **kw):
    """diffusers' final latents (NHWC) and uint8 images for the same call."""
    with torch.no_grad():
        latents = pipe(prompts, negative_prompt=negatives, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       output_type="latent", **{k: v() if callable(v) else v for k, v in kw.items()}).images
        images = pipe(prompts, negative_prompt=negatives, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      output_type="np", **{k: v() if callable(v) else v for k, v in kw.items()}).images
    return nchw_to_nhwc(latents.numpy()), (images * 255).round().astype(np.uint8)


def _compare(ours, ref_latents, ref_images, what):
    err = max_abs(ours.latents, ref_latents, f"{what} final latents")
    diff = np.abs(ours.images.astype(int) - ref_images.astype(int))
    within = float((diff <= PIXEL_TOL).mean())
    print(f"{what}: latents max-abs {err:.2e} (ref std {ref_latents.std():.3f}); pixels within +-{PIXEL_TOL}: "
          f"{100 * within:.2f}% (max diff {diff.max()})")
    assert err <= LATENT_TOL
    assert within >= PIXEL_FRACTION


def _noise_floor(pipe, ref_latents, what, **kw):
    """diffusers on the first prompt alone vs the same row of the batch-2 run (logged, not asserted)."""
    latents, _ = _torch_run(pipe, PROMPTS[:1], NEGATIVES[:1], **kw)
    err = max_abs(latents, ref_latents[:1], what + " diffusers noise floor")
    print(f"{what}: diffusers batch-1 vs batch-2 {err:.2e}")


@pytest.mark.parametrize("scheduler,cls_name", [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler")])
def test_txt2img(tiny_sd, pipes, scheduler, cls_name):
    model, _ = tiny_sd
    pipe = _with_scheduler(pipes[0], cls_name)
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    ref_latents, ref_images = _torch_run(pipe, PROMPTS, NEGATIVES, latents=lambda: torch.from_numpy(nhwc_to_nchw(x)))
    ours = generate(model, PROMPTS, spec=SampleSpec(steps=STEPS, guidance=GUIDANCE, scheduler=scheduler),
                    negative_prompts=NEGATIVES, init_latents=x)
    np.testing.assert_array_equal(ours.init_latents, x)
    _compare(ours, ref_latents, ref_images, f"txt2img {scheduler}")
    _noise_floor(pipe, ref_latents, f"txt2img {scheduler}",
                 latents=lambda: torch.from_numpy(nhwc_to_nchw(x[:1])))


def test_img2img(tiny_sd, pipes):
    """StableDiffusionImg2ImgPipeline, DDIM, strength 0.6. diffusers draws the VAE posterior sample and then the
    added noise from one generator; we replay both draws and pass them in."""
    from PIL import Image

    model, _ = tiny_sd
    pipe = _with_scheduler(pipes[1], "DDIMScheduler")
    images = sample_images()
    seed = 3
    g = torch.Generator().manual_seed(seed)
    vae_noise = torch.randn((2, 4, 16, 16), generator=g).numpy()
    noise = torch.randn((2, 4, 16, 16), generator=g).numpy()
    ref_latents, ref_images = _torch_run(pipe, PROMPTS, NEGATIVES, image=[Image.fromarray(i) for i in images],
                                         strength=STRENGTH, generator=lambda: torch.Generator().manual_seed(seed))
    spec = SampleSpec(steps=STEPS, guidance=GUIDANCE, scheduler="ddim", strength=STRENGTH)
    ours = img2img(model, PROMPTS, images, spec=spec, negative_prompts=NEGATIVES, noise=nchw_to_nhwc(noise),
                   vae_noise=nchw_to_nhwc(vae_noise))
    _compare(ours, ref_latents, ref_images, "img2img ddim strength 0.6")
    # generate() is img2img when given init_image: init_latents is the added noise, the VAE draw comes from seed
    routed = generate(model, PROMPTS, spec=spec, negative_prompts=NEGATIVES, init_image=images,
                      init_latents=nchw_to_nhwc(noise), seed=5)
    direct = img2img(model, PROMPTS, images, spec=spec, negative_prompts=NEGATIVES, noise=nchw_to_nhwc(noise),
                     seed=5)
    assert routed.timings["compiled"] == 0.0   # the program compiled for img2img() above
    np.testing.assert_array_equal(routed.init_latents, nchw_to_nhwc(noise))
    np.testing.assert_array_equal(routed.latents, direct.latents)
