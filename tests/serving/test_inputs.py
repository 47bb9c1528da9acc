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


# ---- decompression bombs and inconsistent files --------------------------------------------------------
def test_dicom_whose_embedded_jpeg_is_larger_than_its_header_is_413_before_decoding(monkeypatch):
    from .conftest import jpeg_dicom_bytes

    assert decode_image(jpeg_dicom_bytes(64, 64, 64), "f").shape == (64, 64)  # a consistent one decodes
    bomb = jpeg_dicom_bytes(3000, 64, 64)  # 9 Mpx inside a header claiming 64x64
    import pydicom

    def no_decoding(self):
        raise AssertionError("pixel data was decoded before its real size was checked")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decoding))
    err = _fails(bomb, 413, "image_too_large", max_pixels=4_000_000)
    assert "3000x3000" in err.message and "64x64" in err.message
    err = _fails(jpeg_dicom_bytes(128, 64, 64), 400, "dicom_inconsistent_size")
    assert "128x128" in err.message


def test_png_decompression_bomb_past_pillows_own_limit_is_413():
    import struct
    import zlib

    from PIL import Image

    side = 20_000  # 400 Mpx: over Pillow's DecompressionBombError threshold, a tiny file
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1) * 4)) + chunk(b"IEND", b""))
    assert side * side > 2 * Image.MAX_IMAGE_PIXELS
    _fails(png, 413, "image_too_large", max_pixels=10**12)  # our limit is not what stops it
    _fails(png, 413, "image_too_large")


@pytest.mark.parametrize("center,width,function", [(2048, 0, None), (2048, 0, "SIGMOID"), (2048, 0.5, None),
                                                   (2048, -10, "LINEAR_EXACT")])
def test_dicom_window_width_that_cannot_be_applied_is_400(center, width, function):
    dcm = dicom_bytes(ramp(), center=center, width=width)
    if function:
        import io

        import pydicom

        ds = pydicom.dcmread(io.BytesIO(dcm))
        ds.VOILUTFunction = function
        buf = io.BytesIO()
        ds.save_as(buf)
        dcm = buf.getvalue()
    err = _fails(dcm, 400, "dicom_bad_window")
    assert "WindowWidth" in err.message


def test_base64_with_line_breaks_is_accepted():
    import base64 as b64

    png = image_bytes()
    wrapped = b64.encodebytes(png).decode()  # what the `base64` tool writes: 76 columns, newlines
    assert "\n" in wrapped.strip() and decode_base64(wrapped, "x") == png
    assert decode_base64(wrapped.replace("\n", "\r\n"), "x") == png
    with pytest.raises(InputError):
        decode_base64(wrapped.replace("\n", "!"), "x")
