"""SIIM-ACR Pneumothorax Segmentation (2019): 12,089 frontal DICOMs with pneumothorax masks as RLE.

Layout under --root (the challenge's original release):

    train-rle.csv              ImageId, EncodedPixels (the header has a leading space: " EncodedPixels");
                               "-1" = no pneumothorax; several rows for one ImageId = several masks
    dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<ImageId>.dcm   (found by name anywhere below root)

The RLE is the challenge's own: pixels in column-major order, pairs of (start, length) where each start
counts from the end of the previous run. Each mask is decoded at the image's size and every connected
region of it becomes a box (scipy.ndimage) of the phrase "pneumothorax"; a mask that runs past the image
is skipped as "mask_rle_invalid". Labels: Pneumothorax 1 with a mask, 0 with "-1"; each is also asked as
a closed question. View: the DICOM's ViewPosition (PA / AP; absent -> PA, flagged). Patients: the DICOM's
PatientID (read from the header at scan time), split by patient_split 0.8/0.1/0.1.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from cxrfm.data.schema import GroundedPhrase, ImageRef, Study
from cxrfm.data.sources.base import BuildReport, StudyRecord, patient_split, read_table, safe_key
from cxrfm.data.sources.base import Converter as BaseConverter
from cxrfm.data.sources.boxes import fit_box
from cxrfm.data.sources.derived import dicom_header, label_questions

LAYOUTS = ("train-rle.csv (ImageId, EncodedPixels) with the DICOMs below root, e.g. "
           "dicom-images-train/<study>/<series>/<ImageId>.dcm")
PHRASE = "pneumothorax"


def decode_rle(rle: str, height: int, width: int) -> np.ndarray:
    """SIIM's relative, column-major RLE -> (H, W) bool mask. ValueError if a run leaves the image."""
    values = [int(v) for v in rle.split()]
    if len(values) % 2:
        raise ValueError(f"odd number of RLE values ({len(values)})")
    flat = np.zeros(height * width, bool)
    pos = 0
    for start, length in zip(values[0::2], values[1::2]):
        pos += start
        if start < 0 or length < 0 or pos + length > flat.size:
            raise ValueError(f"run ({start}, {length}) at {pos} leaves the {width}x{height} image")
        flat[pos: pos + length] = True
        pos += length
    return flat.reshape(width, height).T


def mask_boxes(mask: np.ndarray) -> list[tuple[float, float, float, float]]:
    """One (x1, y1, x2, y2) box per 8-connected region of the mask, in pixel edges (x2, y2 exclusive), sorted."""
    from scipy import ndimage

    regions, _ = ndimage.label(mask, structure=np.ones((3, 3), int))
    return sorted((float(sl[1].start), float(sl[0].start), float(sl[1].stop), float(sl[0].stop))
                  for sl in ndimage.find_objects(regions) if sl is not None)


class Converter(BaseConverter):
    name = "siim_pneumothorax"
    license = "SIIM-ACR Pneumothorax Segmentation data: non-commercial research use (NIH ChestX-ray14 images)"
    layouts = LAYOUTS

    def scan(self, root: Path, report: BuildReport) -> list[StudyRecord]:
        root = Path(root)
        table = root / "train-rle.csv"
        if not table.is_file():
            raise FileNotFoundError(f"{root}: no train-rle.csv; accepted layout: {LAYOUTS}")
        masks: dict[str, list[str]] = defaultdict(list)
        for i, row in enumerate(read_table(table)):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            image, rle = row.get("ImageId", ""), row.get("EncodedPixels", "")
            if not image:
                report.skip("bad_row", f"train-rle.csv row {i + 2}", "no ImageId")
                continue
            masks.setdefault(image, [])
            if rle and rle != "-1":
                masks[image].append(rle)
        dicoms = {p.stem: p for p in root.rglob("*.dcm")}
        report.note("siim_dicoms_found", len(dicoms))
        records = []
        for image in sorted(masks):
            path = dicoms.get(image)
            if path is None:
                report.skip("image_missing_file", image, f"{image}.dcm not found below {root}")
                continue
            header = dicom_header(path)
            view = header.get("view") or ""
            if view not in ("PA", "AP"):
                report.flag("view_not_in_dicom", image, f"ViewPosition {view or 'absent'}; taken as frontal PA")
                view = "PA"
            patient = header.get("patient_id") or image
            records.append(StudyRecord(safe_key(self.name, image), patient, patient_split(f"siim-{patient}", (0.8, 0.1, 0.1)),
                                       payload={"path": str(path), "view": view, "masks": masks[image]}))
        return records

    def load(self, record: StudyRecord, report: BuildReport) -> tuple[Study, dict[str, np.ndarray]] | None:
        p = record.payload
        img = self.read(p["path"], record.study_id, report)
        if img is None:
            return None
        height, width = img.shape
        boxes = []
        for rle in p["masks"]:
            try:
                mask = decode_rle(rle, height, width)
            except ValueError as e:
                report.skip("mask_rle_invalid", record.study_id, str(e))
                continue
            boxes += [b for b in (fit_box(*xyxy, width, height, report, record.study_id) for xyxy in mask_boxes(mask))
                      if b is not None]
        labels = {"Pneumothorax": 1 if p["masks"] else 0}
        if p["masks"] and not boxes:
            report.skip("phrase_without_boxes", record.study_id, "no usable mask region")
        study = Study(study_id=record.study_id, patient_id=record.patient_id, split=record.split, source=self.name,
                      license=self.license, images=[ImageRef(role="frontal", key="frontal.png", view=p["view"],
                                                             width=width, height=height)],
                      labels=labels, grounding=[GroundedPhrase(phrase=PHRASE, label="Pneumothorax", boxes=boxes)]
                      if boxes else [], vqa=label_questions(labels))
        return study, {"frontal": img}
