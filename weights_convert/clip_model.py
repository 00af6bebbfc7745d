"""A transformers ``CLIPModel`` folder (``config.json`` + ``model.safetensors``, as ``CLIPModel.save_pretrained``
writes it; e.g. ``openai/clip-vit-base-patch32``) -> ``(CLIPModelConfig, params)`` for :mod:`jaxdiff.clip_model`.

Strict like every converter here: every template leaf filled once, every checkpoint key used (``position_ids``
buffers ignored), every shape checked. Beyond the generic rules, two leaves have no ``.weight``/``.bias`` suffix:
``vision_model.embeddings.class_embedding`` (D,) and the 0-d ``logit_scale``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxdiff.clip_model import CLIPModelConfig, NoVisionTowerError, init_clip_model
from jaxdiff.nn import template_maker
from weights_convert.components import find_weights, read_json
from weights_convert.convert import ComponentRules, state_dict_to_params, to_device
from weights_convert.readers import CheckpointError, read_checkpoint
from weights_convert.rules import LEAF_RULES, LeafRule

CLIP_MODEL_RULES = ComponentRules(leaf_rules=(
    LeafRule(r"(.+\.class_embedding)$", ("{m}",), "identity", ndim=1),
    LeafRule(r"(logit_scale)$", ("{m}",), "identity", ndim=0),
) + LEAF_RULES)


def clip_model_config(folder: str | Path) -> CLIPModelConfig:
    """The folder's config.json as a :class:`CLIPModelConfig`; a text-only folder is a one-line CheckpointError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"CLIP folder {folder}: no such folder")
    try:
        return CLIPModelConfig.from_transformers(read_json(folder / "config.json"))
    except NoVisionTowerError as e:
        raise CheckpointError(f"CLIP folder {folder} {e}") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"CLIP folder {folder}: unsupported config.json ({e})") from None


def clip_weight_files(folder: str | Path, allow_pickle: bool = False) -> list[Path]:
    """``model.safetensors`` (or its shards); with ``allow_pickle`` also transformers' ``pytorch_model.bin``."""
    folder = Path(folder)
    legacy = folder / "pytorch_model.bin"
    try:
        return find_weights(folder, "model", allow_pickle)
    except CheckpointError as e:
        if legacy.is_file() and allow_pickle:
            return [legacy]
        if legacy.is_file():
            raise CheckpointError(f"{e}; pytorch_model.bin is a pickle: convert it to model.safetensors or allow "
                                  "pickles (CLI: --allow-pickle) if you trust it") from None
        raise


def load_clip_model(folder: str | Path, *, allow_pickle: bool = False, dtype=np.float32):
    """Convert a transformers ``CLIPModel`` folder -> ``(CLIPModelConfig, params)``."""
    config = clip_model_config(folder)
    sd: dict = {}
    for f in clip_weight_files(folder, allow_pickle):
        sd.update(read_checkpoint(f, allow_pickle=allow_pickle, lazy=True))
    template = init_clip_model(template_maker(), config)
    params, _ = state_dict_to_params(sd, template, CLIP_MODEL_RULES, what=f"{folder} as a CLIPModel", dtype=dtype,
                                  put=to_device)
    return config, params
