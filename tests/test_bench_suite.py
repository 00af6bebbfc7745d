"""The benchmark scripts that CI runs on tiny models: the GPU suite (every section, the same code paths as on
the device) and the load-peak measurement. Their figures are for BENCHMARKS.md; here only that they run and
write complete, well-formed results."""

import json
import subprocess
import sys


def run(args, timeout):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_gpu_suite_runs_on_tiny_models(tmp_path):
    from bench.gpu_suite import sections
    run(["bench.gpu_suite", str(tmp_path / "out"), "--tiny"], 900)
    suite = json.loads((tmp_path / "out" / "suite.json").read_text())
    names = [s["name"] for s in suite["sections"]]
    assert names == [name for name, _, _ in sections(True, tmp_path)]
    md = (tmp_path / "out" / "suite.md").read_text()
    for s in suite["sections"]:
        assert s["rc"] == 0 and "result" in s, s
        assert f"### {s['name']}" in md
    unet = suite["sections"][0]["result"]["rows"]
    assert {r["framework"] for r in unet} == {"jaxdiff", "jaxdiff-xla-attention", "diffusers-torch"}
    jax_row = next(r for r in unet if r["framework"] == "jaxdiff")
    assert jax_row["vs_xla_attention"]["max_abs"] == 0.0      # on CPU both take the same (blocked) path
    assert jax_row["vs_torch"]["rel"] < 1e-4 and len(jax_row["top_kernels"]) == 10
    steering = suite["sections"][2]["result"]["rows"]
    assert set(steering) == {"plain", "capture", "hedit", "concepts"}
    assert {"ags", "img2img"} <= set(suite["sections"][3]["result"]["rows"])


def test_load_peak_script_runs(tmp_path):
    out = tmp_path / "load.json"
    run(["bench.load_peak", "--config", "tiny", "--workdir", str(tmp_path), "--json", str(out)], 600)
    res = json.loads(out.read_text())["results"]
    assert [r["row"] for r in res] == ["jax unet", "jax folder", "jax converted", "torch unet", "torch folder"]
    for r in res:
        assert r["peak_rss"] >= r["rss_before"] > 0 and r["weight_bytes"] > 0
