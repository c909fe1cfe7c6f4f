#!/usr/bin/env bash
# One unit of the forgetting benchmark (docs/study.md): train one method for one seed, evaluate its checkpoints
# (steps 25, 50, 100, 200), copy the records (no weights) into the repository and commit them. A unit already
# committed is skipped, so the plan survives a machine that stops: rerun the same lines on a fresh clone.
#   bench/study_unit.sh STUDY UNIT [psft-lite study options]
#   bench/study_unit.sh forgetting base                     # the base model once (before the methods' units)
#   bench/study_unit.sh forgetting sft-s0                   # METHOD-sSEED
#   bench/study_unit.sh forgetting sft_kl-s0 --sweep objective.kl_coef=0.3    # an exploratory setting
#   bench/study_unit.sh native hint-data-p1                 # Hinted Decoding's rewrite, problems 1-100 (p1..p4), committed
#   bench/study_unit.sh native hint-idft-s0                 # idft trained on that rewrite
# STUDY names the recipe (recipes/study/benchmark.toml for forgetting, benchmark-gemma3.toml for forgetting-gemma3,
# benchmark-native.toml for native: the same problems in the "#### N" form the base already writes)
# and the records' folder docs/study/STUDY/units/. Runs on one core (OMP_NUM_THREADS=1); run two units side by side.
# Environment: PYTHON (default python), RUNS (run folders with weights, default ../study-runs), COMMIT=0 to not commit.
set -euo pipefail
study=${1:?usage: bench/study_unit.sh STUDY UNIT [options]}
unit=${2:?unit: base or METHOD-sSEED}
shift 2
cd "$(dirname "$0")/.."
case "$study" in
  forgetting) recipe=recipes/study/benchmark.toml ;;
  forgetting-gemma3) recipe=recipes/study/benchmark-gemma3.toml ;;
  native) recipe=recipes/study/benchmark-native.toml ;;
  *) echo "unknown study $study (forgetting, forgetting-gemma3, native)" >&2; exit 2 ;;
esac
records="docs/study/$study/units"
hinted="docs/study/$study/hinted.jsonl"
runs=${RUNS:-../study-runs}/$study
export OMP_NUM_THREADS=1
py=${PYTHON:-python}
dropped="${hinted%.jsonl}.dropped.jsonl"  # the rewrite's dropped rows, committed beside the kept ones
done_rows() { cat "$hinted" "$dropped" 2>/dev/null | grep -c . || true; }  # problems rewritten so far, kept or not
if [ "${unit%-p*}" = hint-data ]; then
  # Hinted Decoding's rewrite is data, committed once and read by every hint-idft unit. It is longer than one unit on
  # one fp32 core, so it runs in parts: hint-data-pK rewrites problems up to K x 100 of the 400 (parts p1..p4, in
  # order), resuming from the committed kept and dropped rows, and commits them; hint-data alone runs every part.
  if [ "$unit" = hint-data ]; then parts=(1 2 3 4); else parts=("${unit#hint-data-p}"); fi
  for part in "${parts[@]}"; do
    case "$part" in 1|2|3|4) ;; *) echo "unknown part $unit (hint-data-p1 .. hint-data-p4)" >&2; exit 2 ;; esac
    upto=$(( part * 100 ))
    if [ "$(done_rows)" -ge "$upto" ]; then echo "$study/hint-data-p$part: already committed, skipped"; continue; fi
    if [ "$(done_rows)" -lt $(( upto - 100 )) ]; then echo "run bench/study_unit.sh $study hint-data-p$(( part - 1 )) first" >&2; exit 2; fi
    start=$(date +%s)
    mkdir -p "$runs" "$(dirname "$hinted")"
    # resume from the committed rows, or from a stopped part's run folder when it extends them
    for pair in "$hinted:$runs/hinted.jsonl" "$dropped:$runs/hinted.dropped.jsonl"; do
      committed=${pair%%:*} local=${pair#*:}
      if [ -f "$committed" ]; then
        cmp -s -n "$(wc -c < "$committed")" "$committed" "$local" 2>/dev/null || cp "$committed" "$local"
      else
        rm -f "$local"
      fi
    done
    "$py" -m psft_lite hint smollm2-135m-instruct --data data/arith/train.jsonl --limit "$upto" --max-new-tokens 256 \
      --cot-fallback --out "$runs/hinted.jsonl" | tee "$runs/hint-summary.txt"
    cp "$runs/hinted.jsonl" "$hinted"
    cp "$runs/hinted.dropped.jsonl" "$dropped"
    sed "s#$runs/hinted#$(dirname "$hinted")/hinted#g" "$runs/hint-summary.txt" > "${hinted%.jsonl}-summary.txt"  # the committed paths
    echo "p$part $(( $(date +%s) - start ))" >> "${hinted%.jsonl}-seconds"
    if [ "${COMMIT:-1}" = 1 ]; then
      git add "$hinted" "$dropped" "${hinted%.jsonl}-summary.txt" "${hinted%.jsonl}-seconds"
      git commit -q -m "Study records: $study hint-data-p$part, problems to $upto ($(( ($(date +%s) - start) / 60 )) min on one core)" -- "$(dirname "$hinted")"
    fi
  done
  exit 0
fi
if git ls-files --error-unmatch "$records/$unit/results.jsonl" >/dev/null 2>&1; then
  echo "$study/$unit: already committed, skipped"; exit 0
fi
if [ "$unit" = base ]; then
  args=(--methods base --seeds 0)
elif [ "${unit#hint-}" != "$unit" ]; then  # hint-idft-sN: the method on the committed rewrite
  [ "$(done_rows)" -ge 400 ] \
    || { echo "the rewrite is not whole: run bench/study_unit.sh $study hint-data (or its parts p1..p4) first" >&2; exit 2; }
  method=${unit#hint-}
  args=(--methods "${method%-s*}" --seeds "${unit##*-s}" --no-base --sweep "data.train=$hinted")
else
  args=(--methods "${unit%-s*}" --seeds "${unit##*-s}" --no-base)
fi
# sft_kl and asft with the exact KL over the full vocabulary, as the first units ran them (before the top-k
# reference became the default): every seed of a method runs one objective
args+=(--set objective.reference_top_k=0)
# fp32 on every machine: bf16 (model.dtype = auto on a CPU with avx512_bf16) changes greedy answers, and every unit
# committed before this line ran on fp32 CPUs, so every seed of every method runs one computation
args+=(--set model.dtype=fp32)
# the unit's compute across stops: a stopped attempt's time (its heartbeat, to the minute) is kept beside the run
# folder and added to the last attempt's, so `seconds` is the whole unit's and the plan's actual is summed from it
mkdir -p "$runs"
spent="$runs/$unit.seconds-earlier" beat="$runs/$unit.seconds-this"
if [ -f "$beat" ]; then cat "$beat" >> "$spent"; rm -f "$beat"; fi
start=$(date +%s)
( while sleep 60 && kill -0 $$ 2>/dev/null; do echo "$(( $(date +%s) - start ))" > "$beat"; done ) >/dev/null 2>&1 &
heartbeat=$!
trap 'kill $heartbeat 2>/dev/null || true' EXIT
"$py" -m psft_lite study "$recipe" "${args[@]}" --limit 320 --max-new-tokens 128 --out "$runs/$unit" "$@"
"$py" -m psft_lite.study.report "$records/$unit" --collect "$runs/$unit" --only-collect
kill $heartbeat 2>/dev/null || true
earlier=$(awk '{ s += $1 } END { print s + 0 }' "$spent" 2>/dev/null || echo 0)
echo "$(( $(date +%s) - start + earlier ))" > "$records/$unit/seconds"
rm -f "$beat" "$spent"
if [ "${COMMIT:-1}" = 1 ]; then
  git add "$records/$unit"
  git commit -q -m "Study records: $study unit $unit ($(( $(cat "$records/$unit/seconds") / 60 )) min on one core)" -- "$records/$unit"
  echo "$study/$unit: committed"
fi
