"""Background preservation (PSNR / SSIM outside the objects) and the bias deviation ratio.

* Background region: the pixels outside *both* images' object masks (the judge's masks unless given),
  each mask dilated by ``margin`` px (default 2) so anti-aliased or blurred object edges, whose colour is
  partly object, are not counted as background. This is the comparison Abs-Grad-SAM's task needs (keep
  the reference background while drawing a subject; methods.md §5) and LWIM's background consistency
  (methods.md §2.3 suggests SSIM/PSNR outside the subject mask).
* PSNR = 10 log10(255^2 / MSE) over the region's pixels and the three channels; +inf when identical.
* SSIM: Wang, Bovik, Sheikh, Simoncelli 2004 ("Image quality assessment: from error visibility to
  structural similarity", IEEE TIP 13(4), eq. 13): SSIM = ((2 mu_x mu_y + C1)(2 sigma_xy + C2)) /
  ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)), C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = 255, local
  statistics under an 11x11 circular-symmetric Gaussian window with sigma 1.5. Restricted to the region:
  the window weights are multiplied by the region indicator and renormalised (normalised convolution), so
  object pixels never enter any statistic; the SSIM map is averaged over region pixels, per channel, then
  over the channels (RGB). On a full region this is the standard SSIM, except that windows at the image
  border are renormalised instead of cropped away.
* Deviation ratio (Li et al. / RespoDiff; methods.md §1.2 and §6): with counts n_c over C attribute values,
  p_c = n_c / sum n, Delta = max_c |p_c - 1/C| / (1 - 1/C): 0 balanced, 1 all one value.
"""

from __future__ import annotations

import numpy as np

from jaxdiff.shapesworld.imageops import dilate, filter2d, gaussian_kernel
from jaxdiff.shapesworld.judge import JUDGE, JudgeParams, as_image, detect

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5          # 11 x 11 window
SSIM_K1, SSIM_K2, DATA_RANGE = 0.01, 0.03, 255.0


def background_region(a, b, mask_a: np.ndarray | None = None, mask_b: np.ndarray | None = None,
                      margin: int = 2, params: JudgeParams = JUDGE) -> np.ndarray:
    """(H, W) bool: pixels outside both images' object masks dilated by ``margin``. Masks default to the
    judge's detected object masks of each image."""
    a, b = as_image(a, params.image_size), as_image(b, params.image_size)
    ma = detect(a, params).object_mask if mask_a is None else np.asarray(mask_a, bool)
    mb = detect(b, params).object_mask if mask_b is None else np.asarray(mask_b, bool)
    if ma.shape != a.shape[:2] or mb.shape != b.shape[:2]:
        raise ValueError(f"masks must be {a.shape[:2]}, got {ma.shape} and {mb.shape}")
    return ~dilate(ma | mb, margin) if margin > 0 else ~(ma | mb)


def _region(a, b, region, params) -> np.ndarray:
    region = background_region(a, b, params=params) if region is None else np.asarray(region, bool)
    if region.shape != a.shape[:2]:
        raise ValueError(f"region must be {a.shape[:2]}, got {region.shape}")
    if not region.any():
        raise ValueError("the background region is empty (objects cover the whole image)")
    return region


def background_psnr(a, b, region: np.ndarray | None = None, params: JudgeParams = JUDGE) -> float:
    """PSNR (dB) between two RGB uint8 images over the background region (default: see
    :func:`background_region`); +inf when the region is identical."""
    a, b = as_image(a, params.image_size), as_image(b, params.image_size)
    region = _region(a, b, region, params)
    mse = float(((a[region].astype(np.float64) - b[region].astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(DATA_RANGE ** 2 / mse))


def ssim_map(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM of two (H, W) float images with local statistics weighted by ``weights`` (H, W) in
    {0, 1} under the Gaussian window (normalised convolution). Undefined (nan) where no weight is seen."""
    g = gaussian_kernel(SSIM_SIGMA, SSIM_RADIUS)

    def local_mean(v):
        return filter2d(v * weights, g, g, mode="constant") / norm

    norm = filter2d(weights, g, g, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = local_mean(x), local_mean(y)
        vx, vy = local_mean(x * x) - mx * mx, local_mean(y * y) - my * my
        cxy = local_mean(x * y) - mx * my
        c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
        return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def background_ssim(a, b, region: np.ndarray | None = None, params: JudgeParams = JUDGE) -> float:
    """Mean SSIM over the background region and the RGB channels (see module doc); 1.0 when identical."""
    a, b = as_image(a, params.image_size), as_image(b, params.image_size)
    region = _region(a, b, region, params)
    w = region.astype(np.float64)
    per_channel = [ssim_map(a[..., c].astype(np.float64), b[..., c].astype(np.float64), w)[region].mean()
                   for c in range(3)]
    return float(np.mean(per_channel))


def deviation_ratio(counts) -> float:
    """max_c |p_c - 1/C| / (1 - 1/C) for counts over C >= 2 attribute values (zeros included)."""
    n = np.asarray(list(counts.values()) if isinstance(counts, dict) else counts, np.float64)
    if n.ndim != 1 or len(n) < 2 or (n < 0).any() or n.sum() <= 0:
        raise ValueError(f"need >= 2 non-negative counts with a positive sum, got {n.tolist()}")
    p, c = n / n.sum(), len(n)
    return float(np.abs(p - 1.0 / c).max() / (1.0 - 1.0 / c))
