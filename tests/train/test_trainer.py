"""`cxrfm train` refuses, before anything starts, a local run whose workers leave no CPU for reading shards."""

import os
import subprocess
import sys


def test_workers_that_take_every_local_cpu_are_refused_with_the_setting_to_change(small_shards, tmp_path):
    # Before: Ray Train placed both workers, Ray Data's read tasks never got a CPU, and the run hung silently.
    cpus = os.cpu_count()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray, as on a laptop
    cmd = [sys.executable, "-m", "cxrfm.cli", "train", "--no-progress", "--set", f"data.shards={small_shards}",
           "--set", f"train.output_dir={tmp_path}", "--set", "train.num_workers=2",
           "--set", f"train.cpus_per_worker={cpus / 2}", "--set", "train.max_steps=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "train.cpus_per_worker" in message and f"at most {(cpus - 0.25) / 2:g}" in message, message[-3000:]
    assert not list(tmp_path.glob("*/run.json")), "no run may start"
