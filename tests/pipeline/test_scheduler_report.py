"""The scheduler's bookkeeping: GPU placement keeps workers alive, per-worker peaks and the
capture summary are computed from what the tasks returned (hand-worked values)."""

from pipeline.distributed.runtime import RayContext
from pipeline.distributed.scheduler import GPU_LAYOUTS, capture_groups, capture_summary, peak_gpu_by_worker, placement


def test_gpu_tasks_reuse_their_worker_process():
    # Ray's default for GPU tasks is one task per process (max_calls=1): each capture step then paid
    # a fresh interpreter + CUDA context, 30 s per 7B layer on the H100 instead of 1 s.
    ctx = RayContext(address=None, num_cpus=16, num_gpus=2, started_here=True)
    assert placement(ctx, 0.32) == {"num_gpus": 0.32, "max_calls": 0}
    # per layout: its capture groups and one search share a GPU, one more capture group never fits;
    # after capture as many searches as workers fit, one more does not
    for workers, lay in GPU_LAYOUTS.items():
        g, c, sh = lay.capture_groups, lay.capture_share, lay.search_share
        assert g + 1 == workers
        assert g * c + sh <= 1 < (g + 1) * c and workers * sh <= 1 < (workers + 1) * sh
    cpu = RayContext(address=None, num_cpus=2, num_gpus=0, started_here=True)
    assert placement(cpu, 0.32) == {"num_cpus": 1}
    assert capture_groups(ctx, 128) == 4 and capture_groups(cpu, 128) == 1
    assert capture_groups(ctx, 128, GPU_LAYOUTS[2]) == 2
    assert capture_groups(ctx, 3) == 3  # never an empty group


def test_peak_per_worker_is_the_max_over_its_tasks():
    records = [{"pid": 7, "peak_gpu_bytes": 5}, {"pid": 7, "peak_gpu_bytes": 9}, {"pid": 8, "peak_gpu_bytes": 3},
               {"block": 0}]  # a CPU task reports no peak
    assert peak_gpu_by_worker(records) == {7: 9, 8: 3}


def test_capture_summary_splits_build_and_forward():
    stats = [{"layer": -1, "seconds": 4.0}, {"layer": 0, "load_s": 0.5, "seconds": 2.0, "device": "cuda:0"},
             {"layer": 1, "load_s": 0.25, "seconds": 1.5, "device": "cuda:0"}, {"layer": 2, "skipped": True}]
    line = capture_summary(stats)
    assert "2 layer steps, 3.5s in workers (0.8s building layers, 2.8s forward + store) on cuda:0" in line


def test_phase_eta_is_linear_in_the_pace_so_far():
    from pipeline.distributed.scheduler import phase_eta

    assert phase_eta(7, 28, 35.0, "search") == "search ETA 1m45s"  # 5 s a block, 21 left
    assert phase_eta(10, 29, 20.0, "capture") == "capture ETA 38s"
    assert phase_eta(0, 28, 10.0, "search") == "" and phase_eta(28, 28, 90.0, "search") == ""


def test_a_resumed_job_keeps_its_capture_groups(tmp_path):
    """Streams are per sample group: a job resumed with another GPU count must not regroup rows."""
    from pipeline.distributed.job import stable_groups

    assert stable_groups(tmp_path, False, 4) == 4
    assert stable_groups(tmp_path, True, 2) == 4  # resumed on one GPU: still the four groups on disk
    assert stable_groups(tmp_path, False, 2) == 2  # a fresh job (work dir cleared) regroups
    older = tmp_path / "older"  # a work dir from before the file existed: take what is asked
    older.mkdir()
    assert stable_groups(older, True, 3) == 3 and stable_groups(older, True, 1) == 3
