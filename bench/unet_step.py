"""UNet step benchmark: jaxdiff vs diffusers' PyTorch ``UNet2DConditionModel`` (and diffusers-Flax 0.39 where
``bench/.venv-flax`` exists), same random weights, same inputs, each framework in its own subprocess.

    python -m bench.unet_step --config tiny sd15 --batch 1 2 [--dtype float32] [--repeats 5]

Per (config, batch) the orchestrator:

1. writes the weights once: diffusers' default random init, ``save_pretrained`` as safetensors (the JAX side
   reads them through the real converter, ``weights_convert.components.load_component``);
2. waits for the 1-minute load average to drop below ``--load-threshold`` (other people share the cores) and
   records the load before and after every measurement;
3. runs the JAX child twice with a fresh persistent compilation cache (``jax_compilation_cache_dir``, min
   compile time 0): the first compile is cold, the second is served from the cache; both time the steps;
4. runs the PyTorch child (``inference_mode``; on a CUDA GPU in ``--dtype``, else fp32 on the CPU with
   ``torch.set_num_threads(cores)``) and the Flax peer;
5. prints one table row per framework: median step time after warm-up (``block_until_ready``), achieved
   FLOP/s from the analytic count (:mod:`jaxdiff.flops`), MFU on GPUs, compile times, peak RSS while loading
   and while compiling+running (``VmHWM``, reset in between; device ``peak_bytes_in_use`` on GPU), the ratio
   torch_time / this_time, and how far each output is from PyTorch's (max-abs / std).

Configs: ``tiny`` (the demo's 2-level SD1-shaped UNet, 16x16 latents), ``sd15`` (SD1.5 architecture, 64x64
latents), ``sdxl`` (SDXL base, 128x128; run only if the machine has the memory, see :func:`_sdxl_fits`).
Results go to ``--json`` as well. Benchmarks are scripts, never tests.
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
from bench.inputs import compare, unet_inputs
from bench.kernels import top_kernels
from jaxdiff.attention import KERNEL_ENV

PACKAGES = ("jax", "jaxlib", "flax", "torch", "diffusers", "transformers", "numpy")
FLAX_VENV = Path(__file__).resolve().parent / ".venv-flax"
# Dense peak FLOP/s per device kind (substring of jax's device_kind) and dtype. H100 SXM / H200: 989 TFLOP/s
# bf16 tensor-core dense; 67 TFLOP/s fp32 on the CUDA cores (XLA may use TF32 tensor cores for fp32 matmuls
# by default, which would make fp32 MFU above 100% possible: read fp32 MFU with that in mind).
PEAK_TFLOPS = {("H100", "bfloat16"): 989.0, ("H100", "float32"): 67.0,
               ("H200", "bfloat16"): 989.0, ("H200", "float32"): 67.0}


# -------------------------------------------------------------------------------------------- configs
# An SDXL-shaped UNet at CI size (two levels, text_time conditioning, two transformer layers in the second).
TINY_SDXL = {"_class_name": "UNet2DConditionModel", "sample_size": 16, "block_out_channels": [32, 64],
             "layers_per_block": 1, "norm_num_groups": 8, "cross_attention_dim": 64, "attention_head_dim": [2, 4],
             "use_linear_projection": True, "transformer_layers_per_block": [1, 2],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "addition_embed_type": "text_time",
             "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 24 + 6 * 8}
CONFIGS = ("tiny", "tiny-sdxl", "sd15", "sdxl")


def unet_config(name: str) -> dict:
    """The diffusers ``UNet2DConditionModel`` config of a benchmark config name."""
    if name == "tiny-sdxl":
        return dict(TINY_SDXL)
    if name == "tiny":
        from sample.demo import DEMO_CONFIGS

        return dict(DEMO_CONFIGS["unet"])
    from weights_convert.single_file import read_preset

    return dict(read_preset({"sd15": "sd15", "sdxl": "sdxl-base"}[name])["unet"])


def _param_count(config: dict) -> int:
    from jaxdiff.checkpoint import count_params, param_template
    from jaxdiff.unet import UNetConfig

    return count_params(param_template("unet", UNetConfig.from_diffusers(config)))


def _sdxl_fits(config: dict, log) -> bool:
    """fp32 weights are held up to ~2.5x while writing/converting them (torch model + serialised copy, or
    numpy state dict + device arrays); skip when MemAvailable cannot hold that."""
    need = 2.5 * 4 * _param_count(config)
    have = measure.available_ram_bytes()
    if need > have:
        log(f"SKIP sdxl: needs ~{need / measure.GiB:.1f} GiB (2.5 x fp32 weights) but only "
            f"{have / measure.GiB:.1f} GiB is available")
        return False
    return True


# --------------------------------------------------------------------------------------------- weights
def prepare_weights(name: str, folder: Path, seed: int = 0) -> None:
    """diffusers' default random init of the config, saved as ``folder/unet`` (safetensors + config.json)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel.from_config(unet_config(name))
    model.save_pretrained(folder / "unet", safe_serialization=True)


def _ensure_weights(name: str, workdir: Path, log) -> Path:
    folder = workdir / name
    if not (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        log(f"writing random {name} weights to {folder} (diffusers default init)")
        res = measure.run_child([measure.this_python(), "-m", "bench.unet_step", "--prepare", name,
                                 "--weights", str(folder)], timeout_s=1800, log=log)
        if "error" in res:
            raise SystemExit(f"preparing {name} failed: {res}")
    return folder


# ---------------------------------------------------------------------------------------------- children
def _device_peak_bytes(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else stats.get("peak_bytes_in_use")


def run_jax_child(folder: Path, batch: int, dtype: str, repeats: int, warmup: int, cache_dir: str | None,
                  save_output: str | None, profile_top: int = 0) -> dict:
    """Load (converter), compile (timed, optionally through the persistent cache), time steps; with
    ``profile_top`` also the most expensive ops of a traced step (:mod:`bench.kernels`)."""
    measure.use_persistent_compilation_cache(cache_dir)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.flops import unet_flops
    from jaxdiff.unet import apply_unet
    from weights_convert.components import load_component

    t0 = time.perf_counter()
    cfg, params = load_component(folder / "unet", "unet")
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    peak_load = measure.peak_rss_bytes()
    measure.reset_peak_rss()
    rss_before_run = measure.rss_bytes()

    raw = unet_inputs(json.loads((folder / "unet" / "config.json").read_text()), batch)
    x = jnp.asarray(np.transpose(raw["sample"], (0, 2, 3, 1)), dtype)
    t, ctx = jnp.asarray(raw["timestep"]), jnp.asarray(raw["context"], dtype)
    added = ({k: jnp.asarray(raw[k]) for k in ("text_embeds", "time_ids")} if "time_ids" in raw else None)

    def step(p, x, t, ctx, added):
        return apply_unet(p, x, t, ctx, config=cfg, added_cond=added)[0]

    t0 = time.perf_counter()
    lowered = jax.jit(step).lower(params, x, t, ctx, added)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost

    times = measure.time_calls(lambda: compiled(params, x, t, ctx, added).block_until_ready(), repeats, warmup)
    kernels = (top_kernels(lambda: compiled(params, x, t, ctx, added).block_until_ready(), repeats, profile_top)
               if profile_top else None)
    out = np.asarray(compiled(params, x, t, ctx, added), np.float32)
    if save_output:
        np.save(save_output, np.transpose(out, (0, 3, 1, 2)))
    device = jax.devices()[0]
    flops = unet_flops(cfg, batch, x.shape[1], x.shape[2], ctx.shape[1]).total
    res = {"framework": "jaxdiff", "backend": jax.default_backend(), "device": device.device_kind,
           "dtype": dtype, "batch": batch, "load_s": load_s, "lower_s": t1 - t0, "compile_s": t2 - t1,
           "analytic_flops": flops, "xla_flops": float(cost.get("flops", 0.0)) if cost else None,
           "peak_rss_load": peak_load, "rss_before_run": rss_before_run, "peak_rss_run": measure.peak_rss_bytes(),
           "device_peak_bytes": _device_peak_bytes(device), **measure.summarize(times)}
    if kernels is not None:
        res["top_kernels"] = kernels
    if os.environ.get(KERNEL_ENV):
        res["attention"] = os.environ[KERNEL_ENV]
    peak = next((v for (kind, dt), v in PEAK_TFLOPS.items() if kind in device.device_kind and dt == dtype), None)
    if peak and jax.default_backend() == "gpu":
        res["mfu"] = flops / res["median_s"] / (peak * 1e12)
    return res


def run_torch_child(folder: Path, batch: int, repeats: int, warmup: int, save_output: str | None,
                    threads: int | None = None, dtype: str = "float32") -> dict:
    """diffusers' UNet2DConditionModel in ``inference_mode``: on a CUDA GPU when torch sees one (in ``dtype``,
    diffusers' default SDPA attention, ``cuda.synchronize`` inside every timed call), else fp32 on the CPU with
    torch threads = cores (or ``threads``)."""
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    cuda = torch.cuda.is_available()
    dt = getattr(torch, dtype) if cuda else torch.float32
    dev = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(threads or os.cpu_count())
    t0 = time.perf_counter()
    model = UNet2DConditionModel.from_pretrained(folder / "unet").eval().to(dev, dt)
    load_s = time.perf_counter() - t0
    peak_load = measure.peak_rss_bytes()
    measure.reset_peak_rss()
    rss_before_run = measure.rss_bytes()
    raw = {k: torch.from_numpy(v).to(dev) for k, v in unet_inputs(dict(model.config), batch).items()}
    for k in ("sample", "context", "text_embeds"):
        if k in raw:
            raw[k] = raw[k].to(dt)
    added = {k: raw[k] for k in ("text_embeds", "time_ids")} if "time_ids" in raw else None

    def step():
        out = model(raw["sample"], raw["timestep"], raw["context"], added_cond_kwargs=added).sample
        if cuda:
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        times = measure.time_calls(step, repeats, warmup)
        out = step().float().cpu().numpy()
    if save_output:
        np.save(save_output, out)
    device = torch.cuda.get_device_name() if cuda else measure.cpu_model()
    res = {"framework": "diffusers-torch", "backend": "gpu" if cuda else "cpu", "device": device,
           "dtype": str(dt).removeprefix("torch."), "batch": batch, "load_s": load_s,
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "attn_processor": type(next(iter(model.attn_processors.values()))).__name__,
           "peak_rss_load": peak_load, "rss_before_run": rss_before_run, "peak_rss_run": measure.peak_rss_bytes(),
           **measure.summarize(times)}
    if cuda:
        res["device_peak_bytes"] = torch.cuda.max_memory_allocated()
    return res


# ------------------------------------------------------------------------------------------ orchestration
def _measure(cmd: list[str], threshold: float, max_wait: float, timeout: float, log, env: dict | None = None) -> dict:
    before = measure.wait_for_quiet(threshold, max_wait, log=log)
    res = measure.run_child(cmd, timeout, env=env, log=log)
    res.update(load_before=before, load_after=measure.loadavg())
    log("  -> " + json.dumps({k: res.get(k) for k in ("framework", "median_s", "min_s", "max_s", "compile_s",
                                                       "peak_rss_run", "load_before", "load_after", "error")}))
    return res


def bench_one(name: str, batch: int, args, workdir: Path, log) -> list[dict]:
    """All frameworks for one (config, batch); returns their result dicts (with ratio and error vs torch)."""
    folder = _ensure_weights(name, workdir, log)
    py, base = measure.this_python(), ["--weights", str(folder), "--batch", str(batch),
                                       "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    wait = (args.load_threshold, args.max_wait, args.timeout)
    outs = {fw: str(workdir / f"out_{name}_b{batch}_{fw}.npy") for fw in ("jax", "jax-xla", "torch", "flax")}
    rows = []
    profile = ["--profile-top", str(args.profile_top)] if args.profile_top else []
    if "jax" in args.frameworks:
        cache = tempfile.mkdtemp(prefix="jaxdiff-cc-", dir=workdir)
        jax_cmd = [py, "-m", "bench.unet_step", "--child", "jax", "--dtype", args.dtype, "--cache-dir", cache,
                   *base]
        cold = _measure(jax_cmd + ["--save-output", outs["jax"], *profile], *wait, log)
        cached = None if args.single_run else _measure(jax_cmd, *wait, log)
        if cached and "error" not in cold and "error" not in cached:
            cold.update(compile_cold_s=cold["compile_s"], compile_cached_s=cached["compile_s"],
                        median_s_second_run=cached["median_s"], cache_entries=len(os.listdir(cache)))
        rows.append({**cold, "framework": "jaxdiff", "run": "cold+cached"} if "error" not in cold else
                    {"framework": "jaxdiff", **cold})
    if "jax-xla" in args.frameworks:   # the same step with every fast attention on XLA's unfused kernel
        xla = _measure([py, "-m", "bench.unet_step", "--child", "jax", "--dtype", args.dtype,
                        "--save-output", outs["jax-xla"], *profile, *base],
                       *wait, log, env={KERNEL_ENV: "xla"})
        rows.append({**xla, "framework": "jaxdiff-xla-attention"})
    if "torch" in args.frameworks:
        threads = ["--torch-threads", str(args.torch_threads)] if args.torch_threads else []
        rows.append({"framework": "diffusers-torch", **_measure(
            [py, "-m", "bench.unet_step", "--child", "torch", "--dtype", args.dtype, "--save-output", outs["torch"],
             *threads, *base],
            *wait, log)})
    if "flax" in args.frameworks:
        flax_py = measure.python_for(str(FLAX_VENV))
        if flax_py is None:
            log(f"diffusers-Flax peer skipped: {FLAX_VENV} missing (bash bench/peer_diffusers_flax.sh)")
        else:
            rows.append({"framework": "diffusers-flax-0.39", **_measure(
                [flax_py, "-m", "bench.peer_diffusers_flax", "--save-output", outs["flax"], *base], *wait, log)})
    _add_comparisons(rows, outs, name, batch)
    return rows


def _add_comparisons(rows: list[dict], outs: dict, name: str, batch: int) -> None:
    import numpy as np

    torch_row = next((r for r in rows if r["framework"] == "diffusers-torch" and "median_s" in r), None)
    ref = np.load(outs["torch"]) if torch_row and os.path.exists(outs["torch"]) else None
    files = {"jaxdiff": outs["jax"], "jaxdiff-xla-attention": outs["jax-xla"], "diffusers-torch": outs["torch"],
             "diffusers-flax-0.39": outs["flax"]}
    for r in rows:
        r.update(config=name, batch=batch)
        if "median_s" not in r:
            continue
        if torch_row:
            r["torch_over_this"] = torch_row["median_s"] / r["median_s"]
        if ref is not None and r["framework"] != "diffusers-torch" and os.path.exists(files[r["framework"]]):
            r["vs_torch"] = compare(np.load(files[r["framework"]]), ref)
        if r["framework"] == "jaxdiff" and all(os.path.exists(outs[k]) for k in ("jax", "jax-xla")):
            r["vs_xla_attention"] = compare(np.load(outs["jax"]), np.load(outs["jax-xla"]))


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _gib(b) -> str:
    return "-" if b is None else f"{b / measure.GiB:.2f}"


def format_table(rows: list[dict]) -> str:
    """Markdown table of result rows."""
    head = ("| config | batch | dtype | framework | median step s (min-max) | GFLOP/s | torch/this | compile cold s"
            " | compile cached s | peak RSS load / run GiB | max-abs/std vs torch | load before/after |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "median_s" not in r:
            lines.append(f"| {r.get('config')} | {r.get('batch')} | - | {r['framework']} | ERROR: "
                         f"{r.get('error')} | | | | | | | |")
            continue
        flops = r.get("analytic_flops")
        gfs = f"{flops / r['median_s'] / 1e9:.0f}" if flops else "-"
        if "mfu" in r:
            gfs += f" (MFU {100 * r['mfu']:.1f}%)"
        cold, cached, vs = r.get("compile_cold_s", r.get("compile_s")), r.get("compile_cached_s"), r.get("vs_torch")
        lines.append(
            f"| {r['config']} | {r['batch']} | {r.get('dtype', '-')} | {r['framework']} | "
            f"{r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | {gfs} | "
            f"{r.get('torch_over_this', float('nan')):.2f} | {_num(cold, '.1f')} | {_num(cached, '.1f')} | "
            f"{_gib(r.get('peak_rss_load'))} / {_gib(r.get('peak_rss_run'))} | "
            f"{_num(vs and vs['rel'], '.1e')} | {r['load_before']:.2f} / {r['load_after']:.2f} |")
    return "\n".join(lines)


def _fill_flops(rows: list[dict], name: str) -> None:
    """Every framework did the same work: give PyTorch/Flax rows the analytic FLOPs of the JAX row."""
    from bench.inputs import CONTEXT_LEN, latent_size
    from jaxdiff.flops import unet_flops
    from jaxdiff.unet import UNetConfig

    d = unet_config(name)
    n = latent_size(d)
    for r in rows:
        if "median_s" in r and not r.get("analytic_flops"):
            r["analytic_flops"] = unet_flops(UNetConfig.from_diffusers(d), r["batch"], n, n, CONTEXT_LEN).total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.unet_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", nargs="+", default=["tiny"], choices=CONFIGS)
    ap.add_argument("--batch", nargs="+", type=int, default=[1])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    ap.add_argument("--frameworks", nargs="+", default=["jax", "torch", "flax"],
                    choices=["jax", "jax-xla", "torch", "flax"],
                    help="jax-xla: jaxdiff with every fast attention on XLA's unfused kernel (JAXDIFF_ATTENTION=xla)")
    ap.add_argument("--single-run", action="store_true", help="one jaxdiff run (no second, cache-served compile)")
    ap.add_argument("--profile-top", type=int, default=0, help="record the N most expensive ops of a jaxdiff step")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxdiff-bench"),
                    help="weights, outputs and compilation caches (reused across runs)")
    ap.add_argument("--json", help="write all result rows here")
    ap.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: the number of cores)")
    ap.add_argument("--load-threshold", type=float, default=1.2)
    ap.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for a quiet machine")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    # internal: the child processes
    ap.add_argument("--child", choices=["jax", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--prepare", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--save-output", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.prepare:
        prepare_weights(args.prepare, Path(args.weights))
        measure.emit_result({"prepared": args.weights})
        return 0
    if args.child == "jax":
        measure.emit_result(run_jax_child(Path(args.weights), args.batch[0], args.dtype, args.repeats,
                                          args.warmup, args.cache_dir, args.save_output, args.profile_top))
        return 0
    if args.child == "torch":
        measure.emit_result(run_torch_child(Path(args.weights), args.batch[0], args.repeats, args.warmup,
                                            args.save_output, args.torch_threads, args.dtype))
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info = measure.machine_info(PACKAGES)
    log(json.dumps(info))
    rows = []
    for name in args.config:
        if name == "sdxl" and not _sdxl_fits(unet_config(name), log):
            continue
        for batch in args.batch:
            log(f"== {name} batch {batch} ({args.dtype})")
            got = bench_one(name, batch, args, workdir, log)
            _fill_flops(got, name)
            rows += got
            log(format_table(got))
            if args.json:   # after every (config, batch): partial results survive an interrupted run
                Path(args.json).write_text(json.dumps({"machine": info, "argv": sys.argv, "rows": rows}, indent=2))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
