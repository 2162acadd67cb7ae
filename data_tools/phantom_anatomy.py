"""Chest-radiograph phantom: random anatomy + findings rendered as display brightness.

Everything is drawn in *anatomy coordinates* (u, v): u points to the image's right (the patient's
left on a PA or AP chest), v points down, and the chest spans roughly [-1, 1] in both. A per-image
pose (scale, rotation, shift) maps pixels into these coordinates, so anatomy, findings and texture
move together. The renderer builds a water-equivalent density map D (0 = air, about 1 = full
mediastinum) and turns it into brightness with a detector-like curve; air outside the body ends up
dark and bone/heart bright, the MONOCHROME2 convention. Only numpy and scipy are used, vectorized
over the pixel grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FINDINGS = ("cardiomegaly", "pleural_effusion", "nodule", "pneumothorax", "consolidation")
SIDES = {
    "right": -1.0,
    "left": 1.0,
}  # patient side -> sign of u (PA/AP display: patient's right on image left)


@dataclass(frozen=True)
class Lung:
    """One lung's outline: a superellipse (centre, semi-axes) cut below by a diaphragm dome."""

    cx: float
    cy: float
    ax: float
    ay: float
    dome: float  # v of the dome's top (the hemidiaphragm), anatomy units
    dome_u: float  # u where the dome is highest


@dataclass(frozen=True)
class Anatomy:
    """Patient-level geometry in anatomy units (the chest spans about [-1, 1])."""

    body_half_width: float
    habitus: float  # soft-tissue thickness multiplier
    lungs: dict[str, Lung]
    dome_curvature: float
    heart_right_border: float  # u of the heart's right (image-left) border
    heart_tilt: float  # radians; the long axis points to the apex (image right, down)
    heart_aspect: float  # short / long semi-axis
    mediastinum_half_width: float
    rib_period: float
    rib_top: float
    rib_slope: float
    rib_curve: float
    rib_duty: float
    marking_phases: tuple[float, ...]

    @property
    def thoracic_width(self) -> float:
        """Inner thoracic width at the widest point (lung outer edge to lung outer edge)."""
        right, left = self.lungs["right"], self.lungs["left"]
        return (left.cx + left.ax) - (right.cx - right.ax)


@dataclass(frozen=True)
class Nodule:
    side: str
    u: float
    v: float
    radius: float  # anatomy units


@dataclass(frozen=True)
class Findings:
    """Every finding's parameters; a finding is present when its parameters say so."""

    ctr: float  # cardiothoracic ratio; > 0.5 is cardiomegaly
    effusion_sides: tuple[str, ...] = ()
    effusion_depth: float = 0.0  # fluid depth above the costophrenic angle, anatomy units
    nodules: tuple[Nodule, ...] = ()
    pneumothorax_side: str | None = None
    pneumothorax_gap: float = 0.0  # how far the lung edge is pulled in, anatomy units
    consolidation_side: str | None = None
    consolidation_centre: tuple[float, float] = (0.0, 0.0)
    consolidation_radius: float = 0.0
    consolidation_patches: tuple[tuple[float, float], ...] = ()  # offsets of confluent patches

    def labels(self) -> dict[str, int]:
        return {
            "cardiomegaly": int(self.ctr > 0.5),
            "pleural_effusion": int(bool(self.effusion_sides)),
            "nodule": int(bool(self.nodules)),
            "pneumothorax": int(self.pneumothorax_side is not None),
            "consolidation": int(self.consolidation_side is not None),
        }


@dataclass(frozen=True)
class Pose:
    scale: float  # anatomy size relative to the image's short side
    rotation: float  # radians
    shift_x: float  # in units of half the short side
    shift_y: float
    dome_shift: float  # inspiration depth: + moves both domes down


@dataclass(frozen=True)
class Exposure:
    attenuation: float  # k in 1 - exp(-k D): higher = more compressed highlights
    gamma: float
    noise_sigma: float  # white noise, brightness units
    nonuniformity: float  # amplitude of the smooth detector/heel-effect field


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Random patient-level geometry (same patient -> same anatomy across studies)."""
    cy = -0.12 + rng.uniform(-0.02, 0.02)
    ay = 0.62 + rng.uniform(-0.03, 0.03)
    dome_right = 0.30 + rng.uniform(-0.03, 0.04)
    lungs = {}
    for side, sign in SIDES.items():
        ax = 0.36 + rng.uniform(-0.02, 0.02)
        cx = sign * (0.40 + rng.uniform(-0.015, 0.015))
        dome = dome_right + (0.04 + rng.uniform(-0.015, 0.02) if side == "left" else 0.0)
        lungs[side] = Lung(cx=cx, cy=cy, ax=ax, ay=ay, dome=dome, dome_u=cx - sign * 0.02)
    return Anatomy(
        body_half_width=0.88 + rng.uniform(-0.03, 0.04),
        habitus=rng.uniform(0.9, 1.1),
        lungs=lungs,
        dome_curvature=rng.uniform(1.0, 1.5),
        heart_right_border=-0.17 + rng.uniform(-0.03, 0.02),
        heart_tilt=math.radians(30 + rng.uniform(-6, 6)),
        heart_aspect=0.78 + rng.uniform(-0.05, 0.05),
        mediastinum_half_width=0.11 + rng.uniform(-0.01, 0.015),
        rib_period=0.105 + rng.uniform(-0.006, 0.008),
        rib_top=-0.80 + rng.uniform(-0.02, 0.02),
        rib_slope=-0.35 + rng.uniform(-0.08, 0.08),
        rib_curve=0.9 + rng.uniform(-0.15, 0.15),
        rib_duty=0.42 + rng.uniform(-0.04, 0.04),
        marking_phases=tuple(float(x) for x in rng.uniform(0, 2 * math.pi, size=6)),
    )


def sample_pose(rng: np.random.Generator) -> Pose:
    return Pose(
        scale=rng.uniform(0.93, 1.04),
        rotation=math.radians(rng.uniform(-3.0, 3.0)),
        shift_x=rng.uniform(-0.035, 0.035),
        shift_y=rng.uniform(-0.03, 0.03),
        dome_shift=rng.uniform(-0.025, 0.025),
    )


def sample_exposure(rng: np.random.Generator) -> Exposure:
    return Exposure(
        attenuation=rng.uniform(0.7, 1.2),
        gamma=rng.uniform(0.85, 1.2),
        noise_sigma=rng.uniform(0.004, 0.014),
        nonuniformity=rng.uniform(0.0, 0.04),
    )


def anatomy_grid(rows: int, cols: int, pose: Pose) -> tuple[np.ndarray, np.ndarray, float]:
    """Anatomy coordinates of every pixel centre: (u_HW, v_HW) float32, and one pixel's size in u.

    Isotropic pixels; the short side spans [-1, 1] before the pose, so a narrower-than-square image
    keeps the chest's full width and shows more neck and abdomen.
    """
    half = min(rows, cols) / 2.0
    x_W = ((np.arange(cols, dtype=np.float32) + 0.5 - cols / 2.0) / half - pose.shift_x) / pose.scale
    y_H = ((np.arange(rows, dtype=np.float32) + 0.5 - rows / 2.0) / half - pose.shift_y) / pose.scale
    cos_r, sin_r = math.cos(pose.rotation), math.sin(pose.rotation)
    u_HW = cos_r * x_W[None, :] + sin_r * y_H[:, None]
    v_HW = -sin_r * x_W[None, :] + cos_r * y_H[:, None]
    return u_HW.astype(np.float32), v_HW.astype(np.float32), 1.0 / (half * pose.scale)


def soft_inside(level: np.ndarray, edge: float) -> np.ndarray:
    """1 where `level` < 0, 0 where > 0, a linear ramp `edge` wide in level units (anti-aliasing)."""
    return np.clip(0.5 - level / edge, 0.0, 1.0)


def lung_level(
    u: np.ndarray, v: np.ndarray, lung: Lung, shrink: float = 0.0, margin: float = 0.0
) -> np.ndarray:
    """Superellipse level (< 0 inside) of a lung outline. `shrink` pulls the lateral and apical edges in
    by that many units (medial border and base fixed): the collapsed lung of a pneumothorax. `margin`
    shrinks it on all sides (points at least that far inside)."""
    sign = 1.0 if lung.cx > 0 else -1.0
    cx = lung.cx - sign * shrink / 2.0
    cy = lung.cy + shrink / 2.0
    ax, ay = lung.ax - shrink / 2.0 - margin, lung.ay - shrink / 2.0 - margin
    du = np.abs(u - cx) / ax
    dv = np.abs(v - cy) / ay
    return du * du * np.sqrt(du) + dv * dv * np.sqrt(dv) - 1.0  # exponent 2.5: a rounded box


def dome_line(u: np.ndarray, lung: Lung, curvature: float, dome_shift: float) -> np.ndarray:
    """v of the diaphragm under a lung: highest at dome_u, falling towards both angles."""
    return lung.dome + dome_shift + curvature * (u - lung.dome_u) ** 2


@dataclass(frozen=True)
class Heart:
    """The cardiac silhouette: an ellipse tilted so its apex points to the image's lower right."""

    uc: float
    vc: float
    a: float  # long semi-axis
    b: float  # short semi-axis
    tilt: float

    def level(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        du, dv = u - self.uc, v - self.vc
        cos_t, sin_t = math.cos(self.tilt), math.sin(self.tilt)
        along = (du * cos_t + dv * sin_t) / self.a
        across = (dv * cos_t - du * sin_t) / self.b
        return along * along + across * across - 1.0


def heart_for_ctr(anatomy: Anatomy, ctr: float) -> Heart:
    """Size the heart so its horizontal extent / thoracic width equals `ctr` (the CTR a reader measures).

    Enlargement keeps the right border nearly fixed and pushes the apex left-lateral and down.
    """
    half_width = ctr * anatomy.thoracic_width / 2.0
    cos_t, sin_t, k = math.cos(anatomy.heart_tilt), math.sin(anatomy.heart_tilt), anatomy.heart_aspect
    a = half_width / math.sqrt(cos_t**2 + (k * sin_t) ** 2)
    b = k * a
    half_height = math.sqrt((a * sin_t) ** 2 + (b * cos_t) ** 2)
    right_border = anatomy.heart_right_border - 0.15 * max(0.0, ctr - 0.45)
    dome = anatomy.lungs["right"].dome
    return Heart(right_border + half_width, dome + 0.12 - half_height, a, b, anatomy.heart_tilt)


def lung_interior(anatomy: Anatomy, heart: Heart, side: str, u: np.ndarray, v: np.ndarray, margin: float):
    """Boolean: points at least ~`margin` inside the aerated part of one lung (for placing findings)."""
    lung = anatomy.lungs[side]
    inside = lung_level(u, v, lung, margin=margin) < 0.0
    inside &= v < dome_line(u, lung, anatomy.dome_curvature, 0.0) - margin
    inside &= heart.level(u, v) > 2.0 * margin / heart.b
    inside &= np.abs(u) > anatomy.mediastinum_half_width + margin
    return inside


def lung_zone(lung: Lung, v: float) -> str:
    """Upper / mid / lower third of the lung's height (apex to dome), for reports."""
    apex = lung.cy - lung.ay
    third = (lung.dome - apex) / 3.0
    return "upper" if v < apex + third else ("mid" if v < apex + 2 * third else "lower")


def _point_in_lung(rng, anatomy: Anatomy, heart: Heart, side: str, margin: float, v_bias: float):
    """One random point at least `margin` inside a lung; v_bias > 0 prefers the base, < 0 the apex
    (the density along the lung's height is proportional to exp(v_bias * height fraction))."""
    lung = anatomy.lungs[side]
    apex = lung.cy - lung.ay
    u_c = lung.cx + rng.uniform(-1.0, 1.0, size=1024) * lung.ax
    v_c = rng.uniform(apex, lung.dome + 0.1, size=1024)
    ok = lung_interior(anatomy, heart, side, u_c, v_c, margin)
    assert ok.any(), "no room in the lung for a finding; anatomy ranges are inconsistent"
    weights = ok * np.exp(v_bias * (v_c - apex) / (lung.dome - apex))
    pick = rng.choice(weights.size, p=weights / weights.sum())
    return float(u_c[pick]), float(v_c[pick])


def sample_findings(rng: np.random.Generator, anatomy: Anatomy, probability: float) -> Findings:
    """Each finding independently present with `probability`.

    Sizes and places are chosen so a linear model on 32x32 pixels can find every finding (the test
    suite checks it): nodules are 1-6 (mostly several) dense spots of 22-29 mm, upper zones first,
    consolidation prefers the lower zones, effusions and pneumothoraces are moderate to large.
    """
    present = {name: bool(rng.uniform() < probability) for name in FINDINGS}
    ctr = rng.uniform(0.56, 0.66) if present["cardiomegaly"] else rng.uniform(0.38, 0.47)
    heart = heart_for_ctr(anatomy, ctr)
    kwargs: dict = {"ctr": float(ctr)}
    if present["pleural_effusion"]:
        kwargs["effusion_sides"] = (("right",), ("left",), ("right", "left"))[rng.integers(0, 3)]
        kwargs["effusion_depth"] = float(rng.uniform(0.12, 0.3))
    if present["nodule"]:
        num_nodules = int(rng.choice(6, p=[0.1, 0.18, 0.18, 0.18, 0.18, 0.18])) + 1
        nodules = []
        for _ in range(num_nodules):
            side = ("right", "left")[rng.integers(0, 2)]
            radius = float(rng.uniform(0.075, 0.1))
            u, v = _point_in_lung(rng, anatomy, heart, side, radius, v_bias=-4.0)
            nodules.append(Nodule(side, u, v, radius))
        kwargs["nodules"] = tuple(nodules)
    if present["pneumothorax"]:
        kwargs["pneumothorax_side"] = ("right", "left")[rng.integers(0, 2)]
        kwargs["pneumothorax_gap"] = float(rng.uniform(0.14, 0.28))
    if present["consolidation"]:
        side = ("right", "left")[rng.integers(0, 2)]
        radius = float(rng.uniform(0.17, 0.26))
        kwargs["consolidation_side"] = side
        kwargs["consolidation_centre"] = _point_in_lung(rng, anatomy, heart, side, 0.06, v_bias=3.0)
        kwargs["consolidation_radius"] = radius
        offsets = rng.uniform(-0.6 * radius, 0.6 * radius, size=(3, 2))
        kwargs["consolidation_patches"] = tuple((float(du), float(dv)) for du, dv in offsets)
    return Findings(**kwargs)


def smooth_field(rng: np.random.Generator, rows: int, cols: int, num_cells: int) -> np.ndarray:
    """Smooth random field (rows, cols) float32, each pixel N(0, 1): `num_cells` random values across
    the short side blended by Gaussian kernels. Separable (two small matrix products), so it costs
    almost nothing at any image size."""
    cell = min(rows, cols) / num_cells

    def kernel(length: int) -> np.ndarray:  # (length, num_centres), rows of unit L2 norm
        centres = np.arange(-1.5, length / cell + 1.5) * cell
        pixels = np.arange(length) + 0.5
        weights = np.exp(-0.5 * ((pixels[:, None] - centres[None, :]) / (0.6 * cell)) ** 2)
        return (weights / np.linalg.norm(weights, axis=1, keepdims=True)).astype(np.float32)

    k_y, k_x = kernel(rows), kernel(cols)
    coarse_YX = rng.standard_normal((k_y.shape[1], k_x.shape[1]), dtype=np.float32)
    return k_y @ coarse_YX @ k_x.T


def _body(u: np.ndarray, v: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Soft-tissue path length (0 outside, 1 at the midline): an elliptic torso with shoulders, neck."""
    neck, half_width = 0.3, anatomy.body_half_width
    shoulder = np.sqrt(np.clip(1.0 - ((v + 0.7) / 0.4) ** 2, 0.0, 1.0))
    width = np.where(v < -0.7, neck + (half_width - neck) * shoulder, half_width)
    width = np.maximum(width, neck) * (1.0 - 0.06 * np.clip(v - 0.6, 0.0, 1.0))  # waist
    return np.sqrt(np.clip(1.0 - (u / width) ** 2, 0.0, 1.0))


def _mediastinum(u: np.ndarray, v: np.ndarray, anatomy: Anatomy, edge: float) -> np.ndarray:
    """Central soft-tissue column with the aortic knob bulging to the image right."""
    knob = 0.07 * np.exp(-(((v + 0.36) / 0.09) ** 2))
    half = anatomy.mediastinum_half_width
    level = np.maximum(-half - u, u - (half + knob))
    return soft_inside(level, edge)


def _lung_masks(u, v, anatomy: Anatomy, heart: Heart, pose: Pose, edge: float) -> dict[str, np.ndarray]:
    """Aerated area of each lung in [0, 1]: outline, above the dome, outside heart and mediastinum."""
    outside_centre = (1.0 - soft_inside(heart.level(u, v), edge * 2.0 / heart.b)) * (
        1.0 - _mediastinum(u, v, anatomy, edge)
    )
    masks = {}
    for side, lung in anatomy.lungs.items():
        above_dome = soft_inside(v - dome_line(u, lung, anatomy.dome_curvature, pose.dome_shift), edge)
        outline = soft_inside(lung_level(u, v, lung), edge * 2.5 / lung.ax)
        masks[side] = outline * above_dome * outside_centre
    return masks


def _markings(u: np.ndarray, v: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Vascular markings: streaks radiating from both hila, fading towards the periphery, in [0, 1]."""
    du = np.abs(u) - 0.16
    dv = v + 0.06 + 0.03 * np.sign(u)  # left hilum sits a little higher
    radius = np.sqrt(du * du + dv * dv)
    angle = np.arctan2(dv, du)
    p = anatomy.marking_phases
    streaks = np.cos(29 * angle + p[0] + 6 * radius) + np.cos(47 * angle + p[1] - 9 * radius)
    streaks += 0.7 * np.cos(71 * angle + p[2] + 14 * radius + 2 * np.sign(u))
    fade = np.exp(-radius / 0.5) * np.clip(radius / 0.12, 0.0, 1.0)  # no starburst at the hilum itself
    return np.clip(streaks / 2.2, 0.0, 1.0) * fade


def _bones(u: np.ndarray, v: np.ndarray, anatomy: Anatomy, edge: float, view: str) -> np.ndarray:
    """Bone density: posterior ribs (curved bands), faint anterior ribs, clavicles, spine."""
    w = np.abs(u) - 0.06  # distance from the spine
    lateral = np.clip((anatomy.body_half_width - 0.05 - w) / 0.25, 0.0, 1.0) * (w > 0)  # fade laterally
    s = (v - anatomy.rib_top - anatomy.rib_slope * w - anatomy.rib_curve * w * w) / anatomy.rib_period
    cut = math.cos(math.pi * anatomy.rib_duty)
    posterior = np.sqrt(np.clip((np.cos(2 * math.pi * s) - cut) / (1 - cut), 0.0, 1.0))
    posterior *= soft_inside(np.abs(s - 4.5) - 5.0, 0.3)  # ten ribs a side
    t = (v + 0.55 - 0.45 * (0.75 - w)) / (1.15 * anatomy.rib_period)
    anterior = np.clip((np.cos(2 * math.pi * t) - 0.3) / 0.7, 0.0, 1.0)
    anterior *= soft_inside(np.abs(t - 2.5) - 3, 0.3) * soft_inside(np.abs(w - 0.5) - 0.3, 0.05)
    clavicle_v = -0.64 - (0.06 if view == "AP" else 0.0) - 0.12 * (w - 0.1) + 0.05 * np.sin(6 * w)
    clavicle = soft_inside(np.abs(v - clavicle_v) - 0.028, edge) * soft_inside(np.abs(w - 0.3) - 0.27, edge)
    spine = soft_inside(np.abs(u) - 0.065, edge) * (0.8 + 0.2 * np.cos(2 * math.pi * v / 0.095))
    return 0.11 * posterior * lateral + 0.04 * anterior + 0.14 * clavicle + 0.1 * spine


def _effusion(u, v, lung: Lung, side: str, depth: float, dome_shift: float) -> np.ndarray:
    """Fluid fraction in [0, 1] below a level that hides the dome and the costophrenic angle, rising
    along the lateral chest wall (the meniscus)."""
    lateral = np.clip((u - lung.cx) * SIDES[side] / lung.ax, 0.0, 1.0)
    surface = lung.dome + dome_shift + 0.06 - depth * (0.5 + 0.9 * lateral**2)
    return np.clip((v - surface) / 0.05, 0.0, 1.0)


def _pneumothorax(u, v, lung: Lung, gap: float, px: float) -> tuple[np.ndarray, np.ndarray]:
    """(pleural space in [0, 1], visceral pleural line in [0, 1]) for a lung whose lateral and apical
    edge is pulled in by `gap` units."""
    collapsed = lung_level(u, v, lung, shrink=gap)
    px_level = px * 2.5 / (lung.ax - gap / 2.0)  # one pixel in level units near the edge
    space = np.clip(0.5 + collapsed / (1.5 * px_level), 0.0, 1.0)
    return space, np.exp(-((collapsed / (1.2 * px_level)) ** 2))


def _consolidation(u, v, findings: Findings, rng: np.random.Generator) -> np.ndarray:
    """Opacity in [0, 1]: confluent fuzzy patches with a mottled texture."""
    cu, cv = findings.consolidation_centre
    radius = findings.consolidation_radius
    blob = np.zeros_like(u)
    for du, dv in findings.consolidation_patches:
        blob = np.maximum(blob, np.exp(-((u - cu - du) ** 2 + (v - cv - dv) ** 2) / (1.4 * radius**2)))
    patchy = blob * (1.0 + 0.25 * smooth_field(rng, *u.shape, num_cells=14))
    return np.clip((patchy - 0.25) / 0.35, 0.0, 1.0)


def _add_findings(density, u, v, lungs, air, anatomy: Anatomy, findings: Findings, pose: Pose, rng, px):
    """Add every present finding to `density` (H, W) in place; returns the lung area still showing
    vascular markings (a pneumothorax has none beyond the pleural line)."""
    with_markings = lungs["right"] + lungs["left"]
    for side in findings.effusion_sides:  # fluid replaces the air: as dense as soft tissue
        fluid = _effusion(u, v, anatomy.lungs[side], side, findings.effusion_depth, pose.dome_shift)
        density += 0.72 * lungs[side] * air[side] * fluid
    if findings.pneumothorax_side is not None:
        side = findings.pneumothorax_side
        space, line = _pneumothorax(u, v, anatomy.lungs[side], findings.pneumothorax_gap, px)
        density -= 0.28 * lungs[side] * space  # air with no lung tissue left in the ray
        density += 0.1 * lungs[side] * line
        with_markings = with_markings - lungs[side] * space
    if findings.consolidation_side is not None:
        side = findings.consolidation_side
        density += 0.7 * lungs[side] * air[side] * _consolidation(u, v, findings, rng)
    for nodule in findings.nodules:  # a solid sphere's projected thickness
        d2 = ((u - nodule.u) ** 2 + (v - nodule.v) ** 2) / nodule.radius**2
        density += 0.8 * np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))
    return with_markings


def render(
    anatomy: Anatomy,
    findings: Findings,
    pose: Pose,
    exposure: Exposure,
    rows: int,
    cols: int,
    view: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """Render one radiograph: (rows, cols) float32 brightness in [0, 1], air dark (MONOCHROME2 sense)."""
    u, v, px = anatomy_grid(rows, cols, pose)
    edge = 1.5 * px
    heart = heart_for_ctr(anatomy, findings.ctr)
    body = _body(u, v, anatomy)
    lungs = _lung_masks(u, v, anatomy, heart, pose, edge)
    # Air path length through each lung: deepest in the middle, thinner at the edges.
    air = {s: 0.65 + 0.35 * np.sqrt(np.clip(-lung_level(u, v, anatomy.lungs[s]), 0, 1)) for s in lungs}
    density = anatomy.habitus * body
    density -= 0.7 * (lungs["right"] * air["right"] + lungs["left"] * air["left"])
    heart_level = heart.level(u, v)
    density += 0.12 * soft_inside(heart_level, edge * 2.0 / heart.b) * np.sqrt(np.clip(-heart_level, 0, 1))
    density -= 0.12 * soft_inside(np.abs(u) - 0.028, edge) * soft_inside(v + 0.3, edge)  # trachea
    left = anatomy.lungs["left"]
    bubble_v = left.dome + pose.dome_shift + 0.12  # gas in the stomach under the left dome
    density -= 0.22 * soft_inside(
        ((u - left.dome_u - 0.04) / 0.09) ** 2 + ((v - bubble_v) / 0.05) ** 2 - 1, 0.1
    )
    with_markings = _add_findings(density, u, v, lungs, air, anatomy, findings, pose, rng, px)
    texture = 0.5 + 0.25 * smooth_field(rng, rows, cols, num_cells=40)
    density += 0.2 * with_markings * _markings(u, v, anatomy) * texture
    density += _bones(u, v, anatomy, edge, view) * (body > 0)
    return _detector(np.maximum(density, 0.0), exposure, rng)


def _detector(density: np.ndarray, exposure: Exposure, rng: np.random.Generator) -> np.ndarray:
    """Density -> processed ("for presentation") brightness: compressive curve, gamma, shading, noise."""
    k = exposure.attenuation
    brightness = (1.0 - np.exp(-k * density)) / (1.0 - math.exp(-k * 1.45))
    brightness = np.clip(brightness, 0.0, 1.0) ** exposure.gamma
    rows, cols = density.shape
    brightness *= 1.0 + exposure.nonuniformity * smooth_field(rng, rows, cols, num_cells=3)
    brightness += exposure.noise_sigma * rng.standard_normal((rows, cols), dtype=np.float32)
    return np.clip(brightness, 0.0, 1.0).astype(np.float32)
