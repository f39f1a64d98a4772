"""Procedural demo datasets written in the real COCO and ADE20K on-disk formats.

No COCO/ADE20K image can be downloaded in this project's environment, so the demo teachers
are trained on small procedural sets that the OpenMMLab dataset classes read unchanged:

``out_dir/coco``  (mmdet ``CocoDataset``)::

    train/000000.png ...  val/000000.png ...
    annotations/instances_train.json  annotations/instances_val.json

  Instance segmentation of :data:`COCO_CLASSES`. The class of an object is its SHAPE; colour
  and texture (solid, stripes, checker, mottled noise, shading) are drawn independently of
  the class, objects are rotated, scaled over the COCO small/medium/large range, occlude each
  other (every annotated object keeps at least half of its area visible) and sit on cluttered
  backgrounds (gradients, smooth and pixel noise, distractor lines and arcs). ``segmentation``
  is the visible mask as compressed COCO RLE, ``bbox``/``area`` are computed from that mask,
  ``iscrowd`` is 0.

``out_dir/ade``  (mmseg ``BaseSegDataset`` with ``reduce_zero_label=True``, ADE20K layout)::

    images/training/000000.jpg ...      annotations/training/000000.png ...
    images/validation/000000.jpg ...    annotations/validation/000000.png ...

  Semantic segmentation: the image is split into 2-4 wiggly regions of textured "stuff"
  (:data:`ADE_STUFF_CLASSES`, told apart by texture, colours random) with shape "things" on
  top (:data:`ADE_THING_CLASSES`, told apart by shape). As in ADE20K, label value 0 means
  "other" (thin clutter lines, ignored after ``reduce_zero_label``) and values 1..K are the
  classes of :data:`ADE_CLASSES`. mmseg's ``ADE20KDataset`` itself cannot take these
  classes (it only accepts a subset of its 150 names), so configs use ``BaseSegDataset``
  with ``metainfo=dict(classes=ADE_CLASSES, palette=ADE_PALETTE)``, ``img_suffix='.jpg'``,
  ``seg_map_suffix='.png'`` and ``reduce_zero_label=True``.

Every image is drawn from its own random generator seeded by ``(seed, dataset, split,
index)``, so the output does not depend on the number of worker processes, and the same
seed gives byte-identical files. Files are written atomically (temporary file + rename);
``manifest.json`` is written last, with the generation settings and the SHA-256 of every
file, and :func:`generate_demo_data` skips the work when the folder already matches it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import fcntl
import io
import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    'COCO_CLASSES', 'COCO_PALETTE', 'ADE_STUFF_CLASSES', 'ADE_THING_CLASSES', 'ADE_CLASSES',
    'ADE_PALETTE', 'DemoDataConfig', 'generate_demo_data', 'demo_data_is_current',
    'render_coco_sample', 'render_ade_sample', 'mask_to_rle', 'GENERATOR_VERSION',
]

#: Bumped whenever the drawing code changes, so stale folders get regenerated.
GENERATOR_VERSION = 2

COCO_CLASSES = ('disc', 'square', 'triangle', 'ring', 'star', 'cross', 'ellipse')
COCO_PALETTE = [(220, 20, 60), (0, 128, 255), (255, 170, 0), (0, 200, 120), (160, 60, 220),
                (250, 250, 60), (90, 200, 250)]

ADE_STUFF_CLASSES = ('gradient', 'stripes', 'checker', 'dots', 'waves', 'grain')
ADE_THING_CLASSES = ('disc', 'square', 'triangle', 'ring', 'star', 'cross')
#: Label value ``i + 1`` in the annotation PNGs is ``ADE_CLASSES[i]``; 0 is "other".
ADE_CLASSES = ADE_STUFF_CLASSES + ADE_THING_CLASSES
ADE_PALETTE = [(120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
               (120, 120, 80), (220, 20, 60), (0, 128, 255), (255, 170, 0), (0, 200, 120),
               (160, 60, 220), (250, 250, 60)]

_COCO_SPLITS = ('train', 'val')
_ADE_SPLITS = {'train': 'training', 'val': 'validation'}
_DATASET_IDS = {'coco': 1, 'ade': 2}
_SPLIT_IDS = {'train': 1, 'val': 2}
_MANIFEST = 'manifest.json'
_IN_PROGRESS = '.generation_in_progress'

# Object radius ranges, relative to min(height, width): at 256 px the COCO objects span
# COCO's small (< 32^2 px), medium and large areas; the segmentation things are larger.
_COCO_RADIUS_RANGE = (0.04, 0.30)
_ADE_RADIUS_RANGE = (0.06, 0.28)
# Every annotated object keeps at least this fraction of its area visible.
_MIN_VISIBLE_FRACTION = 0.5
_MIN_OBJECT_AREA = 30  # pixels


@dataclasses.dataclass(frozen=True)
class DemoDataConfig:
    """What :func:`generate_demo_data` produces (recorded in ``manifest.json``)."""
    seed: int = 0
    num_train: int = 1000
    num_val: int = 100
    size: Tuple[int, int] = (256, 256)  # (height, width)

    def __post_init__(self):
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError(f'num_train and num_val must be >= 1, got {self.num_train} and '
                             f'{self.num_val}')
        if len(self.size) != 2 or min(self.size) < 32:
            raise ValueError(f'size must be (height, width) with both >= 32, got {self.size}; '
                             'e.g. --size 256 256')
        object.__setattr__(self, 'size', (int(self.size[0]), int(self.size[1])))

    def num_images(self, split: str) -> int:
        return self.num_train if split == 'train' else self.num_val

    def to_dict(self) -> dict:
        return dict(seed=self.seed, num_train=self.num_train, num_val=self.num_val,
                    size=list(self.size), generator_version=GENERATOR_VERSION)


# --------------------------------------------------------------------------------------
# COCO run-length encoding (written here so generation needs no pycocotools)
# --------------------------------------------------------------------------------------

def _run_lengths(mask: np.ndarray) -> List[int]:
    """Column-major run lengths of a binary mask, starting with a run of zeros."""
    flat = np.asarray(mask, dtype=np.uint8).ravel(order='F')
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0] + runs
    return runs


def mask_to_rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE (``{'size': [h, w], 'counts': str}``) of a binary mask.

    Same encoding as pycocotools' ``mask.encode`` (column-major run lengths, each run after
    the second stored as the difference to the run two before, in 5-bit groups offset by 48).
    """
    chars = []
    runs = _run_lengths(mask)
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return {'size': [int(mask.shape[0]), int(mask.shape[1])], 'counts': ''.join(chars)}


def _mask_bbox(mask: np.ndarray) -> List[float]:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return [float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1)]


# --------------------------------------------------------------------------------------
# Drawing primitives
# --------------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int,
                  channels: int) -> np.ndarray:
    """Bilinearly upsampled random grid: low-frequency noise in [-1, 1], shape (h, w, c)."""
    grid = rng.uniform(-1.0, 1.0, size=(channels, cells + 1, cells + 1)).astype(np.float32)
    planes = [np.asarray(Image.fromarray(g).resize((w, h), Image.BILINEAR))
              for g in grid]
    return np.stack(planes, axis=-1)


def _random_colour(rng: np.random.Generator, avoid: Optional[np.ndarray] = None,
                   min_distance: float = 90.0) -> np.ndarray:
    """A random RGB colour, at least ``min_distance`` (L1) from ``avoid`` when given."""
    colour = rng.uniform(0, 255, size=3)
    for _ in range(20):
        if avoid is None or np.abs(colour - avoid).sum() >= min_distance:
            break
        colour = rng.uniform(0, 255, size=3)
    return colour.astype(np.float32)


def _linear_gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c0, c1 = _random_colour(rng), _random_colour(rng)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xs * math.cos(angle) + ys * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return c0 + (c1 - c0) * t[..., None]


def _draw_distractors(rng: np.random.Generator, img: np.ndarray, num_lines: int,
                      num_arcs: int, max_width: int) -> np.ndarray:
    """Random straight lines and arcs drawn with PIL (deterministic for a given rng)."""
    h, w = img.shape[:2]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(num_lines):
        x0, x1 = rng.uniform(-0.1 * w, 1.1 * w, size=2)
        y0, y1 = rng.uniform(-0.1 * h, 1.1 * h, size=2)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, max_width + 1)))
    for _ in range(num_arcs):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rad = rng.uniform(0.1, 0.5) * min(h, w)
        start = rng.uniform(0, 360)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.arc([cx - rad, cy - rad, cx + rad, cy + rad], start, start + rng.uniform(40, 200),
                 fill=colour, width=int(rng.integers(1, max_width + 1)))
    return np.asarray(pil, dtype=np.float32)


@dataclasses.dataclass
class _Shape:
    kind: str
    cx: float
    cy: float
    radius: float
    angle: float
    param: float  # kind-specific: ring inner radius, ellipse minor axis, cross arm width...


def _sample_shape(rng: np.random.Generator, kind: str, h: int, w: int,
                  radius_range: Tuple[float, float]) -> _Shape:
    """Random pose of a ``kind`` shape; radius log-uniform in ``radius_range`` x min(h, w)."""
    lo, hi = radius_range
    radius = min(h, w) * math.exp(rng.uniform(math.log(lo), math.log(hi)))
    cx = rng.uniform(0.05 * w, 0.95 * w)
    cy = rng.uniform(0.05 * h, 0.95 * h)
    param = {
        'ring': rng.uniform(0.45, 0.65),
        'ellipse': rng.uniform(0.35, 0.6),
        'cross': rng.uniform(0.22, 0.34),
        'star': rng.uniform(0.38, 0.5),
    }.get(kind, 0.0)
    return _Shape(kind, cx, cy, radius, rng.uniform(0, 2 * math.pi), param)


def _inside(kind: str, u: np.ndarray, v: np.ndarray, param: float) -> np.ndarray:
    """Membership in the unit-size shape, in the shape's own (rotated) frame."""
    if kind == 'disc':
        return u * u + v * v <= 1.0
    if kind == 'ellipse':
        return u * u + (v / param) ** 2 <= 1.0
    if kind == 'square':
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if kind == 'triangle':  # equilateral, circumradius 1.1
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            a = math.pi / 2 + 2 * math.pi * k / 3
            inside &= u * math.cos(a) + v * math.sin(a) <= 0.55
        return inside
    if kind == 'ring':
        rr = u * u + v * v
        return (rr <= 1.0) & (rr >= param * param)
    if kind == 'star':  # five points, inner radius `param`
        rho = np.hypot(u, v)
        sector = 2 * math.pi / 5
        t = np.mod(np.arctan2(v, u), sector) / sector
        return rho <= param + (1.05 - param) * np.abs(2 * t - 1)
    if kind == 'cross':
        au, av = np.abs(u), np.abs(v)
        return ((au <= param) & (av <= 0.95)) | ((av <= param) & (au <= 0.95))
    raise ValueError(f'unknown shape kind {kind!r}; expected one of {COCO_CLASSES}')


def _shape_crop(shape: _Shape, h: int, w: int):
    """Window of the image around the shape, with the shape's local coordinates in it."""
    reach = 1.2 * shape.radius
    x0, x1 = max(int(shape.cx - reach), 0), min(int(shape.cx + reach) + 2, w)
    y0, y1 = max(int(shape.cy - reach), 0), min(int(shape.cy + reach) + 2, h)
    if x1 <= x0 or y1 <= y0:
        return None
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xs + 0.5 - shape.cx, ys + 0.5 - shape.cy
    cos, sin = math.cos(shape.angle), math.sin(shape.angle)
    u = (dx * cos + dy * sin) / shape.radius
    v = (-dx * sin + dy * cos) / shape.radius
    inside = _inside(shape.kind, u, v, shape.param)
    return (slice(y0, y1), slice(x0, x1)), u, v, inside


def _object_texture(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, radius: float,
                    base: np.ndarray, styles: Sequence[str]) -> np.ndarray:
    """Fill of an object in its own frame (so textures rotate with the object)."""
    style = styles[int(rng.integers(len(styles)))]
    second = _random_colour(rng, avoid=base, min_distance=60)
    pu, pv = u * radius, v * radius  # pixels, object frame
    if style == 'solid':
        tex = np.broadcast_to(base, u.shape + (3,)).copy()
    elif style == 'stripes':
        period = rng.uniform(4, 12)
        phi = rng.uniform(0, math.pi)
        sel = np.mod(pu * math.cos(phi) + pv * math.sin(phi), period) < period / 2
        tex = np.where(sel[..., None], base, second)
    elif style == 'checker':
        cell = rng.uniform(3, 8)
        sel = (np.floor(pu / cell) + np.floor(pv / cell)) % 2 == 0
        tex = np.where(sel[..., None], base, second)
    elif style == 'mottled':
        tex = base * rng.uniform(0.55, 1.0, size=u.shape + (1,)).astype(np.float32)
    elif style == 'shaded':
        light = rng.uniform(-1, 1, size=2)
        tex = base * (0.75 + 0.25 * np.clip(u * light[0] + v * light[1], -1, 1))[..., None]
    else:
        raise ValueError(f'unknown texture style {style!r}')
    return tex.astype(np.float32)


def _place_objects(rng: np.random.Generator, img: np.ndarray, kinds: Sequence[str],
                   first_class: int, num_objects: int, styles: Sequence[str],
                   radius_range: Tuple[float, float],
                   max_tries: int = 40) -> List[Tuple[int, np.ndarray]]:
    """Paint up to ``num_objects`` shapes into ``img`` (in place), later ones on top.

    A candidate is rejected when it would hide more than half of an already placed object.
    Returns ``(class_index, visible_mask)`` per object. The first object has class
    ``first_class`` (so every class occurs in any split of at least ``len(kinds)`` images).
    """
    h, w = img.shape[:2]
    placed: List[Tuple[int, np.ndarray, int]] = []  # (class, visible mask, full area)
    for _ in range(max_tries):
        if len(placed) == num_objects:
            break
        cls = first_class if not placed else int(rng.integers(len(kinds)))
        shape = _sample_shape(rng, kinds[cls], h, w, radius_range)
        crop = _shape_crop(shape, h, w)
        if crop is None:
            continue
        window, u, v, inside = crop
        area = int(inside.sum())
        if area < _MIN_OBJECT_AREA:
            continue
        full = np.zeros((h, w), dtype=bool)
        full[window] = inside
        if any((vis & ~full).sum() < _MIN_VISIBLE_FRACTION * full_area
               for _, vis, full_area in placed):
            continue
        for _, vis, _ in placed:
            vis &= ~full
        region = img[window]
        base = _random_colour(rng, avoid=region[inside].mean(axis=0))
        tex = _object_texture(rng, u, v, shape.radius, base, styles)
        region[inside] = tex[inside]
        placed.append((cls, full, area))
    return [(cls, vis) for cls, vis, _ in placed]


# --------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------

def _sample_rng(seed: int, dataset: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _DATASET_IDS[dataset], _SPLIT_IDS[split], index])


def render_coco_sample(rng: np.random.Generator, height: int, width: int,
                       first_class: int = 0) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One instance-segmentation image: ``(uint8 HxWx3, [(class_index, visible_mask)])``."""
    img = _linear_gradient(rng, height, width)
    img += 35.0 * _smooth_noise(rng, height, width, int(rng.integers(3, 8)), 3)
    img = _draw_distractors(rng, img, num_lines=int(rng.integers(3, 9)),
                            num_arcs=int(rng.integers(0, 4)), max_width=4)
    objects = _place_objects(rng, img, COCO_CLASSES, first_class,
                             num_objects=int(rng.integers(2, 7)),
                             styles=('solid', 'stripes', 'checker', 'mottled', 'shaded'),
                             radius_range=_COCO_RADIUS_RANGE)
    img += rng.normal(0.0, 4.0, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def _stuff_texture(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    phi = rng.uniform(0, math.pi)
    pu = xs * math.cos(phi) + ys * math.sin(phi)
    pv = -xs * math.sin(phi) + ys * math.cos(phi)
    c0 = _random_colour(rng)
    c1 = _random_colour(rng, avoid=c0, min_distance=120)
    if kind == 'gradient':
        t = (pu - pu.min()) / max(float(pu.max() - pu.min()), 1e-6)
        tex = c0 + (c1 - c0) * t[..., None]
        tex = tex + 12.0 * _smooth_noise(rng, h, w, 3, 3)
    elif kind == 'stripes':
        period = rng.uniform(6, 16)
        tex = np.where((np.mod(pu, period) < period / 2)[..., None], c0, c1)
    elif kind == 'checker':
        cell = rng.uniform(6, 14)
        tex = np.where(((np.floor(pu / cell) + np.floor(pv / cell)) % 2 == 0)[..., None],
                       c0, c1)
    elif kind == 'dots':
        period = rng.uniform(8, 16)
        radius = rng.uniform(0.2, 0.35) * period
        du = np.mod(pu, period) - period / 2
        dv = np.mod(pv, period) - period / 2
        tex = np.where((du * du + dv * dv <= radius * radius)[..., None], c1, c0)
    elif kind == 'waves':
        period = rng.uniform(7, 16)
        amp, wavelength = rng.uniform(3, 8), rng.uniform(20, 50)
        s = pu + amp * np.sin(2 * math.pi * pv / wavelength)
        tex = np.where((np.mod(s, period) < period / 2)[..., None], c0, c1)
    elif kind == 'grain':
        tex = c0 + rng.normal(0.0, 40.0, size=(h, w, 3)).astype(np.float32)
    else:
        raise ValueError(f'unknown stuff kind {kind!r}; expected one of {ADE_STUFF_CLASSES}')
    return tex.astype(np.float32)


def render_ade_sample(rng: np.random.Generator, height: int, width: int,
                      first_stuff: int = 0, first_thing: int = 0
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """One semantic-segmentation image: ``(uint8 HxWx3, uint8 HxW labels)``.

    Label value ``i + 1`` is ``ADE_CLASSES[i]``; 0 marks "other" (ignored by mmseg with
    ``reduce_zero_label=True``).
    """
    h, w = height, width
    num_stuff = len(ADE_STUFF_CLASSES)
    num_regions = int(rng.integers(2, 5))
    others = [k for k in rng.permutation(num_stuff).tolist() if k != first_stuff]
    region_classes = [first_stuff] + others[:num_regions - 1]
    # Voronoi cells of random seeds, on coordinates warped by smooth noise (wiggly borders).
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = 0.12 * min(h, w) * _smooth_noise(rng, h, w, 4, 2)
    wy, wx = ys + warp[..., 0], xs + warp[..., 1]
    seeds = rng.uniform(0, 1, size=(num_regions, 2)) * np.array([h, w], dtype=np.float32)
    dist = np.stack([(wy - sy) ** 2 + (wx - sx) ** 2 for sy, sx in seeds])
    region = np.argmin(dist, axis=0)

    img = np.empty((h, w, 3), dtype=np.float32)
    label = np.empty((h, w), dtype=np.uint8)
    for r, cls in enumerate(region_classes):
        sel = region == r
        img[sel] = _stuff_texture(rng, ADE_STUFF_CLASSES[cls], h, w)[sel]
        label[sel] = cls + 1

    objects = _place_objects(rng, img, ADE_THING_CLASSES, first_thing,
                             num_objects=int(rng.integers(2, 6)), styles=('solid', 'shaded'),
                             radius_range=_ADE_RADIUS_RANGE)
    for cls, visible in objects:
        label[visible] = num_stuff + cls + 1

    # Thin "other" clutter (label 0), drawn identically into image and label map.
    pil_img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    pil_label = Image.fromarray(label)
    draw_img, draw_label = ImageDraw.Draw(pil_img), ImageDraw.Draw(pil_label)
    for _ in range(int(rng.integers(0, 4))):
        pts = [tuple(p) for p in (rng.uniform(0, 1, size=(2, 2)) * [w, h]).tolist()]
        width_px = int(rng.integers(1, 4))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw_img.line(pts, fill=colour, width=width_px)
        draw_label.line(pts, fill=0, width=width_px)
    img = np.asarray(pil_img, dtype=np.float32)
    img += rng.normal(0.0, 3.0, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), np.asarray(pil_label).copy()


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------

def _atomic_write(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` via a temporary file + rename; returns its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return hashlib.sha256(data).hexdigest()


def _encode_image(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == 'PNG':
        Image.fromarray(array).save(buf, format='PNG', compress_level=6)
    else:
        Image.fromarray(array).save(buf, format='JPEG', quality=92, subsampling=0)
    return buf.getvalue()


def _coco_task(args) -> Tuple[int, List[dict], Dict[str, str]]:
    out_dir, seed, split, index, (h, w) = args
    rng = _sample_rng(seed, 'coco', split, index)
    img, objects = render_coco_sample(rng, h, w, first_class=index % len(COCO_CLASSES))
    rel = f'coco/{split}/{index:06d}.png'
    digest = _atomic_write(Path(out_dir) / rel, _encode_image(img, 'PNG'))
    anns = [dict(category_id=cls + 1, segmentation=mask_to_rle(mask),
                 area=int(mask.sum()), bbox=_mask_bbox(mask), iscrowd=0)
            for cls, mask in objects]
    return index, anns, {rel: digest}


def _ade_task(args) -> Tuple[int, List[int], Dict[str, str]]:
    out_dir, seed, split, index, (h, w) = args
    rng = _sample_rng(seed, 'ade', split, index)
    img, label = render_ade_sample(rng, h, w, first_stuff=index % len(ADE_STUFF_CLASSES),
                                   first_thing=index % len(ADE_THING_CLASSES))
    folder = _ADE_SPLITS[split]
    rel_img = f'ade/images/{folder}/{index:06d}.jpg'
    rel_ann = f'ade/annotations/{folder}/{index:06d}.png'
    digests = {rel_img: _atomic_write(Path(out_dir) / rel_img, _encode_image(img, 'JPEG')),
               rel_ann: _atomic_write(Path(out_dir) / rel_ann, _encode_image(label, 'PNG'))}
    counts = np.bincount(label.ravel(), minlength=len(ADE_CLASSES) + 1).tolist()
    return index, counts, digests


def _run_tasks(fn, tasks: list, workers: int) -> list:
    if workers <= 1 or len(tasks) < 8:
        return [fn(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, tasks, chunksize=max(1, len(tasks) // (8 * workers))))


def _coco_json(split: str, size: Tuple[int, int], results: list) -> dict:
    h, w = size
    images, annotations = [], []
    for index, anns, _ in sorted(results, key=lambda r: r[0]):
        image_id = index + 1
        images.append(dict(id=image_id, file_name=f'{index:06d}.png', height=h, width=w))
        for ann in anns:
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, **ann))
    return dict(
        info=dict(description=f'mimiq_mm procedural demo set ({split})',
                  version=str(GENERATOR_VERSION)),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=[dict(id=i + 1, name=name, supercategory='shape')
                    for i, name in enumerate(COCO_CLASSES)])


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def _listed_files(out_dir: Path) -> set:
    files = set()
    for sub in ('coco', 'ade'):
        root = out_dir / sub
        if root.is_dir():
            files.update(p.relative_to(out_dir).as_posix() for p in root.rglob('*')
                         if p.is_file())
    return files


def demo_data_is_current(out_dir, config: DemoDataConfig = DemoDataConfig()) -> bool:
    """True when ``out_dir`` holds exactly what ``config`` generates (hashes checked)."""
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get('config') != config.to_dict() or (out_dir / _IN_PROGRESS).exists():
        return False
    files = manifest.get('files', {})
    if set(files) != _listed_files(out_dir):
        return False
    return all(_sha256_file(out_dir / rel) == digest for rel, digest in files.items())


def _prepare_out_dir(out_dir: Path) -> None:
    """Clear what an earlier generation left; refuse to touch a folder that isn't ours."""
    if out_dir.exists() and any(out_dir.iterdir()):
        ours = (out_dir / _MANIFEST).exists() or (out_dir / _IN_PROGRESS).exists()
        if not ours:
            raise FileExistsError(
                f'{out_dir} is not empty and holds no {_MANIFEST} from make_demo_data.py; '
                'refusing to overwrite it. Pass an empty or new folder, e.g. '
                '`--out data/demo`.')
        for sub in ('coco', 'ade'):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
        (out_dir / _MANIFEST).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _IN_PROGRESS).write_text('generation started; not finished\n')


def generate_demo_data(out_dir, config: DemoDataConfig = DemoDataConfig(), *,
                       force: bool = False, workers: Optional[int] = None) -> dict:
    """Write the demo COCO and ADE20K-format sets into ``out_dir``; returns the manifest.

    Skips the work (returning the existing manifest with ``'skipped': True``) when the
    folder already matches ``config``, unless ``force``. ``workers`` processes draw the
    images (default: all CPUs, at most 8); the output does not depend on it.
    """
    out_dir = Path(out_dir)
    # Processes asking for the same folder at once (parallel benchmark runs) take turns: the
    # first generates, the others then find the finished set instead of deleting it under it
    with _generation_lock(out_dir):
        if not force and demo_data_is_current(out_dir, config):
            manifest = json.loads((out_dir / _MANIFEST).read_text())
            manifest['skipped'] = True
            return manifest
        return _generate(out_dir, config, workers)


@contextlib.contextmanager
def _generation_lock(out_dir: Path):
    """Exclusive inter-process lock on ``<out_dir>.lock`` (beside the folder, so the folder
    itself stays exactly what the manifest lists)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f'{out_dir.name}.lock', 'a') as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _generate(out_dir: Path, config: DemoDataConfig, workers: Optional[int]) -> dict:
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    start = time.perf_counter()
    _prepare_out_dir(out_dir)
    files: Dict[str, str] = {}
    stats: Dict[str, dict] = {'coco': {}, 'ade': {}}
    for split in _COCO_SPLITS:
        tasks = [(str(out_dir), config.seed, split, i, config.size)
                 for i in range(config.num_images(split))]
        coco_results = _run_tasks(_coco_task, tasks, workers)
        ade_results = _run_tasks(_ade_task, tasks, workers)
        for _, _, digests in coco_results + ade_results:
            files.update(digests)
        coco = _coco_json(split, config.size, coco_results)
        rel = f'coco/annotations/instances_{split}.json'
        files[rel] = _atomic_write(out_dir / rel, json.dumps(coco).encode())
        per_class = np.bincount([a['category_id'] - 1 for a in coco['annotations']],
                                minlength=len(COCO_CLASSES))
        stats['coco'][split] = dict(images=len(coco['images']),
                                    instances=len(coco['annotations']),
                                    instances_per_class=dict(zip(COCO_CLASSES,
                                                                 per_class.tolist())))
        pixels = np.sum([counts for _, counts, _ in ade_results], axis=0)
        stats['ade'][split] = dict(
            images=len(ade_results),
            pixel_fraction=dict(zip(('other',) + ADE_CLASSES,
                                    np.round(pixels / pixels.sum(), 4).tolist())))
    manifest = dict(generator='mimiq_mm.datasets.demo_data', config=config.to_dict(),
                    coco_classes=list(COCO_CLASSES), ade_classes=list(ADE_CLASSES),
                    stats=stats, files=dict(sorted(files.items())))
    _atomic_write(out_dir / _MANIFEST, json.dumps(manifest, indent=1).encode())
    (out_dir / _IN_PROGRESS).unlink()
    manifest.update(skipped=False, seconds=round(time.perf_counter() - start, 2))
    return manifest
