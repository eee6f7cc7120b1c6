"""Where does a 7B MBQ job's time go on a GPU? One worker's steps in-process (no Ray), each timed
and profiled: embed, capture of the first layers (store write and fsync timed apart), the gradient
pass over those layers, and one block's search.

Usage: python -m benchmarks.pipeline.diag_stages [N_SAMPLES] [N_LAYERS]
"""
import cProfile
import io
import pstats
import shutil
import sys
import time
from pathlib import Path

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prof(label: str, fn, top: int = 14, sort: str = "tottime"):
    pr = cProfile.Profile()
    _sync()
    t = time.perf_counter()
    pr.enable()
    out = fn()
    _sync()
    pr.disable()
    wall = time.perf_counter() - t
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats(sort).print_stats(top)
    body = "\n".join(line[:150] for line in s.getvalue().splitlines()[5:] if line.strip())
    print(f"=== {label}: {wall:.2f}s\n{body}", flush=True)
    return out


def main(n: int, n_layers: int) -> None:
    from transformers import AutoConfig

    import pipeline.data.store as store_mod
    from pipeline.config import QuantRecipe
    from pipeline.data.collate import build_calibration_table, save_table
    from pipeline.data.sources import open_calib_source
    from pipeline.distributed.context import JobContext
    from pipeline.distributed.models import resolve_model
    from pipeline.distributed.search import search_block
    from pipeline.distributed.wavefront import WavefrontWorker
    from pipeline.models import detect_adapter
    from pipeline.models.processors import load_processor
    from pipeline.models.synthetic import SyntheticWeightSource
    from pipeline.quant.sensitivity import ratios

    fsync_s = []
    real_fsync = store_mod._fsync

    def timed_fsync(path):
        t = time.perf_counter()
        real_fsync(path)
        fsync_s.append(time.perf_counter() - t)

    store_mod._fsync = timed_fsync
    tmp = Path("/tmp/diag")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t = time.perf_counter()
    model_dir = resolve_model("synthetic:qwen2-vl-7b", tmp)
    src = SyntheticWeightSource(model_dir)
    adapter = detect_adapter(src.config_dict)
    processor = load_processor(model_dir)
    vision_id = adapter.image_token_id(AutoConfig.from_pretrained(model_dir))
    table, _ = build_calibration_table(open_calib_source("builtin", num_samples=n, seed=1).rows(), processor,
                                       vision_id, max_rows=n)
    save_table(table, tmp / "calib.arrow")
    print(f"setup (model folder, processor, table) {time.perf_counter() - t:.2f}s", flush=True)
    ctx = JobContext(model=str(model_dir), family=adapter.family, recipe=QuantRecipe(method="mbq", wbits=3),
                     work_dir=str(tmp), store_root=str(tmp / "acts"), compute_dtype="bfloat16",
                     storage_dtype="bfloat16", options={"groups": 1})
    (tmp / "parts").mkdir(exist_ok=True)
    rows = list(range(len(table)))
    t = time.perf_counter()
    w = WavefrontWorker(ctx, 0, 1, str(tmp / "calib.arrow"), rows)
    print(f"worker init {time.perf_counter() - t:.2f}s on {w.device}", flush=True)
    print(_prof("embed", w.embed))
    for i in range(n_layers):
        w = WavefrontWorker(ctx, 0, 1, str(tmp / "calib.arrow"), rows)
        r = _prof(f"forward layer {i}", lambda: w.forward(i))
        print(r, f"fsync {fsync_s[-1]:.2f}s" if fsync_s else "", flush=True)
    w = WavefrontWorker(ctx, 0, 1, str(tmp / "calib.arrow"), rows)
    w.n_layers = n_layers  # the last captured stream stands in for the model's output
    r = _prof(f"gradient pass over {n_layers} layers", w.backward)
    sens = ratios(r["stats"], "median")
    print("ratios", sens, flush=True)
    for b in range(2):
        r = _prof(f"search block {b}", lambda: search_block(ctx, b, [b], sens), top=30, sort="cumulative")
        print({k: v for k, v in r.items() if k != "metrics"}, flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 128, int(sys.argv[2]) if len(sys.argv) > 2 else 2)
