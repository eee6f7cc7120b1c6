# Sourced by the pipeline's device scripts: Ray from the carried wheels (carry [".whl"]), the
# environment every run needs, $OUT, and the GPU/software versions into $OUT/gpu.txt.
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD VLMQ_CACHE=/tmp/vlmq-cache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'ray', ray.__version__)" | tee -a "$OUT/gpu.txt"
