"""CheXpert v1.0 / -small through the real `cxrfm data build` path."""

import csv

import pytest

from cxrfm.data.sources import get_converter
from cxrfm.data.sources.base import BuildReport

from .built import build
from .fixtures_labels import CHEXPERT_COLUMNS, table, write_chexpert


@pytest.mark.parametrize("release, root_is_release", [("CheXpert-v1.0-small", False), ("CheXpert-v1.0", True)])
def test_chexpert_labels_views_and_questions(tmp_path, release, root_is_release):
    info = write_chexpert(tmp_path / "raw", release)
    root = info["folder"] if root_is_release else tmp_path / "raw"
    _, back, report = build("chexpert", root, tmp_path / "out")
    assert sorted(back) == ["chexpert-patient00001-study1", "chexpert-patient00002-study1",
                            "chexpert-patient64541-study1"]
    s1, img1 = back["chexpert-patient00001-study1"]
    assert (s1.split, s1.patient_id, s1.source) == ("train", "patient00001", "chexpert")
    assert [(r.role, r.view) for r in s1.images] == [("frontal", "PA"), ("lateral", "LATERAL")]
    # per-view labels merged: positive > uncertain > negative; uncertain stays uncertain where no view is sure
    assert s1.labels == {"Cardiomegaly": 1, "Pleural Effusion": 1, "Edema": 0, "Support Devices": 1}
    assert {(q.question, q.answer) for q in s1.vqa} == {
        ("is there cardiomegaly?", "yes"), ("is there a pleural effusion?", "yes"),
        ("is there pulmonary edema?", "no"), ("is there a support device?", "yes")}
    s2, img2 = back["chexpert-patient00002-study1"]  # lateral only: kept as a lateral
    assert [(r.role, r.view) for r in s2.images] == [("lateral", "LATERAL")] and list(img2) == ["lateral"]
    s3, _ = back["chexpert-patient64541-study1"]
    assert s3.split == "val" and [(r.role, r.view) for r in s3.images] == [("frontal", "AP")]
    assert s3.labels == {"No Finding": 0, "Lung Opacity": 1, "Atelectasis": 0, "Fracture": 0}
    assert report["skipped"] == {"image_missing_file": 1, "study_without_usable_image": 1}
    assert report["flagged"] == {"study_lateral_only": 1}


def test_uncertain_labels_are_kept_and_get_no_question(tmp_path):
    write_chexpert(tmp_path)
    path = tmp_path / "CheXpert-v1.0-small" / "train.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[1]["Pleural Effusion"] = "-1.0"  # the lateral: now both views are uncertain
    table(path, CHEXPERT_COLUMNS, rows)
    records = get_converter("chexpert")().scan(tmp_path, BuildReport())
    rec = next(r for r in records if r.patient_id == "patient00001")
    assert rec.payload["labels"]["Pleural Effusion"] == -1
    study, _ = get_converter("chexpert")().load(rec, BuildReport())
    assert "is there a pleural effusion?" not in {q.question for q in study.vqa}


def test_layout_not_found_names_the_accepted_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="CheXpert-v1.0-small/ or CheXpert-v1.0/ holding train.csv"):
        get_converter("chexpert")().scan(tmp_path, BuildReport())
