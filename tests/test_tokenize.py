"""Tokenization: preprocessing, extract_imagenet_feature.py (skips, flips, resume, torchrun), loader."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import extract_imagenet_feature
from libs.checkpoint import MissingAssetError
from libs.config import load_config_file
from libs.data.images import center_crop_arr, list_image_folder, preprocess_image
from libs.data.tokens import (MissingTokenDatasetError, TokenDatasetError, extract_token_dataset,
                                load_tokens, write_token_dataset)
from libs.models.factory import tokenizer_config
from libs.models.vqgan import VQGAN
from tests.helpers import IMAGE_TREE_CLASSES as CLASSES, make_image_tree, random_rgb

REPO = Path(__file__).resolve().parent.parent
VALID = 9                 # 3 classes x 3 readable images
BAD = {"n02/broken.JPEG", "n03/truncated.JPEG"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(workdir, image root, tiny tokenizer checkpoint, the tiny VQGAN itself)."""
    work = tmp_path_factory.mktemp("tokenize")
    data = make_image_tree(work / "data")
    torch.manual_seed(0)
    model = VQGAN(tokenizer_config(load_config_file("configs/tiny.py").tokenizer)).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.mul_(0.4)  # codebook near the encoder's scale: varied ids
    ckpt = work / "tiny_vqgan.pt"
    torch.save(model.state_dict(), ckpt)
    return work, data, ckpt, model


def run_cli(data, ckpt, out, *extra):
    """extract_imagenet_feature.main in this process -> exit status."""
    return extract_imagenet_feature.main(
        ["--path", str(data), "--split", "train", "--out", str(out), "--config", "configs/tiny.py",
         f"--config.tokenizer.checkpoint={ckpt}", "--chunk-size", "2", "--batch-size", "3", *extra])


def same_dataset(a: Path, b: Path):
    """tokens.npy, labels.npy and meta.json of two outputs are identical."""
    for name in ("tokens.npy", "labels.npy", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def reference(setup):
    """One uninterrupted single-process run (2 DataLoader workers)."""
    work, data, ckpt, _ = setup
    out = work / "reference"
    assert run_cli(data, ckpt, out, "--workers", "2") == 0
    return out


# ----------------------------------------------------------------------------- preprocessing


def red_with_green_centre(w, h, size):
    """Red RGB image [h,w] whose middle `size` columns (wide) or rows (tall) are green."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = 255
    if w >= h:
        arr[:, (w - size) // 2:(w - size) // 2 + size] = (0, 255, 0)
    else:
        arr[(h - size) // 2:(h - size) // 2 + size] = (0, 255, 0)
    return Image.fromarray(arr)


@pytest.mark.parametrize("w,h,size,tol", [(64, 32, 32, 0.0), (32, 64, 32, 0.0), (100, 30, 50, 0.02),
                                          (30, 101, 50, 0.02)])
def test_center_crop_keeps_the_centre(w, h, size, tol):
    # exact for power-of-two halvings (BOX of pure colours); BICUBIC may ring slightly otherwise
    out = preprocess_image(red_with_green_centre(w, h, size), 8)
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    assert float(out[1].min()) >= 1 - tol and float(out[0].max()) <= tol and float(out[2].max()) <= tol


def test_preprocess_sizes_range_and_modes():
    rng = np.random.default_rng(1)
    for h, w in [(9, 9), (8, 8), (300, 17), (17, 300), (513, 1025), (10, 11)]:
        out = preprocess_image(Image.fromarray(random_rgb(rng, h, w)), 8)
        assert out.shape == (3, 8, 8) and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    base = Image.fromarray(random_rgb(rng, 20, 30))
    gray16 = Image.fromarray((random_rgb(rng, 20, 30)[..., 0].astype(np.uint16) * 257))  # 16-bit grayscale
    p_alpha = base.convert("P")
    p_alpha.info["transparency"] = 0
    for img in [base.convert(m) for m in ("L", "LA", "RGBA", "P", "CMYK", "1")] + [gray16, p_alpha]:
        arr = center_crop_arr(img, 8)
        assert arr.shape == (8, 8, 3) and arr.dtype == np.uint8, img.mode
    gray = center_crop_arr(base.convert("L"), 8)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert (center_crop_arr(base, 8) == center_crop_arr(base.convert("RGBA"), 8)).all()  # alpha dropped


def test_image_folder_listing_sorted(setup):
    _, data, _, _ = setup
    classes, items = list_image_folder(data / "train")
    assert classes == CLASSES
    assert [r for r, _ in items] == sorted(r for r, _ in items) and len(items) == VALID + len(BAD)
    assert "n02/notes.txt" not in [r for r, _ in items]


# ----------------------------------------------------------------------------- extraction


def test_counts_labels_flip_rows_and_skips(setup, reference, caplog):
    work, data, ckpt, model = setup
    tokens, labels, meta = load_tokens(reference)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and tokens.shape == (2 * VALID, 16)
    assert meta["num_images"] == VALID and meta["num_rows"] == 2 * VALID and meta["rows_per_image"] == 2
    assert meta["class_names"] == CLASSES and meta["num_classes"] == 3 and meta["num_files"] == VALID + 2
    assert meta["codebook_size"] == 32 and meta["grid"] == 4 and meta["seq_len"] == 16 and meta["resolution"] == 8
    assert len(meta["tokenizer_sha256"]) == 64
    assert labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert {s["file"] for s in meta["skipped"]} == BAD and all(s["reason"] for s in meta["skipped"])
    assert len(np.unique(tokens)) > 4  # the tokenizer is not degenerate, so the comparisons below mean something
    # each image row, then its flip row, equal the tokens of that image computed directly
    _, items = list_image_folder(data / "train")
    good = [rel for rel, _ in items if rel not in BAD]
    for k, rel in enumerate(good):
        x = preprocess_image(Image.open(data / "train" / rel), 8)  # [3,8,8]
        assert torch.equal(model.encode(x[None]).flatten(), torch.from_numpy(tokens[2 * k].astype(np.int64)))
        assert torch.equal(model.encode(x.flip(-1)[None]).flatten(),
                           torch.from_numpy(tokens[2 * k + 1].astype(np.int64)))
    # the log names every skipped file too (rerun into a new folder to capture it)
    with caplog.at_level("WARNING", logger="token_dataset"):
        assert run_cli(data, ckpt, work / "logged", "--workers", "0") == 0
    assert all(b in caplog.text for b in BAD)
    same_dataset(reference, work / "logged")  # DataLoader workers do not change the result


def test_validation_split_has_one_row_per_image(setup, reference):
    work, data, ckpt, _ = setup
    out = work / "val"
    assert run_cli(data, ckpt, out, "--workers", "0", "--no-flip") == 0
    tokens, labels, meta = load_tokens(out)
    ref_tokens, ref_labels, _ = load_tokens(reference)
    assert meta["rows_per_image"] == 1 and tokens.shape == (VALID, 16)
    assert (tokens == ref_tokens[0::2]).all() and (labels == ref_labels[0::2]).all()


def test_crash_then_resume_is_identical_and_skips_finished_chunks(setup, reference, capsys):
    work, data, ckpt, _ = setup
    out = work / "resumed"
    assert run_cli(data, ckpt, out, "--workers", "0", "--stop-after-chunks", "2") == 3
    partial = out / "_partial"
    done = sorted(partial.glob("chunk_*.npz"))
    assert len(done) == 2 and not (out / "meta.json").exists()
    with pytest.raises(MissingTokenDatasetError, match="unfinished"):
        load_tokens(out)
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done}
    # another chunking would mix incompatible chunks: refused, partial results kept
    assert run_cli(data, ckpt, out, "--workers", "0", "--chunk-size", "3") == 2
    assert "different run" in capsys.readouterr().err
    assert run_cli(data, ckpt, out, "--workers", "0", "--keep-partial") == 0
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done} == stamps  # not recomputed
    assert len(list(partial.glob("chunk_*.npz"))) == 6
    same_dataset(reference, out)
    # a rerun of a finished dataset does nothing
    before = (out / "tokens.npy").stat().st_mtime_ns
    assert run_cli(data, ckpt, out, "--workers", "0") == 0
    assert (out / "tokens.npy").stat().st_mtime_ns == before


def test_torchrun_two_processes_match_one(setup, reference):
    work, data, ckpt, _ = setup
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to the python executable")
    out = work / "torchrun"
    # rank 1 lags after each broadcast, so rank 0 writes chunks first: every rank must still work from
    # rank 0's list of pending chunks (regression: ranks once listed them themselves and skipped chunks)
    lagging = work / "lagging_rank1.py"
    lagging.write_text(
        "import os, runpy, sys, time\n"
        "from libs.data import tokens as td\n"
        "plain = td.Distributed.broadcast\n"
        "def lagging(self, obj):\n"
        "    out = plain(self, obj)\n"
        "    time.sleep(1.0 if self.rank == 1 else 0.0)\n"
        "    return out\n"
        "td.Distributed.broadcast = lagging\n"
        "sys.argv[0] = 'extract_imagenet_feature.py'\n"
        "runpy.run_path('extract_imagenet_feature.py', run_name='__main__')\n")
    cmd = [str(torchrun), "--nproc_per_node=2", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
           str(lagging), "--path", str(data), "--split", "train", "--out", str(out),
           "--config", "configs/tiny.py", f"--config.tokenizer.checkpoint={ckpt}", "--chunk-size", "2",
           "--batch-size", "3", "--workers", "0", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    same_dataset(reference, out)
    assert not (out / "_partial").exists()


def test_missing_tokenizer_checkpoint_names_the_asset(setup, tmp_path, monkeypatch, capsys):
    _, data, _, _ = setup
    monkeypatch.chdir(tmp_path)  # the default config's relative assets/ path does not exist here
    cfg = load_config_file("configs/ka_mig_l.py")
    with pytest.raises(MissingAssetError, match="vqgan_jax_strongaug.ckpt"):
        extract_token_dataset(data / "train", tmp_path / "out", cfg.tokenizer, flip=True)
    assert extract_imagenet_feature.main(["--path", str(data), "--split", "train"]) == 2
    err = capsys.readouterr().err
    assert "vqgan_jax_strongaug.ckpt" in err and "assets" in err
    assert not (tmp_path / "assets" / "imagenet256_vq_features").exists()


# ----------------------------------------------------------------------------- loader


def test_loader_reads_the_paper_format(setup, reference, tmp_path):
    tokens, labels, meta = load_tokens(reference)
    paper = np.concatenate([labels[:, None], tokens.astype(np.int64)], axis=1)  # [N, 1+L] rows [label, ids]
    np.save(tmp_path / "paper.npy", paper)
    p_tokens, p_labels, p_meta = load_tokens(tmp_path / "paper.npy")
    assert (np.asarray(p_tokens) == tokens).all() and (p_labels == labels).all() and p_labels.dtype == np.int64
    assert p_meta["grid"] == 4 and p_meta["seq_len"] == 16 and p_meta["num_rows"] == len(labels)
    assert p_meta["codebook_size"] == int(tokens.max()) + 1 and p_meta["num_classes"] == 3
    assert load_tokens(tmp_path / "paper.npy", codebook_size=32)[2]["codebook_size"] == 32


def test_loader_errors(tmp_path):
    with pytest.raises(MissingTokenDatasetError) as err:
        load_tokens(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    assert "python extract_imagenet_feature.py --path data --split train" in str(err.value)
    meta = {"codebook_size": 8, "grid": 2, "num_classes": 2}
    write_token_dataset(tmp_path / "ok", np.arange(8).reshape(2, 4), np.array([0, 1]), meta)
    assert len(load_tokens(tmp_path / "ok")[0]) == 2
    with pytest.raises(TokenDatasetError, match="codes were expected"):
        load_tokens(tmp_path / "ok", codebook_size=16)
    write_token_dataset(tmp_path / "big_id", np.array([[0, 1, 2, 8]]), np.array([0]), meta)
    with pytest.raises(TokenDatasetError, match="outside"):
        load_tokens(tmp_path / "big_id")
    write_token_dataset(tmp_path / "bad_label", np.array([[0, 1, 2, 3]]), np.array([2]), meta)
    with pytest.raises(TokenDatasetError, match="labels"):
        load_tokens(tmp_path / "bad_label")
    with pytest.raises(TokenDatasetError, match="seq_len"):
        write_token_dataset(tmp_path / "shape", np.zeros((1, 5), np.int64), np.array([0]), meta)
        load_tokens(tmp_path / "shape")
    (tmp_path / "minimal").mkdir()  # hand-written dataset: shapes and codebook derived from the arrays
    np.save(tmp_path / "minimal" / "tokens.npy", np.array([[0, 5, 2, 1]], np.uint16))
    np.save(tmp_path / "minimal" / "labels.npy", np.array([0], np.int64))
    (tmp_path / "minimal" / "meta.json").write_text('{"num_classes": 1}')
    assert {k: load_tokens(tmp_path / "minimal")[2][k] for k in ("codebook_size", "grid", "seq_len")} == \
        {"codebook_size": 6, "grid": 2, "seq_len": 4}
    np.save(tmp_path / "not_square.npy", np.zeros((3, 1 + 5), np.int64))
    with pytest.raises(TokenDatasetError, match="square"):
        load_tokens(tmp_path / "not_square.npy")
    np.save(tmp_path / "negative.npy", np.array([[0, 1, -1, 2, 3]], np.int64))
    with pytest.raises(TokenDatasetError, match="outside"):
        load_tokens(tmp_path / "negative.npy", codebook_size=4)
