"""Demo of the core with a random model: convert a model with the real converter, then one UNet call
with h-space and cross-attention capture, written out as a heat-map PNG and a JSON sidecar.

The model is a small SD1-architecture model with random weights, written in diffusers folder format first
(safetensors + config.json + tokenizer files), so the demo exercises exactly the path a real checkpoint takes:
``python -m weights_convert`` -> Orbax folder -> ``load_model`` -> jitted pure functions.

    python -m sample.demo --out out/demo [--prompt "a red circle above a blue square"] [--word red]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxdiff.attention import maps_to_grid
from jaxdiff.checkpoint import StableDiffusionModel, config_from_dict, load_model, param_template
from jaxdiff.clip import apply_clip_text
from jaxdiff.hooks import CaptureSpec
from jaxdiff.nn import random_maker
from jaxdiff.tokenizer import load_tokenizer, tokenize
from jaxdiff.unet import apply_unet, attn_sites
from jaxdiff.vae import decode_latents
from jaxdiff.vocab import write_clip_vocab
from sample.heatmap import overlay

DEMO_WORDS = ("a red green blue yellow circle square triangle above below left right of on the grass sand sky "
              "water photo").split()

# diffusers-format configs of a small SD1-shaped model (2 levels, cross-attention, 32-d text).
DEMO_CONFIGS = {
    "unet": {"_class_name": "UNet2DConditionModel", "sample_size": 16, "in_channels": 4, "out_channels": 4,
             "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 4,
             "cross_attention_dim": 32, "norm_num_groups": 8,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
    "vae": {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "block_out_channels": [32, 32], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "scaling_factor": 0.18215},
    "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 0,
                     "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1,
                     "projection_dim": 32},
}
DEMO_SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "skip_prk_steps": True, "steps_offset": 1,
                  "set_alpha_to_one": False}


def random_demo_model(workdir: Path, seed: int = 0, configs: dict | None = None) -> StableDiffusionModel:
    """The demo model with random weights (cheap numpy init) and a small CLIP-BPE vocabulary. ``configs``
    (``unet``, ``vae``, ``text_encoder`` config dicts; default :data:`DEMO_CONFIGS`) gives other shapes, e.g. a
    full-size SD1.5 with the demo's vocabulary (benchmarks)."""
    tok_dir = write_clip_vocab(workdir / "tokenizer_src", DEMO_WORDS)
    vocab = json.loads((tok_dir / "vocab.json").read_text())
    dicts = json.loads(json.dumps(configs or DEMO_CONFIGS))
    te = dicts["text_encoder"]
    te.update(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
              pad_token_id=vocab["<|endoftext|>"])
    configs = {n: config_from_dict(n, d) for n, d in dicts.items()}
    mk = random_maker(seed, std=0.05)
    params = {n: param_template(n, c, mk) for n, c in configs.items()}
    return StableDiffusionModel(configs, params, dicts, DEMO_SCHEDULER, {"tokenizer": str(tok_dir)})


def run(out: Path, prompt: str, word: str, seed: int) -> dict:
    from weights_convert.__main__ import main as convert_main
    from weights_convert.export import export_diffusers_folder

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    export_diffusers_folder(random_demo_model(out, seed), out / "diffusers")
    if convert_main([str(out / "diffusers"), str(out / "converted")]) != 0:
        raise SystemExit("conversion failed")
    model = load_model(out / "converted")
    tok = load_tokenizer(model.tokenizer_dirs["tokenizer"])
    ids = tokenize(tok, [prompt])
    tokens = tok.convert_ids_to_tokens([int(i) for i in ids[0]])
    if word + "</w>" not in tokens:
        raise SystemExit(f"--word {word!r} is not a token of the prompt {prompt!r}")
    word_idx = tokens.index(word + "</w>")

    ucfg = model.configs["unet"]
    sites = [s for s in attn_sites(ucfg) if s.kind == "cross"]
    capture = CaptureSpec.of(sites, mode="mean", hspace=True)
    ctx, _ = jax.jit(apply_clip_text, static_argnames="config")(model.params["text_encoder"], ids,
                                                                 config=model.configs["text_encoder"])
    size = ucfg.sample_size
    latents = jax.random.normal(jax.random.PRNGKey(seed), (1, size, size, ucfg.in_channels))
    unet = jax.jit(apply_unet, static_argnames=("config", "capture"))
    eps, aux = unet(model.params["unet"], latents, jnp.array([500.0]), ctx, config=ucfg, capture=capture)

    # DAAM-style word map: every cross-attention map of the word, resized to the latent grid, summed.
    heat = np.zeros((size, size), np.float32)
    for s in sites:
        q = aux["attn"][s].shape[1]
        side = int(round(q ** 0.5))
        m = np.asarray(maps_to_grid(aux["attn"][s], side, side)[0, :, :, word_idx])
        heat += np.asarray(Image.fromarray(m).resize((size, size), Image.BICUBIC))
    heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-8)
    image = np.asarray(decode_latents(model.params["vae"], latents, config=model.configs["vae"]))[0]
    image_u8 = ((image / 2 + 0.5).clip(0, 1) * 255).round().astype(np.uint8)
    # The tiny model decodes 32x32 pixels; enlarge 4x (nearest, no smoothing) so a person can see the map.
    Image.fromarray(overlay(image_u8, heat)).resize((4 * image_u8.shape[1], 4 * image_u8.shape[0]),
                                                    Image.NEAREST).save(out / "heatmap.png")
    summary = {
        "prompt": prompt, "word": word, "token_index": word_idx, "seed": seed,
        "model": str(out / "converted"), "source_sha256": model.manifest.get("source_sha256"),
        "unet_output_shape": list(eps.shape), "unet_output_std": float(jnp.std(eps)),
        "h_shape": list(aux["h"].shape), "h_norm": float(jnp.linalg.norm(aux["h"])),
        "captured_sites": [str(s) for s in sites], "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "heatmap.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sample.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--prompt", default="a red circle above a blue square on grass")
    ap.add_argument("--word", default="red")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    summary = run(Path(args.out), args.prompt, args.word, args.seed)
    print(json.dumps(summary, indent=2))
    print(f"wrote {Path(args.out) / 'heatmap.png'} and heatmap.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
