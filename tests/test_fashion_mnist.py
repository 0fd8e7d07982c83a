"""The demo's Fashion-MNIST step on tiny idx files written here (the real data is never needed)."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from demo import fashion_mnist as fm

REPO = Path(__file__).resolve().parents[1]


def hand_made_idx(array: np.ndarray) -> bytes:
    """idx bytes built here byte by byte (uint8 only), independently of demo.fashion_mnist.encode_idx."""
    header = bytearray([0, 0, 0x08, array.ndim])
    for size in array.shape:
        header += int(size).to_bytes(4, "big")
    return bytes(header) + array.astype(np.uint8).tobytes()


def fake_splits(train_per_class=3, test_per_class=2, seed=0):
    """{split: (images uint8 [N,28,28], labels [N])} with every class present, labels shuffled."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), n)).astype(np.uint8)
        out[split] = (rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8), labels)
    return out


# ----------------------------------------------------------------------------- idx reader


def test_read_idx_reads_hand_made_files_raw_and_gzipped():
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    for data in (hand_made_idx(images), gzip.compress(hand_made_idx(images))):
        out = fm.read_idx(data)
        assert out.dtype == np.uint8 and out.shape == (5, 28, 28) and np.array_equal(out, images)
    assert np.array_equal(fm.read_idx(hand_made_idx(labels)), labels)


def test_read_idx_big_endian_types_round_trip():
    for dtype in (np.int16, np.int32, np.float32, np.float64, np.int8):
        a = (np.arange(12).reshape(3, 4) - 5).astype(dtype)
        out = fm.read_idx(fm.encode_idx(a))
        assert out.dtype == np.dtype(dtype) and np.array_equal(out, a)
    raw = fm.encode_idx(np.array([1, 256], dtype=np.int32))
    assert raw[-8:] == b"\x00\x00\x00\x01\x00\x00\x01\x00"  # values stored big-endian


@pytest.mark.parametrize("data, message", [
    (b"\x00\x00", "too short"),
    (b"\x01\x00\x08\x01" + (2).to_bytes(4, "big") + b"ab", "bad magic"),
    (b"\x00\x00\x07\x01" + (2).to_bytes(4, "big") + b"ab", "unknown idx value type"),
    (b"\x00\x00\x08\x00", "0 dimensions"),
    (b"\x00\x00\x08\x02" + (2).to_bytes(4, "big"), "too short for the 2 sizes"),
    (b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"abcde",
     r"\(2, 3\) of uint8 \(18 bytes in all\) but the file has 17"),
    (b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"abc", "has 11 bytes"),
    (b"\x1f\x8b\x08\x00garbage", "gzip"),
])
def test_read_idx_rejects_malformed_bytes(data, message):
    with pytest.raises(fm.IdxFormatError, match=message) as e:
        fm.read_idx(data, "some.idx")
    assert "some.idx" in str(e.value)


def test_load_split_checks_images_and_labels_belong_together(tmp_path):
    splits = fake_splits()
    fm.write_idx_folder(tmp_path / "gz", splits, compress=True)
    fm.write_idx_folder(tmp_path / "raw", splits, compress=False)
    for folder in ("gz", "raw"):
        images, labels, hashes = fm.load_split(tmp_path / folder, "train")
        assert np.array_equal(images, splits["train"][0]) and np.array_equal(labels, splits["train"][1])
        assert labels.dtype == np.int64 and len(hashes) == 2
    (tmp_path / "raw" / "t10k-labels-idx1-ubyte").write_bytes(hand_made_idx(np.zeros(3, np.uint8)))
    with pytest.raises(fm.IdxFormatError, match="20 images but labels of shape"):
        fm.load_split(tmp_path / "raw", "test")
    (tmp_path / "raw" / "t10k-labels-idx1-ubyte").write_bytes(hand_made_idx(np.full(20, 12, np.uint8)))
    with pytest.raises(fm.IdxFormatError, match="outside 0..9"):
        fm.load_split(tmp_path / "raw", "test")


# ----------------------------------------------------------------------------- finding the files


def test_locate_prefers_the_user_folder_and_its_torchvision_layout(tmp_path):
    raw = fm.write_idx_folder(tmp_path / "tv" / "FashionMNIST" / "raw", fake_splits())
    system = fm.write_idx_folder(tmp_path / "system", fake_splits())
    assert fm.locate_idx_folder(tmp_path / "tv", cache=tmp_path / "c", system_dir=system) == raw
    assert fm.locate_idx_folder(raw, cache=tmp_path / "c", system_dir=system) == raw
    assert fm.locate_idx_folder(None, cache=tmp_path / "c", system_dir=system) == system
    cached = fm.write_idx_folder(tmp_path / "c" / fm.PACKAGE_SUBDIR, fake_splits())
    assert fm.locate_idx_folder(None, cache=tmp_path / "c", system_dir=tmp_path / "none") == cached
    with pytest.raises(fm.FashionMNISTUnavailable, match="--fashion-mnist"):
        fm.locate_idx_folder(tmp_path / "empty", cache=tmp_path / "c", system_dir=system)  # never replaced silently


def test_unavailable_data_names_every_way_to_provide_it(tmp_path, monkeypatch):
    with pytest.raises(fm.FashionMNISTUnavailable) as e:
        fm.locate_idx_folder(None, cache=tmp_path / "c", system_dir=tmp_path / "none", download=False)
    text = str(e.value)
    assert "\n" not in text
    for way in ("--fashion-mnist DIR", "apt-get install dataset-fashion-mnist", "apt-get download",
                "make demo DATA=synthetic"):
        assert way in text
    monkeypatch.setattr(fm.shutil, "which", lambda tool: None)  # no apt-get: the fetch step says so
    with pytest.raises(fm.FashionMNISTUnavailable, match="`apt-get` is not available"):
        fm.locate_idx_folder(None, cache=tmp_path / "c", system_dir=tmp_path / "none")


# ----------------------------------------------------------------------------- images and trees


def test_to_rgb32_pads_with_zeros_and_copies_gray_to_rgb():
    images = np.random.default_rng(0).integers(1, 256, (4, 28, 28), dtype=np.uint8)
    out = fm.to_rgb32(images)
    assert out.shape == (4, 32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(out[:, 2:30, 2:30, 0], images)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not out[:, border].any()


def test_per_class_subset_is_seeded_balanced_and_sorted():
    labels = np.random.default_rng(0).integers(0, 10, 500)
    a, b = fm.per_class_subset(labels, 5, seed=3), fm.per_class_subset(labels, 5, seed=3)
    assert np.array_equal(a, b) and np.all(np.diff(a) > 0)
    assert np.array_equal(np.bincount(labels[a], minlength=10), np.full(10, 5))
    assert not np.array_equal(a, fm.per_class_subset(labels, 5, seed=4))
    assert np.array_equal(fm.per_class_subset(labels, 0, seed=3), np.arange(500))
    with pytest.raises(ValueError, match="fewer than"):
        fm.per_class_subset(labels, 400, seed=0)


def test_write_fashion_splits_writes_image_folders_of_the_padded_images(tmp_path):
    from libs.data.images import list_image_folder, read_rgb
    splits = fake_splits(train_per_class=3, test_per_class=2)
    src = fm.write_idx_folder(tmp_path / "idx", splits)
    written = fm.write_fashion_splits(tmp_path / "d", src, {"train": 2, "test": 0}, seed=0)
    names, items = list_image_folder(written["train"])
    assert names == list(fm.CLASS_NAMES) and len(items) == 20
    info = json.loads((tmp_path / "d" / "train.json").read_text())
    chosen = fm.per_class_subset(splits["train"][1].astype(np.int64), 2, seed=0)
    for rel, label in items:  # file name = index in the original split; pixels = the padded original
        i = int(Path(rel).stem)
        assert i in chosen and label == splits["train"][1][i]
        assert np.array_equal(read_rgb(written["train"] / rel), fm.to_rgb32(splits["train"][0][i:i + 1])[0])
    assert info["num_images"] == 20 and info["subset_seed"] == 0
    _, test_items = list_image_folder(written["test"])
    assert len(test_items) == 20  # 0 per class = the whole split
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "d").iterdir())  # no temp folder left
    png = next((written["train"] / fm.CLASS_NAMES[0]).iterdir())
    before = png.stat().st_mtime_ns
    fm.write_fashion_splits(tmp_path / "d", src, {"train": 2}, seed=0)  # same data: kept, not rewritten
    assert png.stat().st_mtime_ns == before
    fm.write_fashion_splits(tmp_path / "d", src, {"train": 1}, seed=0)  # another subset: rewritten
    assert len(list_image_folder(written["train"])[1]) == 10


def test_make_data_cli_fashion_source_and_one_line_error(tmp_path):
    src = fm.write_idx_folder(tmp_path / "idx", fake_splits(3, 2))
    base = [sys.executable, "-m", "demo.make_data", "--config", "configs/demo_fashion_smoke.py",
            "--config.demo.train_per_class=1", "--config.demo.heldout_per_class=1"]
    ok = subprocess.run(base + ["--out", str(tmp_path / "d"), "--fashion-mnist", str(src)], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert len(list((tmp_path / "d" / "test").rglob("*.png"))) == 10
    bad = subprocess.run(base + ["--out", str(tmp_path / "e"), "--fashion-mnist", str(tmp_path / "nothing")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: --fashion-mnist")
