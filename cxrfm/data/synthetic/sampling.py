"""Random ground truth: a patient's build, a first exam's findings, and a follow-up exam's interval change.

Findings claim (side, zone) slots so that two of them never cover the same lung region: an effusion over
a consolidation would hide it, and the image would no longer show what the report says.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cxrfm.data.synthetic.geometry import heart_mask, lung_mask, to_uv
from cxrfm.data.synthetic.truth import (
    AP_MAGNIFICATION,
    CARDIOMEGALY_MIN_CTR,
    EXTENT,
    NORMAL_MAX_CTR,
    PARENCHYMAL_KINDS,
    PLEURAL_SEVERITY,
    PTX_GAP,
    SIDES,
    ZONE_T,
    ZONES,
    Anatomy,
    Finding,
    PhantomTruth,
)

# How often each pathology is picked for an abnormal first exam (relative weights).
PATHOLOGY_WEIGHTS = {
    "effusion": 0.22,
    "consolidation": 0.17,
    "atelectasis": 0.12,
    "nodule": 0.11,
    "edema": 0.09,
    "pneumothorax": 0.08,
    "opacity": 0.07,
    "mass": 0.04,
}


@dataclass(frozen=True)
class Patient:
    """What stays the same across a patient's exams."""

    anatomy: Anatomy  # centred, before this exam's positioning
    base_ctr: float  # CTR on a PA film
    age: int
    sex: str


def sample_patient(rng: np.random.Generator) -> Patient:
    w = rng.uniform(0.31, 0.35)
    apex = rng.uniform(0.14, 0.18)
    cp = apex + rng.uniform(0.58, 0.64)
    dome_right = cp - rng.uniform(0.085, 0.11)
    anatomy = Anatomy(
        mid=0.5,
        half_width=w,
        apex=apex,
        cp=cp,
        dome_right=dome_right,
        dome_left=dome_right + rng.uniform(0.012, 0.03),
        medial=rng.uniform(0.07, 0.085),
        heart_left=rng.uniform(0.6, 0.68),
        heart_height=rng.uniform(0.12, 0.145),
        body_half_width=w + rng.uniform(0.08, 0.11),
        fov_cm=rng.uniform(38.0, 43.0),
        rib_phase=rng.uniform(-0.2, 0.2),
        gastric_bubble=bool(rng.random() < 0.7),
    )
    # Normal hearts stay below NORMAL_MAX_CTR even magnified on an AP film; enlarged ones are above
    # CARDIOMEGALY_MIN_CTR even on PA, so the CTR never straddles 0.5 (see truth.py).
    if rng.random() < 0.2:
        base_ctr = rng.uniform(CARDIOMEGALY_MIN_CTR + 0.01, 0.64)
    else:
        base_ctr = rng.uniform(0.38, NORMAL_MAX_CTR / AP_MAGNIFICATION)
    return Patient(anatomy, float(base_ctr), int(rng.integers(22, 92)), "male" if rng.random() < 0.5 else "female")


# ---------------------------------------------------------------- slots and placement


def slots_of(f: Finding) -> set[tuple[str, str]]:
    """Lung regions a finding covers on the frontal image."""
    if f.kind == "effusion":
        zones = {"small": ["lower"], "moderate": ["lower"], "large": ["lower", "middle"]}[f.severity]
    elif f.kind == "pneumothorax":
        zones = {"small": ["upper"], "moderate": ["upper", "middle"], "large": list(ZONES)}[f.severity]
    elif f.kind == "edema":
        return {("right", "middle"), ("left", "middle")}
    elif f.kind in PARENCHYMAL_KINDS:
        zones = [f.zone]
    else:
        return set()
    return {(f.side, z) for z in zones}


def occupied(findings) -> set[tuple[str, str]]:
    taken: set[tuple[str, str]] = set()
    for f in findings:
        taken |= slots_of(f)
    return taken


def _fits(patient: Patient, side: str, a: float, t: float, radius: float) -> bool:
    """The disc is inside the lung and clear of the heart (as large as it gets, AP-magnified)."""
    an = patient.anatomy
    u0, v0 = to_uv(an, side, a, t)
    ang = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    u = np.concatenate([[u0], u0 + radius * np.cos(ang)])
    v = np.concatenate([[v0], v0 + radius * np.sin(ang)])
    heart_ctr = patient.base_ctr * AP_MAGNIFICATION * 1.05
    return bool(lung_mask(an, side, u, v).all() and not heart_mask(an, heart_ctr, u, v).any())


def place(rng, patient: Patient, side: str, zone: str, radius: float, t_range=None) -> tuple[float, float] | None:
    """A random lung-relative place in the zone where a disc of `radius` fits; None when there is none."""
    t0, t1 = t_range or ZONE_T[zone]
    margin = min(radius / patient.anatomy.lung_height, 0.4 * (t1 - t0))
    for _ in range(40):
        a, t = rng.uniform(0.2, 0.92), rng.uniform(t0 + margin, t1 - margin)
        if _fits(patient, side, a, t, radius + 0.01):
            return float(a), float(t)
    return None


# ---------------------------------------------------------------- one finding of each kind


def _seed(rng) -> int:
    return int(rng.integers(2**31 - 1))


def make_effusion(rng, side: str, severity: str, uncertain: bool = False) -> Finding:
    return Finding("effusion", side=side, severity=severity, uncertain=uncertain, shape_seed=_seed(rng))


def make_pneumothorax(rng, patient: Patient, side: str, severity: str) -> Finding:
    size_cm = round(PTX_GAP[severity] * patient.anatomy.fov_cm, 1)
    return Finding("pneumothorax", side=side, severity=severity, size_cm=size_cm, shape_seed=_seed(rng))


def make_zonal(rng, patient: Patient, kind: str, side: str, zone: str, **kw) -> Finding | None:
    """Consolidation, opacity, nodule, mass or atelectasis placed in a zone, or None if it does not fit."""
    size_cm = kw.get("size_cm")
    if kind in ("nodule", "mass"):
        radius = size_cm / 2 / patient.anatomy.fov_cm
    elif kind == "atelectasis":
        radius = 0.025  # the plate's middle must be in aerated lung; its ends may run to the lung border
    else:
        radius = 0.03  # the core of an airspace opacity; its edges may run to the lung border
    t_range = (0.72, 0.92) if kind == "atelectasis" else None
    spot = place(rng, patient, side, zone, radius, t_range)
    if spot is None:
        return None
    angle = float(rng.uniform(-0.25, 0.25)) if kind == "atelectasis" else 0.0
    return Finding(kind, side=side, zone=zone, a=spot[0], t=spot[1], angle=angle, shape_seed=_seed(rng), **kw)


def make_device(rng, kind: str) -> Finding:
    if kind == "ett":
        position = str(rng.choice(["appropriate", "low", "high", "right mainstem"], p=[0.7, 0.12, 0.08, 0.1]))
        lo, hi = {"appropriate": (3.0, 6.0), "low": (0.5, 1.5), "high": (7.5, 9.5), "right mainstem": (-2.0, -1.0)}[
            position
        ]
        return Finding("ett", position=position, tip_cm=round(float(rng.uniform(lo, hi)) * 2) / 2)
    if kind == "central_line":
        vein = str(
            rng.choice(
                ["right internal jugular", "left internal jugular", "right subclavian", "left subclavian"],
                p=[0.55, 0.15, 0.15, 0.15],
            )
        )
        tip = str(rng.choice(["cavoatrial junction", "svc", "right atrium"], p=[0.45, 0.4, 0.15]))
        return Finding("central_line", side=vein.split()[0], position=vein, tip=tip)
    side = "left" if rng.random() < 0.85 else "right"
    return Finding("pacemaker", side=side, leads=int(rng.choice([1, 2, 3], p=[0.25, 0.6, 0.15])))


def _sides(rng) -> list[str]:
    r = rng.random()
    return ["right"] if r < 0.4 else ["left"] if r < 0.7 else ["right", "left"]


def add_pathology(rng, patient: Patient, kind: str, findings: list[Finding]) -> list[Finding]:
    """New findings of `kind` that fit into the slots still free (possibly none)."""
    taken = occupied(findings)
    free = lambda side, zones: all((side, z) not in taken for z in zones)  # noqa: E731
    out: list[Finding] = []
    if kind == "effusion":
        for side in _sides(rng):
            sev = str(rng.choice(PLEURAL_SEVERITY, p=[0.45, 0.4, 0.15]))
            if sev == "large" and not free(side, ["middle"]):
                sev = "moderate"
            if free(side, ["lower"]) and not any(f.kind == "effusion" and f.side == side for f in findings):
                out.append(make_effusion(rng, side, sev, uncertain=sev == "small" and rng.random() < 0.2))
    elif kind == "pneumothorax":
        side = str(rng.choice(SIDES))
        sev = str(rng.choice(PLEURAL_SEVERITY, p=[0.5, 0.35, 0.15]))
        zones = {"small": ["upper"], "moderate": ["upper", "middle"], "large": list(ZONES)}[sev]
        if free(side, zones):
            out.append(make_pneumothorax(rng, patient, side, sev))
    elif kind == "edema":
        if free("right", ["middle"]) and free("left", ["middle"]):
            sev = str(rng.choice(EXTENT, p=[0.5, 0.35, 0.15]))
            out.append(
                Finding(
                    "edema",
                    side="bilateral",
                    severity=sev,
                    shape_seed=_seed(rng),
                    uncertain=sev == "mild" and rng.random() < 0.35,
                )
            )
    else:
        count = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])) if kind == "nodule" else 1
        for _ in range(count):
            slots = [(s, z) for s in SIDES for z in ZONES if (s, z) not in taken]
            if kind == "atelectasis":
                slots = [s for s in slots if s[1] == "lower"]
            if not slots:
                break
            side, zone = slots[int(rng.integers(len(slots)))]
            f = make_zonal(rng, patient, kind, side, zone, **_zonal_attributes(rng, kind))
            if f is not None:
                out.append(f)
                taken |= slots_of(f)
    return out


def _zonal_attributes(rng, kind: str) -> dict:
    if kind == "nodule":
        return {"size_cm": round(float(rng.uniform(0.8, 2.9)), 1), "uncertain": bool(rng.random() < 0.1)}
    if kind == "mass":
        return {"size_cm": round(float(rng.uniform(3.0, 6.0)), 1)}
    if kind == "atelectasis":
        return {"uncertain": bool(rng.random() < 0.2)}
    uncertain = bool(rng.random() < 0.2)
    severity = "mild" if uncertain else str(rng.choice(EXTENT, p=[0.35, 0.45, 0.2]))
    return {"severity": severity, "uncertain": uncertain}


# ---------------------------------------------------------------- whole exams


def cardiomegaly_finding(patient: Patient) -> list[Finding]:
    """Graded on the PA CTR, so the grade does not flip between AP and PA exams of the same heart."""
    c = patient.base_ctr
    if c <= 0.5:
        return []
    return [Finding("cardiomegaly", severity="mild" if c < 0.58 else "moderate" if c < 0.62 else "severe")]


def exam_truth(rng, patient: Patient, findings: list[Finding], view: str) -> PhantomTruth:
    """Wrap findings into one exam: this exam's positioning, exposure and the negations its report states."""
    anatomy = patient.anatomy.shifted(float(rng.uniform(-0.015, 0.015)), float(rng.uniform(-0.015, 0.015)))
    ctr = patient.base_ctr * (AP_MAGNIFICATION if view == "AP" else 1.0)
    findings = [f for f in findings if f.kind != "cardiomegaly"] + cardiomegaly_finding(patient)
    return PhantomTruth(
        view=view,
        anatomy=anatomy,
        ctr=round(float(ctr), 4),
        findings=tuple(findings),
        negated=sample_negations(rng, findings, ctr),
        age=patient.age,
        sex=patient.sex,
        exposure=float(rng.uniform(1.75, 2.05)),
        gamma=float(rng.uniform(0.75, 0.95)),
        noise=float(rng.uniform(0.008, 0.016)),
        texture_seed=_seed(rng),
    )


def sample_negations(rng, findings, ctr: float) -> tuple[tuple[str, str | None], ...]:
    """Which absent findings the report states as absent: whole kinds, or the other side of a one-sided one."""
    kinds = {f.kind for f in findings}
    neg: list[tuple[str, str | None]] = []
    if ctr <= 0.5 and rng.random() < 0.8:
        neg.append(("cardiomegaly", None))
    for kind, p in (
        ("effusion", 0.7),
        ("pneumothorax", 0.6),
        ("consolidation", 0.45),
        ("edema", 0.35),
        ("nodule", 0.1),
    ):
        sides = {f.side for f in findings if f.kind == kind or (kind == "nodule" and f.kind == "mass")}
        if not sides and rng.random() < p:
            neg.append((kind, None))
        elif kind in ("effusion", "pneumothorax") and len(sides) == 1 and rng.random() < 0.35:
            neg.append((kind, "left" if sides == {"right"} else "right"))
    if not kinds & set(PARENCHYMAL_KINDS) and rng.random() < 0.5:
        neg.append(("lungs_clear", None))
    if rng.random() < 0.25:
        neg.append(("fracture", None))
    return tuple(neg)


def _view(rng, findings) -> str:
    """Intubated and line patients are imaged supine (AP) in the ICU."""
    kinds = {f.kind for f in findings}
    if "ett" in kinds or ("central_line" in kinds and rng.random() < 0.6) or rng.random() < 0.25:
        return "AP"
    return "PA"


def sample_truth(rng: np.random.Generator, patient: Patient) -> PhantomTruth:
    """A patient's first exam."""
    findings: list[Finding] = []
    for kind, p in (("ett", 0.1), ("central_line", 0.14), ("pacemaker", 0.07)):
        if rng.random() < p:
            findings.append(make_device(rng, kind))
    if rng.random() > 0.38:  # abnormal lungs or pleura
        n = int(rng.choice([1, 2, 3, 4], p=[0.45, 0.3, 0.17, 0.08]))
        kinds, weights = list(PATHOLOGY_WEIGHTS), np.array(list(PATHOLOGY_WEIGHTS.values()))
        if patient.base_ctr > 0.5:  # a failing heart goes with edema and effusions
            weights = weights * np.array([2.0 if k in ("edema", "effusion") else 1.0 for k in kinds])
        for kind in rng.choice(kinds, size=n, replace=False, p=weights / weights.sum()):
            findings += add_pathology(rng, patient, str(kind), findings)
    return exam_truth(rng, patient, findings, _view(rng, findings))


# ---------------------------------------------------------------- follow-up exams


def _step(scale, severity: str, by: int) -> str | None:
    i = scale.index(severity) + by
    return scale[i] if 0 <= i < len(scale) else None


def _resize(f: Finding, by: int, findings: list[Finding], patient: Patient) -> list[Finding] | None:
    """Grow (+1) or shrink (-1) a finding by one grade; shrinking the smallest grade resolves it."""
    others = [g for g in findings if g is not f]
    if f.kind in ("nodule", "mass"):
        if by < 0:
            return None  # nodules do not shrink here; they stay stable or grow
        limit = 2.9 if f.kind == "nodule" else 7.0
        return others + [replace(f, size_cm=round(min(limit, f.size_cm + 0.5), 1))] if f.size_cm < limit else None
    scale = PLEURAL_SEVERITY if f.kind in ("effusion", "pneumothorax") else EXTENT
    sev = _step(scale, f.severity or scale[0], by)
    if sev is None:
        return others if by < 0 else None
    grown = replace(f, severity=sev, uncertain=False)
    if slots_of(grown) & occupied(others):
        return None
    if f.kind == "pneumothorax":
        grown = replace(grown, size_cm=round(PTX_GAP[sev] * patient.anatomy.fov_cm, 1))
    return others + [grown]


def _n_changed(before, after) -> int:
    """How many findings differ (appeared, went, or changed grade) between two finding lists."""
    a, b = {f.key: f for f in before}, {f.key: f for f in after}
    return sum(a.get(k) != b.get(k) for k in set(a) | set(b))


def evolve_truth(rng: np.random.Generator, patient: Patient, prior: PhantomTruth) -> PhantomTruth:
    """The next exam of the patient: the prior's findings with one or two interval changes."""
    findings = list(prior.findings)
    wanted = 1 if rng.random() < 0.6 else 2
    for _ in range(30):
        if _n_changed(prior.findings, findings) >= wanted:
            break
        result = _random_change(rng, patient, findings)
        # a change must add to the net difference: growing then shrinking the same effusion is no change
        if result is not None and _n_changed(prior.findings, result) > _n_changed(prior.findings, findings):
            findings = result
    if _n_changed(prior.findings, findings) == 0:  # every draw failed: fall back to a new line or tube
        missing = [k for k in ("central_line", "ett") if not any(f.kind == k for f in findings)]
        findings = findings + [make_device(rng, missing[0])] if missing else [f for f in findings if f.kind != "ett"]
    return exam_truth(rng, patient, findings, _view(rng, findings))


def _random_change(rng, patient: Patient, findings: list[Finding]) -> list[Finding] | None:
    """One random interval change, or None when the drawn change does not apply."""
    present = [f for f in findings if f.kind != "cardiomegaly" and not f.is_device]
    r = rng.random()
    if present and r < 0.55:  # an existing finding resolves, improves or worsens
        f = present[int(rng.integers(len(present)))]
        if f.kind in ("nodule", "mass"):
            return _resize(f, +1, findings, patient)
        by = int(rng.choice([-1, -1, +1]))
        if f.kind == "pneumothorax" and rng.random() < 0.6:
            return [g for g in findings if g is not f]  # most pneumothoraces resolve once treated
        return _resize(f, by, findings, patient)
    if r < 0.85:  # something new
        kind = str(
            rng.choice(
                ["effusion", "consolidation", "edema", "atelectasis", "pneumothorax", "opacity"],
                p=[0.3, 0.25, 0.15, 0.15, 0.05, 0.1],
            )
        )
        if any(f.kind == kind for f in findings):
            return None
        new = add_pathology(rng, patient, kind, findings)
        return findings + new if new else None
    kind = str(rng.choice(["central_line", "ett"]))  # a new line or tube
    if any(f.kind == kind for f in findings):
        return None
    return findings + [make_device(rng, kind)]
