"""`cxrfm eval` end to end on an untrained tiny export: every task produces its metrics and MLflow gets them."""

import json
import re

import numpy as np

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from cxrfm.data.schema import Box, GroundedPhrase, ImageRef, Study, VQAPair
from cxrfm.data.shards import write_shards
from cxrfm.data.sources.boxes import iou as box_iou
from cxrfm.eval.evaluate import evaluate, grounding_iou, log_to_mlflow
from cxrfm.eval.ground_truth import iter_split, normalize_answer
from cxrfm.eval.image_classifier import train_classifier


def test_box_iou_and_grounding_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert grounding_iou([], [(0, 0, 1, 1)]) == 0.0
    assert grounding_iou([(0, 0, 10, 10), (20, 20, 30, 30)], [(20, 20, 30, 30), (0, 0, 10, 10)]) == 1.0
    assert normalize_answer("  Yes. ") == "yes"


def test_evaluate_all_tasks_and_log_as_child_run(export, small_shards, tmp_path):
    clf = train_classifier(small_shards, tmp_path / "clf.pt", epochs=1, log=lambda *_: None)
    metrics = evaluate(export, small_shards, "test", limit=6, batch_size=4, classifier=clf, image_steps=2)
    assert metrics["studies"] == 6
    for key in ("report/bleu4", "report/ce14/micro_f1", "report/ce5/macro_f1", "vqa/exact_match/all",
                "grounding/miou/all", "grounding/acc@0.5/all", "generate/label_agreement",
                "generate/frechet_classifier_features", "baseline/most_frequent/report/ce14/micro_f1",
                "baseline/nn_retrieval/report/ce14/micro_f1", "baseline/majority/vqa/exact_match/all",
                "baseline/question_prior/vqa/exact_match/all",
                "baseline/prior_box/grounding/acc@0.5/all", "baseline/random_image/generate/label_agreement"):
        assert key in metrics, key
    # (the values are checked exactly on hand-made studies below; here: every task runs and is logged)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("train")
    with mlflow.start_run() as parent:
        pass
    (export.parent / "run.json").write_text(json.dumps({"mlflow_run_id": parent.info.run_id, "tracking_uri": uri}))
    child = log_to_mlflow(metrics, export, "test")
    run = MlflowClient(uri).get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.metrics["studies"] == 6
    assert run.data.metrics == {re.sub(r"[^A-Za-z0-9_\-./ ]", "_", k): float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------- hand-made studies, hand-computed metrics

Q_EFF, Q_VIEW, Q_DEVICE = "Is there a pleural effusion?", "What view?", "Any device?"


def _image(kind: str, width: int, height: int) -> np.ndarray:
    im = np.zeros((height, width), np.uint8)
    if kind == "left":
        im[:, : width // 2] = 200
    else:  # "top"
        im[: height // 2, :] = 200
    return im


def _hand_study(sid, split, findings, kind, width, height, vqa=(), grounding=()):
    study = Study(study_id=sid, patient_id=f"p-{sid}", split=split, source="hand", findings=findings,
                  images=[ImageRef(role="frontal", key="frontal.png", view="PA", width=width, height=height)],
                  vqa=list(vqa), grounding=list(grounding))
    return study, {"frontal": _image(kind, width, height)}


@pytest.fixture(scope="module")
def hand_shards(tmp_path_factory):
    """3 train and 2 test studies whose baseline metrics are worked out by hand in the test below."""
    eff = lambda a: VQAPair(question=Q_EFF, answer=a, qtype="presence", closed=True)  # noqa: E731
    box = lambda label, x1, y1, x2, y2: GroundedPhrase(phrase=label.lower(), label=label,  # noqa: E731
                                                       boxes=[Box(x1=x1, y1=y1, x2=x2, y2=y2)])
    studies = [
        _hand_study("a0", "train", "Normal.", "left", 100, 100, [eff("no")], [box("Pleural Effusion", 0, 50, 50, 100)]),
        _hand_study("a1", "train", "Normal.", "left", 100, 100, [eff("No.")], [box("Pleural Effusion", 50, 50, 100, 100)]),
        _hand_study("a2", "train", "Effusion.", "top", 200, 200,
                    [eff("yes"), VQAPair(question=Q_VIEW, answer="PA", qtype="view", closed=False)],
                    [box("Cardiomegaly", 20, 20, 60, 60)]),
        _hand_study("t0", "test", "Small left pleural effusion.", "top", 200, 100,
                    [eff("no"), VQAPair(question=Q_VIEW, answer="PA", qtype="view", closed=False)],
                    [box("Pleural Effusion", 50, 50, 150, 100)]),
        _hand_study("t1", "test", "No acute cardiopulmonary process.", "left", 100, 100,
                    [eff("yes"), VQAPair(question=Q_DEVICE, answer="no", qtype="device", closed=True)],
                    [box("Cardiomegaly", 10, 10, 30, 50)]),
    ]
    out = tmp_path_factory.mktemp("hand-shards")
    write_shards(studies, out, shard_size=10)
    return out


def test_evaluate_metrics_match_hand_computed_values(export, hand_shards):
    from cxrfm.model.generate import GenerationOptions, Predictor

    m = evaluate(export, hand_shards, "test", tasks=("report", "vqa", "grounding"), batch_size=4,
                 options=GenerationOptions(max_new_tokens=8))
    assert m["studies"] == 2
    # VQA baselines. Train answers: "no" x2, "yes", "pa" -> majority "no". Per question: effusion -> "no",
    # view -> "pa"; the unseen device question falls back to "no".
    # test:      t0 effusion "no" (closed)  t0 view "PA" (open)  t1 effusion "yes" (closed)  t1 device "no" (closed)
    # majority:  hit                         miss                 miss                        hit
    # question:  hit                         hit                  miss                        hit
    want = {"majority": {"all": 2 / 4, "closed": 2 / 3, "open": 0.0, "type/presence": 1 / 2, "type/view": 0.0,
                         "type/device": 1.0},
            "question_prior": {"all": 3 / 4, "closed": 2 / 3, "open": 1.0, "type/presence": 1 / 2, "type/view": 1.0,
                               "type/device": 1.0}}
    for name, values in want.items():
        got = {k.split("/exact_match/", 1)[1]: v for k, v in m.items() if k.startswith(f"baseline/{name}/vqa/exact_match/")}
        assert got == pytest.approx(values, abs=1e-12), name
    # Grounding prior box: effusion -> mean relative box (0.25, 0.5, 0.75, 1.0), on t0's 200 x 100 image
    # (50, 50, 150, 100) = the truth, IoU 1; cardiomegaly -> (0.1, 0.1, 0.3, 0.3), on t1's 100 x 100 image
    # (10, 10, 30, 30) against the truth (10, 10, 30, 50): 400 / 800 = 1/2, which counts as a hit (IoU >= 0.5).
    assert m["baseline/prior_box/grounding/miou/Pleural Effusion"] == pytest.approx(1.0)
    assert m["baseline/prior_box/grounding/miou/Cardiomegaly"] == pytest.approx(1 / 2)
    assert m["baseline/prior_box/grounding/miou/all"] == pytest.approx(3 / 4)
    assert m["baseline/prior_box/grounding/acc@0.5/all"] == 1.0
    assert m["baseline/prior_box/grounding/acc@0.5/Pleural Effusion"] == 1.0
    assert m["baseline/prior_box/grounding/acc@0.5/Cardiomegaly"] == 1.0
    # Report baselines. Most frequent: "findings: normal." for both (No Finding 1); references: t0 Pleural
    # Effusion 1, t1 No Finding 1 -> CE-14 tp 1 (No Finding), fp 1 (No Finding at t0), fn 1 (effusion):
    # P = R = F1 = 1/2. Retrieval: t0's top-bright image finds "Effusion.", t1's left-bright one "Normal.":
    # both right, so 1.
    for k in ("micro_precision", "micro_recall", "micro_f1"):
        assert m[f"baseline/most_frequent/report/ce14/{k}"] == pytest.approx(0.5), k
        assert m[f"baseline/nn_retrieval/report/ce14/{k}"] == pytest.approx(1.0), k
    # The model's own scores: the same arithmetic over the answers an untrained model gives (asked here again).
    p = Predictor(export)
    studies = list(iter_split(hand_shards, "test"))
    pairs = [(s, ims, qa) for s, ims in studies for qa in s.vqa]
    answers = p.generate_batch([{"task": "vqa", "images": ims, "text": qa.question} for _, ims, qa in pairs],
                               GenerationOptions(max_new_tokens=16))
    hits = [normalize_answer(a.text) == normalize_answer(qa.answer) for (_, _, qa), a in zip(pairs, answers)]
    assert m["vqa/exact_match/all"] == sum(hits) / 4
    items = [(s, ims, gp) for s, ims in studies for gp in s.grounding]
    boxes = p.generate_batch([{"task": "grounding", "images": ims, "text": gp.phrase} for _, ims, gp in items],
                             GenerationOptions(max_new_tokens=17))
    ious = [grounding_iou(a.boxes, [(b.x1, b.y1, b.x2, b.y2) for b in gp.boxes]) for (_, _, gp), a in zip(items, boxes)]
    assert m["grounding/miou/all"] == pytest.approx(sum(ious) / 2)
    assert m["grounding/malformed_answers"] == sum(bool(a.problems) for a in boxes)


def test_generate_without_classifier_is_a_clear_error(export, small_shards):
    with pytest.raises(ValueError, match="--classifier"):
        evaluate(export, small_shards, "test", tasks=("generate",), limit=2)
