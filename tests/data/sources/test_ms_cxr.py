import pytest

from cxrfm.data.sources import get_converter
from cxrfm.data.sources.base import BuildReport
from tests.data.sources.built import build
from tests.data.sources.fixtures_grounding import MS_A, MS_B, MS_E, MS_F, write_ms_cxr


@pytest.fixture
def converted(tmp_path):
    """(manifest, studies read back from the shards by id, build_report.json) of a real `cxrfm data build`."""
    write_ms_cxr(tmp_path / "raw")
    return build("ms_cxr", tmp_path / "raw", tmp_path / "shards")


def test_phrases_boxes_and_labels_survive_the_shards(converted):
    _, back, _ = converted
    assert set(back) == {f"ms_cxr-{d}" for d in (MS_A, MS_B, MS_E, MS_F)}
    a = back[f"ms_cxr-{MS_A}"][0]
    assert (a.source, a.patient_id, a.license.startswith("PhysioNet")) == ("ms_cxr", "10000032", True)
    assert [(im.role, im.view, im.width, im.height) for im in a.images] == [("frontal", "PA", 80, 64)]
    phrases = {g.phrase: g for g in a.grounding}
    pneumonia = phrases["Bibasilar opacities concerning for pneumonia"]
    assert pneumonia.label == "Pneumonia" and pneumonia.image_role == "frontal"
    assert [(b.x1, b.y1, b.x2, b.y2) for b in pneumonia.boxes] == [(4, 30, 24, 50), (50, 32, 72, 50)]
    assert [(b.x1, b.y1, b.x2, b.y2) for b in phrases["The heart is enlarged"].boxes] == [(25, 20, 55, 50)]
    assert a.labels == {"Pneumonia": 1, "Cardiomegaly": 1}
    assert a.source_labels == {"Pneumonia": "1", "Cardiomegaly": "1"}
    assert a.findings == "" and a.vqa == []
    assert back[f"ms_cxr-{MS_A}"][1]["frontal"].shape == (64, 80)


def test_boxes_outside_the_image_are_clipped_or_dropped(converted):
    _, back, report = converted
    b = back[f"ms_cxr-{MS_B}"][0]
    assert [g.phrase for g in b.grounding] == ["Small left pleural effusion"]  # the pneumothorax box was outside
    assert [(x.x1, x.y1, x.x2, x.y2) for x in b.grounding[0].boxes] == [(60, 40, 80, 64)]
    assert b.labels == {"Pleural Effusion": 1, "Pneumothorax": 1}  # the finding is still positive
    assert report["flagged"]["box_partly_outside_clipped"] == 1
    assert report["skipped"]["box_outside_image"] == 1
    assert report["skipped"]["phrase_without_boxes"] == 1


def test_boxes_follow_a_downsized_copy_of_the_image(converted):
    _, back, _ = converted
    e = back[f"ms_cxr-{MS_E}"][0]  # annotated on 160x128, stored at 80x64
    assert (e.images[0].width, e.images[0].height) == (80, 64)
    assert [(x.x1, x.y1, x.x2, x.y2) for x in e.grounding[0].boxes] == [(10, 20, 30, 40)]


def test_official_split_and_no_patient_in_two_splits(converted):
    _, back, report = converted
    splits = {sid: s.split for sid, (s, _) in back.items()}
    # A (train) and F (test) belong to one patient: both end in test, and the move is counted
    assert splits[f"ms_cxr-{MS_A}"] == splits[f"ms_cxr-{MS_F}"] == "test"
    assert splits[f"ms_cxr-{MS_B}"] == "val" and splits[f"ms_cxr-{MS_E}"] == "train"
    assert report["flagged"]["patient_in_several_splits_moved"] == 1
    patients = {}
    for s, _ in back.values():
        patients.setdefault(s.patient_id, set()).add(s.split)
    assert all(len(v) == 1 for v in patients.values())


def test_report_counts_every_problem(converted):
    _, _, report = converted
    assert report["skipped"] == {"box_outside_image": 1, "duplicate_row": 1, "image_corrupt_image": 1,
                                 "image_missing_file": 1, "phrase_without_boxes": 1}
    assert report["flagged"] == {"box_partly_outside_clipped": 1, "patient_in_several_splits_moved": 1,
                                 "view_unknown_assumed_pa": 5}  # no MIMIC metadata file in this copy
    assert report["notes"]["ms_cxr_rows"] == 10 and report["notes"]["studies_written"] == 4


def test_missing_annotation_file_names_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="MS_CXR_Local_Alignment"):
        get_converter("ms_cxr")().scan(tmp_path, BuildReport())


def test_coco_style_json_gives_the_same_records(tmp_path):
    """The v1.1.0 JSON (COCO style: images with file_name/path/width/height, annotations with an [x, y, w, h]
    bbox, label_text, category_id and split) describes the same boxes as the CSV."""
    import csv
    import json

    from tests.data.sources.fixtures_grounding import MS_CXR_CSV

    write_ms_cxr(tmp_path)
    with open(tmp_path / MS_CXR_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    categories = sorted({r["category_name"] for r in rows})
    images = {}
    for r in rows:
        images.setdefault(r["dicom_id"], {"id": len(images) + 1, "file_name": f"{r['dicom_id']}.jpg", "path": r["path"],
                                          "width": int(r["image_width"]), "height": int(r["image_height"])})
    coco = {"info": {"version": "1.1.0"}, "images": list(images.values()),
            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(categories)],
            "annotations": [{"id": i + 1, "image_id": images[r["dicom_id"]]["id"],
                             "category_id": categories.index(r["category_name"]) + 1, "label_text": r["label_text"],
                             "bbox": [float(r[k]) for k in ("x", "y", "w", "h")], "split": r["split"]}
                            for i, r in enumerate(rows)]}
    from_csv = get_converter("ms_cxr")().scan(tmp_path, BuildReport())
    (tmp_path / MS_CXR_CSV).unlink()
    (tmp_path / "MS_CXR_Local_Alignment_v1.1.0.json").write_text(json.dumps(coco))
    from_json = get_converter("ms_cxr")().scan(tmp_path, BuildReport())
    assert [(r.study_id, r.split, r.payload["phrases"]) for r in from_json] == \
           [(r.study_id, r.split, r.payload["phrases"]) for r in from_csv]


def test_mimic_metadata_gives_views_and_dates(tmp_path):
    import gzip

    write_ms_cxr(tmp_path / "raw")
    with gzip.open(tmp_path / "raw" / "mimic-cxr-2.0.0-metadata.csv.gz", "wt") as f:
        f.write("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate\n")
        f.write(f"{MS_A},10000032,50414267,CHEST (PA AND LAT),AP,64,80,21800506.0\n")
    _, back, report = build("ms_cxr", tmp_path / "raw", tmp_path / "shards")
    a = back[f"ms_cxr-{MS_A}"][0]
    assert (a.images[0].view, a.study_date) == ("AP", "2180-05-06")
    assert "ms_cxr_view" not in report["notes"] and report["flagged"]["view_unknown_assumed_pa"] == 4
