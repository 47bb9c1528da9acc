"""MS-CXR (PhysioNet): radiologist-checked phrase + box pairs over MIMIC-CXR frontal images.

Expected under --root:
    MS_CXR_Local_Alignment_v1.1.0.csv    (or v1.0.0; or the COCO-style MS_CXR_Local_Alignment_v1.1.0.json)
    files/p1X/p<subject>/s<study>/<dicom_id>.jpg   MIMIC-CXR-JPG images (a symlink to the MIMIC-CXR-JPG folder works)
    mimic-cxr-2.0.0-metadata.csv[.gz]    optional: ViewPosition and StudyDate of each image

The CSV has one row per box: dicom_id, category_name, label_text, path, x, y, w, h, image_width,
image_height (+ split in v1.1.0). Boxes are in pixels of the original image (image_width x image_height);
when the stored JPG has another size (a downsized copy) they are scaled to it. One Study per image: rows
with the same label_text and category are one phrase with several boxes. No report text is converted
(join MIMIC-CXR for that); the category is a positive CheXpert label. Splits: the official `split`
column (v1.1.0), else patient_split on the subject id; a patient listed in several official splits is
moved to the most held-out one.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import numpy as np

from cxrfm.data.schema import CHEXPERT_LABELS, GroundedPhrase, Study
from cxrfm.data.sources import base
from cxrfm.data.sources.boxes import fit_box, scale_xyxy
from cxrfm.data.sources.splits import keep_patients_in_one_split

PATH_IDS = re.compile(r"p(?P<subject>\d+)/s(?P<study>\d+)/(?P<dicom>[^/]+)\.(?:jpg|jpeg|png|dcm)$", re.IGNORECASE)
SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
VIEWS = {"PA": "PA", "AP": "AP", "LATERAL": "LATERAL", "LL": "LL"}


LAYOUTS = ("MS_CXR_Local_Alignment_v1.1.0.csv (or v1.0.0, or the .json) with MIMIC-CXR-JPG's files/ tree (a "
           "symlink works) and optionally mimic-cxr-2.0.0-metadata.csv",)

def find_annotations(root: Path) -> Path:
    found = sorted(root.glob("MS_CXR_Local_Alignment_v*.csv")) or sorted(root.glob("MS_CXR_Local_Alignment_v*.json"))
    if not found:
        raise FileNotFoundError(f"{root}: no MS_CXR_Local_Alignment_v*.csv (or .json) found. Accepted ms_cxr "
                                f"layouts under --root: {'; '.join(LAYOUTS)}")
    return found[-1]  # the newest release when several are present


def read_rows(path: Path) -> list[dict]:
    """CSV rows as dicts; the COCO-style JSON flattened to the same columns."""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    data = json.loads(path.read_text())
    images = {im["id"]: im for im in data.get("images", [])}
    categories = {c["id"]: c["name"] for c in data.get("categories", [])}
    rows = []
    for ann in data.get("annotations", []):
        im = images.get(ann.get("image_id"), {})
        x, y, w, h = (ann.get("bbox") or [None] * 4)[:4]
        rows.append({"dicom_id": Path(str(im.get("file_name", ""))).stem, "path": im.get("path", ""),
                     "category_name": categories.get(ann.get("category_id"), ""),
                     "label_text": ann.get("label_text", ""),
                     "x": x, "y": y, "w": w, "h": h, "image_width": im.get("width"), "image_height": im.get("height"),
                     "split": ann.get("split", "")})
    return rows


def read_mimic_metadata(root: Path, dicom_ids: set[str]) -> dict[str, dict]:
    """dicom_id -> {"view", "date"} from mimic-cxr-2.0.0-metadata.csv(.gz) when it is under root."""
    for name in ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz"):
        path = root / name
        if path.is_file():
            opener = gzip.open if name.endswith(".gz") else open
            out = {}
            with opener(path, "rt", newline="") as f:
                for row in csv.DictReader(f):
                    if row.get("dicom_id") in dicom_ids:
                        d = str(row.get("StudyDate", "")).split(".")[0]
                        out[row["dicom_id"]] = {"view": VIEWS.get(str(row.get("ViewPosition", "")).upper()),
                                                "date": f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 else None}
            return out
    return {}


class Converter(base.Converter):
    name = "ms_cxr"
    license = "PhysioNet Credentialed Health Data License 1.5.0 (MS-CXR; images: MIMIC-CXR-JPG, same license)"
    layouts = LAYOUTS

    def scan(self, root: Path, report: base.BuildReport) -> list[base.StudyRecord]:
        root = Path(root)
        path = find_annotations(root)
        rows = read_rows(path)
        report.note("ms_cxr_annotation_file", path.name)
        report.note("ms_cxr_rows", len(rows))
        images: dict[str, dict] = {}
        seen_rows: set[tuple] = set()
        for i, row in enumerate(rows):
            item = f"{path.name} row {i + 2}"
            dicom = str(row.get("dicom_id", "")).strip()
            try:
                x, y, w, h = (float(row[k]) for k in ("x", "y", "w", "h"))
                size = (int(float(row["image_width"])), int(float(row["image_height"])))
            except (KeyError, TypeError, ValueError) as e:
                report.skip("bad_row", item, f"x/y/w/h/image_width/image_height not numbers: {e}")
                continue
            ids = PATH_IDS.search(str(row.get("path", "")).replace("\\", "/"))
            if not dicom or ids is None:
                report.skip("bad_row", item, f"no dicom_id or a path not like files/pXX/p<subject>/s<study>/<id>.jpg: "
                                             f"{row.get('path')!r}")
                continue
            category, text = str(row.get("category_name", "")).strip(), str(row.get("label_text", "")).strip()
            key = (dicom, category, text, x, y, w, h)
            if key in seen_rows:
                report.skip("duplicate_row", item, f"the same box of {dicom} is listed again; kept once")
                continue
            seen_rows.add(key)
            split = SPLITS.get(str(row.get("split", "")).strip().lower())
            im = images.setdefault(dicom, {"path": str(row["path"]), "size": size, "subject": ids["subject"],
                                           "study": ids["study"], "split": split, "phrases": {}})
            if im["path"] != str(row["path"]) or im["size"] != size:
                report.skip("conflicting_rows", item, f"{dicom} listed with another path or image size; row left out")
                continue
            im["phrases"].setdefault((category, text), []).append([x, y, x + w, y + h])

        metadata = read_mimic_metadata(root, set(images))
        if not metadata:
            report.note("ms_cxr_view", "no mimic-cxr-2.0.0-metadata.csv under root: views recorded as PA, no dates")
        records = []
        for dicom, im in images.items():
            if not (root / im["path"]).is_file():
                report.skip("image_missing_file", dicom,
                            f"{root / im['path']} not found (is MIMIC-CXR-JPG's files/ under root?)")
                continue
            meta = metadata.get(dicom, {})
            if not meta.get("view"):
                report.flag("view_unknown_assumed_pa", dicom,
                            "no ViewPosition in mimic-cxr-2.0.0-metadata.csv; stored as PA")
            phrases = [{"category": c, "phrase": t, "boxes": b} for (c, t), b in im["phrases"].items()]
            records.append(base.StudyRecord(
                study_id=base.safe_key(self.name, dicom), patient_id=im["subject"],
                split=im["split"] or base.patient_split(im["subject"]), study_date=meta.get("date"),
                payload={"root": str(root), "path": im["path"], "size": list(im["size"]), "dicom_id": dicom,
                         "mimic_study": im["study"], "view": meta.get("view") or "PA", "phrases": phrases}))
        return keep_patients_in_one_split(base.count_duplicates(records, report), report)

    def load(self, record: base.StudyRecord, report: base.BuildReport) -> tuple[Study, dict[str, np.ndarray]] | None:
        p = record.payload
        read = self.read_one(Path(p["root"]) / p["path"], record, report, view=p["view"])
        if read is None:
            return None
        img, ref = read
        width, height = ref.width, ref.height
        sx, sy = width / p["size"][0], height / p["size"][1]  # annotated size -> stored size
        grounding, labels, source_labels = [], {}, {}
        for ph in p["phrases"]:
            boxes = [b for b in (fit_box(*scale_xyxy(xyxy, sx, sy), width, height, report, record.study_id)
                                 for xyxy in ph["boxes"]) if b is not None]
            source_labels[ph["category"]] = "1"
            if ph["category"] in CHEXPERT_LABELS:
                labels[ph["category"]] = 1
            if not boxes:
                report.skip("phrase_without_boxes", record.study_id,
                            f"{ph['phrase']!r}: every box was outside the image")
                continue
            grounding.append(GroundedPhrase(phrase=ph["phrase"], label=ph["category"], boxes=boxes))
        study = Study(study_id=record.study_id, patient_id=record.patient_id, split=record.split, source=self.name,
                      license=self.license, study_date=record.study_date,
                      images=[ref],
                      labels=labels, source_labels=source_labels, grounding=grounding)
        return study, {"frontal": img}
