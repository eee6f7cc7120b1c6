#!/usr/bin/env bash
# One device call (nvidia-h200-x4 if `status` lists it, else nvidia-h200-x2): the 72B-shape job of
# issue 6 end to end -- wall time per stage, peak GPU memory per worker, peak store bytes.
# Usage (device tool, carry [".whl"]): [RESUME=1] bash benchmarks/pipeline/run_72b.sh [num_samples]
# RESUME=1 continues a job a previous call on the same (still warm) machine ran out of time on.
# Measured on x2 (2026-11-23): 5.6 min at 64 samples, 7.3 min at 128 (BENCHMARKS.md).
set -u
N=${1:-128}
source "$(dirname "$0")/device_env.sh"
df -h /tmp | tee -a "$OUT/gpu.txt"
( while sleep 20; do echo "$(( $(date +%s) - t0 ))s $(du -sh /tmp/acts-72b /tmp/q72b.work/parts 2>/dev/null | tr '\n' ' ')"; done ) > "$OUT/disk.txt" 2>&1 &
python3 -m pipeline.cli plan --model synthetic:qwen2-vl-72b 2>&1 | tail -20 | tee "$OUT/plan.txt"
timeout ${Q_TIMEOUT:-540} python3 -m pipeline.cli quantize --model synthetic:qwen2-vl-72b --calib builtin \
  --num-samples $N --holdout 2 --method mbq --wbits 3 --group-size 128 --out /tmp/q72b --store /tmp/acts-72b ${RESUME:+--resume} \
  > /dev/null 2> "$OUT/q72b.err"; echo "quantize rc=$?"
cp /tmp/q72b.work/result.json "$OUT/q72b_result.json" 2>/dev/null
grep -v "logging.cc\|^    @\|^PC:\|━" "$OUT/q72b.err" | tail -c 12000 > "$OUT/q72b_log.txt"; rm -f "$OUT/q72b.err"
python3 -c "import json; r=json.load(open('$OUT/q72b_result.json')); print('stages', {k: round(v,1) for k,v in r['stages_s'].items()}, 'total', round(sum(r['stages_s'].values()),1)); print('phases', r.get('phases_s')); print('resources', r.get('resources')); print('validation', r['validation']['ok'])" 2>&1
tail -25 "$OUT/q72b_log.txt"
echo "total $(( $(date +%s) - t0 ))s"
