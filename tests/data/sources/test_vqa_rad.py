import numpy as np
import pytest

from tests.data.sources.built import build
from tests.data.sources.fixtures_vqa import write_vqa_rad


@pytest.fixture
def converted(tmp_path):
    """(manifest, studies read back by id, build_report.json, the fixture's raw pixels)."""
    pixels = write_vqa_rad(tmp_path / "raw")["pixels"]
    return (*build("vqa_rad", tmp_path / "raw", tmp_path / "shards"), pixels)


def pairs(study):
    return [(q.question, q.answer, q.qtype, q.closed) for q in study.vqa]


def test_chest_xray_questions_survive_the_shards(converted):
    _, back, _, _ = converted
    assert sorted(back) == ["vqa_rad-synpic100", "vqa_rad-synpic200", "vqa_rad-synpic700", "vqa_rad-synpic800"]
    s, images = back["vqa_rad-synpic100"]
    assert (s.source, s.patient_id, s.license) == ("vqa_rad", "synpic100", "CC0 1.0 (VQA-RAD, Lau et al. 2018)")
    assert s.split in ("train", "val")
    assert pairs(s) == [("Is there a pneumothorax?", "Yes", "presence", True),
                        ("Where is the mass?", "Right upper lobe", "location", False),
                        ("How many ribs are fractured?", "2", "count", False)]  # an int answer, "OPEN " type
    assert [(im.role, im.view, im.width, im.height) for im in s.images] == [("frontal", "PA", 72, 64)]
    assert images["frontal"].shape == (64, 72)
    assert s.grounding == [] and s.labels == {} and s.findings == ""
    lateral, images = back["vqa_rad-synpic800"]  # no PLANE answer: a lateral by its pixels
    assert [(im.role, im.view) for im in lateral.images] == [("lateral", "LATERAL")] and list(images) == ["lateral"]


def test_an_image_with_test_questions_is_a_test_study(converted):
    _, back, report, _ = converted
    s = back["vqa_rad-synpic200"][0]
    assert s.split == "test" and len(s.vqa) == 3
    assert s.images[0].view == "AP"  # from its PLANE answer
    assert report["flagged"]["train_question_moved_to_test"] == 2


def test_16bit_png_is_rescaled(converted):
    _, back, _, pixels = converted
    s, images = back["vqa_rad-synpic700"]
    assert s.split == "test" and pairs(s) == [("Is this an x-ray?", "yes", "other", True)]
    raw = pixels["synpic700.png"].astype(np.float32)
    expected = np.clip((raw - raw.min()) / (raw.max() - raw.min()) * 255 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(images["frontal"], expected)


def test_report_counts_every_filtered_question_and_image(converted):
    _, _, report, _ = converted
    assert report["skipped"] == {"duplicate_question": 1, "image_corrupt_image": 1, "image_missing_file": 1,
                                 "not_chest": 1, "not_xray": 2}
    assert report["flagged"] == {"train_question_moved_to_test": 2, "view_from_pixels": 3}
    assert report["notes"]["vqa_rad_questions"] == 14
    assert "each image is its own patient" in report["notes"]["vqa_rad_patients"]
