"""`cxrfm eval` end to end on an untrained tiny export: every task produces its metrics and MLflow gets them."""

import json

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from cxrfm.config import load_config
from cxrfm.eval.evaluate import box_iou, evaluate, grounding_iou, log_to_mlflow, normalize_answer
from cxrfm.eval.image_classifier import train_classifier
from cxrfm.model.build import build_model
from cxrfm.text.tokenizer import load_tokenizer


def test_box_iou_and_grounding_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert grounding_iou([], [(0, 0, 1, 1)]) == 0.0
    assert grounding_iou([(0, 0, 10, 10), (20, 20, 30, 30)], [(20, 20, 30, 30), (0, 0, 10, 10)]) == 1.0
    assert normalize_answer("  Yes. ") == "yes"


@pytest.fixture(scope="module")
def export(small_shards, tmp_path_factory):
    cfg = load_config(None, [f"data.shards={small_shards}", "model.diffusion.image_size=16"])
    tok = load_tokenizer(small_shards / "tokenizer")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "export"
    build_model(cfg, len(tok)).save_pretrained(path, full_config=cfg, tokenizer=tok)
    return path


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
        assert metrics[key] >= 0
    assert 0 <= metrics["vqa/exact_match/all"] <= 1 and 0 <= metrics["grounding/miou/all"] <= 1

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


def test_generate_without_classifier_is_a_clear_error(export, small_shards):
    with pytest.raises(ValueError, match="--classifier"):
        evaluate(export, small_shards, "test", tasks=("generate",), limit=2)
