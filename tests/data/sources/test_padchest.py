"""PadChest through the real `cxrfm data build` path."""

import pytest

from cxrfm.data.sources import get_converter
from cxrfm.data.sources.base import BuildReport, patient_split

from .built import build
from .fixtures_labels import PC_P1, write_padchest


def test_padchest_views_labels_report_and_priors(tmp_path):
    write_padchest(tmp_path / "raw")
    _, back, report = build("padchest", tmp_path / "raw", tmp_path / "out")
    assert sorted(back) == ["padchest-S1", "padchest-S2", "padchest-S5"]
    s1, img1 = back["padchest-S1"]
    assert s1.split == patient_split(f"padchest-{PC_P1}") and s1.patient_id == PC_P1
    assert [(r.role, r.view) for r in s1.images] == [("frontal", "PA"), ("lateral", "LATERAL")]
    assert s1.findings == "cardiomegalia . derrame pleural izquierdo . marcapasos ." and s1.impression == ""
    assert s1.labels == {"Cardiomegaly": 1, "Pleural Effusion": 1, "Support Devices": 1}
    assert s1.source_labels["padchest_labels"] == "cardiomegaly; pleural effusion; pacemaker; aortic elongation"
    assert img1["frontal"].min() == 0 and img1["frontal"].max() == 255  # 12-bit PNG scaled to the full range
    s2, img2 = back["padchest-S2"]
    assert s2.labels == {"No Finding": 1} and s2.study_date == "2010-04-02"
    assert s2.prior_study_id == "padchest-S1" and [r.role for r in s2.images] == ["frontal", "prior"]
    s5, img5 = back["padchest-S5"]  # lateral only: kept as a lateral
    assert [(r.role, r.view) for r in s5.images] == [("lateral", "LATERAL")] and s5.labels == {"Atelectasis": 1}
    assert report["skipped"] == {"image_missing_file": 1, "image_projection_not_used": 1,
                                 "study_without_usable_image": 2}
    assert report["flagged"] == {"label_without_chexpert_counterpart": 1, "study_lateral_only": 1}


def test_layout_not_found_names_the_table(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"PADCHEST_chest_x_ray_images_labels_160K\*\.csv"):
        get_converter("padchest")().scan(tmp_path, BuildReport())
