"""`cxrfm eval CKPT --split test`: every task of an exported model against the shards' ground truth.

report: NLG metrics + clinical efficacy (our CheXpert-style labeler); vqa: exact match overall, per
question type and closed/open; grounding: mean IoU and accuracy at IoU >= 0.5, per finding. Results
are printed as a table and logged to MLflow, as a child run of the training run when the export sits
in a run directory (`<run>/export` next to `<run>/run.json`), else as a run of its own.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from cxrfm.data.samples import report_prompt
from cxrfm.data.schema import Study
from cxrfm.data.sources.boxes import iou
from cxrfm.eval.baselines import fit_baselines, pick_random_images
from cxrfm.eval.clinical import clinical_efficacy
from cxrfm.eval.ground_truth import iter_split, normalize_answer
from cxrfm.eval.image_classifier import load_classifier, score_images, targets
from cxrfm.eval.nlg import nlg_metrics
from cxrfm.model.generate import GenerationOptions, Predictor

EVAL_TASKS = ("report", "vqa", "grounding", "generate")


def grounding_iou(pred: list, truth: list) -> float:
    """Mean over true boxes of the best IoU with any predicted box (0 when nothing was predicted)."""
    return float(np.mean([max((iou(p, t) for p in pred), default=0.0) for t in truth]))


def _batched(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def evaluate(export_dir: str | Path, shards: str | Path, split: str = "test", tasks=EVAL_TASKS,
             limit: int | None = None, batch_size: int = 16, device: str = "auto",
             options: GenerationOptions | None = None, classifier: str | Path | None = None,
             image_steps: int | None = None, baselines: bool = True, predictor: Predictor | None = None) -> dict[str, float]:
    """Model metrics under `<task>/...`; with `baselines`, the same metrics of every baseline (fitted on the
    train split of the same shards) under `baseline/<name>/<task>/...`. predictor: the export already loaded
    (with its attention backend / dtype); else it is loaded here on `device`."""
    predictor = predictor or Predictor(export_dir, device=device)
    options = options or GenerationOptions(max_new_tokens=160)
    studies = list(iter_split(shards, split, limit))
    if not studies:
        raise ValueError(f"no {split!r} studies in {shards}")
    metrics: dict[str, float] = {"studies": len(studies)}
    base = fit_baselines(list(iter_split(shards, "train"))) if baselines else None

    if "report" in tasks:
        reqs = [(s, ims) for s, ims in studies if s.report]
        generated = []
        for chunk in _batched(reqs, batch_size):
            generated += [a.text for a in predictor.generate_batch(
                [{"task": "report", "images": ims, "text": _report_prompt(s)} for s, ims in chunk], options)]
        refs = [s.report.lower() for s, _ in reqs]
        candidates = {"report": generated}
        if base is not None:
            candidates["baseline/most_frequent/report"] = [base.most_frequent_report.lower()] * len(reqs)
            candidates["baseline/nn_retrieval/report"] = [
                (base.retrieve_report(ims["frontal"]) if "frontal" in ims else base.most_frequent_report).lower()
                for _, ims in reqs]
        for prefix, texts in candidates.items():
            metrics.update({f"{prefix}/{k}": v for k, v in nlg_metrics(texts, refs).items() if isinstance(v, (int, float))})
            metrics.update({f"{prefix}/{k}": v for k, v in clinical_efficacy(texts, refs).items()})

    if "vqa" in tasks:
        pairs = [(s, ims, qa) for s, ims in studies for qa in s.vqa]
        hits: dict[str, list[int]] = defaultdict(list)
        short = GenerationOptions(max_new_tokens=16, num_beams=options.num_beams)
        for chunk in _batched(pairs, batch_size):
            answers = predictor.generate_batch([{"task": "vqa", "images": ims, "text": qa.question} for _, ims, qa in chunk], short)
            for (_, _, qa), a in zip(chunk, answers):
                truth = normalize_answer(qa.answer)
                runs = [("", a.text)]
                if base is not None:
                    runs += [("baseline/majority/", base.global_answer),
                             ("baseline/question_prior/", base.answer(qa.question))]
                for prefix, text in runs:
                    hit = int(normalize_answer(text) == truth)
                    for key in ("all", f"type/{qa.qtype}", "closed" if qa.closed else "open"):
                        hits[f"{prefix}vqa/exact_match/{key}"].append(hit)
        metrics.update({k: float(np.mean(v)) for k, v in hits.items()})

    if "grounding" in tasks:
        items = [(s, ims, gp) for s, ims in studies for gp in s.grounding if gp.image_role in ims]
        ious: dict[str, list[float]] = defaultdict(list)
        malformed = 0
        short = GenerationOptions(max_new_tokens=4 * 4 + 1)
        for chunk in _batched(items, batch_size):
            answers = predictor.generate_batch([{"task": "grounding", "images": ims, "text": gp.phrase} for _, ims, gp in chunk], short)
            for (s, ims, gp), a in zip(chunk, answers):
                malformed += bool(a.problems)
                truth = [(b.x1, b.y1, b.x2, b.y2) for b in gp.boxes]
                runs = [("", a.boxes)]
                if base is not None:
                    ref = s.image(gp.image_role)
                    runs.append(("baseline/prior_box/", [base.prior_box(gp.label, ref.width, ref.height)]))
                for prefix, boxes in runs:
                    iou = grounding_iou(boxes, truth)
                    ious[(prefix, "all")].append(iou)
                    ious[(prefix, gp.label)].append(iou)
        for (prefix, k), v in ious.items():
            metrics[f"{prefix}grounding/miou/{k}"] = float(np.mean(v))
            metrics[f"{prefix}grounding/acc@0.5/{k}"] = float(np.mean([x >= 0.5 for x in v]))
        metrics["grounding/malformed_answers"] = malformed

    if "generate" in tasks and predictor.model.diffusion is not None:
        if classifier is None:
            raise ValueError("the generate task is scored by a finding classifier: pass --classifier PATH "
                             "(train one with: cxrfm classifier train SHARDS --out PATH) or drop generate from --tasks")
        clf = load_classifier(classifier)
        items = [(s, ims) for s, ims in studies if s.report and "frontal" in ims]
        generated = np.concatenate([predictor.generate_images([s.report for s, _ in chunk], seed=i, steps=image_steps)
                                    for i, chunk in enumerate(_batched(items, batch_size))])  # (n, S, S)
        real = np.stack([np.asarray(_resize(ims["frontal"], generated.shape[-1])) for _, ims in items])
        prompt_labels = [s.labels for s, _ in items]
        metrics.update(score_images(clf, generated, prompt_labels, real))
        if base is not None:
            metrics.update(_image_baselines(clf, real, prompt_labels))
    return metrics


def _image_baselines(clf, real: np.ndarray, prompt_labels: list[dict]) -> dict[str, float]:
    """Real test images in place of generated ones: random (chance) and random with the prompt's labels."""
    vectors = np.stack([targets(lab) for lab in prompt_labels])
    random_idx, same_idx = pick_random_images(vectors)
    out = {f"baseline/random_image/{k}": v for k, v in score_images(clf, real[random_idx], prompt_labels, real).items()}
    keep = [i for i, j in enumerate(same_idx) if j is not None]
    out["baseline/random_same_label/generate/prompts_without_a_match"] = len(real) - len(keep)
    if len(keep) >= 2:
        scores = score_images(clf, real[[same_idx[i] for i in keep]], [prompt_labels[i] for i in keep], real)
        out.update({f"baseline/random_same_label/{k}": v for k, v in scores.items()})
    return out


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))


def _report_prompt(study: Study) -> str:
    return report_prompt(study.indication, study.image("prior") is not None)


def format_table(metrics: dict[str, float]) -> str:
    rows = [f"{'metric':<44} {'value':>10}"]
    rows += [f"{k:<44} {v:>10.4f}" for k, v in sorted(metrics.items())]
    return "\n".join(rows)


# Headline metrics and the baselines that answer the same question without a model.
HEADLINE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("report CE micro-F1-14", "report/ce14/micro_f1", ("most_frequent", "nn_retrieval")),
    ("report CE micro-F1-5", "report/ce5/micro_f1", ("most_frequent", "nn_retrieval")),
    ("report CE macro-F1-14", "report/ce14/macro_f1", ("most_frequent", "nn_retrieval")),
    ("report BLEU-4", "report/bleu4", ("most_frequent", "nn_retrieval")),
    ("report ROUGE-L", "report/rougeL", ("most_frequent", "nn_retrieval")),
    ("VQA exact match", "vqa/exact_match/all", ("majority", "question_prior")),
    ("VQA closed", "vqa/exact_match/closed", ("majority", "question_prior")),
    ("VQA open", "vqa/exact_match/open", ("majority", "question_prior")),
    ("grounding acc@0.5", "grounding/acc@0.5/all", ("prior_box",)),
    ("grounding mIoU", "grounding/miou/all", ("prior_box",)),
    ("generate label agreement", "generate/label_agreement", ("random_image", "random_same_label")),
    ("generate AUROC (macro)", "generate/auroc/macro", ("random_image", "random_same_label")),
)
BASELINE_NAMES = ("most_frequent", "nn_retrieval", "majority", "question_prior", "prior_box", "random_image",
                  "random_same_label")
# Shown for scale, not to be beaten: real test images with the prompt's labels are what a perfect
# generator would score.
CEILINGS = ("random_same_label",)


def beats_baselines(metrics: dict[str, float]) -> dict[str, bool]:
    """{headline metric: model strictly above every baseline scored for it} (metrics present only; the
    ceilings are not baselines)."""
    out = {}
    for title, key, names in HEADLINE:
        scored = [metrics[f"baseline/{n}/{key}"] for n in names if f"baseline/{n}/{key}" in metrics and n not in CEILINGS]
        if key in metrics and scored:
            out[title] = metrics[key] > max(scored)
    return out


def format_comparison(metrics: dict[str, float]) -> str:
    """Model vs every baseline on the headline metrics, one row per metric ('-': not applicable; a name
    in [brackets] is a ceiling, shown for scale and left out of the verdict)."""
    heads = [f"[{n}]" if n in CEILINGS else n for n in BASELINE_NAMES]
    rows = [f"{'metric':<28} {'model':>8} " + " ".join(f"{n:>19}" for n in heads) + "  beats all"]
    wins = beats_baselines(metrics)
    for title, key, names in HEADLINE:
        if key not in metrics:
            continue
        cells = [f"{metrics[f'baseline/{n}/{key}']:>19.4f}" if n in names and f"baseline/{n}/{key}" in metrics
                 else f"{'-':>19}" for n in BASELINE_NAMES]
        verdict = {True: "yes", False: "NO"}.get(wins.get(title), "-")
        rows.append(f"{title:<28} {metrics[key]:>8.4f} " + " ".join(cells) + f"  {verdict}")
    return "\n".join(rows)


def log_to_mlflow(metrics: dict[str, float], export_dir: str | Path, split: str) -> str:
    """Child run of the training run when we can find it; returns the run id."""
    import mlflow  # here, not at the top: `cxrfm eval --no-mlflow` and the scorers' importers never load it

    export_dir = Path(export_dir).resolve()
    state_file = export_dir.parent / "run.json"
    clean = {re.sub(r"[^A-Za-z0-9_\-./ ]", "_", k): v for k, v in metrics.items()}
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        mlflow.set_tracking_uri(state["tracking_uri"])
        with mlflow.start_run(run_id=state["mlflow_run_id"]):
            with mlflow.start_run(run_name=f"eval-{split}", nested=True) as child:
                mlflow.log_metrics(clean)
                return child.info.run_id
    mlflow.set_experiment("cxrfm-eval")
    with mlflow.start_run(run_name=f"eval-{split}") as run:
        mlflow.log_param("export_dir", str(export_dir))
        mlflow.log_metrics(clean)
        return run.info.run_id
