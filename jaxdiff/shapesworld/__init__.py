"""ShapesWorld: a procedural world of flat-coloured shapes on textured backgrounds with exact ground truth,
its caption language, and an exact judge for generated images (issue 5, parts 1-2). numpy + Pillow only.

Modules: :mod:`params` (vocabulary, frozen :class:`WorldParams`), :mod:`world` (seeded scene sampling),
:mod:`render` (anti-aliased rasterisation), :mod:`backgrounds` (textures), :mod:`captions` (templates and
parser), :mod:`spatial` (GenEval's relation rule), :mod:`segment` / :mod:`shapefit` / :mod:`judge` (the
judge), :mod:`metrics` (background PSNR/SSIM, deviation ratio), :mod:`accuracy` (the judge's own accuracy),
:mod:`imageops` and :mod:`colour` (helpers).
"""

from jaxdiff.shapesworld.captions import (NEUTRAL_CAPTIONS, CaptionError, CaptionSpec, ObjectPhrase, format_caption,
                                          parse_caption)
from jaxdiff.shapesworld.judge import (JUDGE, CaptionScore, Check, DetectedObject, Detection, ImageError, JudgeParams,
                                       detect, score_caption)
from jaxdiff.shapesworld.metrics import background_psnr, background_region, background_ssim, deviation_ratio
from jaxdiff.shapesworld.params import BACKGROUNDS, COLOURS, PALETTE, RELATION_LABELS, SHAPES, SIZES, WORLD, WorldParams
from jaxdiff.shapesworld.spatial import geneval_relations
from jaxdiff.shapesworld.world import Scene, eval_captions, make_eval_scene, make_reference_scene, make_scene

__all__ = ["BACKGROUNDS", "COLOURS", "JUDGE", "NEUTRAL_CAPTIONS", "PALETTE", "RELATION_LABELS", "SHAPES", "SIZES",
           "WORLD", "CaptionError", "CaptionScore", "CaptionSpec", "Check", "DetectedObject", "Detection",
           "ImageError", "JudgeParams", "ObjectPhrase", "Scene", "WorldParams", "background_psnr",
           "background_region", "background_ssim", "detect", "deviation_ratio", "eval_captions", "format_caption",
           "geneval_relations", "make_eval_scene", "make_reference_scene", "make_scene", "parse_caption", "score_caption"]
