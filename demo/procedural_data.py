"""Procedural class-conditional images for the CPU demo: each class has its own shape, colour, position and texture.

Class c (0 <= c < 10) differs from the others in
  - object shape      SHAPES[c] (anti-aliased signed-distance rendering, small random rotation and size);
  - object colour     hue c/10 on the colour wheel (per-image jitter);
  - typical position  a class-specific mean centre on a circle around the image centre (per-image jitter);
  - background        texture kind and spatial frequency (stripes / checker / dots / smooth noise) in a
                      class-specific pair of muted colours, random phase per image.
Everything is drawn up front from one numpy Generator, so `make_images(..., seed)` is deterministic.
"""
import colorsys
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from libs.atomic_io import atomic_write_dir, atomic_write_json

SHAPES = ("circle", "square", "triangle", "diamond", "ring", "plus", "cross", "ellipse", "star", "hexagon")
MAX_CLASSES = len(SHAPES)
# (texture kind, cycles per image) of each class: no two classes share both
TEXTURES = (("hstripes", 3.0), ("checker", 2.0), ("noise", 3.0), ("vstripes", 5.0), ("diagonal", 4.0),
            ("dots", 3.0), ("hstripes", 7.0), ("checker", 4.0), ("vstripes", 2.0), ("noise", 6.0))
NOISE_GRID = 8  # value-noise lattice drawn per image (the class frequency picks how much of it is used)


@dataclass(frozen=True)
class ClassSpec:
    """What makes one class: shape, colour, mean position (fractions of the side), texture and its colours."""
    name: str
    shape: str
    color: Tuple[float, float, float]      # object RGB in [0,1]
    center: Tuple[float, float]            # mean (x, y) of the object centre, in [0,1]
    texture: str
    frequency: float                       # texture cycles per image side
    bg_dark: Tuple[float, float, float]
    bg_light: Tuple[float, float, float]


def class_spec(c: int) -> ClassSpec:
    """The fixed description of class c."""
    if not 0 <= c < MAX_CLASSES:
        raise ValueError(f"class {c} outside [0, {MAX_CLASSES})")
    color = colorsys.hsv_to_rgb(c / MAX_CLASSES, 0.85, 0.95)
    angle = 2 * np.pi * c / MAX_CLASSES
    center = (0.5 + 0.2 * float(np.cos(angle)), 0.5 + 0.2 * float(np.sin(angle)))
    bg_hue = (c / MAX_CLASSES + 0.5) % 1.0  # opposite hue: the object stands out
    dark = colorsys.hsv_to_rgb(bg_hue, 0.35, 0.2)
    light = colorsys.hsv_to_rgb(bg_hue, 0.3, 0.55)
    texture, freq = TEXTURES[c]
    return ClassSpec(f"{c:02d}_{SHAPES[c]}", SHAPES[c], tuple(color), center, texture, freq, tuple(dark), tuple(light))


def class_names(num_classes: int = MAX_CLASSES) -> list:
    """Folder names of the classes ('00_circle', ...): sorted order equals class order."""
    return [class_spec(c).name for c in range(num_classes)]


# ----------------------------------------------------------------------------- shapes


def shape_sdf(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) of a unit-size shape at local coordinates x, y [n,H,W]."""
    ax, ay = np.abs(x), np.abs(y)
    rho = np.sqrt(x * x + y * y)
    if shape == "circle":
        return rho - 1.0
    if shape == "square":
        return np.maximum(ax, ay) - 0.85
    if shape == "triangle":  # pointing up (image y grows downwards); circumradius 1.2
        return np.maximum(y, 0.866 * ax - 0.5 * y) - 0.6
    if shape == "diamond":
        return (ax + ay) * 0.7071 - 0.8
    if shape == "ring":
        return np.abs(rho - 0.78) - 0.25
    if shape in ("plus", "cross"):
        if shape == "cross":  # the plus turned by 45 degrees
            ax, ay = np.abs(x + y) * 0.7071, np.abs(x - y) * 0.7071
        return np.minimum(np.maximum(ax - 0.3, ay - 1.0), np.maximum(ax - 1.0, ay - 0.3))
    if shape == "ellipse":  # wide and flat
        return (np.sqrt((x / 1.25) ** 2 + (y / 0.6) ** 2) - 1.0) * 0.6
    if shape == "star":
        phi = np.arctan2(y, x)
        return (rho - (0.7 + 0.35 * np.cos(5 * phi))) * 0.7
    if shape == "hexagon":
        return np.maximum(ax * 0.866 + ay * 0.5, ay) - 0.85
    raise ValueError(f"unknown shape '{shape}' (one of {SHAPES})")


# ----------------------------------------------------------------------------- textures


def value_noise(lattice: np.ndarray, cells: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth value noise: lattice [n,G,G] in [0,1], `cells` cells per side, sampled at u, v [n,H,W] -> [n,H,W]."""
    n, g = lattice.shape[0], lattice.shape[1]
    fx, fy = u * cells, v * cells  # lattice coordinates
    x0, y0 = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    tx, ty = fx - x0, fy - y0
    tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)  # smoothstep weights
    x0, y0 = x0 % g, y0 % g
    x1, y1 = (x0 + 1) % g, (y0 + 1) % g
    i = np.arange(n)[:, None, None]
    top = lattice[i, y0, x0] * (1 - tx) + lattice[i, y0, x1] * tx
    bottom = lattice[i, y1, x0] * (1 - tx) + lattice[i, y1, x1] * tx
    return top * (1 - ty) + bottom * ty


def texture_pattern(kind: str, freq: float, u, v, phase: np.ndarray, lattice: np.ndarray) -> np.ndarray:
    """Pattern in [0,1], [n,H,W], of one texture kind at u, v [H,W]; `phase` [n,2] in [0,1) shifts it per image."""
    px, py = phase[:, 0, None, None], phase[:, 1, None, None]  # [n,1,1]
    two_pi = 2 * np.pi
    if kind == "hstripes":
        return 0.5 + 0.5 * np.sin(two_pi * (freq * v + px))
    if kind == "vstripes":
        return 0.5 + 0.5 * np.sin(two_pi * (freq * u + px))
    if kind == "diagonal":
        return 0.5 + 0.5 * np.sin(two_pi * (freq * (u + v) * 0.7071 + px))
    if kind == "checker":
        s = np.sin(two_pi * (freq * u + px)) * np.sin(two_pi * (freq * v + py))
        return 0.5 + 0.5 * np.tanh(4.0 * s)
    if kind == "dots":
        s = np.cos(two_pi * (freq * u + px)) * np.cos(two_pi * (freq * v + py))
        return 1.0 / (1.0 + np.exp(-10.0 * (s - 0.4)))
    if kind == "noise":  # the phase offsets the sampling window inside the periodic lattice
        return value_noise(lattice, freq, u + px * NOISE_GRID / freq, v + py * NOISE_GRID / freq)
    raise ValueError(f"unknown texture '{kind}'")


# ----------------------------------------------------------------------------- images


def draw_parameters(labels: np.ndarray, rng: np.random.Generator) -> dict:
    """Per-image random parameters [N,...] for `labels`, drawn in a fixed order."""
    n = labels.shape[0]
    specs = [class_spec(c) for c in range(MAX_CLASSES)]
    mean_center = np.array([s.center for s in specs])[labels]  # [N,2]
    return {
        "center": np.clip(mean_center + rng.normal(0.0, 0.06, (n, 2)), 0.18, 0.82),  # [N,2] (x, y)
        "size": 0.19 * np.exp(rng.normal(0.0, 0.12, n)),                              # [N] half-size / side
        "angle": rng.uniform(-0.35, 0.35, n),                                           # [N] radians
        "color_jitter": rng.normal(0.0, 0.05, (n, 3)),                                  # [N,3]
        "bg_jitter": rng.normal(0.0, 0.03, (n, 3)),                                     # [N,3]
        "contrast": rng.uniform(0.7, 1.0, n),                                           # [N] texture contrast
        "phase": rng.random((n, 2)),                                                    # [N,2]
        "lattice": rng.random((n, NOISE_GRID, NOISE_GRID)),                             # [N,G,G]
        "pixel_noise_seed": rng.integers(0, 2 ** 63 - 1),                               # one seed for all pixels
    }


def render(labels: np.ndarray, params: dict, resolution: int) -> np.ndarray:
    """Images uint8 [N,R,R,3] of `labels` with `params` (from draw_parameters); vectorised per class."""
    n, R = labels.shape[0], resolution
    coords = (np.arange(R) + 0.5) / R
    u, v = np.meshgrid(coords, coords)  # [R,R]: u = x (columns), v = y (rows), in (0,1)
    out = np.empty((n, R, R, 3), np.float32)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        spec = class_spec(int(c))
        cx, cy = params["center"][idx, 0, None, None], params["center"][idx, 1, None, None]  # [m,1,1]
        size = params["size"][idx, None, None]
        cos, sin = np.cos(params["angle"][idx])[:, None, None], np.sin(params["angle"][idx])[:, None, None]
        dx, dy = u - cx, v - cy  # [m,R,R]
        lx, ly = (cos * dx + sin * dy) / size, (-sin * dx + cos * dy) / size  # local unit coordinates
        sdf_px = shape_sdf(spec.shape, lx, ly) * size * R  # signed distance in pixels
        cover = np.clip(0.5 - sdf_px, 0.0, 1.0)[..., None]  # [m,R,R,1] anti-aliased coverage
        pattern = texture_pattern(spec.texture, spec.frequency, u, v, params["phase"][idx], params["lattice"][idx])
        pattern = 0.5 + (pattern - 0.5) * params["contrast"][idx, None, None]  # [m,R,R]
        dark = np.asarray(spec.bg_dark) + params["bg_jitter"][idx]  # [m,3]
        light = np.asarray(spec.bg_light) + params["bg_jitter"][idx]
        bg = dark[:, None, None] + (light - dark)[:, None, None] * pattern[..., None]  # [m,R,R,3]
        color = np.asarray(spec.color) + params["color_jitter"][idx]  # [m,3]
        out[idx] = bg * (1 - cover) + color[:, None, None] * cover
    noise = np.random.default_rng(params["pixel_noise_seed"]).normal(0.0, 0.015, out.shape).astype(np.float32)
    return (np.clip(out + noise, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def make_images(num_per_class: int, num_classes: int = MAX_CLASSES, resolution: int = 32,
                seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 [C*n,R,R,3], labels int64 [C*n]) with labels 0,0,...,1,1,...; deterministic in `seed`."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must lie in [1, {MAX_CLASSES}], got {num_classes}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), num_per_class)  # [N]
    params = draw_parameters(labels, np.random.default_rng(seed))
    return render(labels, params, resolution), labels


# ----------------------------------------------------------------------------- ImageFolder output


def write_image_folder(root, images: np.ndarray, labels: np.ndarray, names, progress=None) -> Path:
    """Writes root/<class name>/<index>.png for uint8 [N,H,W,3] images; the tree appears atomically (a temp
    folder `.<root>.<pid>.tmp` renamed into place, libs.atomic_io.atomic_write_dir)."""
    def write(tmp):
        for name in names:
            (tmp / name).mkdir()
        items = range(len(labels)) if progress is None else progress(range(len(labels)))
        for i in items:
            Image.fromarray(images[i]).save(tmp / names[int(labels[i])] / f"{i:06d}.png", format="PNG")
        os.chmod(tmp, 0o755)

    return atomic_write_dir(Path(root), write)


SPLIT_SEED_OFFSET = {"train": 0, "val": 1}


def write_demo_splits(root, splits, num_classes: int, resolution: int, seed: int, per_class: dict) -> dict:
    """Generates and writes root/<split>/<class>/*.png for each split (seed + SPLIT_SEED_OFFSET[split])."""
    root = Path(root)
    names = class_names(num_classes)
    written = {}
    for split in splits:
        if split not in SPLIT_SEED_OFFSET:
            raise ValueError(f"unknown split '{split}' (one of {sorted(SPLIT_SEED_OFFSET)})")
        t0 = time.time()
        split_seed = seed + SPLIT_SEED_OFFSET[split]
        images, labels = make_images(per_class[split], num_classes, resolution, split_seed)  # [N,R,R,3], [N]
        bar = lambda it: tqdm(it, desc=f"writing {split}", unit="img", leave=False)  # noqa: E731
        write_image_folder(root / split, images, labels, names, progress=bar)
        info = {"split": split, "seed": split_seed, "num_images": int(len(labels)), "per_class": per_class[split],
                "num_classes": num_classes, "resolution": resolution, "class_names": names,
                "generator": "demo.procedural_data.make_images"}
        atomic_write_json(root / f"{split}.json", info, indent=1, sort_keys=False)
        print(f"{split}: {len(labels)} images of {num_classes} classes ({resolution}x{resolution}, seed "
              f"{split_seed}) -> {root / split} in {time.time() - t0:.1f} s")
        written[split] = root / split
    return written
