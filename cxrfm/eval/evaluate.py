"""`cxrfm eval CKPT --split test`: every task of an exported model against the shards' ground truth.

report: NLG metrics + clinical efficacy (our CheXpert-style labeler); vqa: exact match overall, per
question type and closed/open; grounding: mean IoU and accuracy at IoU >= 0.5, per finding. Results
are printed as a table and logged to MLflow, as a child run of the training run when the export sits
in a run directory (`<run>/export` next to `<run>/run.json`), else as a run of its own.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cxrfm.data.schema import Study
from cxrfm.data.shards import load_manifest
from cxrfm.model.generate import GenerationOptions, Predictor, load_image

EVAL_TASKS = ("report", "vqa", "grounding", "generate")


def iter_split(shards: str | Path, split: str, limit: int | None = None) -> Iterator[tuple[Study, dict[str, np.ndarray]]]:
    """Studies of one split straight from the tar shards (evaluation reads each study once, in order)."""
    shards = Path(shards)
    n = 0
    for sh in load_manifest(shards)["shards"]:
        if sh["split"] != split:
            continue
        members: dict[str, dict[str, bytes]] = defaultdict(dict)
        with tarfile.open(shards / sh["path"]) as tar:
            for m in tar:
                if m.isfile():
                    key, _, ext = m.name.partition(".")
                    members[key][ext] = tar.extractfile(m).read()
        for key in sorted(members):
            study = Study.model_validate_json(members[key]["json"])
            yield study, {ref.role: load_image(members[key][ref.key], f"{sh['path']}:{key}") for ref in study.images}
            n += 1
            if limit and n >= limit:
                return


def normalize_answer(text: str) -> str:
    return re.sub(r"[^a-z0-9. ]+", "", text.lower()).strip(" .")


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_iou(pred: list, truth: list) -> float:
    """Mean over true boxes of the best IoU with any predicted box (0 when nothing was predicted)."""
    return float(np.mean([max((box_iou(p, t) for p in pred), default=0.0) for t in truth]))


def _batched(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def evaluate(export_dir: str | Path, shards: str | Path, split: str = "test", tasks=EVAL_TASKS,
             limit: int | None = None, batch_size: int = 16, device: str = "cpu",
             options: GenerationOptions | None = None, classifier: str | Path | None = None,
             image_steps: int | None = None) -> dict[str, float]:
    predictor = Predictor(export_dir, device=device)
    options = options or GenerationOptions(max_new_tokens=160)
    studies = list(iter_split(shards, split, limit))
    if not studies:
        raise ValueError(f"no {split!r} studies in {shards}")
    metrics: dict[str, float] = {"studies": len(studies)}

    if "report" in tasks:
        from cxrfm.eval.clinical import clinical_efficacy
        from cxrfm.eval.nlg import nlg_metrics

        reqs = [(s, ims) for s, ims in studies if s.report]
        generated = []
        for chunk in _batched(reqs, batch_size):
            generated += [a.text for a in predictor.generate_batch(
                [{"task": "report", "images": ims, "text": _report_prompt(s)} for s, ims in chunk], options)]
        refs = [s.report.lower() for s, _ in reqs]
        metrics.update({f"report/{k}": v for k, v in nlg_metrics(generated, refs).items() if isinstance(v, (int, float))})
        metrics.update({f"report/{k}": v for k, v in clinical_efficacy(generated, refs).items()})

    if "vqa" in tasks:
        pairs = [(s, ims, qa) for s, ims in studies for qa in s.vqa]
        hits: dict[str, list[int]] = defaultdict(list)
        short = GenerationOptions(max_new_tokens=16, num_beams=options.num_beams)
        for chunk in _batched(pairs, batch_size):
            answers = predictor.generate_batch([{"task": "vqa", "images": ims, "text": qa.question} for _, ims, qa in chunk], short)
            for (_, _, qa), a in zip(chunk, answers):
                hit = int(normalize_answer(a.text) == normalize_answer(qa.answer))
                for key in ("all", f"type/{qa.qtype}", "closed" if qa.closed else "open"):
                    hits[key].append(hit)
        metrics.update({f"vqa/exact_match/{k}": float(np.mean(v)) for k, v in hits.items()})

    if "grounding" in tasks:
        items = [(s, ims, gp) for s, ims in studies for gp in s.grounding if gp.image_role in ims]
        ious: dict[str, list[float]] = defaultdict(list)
        malformed = 0
        short = GenerationOptions(max_new_tokens=4 * 4 + 1)
        for chunk in _batched(items, batch_size):
            answers = predictor.generate_batch([{"task": "grounding", "images": ims, "text": gp.phrase} for _, ims, gp in chunk], short)
            for (_, _, gp), a in zip(chunk, answers):
                malformed += bool(a.problems)
                iou = grounding_iou(a.boxes, [(b.x1, b.y1, b.x2, b.y2) for b in gp.boxes])
                ious["all"].append(iou)
                ious[gp.label].append(iou)
        for k, v in ious.items():
            metrics[f"grounding/miou/{k}"] = float(np.mean(v))
            metrics[f"grounding/acc@0.5/{k}"] = float(np.mean([x >= 0.5 for x in v]))
        metrics["grounding/malformed_answers"] = malformed

    if "generate" in tasks and predictor.model.diffusion is not None:
        if classifier is None:
            raise ValueError("the generate task is scored by a finding classifier: pass --classifier PATH "
                             "(train one with: cxrfm classifier train SHARDS --out PATH) or drop generate from --tasks")
        from cxrfm.eval.image_classifier import load_classifier, score_images

        clf = load_classifier(classifier)
        items = [(s, ims) for s, ims in studies if s.report and "frontal" in ims]
        generated = np.stack([predictor.generate_image(s.report, seed=i, steps=image_steps) for i, (s, _) in enumerate(items)])
        real = np.stack([np.asarray(_resize(ims["frontal"], generated.shape[-1])) for _, ims in items])
        metrics.update(score_images(clf, generated, [s.labels for s, _ in items], real))
    return metrics


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))


def _report_prompt(study: Study) -> str:
    from cxrfm.data.samples import report_prompt

    return report_prompt(study.indication, study.image("prior") is not None)


def format_table(metrics: dict[str, float]) -> str:
    rows = [f"{'metric':<44} {'value':>10}"]
    rows += [f"{k:<44} {v:>10.4f}" for k, v in sorted(metrics.items())]
    return "\n".join(rows)


def log_to_mlflow(metrics: dict[str, float], export_dir: str | Path, split: str) -> str:
    """Child run of the training run when we can find it; returns the run id."""
    import mlflow

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
