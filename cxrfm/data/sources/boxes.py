"""Box handling shared by the grounding converters: fit to the image, rescale, reader consensus.

Rules (the same for every corpus, so counts in build_report.json mean the same thing):
- a box wholly outside the image is dropped and counted as "box_outside_image";
- a box partly outside is clipped to the image, kept, and flagged as "box_partly_outside_clipped";
- a box with no area (x2 <= x1 or y2 <= y1, before or after clipping) is dropped as "box_degenerate".
Boxes are (x1, y1, x2, y2) in pixels of the stored image, x to the right and y down.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cxrfm.data.schema import Box
from cxrfm.data.sources.base import BuildReport


def fit_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int,
            report: BuildReport, item: str) -> Box | None:
    """The box clipped to a width x height image, or None (counted) when nothing of it is inside."""
    if not (x2 > x1 and y2 > y1):
        report.skip("box_degenerate", item, f"box ({x1}, {y1}, {x2}, {y2}) has no area")
        return None
    if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
        report.skip("box_outside_image", item, f"box ({x1}, {y1}, {x2}, {y2}) is outside the {width}x{height} image")
        return None
    cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
        report.flag("box_partly_outside_clipped", item,
                    f"box ({x1}, {y1}, {x2}, {y2}) clipped to the {width}x{height} image (kept)")
    return Box(x1=float(cx1), y1=float(cy1), x2=float(cx2), y2=float(cy2))


def scale_xyxy(box: Sequence[float], sx: float, sy: float) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return x1 * sx, y1 * sy, x2 * sx, y2 * sy


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def consensus_boxes(marks: Iterable[tuple[str, Sequence[float]]], min_readers: int,
                    iou_threshold: float = 0.5) -> tuple[list[tuple[float, float, float, float]], int]:
    """Merge one class's boxes from several readers into consensus boxes.

    `marks` are (reader id, (x1, y1, x2, y2)). Boxes are linked when their IoU is above `iou_threshold`
    and each connected group becomes one box, the coordinate-wise mean of its members (weighted-box
    fusion with equal weights). A group is kept when at least `min_readers` distinct readers drew a box
    in it. Returns (kept boxes, number of groups dropped for too few readers).
    """
    marks = [(reader, tuple(float(v) for v in box)) for reader, box in marks]
    parent = list(range(len(marks)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(marks)):
        for j in range(i + 1, len(marks)):
            if iou(marks[i][1], marks[j][1]) > iou_threshold:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(marks)):
        groups.setdefault(find(i), []).append(i)
    kept, dropped = [], 0
    for members in sorted(groups.values()):
        if len({marks[i][0] for i in members}) < min_readers:
            dropped += 1
            continue
        n = len(members)
        kept.append(tuple(sum(marks[i][1][k] for i in members) / n for k in range(4)))
    return kept, dropped
