"""Plot the loss curves of a training log (the ``[stage] step s/N  loss ...`` lines :class:`train.loop.Progress`
prints) as a PNG, one panel per stage; Pillow only.

    python -m train.plot_log runs/shapesworld/train.log --out train/figures/shapesworld_training.png

A resumed run repeats the steps after its last checkpoint; the later line of a step wins.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np

LINE = re.compile(r"^\[(?P<stage>\w+)\] step (?P<step>\d+)/(?P<total>\d+)\s+(?P<metrics>.*?)\s+[\d.]+ it/s")


def read_log(path: str | Path, metric: str = "loss") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """stage -> (steps, values) of ``metric``, sorted by step."""
    curves: dict[str, dict[int, float]] = {}
    for line in Path(path).read_text().splitlines():
        m = LINE.match(line)
        if not m:
            continue
        fields = m["metrics"].split()
        values = dict(zip(fields[::2], fields[1::2]))
        if metric in values:
            curves.setdefault(m["stage"], {})[int(m["step"])] = float(values[metric])
    return {s: (np.array(sorted(c)), np.array([c[k] for k in sorted(c)])) for s, c in curves.items()}


def plot(curves: dict, metric: str = "loss", size=(420, 280)) -> np.ndarray:
    """One log-scale panel per stage, side by side, with min/max labels on the value axis."""
    from PIL import Image, ImageDraw, ImageFont
    w, h = size
    left, bottom, top, right = 58, 34, 24, 12
    canvas = Image.new("RGB", (w * max(len(curves), 1), h), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for k, (stage, (steps, values)) in enumerate(curves.items()):
        x0, x1, y0, y1 = k * w + left, (k + 1) * w - right, top, h - bottom
        draw.rectangle((x0, y0, x1, y1), outline="black")
        logv = np.log10(np.maximum(values, 1e-12))
        lo, hi = float(logv.min()), float(logv.max())
        hi = hi if hi > lo else lo + 1
        xs = x0 + (steps - steps.min()) / max(steps.max() - steps.min(), 1) * (x1 - x0)
        ys = y1 - (logv - lo) / (hi - lo) * (y1 - y0)
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(30, 90, 200), width=2)
        draw.text((x0, 6), f"{stage}: {metric} (log scale)", fill="black", font=font)
        for v, y in ((10 ** hi, y0), (10 ** lo, y1)):
            draw.text((k * w + 4, y - 6), f"{v:.3g}", fill="black", font=font)
        draw.text((x0, y1 + 6), f"{steps.min()}", fill="black", font=font)
        draw.text((x1 - 6 * len(str(steps.max())), y1 + 6), f"{steps.max()}", fill="black", font=font)
        draw.text(((x0 + x1) // 2 - 12, y1 + 18), "step", fill="black", font=font)
        if not math.isfinite(float(values[-1])):
            draw.text((x0 + 8, y0 + 8), "non-finite values", fill="red", font=font)
    return np.asarray(canvas)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.plot_log", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("--out", default="out/training.png")
    ap.add_argument("--metric", default="loss")
    args = ap.parse_args(argv)
    curves = read_log(args.log, args.metric)
    if not curves:
        print(f"error: no '[stage] step s/N ... {args.metric} ...' lines in {args.log}", file=sys.stderr)
        return 2
    from PIL import Image
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(plot(curves, args.metric)).save(args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{s} {len(v[0])} points, last {args.metric} {v[1][-1]:.4g}"
                                             for s, v in curves.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
