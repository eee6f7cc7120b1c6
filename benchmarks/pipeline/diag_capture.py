"""Where does capture time go on a GPU? Ray's view of the GPU, then one worker's embed and first
layers in-process (no Ray), timed piece by piece. Usage: python -m benchmarks.pipeline.diag_capture N_SAMPLES"""
import cProfile
import os
import pstats
import shutil
import sys
import time
from pathlib import Path

import torch


def ray_view() -> None:
    import ray

    ray.init(include_dashboard=False)
    print("ray resources", ray.cluster_resources())

    @ray.remote(num_gpus=0.5)
    def probe():
        import torch
        return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available()

    print("task with num_gpus=0.5 sees CUDA_VISIBLE_DEVICES, cuda:", ray.get(probe.remote()))
    ray.shutdown()


def in_process(n: int) -> None:
    from transformers import AutoConfig

    from pipeline.config import QuantRecipe
    from pipeline.data.collate import build_calibration_table, save_table
    from pipeline.data.sources import open_calib_source
    from pipeline.distributed.context import JobContext
    from pipeline.distributed.models import resolve_model
    from pipeline.distributed.wavefront import WavefrontWorker
    from pipeline.models import detect_adapter
    from pipeline.models.processors import load_processor
    from pipeline.models.synthetic import SyntheticWeightSource

    tmp = Path("/tmp/diag")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model_dir = resolve_model("synthetic:qwen2-vl-7b", tmp)
    src = SyntheticWeightSource(model_dir)
    adapter = detect_adapter(src.config_dict)
    processor = load_processor(model_dir)
    vision_id = adapter.image_token_id(AutoConfig.from_pretrained(model_dir))
    table, _ = build_calibration_table(open_calib_source("builtin", num_samples=n, seed=1).rows(), processor,
                                       vision_id, max_rows=n)
    save_table(table, tmp / "calib.arrow")
    ctx = JobContext(model=str(model_dir), family=adapter.family, recipe=QuantRecipe(method="mbq", wbits=3),
                     work_dir=str(tmp), store_root=str(tmp / "acts"), compute_dtype="bfloat16",
                     storage_dtype="bfloat16", options={"groups": 1})
    rows = list(range(len(table)))
    t = time.perf_counter()
    w = WavefrontWorker(ctx, 0, 1, str(tmp / "calib.arrow"), rows)
    print("worker device", w.device, "init", round(time.perf_counter() - t, 2))
    t = time.perf_counter()
    print(w.embed(), "wall", round(time.perf_counter() - t, 2))
    for i in range(3):
        pr = cProfile.Profile()
        t = time.perf_counter()
        w = WavefrontWorker(ctx, 0, 1, str(tmp / "calib.arrow"), rows)
        pr.enable()
        r = w.forward(i)
        torch.cuda.synchronize()
        pr.disable()
        print(r, "wall", round(time.perf_counter() - t, 2))
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    ray_view()
    in_process(int(sys.argv[1]) if len(sys.argv) > 1 else 128)
