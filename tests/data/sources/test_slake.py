import pytest

from cxrfm.data.sources import get_converter
from cxrfm.data.sources.base import BuildReport
from tests.data.sources.built import build
from tests.data.sources.fixtures_vqa import write_slake


@pytest.fixture
def converted(tmp_path):
    """(manifest, studies read back from the shards by id, build_report.json) of a real `cxrfm data build`."""
    write_slake(tmp_path / "raw")
    return build("slake", tmp_path / "raw", tmp_path / "shards")


def pairs(study):
    return [(q.question, q.answer, q.qtype, q.closed) for q in study.vqa]


def test_english_chest_xray_questions_survive_the_shards(converted):
    _, back, _ = converted
    assert sorted(back) == ["slake-xmlab102", "slake-xmlab103", "slake-xmlab107", "slake-xmlab109"]
    s, images = back["slake-xmlab102"]
    assert (s.source, s.patient_id, s.split) == ("slake", "xmlab102", "train")
    assert s.license == "CC BY 4.0 (SLAKE, Liu et al. 2021)"
    assert pairs(s) == [("Does the picture contain lung?", "Yes", "other", True),
                        ("Where is the abnormality?", "Right Lung, Lower Left", "location", False)]
    assert [(im.role, im.view, im.width, im.height) for im in s.images] == [("frontal", "PA", 64, 64)]
    assert images["frontal"].shape == (64, 64)
    assert back["slake-xmlab103"][0].split == "val"
    assert back["slake-xmlab103"][0].images[0].height == 56
    assert pairs(back["slake-xmlab107"][0]) == [("How many lungs are in this image?", "2", "count", False)]


def test_an_image_in_train_and_test_is_only_in_test(converted):
    _, back, report = converted
    s = back["slake-xmlab109"][0]
    assert s.split == "test"
    assert [q.question for q in s.vqa] == ["Which organ is abnormal?", "Is the heart abnormal?"]
    assert report["flagged"]["question_moved_to_held_out_split"] == 1


def test_report_counts_every_filtered_question_and_image(converted):
    _, _, report = converted
    assert report["skipped"] == {"duplicate_question": 1, "image_corrupt_image": 1, "image_missing_file": 1,
                                 "not_chest_xray": 2, "not_english": 1}
    assert report["flagged"] == {"question_moved_to_held_out_split": 1, "view_from_pixels": 4}
    notes = report["notes"]
    assert (notes["slake_train_questions"], notes["slake_val_questions"], notes["slake_test_questions"]) == (9, 2, 1)


def test_hugging_face_layout_without_the_folder(tmp_path):
    write_slake(tmp_path)
    data = tmp_path / "Slake1.0"
    (data / "validate.json").rename(data / "validation.json")  # the Hugging Face copy's name
    for p in data.iterdir():
        p.rename(tmp_path / p.name)
    records = get_converter("slake")().scan(tmp_path, BuildReport())
    assert {r.study_id: r.split for r in records}["slake-xmlab103"] == "val"


def test_missing_files_name_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="Slake1.0/train.json"):
        get_converter("slake")().scan(tmp_path, BuildReport())
