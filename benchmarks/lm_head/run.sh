#!/usr/bin/env bash
# Accuracy cost of --quantize-lm-head on the built-in outlier model (CPU, ~3 minutes on 2 cores):
# MBQ W4 and W3 g128 with the lm_head fp16 and packed (W3 also with a W4 head), then builtin-vqa accuracy and
# fidelity vs fp.
#   bash benchmarks/lm_head/run.sh [OUT]
set -eu
OUT=${1:-lmhead-out}
export OMP_NUM_THREADS=1
for b in 4 3; do
  .venv/bin/vlmq quantize --model builtin-outlier --method mbq --wbits $b --group-size 128 --out "$OUT/w$b-mbq" --overwrite --num-cpus 2
  .venv/bin/vlmq quantize --model builtin-outlier --method mbq --wbits $b --group-size 128 --quantize-lm-head \
    --out "$OUT/w$b-mbq-head" --overwrite --num-cpus 2
done
.venv/bin/vlmq quantize --model builtin-outlier --method mbq --wbits 3 --group-size 128 --lm-head-bits 4 \
  --out "$OUT/w3-mbq-head4" --overwrite --num-cpus 2
.venv/bin/vlmq eval builtin "$OUT/w4-mbq" "$OUT/w4-mbq-head" "$OUT/w3-mbq" "$OUT/w3-mbq-head" "$OUT/w3-mbq-head4" \
  --tasks builtin-vqa fidelity --out "$OUT/eval" --no-speed --num-cpus 2
