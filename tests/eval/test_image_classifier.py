import numpy as np
import pytest
import torch

from cxrfm.eval.ground_truth import iter_split
from cxrfm.eval.image_classifier import SCORED, auroc, frechet_distance, load_classifier, score_images, train_classifier


def test_auroc_matches_hand_computed_values():
    assert auroc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0])) == 1.0
    assert auroc(np.array([0.1, 0.9]), np.array([1, 0])) == 0.0
    assert auroc(np.array([0.4, 0.6, 0.5]), np.array([1, 0, 1])) == 0.0
    assert auroc(np.array([0.3, 0.3]), np.array([1, 1])) is None


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 4))
    assert abs(frechet_distance(a, a)) < 1e-6
    assert frechet_distance(a, a + 3.0) == pytest.approx(4 * 9.0, rel=0.05)


def test_trained_classifier_scores_real_images_better_than_noise(small_shards, tmp_path):
    path = train_classifier(small_shards, tmp_path / "clf.pt", epochs=4, log=lambda *_: None)
    model = load_classifier(path)
    test = list(iter_split(small_shards, "train", limit=60))
    real = np.stack([ims["frontal"] for _, ims in test if "frontal" in ims])
    labels = [s.labels for s, ims in test if "frontal" in ims]
    on_real = score_images(model, real, labels, real)
    noise = np.random.default_rng(0).integers(0, 255, real.shape, dtype=np.uint8)
    on_noise = score_images(model, noise, labels, real)
    assert on_real["generate/frechet_classifier_features"] < 1e-3 < on_noise["generate/frechet_classifier_features"]
    assert on_real["generate/label_agreement"] > on_noise["generate/label_agreement"] - 0.05
    assert len(SCORED) == 8
    with pytest.raises(FileNotFoundError, match="cxrfm classifier train"):
        load_classifier(tmp_path / "missing.pt")
