import numpy as np
import pytest

from cxrfm.data.images import read_image
from cxrfm.data.sources import get_converter
from cxrfm.data.sources.base import BuildReport
from tests.data.sources.built import build
from tests.data.sources.fixtures_vqa import DIFF_DIFFERENCE_Q, write_medical_diff_vqa


@pytest.fixture
def converted(tmp_path):
    """(manifest, studies read back by id, build_report.json, image paths by study, the raw root)."""
    paths = write_medical_diff_vqa(tmp_path / "raw")["paths"]
    return (*build("medical_diff_vqa", tmp_path / "raw", tmp_path / "shards"), paths, tmp_path / "raw")


def test_difference_question_brings_the_prior_image(converted):
    _, back, _, paths, raw = converted
    s, images = back["medical_diff_vqa-53189527"]
    assert (s.source, s.patient_id, s.split, s.study_date) == ("medical_diff_vqa", "10000032", "train", "2180-06-26")
    assert s.license.startswith("PhysioNet Credentialed Health Data License")
    assert [(im.role, im.key, im.view) for im in s.images] == [("frontal", "frontal.png", "AP"),
                                                              ("prior", "prior.png", "PA")]
    assert s.prior_study_id == "medical_diff_vqa-50414267"
    np.testing.assert_array_equal(images["prior"], read_image(raw / paths["50414267"]))
    np.testing.assert_array_equal(images["frontal"], read_image(raw / paths["53189527"]))
    assert [(q.qtype, q.question, q.closed) for q in s.vqa] == [
        ("presence", "what abnormalities are seen in this image?", False),
        ("presence", "is there pneumothorax?", True),
        ("change", DIFF_DIFFERENCE_Q, False)]
    assert s.labels == {"Cardiomegaly": 0, "Edema": -1, "Pleural Effusion": 1}


def test_questions_without_a_usable_reference_go_and_the_rest_stay(converted):
    _, back, _, _, _ = converted
    later_ref = back["medical_diff_vqa-50414267"][0]  # its reference is a later visit
    assert [q.question for q in later_ref.vqa] == ["is there pleural effusion?"]
    assert [im.role for im in later_ref.images] == ["frontal"] and later_ref.prior_study_id is None
    missing_ref = back["medical_diff_vqa-50771383"][0]  # its reference image is missing
    assert (missing_ref.split, [q.qtype for q in missing_ref.vqa]) == ("val", ["location"])
    unreadable_ref = back["medical_diff_vqa-51178377"][0]  # its reference image cannot be decoded
    assert [q.answer for q in unreadable_ref.vqa] == ["mild"] and unreadable_ref.prior_study_id is None
    assert [im.role for im in unreadable_ref.images] == ["frontal"]
    view = back["medical_diff_vqa-57375967"][0]
    assert (view.split, view.vqa[0].qtype, view.vqa[0].answer) == ("test", "view", "AP view")


def test_report_counts_every_problem(converted):
    _, back, report, _, _ = converted
    assert len(back) == 5
    assert report["skipped"] == {"duplicate_question": 1, "image_missing_file": 1, "missing_prior_image": 1,
                                 "prior_image_unreadable": 1, "reference_not_earlier": 1, "study_not_in_mimic_all": 1}
    assert report["flagged"] == {}
    assert report["notes"]["medical_diff_vqa_questions"] == 13


def test_no_patient_in_two_splits(tmp_path):
    write_medical_diff_vqa(tmp_path)
    qpath = tmp_path / "mimic_pair_questions.csv"
    # put one of patient 10000032's studies in test: both of the patient's studies must end in test
    text = qpath.read_text()
    qpath.write_text(text.replace("is there pleural effusion?,no,train", "is there pleural effusion?,no,test"))
    report = BuildReport()
    records = {r.study_id: r for r in get_converter("medical_diff_vqa")().scan(tmp_path, report)}
    assert records["medical_diff_vqa-50414267"].split == records["medical_diff_vqa-53189527"].split == "test"
    assert report.flagged["patient_in_several_splits_moved"] == 1


def test_ids_written_as_floats_are_read_as_ids(tmp_path):
    write_medical_diff_vqa(tmp_path)
    qpath = tmp_path / "mimic_pair_questions.csv"
    # pandas writes an integer column with a blank in it as floats
    qpath.write_text(qpath.read_text().replace(",10000032,50414267,", ",10000032,50414267.0,"))
    records = {r.study_id: r for r in get_converter("medical_diff_vqa")().scan(tmp_path, BuildReport())}
    assert records["medical_diff_vqa-53189527"].prior_study_id == "medical_diff_vqa-50414267"
