"""The GPU suite: every figure of the speed-and-memory issue in one prepared command, one JSON and one markdown.

    python -m bench.gpu_suite OUT                 # on the GPU machine: full sizes, bf16 (about 8 minutes)
    python -m bench.gpu_suite OUT --tiny          # anywhere: the same sections on tiny models (CI runs this)

Sections, in priority order (each a ``bench/`` script in its own processes, so one failure or timeout costs
only its section; results are written after every section, so an interrupted run keeps what it measured):

1. ``unet_sd15``: SD1.5 UNet step, batch 1 and 8, bf16: jaxdiff with its fast attention (cuDNN's fused kernel
   where :func:`jaxdiff.attention.attention_kernel` picks it), jaxdiff with every fast attention on XLA's
   unfused kernel (``JAXDIFF_ATTENTION=xla``), diffusers-PyTorch (SDPA); MFU, device peak, agreement of the
   two attention paths and with PyTorch, and the 10 most expensive ops of a jaxdiff step (:mod:`bench.kernels`);
2. ``pipeline_sd15``: text encoding + DDIM steps with guidance + VAE decode at batch 8, images/s against
   diffusers' ``StableDiffusionPipeline`` (same random weights, bf16 both);
3. ``steering_sd15``: a 50-step guided run at batch 8 plain / capturing every cross-attention map / one h-space
   edit / a 4-concept table (:mod:`bench.steering_cost`);
4. ``methods_shapesworld``: Learn-to-Steer's and Abs-Grad-SAM's per-image cost on the embedded model (the one
   with a relation classifier);
5. ``unet_sdxl``: the full-size SDXL UNet step, batch 1 and 4, bf16, against diffusers-PyTorch.

``--tiny`` swaps in the demo's SD1-shaped model (and a tiny SDXL-shaped UNet), batches 1-2 and a few steps:
the same code paths, in about two minutes on two CPU cores. ``--budget`` (seconds) skips the sections that
would start after it, so the whole command fits a device loan; a skipped section is named in the output.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import measure

PACKAGES = ("jax", "jaxlib", "flax", "torch", "diffusers", "transformers", "numpy")


def sections(tiny: bool, workdir: Path) -> list[tuple[str, list[str], float]]:
    """(name, argv after ``python -m``, timeout seconds) of every section, full size or tiny."""
    common = ["--max-wait", "0", "--load-threshold", "99", "--workdir", str(workdir)]
    if tiny:
        unet = ("tiny", ["1"], "float32", ["--repeats", "2", "--warmup", "1"])
        sdxl = ("tiny-sdxl", ["1"], "float32", ["--repeats", "2", "--warmup", "1"])
        pipe = ["--config", "tiny", "--batch", "2", "--steps", "2", "3", "--repeats", "1"]
        steer = ["--model", "tiny", "--batch", "2", "--steps", "3", "--repeats", "1"]
        methods = ["--model", "tiny", "--batch", "1", "--steps", "3", "--repeats", "1", "--variants", "ags"]
        timeout = 600.0
    else:
        unet = ("sd15", ["1", "8"], "bfloat16", ["--repeats", "10", "--warmup", "2"])
        sdxl = ("sdxl", ["1", "4"], "bfloat16", ["--repeats", "5", "--warmup", "2"])
        pipe = ["--config", "sd15", "--batch", "8", "--steps", "10", "50", "--repeats", "2", "--dtype", "bfloat16"]
        steer = ["--model", "sd15", "--batch", "8", "--steps", "50", "--repeats", "2", "--dtype", "bfloat16"]
        methods = ["--model", "shapesworld", "--batch", "8", "--steps", "50", "--repeats", "2",
                   "--variants", "plain", "l2s", "ags"]
        timeout = 420.0

    def unet_step(config, batches, dtype, extra, frameworks):
        return ["bench.unet_step", "--config", config, "--batch", *batches, "--dtype", dtype, "--frameworks",
                *frameworks, "--single-run", *extra, *common]

    return [
        ("unet_sd15", unet_step(*unet, ["jax", "jax-xla", "torch"]) + ["--profile-top", "10"], timeout),
        ("pipeline_sd15", ["bench.pipeline", *pipe, "--single-run", *common], timeout),
        ("steering_sd15", ["bench.steering_cost", *steer, "--variants", "plain", "capture", "hedit", "concepts",
                           "--workdir", str(workdir)], timeout),
        ("methods_shapesworld", ["bench.steering_cost", *methods, "--workdir", str(workdir)], timeout),
        ("unet_sdxl", unet_step(*sdxl, ["jax", "torch"]), timeout),
    ]


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _gb(x) -> str:
    return "-" if not x else f"{x / 1e9:.2f} GB"


def run_section(name: str, argv: list[str], timeout: float, out: Path, log) -> dict:
    """Run one section with ``--json OUT/NAME.json``; its record: seconds, exit status, the JSON it wrote."""
    path = out / f"{name}.json"
    cmd = [measure.this_python(), "-m", *argv, "--json", str(path)]
    log(f"== {name}: {' '.join(cmd[2:])}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", f"timed out after {timeout:.0f} s: {_text(e.stdout)}{_text(e.stderr)}"[-4000:]
    (out / f"{name}.log").write_text(tail)
    rec = {"name": name, "argv": argv, "seconds": time.perf_counter() - t0, "rc": rc}
    if path.is_file():
        rec["result"] = json.loads(path.read_text())
    if rc != 0:
        rec["error_tail"] = tail[-1500:]
    log(f"   {name}: rc {rc}, {rec['seconds']:.0f} s")
    return rec


def section_markdown(rec: dict) -> str:
    """A section's table, drawn by the script that measured it."""
    res = rec.get("result")
    head = f"### {rec['name']} ({rec['seconds']:.0f} s, exit {rec['rc']})\n\n`python -m {' '.join(rec['argv'])}`\n"
    if res is None:
        return head + f"\nno result: {rec.get('skipped') or rec.get('error_tail', '')[-600:]}\n"
    if rec["name"].startswith("unet"):
        from bench.kernels import format_kernels
        from bench.unet_step import format_table
        body = format_table(res["rows"])
        for r in res["rows"]:
            if r.get("mfu") is not None or r.get("device_peak_bytes"):
                body += (f"\n\n{r['framework']} batch {r['batch']}: MFU {_pct(r.get('mfu'))}, "
                         f"device peak {_gb(r.get('device_peak_bytes'))}")
            if r.get("vs_xla_attention"):
                rel = r["vs_xla_attention"]["rel"]
                body += f"\n\nbatch {r['batch']}: fast vs XLA attention, max-abs / std {rel:.1e}"
            if r.get("top_kernels"):
                body += f"\n\n{r['framework']} batch {r['batch']}, top ops:\n\n" + format_kernels(r["top_kernels"])
        return head + "\n" + body + "\n"
    if rec["name"].startswith("pipeline"):
        from bench.pipeline import format_table
        a = res["agreement"]
        return (head + "\n" + format_table(res["summaries"]) +
                f"\n\nfinal images, jaxdiff vs diffusers: max-abs {a['max_abs']:.2e} (std {a['ref_std']:.3f})\n")
    from bench.steering_cost import format_table
    return head + "\n" + format_table(res) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for suite.json, suite.md and each section's JSON and log")
    ap.add_argument("--tiny", action="store_true", help="tiny models, CPU-sized (the CI test)")
    ap.add_argument("--budget", type=float, default=480.0, help="start no section after this many seconds")
    ap.add_argument("--only", nargs="+", help="run only these sections")
    ap.add_argument("--workdir", help="weights and caches (default OUT/work)")
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir) if args.workdir else out / "work"
    t0 = time.perf_counter()
    suite = {"machine": measure.machine_info(PACKAGES), "tiny": args.tiny, "budget_s": args.budget, "sections": []}
    for name, sec_argv, timeout in sections(args.tiny, workdir):
        if args.only and name not in args.only:
            continue
        if time.perf_counter() - t0 > args.budget:
            rec = {"name": name, "argv": sec_argv, "seconds": 0.0, "rc": "skipped",
                   "skipped": f"budget of {args.budget:.0f} s spent"}
        else:
            rec = run_section(name, sec_argv, min(timeout, max(60.0, args.budget - (time.perf_counter() - t0))),
                              out, log)
        suite["sections"].append(rec)
        suite["seconds"] = time.perf_counter() - t0
        (out / "suite.json").write_text(json.dumps(suite, indent=2))
        (out / "suite.md").write_text(f"## GPU suite ({'tiny' if args.tiny else 'full size'}, "
                                      f"{suite['seconds']:.0f} s)\n\n" +
                                      "\n".join(section_markdown(r) for r in suite["sections"]))
    print((out / "suite.md").read_text())
    return 0 if all(r["rc"] == 0 for r in suite["sections"]) else 1


if __name__ == "__main__":
    sys.exit(main())
