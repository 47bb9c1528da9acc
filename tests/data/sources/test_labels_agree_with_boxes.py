"""Across every registered converter's fixture output: no label contradicts a kept box.

A kept box of a CheXpert observation means that finding is there, so the study's label for it must be
positive (or not mentioned, for corpora whose labels come from elsewhere), never 0 or -1, and "No
Finding" must not be 1 next to a box of a finding. A new converter must add its fixture writer here.
"""

from __future__ import annotations

import pytest

from cxrfm.config import DataConfig
from cxrfm.data.schema import CHEXPERT_LABELS
from cxrfm.data.sources import SOURCES, get_converter
from cxrfm.data.sources.base import BuildReport

from . import fixtures_grounding as G
from . import fixtures_labels as L
from . import fixtures_reports as R
from . import fixtures_vqa as V

WRITERS = {
    "synthetic": None,  # generated, no files
    "iu_xray": R.write_iu_xray, "mimic_cxr": R.write_mimic, "chexpert_plus": R.write_chexpert_plus,
    "rexgradient": R.write_rexgradient,
    "ms_cxr": G.write_ms_cxr, "vindr_cxr": G.write_vindr_cxr, "vindr_cxr/boxes_only": G.write_vindr_box_only,
    "chestxray8": G.write_chestxray8,
    "vqa_rad": V.write_vqa_rad, "slake": V.write_slake, "medical_diff_vqa": V.write_medical_diff_vqa,
    "chexpert": L.write_chexpert, "padchest": L.write_padchest, "rsna_pneumonia": L.write_rsna,
    "siim_pneumothorax": L.write_siim,
}


def test_every_registered_converter_has_a_fixture_here():
    assert set(SOURCES) <= {name.split("/")[0] for name in WRITERS}


def contradictions(study) -> list[str]:
    found = []
    boxed = {g.label for g in study.grounding if g.boxes and g.label in CHEXPERT_LABELS}
    for label in sorted(boxed):
        if study.labels.get(label, 1) != 1:
            found.append(f"{study.study_id}: {label} = {study.labels[label]} next to its kept box")
    if boxed - {"Support Devices", "No Finding"} and study.labels.get("No Finding") == 1:
        found.append(f"{study.study_id}: No Finding = 1 next to boxes of {sorted(boxed)}")
    return found


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_no_label_contradicts_a_kept_box(tmp_path, name):
    source = name.split("/")[0]
    cfg = DataConfig(source=source, num_studies=24, image_size=64) if source == "synthetic" else DataConfig()
    converter = get_converter(source)(cfg)
    root = None
    if WRITERS[name] is not None:
        root = tmp_path / "raw"
        WRITERS[name](root)
    report = BuildReport()
    studies = [s for s, _ in converter.load_batch(converter.scan(root, report), report)]
    assert studies, f"{name}: the fixture gave no study"
    assert "converter_error" not in report.counts, report.examples.get("converter_error")
    assert [c for s in studies for c in contradictions(s)] == []
    if name in ("vindr_cxr", "vindr_cxr/boxes_only", "chestxray8", "rsna_pneumonia", "siim_pneumothorax"):
        assert any(g.boxes for s in studies for g in s.grounding), f"{name}: no box to check against"
