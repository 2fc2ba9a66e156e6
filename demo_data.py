"""Generate a small, seeded, procedurally drawn dataset for zero-shot SBIR.

Every class is a parametric 2-D shape (regular polygons, stars, crosses, arrows, block letters,
quadrilaterals, ...). Sketches are jittery hand-drawn outlines in dark strokes on white; photos
are the same silhouette filled with a coloured texture on a cluttered background. Ten classes
(`UNSEEN`) are held out for testing, chosen so that a close relative of each stays in training.
Each class also gets a "class-name embedding" built from its shape family and parameters, a
stand-in for word vectors.

Output layout, in the folder OUT (--output_dir):
    OUT/sketches/<class>/<class>_0000-1.png (mode L; Sketchy's naming: paired with photo <class>_0000.jpg)
    OUT/photos/<class>/<class>_0000.jpg     (RGB)
    OUT/train_labels.txt, OUT/test_labels.txt              (seen / unseen classes, sorted)
    OUT/train_embeddings.npy, OUT/test_embeddings.npy      (float32, rows follow the label files)
    OUT/.demo_data                                          (the arguments, as JSON)

Usage:
    python demo_data.py --output_dir data/demo
    python demo_data.py --output_dir data/demo --seed 1 --image_size 96 --workers 4
    python demo_data.py --output_dir data/tiny --sketches_per_class 3 --photos_per_class 3 --image_size 32
    python demo_data.py --output_dir data/demo_cross --cross_dataset   # for cross-dataset runs (evaluate.py)
"""
import argparse
import colorsys
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

MARKER = ".demo_data"
SUPERSAMPLE = 4  # outlines and silhouettes are drawn at 4x the output size, then downsampled
PHOTO_SUPERSAMPLE = 2  # photo backgrounds and textures are composed at 2x (speed)
SKETCH, PHOTO = 0, 1

# Held-out classes: one per family, each with seen neighbours (e.g. pentagon and heptagon for
# hexagon, star4 and star6 for star5, plus_thin for plus_thick, circle and ellipse_thin for ellipse).
UNSEEN = (
    "arrow_double",
    "crescent_fat",
    "ellipse",
    "flower5",
    "hexagon",
    "kite",
    "letter_h",
    "plus_thick",
    "ring_thick",
    "star5",
)

# --cross_dataset: a second dataset for cross-dataset evaluation of a model trained on the demo. It holds the
# demo's ten unseen classes and these ten of its seen classes (a neighbour of each unseen one), named in another
# style (Title Case with spaces: "Arrow Thin" for arrow_thin, as datasets spell the same class differently) and
# drawn anew (each image's generator is seeded by the new name), so that a demo model evaluated on it must leave
# out the ten classes it trained on, which it recognises by their normalised names.
CROSS_SEEN = ("arrow_thin", "circle", "crescent_thin", "ellipse_thin", "flower4", "heptagon", "letter_l",
              "plus_thin", "ring_thin", "star4")

# Degrees of turning above which an outline vertex counts as a corner (a new pen stroke).
CORNER_DEG = 30.0


# ----------------------------------------------------------------------------- shapes
# A shape is a list of (points (K, 2), is_hole) contours in unit coordinates, y pointing up.

def _ellipse_pts(rx, ry, n=96, cx=0.0, cy=0.0, phase=0.0):
    t = phase + np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _ngon(n):
    """Regular n-gon with a flat bottom edge."""
    t = -np.pi / 2 + np.pi / n + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star(n, inner):
    """n-pointed star, one point up; inner is the inner/outer radius ratio."""
    t = np.pi / 2 + np.pi * np.arange(2 * n) / n
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _plus(w):
    """Plus sign with arms of half-width w and half-length 1."""
    return np.array([(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
                     (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)], float)


def _latin_cross(w=0.16, arm=0.62, y=0.35):
    return np.array([(w, 1), (w, y + w), (arm, y + w), (arm, y - w), (w, y - w), (w, -1),
                     (-w, -1), (-w, y - w), (-arm, y - w), (-arm, y + w), (-w, y + w), (-w, 1)],
                    float)


def _arrow(shaft, head, head_len, double=False):
    """Arrow pointing right from x=-1 to x=1; shaft and head are half-widths."""
    right = [(1 - head_len, -shaft), (1 - head_len, -head), (1, 0), (1 - head_len, head),
             (1 - head_len, shaft)]
    if double:
        left = [(-1 + head_len, shaft), (-1 + head_len, head), (-1, 0), (-1 + head_len, -head),
                (-1 + head_len, -shaft)]
    else:
        left = [(-1, shaft), (-1, -shaft)]
    return np.array(right + left, float)


def _crescent(d, r2, n=64):
    """Unit circle minus a circle of radius r2 centred at (d, 0): horns point right."""
    x = (1 - r2 ** 2 + d ** 2) / (2 * d)
    y = math.sqrt(1 - x ** 2)
    a0 = math.atan2(y, x)
    outer = _arc_pts(1.0, 0.0, a0, 2 * np.pi - a0, n)  # upper tip -> left -> lower tip
    b0 = math.atan2(-y, x - d) + 2 * np.pi
    b1 = math.atan2(y, x - d)
    inner = _arc_pts(r2, d, b0, b1, n)[1:-1]  # lower tip -> inner left -> upper tip
    return np.concatenate([outer, inner])


def _arc_pts(r, cx, a0, a1, n):
    t = np.linspace(a0, a1, n)
    return np.stack([cx + r * np.cos(t), r * np.sin(t)], 1)


def _heart(n=120):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, y], 1)


def _drop(r=0.6, apex=1.3, n=80):
    """A circle of radius r with tangent lines meeting at an apex straight above it."""
    a = math.acos(r / apex)
    arc = _arc_pts(r, 0.0, np.pi / 2 + a, np.pi / 2 + 2 * np.pi - a, n)
    return np.concatenate([[(0.0, apex)], arc])


def _semicircle(n=64):
    return _arc_pts(1.0, 0.0, 0.0, np.pi, n)


def _flower(petals, radius, n=24):
    """Union of `petals` circles of the given radius whose outer edges touch the unit circle.

    Neighbouring petals meet at a notch on the bisector, at distance
    rho = d cos(pi/n) + sqrt(radius^2 - d^2 sin^2(pi/n)) from the centre, d = 1 - radius.
    """
    d, phi = 1 - radius, np.pi / petals
    rho = d * math.cos(phi) + math.sqrt(radius ** 2 - (d * math.sin(phi)) ** 2)
    a = math.atan2(rho * math.sin(phi), rho * math.cos(phi) - d)  # notch, seen from the petal
    arc = _arc_pts(radius, d, -a, a, n)[:-1]  # (n - 1, 2), petal pointing along +x
    pts = []
    for k in range(petals):
        t = np.pi / 2 + 2 * np.pi * k / petals
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        pts.append(arc @ rot.T)
    return np.concatenate(pts)


def _gear(teeth, r_out=1.0, r_in=0.78):
    pts = []
    step = 2 * np.pi / teeth
    for k in range(teeth):
        c = np.pi / 2 + k * step
        for r, da in ((r_in, -0.3), (r_out, -0.17), (r_out, 0.17), (r_in, 0.3)):
            pts.append((r * math.cos(c + da * step), r * math.sin(c + da * step)))
    return np.array(pts)


def _poly(*pts):
    return np.array(pts, float)


# Classes drawn as one fixed polygon: {name: (family, params, vertices)}, in unit coordinates, y up.
POLYGON_CLASSES = {
    "letter_l": ("letter", (0.0, 0.0), (
        (-0.6, 1), (-0.24, 1), (-0.24, -0.64), (0.6, -0.64), (0.6, -1), (-0.6, -1))),
    "letter_t": ("letter", (0.25, 0.0), (
        (-0.7, 1), (0.7, 1), (0.7, 0.64), (0.18, 0.64), (0.18, -1), (-0.18, -1), (-0.18, 0.64),
        (-0.7, 0.64))),
    "letter_u": ("letter", (0.5, 0.0), (
        (-0.6, 1), (-0.24, 1), (-0.24, -0.64), (0.24, -0.64), (0.24, 1), (0.6, 1), (0.6, -1),
        (-0.6, -1))),
    "letter_h": ("letter", (0.75, 0.0), (
        (-0.6, 1), (-0.24, 1), (-0.24, 0.18), (0.24, 0.18), (0.24, 1), (0.6, 1), (0.6, -1),
        (0.24, -1), (0.24, -0.18), (-0.24, -0.18), (-0.24, -1), (-0.6, -1))),
    "letter_e": ("letter", (1.0, 0.0), (
        (-0.6, 1), (0.6, 1), (0.6, 0.64), (-0.24, 0.64), (-0.24, 0.18), (0.4, 0.18),
        (0.4, -0.18), (-0.24, -0.18), (-0.24, -0.64), (0.6, -0.64), (0.6, -1), (-0.6, -1))),
    "rectangle": ("quad", (0.0, 0.0), ((-1, -0.5), (1, -0.5), (1, 0.5), (-1, 0.5))),
    "trapezoid": ("quad", (0.0, 1.0), ((-1, -0.55), (1, -0.55), (0.5, 0.55), (-0.5, 0.55))),
    "parallelogram": ("quad", (1.0, 0.0), ((-1, -0.5), (0.5, -0.5), (1, 0.5), (-0.5, 0.5))),
    "rhombus": ("quad", (0.5, 0.5), ((0, 1), (0.6, 0), (0, -1), (-0.6, 0))),
    "kite": ("quad", (0.5, 1.0), ((0, 1), (0.6, 0.35), (0, -1), (-0.6, 0.35))),
    "lightning": ("lightning", (0.0, 0.0), (
        (-0.1, 1), (0.5, 1), (0.05, 0.2), (0.4, 0.2), (-0.45, -1), (-0.1, -0.1), (-0.45, -0.1))),
    "house": ("house", (0.0, 0.0), (
        (-0.7, -1), (0.7, -1), (0.7, 0.1), (0.95, 0.1), (0, 1), (-0.95, 0.1), (-0.7, 0.1))),
    "chevron": ("chevron", (0.0, 0.0), (
        (-1, 0.5), (0, -0.5), (1, 0.5), (1, -0.05), (0, -1.05), (-1, -0.05))),
    "hourglass": ("hourglass", (0.0, 0.0), (
        (-0.7, 1), (0.7, 1), (0.1, 0), (0.7, -1), (-0.7, -1), (-0.1, 0))),
}


@lru_cache(maxsize=None)
def class_table():
    """{name: (family, params, contours)}; params are family-specific numbers in [0, 1]."""
    t = {}
    for n, name in zip(range(3, 10), ["triangle", "square", "pentagon", "hexagon", "heptagon",
                                      "octagon", "nonagon"]):
        t[name] = ("polygon", ((n - 3) / 6, 0.0), [(_ngon(n), False)])
    for n in range(4, 10):
        inner = 0.38 + 0.03 * (n - 4)
        t[f"star{n}"] = ("star", ((n - 4) / 5, inner), [(_star(n, inner), False)])
    t["plus_thin"] = ("cross", (0.0, 0.0), [(_plus(0.17), False)])
    t["plus_thick"] = ("cross", (0.5, 0.0), [(_plus(0.38), False)])
    t["cross_latin"] = ("cross", (0.0, 1.0), [(_latin_cross(), False)])
    t["arrow_thin"] = ("arrow", (0.0, 0.0), [(_arrow(0.1, 0.42, 0.6), False)])
    t["arrow_fat"] = ("arrow", (1.0, 0.0), [(_arrow(0.28, 0.62, 0.8), False)])
    t["arrow_double"] = ("arrow", (0.2, 1.0), [(_arrow(0.12, 0.42, 0.55, double=True), False)])
    for name, (family, params, vertices) in POLYGON_CLASSES.items():
        t[name] = (family, params, [(_poly(*vertices), False)])
    t["circle"] = ("ellipse", (1.0, 0.0), [(_ellipse_pts(1, 1), False)])
    t["ellipse"] = ("ellipse", (0.6, 0.0), [(_ellipse_pts(1, 0.62), False)])
    t["ellipse_thin"] = ("ellipse", (0.25, 0.0), [(_ellipse_pts(1, 0.38), False)])
    t["crescent_thin"] = ("crescent", (0.0, 0.0), [(_crescent(0.4, 0.95), False)])
    t["crescent_fat"] = ("crescent", (1.0, 0.0), [(_crescent(0.55, 0.75), False)])
    t["ring_thin"] = ("ring", (0.0, 0.0), [(_ellipse_pts(1, 1), False),
                                           (_ellipse_pts(0.72, 0.72), True)])
    t["ring_thick"] = ("ring", (1.0, 0.0), [(_ellipse_pts(1, 1), False),
                                            (_ellipse_pts(0.42, 0.42), True)])
    for n, radius in ((4, 0.45), (5, 0.39), (6, 0.35)):
        t[f"flower{n}"] = ("flower", ((n - 4) / 2, 0.0), [(_flower(n, radius), False)])
    t["heart"] = ("heart", (0.0, 0.0), [(_heart(), False)])
    t["drop"] = ("drop", (0.0, 0.0), [(_drop(), False)])
    t["semicircle"] = ("semicircle", (0.0, 0.0), [(_semicircle(), False)])
    t["gear"] = ("gear", (0.0, 0.0), [(_gear(8), False), (_ellipse_pts(0.3, 0.3, n=48), True)])
    return t


def class_names():
    """All class names, sorted."""
    return sorted(class_table())


def seen_unseen():
    """(seen, unseen) class names, each sorted."""
    names = class_names()
    return [c for c in names if c not in UNSEEN], sorted(UNSEEN)


def cross_dataset_name(shape):
    """A class's name in the --cross_dataset variant: arrow_thin -> Arrow Thin."""
    return shape.replace("_", " ").title()


def dataset_classes(cross_dataset):
    """(seen, unseen): each a sorted list of (class name, shape) of the demo, or of its --cross_dataset variant."""
    seen, unseen = seen_unseen()
    if cross_dataset:
        seen = CROSS_SEEN
    name = cross_dataset_name if cross_dataset else str
    return (sorted((name(c), c) for c in seen), sorted((name(c), c) for c in unseen))


@lru_cache(maxsize=None)
def canonical_shape(name):
    """The class's contours, centred on their bounding box and scaled so its longer side is 2."""
    contours = class_table()[name][2]
    allp = np.concatenate([p for p, _ in contours])
    lo, hi = allp.min(0), allp.max(0)
    centre, scale = (lo + hi) / 2, 2.0 / (hi - lo).max()
    return tuple(((p - centre) * scale, hole) for p, hole in contours)


# ----------------------------------------------------------------------------- embeddings

def _area(p):
    return 0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], -1)) - np.dot(p[:, 1], np.roll(p[:, 0], -1)))


def _perimeter(p):
    return float(np.hypot(*(np.roll(p, -1, 0) - p).T).sum())


def _hull(p):
    """Convex hull (monotone chain), counter-clockwise."""
    pts = sorted(map(tuple, p))

    def half(seq):
        out = []
        for q in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (q[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (q[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(q)
        return out

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


def _corner_mask(p):
    """True where the closed contour p turns by more than CORNER_DEG."""
    d_in = p - np.roll(p, 1, 0)
    d_out = np.roll(p, -1, 0) - p
    turn = np.arctan2(d_out[:, 1], d_out[:, 0]) - np.arctan2(d_in[:, 1], d_in[:, 0])
    turn = np.abs((turn + np.pi) % (2 * np.pi) - np.pi)
    return turn > math.radians(CORNER_DEG)


def shape_descriptors(name):
    """Family-free geometry of a class: (corners, solidity, compactness, elongation, holes)."""
    contours = canonical_shape(name)
    outer = [p for p, hole in contours if not hole]
    area = sum(_area(p) for p in outer) - sum(_area(p) for p, hole in contours if hole)
    perim = sum(_perimeter(p) for p, _ in contours)
    hull = _area(_hull(np.concatenate(outer)))
    img = Image.new("L", (128, 128), 0)  # second moments of the filled region, from a raster
    draw = ImageDraw.Draw(img)
    for p, hole in contours:
        draw.polygon([tuple(q) for q in (p * 60 + 64).tolist()], fill=0 if hole else 1)
    yy, xx = np.nonzero(np.asarray(img))
    ev = np.linalg.eigvalsh(np.cov(np.stack([xx, yy]).astype(float)))
    corners = sum(int(_corner_mask(p).sum()) for p, _ in contours)
    return np.array([
        min(corners, 24) / 24,
        area / hull,
        4 * np.pi * area / perim ** 2,
        math.sqrt(ev[0] / ev[1]),
        float(sum(hole for _, hole in contours)),
    ])


def class_embeddings(names):
    """(len(names), D) float32, L2-normalised: [family one-hot, family params, geometry].

    Classes of one family share the one-hot part and differ in their parameters, so e.g.
    hexagon lies between pentagon and heptagon; the geometry part (corner count, solidity,
    compactness, elongation, holes) relates families to each other (star5 is spikier than
    pentagon, ring has a hole like gear).
    """
    table = class_table()
    families = sorted({table[c][0] for c in table})
    rows = []
    for c in names:
        family, params, _ = table[c]
        onehot = np.zeros(len(families))
        onehot[families.index(family)] = 1.0
        rows.append(np.concatenate([onehot, 0.6 * np.asarray(params, float),
                                    0.6 * shape_descriptors(c)]))
    emb = np.stack(rows)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32)


# ----------------------------------------------------------------------------- drawing

def _placement(rng, contours, canvas, max_rot, scale_range, max_shift):
    """Random similarity transform (plus slight stretch) mapping unit coords to canvas pixels.

    The shape's longer side (2 units) becomes scale * canvas pixels, shrunk if the rotated
    shape would not fit; y is flipped so that shapes stand upright in the image.
    """
    theta = math.radians(rng.uniform(-max_rot, max_rot))
    scale = rng.uniform(*scale_range)
    stretch = math.exp(rng.uniform(-0.06, 0.06))
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    lin = rot @ np.diag([stretch, 1 / stretch])
    allp = np.concatenate([p for p, _ in contours]) @ lin.T
    lo, hi = allp.min(0), allp.max(0)
    k = min(scale * canvas / 2, 0.94 * canvas / (hi - lo).max())
    room = np.maximum((canvas - k * (hi - lo)) / 2 - 0.02 * canvas, 0)
    shift = rng.uniform(-1, 1, 2) * np.minimum(room, max_shift * canvas)
    centre = (lo + hi) / 2
    mat = np.diag([k, -k]) @ lin  # (2, 2), unit coords -> pixels (y down)
    offset = canvas / 2 + shift - np.array([k, -k]) * centre

    def apply(p):
        return p @ mat.T + offset

    return apply


def _strokes(contour, rng):
    """Split a closed contour at its corners into pen strokes: [(points, closed)]."""
    idx = np.flatnonzero(_corner_mask(contour))
    n = len(contour)
    if len(idx) == 0:
        start = int(rng.integers(n))
        order = (start + np.arange(n + 1)) % n
        return [(contour[order], True)]
    out = []
    for a, b in zip(idx, np.roll(idx, -1)):
        length = (b - a) % n or n
        out.append((contour[(a + np.arange(length + 1)) % n], False))
    return out


def _end_extension(rng):
    """How far a stroke runs past its corner (>0 overshoot, <0 a small gap), in units."""
    r = rng.random()
    if r < 0.3:
        return rng.uniform(0.04, 0.12)
    if r < 0.4:
        return -rng.uniform(0.03, 0.08)
    return rng.uniform(-0.015, 0.025)


def _wobbly(poly, closed, rng, shake):
    """Resample a polyline by arc length and add a hand's wobble; returns ((M, 2), s)."""
    seg = np.diff(poly, axis=0)
    seglen = np.hypot(seg[:, 0], seg[:, 1])
    keep = np.concatenate([[True], seglen > 1e-9])
    poly, cum = poly[keep], np.concatenate([[0.0], np.cumsum(seglen[seglen > 1e-9])])
    total = cum[-1]
    if closed:
        s0, s1 = 0.0, total + rng.uniform(-0.08, 0.15)
    else:
        s0, s1 = -_end_extension(rng), total + _end_extension(rng)
    s = np.linspace(s0, s1, max(3, int(math.ceil((s1 - s0) / 0.05)) + 1))
    sw = np.mod(s, total) if closed else np.clip(s, 0, total)
    pts = np.stack([np.interp(sw, cum, poly[:, 0]), np.interp(sw, cum, poly[:, 1])], 1)
    if not closed:
        t0 = (poly[1] - poly[0]) / np.linalg.norm(poly[1] - poly[0])
        t1 = (poly[-1] - poly[-2]) / np.linalg.norm(poly[-1] - poly[-2])
        pts += np.minimum(s, 0)[:, None] * t0 + np.maximum(s - total, 0)[:, None] * t1
    tang = np.empty_like(pts)
    tang[1:-1] = pts[2:] - pts[:-2]
    tang[0], tang[-1] = pts[1] - pts[0], pts[-1] - pts[-2]
    tang /= np.hypot(tang[:, 0], tang[:, 1])[:, None] + 1e-12
    normal = np.stack([-tang[:, 1], tang[:, 0]], 1)
    # wobble: three sines of 1, 2 and 3 times a random base frequency (cycles per unit)
    k = np.arange(1.0, 4.0)[:, None]
    amp = rng.uniform(0.5, 1.0, (3, 1))
    freq = rng.uniform(0.3, 0.9, (3, 1))
    phase = rng.uniform(0, 2 * np.pi, (3, 1))
    off = (shake * amp / k * np.sin(2 * np.pi * k * freq * s + phase)).sum(0)
    u = (s - s0) / (s1 - s0)
    pts = pts + off[:, None] * normal
    if not closed:
        pts += rng.normal(0, 0.025) * min(total, 1.0) * np.sin(np.pi * u)[:, None] * normal
        d0, d1 = rng.normal(0, 0.015, 2), rng.normal(0, 0.015, 2)
        pts += (1 - u)[:, None] * d0 + u[:, None] * d1
    return pts, s


def _draw_stroke(draw, xy, widths, fill, chunk=4):
    """Polyline whose width changes every `chunk` segments, with round caps between chunks.

    Strokes never turn sharply (they are split at corners), so plain joints leave no gaps.
    """
    xy = [tuple(q) for q in xy.tolist()]
    widths = widths.tolist()
    for a in range(0, len(xy) - 1, chunk):
        w = max(1, round(widths[a]))
        draw.line(xy[a:a + chunk + 1], fill=fill, width=w)
        if w >= 2:
            x, y = xy[a]
            draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=fill)
    x, y = xy[-1]
    r = widths[-1] / 2
    draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def photo_pose(name, rng, size):
    """The placement render_photo draws with when given the same fresh generator (its first draws)."""
    return _placement(rng, canonical_shape(name), size * SUPERSAMPLE, 45, (0.45, 0.85), 0.12)


def render_sketch(name, rng, size, pose=None):
    """A hand-drawn-looking outline of class `name`: mode L, dark strokes on white. With ``pose`` (photo_pose of
    a photo) the outline is traced in that photo's placement; the sketch's own random draws are unchanged."""
    canvas = size * SUPERSAMPLE
    contours = canonical_shape(name)
    apply = _placement(rng, contours, canvas, 20, (0.6, 0.9), 0.08)
    apply = pose or apply
    img = Image.new("L", (canvas, canvas), 255)
    draw = ImageDraw.Draw(img)
    shake = rng.uniform(0.01, 0.03)
    width = rng.uniform(1.0, 2.0) * size / 64 * SUPERSAMPLE
    ink = int(rng.integers(0, 60))
    for contour, _ in contours:
        for poly, closed in _strokes(contour, rng):
            for _retrace in range(2 if rng.random() < 0.1 else 1):  # sometimes drawn twice
                pts, s = _wobbly(poly, closed, rng, shake)
                w = width * rng.uniform(0.8, 1.2) * (
                    1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * s + rng.uniform(0, 7)))
                fill = int(np.clip(ink + rng.integers(-15, 16), 0, 90))
                _draw_stroke(draw, apply(pts), w, fill)
    return img.resize((size, size), Image.LANCZOS)


@lru_cache(maxsize=4)
def _grid(canvas):
    yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float32)
    return xx, yy


def _hsv(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255


def _luma(c):
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _chaikin(p, iters=2):
    for _ in range(iters):
        q = np.roll(p, -1, 0)
        p = np.stack([0.75 * p + 0.25 * q, 0.25 * p + 0.75 * q], 1).reshape(-1, 2)
    return p


def _background(rng, canvas, px, c1, c2):
    """(C, C, 3) two-colour linear gradient with low-contrast blobs, lines and border patches."""
    xx, yy = _grid(canvas)
    a = rng.uniform(0, 2 * np.pi)
    t = ((xx - canvas / 2) * math.cos(a) + (yy - canvas / 2) * math.sin(a)) / canvas + 0.5
    t = np.clip(t, 0, 1)[..., None]
    bg = c1 * (1 - t) + c2 * t
    img = Image.fromarray(bg.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        cx, cy = rng.uniform(0, canvas, 2)
        base = bg[int(cy), int(cx)]
        direction = rng.normal(size=3)
        colour = base + direction / np.linalg.norm(direction) * rng.uniform(15, 60)
        fill = tuple(int(v) for v in colour.clip(0, 255))
        kind = rng.integers(3)
        if kind == 0:  # irregular blob
            r = rng.uniform(0.06, 0.25) * canvas
            ang = np.sort(rng.uniform(0, 2 * np.pi, 9))
            rad = r * rng.uniform(0.6, 1.3, 9)
            pts = _chaikin(np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1))
            draw.polygon([tuple(q) for q in pts.tolist()], fill=fill)
        elif kind == 1:  # line
            b = rng.uniform(0, np.pi)
            half = rng.uniform(0.3, 0.8) * canvas
            dx, dy = half * math.cos(b), half * math.sin(b)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fill,
                      width=max(1, round(rng.uniform(1, 4) * px)))
        else:  # large rotated patch centred on the border, so never a whole rectangle
            w, h = rng.uniform(0.25, 0.6, 2) * canvas
            side = int(rng.integers(4))
            cx, cy = ((0, cy), (canvas, cy), (cx, 0), (cx, canvas))[side]
            b = rng.uniform(0, np.pi)
            corners = np.array([(-w, -h), (w, -h), (w, h), (-w, h)])
            rot = np.array([[math.cos(b), -math.sin(b)], [math.sin(b), math.cos(b)]])
            pts = corners @ rot.T + (cx, cy)
            draw.polygon([tuple(q) for q in pts.tolist()], fill=fill)
    return np.asarray(img, np.float32)


def _texture(rng, canvas, px, ca, cb, box):
    """(C, C, 3) fill: solid, stripes, checker, gradient or speckle, with soft shading."""
    xx, yy = _grid(canvas)
    kind = int(rng.integers(5))
    a = rng.uniform(0, np.pi)
    u = xx * math.cos(a) + yy * math.sin(a)
    if kind == 0:
        tex = np.broadcast_to(ca, (canvas, canvas, 3))
    elif kind == 1:
        period = rng.uniform(4, 9) * px
        m = (np.mod(u / period, 1.0) < rng.uniform(0.35, 0.6))[..., None]
        tex = np.where(m, ca, cb)
    elif kind == 2:
        cell = rng.uniform(4, 8) * px
        v = yy * math.cos(a) - xx * math.sin(a)
        m = ((np.floor(u / cell) + np.floor(v / cell)) % 2 == 0)[..., None]
        tex = np.where(m, ca, cb)
    elif kind == 3:
        (x0, y0), (x1, y1) = box
        span = max(x1 - x0, y1 - y0, 1.0)
        t = np.clip((u - (x0 * math.cos(a) + y0 * math.sin(a))) / span, 0, 1)[..., None]
        tex = ca * (1 - t) + cb * t
    else:  # speckle: one grey value per output pixel
        step = max(1, round(px))
        n = -(-canvas // step)
        noise = rng.normal(0, rng.uniform(18, 35), (n, n, 1)).astype(np.float32)
        tex = ca + np.repeat(np.repeat(noise, step, 0), step, 1)[:canvas, :canvas]
    shade = rng.uniform(0.0, 0.25) / canvas  # brighter along a random direction
    b = rng.uniform(0, 2 * np.pi)
    light = 1 + shade * ((xx - canvas / 2) * math.cos(b) + (yy - canvas / 2) * math.sin(b))
    return tex * light[..., None]


def _contrasting_background(rng, ca, cb):
    """Two background colours whose mean differs clearly from the object's colours."""
    fills = (ca, (ca + cb) / 2)
    for _ in range(20):
        h = rng.uniform(0, 1)
        c1 = _hsv(h, rng.uniform(0.05, 0.5), rng.uniform(0.25, 0.95))
        c2 = _hsv(h + rng.uniform(-0.15, 0.15), rng.uniform(0.05, 0.5), rng.uniform(0.25, 0.95))
        mean = (c1 + c2) / 2
        if all(np.linalg.norm(mean - f) > 110 and abs(_luma(mean) - _luma(f)) > 35
               for f in fills):
            return c1, c2
    v = 0.2 if _luma(ca) > 128 else 0.92
    return _hsv(h, 0.2, v), _hsv(h + 0.05, 0.2, v)


def render_photo(name, rng, size):
    """Class `name` filled with a coloured texture on a cluttered background: RGB.

    The silhouette is drawn at 4x and box-reduced to 2x, where it is composited with the
    background and texture; the result is downsampled to `size` with LANCZOS.
    """
    ratio = SUPERSAMPLE // PHOTO_SUPERSAMPLE
    canvas = size * PHOTO_SUPERSAMPLE
    px = size / 64 * PHOTO_SUPERSAMPLE  # one pixel of a 64 px image, at the working scale
    contours = canonical_shape(name)
    apply = photo_pose(name, rng, size)
    xy = [(apply(p), hole) for p, hole in contours]  # at SUPERSAMPLE scale

    ca = _hsv(rng.uniform(0, 1), rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0))
    if rng.random() < 0.5:
        cb = _hsv(rng.uniform(0, 1), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))
    else:
        cb = ca * rng.uniform(0.35, 0.65) if rng.random() < 0.5 else ca + (255 - ca) * 0.6
    c1, c2 = _contrasting_background(rng, ca, cb)
    bg = _background(rng, canvas, px, c1, c2)

    mask_img = Image.new("L", (size * SUPERSAMPLE,) * 2, 0)
    draw = ImageDraw.Draw(mask_img)
    for p, hole in xy:
        draw.polygon([tuple(q) for q in p.tolist()], fill=0 if hole else 255)
    mask = np.asarray(mask_img.reduce(ratio), np.float32)[..., None] / 255  # (C, C, 1)

    if rng.random() < 0.3:  # soft cast shadow
        dy, dx = (int(round(v * px)) for v in rng.integers(-3, 4, 2))
        bg = bg * (1 - 0.35 * np.roll(mask, (dy, dx), (0, 1)))

    allp = np.concatenate([p for p, _ in xy]) / ratio
    tex = _texture(rng, canvas, px, ca, cb, (allp.min(0), allp.max(0)))
    img = bg + (tex - bg) * mask

    if rng.random() < 0.35:  # darker outline
        line_img = Image.new("L", (canvas, canvas), 0)
        ldraw = ImageDraw.Draw(line_img)
        width = max(1, round(rng.uniform(0.8, 1.6) * px))
        for p, _ in xy:
            closed = np.concatenate([p, p[:1]]) / ratio
            ldraw.line([tuple(q) for q in closed.tolist()], fill=255, width=width, joint="curve")
        line = np.asarray(line_img, np.float32)[..., None] / 255
        img = img + (ca * rng.uniform(0.2, 0.45) - img) * line

    out = Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")
    return out.resize((size, size), Image.LANCZOS)


def image_rng(seed, name, domain, index):
    """The generator for one image; independent of worker count and of the class list."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), domain, index])


def sketch_file_name(name, i, sketches, photos):
    """Sketch i's file name, in Sketchy's pairing convention: <photo stem>-<j>.png names the photo it pairs with.

    The sketches are spread over the photos in order, ceil(sketches / photos) to a photo: with as many
    sketches as photos, sketch i is <class>_<i>-1.png, the partner of photo <class>_<i>.jpg (and the files
    sort in the order of i). With --traced_pairs (the default) each sketch is traced in its photo's pose, an
    instance pair as Sketchy's; with --no-traced_pairs it is drawn in a pose of its own and the pair carries the
    class only.
    """
    per_photo = -(-sketches // photos)
    return f"{name}_{i // per_photo:04d}-{i % per_photo + 1}.png"


def _render_job(job):
    root, name, shape, domain, start, stop, seed, size, sketches, photos, traced = job
    sub = "sketches" if domain == SKETCH else "photos"
    folder = Path(root) / sub / name
    for i in range(start, stop):
        rng = image_rng(seed, name, domain, i)
        if domain == SKETCH:
            partner = image_rng(seed, name, PHOTO, i // -(-sketches // photos))  # the paired photo's generator
            pose = photo_pose(shape, partner, size) if traced else None
            render_sketch(shape, rng, size, pose).save(folder / sketch_file_name(name, i, sketches, photos))
        else:
            render_photo(shape, rng, size).save(folder / f"{name}_{i:04d}.jpg", quality=90)
    return stop - start


def _fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _check_target(out):
    if not out.exists():
        return
    if not out.is_dir():
        _fail(f"{out} exists and is not a folder; choose another --output_dir")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        _fail(f"{out} exists and is not a demo dataset (no {MARKER} marker); "
              "choose another --output_dir or remove that folder")


def write_dataset(root, args):
    """Write the whole dataset into the folder `root`, which must not exist yet."""
    seen, unseen = dataset_classes(args.cross_dataset)
    for sub in ("sketches", "photos"):
        for c, _ in seen + unseen:
            (root / sub / c).mkdir(parents=True)
    jobs = []
    chunk = 20
    for c, shape in sorted(seen + unseen):
        for domain, count in ((SKETCH, args.sketches_per_class), (PHOTO, args.photos_per_class)):
            for start in range(0, count, chunk):
                jobs.append((str(root), c, shape, domain, start, min(start + chunk, count),
                             args.seed, args.image_size, args.sketches_per_class, args.photos_per_class,
                             args.traced_pairs))
    if args.workers > 1:
        # workers ignore Ctrl-C; the parent stops them when it leaves the `with` block
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.workers, initializer=signal.signal,
                      initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
            for _ in pool.imap_unordered(_render_job, jobs):
                pass
    else:
        for job in jobs:
            _render_job(job)
    for split, classes in (("train", seen), ("test", unseen)):
        (root / f"{split}_labels.txt").write_text("".join(c + "\n" for c, _ in classes))
        np.save(root / f"{split}_embeddings.npy", class_embeddings([shape for _, shape in classes]))
    (root / MARKER).write_text(json.dumps(vars(args), indent=2, sort_keys=True) + "\n")
    return len(seen), len(unseen)


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Procedurally drawn demo dataset for zero-shot SBIR",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", "--out", type=str, required=True,
                        help="output folder; replaced atomically if it holds a previous demo dataset "
                             "(--out is its older name)")
    parser.add_argument("--seed", type=int, default=0, help="non-negative seed; same seed, same bytes")
    parser.add_argument("--image_size", type=int, default=64, help="side of every image, in pixels")
    parser.add_argument("--sketches_per_class", type=int, default=60, help="sketches of each class")
    parser.add_argument("--photos_per_class", type=int, default=60, help="photos of each class")
    parser.add_argument("--workers", type=int, default=2, help="processes; 1 renders in-process")
    parser.add_argument("--traced_pairs", action=argparse.BooleanOptionalAction, default=True,
                        help="draw each sketch in the pose of the photo its name pairs it with (instance pairs, "
                             "as Sketchy's, for evaluate.py --task fg); --no-traced_pairs draws each sketch in a "
                             "pose of its own (the demo's images before the fine-grained setting)")
    parser.add_argument("--cross_dataset", action=argparse.BooleanOptionalAction, default=False,
                        help="the second dataset of a cross-dataset evaluation: the demo's 10 unseen classes and 10 "
                             "of its seen ones, named in another style (Arrow Thin for arrow_thin) and drawn anew")
    return parser


def main(args):
    start = time.time()
    if args.seed < 0:
        _fail(f"--seed must be >= 0, got {args.seed}")
    if args.image_size < 16:
        _fail(f"--image_size must be >= 16, got {args.image_size}")
    if args.sketches_per_class < 1 or args.photos_per_class < 1:
        _fail("--sketches_per_class and --photos_per_class must be >= 1")
    if args.workers < 1:
        _fail(f"--workers must be >= 1, got {args.workers}")
    out = Path(args.output_dir)
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        n_seen, n_unseen = write_dataset(tmp, args)
        if out.exists():  # a directory cannot be renamed over a non-empty one: move it aside
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old.exists() and not out.exists():
                os.replace(old, out)
            raise
    except KeyboardInterrupt:
        print(f"interrupted; {out} was left as it was", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    n = n_seen + n_unseen
    print(f"demo data: {n} classes ({n_seen} seen / {n_unseen} unseen), "
          f"{n * args.sketches_per_class} sketches, {n * args.photos_per_class} photos "
          f"-> {out} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
