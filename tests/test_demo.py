"""The CPU demo: procedural data, tokenizer training, committed weights, and a smoke run of the pipeline."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from demo import procedural_data as demo_data

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- data


def test_demo_data_is_deterministic_and_balanced():
    a, la = demo_data.make_images(3, num_classes=10, resolution=32, seed=7)
    b, lb = demo_data.make_images(3, num_classes=10, resolution=32, seed=7)
    c, _ = demo_data.make_images(3, num_classes=10, resolution=32, seed=8)
    assert a.shape == (30, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert np.array_equal(np.bincount(la), np.full(10, 3))
    assert demo_data.class_names(10) == sorted(demo_data.class_names(10))  # folder order == class order


def class_measurements(images, labels, c):
    """Object mask (pixels near the class colour) -> centroids [n,2], mean colour [3], mean power spectrum."""
    spec = demo_data.class_spec(c)
    x = images[labels == c].astype(np.float64) / 255.0  # [n,R,R,3]
    R = x.shape[1]
    mask = np.linalg.norm(x - np.array(spec.color), axis=-1) < 0.25  # [n,R,R]
    coords = (np.arange(R) + 0.5) / R
    cx = (mask * coords[None, None, :]).sum((1, 2)) / mask.sum((1, 2))
    cy = (mask * coords[None, :, None]).sum((1, 2)) / mask.sum((1, 2))
    color = x[mask].mean(0)
    lum = x.mean(-1) - x.mean(-1).mean((1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(lum)) ** 2).mean(0)  # phase-free, so random texture phases do not cancel
    power[0, 0] = 0.0
    return np.stack([cx, cy], 1), color, mask.mean((1, 2)), power


def test_demo_data_has_the_class_structure_it_claims():
    images, labels = demo_data.make_images(40, seed=0)
    centres, colors = [], []
    for c in range(10):
        spec = demo_data.class_spec(c)
        centroid, color, area, power = class_measurements(images, labels, c)
        assert area.min() > 0.02  # every image shows its object
        assert np.abs(centroid.mean(0) - np.array(spec.center)).max() < 0.04  # typical position
        assert np.abs(color - np.array(spec.color)).max() < 0.12  # object colour
        centres.append(centroid.mean(0))
        colors.append(color)
        half = power[:16, :16]
        peak = np.unravel_index(np.argmax(half), half.shape)  # (ky, kx) of the strongest texture frequency
        f = int(spec.frequency)
        expected = {"hstripes": (f, 0), "vstripes": (0, f), "checker": (f, f)}.get(spec.texture)
        if expected is not None:
            assert tuple(int(v) for v in peak) == expected, (c, spec.texture, peak)
    centres, colors = np.array(centres), np.array(colors)
    pair = lambda a: np.linalg.norm(a[:, None] - a[None], axis=-1) + np.eye(len(a)) * 9  # noqa: E731
    assert pair(centres).min() > 0.08  # the classes' mean positions are measurably apart
    assert pair(colors).min() > 0.2  # and so are their colours
    _, _, ring_area, _ = class_measurements(images, labels, demo_data.SHAPES.index("ring"))
    _, _, circle_area, _ = class_measurements(images, labels, demo_data.SHAPES.index("circle"))
    assert ring_area.mean() < 0.8 * circle_area.mean()  # shapes differ: a ring covers less than a disc


def test_write_demo_splits_writes_image_folders(tmp_path):
    from libs.data.images import list_image_folder
    written = demo_data.write_demo_splits(tmp_path / "d", ["train", "val"], num_classes=3, resolution=16, seed=0,
                                          per_class={"train": 2, "val": 1})
    names, items = list_image_folder(written["train"])
    assert names == demo_data.class_names(3) and len(items) == 6
    _, val_items = list_image_folder(written["val"])
    assert len(val_items) == 3
    train0 = np.asarray(Image.open(written["train"] / items[0][0]))
    assert train0.shape == (16, 16, 3)
    images, _ = demo_data.make_images(2, 3, 16, seed=0)
    assert np.array_equal(train0, images[0])  # the PNGs hold exactly the generated pixels
    assert json.loads((tmp_path / "d" / "val.json").read_text())["seed"] == 1  # held-out split: its own seed


# ----------------------------------------------------------------------------- tokenizer training


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second torch thread, and on a busy CPU they lose a lot to it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tokenizer_training_reduces_reconstruction_error(tmp_path, one_thread):
    from libs.models.factory import load_tokenizer
    from libs.models.vqgan import VQGAN, VQGANConfig
    from configs import demo
    from demo.tokenizer_training import code_usage, reconstruction_mse, save_tokenizer, train_config, train_tokenizer
    images, _ = demo_data.make_images(12, resolution=16, seed=0)  # [120,16,16,3]
    held_out, _ = demo_data.make_images(3, resolution=16, seed=1)
    torch.manual_seed(0)
    cfg = VQGANConfig(channels=8, channel_mult=(1, 2), num_res_blocks=1, embed_dim=8, codebook_size=32,
                      resolution=16, norm_groups=4)
    model = VQGAN(cfg)
    before = reconstruction_mse(model, held_out)
    train_cfg = demo.get_config().tokenizer_train
    train_cfg.update(dict(steps=40, batch_size=8, lr=3e-3, warmup_steps=5, kmeans_images=32, restart_interval=20,
                          log_interval=20))
    history = train_tokenizer(model, images, train_config(train_cfg), progress=False)
    after = reconstruction_mse(model, held_out)
    assert after < 0.6 * before, (before, after)
    assert [row["step"] for row in history] == [20, 40]
    assert code_usage(model, held_out)["codes_used"] >= 8  # k-means init + restarts: no collapse onto a few codes
    path = save_tokenizer(model, tmp_path / "vq.pth")
    import ml_collections
    tok = ml_collections.ConfigDict(dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, embed_dim=8,
                                         codebook_size=32, resolution=16, norm_groups=4, checkpoint=str(path)))
    loaded = load_tokenizer(tok)  # strict load through the repo's loader
    x = torch.from_numpy(held_out[:4]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(loaded.encode(x), model.encode(x))


def test_train_tokenizer_entry_is_seeded(tmp_path, one_thread):
    from demo import train_tokenizer
    demo_data.write_demo_splits(tmp_path / "d", ["train", "val"], num_classes=10, resolution=32, seed=0,
                                per_class={"train": 2, "val": 1})
    args = ["--data", str(tmp_path / "d" / "train"), "--val", str(tmp_path / "d" / "val"),
            "--config.tokenizer_train.steps=2", "--config.tokenizer_train.kmeans_images=8",
            "--config.tokenizer_train.log_interval=1", "--config.tokenizer_train.batch_size=4"]
    r1 = train_tokenizer.main(args + ["--out", str(tmp_path / "a.pth")])
    train_tokenizer.main(args + ["--out", str(tmp_path / "b.pth")])
    a = torch.load(tmp_path / "a.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "a.pth.json").read_text())
    assert report["report"]["recon_mse_after"] == pytest.approx(r1["recon_mse_after"])


# ----------------------------------------------------------------------------- committed weights


def test_committed_demo_weights_load_and_are_small():
    from configs import demo
    from libs.checkpoint import file_sha256, load_state_dict_file, load_strict
    from libs.models.autonat import AutoNAT
    from libs.models.factory import backbone_config, load_tokenizer
    config = demo.get_config()
    assets = REPO / config.demo.assets
    manifest = json.loads((assets / "manifest.json").read_text())
    total = 0
    for name, info in manifest["files"].items():
        assert file_sha256(assets / name) == info["sha256"], f"{name} differs from demo/assets/manifest.json"
        total += (assets / name).stat().st_size
    assert total < 20 * 2 ** 20
    tokenizer = load_tokenizer(config.tokenizer, checkpoint=REPO / config.tokenizer.checkpoint)
    assert tokenizer.grid_size ** 2 == config.model.seq_len
    backbone = AutoNAT(backbone_config(config.model))
    load_strict(backbone, load_state_dict_file(REPO / config.train.init_checkpoint))


def test_run_demo_names_missing_weights(tmp_path, capsys):
    from demo import run_demo
    with pytest.raises(SystemExit) as e:
        run_demo.main(["--smoke", "--assets", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert "demo weights not found" in str(e.value) and "make demo-assets" in str(e.value)
    with pytest.raises(SystemExit):
        run_demo.main(["--smoke", "--config.demo.no_such_key=1"])  # unknown keys fail before any work
    assert "no_such_key" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the pipeline, end to end


def png_decodes(path) -> tuple:
    with Image.open(path) as im:
        im.load()
        return im.size


def test_demo_smoke_run_writes_every_artifact(tmp_path):
    """`python -m demo.run_demo --smoke`: every real script runs once at tiny size; all outputs exist and are valid."""
    out, data = tmp_path / "out", tmp_path / "data"
    proc = subprocess.run([sys.executable, "-m", "demo.run_demo", "--smoke", "--out", str(out), "--data", str(data)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from configs import demo_smoke
    config = demo_smoke.get_config()
    d, C = config.demo, config.model.num_classes
    # data, tokens, graphs
    assert len(list((data / "train").rglob("*.png"))) == C * d.train_per_class
    assert len(list((data / "val").rglob("*.png"))) == C * d.val_per_class
    assert json.loads((out / "tokens" / "train" / "meta.json").read_text())["num_rows"] == C * d.train_per_class
    for name in ("codebook_co_occurrence_norm_self_50.pkl", "codebook_replace_graph_norm_self.pkl", "incompatibility.npz"):
        assert (out / "graphs" / name).is_file()
    # training
    assert (out / "ka_mig" / "model_ema.pth").is_file()
    log = (out / "ka_mig" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and len(log) == 1 + config.train.n_steps
    # grids and the comparison figure
    w, h = png_decodes(out / "grid_ka_mig.png")
    assert w == d.grid_per_class * 32 and h >= C * 32
    png_decodes(out / "grid_backbone.png")
    png_decodes(out / "comparison.png")
    # samples and FID of both models, same labels
    npz = {k: np.load(out / f"fid_{k}" / "samples.npz") for k in ("ka_mig", "backbone")}
    for k, z in npz.items():
        assert z["arr_0"].shape == (d.fid_samples, 32, 32, 3) and z["arr_0"].dtype == np.uint8, k
    assert np.array_equal(npz["ka_mig"]["labels"], npz["backbone"]["labels"])
    ref = np.load(out / "fid_ref_val.npz")
    assert ref["mu"].shape == (2048,) and int(ref["n"]) == C * d.val_per_class
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["fid"]) == {"ka_mig", "backbone"}
    assert all(math.isfinite(v) and v >= 0 for v in metrics["fid"].values())
    assert metrics["num_samples"] == d.fid_samples
    assert metrics["num_samples_per_model"] == {"ka_mig": d.fid_samples, "backbone": d.fid_samples}
    assert metrics["ka_mig_better"] == (metrics["fid"]["ka_mig"] < metrics["fid"]["backbone"])
    stages = ["data", "tokens", "graphs", "train_ka_mig", "grid_ka_mig", "grid_backbone", "fid_reference",
              "fid_ka_mig", "fid_backbone"]
    assert list(metrics["stage_seconds"]) == stages
    assert all(v > 0 for v in metrics["stage_seconds"].values())
    assert sorted(p.name for p in (out / "logs").iterdir()) == [f"{i + 1:02d}_{s}.log" for i, s in enumerate(stages)]
    summary = (out / "summary.txt").read_text()
    assert "FID KA-MIG" in summary and "FID backbone" in summary and summary in proc.stdout


def test_make_assets_recipe_smoke(tmp_path):
    """`python -m demo.make_assets` at tiny size: tokenizer + backbone weights that load strictly, and a true manifest."""
    from configs import demo_smoke
    from libs.models.autonat import AutoNAT
    from libs.models.factory import backbone_config
    from libs.checkpoint import file_sha256, load_state_dict_file, load_strict
    from libs.models.factory import load_tokenizer
    assets = tmp_path / "assets"
    proc = subprocess.run([sys.executable, "-m", "demo.make_assets", "--config", "configs/demo_smoke.py",
                           "--assets", str(assets), "--work", str(tmp_path / "work"), "--data", str(tmp_path / "data"),
                           "--config.train.n_steps=2", "--config.train.batch_size=8", "--config.train.log_interval=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((assets / "manifest.json").read_text())
    assert list(manifest["stage_seconds"]) == ["data", "tokenizer", "tokens", "backbone"]
    for name, info in manifest["files"].items():
        assert file_sha256(assets / name) == info["sha256"]
    config = demo_smoke.get_config()
    load_tokenizer(config.tokenizer, checkpoint=assets / "vqgan_demo.pth")
    load_strict(AutoNAT(backbone_config(config.model)), load_state_dict_file(assets / "autonat_demo.pth"))
    assert manifest["backbone"]["steps"] == 2 and (assets / "autonat_demo_log.csv").is_file()
