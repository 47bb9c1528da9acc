"""Image decoding and validation: PNG, JPEG, DICOM (windowing, MONOCHROME1), and every bad-input case."""

import base64

import numpy as np
import pytest

from cxrfm.serving.inputs import InputError, decode_base64, decode_image, decode_study

from .conftest import dicom_bytes, image_bytes, ramp


def _fails(data: bytes, status: int, code: str, **kw) -> InputError:
    with pytest.raises(InputError) as e:
        decode_image(data, "images.frontal", **kw)
    assert (e.value.status, e.value.code, e.value.field) == (status, code, "images.frontal")
    assert "images.frontal" in e.value.message
    return e.value


def test_png_and_jpeg_decode_to_grayscale():
    png = decode_image(image_bytes("PNG"), "f")
    assert png.dtype == np.uint8 and png.shape == (96, 96)
    assert decode_image(image_bytes("JPEG"), "f").shape == (96, 96)


def test_16_bit_png_is_scaled_not_clipped():
    img = decode_image(image_bytes("PNG", mode="I;16"), "f")
    assert img.max() == 255 and img.min() == 0 and len(np.unique(img)) > 100


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_window_and_photometric_interpretation(photometric):
    img = decode_image(dicom_bytes(ramp(), photometric, center=2048, width=1024), "f")
    row = img[0].astype(int)
    # The stored window [1536, 2560] maps to 0..255: values below are black, above white.
    lo, hi = row[:20], row[-20:]  # columns 0..1300 and 2800..4095
    if photometric == "MONOCHROME1":  # stored inverted: bright means low attenuation
        lo, hi, row = 255 - lo, 255 - hi, 255 - row
    assert (lo == 0).all() and (hi == 255).all()
    assert np.all(np.diff(row) >= 0) and 0 < row[32] < 255


def test_dicom_without_window_uses_full_range():
    img = decode_image(dicom_bytes(ramp()), "f")
    assert img[0, 0] == 0 and img[0, -1] == 255


def test_dicom_without_pixel_data():
    err = _fails(dicom_bytes(ramp(), pixels=False), 400, "dicom_without_pixels")
    assert "pixel data" in err.message


def test_truncated_files_are_400():
    for fmt in ("PNG", "JPEG"):
        data = image_bytes(fmt, size=128)
        _fails(data[: len(data) // 2], 400, "corrupt_image")
    dcm = dicom_bytes(ramp())
    _fails(dcm[: len(dcm) - 2000], 400, "corrupt_dicom")
    _fails(dcm[:200], 400, "dicom_without_pixels")  # cut inside the header: what is there has no pixels


def test_not_an_image_is_415_and_empty_is_400():
    _fails(b"%PDF-1.4 not an x-ray", 415, "unsupported_image_type")
    _fails(b"GIF89a" + bytes(100), 415, "unsupported_image_type")
    _fails(b"", 400, "empty_image")


def test_pixel_limits():
    _fails(image_bytes("PNG", size=96), 413, "image_too_large", max_pixels=90 * 90)
    _fails(dicom_bytes(ramp(64)), 413, "image_too_large", max_pixels=1000)
    _fails(image_bytes("PNG", size=8), 400, "image_too_small")


def test_base64_and_study_rules():
    png = image_bytes()
    assert decode_base64(base64.b64encode(png).decode(), "x") == png
    assert decode_base64("data:image/png;base64," + base64.b64encode(png).decode(), "x") == png
    with pytest.raises(InputError, match="base64") as e:
        decode_base64("not base64 !!", "images.frontal")
    assert e.value.status == 400
    study = decode_study({"lateral": png, "prior": png}, 10**6, 10**7)
    assert set(study) == {"lateral", "prior"}
    with pytest.raises(InputError, match="frontal or a lateral") as e:
        decode_study({"prior": png}, 10**6, 10**7)
    assert e.value.status == 400
    with pytest.raises(InputError, match="limit") as e:
        decode_study({"frontal": png, "lateral": png}, len(png) + 10, 10**7)
    assert e.value.status == 413
