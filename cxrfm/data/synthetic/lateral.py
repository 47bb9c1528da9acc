"""Lateral view of the phantom: anterior on the image left, spine posterior (image right).

Simpler than the frontal view and never grounded: it shows the heart anteriorly, the retrosternal and
retrocardiac lung, both hemidiaphragms with the deep posterior costophrenic sulci, and the findings that
a lateral film helps with — an effusion blunts the posterior sulcus first, airspace disease and nodules
project at their height, and devices keep their course.
"""

from __future__ import annotations

import numpy as np

from cxrfm.data.synthetic.geometry import ett_tip, grid, smooth_path, stroke
from cxrfm.data.synthetic.render import LUNG_AIR, expose, smooth_noise
from cxrfm.data.synthetic.truth import PLEURAL_SEVERITY, Finding, PhantomTruth


class LateralScene:
    def __init__(self, truth: PhantomTruth, size: int):
        self.truth, self.size = truth, size
        self.u, self.v = grid(size)
        an = truth.anatomy
        self.c = an.mid  # centre of the chest's front-to-back depth
        u, v, c = self.u, self.v, self.c
        # The diaphragm slopes down from front to back: the posterior costophrenic sulcus is the lowest
        # point of the lungs, which is why a small effusion shows there first.
        self.diaphragm = an.dome_right + (an.cp + 0.04 - an.dome_right) * np.clip((u - (c - 0.24)) / 0.44, 0, 1) ** 2
        top = np.clip(1 - (v - an.apex) / (0.35 * an.lung_height), 0, 1) ** 2  # 1 at the apex, 0 lower down
        front, back = c - 0.25 + 0.12 * top, c + 0.2 - 0.08 * top
        dome = an.apex + 0.08 * ((u - (c - 0.02)) / 0.25) ** 2
        self.lung = (u >= front) & (u <= back) & (v >= dome) & (v <= self.diaphragm)
        hu = 0.13 * truth.ctr / 0.45  # half-depth of the heart grows with its width
        self.heart = ((u - (c - 0.27 + hu)) / hu) ** 2 + ((v - an.dome_right + 0.05) / an.heart_height) ** 2 <= 1.0

    def _point(self, f: Finding) -> tuple[float, float]:
        """Front-to-back position is not in the truth; derive a stable one from the finding's seed."""
        depth = (f.shape_seed % 1000) / 1000.0
        return self.c - 0.12 + 0.26 * depth, self.truth.anatomy.apex + f.t * self.truth.anatomy.lung_height

    def _fill(self) -> np.ndarray:
        an, u, v = self.truth.anatomy, self.u, self.v
        fill = np.zeros_like(u)
        effusions = self.truth.of_kind("effusion")
        if effusions:  # both sides superimpose: take the larger, one grade up if bilateral
            grade = max(PLEURAL_SEVERITY.index(f.severity) for f in effusions) + (len(effusions) > 1)
            level, curve = [(0.88, 0.9), (0.72, 0.6), (0.5, 0.35), (0.4, 0.3)][grade]
            xp = np.clip((u - (self.c - 0.1)) / 0.4, 0.0, 1.0)
            meniscus = an.apex + (level + (1 - level) * curve * (1 - xp) ** 1.5) * an.lung_height
            amp = 0.5 if all(f.uncertain for f in effusions) else 0.9
            fill += amp * np.clip((v - meniscus) / 0.025, 0.0, 1.0)
        for f in self.truth.findings:
            rng = np.random.default_rng(f.shape_seed)
            if f.kind in ("consolidation", "opacity"):
                pu, pv = self._point(f)
                amp = (0.6 if f.kind == "consolidation" else 0.4) * (0.45 if f.uncertain else 1.0)
                blob = np.exp(-((u - pu) ** 2 + (v - pv) ** 2) / (2 * 0.05**2))
                fill += amp * np.clip(1.3 * blob, 0, 1) * (0.65 + 0.7 * smooth_noise(rng, self.size, 12))
            elif f.kind in ("nodule", "mass"):
                pu, pv = self._point(f)
                r = f.size_cm / 2 / an.fov_cm
                fill += (0.5 if f.uncertain else 0.9) * np.clip(0.5 + (r - np.hypot(u - pu, v - pv)) * self.size, 0, 1)
            elif f.kind == "edema":
                amp = 0.2 if f.uncertain else {"mild": 0.3, "moderate": 0.42, "severe": 0.55}[f.severity]
                hv = an.apex + 0.45 * an.lung_height
                fill += amp * np.exp(-(((u - self.c - 0.04) / 0.12) ** 2 + ((v - hv) / 0.1) ** 2) / 2)
            elif f.kind == "atelectasis":
                pu, pv = self._point(f)
                fill += (0.45 if f.uncertain else 0.75) * stroke(
                    self.size, [(pu - 0.08, pv), (pu + 0.08, pv + 0.01)], 0.007
                )
        return np.clip(fill, 0.0, 1.0) * self.lung

    def _devices(self) -> np.ndarray:
        an, u, v, c = self.truth.anatomy, self.u, self.v, self.c
        out = np.zeros_like(u)
        for f in self.truth.devices():
            if f.kind == "ett":
                tip_v = ett_tip(an, f)[1]
                path = [(c - 0.02, -0.02), (c + 0.01, an.apex), (c + 0.04, tip_v)]
                out += 0.45 * stroke(self.size, path, 0.007)
            elif f.kind == "central_line":
                tip_v = an.carina + {"svc": 0.03, "cavoatrial junction": 0.08, "right atrium": 0.13}[f.tip or "svc"]
                path = smooth_path(
                    [(c - 0.05, -0.01), (c - 0.06, an.apex + 0.05), (c - 0.05, an.carina), (c - 0.06, tip_v)]
                )
                out += 0.5 * stroke(self.size, path, 0.0035)
            elif f.kind == "pacemaker":
                gu, gv = c - 0.28, an.apex + 0.07  # anterior chest wall
                out += 1.6 * np.clip((1 - ((u - gu) / 0.02) ** 4 - ((v - gv) / 0.035) ** 4) * 4, 0, 1)
                for i in range(f.leads):
                    tip = (c - 0.2 + 0.04 * i, an.dome_right - 0.04 - 0.03 * i)
                    path = smooth_path([(gu + 0.02, gv), (c - 0.08, an.apex + 0.1), (c - 0.06, an.carina + 0.04), tip])
                    out += 0.6 * stroke(self.size, path, 0.003)
        return out

    def attenuation(self) -> np.ndarray:
        an, u, v, c = self.truth.anatomy, self.u, self.v, self.c
        rng = np.random.default_rng(self.truth.texture_seed + 1)
        neck = np.clip((v - (an.apex - 0.1)) / 0.1, 0.0, 1.0) ** 0.5
        half = 0.13 + 0.23 * neck
        a = np.clip((half - np.abs(u - c - 0.02)) / 0.012, 0.0, 1.0)
        fill = self._fill()
        air = self.lung & ~self.heart
        inside = a > 0.05  # bones and airways only inside the body
        a -= LUNG_AIR * air * (1.0 - fill)
        a += 0.05 * air * smooth_noise(rng, self.size, 20) * (1.0 - fill)  # markings, blurred on a lateral
        # spine: vertebral bodies with disc spaces, then the fainter posterior elements
        disc = ((v / 0.055 + an.rib_phase) % 1.0) < 0.18
        body = (u > c + 0.2) & (u < c + 0.3) & (v > an.apex - 0.12)
        a += inside * (0.4 * body * (1.0 - 0.4 * disc) + 0.15 * ((u >= c + 0.3) & (u < c + 0.35)))
        a += 0.3 * ((u > c - 0.3) & (u < c - 0.27) & (v > an.apex + 0.02) & (v < an.apex + 0.55 * an.lung_height))
        p = (v - 0.25 * (u - c)) / (an.lung_height / 8.5) + an.rib_phase  # ribs, oblique on the lateral
        a += 0.07 * ((p % 1.0) < 0.3) * self.lung
        trachea = stroke(self.size, [(c - 0.02, -0.01), (c + 0.01, an.apex), (c + 0.05, an.carina)], 0.016)
        a -= 0.25 * trachea * (1.0 - 0.8 * air)  # an air column in the neck, barely seen against the lung
        a += 0.15 * np.exp(-((u - c - 0.04) ** 2 + (v - an.apex - 0.45 * an.lung_height) ** 2) / (2 * 0.035**2))
        return a + self._devices()

    def render(self, rng: np.random.Generator) -> np.ndarray:
        return expose(self.attenuation(), self.truth, rng)


def render_lateral(truth: PhantomTruth, size: int, rng: np.random.Generator) -> np.ndarray:
    """Lateral radiograph, uint8 (size, size): anterior on the image left."""
    return LateralScene(truth, size).render(rng)
