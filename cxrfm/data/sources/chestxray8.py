"""ChestX-ray8 / ChestX-ray14 (NIH Clinical Center): 112,120 frontal PNGs, 14 text-mined labels, 984 boxes.

Expected under --root (the NIH release, images extracted from images_001..012.tar.gz):
    Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv)   Image Index, Finding Labels ("A|B"), Follow-up #,
                                                          Patient ID, Patient Age, Patient Gender, View Position, ...
    BBox_List_2017.csv                                    Image Index, Finding Label, Bbox [x, y, w, h]
    train_val_list.txt, test_list.txt                     the official patient-wise split
    images/*.png  (any folder below root: PNGs are found by name, e.g. images_001/images/ on Kaggle copies)

Boxes are published in the 1024x1024 frame of the released PNGs and are scaled to the stored image when a
downsized copy is used. Labels were mined from reports by NLP: a label not listed for an image is taken
as negative, as the dataset's own benchmarks do. There is no report text; grounding phrases are the box
labels. Splits: test_list.txt is test; train_val_list.txt is divided into train and val by patient_split
(patient-wise, as the official lists are). An image in neither list is counted and left out.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from cxrfm.data.schema import GroundedPhrase, Study
from cxrfm.data.sources import base
from cxrfm.data.sources.boxes import fit_box
from cxrfm.data.sources.splits import keep_patients_in_one_split

BBOX_FRAME = 1024  # the side of the released PNGs, in which BBox_List_2017.csv is given
CHEXPERT_MAP: dict[str, str | None] = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
    "Infiltration": "Lung Opacity", "Mass": "Lung Lesion", "Nodule": "Lung Lesion", "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation", "Edema": "Edema", "Emphysema": None,
    "Fibrosis": None, "Pleural_Thickening": "Pleural Other", "Hernia": None, "No Finding": "No Finding",
}
BOX_LABELS = {"Infiltrate": "Infiltration"}  # BBox_List_2017.csv spells this one differently
PHRASES = {"Effusion": "pleural effusion", "Pleural_Thickening": "pleural thickening"}
VIEWS = {"PA": "PA", "AP": "AP"}


def _find(root: Path, *names: str) -> Path | None:
    for name in names:
        hits = sorted(root.glob(name))
        if hits:
            return hits[0]
    return None


def _read_list(path: Path | None) -> set[str]:
    return set(path.read_text().split()) if path is not None else set()


class Converter(base.Converter):
    name = "chestxray8"
    license = "NIH Clinical Center ChestX-ray8/14: unrestricted use, cite Wang et al. CVPR 2017"
    layouts = ("Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv), train_val_list.txt, test_list.txt, optional "
               "BBox_List_2017.csv, and the PNGs anywhere below root (images/ or images_001/images/ ...)",)

    def _boxes(self, path: Path | None, report: base.BuildReport) -> dict[str, dict[str, list]]:
        """Image Index -> {label: [[x, y, w, h], ...]} from BBox_List_2017.csv (read by position: its header
        splits "Bbox [x,y,w,h]" over four columns and ends with empty ones)."""
        out: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        if path is None:
            report.note("chestxray8_boxes", "no BBox_List_2017.csv under root: no grounding phrases")
            return out
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        for i, row in enumerate(rows[1:], start=2):
            try:
                image, label = row[0].strip(), row[1].strip()
                x, y, w, h = (float(v) for v in row[2:6])
            except (IndexError, ValueError):
                report.skip("bad_row", f"{path.name} row {i}", "expected Image Index, Finding Label, x, y, w, h")
                continue
            out[image][BOX_LABELS.get(label, label)].append([x, y, w, h])
        return out

    def scan(self, root: Path, report: base.BuildReport) -> list[base.StudyRecord]:
        root = Path(root)
        entry = _find(root, "Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv", "Data_Entry*.csv")
        if entry is None:
            raise self.layout_error(root, "no Data_Entry_2017_v2020.csv / Data_Entry_2017.csv")
        test = _read_list(_find(root, "test_list.txt", "test_list*.txt"))
        train_val = _read_list(_find(root, "train_val_list.txt", "train_val_list*.txt"))
        if not test and not train_val:
            raise self.layout_error(root, "no train_val_list.txt / test_list.txt (they define the official split)")
        boxes = self._boxes(_find(root, "BBox_List_2017.csv"), report)
        pngs = {p.name: p for p in root.rglob("*.png")}
        report.note("chestxray8_pngs_found", len(pngs))
        with open(entry, newline="") as f:
            rows = list(csv.DictReader(f))
        report.note("chestxray8_entries", len(rows))
        records = []
        for i, row in enumerate(rows):
            image = str(row.get("Image Index", "")).strip()
            patient = str(row.get("Patient ID", "")).strip().lstrip("0") or "0"
            if not image:
                report.skip("bad_row", f"{entry.name} row {i + 2}", "no Image Index")
                continue
            if image in test:
                split = "test"
            elif image in train_val:
                split = base.patient_split(patient, fractions=(0.9, 0.1, 0.0))
            else:
                report.skip("not_in_official_split", image, "in neither train_val_list.txt nor test_list.txt")
                continue
            if image not in pngs:
                report.skip("image_missing_file", image, f"{image} not found under {root}")
                continue
            findings = [x.strip() for x in str(row.get("Finding Labels", "")).split("|") if x.strip()]
            unknown = [x for x in findings if x not in CHEXPERT_MAP]
            if unknown:
                report.skip("unknown_label", image,
                            f"labels {unknown} are not ChestX-ray14 labels; kept as source labels")
            records.append(base.StudyRecord(
                study_id=base.safe_key(self.name, Path(image).stem), patient_id=patient, split=split,
                payload={"path": str(pngs[image]), "findings": findings,
                         "view": VIEWS.get(str(row.get("View Position", "")).strip().upper(), "PA"),
                         "follow_up": str(row.get("Follow-up #", "")).strip(),
                         "boxes": {k: v for k, v in boxes.get(image, {}).items()}}))
        return keep_patients_in_one_split(base.count_duplicates(records, report), report)

    def load(self, record: base.StudyRecord, report: base.BuildReport) -> tuple[Study, dict[str, np.ndarray]] | None:
        p = record.payload
        read = self.read_one(p["path"], record, report, view=p["view"])
        if read is None:
            return None
        img, ref = read
        width, height = ref.width, ref.height
        sx, sy = width / BBOX_FRAME, height / BBOX_FRAME
        grounding = []
        for label, xywh in sorted(p["boxes"].items()):
            fitted = [b for b in (fit_box(x * sx, y * sy, (x + w) * sx, (y + h) * sy, width, height, report,
                                          record.study_id) for x, y, w, h in xywh) if b is not None]
            if not fitted:
                report.skip("phrase_without_boxes", record.study_id, f"{label!r}: every box was outside the image")
                continue
            grounding.append(GroundedPhrase(phrase=PHRASES.get(label, label.lower()),
                                            label=CHEXPERT_MAP.get(label) or label, boxes=fitted))
        # Text-mined labels: every ChestX-ray14 label not listed for the image is a negative.
        values = {name: int(name in p["findings"]) for name in CHEXPERT_MAP}
        study = Study(study_id=record.study_id, patient_id=record.patient_id, split=record.split, source=self.name,
                      license=self.license,
                      images=[ref],
                      labels=base.map_to_chexpert(values, CHEXPERT_MAP),
                      source_labels={name: "1" for name in p["findings"]}, grounding=grounding)
        return study, {"frontal": img}
