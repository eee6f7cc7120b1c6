"""`ray job submit --working-dir . -- vlmq quantize ...` against a local `ray start --head`, as a
cluster user runs it: the job connects to the running cluster (RAY_ADDRESS), not a new one."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A private head node; torn down by killing only its own processes (``ray stop`` would
    also stop every other Ray instance on the machine)."""
    ray_bin = Path(sys.executable).parent / "ray"
    temp = Path("/tmp") / f"vlmq-rayhead-{os.getpid()}"  # short: Ray's socket paths must stay < 108 chars
    gcs, dash, agent, agent_grpc, metrics, renv = (_free_port() for _ in range(6))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run([str(ray_bin), "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}",
                            "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--num-cpus=2",
                            # every agent port explicit: another Ray instance on the machine (the
                            # test session's own) already holds the defaults
                            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}",
                            f"--temp-dir={temp}", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        pids = subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_a_quantize_job(ray_head, tiny_dirs, tmp_path):
    address, env = ray_head
    out = tmp_path / "ckpt"
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {tiny_dirs['llava']}\nout: {out}\ncalib:\n  num_samples: 2\n  holdout: 1\n"
                   "recipe:\n  method: awq\n  wbits: 4\n  group_size: 64\nresources:\n  device: cpu\n")
    ray_bin = Path(sys.executable).parent / "ray"
    deadline = time.time() + 120
    while True:  # the head's job agent comes up some seconds after `ray start` returns
        proc = subprocess.run([str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(ROOT),
                               "--", sys.executable, "-m", "pipeline.cli", "quantize", str(job)],
                              env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        if "No available agent" not in proc.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout.lower()
    report = json.loads((out / "report.json").read_text())
    assert report["spec"]["recipe"]["method"] == "awq"
    from pipeline.checkpoint.validate import validate_checkpoint

    assert validate_checkpoint(out).ok
