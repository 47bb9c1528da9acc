"""Image bytes -> (H, W) uint8 grayscale arrays: the one decoder for data building and serving.

Formats are recognised by their signature, never by a file name or a client's content type: PNG, JPEG and
DICOM (Part 10, "DICM" after the 128-byte preamble). DICOM pixels go through the modality LUT (rescale
slope/intercept), then the stored VOI windowing (WindowCenter/WindowWidth with its VOILUTFunction, or a
VOI LUT sequence), and MONOCHROME1 is inverted so that bone is always bright. 16-bit PNGs are scaled, not
clipped. Every failure is an ImageDecodeError carrying an HTTP-style status (400 bad content, 413 too large,
415 not a supported format), a short code and the field (or file) it came from; nothing here lets a decoder
exception escape. Serving re-exports it as InputError; converters turn it into a counted skip.
"""

from __future__ import annotations

import io
import math
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

PNG_SIG = b"\x89PNG\r\n\x1a\n"
JPEG_SIG = b"\xff\xd8\xff"
MIN_SIDE = 16
MAX_IMAGE_PIXELS = 100_000_000  # a file on disk (a 43x43 cm detector at 0.1 mm is ~19 MP); serving sets its own


class ImageDecodeError(ValueError):
    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def sniff(data: bytes) -> str | None:
    if data.startswith(PNG_SIG):
        return "png"
    if data.startswith(JPEG_SIG):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def _to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    arr = arr.astype(np.float32)
    lo = float(arr.min()) if lo is None else lo
    hi = float(arr.max()) if hi is None else hi
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.clip((arr - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _check_pixels(width: int, height: int, field: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(413, "image_too_large", f"{field}: {width}x{height} pixels is over the limit of "
                         f"{max_pixels} pixels; downsample it before sending", field)
    if min(width, height) < MIN_SIDE:
        raise ImageDecodeError(400, "image_too_small", f"{field}: {width}x{height} pixels; at least "
                         f"{MIN_SIDE}x{MIN_SIDE} is needed", field)


def _decode_pil(data: bytes, kind: str, field: str, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: our own pixel limit applies
            im = Image.open(io.BytesIO(data))
            _check_pixels(im.width, im.height, field, max_pixels)  # before decoding a single pixel
            im.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError:  # PIL's own limit, hit in open() before ours: still "too large"
        raise ImageDecodeError(413, "image_too_large", f"{field}: the image declares more pixels than "
                               f"{max_pixels}; downsample it before sending", field) from None
    except ValueError as e:
        if "Decompressed Data Too Large" in str(e):  # a compressed text/ICC chunk that inflates past PIL's cap
            raise ImageDecodeError(413, "image_too_large", f"{field}: a compressed chunk of the {kind.upper()} file "
                                   "inflates past the decoder's limit; strip its metadata", field) from None
        raise ImageDecodeError(400, "corrupt_image", f"{field}: the {kind.upper()} data cannot be decoded "
                               f"(truncated or corrupt: {type(e).__name__})", field) from None
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for bad data
        raise ImageDecodeError(400, "corrupt_image", f"{field}: the {kind.upper()} data cannot be decoded "
                         f"(truncated or corrupt: {type(e).__name__})", field) from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _to_uint8(np.asarray(im))  # 16-bit radiographs: use their full range
    return np.asarray(im.convert("L"), dtype=np.uint8)


def _window(arr: np.ndarray, center: float, width: float, function: str, field: str = "image") -> np.ndarray:
    """VOI windowing to [0, 1] per DICOM PS3.3 C.11.2.1.2 (width >= 1 for LINEAR, > 0 otherwise)."""
    least = 1.0 if function not in ("SIGMOID", "LINEAR_EXACT") else 0.0
    if not (math.isfinite(center) and math.isfinite(width)) or width < least or (least == 0.0 and width <= 0):
        raise ImageDecodeError(400, "dicom_bad_window", f"{field}: WindowCenter {center} / WindowWidth {width} is not a "
                               f"valid {function} window (the width must be {'>= 1' if least else '> 0'}); fix or "
                               "remove the stored window", field)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (arr - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((arr - center) / width + 0.5, 0.0, 1.0)
    return np.clip((arr - (center - 0.5)) / (width - 1.0 if width > 1 else 1.0) + 0.5, 0.0, 1.0)


def _first(value) -> float:
    try:
        return float(value[0])  # multi-valued: the first window is the default one
    except TypeError:
        return float(value)


def _check_deflated(data: bytes, field: str, max_pixels: int) -> None:
    """A deflated dataset is inflated whole by pydicom: inflate it here first, bounded (8 bytes a pixel
    is far more than any grayscale dataset with its header needs), so a zip bomb is a 413, not an OOM."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        meta = pydicom.filereader.read_file_meta_info(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - dcmread reports the malformed file itself
        return
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    start = data.index(b"DICM") + 4  # meta group: tag (2+2) VR "UL" len(2) value(4) = group length
    if data[start:start + 6] != b"\x02\x00\x00\x00UL":
        raise ImageDecodeError(400, "corrupt_dicom", f"{field}: a deflated DICOM needs its File Meta group length "
                               "(0002,0000)", field)
    group_len = int.from_bytes(data[start + 8:start + 12], "little")
    inflater, limit = zlib.decompressobj(-zlib.MAX_WBITS), 8 * max_pixels + 2**20
    try:
        inflater.decompress(data[start + 12 + group_len:], limit)
    except zlib.error:
        raise ImageDecodeError(400, "corrupt_dicom", f"{field}: the deflated DICOM dataset cannot be inflated",
                               field) from None
    if inflater.unconsumed_tail:
        raise ImageDecodeError(413, "image_too_large", f"{field}: the deflated DICOM dataset inflates past "
                               f"{limit} bytes; send it uncompressed or downsampled", field)


def _embedded_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) a compressed DICOM frame really holds, read by Pillow from the frame's own header
    (JPEG SOF, JPEG 2000 SIZ) without decoding it; None when Pillow does not know the format."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(frame), formats=["JPEG", "JPEG2000"])
        return im.width, im.height
    except Image.DecompressionBombError:
        return 2**31, 2**31  # bigger than any pixel limit: refused as too large
    except Exception:  # noqa: BLE001 - not a format Pillow knows (JPEG-LS, ...)
        return None


def _check_embedded(ds, rows: int, cols: int, field: str, max_pixels: int) -> None:
    """The header's Rows/Columns are only a claim: a compressed frame is checked against the pixel limit
    and against that claim from its own header, before anything is decompressed."""
    from pydicom.encaps import get_frame

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_encapsulated or syntax == "1.2.840.10008.1.2.5":  # RLE: sized by the header
        return
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except Exception as e:  # noqa: BLE001 - broken encapsulation: nothing to check, nothing to decode
        raise ImageDecodeError(400, "corrupt_dicom", f"{field}: the encapsulated pixel data cannot be read "
                               f"({type(e).__name__})", field) from None
    size = _embedded_size(frame)
    if size is None:
        raise ImageDecodeError(415, "dicom_unsupported_syntax", f"{field}: the compressed pixel data "
                               f"(transfer syntax '{getattr(syntax, 'name', syntax)}') is not JPEG or JPEG 2000, "
                               "so its size cannot be checked before decoding; send uncompressed DICOM",
                               field)
    width, height = size
    if width * height > max_pixels:
        raise ImageDecodeError(413, "image_too_large", f"{field}: the compressed image inside the DICOM is "
                               f"{width}x{height} pixels (its header says {cols}x{rows}), over the limit of "
                               f"{max_pixels} pixels", field)
    if (width, height) != (cols, rows):
        raise ImageDecodeError(400, "dicom_inconsistent_size", f"{field}: the compressed image is {width}x{height} "
                               f"pixels but Rows/Columns say {cols}x{rows}; the file is inconsistent", field)


def _decode_dicom(data: bytes, field: str, max_pixels: int) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    _check_deflated(data, field, max_pixels)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - pydicom raises several types for malformed files
        raise ImageDecodeError(400, "corrupt_dicom", f"{field}: the DICOM file cannot be parsed ({type(e).__name__})",
                         field) from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageDecodeError(400, "dicom_without_pixels", f"{field}: the DICOM file has no pixel data "
                         "(element (7FE0,0010) is missing); send the image object, not a report or SR", field)
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    _check_pixels(cols, rows, field, max_pixels)
    _check_embedded(ds, rows, cols, field, max_pixels)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageDecodeError(400, "dicom_multiframe", f"{field}: multi-frame DICOM ({frames} frames); send one image", field)
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - missing codec, wrong length, bad attributes...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        if isinstance(e, (NotImplementedError, RuntimeError)) and syntax is not None and syntax.is_compressed:
            raise ImageDecodeError(415, "dicom_unsupported_syntax", f"{field}: DICOM transfer syntax '{name}' cannot be "
                             "decoded here; send uncompressed or baseline-JPEG DICOM", field) from None
        raise ImageDecodeError(400, "corrupt_dicom", f"{field}: the DICOM pixel data cannot be decoded "
                         f"({type(e).__name__}; truncated file or inconsistent Rows/Columns/BitsAllocated?)",
                         field) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour secondary captures: take luminance
        return np.asarray(Image.fromarray(_to_uint8(arr[..., :3], 0, float(arr.max()) or 1.0)).convert("L"))
    if arr.ndim != 2:
        raise ImageDecodeError(400, "dicom_shape", f"{field}: DICOM pixels have shape {arr.shape}; expected one 2-D image", field)
    try:
        arr = apply_modality_lut(arr, ds).astype(np.float32)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
            out = _window(arr, _first(ds.WindowCenter), _first(ds.WindowWidth), function, field)
            img = (out * 255.0 + 0.5).astype(np.uint8)
        elif "VOILUTSequence" in ds:
            img = _to_uint8(apply_voi_lut(arr, ds))
        else:
            img = _to_uint8(arr)  # no stored window: the full range
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed LUT/window attributes
        raise ImageDecodeError(400, "corrupt_dicom", f"{field}: the DICOM windowing attributes are invalid "
                         f"({type(e).__name__})", field) from None
    if photometric == "MONOCHROME1":
        img = 255 - img  # MONOCHROME1 stores low values as white
    return img


def decode_image(data: bytes, field: str, max_pixels: int = 40_000_000) -> np.ndarray:
    """Image bytes -> (H, W) uint8. Raises ImageDecodeError (400/413/415) naming the field."""
    if not data:
        raise ImageDecodeError(400, "empty_image", f"{field}: the file is empty", field)
    kind = sniff(data)
    if kind is None:
        raise ImageDecodeError(415, "unsupported_image_type", f"{field}: not a PNG, JPEG or DICOM file (unrecognised "
                         "file signature); convert it to one of these", field)
    if kind == "dicom":
        return _decode_dicom(data, field, max_pixels)
    return _decode_pil(data, kind, field, max_pixels)


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """A PNG (8/16-bit), JPEG or DICOM file -> (H, W) uint8; ImageDecodeError (code names the problem) if not."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(404, "missing_file", f"{path}: file not found", str(path)) from None
    except OSError as e:
        raise ImageDecodeError(400, "unreadable_file", f"{path}: cannot be read ({e.strerror})", str(path)) from None
    return decode_image(data, str(path), max_pixels)
