"""One image decoder: `cxrfm predict` (and eval) read a file exactly as the data build and serving do."""

from __future__ import annotations

import numpy as np
import pytest

from cxrfm.cli import main
from cxrfm.data.images import read_image
from cxrfm.model.generate import ImageError, load_image
from serving.inputs import decode_study
from tests.data.sources.fixtures_grounding import write_dicom, write_png16


def windowed_monochrome1(path):
    """A 12-bit MONOCHROME1 DICOM with a stored window that covers only part of the values."""
    import pydicom

    write_dicom(path, 48, 40, photometric="MONOCHROME1", seed=3)
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = 1500, 2000
    ds.save_as(path)
    return path


@pytest.fixture
def radiographs(tmp_path):
    png = tmp_path / "sixteen_bit.png"
    write_png16(png, 40, 48, seed=2)  # 12 bits used in a 16-bit PNG
    return {"png16": png, "dicom": windowed_monochrome1(tmp_path / "mono1.dcm")}


@pytest.mark.parametrize("kind", ["png16", "dicom"])
def test_predict_decodes_like_serving_and_the_data_build(radiographs, kind):
    path = radiographs[kind]
    served = decode_study({"frontal": path.read_bytes()}, max_upload_bytes=10**8, max_pixels=10**8)["frontal"]
    predicted = load_image(path, "--image")
    np.testing.assert_array_equal(predicted, served)
    np.testing.assert_array_equal(load_image(path.read_bytes(), "--image"), served)  # bytes too (eval's path)
    np.testing.assert_array_equal(read_image(path), served)  # the converters' reader
    assert predicted.dtype == np.uint8 and len(np.unique(predicted)) > 50  # not saturated to one value


def test_sixteen_bit_png_uses_its_range_and_dicom_its_window(radiographs):
    png = load_image(radiographs["png16"])
    assert (png.min(), png.max()) == (0, 255)  # scaled by its real range, not clipped at 255
    dcm = load_image(radiographs["dicom"])
    # MONOCHROME1: raw values grow to the right, so the displayed image darkens to the right; values
    # beyond the window (centre 1500, width 2000: 500..2500) are clipped, so both ends saturate.
    assert dcm[:, :4].mean() > dcm[:, -4:].mean() + 100
    assert dcm.min() == 0 and dcm.max() == 255


def test_predict_errors_name_the_file_and_the_reason(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image at all")
    with pytest.raises(ImageError, match=r"--image: .*notes.txt: not a PNG, JPEG or DICOM file"):
        load_image(tmp_path / "notes.txt", "--image")
    with pytest.raises(ImageError, match=r"--image: .*missing.png: file not found"):
        load_image(tmp_path / "missing.png", "--image")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from serving.cli import build_untrained_export

    return build_untrained_export(tmp_path_factory.mktemp("export") / "export")


@pytest.mark.parametrize("kind", ["png16", "dicom"])
def test_cxrfm_predict_answers_as_on_the_served_image(tiny_export, radiographs, kind, capsys):
    """`cxrfm predict --image FILE` gives the report the model gives on serving's decoding of FILE."""
    from cxrfm.model.generate import GenerationOptions, Predictor

    path = radiographs[kind]
    assert main(["predict", str(tiny_export), "--task", "report", "--image", str(path), "--max-new-tokens", "6"]) == 0
    cli_text = capsys.readouterr().out.strip()
    served = decode_study({"frontal": path.read_bytes()}, max_upload_bytes=10**8, max_pixels=10**8)
    expected = Predictor(tiny_export).report(served, "", GenerationOptions(max_new_tokens=6)).text
    assert cli_text == expected.strip()
