"""Synthetic city: procedurally drawn street scenes written in the Cityscapes format, the built-in data.

The project must train, evaluate and show pictures on a fresh machine with no download (Cityscapes needs a
registration and must not be shown). The scenes are laid out exactly like the official zips unzipped, with
the official label ids, so every other module treats them as the real thing.

Each scene is a street seen by a pinhole camera: road, sidewalks, verges, facades with windows, far
buildings, trees, hedges, cars, persons, poles with signs and lights, sky, and the ego vehicle's bonnet
(void). Colour alone does not tell the class, on purpose (shared greys and greens, any colour for cars
and clothes, per-image exposure, white balance, shadows and noise); shape, position and texture do.

    python synthetic_city.py --out Dataset/synthetic --train 300 --val 60 --size 128x64
"""
import argparse
import json
import os
import sys
from multiprocessing import Pool

import numpy as np
from PIL import Image
from torchvision.datasets import Cityscapes
from tqdm import tqdm

from runtime import DEFAULT_IMAGE_SIZE, UserError, atomic_write, run_cli, size_arg, write_image_atomically

LABEL_ID = {c.name: c.id for c in Cityscapes.classes if c.id >= 0}
ID_COLORS = np.zeros((256, 3), np.uint8)
for _cls in Cityscapes.classes:
    if _cls.id >= 0:
        ID_COLORS[_cls.id] = _cls.color

# Disjoint fake cities per split, like the real release (train, val and test cities differ).
SPLIT_CITIES = {"train": ("pixelburg", "rasterstadt", "voxelheim"), "val": ("meshdorf",), "test": ("polygonia",)}
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
FRAME = 19  # gtFine annotates the 20th frame of each 30-frame snippet: *_000019_*
MANIFEST = "synthetic.json"
WHOLE = (slice(None), slice(None))  # the whole canvas, as a box
TRAINING_SEED = 0  # the city training.py generates is data, not a training choice: the same whatever --seed
FORMAT_VERSION = 1  # bump whenever the drawing changes, so old folders are not mixed with new scenes

# Base colours (RGB in [0, 1]) per material. The greys of facades, asphalt, paving, poles and
# overcast sky overlap, and so do the greens of trees and grass, so colour alone is ambiguous.
FACADE_COLORS = np.array([[0.55, 0.55, 0.55], [0.42, 0.42, 0.44], [0.70, 0.68, 0.64], [0.75, 0.66, 0.52],
                          [0.60, 0.38, 0.30], [0.82, 0.80, 0.76], [0.50, 0.46, 0.40], [0.66, 0.70, 0.74]])
ASPHALT_COLORS = np.array([[0.30, 0.30, 0.32], [0.40, 0.40, 0.41], [0.50, 0.49, 0.48], [0.36, 0.34, 0.36]])
PAVING_COLORS = np.array([[0.55, 0.55, 0.55], [0.62, 0.58, 0.54], [0.58, 0.42, 0.38], [0.45, 0.46, 0.47]])
GRASS_COLORS = np.array([[0.30, 0.45, 0.18], [0.42, 0.50, 0.22], [0.55, 0.50, 0.30], [0.25, 0.38, 0.20]])
LEAF_COLORS = np.array([[0.20, 0.35, 0.12], [0.32, 0.45, 0.18], [0.45, 0.48, 0.20], [0.55, 0.40, 0.15]])
SIGN_COLORS = np.array([[0.80, 0.10, 0.10], [0.10, 0.25, 0.70], [0.95, 0.80, 0.10], [0.92, 0.92, 0.92]])
LAMP_COLORS = np.array([[1.00, 0.15, 0.10], [1.00, 0.70, 0.05], [0.20, 1.00, 0.40]])


def _pick(rng, palette, jitter=0.06):
    """A palette colour with a small random shift, so no two objects share an exact colour."""
    return np.clip(palette[rng.integers(len(palette))] + rng.uniform(-jitter, jitter, 3), 0, 1)


def _any_color(rng):
    """Cars and clothes: any colour at all, greys and greens included."""
    if rng.random() < 0.4:
        return np.full(3, rng.uniform(0.05, 0.9))
    return rng.uniform(0.05, 0.95, 3)


def _smooth_noise(rng, height, width, cell):
    """Value noise in [-1, 1]: a coarse random grid bilinearly upsampled by `cell` pixels."""
    cell = max(int(cell), 1)
    rows, cols = height // cell + 2, width // cell + 2
    coarse = Image.fromarray(rng.uniform(-1, 1, (rows, cols)).astype(np.float32))
    return np.asarray(coarse.resize((cols * cell, rows * cell), Image.BILINEAR))[:height, :width]


def _hash01(index):
    """Deterministic pseudo-random numbers in [0, 1) from integer arrays (per-window variation)."""
    return np.modf(np.abs(np.sin(index * 12.9898 + 78.233) * 43758.5453))[0]


def _window(shape, top, bottom, left, right):
    """The clipped pixel box [top, bottom) x [left, right) plus its pixel-centre coordinates, or None."""
    y0, y1 = max(int(np.floor(top)), 0), min(int(np.ceil(bottom)), shape[0])
    x0, x1 = max(int(np.floor(left)), 0), min(int(np.ceil(right)), shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
    return (slice(y0, y1), slice(x0, x1)), ys, xs


class Canvas:
    """The float RGB image, its label ids, and shared noise fields used as textures."""

    def __init__(self, rng, width, height):
        self.width, self.height = width, height
        self.image = np.zeros((height, width, 3), np.float32)
        self.labels = np.zeros((height, width), np.uint8)
        self.grain = rng.standard_normal((height, width)).astype(np.float32)
        self.blotch = _smooth_noise(rng, height, width, height / 40)
        self.cloud = _smooth_noise(rng, height, width, height / 6)

    def paint(self, box, mask, color, label):
        """Colour (an RGB triple or per-pixel array) and label (an id or per-pixel ids) where mask is true."""
        region, labels = self.image[box], self.labels[box]
        mask = np.broadcast_to(mask, labels.shape)
        region[mask] = color if np.ndim(color) == 1 else np.broadcast_to(color, region.shape)[mask]
        labels[mask] = label if np.ndim(label) == 0 else label[mask]

    def textured(self, box, color, grain, blotch):
        """color modulated by the shared fine grain and medium blotches inside box."""
        shade = 1 + grain * self.grain[box] + blotch * self.blotch[box]
        return np.asarray(color, np.float32) * shade[..., None]

    def rect(self, top, bottom, left, right, color, label, grain=0.04, blotch=0.05):
        win = _window(self.labels.shape, top, bottom, left, right)
        if win is not None:
            box, _, _ = win
            self.paint(box, True, self.textured(box, color, grain, blotch), label)

    def ellipse(self, cy, cx, ry, rx, color, label, grain=0.04, blotch=0.05, ragged=0.0):
        """Filled ellipse; `ragged` > 0 frays its outline with the blotch noise (tree crowns)."""
        win = _window(self.labels.shape, cy - ry * (1 + ragged), cy + ry * (1 + ragged),
                      cx - rx * (1 + ragged), cx + rx * (1 + ragged))
        if win is not None:
            box, ys, xs = win
            inside = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 < 1 + ragged * self.blotch[box]
            self.paint(box, inside, self.textured(box, color, grain, blotch), label)


class Street:
    """Pinhole camera over a straight street: ground point (x lateral m, z depth m) -> pixel.

    x is measured from the road's centre line; the camera stands `offset` metres beside it at
    `camera_height`, looking along the street, whose vanishing point is (vanish_x, horizon).
    """

    def __init__(self, rng, width, height):
        self.width, self.height = width, height
        self.horizon = height * rng.uniform(0.38, 0.5)
        self.vanish_x = width * rng.uniform(0.38, 0.62)
        self.focal = width * rng.uniform(0.55, 0.8)
        self.camera_height = rng.uniform(1.3, 1.8)
        self.road_half = rng.uniform(3.0, 5.5)
        self.offset = rng.uniform(-0.6, 0.6) * self.road_half
        self.sidewalk = rng.uniform(1.8, 4.0, 2)  # width left, right
        self.verge = np.where(rng.random(2) < 0.4, rng.uniform(0.8, 2.0, 2), 0.0)  # grass between kerb and paving
        self.end = rng.uniform(50, 160)  # depth of the buildings closing the street

    def inner_edge(self, side):
        """Lateral distance (m) from the centre line to the near edge of the sidewalk on side -1 or 1."""
        return self.road_half + self.verge[int(side > 0)]

    def outer_edge(self, side):
        """Lateral distance (m) from the centre line to the far edge of the sidewalk on side -1 or 1."""
        return self.inner_edge(side) + self.sidewalk[int(side > 0)]

    def scale(self, z):
        """Pixels per metre at depth z."""
        return self.focal / z

    def ground_row(self, z):
        return self.horizon + self.focal * self.camera_height / z

    def column(self, x, z):
        return self.vanish_x + self.focal * (x + self.offset) / z


def _draw_sky(canvas, rng, street, overcast):
    h, w = canvas.labels.shape
    rows = (np.arange(h, dtype=np.float32)[:, None] / max(street.horizon, 1))[..., None]
    if overcast:
        top, bottom = np.full(3, rng.uniform(0.55, 0.8)), np.full(3, rng.uniform(0.7, 0.9))
    elif rng.random() < 0.2:  # dusk
        top, bottom = np.array([0.3, 0.35, 0.6]), np.array([0.95, 0.6, 0.35])
    else:
        top, bottom = np.array([0.25, 0.45, 0.8]), np.array([0.7, 0.8, 0.92])
    gradient = top + (bottom - top) * np.clip(rows, 0, 1)
    clouds = np.clip(canvas.cloud * rng.uniform(0.5, 1.5) + rng.uniform(-0.6, 0.3), 0, 1)[..., None]
    canvas.image[:] = gradient * (1 - clouds) + rng.uniform(0.75, 0.98) * clouds
    canvas.labels[:] = LABEL_ID["sky"]


def _draw_ground(canvas, rng, street, sun_side):
    """Road with lane marks and crossings, sidewalk paving with kerbs, grass verges and grass beyond."""
    h, w = canvas.labels.shape
    first = int(np.ceil(street.horizon))
    ys = np.arange(first, h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    z = street.focal * street.camera_height / (ys - street.horizon)
    x = (xs - street.vanish_x) * z / street.focal - street.offset
    box = (slice(first, h), slice(0, w))
    road_half = street.road_half
    inner = np.where(x < 0, -street.inner_edge(-1), street.inner_edge(1))
    outer = np.where(x < 0, -street.outer_edge(-1), street.outer_edge(1))

    road = canvas.textured(box, _pick(rng, ASPHALT_COLORS), 0.05, 0.08)
    paint_color = np.array([0.9, 0.9, 0.88]) if rng.random() < 0.8 else np.array([0.9, 0.75, 0.2])
    line = 0.12 + 0.04 * rng.random()
    marks = (np.abs(x) < line) & (np.modf(z / rng.uniform(6, 12) + rng.random())[0] < 0.5)
    if rng.random() < 0.6:  # solid edge lines
        marks |= np.abs(np.abs(x) - road_half + 0.4) < line
    if rng.random() < 0.3:  # zebra crossing of 0.5 m stripes
        crossing_z = rng.uniform(8, 30)
        marks |= (np.abs(z - crossing_z) < 2.0) & (np.mod(x, 1.0) < 0.5) & (np.abs(x) < road_half - 0.3)
    road = np.where(marks[..., None], paint_color * (0.85 + 0.1 * canvas.blotch[box][..., None]), road)

    paving = canvas.textured(box, _pick(rng, PAVING_COLORS), 0.05, 0.05)
    tile = rng.uniform(0.4, 0.8)
    grout = (np.modf(np.abs(x) / tile)[0] < 0.08) | (np.modf(z / tile)[0] < 0.08)
    kerb = np.abs(x) < np.abs(inner) + 0.25
    paving = paving * np.where(grout, 0.8, np.where(kerb, 1.15, 1.0))[..., None]
    # grass: blades as vertical streaks, mown in bands across the street
    blades = np.repeat(canvas.grain[::3], 3, axis=0)[box]
    mown = np.where(np.modf(z / rng.uniform(1.5, 4))[0] < 0.5, 1.08, 0.92)
    grass = _pick(rng, GRASS_COLORS) * (mown * (1 + 0.15 * blades + 0.1 * canvas.blotch[box]))[..., None]

    is_road = np.abs(x) < road_half
    is_sidewalk = (np.abs(x) >= np.abs(inner)) & (np.abs(x) < np.abs(outer))
    color = np.where(is_road[..., None], road, np.where(is_sidewalk[..., None], paving, grass))
    labels = np.where(is_road, LABEL_ID["road"], np.where(is_sidewalk, LABEL_ID["sidewalk"], LABEL_ID["terrain"]))
    if sun_side:  # the facade across the street casts a wavy shadow over part of the ground
        reach = rng.uniform(-road_half, road_half + 3) + 0.6 * np.sin(z / rng.uniform(4, 12))
        color = color * np.where(x * sun_side < reach, rng.uniform(0.45, 0.65), 1.0)[..., None]
    canvas.paint(box, True, color, labels.astype(np.uint8))


def _wall_coordinates(street, lateral):
    """Where a vertical wall standing `lateral` metres from the centre line is seen.

    Returns (seen: columns showing it (W,), depth: metres per column (1, W), above: metres above
    the ground at every pixel (H, W)); columns outside the street's length are not seen.
    """
    xs = np.arange(street.width, dtype=np.float32) + 0.5
    with np.errstate(divide="ignore"):
        depth = street.focal * (lateral + street.offset) / (xs - street.vanish_x)
    seen = (depth > 0.5) & (depth < street.end)
    depth = np.where(seen, depth, 1.0)[None, :]
    ys = np.arange(street.height, dtype=np.float32)[:, None] + 0.5
    return seen, depth, street.camera_height - (ys - street.horizon) * depth / street.focal


def _draw_hedge(canvas, rng, street, lateral, light):
    seen, _, above = _wall_coordinates(street, lateral)
    inside = seen & (above > 0) & (above < rng.uniform(0.8, 1.6) + 0.15 * canvas.blotch)
    leaves = canvas.textured(WHOLE, _pick(rng, LEAF_COLORS) * light, 0.25, 0.45)
    canvas.paint(WHOLE, inside, leaves, LABEL_ID["vegetation"])


def _draw_facades(canvas, rng, street, lateral, light):
    """A row of buildings along the street: per-building colour, height, floors and window grid."""
    seen, depth, above = _wall_coordinates(street, lateral)
    count = 16  # buildings of 8-25 m: always longer than the street
    starts = np.concatenate([[0], np.cumsum(rng.uniform(8, 25, count))])
    building = np.clip(np.searchsorted(starts, depth[0], side="right") - 1, 0, count - 1)
    colors = np.stack([_pick(rng, FACADE_COLORS) for _ in range(count)]) * light
    tops, floor = rng.uniform(7, 25, count)[building], rng.uniform(2.8, 3.6, count)[building]
    spacing, glass = rng.uniform(1.6, 3.2, count)[building], rng.uniform(0.35, 0.65, count)[building]
    along, up = (depth[0] - starts[building]) / spacing, above / floor
    window = (np.abs(np.modf(along)[0] - 0.5) < glass / 2) & (np.modf(up)[0] > 0.3) & (np.modf(up)[0] < 0.85)
    window &= (above > 3.0) & (above < tops - 1.0)  # shop floor and roof edge without windows
    pane = 0.35 + 0.5 * _hash01(np.floor(along) * 31 + np.floor(up) * 7 + building * 101)
    wall = canvas.textured(WHOLE, 1.0, 0.04, 0.06) * colors[building][None, :, :]
    wall = np.where(window[..., None], pane[..., None] * np.array([0.45, 0.55, 0.65]) * light, wall)
    canvas.paint(WHOLE, seen & (above > 0) & (above < tops), wall, LABEL_ID["building"])


def _draw_far_buildings(canvas, rng, street, light):
    """Frontal facades closing the street at depth street.end, standing on the horizon."""
    scale = street.scale(street.end)
    ground = street.ground_row(street.end)
    left = 0.0
    while left < canvas.width:
        right = left + rng.uniform(8, 30) * scale
        top = ground - rng.uniform(8, 35) * scale
        canvas.rect(top, ground, left, right, _pick(rng, FACADE_COLORS) * light, LABEL_ID["building"])
        left = right


def _draw_car(canvas, rng, street, x, z):
    s = street.scale(z)
    cx, ground = street.column(x, z), street.ground_row(z)
    half = rng.uniform(0.85, 1.0) * s
    height = rng.uniform(1.4, 1.9) * s
    body = _any_color(rng)
    car = LABEL_ID["car"]
    canvas.rect(ground - 0.12 * s, ground + 0.08 * s, cx - half * 1.1, cx + half * 1.1, np.array([0.08, 0.08, 0.08]),
                LABEL_ID["road"], 0.02, 0.02)  # shadow under the car
    canvas.rect(ground - 0.35 * s, ground, cx - half, cx - half * 0.6, np.array([0.06, 0.06, 0.06]), car)
    canvas.rect(ground - 0.35 * s, ground, cx + half * 0.6, cx + half, np.array([0.06, 0.06, 0.06]), car)
    canvas.rect(ground - height * 0.62, ground - 0.2 * s, cx - half, cx + half, body, car, 0.03, 0.04)
    canvas.rect(ground - height, ground - height * 0.6, cx - half * 0.8, cx + half * 0.8, body * 0.9, car)
    canvas.rect(ground - height * 0.94, ground - height * 0.64, cx - half * 0.7, cx + half * 0.7,
                np.array([0.15, 0.18, 0.22]) + 0.15 * rng.random(), car, 0.03, 0.1)  # rear window
    for side in (-1, 1):
        canvas.rect(ground - height * 0.55, ground - height * 0.45, cx + side * half * 0.95 - 0.2 * s,
                    cx + side * half * 0.95 + 0.2 * s, np.array([0.8, 0.08, 0.05]), car)
    canvas.rect(ground - height * 0.38, ground - height * 0.28, cx - 0.25 * s, cx + 0.25 * s,
                np.array([0.9, 0.9, 0.9]), car)  # number plate


def _draw_person(canvas, rng, street, x, z):
    s = street.scale(z)
    cx, ground = street.column(x, z), street.ground_row(z)
    tall = rng.uniform(1.55, 1.95) * s
    person = LABEL_ID["person"]
    legs, top = _any_color(rng), _any_color(rng)
    stride = rng.uniform(0, 0.15) * s
    for side in (-1, 1):
        leg = cx + side * stride
        canvas.rect(ground - tall * 0.5, ground, leg - 0.09 * s, leg + 0.09 * s, legs, person)
        canvas.rect(ground - tall * 0.8, ground - tall * 0.45, cx + side * 0.25 * s - 0.06 * s,
                    cx + side * 0.25 * s + 0.06 * s, top * 0.9, person)  # arms
    canvas.rect(ground - tall * 0.82, ground - tall * 0.48, cx - 0.2 * s, cx + 0.2 * s, top, person)
    skin = np.array([0.9, 0.72, 0.6]) * rng.uniform(0.4, 1.05)
    canvas.ellipse(ground - tall * 0.9, cx, tall * 0.08, 0.11 * s, skin, person)


def _draw_pole(canvas, rng, street, x, z, light):
    s = street.scale(z)
    cx, ground = street.column(x, z), street.ground_row(z)
    half = max(0.16 * s, 1.5)  # at least 3 px wide, so thin far poles stay learnable at low resolution
    tall = rng.uniform(3.5, 6.5) * s
    metal = np.full(3, rng.uniform(0.3, 0.75)) * light
    canvas.rect(ground - tall, ground, cx - half, cx + half, metal, LABEL_ID["pole"], 0.03, 0.03)
    if rng.random() < 0.5:  # traffic light: dark housing, one lamp lit
        box_h, box_w = 1.2 * s, 0.5 * s
        top = ground - tall
        canvas.rect(top, top + box_h, cx - box_w / 2, cx + box_w / 2, np.full(3, rng.uniform(0.05, 0.3)),
                    LABEL_ID["traffic light"])
        lit = rng.integers(3)
        for k in range(3):
            glow = LAMP_COLORS[k] if k == lit else LAMP_COLORS[k] * 0.2
            canvas.ellipse(top + box_h * (k + 0.5) / 3, cx, 0.15 * s, 0.15 * s, glow, LABEL_ID["traffic light"],
                           0.02, 0)
    if rng.random() < 0.7:  # traffic sign: a plate with a white or coloured face and a rim
        radius = rng.uniform(0.45, 0.65) * s
        cy = ground - tall * rng.uniform(0.55, 0.75)
        rim, face = _pick(rng, SIGN_COLORS, 0.04), _pick(rng, SIGN_COLORS, 0.04)
        sign = LABEL_ID["traffic sign"]
        if rng.random() < 0.5:
            canvas.ellipse(cy, cx, radius, radius, rim, sign, 0.02, 0.02)
            canvas.ellipse(cy, cx, radius * 0.7, radius * 0.7, face, sign, 0.02, 0.02)
        else:
            canvas.rect(cy - radius, cy + radius, cx - radius * 1.2, cx + radius * 1.2, rim, sign, 0.02, 0.02)
            canvas.rect(cy - radius * 0.7, cy + radius * 0.7, cx - radius * 0.9, cx + radius * 0.9, face, sign,
                        0.02, 0.02)


def _draw_tree(canvas, rng, street, x, z, light):
    s = street.scale(z)
    cx, ground = street.column(x, z), street.ground_row(z)
    trunk = rng.uniform(2.0, 3.5) * s
    crown = rng.uniform(1.5, 3.0) * s
    vegetation = LABEL_ID["vegetation"]
    canvas.rect(ground - trunk - crown * 0.5, ground, cx - 0.15 * s, cx + 0.15 * s,
                np.array([0.3, 0.22, 0.15]) * light, vegetation)
    width = crown * rng.uniform(0.8, 1.2)
    canvas.ellipse(ground - trunk - crown * 0.8, cx, crown, width, _pick(rng, LEAF_COLORS) * light, vegetation,
                   0.25, 0.45, ragged=0.35)


def _draw_objects(canvas, rng, street, sides, light):
    """Cars on the road, persons on sidewalks, poles at kerbs, trees beside the paving: far to near."""
    near = street.focal * street.camera_height / (canvas.height - street.horizon) + 1.0
    far = min(street.end, 60)
    objects = []
    for _ in range(rng.integers(1, 6)):
        lane = rng.choice([-0.5, 0.5, -0.8, 0.8]) * street.road_half
        objects.append(("car", lane, near + 2 + (far - near - 2) * rng.random() ** 2))  # squared: more near ones
    for _ in range(rng.integers(1, 6)):
        side = rng.choice([-1, 1])
        objects.append(("person", side * rng.uniform(street.inner_edge(side) + 0.4, street.outer_edge(side) - 0.3),
                        near + 25 * rng.random() ** 2))
    for _ in range(rng.integers(2, 6)):
        side = rng.choice([-1, 1])
        objects.append(("pole", side * (street.road_half + 0.45), rng.uniform(near, 30)))
    for side, kind in zip((-1, 1), sides):
        count = rng.integers(3, 8) if kind == "park" else rng.integers(0, 3)
        for _ in range(count):
            objects.append(("tree", side * (street.outer_edge(side) + rng.uniform(0.8, 6)),
                            rng.uniform(near + 3, far)))
    for kind, x, z in sorted(objects, key=lambda item: -item[2]):
        if kind == "car":
            _draw_car(canvas, rng, street, x, z)
        elif kind == "person":
            _draw_person(canvas, rng, street, x, z)
        elif kind == "pole":
            _draw_pole(canvas, rng, street, x, z, light)
        else:
            _draw_tree(canvas, rng, street, x, z, light)


def _draw_ego_vehicle(canvas, rng):
    """The camera car's bonnet: a dark band with a curved edge at the bottom, void ('ego vehicle')."""
    h, w = canvas.labels.shape
    band = h * rng.uniform(0.07, 0.13)
    xs = (np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1
    edge = h - band + band * 0.5 * xs ** 2
    first = int(edge.min())
    ys = np.arange(first, h, dtype=np.float32)[:, None] + 0.5
    box = (slice(first, h), slice(0, w))
    reflection = (0.15 + 0.25 * np.clip(1 - (ys - first) / band, 0, 1))[..., None]
    color = reflection * _any_color(rng) + canvas.textured(box, 0.05, 0.02, 0.02)
    canvas.paint(box, ys >= edge[None, :], color, LABEL_ID["ego vehicle"])


def _photograph(canvas, rng):
    """Per-image exposure, white balance, slow illumination field, gamma and sensor noise."""
    gain = rng.uniform(0.6, 1.3) * rng.uniform(0.85, 1.15, 3)
    field = 1 + rng.uniform(0.05, 0.25) * canvas.cloud[..., None]
    image = np.clip(canvas.image * gain * field, 0, 1) ** rng.uniform(0.75, 1.3)
    image += rng.uniform(0.01, 0.04) * rng.standard_normal(image.shape, dtype=np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_scene(rng, width, height):
    """One street scene: (image uint8 (H, W, 3), label ids uint8 (H, W)) in Cityscapes label ids."""
    if width < 16 or height < 8:
        raise ValueError(f"synthetic scenes need at least 16x8 pixels, got {width}x{height}")
    canvas = Canvas(rng, width, height)
    street = Street(rng, width, height)
    overcast = rng.random() < 0.35
    sun_side = 0 if overcast else int(rng.choice([-1, 1]))
    sides = [("park" if rng.random() < 0.25 else "buildings") for _ in range(2)]
    _draw_sky(canvas, rng, street, overcast)
    _draw_ground(canvas, rng, street, sun_side)
    _draw_far_buildings(canvas, rng, street, rng.uniform(0.8, 1.0))
    for side, kind in zip((-1, 1), sides):
        light = 1.0 if side == sun_side or overcast else rng.uniform(0.55, 0.75)
        lateral = side * (street.outer_edge(side) + rng.uniform(0, 4))
        if kind == "park":
            _draw_hedge(canvas, rng, street, lateral * 1.5, light)
        else:
            _draw_facades(canvas, rng, street, lateral, light)
    _draw_objects(canvas, rng, street, sides, 1.0 if overcast else rng.uniform(0.7, 1.0))
    _draw_ego_vehicle(canvas, rng)
    return _photograph(canvas, rng), canvas.labels


def sample_name(split, index):
    """(city, stem) of sample `index` of a split, e.g. ('meshdorf', 'meshdorf_000003_000019')."""
    cities = SPLIT_CITIES[split]
    city = cities[index % len(cities)]
    return city, f"{city}_{index // len(cities):06d}_{FRAME:06d}"


def sample_paths(root, split, index):
    """(image, label ids, colour) paths of a sample, named as in the official release."""
    city, stem = sample_name(split, index)
    image = os.path.join(root, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png")
    labels = os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png")
    color = os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_color.png")
    return image, labels, color


def _write_sample(task):
    """Render and write one sample unless all its files exist; True when something was written."""
    root, split, index, width, height, seed = task
    paths = sample_paths(root, split, index)
    if all(os.path.exists(path) for path in paths):
        return False
    rng = np.random.default_rng([seed, SPLIT_CODE[split], index])
    image, labels = render_scene(rng, width, height)
    if split == "test":  # test labels are withheld, as in the official release: placeholders of 0 (unlabeled)
        labels = np.zeros_like(labels)
    write_image_atomically(paths[1], labels)
    write_image_atomically(paths[2], np.dstack([ID_COLORS[labels], np.full_like(labels, 255)]))  # RGBA, as released
    write_image_atomically(paths[0], image)  # last: an image on disk always has its labels
    return True


def settings_for(num_train, num_val, size=DEFAULT_IMAGE_SIZE, seed=0, num_test=0):
    """What synthetic.json records: every argument that changes the files."""
    width, height = (int(v) for v in size)
    return {"generator": "synthetic_city", "format_version": FORMAT_VERSION, "size": [width, height],
            "seed": int(seed), "num_train": int(num_train), "num_val": int(num_val), "num_test": int(num_test)}


def read_settings(root):
    """The settings a synthetic city at `root` was made with, or None when there is none."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            settings = json.load(f)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: not a synthetic city's manifest ({error})") from None
    if not isinstance(settings, dict) or set(settings) != set(settings_for(0, 0)):
        raise UserError(f"{path}: not a synthetic city's manifest (expected the keys {', '.join(settings_for(0, 0))})")
    return settings


def _claim_folder(out_root, settings):
    """Write the manifest into a new folder, or check that an existing one was made with `settings`."""
    path = os.path.join(out_root, MANIFEST)
    existing = read_settings(out_root)
    if existing is not None:
        if existing != settings:
            differences = ", ".join(f"{key}={existing.get(key)} (asked {value})"
                                    for key, value in settings.items() if existing.get(key) != value)
            raise ValueError(f"{path}: this synthetic city was made with {differences}; "
                             "use another output folder or delete this one")
        return
    if any(os.path.exists(os.path.join(out_root, name)) for name in ("leftImg8bit", "gtFine")):
        raise ValueError(f"{out_root}: already holds a dataset not made by synthetic_city.py; "
                         "refusing to write into it")
    atomic_write(path, lambda file: file.write(json.dumps(settings, indent=2).encode()))


def generate(out_root, num_train, num_val, size=DEFAULT_IMAGE_SIZE, seed=0, workers=None, num_test=0):
    """Write a synthetic Cityscapes-format dataset under out_root; returns how many samples were drawn.

    Sample i of a split is drawn from its own generator seeded by (seed, split, i), so the files
    do not depend on the worker count or order. Files already present are kept (re-running
    resumes an interrupted run); `synthetic.json` records the arguments, and a folder made with
    other arguments is refused rather than mixed. Test samples get placeholder labels (all 0).
    """
    width, height = (int(v) for v in size)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    for split, count in counts.items():
        if not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"number of {split} images must be an integer >= 0, got {count!r}")
    if width < 16 or height < 8:
        raise ValueError(f"size must be at least 16x8 pixels, got {width}x{height}")
    _claim_folder(out_root, settings_for(num_train, num_val, size, seed, num_test))
    tasks = [(out_root, split, index, width, height, int(seed))
             for split, count in counts.items() for index in range(count)]
    workers = min(workers or os.cpu_count() or 1, max(len(tasks), 1))
    progress = dict(total=len(tasks), desc=f"synthetic city -> {out_root}", unit="img", leave=False)
    if workers == 1:
        return sum(tqdm(map(_write_sample, tasks), **progress))
    with Pool(workers) as pool:
        return sum(tqdm(pool.imap_unordered(_write_sample, tasks, chunksize=4), **progress))


def prepare_for_training(root, num_train, num_val, size):
    """Generate the synthetic city at root, or finish an interrupted generation (a no-op when complete).
    A city made with other settings, e.g. by `python synthetic_city.py`, is the user's data: used as it is."""
    made_with = read_settings(root)
    if made_with in (None, settings_for(num_train, num_val, size, TRAINING_SEED)):
        generate(root, num_train, num_val, size=size, seed=TRAINING_SEED)
    else:
        width, height = made_with["size"]
        print(f"{root}: using the synthetic city there as it is ({width}x{height}, {made_with['num_train']} train "
              f"and {made_with['num_val']} val images); --synthetic_train and --synthetic_val apply to new cities")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the synthetic city in the Cityscapes layout.")
    parser.add_argument("--out", default="Dataset/synthetic", help="output root (default: %(default)s)")
    parser.add_argument("--train", type=int, required=True, help="number of train images (the demo: 300)")
    parser.add_argument("--val", type=int, required=True, help="number of val images (the demo: 60)")
    parser.add_argument("--test", type=int, default=0, help="number of (unlabelled) test images (default: 0)")
    parser.add_argument("--size", type=size_arg, default=(128, 64), help="WIDTHxHEIGHT (default: 128x64, the demo's size)")
    parser.add_argument("--seed", type=int, default=0, help="scenes are a pure function of it (default: 0)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)

    def run():
        generate(args.out, args.train, args.val, size=args.size, seed=args.seed, workers=args.workers,
                 num_test=args.test)
        width, height = args.size
        print(f"{args.out}: synthetic city of {args.train} train, {args.val} val, {args.test} test images at "
              f"{width}x{height}")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
