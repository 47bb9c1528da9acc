"""Tiny copies of CheXpert v1.0(-small), PadChest, RSNA Pneumonia and SIIM-ACR in their published layouts.

Real file and column names, a few studies each, tens of pixels per image; each writer also lays out the
awkward cases a real download has (a missing image, a lateral-only study, a projection that is not a
chest view, a box beyond the image, several masks for one image) and returns what a correct converter
must produce.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from cxrfm.data.schema import CHEXPERT_LABELS

# ----------------------------------------------------------------------------- writers


def pixels(h: int, w: int, seed: int, maximum: int = 255) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    return np.clip((xx / (w - 1) * 0.5 + yy / (h - 1) * 0.5) * maximum + rng.integers(0, 8, (h, w)), 0, maximum)


def jpeg(path: Path, h: int = 40, w: int = 32, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels(h, w, seed).astype(np.uint8)).save(path, format="JPEG", quality=95)


def png16(path: Path, h: int = 40, w: int = 32, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels(h, w, seed, maximum=4095).astype(np.uint16)).save(path, format="PNG")


def dicom(path: Path, h: int, w: int, view: str = "", patient: str = "", seed: int = 0, bits: int = 8) -> None:
    """An uncompressed DICOM radiograph with the header fields the converters read."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture, as both challenges ship
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.StudyInstanceUID = "CR", patient, generate_uid()
    if view:
        ds.ViewPosition = view
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = h, w, 1, "MONOCHROME2"
    if bits == 8:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = pixels(h, w, seed).astype(np.uint8).tobytes()
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels(h, w, seed, maximum=4095).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def table(path: Path, header: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in header})


# ----------------------------------------------------------------------------- CheXpert v1.0

CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]


def write_chexpert(root: Path, release: str = "CheXpert-v1.0-small") -> dict:
    """patient00001/study1: PA frontal + lateral (labels differ between the views: merged);
    patient00002/study1: lateral only; patient00003/study1: image missing; valid: patient64541/study1 AP."""
    folder = root / release

    def row(rel: str, fl: str, appa: str, labels: dict, write: bool = True, seed: int = 0) -> dict:
        if write:
            jpeg(root / rel, seed=seed)
        return {"Path": rel, "Sex": "Female", "Age": "68", "Frontal/Lateral": fl, "AP/PA": appa,
                **{k: str(float(v)) for k, v in labels.items()}}

    p = f"{release}/train"
    train = [
        row(f"{p}/patient00001/study1/view1_frontal.jpg", "Frontal", "PA",
            {"Cardiomegaly": 1, "Pleural Effusion": -1, "Edema": 0, "Support Devices": 1}, seed=1),
        row(f"{p}/patient00001/study1/view2_lateral.jpg", "Lateral", "",
            {"Cardiomegaly": 1, "Pleural Effusion": 1, "Edema": 0, "Support Devices": 1}, seed=2),
        row(f"{p}/patient00002/study1/view1_lateral.jpg", "Lateral", "", {"No Finding": 1}, seed=3),
        row(f"{p}/patient00003/study1/view1_frontal.jpg", "Frontal", "AP", {"Pneumonia": -1}, write=False),
    ]
    valid = [row(f"{release}/valid/patient64541/study1/view1_frontal.jpg", "Frontal", "AP",
                 {"No Finding": 0, "Lung Opacity": 1, "Atelectasis": 0, "Fracture": 0}, seed=4)]
    table(folder / "train.csv", CHEXPERT_COLUMNS, train)
    table(folder / "valid.csv", CHEXPERT_COLUMNS, valid)
    return {"folder": folder}


# ----------------------------------------------------------------------------- PadChest

PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
PADCHEST_COLUMNS = [
    "", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
    "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric", "Modality_DICOM", "Manufacturer_DICOM",
    "PhotometricInterpretation_DICOM", "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM",
    "SpatialResolution_DICOM", "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM",
    "Columns_DICOM", "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureInuAs_DICOM", "ExposureTime",
    "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel", "Labels", "Localizations",
    "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS",
]
PC_P1 = "216840111366964012283393834152009033102258826_00-017-014"  # patient with PA + lateral, then a later PA


def write_padchest(root: Path) -> dict:
    """Study S1 (PA + L, cardiomegaly + effusion + pacemaker + an unmapped label), study S2 of the same
    patient a year later (PA, normal), study S3 whose only image is a rib (COSTAL) view, study S4 whose
    image is missing, study S5 lateral only."""
    rows = []

    def img(image_id, directory, study, patient, date, projection, report, labels, write=True, seed=0):
        if write:
            png16(root / str(directory) / image_id, seed=seed)
        rows.append({"": str(len(rows)), "ImageID": image_id, "ImageDir": str(directory), "StudyDate_DICOM": date,
                     "StudyID": study, "PatientID": patient, "PatientBirth": "1940.0", "PatientSex_DICOM": "M",
                     "ViewPosition_DICOM": {"PA": "POSTEROANTERIOR", "L": "LATERAL"}.get(projection, ""),
                     "Projection": projection, "MethodProjection": "Manual review of DICOM fields",
                     "Pediatric": "No", "Modality_DICOM": "CR", "ReportID": str(4000 + len(rows)), "Report": report,
                     "MethodLabel": "Physician", "Labels": labels, "Localizations": "[]",
                     "LabelsLocalizationsBySentence": "[]", "labelCUIS": "[]", "LocalizationsCUIS": "[]"})

    s1 = "cardiomegalia . derrame pleural izquierdo . marcapasos ."
    img("S1_pa.png", 0, "S1", PC_P1, "20090311", "PA", s1,
        "['cardiomegaly', 'pleural effusion', 'pacemaker', 'aortic elongation']", seed=1)
    img("S1_l.png", 0, "S1", PC_P1, "20090311", "L", s1,
        "['cardiomegaly', 'pleural effusion', 'pacemaker', 'aortic elongation']", seed=2)
    img("S2_pa.png", 1, "S2", PC_P1, "20100402", "PA", "sin hallazgos patologicos .", "['normal']", seed=3)
    img("S3_costal.png", 1, "S3", "P3", "20120101", "COSTAL", "fractura costal .", "['rib fracture']", seed=4)
    img("S4_pa.png", 1, "S4", "P4", "20120101", "PA", "neumonia .", "['pneumonia']", write=False)
    img("S5_l.png", 2, "S5", "P5", "20130505", "L", "atelectasia laminar .", "['laminar atelectasis']", seed=5)
    table(root / PADCHEST_CSV, PADCHEST_COLUMNS, rows)
    return {}


# ----------------------------------------------------------------------------- RSNA Pneumonia

RSNA_A = "0004cfab-14fd-4e49-80ba-63a80b6bddd6"  # Normal
RSNA_B = "00436515-870c-4b36-a041-de91049b9ab4"  # two opacity boxes, AP
RSNA_C = "00704310-78a8-4b38-8475-49f4573b2dbb"  # one box partly outside the image; PA
RSNA_D = "00569f44-917d-4c86-a842-81832af98c30"  # "No Lung Opacity / Not Normal", DICOM missing


def write_rsna(root: Path) -> dict:
    """stage_2_train_labels.csv (patientId, x, y, width, height, Target), stage_2_detailed_class_info.csv
    and stage_2_train_images/<patientId>.dcm; images 64x64 (the release's are 1024x1024)."""
    labels = [
        {"patientId": RSNA_A, "Target": "0"},
        {"patientId": RSNA_B, "x": "10.0", "y": "12.0", "width": "16.0", "height": "30.0", "Target": "1"},
        {"patientId": RSNA_B, "x": "40.0", "y": "14.0", "width": "14.0", "height": "28.0", "Target": "1"},
        {"patientId": RSNA_C, "x": "50.0", "y": "20.0", "width": "30.0", "height": "20.0", "Target": "1"},
        {"patientId": RSNA_D, "Target": "0"},
    ]
    table(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], labels)
    detail = [{"patientId": RSNA_A, "class": "Normal"}, {"patientId": RSNA_B, "class": "Lung Opacity"},
              {"patientId": RSNA_B, "class": "Lung Opacity"}, {"patientId": RSNA_C, "class": "Lung Opacity"},
              {"patientId": RSNA_D, "class": "No Lung Opacity / Not Normal"}]
    table(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], detail)
    for i, (pid, view) in enumerate(((RSNA_A, "PA"), (RSNA_B, "AP"), (RSNA_C, "PA"))):
        dicom(root / "stage_2_train_images" / f"{pid}.dcm", 64, 64, view=view, patient=pid, seed=10 + i)
    return {}


# ----------------------------------------------------------------------------- SIIM-ACR Pneumothorax

SIIM_A = "1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090"  # no pneumothorax
SIIM_B = "1.2.276.0.7230010.3.1.4.8323329.14508.1517875252.443873"  # two masks
SIIM_C = "1.2.276.0.7230010.3.1.4.8323329.4440.1517875182.865105"  # listed, DICOM missing


def encode_rle(mask: np.ndarray) -> str:
    """SIIM's train-rle.csv encoding: column-major pixels, each run's start relative to the previous run's end."""
    flat = mask.T.flatten()
    runs, prev_end, i = [], 0, 0
    while i < len(flat):
        if flat[i]:
            start = i
            while i < len(flat) and flat[i]:
                i += 1
            runs += [start - prev_end, i - start]
            prev_end = i
        else:
            i += 1
    return " ".join(str(r) for r in runs)


def write_siim(root: Path) -> dict:
    """train-rle.csv (ImageId, " EncodedPixels" with the release's leading space) and the nested
    dicom-images-train/<study>/<series>/<ImageId>.dcm tree; images 64x48 (the release's are 1024x1024)."""
    h, w = 64, 48
    apex = np.zeros((h, w), bool)
    apex[4:14, 30:44] = True  # rows 4..13, cols 30..43
    base = np.zeros((h, w), bool)
    base[50:60, 2:10] = True
    rows = [{"ImageId": SIIM_A, " EncodedPixels": " -1"},
            {"ImageId": SIIM_B, " EncodedPixels": " " + encode_rle(apex)},
            {"ImageId": SIIM_B, " EncodedPixels": " " + encode_rle(base)},
            {"ImageId": SIIM_C, " EncodedPixels": " -1"}]
    table(root / "train-rle.csv", ["ImageId", " EncodedPixels"], rows)
    for i, (image, patient) in enumerate(((SIIM_A, "17d405a3-a0d2-4901-b33a-63906aa48d9f"),
                                          (SIIM_B, "8ab1ffda-8b65-4914-95d6-2e549e328666"))):
        dicom(root / "dicom-images-train" / f"1.2.3.{i}" / f"1.2.3.{i}.1" / f"{image}.dcm", h, w, view="PA",
              patient=patient, seed=20 + i)
    return {"boxes": {SIIM_B: [(2, 50, 10, 60), (30, 4, 44, 14)]}}
