"""`cxrfm eval`, `cxrfm probe`, `cxrfm classifier train`, `cxrfm labeler score`: the evaluation commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cxrfm.eval.labeler import label_report
from cxrfm.eval.labeler_score import TEXT_COLUMNS, ScoreInputError, format_score, read_labeled_reports, score
from cxrfm.model.cli import add_runtime_args, load_predictor
from cxrfm.registry import attach_eval


def cmd_eval(args: argparse.Namespace) -> int:
    # Imported here: evaluation loads transformers, scipy and the NLG scorers, which the parser does not need.
    from cxrfm.eval.evaluate import evaluate, format_comparison, format_table, log_to_mlflow

    export = Path(args.checkpoint)
    if not (export / "config.json").is_file():
        raise FileNotFoundError(f"{export} is not a cxrfm export (no config.json); pass <run>/export from cxrfm train")
    shards = args.shards or json.loads((export / "config.json").read_text())["config"]["data"]["shards"]
    tasks = args.tasks.split(",")
    if args.classifier is None and "generate" in tasks:
        tasks.remove("generate")
        print("note: generate is not scored without --classifier (train one: cxrfm classifier train SHARDS --out clf.pt)")
    metrics = evaluate(export, shards, args.split, tasks, args.limit, args.batch_size, args.device,
                       classifier=args.classifier, image_steps=args.image_steps, baselines=not args.no_baselines,
                       predictor=load_predictor(args))
    print(format_table(metrics))
    if not args.no_baselines:
        print(format_comparison(metrics))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1, sort_keys=True))
    if not args.no_mlflow:
        print(f"logged to MLflow run {log_to_mlflow(metrics, export, args.split)}")
        for name, version in attach_eval(export, metrics, args.split):  # registered from this export's run
            print(f"metrics attached to registered model {name} version {version}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from cxrfm.eval.probe import format_probe, probe  # loads the model stack (see cmd_eval)

    export = Path(args.checkpoint)
    shards = args.shards or json.loads((export / "config.json").read_text())["config"]["data"]["shards"]
    metrics = probe(load_predictor(args).model, shards, args.limit)
    print(format_probe(metrics))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return 0


def cmd_classifier_train(args: argparse.Namespace) -> int:
    from cxrfm.eval.image_classifier import train_classifier  # loads transformers and scipy (see cmd_eval)

    path = train_classifier(args.shards, args.out, epochs=args.epochs, image_size=args.image_size)
    print(f"wrote {path}; score generated images with: cxrfm eval EXPORT --classifier {path}")
    return 0


def cmd_labeler_score(args: argparse.Namespace) -> int:
    try:
        texts, truth = read_labeled_reports(args.csv, args.text_column)
    except ScoreInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = score([label_report(t) for t in texts], truth)
    print(format_score(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


def _add_labeler_parser(sub) -> None:
    labeler = sub.add_parser("labeler", help="the rule-based CheXpert-style report labeler")
    p = labeler.add_subparsers(dest="labeler_cmd", required=True).add_parser(
        "score", help="score the labeler against your labeled reports (CSV: report text + the 14 CheXpert columns)")
    p.add_argument("csv", help="one row per report: a report text column and the 14 CheXpert label columns "
                               "(1 / 0 / -1 / blank)")
    p.add_argument("--text-column", help=f"the report text column (default: the first of {list(TEXT_COLUMNS)})")
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.set_defaults(func=cmd_labeler_score)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate an export on a split: NLG + clinical, VQA, grounding metrics")
    p.add_argument("checkpoint", help="export directory written by cxrfm train (<run>/export)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--shards", help="shard directory (default: the one the model was trained on)")
    p.add_argument("--tasks", default="report,vqa,grounding,generate")
    p.add_argument("--classifier", help="finding classifier that scores generated images (cxrfm classifier train)")
    p.add_argument("--image-steps", type=int, help="diffusion sampling steps for the generate task")
    p.add_argument("--limit", type=int, help="evaluate the first N studies only")
    p.add_argument("--batch-size", type=int, default=16)
    add_runtime_args(p)
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--no-baselines", action="store_true", help="skip the same-run baselines (faster)")
    p.add_argument("--json", help="also write every metric to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("probe", help="linear probes: are view and laterality in the pixels, the vision "
                              "encoder's patches and the visual tokens the LM reads?")
    p.add_argument("checkpoint", help="export directory written by cxrfm train (<run>/export)")
    p.add_argument("--shards", help="shard directory (default: the one the model was trained on)")
    p.add_argument("--limit", type=int, help="the first N studies of each split only")
    add_runtime_args(p)
    p.add_argument("--json", help="also write the accuracies to this JSON file")
    p.set_defaults(func=cmd_probe)

    clf = subparsers.add_parser("classifier", help="the finding classifier that scores generated images")
    p = clf.add_subparsers(dest="classifier_cmd", required=True).add_parser("train", help="train it on a shard directory")
    p.add_argument("shards")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64,
                   help="side the classifier sees; use the diffusion decoder's image size to score its samples fairly")
    p.set_defaults(func=cmd_classifier_train)

    _add_labeler_parser(subparsers)
