"""Tiny copies of the VQA corpora in their published layouts: VQA-RAD, SLAKE, Medical-Diff-VQA.

Each writer returns what a correct converter must produce; the awkward cases of a real download are
included on purpose (non-chest / non-X-ray / non-English rows, a missing and an unreadable image, a
duplicate question id, numeric answers, an image shared by the train and test questions, a difference
question whose reference study is the prior).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.data.sources.fixtures_grounding import (
    mimic_jpg_path,
    write_chest_jpeg,
    write_chest_png16,
    write_csv,
    write_garbage,
    write_jpeg,
    write_png16,
)

# ----------------------------------------------------------------------------- VQA-RAD

VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"


def _rad(qid, image, organ, question, answer, answer_type, qtype, phrase="freeform"):
    return {"qid": qid, "phrase_type": phrase, "qid_linked_id": f"{qid:05d}", "image_case_url": "",
            "image_name": image, "image_organ": organ, "evaluation": "given", "question": question,
            "question_rephrase": "NULL", "question_relation": "NULL", "question_frame": "NULL",
            "question_type": qtype, "answer": answer, "answer_type": answer_type}


def write_vqa_rad(root: Path) -> dict:
    """`VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/` (the OSF release)."""
    items = [
        _rad(1, "synpic100.jpg", "CHEST", "Is there a pneumothorax?", "Yes", "CLOSED", "PRES"),
        _rad(2, "synpic100.jpg", "CHEST", "Where is the mass?", "Right upper lobe", "OPEN", "POS"),
        _rad(3, "synpic100.jpg", "CHEST", "How many ribs are fractured?", 2, "OPEN ", "COUNT"),  # int, trailing blank
        _rad(4, "synpic200.jpg", "CHEST", "Is the heart enlarged?", "no", "CLOSED", "SIZE"),
        _rad(5, "synpic200.jpg", "CHEST", "Is the heart enlarged?", "no", "CLOSED", "SIZE", "test_freeform"),
        _rad(12, "synpic200.jpg", "CHEST", "In what plane was this image taken?", "AP", "OPEN", "PLANE"),
        _rad(6, "synpic300.jpg", "HEAD", "Is there a bleed?", "no", "CLOSED", "PRES"),  # not chest: filtered
        _rad(7, "synpic400.jpg", "CHEST", "What modality is this?", "CT", "OPEN", "MODALITY"),  # chest CT: filtered
        _rad(8, "synpic400.jpg", "CHEST", "Is there an effusion?", "yes", "CLOSED", "PRES"),
        _rad(9, "synpic500.jpg", "CHEST", "Is this a PA film?", "yes", "CLOSED", "PLANE"),  # image missing
        _rad(10, "synpic600.jpg", "CHEST", "Is there an effusion?", "no", "CLOSED", "PRES"),  # unreadable image
        _rad(11, "synpic700.png", "CHEST", "Is this an x-ray?", "yes", "CLOSED", "MODALITY", "test_para"),
        _rad(13, "synpic800.jpg", "CHEST", "Is there a pleural effusion?", "no", "CLOSED", "PRES"),  # a lateral film
    ]
    items.append(dict(items[0]))  # the same qid twice: a duplicate, kept once
    root.mkdir(parents=True, exist_ok=True)
    (root / VQA_RAD_JSON).write_text(json.dumps(items, indent=1))
    folder = root / VQA_RAD_IMAGES
    pixels = {
        # no PLANE answer for these: their view is read from the pixels
        "synpic100.jpg": write_chest_jpeg(folder / "synpic100.jpg", 64, 72, "frontal", seed=1),
        "synpic200.jpg": write_jpeg(folder / "synpic200.jpg", 64, 64, seed=32),
        "synpic700.png": write_chest_png16(folder / "synpic700.png", 48, 40, "frontal", seed=2),
        "synpic800.jpg": write_chest_jpeg(folder / "synpic800.jpg", 64, 64, "lateral", seed=3),
    }
    write_jpeg(folder / "synpic300.jpg", 64, 64, seed=33)
    write_jpeg(folder / "synpic400.jpg", 64, 64, seed=34)
    write_garbage(folder / "synpic600.jpg")
    return {"pixels": pixels}


# ----------------------------------------------------------------------------- SLAKE

def _slake(qid, img_id, question, answer, answer_type="CLOSED", lang="en", modality="X-Ray", location="Lung",
           content="Abnormality"):
    return {"img_id": img_id, "img_name": f"xmlab{img_id}/source.jpg", "question": question, "answer": answer,
            "q_lang": lang, "location": location, "modality": modality, "answer_type": answer_type,
            "base_type": "vqa", "content_type": content, "triple": ["vhead", "_", "_"], "qid": qid}


def write_slake(root: Path) -> dict:
    """Slake1.0/{train,validate,test}.json + Slake1.0/imgs/xmlab<N>/source.jpg (the published archive)."""
    base = root / "Slake1.0"
    train = [
        _slake(1, 102, "Does the picture contain lung?", "Yes", content="Organ"),
        _slake(2, 102, "Where is the abnormality?", "Right Lung, Lower Left", "OPEN", content="Position"),
        _slake(3, 102, "图片中包含肺吗?", "是", lang="zh"),  # Chinese: filtered
        _slake(4, 104, "Is this a CT image?", "Yes", modality="CT"),  # CT: filtered
        _slake(5, 108, "Is there a mass in the abdomen?", "No", location="Abdomen"),  # abdominal X-ray: filtered
        _slake(6, 105, "Is the lung healthy?", "No"),  # image missing
        _slake(7, 107, "How many lungs are in this image?", 2, "OPEN", content="Quantity", location="Chest_lung"),
        _slake(8, 109, "Which organ is abnormal?", "Heart", "OPEN", location="Chest_heart"),
    ]
    train.append(dict(train[0]))  # the same qid twice: a duplicate, kept once
    validate = [_slake(20, 103, "Is the heart enlarged?", "No", location="Chest_heart", content="Size"),
                _slake(21, 106, "Is there an effusion?", "No")]  # unreadable image
    test = [_slake(30, 109, "Is the heart abnormal?", "Yes", location="Chest_heart")]  # 109 is also in train
    base.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.json", train), ("validate.json", validate), ("test.json", test)):
        (base / name).write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    imgs = base / "imgs"
    pixels = {
        102: write_chest_jpeg(imgs / "xmlab102" / "source.jpg", 64, 64, "frontal", seed=41),
        103: write_chest_jpeg(imgs / "xmlab103" / "source.jpg", 56, 64, "frontal", seed=42),
        107: write_chest_jpeg(imgs / "xmlab107" / "source.jpg", 64, 48, "frontal", seed=47),
        109: write_chest_jpeg(imgs / "xmlab109" / "source.jpg", 64, 64, "frontal", seed=49),
    }
    write_jpeg(imgs / "xmlab104" / "source.jpg", 64, 64, seed=44)
    write_jpeg(imgs / "xmlab108" / "source.jpg", 64, 64, seed=48)
    write_garbage(imgs / "xmlab106" / "source.jpg")
    return {"pixels": pixels}


# ----------------------------------------------------------------------------- Medical-Diff-VQA

MIMIC_CHEXPERT = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                  "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                  "Pneumothorax", "Support Devices"]
DIFF_PAIRS_HEADER = ["", "study_id", "subject_id", "ref_id", "question_type", "question", "answer", "split"]
DIFF_ALL_HEADER = ["subject_id", "study_id"] + MIMIC_CHEXPERT + ["dicom_id", "view", "split", "study_date",
                                                                 "study_order"]
DIFF_DIFFERENCE_Q = "what has changed compared to the reference image?"


def _dicom(n: int) -> str:
    return f"{n:08x}-bde0afdd-112c0b34-7bc16630-4e384014"


def write_medical_diff_vqa(root: Path) -> dict:
    """mimic_pair_questions.csv + mimic_all.csv (PhysioNet 1.0.0) + a MIMIC-CXR-JPG `files/` tree."""
    studies = {  # study_id: (subject, labels, dicom number, view, date, order)
        "50414267": ("10000032", {"No Finding": 1}, 1, "postero-anterior", "21800506", 1),
        "53189527": ("10000032", {"Pleural Effusion": 1, "Edema": -1, "Cardiomegaly": 0}, 2, "antero-posterior",
                     "21800626", 2),
        "57375967": ("10000764", {"Pneumonia": 1}, 3, "antero-posterior", "21321015", 1),
        "50771383": ("10000898", {"No Finding": 1}, 4, "postero-anterior", "21880312", 2),
        "54205396": ("10000898", {"No Finding": 1}, 5, "postero-anterior", "21880113", 1),  # image missing
        "50578979": ("10000935", {"Lung Opacity": 1}, 6, "antero-posterior", "21871016", 1),  # unreadable image
        "51178377": ("10000935", {"Lung Opacity": 1}, 7, "antero-posterior", "21870823", 2),
        "55697293": ("10001217", {"No Finding": 1}, 8, "postero-anterior", "21870226", 1),  # main image missing
    }
    all_rows, paths = [], {}
    for study, (subject, labels, n, view, date, order) in studies.items():
        values = ["" if name not in labels else float(labels[name]) for name in MIMIC_CHEXPERT]
        all_rows.append([subject, study, *values, _dicom(n), view, "train", date, order])
        paths[study] = mimic_jpg_path(subject, study, _dicom(n))
    write_csv(root / "mimic_all.csv", DIFF_ALL_HEADER, all_rows)

    q = [
        # 53189527 (second visit of 10000032) against its prior 50414267: a difference question needs the prior
        ["53189527", "10000032", "50414267", "abnormality", "what abnormalities are seen in this image?",
         "pleural effusion, edema", "train"],
        ["53189527", "10000032", "50414267", "presence", "is there pneumothorax?", "no", "train"],
        ["53189527", "10000032", "50414267", "difference", DIFF_DIFFERENCE_Q,
         "the main image has additional findings of pleural effusion, and edema than the reference image.", "train"],
        ["57375967", "10000764", "50414267", "view", "which view is this image taken?", "AP view", "test"],
        # 50771383's reference 54205396 is the earlier visit, but its image is missing: only that question goes
        ["50771383", "10000898", "54205396", "location", "where is the pleural effusion?", "left side", "val"],
        ["50771383", "10000898", "54205396", "difference", DIFF_DIFFERENCE_Q, "nothing has changed.", "val"],
        # 51178377's reference is the earlier 50578979 whose image is unreadable: the difference question goes
        ["51178377", "10000935", "50578979", "level", "what level is the lung opacity?", "mild", "train"],
        ["51178377", "10000935", "50578979", "difference", DIFF_DIFFERENCE_Q, "nothing has changed.", "train"],
        # the reference of a difference question must be the earlier visit: 53189527 is after 50414267
        ["50414267", "10000032", "53189527", "presence", "is there pleural effusion?", "no", "train"],
        ["50414267", "10000032", "53189527", "difference", DIFF_DIFFERENCE_Q, "nothing has changed.", "train"],
        ["55697293", "10001217", "50414267", "presence", "is there edema?", "no", "test"],  # main image missing
        ["99999999", "10009999", "50414267", "presence", "is there edema?", "no", "test"],  # not in mimic_all.csv
    ]
    q.append(list(q[1]))  # the same question of the same study twice: a duplicate, kept once
    write_csv(root / "mimic_pair_questions.csv", DIFF_PAIRS_HEADER, [[i, *row] for i, row in enumerate(q)])
    pixels = {}
    for study in ("50414267", "53189527", "57375967", "50771383", "51178377"):
        pixels[study] = write_jpeg(root / paths[study], 64, 64, seed=int(study) % 97)
    write_garbage(root / paths["50578979"])
    return {"pixels": pixels, "paths": paths}
