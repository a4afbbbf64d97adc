#!/bin/bash
# Cross-tokenizer KD, measured (docs/distill.md, "Measured"): a Qwen2.5-Coder-0.5B-Instruct
# teacher store (151,936 tokens) -> the bundled SmolLM2-135M student (49,152), trained with
# --xtok-loss uld, --xtok-loss mapped, and --objective sft on the same store, each evaluated
# on the same seeded sample of GSM8K test questions, compared with `primekd compare`.
# Usage: bench/xtok_compare.sh OUT [TEACHER]   (resumable: finished steps are skipped)
set -euo pipefail
OUT=${1:?usage: bench/xtok_compare.sh OUT [TEACHER]}
TEACHER=${2:-qwen2.5-coder-0.5b-instruct}
N_TRAIN=${N_TRAIN:-48} N_TEST=${N_TEST:-60} STEPS=${STEPS:-20}
P=${PRIMEKD:-primekd}
mkdir -p "$OUT"
STORE=$OUT/teacher-store
[ -f "$STORE/manifest.json" ] && grep -q '"complete": true' "$STORE/manifest.json" ||
  $P teach --teacher "$TEACHER" --data train --limit "$N_TRAIN" --target reference \
    --top-k 20 --batch-size 8 --device cpu --out "$STORE"
COMMON="--student smollm2-135m-instruct --teacher-store $STORE --max-steps $STEPS
  --batch-size 4 --lr 5e-4 --lora-r 8 --lora-alpha 16 --warmup-ratio 0.05 --device cpu --json -q"
EVAL="--model smollm2-135m-instruct --data test --sample $N_TEST --seed 1234
  --max-new-tokens 192 --stop-at-answer --batch-size 25 --device cpu --json"
for loss in uld mapped; do
  [ -f "$OUT/student-$loss/summary.json" ] ||
    $P distill $COMMON --xtok-loss $loss --out "$OUT/student-$loss" > "$OUT/distill-$loss.json"
done
[ -f "$OUT/student-sft/summary.json" ] ||
  $P distill $COMMON --objective sft --out "$OUT/student-sft" > "$OUT/distill-sft.json"
for m in sft uld mapped; do
  [ -f "$OUT/eval-$m/summary.json" ] ||
    $P eval $EVAL --adapter "$OUT/student-$m" --out "$OUT/eval-$m" > "$OUT/eval-$m.json"
done
$P compare "$OUT/eval-sft/results.jsonl" "$OUT/eval-uld/results.jsonl" \
  "$OUT/eval-mapped/results.jsonl" | tee "$OUT/compare.txt"
