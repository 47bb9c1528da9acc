"""SLAKE (Liu et al., ISBI 2021; CC BY 4.0): bilingual medical VQA; the English chest X-ray subset.

Expected under --root (the published archive, or the same files without the Slake1.0/ folder):
    Slake1.0/train.json, Slake1.0/validate.json (validation.json in the Hugging Face copy), Slake1.0/test.json
        [{img_id, img_name ("xmlab102/source.jpg"), question, answer, q_lang (en/zh), location, modality,
          answer_type (OPEN/CLOSED), base_type, content_type, triple, qid}, ...]
    Slake1.0/imgs/xmlab<N>/source.jpg

Kept: q_lang "en", modality X-Ray, and a chest location (Lung, Chest_heart, Chest_lung, Chest_mediastinal...).
Everything else is counted per question ("not_english", "not_chest_xray"). One Study per image. SLAKE
has no patient ids (its X-rays come from ChestX-ray8 without the NIH patient id), so each image is its
own patient: leakage between images of one patient, or with a chestxray8 build, cannot be checked. Splits
are the official files; an image with questions in several files goes to the most held-out one (test >
val > train), counted per moved question, so no image is in two splits. SLAKE records no view (its
"Plane" answers say "Coronal" for X-rays): each image's view is read from its pixels (cxrfm.data.views;
a frontal is stored as PA), counted as "view_from_pixels".
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from cxrfm.data.schema import Study, VQAPair
from cxrfm.data.sources import base
from cxrfm.data.sources.splits import most_held_out

SPLIT_FILES = {"train": ("train.json",), "val": ("validate.json", "validation.json"), "test": ("test.json",)}
QTYPES = {"abnormality": "presence", "position": "location", "quantity": "count", "size": "size", "plane": "view"}
CHEST = re.compile(r"chest|lung|heart|mediastin", re.IGNORECASE)


LAYOUTS = ("Slake1.0/train.json, validate.json (or validation.json), test.json with Slake1.0/imgs/ (or the same "
           "files without the Slake1.0/ folder)",)

def dataset_dir(root: Path) -> Path:
    for d in (root / "Slake1.0", root):
        if (d / "train.json").is_file() or (d / "test.json").is_file():
            return d
    raise FileNotFoundError(f"{root}: no Slake1.0/train.json or test.json. Accepted slake layouts under --root: "
                            f"{'; '.join(LAYOUTS)}")


def is_xray(modality: str) -> bool:
    return re.sub(r"[^a-z]", "", str(modality).lower()) == "xray"


class Converter(base.Converter):
    name = "slake"
    license = "CC BY 4.0 (SLAKE, Liu et al. 2021)"
    layouts = LAYOUTS

    def scan(self, root: Path, report: base.BuildReport) -> list[base.StudyRecord]:
        root = Path(root)
        data = dataset_dir(root)
        report.note("slake_patients", "no patient ids in SLAKE: each image is its own patient")
        per_image: dict[str, list[dict]] = defaultdict(list)
        seen_qids: set[str] = set()
        for split, names in SPLIT_FILES.items():
            path = next((data / n for n in names if (data / n).is_file()), None)
            if path is None:
                report.note(f"slake_{split}_file", f"none of {list(names)} found: no official {split} questions")
                continue
            items = json.loads(path.read_text(encoding="utf-8"))
            report.note(f"slake_{split}_questions", len(items))
            for item in items:
                qid = f"{split}:{item.get('qid')}"
                if qid in seen_qids:
                    report.skip("duplicate_question", qid, "this qid was already listed in the file; the first is kept")
                    continue
                seen_qids.add(qid)
                if str(item.get("q_lang", "")).strip().lower() != "en":
                    report.skip("not_english", qid, f"q_lang {item.get('q_lang')!r}")
                    continue
                if not (is_xray(item.get("modality", "")) and CHEST.search(str(item.get("location", "")))):
                    report.skip("not_chest_xray", qid,
                                f"modality {item.get('modality')!r}, location {item.get('location')!r}")
                    continue
                question, answer = str(item.get("question", "")).strip(), str(item.get("answer", "")).strip()
                image = str(item.get("img_name", "")).strip()
                if not (question and answer and image):
                    report.skip("empty_question", qid, "question, answer or img_name is blank")
                    continue
                per_image[image].append({"qid": qid, "split": split, "question": question, "answer": answer,
                                         "closed": str(item.get("answer_type", "")).strip().upper() == "CLOSED",
                                         "content": str(item.get("content_type", "")).strip().lower()})
        records = []
        for image, qas in sorted(per_image.items()):
            path = data / "imgs" / image
            if not path.is_file():
                report.skip("image_missing_file", image,
                            f"{path} not found (is imgs.zip extracted into Slake1.0/imgs/?)")
                continue
            split = most_held_out(q["split"] for q in qas)
            for q in qas:
                if q["split"] != split:
                    report.flag("question_moved_to_held_out_split", q["qid"],
                                f"{image} also has {split} questions; this {q['split']} question goes with it (kept)")
            key = Path(image).parent.name or Path(image).stem  # "xmlab102/source.jpg" -> "xmlab102"
            records.append(base.StudyRecord(
                study_id=base.safe_key(self.name, key), patient_id=key, split=split,
                payload={"path": str(path), "qas": [{k: q[k] for k in ("question", "answer", "closed", "content")}
                                                    for q in qas]}))
        if records:
            report.note("slake_view", "SLAKE records no view: each image's view is read from its pixels")
        return base.count_duplicates(records, report)

    def load(self, record: base.StudyRecord, report: base.BuildReport) -> tuple[Study, dict[str, np.ndarray]] | None:
        p = record.payload
        read = self.read_any_view(p["path"], record, report)  # SLAKE states no view: from the pixels
        if read is None:
            return None
        img, ref = read
        study = Study(study_id=record.study_id, patient_id=record.patient_id, split=record.split, source=self.name,
                      license=self.license, images=[ref],
                      vqa=[VQAPair(question=q["question"], answer=q["answer"], qtype=QTYPES.get(q["content"], "other"),
                                   closed=q["closed"]) for q in p["qas"]])
        return study, {ref.role: img}
