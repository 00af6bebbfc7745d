"""SDXL sampling against diffusers' ``StableDiffusionXLPipeline`` on a tiny random SDXL-architecture model:
two text encoders (penultimate states concatenated, pooled projection of the second), ``text_time``
micro-conditioning from original size / crop / target size, zeroed unconditional embeddings without a
negative prompt (``force_zeros_for_empty_prompt``), Euler sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxdiff.checkpoint import StableDiffusionModel, config_from_dict, param_template
from jaxdiff.nn import random_maker
from jaxdiff.vocab import write_clip_vocab
from sample.demo import DEMO_CONFIGS, DEMO_WORDS
from sample.pipeline import generate
from sample.spec import SampleSpec
from tests.conftest import max_abs, nchw_to_nhwc, nhwc_to_nchw
from tests.test_sample_fixture import PROMPTS, damp_unet_output, torch_one_thread  # noqa: F401 - fixture

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TEXT = dict(model_type="clip_text_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5)
CONFIGS = {
    "unet": {"_class_name": "UNet2DConditionModel", "sample_size": 16, "block_out_channels": [32, 64],
             "layers_per_block": 1, "norm_num_groups": 8, "cross_attention_dim": 64, "attention_head_dim": [2, 4],
             "use_linear_projection": True, "transformer_layers_per_block": [1, 2],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "addition_embed_type": "text_time",
             "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 24 + 6 * 8},
    "vae": {**DEMO_CONFIGS["vae"], "scaling_factor": 0.13025, "force_upcast": True},
    "text_encoder": {**TEXT, "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "projection_dim": 32},
    "text_encoder_2": {**TEXT, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
                       "projection_dim": 24},
}
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading"}
STEPS, GUIDANCE = 8, 6.0
SIZES = dict(original_size=(48, 40), crop_top_left=(4, 2), target_size=(32, 32))
TORCH_SIZES = dict(original_size=(48, 40), crops_coords_top_left=(4, 2), target_size=(32, 32))   # diffusers' names


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from weights_convert.export import export_diffusers_folder
    from weights_convert.pipeline import load_any

    root = tmp_path_factory.mktemp("tiny_sdxl")
    tok = write_clip_vocab(root / "tokenizer", DEMO_WORDS)
    vocab = json.loads((tok / "vocab.json").read_text())
    dicts = json.loads(json.dumps(CONFIGS))
    for name in ("text_encoder", "text_encoder_2"):
        dicts[name].update(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                           eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    configs = {n: config_from_dict(n, d) for n, d in dicts.items()}
    mk = random_maker(1, std=0.05)
    params = {n: param_template(n, c, mk) for n, c in configs.items()}
    model = damp_unet_output(StableDiffusionModel(configs, params, dicts, SCHEDULER,
                                                  {"tokenizer": str(tok), "tokenizer_2": str(tok)}))
    folder = export_diffusers_folder(model, root / "diffusers")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return load_any(folder), pipe


@pytest.mark.parametrize("negatives", [None, ["water", "sky"]], ids=["zeroed_uncond", "negative_prompts"])
def test_sdxl_txt2img(sdxl, negatives):
    model, pipe = sdxl
    assert model.is_sdxl
    x = np.random.default_rng(2).standard_normal((2, 16, 16, 4)).astype(np.float32)
    with torch.no_grad():
        ref = pipe(PROMPTS, negative_prompt=negatives, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   latents=torch.from_numpy(nhwc_to_nchw(x)), output_type="latent", **TORCH_SIZES).images.numpy()
    ref = nchw_to_nhwc(ref)
    spec = SampleSpec(steps=STEPS, guidance=GUIDANCE, **SIZES)
    ours = generate(model, PROMPTS, spec=spec, negative_prompts=negatives, init_latents=x)
    err = max_abs(ours.latents, ref, f"sdxl euler final latents ({'negatives' if negatives else 'zero uncond'})")
    print(f"SDXL euler, negatives={negatives}: latents max-abs {err:.2e} (ref std {ref.std():.3f})")
    assert err <= 1e-5 * max(1.0, float(np.abs(ref).max()))
    # the micro-conditioning matters: other sizes give other latents
    other = generate(model, PROMPTS, spec=SampleSpec(steps=STEPS, guidance=GUIDANCE), negative_prompts=negatives,
                     init_latents=x)
    assert other.timings["compiled"] == 0.0 and np.abs(other.latents - ours.latents).max() > 1e-4
