"""Where the embedded ShapesWorld model lives: a diffusers folder shipped inside the installed package.

``python -m sample`` uses it when no ``--model`` is given. It is an ordinary Stable Diffusion folder
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), read by the same
converter as real SD (``weights_convert.pipeline.load_any``) and by diffusers' ``StableDiffusionPipeline``.
It is written by ``python -m train --export jaxdiff/assets/shapesworld`` (see ``train/`` and RESULTS.md).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

ASSET = "assets/shapesworld"


class MissingDefaultModel(FileNotFoundError):
    """The installed package has no (complete) embedded model."""


def default_model_dir() -> Path:
    """The embedded model's folder; raises :class:`MissingDefaultModel` naming what is missing."""
    folder = Path(str(resources.files("jaxdiff").joinpath(ASSET)))
    missing = [name for name in ("model_index.json", "unet/config.json", "vae/config.json",
                                 "text_encoder/config.json", "tokenizer/vocab.json", "scheduler/scheduler_config.json")
               if not (folder / name).is_file()]
    if missing:
        raise MissingDefaultModel(
            f"the embedded ShapesWorld model at {folder} is incomplete (missing {', '.join(missing)}): reinstall "
            f"jaxdiff, retrain it with `python -m train --export {folder}`, or pass --model")
    return folder
