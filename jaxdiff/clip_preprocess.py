"""CLIP image preprocessing as transformers' ``CLIPImageProcessor`` (PIL backend; ``CLIPImageProcessorPil`` in
transformers 5, the only one in 4.x that the papers used) does it, on uint8 RGB images:

1. resize with PIL (bicubic by default) so the shortest side is ``shortest_edge``; the other side is
   ``int(shortest_edge * long / short)`` (floored), as transformers' ``get_resize_output_image_size``;
2. centre crop to ``crop_size``: top = (H - h) // 2, left = (W - w) // 2 (zero padding where the image is
   smaller, centred with the extra pixel at the top/left);
3. rescale: ``float64(x) * rescale_factor`` cast to float32;
4. normalise: ``(x - mean) / std`` per channel in float32.

Settings come from a folder's ``preprocessor_config.json`` when it has one (both the old int ``size``/``crop_size``
spellings and the dict ones), else the OpenAI CLIP defaults below. Output is NHWC float32 (transformers: NCHW).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3


class PreprocessConfigError(ValueError):
    """A ``preprocessor_config.json`` that cannot be read or has values we do not support."""


@dataclass(frozen=True)
class CLIPImagePreprocess:
    """``shortest_edge`` resizes keeping the aspect ratio; ``resize_hw`` (height, width) resizes exactly instead."""

    shortest_edge: int | None = 224
    resize_hw: tuple[int, int] | None = None
    crop_hw: tuple[int, int] = (224, 224)
    resample: int = PIL_BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPImagePreprocess":
        """From a ``preprocessor_config.json`` dict (missing keys: the OpenAI defaults)."""
        kw: dict = {}
        size = d.get("size")
        if isinstance(size, int):
            kw["shortest_edge"] = size
        elif isinstance(size, dict) and size.get("shortest_edge") is not None:
            kw["shortest_edge"] = int(size["shortest_edge"])
        elif isinstance(size, dict) and size.get("height") and size.get("width"):
            kw.update(shortest_edge=None, resize_hw=(int(size["height"]), int(size["width"])))
        elif size is not None:
            raise PreprocessConfigError(f"unsupported image processor size {size!r}")
        crop = d.get("crop_size")
        if isinstance(crop, int):
            kw["crop_hw"] = (crop, crop)
        elif isinstance(crop, dict) and crop.get("height") and crop.get("width"):
            kw["crop_hw"] = (int(crop["height"]), int(crop["width"]))
        elif crop is not None:
            raise PreprocessConfigError(f"unsupported image processor crop_size {crop!r}")
        for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if d.get(k) is not None:
                kw[k] = bool(d[k])
        if d.get("resample") is not None:
            kw["resample"] = int(d["resample"])
        if d.get("rescale_factor") is not None:
            kw["rescale_factor"] = float(d["rescale_factor"])
        for k in ("image_mean", "image_std"):
            if d.get(k) is not None:
                v = d[k]
                v = (v,) * 3 if isinstance(v, (int, float)) else tuple(v)
                if len(v) != 3:
                    raise PreprocessConfigError(f"{k} must have 3 entries (RGB), got {d[k]!r}")
                kw[k] = tuple(float(x) for x in v)
        return cls(**kw)

    @classmethod
    def from_folder(cls, folder) -> "CLIPImagePreprocess":
        """The folder's ``preprocessor_config.json`` if present, else the OpenAI defaults."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise PreprocessConfigError(f"{path}: cannot read a JSON object ({e})") from None
        if not isinstance(d, dict):
            raise PreprocessConfigError(f"{path}: not a JSON object")
        return cls.from_dict(d)

    @property
    def output_hw(self) -> tuple[int, int] | None:
        """(height, width) of every output image, when fixed (a centre crop or an exact resize)."""
        if self.do_center_crop:
            return self.crop_hw
        return self.resize_hw if self.do_resize else None


def resize_hw(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """Output (height, width) with the short side ``shortest_edge`` and the long side floored."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W, C) -> (h, w, C); zero-padded (centred, extra pixel top/left) where the image is smaller."""
    height, width = image.shape[:2]
    if height < h or width < w:
        ph, pw = max(h, height), max(w, width)
        padded = np.zeros((ph, pw, image.shape[2]), image.dtype)
        top, left = -(-(ph - height) // 2), -(-(pw - width) // 2)
        padded[top:top + height, left:left + width] = image
        image, height, width = padded, ph, pw
    top, left = (height - h) // 2, (width - w) // 2
    return image[top:top + h, left:left + w]


def preprocess_image(image: np.ndarray, cfg: CLIPImagePreprocess = CLIPImagePreprocess()) -> np.ndarray:
    """One uint8 (H, W, 3) RGB image -> float32 (h, w, 3), the module docstring's steps."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"CLIP preprocessing takes uint8 (H, W, 3) RGB images, got {image.dtype} {image.shape}")
    if cfg.do_resize:
        hw = cfg.resize_hw if cfg.shortest_edge is None else resize_hw(*image.shape[:2], cfg.shortest_edge)
        if hw != image.shape[:2]:
            pil = Image.fromarray(image).resize((hw[1], hw[0]), resample=cfg.resample, reducing_gap=None)
            image = np.asarray(pil)
    if cfg.do_center_crop:
        image = center_crop(image, *cfg.crop_hw)
    x = image.astype(np.float64) * cfg.rescale_factor if cfg.do_rescale else image.astype(np.float64)
    x = x.astype(np.float32)
    if cfg.do_normalize:
        x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return x


def preprocess_images(images, cfg: CLIPImagePreprocess = CLIPImagePreprocess()) -> np.ndarray:
    """uint8 (B, H, W, 3) or a list of (H_i, W_i, 3) images -> float32 (B, h, w, 3) NHWC."""
    return np.stack([preprocess_image(im, cfg) for im in images])
