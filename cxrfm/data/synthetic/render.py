"""Rasterise a PhantomTruth into a frontal radiograph, and the footprint (mask) of every finding.

The image is built in "attenuation" units: soft tissue 1.0, aerated lung about 0.28, bone and devices
on top. Bright = dense. Findings act in three ways: `fill` replaces lung air with fluid or tissue
(effusion, consolidation, nodule, edema, atelectasis), `air` adds lucency (pneumothorax rim) and
`density` adds radiopaque material (pleural line, tubes, lines, pacemaker).

Randomness: anatomy texture comes from truth.texture_seed and each finding's texture from its
shape_seed, so the caller's rng only draws the final noise. Removing a finding and rendering with the
same rng therefore changes exactly the pixels of that finding, which is what the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxrfm.data.synthetic.geometry import (
    LEFT_BRONCHUS,
    RIGHT_BRONCHUS,
    BRONCHUS_LENGTH,
    central_line_path,
    diaphragm,
    ett_path,
    grid,
    heart_mask,
    hilum,
    lateral_edge,
    lung_mask,
    outward,
    pacemaker_generator,
    pacemaker_leads,
    side_sign,
    stroke,
    to_uv,
    zone_v,
)
from cxrfm.data.synthetic.truth import PTX_GAP, SIDES, Finding, PhantomTruth

LUNG_AIR = 0.72  # attenuation that aerated lung lacks relative to soft tissue
# A finding's footprint is everywhere it changes the image by more than a few grey levels: a fill of
# 0.06 over lung shifts it by about 6 levels, a device stroke of 5 % coverage by about 2-3.
VISIBLE_FILL = 0.06
VISIBLE_COVER = 0.05


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1]: a (cells+1)^2 lattice interpolated with smoothstep weights."""
    lattice = rng.random((cells + 1, cells + 1))
    x = np.linspace(0.0, cells, size, endpoint=False) + 0.5 * cells / size
    i = np.minimum(x.astype(int), cells - 1)
    f = x - i
    f = f * f * (3 - 2 * f)
    rows = lattice[i] * (1 - f)[:, None] + lattice[i + 1] * f[:, None]
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f


def blur3(a: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge replication: the detector's point spread, which softens the
    hard geometric edges."""
    out = 0.5 * a
    out[1:] += 0.25 * a[:-1]
    out[:-1] += 0.25 * a[1:]
    out[0] += 0.25 * a[0]
    out[-1] += 0.25 * a[-1]
    res = 0.5 * out
    res[:, 1:] += 0.25 * out[:, :-1]
    res[:, :-1] += 0.25 * out[:, 1:]
    res[:, 0] += 0.25 * out[:, 0]
    res[:, -1] += 0.25 * out[:, -1]
    return res


def dilate4(m: np.ndarray) -> np.ndarray:
    """Grow a mask by one pixel (4-neighbourhood)."""
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


@dataclass
class Effect:
    """What one finding does to the attenuation map, and where it is visible."""

    mask: np.ndarray  # bool footprint on the image: the boxes come from it
    fill: np.ndarray | None = None
    air: np.ndarray | None = None
    density: np.ndarray | None = None
    hides_markings: np.ndarray | None = None


class FrontalScene:
    """Geometry and finding effects of one exam at one size; render() composes them into the image."""

    def __init__(self, truth: PhantomTruth, size: int):
        self.truth, self.size = truth, size
        self.u, self.v = grid(size)
        an = truth.anatomy
        self.lung = {s: lung_mask(an, s, self.u, self.v) for s in SIDES}
        self.heart = heart_mask(an, truth.ctr, self.u, self.v)
        self.visible = {s: self.lung[s] & ~self.heart for s in SIDES}
        self._effects: dict[Finding, Effect] = {}

    # ------------------------------------------------------------ masks

    def effect(self, f: Finding) -> Effect:
        if f not in self._effects:
            self._effects[f] = getattr(self, f"_{f.kind}")(f)
        return self._effects[f]

    def finding_mask(self, f: Finding) -> np.ndarray:
        return self.effect(f).mask

    def kind_mask(self, kind: str, side: str | None = None) -> np.ndarray:
        """Union of the footprints of every finding of `kind` (on `side` only, if given)."""
        out = np.zeros((self.size, self.size), dtype=bool)
        for f in self.truth.of_kind(kind):
            m = self.finding_mask(f)
            if side is not None and f.side == "bilateral":
                m = m & self.half(side)
            elif side is not None and f.side != side:
                continue
            out |= m
        return out

    def half(self, side: str) -> np.ndarray:
        """Image half holding the patient's `side`."""
        return (self.u - self.truth.anatomy.mid) * side_sign(side) > 0

    # ------------------------------------------------------------ findings

    def _cardiomegaly(self, f: Finding) -> Effect:
        return Effect(mask=self.heart.copy() if self.truth.ctr > 0.5 else np.zeros_like(self.heart))

    def _effusion(self, f: Finding) -> Effect:
        """Fluid layers at the base with a meniscus that climbs the lateral chest wall; a small one only
        blunts the costophrenic angle, a large one whites out the lower lung."""
        an, u, v = self.truth.anatomy, self.u, self.v
        level, curve = {"small": (0.8, 0.9), "moderate": (0.66, 0.6), "large": (0.45, 0.35)}[f.severity]
        x = np.clip(outward(an, f.side, u) / an.half_width, 0.0, 1.0)
        meniscus = an.apex + (level + (1 - level) * curve * (1 - x) ** 1.5) * an.lung_height
        fill = (0.5 if f.uncertain else 0.92) * np.clip((v - meniscus) / 0.025, 0.0, 1.0) * self.lung[f.side]
        return Effect(mask=(fill > VISIBLE_FILL) & self.visible[f.side], fill=fill)

    def _pneumothorax(self, f: Finding) -> Effect:
        """Air between chest wall and the collapsed lung: darker, without vessel markings, bounded by the
        thin bright visceral pleural line."""
        an = self.truth.anatomy
        tmax = {"small": 0.45, "moderate": 0.7, "large": 0.95}[f.severity]
        collapsed = lung_mask(an, f.side, self.u, self.v, gap=PTX_GAP[f.severity], gap_tmax=tmax)
        rim = self.lung[f.side] & ~collapsed & ~self.heart
        line = collapsed & dilate4(rim)
        return Effect(mask=rim | line, air=0.16 * rim, density=0.38 * line, hides_markings=rim)

    def _airspace(self, f: Finding, amp: float, spread: float) -> Effect:
        """Patchy consolidation/opacity: a few overlapping blobs with texture, confined to its zone."""
        an, u, v = self.truth.anatomy, self.u, self.v
        rng = np.random.default_rng(f.shape_seed)
        radius = spread * {"mild": 0.045, "moderate": 0.065, "severe": 0.085}[f.severity or "moderate"]
        u0, v0 = to_uv(an, f.side, f.a, f.t)
        blobs = np.zeros_like(u)
        for _ in range(int(rng.integers(3, 5))):
            cu, cv = u0 + rng.normal(0, 0.5 * radius), v0 + rng.normal(0, 0.4 * radius)
            sigma = radius * rng.uniform(0.55, 0.8)
            blobs += np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * sigma**2))
        texture = 0.65 + 0.7 * smooth_noise(rng, self.size, 12)
        z0, z1 = zone_v(an, f.zone)
        zone = (v >= z0) & (v < z1) & self.lung[f.side]
        amp = amp * (0.45 if f.uncertain else 1.0)
        fill = amp * np.clip(1.3 * blobs, 0.0, 1.0) * texture * zone
        return Effect(mask=(fill > VISIBLE_FILL) & self.visible[f.side], fill=np.minimum(fill, 1.0))

    def _consolidation(self, f: Finding) -> Effect:
        return self._airspace(f, amp=0.72, spread=1.0)

    def _opacity(self, f: Finding) -> Effect:
        return self._airspace(f, amp=0.45, spread=1.2)

    def _nodule(self, f: Finding) -> Effect:
        """A round, sharply marginated density; masses are lobulated."""
        an = self.truth.anatomy
        rng = np.random.default_rng(f.shape_seed)
        u0, v0 = to_uv(an, f.side, f.a, f.t)
        r0 = f.size_cm / 2 / an.fov_cm
        win = self._box(u0 - 1.3 * r0 - 0.01, u0 + 1.3 * r0 + 0.01, v0 - 1.3 * r0 - 0.01, v0 + 1.3 * r0 + 0.01)
        u, v = self.u[win], self.v[win]
        theta = np.arctan2(v - v0, u - u0)
        lobes = 0.12 if f.kind == "mass" else 0.04
        r = r0 * (
            1 + lobes * np.cos(3 * theta + rng.uniform(0, 6.3)) + 0.5 * lobes * np.cos(5 * theta + rng.uniform(0, 6.3))
        )
        cover = np.zeros_like(self.u)
        cover[win] = np.clip(0.5 + (r - np.hypot(u - u0, v - v0)) * self.size, 0.0, 1.0)
        amp = 0.5 if f.uncertain else 0.9
        return Effect(
            mask=(amp * cover > VISIBLE_FILL) & self.visible[f.side], fill=amp * cover, density=0.1 * amp * cover
        )

    _mass = _nodule

    def _edema(self, f: Finding) -> Effect:
        """Bilateral perihilar haze ('bat wing'), fading towards the periphery."""
        an, u, v = self.truth.anatomy, self.u, self.v
        rng = np.random.default_rng(f.shape_seed)
        scale = {"mild": 1.0, "moderate": 1.15, "severe": 1.3}[f.severity]
        amp = 0.2 if f.uncertain else {"mild": 0.32, "moderate": 0.45, "severe": 0.6}[f.severity]
        haze = np.zeros_like(u)
        for side in SIDES:
            hu, hv = hilum(an, side)
            g = np.exp(-(((u - hu) / (0.085 * scale)) ** 2 + ((v - hv) / (0.075 * scale)) ** 2) / 2)
            haze += g * self.lung[side]
        fill = amp * haze * (0.7 + 0.6 * smooth_noise(rng, self.size, 16))
        lungs = self.visible["right"] | self.visible["left"]
        return Effect(mask=(fill > VISIBLE_FILL) & lungs, fill=fill)

    def _atelectasis(self, f: Finding) -> Effect:
        """Plate-like (discoid) atelectasis: a thin, nearly horizontal band at the base."""
        an = self.truth.anatomy
        rng = np.random.default_rng(f.shape_seed)
        u0, v0 = to_uv(an, f.side, f.a, f.t)
        half = rng.uniform(0.06, 0.09)
        du, dv = half * np.cos(f.angle), half * np.sin(f.angle)
        band = stroke(self.size, [(u0 - du, v0 - dv), (u0 + du, v0 + dv)], 0.008) * self.lung[f.side]
        amp = 0.45 if f.uncertain else 0.75
        return Effect(mask=(amp * band > VISIBLE_FILL) & self.visible[f.side], fill=amp * band)

    def _ett(self, f: Finding) -> Effect:
        """Tube wall (faint, 2-3 px) with its radiopaque stripe, down the trachea to the tip."""
        path = ett_path(self.truth.anatomy, f)
        wall = stroke(self.size, path, 0.009)
        stripe = stroke(self.size, path, 0.0035)
        return Effect(mask=wall > VISIBLE_COVER, density=0.25 * wall + 0.6 * stripe)

    def _central_line(self, f: Finding) -> Effect:
        line = stroke(self.size, central_line_path(self.truth.anatomy, f), 0.0035)
        return Effect(mask=line > VISIBLE_COVER, density=0.55 * line)

    def _pacemaker(self, f: Finding) -> Effect:
        """Very dense pulse generator in the upper chest wall, leads into the right heart."""
        an, u, v = self.truth.anatomy, self.u, self.v
        gu, gv, hw, hh = pacemaker_generator(an, f)
        box = ((u - gu) / hw) ** 4 + ((v - gv) / hh) ** 4
        gen = np.clip((1.0 - box) * 4.0, 0.0, 1.0)
        leads = np.zeros_like(u)
        for path in pacemaker_leads(an, f, self.truth.ctr):
            leads = np.maximum(leads, stroke(self.size, path, 0.003))
        return Effect(mask=(gen > VISIBLE_COVER) | (leads > VISIBLE_COVER), density=1.6 * gen + 0.6 * leads)

    # ------------------------------------------------------------ anatomy

    def _body(self) -> np.ndarray:
        """Soft tissue of neck, shoulders and trunk; black air outside the patient."""
        an, u, v = self.truth.anatomy, self.u, self.v
        neck = 0.085
        shoulder = np.clip((v - (an.apex - 0.13)) / 0.09, 0.0, 1.0) ** 0.5
        half = neck + (an.body_half_width - neck) * shoulder
        body = np.clip((half - np.abs(u - an.mid)) / 0.012, 0.0, 1.0)
        if self.truth.sex == "female":  # breast shadows over the lower lung fields
            for side in SIDES:
                d = outward(an, side, u)
                e = ((d - 0.6 * an.half_width) / 0.2) ** 2 + ((v - an.cp + 0.05) / 0.12) ** 2
                body = body + 0.08 * np.clip((1 - e) * 3, 0, 1) * (v > an.cp - 0.08)
        return body

    def _window(self, side: str, v0: float, v1: float) -> tuple[slice, slice]:
        """Rows v0..v1 of the image half holding the patient's `side` (bones are drawn per half, for speed)."""
        n = self.size
        mid_col = int(round(self.truth.anatomy.mid * n))
        cols = slice(0, mid_col) if side == "right" else slice(mid_col, n)
        return slice(max(0, int(v0 * n)), min(n, int(np.ceil(v1 * n)))), cols

    def _bones(self) -> np.ndarray:
        an, t = self.truth.anatomy, self.truth
        px = 1.0 / self.size
        out = np.zeros_like(self.u)
        spacing = an.lung_height / 8.5
        # ribs show through the heart and mediastinum, but much fainter than over aerated lung
        over = 0.35 + 0.65 * (self.lung["right"] | self.lung["left"]) * ~self.heart
        for side in SIDES:
            rows, cols = self._window(side, an.apex - 0.1, an.cp + 0.02)
            u, v = self.u[rows, cols], self.v[rows, cols]
            d = outward(an, side, u)
            x = d / an.half_width
            chest = over[rows, cols] * ((d > 0.03) & (d < lateral_edge(an, v) + 0.035) & (v > an.apex - 0.05))
            # posterior ribs: arcs that sweep down laterally; anterior ribs: fainter, descending medially
            p = (v - (an.apex - 0.04 + 0.17 * x**2 - 0.06 * x)) / spacing + an.rib_phase
            frac = p - np.floor(p)
            part = 0.22 * chest * (p > 0) * np.sqrt(np.sin(np.pi * np.minimum(frac / 0.32, 1.0)))
            q = (v - (an.apex + 0.01 + 0.12 * (1 - x))) / (1.1 * spacing) + an.rib_phase
            part += 0.09 * chest * (q > 0) * (x > 0.25) * ((q - np.floor(q)) < 0.25)
            # clavicle: an S-shaped bar from the sternum out to the shoulder; AP films project it higher
            vc = an.apex + 0.085 - 0.08 * x + 0.02 * np.sin(np.pi * x) - (0.03 if t.view == "AP" else 0.0)
            part += 0.42 * np.clip(0.5 + (0.011 - np.abs(v - vc)) / px, 0.0, 1.0) * ((x > 0.12) & (x < 0.95))
            # humeral head at the top corner
            hu, hv = an.mid + side_sign(side) * (an.half_width + 0.11), an.apex - 0.01
            part += 0.35 * (np.hypot(u - hu, v - hv) < 0.055)
            if t.view == "AP":  # the scapulae are not rotated off the lungs on a supine film
                part += 0.1 * ((x > 0.72) & (x < 1.05) & (v > an.apex) & (v < an.apex + (x - 0.72) * 1.2))
            out[rows, cols] += part
        # spine: vertebral bodies with darker disc spaces, visible through the mediastinum and heart
        c0, c1 = int((an.mid - 0.04) * self.size), int(np.ceil((an.mid + 0.04) * self.size))
        u, v = self.u[:, c0:c1], self.v[:, c0:c1]
        disc = ((v / 0.055 + an.rib_phase) % 1.0) < 0.18
        out[:, c0:c1] += 0.3 * (np.abs(u - an.mid) < 0.028) * (1.0 - 0.35 * disc)
        return out

    def _box(self, u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice]:
        """Pixel window covering u0..u1, v0..v1 (clipped to the image)."""
        n = self.size
        return (
            slice(max(0, int(v0 * n)), min(n, int(np.ceil(v1 * n)))),
            slice(max(0, int(u0 * n)), min(n, int(np.ceil(u1 * n)))),
        )

    def _airways_and_abdomen(self) -> np.ndarray:
        an = self.truth.anatomy
        out = np.zeros_like(self.u)
        rows, cols = self._box(an.mid - 0.02, an.mid + 0.02, 0.0, an.carina)
        out[rows, cols] -= 0.32 * (np.abs(self.u[rows, cols] - an.mid) < 0.017)  # trachea
        for bu, bv in (RIGHT_BRONCHUS, LEFT_BRONCHUS):
            end = (an.mid + bu * BRONCHUS_LENGTH, an.carina + bv * BRONCHUS_LENGTH)
            out -= 0.25 * stroke(self.size, [(an.mid, an.carina), end], 0.011)
        for side in SIDES:  # hilar vessels
            hu, hv = hilum(an, side)
            win = self._box(hu - 0.08, hu + 0.08, hv - 0.08, hv + 0.08)
            u, v = self.u[win], self.v[win]
            out[win] += 0.18 * np.exp(-((u - hu) ** 2 + (v - hv) ** 2) / (2 * 0.025**2)) * self.lung[side][win]
        rows, cols = self._window("right", an.dome_right - 0.01, 1.0)  # liver under the right dome
        d = outward(an, "right", self.u[rows, cols])
        out[rows, cols] += 0.08 * ((d > 0) & (self.v[rows, cols] > diaphragm(an, "right", d)))
        if an.gastric_bubble:
            bu, bv = an.mid + 0.45 * an.half_width, an.dome_left + 0.045
            win = self._box(bu - 0.05, bu + 0.05, bv - 0.03, bv + 0.03)
            u, v = self.u[win], self.v[win]
            floor = diaphragm(an, "left", outward(an, "left", u)) + 0.01
            out[win] -= 0.45 * ((((u - bu) / 0.045) ** 2 + ((v - bv) / 0.022) ** 2 < 1) & (v > floor))
        return out

    def _markings(self, hidden: np.ndarray) -> np.ndarray:
        """Vessel markings radiating from the hila and tapering to the periphery (computed on lung pixels only)."""
        an = self.truth.anatomy
        rng = np.random.default_rng(self.truth.texture_seed)
        warp = smooth_noise(rng, self.size, 6)
        fine = smooth_noise(rng, self.size, 24)
        out = np.zeros_like(self.u)
        for side in SIDES:
            idx = self.visible[side] & ~hidden
            hu, hv = hilum(an, side)
            dx, dy = (self.u[idx] - hu) * side_sign(side), self.v[idx] - hv
            r, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
            streak = (0.5 + 0.5 * np.cos(13 * theta + 2.5 * warp[idx] + rng.uniform(0, 6.3))) ** 8
            out[idx] = 0.12 * streak * np.exp(-r / 0.18) + 0.04 * fine[idx]
        return out

    # ------------------------------------------------------------ image

    def attenuation(self) -> np.ndarray:
        effects = [self.effect(f) for f in self.truth.findings if f.kind != "cardiomegaly"]
        zeros = np.zeros_like(self.u)
        fill = np.clip(sum((e.fill for e in effects if e.fill is not None), zeros), 0.0, 1.0)
        hidden = np.zeros(self.u.shape, dtype=bool)
        for e in effects:
            if e.hides_markings is not None:
                hidden |= e.hides_markings
        lungs = self.visible["right"] | self.visible["left"]
        body = self._body()
        a = body.copy()
        a -= LUNG_AIR * lungs * (1.0 - fill)
        a -= sum((e.air for e in effects if e.air is not None), zeros)
        a += self._markings(hidden) * (1.0 - fill)
        a += (self._bones() + self._airways_and_abdomen()) * (body > 0.05)  # nothing anatomical outside the body
        a += sum((e.density for e in effects if e.density is not None), zeros)
        return a

    def render(self, rng: np.random.Generator) -> np.ndarray:
        return expose(self.attenuation(), self.truth, rng)


def expose(attenuation: np.ndarray, truth: PhantomTruth, rng: np.random.Generator) -> np.ndarray:
    """Film of a scene's attenuation (H, W): blur, exposure, gamma and noise of this exam -> uint8 (H, W).
    Frontal and lateral views share it, so both views of one exam look exposed alike."""
    img = np.clip(blur3(attenuation) / truth.exposure, 0.0, 1.0) ** truth.gamma
    img = img + rng.normal(0.0, truth.noise, img.shape)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def render_frontal(truth: PhantomTruth, size: int, rng: np.random.Generator) -> np.ndarray:
    """Frontal (PA or AP) radiograph, uint8 (size, size); the patient's right is on the image left."""
    return FrontalScene(truth, size).render(rng)


def finding_mask(truth: PhantomTruth, finding: Finding | str, size: int, side: str | None = None) -> np.ndarray:
    """Where a finding (or every finding of a kind, optionally on one side) shows on the frontal image."""
    scene = FrontalScene(truth, size)
    if isinstance(finding, Finding):
        return scene.finding_mask(finding)
    return scene.kind_mask(finding, side)


def measure_ctr(truth: PhantomTruth, size: int) -> float:
    """CTR as a reader measures it: the heart's full horizontal extent (right border to left border, which
    lie at different heights) over the widest inner thorax (lung edge to lung edge within one row)."""
    scene = FrontalScene(truth, size)
    heart_cols = np.nonzero(scene.heart.any(axis=0))[0]
    lungs = scene.lung["right"] | scene.lung["left"]
    cols = np.arange(size)
    rows = lungs.any(axis=1)
    left = np.where(lungs, cols, size).min(axis=1)[rows]
    right = np.where(lungs, cols, -1).max(axis=1)[rows]
    return (heart_cols.max() - heart_cols.min() + 1) / int((right - left + 1).max())
