"""CheXpert Plus: the published report table, PNG images, CheXbert label JSON lines."""

from .built import build
from .fixtures_reports import write_chexpert_plus


def test_chexpert_plus_round_trip(tmp_path):
    root = tmp_path / "cxp"
    write_chexpert_plus(root)
    manifest, back, report = build("chexpert_plus", root, tmp_path / "out")
    assert sorted(back) == ["chexpert_plus-patient00001-study1", "chexpert_plus-patient00001-study2",
                            "chexpert_plus-patient00002-study1"]

    s1, img1 = back["chexpert_plus-patient00001-study1"]
    assert (s1.patient_id, s1.split, s1.source) == ("patient00001", "train", "chexpert_plus")
    assert (s1.indication, s1.comparison) == ("Shortness of breath.", "None.")
    assert (s1.findings, s1.impression) == ("Small left pleural effusion.", "Small left effusion.")
    # two label rows of the study: effusion 1.0 and -1.0 -> positive wins; blank Edema is not mentioned
    assert s1.labels == {"Pleural Effusion": 1, "Cardiomegaly": 0}
    assert s1.source_labels == {"Pleural Effusion": "1.0,-1.0", "Cardiomegaly": "0.0", "deid_patient_id": "PAT1"}
    assert [(r.role, r.view) for r in s1.images] == [("frontal", "AP"), ("lateral", "LATERAL")]
    assert img1["frontal"].max() == 255 and img1["frontal"].min() == 0  # 16-bit PNG scaled

    s2, img2 = back["chexpert_plus-patient00001-study2"]  # prior by patient_report_date_order
    assert s2.prior_study_id == s1.study_id and [r.role for r in s2.images] == ["frontal", "prior"]
    assert (img2["prior"] == img1["frontal"]).all()

    s3, _ = back["chexpert_plus-patient00002-study1"]  # only a `report` column; blank ap_pa image not used
    assert (s3.split, s3.indication, s3.findings, s3.impression) == (
        "val", "fever.", "Right lower lobe consolidation.", "Pneumonia.")
    assert s3.labels == {"Pneumonia": -1, "Consolidation": 1}
    assert [(r.role, r.view) for r in s3.images] == [("frontal", "PA")]

    assert report["skipped"] == {"image_missing_file": 1, "image_view_not_used": 1,
                                 "report_without_findings_or_impression": 1, "study_without_usable_image": 1}
    assert manifest["source_counts"] == {"chexpert_plus": {"train": 2, "val": 1}}
