#!/usr/bin/env bash
# Regenerates the shipped concept tables and the RESULTS.md concept section (issue 12) on the embedded model:
# data (once), SDisc, LWIM and its ablations, then the measurement. Resumable: re-run after a kill.
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
$PY -m train.concepts_eval --tables "$OUT" --ablation-images-per-prompt 12
