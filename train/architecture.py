"""The ShapesWorld model: diffusers config dicts of its three networks, its scheduler and its vocabulary.

Written as diffusers/transformers config dicts (not our dataclasses) so the exported folder is a real Stable
Diffusion model: ``StableDiffusionPipeline.from_pretrained`` builds the same networks from the same dicts.

* **VAE** (``AutoencoderKL``, Rombach et al. 2022 sec. 3): 64x64 RGB -> 16x16x8 latents (f = 4: three levels,
  two downsamplers), channels 16/32/64, one resnet per level, mid block with attention at 16x16 (the decoder at
  64x64 dominates the cost: 0.72 GFLOP forward per image vs 1.58 for 32/64/64). 8 latent channels rather than
  SD's 4 (6x compression instead of 12x; SD3 uses 16): in short runs the 4-channel VAE blurred the 12-px shapes
  (judge shape accuracy on reconstructions 67.5% vs 78.3% with 8 channels after 600 equal steps); the UNet's
  cost barely changes (only conv_in/conv_out see the latent channels).
  ``scaling_factor`` is a placeholder here; the training run measures it as 1 / std of the trained encoder's
  latents (LDM sec. 4.3.2 / SD's 0.18215) and writes it into the exported config.
* **UNet** (``UNet2DConditionModel``): 16x16x8 latents, channels 32/64/128, cross-attention in the two upper
  levels of both paths and in the mid block (16x16, 8x8, 4x4 mid: the h-space of Kwon et al. 2023 is the 4x4x128
  mid-block output). heads 2/4/4 (diffusers' ``attention_head_dim`` means heads here) -> 16/16/32 channels per head.
* **Text encoder** (``CLIPTextModel``): 3 pre-LN layers, width 128, 4 heads, causal mask, 77 positions like SD
  (the sampling code pads prompts to 77 tokens, as diffusers pads to ``tokenizer.model_max_length``). The UNet
  reads ``last_hidden_state`` (final-LN'd), as SD1. Vocabulary: CLIP-BPE layout with every caption word one
  token (:func:`jaxdiff.vocab.write_clip_vocab`), so transformers' ``CLIPTokenizer`` reads it.
* **Scheduler**: training uses SD's DDPM process (``scaled_linear`` betas 0.00085..0.012, 1000 steps, epsilon
  prediction, Ho et al. 2020); sampling defaults to the kind chosen by ``train.export_shapesworld``.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxdiff.shapesworld.params import BACKGROUNDS, COLOURS, RELATIONS, SHAPES
from jaxdiff.vocab import BOS, EOS, write_clip_vocab

MAX_TOKENS = 77

VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 8,
       "block_out_channels": [16, 32, 64], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64,
       "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
       "act_fn": "silu", "scaling_factor": 1.0, "force_upcast": False, "mid_block_add_attention": True}

UNET = {"_class_name": "UNet2DConditionModel", "sample_size": 16, "in_channels": 8, "out_channels": 8,
        "block_out_channels": [32, 64, 128], "layers_per_block": 2, "norm_num_groups": 16,
        "attention_head_dim": [2, 4, 4], "cross_attention_dim": 128,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu"}

TEXT_ENCODER = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 0,
                "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4,
                "max_position_embeddings": MAX_TOKENS, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "projection_dim": 128}

# SD's training noise process (diffusers' v1-5 scheduler_config keys); the sampling kind is set at export.
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
             "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}


def caption_words() -> list[str]:
    """Every word a ShapesWorld caption can contain (relation phrases split into words)."""
    relation_words = [w for phrase in RELATIONS for w in phrase.split()]
    return list(dict.fromkeys(["a", "an", "and", "on", "shape", *COLOURS, *SHAPES, *relation_words, *BACKGROUNDS]))


def write_tokenizer(folder: str | Path, text_encoder: dict = TEXT_ENCODER) -> dict:
    """Write the CLIP-BPE tokenizer files into ``folder``; returns ``text_encoder`` (a CLIPTextModel config dict)
    completed with the vocabulary size and the BOS/EOS ids (pad = EOS, as SD1's tokenizer pads with
    ``<|endoftext|>``)."""
    folder = write_clip_vocab(folder, caption_words(), model_max_length=MAX_TOKENS)
    vocab = json.loads((Path(folder) / "vocab.json").read_text())
    return dict(text_encoder, vocab_size=len(vocab), bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                pad_token_id=vocab[EOS])
