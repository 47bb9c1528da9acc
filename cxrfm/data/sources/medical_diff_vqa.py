"""Medical-Diff-VQA (PhysioNet 1.0.0, formerly MIMIC-Diff-VQA): questions about one MIMIC-CXR study and
how it differs from an earlier study of the same patient.

Expected under --root:
    mimic_pair_questions.csv   (index), study_id, subject_id, ref_id, question_type (abnormality / location / type /
                               level / view / presence / difference), question, answer, split (train/val/test)
    mimic_all.csv              subject_id, study_id, the 14 CheXpert labels, dicom_id, view, split, study_date,
                               study_order
    files/p1X/p<subject>/s<study>/<dicom_id>.jpg   MIMIC-CXR-JPG images (a symlink to MIMIC-CXR-JPG's files/ works)

One Study per main study: its image (the dicom_id mimic_all.csv chose, frontal where one exists) is the
frontal, and when it has "difference" questions the reference study's image is the `prior` and
prior_study_id names it. A difference question is kept only when its reference is an earlier study of
the same patient whose image reads; otherwise it is counted and left out and the study's other questions
stay. Labels: mimic_all.csv's CheXpert columns (1/0/-1, blank = not mentioned). Splits: the csv's split
(MIMIC-CXR's patient-wise split); a patient found in several is moved to the most held-out one.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from cxrfm.data.images import ImageDecodeError, read_image
from cxrfm.data.schema import CHEXPERT_LABELS, ImageRef, Study, VQAPair
from cxrfm.data.sources import base
from cxrfm.data.sources.splits import keep_patients_in_one_split, most_held_out

QTYPES = {"abnormality": "presence", "presence": "presence", "location": "location", "level": "size",
          "type": "other", "view": "view", "difference": "change"}
SPLITS = {"train": "train", "val": "val", "valid": "val", "validate": "val", "test": "test"}
VIEWS = {"postero-anterior": ("frontal", "PA"), "pa": ("frontal", "PA"), "antero-posterior": ("frontal", "AP"),
         "ap": ("frontal", "AP"), "lateral": ("lateral", "LATERAL"), "left lateral": ("lateral", "LL"),
         "ll": ("lateral", "LL")}


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _id(value) -> str:
    """A MIMIC id as text; pandas writes integer columns that had a blank as floats ("54989200.0")."""
    text = str(value if value is not None else "").strip()
    return text[:-2] if text.endswith(".0") and text[:-2].isdigit() else text


def _iso(date: str) -> str | None:
    d = str(date).split(".")[0].strip()
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else None


def _order(study: dict) -> tuple:
    """How a patient's studies are ordered: study_order, then study_date."""
    try:
        order = float(study["order"])
    except (TypeError, ValueError):
        order = float("inf")
    return order, study["date"] or ""


class Converter(base.Converter):
    name = "medical_diff_vqa"
    license = "PhysioNet Credentialed Health Data License 1.5.0 (Medical-Diff-VQA; images: MIMIC-CXR-JPG)"
    layouts = ("mimic_all.csv and mimic_pair_questions.csv with MIMIC-CXR-JPG's files/ tree (a symlink works)",)

    def _studies(self, root: Path, report: base.BuildReport) -> dict[str, dict]:
        path = root / "mimic_all.csv"
        if not path.is_file():
            raise self.layout_error(root, "no mimic_all.csv")
        studies = {}
        for row in _read(path):
            study, subject = _id(row.get("study_id")), _id(row.get("subject_id"))
            dicom = str(row.get("dicom_id", "")).strip()
            if not (study and subject and dicom):
                report.skip("bad_row", f"mimic_all.csv study {study!r}", "subject_id, study_id or dicom_id is blank")
                continue
            labels = {}
            for name in CHEXPERT_LABELS:
                try:
                    v = base.label_value(row.get(name))
                except ValueError:
                    report.skip("bad_label", study, f"{name}={row.get(name)!r}")
                    continue
                if v is not None:
                    labels[name] = v
            studies[study] = {"subject": subject, "dicom": dicom, "labels": labels,
                              "view": str(row.get("view", "")).strip().lower(), "date": _iso(row.get("study_date", "")),
                              "order": row.get("study_order"),
                              "path": f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"}
        return studies

    def scan(self, root: Path, report: base.BuildReport) -> list[base.StudyRecord]:
        root = Path(root)
        studies = self._studies(root, report)
        qpath = root / "mimic_pair_questions.csv"
        if not qpath.is_file():
            raise self.layout_error(root, "no mimic_pair_questions.csv")
        rows = _read(qpath)
        report.note("medical_diff_vqa_questions", len(rows))
        per_study: dict[str, dict] = {}
        seen: set[tuple] = set()
        for i, row in enumerate(rows):
            study, ref = _id(row.get("study_id")), _id(row.get("ref_id"))
            qtype = str(row.get("question_type", "")).strip().lower()
            question, answer = str(row.get("question", "")).strip(), str(row.get("answer", "")).strip()
            item = f"{study} row {i + 2}"
            if (study, qtype, question, answer) in seen:
                report.skip("duplicate_question", item, "the same question and answer of this study again; kept once")
                continue
            seen.add((study, qtype, question, answer))
            if study not in studies:
                report.skip("study_not_in_mimic_all", item, f"study {study} has no row in mimic_all.csv (no image)")
                continue
            if not (question and answer):
                report.skip("empty_question", item, "question or answer is blank")
                continue
            entry = per_study.setdefault(study, {"qas": [], "ref": None, "splits": set()})
            split = SPLITS.get(str(row.get("split", "")).strip().lower())
            if split is None:
                report.flag("split_unknown_assigned_by_patient", item, f"split {row.get('split')!r}")
                split = base.patient_split(studies[study]["subject"])
            entry["splits"].add(split)
            if qtype == "difference":
                problem = self._reference_problem(root, studies, study, ref, entry["ref"])
                if problem:
                    report.skip(problem[0], item, problem[1])
                    continue
                entry["ref"] = ref
            entry["qas"].append({"question": question, "answer": answer, "qtype": QTYPES.get(qtype, "other"),
                                 "closed": answer.lower() in ("yes", "no"), "difference": qtype == "difference"})

        records = []
        for study, entry in per_study.items():
            s = studies[study]
            if not (root / s["path"]).is_file():
                report.skip("image_missing_file", study,
                            f"{root / s['path']} not found (is MIMIC-CXR-JPG's files/ under root?)")
                continue
            role_view = VIEWS.get(s["view"])
            if role_view is None:
                report.flag("view_unknown_assumed_frontal", study,
                            f"mimic_all.csv view {s['view']!r} (kept as PA frontal)")
                role_view = ("frontal", "PA")
            prior = None
            if entry["ref"]:
                r = studies[entry["ref"]]
                prior = {"study": entry["ref"], "path": str(root / r["path"]),
                         "view": VIEWS.get(r["view"], ("", "PA"))[1]}
            records.append(base.StudyRecord(
                study_id=base.safe_key(self.name, study), patient_id=s["subject"],
                split=most_held_out(entry["splits"]), study_date=s["date"],
                prior_study_id=base.safe_key(self.name, entry["ref"]) if entry["ref"] else None,
                payload={"path": str(root / s["path"]), "role": role_view[0], "view": role_view[1], "prior": prior,
                         "labels": s["labels"], "qas": entry["qas"]}))
        return keep_patients_in_one_split(base.count_duplicates(records, report), report)

    @staticmethod
    def _reference_problem(root: Path, studies: dict, study: str, ref: str, kept_ref: str | None) -> tuple | None:
        """(reason, detail) when a difference question's reference cannot serve as this study's prior."""
        if ref not in studies:
            return "reference_not_in_mimic_all", f"reference study {ref!r} has no row in mimic_all.csv"
        main, r = studies[study], studies[ref]
        if r["subject"] != main["subject"]:
            return "reference_other_patient", (f"reference {ref} belongs to subject {r['subject']}, "
                                               f"not {main['subject']}")
        if not _order(r) < _order(main):
            return "reference_not_earlier", f"reference {ref} is not an earlier study than {study}"
        if kept_ref is not None and ref != kept_ref:
            return "second_reference", f"{study} already has reference {kept_ref}; one prior per study"
        if not (root / r["path"]).is_file():
            return "missing_prior_image", f"{root / r['path']} not found"
        return None

    def load(self, record: base.StudyRecord, report: base.BuildReport) -> tuple[Study, dict[str, np.ndarray]] | None:
        p = record.payload
        img = self.read(p["path"], record.study_id, report)
        if img is None:
            return None
        refs = [ImageRef(role=p["role"], key=f"{p['role']}.png", view=p["view"], width=img.shape[1],
                         height=img.shape[0])]
        images, qas, prior_id = {p["role"]: img}, p["qas"], record.prior_study_id
        if p["prior"]:
            try:
                prior = read_image(p["prior"]["path"])
            except ImageDecodeError as e:
                # the study stays; only the questions that need the prior go
                for q in qas:
                    if q["difference"]:
                        report.skip("prior_image_unreadable", record.study_id, e.message)
                qas, prior_id = [q for q in qas if not q["difference"]], None
            else:
                images["prior"] = prior
                refs.append(ImageRef(role="prior", key="prior.png", view=p["prior"]["view"],
                                     width=prior.shape[1], height=prior.shape[0]))
        study = Study(study_id=record.study_id, patient_id=record.patient_id, split=record.split, source=self.name,
                      license=self.license, images=refs, labels=p["labels"], study_date=record.study_date,
                      prior_study_id=prior_id,
                      vqa=[VQAPair(question=q["question"], answer=q["answer"], qtype=q["qtype"], closed=q["closed"])
                           for q in qas])
        return study, images
