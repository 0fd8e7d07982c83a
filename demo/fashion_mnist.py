"""Fashion-MNIST for the CPU demo: find or fetch the idx files, read them, write ImageFolder trees of 32x32 PNGs.

Fashion-MNIST (Zalando Research, MIT licence): 70,000 grayscale 28x28 photographs of clothing in 10 classes,
60,000 train and 10,000 test. Where the files come from, in this order (`locate_idx_folder`):
  1. a folder given by the user (`--fashion-mnist DIR`): the four idx files, gzipped or not
     (`train-images-idx3-ubyte[.gz]`, ...), e.g. torchvision's `FashionMNIST/raw` (or its parent);
  2. the Debian/Ubuntu package `dataset-fashion-mnist`, installed: /usr/share/datasets/fashion-mnist/;
  3. that package unpacked without root into the cache folder (`<cache>/usr/share/datasets/fashion-mnist/`);
  4. fetched into the cache: `apt-get download dataset-fashion-mnist` then `dpkg-deb -x <deb> <cache>` (31 MB).
When none works, `FashionMNISTUnavailable` says so in one line listing these ways.

Images as the demo stores them (`to_rgb32`): the 28x28 image padded with 2 zero pixels on every side (the
background of Fashion-MNIST is 0, so the padding continues it) to 32x32, the tokenizer's input size, and the gray
value copied into R, G and B, because the tokenizer, the FID Inception network and every image reader of the
repo work on RGB. Pixel values are unchanged.
"""
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from libs.atomic_io import atomic_write_dir, atomic_write_json
from libs.errors import BadInput, MissingInput

CLASS_NAMES = ("0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal", "6_shirt",
               "7_sneaker", "8_bag", "9_ankle_boot")  # folder names: sorted order == label order
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
PACKAGE = "dataset-fashion-mnist"
PACKAGE_SUBDIR = Path("usr/share/datasets/fashion-mnist")  # where the package puts the files
PAD = 2  # 28 + 2 * 2 = 32

# idx type byte -> numpy dtype (big-endian, as the format stores them)
IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class IdxFormatError(BadInput):
    """Bytes that are not a well-formed idx file."""


class FashionMNISTUnavailable(MissingInput):
    """Fashion-MNIST could not be found or fetched."""


# ----------------------------------------------------------------------------- idx format


def read_idx(data: bytes, name: str = "idx data") -> np.ndarray:
    """Parses one idx file (optionally gzipped) -> array of its shape and type. Pure: bytes in, array out.

    Layout: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64),
    the number of dimensions n, n big-endian uint32 sizes, then the values in C order (big-endian).
    Raises IdxFormatError naming `name` on a bad magic number, an unknown type, or a length that does not match
    the sizes in the header.
    """
    data = bytes(data)
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise IdxFormatError(f"{name}: gzip data that does not decompress ({e})") from e
    if len(data) < 4:
        raise IdxFormatError(f"{name}: {len(data)} bytes, too short for an idx header (4 bytes of magic number)")
    if data[0] != 0 or data[1] != 0:
        raise IdxFormatError(f"{name}: bad magic number {data[:4].hex()} (an idx file starts with two zero bytes)")
    kind, ndim = data[2], data[3]
    if kind not in IDX_DTYPES:
        raise IdxFormatError(f"{name}: unknown idx value type 0x{kind:02x} in magic number {data[:4].hex()}")
    if ndim == 0:
        raise IdxFormatError(f"{name}: magic number {data[:4].hex()} declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{name}: {len(data)} bytes, too short for the {ndim} sizes of its header")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[kind]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise IdxFormatError(f"{name}: header says shape {shape} of {dtype.name} ({expected} bytes in all) but the "
                             f"file has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def encode_idx(array: np.ndarray, compress: bool = False) -> bytes:
    """The idx bytes of `array` (the inverse of read_idx; gzipped when `compress`), e.g. for small test sets."""
    array = np.asarray(array)
    kinds = {np.dtype(v).newbyteorder("=").str: k for k, v in IDX_DTYPES.items()}
    kind = kinds.get(array.dtype.newbyteorder("=").str)
    if kind is None:
        raise ValueError(f"idx cannot hold {array.dtype}")
    header = bytes([0, 0, kind, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[kind]).tobytes()
    return gzip.compress(data, mtime=0) if compress else data


def write_idx_folder(folder, splits: dict, compress: bool = True) -> Path:
    """Writes the four Fashion-MNIST idx files of {split: (images uint8 [N,28,28], labels [N])} into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        for stem, array in zip(IDX_FILES[split], (np.asarray(images, np.uint8), np.asarray(labels, np.uint8))):
            (folder / (stem + (".gz" if compress else ""))).write_bytes(encode_idx(array, compress))
    return folder


def check_split(images: np.ndarray, labels: np.ndarray, split: str, source: str = ""):
    """Raises IdxFormatError unless images uint8 [N,28,28] and labels [N] in 0..9 belong together."""
    where = f" ({source})" if source else ""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise IdxFormatError(f"{split} images{where}: expected uint8 [N,28,28], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise IdxFormatError(f"{split}{where}: {images.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= len(CLASS_NAMES)):
        raise IdxFormatError(f"{split} labels{where}: values outside 0..{len(CLASS_NAMES) - 1}")


def idx_file(folder: Path, stem: str):
    """The file `stem` or `stem.gz` in `folder` (the raw one first), else None."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def has_idx_files(folder) -> bool:
    folder = Path(folder)
    return all(idx_file(folder, stem) is not None for stems in IDX_FILES.values() for stem in stems)


def load_split(folder, split: str):
    """(images uint8 [N,28,28], labels int64 [N], {file name: sha256}) of one split read from `folder`."""
    folder = Path(folder)
    arrays, hashes = [], {}
    for stem in IDX_FILES[split]:
        path = idx_file(folder, stem)
        if path is None:
            raise FashionMNISTUnavailable(f"{folder} has no {stem} (nor {stem}.gz)")
        data = path.read_bytes()
        hashes[path.name] = hashlib.sha256(data).hexdigest()
        arrays.append(read_idx(data, str(path)))
    images, labels = arrays[0], arrays[1].astype(np.int64)
    check_split(images, labels, split, str(folder))
    return images, labels, hashes


# ----------------------------------------------------------------------------- finding the files


def candidate_folders(folder) -> list:
    """A user folder and the sub-folders torchvision uses (FashionMNIST/raw, raw)."""
    folder = Path(folder)
    return [folder, folder / "FashionMNIST" / "raw", folder / "raw"]


def how_to_provide(cache: Path) -> str:
    return ("provide it in one of these ways: --fashion-mnist DIR (a folder with the four idx files, gzipped or "
            "not, e.g. torchvision's FashionMNIST/raw); `sudo apt-get install dataset-fashion-mnist` "
            f"(/usr/share/datasets/fashion-mnist); `apt-get download {PACKAGE} && dpkg-deb -x "
            f"{PACKAGE}_*.deb {cache}` (no root needed); or run the procedural demo: make demo DATA=synthetic")


def fetch_package(cache: Path, log=print) -> Path:
    """`apt-get download` the package into a temp folder and unpack it into `cache`; returns the idx folder.

    Raises FashionMNISTUnavailable (one line) when apt-get or dpkg-deb is missing or fails.
    """
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FashionMNISTUnavailable(f"Fashion-MNIST not found and `{tool}` is not available to fetch it; "
                                          + how_to_provide(cache))
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download.") as tmp:
        log(f"fetching Fashion-MNIST: apt-get download {PACKAGE} (about 31 MB) -> {cache}")
        proc = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if proc.returncode != 0 or not debs:
            reason = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no .deb file"]
            raise FashionMNISTUnavailable(f"Fashion-MNIST not found and `apt-get download {PACKAGE}` failed "
                                          f"({reason[0]}); " + how_to_provide(cache))
        unpack = Path(tmp) / "unpacked"
        proc = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpack)], capture_output=True, text=True)
        if proc.returncode != 0 or not has_idx_files(unpack / PACKAGE_SUBDIR):
            reason = (proc.stderr or "the package holds no idx files").strip().splitlines()[-1]
            raise FashionMNISTUnavailable(f"could not unpack {debs[0].name} ({reason}); " + how_to_provide(cache))
        target = cache / PACKAGE_SUBDIR
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(unpack / PACKAGE_SUBDIR, target)  # the folder appears complete or not at all
    return target


def locate_idx_folder(user_dir=None, cache="data/fashion-mnist", system_dir=SYSTEM_DIR, download=True,
                      log=print) -> Path:
    """The folder holding the four idx files (see the module docstring for the order); fetches when allowed.

    A user folder that lacks the files is an error (never silently replaced by another source).
    """
    cache = Path(cache)
    if user_dir is not None:
        for folder in candidate_folders(user_dir):
            if has_idx_files(folder):
                return folder
        raise FashionMNISTUnavailable(f"--fashion-mnist {user_dir}: no train-images-idx3-ubyte, "
                                      f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
                                      f"(gzipped or not) in it or in its FashionMNIST/raw or raw sub-folder")
    for folder in (Path(system_dir), cache / PACKAGE_SUBDIR):
        if has_idx_files(folder):
            return folder
    if not download:
        raise FashionMNISTUnavailable("Fashion-MNIST not found; " + how_to_provide(cache))
    return fetch_package(cache, log)


# ----------------------------------------------------------------------------- images and subsets


def to_rgb32(images: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> uint8 [N,32,32,3]: 2 px of zeros on every side, the gray value in R, G and B."""
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))  # zeros: the images' own background
    return np.repeat(padded[..., None], 3, axis=-1)


def per_class_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `per_class` images of every class, drawn without replacement (numpy Generator(seed),
    classes in order); per_class <= 0 keeps every image. Raises ValueError when a class has too few."""
    if per_class <= 0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(len(CLASS_NAMES)):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise ValueError(f"class {c} has {len(pool)} images, fewer than the {per_class} asked for")
        chosen.append(rng.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def write_split_tree(root, images32: np.ndarray, labels: np.ndarray, indices: np.ndarray, progress=None) -> Path:
    """Writes root/<class>/<index>.png (index: position in the original split) atomically; returns root.

    The whole tree is written into a temp folder and renamed into place (libs.atomic_io.atomic_write_dir).
    """
    def write(tmp):
        for name in CLASS_NAMES:
            (tmp / name).mkdir()
        items = range(len(indices)) if progress is None else progress(range(len(indices)))
        for k in items:
            i = int(indices[k])
            Image.fromarray(images32[k]).save(tmp / CLASS_NAMES[int(labels[i])] / f"{i:05d}.png", format="PNG")
        os.chmod(tmp, 0o755)

    return atomic_write_dir(Path(root), write)


def write_fashion_splits(root, source_dir, per_class: dict, seed: int) -> dict:
    """Reads the idx files of `source_dir` and writes root/<split>/<class>/*.png for each split of `per_class`
    ({'train': n, 'test': m}; n <= 0: the whole split), plus root/<split>.json describing it.

    The subset of split s is `per_class_subset(labels, n, seed + SPLIT_SEED_OFFSET[s])`. A split whose json
    already records the same source files, subset and image bytes is kept as it is (no rewrite).
    """
    root = Path(root)
    written = {}
    for split, n in per_class.items():
        t0 = time.time()
        images, labels, hashes = load_split(source_dir, split)
        split_seed = seed + SPLIT_SEED_OFFSET[split]
        idx = per_class_subset(labels, n, split_seed)
        images32 = to_rgb32(images[idx])
        info = {"split": split, "source": "Fashion-MNIST", "source_dir": str(source_dir), "source_files": hashes,
                "per_class": int(n), "subset_seed": split_seed, "num_images": int(len(idx)),
                "indices_sha256": hashlib.sha256(idx.astype("<i8").tobytes()).hexdigest(),
                "images_sha256": hashlib.sha256(images32.tobytes()).hexdigest(),
                "class_names": list(CLASS_NAMES), "resolution": 32,
                "preprocessing": "28x28 gray padded by 2 zero pixels to 32x32, gray copied to R, G, B"}
        meta = root / f"{split}.json"
        if meta.is_file() and (root / split).is_dir():
            try:
                old = json.loads(meta.read_text())
            except ValueError:
                old = {}
            if {k: old.get(k) for k in ("source_files", "indices_sha256", "images_sha256")} == \
                    {k: info[k] for k in ("source_files", "indices_sha256", "images_sha256")}:
                print(f"{split}: {len(idx)} images already in {root / split} (same files and subset), kept")
                written[split] = root / split
                continue
        bar = lambda it: tqdm(it, desc=f"writing {split}", unit="img", leave=False)  # noqa: E731
        write_split_tree(root / split, images32, labels, idx, progress=bar)
        atomic_write_json(meta, info, indent=1, sort_keys=False)
        which = "all" if n <= 0 else f"{n} per class, seed {split_seed}"
        print(f"{split}: {len(idx)} of {len(labels)} Fashion-MNIST images ({which}) -> {root / split} in "
              f"{time.time() - t0:.1f} s")
        written[split] = root / split
    return written


SPLIT_SEED_OFFSET = {"train": 0, "test": 1}
