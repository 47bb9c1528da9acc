"""Distributed for real on one machine: a Ray cluster of a head and two worker nodes (separate raylets),
the tiny job submitted with `cxrfm jobs submit --to ray`, its two Ray Train workers on two different nodes
under ZeRO-3; one worker node's raylet killed after a checkpoint (the run resumes from it on a node the test
starts in its place); then the driver killed (`cxrfm train --resume RUN` finishes the run). One MLflow run
holds every step once.

Several minutes on 2 cores, so marked slow (it still runs in CI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cxrfm.cli import main
from tests.train.ray_cluster import LocalCluster

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
RUN = "multinode"
MAX_STEPS, LOG_EVERY, CKPT_EVERY = 30, 5, 10


@pytest.fixture()
def cluster(tmp_path):
    """Head (2 CPUs, runs the job's driver) + node_a and node_b (1 CPU and one `trainer_slot` each: one Ray
    Train worker fits per node, so two workers are on two nodes). Stopped, with whatever it left, even when
    the test fails."""
    c = LocalCluster(tmp_path)
    try:
        c.start_head(num_cpus=2, resources={"head": 1})
        c.wait_for_nodes(1)
        for name in ("node_a", "node_b"):
            c.add_node(name, num_cpus=1, resources={"trainer_slot": 1, name: 1})
        c.wait_for_nodes(3)
        yield c
    finally:
        c.stop()


def _spec(tmp_path: Path, shards: Path) -> Path:
    cfg = yaml.safe_load((REPO / "jobs" / "tiny.yaml").read_text())
    cfg["data"].update(shards=str(shards), tasks={"report": 0.5, "vqa": 0.3, "grounding": 0.2})
    cfg["model"]["diffusion"]["enabled"] = False  # ZeRO-3 gathers each small UNet module over gloo: minutes
    cfg["train"].update(max_steps=MAX_STEPS, log_every=LOG_EVERY, checkpoint_every=CKPT_EVERY, micro_batch_size=4,
                        warmup_steps=5, output_dir=str(tmp_path / "out"), max_failures=3,
                        resources_per_worker={"trainer_slot": 1})
    cfg["deepspeed"]["stage"] = 3
    cfg["tracking"]["run_name"] = RUN
    path = tmp_path / "multinode.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _checkpoint_step(out: Path) -> int:
    """The step of the latest checkpoint Ray Train committed (all ranks reported it), as `--resume` sees it."""
    from cxrfm.train.trainer import latest_checkpoint

    return latest_checkpoint(out / "ray" / RUN)[1]


def _committed_start_step(out: Path) -> int:
    """`start_step` of the latest committed report: the step the worker group that wrote it started from."""
    snapshot = json.loads((out / "ray" / RUN / "checkpoint_manager_snapshot.json").read_text())
    return int(snapshot["latest_checkpoint_result"]["metrics"]["start_step"])


def _reports(out: Path) -> list:
    """(checkpoint dir, step, start_step) of every report Ray Train committed, for failure messages."""
    try:
        snapshot = json.loads((out / "ray" / RUN / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [(r["checkpoint_dir_name"], r["metrics"]["step"], r["metrics"]["start_step"])
            for r in snapshot["checkpoint_results"]]


def _wait(what: str, cond, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _train_workers(cluster: LocalCluster) -> list:
    from ray.util.state import list_actors

    return list_actors(address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                       timeout=20)


def _job_status(cluster: LocalCluster, job_id: str) -> str:
    from cxrfm.jobs import status_ray

    return status_ray(job_id, cluster.dashboard)["status"]


def test_two_nodes_zero3_node_lost_and_driver_killed_resume_into_one_run(cluster, small_shards, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    spec = _spec(tmp_path, small_shards)
    assert main(["jobs", "submit", str(spec), "--to", "ray", cluster.dashboard]) == 0
    job_id = capsys.readouterr().out.split()[1]

    # 1. two workers, two nodes, ZeRO-3: from Ray's own state and from what each rank reported
    workers = out / RUN / "workers"
    _wait("both ranks to report", lambda: len(list(workers.glob("rank*.json"))) == 2 or
          _job_status(cluster, job_id) in ("FAILED", "STOPPED"), 600)
    ranks = {r["rank"]: r for r in (json.loads(p.read_text()) for p in workers.glob("rank*.json"))}
    assert len(ranks) == 2, f"job ended early: {_job_status(cluster, job_id)}"
    actors = _train_workers(cluster)
    worker_nodes = {cluster.node_id_of("node_a"), cluster.node_id_of("node_b")}
    assert len(actors) == 2 and {a.node_id for a in actors} == worker_nodes, [(a.node_id, a.pid) for a in actors]
    assert {r["node_id"] for r in ranks.values()} == worker_nodes
    assert all(r["zero_stage"] == 3 for r in ranks.values())

    # 2. the node running rank 1 loses its raylet after the first checkpoint; the test starts a node in its place
    _wait("the first checkpoint", lambda: _checkpoint_step(out) >= CKPT_EVERY, 900)
    lost = "node_a" if ranks[1]["node_id"] == cluster.node_id_of("node_a") else "node_b"
    at_kill = _checkpoint_step(out)
    old_pids = {r: int((workers / f"rank{r}.pid").read_text()) for r in (0, 1)}
    snapshot_at_kill = _reports(out)
    os.kill(cluster.nodes[lost].raylet_pid(), signal.SIGKILL)
    killed_at = time.monotonic()
    cluster.nodes[f"{lost}-lost"] = cluster.nodes.pop(lost)  # still stopped at teardown
    cluster.add_node(f"{lost}_2", num_cpus=1, resources={"trainer_slot": 1, f"{lost}_2": 1})
    _wait("both ranks restarted", lambda: all(
        (workers / f"rank{r}.pid").is_file() and int((workers / f"rank{r}.pid").read_text()) != old_pids[r]
        for r in (0, 1)), 600)
    restarted_at = time.monotonic()
    _wait("a checkpoint after the restart", lambda: _checkpoint_step(out) > at_kill, 900)
    progressed_at = time.monotonic()
    print(f"\nnode lost at checkpoint step {at_kill}: workers running again after {restarted_at - killed_at:.0f} s, "
          f"next checkpoint (step {_checkpoint_step(out)}) after {progressed_at - killed_at:.0f} s")
    assert _committed_start_step(out) == at_kill, \
        f"the restarted workers did not resume from the checkpoint: {_reports(out)}; at the kill: {snapshot_at_kill}"
    assert _job_status(cluster, job_id) == "RUNNING"
    assert cluster.node_id_of(f"{lost}_2") in {a.node_id for a in _train_workers(cluster)}

    # 3. the driver (the job's entrypoint process) is killed mid-run; `cxrfm train --resume` continues the run
    driver = json.loads((out / RUN / "run.json").read_text())["driver_pid"]
    assert _checkpoint_step(out) < MAX_STEPS, "the run finished before its driver could be killed"
    os.kill(driver, signal.SIGKILL)
    _wait("the job to fail", lambda: _job_status(cluster, job_id) == "FAILED", 120)
    _wait("its workers to go", lambda: not _train_workers(cluster), 120)
    before_resume = _checkpoint_step(out)
    env = {**cluster.env(), "RAY_ADDRESS": cluster.gcs_address}
    resumed = subprocess.run([sys.executable, "-m", "cxrfm.cli", "train", str(spec), "--resume", RUN, "--no-progress"],
                             env=env, capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert _checkpoint_step(out) == MAX_STEPS and before_resume < MAX_STEPS
    assert _committed_start_step(out) == before_resume  # continued from the checkpoint, not from step 0

    # 4. one MLflow run; every logged step once, none missing
    state = json.loads((out / RUN / "run.json").read_text())
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    [experiment] = [e for e in client.search_experiments() if e.name == "cxrfm-tiny"]
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [state["mlflow_run_id"]]
    for key in ("samples_per_s", "loss"):
        steps = sorted(m.step for m in client.get_metric_history(state["mlflow_run_id"], key))
        assert steps == list(range(LOG_EVERY, MAX_STEPS + 1, LOG_EVERY)), (key, steps)
