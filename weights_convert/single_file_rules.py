"""Rule tables for single-file (CompVis / SGM) Stable Diffusion checkpoints, as data.

A single file holds every component under one flat namespace. These tables say

* which keys identify a family (``FAMILY_SENTINELS``), and which identify families we refuse (``REFUSED``);
* which prefix belongs to which component (``COMPONENT_PREFIXES``) and what is dropped on purpose (``IGNORE``);
* how each component's keys are renamed to diffusers / transformers names (``*_renames``). The UNet and VAE
  tables depend on the architecture (levels, ``layers_per_block``, which blocks have attention), so they are
  *built from the diffusers config* by small functions; the result is still a plain list of :class:`Rename`.

After renaming, the generic leaf rules of :mod:`weights_convert.rules` apply, plus the few layout quirks of
LDM files listed in ``*_LEAF_RULES`` (VAE attention as 1x1 convs, OpenCLIP's fused ``in_proj``, OpenCLIP's
``text_projection`` stored as an ``x @ P`` matrix).

Naming reference: the public CompVis ``ldm`` / Stability ``sgm`` module trees (``openaimodel.UNetModel``,
``ldm.modules.diffusionmodules.model.Encoder/Decoder``, ``open_clip`` ``TextTransformer``).
"""

from __future__ import annotations

import re

from weights_convert.rules import LEAF_RULES, LeafRule, Rename

# ------------------------------------------------------------------------------------------ families
UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_CLIP = "cond_stage_model.transformer."
SD2_OPENCLIP = "cond_stage_model.model."
SDXL_CLIP = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP = "conditioner.embedders.1.model."

# A family is detected when *all* of its sentinel keys are present (checked in this order). The keys do not
# depend on model size (diffusers' own sentinels such as ``output_blocks.11.0.skip_connection.weight`` or
# ``resblocks.9`` exist only at full size); SD2's OpenCLIP context width is additionally checked by shape.
FAMILY_SENTINELS: dict[str, tuple[str, ...]] = {
    "sdxl-base": (UNET + "label_emb.0.0.weight",
                  SDXL_CLIP + "text_model.embeddings.position_embedding.weight",
                  SDXL_OPENCLIP + "positional_embedding"),
    "sd2": (UNET + "input_blocks.0.0.weight", SD2_OPENCLIP + "token_embedding.weight"),
    "sd1": (UNET + "input_blocks.0.0.weight", SD1_CLIP + "text_model.embeddings.position_embedding.weight"),
}

# Recognised but not supported: a clear refusal beats a wall of unused keys.
REFUSED: dict[str, str] = {
    "conditioner.embedders.0.model.text_projection": "an SDXL refiner checkpoint (OpenCLIP-bigG only)",
    "control_model.time_embed.0.weight": "a ControlNet checkpoint",
    "time_embedding.linear_1.weight": "a diffusers-named UNet file (load the diffusers folder instead)",
    "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": "an SD3 (MMDiT) checkpoint",
    "double_blocks.0.img_attn.qkv.weight": "a Flux checkpoint",
}

# family -> default preset (a JSON file in weights_convert/presets/)
DEFAULT_PRESET = {"sd1": "sd15", "sd2": "sd21", "sdxl-base": "sdxl-base"}
PRESET_FAMILY = {"sd15": "sd1", "sd21": "sd2", "sd21-base": "sd2", "sdxl-base": "sdxl-base"}

# family -> ((prefix, component), ...): every key is owned by the first matching prefix.
COMPONENT_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "sd1": ((UNET, "unet"), (VAE, "vae"), (SD1_CLIP, "text_encoder")),
    "sd2": ((UNET, "unet"), (VAE, "vae"), (SD2_OPENCLIP, "text_encoder")),
    "sdxl-base": ((UNET, "unet"), (VAE, "vae"), (SDXL_CLIP, "text_encoder"), (SDXL_OPENCLIP, "text_encoder_2")),
}

# Keys carrying nothing we load, dropped explicitly (anything else unowned is an error).
_SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar")
IGNORE: tuple[str, ...] = (
    r"^model_ema\.",                                    # EMA copy (the main weights are the EMA ones in -emaonly files)
    rf"^(?:{'|'.join(_SCHEDULE_BUFFERS)})$",            # DDPM schedule buffers (the scheduler config has them)
    r"^(?:cond_stage_model|conditioner\.embedders\.\d+)\.(?:model\.)?logit_scale$",   # CLIP contrastive temperature
    r"^(?:cond_stage_model|conditioner\.embedders\.\d+)\.model\.attn_mask$",           # causal mask buffer
    r"^denoiser\.(?:log_)?sigmas$",                      # SGM denoiser schedule buffer
    r"(^|\.)position_ids$",
)


# ---------------------------------------------------------------------------------------------- UNet
_RESNET_INTERNALS = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                     ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))


def _block_map(old: str, new: str) -> Rename:
    return Rename("^" + re.escape(UNET + old + "."), new + ".")


def _per_block(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_block_table(config: dict) -> list[tuple[str, str]]:
    """``(ldm module, diffusers module)`` pairs for an ``openaimodel.UNetModel`` with this diffusers config.

    LDM numbers ``input_blocks`` / ``output_blocks`` sequentially: ``input_blocks.0`` is ``conv_in``; each
    level then has ``layers_per_block`` entries ``[resnet, (attention)]`` and, except the last level, one
    ``[downsample]``; ``output_blocks`` has ``layers_per_block + 1`` entries per level ``[resnet,
    (attention), (upsample)]``; ``middle_block`` is ``[resnet, attention, resnet]``.
    """
    downs, ups = config["down_block_types"], config["up_block_types"]
    n = len(downs)
    lpb = _per_block(config.get("layers_per_block", 2), n)
    table = [("input_blocks.0.0", "conv_in"), ("time_embed.0", "time_embedding.linear_1"),
             ("time_embed.2", "time_embedding.linear_2"), ("out.0", "conv_norm_out"), ("out.2", "conv_out")]
    if config.get("addition_embed_type") == "text_time":
        table += [("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")]
    elif config.get("class_embed_type") in ("projection", "timestep"):
        table += [("label_emb.0.0", "class_embedding.linear_1"), ("label_emb.0.2", "class_embedding.linear_2")]
    i = 1
    for b in range(n):
        attn = downs[b].startswith("CrossAttn")
        for j in range(lpb[b]):
            table.append((f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{j}"))
            if attn:
                table.append((f"input_blocks.{i}.1", f"down_blocks.{b}.attentions.{j}"))
            i += 1
        if b < n - 1:
            table.append((f"input_blocks.{i}.0.op", f"down_blocks.{b}.downsamplers.0.conv"))
            i += 1
    table += [("middle_block.0", "mid_block.resnets.0"), ("middle_block.1", "mid_block.attentions.0"),
              ("middle_block.2", "mid_block.resnets.1")]
    up_lpb = list(reversed(lpb))
    i = 0
    for u in range(n):
        attn = ups[u].startswith("CrossAttn")
        for k in range(up_lpb[u] + 1):
            table.append((f"output_blocks.{i}.0", f"up_blocks.{u}.resnets.{k}"))
            if attn:
                table.append((f"output_blocks.{i}.1", f"up_blocks.{u}.attentions.{k}"))
            if k == up_lpb[u] and u < n - 1:
                table.append((f"output_blocks.{i}.{2 if attn else 1}.conv", f"up_blocks.{u}.upsamplers.0.conv"))
            i += 1
    return table


def unet_renames(config: dict) -> tuple[Rename, ...]:
    """CompVis UNet keys (with the ``model.diffusion_model.`` prefix) -> diffusers ``UNet2DConditionModel``."""
    blocks = [_block_map(old, new) for old, new in unet_block_table(config)]
    internals = [Rename(rf"^((?:down_blocks|up_blocks)\.\d+\.resnets\.\d+|mid_block\.resnets\.\d+)\.{re.escape(o)}\.",
                        rf"\1.{n}.") for o, n in _RESNET_INTERNALS]
    return tuple(blocks + internals)


# ----------------------------------------------------------------------------------------------- VAE
def vae_renames(config: dict) -> tuple[Rename, ...]:
    """CompVis ``AutoencoderKL`` keys (``first_stage_model.`` prefix) -> diffusers ``AutoencoderKL``.

    The decoder's ``up`` list is stored lowest resolution last (``up.{n-1}`` runs first), diffusers'
    ``up_blocks`` in execution order: ``decoder.up.{n-1-i}`` -> ``decoder.up_blocks.{i}``.
    """
    n = len(config["block_out_channels"])
    p = re.escape(VAE)
    r = [Rename(rf"^{p}encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
         Rename(rf"^{p}encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv.")]
    for i in range(n):
        r += [Rename(rf"^{p}decoder\.up\.{n - 1 - i}\.block\.(\d+)\.", rf"decoder.up_blocks.{i}.resnets.\1."),
              Rename(rf"^{p}decoder\.up\.{n - 1 - i}\.upsample\.conv\.", rf"decoder.up_blocks.{i}.upsamplers.0.conv.")]
    r += [Rename(rf"^{p}(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
          Rename(rf"^{p}(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
          Rename(rf"^{p}(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
          Rename(rf"^{p}", "")]  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
    for old, new in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        r.append(Rename(rf"^(encoder|decoder)\.mid\.attn_1\.{old}\.", rf"\1.mid_block.attentions.0.{new}."))
    r.append(Rename(r"\.nin_shortcut\.", ".conv_shortcut."))
    return tuple(r)


# LDM VAE attention q/k/v/proj_out are 1x1 convs (O, I, 1, 1); ours (and diffusers') are Linear.
VAE_LEAF_RULES: tuple[LeafRule, ...] = (
    LeafRule(r"(.+\.attentions\.\d+\.(?:to_q|to_k|to_v|to_out\.0))\.weight$", ("{m}/kernel",), "conv1x1_to_linear",
             ndim=4),
) + LEAF_RULES


# ---------------------------------------------------------------------------------------- text towers
def hf_clip_renames(prefix: str) -> tuple[Rename, ...]:
    """OpenAI CLIP-L as stored by SD1 / SDXL: already transformers names under ``prefix`` (+ ``text_model.``)."""
    return (Rename("^" + re.escape(prefix), ""), Rename(r"^text_model\.", ""))


def open_clip_renames(prefix: str) -> tuple[Rename, ...]:
    """open_clip ``TextTransformer`` (SD2 OpenCLIP-H, SDXL OpenCLIP-bigG) -> transformers ``CLIPTextModel`` names."""
    p = re.escape(prefix)
    layer = r"^(encoder\.layers\.\d+)\."
    return (
        Rename(rf"^{p}transformer\.resblocks\.(\d+)\.", r"encoder.layers.\1."),
        Rename(rf"^{p}token_embedding\.weight$", "embeddings.token_embedding.weight"),
        Rename(rf"^{p}positional_embedding$", "embeddings.position_embedding.weight"),
        Rename(rf"^{p}ln_final\.", "final_layer_norm."),
        Rename(rf"^{p}text_projection$", "text_projection"),
        Rename(layer + r"ln_1\.", r"\1.layer_norm1."),
        Rename(layer + r"ln_2\.", r"\1.layer_norm2."),
        Rename(layer + r"mlp\.c_fc\.", r"\1.mlp.fc1."),
        Rename(layer + r"mlp\.c_proj\.", r"\1.mlp.fc2."),
        Rename(layer + r"attn\.out_proj\.", r"\1.self_attn.out_proj."),
        Rename(layer + r"attn\.in_proj_(weight|bias)$", r"\1.self_attn.in_proj.\2"),
    )


OPEN_CLIP_LEAF_RULES: tuple[LeafRule, ...] = (
    # fused (3D, D) / (3D,) -> q, k, v (in that order, as torch.nn.MultiheadAttention packs them)
    LeafRule(r"(.+\.self_attn)\.in_proj\.weight$", ("{m}/q_proj/kernel", "{m}/k_proj/kernel", "{m}/v_proj/kernel"),
             "split_qkv_linear_t", ndim=2),
    LeafRule(r"(.+\.self_attn)\.in_proj\.bias$", ("{m}/q_proj/bias", "{m}/k_proj/bias", "{m}/v_proj/bias"),
             "split_qkv", ndim=1),
    # open_clip applies ``x @ text_projection`` with shape (D, proj): already a Dense kernel (in, out).
    LeafRule(r"^(text_projection)$", ("{m}/kernel",), "identity", ndim=2),
) + LEAF_RULES


def open_clip_ignores(prefix: str, num_hidden_layers: int, *, sd2: bool) -> tuple[str, ...]:
    """SD2's text encoder is OpenCLIP-H minus its last block (SD2 conditions on the penultimate layer; the
    transformers model has ``num_hidden_layers`` = 23 of the 24) and without the projection. SDXL's bigG tower
    is used whole, projection included: nothing is dropped there."""
    if not sd2:
        return ()
    p = re.escape(prefix)
    return (rf"^{p}transformer\.resblocks\.{num_hidden_layers}\.", rf"^{p}text_projection$")
