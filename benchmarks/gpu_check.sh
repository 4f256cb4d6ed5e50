#!/usr/bin/env bash
# The GPU checks in one go, for a machine with CUDA and this repository's packages:
# the CUDA tests, the prior benchmark up to N = 1e8, and the digits default fitted on CUDA.
# Results go to $OUT (or benchmarks/results).
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_prior.py 2>&1 | tail -4
python3 benchmarks/bench_prior.py --device cuda --sizes 1e5 1e6 1e7 1e8 --reps 10 \
    --json "$out/prior_cuda.json" 2>&1 | tee "$out/prior_cuda.txt"
python3 -m bayes_sws.cli fit models/digits.toml --device cuda --out "$out/digits-cuda" --quiet
