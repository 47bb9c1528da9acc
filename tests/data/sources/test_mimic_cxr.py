"""MIMIC-CXR-JPG: fixture in the PhysioNet layout -> shards -> every field checked."""

import numpy as np

from cxrfm.data.images import read_image

from .built import build
from .fixtures_reports import write_mimic


def test_mimic_round_trip_fields_priors_and_report_counts(tmp_path):
    root = tmp_path / "mimic"
    expected = write_mimic(root)
    manifest, back, report = build("mimic_cxr", root, tmp_path / "out")
    assert sorted(back) == expected["written"]

    s1, img1 = back["mimic-s50000001"]
    assert (s1.patient_id, s1.split, s1.source, s1.study_date) == ("p10000032", "train", "mimic_cxr", "2180-01-01")
    assert s1.license.startswith("PhysioNet")
    assert s1.indication == "___F with cough // eval for pneumonia" and s1.comparison == "None."
    assert s1.findings == "Mild cardiomegaly. No focal consolidation. Possible trace edema."
    assert s1.impression == "Mild cardiomegaly without acute process."
    assert s1.labels == {"Cardiomegaly": 1, "Edema": -1, "Pleural Effusion": 0}
    assert s1.source_labels == {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pleural Effusion": "0.0"}
    # the 300x200 PA is downsized to a longer side of 128, and the ImageRef follows
    assert {(r.role, r.view, r.width, r.height) for r in s1.images} == {("frontal", "PA", 128, 85), ("lateral", "LATERAL", 40, 48)}
    assert img1["frontal"].shape == (85, 128) and s1.prior_study_id is None

    s2, img2 = back["mimic-s50000002"]  # three images listed: AP, LL, a second AP; prior by date
    assert [(r.role, r.view) for r in s2.images] == [("frontal", "AP"), ("lateral", "LL"), ("prior", "PA")]
    assert s2.prior_study_id == "mimic-s50000001"
    np.testing.assert_array_equal(img2["prior"], img1["frontal"])  # the prior is the earlier study's frontal
    ap = read_image(root / "files/p10/p10000032/s50000002/d2-ap.jpg")
    np.testing.assert_array_equal(img2["frontal"], ap)  # the first AP (by dicom id), not the second

    s3, img3 = back["mimic-s50000003"]  # DICOM MONOCHROME1 fallback, impression-only, official "validate"
    assert s3.split == "val" and s3.findings == "" and s3.impression == "No acute cardiopulmonary process."
    assert img3["frontal"][0].mean() > 250 and img3["frontal"][-1].mean() < 5  # inverted: low values white
    assert back["mimic-s50000004"][0].split == "test" and len(back["mimic-s50000004"][0].images) == 1
    s8, img8 = back["mimic-s50000008"]  # the prior exam has no report, but its image is still the prior
    assert s8.prior_study_id == "mimic-s50000007"
    np.testing.assert_array_equal(img8["prior"], read_image(root / "files/p10/p10000035/s50000007/d7-pa.jpg"))

    assert report["skipped"] == {
        "duplicate_study_id": 1,            # study 50000001 listed again for subject 10000099
        "image_corrupt_image": 1,           # s50000005's JPEG cannot be decoded
        "image_missing_file": 1,            # s50000006's image is not on disk
        "image_view_not_used": 1,           # s50000004's image without ViewPosition
        "missing_report": 1,                # s50000007
        "study_without_readable_image": 1,  # s50000005, at load
        "study_without_usable_image": 1,    # s50000006, at scan
    }
    assert report["flagged"] == {"report_impression_only": 1}
    assert report["examples"]["missing_report"][0]["item"] == "mimic-s50000007"
    assert manifest["source_counts"] == {"mimic_cxr": {"train": 3, "val": 1, "test": 1}}
    assert manifest["licenses"]["mimic_cxr"].startswith("PhysioNet")
