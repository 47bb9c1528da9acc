"""`cxrfm bench data`: samples/s delivered to a training step and the fraction of wall time the step waits
for data, for the Ray Data pipeline training uses (one task per shard reads it checked and decodes it ->
Ray Train's streaming split -> the training loop's iter_batches) and for `read_webdataset` -> the same
mapper, against a plain `webdataset.WebDataset` + torch `DataLoader` with the same number of CPU workers and
the same decoding (cxrfm.data.pipeline's mapper), all in one run, from local disk and (with --store) from an
object store. `ray-in-process` iterates training's dataset in the step's own process instead (Ray Data's
executor then shares that process with the step), to show what consuming it that way costs.

The step is the tiny model's real forward + backward + AdamW on one thread (a Ray Train worker's share of a
2-core machine), or nothing (`--step none`: the loaders' ceiling). Each loader runs warm-up steps first (Ray
start, worker start, tokenizer load are not counted) and crosses epochs the way training does: a new pass over
the dataset when one ends. Besides samples/s and wait it reports where the cores went: CPU ms per sample of
the step's process and of the loader's other processes (DataLoader workers; Ray's daemons, tasks, actors).
Other work on the machine moves the step's time, so `--repeat N` interleaves the loaders N times and the
table shows medians.

Presets: `tiny` (jobs/tiny.yaml: 128 px stored, 64 px decoded, ~30% of studies with a lateral, ~30% with a
prior) and `heavy` (448 px stored and decoded, every study with frontal, lateral and prior).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import queue
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from cxrfm.config import load_config

LOADERS = ("ray", "ray-in-process", "ray-read-webdataset", "webdataset")
PRESETS = {
    "tiny": {"overrides": [], "lateral": 0.3, "prior": 0.3},
    "heavy": {"overrides": ["data.image_size=448", "model.vision.image_size=448", "model.vision.patch_size=32"],
              "lateral": 1.0, "prior": 1.0},
}


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--shards", help="a built shard directory or URI (default: phantoms built for the preset in a temp dir)")
    p.add_argument("--store", help="also measure from this object-store URI (s3://bucket/prefix; credentials from "
                   "AWS_* env vars); the shards are uploaded there first")
    p.add_argument("--studies", type=int, default=240, help="phantom studies to build (default 240)")
    p.add_argument("--workers", type=int, default=2, help="CPU workers of every loader (Ray CPUs / DataLoader workers)")
    p.add_argument("--batch", type=int, default=8, help="rows per training step (jobs/tiny.yaml micro_batch_size)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per loader")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--step", choices=["model", "none"], default="model", help="what consumes a batch")
    p.add_argument("--prefetch", type=int, default=2, help="DataLoader prefetch_factor (Ray Data: training's "
                   "data.prefetch_batches, vary it with --set data.prefetch_batches=N)")
    p.add_argument("--repeat", type=int, default=1, help="run the loaders this many times, interleaved (A B C A B C), "
                   "and report each loader's median: the machine's load drifts less between neighbours")
    p.add_argument("--stats", action="store_true", help="print Ray Data's per-operator stats after each Ray loader")
    p.add_argument("--epochs", type=int, default=0, help="epochs per Ray Data execution (0: all the timed steps "
                   "need, as cxrfm train does; 1: a new execution every epoch)")
    p.add_argument("--loaders", default="ray,ray-read-webdataset,webdataset", help=f"which loaders to run, of "
                   f"{', '.join(LOADERS)} (ray-in-process: training's pipeline iterated in the step's process)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def build_phantom_shards(cfg, out: Path, studies: int, lateral: float, prior: float) -> None:
    """Phantom studies with the preset's image size and views -> shards + manifest + tokenizer."""
    from cxrfm.data.build import study_texts
    from cxrfm.data.shards import write_shards
    from cxrfm.data.synthetic import generate_studies
    from cxrfm.text.tokenizer import train_tokenizer

    pairs = list(generate_studies(studies, cfg.data.image_size, cfg.data.seed, prior_fraction=prior,
                                  lateral_fraction=lateral))
    write_shards(pairs, out, cfg.data.shard_size)
    texts = [t for s, _ in pairs if s.split == "train" for t in study_texts(s)]
    train_tokenizer(texts, vocab_size=cfg.data.vocab_size).save_pretrained(str(out / "tokenizer"))


def _epochs(make: Callable[[], Iterator]) -> Iterator:
    while True:  # training starts a new pass when one ends
        yield from make()


def _cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) so far of this process (pid 0 here: the step and the batch iterator's
    threads) and of each of its descendants: the DataLoader's workers, or Ray's daemons, workers and actors."""
    import psutil

    me = psutil.Process()
    seen = {}
    for child in me.children(recursive=True):
        try:
            t = child.cpu_times()
            seen[child.pid] = t.user + t.system
        except psutil.Error:  # exited meanwhile
            continue
    t = me.cpu_times()
    seen[0] = t.user + t.system
    return seen


def _cpu_used(before: dict[int, float], after: dict[int, float]) -> tuple[float, float]:
    """(this process, its descendants) between two _cpu_seconds(); a process that started in between counts
    from zero, one that exited in between is lost (so the loader's figure is a lower bound)."""
    others = sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items() if pid != 0)
    return after[0] - before[0], others


def measure(batches: Iterator, step: Callable, warmup: int, steps: int, batch: int) -> dict:
    for _ in range(warmup):
        step(next(batches))
    waits = []
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        b = next(batches)
        waits.append(time.perf_counter() - t)
        step(b)
    wall = time.perf_counter() - start
    own_cpu, loader_cpu = _cpu_used(cpu_before, _cpu_seconds())
    wait = sum(waits)
    samples = steps * batch
    return {"samples_per_s": samples / wall, "data_wait": wait / wall, "step_ms": 1000 * (wall - wait) / steps,
            "worst_wait_s": max(waits), "wait_in_worst_3": sum(sorted(waits)[-3:]) / max(wait, 1e-9),
            # where the cores went: the step's process, and the loader's other processes, per sample delivered
            "own_cpu_ms_per_sample": 1000 * own_cpu / samples, "loader_cpu_ms_per_sample": 1000 * loader_cpu / samples}


def model_step(cfg, vocab: int) -> Callable:
    import torch

    from cxrfm.model.build import build_model

    torch.set_num_threads(1)  # one Ray Train worker's share (train.cpus_per_worker=0.5 -> 1 thread)
    model = build_model(cfg, vocab, device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(b: dict) -> None:
        out = model(b["input_ids"], b["attention_mask"], b["images"], b["image_present"], labels=b["labels"],
                    task=b["task"], findings=b.get("findings"))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ray_batches(cfg, args, vision: int, read_webdataset: bool, in_process: bool = False) -> tuple[Iterator, object]:
    """Batches as a Ray Train worker gets them: the ingest DataConfig's streaming split (the executor runs in
    Ray's SplitCoordinator actor, not in the step's process) and the loop's iter_batches + torch.as_tensor.
    `in_process`: iterate the dataset itself instead, so Ray Data's executor runs in the step's process (not
    what training does; shows what that costs). Returns the batches and the iterator (its stats())."""
    import ray.data
    import torch

    from cxrfm.data import store
    from cxrfm.data.pipeline import build_dataset, map_studies, shard_entries
    from cxrfm.data.samples import SampleSpec
    from cxrfm.train.loop import batch_iterator
    from cxrfm.train.trainer import data_config

    entries, _ = shard_entries(cfg, "train")
    if read_webdataset:  # Ray's own reader -> the same map_batches (no checksums, no missing-shard handling)
        spec = SampleSpec(cfg.data.max_seq_len, cfg.model.vision.image_size, vision, True, cfg.data.max_turns)
        ds = ray.data.read_webdataset([e["path"] for e in entries], decoder=None, num_cpus=0.25).map_batches(
            map_studies, fn_kwargs={"tokenizer_dir": store.join(cfg.data.shards, "tokenizer"), "spec": spec,
                                    "weights": tuple(sorted(cfg.data.tasks.items())), "seed": cfg.data.seed},
            batch_size=32, batch_format="numpy", num_cpus=0.25)
    else:
        needed = (args.warmup + args.steps) * args.batch / max(1, sum(e["samples"] for e in entries))
        ds, _ = build_dataset(cfg, "train", vision, augment=True, epochs=args.epochs or max(1, math.ceil(needed)))
    if in_process:
        shard = ds.iterator()
    else:
        [split] = data_config(cfg).configure({"train": ds}, world_size=1, worker_handles=None, worker_node_ids=None)
        shard = split["train"]

    def one_pass() -> Iterator[dict]:
        for raw in batch_iterator(shard, cfg):
            yield {k: torch.as_tensor(v) for k, v in raw.items()}

    return _epochs(one_pass), shard


class _Decode:
    """DataLoader-side: one webdataset sample -> one example, through the pipeline's own mapper."""

    def __init__(self, tokenizer_dir: str, spec, weights: tuple, seed: int):
        self.args = (tokenizer_dir, spec, weights, seed)

    def __call__(self, sample: dict) -> dict:
        from cxrfm.data.pipeline import MEMBERS, map_studies

        batch = {"__key__": np.array([sample["__key__"]])}
        batch.update({m: np.array([sample.get(m, b"")], dtype=object) for m in MEMBERS})
        out = map_studies(batch, *self.args)
        return {k: v[0] for k, v in out.items()}


def _open_with_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_) -> object:
    import fsspec

    return fsspec.open(url, mode).open()


def _register_store_schemes(_worker: int | None = None) -> None:
    """webdataset opens URLs through its own dispatch table: object stores go through fsspec (also in every
    DataLoader worker, which may not inherit the table)."""
    import importlib

    for scheme in ("s3", "gs", "gcs", "az", "abfs"):
        importlib.import_module("webdataset.gopen").gopen_schemes.setdefault(scheme, _open_with_fsspec)


def webdataset_batches(cfg, args, vision: int) -> Iterator:
    import torch
    import webdataset as wds

    from cxrfm.data import store
    from cxrfm.data.pipeline import shard_entries
    from cxrfm.data.samples import SampleSpec

    entries, _ = shard_entries(cfg, "train")
    _register_store_schemes()
    spec = SampleSpec(cfg.data.max_seq_len, cfg.model.vision.image_size, vision, True, cfg.data.max_turns)
    decode = _Decode(store.join(cfg.data.shards, "tokenizer"), spec, tuple(sorted(cfg.data.tasks.items())), cfg.data.seed)
    ds = wds.WebDataset([e["path"] for e in entries], shardshuffle=False, empty_check=False).map(decode)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, num_workers=args.workers, drop_last=True,
                                         persistent_workers=args.workers > 0, worker_init_fn=_register_store_schemes,
                                         prefetch_factor=args.prefetch if args.workers > 0 else None)
    return _epochs(lambda: iter(loader))


def _measure_loader(cfg_tree: dict, args: argparse.Namespace, loader: str, results) -> None:
    """One loader, measured in a fresh process: no thread, actor or cache left by the loader before it can
    slow this one's step (in one process each later loader's step got slower)."""
    import ray
    import ray.data

    from cxrfm.config import config_from_dict
    from cxrfm.data import store
    from cxrfm.text.tokenizer import load_tokenizer

    cfg = config_from_dict(cfg_tree)
    vision = cfg.model.projector.num_tokens
    tok = load_tokenizer(store.join(cfg.data.shards, "tokenizer"))
    step = model_step(cfg, len(tok)) if args.step == "model" else (lambda b: None)
    if loader.startswith("ray"):
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # a table, not per-second progress lines
        batches, shard = ray_batches(cfg, args, vision, read_webdataset=loader == "ray-read-webdataset",
                                     in_process=loader == "ray-in-process")
        try:
            results.put(measure(batches, step, args.warmup, args.steps, args.batch))
            if args.stats:
                print(f"--- Ray Data stats ({loader}) ---\n{shard.stats()}", flush=True)
        finally:
            batches.close()  # ends the streaming execution before Ray goes
            ray.shutdown()
    else:
        results.put(measure(webdataset_batches(cfg, args, vision), step, args.warmup, args.steps, args.batch))


def run(cfg, args, label: str) -> list[dict]:
    import multiprocessing

    loaders = args.loaders.split(",")
    for loader in loaders:
        if loader not in LOADERS:
            raise SystemExit(f"unknown loader {loader!r}; choose from {', '.join(LOADERS)}")
    rows = []
    ctx = multiprocessing.get_context("spawn")
    for rep in range(args.repeat):
        for loader in loaders:
            results = ctx.Queue()
            proc = ctx.Process(target=_measure_loader, args=(cfg.dump(), args, loader, results))
            proc.start()
            proc.join()
            try:
                result = results.get(timeout=5)
            except queue.Empty:
                raise SystemExit(f"bench data: the {loader} loader failed (exit {proc.exitcode}); its error is "
                                 "above") from None
            if proc.exitcode != 0:  # measured, then Ray's teardown failed (a Ray Data thread outlived ray.shutdown)
                print(f"warning: the {loader} loader's process exited {proc.exitcode} after its measurement; "
                      "its error is above", flush=True)
            rows.append({"source": label, "loader": loader, "repeat": rep, "load_avg_1m": os.getloadavg()[0], **result})
            print(f"{label:<8} {loader:<22} {result['samples_per_s']:8.1f} samples/s  data wait "
                  f"{result['data_wait']:6.1%}  step {result['step_ms']:6.0f} ms  worst wait {result['worst_wait_s']:.2f} s "
                  f"({result['wait_in_worst_3']:.0%} of the wait in 3 batches)  CPU ms/sample: own "
                  f"{result['own_cpu_ms_per_sample']:.0f}, loader {result['loader_cpu_ms_per_sample']:.0f}  "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """One line per source and loader: the median over repeats (each loader's own step time shown, since the
    step shares the cores with the loader's workers)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["loader"]), []).append(r)
    med = {k: {m: float(np.median([r[m] for r in v])) for m in ("samples_per_s", "data_wait", "step_ms",
                                                                "own_cpu_ms_per_sample", "loader_cpu_ms_per_sample")}
           for k, v in groups.items()}
    lines = ["| source | loader | runs | samples/s (median) | vs webdataset | data wait | step ms | "
             "loader CPU ms/sample |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (source, loader), m in med.items():
        base = med.get((source, "webdataset"))
        ratio = f"{m['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "-"
        lines.append(f"| {source} | {loader} | {len(groups[source, loader])} | {m['samples_per_s']:.1f} | {ratio} | "
                     f"{m['data_wait']:.1%} | {m['step_ms']:.0f} | {m['loader_cpu_ms_per_sample']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = add_args(argparse.ArgumentParser(prog="cxrfm bench data", description=__doc__.split("\n\n")[0])).parse_args(argv)
    preset = PRESETS[args.preset]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="cxrfm-bench-data-") as tmp:
        cfg = load_config(None, preset["overrides"] + args.overrides + [f"train.micro_batch_size={args.batch}"])
        if args.shards:
            cfg.data.shards = args.shards
        else:
            cfg.data.shards = str(Path(tmp) / "shards")
            build_phantom_shards(cfg, Path(cfg.data.shards), args.studies, preset["lateral"], preset["prior"])
        print(f"bench data: preset {args.preset}, {args.workers} CPU workers, batch {args.batch}, step {args.step}, "
              f"{os.cpu_count()} CPUs here", flush=True)
        rows = run(cfg, args, "local" if not args.shards or "://" not in args.shards else "store")
        if args.store:
            from cxrfm.data import store

            store.check_access(args.store)
            if not args.shards:
                store.upload_dir(Path(cfg.data.shards), args.store, last=("manifest.json",))
            cfg.data.shards = args.store
            rows += run(cfg, args, "store")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "workers": args.workers, "batch": args.batch,
                                               "step": args.step, "rows": rows}, indent=1))
    return 0
