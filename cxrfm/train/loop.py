"""The per-worker training loop run by Ray Train: DeepSpeed engine, streaming batches, metrics, checkpoints.

Each rank builds the model (under `deepspeed.zero.Init` for ZeRO-3), wraps it in
`deepspeed.initialize`, and reads its split of the Ray Dataset. Checkpoints are DeepSpeed's own
layout (each rank writes its partition) reported through `ray.train.report`, which merges them
into one directory in run storage and keeps the last K.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from cxrfm.config import config_from_dict
from cxrfm.data.pipeline import SKIP_REASONS
from cxrfm.data.samples import ALL_TASKS, LM_TASKS

TAG_PREFIX = "step"
LOGGED = ALL_TASKS + ("findings", "views")  # per-task losses, and the auxiliary finding and view losses


def _resume_step(engine, checkpoint) -> int:
    with checkpoint.as_directory() as d:
        tag = (Path(d) / "latest").read_text().strip()
        _, client = engine.load_checkpoint(d, tag=tag)
    return int(client["step"])


def batch_iterator(shard, cfg) -> Iterator[dict]:
    """A worker's micro-batches from its Ray Data shard, as numpy (also what `cxrfm bench data` measures)."""
    return iter(shard.iter_batches(batch_size=cfg.train.micro_batch_size, batch_format="numpy", drop_last=True,
                                   prefetch_batches=cfg.data.prefetch_batches))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in batch.items()}


SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels")
PAD_MULTIPLE = 8  # trimmed lengths stay multiples of 8 (tensor-core friendly shapes, fewer distinct shapes)


def trim_padding(batch: dict) -> dict:
    """Cut the right padding that no row of this batch uses: examples come padded to data.max_seq_len, and
    a batch's longest row is often far shorter (tiny-learn: ~120 of 192 tokens). Padding sits at the right,
    masked and unlabeled, so the loss is the same; the LM's matmuls and attention shrink with the length."""
    mask = batch["attention_mask"]  # (B, T)
    used = int(mask.sum(1).max()) if mask.size else 0
    length = min(mask.shape[1], max(PAD_MULTIPLE, -(-used // PAD_MULTIPLE) * PAD_MULTIPLE))
    if length == mask.shape[1]:
        return batch
    return {k: (v[:, :length] if k in SEQUENCE_KEYS else v) for k, v in batch.items()}


def _export(engine, cfg, tokenizer, out_dir: Path, rank: int) -> None:
    """Full weights to an HF-style directory, loadable without Ray or DeepSpeed (rank 0 writes)."""
    import deepspeed

    module = engine.module
    if cfg.deepspeed.stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    else:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()} if rank == 0 else None
    if rank == 0:
        module.save_pretrained(out_dir, full_config=cfg, tokenizer=tokenizer, state_dict=state)
    dist.barrier()


class _Window:
    """Sums over the steps since the last log line, reduced across ranks when logged."""

    # tokens/generate counts images (its loss is a per-image diffusion MSE, not a token cross-entropy)
    # findings: the auxiliary vision loss (model.finding_loss_weight); its count is labeled observations
    # views: the auxiliary view loss (model.view_loss_weight); its count is images with a known view
    KEYS = ([f"loss_sum/{t}" for t in LOGGED] + [f"tokens/{t}" for t in LOGGED]
            + ["samples", "rows", "flops", "seq_tokens", "truncated", "wait_s", "step_s"] + [f"skipped/{r}" for r in SKIP_REASONS[1:]])

    def __init__(self):
        self.sums = defaultdict(float)

    def reduce(self, device: torch.device) -> dict[str, float]:
        # on the training device: NCCL reduces CUDA tensors only (gloo, CPU ones)
        vec = torch.tensor([self.sums[k] for k in self.KEYS], dtype=torch.float64, device=device)
        dist.all_reduce(vec)
        return dict(zip(self.KEYS, vec.tolist()))


def _ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _report_runtime(model, engine, cfg, out: Path, rank: int, world: int, config: dict, start_step: int) -> None:
    """Every rank says what it actually runs (workers/rank<N>.json, its log); rank 0 logs all ranks to MLflow
    as params rank<N>/<field>, so a run records the backend of each worker, not what the driver assumed.
    `start_step`: the checkpoint step this process restored (0: none), so a restarted worker group shows
    where it began, apart from reports an older group may still commit while it is being replaced."""
    mine = {"rank": rank, **model.runtime.as_dict(), "precision": cfg.train.precision,
            "zero_stage": engine.zero_optimization_stage(), "host": socket.gethostname(), "pid": os.getpid(),
            "node_id": _ray_node_id(), "start_step": start_step}
    (out / "workers" / f"rank{rank}.json").write_text(json.dumps(mine))
    print(f"rank {rank}: attention {mine['attention']} ({mine['attention_reason']}), ZeRO-{mine['zero_stage']}, "
          f"{mine['device']}, fused rmsnorm {mine['fused_rmsnorm']}, fused cross-entropy {mine['fused_cross_entropy']}",
          flush=True)
    everyone: list[dict | None] = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        from mlflow.tracking import MlflowClient

        params = {f"rank{r['rank']}/{k}": str(v)[:500] for r in everyone for k, v in r.items()
                  if k in ("attention", "attention_reason", "device", "fused_rmsnorm", "fused_cross_entropy", "zero_stage")}
        client = MlflowClient(tracking_uri=config["mlflow_uri"])
        logged = client.get_run(config["mlflow_run_id"]).data.params
        # A resumed run keeps its first values (MLflow params are immutable); a change is kept as a tag.
        new = {k: v for k, v in params.items() if k not in logged}
        if new:
            from mlflow.entities import Param

            client.log_batch(config["mlflow_run_id"], params=[Param(k, v) for k, v in new.items()])
        for k, v in params.items():
            if k in logged and logged[k] != v:
                client.set_tag(config["mlflow_run_id"], f"resumed/{k}", v)


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from cxrfm.data import store
    from cxrfm.model.build import build_model
    from cxrfm.model.runtime import gpu_peak_tflops, resolve_device
    from cxrfm.model.summary import train_flops
    from cxrfm.text.tokenizer import load_tokenizer
    from cxrfm.train.deepspeed_config import deepspeed_config, make_optimizer, make_scheduler
    from cxrfm.train.tracking import MetricLogger

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out = Path(config["run_dir"])
    (out / "workers").mkdir(parents=True, exist_ok=True)
    (out / "workers" / f"rank{rank}.pid").write_text(str(os.getpid()))  # lets operators (and tests) find ranks
    torch.manual_seed(cfg.train.seed + rank)
    if not cfg.train.use_gpu:
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    # use_gpu: Ray gave this worker a GPU and set it as current; cpu otherwise (never decided on the driver)
    device = resolve_device(ray.train.torch.get_device()) if cfg.train.use_gpu else torch.device("cpu")

    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")
    tokenizer = load_tokenizer(store.join(cfg.data.shards, "tokenizer"))  # a store URI: copied to a local cache
    ds_cfg = deepspeed_config(cfg)
    # Attention backend, fused kernels and device are resolved here, in the worker that has the GPU.
    model = build_model(cfg, len(tokenizer), device=device, zero3_config=ds_cfg if cfg.deepspeed.stage == 3 else None)
    flops_per_row = functools.cache(lambda length: train_flops(model, cfg, 1, length))  # by trimmed length
    peak = gpu_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if cfg.train.activation_checkpointing:
        model.enable_activation_checkpointing()
    optimizer = make_optimizer(cfg, model)
    # A factory, so the schedule binds to DeepSpeed's wrapped optimizer (ZeRO-3 regroups parameters).
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg,
                                                   lr_scheduler=lambda opt: make_scheduler(cfg, opt))

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = Checkpoint(config["resume_from"])
    if checkpoint is not None:
        step = _resume_step(engine, checkpoint)
    start_step = step
    _report_runtime(model, engine, cfg, out, rank, world, config, start_step)

    logger = MetricLogger(config["mlflow_uri"], config["mlflow_run_id"]) if rank == 0 else None
    queue = config.get("progress_queue")
    shard = ray.train.get_dataset_shard("train")
    window, totals = _Window(), defaultdict(float)
    last_log = time.perf_counter()
    while step < cfg.train.max_steps:
        batches = batch_iterator(shard, cfg)
        t_wait = time.perf_counter()
        for raw in batches:
            t_got = time.perf_counter()
            skip = raw.pop("skip_code")
            counts = raw.pop("skip_count", None)  # a placeholder row stands for a whole unusable shard
            truncated = raw.pop("truncated")
            for i in (skip > 0).nonzero()[0]:
                window.sums[f"skipped/{SKIP_REASONS[skip[i]]}"] += 1 if counts is None else int(counts[i])
            raw = trim_padding(raw)
            batch = _to_device(raw, device)
            result = engine(batch["input_ids"], batch["attention_mask"], batch["images"], batch["image_present"],
                            labels=batch["labels"], task=batch["task"], findings=batch.get("findings"),
                            views=batch.get("views"))
            boundary = engine.is_gradient_accumulation_boundary()  # before step() advances the micro-step
            engine.backward(result["loss"])
            engine.step()
            for name in LOGGED:  # every micro-batch counts, not only the last of an accumulation
                window.sums[f"loss_sum/{name}"] += float(result.get(f"loss_sum/{name}", 0.0))
                window.sums[f"tokens/{name}"] += float(result.get(f"tokens/{name}", 0))
            window.sums["samples"] += int((skip == 0).sum())
            window.sums["rows"] += len(skip)  # computed, skipped or not
            window.sums["flops"] += flops_per_row(raw["input_ids"].shape[1]) * len(skip)
            window.sums["seq_tokens"] += float(raw["attention_mask"].sum())
            window.sums["truncated"] += int(truncated.sum())
            window.sums["wait_s"] += t_got - t_wait
            window.sums["step_s"] += time.perf_counter() - t_wait
            t_wait = time.perf_counter()
            if not boundary:
                continue
            step += 1
            final = step >= cfg.train.max_steps
            if step % cfg.train.log_every == 0 or final:
                s = window.reduce(device)
                now = time.perf_counter()
                elapsed = now - last_log
                tokens = sum(s[f"tokens/{t}"] for t in LM_TASKS)
                metrics = {f"loss/{t}": s[f"loss_sum/{t}"] / s[f"tokens/{t}"] for t in LOGGED if s[f"tokens/{t}"] > 0}
                metrics.update({  # "loss": the answer-token cross-entropy of the language tasks
                    "loss": sum(s[f"loss_sum/{t}"] for t in LM_TASKS) / max(tokens, 1),
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": s["samples"] / elapsed,
                    "answer_tokens_per_s": tokens / elapsed,
                    "data_wait_fraction": s["wait_s"] / max(s["step_s"], 1e-9),
                    "tokens_per_s": s["seq_tokens"] / elapsed,  # prompt + answer tokens, padding excluded
                    # per device, the FLOP count of `cxrfm bench train` at each batch's trimmed length, over wall time
                    "tflops_per_device": s["flops"] / elapsed / world / 1e12,
                })
                if peak:
                    metrics["mfu"] = metrics["tflops_per_device"] / peak
                if device.type == "cuda":
                    metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                for k in window.KEYS:
                    if k.startswith("skipped/") or k in ("samples", "truncated"):
                        totals[k] += s[k]
                metrics.update({f"total_{k}": v for k, v in totals.items() if k.startswith("skipped/") or k == "truncated"})
                if rank == 0:
                    logger.log(metrics, step)
                    if queue is not None:
                        queue.put_nowait({"step": step, **metrics})
                window, last_log = _Window(), now
            if step % cfg.train.checkpoint_every == 0 or final:
                with tempfile.TemporaryDirectory() as tmp:
                    engine.save_checkpoint(tmp, tag=f"{TAG_PREFIX}{step}", client_state={"step": step})
                    if rank == 0:  # every checkpoint carries the resolved config it was trained with
                        (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(cfg.dump(), sort_keys=False))
                    ray.train.report({"step": step, "world_size": world, "start_step": start_step,
                                      **{f"total_{k}": v for k, v in totals.items()}},
                                     checkpoint=Checkpoint.from_directory(tmp))
            if final:
                break
            t_wait = time.perf_counter()  # checkpoint and logging time is not data wait
    _export(engine, cfg, tokenizer, out / "export", rank)
