"""Two-tower CLIP (vision tower, projections, logit_scale), its converter and image preprocessing vs transformers
(PyTorch), on tiny random ``CLIPConfig``s."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from tests.conftest import max_abs

TOL = 1e-5


def tiny_clip_config(vocab_size=1000, eos=2, act="quick_gelu", image_size=32, patch=8, projection_dim=16):
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act=act, eos_token_id=eos,
                bos_token_id=vocab_size - 2, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=patch, hidden_act=act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_tiny_clip(folder, seed=0, **kw):
    """A random transformers CLIPModel (LN scales/biases random too, logit_scale != init) saved to ``folder``."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    m = CLIPModel(tiny_clip_config(**kw)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ("layer_norm" in n or "layrnorm" in n) and n.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        m.logit_scale.fill_(2.0)
    m.save_pretrained(folder, safe_serialization=True)
    return m


def _ids(b=3, t=77, seed=0):
    """BOS, random words, EOS (999, the largest id: legacy eos_token_id 2 pools at argmax) then EOS padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 990, size=(b, t)).astype(np.int64)
    ids[:, 0] = 998
    for i, n in enumerate([4, 9, 30][:b]):
        ids[i, n:] = 999
    return ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    folder = tmp_path_factory.mktemp("clip") / "model"
    m = save_tiny_clip(folder, seed=1)
    pixels = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = _ids()
    with torch.no_grad():
        out = m(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels))
        vis = m.vision_model(pixel_values=torch.from_numpy(pixels))
    return folder, pixels, ids, out, vis


def test_clip_model_parity(tiny):
    from jaxdiff.clip_model import image_embeds, logits_per_image, text_embeds
    from jaxdiff.clip_vision import apply_clip_vision
    from weights_convert.clip_model import load_clip_model

    folder, pixels, ids, out, vis = tiny
    cfg, params = load_clip_model(folder)
    assert cfg.projection_dim == 16 and cfg.vision.num_positions == 17 and cfg.text.hidden_size == 32
    x = np.transpose(pixels, (0, 2, 3, 1))
    last, pooled = apply_clip_vision(params["vision_model"], x, config=cfg.vision)
    assert max_abs(last, vis.last_hidden_state.numpy(), "clip vision last_hidden_state") <= TOL
    assert max_abs(pooled, vis.pooler_output.numpy(), "clip vision pooled") <= TOL
    img = image_embeds(params, x, config=cfg)
    txt = text_embeds(params, ids, config=cfg)
    assert max_abs(img, out.image_embeds.numpy(), "clip image_embeds") <= TOL
    assert max_abs(txt, out.text_embeds.numpy(), "clip text_embeds") <= TOL
    logits = logits_per_image(img, txt, params["logit_scale"])
    assert logits.shape == (2, 3)
    assert max_abs(logits, out.logits_per_image.numpy(), "clip logits_per_image") <= TOL


def test_jit_and_gelu_variant(tmp_path):
    import jax
    import torch

    from jaxdiff.clip_model import image_embeds
    from weights_convert.clip_model import load_clip_model

    m = save_tiny_clip(tmp_path, seed=3, act="gelu", image_size=24, patch=6)
    cfg, params = load_clip_model(tmp_path)
    assert cfg.vision.hidden_act == "gelu" and cfg.text.hidden_act == "gelu" and cfg.vision.image_size == 24
    pixels = np.random.default_rng(4).standard_normal((1, 3, 24, 24)).astype(np.float32)
    with torch.no_grad():
        ref = m(input_ids=torch.from_numpy(_ids(1)), pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()
    got = jax.jit(functools.partial(image_embeds, config=cfg))(params, np.transpose(pixels, (0, 2, 3, 1)))
    assert max_abs(got, ref, "clip gelu image_embeds (jit)") <= TOL


def test_text_only_folder_is_one_line_error(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    from weights_convert.clip_model import load_clip_model
    from weights_convert.readers import CheckpointError

    CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(CheckpointError, match="has no vision tower") as e:
        load_clip_model(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="no such folder"):
        load_clip_model(tmp_path / "nope")


def test_converter_is_strict(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    from weights_convert.clip_model import load_clip_model
    from weights_convert.convert import ConversionError

    folder = tiny[0]
    sd = load_file(str(folder / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    bad = {k: v for k, v in sd.items() if k not in ("logit_scale", "vision_model.embeddings.class_embedding")}
    bad["vision_model.extra.weight"] = np.zeros((3, 3), np.float32)
    bad["visual_projection.weight"] = np.zeros((16, 31), np.float32)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError) as e:
        load_clip_model(tmp_path)
    err = e.value
    assert any(m.startswith("logit_scale") for m in err.missing)
    assert any(m.startswith("vision_model/embeddings/class_embedding") for m in err.missing)
    assert any(u.startswith("vision_model.extra.weight") for u in err.unused)
    assert any("visual_projection" in m for m in err.mismatched)


def test_legacy_pickle_folder(tiny, tmp_path):
    """openai/clip-vit-base-patch32 as transformers 4.x saved it: ``pytorch_model.bin`` with ``position_ids``
    buffers and a config with ``architectures: null`` sub-configs; read only with allow_pickle."""
    import torch
    from safetensors.numpy import load_file

    from jaxdiff.clip_model import image_embeds
    from weights_convert.clip_model import load_clip_model
    from weights_convert.readers import CheckpointError

    folder, pixels, ids, out, _ = tiny
    sd = {k: torch.from_numpy(v) for k, v in load_file(str(folder / "model.safetensors")).items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["architectures"] = None
    config["text_config_dict"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_clip_model(tmp_path)
    cfg, params = load_clip_model(tmp_path, allow_pickle=True)
    got = image_embeds(params, np.transpose(pixels, (0, 2, 3, 1)), config=cfg)
    assert max_abs(got, out.image_embeds.numpy(), "clip legacy image_embeds") <= TOL


# ------------------------------------------------------------------------------------------- preprocessing
def _images():
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:37, 0:53]
    smooth = np.stack([xx * 4.8, yy * 6.9, (xx + yy) * 2.8], -1) % 256
    return [smooth.astype(np.uint8),                                   # landscape, smooth
            rng.integers(0, 256, (61, 29, 3), dtype=np.uint8),         # portrait, noise
            rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)]         # square


@pytest.mark.parametrize("kw", [{}, {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
                                {"size": {"shortest_edge": 20}, "crop_size": {"height": 24, "width": 16}}])
def test_preprocess_matches_clip_image_processor(kw, tmp_path):
    from transformers import CLIPImageProcessorPil

    from jaxdiff.clip_preprocess import CLIPImagePreprocess, preprocess_images

    proc = CLIPImageProcessorPil(**kw)
    proc.save_pretrained(tmp_path)
    cfg = CLIPImagePreprocess.from_folder(tmp_path)
    for im in _images():
        ref = np.transpose(proc(images=im, return_tensors="np")["pixel_values"], (0, 2, 3, 1))
        got = preprocess_images([im], cfg)
        assert got.shape == ref.shape and got.dtype == np.float32
        assert np.abs(got - ref).max() <= 1e-5


def test_preprocess_defaults_and_legacy_config(tmp_path):
    from jaxdiff.clip_preprocess import OPENAI_CLIP_MEAN, CLIPImagePreprocess

    assert CLIPImagePreprocess.from_folder(tmp_path) == CLIPImagePreprocess()
    assert CLIPImagePreprocess().image_mean == OPENAI_CLIP_MEAN and CLIPImagePreprocess().crop_hw == (224, 224)
    # openai/clip-vit-base-patch32's file (transformers 4.x feature-extractor spelling: int size and crop_size)
    legacy = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
              "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(OPENAI_CLIP_MEAN),
              "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    assert CLIPImagePreprocess.from_folder(tmp_path) == CLIPImagePreprocess()


def test_imports_do_not_pull_torch():
    import subprocess
    import sys

    code = ("import jaxdiff.clip_model, jaxdiff.clip_preprocess, jaxdiff.eval.clip_metrics, jaxdiff.eval.prompts, "
            "sys; assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
