"""Closed-form geometry of the frontal phantom: lungs, heart, zones, airway and device paths.

All functions take normalised coordinates (u right, v down, in [0, 1]) as numpy arrays or scalars, so the
same code rasterises a whole image and checks a handful of points when findings are placed.
`d` is the distance from the midline towards one side's lateral chest wall; the patient's right side is
the image left, so for side "right" d grows to the LEFT of the image.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from cxrfm.data.synthetic.truth import ZONE_T, Anatomy, Finding

# How far the two main bronchi run from the carina, and in which direction (unit vectors in u, v).
# The right main bronchus is steeper, which is why a deep tube ends up in it.
RIGHT_BRONCHUS = (-0.5, 0.866)
LEFT_BRONCHUS = (0.75, 0.66)
BRONCHUS_LENGTH = 0.075


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (u, v), each (size, size); read-only because they are shared."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    u, v = np.meshgrid(c, c)
    u.setflags(write=False)
    v.setflags(write=False)
    return u, v


def side_sign(side: str) -> float:
    """+1 where the side lies to the image right. Patient right = image left."""
    return -1.0 if side == "right" else 1.0


def outward(an: Anatomy, side: str, u):
    return (u - an.mid) * side_sign(side)


def lung_t(an: Anatomy, v):
    return (v - an.apex) / an.lung_height


def to_uv(an: Anatomy, side: str, a: float, t: float) -> tuple[float, float]:
    """Lung-relative place -> image place."""
    return an.mid + side_sign(side) * a * an.half_width, an.apex + t * an.lung_height


def zone_v(an: Anatomy, zone: str) -> tuple[float, float]:
    t0, t1 = ZONE_T[zone]
    return an.apex + t0 * an.lung_height, an.apex + t1 * an.lung_height


def lateral_edge(an: Anatomy, v):
    """The rib cage bulges outwards from the apex down to the costophrenic angle."""
    t = np.clip(lung_t(an, v), 0.0, 1.0)
    return an.half_width * (1.0 - 0.5 * (1.0 - t) * (1.0 - t))


def apex_edge(an: Anatomy, d):
    """Top of the lung: a dome peaking a little medial of the lung's middle."""
    x = d / an.half_width
    return an.apex + 3.0 * an.half_width * (x - 0.45) ** 2


def medial_edge(an: Anatomy, side: str, v):
    """Mediastinal border, with the aortic knob on the left and the SVC bulge on the right."""
    if side == "left":
        bump = 0.035 * np.exp(-(((v - (an.apex + 0.2 * an.lung_height)) / 0.035) ** 2))
    else:
        bump = 0.012 * np.exp(-(((v - (an.apex + 0.25 * an.lung_height)) / 0.05) ** 2))
    return an.medial + bump


def diaphragm(an: Anatomy, side: str, d):
    """Hemidiaphragm: a flat dome medially that sweeps down to the sharp costophrenic angle laterally."""
    dome = an.dome_right if side == "right" else an.dome_left
    x = np.clip((d / an.half_width - 0.3) / 0.7, 0.0, 1.0)
    return dome + (an.cp - dome) * x**2


def lung_mask(an: Anatomy, side: str, u, v, gap: float = 0.0, gap_tmax: float = 1.0):
    """One lung field. `gap` pulls the lung away from the apex and lateral wall (a collapsed lung under a
    pneumothorax); the lateral pull fades out below `gap_tmax` of the lung height."""
    d = outward(an, side, u)
    lat = lateral_edge(an, v)
    if gap:
        lat = lat - gap * np.clip((gap_tmax - lung_t(an, v)) / 0.15, 0.0, 1.0)
    return (d >= medial_edge(an, side, v)) & (d <= lat) & (v >= apex_edge(an, d) + gap) & (v <= diaphragm(an, side, d))


# The long axis of the heart runs from the patient's right shoulder to the left hip: down and to the
# image right. A tilted ellipse gives the straight-ish right border and the low left apex.
HEART_TILT = np.deg2rad(35.0)
HEART_AXES_RATIO = 0.75  # short / long semi-axis


def heart_ellipse(an: Anatomy, ctr: float) -> tuple[float, float, float, float]:
    """(u centre, v centre, horizontal half-width, vertical half-height) of the heart silhouette. Its width
    is ctr x the internal thoracic width (2 x half_width), so the CTR measured on the image is the stored one."""
    width = ctr * 2.0 * an.half_width
    uc = an.mid + (an.heart_left - 0.5) * width
    vc = an.dome_right - 0.06
    return uc, vc, width / 2.0, an.heart_height * np.sqrt(ctr / 0.45)


def heart_mask(an: Anatomy, ctr: float, u, v):
    """Tilted ellipse squashed vertically to the wanted height; vertical squashing keeps its width."""
    uc, vc, half_w, half_h = heart_ellipse(an, ctr)
    c, s, r = np.cos(HEART_TILT), np.sin(HEART_TILT), HEART_AXES_RATIO
    long_axis = half_w / np.sqrt(c**2 + (r * s) ** 2)  # semi-axes whose horizontal extent is half_w
    natural_h = long_axis * np.sqrt(s**2 + (r * c) ** 2)
    x, y = u - uc, (v - vc) * natural_h / half_h
    along, across = x * c + y * s, -x * s + y * c
    return (along / long_axis) ** 2 + (across / (r * long_axis)) ** 2 <= 1.0


def hilum(an: Anatomy, side: str) -> tuple[float, float]:
    """The left hilum sits a little higher than the right."""
    return to_uv(an, side, 0.36, 0.42 if side == "left" else 0.46)


# ---------------------------------------------------------------- strokes and device paths


def smooth_path(points, iterations: int = 2) -> np.ndarray:
    """Chaikin corner cutting: turns a few control points into a gently curved polyline."""
    p = np.asarray(points, dtype=np.float64)
    for _ in range(iterations):
        q = 0.75 * p[:-1] + 0.25 * p[1:]
        r = 0.25 * p[:-1] + 0.75 * p[1:]
        inner = np.empty((2 * len(q), 2))
        inner[0::2], inner[1::2] = q, r
        p = np.vstack([p[:1], inner, p[-1:]])
    return p


def stroke(size: int, points, half_width: float) -> np.ndarray:
    """Anti-aliased coverage (0..1) of a polyline of the given half-width, computed only in its bounding box."""
    pts = np.asarray(points, dtype=np.float64)
    px = 1.0 / size
    hw = max(half_width, 0.6 * px)  # never thinner than a pixel, or it vanishes at 128 px
    pad = hw + 2 * px
    c0 = max(0, int(np.floor((pts[:, 0].min() - pad) * size)))
    c1 = min(size, int(np.ceil((pts[:, 0].max() + pad) * size)))
    r0 = max(0, int(np.floor((pts[:, 1].min() - pad) * size)))
    r1 = min(size, int(np.ceil((pts[:, 1].max() + pad) * size)))
    out = np.zeros((size, size))
    if c1 <= c0 or r1 <= r0:
        return out
    u, v = grid(size)
    uu, vv = u[r0:r1, c0:c1], v[r0:r1, c0:c1]
    dist = np.full(uu.shape, np.inf)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        dx, dy = x1 - x0, y1 - y0
        s = np.clip(((uu - x0) * dx + (vv - y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
        dist = np.minimum(dist, np.hypot(uu - x0 - s * dx, vv - y0 - s * dy))
    out[r0:r1, c0:c1] = np.clip(0.5 + (hw - dist) / px, 0.0, 1.0)
    return out


def ett_tip(an: Anatomy, f: Finding) -> tuple[float, float]:
    """Tip of the endotracheal tube: tip_cm above the carina, or down the right main bronchus if negative."""
    cm = 1.0 / an.fov_cm
    if f.tip_cm is not None and f.tip_cm < 0:
        depth = -f.tip_cm * cm
        return an.mid + RIGHT_BRONCHUS[0] * depth, an.carina + RIGHT_BRONCHUS[1] * depth
    return an.mid, an.carina - (f.tip_cm or 0.0) * cm


def ett_path(an: Anatomy, f: Finding) -> np.ndarray:
    tip = ett_tip(an, f)
    if tip[1] > an.carina:  # right mainstem: straight down the trachea, then along the bronchus
        return np.array([(an.mid, -0.02), (an.mid, an.carina), tip])
    return np.array([(an.mid, -0.02), tip])


# Tip of a central venous catheter, below the carina.
LINE_TIP_DEPTH = {"svc": 0.03, "cavoatrial junction": 0.08, "right atrium": 0.13}


def central_line_path(an: Anatomy, f: Finding) -> np.ndarray:
    """Venous route from the access vein to the tip; both routes join the SVC right of the midline."""
    m, w, top, car = an.mid, an.half_width, an.apex, an.carina
    svc = (m - 0.035, car)
    tip = (m - 0.03, car + LINE_TIP_DEPTH[f.tip or "svc"])
    routes = {
        "right internal jugular": [(m - 0.07, -0.01), (m - 0.055, top + 0.04), (m - 0.04, top + 0.1), svc],
        "left internal jugular": [(m + 0.07, -0.01), (m + 0.055, top + 0.05), (m + 0.01, top + 0.12), svc],
        "right subclavian": [(m - 0.72 * w, top + 0.02), (m - 0.3 * w, top + 0.05), (m - 0.045, top + 0.1), svc],
        "left subclavian": [(m + 0.72 * w, top + 0.02), (m + 0.3 * w, top + 0.06), (m + 0.01, top + 0.12), svc],
    }
    return smooth_path(routes[f.position or "right internal jugular"] + [tip])


def pacemaker_generator(an: Anatomy, f: Finding) -> tuple[float, float, float, float]:
    """(u, v, half width, half height) of the pulse generator, below the clavicle in the upper chest."""
    s = side_sign(f.side or "left")
    return an.mid + s * 0.62 * an.half_width, an.apex + 0.07, 0.045, 0.032


PACER_LEAD_TIPS = ("right atrium", "right ventricle", "coronary sinus")


def pacemaker_leads(an: Anatomy, f: Finding, ctr: float) -> list[np.ndarray]:
    """Leads run medially, down the SVC and into the heart chambers (tips in PACER_LEAD_TIPS order)."""
    gu, gv, hw, _ = pacemaker_generator(an, f)
    s = side_sign(f.side or "left")
    uc, vc, ax, b = heart_ellipse(an, ctr)
    tips = [(uc - 0.7 * ax, vc - 0.45 * b), (uc + 0.45 * ax, vc + 0.5 * b), (uc + 0.8 * ax, vc - 0.1 * b)]
    leads = []
    for i, tip in enumerate(tips[: f.leads]):
        off = 0.008 * i  # leads run side by side, not on top of each other
        ctrl = [
            (gu - s * hw, gv + off),
            (an.mid + s * 0.12, an.apex + 0.08 + off),
            (an.mid - 0.03 + off, an.carina + 0.02),
            (an.mid - 0.02 + off, vc - 0.2 * b),
            tip,
        ]
        leads.append(smooth_path(ctrl))
    return leads
