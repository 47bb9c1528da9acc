"""The attention backend is decided in each Ray Train worker, not on the driver.

The driver process here cannot run our Triton kernel (no GPU, no TRITON_INTERPRET in its environment), the
way a KubeRay head pod without a GPU cannot; the workers can (TRITON_INTERPRET=1 through train.worker_env,
standing in for the GPU they would have). `model.attention=triton` must then run in every worker, each
rank must report it, and the first-step loss must match an `sdpa` run from the same seed and batches.
Heads of dim 64 (the kernel's supported sizes), GQA in the LM; real Ray, DeepSpeed ZeRO-2, gloo, MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SHAPE = ["model.vision.hidden_size=128", "model.vision.num_heads=2", "model.language.num_heads=2",
         "model.language.num_kv_heads=1", "model.diffusion.enabled=false",
         "data.tasks={report: 0.5, vqa: 0.3, grounding: 0.2}", "data.shuffle=false", "train.max_steps=2",
         "train.log_every=1", "train.micro_batch_size=2", "train.warmup_steps=1", "deepspeed.stage=2"]


def _train(shards: Path, out: Path, attention: str) -> str:
    cmd = [sys.executable, "-m", "cxrfm.cli", "train", "--no-progress", "--set", f"data.shards={shards}",
           "--set", f"train.output_dir={out}", "--set", f"model.attention={attention}",
           "--set", 'train.worker_env={TRITON_INTERPRET: "1"}']
    for o in SHAPE:
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TRITON_INTERPRET")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def _first_loss_and_params(out: Path) -> tuple[float, dict[str, str]]:
    from mlflow.tracking import MlflowClient

    [state] = [json.loads(p.read_text()) for p in out.glob("*/run.json")]
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    history = sorted((m.step, m.value) for m in client.get_metric_history(state["mlflow_run_id"], "loss"))
    return history[0][1], client.get_run(state["mlflow_run_id"]).data.params


def test_triton_runs_in_every_worker_when_the_driver_cannot_run_it(small_shards, tmp_path):
    # What the driver would have decided (the bug): it refuses triton, since it has neither GPU nor interpreter.
    probe = subprocess.run([sys.executable, "-c", "from cxrfm.attention import resolve_backend as r; r('triton', 'cpu')"],
                           capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert probe.returncode != 0 and "AttentionBackendError" in probe.stderr

    output = _train(small_shards, tmp_path / "triton", "triton")
    loss_triton, params = _first_loss_and_params(tmp_path / "triton")
    for rank in (0, 1):
        assert params[f"rank{rank}/attention"] == "triton", params
        assert params[f"rank{rank}/zero_stage"] == "2"
        assert params[f"rank{rank}/device"] == "cpu"
    # each rank wrote what it runs from its own process, not the driver's
    [run_dir] = [p.parent for p in (tmp_path / "triton").glob("*/run.json")]
    ranks = [json.loads((run_dir / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len({r["pid"] for r in ranks}) == 2
    assert all(r["attn_implementation"] == "cxrfm_triton" for r in ranks)
    assert "rank 1" in output and "attention triton" in output  # the summary lists every rank

    _train(small_shards, tmp_path / "sdpa", "sdpa")
    loss_sdpa, params_sdpa = _first_loss_and_params(tmp_path / "sdpa")
    assert params_sdpa["rank0/attention"] == "sdpa" and params_sdpa["rank1/attention"] == "sdpa"
    # same seed, same weights, same batches: the first step's loss (before any update) agrees
    assert loss_triton == pytest.approx(loss_sdpa, rel=1e-4, abs=1e-4)
