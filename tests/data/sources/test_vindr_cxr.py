import pytest

from cxrfm.data.sources import get_converter
from cxrfm.data.sources.base import BuildReport

from tests.data.sources.built import build
from tests.data.sources.fixtures_grounding import V1, V2, V3, V6, write_vindr_cxr


@pytest.fixture
def converted(tmp_path):
    """(manifest, studies read back from the shards by id, build_report.json) of a real `cxrfm data build`."""
    write_vindr_cxr(tmp_path / "raw")
    return build("vindr_cxr", tmp_path / "raw", tmp_path / "shards")


def boxes(study):
    return {g.phrase: [(b.x1, b.y1, b.x2, b.y2) for b in g.boxes] for g in study.grounding}


def test_reader_consensus_boxes_and_labels(converted):
    _, back, _ = converted
    s = back[f"vindr_cxr-{V1}"][0]
    assert (s.source, s.patient_id, s.split in ("train", "val")) == ("vindr_cxr", V1, True)
    assert s.license.startswith("PhysioNet Credentialed Health Data License")
    assert [(im.role, im.view, im.width, im.height) for im in s.images] == [("frontal", "PA", 80, 64)]
    # three overlapping cardiomegaly boxes -> their mean; two effusion boxes (2 of 3 readers) -> their mean;
    # the nodule drawn by one reader only is not a box
    assert boxes(s) == {"cardiomegaly": [(20, 30, 60, 51)], "pleural effusion": [(5.5, 40.5, 20.5, 60.5)]}
    assert {g.phrase: g.label for g in s.grounding} == {"cardiomegaly": "Cardiomegaly",
                                                         "pleural effusion": "Pleural Effusion"}
    assert s.labels["Cardiomegaly"] == 1 and s.labels["Pleural Effusion"] == 1
    assert s.labels["Lung Lesion"] == -1  # one reader of three: uncertain
    assert s.labels["No Finding"] == 0 and s.labels["Pneumothorax"] == 0
    assert s.source_labels == {"Cardiomegaly": "3/3", "Nodule/Mass": "1/3", "Other diseases": "1/3",
                               "Pleural effusion": "2/3"}
    assert s.findings == "" and s.impression == ""


def test_no_finding_and_monochrome1(converted):
    _, back, _ = converted
    normal, images = back[f"vindr_cxr-{V2}"]
    img2 = images["frontal"]
    assert normal.grounding == [] and normal.labels["No Finding"] == 1 and normal.labels["Cardiomegaly"] == 0
    # the fixture's raw values grow to the right: MONOCHROME2 shows that, MONOCHROME1 (V1) is inverted
    img1 = back[f"vindr_cxr-{V1}"][1]["frontal"]
    assert img2[:, -8:].mean() > img2[:, :8].mean() + 100
    assert img1[:, :8].mean() > img1[:, -8:].mean() + 100


def test_test_split_boxes_clipped_or_dropped(converted):
    _, back, _ = converted
    s = back[f"vindr_cxr-{V3}"][0]
    assert s.split == "test"
    assert boxes(s) == {"aortic enlargement": [(30, 10, 45, 30)], "pleural effusion": [(60, 40, 80, 64)]}
    assert s.labels["Pneumothorax"] == 1 and s.labels["Enlarged Cardiomediastinum"] == 1
    assert s.source_labels["Other diseases"] == "1/1"  # the test CSV's "Other disease" spelling is unified
    assert back[f"vindr_cxr-{V6}"][0].split == "test"  # listed in train and test: kept in test


def test_report_counts_every_problem(converted):
    manifest, back, report = converted
    assert len(back) == 4 and sum(sh["samples"] for sh in manifest["shards"]) == 4
    assert report["skipped"] == {"box_outside_image": 1, "box_without_reader_majority": 1, "duplicate_study_id": 1,
                                 "image_corrupt_dicom": 1, "image_missing_file": 1, "phrase_without_boxes": 1}
    assert report["flagged"] == {"box_partly_outside_clipped": 1}


def test_boxes_follow_the_stored_image_size(tmp_path):
    write_vindr_cxr(tmp_path / "raw")
    _, back, _ = build("vindr_cxr", tmp_path / "raw", tmp_path / "shards", image_size=40)  # 80x64 -> 40x32
    s, images = back[f"vindr_cxr-{V1}"]
    assert images["frontal"].shape == (32, 40) and (s.images[0].width, s.images[0].height) == (40, 32)
    assert boxes(s)["cardiomegaly"] == [(10, 15, 30, 25.5)]


def test_official_train_never_lands_in_test(converted):
    _, back, _ = converted
    assert all(s.split in ("train", "val") for s, _ in back.values() if s.study_id in (f"vindr_cxr-{V1}",
                                                                                        f"vindr_cxr-{V2}"))


def test_test_set_boxes_are_kept_as_given_whatever_their_reader(tmp_path):
    write_vindr_cxr(tmp_path)
    ann = tmp_path / "annotations" / "annotations_test.csv"
    ann.write_text(f"image_id,rad_id,class_name,x_min,y_min,x_max,y_max\n"
                   f"{V3},R11,Nodule/Mass,10,10,20,20\n{V3},R12,Nodule/Mass,12,12,22,22\n"
                   f"{V3},R13,Atelectasis,5,5,9,9\n")
    report = BuildReport()
    [record] = [r for r in get_converter("vindr_cxr")().scan(tmp_path, report) if r.study_id == f"vindr_cxr-{V3}"]
    assert record.payload["boxes"] == {"Nodule/Mass": [[10, 10, 20, 20], [12, 12, 22, 22]],
                                       "Atelectasis": [[5, 5, 9, 9]]}
    assert report.counts["box_without_reader_majority"] == 1  # the train nodule only


def test_box_only_layout_derives_labels_from_the_readers_and_says_so(tmp_path):
    from tests.data.sources.fixtures_grounding import K1, K2, K3, write_vindr_box_only

    write_vindr_box_only(tmp_path / "raw")
    _, back, report = build("vindr_cxr", tmp_path / "raw", tmp_path / "shards")
    assert report["notes"]["vindr_cxr_layout"] == "boxes_only"
    assert report["notes"]["vindr_cxr_labels"].startswith("derived_from_boxes")
    assert report["flagged"]["labels_derived_from_boxes"] == 3
    s1 = back[f"vindr_cxr-{K1}"][0]
    assert boxes(s1) == {"cardiomegaly": [(20, 30, 60, 51)], "pleural effusion": [(5.5, 40.5, 20.5, 60.5)]}
    assert (s1.labels["Cardiomegaly"], s1.labels["Pleural Effusion"], s1.labels["Lung Lesion"]) == (1, 1, -1)
    assert s1.labels["No Finding"] == 0 and s1.labels["Pneumothorax"] == 0
    assert "Pneumonia" not in s1.labels  # a global label: not in the box file, so not claimed negative
    s2 = back[f"vindr_cxr-{K2}"][0]
    assert s2.labels["No Finding"] == 1 and s2.labels["Cardiomegaly"] == 0 and s2.grounding == []
    s3 = back[f"vindr_cxr-{K3}"][0]  # two of three readers: positive, although their boxes do not agree
    assert s3.labels["Pneumothorax"] == 1 and s3.labels["No Finding"] == 0 and s3.grounding == []
    assert report["skipped"]["box_without_reader_majority"] == 3  # the nodule and the two pneumothorax boxes


def test_a_weaker_image_label_is_raised_to_match_a_kept_box(tmp_path):
    write_vindr_cxr(tmp_path)
    labels = tmp_path / "annotations" / "image_labels_train.csv"
    rows = labels.read_text().splitlines()
    header = rows[0].split(",")
    col = header.index("Pleural effusion")
    for i, line in enumerate(rows):
        cells = line.split(",")
        if cells[0] == V1 and cells[1] == "R9":
            cells[col] = "0"  # only one reader's image label keeps the effusion that two readers boxed
            rows[i] = ",".join(cells)
    labels.write_text("\n".join(rows) + "\n")
    report = BuildReport()
    [rec] = [r for r in get_converter("vindr_cxr")().scan(tmp_path, report) if r.study_id == f"vindr_cxr-{V1}"]
    assert rec.payload["labels"]["Pleural effusion"] == 1
    assert report.flagged == {"label_raised_to_match_box": 1}


def test_layout_not_found_lists_both_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="PhysioNet 1.0.0.*detection challenge: train.csv"):
        get_converter("vindr_cxr")().scan(tmp_path, BuildReport())
