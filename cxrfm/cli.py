"""`cxrfm` command line. Heavy imports happen inside each command so `--help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from cxrfm.config import ConfigError, load_config, with_overrides
from cxrfm.data.sources import SOURCES


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="job YAML (default: jobs/tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")


def cmd_train(args: argparse.Namespace) -> int:
    from cxrfm.train.trainer import load_run_config, summary, train

    cfg = load_config(args.config, args.overrides)
    if args.resume:
        saved = load_run_config(cfg.train.output_dir, args.resume)
        # The run's saved config; command-line overrides (e.g. a higher max_steps) apply on top.
        cfg = with_overrides(saved.dump(), args.overrides)
    result = train(cfg, resume=args.resume, show_progress=not args.no_progress)
    print(summary(result))
    return 0


def cmd_data_build(args: argparse.Namespace) -> int:
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
    from cxrfm.data import store

    report = json.loads(store.read_bytes(store.join(out, "build_report.json")))  # out: a directory or s3://...
    for reason, n in report["skipped"].items():
        print(f"skipped {n:>6} {reason}")
    print(f"{len(manifest['shards'])} shards + manifest.json + build_report.json + tokenizer/ in {out}")
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from cxrfm.data.shards import verify_shards

    report = verify_shards(args.dir)
    for p in report.problems:
        print(f"{p['shard']}\t{p['key']}\t{p['problem']}")
    print(f"{report.samples_ok} samples ok, {len(report.problems)} problem(s)")
    return 0 if report.ok else 1


def cmd_model_summary(args: argparse.Namespace) -> int:
    from cxrfm.model.summary import format_summary, summarize

    cfg = load_config(args.config, args.overrides)
    counts = summarize(cfg)
    print(json.dumps(counts) if args.json else format_summary(counts))
    return 0


def _predictor(args: argparse.Namespace):
    """The export loaded for this process's device; says on stderr what it runs (attention, device, dtype)."""
    from cxrfm.model.generate import Predictor

    predictor = Predictor(args.checkpoint, device=args.device, attention=args.attention, dtype=args.dtype)
    rt = predictor.runtime
    print(f"model: attention {rt.attention} ({rt.attention_reason}); {rt.device} {rt.dtype}", file=sys.stderr)
    return predictor


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    from cxrfm.attention import BACKENDS

    p.add_argument("--device", default="auto", help="auto (this machine's GPU if any, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights' dtype (auto: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--attention", choices=["auto", *BACKENDS],
                   help="attention backend (default: the export's model.attention where it can run here)")


def cmd_predict(args: argparse.Namespace) -> int:
    from cxrfm.model.generate import GenerationOptions, draw_boxes, load_image

    if not args.image:
        raise ConfigError("give at least one --image (the first is the frontal view, a second one the lateral)")
    images = {"frontal": load_image(args.image[0], "--image")}
    if len(args.image) > 1:
        images["lateral"] = load_image(args.image[1], "second --image (lateral)")
    if args.prior:
        images["prior"] = load_image(args.prior, "--prior")
    if args.task == "vqa" and not args.question:
        raise ConfigError("--task vqa needs --question")
    if args.task == "grounding" and not args.phrase:
        raise ConfigError("--task grounding needs --phrase")
    opts = GenerationOptions(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.sample,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    predictor = _predictor(args)
    if args.task == "report":
        answer = predictor.report(images, args.indication or "", opts)
    elif args.task == "vqa":
        answer = predictor.vqa(images, args.question, opts)
    else:
        answer = predictor.grounding(images, args.phrase, opts)
    print(answer.text)
    if args.task == "grounding":
        for box in answer.boxes:
            print("box x1={:.1f} y1={:.1f} x2={:.1f} y2={:.1f}".format(*box))
        for problem in answer.problems:
            print(f"warning: {problem}", file=sys.stderr)
        if args.draw:
            draw_boxes(images["frontal"], answer.boxes, args.draw)
            print(f"drew {len(answer.boxes)} box(es) on {args.draw}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json as _json
    from pathlib import Path

    from cxrfm.eval.evaluate import evaluate, format_comparison, format_table, log_to_mlflow

    export = Path(args.checkpoint)
    if not (export / "config.json").is_file():
        raise FileNotFoundError(f"{export} is not a cxrfm export (no config.json); pass <run>/export from cxrfm train")
    shards = args.shards or _json.loads((export / "config.json").read_text())["config"]["data"]["shards"]
    tasks = args.tasks.split(",")
    if args.classifier is None and "generate" in tasks:
        tasks.remove("generate")
        print("note: generate is not scored without --classifier (train one: cxrfm classifier train SHARDS --out clf.pt)")
    metrics = evaluate(export, shards, args.split, tasks, args.limit, args.batch_size, args.device,
                       classifier=args.classifier, image_steps=args.image_steps, baselines=not args.no_baselines,
                       predictor=_predictor(args))
    print(format_table(metrics))
    if not args.no_baselines:
        print(format_comparison(metrics))
    if args.json:
        Path(args.json).write_text(_json.dumps(metrics, indent=1, sort_keys=True))
    if not args.no_mlflow:
        print(f"logged to MLflow run {log_to_mlflow(metrics, export, args.split)}")
        from cxrfm.registry import attach_eval

        for name, version in attach_eval(export, metrics, args.split):  # registered from this export's run
            print(f"metrics attached to registered model {name} version {version}")
    return 0


def cmd_generate_image(args: argparse.Namespace) -> int:
    from PIL import Image

    predictor = _predictor(args)
    image = predictor.generate_image(args.text, seed=args.seed, steps=args.steps, guidance=args.guidance)
    Image.fromarray(image).save(args.out)
    print(f"wrote {args.out} ({image.shape[1]}x{image.shape[0]}, seed {args.seed})")
    return 0


def cmd_classifier_train(args: argparse.Namespace) -> int:
    from cxrfm.eval.image_classifier import train_classifier

    path = train_classifier(args.shards, args.out, epochs=args.epochs, image_size=args.image_size)
    print(f"wrote {path}; score generated images with: cxrfm eval EXPORT --classifier {path}")
    return 0


# Command groups that live in their own modules: "module:function(subparsers)".
COMMAND_GROUPS = ("cxrfm.jobs.cli:add_parser", "cxrfm.plan.cli:add_parser", "cxrfm.bench:add_bench_parser",
                  "cxrfm.serving.cli:add_serve_parser", "cxrfm.eval.labeler_score:add_labeler_parser",
                  "cxrfm.registry:add_models_parser")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrfm", description="Train and serve a multitask chest X-ray foundation model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train on Ray Train + DeepSpeed (default: the tiny CPU job)")
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN", help="continue a finished or stopped run from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar (logs only)")
    p.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="build and verify WebDataset shards").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("build", help="convert a source into shards + manifest + tokenizer")
    _add_config_args(p)
    p.add_argument("--source", choices=sorted(SOURCES), default=None, help="converter (default: data.source)")
    p.add_argument("--root", default=None, help="the downloaded dataset's folder (data.root); not for synthetic")
    p.add_argument("--workers", type=int, default=None, help="processes loading shards (data.num_workers)")
    p.add_argument("--out", default=None, help="output directory (default: data.shards)")
    p.set_defaults(func=cmd_data_build)
    p = data.add_parser("verify", help="decode every sample; report corrupt or missing ones by shard and key")
    p.add_argument("dir")
    p.set_defaults(func=cmd_data_verify)

    model = sub.add_parser("model", help="inspect a model config").add_subparsers(dest="model_cmd", required=True)
    p = model.add_parser("summary", help="parameters per component, built on the meta device")
    _add_config_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model_summary)

    p = sub.add_parser("predict", help="answer one study with an exported model (report, vqa, grounding)")
    p.add_argument("checkpoint", help="export directory written by cxrfm train (<run>/export)")
    p.add_argument("--task", choices=["report", "vqa", "grounding"], required=True)
    p.add_argument("--image", action="append", default=[], help="frontal image; a second --image is the lateral")
    p.add_argument("--prior", help="frontal image of the prior study")
    p.add_argument("--indication", help="report: the clinical indication")
    p.add_argument("--question", help="vqa: the question")
    p.add_argument("--phrase", help="grounding: the finding to locate")
    p.add_argument("--draw", metavar="OUT.png", help="grounding: draw the boxes onto the frontal image")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy / beam search")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    _add_runtime_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("generate-image", help="text-to-CXR with the diffusion decoder of an export")
    p.add_argument("checkpoint", help="export directory written by cxrfm train (<run>/export)")
    p.add_argument("text", help='report text, e.g. "Moderate right pleural effusion. Heart size normal."')
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="sampling steps (default: model.diffusion.sample_steps)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: model.diffusion.guidance_scale)")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_generate_image)

    p = sub.add_parser("eval", help="evaluate an export on a split: NLG + clinical, VQA, grounding metrics")
    p.add_argument("checkpoint", help="export directory written by cxrfm train (<run>/export)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--shards", help="shard directory (default: the one the model was trained on)")
    p.add_argument("--tasks", default="report,vqa,grounding,generate")
    p.add_argument("--classifier", help="finding classifier that scores generated images (cxrfm classifier train)")
    p.add_argument("--image-steps", type=int, help="diffusion sampling steps for the generate task")
    p.add_argument("--limit", type=int, help="evaluate the first N studies only")
    p.add_argument("--batch-size", type=int, default=16)
    _add_runtime_args(p)
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--no-baselines", action="store_true", help="skip the same-run baselines (faster)")
    p.add_argument("--json", help="also write every metric to this JSON file")
    p.set_defaults(func=cmd_eval)

    clf = sub.add_parser("classifier", help="the finding classifier that scores generated images")
    p = clf.add_subparsers(dest="classifier_cmd", required=True).add_parser("train", help="train it on a shard directory")
    p.add_argument("shards")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64,
                   help="side the classifier sees; use the diffusion decoder's image size to score its samples fairly")
    p.set_defaults(func=cmd_classifier_train)

    for entry in COMMAND_GROUPS:
        module, func = entry.split(":")
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cxrfm.data.shards import ShardError
    from cxrfm.model.generate import ImageError

    args = build_parser().parse_args(argv)
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
    except RuntimeError as e:
        from cxrfm.data.store import StoreError
        from cxrfm.train.trainer import RunStopped

        if not isinstance(e, (RunStopped, StoreError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, RunStopped) else 2


if __name__ == "__main__":
    sys.exit(main())
