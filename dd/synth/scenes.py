"""Synthetic top-down RGB-D depalletizing scenes with exact instance masks.

Why this exists: the segmentation server has to be trained and regression-tested on
data that shows what makes depalletizing hard -- touching cartons of one product that
look identical in colour and are only separable by depth, partially unloaded layers,
slip sheets, perspective walls of the stack and the dropouts of real depth sensors --
without shipping a real data set. Every scene is a pure function of its seed, so a scene
can be reproduced from its file name alone.

How it is rendered (and why it is fast): the scene is a list of planar quads in the
camera frame (floor, pallet, slip sheets, carton sides, carton tops, decals on the tops).
They are rasterised in painter's order into one integer *face-id* map with
``cv2.fillConvexPoly``; every per-pixel quantity (colour, inverse depth, instance id,
texture strength, dropout probability) is then a single table lookup by face id.
Inverse depth of a plane is affine in pixel coordinates, so exact perspective depth needs
no per-pixel geometry. Painter's order is sufficient because faces are drawn layer by
layer (a higher layer is always closer) and, inside a layer, all side walls before all
tops (lowest first), so a wall only stays visible where no same-layer top covers it; the
error is the sliver of a wall between two tops differing by <= 40 mm, well below a pixel
at these distances. Instance masks are read back from the same face-id map, so they are
exactly the pixels where a carton's top face is the visible surface.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CATEGORIES: list[str] = ["carton"]

#: Instances whose visible top face is smaller than this (pixels) are dropped: a robot
#: cannot grasp a sliver and a detector should not be penalised for missing one.
MIN_AREA: int = 150

#: Scene ``i`` of a data set with seed ``s`` uses seed ``s * SEED_STRIDE + i``; with
#: fewer than ``SEED_STRIDE`` scenes per data set, data sets of different seeds never
#: share a scene.
SEED_STRIDE: int = 100003

#: Instances must also be at least 5 px thick over this many pixels (area after a 5×5
#: erosion): long thin strips of a lower carton seen beside a higher one are mostly lost
#: in the depth sensor's occlusion shadow and cannot be picked either.
MIN_CORE: int = 30

# Columns of the per-face attribute table.
_R, _G, _B, _SHADE, _FINE, _BLOTCH, _GRAIN, _PA, _PB, _PC, _ZMIN, _ZMAX, _INST, _MISS = range(14)
_NCOL = 14

_PALLET_DECK_MM = 144.0  # floor to top of the deck of a EUR-style pallet
_BOARD_MM = 22.0


@dataclass
class Scene:
    """One rendered RGB-D frame with its ground truth."""

    color: np.ndarray  # H×W×3 uint8, RGB order
    depth: np.ndarray  # H×W uint16, millimetres, 0 = missing
    masks: np.ndarray  # N×H×W bool, visible top face of each carton
    boxes: np.ndarray  # N×4 float32 x1,y1,x2,y2 (tight box of the mask, x2/y2 exclusive)
    labels: np.ndarray  # N int64, all 1


@dataclass(frozen=True)
class _Camera:
    f: float
    cx: float
    cy: float


@dataclass
class _Sku:
    """One product: all its cartons share size, colour and decal layout, which is why
    neighbours look the same and only depth separates them."""

    length: float
    width: float
    height: float
    rgb: np.ndarray
    fine: float
    blotch: float
    decal_quads: np.ndarray  # (q, 4, 2) local (s, t) mm, s along the long side
    decal_group: np.ndarray  # (q,) 0 tape, 1 label, 2 print
    decal_rows: np.ndarray  # (q, _NCOL) appearance columns filled, geometry later


class _Canvas:
    """Collects quads in painter's order; the emission index is the face id."""

    def __init__(self, cam: _Camera) -> None:
        self.cam = cam
        self.uv: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []

    def emit(self, uv: np.ndarray, rows: np.ndarray) -> None:
        if len(uv):
            self.uv.append(uv.reshape(-1, 4, 2))
            self.rows.append(rows.reshape(-1, _NCOL))

    def project(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        c = self.cam
        return np.stack([c.cx + c.f * x / z, c.cy + c.f * y / z], axis=-1)


def _rows(
    n: int,
    rgb: np.ndarray | tuple[float, float, float],
    *,
    shade: float | np.ndarray = 1.0,
    fine: float | np.ndarray = 0.0,
    blotch: float | np.ndarray = 0.0,
    grain: float | np.ndarray = 0.0,
    plane: np.ndarray | None = None,
    zmin: float | np.ndarray = 0.0,
    zmax: float | np.ndarray = 1e9,
    inst: float | np.ndarray = -1.0,
    miss: float | np.ndarray = 0.0,
) -> np.ndarray:
    out = np.empty((n, _NCOL), np.float64)
    out[:, _R:_B + 1] = np.broadcast_to(np.asarray(rgb, np.float64), (n, 3))
    out[:, _SHADE] = shade
    out[:, _FINE] = fine
    out[:, _BLOTCH] = blotch
    out[:, _GRAIN] = grain
    out[:, _PA:_PC + 1] = 0.0 if plane is None else plane
    out[:, _ZMIN] = zmin
    out[:, _ZMAX] = zmax
    out[:, _INST] = inst
    out[:, _MISS] = miss
    return out


def _plane(cam: _Camera, nx: np.ndarray, ny: np.ndarray, nz: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Inverse depth of the plane n·P = d as a*u + b*v + c in pixel coordinates."""
    nx, ny, nz, d = (np.asarray(a, np.float64) for a in (nx, ny, nz, d))
    a = nx / (cam.f * d)
    b = ny / (cam.f * d)
    c = (nz - nx * cam.cx / cam.f - ny * cam.cy / cam.f) / d
    return np.stack(np.broadcast_arrays(a, b, c), axis=-1)


def _flat(cam: _Camera, z: float | np.ndarray) -> np.ndarray:
    z = np.atleast_1d(np.asarray(z, np.float64))
    return _plane(cam, np.zeros_like(z), np.zeros_like(z), np.ones_like(z), z)


def _rect(cx: float, cy: float, hx: float, hy: float, ang: float) -> np.ndarray:
    """Corners (4, 2) of a rotated rectangle, counter-clockwise in image orientation."""
    c, s = math.cos(ang), math.sin(ang)
    loc = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])
    return np.stack([cx + c * loc[:, 0] - s * loc[:, 1], cy + s * loc[:, 0] + c * loc[:, 1]], axis=-1)


def _box_sides(
    canvas: _Canvas,
    corners: np.ndarray,
    ztop: np.ndarray,
    zbot: np.ndarray,
    rgb: np.ndarray,
    light: float,
    fine: float | np.ndarray,
    blotch: float | np.ndarray,
    grain: float = 0.0,
) -> None:
    """Emit the camera-facing vertical walls of boxes.

    Walls matter because off-axis the camera sees the sides of high stacks; they are
    not instances but occlude lower tops. corners (n, 4, 2) XY mm in ring order, ztop
    (n, 4) Zc of the top corners, zbot (n,) Zc of the bottom, rgb (n, 3).
    """
    cam = canvas.cam
    p0 = corners
    p1 = np.roll(corners, -1, axis=1)
    edge = p1 - p0
    nrm = np.stack([-edge[..., 1], edge[..., 0]], axis=-1)
    nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True) + 1e-12
    outward = (p0 + p1) / 2 - corners.mean(axis=1, keepdims=True)
    nrm *= np.where((nrm * outward).sum(-1, keepdims=True) < 0, -1.0, 1.0)
    d = (nrm * p0).sum(-1)
    visible = d < -1.0  # camera (origin) is on the outer side of the wall
    if not visible.any():
        return
    i, e = np.nonzero(visible)
    z0 = ztop[i, e]
    z1 = ztop[i, (e + 1) % 4]
    zb = zbot[i]
    q0, q1 = p0[i, e], p1[i, e]
    xs = np.stack([q0[:, 0], q1[:, 0], q1[:, 0], q0[:, 0]], axis=-1)
    ys = np.stack([q0[:, 1], q1[:, 1], q1[:, 1], q0[:, 1]], axis=-1)
    zs = np.stack([z0, z1, zb, zb], axis=-1)
    uv = canvas.project(xs, ys, zs)
    n = nrm[i, e]
    plane = _plane(cam, n[:, 0], n[:, 1], np.zeros(len(i)), d[i, e])
    az = np.arctan2(n[:, 1], n[:, 0])
    shade = 0.5 + 0.3 * np.clip(np.cos(az - light), 0.0, 1.0)
    fine_a = np.broadcast_to(np.asarray(fine, np.float64), (len(corners),))[i]
    blotch_a = np.broadcast_to(np.asarray(blotch, np.float64), (len(corners),))[i]
    rows = _rows(
        len(i), rgb[i], shade=shade, fine=fine_a, blotch=blotch_a, grain=grain, plane=plane,
        zmin=np.minimum(z0, z1) - 1.0, zmax=zb + 1.0, miss=0.03,
    )
    canvas.emit(uv, rows)


# ----------------------------------------------------------------------------- products


_KRAFT = ((178, 136, 94), (160, 118, 78), (196, 160, 116), (186, 150, 108))
_WHITE = ((226, 226, 220), (212, 212, 206), (232, 230, 222))
_COLOURED = ((64, 96, 150), (168, 58, 48), (62, 118, 78), (212, 178, 64), (120, 120, 128), (40, 40, 44))
_INK = ((30, 40, 90), (25, 25, 25), (150, 30, 30), (20, 80, 40))


def _make_sku(rng: np.random.Generator) -> _Sku:
    length = float(np.round(rng.uniform(240, 520) / 5) * 5)
    width = float(np.round(np.clip(length * rng.uniform(0.5, 1.0), 180, 420) / 5) * 5)
    height = float(np.round(rng.uniform(150, 380) / 5) * 5)
    kind = rng.choice(3, p=[0.6, 0.22, 0.18])
    palette = (_KRAFT, _WHITE, _COLOURED)[kind]
    rgb = np.clip(np.asarray(palette[rng.integers(len(palette))], np.float64) + rng.normal(0, 6, 3), 0, 255)
    fine, blotch = ((0.035, 0.045), (0.015, 0.02), (0.02, 0.03))[kind]

    quads: list[np.ndarray] = []
    groups: list[int] = []
    rows: list[np.ndarray] = []
    hs, ht = length / 2, width / 2

    def add(s0: float, t0: float, s1: float, t1: float, colour: np.ndarray | tuple[float, ...], group: int,
            f: float, b: float, miss: float) -> None:
        quads.append(np.array([[s0, t0], [s1, t0], [s1, t1], [s0, t1]], np.float64))
        groups.append(group)
        rows.append(_rows(1, colour, fine=f, blotch=b, miss=miss))

    # Printed marks first: tape and labels are stuck on top of the print.
    if rng.random() < 0.45:
        ink = np.asarray(_INK[rng.integers(len(_INK))], np.float64)
        alpha = rng.uniform(0.35, 0.7) if kind != 2 else 0.9
        ink_rgb = rgb * (1 - alpha) + ink * alpha
        for _ in range(rng.integers(1, 4)):
            sw, tw = rng.uniform(0.15, 0.45) * length, rng.uniform(0.04, 0.15) * width
            s0 = rng.uniform(-hs + 10, hs - 10 - sw)
            t0 = rng.uniform(-ht + 10, ht - 10 - tw)
            add(s0, t0, s0 + sw, t0 + tw, ink_rgb, 2, fine * 0.6, blotch * 0.6, 0.0)

    tape_w = float(rng.choice([48.0, 48.0, 72.0]))
    tape_kind = rng.choice(4, p=[0.45, 0.3, 0.15, 0.1])  # clear, brown, white, none
    if tape_kind == 0:
        tape_rgb = np.clip(rgb * 0.9 + 22, 0, 255)
    elif tape_kind == 1:
        tape_rgb = np.array([150.0, 108.0, 62.0]) + rng.normal(0, 5, 3)
    else:
        tape_rgb = np.array([236.0, 234.0, 228.0])
    seam_rgb = rgb * 0.55
    if tape_kind != 3:
        add(-hs, -tape_w / 2, hs, tape_w / 2, tape_rgb, 0, 0.01, 0.01, 0.12)
        if rng.random() < 0.2:  # H-taping across both ends
            add(-hs, -ht, -hs + 35, ht, tape_rgb, 0, 0.01, 0.01, 0.12)
            add(hs - 35, -ht, hs, ht, tape_rgb, 0, 0.01, 0.01, 0.12)
    if tape_kind in (0, 3):  # the flap seam shows through clear tape or untaped
        add(-hs, -1.5, hs, 1.5, seam_rgb, 0, 0.02, 0.0, 0.1)

    if rng.random() < 0.6:
        ls, lt = (150.0, 100.0) if rng.random() < 0.6 else (100.0, 70.0)
        free = ht - tape_w / 2 - 15
        if free >= lt + 5 and length >= ls + 40:
            s0 = rng.uniform(-hs + 15, hs - 15 - ls)
            t0 = tape_w / 2 + rng.uniform(5, free - lt + 5)
            if rng.random() < 0.5:
                t0 = -t0 - lt
            white = np.array([240.0, 240.0, 236.0])
            add(s0, t0, s0 + ls, t0 + lt, white, 1, 0.01, 0.005, 0.02)
            # Text lines in the upper half, barcode bars in the lower half.
            for k in range(rng.integers(2, 4)):
                tt = t0 + 8 + k * 9
                add(s0 + 8, tt, s0 + 8 + rng.uniform(0.3, 0.8) * (ls - 16), tt + 4, (90, 90, 90), 1, 0.02, 0.0, 0.02)
            s = s0 + 10
            tb0, tb1 = t0 + lt * 0.55, t0 + lt - 8
            end = s0 + ls - 10
            while True:
                bw = rng.uniform(0.8, 2.5)
                if s + bw > end:
                    break
                add(s, tb0, s + bw, tb1, (25, 25, 25), 1, 0.02, 0.0, 0.15)
                s += bw + rng.uniform(1.0, 3.5)

    q = np.asarray(quads, np.float64).reshape(-1, 4, 2)
    r = np.concatenate(rows) if rows else np.zeros((0, _NCOL))
    return _Sku(length, width, height, rgb, fine, blotch, q, np.asarray(groups, np.int64), r)


# ----------------------------------------------------------------------------- layout


def _pack_layer(
    rng: np.random.Generator, rw: float, rh: float, skus: list[_Sku], gap: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fill a rw×rh rectangle row by row; returns centres (n,2), angles (n,), sku ids (n,).

    Row orientation alternates or is chosen per row like real pallet patterns, which is
    why seams of consecutive layers interlock instead of lining up.
    """
    mode = rng.integers(4)  # 0 long side along x, 1 across, 2 alternate rows, 3 best fit
    centres: list[tuple[float, float]] = []
    angles: list[float] = []
    ids: list[int] = []
    rows: list[tuple[float, float, int, float, int]] = []  # y, along, n, angle, sku
    y = 0.0
    r = 0
    while True:
        k = int(rng.integers(len(skus)))
        sku = skus[k]
        opts = [(sku.length, sku.width, 0.0), (sku.width, sku.length, math.pi / 2)]
        if mode == 1 or (mode == 2 and r % 2):
            opts = opts[::-1]
        elif mode == 3:
            opts.sort(key=lambda o: -((rw + gap) // (o[0] + gap)) * o[0] / rw)
        placed = False
        for along, across, ang in opts:
            n = int((rw + gap) // (along + gap))
            if n >= 1 and y + across <= rh + 5:
                rows.append((y, along, n, ang, k))
                y += across + gap
                placed = True
                break
        if not placed:
            break
        r += 1
    if not rows:
        return np.zeros((0, 2)), np.zeros(0), np.zeros(0, np.int64)
    used_h = y - gap
    y_off = (rh - used_h) * rng.uniform(0.2, 0.8)
    # Loaders push rows against one side or centre them, the same way for the whole layer.
    align = rng.choice([0.0, 0.5, 0.5, 1.0])
    for y0, along, n, ang, k in rows:
        across = skus[k].width if ang == 0.0 else skus[k].length
        used_w = n * along + (n - 1) * gap
        x_off = (rw - used_w) * align
        for j in range(n):
            centres.append((x_off + j * (along + gap) + along / 2, y_off + y0 + across / 2))
            angles.append(ang)
            ids.append(k)
    return np.asarray(centres), np.asarray(angles), np.asarray(ids, np.int64)


@dataclass
class _Cartons:
    xy: np.ndarray  # (n, 2) centre, camera frame mm
    ang: np.ndarray  # (n,) rotation of the long side
    half: np.ndarray  # (n, 2) half length / half width
    ztop: np.ndarray  # (n,) Zc of the top centre
    zbot: np.ndarray  # (n,) Zc of the bottom
    tilt: np.ndarray  # (n, 2) dZc/dX, dZc/dY of the top face
    layer: np.ndarray  # (n,)
    sku: np.ndarray  # (n,)
    rgb: np.ndarray  # (n, 3)
    flip: np.ndarray  # (n,) ±1: carton turned by 180°
    tape_dt: np.ndarray  # (n,)
    label_d: np.ndarray  # (n, 2)


def _corners(c: _Cartons) -> tuple[np.ndarray, np.ndarray]:
    """Top-face corners (n,4,2) XY and their Zc (n,4)."""
    loc = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
    loc = loc[None] * c.half[:, None, :]
    cs, sn = np.cos(c.ang)[:, None], np.sin(c.ang)[:, None]
    xy = np.stack([c.xy[:, None, 0] + cs * loc[..., 0] - sn * loc[..., 1],
                   c.xy[:, None, 1] + sn * loc[..., 0] + cs * loc[..., 1]], axis=-1)
    dz = (xy - c.xy[:, None, :]) * c.tilt[:, None, :]
    return xy, c.ztop[:, None] + dz.sum(-1)


# ----------------------------------------------------------------------------- scene build


@functools.lru_cache(maxsize=8)
def _grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    u = np.arange(width, dtype=np.float32)[None, :].repeat(height, 0)
    v = np.arange(height, dtype=np.float32)[:, None].repeat(width, 1)
    return u, v


def _build(rng: np.random.Generator, width: int, height: int) -> tuple[_Canvas, _Cartons, np.ndarray, dict[str, float]]:
    """Lay out floor, pallet, sheets and cartons and emit their quads in painter's order."""
    # --- products and layers
    homogeneous = rng.random() < 0.6
    n_layers = int(rng.choice([1, 2, 3, 4, 5], p=[0.1, 0.25, 0.3, 0.2, 0.15]))
    base_sku = _make_sku(rng)
    layer_skus: list[list[_Sku]] = []
    for _ in range(n_layers):
        if homogeneous:
            layer_skus.append([base_sku])
        else:
            first = _make_sku(rng)
            group = [first]
            for _ in range(rng.integers(0, 3)):  # mixed layer: same height, other product
                other = _make_sku(rng)
                other.height = first.height
                group.append(other)
            layer_skus.append(group)
    heights = [g[0].height for g in layer_skus]
    while sum(heights) > 1400 and len(heights) > 1:
        heights.pop()
        layer_skus.pop()
    n_layers = len(heights)
    stack_h = sum(heights)

    # --- camera: the full stack must fit the image, as a real cell is set up
    pallet_l = 1200.0
    pallet_w = float(rng.choice([800.0, 1000.0]))
    d_deck = rng.uniform(max(1800.0, 1500.0 + stack_h), 3000.0)
    d_floor = d_deck + _PALLET_DECK_MM
    z_top = d_deck - stack_h
    p_ang = rng.normal(0, math.radians(1.5)) + (math.pi / 2 if rng.random() < 0.15 else 0.0)
    ex = abs(pallet_l * math.cos(p_ang)) + abs(pallet_w * math.sin(p_ang))
    ey = abs(pallet_l * math.sin(p_ang)) + abs(pallet_w * math.cos(p_ang))
    fill = rng.uniform(0.75, 0.97)
    f = fill * min(width * z_top / ex, height * z_top / ey)
    cam = _Camera(f=f, cx=(width - 1) / 2 + rng.normal(0, 3), cy=(height - 1) / 2 + rng.normal(0, 3))
    mx = (width - f * ex / z_top) / 2
    my = (height - f * ey / z_top) / 2
    p_xy = np.array([rng.uniform(-0.8, 0.8) * mx, rng.uniform(-0.8, 0.8) * my]) * z_top / f
    canvas = _Canvas(cam)
    light = rng.uniform(-math.pi, math.pi)

    # --- floor, with an occasional painted lane marking
    big = 20.0 * d_floor
    floor_rgb = np.full(3, rng.uniform(110, 165)) + rng.normal(0, 4, 3)
    floor_xy = np.array([[-big, -big], [big, -big], [big, big], [-big, big]])
    canvas.emit(canvas.project(floor_xy[:, 0], floor_xy[:, 1], np.full(4, d_floor)),
                _rows(1, floor_rgb, fine=0.03, blotch=0.035, plane=_flat(cam, d_floor), miss=0.01))
    if rng.random() < 0.35:
        half_view = d_floor * width / f
        m = _rect(rng.uniform(-0.5, 0.5) * half_view, rng.uniform(-0.5, 0.5) * half_view,
                  big, rng.uniform(25, 50), rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.02))
        canvas.emit(canvas.project(m[:, 0], m[:, 1], np.full(4, d_floor)),
                    _rows(1, (205, 170, 40), fine=0.04, blotch=0.1, plane=_flat(cam, d_floor), miss=0.01))

    # --- pallet: outer walls, dark underside, cross boards, deck boards
    wood = np.array([196.0, 160.0, 112.0]) * rng.uniform(0.8, 1.05) + rng.normal(0, 4, 3)
    pc = _rect(p_xy[0], p_xy[1], pallet_l / 2, pallet_w / 2, p_ang)
    _box_sides(canvas, pc[None], np.full((1, 4), d_deck), np.array([d_floor]), (wood * 0.8)[None],
               light, 0.05, 0.05, grain=0.1)
    under = _rect(p_xy[0], p_xy[1], pallet_l / 2, pallet_w / 2, p_ang)
    zu = d_floor - _BOARD_MM
    canvas.emit(canvas.project(under[:, 0], under[:, 1], np.full(4, zu)),
                _rows(1, wood * 0.32, fine=0.06, blotch=0.05, plane=_flat(cam, zu), miss=0.15))
    ca, sa = math.cos(p_ang), math.sin(p_ang)

    def pallet_quad(s0: float, s1: float, t0: float, t1: float, z: float) -> np.ndarray:
        loc = np.array([[s0, t0], [s1, t0], [s1, t1], [s0, t1]])
        x = p_xy[0] + ca * loc[:, 0] - sa * loc[:, 1]
        y = p_xy[1] + sa * loc[:, 0] + ca * loc[:, 1]
        return canvas.project(x, y, np.full(4, z))

    zc = d_deck + _BOARD_MM
    for s_mid in (-pallet_l / 2 + 72.5, 0.0, pallet_l / 2 - 72.5):
        canvas.emit(pallet_quad(s_mid - 72.5, s_mid + 72.5, -pallet_w / 2, pallet_w / 2, zc),
                    _rows(1, wood * 0.6, fine=0.05, grain=0.12, plane=_flat(cam, zc), miss=0.03))
    boards = [145.0, 100.0, 145.0, 100.0, 145.0] if pallet_w == 800.0 else [145.0, 100.0] * 3 + [145.0]
    gap = (pallet_w - sum(boards)) / (len(boards) - 1)
    t = -pallet_w / 2
    grain_axis = 0 if abs(math.cos(p_ang)) > 0.7 else 1
    for bw in boards:
        board_rgb = wood * rng.uniform(0.85, 1.1)
        canvas.emit(pallet_quad(-pallet_l / 2, pallet_l / 2, t, t + bw, d_deck),
                    _rows(1, board_rgb, fine=0.05, blotch=0.04, grain=0.14, plane=_flat(cam, d_deck), miss=0.03))
        t += bw + gap

    # --- stack footprint
    inset = rng.uniform(-10, 60, 2) + (rng.random() < 0.3) * rng.uniform(0, 80, 2)
    rw, rh = pallet_l - 2 * inset[0], pallet_w - 2 * inset[1]
    s_ang = p_ang + rng.normal(0, math.radians(0.6))
    s_xy = p_xy + rng.normal(0, 8, 2)
    sheet_rgb = np.array(((232, 232, 226), (200, 200, 196), (184, 148, 104))[rng.integers(3)], np.float64)

    def sheet(z: float) -> None:
        margin = rng.uniform(0, 35)
        q = _rect(s_xy[0], s_xy[1], rw / 2 + margin, rh / 2 + margin, s_ang + rng.normal(0, 0.01))
        canvas.emit(canvas.project(q[:, 0], q[:, 1], np.full(4, z)),
                    _rows(1, sheet_rgb, fine=0.02, blotch=0.05, plane=_flat(cam, z), miss=0.02))

    if rng.random() < 0.35:
        sheet(d_deck - 2.0)

    # --- cartons, layer by layer
    layer_gap = rng.uniform(0.0, 4.0)
    flip_pattern = rng.random() < 0.7
    pick_dir = rng.uniform(-math.pi, math.pi)
    pick_top = rng.uniform(0.0, 0.85) if rng.random() < 0.8 else 0.0
    pick_next = pick_top * rng.uniform(0.2, 0.7) if (pick_top > 0.35 and rng.random() < 0.35) else 0.0
    h_sigma = rng.uniform(3.0, 9.0)
    all_c: list[_Cartons] = []
    z_bot = d_deck
    cs, sn = math.cos(s_ang), math.sin(s_ang)
    n_inst = 0
    for li, skus in enumerate(layer_skus):
        h = heights[li]
        z_layer = z_bot
        z_bot -= h
        loc, ang, ids = _pack_layer(rng, rw, rh, skus, layer_gap)
        n = len(loc)
        if n == 0:
            continue
        lx, ly = loc[:, 0] - rw / 2, loc[:, 1] - rh / 2
        if flip_pattern and li % 2:
            lx, ly = -lx, -ly
        top_layer = li == n_layers - 1
        jit = 1.5 if not top_layer else 2.5
        lx = lx + rng.normal(0, jit, n)
        ly = ly + rng.normal(0, jit, n)
        rot = rng.normal(0, math.radians(0.7 if not top_layer else 1.0), n)
        if top_layer:  # a few cartons got nudged by the previous picks
            rot += (rng.random(n) < 0.08) * rng.normal(0, math.radians(2.5), n)
        # Depalletizing removes cartons from one side first.
        proj = np.cos(pick_dir) * lx + np.sin(pick_dir) * ly
        proj = (proj - proj.min()) / (np.ptp(proj) + 1e-9)
        keep = np.ones(n, bool)
        if top_layer:
            keep = (proj >= pick_top) & (rng.random(n) > 0.06)
            keep[np.argmax(proj)] = True
        elif li == n_layers - 2 and pick_next > 0:
            keep = proj >= pick_next
        idx = np.nonzero(keep)[0]
        if len(idx) == 0:
            continue
        ztop = z_layer - h + np.clip(rng.normal(0, h_sigma, len(idx)), -20, 20)
        tilt = np.clip(rng.normal(0, 0.006, (len(idx), 2)), -0.02, 0.02)
        sku_ids = ids[idx]
        rgb = np.stack([skus[k].rgb for k in sku_ids]) * rng.uniform(0.97, 1.03, (len(idx), 1))
        c = _Cartons(
            xy=np.stack([s_xy[0] + cs * lx[idx] - sn * ly[idx], s_xy[1] + sn * lx[idx] + cs * ly[idx]], axis=-1),
            ang=s_ang + ang[idx] + rot[idx],
            half=np.stack([[skus[k].length / 2, skus[k].width / 2] for k in sku_ids]),
            ztop=ztop, zbot=np.full(len(idx), z_layer), tilt=tilt, layer=np.full(len(idx), li),
            sku=sku_ids, rgb=rgb, flip=np.where(rng.random(len(idx)) < 0.5, -1.0, 1.0),
            tape_dt=rng.normal(0, 3.0, len(idx)), label_d=rng.normal(0, 6.0, (len(idx), 2)),
        )
        order = np.argsort(-c.ztop, kind="stable")  # lower tops first
        corners, zc4 = _corners(c)
        fine = np.array([skus[k].fine for k in sku_ids])
        blotch = np.array([skus[k].blotch for k in sku_ids])
        _box_sides(canvas, corners[order], zc4[order], c.zbot[order], c.rgb[order], light, fine[order], blotch[order])
        # Tops (and their decals) after all walls of the layer.
        decorate = li >= n_layers - 3
        for j in order:
            inst = n_inst + j
            nrm_x, nrm_y = -c.tilt[j, 0], -c.tilt[j, 1]
            d = c.ztop[j] - c.tilt[j, 0] * c.xy[j, 0] - c.tilt[j, 1] * c.xy[j, 1]
            pl = _plane(cam, nrm_x, nrm_y, 1.0, d)
            zr = (zc4[j].min() - 1.0, zc4[j].max() + 1.0)
            shade = 1.0 + 8.0 * (c.tilt[j, 0] * math.cos(light) + c.tilt[j, 1] * math.sin(light))
            canvas.emit(canvas.project(corners[j, :, 0], corners[j, :, 1], zc4[j]),
                        _rows(1, c.rgb[j], shade=shade, fine=fine[j], blotch=blotch[j], plane=pl,
                              zmin=zr[0], zmax=zr[1], inst=inst, miss=0.01))
            sku = skus[c.sku[j]]
            if not decorate or len(sku.decal_quads) == 0:
                continue
            q = sku.decal_quads.copy()
            g = sku.decal_group
            q[g == 0, :, 1] += c.tape_dt[j]
            q[g == 1] += c.label_d[j]
            q[..., 0] = np.clip(q[..., 0], -c.half[j, 0], c.half[j, 0])
            q[..., 1] = np.clip(q[..., 1], -c.half[j, 1], c.half[j, 1])
            q *= c.flip[j]
            ca_, sa_ = math.cos(c.ang[j]), math.sin(c.ang[j])
            x = c.xy[j, 0] + ca_ * q[..., 0] - sa_ * q[..., 1]
            y = c.xy[j, 1] + sa_ * q[..., 0] + ca_ * q[..., 1]
            z = c.ztop[j] + c.tilt[j, 0] * (x - c.xy[j, 0]) + c.tilt[j, 1] * (y - c.xy[j, 1])
            rows = sku.decal_rows.copy()
            rows[:, _SHADE] = shade
            rows[:, _PA:_PC + 1] = pl
            rows[:, _ZMIN], rows[:, _ZMAX] = zr
            rows[:, _INST] = inst
            canvas.emit(canvas.project(x, y, z), rows)
        n_inst += len(idx)
        all_c.append(c)
        # A tier sheet on a layer that is itself being unloaded would float: skip it then.
        if li < n_layers - 1 and not (li == n_layers - 2 and pick_next > 0) and rng.random() < 0.2:
            sheet(float(c.ztop.min()) - 2.0)

    if not all_c:  # cannot happen with the size ranges above; kept so a tweak cannot crash
        all_c.append(_Cartons(np.zeros((0, 2)), np.zeros(0), np.zeros((0, 2)), np.zeros(0), np.zeros(0),
                              np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3)),
                              np.zeros(0), np.zeros(0), np.zeros((0, 2))))
    cartons = _Cartons(*(np.concatenate([getattr(c, k) for c in all_c]) for k in _Cartons.__dataclass_fields__))
    corners, zc4 = _corners(cartons)
    top_uv = canvas.project(corners[..., 0], corners[..., 1], zc4)
    info = {"d_deck": d_deck, "d_floor": d_floor, "light": light, "grain_axis": float(grain_axis)}
    return canvas, cartons, top_uv, info


@functools.lru_cache(maxsize=4)
def _noise_bank(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal and uniform fields twice the image size, made once per size.

    Drawing 300k fresh normals per scene costs more than the whole rest of the shading;
    a fixed bank read at a per-scene random offset and orientation is just as unstructured
    to a detector, and stays deterministic because the bank's own seed is a constant.
    """
    bank_rng = np.random.default_rng(0x5EED)
    normal = bank_rng.standard_normal((2 * height, 2 * width), dtype=np.float32)
    uniform = bank_rng.random((2 * height, 2 * width), dtype=np.float32)
    return normal, uniform


def _bank_view(rng: np.random.Generator, bank: np.ndarray, width: int, height: int) -> np.ndarray:
    y = int(rng.integers(0, bank.shape[0] - height + 1))
    x = int(rng.integers(0, bank.shape[1] - width + 1))
    view = bank[y:y + height, x:x + width]
    return view[::-1] if rng.random() < 0.5 else view


def _upsampled_noise(rng: np.random.Generator, width: int, height: int, sx: int, sy: int) -> np.ndarray:
    small = rng.standard_normal((max(2, height // sy), max(2, width // sx)), dtype=np.float32)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def generate_scene(seed: int, width: int = 640, height: int = 480) -> Scene:
    """Render one scene; identical seeds give bit-identical scenes."""
    rng = np.random.default_rng(seed)
    canvas, cartons, top_uv, info = _build(rng, width, height)
    normal_bank, uniform_bank = _noise_bank(width, height)

    # --- rasterise faces
    pts = np.round(np.concatenate(canvas.uv) * 16.0).astype(np.int32)
    pts = np.clip(pts, -(1 << 20), 1 << 20)
    table = np.concatenate(canvas.rows)
    fid = np.zeros((height, width), np.int32)
    fill = cv2.fillConvexPoly
    for k in range(len(pts)):
        fill(fid, pts[k], k, cv2.LINE_8, 4)
    cols = np.ascontiguousarray(table.T, dtype=np.float32)

    def per_pixel(col: int) -> np.ndarray:
        return np.take(cols[col], fid)

    # --- exact depth from the inverse-depth planes
    u, v = _grid(width, height)
    inv = per_pixel(_PA) * u
    inv += per_pixel(_PB) * v
    inv += per_pixel(_PC)
    depth = 1.0 / np.maximum(inv, 1e-6)
    depth = np.minimum(np.maximum(depth, per_pixel(_ZMIN)), per_pixel(_ZMAX))
    inst_map = np.take(table[:, _INST].astype(np.int32), fid)

    # --- colour: base × texture × soft shadow × lighting + sensor noise
    blotch = _upsampled_noise(rng, width, height, 20, 20)
    if info["grain_axis"] == 0:
        grain = _upsampled_noise(rng, width, height, 24, 1)
    else:
        grain = _upsampled_noise(rng, width, height, 1, 24)
    fine = _bank_view(rng, normal_bank, width, height)
    gain = per_pixel(_FINE) * fine
    gain += per_pixel(_BLOTCH) * blotch
    gain += per_pixel(_GRAIN) * grain
    gain += 1.0

    # Soft shadow: a pixel is darkened by nearby surfaces that are higher than it on the
    # side the light comes from. Computed at half resolution because it is low-pass.
    hw, hh = width // 2, height // 2
    small = cv2.resize(depth, (hw, hh), interpolation=cv2.INTER_AREA)
    shift = rng.uniform(1.5, 4.0)
    m = np.float32([[1, 0, -shift * math.cos(info["light"])], [0, 1, -shift * math.sin(info["light"])]])
    occluder = cv2.warpAffine(small, m, (hw, hh), borderMode=cv2.BORDER_REPLICATE)
    occluder = np.minimum(occluder, small)
    occluder = cv2.GaussianBlur(occluder, (0, 0), rng.uniform(1.5, 3.0))
    ao = cv2.GaussianBlur(small, (0, 0), 2.0)
    shade = np.clip((small - occluder) * (1.0 / 150.0), 0, 1) * rng.uniform(0.25, 0.45)
    shade += np.clip((small - ao) * (1.0 / 100.0), 0, 0.15)
    shade = 1.0 - shade
    # Lighting: a linear gradient and vignetting, folded into the low-res shading map.
    us, vs = _grid(hw, hh)
    gx, gy = rng.normal(0, 0.12, 2)
    vign = rng.uniform(0.1, 0.35)
    rr = ((us - hw / 2) / hw) ** 2 + ((vs - hh / 2) / hh) ** 2
    shade *= (1.0 + gx * (us / hw - 0.5) + gy * (vs / hh - 0.5) - vign * rr) * rng.uniform(0.85, 1.1)
    gain *= cv2.resize(shade, (width, height), interpolation=cv2.INTER_LINEAR)

    base = np.take(cols[_R:_B + 1].T * cols[_SHADE][:, None], fid, axis=0)
    color = base * gain[..., None]
    color = cv2.GaussianBlur(color, (3, 3), 0.6)
    color += fine[..., None] * rng.uniform(1.0, 2.5)  # sensor noise; the blur decorrelated it
    color = np.clip(color, 0, 255).astype(np.uint8)

    # --- depth sensor model
    noise = _bank_view(rng, normal_bank, width, height)
    z_m = depth * 0.001
    sigma = rng.uniform(0.5, 1.0) + rng.uniform(0.4, 0.9) * z_m * z_m
    noisy = depth + sigma * noise + blotch * rng.uniform(0.5, 1.5)

    edge = np.zeros((height, width), np.uint8)
    edge[:, 1:] |= (np.abs(depth[:, 1:] - depth[:, :-1]) > 12).astype(np.uint8)
    edge[1:, :] |= (np.abs(depth[1:, :] - depth[:-1, :]) > 12).astype(np.uint8)
    edge = cv2.dilate(edge, np.ones((3, 3), np.uint8))
    # Occlusion shadow of the projector/second camera: the lower side of a step loses data.
    k = int(rng.integers(2, 6))
    kernel = np.ones((1, k), np.uint8)
    anchor = (k - 1, 0) if rng.random() < 0.5 else (0, 0)
    nearest = cv2.erode(depth, kernel, anchor=anchor)
    occl = (depth - nearest) > 40.0

    uni = _bank_view(rng, uniform_bank, width, height)
    p_miss = per_pixel(_MISS)
    p_miss += rng.uniform(0.002, 0.01)
    p_miss += edge * (rng.uniform(0.25, 0.6) * (1.0 + 0.5 * blotch))
    missing = (uni < p_miss) | occl
    blobs = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(3, 16))):
        c = (int(rng.integers(width)), int(rng.integers(height)))
        ax = (int(rng.integers(1, 7)), int(rng.integers(1, 7)))
        cv2.ellipse(blobs, c, ax, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    missing |= blobs.astype(bool)
    out_depth = np.clip(np.rint(noisy), 1, 65535).astype(np.uint16)
    out_depth[missing] = 0

    # --- instances: visible top-face pixels, cut out per candidate bounding box
    masks: list[np.ndarray] = []
    boxes: list[list[float]] = []
    order = np.argsort(cartons.ztop, kind="stable")  # closest to the camera first
    k3 = np.ones((3, 3), np.uint8)
    k5 = np.ones((5, 5), np.uint8)
    for i in order:
        x0 = int(max(0, math.floor(top_uv[i, :, 0].min()) - 2))
        y0 = int(max(0, math.floor(top_uv[i, :, 1].min()) - 2))
        x1 = int(min(width, math.ceil(top_uv[i, :, 0].max()) + 3))
        y1 = int(min(height, math.ceil(top_uv[i, :, 1].max()) + 3))
        if x1 - x0 < 3 or y1 - y0 < 3:
            continue
        roi = (inst_map[y0:y1, x0:x1] == i).view(np.uint8)
        if int(roi.sum()) < MIN_AREA:
            continue
        # Parts at most 2 px wide (a lower top seen through the seam between two
        # cartons) are not something anyone could grasp or outline: leave them out.
        roi &= cv2.dilate(cv2.morphologyEx(roi, cv2.MORPH_OPEN, k3), k3)
        if int(roi.sum()) < MIN_AREA or int(cv2.erode(roi, k5).sum()) < MIN_CORE:
            continue
        roi = roi.view(bool)
        cols_ = np.nonzero(roi.any(0))[0]
        rows_ = np.nonzero(roi.any(1))[0]
        full = np.zeros((height, width), bool)
        full[y0:y1, x0:x1] = roi
        masks.append(full)
        boxes.append([x0 + cols_[0], y0 + rows_[0], x0 + cols_[-1] + 1, y0 + rows_[-1] + 1])
    n = len(masks)
    return Scene(
        color=color,
        depth=out_depth,
        masks=np.stack(masks) if n else np.zeros((0, height, width), bool),
        boxes=np.asarray(boxes, np.float32).reshape(n, 4),
        labels=np.ones(n, np.int64),
    )


def write_dataset(out_dir: Path, count: int, seed: int, width: int = 640, height: int = 480) -> Path:
    """Write ``count`` scenes in the users' folder layout; returns the annotations path.

    Scene ``i`` uses seed ``seed * SEED_STRIDE + i`` (see :data:`SEED_STRIDE`).
    """
    from pycocotools import mask as mask_util  # only writing data sets needs it

    if not 0 <= count <= SEED_STRIDE:
        raise ValueError(f"count must be in [0, {SEED_STRIDE}] so data sets of different seeds do not overlap")
    out_dir = Path(out_dir)
    (out_dir / "color").mkdir(parents=True, exist_ok=True)
    (out_dir / "depth").mkdir(parents=True, exist_ok=True)
    images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    for i in range(count):
        scene_seed = seed * SEED_STRIDE + i
        scene = generate_scene(scene_seed, width, height)
        name = f"scene_{i:06d}"
        bgr = cv2.cvtColor(scene.color, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(out_dir / "color" / f"{name}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95]):
            raise OSError(f"could not write {out_dir / 'color' / name}.jpg")
        if not cv2.imwrite(str(out_dir / "depth" / f"{name}.png"), scene.depth):
            raise OSError(f"could not write {out_dir / 'depth' / name}.png")
        image_id = i + 1
        images.append({
            "id": image_id, "file_name": f"color/{name}.jpg", "depth_file_name": f"depth/{name}.png",
            "width": width, "height": height, "seed": scene_seed,
        })
        if len(scene.masks):
            rles = mask_util.encode(np.asfortranarray(scene.masks.transpose(1, 2, 0).astype(np.uint8)))
        else:
            rles = []
        for mask, box, rle in zip(scene.masks, scene.boxes, rles):
            rle["counts"] = rle["counts"].decode("ascii")
            x1, y1, x2, y2 = (float(b) for b in box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                "segmentation": rle, "area": int(mask.sum()), "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0,
            })
    coco = {
        "info": {"description": "dd.synth synthetic depalletizing scenes", "seed": seed, "seed_stride": SEED_STRIDE},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)],
    }
    path = out_dir / "annotations.json"
    path.write_text(json.dumps(coco))
    return path
