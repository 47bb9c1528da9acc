"""Frontal or lateral, from the pixels: for corpora that do not say which image is which view (IU X-ray).

A frontal chest film shows a bright midline (spine, mediastinum, heart) between two dark lung fields;
a lateral film shows one lung field across the middle, with the spine at one edge and the sternum at the
other. `midline_contrast` measures that: on the image scaled to 64x64 and standardised (zero mean, unit
variance), the mean of the central columns minus the mean of the two lateral thirds, over the middle
rows (30-70 % of the height, where the lungs are). Frontal films score well above zero, laterals below.

Hand-written rather than learned: one anatomical contrast needs no training data and has no weights to
ship. Measured on synthetic phantoms (`phantom_view_accuracy`, pinned by tests/data/test_views.py and
quoted in the README); the phantoms are drawn with that anatomy, so real films may score closer to the
threshold: a score within UNSURE_MARGIN of it is reported as unsure, and converters count those.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cxrfm.data.synthetic import generate_phantoms

SIDE = 64
THRESHOLD = 0.05  # midway between the lowest frontal (0.31) and highest lateral (-0.22) score on phantoms
UNSURE_MARGIN = 0.15


def midline_contrast(image: np.ndarray) -> float:
    """(H, W) uint8 -> central-columns minus lateral-thirds mean intensity, in standard deviations."""
    a = np.asarray(Image.fromarray(image).resize((SIDE, SIDE), Image.BILINEAR), np.float32)  # (64, 64)
    a = (a - a.mean()) / (a.std() + 1e-6)
    band = a[int(SIDE * 0.3): int(SIDE * 0.7)].mean(axis=0)  # (64,) column profile across the lungs
    mid = band[int(SIDE * 0.4): int(SIDE * 0.6)].mean()
    sides = np.concatenate([band[int(SIDE * 0.12): int(SIDE * 0.32)], band[int(SIDE * 0.68): int(SIDE * 0.88)]]).mean()
    return float(mid - sides)


def classify_view(image: np.ndarray) -> tuple[str, float, bool]:
    """("frontal" | "lateral", score, sure) for one (H, W) uint8 radiograph."""
    score = midline_contrast(image)
    return ("frontal" if score > THRESHOLD else "lateral"), score, abs(score - THRESHOLD) >= UNSURE_MARGIN


def phantom_view_accuracy(num_studies: int = 400, image_size: int = 128, seed: int = 2024) -> dict:
    """Accuracy of classify_view on synthetic phantoms (seeds other than the ones THRESHOLD was read from)."""
    right = {"frontal": 0, "lateral": 0}
    total = {"frontal": 0, "lateral": 0}
    unsure = 0
    for phantom in generate_phantoms(num_studies, image_size, seed):
        for role in ("frontal", "lateral"):
            if role in phantom.images:
                guess, _, sure = classify_view(phantom.images[role])
                total[role] += 1
                right[role] += guess == role
                unsure += not sure
    n = sum(total.values())
    return {"images": n, "accuracy": sum(right.values()) / n, "unsure": unsure,
            **{f"{role}_accuracy": right[role] / total[role] for role in total if total[role]},
            **{f"{role}_images": total[role] for role in total}}
