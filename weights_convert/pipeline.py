"""Whole models: a diffusers folder, a single-file checkpoint, or a converted folder -> StableDiffusionModel."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from jaxdiff.checkpoint import StableDiffusionModel, is_converted_model, load_model
from weights_convert.components import convert_component, find_weights, read_json
from weights_convert.readers import CheckpointError

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionXLPipeline",
                       "StableDiffusionXLImg2ImgPipeline")
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")


def sha256_files(paths) -> str:
    """One sha256 over the given files' bytes, in order (the manifest's ``source_sha256``)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def load_diffusers_folder(path: str | os.PathLike, *, allow_pickle: bool = False,
                          dtype=np.float32) -> StableDiffusionModel:
    """Convert a diffusers pipeline folder (``model_index.json`` + component folders) on the fly."""
    path = Path(path).absolute()
    index = read_json(path / "model_index.json")
    cls = index.get("_class_name")
    if cls not in SUPPORTED_PIPELINES:
        raise CheckpointError(f"{path}: pipeline class {cls!r} is not supported; expected one of "
                              f"{', '.join(SUPPORTED_PIPELINES)}")
    needed = [c for c in MODEL_COMPONENTS + TOKENIZERS + ("scheduler",) if index.get(c) not in (None, [None, None])]
    absent = [c for c in needed if not (path / c).is_dir()]
    if absent:
        raise CheckpointError(f"{path}: model_index.json lists {', '.join(absent)} but the folder(s) are missing")
    configs, params, config_dicts, weight_files = {}, {}, {}, []
    for name in MODEL_COMPONENTS:
        if name in needed:
            config_dicts[name], configs[name], params[name] = convert_component(
                path / name, name, allow_pickle=allow_pickle, dtype=dtype)
            stem = "model" if name.startswith("text_encoder") else "diffusion_pytorch_model"
            weight_files += find_weights(path / name, stem, allow_pickle)
    missing = [c for c in ("unet", "vae", "text_encoder") if c not in params]
    if missing:
        raise CheckpointError(f"{path}: not a Stable Diffusion folder, missing components: {', '.join(missing)}")
    scheduler = read_json(path / "scheduler" / "scheduler_config.json")
    tokenizer_dirs = {t: str(path / t) for t in TOKENIZERS if t in needed}
    manifest = {"source": str(path), "source_kind": "diffusers", "pipeline_class": cls,
                "source_sha256": sha256_files(weight_files)}
    return StableDiffusionModel(configs, params, config_dicts, scheduler, tokenizer_dirs, manifest)


def load_any(path: str | os.PathLike, *, allow_pickle: bool = False, config_folder: str | None = None,
             dtype=np.float32) -> StableDiffusionModel:
    """Load a converted jaxdiff folder, a diffusers folder, or a single-file checkpoint."""
    path = Path(path)
    if is_converted_model(path):
        return load_model(path, dtype=None if dtype == np.float32 else dtype)
    if (path / "model_index.json").is_file():
        return load_diffusers_folder(path, allow_pickle=allow_pickle, dtype=dtype)
    if path.is_file():
        from weights_convert.single_file import load_single_file
        return load_single_file(path, allow_pickle=allow_pickle, config_folder=config_folder, dtype=dtype)
    if path.is_dir():
        raise CheckpointError(f"{path}: neither a converted jaxdiff model (manifest.json) nor a diffusers folder "
                              f"(model_index.json)")
    raise CheckpointError(f"{path}: no such file or folder")
