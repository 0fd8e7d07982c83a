"""The one image reader of the project, image-tree listing, and ADM-style preprocessing for the tokenizer.

Every path that reads image files goes through `read_image` / `read_rgb`: the tokenizer
(`extract_imagenet_feature.py`), reference statistics (`python -m libs.evaluation.fid_stats`) and the
image sources of the metrics. What the reader does:

- Decodes the whole file at once, so truncated data fails here and not halfway through a batch.
- Converts every PIL mode to 8-bit RGB (`to_rgb`). High bit-depth modes are scaled by the range their mode
  declares, never by the values the pixels happen to take: 16-bit samples (I;16, I;16B, ..., 16-bit
  PNGs) map 0..65535 onto 0..255, mode I uses the sample depth its file states (16 bits when it states
  none), mode F is taken as 0..1. 8-bit colour PNGs/TIFFs with 16 bits per channel are reduced by PIL itself
  (the high byte). 1, L, P, LA, PA, RGBA, CMYK, YCbCr and the other 8-bit modes use PIL's conversion.
- Drops alpha without compositing it (as ADM's preprocessing does).
- Does NOT apply EXIF orientation: pixels are used in the order they are stored, as the ImageNet
  preprocessing of ADM / MaskGIT / MAGE does (an EXIF-rotated photo stays unrotated).
- Raises `UnreadableImage` (a `BadInput`, with `.path` and `.reason`) for anything that cannot be used:
  truncated or corrupt data, an empty file, a file that is not an image, a symlink loop, a dangling
  link, permission denied. Callers skip such files and list them with their reason.

Listing: `scan_image_folder` (an ImageFolder tree root/<class>/<files>) and `list_image_files` (every image
under a folder, recursively) never follow a directory twice, so symlink loops end as listed problems
instead of errors; an empty class folder is logged as a warning naming it.
Preprocessing recipe: docs/reference.md#tokenizer.
"""
import errno
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from libs.errors import BadInput, MissingInput

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")  # matched case-insensitively (.JPEG, .PNG, ...)
NOT_A_CLASS = -1  # label of a listed entry under the root that is not a usable class folder (e.g. a loop)

log = logging.getLogger("images")


class UnreadableImage(BadInput):
    """An image file that cannot be read or decoded; `.path` and `.reason` say which and why."""

    def __init__(self, path, reason: str = ""):
        self.path, self.reason = str(path), reason or "unreadable"
        super().__init__(f"{self.path}: {self.reason}")


# ----------------------------------------------------------------------------- bit depth and modes


def declared_max(img: Image.Image):
    """The value that maps to 255 for a high bit-depth mode (from the mode / the file's header), else None."""
    mode = img.mode
    if mode.startswith("I;16"):
        return 65535.0
    if mode == "I" or mode.startswith("I;32"):
        tags = getattr(img, "tag_v2", None)  # TIFF: BitsPerSample (258) and SampleFormat (339, 2 = signed)
        bits = tags.get(258) if tags is not None else None
        if isinstance(bits, (tuple, list)):
            bits = bits[0] if bits else None
        if bits:
            signed = tags.get(339) in (2, (2,))
            return float(2 ** (int(bits) - (1 if signed else 0)) - 1)
        return 65535.0  # PIL's container for 16-bit samples (PNG, PGM) when the file states no other depth
    if mode == "F":
        return 1.0
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; high bit depths scaled by their declared range, alpha dropped, no EXIF turn."""
    if img.mode == "RGB":
        return img
    top = declared_max(img)
    if top is not None:
        arr = np.asarray(img, dtype=np.float64)  # [H,W] one high bit-depth channel
        arr = np.rint(np.clip(arr * (255.0 / top), 0.0, 255.0)).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning for palettes with transparency
    try:
        return img.convert("RGB")
    except ValueError as e:  # modes PIL cannot convert directly (La, ...): their colour bands, alpha dropped
        bands = img.getbands()
        if "L" in bands:
            return img.getchannel("L").convert("RGB")
        if all(b in bands for b in "RGB"):
            return Image.merge("RGB", [img.getchannel(b) for b in "RGB"])
        raise UnreadableImage(getattr(img, "filename", "") or "<image>",
                              f"unsupported image mode {img.mode}") from e


# ----------------------------------------------------------------------------- reading


def os_error_reason(e: OSError) -> str:
    """A short reason for an OSError met while listing or opening a path."""
    if e.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, FileNotFoundError):
        return "not found (dangling symlink or removed while reading)"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    return f"{type(e).__name__}: {e.strerror or e}"


def _decode(path: str) -> Image.Image:
    """The fully decoded PIL image of a file (any mode); UnreadableImage names the file and why."""
    try:
        st = os.stat(path)  # follows symlinks: loops, dangling links and permissions show here
        if stat.S_ISDIR(st.st_mode):
            raise UnreadableImage(path, "is a directory")
        if st.st_size == 0:
            raise UnreadableImage(path, "empty file (0 bytes)")
        im = Image.open(path)
        try:
            im.load()  # decode now, so truncated data raises here rather than later
        except BaseException:
            im.close()
            raise
        return im
    except UnreadableImage:
        raise
    except UnidentifiedImageError as e:
        raise UnreadableImage(path, "not an image (PIL cannot identify its format)") from e
    except OSError as e:
        if e.errno is not None or isinstance(e, PermissionError):
            raise UnreadableImage(path, os_error_reason(e)) from e
        raise UnreadableImage(path, f"truncated or corrupt image data ({e})") from e
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, Image.DecompressionBombError) as e:
        # PIL's decoders signal malformed headers and streams with these
        raise UnreadableImage(path, f"truncated or corrupt image data ({type(e).__name__}: {e})") from e


def read_image(path) -> Image.Image:
    """Opens and fully decodes an image file -> 8-bit RGB PIL image (`to_rgb`); UnreadableImage if it cannot."""
    path = str(path)
    with _decode(path) as im:
        try:
            rgb = to_rgb(im)
        except UnreadableImage as e:
            raise UnreadableImage(path, e.reason) from e
        return rgb if rgb is not im else im.copy()


def read_rgb(path) -> np.ndarray:
    """uint8 [H,W,3] of an image file (see `read_image`)."""
    return np.asarray(read_image(path), dtype=np.uint8)


# ----------------------------------------------------------------------------- listing


def _kind(entry: os.DirEntry):
    """('dir' | 'file' | 'other' | 'error', reason) of a directory entry, following symlinks."""
    try:
        if entry.is_dir():
            return "dir", ""
        if entry.is_file():
            return "file", ""
    except OSError as e:  # a symlink loop, an unreadable link target
        return "error", os_error_reason(e)
    if entry.is_symlink():
        return "error", "dangling symlink (its target does not exist)"
    return "other", ""


def _sorted_entries(folder):
    """Non-hidden entries of `folder` sorted by name (OSError if the folder cannot be listed)."""
    with os.scandir(folder) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass
class ImageFolderListing:
    """An ImageFolder tree: classes (sorted folder names), items [(path relative to root, label)] by class
    then file name, and the entries known unusable while listing ({relative path: reason}). Entries under
    the root that are not usable class folders (symlink loops, dangling links) are items with label
    NOT_A_CLASS, so that readers skip and list them like any other unreadable file."""
    root: Path
    classes: List[str]
    items: List[Tuple[str, int]]
    problems: Dict[str, str] = field(default_factory=dict)
    empty_classes: List[str] = field(default_factory=list)


def scan_image_folder(root) -> ImageFolderListing:
    """Lists root/<class>/<image files> (one level per class, as ImageFolder); logs empty class folders."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInput(f"image folder not found: {root} (expected {root}/<class>/<image files>)")
    try:
        entries = _sorted_entries(root)
    except OSError as e:
        raise BadInput(f"cannot list the image folder {root}: {os_error_reason(e)}") from e
    classes, items, problems, empty, seen = [], [], {}, [], {}
    for entry in entries:
        kind, reason = _kind(entry)
        if kind == "error":  # a looping / dangling link where a class folder would be
            items.append((entry.name, NOT_A_CLASS))
            problems[entry.name] = reason
            continue
        if kind != "dir":
            continue  # files next to the class folders are not part of the tree
        label = len(classes)
        classes.append(entry.name)
        real = os.path.realpath(entry.path)
        if real in seen:
            log.warning("class folder %s is the same folder as %s (a symlink); its images are listed twice",
                        entry.name, seen[real])
        seen.setdefault(real, entry.name)
        try:
            files = _sorted_entries(entry.path)
        except OSError as e:
            items.append((entry.name, label))
            problems[entry.name] = f"class folder cannot be listed: {os_error_reason(e)}"
            continue
        n = 0
        for f in files:
            if not is_image_name(f.name):
                continue
            kind, reason = _kind(f)
            if kind == "dir" or kind == "other":
                continue
            rel = f"{entry.name}/{f.name}"
            items.append((rel, label))
            n += 1
            if kind == "error":
                problems[rel] = reason
        if n == 0:
            empty.append(entry.name)
            log.warning("empty class folder %s: no image files (%s) in it", root / entry.name,
                        ", ".join(IMAGE_EXTENSIONS))
    if not classes:
        raise MissingInput(f"no class folders in {root} (expected {root}/<class>/<image files>)"
                           + (f"; unusable entries: {', '.join(f'{k} ({v})' for k, v in problems.items())}"
                              if problems else ""))
    return ImageFolderListing(root, classes, items, problems, empty)


def list_image_folder(root) -> Tuple[List[str], List[Tuple[str, int]]]:
    """ImageFolder listing: (class names sorted, [(path relative to root, label)] by class then file name).

    Items include entries that will not read (corrupt files, symlink loops); see `scan_image_folder`.
    """
    listing = scan_image_folder(root)
    return listing.classes, listing.items


def list_image_files(root) -> Tuple[List[Path], List[Tuple[str, str]]]:
    """(image files under `root`, recursively, sorted by relative path; [(path, reason)] unusable entries).

    Directory symlinks are followed once: a folder reached again (a loop, or a second link to it) is listed
    as a problem instead of being walked again. Hidden entries are ignored.
    """
    root = Path(root)
    files, problems = [], []
    visited = {os.path.realpath(root)}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = _sorted_entries(folder)
        except OSError as e:
            problems.append((str(folder), f"folder cannot be listed: {os_error_reason(e)}"))
            continue
        for entry in entries:
            path = Path(entry.path)
            kind, reason = _kind(entry)
            if kind == "dir":
                real = os.path.realpath(path)
                if real in visited:
                    problems.append((str(path), f"symlink loop or second link to a listed folder ({real})"))
                    continue
                visited.add(real)
                stack.append(path)
            elif kind == "file" and is_image_name(entry.name):
                files.append(path)
            elif kind == "error" and (is_image_name(entry.name) or entry.is_symlink()):
                problems.append((str(path), reason))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    problems.sort()
    return files, problems


# ----------------------------------------------------------------------------- preprocessing


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


def load_image_file(path, resolution: int) -> np.ndarray:
    """Reads an image file with `read_image` (UnreadableImage if it cannot) -> uint8 [R,R,3] center crop."""
    return center_crop_arr(read_image(path), resolution)


class ImageFileDataset(torch.utils.data.Dataset):
    """Items of an image-folder listing; item i -> (i, label, uint8 [3,R,R] or None, reason it was skipped or '').

    `problems` ({relative path: reason}, from the listing) marks entries known unusable without reading them.
    """

    def __init__(self, root, items, resolution: int, problems=None):
        self.root = Path(root)
        self.items = items
        self.resolution = resolution
        self.problems = dict(problems or {})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        rel, label = self.items[i]
        if rel in self.problems:
            return i, label, None, self.problems[rel]
        try:
            arr = load_image_file(self.root / rel, self.resolution)  # [R,R,3]
        except UnreadableImage as e:  # a marker, never a retry
            return i, label, None, e.reason
        return i, label, torch.from_numpy(arr).permute(2, 0, 1).contiguous(), ""  # [3,R,R] uint8


def collate_images(batch):
    """List of dataset items -> (ok indices, ok labels, uint8 [n_ok,3,R,R] or None, [(index, reason)] failed)."""
    ok = [b for b in batch if b[2] is not None]
    failed = [(b[0], b[3]) for b in batch if b[2] is None]
    images = torch.stack([b[2] for b in ok]) if ok else None  # [n_ok,3,R,R]
    return [b[0] for b in ok], [b[1] for b in ok], images, failed
