#!/usr/bin/env bash
# One device call on nvidia-h200-x2: the same 7B-shape MBQ W3 job with 1 GPU, then 2 GPUs; the
# search phase (first block submitted -> last block done) of each, from the job's result.json.
# Usage (device tool, carry [".whl"]): bash benchmarks/pipeline/run_scaling.sh [num_samples]
set -u
N=${1:-64}
source "$(dirname "$0")/device_env.sh"
for G in 1 2; do
  timeout ${Q_TIMEOUT:-260} python3 -m pipeline.cli quantize --model synthetic:qwen2-vl-7b --calib builtin \
    --num-samples $N --holdout 2 --method mbq --wbits 3 --group-size 128 --num-gpus $G --out /tmp/q7b-g$G --keep-work \
    > /dev/null 2> "$OUT/g$G.err"; echo "gpus=$G rc=$?"
  cp /tmp/q7b-g$G.work/result.json "$OUT/g${G}_result.json" 2>/dev/null
  grep -v "logging.cc\|^    @\|^PC:\|━" "$OUT/g$G.err" | tail -c 6000 > "$OUT/g${G}_log.txt"; rm -f "$OUT/g$G.err"
  rm -rf /tmp/q7b-g$G /tmp/q7b-g$G.work
  echo "after $(( $(date +%s) - t0 ))s"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
r = {g: json.load(open(f"{out}/g{g}_result.json")) for g in (1, 2)}
s = {g: r[g]["phases_s"]["search end"] - r[g]["phases_s"]["search start"] for g in r}
for g in r:
    print(g, "GPU(s): stages", {k: round(v, 1) for k, v in r[g]["stages_s"].items()}, "phases", r[g]["phases_s"],
          "peaks", r[g].get("resources"), "gpu use", r[g].get("gpu_use"), "workers", r[g].get("worker_pids"))
print(f"search phase: 1 GPU {s[1]:.1f}s, 2 GPUs {s[2]:.1f}s -> {s[1] / s[2]:.2f}x")
print(f"job total: 1 GPU {sum(r[1]['stages_s'].values()):.1f}s, 2 GPUs {sum(r[2]['stages_s'].values()):.1f}s")
PY
echo "total $(( $(date +%s) - t0 ))s"
