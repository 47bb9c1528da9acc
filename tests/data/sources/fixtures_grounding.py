"""Tiny copies of the grounding corpora in their published layouts: MS-CXR, VinDr-CXR, ChestX-ray8.

Each writer lays out a handful of studies under `root` with the real file and column names, plus the
awkward cases a real download has (boxes partly / wholly outside the image, a missing image, an
unreadable image, a duplicate id, a MONOCHROME1 DICOM, a 16-bit PNG), and returns what a correct
converter must produce, so the tests state the expected behaviour next to the data that causes it.
Images are small (tens of pixels) so the tests stay fast.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------- image writers


def gradient(height: int, width: int, seed: int = 0, maximum: int = 255) -> np.ndarray:
    """A deterministic, non-constant test image (a constant one would hide windowing bugs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = (xx / max(width - 1, 1) * 0.6 + yy / max(height - 1, 1) * 0.4) * maximum
    return np.clip(base + rng.integers(0, max(maximum // 50, 2), (height, width)), 0, maximum)


def write_jpeg(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = gradient(height, width, seed).astype(np.uint8)
    Image.fromarray(arr).save(path, format="JPEG", quality=95)
    return arr


def write_png8(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = gradient(height, width, seed).astype(np.uint8)
    Image.fromarray(arr).save(path, format="PNG")
    return arr


def write_png16(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A 16-bit grayscale PNG using only 12 bits, as detector exports do: a decoder must rescale, not clip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = gradient(height, width, seed, maximum=4095).astype(np.uint16)
    Image.fromarray(arr).save(path, format="PNG")
    return arr


def write_dicom(path: Path, height: int, width: int, photometric: str = "MONOCHROME2", seed: int = 0) -> np.ndarray:
    """An uncompressed 12-bit DICOM radiograph (Part 10, with preamble) and no stored window."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = gradient(height, width, seed, maximum=4095).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = height, width
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return arr


def chest(height: int, width: int, view: str = "frontal", seed: int = 0, maximum: int = 255) -> np.ndarray:
    """A synthetic phantom's frontal or lateral film at height x width: for corpora whose view is read from
    the pixels (a gradient would be neither)."""
    from cxrfm.data.synthetic import generate_phantoms

    films = [p.images[view] for p in generate_phantoms(12, 64, 3) if view in p.images]
    img = np.asarray(Image.fromarray(films[seed % len(films)]).resize((width, height), Image.BILINEAR))
    return (img.astype(np.float64) * maximum / 255).round()


def write_chest_jpeg(path: Path, height: int, width: int, view: str = "frontal", seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = chest(height, width, view, seed).astype(np.uint8)
    Image.fromarray(arr).save(path, format="JPEG", quality=95)
    return arr


def write_chest_png16(path: Path, height: int, width: int, view: str = "frontal", seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = chest(height, width, view, seed, maximum=4095).astype(np.uint16)  # 12 bits in a 16-bit PNG
    Image.fromarray(arr).save(path, format="PNG")
    return arr


def write_garbage(path: Path, signature: bytes = b"\xff\xd8\xff") -> None:
    """A file that starts like an image (so it is not skipped as 'missing') but cannot be decoded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(signature + b"\x00truncated download" * 4)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def mimic_jpg_path(subject: str, study: str, dicom_id: str) -> str:
    """MIMIC-CXR-JPG layout: files/p<first 2 digits>/p<subject>/s<study>/<dicom_id>.jpg"""
    return f"files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.jpg"


# ----------------------------------------------------------------------------- MS-CXR

MS_CXR_CSV = "MS_CXR_Local_Alignment_v1.1.0.csv"
MS_CXR_COLUMNS = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h",
                  "image_width", "image_height", "split"]
# MIMIC dicom ids are five dash-separated hex groups.
MS_A = "0a1b2c3d-00000001-11111111-22222222-33333333"  # two phrases, one with two boxes; train
MS_B = "0a1b2c3d-00000002-11111111-22222222-33333333"  # a box partly outside (clipped), one wholly outside
MS_C = "0a1b2c3d-00000003-11111111-22222222-33333333"  # image file missing
MS_D = "0a1b2c3d-00000004-11111111-22222222-33333333"  # image file unreadable
MS_E = "0a1b2c3d-00000005-11111111-22222222-33333333"  # stored at half the annotated size: boxes rescaled
MS_F = "0a1b2c3d-00000006-11111111-22222222-33333333"  # same patient as A but official split test


def write_ms_cxr(root: Path) -> dict:
    """MS-CXR v1.1.0 CSV + a MIMIC-CXR-JPG `files/` tree with the annotated images."""
    rows, images = [], {}

    def add(dicom, subject, study, category, text, box, size, split):
        path = mimic_jpg_path(subject, study, dicom)
        rows.append([dicom, category, text, path, *box, *size, split])
        images[dicom] = path

    add(MS_A, "10000032", "50414267", "Pneumonia", "Bibasilar opacities concerning for pneumonia",
        (4, 30, 20, 20), (80, 64), "train")
    add(MS_A, "10000032", "50414267", "Pneumonia", "Bibasilar opacities concerning for pneumonia",
        (50, 32, 22, 18), (80, 64), "train")
    add(MS_A, "10000032", "50414267", "Cardiomegaly", "The heart is enlarged", (25, 20, 30, 30), (80, 64), "train")
    rows.append(list(rows[-1]))  # an exact duplicate row: counted, kept once
    add(MS_B, "10000764", "57375967", "Pleural Effusion", "Small left pleural effusion",
        (60, 40, 30, 30), (80, 64), "val")  # x + w = 90 > 80, y + h = 70 > 64: clipped to the image
    add(MS_B, "10000764", "57375967", "Pneumothorax", "Apical pneumothorax",
        (90, 70, 10, 10), (80, 64), "val")  # starts beyond the image: dropped with its phrase
    add(MS_C, "10000898", "50771383", "Edema", "Mild pulmonary edema", (10, 10, 20, 20), (80, 64), "train")
    add(MS_D, "10000935", "50578979", "Atelectasis", "Left basal atelectasis", (10, 10, 20, 20), (80, 64), "train")
    add(MS_E, "10001217", "52067803", "Consolidation", "Right lower lobe consolidation",
        (20, 40, 40, 40), (160, 128), "train")  # annotated at 160x128, stored at 80x64
    add(MS_F, "10000032", "53189527", "Lung Opacity", "Patchy right basal opacity", (10, 10, 20, 20), (80, 64), "test")
    write_csv(root / MS_CXR_CSV, MS_CXR_COLUMNS, rows)

    write_jpeg(root / images[MS_A], 64, 80, seed=1)
    write_jpeg(root / images[MS_B], 64, 80, seed=2)
    write_garbage(root / images[MS_D])
    write_jpeg(root / images[MS_E], 64, 80, seed=5)
    write_jpeg(root / images[MS_F], 64, 80, seed=6)
    return {"images": images, "rows": len(rows)}


# ----------------------------------------------------------------------------- VinDr-CXR

VINDR_LOCAL = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
               "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
               "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
               "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion"]
VINDR_GLOBAL_TRAIN = ["COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding"]
VINDR_GLOBAL_TEST = ["COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other disease", "No finding"]  # sic
VINDR_ANN_COLUMNS = ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
V1 = "000434271f63a053c4128a0ba6352c7f"  # 3 readers, MONOCHROME1, consensus boxes
V2 = "00053190460d56c53cc3e57321387478"  # "No finding" by all readers
V3 = "0005e8e3701dfb1dd93d53e2ff537b6e"  # test: a box partly outside, one wholly outside
V4 = "0006e0a85696f6bb578e84fafa9a5607"  # DICOM missing
V5 = "0007d316f756b3fa0baea2ff514ce945"  # DICOM unreadable
V6 = "000ae00eb3942d27e0b97903dd563a6e"  # listed in train and test: a duplicate id


def _vindr_label_row(image_id: str, rad: str | None, positives: set[str], test: bool) -> list:
    names = VINDR_LOCAL + (VINDR_GLOBAL_TEST if test else VINDR_GLOBAL_TRAIN)
    return [image_id] + ([rad] if rad else []) + [int(n in positives) for n in names]


def write_vindr_cxr(root: Path) -> dict:
    """annotations/{annotations,image_labels}_{train,test}.csv + train/ and test/ DICOMs (PhysioNet 1.0.0)."""
    ann = root / "annotations"
    train_boxes = [
        # three readers agree on the heart (pairwise IoU > 0.5): one consensus box, the mean of the three
        [V1, "R8", "Cardiomegaly", 20, 30, 60, 50], [V1, "R9", "Cardiomegaly", 22, 31, 62, 52],
        [V1, "R10", "Cardiomegaly", 18, 29, 58, 51],
        # two of three readers mark the effusion: kept (majority)
        [V1, "R8", "Pleural effusion", 5, 40, 20, 60], [V1, "R9", "Pleural effusion", 6, 41, 21, 61],
        # one reader alone marks a nodule: dropped as a box (minority), kept as an uncertain label
        [V1, "R10", "Nodule/Mass", 40, 10, 48, 18],
        [V2, "R1", "No finding", "", "", "", ""], [V2, "R2", "No finding", "", "", "", ""],
        [V2, "R3", "No finding", "", "", "", ""],
        [V4, "R1", "No finding", "", "", "", ""],
        [V5, "R1", "Atelectasis", 5, 5, 20, 20], [V5, "R2", "Atelectasis", 5, 5, 20, 20],
        [V6, "R1", "No finding", "", "", "", ""],
    ]
    write_csv(ann / "annotations_train.csv", VINDR_ANN_COLUMNS, train_boxes)
    test_boxes = [  # the test set is one consensus reading: no reader column
        [V3, "Pleural effusion", 60, 40, 90, 70],  # partly outside an 80x64 image: clipped
        [V3, "Pneumothorax", 85, 5, 95, 15],  # wholly outside: dropped
        [V3, "Aortic enlargement", 30, 10, 45, 30],
        [V6, "No finding", "", "", "", ""],
    ]
    write_csv(ann / "annotations_test.csv", [c for c in VINDR_ANN_COLUMNS if c != "rad_id"], test_boxes)

    label_cols_train = ["image_id", "rad_id"] + VINDR_LOCAL + VINDR_GLOBAL_TRAIN
    label_cols_test = ["image_id"] + VINDR_LOCAL + VINDR_GLOBAL_TEST
    write_csv(ann / "image_labels_train.csv", label_cols_train, [
        _vindr_label_row(V1, "R8", {"Cardiomegaly", "Pleural effusion", "Other diseases"}, False),
        _vindr_label_row(V1, "R9", {"Cardiomegaly", "Pleural effusion"}, False),
        _vindr_label_row(V1, "R10", {"Cardiomegaly", "Nodule/Mass"}, False),
        _vindr_label_row(V2, "R1", {"No finding"}, False), _vindr_label_row(V2, "R2", {"No finding"}, False),
        _vindr_label_row(V2, "R3", {"No finding"}, False),
        _vindr_label_row(V4, "R1", {"No finding"}, False),
        _vindr_label_row(V5, "R1", {"Atelectasis"}, False), _vindr_label_row(V5, "R2", {"Atelectasis"}, False),
        _vindr_label_row(V6, "R1", {"No finding"}, False),
    ])
    write_csv(ann / "image_labels_test.csv", label_cols_test, [
        _vindr_label_row(V3, None, {"Pleural effusion", "Pneumothorax", "Aortic enlargement", "Other disease"}, True),
        _vindr_label_row(V6, None, {"No finding"}, True),
    ])
    pixels = {
        V1: write_dicom(root / "train" / f"{V1}.dicom", 64, 80, "MONOCHROME1", seed=11),
        V2: write_dicom(root / "train" / f"{V2}.dicom", 64, 80, "MONOCHROME2", seed=12),
        V3: write_dicom(root / "test" / f"{V3}.dicom", 64, 80, "MONOCHROME2", seed=13),
        V6: write_dicom(root / "test" / f"{V6}.dicom", 64, 80, "MONOCHROME2", seed=16),
    }
    write_dicom(root / "train" / f"{V6}.dicom", 64, 80, "MONOCHROME2", seed=16)
    path = root / "train" / f"{V5}.dicom"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00garbage")  # a DICOM preamble, then nothing valid
    return {"pixels": pixels}


# ----------------------------------------------------------------------------- ChestX-ray8 (NIH)

NIH_ENTRY_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
NIH_BBOX_HEADER = ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""]


def write_chestxray8(root: Path) -> dict:
    """Data_Entry_2017_v2020.csv, BBox_List_2017.csv, train_val_list.txt, test_list.txt, images/*.png.

    The published boxes are in the 1024x1024 frame of the released PNGs; this copy stores 64x64 PNGs,
    as a user who downsized the images would have, so boxes must be scaled by 64/1024.
    """
    entries = [
        ["00000001_000.png", "Cardiomegaly|Effusion", 0, 1, 58, "M", "PA", 2682, 2749, 0.143, 0.143],
        ["00000001_001.png", "No Finding", 1, 1, 58, "M", "PA", 2894, 2729, 0.143, 0.143],
        ["00000002_000.png", "Infiltration|Pneumonia", 0, 2, 81, "M", "AP", 2500, 2048, 0.168, 0.168],
        ["00000003_000.png", "Hernia", 0, 3, 74, "F", "PA", 2500, 2048, 0.168, 0.168],  # image missing
        ["00000004_000.png", "Mass|Nodule", 0, 4, 82, "M", "AP", 2500, 2048, 0.168, 0.168],  # unreadable
        ["00000005_000.png", "Emphysema", 0, 5, 70, "F", "PA", 2992, 2991, 0.143, 0.143],  # in neither list
        ["00000006_000.png", "Nodule", 0, 6, 66, "F", "PA", 2992, 2991, 0.143, 0.143],
    ]
    entries.append(list(entries[1]))  # the same Image Index twice: a duplicate id, kept once
    write_csv(root / "Data_Entry_2017_v2020.csv", NIH_ENTRY_HEADER, entries)
    write_csv(root / "BBox_List_2017.csv", NIH_BBOX_HEADER, [
        ["00000001_000.png", "Cardiomegaly", 320.0, 400.5, 384.0, 256.0, "", "", ""],
        ["00000002_000.png", "Infiltrate", 800.0, 512.0, 400.0, 300.0, "", "", ""],  # partly outside: clipped
        ["00000002_000.png", "Pneumonia", 1040.0, 100.0, 50.0, 50.0, "", "", ""],  # wholly outside: dropped
        ["00000006_000.png", "Nodule", 512.0, 256.0, 64.0, 64.0, "", "", ""],
    ])
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000004_000.png\n00000006_000.png\n")
    (root / "test_list.txt").write_text("00000002_000.png\n00000003_000.png\n")
    pixels = {
        "00000001_000.png": write_png16(root / "images" / "00000001_000.png", 64, 64, seed=21),
        "00000001_001.png": write_png8(root / "images" / "00000001_001.png", 64, 64, seed=22),
        "00000002_000.png": write_png8(root / "images" / "00000002_000.png", 64, 64, seed=23),
        "00000005_000.png": write_png8(root / "images" / "00000005_000.png", 64, 64, seed=25),
        "00000006_000.png": write_png8(root / "images_002" / "images" / "00000006_000.png", 64, 64, seed=26),
    }
    write_garbage(root / "images" / "00000004_000.png", signature=b"\x89PNG\r\n\x1a\n")
    return {"pixels": pixels}


# ----------------------------------------------------------------------------- VinDr-CXR, detection-challenge layout

VINDR_BOX_ONLY_COLUMNS = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
VINDR_CLASS_ID = {"Aortic enlargement": 0, "Atelectasis": 1, "Cardiomegaly": 3, "Nodule/Mass": 8,
                  "Pleural effusion": 10, "Pneumothorax": 12, "No finding": 14}
K1 = "9a5094b2563a1ef3ff50dc5c7ff71345"  # boxes by a majority (heart, effusion) and by a minority (nodule)
K2 = "051132a778e61a86eb147c7c6f564dfe"  # "No finding" by all three readers
K3 = "1c32170b4af4ce1a3030eb8167753b06"  # two readers mark a pneumothorax in different places: no box, label 1


def write_vindr_box_only(root: Path) -> dict:
    """train.csv (per-box rows, no image-level label file) + train/<image_id>.dicom, as the challenge release."""
    def row(image, reader, cls, box=("", "", "", "")):
        return [image, cls, VINDR_CLASS_ID[cls], reader, *box]

    rows = [
        row(K1, "R8", "Cardiomegaly", (20, 30, 60, 50)), row(K1, "R9", "Cardiomegaly", (22, 31, 62, 52)),
        row(K1, "R10", "Cardiomegaly", (18, 29, 58, 51)),
        row(K1, "R8", "Pleural effusion", (5, 40, 20, 60)), row(K1, "R9", "Pleural effusion", (6, 41, 21, 61)),
        row(K1, "R10", "Nodule/Mass", (40, 10, 48, 18)),
        row(K2, "R1", "No finding"), row(K2, "R2", "No finding"), row(K2, "R3", "No finding"),
        row(K3, "R4", "Pneumothorax", (60, 2, 78, 20)), row(K3, "R5", "Pneumothorax", (2, 2, 20, 20)),
        row(K3, "R6", "No finding"),
    ]
    write_csv(root / "train.csv", VINDR_BOX_ONLY_COLUMNS, rows)
    for i, image in enumerate((K1, K2, K3)):
        write_dicom(root / "train" / f"{image}.dicom", 64, 80, "MONOCHROME2", seed=40 + i)
    return {"images": [K1, K2, K3]}
