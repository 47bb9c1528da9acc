"""VQA-RAD (OSF, CC0): clinician-written questions about radiology images; the chest X-ray subset.

Expected under --root (the OSF release):
    VQA_RAD Dataset Public.json    [{qid, image_name, image_organ, question, answer, answer_type (CLOSED/OPEN),
                                     question_type (PRES, POS, SIZE, ...), phrase_type (freeform/para/test_*)}, ...]
    VQA_RAD Image Folder/<image_name>   (images are found by name anywhere below root)

Kept: questions with image_organ CHEST whose image is an X-ray. VQA-RAD records no modality, and its
chest images include CT and MRI: an image is left out ("not_xray") when one of its MODALITY questions says
so (an open answer naming CT/MRI/ultrasound, or a closed yes to "is this a CT?" / no to "is this an
x-ray?"). This is a heuristic; images without such a question are kept.
One Study per image. VQA-RAD has no patient ids, so each image is its own patient: leakage between images
of one patient cannot be checked. Splits: the official test questions (phrase_type test_*) make their
image a test study, and that image's training questions move to test with it (counted), so no image is
in two splits; the other images are divided into train and val by patient_split on the image name.
The view comes from PLANE questions (PA/AP/lateral) where one answers it, else from the pixels
(cxrfm.data.views; counted as "view_from_pixels" in the report).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from cxrfm.data.schema import Study, VQAPair
from cxrfm.data.sources import base

QTYPES = {"PRES": "presence", "ABN": "presence", "POS": "location", "SIZE": "size", "COUNT": "count",
          "PLANE": "view", "MODALITY": "other", "ORGAN": "other", "COLOR": "other", "ATTRIB": "other",
          "OTHER": "other"}
NOT_XRAY = re.compile(r"\b(ct|cta|computed tomography|mri|mr|magnetic resonance|ultrasound|sonograph\w*|pet|"
                      r"t1|t2|flair|dwi)\b", re.IGNORECASE)
XRAY = re.compile(r"\b(x-?ray|xr|radiograph\w*|plain film|cxr)\b", re.IGNORECASE)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


LAYOUTS = ("'VQA_RAD Dataset Public.json' with the images ('VQA_RAD Image Folder/') anywhere below root",)

def qtype_of(question_type: str) -> str:
    first = re.split(r"[,/ ]+", str(question_type).strip().upper())[0]
    return QTYPES.get(first, "other")


def modality_says_not_xray(question: str, answer: str, closed: bool) -> bool:
    """True when a MODALITY question's answer shows the image is not a radiograph."""
    if not closed:
        return bool(NOT_XRAY.search(answer)) and not XRAY.search(answer)
    yes = answer.strip().lower() in ("yes", "y", "true")
    return (bool(NOT_XRAY.search(question)) and yes) or (bool(XRAY.search(question)) and not yes)


def view_from_plane(answer: str) -> str | None:
    a = answer.strip().lower()
    if re.search(r"\blateral\b", a):
        return "LATERAL"
    if re.search(r"\b(ap|anteroposterior|antero-posterior)\b", a):
        return "AP"
    if re.search(r"\b(pa|posteroanterior|postero-anterior)\b", a):
        return "PA"
    return None


def find_questions(root: Path) -> Path:
    hits = sorted(root.glob("VQA_RAD Dataset Public.json")) or sorted(root.rglob("VQA_RAD*.json"))
    if not hits:
        raise FileNotFoundError(f"{root}: no 'VQA_RAD Dataset Public.json'. Accepted vqa_rad layouts under --root: "
                                f"{'; '.join(LAYOUTS)}")
    return hits[0]


class Converter(base.Converter):
    name = "vqa_rad"
    license = "CC0 1.0 (VQA-RAD, Lau et al. 2018)"
    layouts = LAYOUTS

    def scan(self, root: Path, report: base.BuildReport) -> list[base.StudyRecord]:
        root = Path(root)
        path = find_questions(root)
        items = json.loads(path.read_text())
        report.note("vqa_rad_questions", len(items))
        report.note("vqa_rad_patients", "no patient ids in VQA-RAD: each image is its own patient")
        files = {p.name: p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
        per_image: dict[str, list[dict]] = defaultdict(list)
        seen_qids: set[str] = set()
        for item in items:
            qid = str(item.get("qid", "")).strip()
            if qid in seen_qids:
                report.skip("duplicate_question", qid, "this qid was already listed; the first is kept")
                continue
            seen_qids.add(qid)
            if str(item.get("image_organ", "")).strip().upper() != "CHEST":
                report.skip("not_chest", qid, f"image_organ {item.get('image_organ')!r}")
                continue
            question, answer = str(item.get("question", "")).strip(), str(item.get("answer", "")).strip()
            image = str(item.get("image_name", "")).strip()
            if not (question and answer and image):
                report.skip("empty_question", qid, "question, answer or image_name is blank")
                continue
            per_image[image].append({
                "qid": qid, "question": question, "answer": answer,
                "closed": str(item.get("answer_type", "")).strip().upper() == "CLOSED",
                "qtype": str(item.get("question_type", "")).strip().upper(),
                "test": str(item.get("phrase_type", "")).strip().lower().startswith("test")})

        records = []
        for image, qas in sorted(per_image.items()):
            if any(q["qtype"].startswith("MODALITY") and modality_says_not_xray(q["question"], q["answer"], q["closed"])
                   for q in qas):
                for q in qas:
                    report.skip("not_xray", q["qid"], f"{image}: a MODALITY answer says it is not a radiograph")
                continue
            if image not in files:
                report.skip("image_missing_file", image, f"{image} not found under {root}")
                continue
            test = any(q["test"] for q in qas)
            if test:
                for q in qas:
                    if not q["test"]:
                        report.flag("train_question_moved_to_test", q["qid"],
                                    f"{image} has official test questions; its training questions go to test (kept)")
            views = [v for q in qas if q["qtype"].startswith("PLANE") for v in [view_from_plane(q["answer"])] if v]
            stem = Path(image).stem
            records.append(base.StudyRecord(
                study_id=base.safe_key(self.name, stem), patient_id=stem,
                split="test" if test else base.patient_split(stem, fractions=(0.9, 0.1, 0.0)),
                payload={"path": str(files[image]), "view": views[0] if views else None,
                         "qas": [{k: q[k] for k in ("question", "answer", "closed", "qtype")} for q in qas]}))
        if any(r.payload["view"] is None for r in records):
            report.note("vqa_rad_view", "VQA-RAD records no view; images without a PLANE answer: view from the pixels")
        return base.count_duplicates(records, report)

    def load(self, record: base.StudyRecord, report: base.BuildReport) -> tuple[Study, dict[str, np.ndarray]] | None:
        p = record.payload
        read = self.read_any_view(p["path"], record, report, view=p["view"])  # no PLANE answer: from the pixels
        if read is None:
            return None
        img, ref = read
        role = ref.role
        study = Study(study_id=record.study_id, patient_id=record.patient_id, split=record.split, source=self.name,
                      license=self.license, images=[ref],
                      vqa=[VQAPair(question=q["question"], answer=q["answer"], qtype=qtype_of(q["qtype"]),
                                   closed=q["closed"]) for q in p["qas"]])
        return study, {role: img}
