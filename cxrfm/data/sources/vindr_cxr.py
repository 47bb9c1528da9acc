"""VinDr-CXR (PhysioNet 1.0.0): 18,000 PA radiographs (DICOM) with reader boxes for 22 local findings.

Expected under --root (the PhysioNet layout):
    annotations/annotations_train.csv    image_id, rad_id, class_name, x_min, y_min, x_max, y_max (3 readers each)
    annotations/annotations_test.csv     the same, one consensus reading (rad_id may be absent)
    annotations/image_labels_train.csv   image_id, rad_id, 22 local + 6 global labels as 0/1
    annotations/image_labels_test.csv   image_id, the same labels ("Other disease" spelled without the s)
    train/<image_id>.dicom, test/<image_id>.dicom

Reader consensus, per image and class: boxes of different readers are linked when IoU > 0.5 and each
linked group becomes the mean box; it is kept when a majority of the image's readers drew it (2 of 3 in
train), otherwise counted as "box_without_reader_majority". The test set is one consensus reading: its
boxes are kept as given, whatever rad_id its rows carry. Image labels: positive when a majority of readers
marked it (in test: when marked), uncertain (-1) when only a minority did, negative otherwise; the vote
is kept in source_labels as "k/n". There is no report text: grounding
phrases are the class names. There are no patient ids (the release is de-identified per image), so each
image is its own patient: leakage between images of one patient cannot be checked. Splits: the official
test set is test; the official train set is divided into train and val by patient_split.

The other published layout (the detection-challenge release most users hold) has only the per-box file:
    train.csv    image_id, class_name, class_id, rad_id, x_min, y_min, x_max, y_max   (3 readers each)
    train/<image_id>.dicom        (its test/ images have no annotations and are not used)
There are no image-level labels there, so they are derived from the readers' marks with the same
majority rule as the boxes: positive when a majority of the image's readers marked the class, uncertain
when only a minority did, negative when nobody did; "No Finding" is 1 when a majority wrote "No finding"
and no box was kept. Global labels (pneumonia, tumour, ...) are not in that file, so they stay
unmentioned. build_report.json notes "vindr_cxr_labels": "derived_from_boxes" and flags every study as
"labels_derived_from_boxes". Splits: patient_split 0.8/0.1/0.1 (that release has no labelled test set).

In both layouts no label contradicts a kept box: a class with a kept box is positive (a weaker image-level
vote is raised and flagged "label_raised_to_match_box") and "No Finding" is 0 when any box is kept.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from cxrfm.data.schema import GroundedPhrase, Study
from cxrfm.data.sources import base
from cxrfm.data.sources.boxes import consensus_boxes, fit_box

# Local (boxed) and global labels -> CheXpert; None: no CheXpert counterpart (kept in source_labels only).
CHEXPERT_MAP: dict[str, str | None] = {
    "Aortic enlargement": "Enlarged Cardiomediastinum", "Atelectasis": "Atelectasis", "Calcification": None,
    "Cardiomegaly": "Cardiomegaly", "Clavicle fracture": "Fracture", "Consolidation": "Consolidation",
    "Edema": "Edema", "Emphysema": None, "Enlarged PA": None, "ILD": None, "Infiltration": "Lung Opacity",
    "Lung Opacity": "Lung Opacity", "Lung cavity": "Lung Lesion", "Lung cyst": "Lung Lesion",
    "Mediastinal shift": None, "Nodule/Mass": "Lung Lesion", "Pleural effusion": "Pleural Effusion",
    "Pleural thickening": "Pleural Other", "Pneumothorax": "Pneumothorax", "Pulmonary fibrosis": None,
    "Rib fracture": "Fracture", "Other lesion": None,
    "COPD": None, "Lung tumor": "Lung Lesion", "Pneumonia": "Pneumonia", "Tuberculosis": None,
    "Other diseases": None, "No finding": "No Finding",
}
# Phrases the model reads for a class (abbreviations spelled out so the phrase is plain English).
PHRASES = {"Nodule/Mass": "nodule or mass", "ILD": "interstitial lung disease",
           "Enlarged PA": "enlarged pulmonary artery", "Other lesion": "other lesion"}
LOCAL = tuple(list(CHEXPERT_MAP)[:22])  # the boxed findings; the rest are image-level (global) labels
RENAMED = {"Other disease": "Other diseases"}  # the test CSV's spelling -> the train CSV's
NO_BOX = "No finding"


def phrase_for(class_name: str) -> str:
    return PHRASES.get(class_name, class_name.lower())


LAYOUTS = ("PhysioNet 1.0.0: annotations/annotations_train.csv and/or annotations/image_labels_train.csv "
           "(+ _test.csv), train/ and test/ DICOMs",
           "detection challenge: train.csv (image_id, class_name, class_id, rad_id, x_min, y_min, x_max, y_max) "
           "and train/<image_id>.dicom")
BOX_COLUMNS = {"image_id", "class_name", "x_min", "y_min", "x_max", "y_max"}


def _annotation_dir(root: Path) -> Path | None:
    for d in (root / "annotations", root):
        if (d / "image_labels_train.csv").is_file() or (d / "annotations_train.csv").is_file():
            return d
    return None


def _layout(root: Path) -> tuple[str, Path]:
    """("physionet", annotation folder) or ("boxes_only", train.csv); FileNotFoundError listing both layouts."""
    ann = _annotation_dir(root)
    if ann is not None:
        return "physionet", ann
    table = root / "train.csv"
    if table.is_file():
        with open(table, newline="") as f:
            header = set(next(csv.reader(f), []))
        if BOX_COLUMNS <= header:
            return "boxes_only", table
        raise FileNotFoundError(f"{table} lacks the box columns {sorted(BOX_COLUMNS - header)}; accepted VinDr-CXR "
                                f"layouts: {'; '.join(LAYOUTS)}")
    raise FileNotFoundError(f"{root}: no VinDr-CXR annotations found; accepted layouts: {'; '.join(LAYOUTS)}. "
                            "Point --root at the folder that holds them")


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _reader(row: dict) -> str:
    return base.first_present(row, ("rad_id", "rad_ID", "Rad_ID"), default="consensus")


class Converter(base.Converter):
    name = "vindr_cxr"
    license = "PhysioNet Credentialed Health Data License 1.5.0 (VinDr-CXR)"
    layouts = LAYOUTS

    def _votes(self, rows: list[dict]) -> dict[str, dict]:
        """image_id -> {"readers": set, "positive": Counter of label -> readers marking it}."""
        out: dict[str, dict] = defaultdict(lambda: {"readers": set(), "positive": defaultdict(int)})
        for row in rows:
            image = str(row.get("image_id", "")).strip()
            entry, reader = out[image], _reader(row)
            entry["readers"].add(reader)
            for col, value in row.items():
                name = RENAMED.get(col, col)
                if name in CHEXPERT_MAP and str(value).strip() in ("1", "1.0"):
                    entry["positive"][name] += 1
        return out

    def scan(self, root: Path, report: base.BuildReport) -> list[base.StudyRecord]:
        root = Path(root)
        layout, where = _layout(root)
        report.note("vindr_cxr_patients", "no patient ids in VinDr-CXR: each image is its own patient")
        report.note("vindr_cxr_layout", layout)
        records = []
        if layout == "physionet":
            for official in ("test", "train"):  # test first: an image listed in both is kept in test
                records += self._scan_split(root, official, _read(where / f"annotations_{official}.csv"),
                                            _read(where / f"image_labels_{official}.csv"), report, derived=False)
        else:
            report.note("vindr_cxr_labels", "derived_from_boxes: no image-level label file in this layout; labels "
                                            "follow the readers' marks by the boxes' majority rule")
            records = self._scan_split(root, "train", _read(where), [], report, derived=True)
        return base.count_duplicates(records, report)

    def _scan_split(self, root: Path, official: str, box_rows: list[dict], label_rows: list[dict],
                    report: base.BuildReport, derived: bool) -> list[base.StudyRecord]:
        votes = self._votes(label_rows)
        marks: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        no_finding: dict[str, set] = defaultdict(set)  # readers who wrote "No finding"
        table = "train.csv" if derived else f"annotations_{official}.csv"
        for i, row in enumerate(box_rows):
            image, cls = str(row.get("image_id", "")).strip(), str(row.get("class_name", "")).strip()
            votes[image]["readers"].add(_reader(row))
            if cls == NO_BOX:
                no_finding[image].add(_reader(row))
                continue
            try:
                xyxy = [float(row[k]) for k in ("x_min", "y_min", "x_max", "y_max")]
            except (KeyError, TypeError, ValueError):
                report.skip("bad_row", f"{table} row {i + 2}", f"{cls!r} box without numeric x_min/y_min/x_max/y_max")
                continue
            if cls not in CHEXPERT_MAP:
                report.skip("unknown_class", image, f"class {cls!r} is not a VinDr-CXR label; box kept as is")
            marks[image][cls].append((_reader(row), xyxy))
        records = []
        for image, vote in votes.items():
            if not image:
                continue
            path = next((p for p in (root / official / f"{image}.dicom", root / official / f"{image}.dcm")
                         if p.is_file()), None)
            if path is None:
                report.skip("image_missing_file", image, f"{root / official / image}.dicom not found")
                continue
            n = max(len(vote["readers"]), 1)
            majority = 1 if official == "test" else n // 2 + 1
            boxes = {}
            for cls, cls_marks in marks[image].items():
                if official == "test":
                    kept, dropped = [box for _, box in cls_marks], 0
                else:
                    kept, dropped = consensus_boxes(cls_marks, min_readers=majority)
                for _ in range(dropped):
                    report.skip("box_without_reader_majority", image,
                                f"{cls!r} drawn by fewer than {majority} of {n} readers")
                if kept:
                    boxes[cls] = [list(b) for b in kept]
            if derived:  # readers per class from their marks: the same vote the boxes were kept by
                positive = {cls: len({r for r, _ in m}) for cls, m in marks[image].items()}
                if no_finding[image]:
                    positive[NO_BOX] = len(no_finding[image])
                vote = {"readers": vote["readers"], "positive": positive}
                report.flag("labels_derived_from_boxes", image, "no image-level label file; labels from reader marks")
            labels = {name: (1 if k >= majority else -1) for name, k in vote["positive"].items() if k > 0}
            labels = _agree_with_boxes(labels, boxes, image, report)
            split = "test" if official == "test" else base.patient_split(
                image, fractions=(0.8, 0.1, 0.1) if derived else (0.9, 0.1, 0.0))
            records.append(base.StudyRecord(
                study_id=base.safe_key(self.name, image), patient_id=image, split=split,
                payload={"path": str(path), "boxes": boxes, "labels": labels, "readers": n, "derived": derived,
                         "votes": {k: f"{v}/{n}" for k, v in sorted(vote["positive"].items())}}))
        return records

    def load(self, record: base.StudyRecord, report: base.BuildReport) -> tuple[Study, dict[str, np.ndarray]] | None:
        p = record.payload
        read = self.read_one(p["path"], record, report)
        if read is None:
            return None
        img, ref = read
        width, height = ref.width, ref.height
        grounding = []
        for cls, boxes in sorted(p["boxes"].items()):
            fitted = [b for b in (fit_box(*xyxy, width, height, report, record.study_id) for xyxy in boxes) if b]
            if not fitted:
                report.skip("phrase_without_boxes", record.study_id, f"{cls!r}: every box was outside the image")
                continue
            grounding.append(GroundedPhrase(phrase=phrase_for(cls), label=CHEXPERT_MAP.get(cls) or cls, boxes=fitted))
        # Every label not marked by any reader is a negative: VinDr-CXR readers saw all 28 labels (only the
        # 22 local ones and "No finding" when the labels come from the box file).
        shown = [n for n in CHEXPERT_MAP if n in LOCAL or n == NO_BOX] if p.get("derived") else list(CHEXPERT_MAP)
        values = {name: p["labels"].get(name, 0) for name in shown}
        if any(p["boxes"].values()):
            values[NO_BOX] = 0
        study = Study(study_id=record.study_id, patient_id=record.patient_id, split=record.split, source=self.name,
                      license=self.license,
                      images=[ref],
                      labels=_no_finding_consistent(base.map_to_chexpert(values, CHEXPERT_MAP)),
                      source_labels=p["votes"], grounding=grounding)
        return study, {"frontal": img}


def _agree_with_boxes(labels: dict[str, int], boxes: dict[str, list], image: str,
                      report: base.BuildReport) -> dict[str, int]:
    """A class with a kept box is positive, and "No finding" is not: labels never contradict the boxes."""
    labels = dict(labels)
    for cls, kept in boxes.items():
        if kept and labels.get(cls) != 1:
            report.flag("label_raised_to_match_box", image, f"{cls!r}: image-level vote {labels.get(cls, 0)}, "
                                                             "but a majority box was kept")
            labels[cls] = 1
    if any(boxes.values()):
        labels.pop(NO_BOX, None)
    return labels


def _no_finding_consistent(labels: dict[str, int]) -> dict[str, int]:
    """"No Finding" is 0 when any finding is positive (a minority "No finding" vote must not say -1 then)."""
    if any(v == 1 for k, v in labels.items() if k not in ("No Finding", "Support Devices")) and "No Finding" in labels:
        labels["No Finding"] = 0
    return labels
