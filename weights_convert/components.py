"""Diffusers-format components (``unet/``, ``vae/``, ``text_encoder[_2]/``) -> (config, params).

Each component folder holds ``config.json`` and weights as ``diffusion_pytorch_model.safetensors`` /
``model.safetensors`` (optionally sharded with an ``*.index.json``), or the pickled ``.bin`` equivalents, which
are read only with ``allow_pickle=True``.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxdiff.nn import template_maker
from weights_convert.convert import ComponentRules, state_dict_to_params
from weights_convert.readers import CheckpointError, read_checkpoint
from weights_convert.rules import Rename


@dataclass(frozen=True)
class ComponentKind:
    """Where a component's model code lives and how its keys are renamed."""

    module: str        # jaxdiff module
    config_cls: str    # frozen config dataclass with ``from_diffusers(dict)``
    init_fn: str       # ``init_*(mk, config) -> params``
    weight_stem: str   # ``diffusion_pytorch_model`` or ``model``
    rules: ComponentRules = ComponentRules()

    def config_from_dict(self, d: dict):
        return getattr(importlib.import_module(self.module), self.config_cls).from_diffusers(d)

    def template(self, config) -> dict:
        return getattr(importlib.import_module(self.module), self.init_fn)(template_maker(), config)


# transformers >= 5.6 saves CLIPTextModel keys without the ``text_model.`` prefix; real SD checkpoints keep it.
_CLIP_RULES = ComponentRules(renames=(Rename(r"^text_model\.", ""),))

KINDS: dict[str, ComponentKind] = {
    "unet": ComponentKind("jaxdiff.unet", "UNetConfig", "init_unet", "diffusion_pytorch_model"),
    "vae": ComponentKind("jaxdiff.vae", "VAEConfig", "init_vae", "diffusion_pytorch_model"),
    "text_encoder": ComponentKind("jaxdiff.clip", "CLIPTextConfig", "init_clip_text", "model", _CLIP_RULES),
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


def read_component_state_dict(folder: Path, stem: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    sd: dict[str, np.ndarray] = {}
    for f in find_weights(folder, stem, allow_pickle):
        sd.update(read_checkpoint(f, allow_pickle=allow_pickle))
    return sd


def load_component(folder: str | Path, kind: str, *, allow_pickle: bool = False, dtype=np.float32):
    """Load ``folder`` (a diffusers component folder) as ``kind`` -> ``(config, params)``.

    ``kind``: ``"unet"``, ``"vae"`` or ``"text_encoder"`` (also used for ``text_encoder_2``).
    """
    folder = Path(folder)
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; known: {sorted(KINDS)}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a diffusers {kind} folder)")
    k = KINDS[kind]
    config = k.config_from_dict(read_json(folder / "config.json"))
    sd = read_component_state_dict(folder, k.weight_stem, allow_pickle)
    params, _ = state_dict_to_params(sd, k.template(config), k.rules, what=f"{folder} as {kind}", dtype=dtype)
    return config, params
