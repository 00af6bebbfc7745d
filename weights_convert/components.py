"""Diffusers-format components (``unet/``, ``vae/``, ``text_encoder[_2]/``) -> (config, params).

Each component folder holds ``config.json`` and weights as ``diffusion_pytorch_model.safetensors`` /
``model.safetensors`` (optionally sharded with an ``*.index.json``), or the pickled ``.bin`` equivalents, which
are read only with ``allow_pickle=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxdiff.checkpoint import component_kind, config_from_dict, param_template
from weights_convert.convert import ComponentRules, state_dict_to_params, to_device
from weights_convert.readers import CheckpointError, read_checkpoint
from weights_convert.rules import Rename


@dataclass(frozen=True)
class ComponentKind:
    """How a component's weights are stored and how its keys are renamed (model code: jaxdiff.checkpoint)."""

    weight_stem: str   # ``diffusion_pytorch_model`` or ``model``
    rules: ComponentRules = ComponentRules()


# transformers >= 5.6 saves CLIPTextModel keys without the ``text_model.`` prefix; real SD checkpoints keep it.
CLIP_RULES = ComponentRules(renames=(Rename(r"^text_model\.", ""),))

KINDS: dict[str, ComponentKind] = {
    "unet": ComponentKind("diffusion_pytorch_model"),
    "vae": ComponentKind("diffusion_pytorch_model"),
    "text_encoder": ComponentKind("model", CLIP_RULES),
}


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (is this a diffusers component folder?)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def find_weights(folder: Path, stem: str, allow_pickle: bool) -> list[Path]:
    """The weight files of a component folder, safetensors preferred, shards resolved through the index."""
    for suffix in (".safetensors", ".bin"):
        single = folder / f"{stem}{suffix}"
        if single.is_file():
            return [single]
        index = folder / f"{stem}{suffix}.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index)["weight_map"].values()))
            return [folder / s for s in shards]
    found = sorted(p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".ckpt"))
    raise CheckpointError(f"{folder}: no {stem}.safetensors or {stem}.bin (found: {found or 'nothing'})")


def read_component_state_dict(folder: Path, stem: str, allow_pickle: bool = False) -> dict:
    """Every tensor of the component's weight files, safetensors ones lazily (read at conversion)."""
    sd: dict[str, np.ndarray] = {}
    for f in find_weights(folder, stem, allow_pickle):
        sd.update(read_checkpoint(f, allow_pickle=allow_pickle, lazy=True))
    return sd


def convert_component(folder: str | Path, kind: str, *, allow_pickle: bool = False, dtype=np.float32):
    """Convert a diffusers component folder -> ``(config_dict, config, params)``, params on the default device
    (converted leaf by leaf: the peak is about one copy of the weights)."""
    folder = Path(folder)
    kind = component_kind(kind)
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; known: {sorted(KINDS)}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a diffusers {kind} folder)")
    k = KINDS[kind]
    config_dict = read_json(folder / "config.json")
    config = config_from_dict(kind, config_dict)
    sd = read_component_state_dict(folder, k.weight_stem, allow_pickle)
    params, _ = state_dict_to_params(sd, param_template(kind, config), k.rules, what=f"{folder} as {kind}",
                                     dtype=dtype, put=to_device)
    return config_dict, config, params


def load_component(folder: str | Path, kind: str, *, allow_pickle: bool = False, dtype=np.float32):
    """Load ``folder`` (a diffusers component folder) as ``kind`` -> ``(config, params)``.

    ``kind``: ``"unet"``, ``"vae"`` or ``"text_encoder"`` (``"text_encoder_2"`` is the same kind).
    """
    _, config, params = convert_component(folder, kind, allow_pickle=allow_pickle, dtype=dtype)
    return config, params
