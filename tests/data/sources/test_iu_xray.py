"""IU X-ray: R2Gen annotation.json + Open-i XML, and the Open-i-only layout."""

import numpy as np

from cxrfm.data.sources.base import patient_split

from .built import build
from .fixtures_reports import write_iu_xray


def test_iu_r2gen_with_openi_xml(tmp_path):
    root = tmp_path / "iu"
    write_iu_xray(root, r2gen=True)
    manifest, back, report = build("iu_xray", root, tmp_path / "out")
    assert sorted(back) == ["iu-CXR1_1_IM-0001", "iu-CXR2_IM-0652", "iu-CXR3_IM-1384"]

    s1, img1 = back["iu-CXR1_1_IM-0001"]
    assert (s1.patient_id, s1.split, s1.source) == ("iu-1", "train", "iu_xray")
    assert "CC BY-NC-ND" in s1.license
    assert (s1.indication, s1.comparison) == ("Preop.", "None.")
    assert (s1.findings, s1.impression) == ("Borderline cardiomegaly.", "No acute pulmonary findings.")
    assert s1.labels == {"Cardiomegaly": 1}  # "Pulmonary Artery" has no CheXpert counterpart...
    assert s1.source_labels["mesh_major"] == "Cardiomegaly/borderline; Pulmonary Artery/enlarged"  # ...but is kept
    assert s1.source_labels["mesh_automatic"] == "Cardiomegaly" and s1.source_labels["view_from"] == "listing_order"
    assert [(r.role, r.view) for r in s1.images] == [("frontal", "PA"), ("lateral", "LATERAL")]

    s2, img2 = back["iu-CXR2_IM-0652"]  # impression only, 16-bit PNG, MeSH "normal"
    assert (s2.split, s2.findings, s2.impression, s2.labels) == ("val", "", "Normal chest x-XXXX.", {"No Finding": 1})
    assert img2["frontal"].min() == 0 and img2["frontal"].max() == 255  # 12-bit data scaled to the full range
    assert len(np.unique(img2["frontal"])) > 50

    s3, _ = back["iu-CXR3_IM-1384"]  # its second image is missing: kept with the frontal only
    assert [r.role for r in s3.images] == ["frontal"]

    assert report["skipped"] == {"duplicate_study_id": 1, "image_missing_file": 1,
                                 "report_without_findings_or_impression": 1}
    assert report["flagged"] == {"report_impression_only": 1}
    assert manifest["source_counts"] == {"iu_xray": {"train": 2, "val": 1}}


def test_iu_openi_only_layout_uses_patient_hash_split(tmp_path):
    root = tmp_path / "iu"
    write_iu_xray(root, r2gen=False)
    _, back, report = build("iu_xray", root, tmp_path / "out", shard_size=10)
    assert sorted(back) == ["iu-CXR1", "iu-CXR2", "iu-CXR3"]
    for sid, (study, _) in back.items():
        assert study.split == patient_split(study.patient_id)
    assert [r.view for r in back["iu-CXR1"][0].images] == ["PA", "LATERAL"]
    assert back["iu-CXR3"][0].findings == "Clear lungs."
    assert report["skipped"] == {"image_missing_file": 1, "report_without_findings_or_impression": 1}
