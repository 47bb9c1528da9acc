"""`cxrfm bench serve` end to end: its own private Ray and Serve on loopback, a tiny untrained model, real HTTP
clients; the table it prints is what the README's serving numbers come from."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cxrfm.bench.serve import _bodies, _summary


class _Args:
    images, max_new_tokens = "phantom", 7


def test_phantom_requests_differ_and_tokens_are_averaged():
    bodies = _bodies(_Args())
    assert len(bodies) == 48 and len({b["images"]["frontal"] for b in bodies}) == 48
    assert all(b["max_new_tokens"] == 7 for b in bodies)
    parts = [{"latencies": [0.1, 0.3], "tokens": [10, 20], "errors": 0, "wall": 2.0},
             {"latencies": [0.2], "tokens": [30], "errors": 1, "wall": 1.0}]
    s = _summary(parts)
    assert (s["ok"], s["errors"], s["tokens"]) == (3, 1, 20.0) and np.isclose(s["rps"], 1.0)


@pytest.mark.slow
def test_bench_serve_prints_every_mode(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "cxrfm.cli", "bench", "serve", "--levels", "2", "--rounds", "1",
                           "--window-s", "2", "--warmup-s", "1", "--max-new-tokens", "4", "--autoscale-max", "0",
                           "--unbatched-continuous"],
                          cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.strip().startswith("2 |")]
    modes = [r[1].strip() for r in rows]
    assert modes == ["continuous (max 16)", "@serve.batch (max 16)", "max_batch_size=1", "continuous (max 1)"], \
        proc.stdout[-3000:]
    for r in rows:
        ok, err, tokens = int(r[2]), int(r[3]), float(r[8])
        assert ok > 0 and err == 0, proc.stdout[-3000:]
        assert tokens == 4.0  # the untrained model never emits EOS: every answer runs to max_new_tokens
