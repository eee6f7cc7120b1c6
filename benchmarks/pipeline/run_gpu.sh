#!/usr/bin/env bash
# One device call: Ray from carried wheels, GPU checks, then the 7B-shape MBQ W3 timing.
# Usage (device tool, carry [".whl"]): bash benchmarks/pipeline/run_gpu.sh
set -u
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD VLMQ_CACHE=/tmp/vlmq-cache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'ray', ray.__version__)" | tee -a "$OUT/gpu.txt"
[ -z "${SKIP_TESTS:-}" ] && timeout 90 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/pipeline/test_synthetic.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
if [ -n "${DIAG:-}" ]; then timeout ${DIAG_TIMEOUT:-150} python3 benchmarks/pipeline/diag_capture.py $DIAG > "$OUT/diag.log" 2>&1; grep -v Warn "$OUT/diag.log" | tail -40; fi
echo "setup done after $(( $(date +%s) - t0 ))s"
/usr/bin/time -v timeout ${Q_TIMEOUT:-330} python3 -m pipeline.cli quantize --model synthetic:qwen2-vl-7b --calib builtin \
  --num-samples 128 --holdout 4 --method mbq --wbits 3 --group-size 128 --out /tmp/q7b-mbq-w3 --keep-work \
  > "$OUT/q7b.log" 2> "$OUT/q7b.err"; echo "quantize rc=$?" | tee -a "$OUT/q7b.log"
grep -E "Maximum resident|Elapsed" "$OUT/q7b.err" | tee -a "$OUT/q7b.log"
tail -c 20000 "$OUT/q7b.err" > "$OUT/q7b_tail.err"; rm -f "$OUT/q7b.err"
cp /tmp/q7b-mbq-w3.work/result.json "$OUT/q7b_result.json" 2>/dev/null
du -sh /tmp/q7b-mbq-w3 2>/dev/null | tee -a "$OUT/q7b.log"
python3 -c "import json; r=json.load(open('$OUT/q7b_result.json')); print('stages', {k: round(v,1) for k,v in r['stages_s'].items()}); print('phases', r.get('phases_s')); print('resources', r.get('resources')); print('fidelity', r.get('fidelity'))" 2>&1 | tee -a "$OUT/q7b.log"
tail -40 "$OUT/q7b.log"
echo "total $(( $(date +%s) - t0 ))s"
