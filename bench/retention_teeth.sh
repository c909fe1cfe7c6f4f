#!/usr/bin/env bash
# Does the general-ability verdict have teeth? Three checks whose verdicts are committed under docs/retention/teeth/:
#   damaged  sft at a very high learning rate (1e-2) on narrow data (400 problems in a new answer format), 100 steps,
#            the loss watchdog off (it would skip the updates that do the damage)
#   gentle   the same at a tiny learning rate (1e-6): the model barely moves
#   base     the embedded base model against itself
# Each run trains on one core; run the two trainings side by side (about 15 min on 2 fp32 cores, model load included).
#   bench/retention_teeth.sh OUT            (PYTHON: the interpreter; default python on PATH)
set -euo pipefail
out=${1:?usage: bench/retention_teeth.sh OUT}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
py=${PYTHON:-python}
common=(--set data.train=data/arith/format_train.jsonl --set data.limit= --set train.max_steps=100
        --set train.schedule=constant --set eval.final=false --set objective.kind=sft --set guard.loss_spike_factor=0
        --overwrite)
"$py" -m psft_lite train recipes/quickstart.toml "${common[@]}" --set train.lr=1e-2 --set output.dir="$out/damaged" &
"$py" -m psft_lite train recipes/quickstart.toml "${common[@]}" --set train.lr=1e-6 --set output.dir="$out/gentle" &
wait
for name in damaged gentle; do
  "$py" -m psft_lite eval "$out/$name" --retention --per-kind --out "docs/retention/teeth/$name"
done
"$py" -m psft_lite eval smollm2-135m-instruct --retention --per-kind --out docs/retention/teeth/base
gzip -nf docs/retention/teeth/*/retention-items.jsonl
