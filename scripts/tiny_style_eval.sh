#!/usr/bin/env bash
# Issue 16's experiment on the tiny backbone (EVALUATION.md): the synthetic style set (10 styles), five
# sampler configurations x 3 training seeds, the paper's first 6 prompts x 2 seeds, weight-free metrics
# (DINO / CLIP too when their models are available). Resumable: run it again to continue.
#   scripts/tiny_style_eval.sh [OUT_FOLDER [more python -m studio.evaluate flags]]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/eval/tiny-synthetic}
PY=${PYTHON:-.venv/bin/python}
"$PY" scripts/make_tiny_styles.py "$OUT/styles"
exec "$PY" -m studio.evaluate --backbone tiny --styles "$OUT/styles" --out "$OUT" \
    --configs sd3,style_friendly,sigma2,offset0.01,uniform --train-seeds 3 --prompts 6 --seeds 2 "${@:2}"
