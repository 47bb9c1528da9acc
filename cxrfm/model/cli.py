"""`cxrfm model summary`, `cxrfm predict`, `cxrfm generate-image`: the model's commands, and the runtime flags
(--device, --dtype, --attention) every command that loads an export shares (cxrfm eval too)."""

from __future__ import annotations

import argparse
import json
import sys

from cxrfm.attention import BACKENDS
from cxrfm.config import ConfigError, add_config_args, load_config


def load_predictor(args: argparse.Namespace):
    """The export loaded for this process's device; says on stderr what it runs (attention, device, dtype)."""
    # Imported here: the model loads transformers (and diffusers), seconds that the parser does not need.
    from cxrfm.model.generate import Predictor

    predictor = Predictor(args.checkpoint, device=args.device, attention=args.attention, dtype=args.dtype)
    rt = predictor.runtime
    print(f"model: attention {rt.attention} ({rt.attention_reason}); {rt.device} {rt.dtype}", file=sys.stderr)
    return predictor


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (this machine's GPU if any, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights' dtype (auto: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--attention", choices=["auto", *BACKENDS],
                   help="attention backend (default: the export's model.attention where it can run here)")


def cmd_model_summary(args: argparse.Namespace) -> int:
    from cxrfm.model.summary import format_summary, summarize  # builds the model: transformers (see load_predictor)

    cfg = load_config(args.config, args.overrides)
    counts = summarize(cfg)
    print(json.dumps(counts) if args.json else format_summary(counts))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cxrfm.model.generate import GenerationOptions, draw_boxes, load_image  # transformers (see load_predictor)

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
    predictor = load_predictor(args)
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


def cmd_generate_image(args: argparse.Namespace) -> int:
    from PIL import Image

    predictor = load_predictor(args)
    image = predictor.generate_image(args.text, seed=args.seed, steps=args.steps, guidance=args.guidance)
    Image.fromarray(image).save(args.out)
    print(f"wrote {args.out} ({image.shape[1]}x{image.shape[0]}, seed {args.seed})")
    return 0


def add_parser(subparsers) -> None:
    model = subparsers.add_parser("model", help="inspect a model config").add_subparsers(dest="model_cmd", required=True)
    p = model.add_parser("summary", help="parameters per component, built on the meta device")
    add_config_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model_summary)

    p = subparsers.add_parser("predict", help="answer one study with an exported model (report, vqa, grounding)")
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
    add_runtime_args(p)
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser("generate-image", help="text-to-CXR with the diffusion decoder of an export")
    p.add_argument("checkpoint", help="export directory written by cxrfm train (<run>/export)")
    p.add_argument("text", help='report text, e.g. "Moderate right pleural effusion. Heart size normal."')
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="sampling steps (default: model.diffusion.sample_steps)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: model.diffusion.guidance_scale)")
    add_runtime_args(p)
    p.set_defaults(func=cmd_generate_image)
