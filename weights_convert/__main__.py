"""CLI: ``python -m weights_convert SRC DST`` converts a diffusers folder or a single-file SD checkpoint into a
jaxdiff model folder (Orbax params + manifest.json + tokenizer/scheduler files). Flags are parsed here only."""

from __future__ import annotations

import argparse
import sys
import time

from jaxdiff.checkpoint import count_params, save_model
from weights_convert.convert import ConversionError
from weights_convert.pipeline import load_any
from weights_convert.readers import CheckpointError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m weights_convert", description=__doc__)
    ap.add_argument("src", help="diffusers folder (model_index.json) or single-file checkpoint (.safetensors)")
    ap.add_argument("dst", help="output folder (written atomically; replaced if it exists)")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="allow pickled .ckpt/.bin files (unpickling runs code: only for files you trust)")
    ap.add_argument("--config-folder", default=None,
                    help="single-file only: a diffusers folder whose component configs/tokenizers to use")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        model = load_any(args.src, allow_pickle=args.allow_pickle, config_folder=args.config_folder)
        converted_with = {"converter": "weights_convert", "source": str(args.src)}
        out = save_model(args.dst, model, {**model.manifest, **converted_with})
    except (CheckpointError, ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k}: {count_params(v) / 1e6:.2f}M" for k, v in model.params.items())
    print(f"wrote {out} ({counts}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
