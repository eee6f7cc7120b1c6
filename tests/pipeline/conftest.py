import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for every pipeline test (starting Ray costs ~15 s on 2 cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Saved tiny models of every family, made once per session."""
    from pipeline.models.tiny import TINY_FAMILIES, save_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny(f, root / f, seed=0) for f in TINY_FAMILIES}
