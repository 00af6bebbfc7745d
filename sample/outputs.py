"""Files a person can look at: one PNG per image, a grid PNG, and a JSON sidecar with every setting."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, H, W, 3) uint8 images into one image, ``cols`` per row (default: near square), white padding."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, c), 255, np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        out[y:y + h, x:x + w] = img
    return out


def save_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(np.asarray(image, np.uint8)).save(path)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON via a temporary file + rename, so a crash never leaves a half-written sidecar."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
