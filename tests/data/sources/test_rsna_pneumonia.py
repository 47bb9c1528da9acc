"""RSNA Pneumonia through the real `cxrfm data build` path."""

import pytest

from cxrfm.data.sources import get_converter
from cxrfm.data.sources.base import BuildReport

from .built import build
from .fixtures_labels import RSNA_A, RSNA_B, RSNA_C, write_rsna


def test_rsna_boxes_labels_and_views_from_dicom(tmp_path):
    write_rsna(tmp_path / "raw")
    _, back, report = build("rsna_pneumonia", tmp_path / "raw", tmp_path / "out")
    assert sorted(back) == sorted(f"rsna_pneumonia-{p}" for p in (RSNA_A, RSNA_B, RSNA_C))
    a = back[f"rsna_pneumonia-{RSNA_A}"][0]
    assert a.labels == {"No Finding": 1, "Lung Opacity": 0, "Pneumonia": 0} and a.grounding == []
    assert ("is there pneumonia?", "no") in {(q.question, q.answer) for q in a.vqa}
    b = back[f"rsna_pneumonia-{RSNA_B}"][0]
    assert [(r.role, r.view) for r in b.images] == [("frontal", "AP")]  # from the DICOM's ViewPosition
    assert b.labels == {"No Finding": 0, "Lung Opacity": 1, "Pneumonia": -1}
    assert [(g.phrase, g.label, [(x.x1, x.y1, x.x2, x.y2) for x in g.boxes]) for g in b.grounding] == [
        ("lung opacity", "Lung Opacity", [(10, 12, 26, 42), (40, 14, 54, 42)])]
    c = back[f"rsna_pneumonia-{RSNA_C}"][0]
    assert c.images[0].view == "PA" and [(x.x1, x.x2) for x in c.grounding[0].boxes] == [(50, 64)]  # clipped
    assert report["skipped"] == {"image_missing_file": 1}
    assert report["flagged"] == {"box_partly_outside_clipped": 1}


def test_layout_not_found_names_the_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="stage_2_train_labels.csv .* stage_2_train_images"):
        get_converter("rsna_pneumonia")().scan(tmp_path, BuildReport())
