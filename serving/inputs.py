"""Uploaded images -> (H, W) uint8 grayscale arrays, or an InputError that says what was wrong.

Formats are recognised by their signature, never by a file name or a client's content type: PNG, JPEG and
DICOM (Part 10, "DICM" after the 128-byte preamble). DICOM pixels go through the modality LUT (rescale
slope/intercept), then the stored VOI windowing (WindowCenter/WindowWidth with its VOILUTFunction, or a
VOI LUT sequence), and MONOCHROME1 is inverted so that bone is always bright. 16-bit PNGs are scaled, not
clipped. Every failure is an InputError carrying the HTTP status (400 bad content, 413 too large, 415 not a
supported format) and the field it came from; nothing here lets a decoder exception escape.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image

ROLES = ("frontal", "lateral", "prior")
PNG_SIG = b"\x89PNG\r\n\x1a\n"
JPEG_SIG = b"\xff\xd8\xff"
MIN_SIDE = 16


class InputError(ValueError):
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


def decode_base64(text: str, field: str) -> bytes:
    if text.startswith("data:"):  # data URLs from browsers: data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, "bad_base64", f"{field}: not valid base64", field) from None


def _to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    arr = arr.astype(np.float32)
    lo = float(arr.min()) if lo is None else lo
    hi = float(arr.max()) if hi is None else hi
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.clip((arr - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _check_pixels(width: int, height: int, field: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise InputError(413, "image_too_large", f"{field}: {width}x{height} pixels is over the limit of "
                         f"{max_pixels} pixels; downsample it before sending", field)
    if min(width, height) < MIN_SIDE:
        raise InputError(400, "image_too_small", f"{field}: {width}x{height} pixels; at least "
                         f"{MIN_SIDE}x{MIN_SIDE} is needed", field)


def _decode_pil(data: bytes, kind: str, field: str, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: our own pixel limit applies
            im = Image.open(io.BytesIO(data))
            _check_pixels(im.width, im.height, field, max_pixels)  # before decoding a single pixel
            im.load()
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for bad data
        raise InputError(400, "corrupt_image", f"{field}: the {kind.upper()} data cannot be decoded "
                         f"(truncated or corrupt: {type(e).__name__})", field) from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _to_uint8(np.asarray(im))  # 16-bit radiographs: use their full range
    return np.asarray(im.convert("L"), dtype=np.uint8)


def _window(arr: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI windowing to [0, 1] per DICOM PS3.3 C.11.2.1.2."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (arr - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((arr - center) / width + 0.5, 0.0, 1.0)
    width = max(width, 1.0)  # LINEAR requires width >= 1
    return np.clip((arr - (center - 0.5)) / (width - 1.0 if width > 1 else 1.0) + 0.5, 0.0, 1.0)


def _first(value) -> float:
    try:
        return float(value[0])  # multi-valued: the first window is the default one
    except TypeError:
        return float(value)


def _decode_dicom(data: bytes, field: str, max_pixels: int) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - pydicom raises several types for malformed files
        raise InputError(400, "corrupt_dicom", f"{field}: the DICOM file cannot be parsed ({type(e).__name__})",
                         field) from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(400, "dicom_without_pixels", f"{field}: the DICOM file has no pixel data "
                         "(element (7FE0,0010) is missing); send the image object, not a report or SR", field)
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    _check_pixels(cols, rows, field, max_pixels)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(400, "dicom_multiframe", f"{field}: multi-frame DICOM ({frames} frames); send one image", field)
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - missing codec, wrong length, bad attributes...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        if isinstance(e, (NotImplementedError, RuntimeError)) and syntax is not None and syntax.is_compressed:
            raise InputError(415, "dicom_unsupported_syntax", f"{field}: DICOM transfer syntax '{name}' cannot be "
                             "decoded here; send uncompressed or baseline-JPEG DICOM", field) from None
        raise InputError(400, "corrupt_dicom", f"{field}: the DICOM pixel data cannot be decoded "
                         f"({type(e).__name__}; truncated file or inconsistent Rows/Columns/BitsAllocated?)",
                         field) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour secondary captures: take luminance
        return np.asarray(Image.fromarray(_to_uint8(arr[..., :3], 0, float(arr.max()) or 1.0)).convert("L"))
    if arr.ndim != 2:
        raise InputError(400, "dicom_shape", f"{field}: DICOM pixels have shape {arr.shape}; expected one 2-D image", field)
    try:
        arr = apply_modality_lut(arr, ds).astype(np.float32)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
            out = _window(arr, _first(ds.WindowCenter), _first(ds.WindowWidth), function)
            img = (out * 255.0 + 0.5).astype(np.uint8)
        elif "VOILUTSequence" in ds:
            img = _to_uint8(apply_voi_lut(arr, ds))
        else:
            img = _to_uint8(arr)  # no stored window: the full range
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed LUT/window attributes
        raise InputError(400, "corrupt_dicom", f"{field}: the DICOM windowing attributes are invalid "
                         f"({type(e).__name__})", field) from None
    if photometric == "MONOCHROME1":
        img = 255 - img  # MONOCHROME1 stores low values as white
    return img


def decode_image(data: bytes, field: str, max_pixels: int = 40_000_000) -> np.ndarray:
    """Image bytes -> (H, W) uint8. Raises InputError (400/413/415) naming the field."""
    if not data:
        raise InputError(400, "empty_image", f"{field}: the file is empty", field)
    kind = sniff(data)
    if kind is None:
        raise InputError(415, "unsupported_image_type", f"{field}: not a PNG, JPEG or DICOM file (unrecognised "
                         "file signature); convert it to one of these", field)
    if kind == "dicom":
        return _decode_dicom(data, field, max_pixels)
    return _decode_pil(data, kind, field, max_pixels)


def decode_study(raw: dict[str, bytes], max_upload_bytes: int, max_pixels: int) -> dict[str, np.ndarray]:
    """{role: bytes} -> {role: (H, W) uint8}; needs a frontal or a lateral view."""
    total = sum(len(b) for b in raw.values())
    if total > max_upload_bytes:
        raise InputError(413, "upload_too_large", f"images total {total} bytes; this tenant's limit is "
                         f"{max_upload_bytes} bytes per request", "images")
    if "frontal" not in raw and "lateral" not in raw:
        raise InputError(400, "missing_image", "a study needs a frontal or a lateral image (prior is optional)", "images")
    return {role: decode_image(raw[role], f"images.{role}", max_pixels) for role in ROLES if role in raw}
