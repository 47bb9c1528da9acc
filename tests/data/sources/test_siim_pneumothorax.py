"""SIIM-ACR Pneumothorax through the real `cxrfm data build` path, and its RLE decoding."""

import numpy as np
import pytest

from cxrfm.data.sources import get_converter
from cxrfm.data.sources.base import BuildReport
from cxrfm.data.sources.siim_pneumothorax import decode_rle, mask_boxes

from .built import build
from .fixtures_labels import SIIM_A, SIIM_B, encode_rle, write_siim


def test_rle_is_column_major_and_relative():
    # a 4x3 image: column 0 rows 1-2, then column 2 rows 0-3 (flat column-major 1,2 then 8..11)
    mask = decode_rle("1 2 5 4", height=4, width=3)
    expected = np.zeros((4, 3), bool)
    expected[1:3, 0] = True
    expected[:, 2] = True
    np.testing.assert_array_equal(mask, expected)
    assert encode_rle(expected) == "1 2 5 4"
    assert mask_boxes(mask) == [(0, 1, 1, 3), (2, 0, 3, 4)]
    with pytest.raises(ValueError, match="leaves the 3x4 image"):
        decode_rle("10 5", height=4, width=3)


def test_siim_masks_become_boxes_and_views_come_from_dicom(tmp_path):
    info = write_siim(tmp_path / "raw")
    _, back, report = build("siim_pneumothorax", tmp_path / "raw", tmp_path / "out")
    assert sorted(back) == sorted(f"siim_pneumothorax-{i}".replace(".", "_") for i in (SIIM_A, SIIM_B))
    a = back[f"siim_pneumothorax-{SIIM_A}".replace(".", "_")][0]
    assert a.labels == {"Pneumothorax": 0} and a.grounding == [] and a.patient_id.startswith("17d405a3")
    b = back[f"siim_pneumothorax-{SIIM_B}".replace(".", "_")][0]
    assert b.labels == {"Pneumothorax": 1} and b.images[0].view == "PA"
    assert sorted((x.x1, x.y1, x.x2, x.y2) for x in b.grounding[0].boxes) == info["boxes"][SIIM_B]
    assert report["skipped"] == {"image_missing_file": 1}


def test_layout_not_found_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-rle.csv .ImageId, EncodedPixels"):
        get_converter("siim_pneumothorax")().scan(tmp_path, BuildReport())
