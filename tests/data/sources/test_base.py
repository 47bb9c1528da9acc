"""The shared converter helpers: sections, splits, labels, priors, resizing, the build report."""

import numpy as np
import pytest

from cxrfm.data.schema import Box, GroundedPhrase, ImageRef, Study
from cxrfm.data.sources import SOURCES, get_converter
from cxrfm.data.sources.base import (BuildReport, StudyRecord, choose_views, link_priors, map_to_chexpert,
                                     normalize_view, parse_report_sections, patient_split, resize_study, safe_key)


def test_registry_names_and_errors():
    assert {"synthetic", "iu_xray", "mimic_cxr", "chexpert_plus", "rexgradient", "ms_cxr", "vindr_cxr",
            "chestxray8", "vqa_rad", "slake", "medical_diff_vqa"} <= set(SOURCES)
    with pytest.raises(ValueError, match="allowed: .*mimic_cxr"):
        get_converter("mimic")
    assert get_converter("mimic_cxr").name == "mimic_cxr"


def test_sections_mimic_style_case_insensitive_and_headerless():
    mimic = ("FINAL REPORT\n EXAMINATION: CHEST PA\n CLINICAL INFORMATION: fever\n TECHNIQUE: PA\n"
             " COMPARISON: ___\n FINDINGS: Lungs\n clear.\n IMPRESSION: Normal.")
    assert parse_report_sections(mimic) == {"indication": "fever", "comparison": "___",
                                            "findings": "Lungs clear.", "impression": "Normal."}
    assert parse_report_sections("History: cough. Findings: clear. Conclusion: normal.") == {
        "indication": "cough.", "comparison": "", "findings": "clear.", "impression": "normal."}
    assert parse_report_sections("heart normal")["findings"] == "heart normal"
    assert parse_report_sections(" PA AND LATERAL CHEST: clear.\n IMPRESSION: ok")["findings"] == "clear."
    assert parse_report_sections("") == {"indication": "", "comparison": "", "findings": "", "impression": ""}


def test_patient_split_is_stable_and_proportional():
    splits = [patient_split(f"p{i}") for i in range(3000)]
    assert splits == [patient_split(f"p{i}") for i in range(3000)]  # not Python's salted hash()
    share = {s: splits.count(s) / 3000 for s in ("train", "val", "test")}
    assert 0.76 < share["train"] < 0.84 and 0.07 < share["val"] < 0.13
    assert patient_split("p0") == "train" and patient_split("p1") == "test"  # pinned: a change would move patients
    assert patient_split("p0", (0, 0, 1)) == "test"


def test_map_to_chexpert_values_and_conflicts():
    mapping = {"Effusion": "Pleural Effusion", "pleural fluid": "Pleural Effusion", "Mass": "Lung Lesion", "Hernia": None}
    assert map_to_chexpert({"Effusion": "0.0", "pleural fluid": "-1", "Mass": "", "Hernia": "1"}, mapping) == {
        "Pleural Effusion": -1}
    assert map_to_chexpert({"Effusion": 1.0, "Mass": True}, mapping) == {"Pleural Effusion": 1, "Lung Lesion": 1}
    with pytest.raises(ValueError, match="not 1, 0, -1"):
        map_to_chexpert({"Effusion": "maybe"}, mapping)
    with pytest.raises(ValueError, match="not a CheXpert label"):
        map_to_chexpert({"x": 1}, {"x": "Effusion"})


def test_views_and_priors():
    assert [normalize_view(v) for v in ("PA", "postero_anterior", "AP", "LL", "LATERAL", "", None, "SWIMMERS")] == [
        "PA", "PA", "AP", "LL", "LATERAL", None, None, None]
    assert choose_views([("a", "AP"), ("b", "LL"), ("c", "PA"), ("d", "LATERAL"), ("e", None)]) == {
        "frontal": ("c", "PA"), "lateral": ("d", "LATERAL")}
    recs = [StudyRecord("s3", "p", "train", {}, "2020-03-01"), StudyRecord("s1", "p", "train", {}, "2020-01-01"),
            StudyRecord("s2", "p", "train", {}, None), StudyRecord("q1", "q", "train", {}, "2019-01-01")]
    report = BuildReport()
    link_priors(recs, report)
    assert [r.prior_study_id for r in recs] == ["s1", None, None, None]
    assert report.counts == {"prior_unknown_date": 1}
    assert safe_key("chexpert", "train/patient1/study1.jpg") == "chexpert-train_patient1_study1_jpg"


def test_resize_study_scales_images_refs_and_boxes():
    study = Study(study_id="s", patient_id="p", split="train", source="t",
                  images=[ImageRef(role="frontal", key="frontal.png", view="PA", width=400, height=200),
                          ImageRef(role="lateral", key="lateral.png", view="LATERAL", width=50, height=60)],
                  grounding=[GroundedPhrase(phrase="x", label="Cardiomegaly", boxes=[Box(x1=100, y1=50, x2=300, y2=150)])])
    images = {"frontal": np.full((200, 400), 7, np.uint8), "lateral": np.zeros((60, 50), np.uint8)}
    out, imgs = resize_study(study, images, 100)
    assert imgs["frontal"].shape == (50, 100) and imgs["lateral"].shape == (60, 50)  # never upscaled
    assert (out.images[0].width, out.images[0].height) == (100, 50)
    assert out.grounding[0].boxes[0] == Box(x1=25, y1=12.5, x2=75, y2=37.5)
    assert int(imgs["frontal"].mean()) == 7


def test_build_report_examples_capped_and_merged():
    a, b = BuildReport(), BuildReport()
    for i in range(30):
        a.skip("missing_file", f"x{i}", "gone")
    b.skip("missing_file", "y")
    b.flag("impression_only", "z")
    b.note("rows", 3)
    a.merge(b.to_json())
    j = a.to_json()
    assert j["skipped"] == {"missing_file": 31} and j["skipped_total"] == 31 and j["flagged"] == {"impression_only": 1}
    assert len(j["examples"]["missing_file"]) == 20 and j["notes"] == {"rows": 3}


@pytest.mark.parametrize("name", sorted(set(SOURCES) - {"synthetic"}))
def test_layout_not_found_lists_every_accepted_layout(tmp_path, name):
    converter = get_converter(name)()
    assert converter.layouts, f"{name} declares no accepted layouts"
    with pytest.raises(FileNotFoundError) as err:
        converter.scan(tmp_path, BuildReport())
    message = str(err.value)
    assert str(tmp_path) in message
    for layout in converter.layouts:
        assert layout in message, f"{name}: {layout!r} missing from {message!r}"


def test_readme_real_data_table_lists_every_converter():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    table = readme[readme.index("| source | layouts accepted under `--root` |"):]
    table = table[: table.index("\n\n")]
    assert {row.split("|")[1].strip().strip("`") for row in table.splitlines()[2:]} == set(SOURCES)
