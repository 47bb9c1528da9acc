"""What converters derive when a corpus gives labels but no text: closed presence questions, and the
frontal/lateral view of an image from a DICOM header.

Label-only corpora (CheXpert v1.0, the negatives of RSNA Pneumonia and SIIM-ACR) would otherwise give a
study no task to train on: each certain label (1 or 0) becomes a yes/no question about that finding.
Uncertain labels (-1) get no question (there is no right answer) and stay in Study.labels as -1.
"""

from __future__ import annotations

from pathlib import Path

from cxrfm.data.schema import CHEXPERT_LABELS, VQAPair
from cxrfm.data.sources.base import normalize_view

QUESTIONS = {
    "No Finding": "is this chest x-ray normal?",
    "Enlarged Cardiomediastinum": "is the cardiomediastinal silhouette enlarged?",
    "Cardiomegaly": "is there cardiomegaly?",
    "Lung Opacity": "is there a lung opacity?",
    "Lung Lesion": "is there a lung lesion?",
    "Edema": "is there pulmonary edema?",
    "Consolidation": "is there consolidation?",
    "Pneumonia": "is there pneumonia?",
    "Atelectasis": "is there atelectasis?",
    "Pneumothorax": "is there a pneumothorax?",
    "Pleural Effusion": "is there a pleural effusion?",
    "Pleural Other": "is there another pleural abnormality?",
    "Fracture": "is there a fracture?",
    "Support Devices": "is there a support device?",
}
assert set(QUESTIONS) == set(CHEXPERT_LABELS)


def label_questions(labels: dict[str, int]) -> list[VQAPair]:
    """One closed question per certain label, in CHEXPERT_LABELS order: 1 -> "yes", 0 -> "no"."""
    return [VQAPair(question=QUESTIONS[name], answer="yes" if labels[name] == 1 else "no",
                    qtype="presence" if name != "No Finding" else "other", closed=True)
            for name in CHEXPERT_LABELS if labels.get(name) in (0, 1)]


def dicom_header(path: str | Path) -> dict[str, str]:
    """{"view": schema view or "", "patient_id", "study_uid", "photometric"} from a DICOM header, pixels not
    read; {} when the file is not a readable DICOM (the image read later counts the problem)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - pydicom raises several types for malformed files; load() reports it
        return {}
    view = normalize_view(ds.get("ViewPosition", "")) or ""
    return {"view": view, "patient_id": str(ds.get("PatientID", "") or ""),
            "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
            "photometric": str(ds.get("PhotometricInterpretation", "") or "")}
