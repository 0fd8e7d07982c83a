"""generate_img.py and generate_npz.py with tiny models: files, determinism, distributed resume."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import patch_feature_extractor, write_reference_stats

REPO = Path(__file__).resolve().parents[1]


def test_generate_img_writes_pngs_and_grid(tiny_assets, tmp_path):
    import generate_img
    root, overrides = tiny_assets
    args = ["--checkpoint", str(root / "ka_mig.pth"), "--classes", "0", "3", "--per-class", "3",
            "--out", str(tmp_path), "--batch-size", "4", "--device", "cpu", *overrides]
    run_dir = generate_img.main(args)
    pngs = sorted(run_dir.glob("0*.png"))
    assert len(pngs) == 6
    assert np.asarray(Image.open(pngs[0])).shape == (8, 8, 3)
    assert Image.open(run_dir / "grid.png").size[0] == 3 * 8
    first = {p.name: p.read_bytes() for p in pngs}
    again = generate_img.main(args + ["--overwrite"])  # deletes the PNGs, samples them again: same bytes
    assert again == run_dir and {p.name: p.read_bytes() for p in sorted(again.glob("0*.png"))} == first
    bare = generate_img.main(["--model", "autonat", "--checkpoint", str(root / "backbone.pth"), "--classes", "1",
                              "--per-class", "2", "--out", str(tmp_path / "bare"), "--schedule", "maskgit",
                              "--steps", "4", "--cfg", "2", "--device", "cpu", *overrides])
    assert len(list(bare.glob("0*.png"))) == 2


def test_generate_img_refuses_mismatched_tokenizer(tiny_assets, tmp_path):
    import generate_img
    root, overrides = tiny_assets
    with pytest.raises(ValueError, match="codebook 64"):
        generate_img.main(["--checkpoint", str(root / "ka_mig.pth"), "--out", str(tmp_path), "--classes", "1",
                           *overrides, "--config.tokenizer.codebook_size=64"])


def run_npz(root, overrides, out, nproc, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", "generate_npz.py", "--checkpoint", str(root / "ka_mig.pth"),
           "--num-samples", "10", "--batch-size", "3", "--out", str(out), "--no-fid", "--device", "cpu", *overrides, *extra]
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)


def test_generate_npz_two_processes_resume_is_byte_identical(tiny_assets, tmp_path):
    root, overrides = tiny_assets
    full = run_npz(root, overrides, tmp_path / "full", 2)
    assert full.returncode == 0, full.stderr[-3000:]
    pngs = sorted((tmp_path / "full" / "samples").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(10)]
    npz = np.load(tmp_path / "full" / "samples.npz")
    assert npz["arr_0"].shape == (10, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
    assert np.array_equal(npz["labels"], np.arange(10) % 4)
    for i, p in enumerate(pngs):
        assert np.array_equal(npz["arr_0"][i], np.asarray(Image.open(p)))
    crashed = run_npz(root, overrides, tmp_path / "resumed", 2, ["--stop-after-batches=1"])
    assert crashed.returncode != 0
    done = len(list((tmp_path / "resumed" / "samples").glob("*.png")))
    assert 0 < done < 10 and not (tmp_path / "resumed" / "samples.npz").exists()
    (tmp_path / "resumed" / "samples" / "000000.png").write_bytes(b"truncated")  # unreadable -> redone
    resumed = run_npz(root, overrides, tmp_path / "resumed", 1)  # another world size is fine
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for p in pngs:
        assert (tmp_path / "resumed" / "samples" / p.name).read_bytes() == p.read_bytes(), p.name


def test_generate_npz_writes_metrics_and_refuses_bad_reference(tiny_assets, tmp_path, use_fid_extractor, monkeypatch):
    import generate_npz
    import json
    root, overrides = tiny_assets
    ref = write_reference_stats(tmp_path / "ref.npz", use_fid_extractor)
    calls = []
    patch_feature_extractor(monkeypatch, lambda *a, **k: calls.append(k) or use_fid_extractor)
    args = ["--checkpoint", str(root / "ka_mig.pth"), "--num-samples", "6", "--batch-size", "3",
            "--device", "cpu", *overrides]
    generate_npz.main(args + ["--out", str(tmp_path / "ok"), "--ref-stats", str(ref),
                              "--inception-cache", str(tmp_path / "inception.pth")])
    assert calls[0]["cache"] == str(tmp_path / "inception.pth")  # the flag reaches the loader
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert np.isfinite(metrics["fid"]) and metrics["n"] == 6
    assert metrics["inception_weights"] == use_fid_extractor.source
    from libs.errors import BadInput, MissingInput
    with pytest.raises(MissingInput, match="reference statistics not found"):
        generate_npz.main(args + ["--out", str(tmp_path / "bad"), "--ref-stats", str(tmp_path / "nope.npz")])
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    np.savez(tmp_path / "wrong_dim.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(BadInput, match="feature dimension mismatch"):
        generate_npz.main(args + ["--out", str(tmp_path / "dim"), "--ref-stats", str(tmp_path / "wrong_dim.npz")])
    assert not (tmp_path / "dim").exists()


def test_labelled_grid_places_images_and_captions():
    from libs.sampling.generation import labelled_grid
    h = w = 32
    images = np.full((8, h, w, 3), 200, np.uint8)
    images[5] = 7  # a marked image: row 1, column 1 of a 4-column grid
    names = {0: "goldfish, Carassius auratus", 1: "great white shark"}
    grid = np.asarray(labelled_grid(images, np.array([0] * 4 + [1] * 4), names, columns=4).convert("L"))
    assert grid.shape == (2 * (h + 14), 4 * w)
    assert (grid[h + 14 + 14:, w:2 * w] == 7).all()  # image 5 below row 1's caption strip
    inked = grid[:14] < 128  # row 0's caption strip: one class -> one caption running past the first image
    assert inked[:, :w].any() and inked[:, w:].any()
    mixed = np.asarray(labelled_grid(images[:4], np.array([0, 1, 0, 1]), names, columns=4).convert("L"))
    for c in range(4):  # a mixed row: every image gets its own caption
        assert (mixed[:14, c * w:(c + 1) * w] < 128).any()


def test_generate_npz_eight_processes_into_a_new_folder(tiny_assets, tmp_path):
    """torchrun's 8 ranks start together into an --out that does not exist: the output probe (which creates and
    removes folders) runs on rank 0 only, so no rank loses a race with another's probe (launched several times)."""
    root, overrides = tiny_assets
    for attempt in range(2):
        out = tmp_path / f"new{attempt}" / "deeper" / "npz"
        done = run_npz(root, overrides, out, 8, ["--num-samples=8", "--batch-size=1"])
        assert done.returncode == 0, f"attempt {attempt}: {done.stderr[-3000:]}"
        assert np.load(out / "samples.npz")["arr_0"].shape[0] == 8


def test_rank_zero_verdict_reaches_every_rank(tiny_assets, tmp_path):
    """A pre-flight check that fails on rank 0 stops every rank with exit status 2 and one printed line."""
    root, overrides = tiny_assets
    (tmp_path / "blocked").write_text("a file where the output folder goes")
    done = run_npz(root, overrides, tmp_path / "blocked" / "npz", 4)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "blocked" in errors[0], done.stderr[-3000:]
