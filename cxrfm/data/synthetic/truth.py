"""Ground truth of one synthetic chest radiograph: anatomy, findings, devices, negations, interval change.

Everything is resolution-free. Image coordinates are normalised: u to the right, v down, both in [0, 1].
Sides are always the PATIENT's: on a frontal image the patient's right lies on the image LEFT.
Local findings sit in lung-relative coordinates (`a`: fraction of the lung half-width outward from the
midline, `t`: fraction of the lung height from apex to costophrenic angle), so a patient's nodule stays in
the same place on a follow-up exam even though positioning differs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

SIDES: tuple[str, ...] = ("right", "left")
ZONES: tuple[str, ...] = ("upper", "middle", "lower")
# Zones split the lung height (apex -> costophrenic angle) in thirds.
ZONE_T: dict[str, tuple[float, float]] = {"upper": (0.0, 1 / 3), "middle": (1 / 3, 2 / 3), "lower": (2 / 3, 1.0)}
PLEURAL_SEVERITY: tuple[str, ...] = ("small", "moderate", "large")  # effusion, pneumothorax
EXTENT: tuple[str, ...] = ("mild", "moderate", "severe")  # edema, consolidation, opacity

PARENCHYMAL_KINDS: tuple[str, ...] = ("consolidation", "opacity", "nodule", "mass", "edema", "atelectasis")
DEVICE_KINDS: tuple[str, ...] = ("ett", "central_line", "pacemaker")
FINDING_KINDS: tuple[str, ...] = ("cardiomegaly", "effusion", "pneumothorax") + PARENCHYMAL_KINDS + DEVICE_KINDS
# Kinds the report may state as absent; "lungs_clear" stands for every parenchymal kind at once.
NEGATABLE: tuple[str, ...] = (
    "cardiomegaly",
    "effusion",
    "pneumothorax",
    "consolidation",
    "edema",
    "nodule",
    "lungs_clear",
    "fracture",
)
# Which drawn kinds a negation rules out (used by the report, the labels and the tests alike).
NEGATION_COVERS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("cardiomegaly",),
    "effusion": ("effusion",),
    "pneumothorax": ("pneumothorax",),
    "consolidation": ("consolidation",),
    "edema": ("edema",),
    "nodule": ("nodule", "mass"),
    "lungs_clear": PARENCHYMAL_KINDS,
    "fracture": (),
}
CHANGE_STATUS: tuple[str, ...] = ("new", "increased", "decreased", "resolved", "unchanged")

# A normal heart is at most this CTR on the image, an enlarged one at least CARDIOMEGALY_MIN_CTR:
# the gap keeps "CTR > 0.5 iff cardiomegaly" true after pixel rounding at 128 px.
NORMAL_MAX_CTR = 0.48
CARDIOMEGALY_MIN_CTR = 0.54
AP_MAGNIFICATION = 1.08
# Width of the air rim between chest wall and collapsed lung, by pneumothorax size (normalised units).
PTX_GAP: dict[str, float] = {
    "small": 0.035,
    "moderate": 0.06,
    "large": 0.1,
}  # the heart is further from the detector on an AP film, so it projects larger


@dataclass(frozen=True)
class Anatomy:
    """Body and thorax geometry of one exam (the patient's build plus this exam's positioning)."""

    mid: float  # u of the midline (spine, trachea)
    half_width: float  # lateral lung edge to midline at the costophrenic level (internal thorax / 2)
    apex: float  # v of the lung apices
    cp: float  # v of the lateral costophrenic angles
    dome_right: float  # v of the top of each hemidiaphragm (the right one sits higher)
    dome_left: float
    medial: float  # medial lung edge to midline (mediastinum half-width)
    heart_left: float  # fraction of the heart width lying on the patient's left of the midline
    heart_height: float  # vertical semi-axis of a normal heart
    body_half_width: float
    fov_cm: float  # field of view: the image width in cm, so cm per pixel = fov_cm / size
    rib_phase: float  # shifts the rib pattern a little between patients
    gastric_bubble: bool

    @property
    def lung_height(self) -> float:
        return self.cp - self.apex

    @property
    def carina(self) -> float:
        """v of the carina, about a third of the way down the lungs."""
        return self.apex + 0.3 * self.lung_height

    def shifted(self, du: float, dv: float) -> "Anatomy":
        """The same patient positioned differently (translation only, so lung-relative places stay valid)."""
        return replace(
            self,
            mid=self.mid + du,
            apex=self.apex + dv,
            cp=self.cp + dv,
            dome_right=self.dome_right + dv,
            dome_left=self.dome_left + dv,
        )


@dataclass(frozen=True)
class Finding:
    """One drawn abnormality or support device. Only the fields that matter for its kind are set."""

    kind: str  # one of FINDING_KINDS
    side: str | None = None  # "right" | "left" | "bilateral" (patient side); None for midline things
    zone: str | None = None  # "upper" | "middle" | "lower" for zonal findings
    severity: str | None = None  # PLEURAL_SEVERITY for effusion/pneumothorax, EXTENT for the others
    size_cm: float | None = None  # nodule/mass diameter, pneumothorax rim width
    uncertain: bool = False  # drawn faintly and reported with hedging ("may represent")
    a: float = 0.0  # lung-relative place of local findings (see module doc)
    t: float = 0.0
    angle: float = 0.0  # tilt of a plate-like atelectasis band (radians)
    shape_seed: int = 0  # texture and lobulation; the finding looks the same on every render
    position: str | None = None  # ETT: "appropriate" | "low" | "high" | "right mainstem"; line: access vein
    tip_cm: float | None = None  # ETT tip distance above the carina (negative: below it)
    tip: str | None = None  # central line tip: "svc" | "cavoatrial junction" | "right atrium"
    leads: int = 0  # pacemaker leads

    @property
    def key(self) -> tuple:
        """Identity of a finding across a patient's exams (one per kind, side and zone)."""
        return (self.kind, self.side, self.zone)

    @property
    def is_device(self) -> bool:
        return self.kind in DEVICE_KINDS

    @property
    def rank(self) -> float:
        """Orders sizes so interval change can say increased/decreased."""
        if self.size_cm is not None and self.kind in ("nodule", "mass"):
            return self.size_cm
        for scale in (PLEURAL_SEVERITY, EXTENT):
            if self.severity in scale:
                return float(scale.index(self.severity))
        return 0.0


@dataclass(frozen=True)
class Change:
    """Interval change of one finding between the prior exam and this one."""

    kind: str
    side: str | None
    zone: str | None
    status: str  # one of CHANGE_STATUS
    before: Finding | None = None
    after: Finding | None = None


@dataclass(frozen=True)
class PhantomTruth:
    """Everything a phantom shows and its report says; the image and the text are both made from this."""

    view: str  # "PA" | "AP"
    anatomy: Anatomy
    ctr: float  # cardiothoracic ratio as it projects on this image (AP magnification included)
    findings: tuple[Finding, ...] = ()
    negated: tuple[tuple[str, str | None], ...] = ()  # (NEGATABLE kind, side or None) stated absent
    changes: tuple[Change, ...] = ()  # versus the prior exam; empty when the study has no prior
    age: int = 60
    sex: str = "female"
    exposure: float = 1.9  # attenuation that maps to white; larger -> darker film
    gamma: float = 0.85
    noise: float = 0.012  # quantum noise, in units of full scale
    texture_seed: int = 0  # lung markings and soft-tissue texture of this exam

    @property
    def cardiomegaly(self) -> bool:
        return self.ctr > 0.5

    def of_kind(self, *kinds: str) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.kind in kinds)

    def pathologies(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if not f.is_device)

    def devices(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.is_device)

    def without(self, *kinds: str) -> "PhantomTruth":
        """The same exam with every finding of these kinds removed (the tests render both and compare)."""
        return replace(self, findings=tuple(f for f in self.findings if f.kind not in kinds))

    def pixel_spacing_cm(self, size: int) -> float:
        return self.anatomy.fov_cm / size


def diff_findings(before: PhantomTruth, after: PhantomTruth) -> tuple[Change, ...]:
    """Interval change from `before` (the prior) to `after`, one Change per finding key."""
    old = {f.key: f for f in before.findings}
    new = {f.key: f for f in after.findings}
    changes = []
    for key in list(old) + [k for k in new if k not in old]:
        f0, f1 = old.get(key), new.get(key)
        if f0 is None:
            status = "new"
        elif f1 is None:
            status = "resolved"
        elif f1.rank > f0.rank + 1e-6:
            status = "increased"
        elif f1.rank < f0.rank - 1e-6:
            status = "decreased"
        else:
            status = "unchanged"
        changes.append(Change(kind=key[0], side=key[1], zone=key[2], status=status, before=f0, after=f1))
    return tuple(changes)
