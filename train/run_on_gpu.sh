#!/usr/bin/env bash
# A warm-start plan (default gpu_longest, train/config.py) on one lent GPU, from the shipped model, in one
# command that fits the device tool's 10-minute call: train, export, pack the export for the trip back.
#
#   bash train/run_on_gpu.sh OUTDIR               (OUTDIR: where train.log and export.tar.* go)
#   tar -xf <(cat OUTDIR/export.tar.*) -C DEST  (unpacks DEST/export, a diffusers folder)
#
# The export's sampler is fixed to DDIM trailing rather than chosen by
# the judge (--scheduler auto), which would spend ~1.5 min of device time sampling 3 x 48 captions.
# PLAN / SRC override the plan and the warm-start source (a dry run: PLAN=smoke_continued SRC=<smoke export>);
# PYTHON the interpreter (default python3: the device image's, which has JAX with CUDA). Afterwards, on any
# machine: python -m train.export_shapesworld --choose-scheduler-of DEST/export (the judge's sampler choice).
set -euo pipefail
out=$(realpath "${1:?usage: run_on_gpu.sh OUTDIR}")
plan=${PLAN:-gpu_longest}    # the plan that continues the shipped asset (gpu_longer's export)
src=${SRC:-jaxdiff/assets/shapesworld}
py=${PYTHON:-python3}
work=$(mktemp -d)
export PYTHONUNBUFFERED=1
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$py" -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"
  "$py" -m train --plan "$plan" --warm-start "$src" --workdir "$work/run" --export "$work/export" \
      --scheduler ddim_trailing
} 2>&1 | tee "$out/train.log"
tar -C "$work" -cf - export | split -b 15M - "$out/export.tar."
ls -l "$out"
