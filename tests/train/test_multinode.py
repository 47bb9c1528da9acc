"""Distributed for real on one machine: a Ray cluster of a head and two worker nodes (separate raylets),
the tiny job submitted with `cxrfm jobs submit --to ray`, its two Ray Train workers on two different nodes
under ZeRO-3; one worker node's raylet killed after a checkpoint (the run resumes from it on a node the test
starts in its place); then the driver killed (`cxrfm train --resume RUN` continues the run); then, in that
resumed run, a worker node lost for good: after train.capacity_retries the run stops with a message naming
its checkpoint and the command that resumes it, and that command, once a node is back, finishes the run.
One MLflow run holds every step once.

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
MAX_STEPS, LOG_EVERY, CKPT_EVERY = 40, 5, 10
START_TIMEOUT_S = 10  # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S of the run that loses capacity for good


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


def _ranks(workers: Path) -> dict[int, dict]:
    """What each rank of the newest worker group reported: pid, node, ZeRO stage, the step it restored."""
    found = {}
    for p in workers.glob("rank*.json"):
        try:
            r = json.loads(p.read_text())
        except ValueError:  # being written
            continue
        found[r["rank"]] = r
    return found


def _restarted(workers: Path, old: dict[int, dict]) -> dict[int, dict] | None:
    """Both ranks' reports once each comes from a new process (a new worker group), else None."""
    now = _ranks(workers)
    new = len(now) == 2 and all(now[r]["pid"] != old[r]["pid"] for r in (0, 1))
    return now if new else None


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



def _node_of_rank1(cluster: LocalCluster, ranks: dict[int, dict]) -> str:
    """The test's name of the worker node running rank 1 (each node has a resource named after it)."""
    [name] = [n for n, node in cluster.nodes.items() if not node.lost and n != "head"
              and cluster.node_id_of(n) == ranks[1]["node_id"]]
    return name


def test_two_nodes_zero3_node_lost_driver_killed_capacity_gone_resume_into_one_run(cluster, small_shards, tmp_path,
                                                                                   capsys):
    from mlflow.tracking import MlflowClient

    from cxrfm.train.trainer import latest_checkpoint

    out = tmp_path / "out"
    spec = _spec(tmp_path, small_shards)
    assert main(["jobs", "submit", str(spec), "--to", "ray", cluster.dashboard]) == 0
    job_id = capsys.readouterr().out.split()[1]

    # 1. two workers, two nodes, ZeRO-3: from Ray's own state and from what each rank reported
    workers = out / RUN / "workers"
    _wait("both ranks to report", lambda: len(_ranks(workers)) == 2 or
          _job_status(cluster, job_id) in ("FAILED", "STOPPED"), 600)
    ranks = _ranks(workers)
    assert len(ranks) == 2, f"job ended early: {_job_status(cluster, job_id)}"
    actors = _train_workers(cluster)
    worker_nodes = {cluster.node_id_of("node_a"), cluster.node_id_of("node_b")}
    assert len(actors) == 2 and {a.node_id for a in actors} == worker_nodes, [(a.node_id, a.pid) for a in actors]
    assert {r["node_id"] for r in ranks.values()} == worker_nodes
    assert all(r["zero_stage"] == 3 and r["start_step"] == 0 for r in ranks.values())

    # 2. the node running rank 1 loses its raylet after the first checkpoint; the test starts a node in its place
    _wait("the first checkpoint", lambda: _checkpoint_step(out) >= CKPT_EVERY, 900)
    at_kill = _checkpoint_step(out)
    snapshot_at_kill = _reports(out)
    lost = _node_of_rank1(cluster, ranks)
    cluster.lose(lost)
    killed_at = time.monotonic()
    cluster.add_node(f"{lost}_2", num_cpus=1, resources={"trainer_slot": 1, f"{lost}_2": 1})
    ranks = _wait("both ranks restarted", lambda: _restarted(workers, ranks), 600)
    restarted_at = time.monotonic()
    # The old group may still commit one more checkpoint while it is torn down (its ranks' processes outlive
    # the raylet for a moment), so the new group starts from the latest committed one: at or after the kill.
    resumed_from = ranks[0]["start_step"]
    assert ranks[1]["start_step"] == resumed_from and at_kill <= resumed_from < MAX_STEPS, \
        f"the restarted workers did not resume from the checkpoint: {ranks}; committed: {_reports(out)}; " \
        f"at the kill: {snapshot_at_kill}"
    _wait("a checkpoint after the restart", lambda: _checkpoint_step(out) > resumed_from, 900)
    progressed_at = time.monotonic()
    print(f"\nnode lost at checkpoint step {at_kill}: workers running again (from step {resumed_from}) after "
          f"{restarted_at - killed_at:.0f} s, next checkpoint (step {_checkpoint_step(out)}) after "
          f"{progressed_at - killed_at:.0f} s")
    assert _committed_start_step(out) == resumed_from, _reports(out)
    assert _job_status(cluster, job_id) == "RUNNING"
    assert cluster.node_id_of(f"{lost}_2") in {a.node_id for a in _train_workers(cluster)}

    # 3. the driver (the job's entrypoint process) is killed mid-run; `cxrfm train --resume` continues the run
    driver = json.loads((out / RUN / "run.json").read_text())["driver_pid"]
    assert _checkpoint_step(out) < MAX_STEPS - CKPT_EVERY, "the run went too far before its driver could be killed"
    os.kill(driver, signal.SIGKILL)
    _wait("the job to fail", lambda: _job_status(cluster, job_id) == "FAILED", 120)
    _wait("its workers to go", lambda: not _train_workers(cluster), 120)
    before_resume = _checkpoint_step(out)
    env = {**cluster.env(), "RAY_ADDRESS": cluster.gcs_address}
    # this run gives up quickly once capacity is gone: 1 retry of START_TIMEOUT_S (the driver passes the
    # variable on to Ray Train's controller)
    resume_cmd = [sys.executable, "-m", "cxrfm.cli", "train", str(spec), "--resume", RUN, "--no-progress",
                  "--set", "train.capacity_retries=1"]
    log = open(tmp_path / "resumed.log", "w+")
    resumed = subprocess.Popen(resume_cmd, env={**env, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(START_TIMEOUT_S)},
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        ranks = _wait("the resumed run's ranks", lambda: _restarted(workers, ranks) or resumed.poll() is not None, 600)
        assert resumed.poll() is None, _tail(log)
        assert {r["start_step"] for r in ranks.values()} == {before_resume}, (ranks, _reports(out))
        to_lose = _node_of_rank1(cluster, ranks)

        # 4. capacity gone for good: a worker node lost after a checkpoint of the resumed run, no node added
        _wait("a checkpoint of the resumed run", lambda: _checkpoint_step(out) > before_resume or
              resumed.poll() is not None, 900)
        assert resumed.poll() is None and _checkpoint_step(out) < MAX_STEPS, _tail(log)
        cluster.lose(to_lose)
        lost_at = time.monotonic()
        code = resumed.wait(timeout=600)
        print(f"capacity lost for good after checkpoint step {_checkpoint_step(out)}: the run stopped after "
              f"{time.monotonic() - lost_at:.0f} s")
    finally:
        if resumed.poll() is None:
            resumed.kill()
    text = _tail(log)
    assert code == 1, text
    stop_ckpt, stop_step = latest_checkpoint(out / "ray" / RUN)
    assert before_resume < stop_step < MAX_STEPS
    [line] = [ln for ln in text.splitlines() if ln.startswith(f"error: run {RUN} stopped (")]
    assert "train.capacity_retries=1" in line and f"its last checkpoint is step {stop_step} ({stop_ckpt})" in line
    assert "the cluster has 2 worker slots again" in line, line
    named = line.split("continue it with: ", 1)[1].split()
    assert named == ["cxrfm", "train", "--resume", RUN, "--set", f"train.output_dir={out}"], line
    assert not _train_workers(cluster)

    # 5. a node is back: the command the message named, run as it is, finishes the run from that checkpoint
    cluster.add_node("node_c", num_cpus=1, resources={"trainer_slot": 1, "node_c": 1})
    cluster.wait_for_nodes(3)
    final = subprocess.run([sys.executable, "-m", "cxrfm.cli", *named[1:]], env=env, capture_output=True, text=True,
                           timeout=1200, cwd=tmp_path)
    assert final.returncode == 0, (final.stdout + final.stderr)[-4000:]
    assert _checkpoint_step(out) == MAX_STEPS
    assert {r["start_step"] for r in _ranks(workers).values()} == {stop_step}
    assert _committed_start_step(out) == stop_step  # continued from the checkpoint, not from step 0

    # 6. one MLflow run; every logged step once, none missing
    state = json.loads((out / RUN / "run.json").read_text())
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    [experiment] = [e for e in client.search_experiments() if e.name == "cxrfm-tiny"]
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [state["mlflow_run_id"]]
    for key in ("samples_per_s", "loss"):
        steps = sorted(m.step for m in client.get_metric_history(state["mlflow_run_id"], key))
        assert steps == list(range(LOG_EVERY, MAX_STEPS + 1, LOG_EVERY)), (key, steps)


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-6000:]
