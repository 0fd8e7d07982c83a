"""The one image reader: bit depths and modes, unreadable entries skipped and listed by the tokenizer and
by reference statistics alike, symlink loops, empty class folders."""
import errno
import io
import logging
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from libs.checkpoint import file_sha256
from libs.config import load_config_file
from libs.data.images import ImageFileDataset, list_image_folder, load_image_file, to_rgb
from libs.data.tokens import extract_token_dataset, load_tokens
from libs.evaluation import fid_stats
from tests.helpers import tiny_vqgan


class TinyExtractor:
    """8 cheap features of uint8 [B,H,W,3] batches (a stand-in for the FID Inception)."""
    dims, source = 8, "tiny"

    def features(self, images):
        x = torch.as_tensor(images).double() / 255  # [B,H,W,3]
        f = torch.cat([x.mean((1, 2)), x.std((1, 2)), x[:, 0, 0, :2]], 1)  # [B,8]
        return f.numpy(), None


def png16(path, arr, color_type):
    """Writes a 16-bit PNG by hand (PIL cannot write 16-bit colour): gray (0), RGB (2) or RGBA (6)."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + np.ascontiguousarray(arr[y]).astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def expected_8bit(v16):
    """The 8-bit value of a 16-bit sample: its declared range 0..65535 onto 0..255."""
    return np.rint(np.asarray(v16, np.float64) * 255 / 65535).astype(np.uint8)


def sixteen_bit_images():
    """{name: uint16 [8,8]}: a dark image (max 248) with one pixel of 256, and a full-range ramp."""
    dark = np.tile(np.arange(0, 256, 32, dtype=np.uint16), (8, 1))  # 0..224
    dark[3, 3] = 248
    one_bright = dark.copy()
    one_bright[0, 0] = 256
    full = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).clip(0, 65535).astype(np.uint16)
    full[-1, -1] = 65535
    return {"dark": dark, "one_bright": one_bright, "full": full}


def fid_pixels(folder):
    """uint8 [N,H,W,3] the reference-statistics path reads from a folder."""
    return np.concatenate(list(fid_stats.load_image_batch_source(folder).batches(50)))


def test_16bit_png_same_8bit_rgb_in_tokenizer_and_fid_stats(tmp_path):
    images = sixteen_bit_images()
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, arr in images.items():
        Image.fromarray(arr).save(folder / f"{name}.png")  # PIL writes I;16 as a 16-bit grayscale PNG
        assert Image.open(folder / f"{name}.png").mode == "I;16"
    from_fid = fid_pixels(folder)  # files in name order: dark, full, one_bright
    for k, name in enumerate(sorted(images)):
        want = np.repeat(expected_8bit(images[name])[..., None], 3, axis=-1)  # [8,8,3]
        tok = load_image_file(folder / f"{name}.png", 8)  # the tokenizer's reader; 8x8 at R=8 is not resized
        np.testing.assert_array_equal(tok, want, err_msg=f"tokenizer, {name}")
        np.testing.assert_array_equal(from_fid[k], want, err_msg=f"fid_stats, {name}")
    # the dark image is scaled the same whether or not one pixel exceeds 255 (no guess from the pixels)
    assert np.abs(load_image_file(folder / "dark.png", 8).astype(int)
                  - load_image_file(folder / "one_bright.png", 8).astype(int)).max() <= 1
    assert load_image_file(folder / "dark.png", 8).max() == 1  # 248 of 65535 is level 1, not 248


def test_16bit_colour_png_and_high_depth_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 4, 3)).astype(np.uint16)
    png16(tmp_path / "rgb16.png", rgb * 257, 2)
    png16(tmp_path / "rgba16.png", np.concatenate([rgb * 257, np.full((5, 4, 1), 9, np.uint16)], -1), 6)
    for name in ("rgb16.png", "rgba16.png"):  # 5 high, 4 wide: at R=4 the tokenizer keeps rows 0..3 as they are
        np.testing.assert_array_equal(load_image_file(tmp_path / name, 4), rgb[:4].astype(np.uint8))
        np.testing.assert_array_equal(fid_pixels_of_file(tmp_path, name), rgb.astype(np.uint8))
    # mode by mode: I;16 / I;16B / I by 0..65535, F by 0..1, never by the brightest pixel
    v = np.array([[0, 257, 32896, 65535]], np.uint16)
    for img in (Image.fromarray(v), Image.frombytes("I;16B", (4, 1), v.astype(">u2").tobytes()), Image.fromarray(v.astype(np.int32))):
        assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 1, 128, 255], img.mode
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], np.float32))
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 128, 255, 255]


def fid_pixels_of_file(tmp_path, name):
    folder = tmp_path / f"only_{name}"
    folder.mkdir()
    (folder / name).write_bytes((tmp_path / name).read_bytes())
    return fid_pixels(folder)[0]


def test_every_mode_becomes_8bit_rgb_alpha_dropped():
    rgb = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    rgba = np.concatenate([rgb, np.full((6, 5, 1), 7, np.uint8)], -1)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))), rgb)  # alpha dropped, not composited
    gray = np.asarray(base.convert("L"))
    la = Image.fromarray(np.stack([gray, np.full_like(gray, 3)], -1), "LA")
    assert np.array_equal(np.asarray(to_rgb(la)), np.repeat(gray[..., None], 3, -1))
    one = np.asarray(to_rgb(base.convert("1")))
    assert set(np.unique(one)) <= {0, 255}
    p_alpha = base.convert("P")
    p_alpha.info["transparency"] = 0
    for img in [base.convert(m) for m in ("L", "P", "PA", "RGBA", "CMYK", "YCbCr", "RGBX", "La", "RGBa")] + [p_alpha]:
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == base.size, img.mode


def test_exif_orientation_is_not_applied(tmp_path):
    arr = np.zeros((4, 8, 3), np.uint8)  # stored 8 wide, 4 high; EXIF says "rotate 90"
    arr[:, :4] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "rotated.png", exif=exif)
    assert Image.open(tmp_path / "rotated.png").getexif().get(0x0112) == 6
    assert fid_pixels(tmp_path).shape == (1, 4, 8, 3)  # the stored orientation
    assert load_image_file(tmp_path / "rotated.png", 4)[:, 0].min() == 255  # left half white, as stored


# ----------------------------------------------------------------------------- unreadable entries


def make_bad_tree(root):
    """root/train/{good,bad}/...: 3 readable PNGs and one of each unreadable kind; returns the bad names."""
    rng = np.random.default_rng(0)
    good, bad = root / "train" / "good", root / "train" / "bad"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(good / f"img{i}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (bad / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.png").write_text("not an image")
    os.symlink("loop.png", bad / "loop.png")  # a file symlink loop
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(bad / "locked.png")
    os.chmod(bad / "locked.png", 0)
    os.symlink("class_loop", root / "train" / "class_loop")  # a class-level symlink loop
    return {"bad/truncated.jpg": "truncated", "bad/empty.png": "empty", "bad/text.png": "not an image",
            "bad/loop.png": "symlink loop", "bad/locked.png": "permission denied", "class_loop": "symlink loop"}


@pytest.fixture
def locked_is_unreadable(monkeypatch):
    """Root reads chmod-000 files anyway: opening 'locked.png' then fails as it would for another user."""
    real_open = Image.open

    def open_(fp, *a, **k):
        if str(fp).endswith("locked.png"):
            raise PermissionError(errno.EACCES, "Permission denied", str(fp))
        return real_open(fp, *a, **k)
    monkeypatch.setattr(Image, "open", open_)


def test_unreadable_entries_are_skipped_and_listed_by_the_tokenizer(tmp_path, locked_is_unreadable):
    bad = make_bad_tree(tmp_path)
    ckpt = tmp_path / "vq.pt"
    torch.save(tiny_vqgan().state_dict(), ckpt)
    cfg = load_config_file("configs/tiny.py").tokenizer
    with cfg.unlocked():
        cfg.checkpoint = str(ckpt)
    meta = extract_token_dataset(tmp_path / "train", tmp_path / "tokens", cfg, flip=False, batch_size=2, workers=0)
    skipped = {s["file"]: s["reason"] for s in meta["skipped"]}
    assert set(skipped) == set(bad)
    for name, word in bad.items():
        assert word in skipped[name], (name, skipped[name])
    tokens, labels, meta = load_tokens(tmp_path / "tokens")
    assert tokens.shape[0] == 3 and meta["num_images"] == 3 and meta["class_names"] == ["bad", "good"]
    assert labels.tolist() == [1, 1, 1]


def test_unreadable_entries_are_skipped_and_listed_by_reference_stats(tmp_path, locked_is_unreadable, capsys):
    bad = make_bad_tree(tmp_path)
    source = fid_stats.load_image_batch_source(tmp_path / "train")
    stats = fid_stats.compute_reference_stats(source, TinyExtractor(), batch_size=2, progress=False)
    assert stats["n"] == 3
    skipped = {os.path.relpath(p, tmp_path / "train"): r for p, r in stats["skipped"]}
    assert set(skipped) == set(bad)
    for name, word in bad.items():
        assert word in skipped[name], (name, skipped[name])
    saved = fid_stats.load_reference_stats(fid_stats.save_reference_stats(tmp_path / "ref.npz", stats))
    assert saved["n"] == 3 and {p for p, _ in saved["skipped"]} == set(skipped)  # stored relative to the folder
    # the metrics' image source lists them the same way
    ref = {"mu": stats["mu"], "sigma": stats["sigma"]}
    result = fid_stats.compute_metrics(fid_stats.load_image_batch_source(tmp_path / "train"), ref, TinyExtractor(),
                                       progress=False)
    assert result["n"] == 3 and {s["file"] for s in result["skipped"]} == {p for p, _ in stats["skipped"]}
    with pytest.raises(ValueError, match="truncated.jpg"):  # a count short of the expected one names them
        fid_stats.compute_metrics(fid_stats.load_image_batch_source(tmp_path / "train"), ref, TinyExtractor(),
                                  num_expected=4, progress=False)


def test_fid_stats_cli_prints_and_stores_the_skipped_files(tmp_path, locked_is_unreadable, monkeypatch, capsys):
    bad = make_bad_tree(tmp_path)
    monkeypatch.setattr(fid_stats, "load_feature_extractor", lambda *a, **k: TinyExtractor())
    fid_stats.main(["--images", str(tmp_path / "train"), "--out", str(tmp_path / "ref.npz"), "--no-progress"])
    out = capsys.readouterr().out
    assert f"skipped {len(bad)} unreadable file(s)" in out and "3 images used" in out
    for name in bad:
        assert str(tmp_path / "train" / name) in out
    with np.load(tmp_path / "ref.npz") as z:
        assert int(z["n"]) == 3 and len(z["skipped_files"]) == len(bad)


def test_reference_stats_file_does_not_depend_on_the_folder_location(tmp_path, locked_is_unreadable):
    """Skipped files are stored relative to the image folder: the same images elsewhere give the same file."""
    import shutil
    make_bad_tree(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)
    digests = []
    for where in ("a", "b"):
        source = fid_stats.load_image_batch_source(tmp_path / where / "train")
        stats = fid_stats.compute_reference_stats(source, TinyExtractor(), batch_size=2, progress=False)
        digests.append(file_sha256(fid_stats.save_reference_stats(tmp_path / f"{where}.npz", stats)))
    assert digests[0] == digests[1]


def test_rank_deficient_reference_statistics_warn(tmp_path, caplog, capsys, monkeypatch):
    assert fid_stats.rank_warning(2048, 2048) and fid_stats.rank_warning(2049, 2048) is None
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(fid_stats, "load_feature_extractor", lambda *a, **k: TinyExtractor())
    fid_stats.main(["--images", str(tmp_path), "--out", str(tmp_path / "ref.npz"), "--no-progress"])
    assert "warning: only 3 images" in capsys.readouterr().out and "rank" in caplog.text


def test_listing_survives_directory_symlink_loops(tmp_path):
    root = tmp_path / "imgs"
    (root / "a" / "b").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "a" / "b" / "x.png")
    os.symlink(root / "a", root / "a" / "b" / "up")  # a loop through a parent
    os.symlink("self", root / "self")  # a link to itself
    source = fid_stats.load_image_batch_source(root)
    assert [f.name for f in source.files] == ["x.png"]
    problems = dict(source.skipped)
    assert set(problems) == {str(root / "a" / "b" / "up"), str(root / "self")}
    classes, items = list_image_folder(root)  # ImageFolder view: 'a' holds no image files itself
    assert classes == ["a"] and items == [("self", -1)]


def test_empty_class_folder_is_named_in_a_warning(tmp_path, caplog):
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    (tmp_path / "train" / "full").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / "full" / "a.png")
    with caplog.at_level(logging.WARNING):
        classes, items = list_image_folder(tmp_path / "train")
    assert classes == ["empty_class", "full"] and items == [("full/a.png", 1)]
    assert "empty class folder" in caplog.text and str(tmp_path / "train" / "empty_class") in caplog.text


def test_dataset_marks_listing_problems_without_reading(tmp_path):
    ds = ImageFileDataset(tmp_path, [("gone", -1)], 8, problems={"gone": "symlink loop"})
    assert ds[0] == (0, -1, None, "symlink loop")
