"""Peak host memory while loading a model: jaxdiff's converter against PyTorch's ``from_pretrained``, same files,
each load in its own fresh process, in one run.

    python -m bench.load_peak --config tiny sd15 [--json out.json]

Per config the orchestrator writes random weights once in real formats (``--workdir``): diffusers'
``UNet2DConditionModel`` / ``AutoencoderKL`` and transformers' ``CLIPTextModel``, each by ``save_pretrained``
as safetensors, plus a ``model_index.json``, i.e. a diffusers pipeline folder (``tiny``: the demo's small
SD1-shaped model; ``sd15``: the SD1.5 preset's configs, 4.3 GB of float32 weights). The jaxdiff-converted copy
of that folder (``python -m weights_convert``: Orbax) is written too. Then one child process per row loads:

* ``jax unet``: :func:`weights_convert.components.load_component` on ``unet/``;
* ``jax folder``: :func:`weights_convert.pipeline.load_any` on the whole diffusers folder;
* ``jax converted``: :func:`jaxdiff.checkpoint.load_model` on the converted folder (what ``python -m sample``
  reads);
* ``torch unet``: ``UNet2DConditionModel.from_pretrained``; ``torch folder``: the UNet, VAE and text encoder
  each by ``from_pretrained`` (what ``StableDiffusionPipeline.from_pretrained`` loads, without tokenizer).
  PyTorch maps safetensors files: right after ``from_pretrained`` most weights are not yet read (not resident),
  so the child then reads every weight once, as the first forward pass would, and reports both peaks.

Each child imports its libraries, releases free heap, resets the kernel's high-water mark (``VmHWM``), loads
(blocking until every array is materialised), and reports the peak RSS, the RSS before loading (the
interpreter and libraries) and the weight bytes of what it loaded. The figure of merit is
``(peak - before) / weight bytes``: the memory the load itself needed, per byte of weights (1.0 = no copy
beyond the weights themselves). Benchmarks are scripts, never tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import measure

PACKAGES = ("jax", "jaxlib", "flax", "orbax-checkpoint", "torch", "diffusers", "transformers", "numpy")
ROWS = ("jax unet", "jax folder", "jax converted", "torch unet", "torch folder")
COMPONENTS = ("unet", "vae", "text_encoder")


# --------------------------------------------------------------------------------------------- weights
def component_configs(name: str) -> dict[str, dict]:
    """Diffusers/transformers config dicts of the UNet, VAE and text encoder of a benchmark config."""
    if name == "tiny":
        from sample.demo import DEMO_CONFIGS
        cfg = {c: dict(DEMO_CONFIGS[c]) for c in COMPONENTS}
        cfg["text_encoder"].update(vocab_size=1000, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # no vocab here
        return cfg
    from weights_convert.single_file import read_preset
    preset = read_preset({"sd15": "sd15"}[name])
    return {c: dict(preset[c]) for c in COMPONENTS}


def prepare_folder(name: str, folder: Path, seed: int = 0) -> None:
    """Random weights (the libraries' default init) saved by ``save_pretrained``, plus a converted copy."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from weights_convert.__main__ import main as convert_main
    from weights_convert.single_file import read_preset

    torch.manual_seed(seed)
    cfg = component_configs(name)
    diffusers_dir = folder / "diffusers"
    for comp, build in (("unet", UNet2DConditionModel.from_config), ("vae", AutoencoderKL.from_config),
                        ("text_encoder", lambda c: CLIPTextModel(CLIPTextConfig(**c)))):
        model = build(cfg[comp])
        model.save_pretrained(diffusers_dir / comp, safe_serialization=True)
        del model
    (diffusers_dir / "scheduler").mkdir(exist_ok=True)
    (diffusers_dir / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(read_preset("sd15")["scheduler"], indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    (diffusers_dir / "model_index.json").write_text(json.dumps(index, indent=2))
    if convert_main([str(diffusers_dir), str(folder / "converted")]) != 0:
        raise SystemExit(f"converting {diffusers_dir} failed")
    (folder / "READY").write_text("ok")


def _ensure_folder(name: str, workdir: Path, timeout_s: float, log) -> Path:
    folder = workdir / f"load_{name}"
    if not (folder / "READY").is_file():
        log(f"writing random {name} weights to {folder} (save_pretrained, then the converter)")
        res = measure.run_child([measure.this_python(), "-m", "bench.load_peak", "--prepare", name,
                                 "--folder", str(folder)], timeout_s=timeout_s, log=log)
        if "error" in res:
            raise SystemExit(f"preparing {name} failed: {res}")
    return folder


# ---------------------------------------------------------------------------------------------- children
def _start() -> int:
    measure.reset_peak_rss()
    return measure.rss_bytes()


def run_child(row: str, folder: Path) -> dict:
    """Load one row's model in this (fresh) process; report peak RSS, RSS before, weight bytes, seconds."""
    framework, what = row.split()
    if framework == "jax":
        import jax

        from jaxdiff.checkpoint import load_model
        from weights_convert.components import load_component
        from weights_convert.pipeline import load_any
        before = _start()
        t0 = time.perf_counter()
        if what == "unet":
            params = load_component(folder / "diffusers" / "unet", "unet")[1]
        else:
            params = (load_any(folder / "diffusers") if what == "folder" else load_model(folder / "converted")).params
        jax.block_until_ready(params)
        seconds = time.perf_counter() - t0
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    else:
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel
        loaders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
        before = _start()
        t0 = time.perf_counter()
        with torch.inference_mode():
            models = [loaders[c].from_pretrained(folder / "diffusers" / c)
                      for c in (("unet",) if what == "unet" else COMPONENTS)]
            lazy_s, lazy_peak = time.perf_counter() - t0, measure.peak_rss_bytes()
            tensors = [t for m in models for t in list(m.parameters()) + list(m.buffers())]
            for t in tensors:   # read every weight once, as the first forward pass would
                t.float().sum()
        seconds = time.perf_counter() - t0
        weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
        extra = {"lazy_peak_rss": lazy_peak, "lazy_load_s": lazy_s, "lazy_ratio": (lazy_peak - before) / weight_bytes}
    peak = measure.peak_rss_bytes()
    return {"row": row, "weight_bytes": weight_bytes, "rss_before": before, "peak_rss": peak,
            "load_s": seconds, "ratio": (peak - before) / weight_bytes, **(extra if framework == "torch" else {})}


# ------------------------------------------------------------------------------------------ orchestrator
def format_table(results: list[dict]) -> str:
    gb = 1e9
    lines = ["| config | load | weights GB | RSS before GB | peak RSS GB | (peak - before) / weights | seconds | "
             "torch before reading the weights: peak GB, ratio, seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['row']} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['config']} | {r['row']} | {r['weight_bytes'] / gb:.3f} | {r['rss_before'] / gb:.3f} | "
                     f"{r['peak_rss'] / gb:.3f} | **{r['ratio']:.2f}** | {r['load_s']:.1f} | " +
                     (f"{r['lazy_peak_rss'] / gb:.3f}, {r['lazy_ratio']:.2f}, {r['lazy_load_s']:.1f} |"
                      if "lazy_peak_rss" in r else "- |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.load_peak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", nargs="+", choices=["tiny", "sd15"], default=["tiny"])
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxdiff-bench"))
    ap.add_argument("--json")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--child", choices=ROWS, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.prepare:
        prepare_folder(args.prepare, Path(args.folder))
        measure.emit_result({"ok": True})
        return 0
    if args.child:
        measure.emit_result(run_child(args.child, Path(args.folder)))
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.config:
        folder = _ensure_folder(name, workdir, args.timeout, log)
        for row in args.rows:
            res = measure.run_child([measure.this_python(), "-m", "bench.load_peak", "--child", row,
                                     "--folder", str(folder)], timeout_s=args.timeout, log=log)
            res.update(config=name, row=row)
            log(f"  {name} {row}: " + (f"ratio {res['ratio']:.2f}, peak {res['peak_rss'] / 1e9:.2f} GB"
                                       if "error" not in res else res["error"]))
            results.append(res)
    table = format_table(results)
    print(table)
    if args.json:
        out = {"machine": measure.machine_info(PACKAGES), "results": results, "table": table}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
