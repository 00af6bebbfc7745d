#!/usr/bin/env bash
# Creates bench/.venv-flax: the diffusers-Flax peer for bench/unet_step.py.
#
# diffusers 0.39.x is the last release with Flax models (removed in 0.40.0), and it cannot share a virtualenv
# with the diffusers 0.42 that the tests use, so it lives in its own (gitignored) venv. Pins: the jax / flax
# versions the project itself runs (jax 0.10.2, flax 0.12.8), so both JAX implementations use the same XLA.
# No torch here: bench/peer_diffusers_flax.py reads the PyTorch-format safetensors with numpy.
#
#   bash bench/peer_diffusers_flax.sh            # idempotent: re-running only checks the install
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv-flax
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q "diffusers==0.39.0" "jax==0.10.2" "jaxlib==0.10.2" "flax==0.12.8" safetensors numpy
"$VENV/bin/python" -c "import diffusers, jax, flax; from diffusers import FlaxUNet2DConditionModel; \
print('diffusers', diffusers.__version__, 'jax', jax.__version__, 'flax', flax.__version__)"
