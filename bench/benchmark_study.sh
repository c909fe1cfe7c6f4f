#!/usr/bin/env bash
# The forgetting benchmark of docs/study.md for one seed (PYTHON: the interpreter, default python on PATH), in one process on one core (run one per seed side by side).
# Resumable: rerun the same line to continue; finished runs and evaluations are skipped.
#   bench/benchmark_study.sh OUT SEED [METHODS] [more psft-lite study options]
#   bench/benchmark_study.sh ../study-runs/benchmark 0
#   bench/benchmark_study.sh ../study-runs/benchmark 0 psft-base --sweep objective.clip_high=1.0   # a looser trust region
set -euo pipefail
out=${1:?usage: bench/benchmark_study.sh OUT SEED [METHODS] [options]}
seed=${2:?seed}
methods=${3:-sft,psft-base,sft_kl,psft-snapshot,idft}
shift $(($# < 3 ? $# : 3))
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
exec "${PYTHON:-python}" -m psft_lite study recipes/study/benchmark.toml --methods "$methods" --seeds "$seed" --limit 300 \
    --max-new-tokens 128 --out "$out" "$@"
