import numpy as np
import pytest

from cxrfm.data.sources import get_converter
from cxrfm.data.sources.base import BuildReport
from tests.data.sources.built import build
from tests.data.sources.fixtures_grounding import write_chestxray8


@pytest.fixture
def converted(tmp_path):
    """(manifest, studies read back by id, build_report.json, the fixture's raw pixels)."""
    pixels = write_chestxray8(tmp_path / "raw")["pixels"]
    return (*build("chestxray8", tmp_path / "raw", tmp_path / "shards"), pixels)


def test_labels_boxes_and_16bit_png(converted):
    _, back, _, pixels = converted
    s, images = back["chestxray8-00000001_000"]
    assert (s.source, s.patient_id, s.split in ("train", "val")) == ("chestxray8", "1", True)
    assert s.license.startswith("NIH Clinical Center")
    assert [(im.role, im.view, im.width, im.height) for im in s.images] == [("frontal", "PA", 64, 64)]
    assert s.labels["Cardiomegaly"] == s.labels["Pleural Effusion"] == 1
    assert s.labels["No Finding"] == 0 and s.labels["Lung Lesion"] == 0 and "Support Devices" not in s.labels
    assert s.source_labels == {"Cardiomegaly": "1", "Effusion": "1"}
    # the 1024-frame box (x=320, y=400.5, w=384, h=256) scaled to the stored 64x64 image
    [g] = s.grounding
    assert (g.phrase, g.label) == ("cardiomegaly", "Cardiomegaly")
    assert [(b.x1, b.y1, b.x2, b.y2) for b in g.boxes] == [(20, 25.03125, 44, 41.03125)]
    # a 12-bit range in a 16-bit PNG is stretched to 0..255, not clipped to white
    raw = pixels["00000001_000.png"].astype(np.float32)
    expected = np.clip((raw - raw.min()) / (raw.max() - raw.min()) * 255 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(images["frontal"], expected)


def test_test_list_and_boxes_outside(converted):
    _, back, _, _ = converted
    s = back["chestxray8-00000002_000"][0]
    assert s.split == "test" and s.images[0].view == "AP"
    assert s.labels["Lung Opacity"] == 1 and s.labels["Pneumonia"] == 1
    # "Infiltrate" box partly outside: clipped; the pneumonia box starts beyond the image: dropped
    assert [(g.phrase, g.label, [(b.x1, b.y1, b.x2, b.y2) for b in g.boxes]) for g in s.grounding] == [
        ("infiltration", "Lung Opacity", [(50, 32, 64, 50.75)])]
    normal = back["chestxray8-00000001_001"][0]
    assert normal.labels["No Finding"] == 1 and normal.grounding == []
    assert normal.split == back["chestxray8-00000001_000"][0].split  # one patient, one split


def test_report_counts_every_problem(converted):
    _, back, report, _ = converted
    assert sorted(back) == ["chestxray8-00000001_000", "chestxray8-00000001_001", "chestxray8-00000002_000",
                            "chestxray8-00000006_000"]
    assert report["skipped"] == {"box_outside_image": 1, "duplicate_study_id": 1, "image_corrupt_image": 1,
                                 "image_missing_file": 1, "not_in_official_split": 1, "phrase_without_boxes": 1}
    assert report["flagged"] == {"box_partly_outside_clipped": 1}
    assert report["notes"]["chestxray8_entries"] == 8


def test_images_are_found_in_any_folder_below_root(converted):
    _, back, _, _ = converted
    s = back["chestxray8-00000006_000"][0]  # stored under images_002/images/, as Kaggle copies are
    assert s.split == "train" and s.labels["Lung Lesion"] == 1
    assert [(g.phrase, g.label, [(b.x1, b.y1, b.x2, b.y2) for b in g.boxes]) for g in s.grounding] == [
        ("nodule", "Lung Lesion", [(32, 16, 36, 20)])]


def test_missing_split_lists_name_what_to_do(tmp_path):
    write_chestxray8(tmp_path)
    (tmp_path / "test_list.txt").unlink()
    (tmp_path / "train_val_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match="train_val_list.txt"):
        get_converter("chestxray8")().scan(tmp_path, BuildReport())
