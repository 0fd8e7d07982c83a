"""Image preprocessing for the tokenizer (ADM-style center crop) and an image-folder reader.

Preprocessing recipe: docs/reference.md#tokenizer.
"""
import os
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")  # matched case-insensitively (.JPEG, .PNG, ...)


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) to RGB; alpha is dropped, as ADM does."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning for palettes with transparency
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)  # [H,W] high bit-depth grayscale
        scale = 255.0 / 65535.0 if arr.max() > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def center_crop_arr(img: Image.Image, resolution: int) -> np.ndarray:
    """ADM center crop: halve with BOX while short side >= 2R, BICUBIC short side to R, crop -> uint8 [R,R,3]."""
    img = to_rgb(img)
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)  # [H,W,3] uint8, short side == R
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution].copy()  # [R,R,3], writable


def preprocess_image(img: Image.Image, resolution: int) -> torch.Tensor:
    """PIL image (any mode) -> float tensor [3,R,R] in [0,1], the tokenizer's input."""
    arr = center_crop_arr(img, resolution)  # [R,R,3] uint8
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0  # [3,R,R]


def list_image_folder(root) -> Tuple[List[str], List[Tuple[str, int]]]:
    """ImageFolder listing: (class names sorted, [(path relative to root, label)] by class then file name)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (expected {root}/<class>/<image files>)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"no class folders in {root} (expected {root}/<class>/<image files>)")
    items = []
    for label, name in enumerate(classes):
        files = sorted(e.name for e in os.scandir(root / name)
                       if e.is_file() and not e.name.startswith(".")
                       and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
        items += [(f"{name}/{f}", label) for f in files]
    return classes, items


def load_image_file(path, resolution: int) -> np.ndarray:
    """Reads an image file fully (raises on corrupt or truncated files) -> uint8 [R,R,3]."""
    with Image.open(path) as img:
        img.load()  # decode now, so truncated data raises here rather than later
        return center_crop_arr(img, resolution)


class ImageFileDataset(torch.utils.data.Dataset):
    """Items of `list_image_folder`; item i -> (i, label, uint8 [3,R,R] or None, error reason or '')."""

    def __init__(self, root, items, resolution: int):
        self.root = Path(root)
        self.items = items
        self.resolution = resolution

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        rel, label = self.items[i]
        try:
            arr = load_image_file(self.root / rel, self.resolution)  # [R,R,3]
        except Exception as e:  # corrupt / unreadable: a marker, never a retry
            reason = f"{type(e).__name__}: {e}".strip()
            return i, label, None, reason or type(e).__name__
        return i, label, torch.from_numpy(arr).permute(2, 0, 1).contiguous(), ""  # [3,R,R] uint8


def collate_images(batch):
    """List of dataset items -> (ok indices, ok labels, uint8 [n_ok,3,R,R] or None, [(index, reason)] failed)."""
    ok = [b for b in batch if b[2] is not None]
    failed = [(b[0], b[3]) for b in batch if b[2] is None]
    images = torch.stack([b[2] for b in ok]) if ok else None  # [n_ok,3,R,R]
    return [b[0] for b in ok], [b[1] for b in ok], images, failed
