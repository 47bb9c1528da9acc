"""IU X-ray: R2Gen annotation.json + Open-i XML, and the Open-i-only layout."""

import numpy as np

from cxrfm.data.sources.base import patient_split

from cxrfm.data.images import read_image

from .built import build
from .fixtures_reports import write_iu_xray


def test_iu_r2gen_with_openi_xml(tmp_path):
    root = tmp_path / "iu"
    write_iu_xray(root, r2gen=True)
    manifest, back, report = build("iu_xray", root, tmp_path / "out")
    assert sorted(back) == ["iu-CXR1_1_IM-0001", "iu-CXR2_IM-0652", "iu-CXR3_IM-1384", "iu-CXR5_IM-2117"]

    s1, img1 = back["iu-CXR1_1_IM-0001"]
    assert (s1.patient_id, s1.split, s1.source) == ("iu-1", "train", "iu_xray")
    assert "CC BY-NC-ND" in s1.license
    assert (s1.indication, s1.comparison) == ("Preop.", "None.")
    assert (s1.findings, s1.impression) == ("Borderline cardiomegaly.", "No acute pulmonary findings.")
    assert s1.labels == {"Cardiomegaly": 1}  # "Pulmonary Artery" has no CheXpert counterpart...
    assert s1.source_labels["mesh_major"] == "Cardiomegaly/borderline; Pulmonary Artery/enlarged"  # ...but is kept
    assert s1.source_labels["mesh_automatic"] == "Cardiomegaly" and s1.source_labels["view_from"] == "pixels"
    # listed lateral first: the views come from the pixels, not the order
    assert [(r.role, r.view) for r in s1.images] == [("frontal", "PA"), ("lateral", "LATERAL")]
    raw = tmp_path / "iu" / "images" / "CXR1_1_IM-0001"
    assert_same_image(img1["frontal"], raw / "1.png") and assert_same_image(img1["lateral"], raw / "0.png")

    s2, img2 = back["iu-CXR2_IM-0652"]  # impression only, 16-bit PNG, MeSH "normal"
    assert (s2.split, s2.findings, s2.impression, s2.labels) == ("val", "", "Normal chest x-XXXX.", {"No Finding": 1})
    assert img2["frontal"].min() == 0 and img2["frontal"].max() == 255  # 12-bit data scaled to the full range
    assert len(np.unique(img2["frontal"])) > 50

    s3, _ = back["iu-CXR3_IM-1384"]  # its second image is missing: kept with the frontal only
    assert [r.role for r in s3.images] == ["frontal"]
    s5, img5 = back["iu-CXR5_IM-2117"]  # its only image is a lateral: kept as a lateral
    assert [(r.role, r.view) for r in s5.images] == [("lateral", "LATERAL")] and list(img5) == ["lateral"]

    assert report["skipped"] == {"duplicate_study_id": 1, "image_missing_file": 1,
                                 "report_without_findings_or_impression": 1}
    assert report["flagged"] == {"report_impression_only": 1, "study_lateral_only": 1}
    assert manifest["source_counts"] == {"iu_xray": {"train": 3, "val": 1}}


def test_iu_openi_only_layout_uses_patient_hash_split(tmp_path):
    root = tmp_path / "iu"
    write_iu_xray(root, r2gen=False)
    _, back, report = build("iu_xray", root, tmp_path / "out", shard_size=10)
    assert sorted(back) == ["iu-CXR1", "iu-CXR2", "iu-CXR3", "iu-CXR5"]
    for sid, (study, _) in back.items():
        assert study.split == patient_split(study.patient_id)
    assert [r.view for r in back["iu-CXR1"][0].images] == ["PA", "LATERAL"]
    assert [r.view for r in back["iu-CXR5"][0].images] == ["LATERAL"]
    assert back["iu-CXR3"][0].findings == "Clear lungs."
    assert report["skipped"] == {"image_missing_file": 1, "report_without_findings_or_impression": 1}


def assert_same_image(stored, path) -> bool:
    """The shard's image is the file's (the fixture images are small enough to be stored unresized)."""
    np.testing.assert_array_equal(stored, read_image(path))
    return True
