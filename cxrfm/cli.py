"""`cxrfm` command line. Each command group is a `cli.py` beside the code it drives, exposing
`add_parser(subparsers)`; this module lists them and turns the errors a user can fix into one line.

Building the parser loads no Ray, DeepSpeed, MLflow, transformers or Triton: each command imports its
engine when it runs, so `cxrfm --help` and light commands stay quick (tests/test_architecture.py checks).
"""

from __future__ import annotations

import argparse
import sys

from cxrfm import registry
from cxrfm.bench import cli as bench_cli
from cxrfm.config import ConfigError
from cxrfm.data import cli as data_cli
from cxrfm.data.store import StoreError
from cxrfm.eval import cli as eval_cli
from cxrfm.jobs import cli as jobs_cli
from cxrfm.model import cli as model_cli
from cxrfm.plan import cli as plan_cli
from cxrfm.serving import cli as serving_cli
from cxrfm.train import cli as train_cli
from cxrfm.train.trainer import RunStopped

# In the order `cxrfm --help` lists them.
COMMAND_GROUPS = (train_cli, data_cli, model_cli, eval_cli, plan_cli, jobs_cli, bench_cli, serving_cli, registry)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrfm", description="Train and serve a multitask chest X-ray foundation model.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and usage errors exit here, before the imports below
    # Imported here: these modules load webdataset and transformers, which parsing does not need.
    from cxrfm.data.shards import ShardError
    from cxrfm.model.generate import ImageError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ShardError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad arguments that only the model can judge (e.g. no diffusion decoder)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; checkpoints written so far are kept (resume with --resume RUN)", file=sys.stderr)
        return 130
    except (RunStopped, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, RunStopped) else 2


if __name__ == "__main__":
    sys.exit(main())
