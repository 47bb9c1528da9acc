"""ReXGradient-160K: per-split metadata (JSON list, JSON object, one-row-per-image CSV), multi-image studies."""

from .built import build
from .fixtures_reports import write_rexgradient


def test_rexgradient_round_trip(tmp_path):
    root = tmp_path / "rex"
    write_rexgradient(root)
    manifest, back, report = build("rexgradient", root, tmp_path / "out")
    assert sorted(back) == ["rexgradient-1_2_3_1", "rexgradient-1_2_3_2", "rexgradient-1_2_3_3", "rexgradient-1_2_3_4"]

    s1, img1 = back["rexgradient-1_2_3_1"]  # three images: PA, LATERAL and a second PA (not used)
    assert (s1.patient_id, s1.split, s1.study_date, s1.source) == ("P1", "train", "2020-01-01", "rexgradient")
    assert (s1.indication, s1.comparison, s1.findings, s1.impression) == ("Cough.", "None.", "Heart size normal.", "No acute disease.")
    assert [(r.role, r.view) for r in s1.images] == [("frontal", "PA"), ("lateral", "LATERAL")]
    assert s1.labels == {} and s1.source_labels == {"PatientSex": "F", "PatientAge": "061Y"}

    s2, img2 = back["rexgradient-1_2_3_2"]
    assert s2.prior_study_id == s1.study_id and [r.view for r in s2.images] == ["PA", "PA"]
    assert (img2["prior"] == img1["frontal"]).all()

    s3, img3 = back["rexgradient-1_2_3_3"]  # valid, impression only, DICOM MONOCHROME1
    assert (s3.split, s3.findings, s3.impression) == ("val", "", "Normal chest.")
    assert img3["frontal"][0].mean() > 250

    s4, _ = back["rexgradient-1_2_3_4"]  # CSV with one row per image; the UNKNOWN view is not used
    assert (s4.split, [(r.role, r.view) for r in s4.images]) == ("test", [("frontal", "AP")])

    assert report["skipped"] == {"duplicate_study_id": 1, "image_missing_file": 1, "image_view_not_used": 1,
                                 "study_without_usable_image": 1}
    assert report["flagged"] == {"extra_images_not_used": 1, "report_impression_only": 1}
    assert manifest["source_counts"] == {"rexgradient": {"train": 2, "val": 1, "test": 1}}
