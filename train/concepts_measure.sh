#!/usr/bin/env bash
# Regenerates the shipped concept tables and the RESULTS.md concept section (issues 12, 13) on the embedded model:
# data (once per group), SDisc, LWIM and its ablations, RespoDiff (lambda 0.5 and RAM only), the no-red safety
# concept of each method, the measurement, then the shipped tables (colour + safety groups merged).
# Resumable: re-run after a kill.
#   bash train/concepts_measure.sh [OUT=runs/concepts]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/concepts}
PY=${PY:-.venv/bin/python}
$PY -m train.concepts --method sdisc --out "$OUT"
$PY -m train.concepts --method lwim --out "$OUT"
$PY -m train.concepts --method lwim --out "$OUT" --name lwim_no_a --no-suppress
$PY -m train.concepts --method lwim --out "$OUT" --name lwim_no_b --no-attenuate
$PY -m train.concepts --method lwim --out "$OUT" --name lwim_no_c --no-weight
$PY -m train.concepts --method lwim --out "$OUT" --name lwim_noise --target noise
$PY -m train.concepts --method lwim --out "$OUT" --name lwim_ga05 --gamma-a 0.5
$PY -m train.concepts --method respodiff --out "$OUT"
$PY -m train.concepts --method respodiff --out "$OUT" --name respodiff_lam0 --lam 0
$PY -m train.concepts --method respodiff --out "$OUT" --name respodiff_lam1 --lam 1
for m in respodiff sdisc lwim; do
  $PY -m train.concepts --method "$m" --group safety --out "$OUT"
done
$PY -m train.concepts_eval --tables "$OUT" --ablation-images-per-prompt 12
for m in sdisc lwim respodiff; do
  $PY -m train.concepts_merge "jaxdiff/assets/concepts/$m" "$OUT/$m" "$OUT/${m}_safety"
done
