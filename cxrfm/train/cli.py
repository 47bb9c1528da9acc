"""`cxrfm train [SPEC] [--set k=v] [--resume RUN]`: the training command (the run itself is trainer.py)."""

from __future__ import annotations

import argparse

from cxrfm.config import add_config_args, load_config, with_overrides
from cxrfm.train.trainer import load_run_config, summary, train


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.resume:
        saved = load_run_config(cfg.train.output_dir, args.resume)
        # The run's saved config; command-line overrides (e.g. a higher max_steps) apply on top.
        cfg = with_overrides(saved.dump(), args.overrides)
    result = train(cfg, resume=args.resume, show_progress=not args.no_progress)
    print(summary(result))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train on Ray Train + DeepSpeed (default: the tiny CPU job)")
    add_config_args(p)
    p.add_argument("--resume", metavar="RUN", help="continue a finished or stopped run from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar (logs only)")
    p.set_defaults(func=cmd_train)
    return p
