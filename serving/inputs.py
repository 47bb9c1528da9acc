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

import numpy as np

# The decoding core lives in cxrfm.data.images (shared with the dataset converters); re-exported here.
from cxrfm.data.images import JPEG_SIG, MIN_SIDE, PNG_SIG, decode_image, sniff
from cxrfm.data.images import ImageDecodeError as InputError

__all__ = ["JPEG_SIG", "MIN_SIDE", "PNG_SIG", "ROLES", "InputError", "decode_base64", "decode_image", "decode_study",
           "sniff"]
ROLES = ("frontal", "lateral", "prior")


def decode_base64(text: str, field: str) -> bytes:
    if text.startswith("data:"):  # data URLs from browsers: data:image/png;base64,....
        text = text.partition(",")[2]
    # Line breaks and spaces are layout (the `base64` tool wraps at 76 columns, MIME at 76 too): dropped
    # before the strict check, which still refuses every other non-alphabet character.
    text = "".join(text.split())
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, "bad_base64", f"{field}: not valid base64", field) from None


def decode_study(raw: dict[str, bytes], max_upload_bytes: int, max_pixels: int) -> dict[str, np.ndarray]:
    """{role: bytes} -> {role: (H, W) uint8}; needs a frontal or a lateral view."""
    total = sum(len(b) for b in raw.values())
    if total > max_upload_bytes:
        raise InputError(413, "upload_too_large", f"images total {total} bytes; this tenant's limit is "
                         f"{max_upload_bytes} bytes per request", "images")
    if "frontal" not in raw and "lateral" not in raw:
        raise InputError(400, "missing_image", "a study needs a frontal or a lateral image (prior is optional)", "images")
    return {role: decode_image(raw[role], f"images.{role}", max_pixels) for role in ROLES if role in raw}
