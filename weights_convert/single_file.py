"""Single-file Stable Diffusion checkpoints (CompVis / SGM key names: SD1.x, SD2.x, SDXL base) -> params.

Steps, each driven by the tables in :mod:`weights_convert.single_file_rules`:

1. read the file (``.safetensors`` always; pickles only with ``allow_pickle=True``);
2. sniff the family from sentinel keys (:func:`sniff_family`; unknown -> :class:`CheckpointError`);
3. split keys by prefix into components; drop the explicitly ignored ones (EMA copy, schedule buffers,
   ``logit_scale``, ...); any other unowned key is an error;
4. per component, rename keys to diffusers / transformers names (UNet and VAE tables built from the config);
5. :func:`weights_convert.convert.state_dict_to_params` against the template of each component's config
   (strict: every parameter filled once, every key used or ignored, shapes checked).

A single file carries no config: the configs come from a built-in preset (``weights_convert/presets/*.json``,
chosen from the family or by ``preset=``), overridden per component by ``config_folder/<component>/config.json``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from weights_convert import single_file_rules as R
from weights_convert.convert import ComponentRules, ConversionError, state_dict_to_params, to_device
from weights_convert.readers import CheckpointError, read_checkpoint
from weights_convert.rules import IGNORE_ALWAYS, LEAF_RULES

PRESET_DIR = Path(__file__).with_name("presets")
PIPELINE_CLASS = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                  "sdxl-base": "StableDiffusionXLPipeline"}


# ------------------------------------------------------------------------------------------- sniffing
def sniff_family(keys: Iterable[str] | Mapping[str, np.ndarray]) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl-base"`` from a checkpoint's keys (a mapping also enables shape checks).

    Raises :class:`CheckpointError` naming the families and keys looked for (or why the file is refused).
    """
    shapes = keys if isinstance(keys, Mapping) else None
    keyset = set(keys)
    for key, what in R.REFUSED.items():
        if key in keyset:
            raise CheckpointError(f"this looks like {what} (has {key!r}); supported single-file families: "
                                  f"{', '.join(R.FAMILY_SENTINELS)}")
    for family, sentinels in R.FAMILY_SENTINELS.items():
        if all(k in keyset for k in sentinels):
            if family == "sd2" and shapes is not None:
                # OpenCLIP-H context is 1024 wide at full size; a tiny test model may differ, so only compare the
                # UNet's cross-attention width with the text tower's, which must agree in any SD2 model.
                tok = np.shape(shapes[R.SD2_OPENCLIP + "token_embedding.weight"])[-1]
                k2 = R.UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
                if k2 in shapes and np.shape(shapes[k2])[-1] != tok:
                    raise CheckpointError(f"OpenCLIP text tower of width {tok} but UNet cross-attention over "
                                          f"{np.shape(shapes[k2])[-1]}: not a consistent SD2 checkpoint")
            return family
    looked = "\n  ".join(f"{fam}: {', '.join(s)}" for fam, s in R.FAMILY_SENTINELS.items())
    sample = ", ".join(sorted(keyset)[:5]) or "no keys at all"
    raise CheckpointError(f"unknown single-file checkpoint: none of the known families matched "
                          f"({len(keyset)} keys, e.g. {sample}). Looked for (all keys of one family):\n  {looked}")


# -------------------------------------------------------------------------------------------- configs
def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def read_preset(name: str) -> dict:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(f"unknown preset {name!r}; known: {', '.join(list_presets())}")
    return json.loads(path.read_text())


def resolve_configs(family: str, *, preset: str | None = None, config_folder: str | os.PathLike | None = None):
    """-> (preset name, {component: diffusers config dict}, scheduler config, tokenizer dirs)."""
    preset = preset or R.DEFAULT_PRESET[family]
    if R.PRESET_FAMILY.get(preset) != family:
        raise CheckpointError(f"preset {preset!r} is for family {R.PRESET_FAMILY.get(preset)!r}, but the "
                              f"checkpoint is {family!r}")
    p = read_preset(preset)
    components = [c for _, c in R.COMPONENT_PREFIXES[family]]
    configs = {c: dict(p[c]) for c in components}
    scheduler = dict(p["scheduler"])
    tokenizers = {}
    if config_folder is not None:
        folder = Path(config_folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: config_folder is not a folder")
        for c in components:
            f = folder / c / "config.json"
            if f.is_file():
                configs[c] = json.loads(f.read_text())
        f = folder / "scheduler" / "scheduler_config.json"
        if f.is_file():
            scheduler = json.loads(f.read_text())
        tokenizers = {t: str(folder / t) for t in ("tokenizer", "tokenizer_2")
                      if (folder / t).is_dir() and (t == "tokenizer" or "text_encoder_2" in components)}
    return preset, configs, scheduler, tokenizers


# ---------------------------------------------------------------------------------------------- rules
def component_rules(family: str, component: str, config: dict) -> ComponentRules:
    """The rename / leaf / ignore rules turning this component's single-file keys into its params."""
    prefix = dict((c, p) for p, c in R.COMPONENT_PREFIXES[family])[component]
    if component == "unet":
        return ComponentRules(renames=R.unet_renames(config))
    if component == "vae":
        return ComponentRules(renames=R.vae_renames(config), leaf_rules=R.VAE_LEAF_RULES)
    if prefix in (R.SD1_CLIP, R.SDXL_CLIP):
        return ComponentRules(renames=R.hf_clip_renames(prefix), leaf_rules=LEAF_RULES)
    return ComponentRules(renames=R.open_clip_renames(prefix), leaf_rules=R.OPEN_CLIP_LEAF_RULES,
                          ignore=IGNORE_ALWAYS + R.open_clip_ignores(prefix, config["num_hidden_layers"],
                                                                      sd2=family == "sd2"))


def split_components(state_dict: Mapping[str, np.ndarray], family: str) -> tuple[dict, list[str]]:
    """-> ({component: {key: array}} with keys unchanged, ignored keys). Unowned, unignored keys raise."""
    parts: dict[str, dict] = {c: {} for _, c in R.COMPONENT_PREFIXES[family]}
    ignored, stray = [], []
    for key, value in state_dict.items():
        if any(re.search(p, key) for p in R.IGNORE):
            ignored.append(key)
            continue
        for prefix, comp in R.COMPONENT_PREFIXES[family]:
            if key.startswith(prefix):
                parts[comp][key] = value
                break
        else:
            stray.append(f"{key} {list(np.shape(value))}")
    if stray:
        raise ConversionError(f"single-file {family} checkpoint (keys outside every component)", unused=stray)
    empty = [c for c, sd in parts.items() if not sd]
    if empty:
        raise CheckpointError(f"{family} checkpoint has no weights for {', '.join(empty)} (prefixes: "
                              + ", ".join(p for p, c in R.COMPONENT_PREFIXES[family] if c in empty) + ")")
    return parts, ignored


# ------------------------------------------------------------------------------------------ converting
def convert_state_dict(state_dict: Mapping[str, np.ndarray], *, family: str | None = None,
                       configs: Mapping[str, dict] | None = None, preset: str | None = None,
                       config_folder=None, templates: Mapping[str, dict] | None = None, dtype=np.float32,
                       what: str = "single-file checkpoint", put=None) -> dict[str, tuple[dict, dict]]:
    """Convert an in-memory single-file state dict -> ``{component: (diffusers config dict, params)}``.

    ``templates`` (optional, per component) replaces the model's parameter template; by default it is built
    from the config with :func:`jaxdiff.checkpoint.param_template`. ``put``: where each converted leaf goes
    (see :func:`weights_convert.convert.state_dict_to_params`; the file loaders use the default device).
    """
    family = family or sniff_family(state_dict)
    if configs is None:
        _, configs, _, _ = resolve_configs(family, preset=preset, config_folder=config_folder)
    parts, _ = split_components(state_dict, family)
    _check_in_channels(state_dict, configs["unet"])
    out, errors = {}, []
    for comp, sd in parts.items():
        cfg = configs[comp]
        if templates is not None and comp in templates:
            template = templates[comp]
        else:
            from jaxdiff.checkpoint import config_from_dict, param_template
            template = param_template(comp, config_from_dict(comp, cfg))
        try:
            params, _ = state_dict_to_params(sd, template, component_rules(family, comp, cfg),
                                             what=f"{what} ({family}) {comp}", dtype=dtype, put=put)
        except ConversionError as e:
            errors.append(e)
            continue
        out[comp] = (cfg, params)
    if len(errors) == 1:
        raise errors[0]
    if errors:  # one error listing everything (each component's names are distinct: they come from its keys)
        bad = [c for c in parts if c not in out]
        raise ConversionError(f"{what} ({family}) components {', '.join(bad)}",
                              missing=sum((e.missing for e in errors), []),
                              unused=sum((e.unused for e in errors), []),
                              mismatched=sum((e.mismatched for e in errors), []),
                              duplicated=sum((e.duplicated for e in errors), []))
    return out


def _check_in_channels(state_dict, unet_config: dict):
    w = state_dict.get(R.UNET + "input_blocks.0.0.weight")
    want = unet_config.get("in_channels", 4)
    if w is not None and np.shape(w)[1] != want:
        raise CheckpointError(f"UNet conv_in takes {np.shape(w)[1]} channels but the config says {want} "
                              f"(an inpainting / depth / instruct checkpoint?); pass a config_folder whose "
                              f"unet/config.json matches")


def convert_single_file(path: str | os.PathLike, *, config_folder: str | os.PathLike | None = None,
                        preset: str | None = None, allow_pickle: bool = False,
                        dtype=np.float32) -> dict[str, tuple[dict, dict]]:
    """Convert a CompVis / SGM single-file checkpoint -> ``{component: (diffusers config dict, params)}``.

    Components: ``unet``, ``vae``, ``text_encoder`` (+ ``text_encoder_2`` for SDXL). ``preset``: one of
    :func:`list_presets` (default from the detected family: sd1 -> sd15, sd2 -> sd21 (768, v-prediction),
    sdxl-base -> sdxl-base); ``config_folder``: a diffusers folder whose ``<component>/config.json`` override it.
    """
    sd = read_checkpoint(path, allow_pickle=allow_pickle, lazy=True)
    return convert_state_dict(sd, preset=preset, config_folder=config_folder, dtype=dtype, what=str(path),
                              put=to_device)


def load_single_file(path: str | os.PathLike, *, allow_pickle: bool = False, config_folder=None,
                     preset: str | None = None, dtype=np.float32):
    """A single-file checkpoint as a :class:`jaxdiff.checkpoint.StableDiffusionModel` (used by ``load_any``).

    Tokenizers are taken from ``config_folder`` when it has them; presets ship none (vocabularies are large).
    """
    from jaxdiff.checkpoint import StableDiffusionModel, config_from_dict
    from weights_convert.pipeline import sha256_files

    path = Path(path).absolute()
    sd = read_checkpoint(path, allow_pickle=allow_pickle, lazy=True)
    family = sniff_family(sd)
    preset, config_dicts, scheduler, tokenizers = resolve_configs(family, preset=preset, config_folder=config_folder)
    converted = convert_state_dict(sd, family=family, configs=config_dicts, dtype=dtype, what=str(path),
                                   put=to_device)
    configs = {c: config_from_dict(c, d) for c, (d, _) in converted.items()}
    params = {c: p for c, (_, p) in converted.items()}
    manifest = {"source": str(path), "source_kind": "single_file", "family": family, "preset": preset,
                "config_folder": str(config_folder) if config_folder else None,
                "pipeline_class": PIPELINE_CLASS[family], "source_sha256": sha256_files([path])}
    return StableDiffusionModel(configs, params, config_dicts, scheduler, tokenizers, manifest)
