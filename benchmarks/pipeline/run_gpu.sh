#!/usr/bin/env bash
# One device call: Ray from carried wheels, GPU checks, then the 7B-shape MBQ W3 timing.
# Usage (device tool, carry [".whl"]): bash benchmarks/pipeline/run_gpu.sh
set -u
source "$(dirname "$0")/device_env.sh"
[ -z "${SKIP_TESTS:-}" ] && timeout 90 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/pipeline/test_synthetic.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
if [ -n "${DIAG:-}" ]; then timeout ${DIAG_TIMEOUT:-150} python3 -m benchmarks.pipeline.diag_stages $DIAG > "$OUT/diag.log" 2>&1; grep -v Warn "$OUT/diag.log" | tail -40; fi
echo "setup done after $(( $(date +%s) - t0 ))s"
/usr/bin/time -v timeout ${Q_TIMEOUT:-330} python3 -m pipeline.cli quantize --model synthetic:qwen2-vl-7b --calib builtin \
  --num-samples 128 --holdout 4 --method mbq --wbits 3 --group-size 128 --out /tmp/q7b-mbq-w3 --keep-work \
  > "$OUT/q7b.log" 2> "$OUT/q7b.err"; echo "quantize rc=$?" | tee -a "$OUT/q7b.log"
grep -E "Maximum resident|Elapsed" "$OUT/q7b.err" | tee -a "$OUT/q7b.log"
tail -c 20000 "$OUT/q7b.err" > "$OUT/q7b_tail.err"; rm -f "$OUT/q7b.err"
cp /tmp/q7b-mbq-w3.work/result.json "$OUT/q7b_result.json" 2>/dev/null
du -sh /tmp/q7b-mbq-w3 2>/dev/null | tee -a "$OUT/q7b.log"
python3 -c "import json; r=json.load(open('$OUT/q7b_result.json')); print('stages', {k: round(v,1) for k,v in r['stages_s'].items()}); print('phases', r.get('phases_s')); print('resources', r.get('resources')); print('fidelity', r.get('fidelity')); print('reference_s', r.get('reference_s')); print('gather_s', r.get('gather_s')); print('validate_s', [(c['name'], c.get('seconds')) for c in r['validation']['checks']]); print('worker_pids', r.get('worker_pids'))" 2>&1 | tee -a "$OUT/q7b.log"
tail -40 "$OUT/q7b.log"
echo "total $(( $(date +%s) - t0 ))s"
