"""Pictures of what the model sees: instance masks, outlines, boxes and labels, beside the depth.

The point is to let a person judge a model at a glance, so every choice here is
about readability: each instance gets its own colour (neighbouring cartons of one
product must not blur into one blob), masks are tinted rather than painted over
so the image underneath stays visible, labels are drawn last (never hidden under
another mask) and always stay inside the picture, and the depth panel repeats
the outlines so a missed split between two touching cartons can be checked
against the depth step that should have revealed it.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from dd.client.api import Instance

MASK_ALPHA = 0.45
OUTLINE_PX = 2
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_GOLDEN = 0.618033988749895


def _palette(n: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """`n` saturated RGB colours (and their hues) spread around the hue circle by the golden ratio."""
    hues, rgbs = [], []
    for i in range(n):
        h = (0.13 + i * _GOLDEN) % 1.0
        # Alternate saturation and value a little, so hues that come close still differ.
        r, g, b = colorsys.hsv_to_rgb(h, 0.85 if i % 2 else 0.7, 1.0 if i % 3 else 0.9)
        hues.append(h)
        rgbs.append((int(r * 255), int(g * 255), int(b * 255)))
    return np.asarray(hues), rgbs


def instance_colors(boxes: Sequence[Sequence[float]]) -> list[tuple[int, int, int]]:
    """One distinct RGB colour per box, neighbours as different in hue as the palette allows.

    The palette alone is not enough: the model emits instances by score, not by
    place, so two touching cartons may get palette entries of similar hue and
    read as one. Each box (in the given order) takes the unused palette colour
    farthest in hue from the colours of boxes already coloured near it.
    """
    n = len(boxes)
    if n == 0:
        return []
    # Spare colours, so the last boxes still have a choice of hue.
    hues, rgbs = _palette(2 * n + 4)
    b = np.asarray(boxes, np.float64).reshape(n, 4)
    margin = 0.25 * np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])[:, None]
    grown = np.concatenate([b[:, :2] - margin, b[:, 2:] + margin], axis=1)
    near = ((grown[:, None, 0] < grown[None, :, 2]) & (grown[None, :, 0] < grown[:, None, 2])
            & (grown[:, None, 1] < grown[None, :, 3]) & (grown[None, :, 1] < grown[:, None, 3]))
    free = np.ones(len(hues), bool)
    chosen = np.full(n, -1)
    for i in range(n):
        done = near[i] & (chosen >= 0)
        done[i] = False
        cand = np.flatnonzero(free)
        if done.any():
            taken = hues[chosen[done]]
            d = np.abs(hues[cand][:, None] - taken[None, :])
            gap = np.minimum(d, 1.0 - d).min(axis=1)
            pick = cand[int(np.argmax(gap > gap.max() - 0.02))]  # the earliest of the (near) best
        else:
            pick = cand[0]
        chosen[i] = pick
        free[pick] = False
    return [rgbs[k] for k in chosen]


def _scale(width: int, height: int) -> tuple[float, int]:
    """Font scale and thickness that read well from thumbnails up to 4K frames."""
    s = max(0.45, min(width, height) / 900.0)
    return s, max(1, int(round(s * 2)))


def _mask_of(inst: Instance, height: int, width: int) -> np.ndarray | None:
    m = inst.mask
    if m is None or m.shape != (height, width):
        return None  # not this picture's mask (read_color decodes as the server does, so not expected)
    return m


def _contours(mask: np.ndarray) -> Sequence[np.ndarray]:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return contours


def _place_label(box: tuple[float, float, float, float], tw: int, th: int, width: int, height: int,
                 taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """A rectangle for a label of tw x th: above the box, else inside its top, else below it,
    inside its bottom or middle; always inside the image.

    Labels of touching boxes collide often (a pallet layer is a grid), so a
    candidate that covers earlier labels gives way to one that covers less.
    """
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    candidates = [(x1, y1 - th), (x1, y1), (x2 - tw, y1), (x1, y2), (x1, y2 - th), (x2 - tw, y2 - th),
                  (x1, (y1 + y2 - th) // 2)]
    placed = []
    for x, y in candidates:
        x = min(max(0, x), max(0, width - tw))
        y = min(max(0, y), max(0, height - th))
        placed.append((x, y, x + tw, y + th))

    def covered(rect: tuple[int, int, int, int]) -> int:
        return sum(max(0, min(rect[2], t[2]) - max(rect[0], t[0])) * max(0, min(rect[3], t[3]) - max(rect[1], t[1]))
                   for t in taken)

    return min(placed, key=covered)  # the first free candidate, else the one hiding least


def _text_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def colorize_depth(depth: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Depth (mm, 0 = missing) as RGB with TURBO: near is red, far is blue, missing is black.

    The range is the 1st to 99th percentile of valid pixels, so a few far-away
    floor pixels or sensor spikes do not flatten the contrast on the stack.
    Returns the picture and the range in millimetres.
    """
    d = depth.astype(np.float32)
    if d.ndim == 3:
        d = d[..., 0]
    valid = d > 0
    if not valid.any():
        return np.zeros((*d.shape, 3), np.uint8), 0.0, 0.0
    lo, hi = np.percentile(d[valid], [1, 99])
    if hi <= lo:
        hi = lo + 1.0
    norm = 1.0 - np.clip((d - lo) / (hi - lo), 0.0, 1.0)  # near = 1 = red end of TURBO
    bgr = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rgb[~valid] = 0
    return rgb, float(lo), float(hi)


def _caption(img: np.ndarray, texts: Sequence[str], scale: float, thick: int) -> None:
    """The first of `texts` that fits, on a dark band at the bottom-left, for panel legends."""
    pad = max(3, int(4 * scale))
    h, w = img.shape[:2]
    for text in texts:
        (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
        if tw + 2 * pad <= w:
            break
    x0, y0 = 0, max(0, h - th - base - 2 * pad)
    cv2.rectangle(img, (x0, y0), (min(w - 1, tw + 2 * pad), h - 1), (0, 0, 0), -1)
    cv2.putText(img, text, (x0 + pad, h - pad - base), _FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)


def render(color: np.ndarray, instances: Sequence[Instance], depth: np.ndarray | None = None) -> np.ndarray:
    """One RGB picture: the annotated color image, with the colourised depth to its right when given."""
    height, width = color.shape[:2]
    canvas = color.astype(np.float32)
    # Best instances last: where masks overlap, the most confident one is on top.
    order = sorted(range(len(instances)), key=lambda i: instances[i].score)
    best_first = order[::-1]
    colors = dict(zip(best_first, instance_colors([instances[i].box for i in best_first])))
    masks = {i: _mask_of(instances[i], height, width) for i in order}

    for i in order:
        m = masks[i]
        if m is not None and m.any():
            canvas[m] = canvas[m] * (1.0 - MASK_ALPHA) + np.asarray(colors[i], np.float32) * MASK_ALPHA
    out = np.ascontiguousarray(np.clip(canvas, 0, 255).astype(np.uint8))

    contours = {i: _contours(masks[i]) if masks[i] is not None else () for i in order}
    for i in order:
        x1, y1, x2, y2 = (int(round(v)) for v in instances[i].box)
        # x2, y2 are exclusive; cv2.rectangle's corners are inclusive.
        cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), colors[i], 1, cv2.LINE_AA)
        if contours[i]:
            cv2.drawContours(out, contours[i], -1, colors[i], OUTLINE_PX, cv2.LINE_AA)

    scale, thick = _scale(width, height)
    pad = max(2, int(round(3 * scale)))
    taken: list[tuple[int, int, int, int]] = []
    for i in reversed(order):  # best first, so they get the best places
        inst = instances[i]
        text = f"{inst.class_name or inst.class_id} {inst.score:.2f}"
        (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
        rect = _place_label(inst.box, tw + 2 * pad, th + base + 2 * pad, width, height, taken)
        taken.append(rect)
        cv2.rectangle(out, rect[:2], (rect[2] - 1, rect[3] - 1), colors[i], -1)
        cv2.putText(out, text, (rect[0] + pad, rect[3] - pad - base), _FONT, scale, _text_color(colors[i]),
                    thick, cv2.LINE_AA)

    if depth is None:
        return out
    if depth.shape[:2] != (height, width):
        depth = cv2.resize(depth, (width, height), interpolation=cv2.INTER_NEAREST)
    dimg, lo, hi = colorize_depth(depth)
    dimg = np.ascontiguousarray(dimg)
    for i in order:
        if contours[i]:
            # A dark under-stroke keeps the outline visible on every hue of the colormap.
            cv2.drawContours(dimg, contours[i], -1, (0, 0, 0), OUTLINE_PX + 2, cv2.LINE_AA)
            cv2.drawContours(dimg, contours[i], -1, colors[i], OUTLINE_PX, cv2.LINE_AA)
    if hi > 0:
        span = f"depth {lo / 1000:.2f}-{hi / 1000:.2f} m"
        _caption(dimg, [f"{span} (red near, blue far, black missing)", f"{span} (red near)", span],
                 scale * 0.9, max(1, thick - 1))
    return np.hstack([out, dimg])


def read_color(path: Path) -> np.ndarray:
    """RGB uint8, decoded the way the server decodes it (OpenCV, EXIF orientation ignored)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise OSError(f"{path}: not an image OpenCV can read")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_depth(path: Path) -> np.ndarray:
    depth = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if depth is None:
        raise OSError(f"{path}: not an image OpenCV can read")
    return depth


def write_viz(out_path: Path, color_path: Path, instances: Sequence[Instance], depth_path: Path | None = None) -> Path:
    """Reads the inputs, renders them and writes `out_path` (PNG: outlines stay crisp)."""
    picture = render(read_color(color_path), instances, read_depth(depth_path) if depth_path else None)
    if not cv2.imwrite(str(out_path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {out_path}; check that the folder is writable")
    return out_path
