"""End to end: `cxrfm train` as a user runs it (Ray Data -> Ray Train -> DeepSpeed -> MLflow -> export).

Each run is a real local Ray cluster with 2 CPU workers over gloo; minutes on 2 cores, so marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cxrfm.train.trainer import latest_checkpoint

pytestmark = pytest.mark.slow
REGISTERED = "cxr-e2e"  # the ZeRO-3 run registers its export under this name


def _train(shards: Path, out: Path, *overrides: str, resume: str | None = None, wait: bool = True, cwd: Path | None = None):
    if cwd is not None:  # paths relative to the working directory, as a user types them
        shards, out = Path(os.path.relpath(shards, cwd)), Path(os.path.relpath(out, cwd))
    cmd = [sys.executable, "-m", "cxrfm.cli", "train", "--no-progress",
           "--set", f"data.shards={shards}", "--set", f"train.output_dir={out}",
           "--set", "train.log_every=5", "--set", "train.micro_batch_size=4"]
    for o in overrides:
        cmd += ["--set", o]
    if resume:
        cmd += ["--resume", resume]
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=1500)
    assert proc.returncode == 0, output[-4000:]
    return output


def _run(out: Path) -> dict:
    [state] = [json.loads(p.read_text()) for p in out.glob("*/run.json")]
    return state


def _loss_history(out: Path, key: str = "loss") -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    state = _run(out)
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    return sorted((m.step, m.value) for m in client.get_metric_history(state["mlflow_run_id"], key))


@pytest.fixture(scope="module")
def trained(small_shards, tmp_path_factory):
    """One finished run per ZeRO stage, shared by the tests below (each run costs a minute or more)."""
    runs = {}

    def get(stage: int) -> tuple[Path, str]:
        if stage not in runs:
            out = tmp_path_factory.mktemp(f"zero{stage}")
            # ZeRO-3 runs with relative paths from another working directory, as `cxrfm train` in a shell does
            # ZeRO-2 runs jobs/tiny.yaml's four tasks. ZeRO-3 runs the three language tasks: it gathers every
            # submodule's weights over gloo, and the UNet's hundreds of small modules make that minutes on 2 cores.
            # ZeRO-3 also registers its export in the MLflow registry (test_train_registers_...).
            extra = [] if stage == 2 else ["model.diffusion.enabled=false",
                                           "data.tasks={report: 0.5, vqa: 0.3, grounding: 0.2}",
                                           f"tracking.register_as={REGISTERED}"]
            output = _train(small_shards, out, f"deepspeed.stage={stage}", "train.max_steps=40",
                            "train.checkpoint_every=20", "train.warmup_steps=5", *extra)
            runs[stage] = (out, output)
        return runs[stage]

    return get


@pytest.mark.parametrize("stage", [2, 3])
def test_train_end_to_end_loss_falls_and_everything_is_recorded(trained, stage):
    from mlflow.tracking import MlflowClient

    from cxrfm.model.build import load_export

    out, output = trained(stage)
    assert "mlflow ui --backend-store-uri" in output and "export" in output

    history = _loss_history(out)
    assert [s for s, _ in history] == [5, 10, 15, 20, 25, 30, 35, 40]
    first, last = history[0][1], history[-1][1]
    assert last < 0.6 * first, f"loss did not fall clearly: {history}"
    for task in ("report", "vqa", "grounding") + (("generate",) if stage == 2 else ()):
        assert _loss_history(out, f"loss/{task}"), f"no per-task loss for {task}"

    state = _run(out)
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    run = client.get_run(state["mlflow_run_id"])
    assert run.data.params["deepspeed.stage"] == str(stage)
    # what DeepSpeed itself says it runs, in every rank (engine.zero_optimization_stage()), not the config
    assert [run.data.params[f"rank{r}/zero_stage"] for r in (0, 1)] == [str(stage)] * 2
    assert [run.data.params[f"rank{r}/attention"] for r in (0, 1)] == ["sdpa"] * 2
    assert "tokens_per_s" in run.data.metrics and "tflops_per_device" in run.data.metrics
    assert "samples_per_s" in run.data.metrics and "data_wait_fraction" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(state["mlflow_run_id"])}
    assert {"config.yaml", "export"} <= artifacts

    ckpts = sorted(c for c in (out / "ray").glob("*/checkpoint_*") if c.is_dir())
    assert 1 <= len(ckpts) <= 2  # keep_last=2
    assert any((c / "latest").read_text().strip() == "step40" for c in ckpts)
    assert all((c / "config.yaml").is_file() for c in ckpts)  # every checkpoint carries its config

    export = next(out.glob("*/export"))
    model = load_export(export, device="cpu")
    assert (export / "tokenizer.json").is_file()
    # the export holds the trained weights: ZeRO-3 gathered them, nothing is an empty shard
    assert all(p.numel() > 0 and torch.isfinite(p).all() for p in model.parameters())


def test_train_registers_its_export_and_eval_attaches_its_metrics(trained, small_shards, tmp_path):
    """tracking.register_as: the export becomes a registry version with the run's config and data summary;
    `cxrfm eval` then tags that version with its metrics."""
    import yaml
    from mlflow.tracking import MlflowClient

    out, output = trained(3)
    state = _run(out)
    assert f"registered {REGISTERED} version 1" in output
    client = MlflowClient(tracking_uri=state["tracking_uri"], registry_uri=state["tracking_uri"])
    [version] = client.search_model_versions(f"name='{REGISTERED}'")
    assert version.run_id == state["mlflow_run_id"] and version.source == f"runs:/{state['mlflow_run_id']}/export"
    config = yaml.safe_load(version.tags["cxrfm.config"])
    assert config["deepspeed"]["stage"] == 3 and config["tracking"]["register_as"] == REGISTERED
    data = json.loads(version.tags["cxrfm.data"])
    manifest = json.loads((small_shards / "manifest.json").read_text())
    assert data["train"]["studies"] == manifest["splits"]["train"]["studies"] > 0
    assert set(data["train"]["tasks"]) >= {"report", "vqa"}

    export = next(out.glob("*/export"))
    metrics_file = tmp_path / "metrics.json"
    r = subprocess.run([sys.executable, "-m", "cxrfm.cli", "eval", str(export), "--shards", str(small_shards),
                        "--split", "test", "--tasks", "vqa", "--limit", "4", "--no-baselines", "--json", str(metrics_file)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"metrics attached to registered model {REGISTERED} version 1" in r.stdout
    metrics = {k: v for k, v in json.loads(metrics_file.read_text()).items() if isinstance(v, (int, float))}
    assert metrics, "cxrfm eval wrote no numeric metrics"
    tags = client.get_model_version(REGISTERED, "1").tags
    assert {k: float(tags[f"eval.test.{k}"]) for k in metrics} == pytest.approx(metrics)


def test_resume_a_finished_run_continues_the_step_count(trained, small_shards):
    out, _ = trained(2)
    name = _run(out)["run_name"]
    _train(small_shards, out, "train.max_steps=50", "train.checkpoint_every=10", resume=name)
    steps = [s for s, _ in _loss_history(out)]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50], steps  # same MLflow run, no step counted twice


def test_worker_killed_mid_training_recovers_from_checkpoint(small_shards, tmp_path):
    out = tmp_path / "run"
    proc = _train(small_shards, out, "train.max_steps=60", "train.checkpoint_every=10", "train.max_failures=2", wait=False)
    deadline = time.time() + 1200
    killed = None
    while time.time() < deadline and proc.poll() is None:
        # a checkpoint Ray Train committed (every rank reported it), not one still being written
        committed = max((latest_checkpoint(d)[1] for d in (out / "ray").glob("*") if d.is_dir()), default=-1) \
            if (out / "ray").exists() else -1
        pid_file = next(out.glob("*/workers/rank1.pid"), None)
        if committed >= 20 and pid_file is not None:
            killed = int(pid_file.read_text())
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.5)
    assert killed is not None, "training never reached a checkpoint at step 20"
    output, _ = proc.communicate(timeout=1500)
    assert proc.returncode == 0, output[-4000:]
    history = _loss_history(out)
    steps = [s for s, _ in history]
    assert steps[-1] == 60
    assert steps.count(5) == 1 and steps == sorted(set(steps)), "a step was logged twice"
    # MLflow hides a replay (steps already logged are not logged again): the restarted group's own reports say
    # where it started
    [snapshot] = (out / "ray").glob("*/checkpoint_manager_snapshot.json")
    start = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["start_step"]
    assert start >= 20, f"the restarted group began at step {start}, not from the checkpoint"
    new_pid = int(next(out.glob("*/workers/rank1.pid")).read_text())
    assert new_pid != killed, "rank 1 was not restarted"
