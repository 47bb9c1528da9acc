"""`cxrfm data build|verify`: shards + manifest + build report + tokenizer from a source, and their check."""

from __future__ import annotations

import argparse
import json

from cxrfm.config import add_config_args, load_config
from cxrfm.data import store
from cxrfm.data.sources import SOURCES


def cmd_data_build(args: argparse.Namespace) -> int:
    # Imported here: the shard writer loads torch and webdataset, which the parser and other commands do not need.
    from cxrfm.data.build import build

    overrides = list(args.overrides)
    overrides += [f"data.source={args.source}"] if args.source else []
    overrides += [f"data.root={args.root}"] if args.root else []
    overrides += [f"data.num_workers={args.workers}"] if args.workers is not None else []
    data = load_config(args.config, overrides).data
    out = args.out or data.shards
    manifest = build(data, out)
    for split, info in manifest["splits"].items():
        print(f"{split:<6} {info['studies']:>6} studies {info['patients']:>6} patients  tasks {info['tasks']}")
    report = json.loads(store.read_bytes(store.join(out, "build_report.json")))  # out: a directory or s3://...
    for reason, n in report["skipped"].items():
        print(f"skipped {n:>6} {reason}")
    print(f"{len(manifest['shards'])} shards + manifest.json + build_report.json + tokenizer/ in {out}")
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    # Imported here: loads torch and webdataset (see cmd_data_build).
    from cxrfm.data.shards import verify_shards

    report = verify_shards(args.dir)
    for p in report.problems:
        print(f"{p['shard']}\t{p['key']}\t{p['problem']}")
    print(f"{report.samples_ok} samples ok, {len(report.problems)} problem(s)")
    return 0 if report.ok else 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    data = subparsers.add_parser("data", help="build and verify WebDataset shards")
    sub = data.add_subparsers(dest="data_cmd", required=True)
    p = sub.add_parser("build", help="convert a source into shards + manifest + tokenizer")
    add_config_args(p)
    p.add_argument("--source", choices=sorted(SOURCES), default=None, help="converter (default: data.source)")
    p.add_argument("--root", default=None, help="the downloaded dataset's folder (data.root); not for synthetic")
    p.add_argument("--workers", type=int, default=None, help="processes loading shards (data.num_workers)")
    p.add_argument("--out", default=None, help="output directory (default: data.shards)")
    p.set_defaults(func=cmd_data_build)
    p = sub.add_parser("verify", help="decode every sample; report corrupt or missing ones by shard and key")
    p.add_argument("dir")
    p.set_defaults(func=cmd_data_verify)
    return data
