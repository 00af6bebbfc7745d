"""Single-file (CompVis / SGM) checkpoints: our rules agree with diffusers' ``from_single_file`` parameter by
parameter, on tiny SD1 / SDXL-style models whose CompVis files are written here from diffusers weights.

The CompVis names are produced by an inverse mapping written independently in this file (diffusers ->
CompVis), not derived from ``single_file_rules``; diffusers' own loader then reads the file, and must recover
every original weight (so our inverse matches diffusers' forward mapping), and our converter must give exactly
the params that our diffusers-folder path gives for diffusers' loaded state dict.
"""

import json
import re

import numpy as np
import pytest

import torch  # noqa: E402  (the reference; a missing torch must fail, not skip)

from flax import traverse_util  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from tests.conftest import torch_state_dict  # noqa: E402
from weights_convert import CheckpointError, ConversionError, PickleNotAllowedError  # noqa: E402
from weights_convert import single_file as sf  # noqa: E402
from weights_convert.components import KINDS  # noqa: E402
from weights_convert.convert import state_dict_to_params  # noqa: E402
from weights_convert.rules import apply_renames, match_leaf  # noqa: E402




# ------------------------------------------------------------------ independent inverse: diffusers -> CompVis
RESNET_INV = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP_INV = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_tail(tail):
    head, _, rest = tail.partition(".")
    return f"{RESNET_INV.get(head, head)}.{rest}"


def compvis_unet_key(k: str, cfg: dict) -> str:
    lpb = cfg["layers_per_block"]
    for new, old in UNET_TOP_INV.items():
        if k.startswith(new + "."):
            return "model.diffusion_model." + old + k[len(new):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
        b, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + b * (lpb + 1) + j
        k = f"input_blocks.{idx}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"input_blocks.{idx}.1.{tail}"
    elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
        k = f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op.{m[2]}"
    elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", k):
        kind, j, tail = m[1], int(m[2]), m[3]
        k = f"middle_block.{2 * j}.{_resnet_tail(tail)}" if kind == "resnets" else f"middle_block.1.{tail}"
    elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
        u, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4]
        idx = u * (lpb + 1) + j
        k = f"output_blocks.{idx}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"output_blocks.{idx}.1.{tail}"
    elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
        u = int(m[1])
        slot = 2 if cfg["up_block_types"][u].startswith("CrossAttn") else 1
        k = f"output_blocks.{u * (lpb + 1) + lpb}.{slot}.conv.{m[2]}"
    else:
        raise AssertionError(f"test inverse does not know UNet key {k}")
    return "model.diffusion_model." + k


VAE_ATTN_INV = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def compvis_vae_item(k: str, v: np.ndarray, cfg: dict):
    n = len(cfg["block_out_channels"])
    k = k.replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", k):
        k = f"{m[1]}.mid.attn_1.{VAE_ATTN_INV[m[2]]}.{m[3]}"
        if v.ndim == 2:
            v = v[:, :, None, None]  # LDM stores these as 1x1 convs
    k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.", k)
    k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
    return "first_stage_model." + k, v


def _cat(xs):
    return torch.cat(xs) if isinstance(xs[0], torch.Tensor) else np.concatenate(xs)


def _contig(x):
    return x.contiguous() if isinstance(x, torch.Tensor) else np.ascontiguousarray(x)


def compvis_openclip(sd: dict, prefix: str, extra_layer: bool, rng) -> dict:
    """HF CLIPTextModel(WithProjection) state dict -> open_clip TextTransformer names (fused in_proj)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {}
    layers = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        s, r = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            out[r + f"attn.in_proj_{w}"] = _cat([sd[s + f"self_attn.{p}_proj.{w}"] for p in "qkv"])
            out[r + f"attn.out_proj.{w}"] = sd[s + f"self_attn.out_proj.{w}"]
            out[r + f"ln_1.{w}"] = sd[s + f"layer_norm1.{w}"]
            out[r + f"ln_2.{w}"] = sd[s + f"layer_norm2.{w}"]
            out[r + f"mlp.c_fc.{w}"] = sd[s + f"mlp.fc1.{w}"]
            out[r + f"mlp.c_proj.{w}"] = sd[s + f"mlp.fc2.{w}"]
    if extra_layer:  # SD2: OpenCLIP-H has one more block than the diffusers text encoder
        last = f"{prefix}transformer.resblocks.{layers[-1]}."
        for k in [k for k in out if k.startswith(last)]:
            out[k.replace(last, f"{prefix}transformer.resblocks.{layers[-1] + 1}.")] = \
                rng.standard_normal(out[k].shape).astype(np.float32)
    out[prefix + "token_embedding.weight"] = sd["embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = sd["embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = sd["final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = sd["final_layer_norm.bias"]
    d = sd["embeddings.token_embedding.weight"].shape[1]
    out[prefix + "text_projection"] = (_contig(sd["text_projection.weight"].T)
                                       if "text_projection.weight" in sd else rng.standard_normal((d, d)).astype(np.float32))
    out[prefix + "logit_scale"] = np.array(4.6052, np.float32)
    return out


SCHEDULE = {"betas": np.linspace(1e-4, 2e-2, 10, dtype=np.float32),
            "alphas_cumprod": np.linspace(1, 0.1, 10, dtype=np.float32),
            "posterior_mean_coef1": np.ones(10, np.float32)}


# ----------------------------------------------------------------------------------------- tiny models
def tiny_unet_config(lpb, sdxl=False, sd2=False):
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=lpb,
               cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    if sd2:  # linear proj_in/proj_out, per-level head counts, as SD2
        cfg.update(use_linear_projection=True, attention_head_dim=(2, 4))
    if sdxl:
        cfg.update(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32 + 48,
                   transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
                   addition_time_embed_dim=8, projection_class_embeddings_input_dim=48 + 6 * 8)
    return cfg


def tiny_clip_config(vocab_size, hidden=32, layers=2, proj=None):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                          hidden_act="gelu" if proj else "quick_gelu", projection_dim=proj or hidden,
                          bos_token_id=0, eos_token_id=2, pad_token_id=1)


def build_folder(tmp, lpb, sdxl=False, sd2=False):
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from jaxdiff.vocab import write_clip_vocab
    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(write_clip_vocab(tmp / "tok_src", ["a", "photo", "cat"]), model_max_length=77)
    unet = UNet2DConditionModel(**tiny_unet_config(lpb, sdxl, sd2))
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=lpb, sample_size=16)
    te = CLIPTextModel(tiny_clip_config(len(tok), proj=32 if sd2 else None))  # SD2: OpenCLIP-H-like (gelu)
    # text_encoder_2 must differ in width from CLIP-L: diffusers tells the two towers apart by width
    te2 = CLIPTextModelWithProjection(tiny_clip_config(len(tok), hidden=48, layers=3, proj=48)) if sdxl else None
    for m in (unet, vae, te, te2):  # random biases / norms too, so every key is checked
        with torch.no_grad():
            for p in (m.parameters() if m is not None else ()):
                p.add_(0.05 * torch.randn_like(p))
    folder = tmp / "diffusers"
    if sdxl:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                         unet=unet, scheduler=EulerDiscreteScheduler())
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder, pipe


def write_compvis(path, pipe, sdxl=False, ema=True, sd2=False):
    """Write the pipeline's weights under CompVis / SGM names (plus ignorable extras) to ``path``."""
    rng = np.random.default_rng(1)
    ucfg, vcfg = dict(pipe.unet.config), dict(pipe.vae.config)
    ckpt = {compvis_unet_key(k, ucfg): v for k, v in torch_state_dict(pipe.unet).items()}
    ckpt.update(compvis_vae_item(k, v, vcfg) for k, v in torch_state_dict(pipe.vae).items())
    te = {"text_model." + k.removeprefix("text_model."): v for k, v in torch_state_dict(pipe.text_encoder).items()}
    clip_prefix = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    if sd2:
        ckpt.update(compvis_openclip(te, "cond_stage_model.model.", extra_layer=True, rng=rng))
    else:
        ckpt.update({clip_prefix + k: v for k, v in te.items()})
    if sdxl:
        ckpt.update(compvis_openclip(torch_state_dict(pipe.text_encoder_2), "conditioner.embedders.1.model.",
                                     extra_layer=False, rng=rng))
    ckpt.update(SCHEDULE)
    if ema:
        ckpt["model_ema.decay"] = np.array(0.9999, np.float32)
        ckpt["model_ema.input_blocks00weight"] = ckpt["model.diffusion_model.input_blocks.0.0.weight"] * 0
    save_file({k: np.ascontiguousarray(v) for k, v in ckpt.items()}, str(path))
    return ckpt


# ------------------------------------------------------------------------------------ reference side
def template(kind, config_dict):
    from jaxdiff.checkpoint import config_from_dict, param_template
    return param_template(kind, config_from_dict(kind, config_dict))


def assert_same_params(ours, ref, what):
    fo, fr = (traverse_util.flatten_dict(t, sep="/") for t in (ours, ref))
    assert sorted(fo) == sorted(fr), what
    for k in fr:
        np.testing.assert_array_equal(np.asarray(fo[k]), np.asarray(fr[k]), err_msg=f"{what}: {k}")
    return len(fr)


def diffusers_load_single_file(path, folder, sdxl):
    """diffusers' own reader, offline, configs from the tiny folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    kw = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    return cls.from_single_file(str(path), config=str(folder), local_files_only=True, **kw)


@pytest.mark.parametrize("family,lpb", [("sd1", 1), ("sd1", 2), ("sd2", 1), ("sdxl-base", 1)],
                         ids=["sd1-lpb1", "sd1-lpb2", "sd2-lpb1", "sdxl-lpb1"])
def test_single_file_matches_diffusers(tmp_path, family, lpb):
    sdxl, sd2 = family == "sdxl-base", family == "sd2"
    folder, pipe = build_folder(tmp_path, lpb, sdxl, sd2)
    path = tmp_path / "model.safetensors"
    ckpt = write_compvis(path, pipe, sdxl, sd2=sd2)
    assert sf.sniff_family(ckpt) == family

    loaded = diffusers_load_single_file(path, folder, sdxl)
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if sdxl else [])
    configs = {n: json.loads((folder / n / "config.json").read_text()) for n in names}
    refs, templates = {}, {}
    for n in names:
        orig, got = torch_state_dict(getattr(pipe, n)), torch_state_dict(getattr(loaded, n))
        # diffusers filled every parameter from our file (it drops missing keys silently, so check values)
        orig = {k: v for k, v in orig.items() if not k.endswith("position_ids")}
        got = {k: v for k, v in got.items() if not k.endswith("position_ids")}
        assert sorted(got) == sorted(orig), n
        for k in orig:
            np.testing.assert_array_equal(got[k], orig[k], err_msg=f"diffusers did not load {n}.{k}")
        templates[n] = template(n, configs[n])
        refs[n], _ = state_dict_to_params(got, templates[n], KINDS["text_encoder" if n.startswith("text") else n].rules)

    from weights_convert.readers import read_checkpoint
    ours = sf.convert_state_dict(read_checkpoint(path), config_folder=folder, templates=templates)
    full = sf.convert_single_file(path, config_folder=folder)        # the public entry point
    for n in names:
        assert full[n][0] == configs[n]
        assert_same_params(full[n][1], ours[n][1], n)
    assert sorted(ours) == sorted(names)
    counts = {n: assert_same_params(ours[n][1], refs[n], n) for n in names}
    assert all(c > 0 for c in counts.values())
    print("single-file parity (leaves equal):", counts)


def test_sd2_open_clip_tower(tmp_path):
    """SD2 text tower: OpenCLIP-H names, fused in_proj, one extra last block dropped, projection unused."""
    from transformers import CLIPTextModel
    torch.manual_seed(0)
    te = CLIPTextModel(tiny_clip_config(100, hidden=32, layers=3, proj=32))
    hf = torch_state_dict(te)
    rng = np.random.default_rng(0)
    oc = compvis_openclip(hf, "cond_stage_model.model.", extra_layer=True, rng=rng)
    assert "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight" in oc
    cfg = te.config.to_dict()
    rules = sf.component_rules("sd2", "text_encoder", cfg)
    tmpl = template("text_encoder", cfg)
    ref, _ = state_dict_to_params(hf, tmpl, KINDS["text_encoder"].rules)
    oc = {k: v for k, v in oc.items() if not k.endswith("logit_scale")}  # dropped by the top-level split
    ours, report = state_dict_to_params(oc, tmpl, rules)
    assert_same_params(ours, ref, "sd2 text_encoder")
    assert sorted(report.ignored) == sorted(
        [k for k in oc if ".resblocks.3." in k] + ["cond_stage_model.model.text_projection"])
    # a second extra block is not silently dropped
    oc2 = dict(oc, **{k.replace(".resblocks.3.", ".resblocks.4."): v for k, v in oc.items() if ".resblocks.3." in k})
    with pytest.raises(ConversionError, match="resblocks.4"):
        state_dict_to_params(oc2, tmpl, rules)


def test_sd2_sniff_and_unet_renames():
    keys = {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 4, 3, 3)),
            "cond_stage_model.model.token_embedding.weight": np.zeros((49408, 1024)),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": np.zeros((320, 1024))}
    assert sf.sniff_family(keys) == "sd2"
    keys["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = np.zeros((320, 768))
    with pytest.raises(CheckpointError, match="not a consistent SD2"):
        sf.sniff_family(keys)
    # full-size table sanity (SD1.5 layout, 2 resnets per level, 4 levels)
    table = dict(sf.R.unet_block_table(sf.read_preset("sd15")["unet"]))
    assert table["input_blocks.11.0"] == "down_blocks.3.resnets.1"
    assert table["input_blocks.9.0.op"] == "down_blocks.2.downsamplers.0.conv"
    assert table["output_blocks.2.1.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert table["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert "output_blocks.11.2.conv" not in table and table["output_blocks.11.1"] == "up_blocks.3.attentions.2"
    xl = dict(sf.R.unet_block_table(sf.read_preset("sdxl-base")["unet"]))
    assert "input_blocks.1.1" not in xl and xl["input_blocks.4.1"] == "down_blocks.1.attentions.0"
    assert xl["output_blocks.2.2.conv"] == "up_blocks.0.upsamplers.0.conv" and xl["label_emb.0.2"] == \
        "add_embedding.linear_2"


def test_sdxl_sniffing_needs_both_embedders():
    base = {"model.diffusion_model.label_emb.0.0.weight": 0, "model.diffusion_model.input_blocks.0.0.weight": 0,
            "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": 0,
            "conditioner.embedders.1.model.positional_embedding": 0}
    assert sf.sniff_family(base) == "sdxl-base"
    no_g = {k: v for k, v in base.items() if "embedders.1" not in k}
    with pytest.raises(CheckpointError, match="conditioner.embedders.1.model.positional_embedding"):
        sf.sniff_family(no_g)
    refiner = dict(no_g, **{"conditioner.embedders.0.model.text_projection": 0})
    with pytest.raises(CheckpointError, match="refiner"):
        sf.sniff_family(refiner)


def test_presets_are_consistent():
    for name in sf.list_presets():
        p = sf.read_preset(name)
        fam = sf.R.PRESET_FAMILY[name]
        assert p["family"] == fam and set(p) >= {c for _, c in sf.R.COMPONENT_PREFIXES[fam]} | {"scheduler"}
    assert sf.read_preset("sd21")["scheduler"]["prediction_type"] == "v_prediction"
    assert sf.read_preset("sd21-base")["scheduler"]["prediction_type"] == "epsilon"
    assert sf.read_preset("sd21")["text_encoder"]["num_hidden_layers"] == 23
    xl = sf.read_preset("sdxl-base")
    assert xl["vae"]["scaling_factor"] == 0.13025 and xl["text_encoder_2"]["num_hidden_layers"] == 32
    assert xl["text_encoder_2"]["projection_dim"] == 1280
    for name in sf.list_presets():                  # the presets build full-size templates (shapes only)
        p = sf.read_preset(name)
        for c in sf.R.COMPONENT_PREFIXES[p["family"]]:
            template(c[1], p[c[1]])


# ------------------------------------------------------------------------------------------- bad inputs
def test_ckpt_needs_allow_pickle(tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"never unpickled")
    with pytest.raises(PickleNotAllowedError, match="allow_pickle"):
        sf.convert_single_file(f)


def test_unknown_checkpoint(tmp_path):
    f = tmp_path / "random.safetensors"
    save_file({"encoder.layer.0.weight": np.zeros((2, 2), np.float32), "head.bias": np.zeros(2, np.float32)}, str(f))
    with pytest.raises(CheckpointError) as e:
        sf.convert_single_file(f)
    msg = str(e.value)
    assert "unknown single-file checkpoint" in msg and "head.bias" in msg
    assert "sd1:" in msg and "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in msg


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd1")
    folder, pipe = build_folder(tmp, 1)
    from weights_convert.readers import read_checkpoint
    path = tmp / "m.safetensors"
    write_compvis(path, pipe)
    return folder, pipe, read_checkpoint(path)


def _templates(folder, pipe, names=("unet", "vae", "text_encoder")):
    return {n: template(n, json.loads((folder / n / "config.json").read_text())) for n in names}


def test_missing_unet_key_named(sd1_file):
    folder, pipe, ckpt = sd1_file
    ckpt = dict(ckpt)
    del ckpt["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    with pytest.raises(ConversionError) as e:
        sf.convert_state_dict(ckpt, config_folder=folder, templates=_templates(folder, pipe))
    assert [m.split(" ")[0] for m in e.value.missing] == ["down_blocks_0/resnets_0/conv1/kernel"]
    assert not e.value.unused and "unet" in str(e.value)
    # problems in several components: still one error listing all of them
    del ckpt["first_stage_model.decoder.up.0.block.0.conv2.bias"]  # decoder.up is stored reversed: up_blocks_1
    with pytest.raises(ConversionError) as e:
        sf.convert_state_dict(ckpt, config_folder=folder, templates=_templates(folder, pipe))
    assert sorted(m.split(" ")[0] for m in e.value.missing) == [
        "decoder/up_blocks_1/resnets_0/conv2/bias", "down_blocks_0/resnets_0/conv1/kernel"]
    assert "components unet, vae" in str(e.value)


def test_stray_and_wrong_keys_named(sd1_file):
    folder, pipe, ckpt = sd1_file
    bad = dict(ckpt, **{"something_else.weight": np.zeros(3, np.float32),
                        "model.diffusion_model.input_blocks.1.0.in_layers.9.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match="something_else.weight"):
        sf.convert_state_dict(bad, config_folder=folder, templates=_templates(folder, pipe))
    del bad["something_else.weight"]
    with pytest.raises(ConversionError) as e:
        sf.convert_state_dict(bad, config_folder=folder, templates=_templates(folder, pipe))
    assert any("input_blocks.1.0.in_layers.9.weight" in u for u in e.value.unused)


def test_inpainting_channels_refused(sd1_file):
    folder, pipe, ckpt = sd1_file
    bad = dict(ckpt)
    w = bad["model.diffusion_model.input_blocks.0.0.weight"]
    bad["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((w.shape[0], 9) + w.shape[2:], w.dtype)
    with pytest.raises(CheckpointError, match="9 channels"):
        sf.convert_state_dict(bad, config_folder=folder, templates=_templates(folder, pipe))


def test_fp16_file_and_load_any(sd1_file, tmp_path):
    folder, pipe, ckpt = sd1_file
    f = tmp_path / "half.safetensors"
    save_file({k: np.asarray(v).astype(np.float16) for k, v in ckpt.items()}, str(f))
    from weights_convert.pipeline import load_any
    model = load_any(f, config_folder=folder)
    assert model.manifest["family"] == "sd1" and model.manifest["source_kind"] == "single_file"
    assert sorted(model.params) == ["text_encoder", "unet", "vae"] and "tokenizer" in model.tokenizer_dirs
    k = model.params["unet"]["conv_in"]["kernel"]
    assert k.dtype == np.float32
    np.testing.assert_array_equal(
        k, ckpt["model.diffusion_model.input_blocks.0.0.weight"].astype(np.float16).astype(np.float32)
        .transpose(2, 3, 1, 0))


# --------------------------------------------------------------------------- full size, names and ranks only
def _meta_state_dict(module):
    return dict(module.state_dict())


def _targets(sd, rules):
    """The target leaf paths of ``sd`` through ``rules`` (ignored keys skipped; every key must map, once)."""
    out = set()
    for k, v in sd.items():
        if any(re.search(p, k) for p in rules.ignore):
            continue
        hit = match_leaf(apply_renames(k, rules.renames), len(v.shape), rules.leaf_rules)
        assert hit is not None, k
        for t in hit[1]:
            assert t not in out, t
            out.add(t)
    return out


@pytest.mark.parametrize("preset,diffusers_type", [("sd15", "v1"), ("sd21", "v2"), ("sdxl-base", "xl_base")])
def test_fullsize_names(preset, diffusers_type):
    """Full-size architectures on torch's meta device (no memory): the CompVis names written by this file's
    independent inverse are what diffusers' sniffer calls this family, and our rules send every one of them to
    exactly the leaves our diffusers-folder path produces from the diffusers names."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    p = sf.read_preset(preset)
    fam = p["family"]
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(p["unet"]), "vae": AutoencoderKL.from_config(p["vae"]),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**p["text_encoder"]))}
        if "text_encoder_2" in p:
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**p["text_encoder_2"]))
    sds = {n: _meta_state_dict(m) for n, m in models.items()}
    rng = np.random.default_rng(0)
    ckpt = {compvis_unet_key(k, p["unet"]): v for k, v in sds["unet"].items()}
    ckpt.update(compvis_vae_item(k, v, p["vae"]) for k, v in sds["vae"].items())
    te = {"text_model." + k.removeprefix("text_model."): v for k, v in sds["text_encoder"].items()}
    if fam == "sd2":
        ckpt.update(compvis_openclip(te, "cond_stage_model.model.", extra_layer=True, rng=rng))
    else:
        prefix = "conditioner.embedders.0.transformer." if fam == "sdxl-base" else "cond_stage_model.transformer."
        ckpt.update({prefix + k: v for k, v in te.items()})
    if fam == "sdxl-base":
        ckpt.update(compvis_openclip(sds["text_encoder_2"], "conditioner.embedders.1.model.", extra_layer=False,
                                     rng=rng))
    assert infer_diffusers_model_type(ckpt) == diffusers_type  # diffusers' own (full-size) sentinels
    assert sf.sniff_family(ckpt) == fam
    parts, _ = sf.split_components(ckpt, fam)
    for n, sd in sds.items():
        ref = _targets(sd, KINDS["text_encoder" if n.startswith("text") else n].rules)
        ours = _targets(parts[n], sf.component_rules(fam, n, p[n]))
        assert ours == ref, (n, sorted(ours ^ ref)[:10])
        tmpl = traverse_util.flatten_dict(template(n, p[n]), sep="/")
        assert sorted(tmpl) == sorted(ref), (n, sorted(set(tmpl) ^ set(ref))[:10])
