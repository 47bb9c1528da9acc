"""`cxrfm plan SPEC --gpus N --gpu KIND`: the planner's command (see planner.py for what it estimates)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from cxrfm.config import ConfigError, load_config
from cxrfm.plan import planner
from cxrfm.plan.costs import GPUS, INTERCONNECTS
from cxrfm.plan.planner import format_plan, make_plan

def _tokens(text: str) -> float:
    """'2e10', '20B', '500M' -> tokens."""
    units = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens {text!r}: use a number like 2e10, 20B or 500M") from None


def run_plan(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.spec, args.set)
        # The GPU kind and node size default to the spec's job section (jobs/*.yaml state both).
        plan = make_plan(cfg, args.gpus, args.gpu or cfg.job.gpu_type or "h100-80gb",
                         args.gpus_per_node or cfg.job.gpus_per_node or None, args.tokens, args.utilisation,
                         args.images_per_sample, spec=str(args.spec), interconnect=args.interconnect)
    except ConfigError as err:
        print(f"cxrfm plan: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(plan), indent=2))
    else:
        print(format_plan(plan))
    return 0 if plan.recommendation.get("fits") else 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="ZeRO memory and time plan for a job spec on N GPUs",
                              description=planner.__doc__.split("\n\n")[0])
    p.add_argument("spec", nargs="?", default=None, help="job YAML (default jobs/tiny.yaml)")
    p.add_argument("--gpus", type=int, default=None, help="total GPUs (default: the spec's train.num_workers)")
    p.add_argument("--gpu", default=None, choices=sorted(GPUS),
                   help="GPU kind (default: the spec's job.gpu_type, else h100-80gb)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node (default: the spec's job.gpus_per_node, else 8)")
    p.add_argument("--tokens", type=_tokens, default=None,
                   help="token budget for the days column, e.g. 20B (default: train.max_steps x tokens per step)")
    p.add_argument("--utilisation", type=float, default=0.45,
                   help="share of peak FLOP/s the GPUs sustain on executed FLOPs (default 0.45)")
    p.add_argument("--images-per-sample", type=int, default=3, choices=(1, 2, 3),
                   help="images encoded per sample: frontal, lateral, prior (default 3, the worst case)")
    p.add_argument("--interconnect", default="rdma", choices=INTERCONNECTS,
                   help="fabric between nodes: rdma (a NIC per GPU: InfiniBand, RoCE, EFA) or tcp (NCCL sockets "
                        "over one shared Ethernet NIC per node); default rdma")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run_plan)
    return p
