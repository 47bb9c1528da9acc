"""Driver side of `cxrfm train`: Ray, data, MLflow run, Ray Train TorchTrainer, live progress, summary."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from cxrfm.config import Config, ConfigError, config_from_dict

EPOCHS_PER_PASS_MAX = 100  # a longer run starts a new pass (and Ray Data execution) every 100 epochs
WORKER_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def worker_env(cfg: Config) -> dict[str, str]:
    """Environment of the Ray Train workers: the CPU settings (no GPU), TRITON_INTERPRET when the user set
    it here (a debugging switch, passed through, never decided here), then train.worker_env."""
    env = dict(WORKER_ENV) if not cfg.train.use_gpu else {}
    if os.environ.get("TRITON_INTERPRET"):
        env["TRITON_INTERPRET"] = os.environ["TRITON_INTERPRET"]
    return {**env, **cfg.train.worker_env}


@dataclass
class TrainResult:
    run_name: str
    run_dir: Path
    checkpoint: str | None
    export_dir: Path
    mlflow_uri: str
    mlflow_run_id: str
    history: list[dict]
    metrics: dict
    ranks: list[dict] = None  # per rank: attention backend, fused kernels, device, dtype, ZeRO stage, host


def _init_ray(cfg: Config) -> bool:
    """Connect to RAY_ADDRESS when set (a cluster, a Ray job); else start a local Ray. Returns local?"""
    import ray

    if ray.is_initialized():
        return not os.environ.get("RAY_ADDRESS")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return False
    # address="local": always a private cluster, never one that another `ray start` left running.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env(cfg)})
    return True


def _check_resources(cfg: Config, local: bool) -> None:
    import ray

    from cxrfm.data.pipeline import READ_TASK_CPUS

    if local:  # a cluster may scale up to fit; a local Ray never will, and Ray Data would wait without a word
        have, workers = ray.cluster_resources().get("CPU", 0), cfg.train.num_workers * cfg.train.cpus_per_worker
        if workers + READ_TASK_CPUS > have:
            fit = (have - READ_TASK_CPUS) / cfg.train.num_workers
            raise ConfigError(
                f"train.num_workers x train.cpus_per_worker = {workers:g} CPUs leaves {max(0, have - workers):g} of this "
                f"machine's {have:g} to read the shards, which needs {READ_TASK_CPUS:g}; the data pipeline would never "
                f"start. Set train.cpus_per_worker to at most {fit:g} (or fewer train.num_workers)")
    if cfg.train.use_gpu:
        have = ray.cluster_resources().get("GPU", 0)
        if have < cfg.train.num_workers:
            raise ConfigError(f"train.use_gpu=true needs {cfg.train.num_workers} GPUs but this Ray cluster has {int(have)}; "
                              "set train.use_gpu=false (CPU) or submit to a GPU cluster (cxrfm jobs submit)")


def data_config(cfg: Config):
    """How Ray Train hands the dataset to the workers (also what `cxrfm bench data` measures through)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = not cfg.data.shuffle  # data.shuffle=false: reproducible batches across runs
    return DataConfig(execution_options=options)


def latest_checkpoint(storage: Path, attempts: int = 10) -> tuple[str | None, int]:
    """The latest checkpoint Ray Train committed for a run, and its step; (None, -1) when none is.

    Committed means listed in the run's checkpoint_manager_snapshot.json, which Ray Train's controller writes
    once every rank has reported the checkpoint. A `checkpoint_*` directory without that may lack some ranks'
    partitions (a node or the driver died while it was written), so it is never picked, however new; and
    without a snapshot nothing was committed yet. The snapshot is rewritten in place, so a read that finds
    it half-written is retried (`attempts` times, 0.1 s apart)."""
    path = storage / "checkpoint_manager_snapshot.json"
    for attempt in range(attempts):
        try:
            snapshot = json.loads(path.read_text())
            break
        except FileNotFoundError:
            return None, -1
        except (OSError, ValueError) as err:
            if attempt == attempts - 1:
                raise ConfigError(f"{path} stays unreadable ({err}); if no run is writing it, it is damaged: "
                                  f"check it against the checkpoint_* directories beside it") from None
            time.sleep(0.1)
    latest = snapshot.get("latest_checkpoint_result")
    if not latest:
        return None, -1
    committed = storage / latest["checkpoint_dir_name"]
    tag = committed / "latest"  # DeepSpeed's pointer to the step directory it saved
    if not tag.is_file():
        raise ConfigError(f"Ray Train committed {committed} but it has no DeepSpeed 'latest' file; the checkpoint "
                          f"storage ({storage}) lost files: restore them or start a new run")
    return str(committed), int(tag.read_text().strip().removeprefix("step"))


class RunStopped(RuntimeError):
    """Training gave up (failures or missing capacity beyond the limits); the message says how to resume."""


def stopped_message(run_name: str, storage: Path, cfg: Config, err: Exception) -> str:
    try:
        ckpt, step = latest_checkpoint(storage)
        where = f"its last checkpoint is step {step} ({ckpt})" if ckpt else "it has no checkpoint yet"
    except ConfigError as bad:  # still say how to resume; --resume repeats this error if it persists
        where = f"its checkpoint record is unreadable ({bad})"
    cause = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
    return (f"run {run_name} stopped ({cause}) after Ray Train's retries (train.max_failures="
            f"{cfg.train.max_failures}, train.capacity_retries={cfg.train.capacity_retries}); {where}. Once the cause "
            f"is fixed or the cluster has {cfg.train.num_workers} worker slots again, continue it with: "
            f"cxrfm train --resume {run_name} --set train.output_dir={cfg.train.output_dir}")


def _progress(queue, total: int, start: int, history: list[dict], stop: threading.Event) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cols = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}")]
    with Progress(*cols, refresh_per_second=4) as bar:
        task = bar.add_task("starting workers...", total=total, completed=start)
        while not stop.is_set() or not queue.empty():
            try:
                m = queue.get(timeout=0.5)
            except Exception:  # noqa: BLE001 - ray.util.queue.Empty on timeout
                continue
            history.append(m)
            per_task = " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in m.items() if k.startswith("loss/"))
            desc = f"loss {m['loss']:.3f} ({per_task}) {m['samples_per_s']:.1f} samples/s wait {m['data_wait_fraction']:.0%}"
            bar.update(task, completed=m["step"], description=desc)


def train(cfg: Config, resume: str | None = None, show_progress: bool = True) -> TrainResult:
    from cxrfm.data import store

    for root in [cfg.data.shards] + [m.shards for m in cfg.data.sources]:
        store.check_access(root)  # bad store credentials: one line, before Ray or anything heavy starts
    import mlflow
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cxrfm.data.build import ensure_shards
    from cxrfm.data.pipeline import build_dataset
    from cxrfm.data.mixture import mixture_params, resolve_sources
    from cxrfm.data.shards import load_manifest
    from cxrfm.train.loop import train_loop_per_worker
    from cxrfm.train.tracking import flatten, tracking_uri

    # Ray workers do not share the driver's working directory: every path they get is absolute.
    cfg = cfg.model_copy(deep=True)
    cfg.data.shards = store.absolute(cfg.data.shards)  # a store URI (s3://...) stays as it is
    for mix in cfg.data.sources:
        mix.shards = store.absolute(mix.shards)
    cfg.train.output_dir = str(Path(cfg.train.output_dir).resolve())
    out = Path(cfg.train.output_dir)
    run_name = resume or cfg.tracking.run_name or f"{cfg.job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = out / run_name
    storage = out / "ray"
    state_file = run_dir / "run.json"
    resume_from = None
    if resume:
        if not state_file.is_file():
            raise ConfigError(f"no run {resume!r} under {out} (expected {state_file}); list runs with: ls {out}")
        resume_from, done = latest_checkpoint(storage / run_name)
        if resume_from is None:
            raise ConfigError(f"run {resume!r} has no checkpoint to resume from under {storage / run_name}")
        if done >= cfg.train.max_steps:
            raise ConfigError(f"run {resume!r} already reached step {done}; raise train.max_steps above it to continue")
    if cfg.train.use_gpu and not os.environ.get("RAY_ADDRESS"):
        import torch

        if torch.cuda.device_count() < cfg.train.num_workers:
            raise ConfigError(f"train.use_gpu=true asks for {cfg.train.num_workers} GPUs but this machine has "
                              f"{torch.cuda.device_count()}; set train.use_gpu=false (CPU) or submit to a GPU cluster "
                              "(cxrfm jobs submit SPEC --to ray ADDRESS)")
    local = _init_ray(cfg)
    _check_resources(cfg, local)
    # The attention backend, kernels, device and dtype are decided in each worker (cxrfm.model.build), where
    # the GPU is: a head node or laptop driver may have none. Each rank reports what it runs.
    print(f"attention: model.attention={cfg.model.attention}, resolved in each worker (MLflow params rank<N>/attention)")

    ensure_shards(cfg.data)
    manifests = [load_manifest(root) for _, _, root in resolve_sources(cfg.data)]  # one, or one per mixed source
    vision = cfg.model.projector.num_tokens
    # All the epochs the run needs in one Ray Data execution (capped): no restart stall at each epoch boundary.
    train_samples = sum(m["splits"].get("train", {}).get("studies", 0) for m in manifests)
    needed = cfg.train.max_steps * cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.num_workers
    epochs = min(EPOCHS_PER_PASS_MAX, max(1, math.ceil(needed / max(1, train_samples))))
    dataset, excluded = build_dataset(cfg, "train", vision, augment=True, epochs=epochs)

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = json.loads(state_file.read_text()) if state_file.is_file() else {}
    run = mlflow.start_run(run_id=previous.get("mlflow_run_id"), run_name=None if previous else run_name)
    run_id = run.info.run_id
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.dump(), sort_keys=False))
    # driver_pid: the process to stop (or that was lost) when a run has to be resumed by hand
    state_file.write_text(json.dumps({"run_name": run_name, "mlflow_run_id": run_id, "tracking_uri": uri,
                                      "driver_pid": os.getpid()}, indent=2))
    if not previous:
        mlflow.log_params(flatten(cfg.dump()))
        mlflow.log_params(mixture_params(cfg.data))  # per-source weights, study counts per split, licenses
        for split in ("train", "val", "test"):
            infos = [m["splits"][split] for m in manifests if split in m["splits"]]
            tasks = {t: sum(i["tasks"].get(t, 0) for i in infos) for i in infos for t in i["tasks"]}
            mlflow.log_metrics({f"data/{split}/studies": sum(i["studies"] for i in infos),
                                **{f"data/{split}/{t}": n for t, n in tasks.items()}})
    mlflow.log_artifact(str(run_dir / "config.yaml"))
    for reason, n in excluded.items():
        print(f"warning: {n} training samples excluded before reading ({reason}); run: cxrfm data verify {cfg.data.shards}")

    # On the driver's node: a queue on a worker node would die with that node and fail every retry after it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    loop_config = {"cfg": cfg.dump(), "mlflow_uri": uri, "mlflow_run_id": run_id,
                   "progress_queue": queue, "resume_from": resume_from, "run_dir": str(run_dir)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                                           **cfg.train.resources_per_worker}),
        run_config=RunConfig(
            name=run_name, storage_path=str(storage),
            # max_failures: workers lost mid-run (a node gone, a process killed), each time restarted from the
            # last checkpoint; controller_failure_limit: attempts to start them again while capacity is missing
            failure_config=FailureConfig(max_failures=cfg.train.max_failures,
                                         controller_failure_limit=cfg.train.capacity_retries),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
        datasets={"train": dataset},
        dataset_config=data_config(cfg),
    )
    history: list[dict] = []
    stop = threading.Event()
    start_step = latest_checkpoint(storage / run_name)[1] if resume else 0
    watcher = threading.Thread(target=_progress, args=(queue, cfg.train.max_steps, max(start_step, 0), history, stop),
                               daemon=True, name="progress")
    if show_progress:
        watcher.start()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise RunStopped(stopped_message(run_name, storage / run_name, cfg, err)) from None
    finally:
        stop.set()
        if show_progress:
            watcher.join(timeout=10)
    while not queue.empty():  # progress lines that arrived after the bar stopped
        history.append(queue.get())
    metrics = dict(result.metrics or {})
    export_dir = run_dir / "export"
    ckpt = result.checkpoint.path if result.checkpoint else None
    mlflow.log_artifacts(str(export_dir), artifact_path="export")
    if cfg.tracking.register_as:  # a registry version with the run's config and data; cxrfm models promote ...
        from cxrfm.registry import register_export

        version = register_export(uri, run_id, cfg.tracking.register_as, cfg.dump(), manifests)
        print(f"registered {cfg.tracking.register_as} version {version} (cxrfm models promote "
              f"{cfg.tracking.register_as} {version} --alias champion)")
    skipped = {k.removeprefix("total_skipped/"): v for k, v in metrics.items() if k.startswith("total_skipped/") and v}
    skipped.update(excluded)
    mlflow.log_metrics({f"skipped/{k}": v for k, v in skipped.items()} or {"skipped/total": 0})
    mlflow.end_run()
    if local:
        ray.shutdown()
    ranks = worker_runtimes(run_dir)
    res = TrainResult(run_name, run_dir, ckpt, export_dir, uri, run_id, history, {**metrics, "skipped": skipped}, ranks)
    return res


def worker_runtimes(run_dir: Path) -> list[dict]:
    """What each rank reported it runs (workers/rank<N>.json, written by the training loop), in rank order."""
    files = sorted((run_dir / "workers").glob("rank*.json"), key=lambda p: int(p.stem.removeprefix("rank")))
    return [json.loads(p.read_text()) for p in files]


def summary(res: TrainResult) -> str:
    h = res.history
    lines = [f"run           {res.run_name}"]
    if h:
        first, last = h[0], h[-1]
        for key in sorted(k for k in last if k.startswith("loss")):
            if key in first:
                lines.append(f"{key:<13} {first[key]:.3f} (step {first['step']}) -> {last[key]:.3f} (step {last['step']})")
        lines.append(f"samples/s     {sum(m['samples_per_s'] for m in h) / len(h):.1f} (mean of log windows)")
        lines.append(f"data wait     {sum(m['data_wait_fraction'] for m in h) / len(h):.1%} of step time")
        steady = h[1:] or h  # the first window holds compilation and warm-up
        lines.append(f"tokens/s      {sum(m.get('tokens_per_s', 0) for m in steady) / len(steady):.0f}; "
                     f"{sum(m.get('tflops_per_device', 0) for m in steady) / len(steady):.3g} TFLOP/s per device"
                     + (f", MFU {sum(m['mfu'] for m in steady) / len(steady):.1%}" if "mfu" in h[-1] else "")
                     + (f", peak memory {max(m['peak_memory_gib'] for m in h):.1f} GiB" if "peak_memory_gib" in h[-1] else ""))
    skipped = res.metrics.get("skipped", {})
    lines.append(f"skipped       {int(sum(skipped.values()))} samples" + (f" {skipped}" if skipped else ""))
    for r in res.ranks or []:
        lines.append(f"rank {r['rank']:<8} attention {r['attention']} ({r['attention_reason']}); ZeRO-{r['zero_stage']}, "
                     f"{r['device']} {r['precision']}, fused rmsnorm {r['fused_rmsnorm']} / cross-entropy {r['fused_cross_entropy']}")
    lines.append(f"checkpoint    {res.checkpoint}")
    lines.append(f"export        {res.export_dir}  (cxrfm.model.load_export; no Ray/DeepSpeed needed)")
    lines.append(f"mlflow store  {res.mlflow_uri}  (run id {res.mlflow_run_id})")
    lines.append(f"open the UI   mlflow ui --backend-store-uri {res.mlflow_uri}")
    return "\n".join(lines)


def load_run_config(output_dir: str | Path, run: str) -> Config:
    path = Path(output_dir) / run / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"no run {run!r} under {Path(output_dir)} (expected {path}); list runs with: ls {output_dir}")
    return config_from_dict(yaml.safe_load(path.read_text()))
