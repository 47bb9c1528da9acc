"""`cxrfm bench NAME [flags]`: one subcommand per benchmark module, each owning its flags."""

from __future__ import annotations

import argparse
import importlib

# name -> (module, function taking argv) ; each module owns its flags
BENCHES = {
    "attention": ("cxrfm.bench.attention", "main", "attention kernels: ours vs SDPA / flash-attn / xformers"),
    "data": ("cxrfm.bench.data", "main", "data path: Ray Data vs webdataset + DataLoader, samples/s and data wait"),
    "diffusion": ("cxrfm.bench.diffusion", "main", "diffusion decoder step per attention head size: ms vs the default"),
    "loss": ("cxrfm.bench.loss", "main", "fused linear + cross-entropy vs unfused: peak memory and time"),
    "serve": ("cxrfm.bench.serve", "main", "Ray Serve: batched vs max_batch_size=1 latency/throughput, autoscaling"),
    "train": ("cxrfm.bench.train", "main", "training step per attention backend, fused kernels on/off: tokens/s, MFU"),
}


def _run(args: argparse.Namespace) -> int:
    # Imported by name when run: a benchmark loads what it measures (triton, Ray Serve, DeepSpeed).
    module, func, _ = BENCHES[args.bench]
    return getattr(importlib.import_module(module), func)(args.bench_args)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks that print a table against a named baseline")
    p.add_argument("bench", choices=sorted(BENCHES), help="; ".join(f"{k}: {v[2]}" for k, v in BENCHES.items()))
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="flags of that benchmark (see cxrfm bench NAME --help)")
    p.set_defaults(func=_run)
    return p
