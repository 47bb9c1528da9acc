"""NLG metrics: library scores on identical, disjoint and hand-computed examples; METEOR when Java exists."""

from __future__ import annotations

import math
import shutil

import pytest

from cxrfm.eval import nlg
from cxrfm.eval.nlg import nlg_metrics, tokenize

REPORTS = [
    "FINDINGS: The heart is enlarged. There is a small left pleural effusion. IMPRESSION: Cardiomegaly.",
    "No focal consolidation, pleural effusion, or pneumothorax. Heart size is normal.",
    "ET tube terminates 4 cm above the carina. Mild pulmonary edema.",
]


def test_tokenize_drops_punctuation_and_keeps_decimals():
    text = "FINDINGS: Plate-like atelectasis, 1.5 cm. No effusion."
    assert tokenize(text) == "findings plate-like atelectasis 1.5 cm no effusion"


def test_identical_texts_score_one():
    s = nlg_metrics(REPORTS, REPORTS, meteor=False)
    for n in range(1, 5):
        assert s[f"bleu{n}"] == pytest.approx(1.0, abs=1e-6)
    assert s["rouge_l"] == 1.0
    assert s["sacrebleu"] == pytest.approx(1.0, abs=1e-6)
    assert s["cider"] > 1.0  # CIDEr-D is scaled by 10; identical texts score high, not 1
    assert s["meteor_unavailable"].startswith("not requested")


def test_bleu1_and_rouge_l_match_hand_computed_values():
    gen = ["the cat sat on the mat", "no effusion"]
    ref = ["the cat is on the mat", "no pleural effusion"]
    s = nlg_metrics(gen, ref, meteor=False)
    # clipped unigram matches 5 of 6 and 2 of 2 -> 7/8; corpus lengths c=8, r=9 -> BP = exp(1 - 9/8)
    assert s["bleu1"] == pytest.approx(7 / 8 * math.exp(1 - 9 / 8), abs=1e-6)
    # ROUGE-L (beta 1.2): pair 1 LCS 5, P = R = 5/6 -> 5/6; pair 2 LCS 2, P 1, R 2/3
    beta2 = 1.2**2
    pair2 = (1 + beta2) * 1.0 * (2 / 3) / (2 / 3 + beta2 * 1.0)
    assert s["rouge_l"] == pytest.approx((5 / 6 + pair2) / 2)


def test_disjoint_texts_score_zero():
    gen, ref = ["alpha beta gamma delta", "one two three"], ["epsilon zeta eta theta", "four five six"]
    s = nlg_metrics(gen, ref, meteor=False)
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider", "sacrebleu"):
        assert s[key] == pytest.approx(0.0, abs=1e-6), key


def test_empty_generation_is_scored_not_an_error():
    s = nlg_metrics(["", REPORTS[1]], REPORTS[:2], meteor=False)
    assert 0.0 < s["bleu1"] < 1.0 and 0.0 < s["rouge_l"] < 1.0


def test_mismatched_lists_are_rejected():
    with pytest.raises(ValueError):
        nlg_metrics(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        nlg_metrics([], [])


def test_meteor_without_java_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(nlg.shutil, "which", lambda name: None)
    s = nlg_metrics(REPORTS[:1], REPORTS[:1])
    assert "meteor" not in s and "java" in s["meteor_unavailable"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java on PATH")
def test_meteor_is_present_when_java_exists():
    """Marked slow: the METEOR jar first loads its 60 MB paraphrase table, about 12 CPU-seconds but 40-90 s
    of wall time on the shared 2-core test machine (once per process; `cxrfm eval` pays it once)."""
    s = nlg_metrics(REPORTS + ["the heart is enlarged"], REPORTS + ["heart size is normal"])
    assert "meteor_unavailable" not in s, s.get("meteor_unavailable")
    assert 0.5 < s["meteor"] < 1.0  # three identical pairs (1.0 each) and one partial one
