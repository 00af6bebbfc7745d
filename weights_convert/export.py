"""jaxdiff params -> diffusers/transformers state dicts and folders (the inverse of the generic rules).

Used to export models the project trains (e.g. the embedded default model) in diffusers folder format, and to
make torch-free test fixtures. The inverse layout ops mirror ``rules.LEAF_RULES``: ``kernel`` of rank 4 ->
OIHW ``weight``; rank 2 -> transposed ``weight``; ``scale``/``embedding`` -> ``weight``; ``bias`` -> ``bias``.
Only list containers turn ``name_N`` back into ``name.N`` (``time_embedding/linear_1`` is a real name).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from jaxdiff.checkpoint import StableDiffusionModel, component_kind

LIST_CONTAINERS = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
                   "upsamplers", "to_out", "net", "layers")
_LIST_RE = re.compile(r"(^|/)(" + "|".join(LIST_CONTAINERS) + r")_(\d+)(?=/|$)")


def torch_key(path: str) -> str:
    """``down_blocks_0/resnets_1/conv1/kernel`` -> ``down_blocks.0.resnets.1.conv1.weight``."""
    module, leaf = path.rsplit("/", 1)
    module = _LIST_RE.sub(r"\1\2.\3", module).replace("/", ".")
    return f"{module}.{'bias' if leaf == 'bias' else 'weight'}"


def torch_layout(leaf: str, x: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and x.ndim == 4:
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    if leaf == "kernel" and x.ndim == 2:
        return np.ascontiguousarray(x.T)
    return np.ascontiguousarray(x)


def params_to_state_dict(params: dict, prefix: str = "", dtype=np.float32) -> dict[str, np.ndarray]:
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params), sep="/")
    return {prefix + torch_key(p): torch_layout(p.rsplit("/", 1)[1], v).astype(dtype) for p, v in flat.items()}


def export_diffusers_folder(model: StableDiffusionModel, dst: str | Path, pipeline_class: str | None = None,
                            dtype=np.float32) -> Path:
    """Write ``model`` as a diffusers pipeline folder with safetensors weights."""
    from safetensors.numpy import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline_class or ("StableDiffusionXLPipeline" if model.is_sdxl
                                                else "StableDiffusionPipeline"),
             "_diffusers_version": "0.42.1"}
    for name, params in model.params.items():
        kind = component_kind(name)
        (dst / name).mkdir(exist_ok=True)
        (dst / name / "config.json").write_text(json.dumps(model.config_dicts[name], indent=2))
        stem = "model" if kind == "text_encoder" else "diffusion_pytorch_model"
        save_file(params_to_state_dict(params, dtype=dtype), str(dst / name / f"{stem}.safetensors"))
        lib, cls = (("transformers", model.config_dicts[name].get("architectures", ["CLIPTextModel"])[0])
                    if kind == "text_encoder" else
                    ("diffusers", "UNet2DConditionModel" if kind == "unet" else "AutoencoderKL"))
        index[name] = [lib, cls]
    for name, folder in model.tokenizer_dirs.items():
        shutil.copytree(folder, dst / name, dirs_exist_ok=True)
        index[name] = ["transformers", "CLIPTokenizer"]
    (dst / "scheduler").mkdir(exist_ok=True)
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2))
    index["scheduler"] = ["diffusers", model.scheduler_config.get("_class_name", "PNDMScheduler")]
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))
    return dst
