"""The one Study schema every source converts to (synthetic phantoms now, real corpora later).

A Study is one imaging exam of one patient: up to three images (frontal, lateral, prior frontal),
the report sections, 14 CheXpert-style labels, grounded finding phrases with boxes, and VQA pairs.
Images travel separately (PNG members of the shard); the Study JSON only names them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = "1.0"

# The 14 observations of the CheXpert labeler, in their published order.
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# CheXpert convention: 1 positive, 0 negative, -1 uncertain; a label that is absent is "not mentioned".
LabelValue = Literal[1, 0, -1]
ImageRole = Literal["frontal", "lateral", "prior"]
ViewPosition = Literal["PA", "AP", "LATERAL", "LL"]
Split = Literal["train", "val", "test"]
TASKS: tuple[str, ...] = ("report", "vqa", "grounding", "generate")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Box(_Strict):
    """Axis-aligned box in pixel coordinates of the stored image (x to the right, y down)."""

    x1: float
    y1: float
    x2: float
    y2: float

    @model_validator(mode="after")
    def _ordered(self) -> "Box":
        if not (self.x2 > self.x1 and self.y2 > self.y1):
            raise ValueError(f"box must have x2 > x1 and y2 > y1, got {self}")
        return self

    def clipped_inside(self, width: int, height: int) -> bool:
        return 0 <= self.x1 and 0 <= self.y1 and self.x2 <= width and self.y2 <= height


class ImageRef(_Strict):
    """One image of the study. `key` is the member name in the shard, e.g. "frontal.png"."""

    role: ImageRole
    key: str
    view: ViewPosition
    width: int
    height: int


class GroundedPhrase(_Strict):
    """A finding phrase of the report and where it is on the frontal image."""

    phrase: str
    label: str  # one of CHEXPERT_LABELS (or a source-specific label kept as is)
    boxes: list[Box]
    image_role: ImageRole = "frontal"


class VQAPair(_Strict):
    question: str
    answer: str
    # presence | laterality | location | size | count | view | device | change | other
    qtype: str
    closed: bool  # yes/no style question


class Study(_Strict):
    schema_version: str = SCHEMA_VERSION
    study_id: str
    patient_id: str
    split: Split
    source: str
    license: str = "unknown"
    images: list[ImageRef]
    indication: str = ""
    comparison: str = ""
    findings: str = ""
    impression: str = ""
    labels: dict[str, LabelValue] = Field(default_factory=dict)
    source_labels: dict[str, str] = Field(default_factory=dict)
    grounding: list[GroundedPhrase] = Field(default_factory=list)
    vqa: list[VQAPair] = Field(default_factory=list)
    prior_study_id: str | None = None
    study_date: str | None = None  # ISO date, used to order priors

    @field_validator("images")
    @classmethod
    def _one_frontal(cls, images: list[ImageRef]) -> list[ImageRef]:
        roles = [im.role for im in images]
        if "frontal" not in roles and "lateral" not in roles:
            raise ValueError("a study needs a frontal or a lateral image")
        if len(set(roles)) != len(roles):
            raise ValueError(f"image roles must be unique within a study, got {roles}")
        return images

    @field_validator("labels")
    @classmethod
    def _known_labels(cls, labels: dict[str, int]) -> dict[str, int]:
        unknown = set(labels) - set(CHEXPERT_LABELS)
        if unknown:
            raise ValueError(f"unknown CheXpert label(s) {sorted(unknown)}; allowed: {list(CHEXPERT_LABELS)}")
        return labels

    @property
    def report(self) -> str:
        """Findings and impression as one target text, the way report generation is trained."""
        parts = []
        if self.findings:
            parts.append(f"FINDINGS: {self.findings}")
        if self.impression:
            parts.append(f"IMPRESSION: {self.impression}")
        return " ".join(parts)

    def image(self, role: str) -> ImageRef | None:
        return next((im for im in self.images if im.role == role), None)
