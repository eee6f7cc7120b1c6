"""Do kept Ray workers (max_calls=0) get leased a different GPU than the one they first used?

A local Ray declaring two fake GPUs (no GPU needed): three rounds of two capture-like task chains
followed by a burst of search-like tasks, as a vlmq job runs them. Prints, per worker process,
the (kind, GPU id) pairs it was leased, and how many workers saw both GPUs. Any such worker
would, before worker_device() selected the GPU per task, have computed on the first GPU it saw.

    python benchmarks/pipeline/ray_gpu_reuse.py [--shares 0.5 0.5 | 0.51 0.49]
"""

import argparse
import os
import random
import time

import ray


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shares", nargs=2, type=float, default=[0.5, 0.5], metavar=("CAPTURE", "SEARCH"))
    args = ap.parse_args()
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")

    def leased(seconds: float, _prev: object = None) -> tuple[int, str | None]:
        time.sleep(seconds)
        return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")

    cap = ray.remote(num_gpus=args.shares[0], max_calls=0)(leased)
    search = ray.remote(num_gpus=args.shares[1], max_calls=0)(leased)
    seen: dict[int, set] = {}
    for _ in range(3):
        refs = []
        for _group in range(2):
            prev = None
            for _layer in range(5):
                prev = cap.remote(0.1, prev)
                refs.append(prev)
        for pid, gpu in ray.get(refs):
            seen.setdefault(pid, set()).add(("capture", gpu))
        for pid, gpu in ray.get([search.remote(random.uniform(0.05, 0.5)) for _ in range(16)]):
            seen.setdefault(pid, set()).add(("search", gpu))
    for pid, pairs in sorted(seen.items()):
        print(pid, sorted(pairs))
    both = sum(len({g for _, g in pairs}) > 1 for pairs in seen.values())
    print(f"workers leased both GPUs: {both} of {len(seen)}")
    ray.shutdown()


if __name__ == "__main__":
    main()
