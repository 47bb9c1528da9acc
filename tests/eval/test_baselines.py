"""Baselines against hand-computed answers on hand-made studies."""

import numpy as np
import pytest

from cxrfm.data.schema import Box, GroundedPhrase, ImageRef, Study, VQAPair
from cxrfm.eval.baselines import fit_baselines, pick_random_images, retrieval_feature
from cxrfm.eval.evaluate import beats_baselines, format_comparison


def _study(i, report_findings, image, vqa=(), grounding=(), size=100):
    return Study(study_id=f"s{i}", patient_id=f"p{i}", split="train", source="test",
                 images=[ImageRef(role="frontal", key="frontal.png", view="PA", width=size, height=size)],
                 findings=report_findings, vqa=list(vqa), grounding=list(grounding)), {"frontal": image}


def _image(kind: str) -> np.ndarray:
    im = np.zeros((64, 64), np.uint8)
    if kind == "left":
        im[:, :32] = 200
    elif kind == "top":
        im[:32, :] = 200
    return im


def test_fit_baselines_hand_computed():
    q = "Is there a pleural effusion?"
    train = [
        _study(0, "Normal.", _image("left"), [VQAPair(question=q, answer="no", qtype="presence", closed=True)],
               [GroundedPhrase(phrase="right effusion", label="Pleural Effusion", boxes=[Box(x1=0, y1=50, x2=50, y2=100)])]),
        _study(1, "Normal.", _image("left"), [VQAPair(question=q, answer="No.", qtype="presence", closed=True)],
               [GroundedPhrase(phrase="left effusion", label="Pleural Effusion", boxes=[Box(x1=50, y1=50, x2=100, y2=100)])]),
        _study(2, "Effusion.", _image("top"), [VQAPair(question=q, answer="yes", qtype="presence", closed=True),
                                               VQAPair(question="What view?", answer="PA", qtype="view", closed=False),
                                               VQAPair(question="What side?", answer="PA", qtype="view", closed=False)],
               [GroundedPhrase(phrase="heart", label="Cardiomegaly", boxes=[Box(x1=20, y1=20, x2=60, y2=60)])], size=200),
    ]
    b = fit_baselines(train)
    assert b.most_frequent_report == "FINDINGS: Normal."
    assert b.retrieve_report(_image("top")) == "FINDINGS: Effusion."
    assert b.retrieve_report(_image("left")) == "FINDINGS: Normal."
    assert b.answer("is there a pleural effusion") == "no"  # 2 x no vs 1 x yes, normalised
    assert b.answer("never asked?") == "no"  # global majority: no x2, pa x2, yes x1 -> the first most common
    # Mean of the two effusion boxes in relative coordinates, scaled to a 200 x 100 test image.
    assert b.prior_box("Pleural Effusion", 200, 100) == pytest.approx((50.0, 50.0, 150.0, 100.0))
    # Cardiomegaly box was in a 200 px image: relative (0.1, 0.1, 0.3, 0.3).
    assert b.prior_box("Cardiomegaly", 100, 100) == pytest.approx((10.0, 10.0, 30.0, 30.0))
    # An unseen label falls back to the mean of every box: x1 = mean(0, .5, .1) = 0.2.
    assert b.prior_box("Edema", 100, 100)[0] == pytest.approx(20.0)


def test_retrieval_feature_ignores_brightness_and_contrast():
    im = _image("left")
    assert retrieval_feature(im) @ retrieval_feature((im // 2 + 20).astype(np.uint8)) == pytest.approx(1.0, abs=1e-3)
    assert retrieval_feature(im) @ retrieval_feature(_image("top")) == pytest.approx(0.0, abs=1e-3)


def test_pick_random_images_never_picks_itself_and_matches_labels():
    vectors = np.array([[1, 0], [1, 0], [0, 1], [0, 0]], np.float32)
    rnd, same = pick_random_images(vectors, seed=0)
    assert all(j != i for i, j in enumerate(rnd))
    assert same[0] == 1 and same[1] == 0 and same[2] is None and same[3] is None
    with pytest.raises(ValueError, match="at least 2"):
        pick_random_images(vectors[:1])


def test_comparison_table_and_verdicts():
    metrics = {"report/ce14/micro_f1": 0.5, "baseline/most_frequent/report/ce14/micro_f1": 0.3,
               "baseline/nn_retrieval/report/ce14/micro_f1": 0.6, "vqa/exact_match/all": 0.8,
               "baseline/majority/vqa/exact_match/all": 0.7}
    wins = beats_baselines(metrics)
    assert wins == {"report CE micro-F1-14": False, "VQA exact match": True}
    table = format_comparison(metrics)
    assert "report CE micro-F1-14" in table and "NO" in table and "yes" in table
    # The same-label real images are a ceiling: shown, never part of the verdict.
    gen = {"generate/label_agreement": 0.8, "baseline/random_image/generate/label_agreement": 0.74,
           "baseline/random_same_label/generate/label_agreement": 0.93}
    assert beats_baselines(gen) == {"generate label agreement": True}
    assert "[random_same_label]" in format_comparison(gen)
