"""The CPU demo: data, tokenizer training, committed weights, the measurement helpers, and smoke runs of the drivers."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
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
    path = save_tokenizer(model, tmp_path / "vq.safetensors")
    from libs.checkpoint import weights_format, weights_metadata
    assert weights_format(path) == "safetensors"  # weights only, the config that built it in the metadata
    assert json.loads(weights_metadata(path)["config"]) == {"tokenizer": json.loads(json.dumps(model.config_dict()))}
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
    r1 = train_tokenizer.main(args + ["--out", str(tmp_path / "a.safetensors")])
    train_tokenizer.main(args + ["--out", str(tmp_path / "b.safetensors")])
    a, b = (tmp_path / "a.safetensors").read_bytes(), (tmp_path / "b.safetensors").read_bytes()
    assert a == b and load_file(tmp_path / "a.safetensors")  # seeded and byte-reproducible
    report = json.loads((tmp_path / "a.safetensors.json").read_text())
    assert report["report"]["recon_mse_after"] == pytest.approx(r1["recon_mse_after"])
    from libs.checkpoint import weights_metadata
    stored = json.loads(weights_metadata(tmp_path / "a.safetensors")["config"])
    assert stored["train"] == report["train"] and stored["train"]["steps"] == 2
    assert {k: stored["tokenizer"][k] for k in ("channels", "codebook_size", "resolution")} == \
        {k: report["tokenizer"][k] for k in ("channels", "codebook_size", "resolution")}


# ----------------------------------------------------------------------------- committed weights


@pytest.mark.parametrize("config_name", ["demo", "demo_fashion", "demo_fashion_maskgit"])
def test_committed_demo_weights_load_and_match_their_manifest(config_name):
    import importlib
    from demo.pipeline import asset_names
    from libs.checkpoint import file_sha256, load_state_dict_file, load_strict, weights_format, weights_metadata
    from libs.models.factory import build_model, load_tokenizer, model_kind
    config = importlib.import_module(f"configs.{config_name}").get_config()
    assets = REPO / config.demo.assets
    manifest = json.loads((assets / asset_names(config.demo)["manifest"]).read_text())
    for name, info in manifest["files"].items():
        assert file_sha256(assets / name) == info["sha256"], f"{name} differs from {assets}/manifest.json"
    tokenizer = load_tokenizer(config.tokenizer, checkpoint=REPO / config.tokenizer.checkpoint)
    assert tokenizer.grid_size ** 2 == config.model.seq_len
    for path in (config.tokenizer.checkpoint, config.train.init_checkpoint):  # weights only, listed in the manifest
        assert weights_format(REPO / path) == "safetensors" and Path(path).name in manifest["files"], path
    stored = json.loads(weights_metadata(REPO / config.tokenizer.checkpoint)["config"])
    assert stored["tokenizer"] == json.loads(json.dumps(tokenizer.config_dict()))
    report = json.loads((REPO / (config.tokenizer.checkpoint + ".json")).read_text())
    assert report["train"] == stored["train"] and report["report"] == manifest["tokenizer"]
    backbone = build_model(config, model_kind(config, graphs=False))  # AutoNAT, or MaskGIT on the MaskGIT host
    load_strict(backbone, load_state_dict_file(REPO / config.train.init_checkpoint))
    if config.demo.reference_features:
        with np.load(assets / config.demo.reference_features) as z:
            n = config.model.num_classes * config.demo.fid_reference_per_class
            assert z["features"].shape == (n, 2048) and z["features"].dtype == np.float16
            assert np.isfinite(z["features"]).all() and len(str(z["images_sha256"])) == 64


def test_committed_demo_assets_stay_small():
    total = sum(p.stat().st_size for p in (REPO / "demo" / "assets").rglob("*") if p.is_file())
    assert total < 26 * 2 ** 20  # 20 MiB + the synthetic folder's legacy .pth copies (5.0 MiB) and some slack


LEGACY_DEMO_WEIGHTS = ("autonat_demo", "vqgan_demo")  # demo/assets/synthetic/<name>.pth beside <name>.safetensors


@pytest.mark.parametrize("name", LEGACY_DEMO_WEIGHTS)
def test_legacy_synthetic_pth_copies_hold_exactly_the_safetensors_tensors(name):
    """The synthetic demo's torch files, kept for scripts that read them by name, cannot drift from the
    .safetensors files the configs use: the same names, dtypes, shapes and values, and the same side config."""
    from libs.checkpoint import load_state_dict_file, read_weights_file, weights_format, weights_metadata
    folder = REPO / "demo" / "assets" / "synthetic"
    legacy, current = folder / f"{name}.pth", folder / f"{name}.safetensors"
    assert weights_format(legacy) == "torch" and weights_format(current) == "safetensors"
    old, new = load_state_dict_file(legacy), load_state_dict_file(current)
    assert sorted(old) == sorted(new)  # .safetensors stores its names sorted
    for key, value in new.items():
        assert old[key].dtype == value.dtype and torch.equal(old[key], value), key
    obj = read_weights_file(legacy)
    side = {k: v for k, v in obj.items() if k != "state_dict"} if "state_dict" in obj else None
    stored = weights_metadata(current).get("config")
    assert (side and json.loads(json.dumps(side))) == (stored and json.loads(stored))  # vqgan: tokenizer, train


def old_demo_assets(folder):
    """A demo assets folder as committed before .safetensors: torch files, a report, two manifests naming them.
    -> {old name: its state dict}."""
    from libs.atomic_io import atomic_torch_save
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    tok = {"enc.w": torch.randn(4, 3, generator=g), "codes": torch.randn(8, 2, generator=g).half()}
    net = {"emb.w": torch.randn(5, 2, generator=g), "steps": torch.arange(3)}
    atomic_torch_save({"state_dict": tok, "tokenizer": {"channels": 4, "channel_mult": (1, 2)},
                       "train": {"steps": 7}}, folder / "vqgan_demo.pth")
    atomic_torch_save(net, folder / "autonat_demo.pth")
    (folder / "vqgan_demo.pth.json").write_text(json.dumps({"report": {"codes_used": 8}, "tokenizer": {
        "checkpoint": "demo/assets/x/vqgan_demo.pth"}}))
    other = {"bytes": 3, "sha256": "abc"}
    files = {"vqgan_demo.pth": {"bytes": 1, "sha256": "0"}, "autonat_demo.pth": {"bytes": 2, "sha256": "1"},
             "fid_reference_test.npz": other}
    (folder / "manifest.json").write_text(json.dumps({"recipe": "a", "files": files, "tokenizer": {"x": 1}}))
    (folder / "maskgit_demo_manifest.json").write_text(json.dumps({
        "recipe": "demo/make_data.py -> the committed vqgan_demo.pth -> train_graph.py",
        "files": {"vqgan_demo.pth": {"bytes": 1, "sha256": "0"}, "maskgit_demo.safetensors": other}}))
    return {"vqgan_demo.pth": tok, "autonat_demo.pth": net}


def test_demo_assets_to_safetensors_converts_renames_and_is_idempotent(tmp_path):
    """tools.demo_assets_to_safetensors: the same tensors under the new names, every manifest's entries and text
    follow, a second run (with or without the old files) changes nothing; a manifest naming an absent file fails."""
    from libs.checkpoint import file_sha256, weights_format, weights_metadata
    from libs.errors import MissingInput
    from tools import demo_assets_to_safetensors as tool
    folder = tmp_path / "fashion"
    states = old_demo_assets(folder)
    assert tool.main([str(folder)]) == 0
    for old, new in (("vqgan_demo.pth", "vqgan_demo.safetensors"), ("autonat_demo.pth", "autonat_demo.safetensors")):
        assert weights_format(folder / new) == "safetensors" and (folder / old).is_file()
        got = load_file(folder / new)
        assert got.keys() == states[old].keys()
        assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in states[old].items())
    assert json.loads(weights_metadata(folder / "vqgan_demo.safetensors")["config"]) == {
        "tokenizer": {"channels": 4, "channel_mult": [1, 2]}, "train": {"steps": 7}}
    assert json.loads((folder / "vqgan_demo.safetensors.json").read_text()) == {
        "report": {"codes_used": 8}, "tokenizer": {"checkpoint": "demo/assets/x/vqgan_demo.safetensors"}}
    entry = {n: {"bytes": (folder / n).stat().st_size, "sha256": file_sha256(folder / n)}
             for n in ("vqgan_demo.safetensors", "autonat_demo.safetensors")}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"] == {**entry, "fid_reference_test.npz": {"bytes": 3, "sha256": "abc"}}
    assert list(manifest["files"])[-1] == "fid_reference_test.npz" and manifest["tokenizer"] == {"x": 1}
    maskgit = json.loads((folder / "maskgit_demo_manifest.json").read_text())
    assert maskgit["recipe"] == "demo/make_data.py -> the committed vqgan_demo.safetensors -> train_graph.py"
    assert list(maskgit["files"]) == ["vqgan_demo.safetensors", "maskgit_demo.safetensors"]
    assert maskgit["files"]["vqgan_demo.safetensors"] == entry["vqgan_demo.safetensors"]

    snapshot = {p.name: p.read_bytes() for p in folder.iterdir()}
    tool.main([str(folder)])  # again, the old files still there: nothing changes
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == snapshot
    tool.main([str(folder), "--remove-old"])
    kept = {n: b for n, b in snapshot.items() if ".pth" not in n}
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == kept
    tool.main([str(folder)])  # after the old files are gone
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == kept

    (folder / "late_manifest.json").write_text(json.dumps({"files": {"autonat_demo.pth": {}}}))
    (folder / "autonat_demo.safetensors").unlink()
    with pytest.raises(MissingInput, match="late_manifest.json: lists autonat_demo.pth"):
        tool.convert_folder(folder)


def test_run_demo_names_missing_weights(tmp_path, capsys):
    from demo import run_demo
    with pytest.raises(SystemExit) as e:
        run_demo.main(["--smoke", "--assets", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: demo weights not found")
    assert "make demo-assets" in err
    with pytest.raises(SystemExit):
        run_demo.main(["--smoke", "--config.demo.no_such_key=1"])  # unknown keys fail before any work
    assert "no_such_key" in capsys.readouterr().err


@pytest.mark.parametrize("flags, present, missing, command", [
    (["--backbone", "maskgit"], ["vqgan_demo.safetensors"], "maskgit_demo.safetensors",
     "`make demo-assets BACKBONE=maskgit`"),
    (["--backbone", "maskgit"], [], "vqgan_demo.safetensors",  # its tokenizer is the AutoNAT build's
     "`make demo-assets` (the data set's tokenizer), then `make demo-assets BACKBONE=maskgit`"),
    (["--dataset", "synthetic"], ["vqgan_demo.safetensors"], "autonat_demo.safetensors",
     "`make demo-assets DATA=synthetic`"),
    ([], [], "vqgan_demo.safetensors", "`make demo-assets`")])
def test_missing_demo_weights_name_the_make_command_of_their_backbone(tmp_path, capsys, flags, present, missing,
                                                                     command):
    """The rebuild command of a missing demo weight is the Makefile's for that config (BACKBONE, DATA)."""
    from demo import run_demo
    assets = tmp_path / "assets"
    assets.mkdir()
    for name in present:
        (assets / name).write_bytes(b"x")  # only its presence is checked before the missing one
    with pytest.raises(SystemExit) as e:
        run_demo.main([*flags, "--smoke", "--assets", str(assets), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and not (tmp_path / "out").exists()
    expected = f"error: demo weights not found: {assets / missing} (rebuild them with {command})\n"
    assert capsys.readouterr().err == expected


def test_a_bad_data_flag_loses_nothing(tmp_path, capsys):
    """A mistyped --fashion-mnist folder is refused in one line (exit 2) before an earlier run's results go."""
    from demo import ablation, run_demo
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "summary.txt").write_text("an earlier run")
    for main in (run_demo.main, ablation.main):
        with pytest.raises(SystemExit) as e:
            main(["--fashion-mnist", str(tmp_path / "no_such_folder"), "--out", str(out), "--data", str(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: --fashion-mnist") and err.count("\n") == 1
        assert (out / "summary.txt").read_text() == "an earlier run" and (out / "runs").is_dir()
    with pytest.raises(SystemExit) as e:
        ablation.main(["--report-only", "--out", str(tmp_path / "nothing_here")])
    assert e.value.code == 2 and "run `make ablation` first" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the three models


def test_control_is_ka_mig_without_graphs_and_trains_only_the_head(tmp_path):
    """The head-only control: a KA-MIG with every graph off equals its backbone, reads no graph file, and the
    ka_mig training mode trains mlm_layer alone."""
    from libs.models.factory import for_sampling
    from libs.training.trainer import Trainer
    from tests.helpers import K, L, synthetic_tokens, tiny_backbone, tiny_config
    config = tiny_config(tmp_path, "ka_mig", n_steps=3, lr=1e-2)
    for switch in ("use_co", "use_sim", "use_incompat"):
        config.graph[switch] = False
    config.graph.dir = str(tmp_path / "no_graphs_here")
    backbone = tiny_backbone(depth=2).eval()
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    config.train.init_checkpoint = str(tmp_path / "backbone.pth")
    tokens, labels = synthetic_tokens()
    trainer = Trainer(config, tokens, labels)
    model = trainer.unwrapped
    assert not any(k.startswith("graph_layer.") for k in model.state_dict())
    assert trainer.trained_names and all(n.startswith("mlm_layer.") for n in trainer.trained_names)
    ids, cls = torch.randint(0, K + 1, (3, L)), torch.tensor([0, 1, 4])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, cls), backbone(ids, cls))
        assert torch.equal(for_sampling(model)(ids, cls), backbone(ids, cls))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.fit()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all(n.startswith("mlm_layer.") for n in changed)
    assert (tmp_path / "out" / config.run_name / "model_ema.safetensors").is_file()


def test_model_specs_give_the_graph_switches():
    from demo.pipeline import BACKBONE, CONTROL, DEMO_MODELS, KA_MIG
    assert [s.name for s in DEMO_MODELS] == ["backbone", "control", "ka_mig"]
    from configs import demo_fashion
    assert BACKBONE.overrides("g") == [] and BACKBONE.kind(demo_fashion.get_config()) == "autonat"
    assert CONTROL.overrides("g")[:3] == ["--config.graph.use_co=false", "--config.graph.use_sim=false",
                                          "--config.graph.use_incompat=false"]
    assert KA_MIG.overrides("g")[:3] == ["--config.graph.use_co=true", "--config.graph.use_sim=true",
                                         "--config.graph.use_incompat=true"]
    assert "--config.graph.dir=g" in KA_MIG.overrides("g")


def test_the_maskgit_host_builds_maskgit_models_with_a_shuffled_control():
    """configs/demo_fashion_maskgit.py: the same specs build MaskGIT / KA-MaskGIT, named after the host, plus the
    shuffled-graph KA; the AutoNAT demo keeps its three models and names."""
    from configs import demo_fashion, demo_fashion_maskgit
    from demo.pipeline import SHUFFLED, demo_models, host_name
    mg, an = demo_fashion_maskgit.get_config(), demo_fashion.get_config()
    assert [s.name for s in demo_models(an)] == ["backbone", "control", "ka_mig"]
    specs = demo_models(mg)
    assert [s.name for s in specs] == ["backbone", "control", "ka_mig", "shuffled"] and specs[-1] is SHUFFLED
    assert [s.kind(mg) for s in specs] == ["maskgit", "ka_maskgit", "ka_maskgit", "ka_maskgit"]
    assert [s.kind(an) for s in specs[:3]] == ["autonat", "ka_mig", "ka_mig"]
    assert [s.shown_label(mg) for s in specs[2:]] == ["KA-MaskGIT", "KA-MaskGIT, shuffled graphs"]
    assert specs[2].shown_label(an) == "KA-MIG" and (host_name(an), host_name(mg)) == ("KA-MIG", "KA-MaskGIT")
    # everything but the backbone is the AutoNAT demo's: data, tokenizer, KA training, graphs recipe, sampling steps
    for key in ("tokenizer", "graph.recipe", "demo.nll_ratios", "demo.fid_samples", "sample.steps", "train.lr",
                "train.n_steps", "train.batch_size", "model.embed_dim"):
        a, b = an, mg
        for part in key.split("."):
            a, b = a[part], b[part]
        assert a == b, key


def test_asset_names_keep_the_autonat_files_and_name_the_maskgit_ones():
    from configs import demo_fashion, demo_fashion_maskgit
    from demo.pipeline import asset_names
    assert asset_names(demo_fashion.get_config().demo) == {
        "backbone": "autonat_demo.safetensors", "log": "autonat_demo_log.csv", "curve": "autonat_demo_heldout_curve",
        "manifest": "manifest.json"}
    for name in asset_names(demo_fashion.get_config().demo).values():  # the committed files carry those names
        assert any(p.name.startswith(name) for p in (REPO / "demo/assets/fashion").iterdir()), name
    assert asset_names(demo_fashion_maskgit.get_config().demo) == {
        "backbone": "maskgit_demo.safetensors", "log": "maskgit_demo_log.csv", "curve": "maskgit_demo_heldout_curve",
        "manifest": "maskgit_demo_manifest.json"}


def test_demo_assets_data_stage_takes_the_whole_training_split():
    """make_assets asks make_data for every training image (train_per_class=0): the config check must allow it."""
    from demo.pipeline import load_demo_config
    for name in ("demo_fashion", "demo_fashion_maskgit"):
        config = load_demo_config(REPO / "configs" / f"{name}.py", [("demo.train_per_class", "0")])
        assert config.demo.train_per_class == 0 == config.demo.assets_train_per_class


def test_fid_differences_read_in_either_order():
    from demo.report import fid_difference
    fid = {"differences": {"shuffled-ka_mig": {"diff": 2.0, "sd": 0.5, "lo": 1.0, "hi": 3.0}}}
    assert fid_difference(fid, "ka_mig", "shuffled") == {"diff": -2.0, "sd": 0.5, "lo": -3.0, "hi": -1.0}
    assert fid_difference(fid, "shuffled", "ka_mig")["diff"] == 2.0 and fid_difference(fid, "a", "b") is None


def test_ablation_has_every_subset_gat_shuffled_and_a_second_seed():
    from demo.ablation import ablation_models
    specs = ablation_models()
    names = [s.name for s in specs]
    assert names[:2] == ["backbone", "control"] and len(set(names)) == len(names) == 13
    subsets = [tuple(s.graphs) for s in specs if s.graphs and s.gnn == "gcn" and not s.shuffled and s.seed is None]
    assert len(subsets) == len(set(subsets)) == 7
    assert [s.gnn for s in specs if s.name == "gat"] == ["gat"]
    assert [s.shuffled for s in specs if s.name == "shuffled"] == [True]
    seeded = {s.name: s for s in specs if s.seed is not None}
    assert set(seeded) == {"control_seed1", "ka_mig_seed1"}
    assert "--config.seed=1" in seeded["ka_mig_seed1"].overrides("g") and seeded["control_seed1"].graphs == ()


def _ablation_numbers(gain: float, seed_change: float, vs_shuffled_hi: float):
    """Rows and NLL differences shaped like an ablation run: every graph model gains `gain` over the control."""
    def iv(mean, half=0.0003):
        return {"overall": {"mean": mean, "lo": mean - half, "hi": mean + half}}
    rows = [{"model": "backbone", "label": "backbone", "nll_minus_backbone": None, "fid_minus_control_hi": None}]
    for name in ("control", "co", "ka_mig", "shuffled", "control_seed1", "ka_mig_seed1"):
        g = 0.0 if name == "control" else gain
        rows.append({"model": name, "label": name, "nll_minus_control": g, "nll_minus_control_lo": g - 3e-4,
                     "nll_minus_control_hi": g + 3e-4 if name != "control" else None,
                     "nll_minus_backbone": 0.002 + g, "nll_minus_backbone_lo": 0.0015 + g,
                     "nll_minus_backbone_hi": 0.0025 + g, "fid_minus_control_hi": 0.5})
    diffs = {"control_seed1-control": iv(seed_change), "ka_mig-control": iv(gain), "ka_mig_seed1-control_seed1":
             iv(gain), "ka_mig-shuffled": {"overall": {"mean": vs_shuffled_hi - 3e-4, "lo": vs_shuffled_hi - 6e-4,
                                                        "hi": vs_shuffled_hi}}}
    diag = {"ka_mig": {"term_over_hidden_per_block": [0.01, 0.02], "grad_norm": {"zero_convs": 0.02}}}
    return rows, {"differences": diffs}, diag


def test_ablation_reading_separates_knowledge_from_training_noise():
    from demo.ablation import reading
    noise = reading(*_ablation_numbers(gain=-0.001, seed_change=-0.0009, vs_shuffled_hi=1e-5))
    assert "about the size of the control's own seed-to-seed change" in noise
    assert "the real graphs are not better" in noise and "Verdict: at this scale there is no evidence" in noise
    assert "higher held-out NLL than the frozen backbone" in noise and "1.0% to 2.0%" in noise
    real = reading(*_ablation_numbers(gain=-0.01, seed_change=-0.0009, vs_shuffled_hi=-0.005))
    assert "well above the control's own seed-to-seed change" in real and "the real graphs are better" in real
    assert "Verdict" not in real

def test_shuffled_graphs_keep_structure_and_move_the_tokens(tmp_path):
    from demo.ablation import shuffle_graphs
    from libs.graphs.files import graph_paths, load_edge_graph, load_incompatibility, save_edge_graph, \
        save_incompatibility
    from libs.graphs.recipes import unpack_occurrence_torch
    from tests.helpers import K, tiny_graphs
    graphs = tiny_graphs()
    src = graph_paths(tmp_path / "g")
    save_edge_graph(src["co"], *graphs["co"], meta={"codebook_size": K})
    save_edge_graph(src["sim"], *graphs["sim"], meta={"codebook_size": K})
    save_incompatibility(src["incompat"], graphs["incompat"].numpy(), meta={"codebook_size": K, "grid": 4})
    info = shuffle_graphs(tmp_path / "g", tmp_path / "s", K, seed=0)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(K))
    assert info["permutation_head"] == perm[:8].tolist()
    dst = graph_paths(tmp_path / "s")
    for name in ("co", "sim"):
        (i0, w0, n0), (i1, w1, n1) = load_edge_graph(src[name]), load_edge_graph(dst[name])
        assert torch.equal(i1, perm[i0]) and torch.equal(w1, w0) and n1 == n0 == K
        assert not torch.equal(i1, i0)
    o0 = unpack_occurrence_torch(load_incompatibility(src["incompat"])["packed"], K)
    o1 = unpack_occurrence_torch(load_incompatibility(dst["incompat"])["packed"], K)
    assert torch.equal(o1[..., perm], o0) and torch.equal(o1.sum(-1), o0.sum(-1)) and not torch.equal(o1, o0)


# ----------------------------------------------------------------------------- measurement helpers


def test_fid_from_the_sample_factor_equals_the_repo_fid():
    from demo.evaluate import Reference, fid_to_reference
    from libs.evaluation import metrics
    rng = np.random.default_rng(0)
    ref = rng.gamma(2.0, 1.0, (60, 16))
    x = rng.gamma(2.2, 1.1, (40, 16))
    expected = metrics.frechet_distance(*metrics.feature_statistics(x), *metrics.feature_statistics(ref))
    assert fid_to_reference(x, Reference(ref)) == pytest.approx(expected, rel=1e-9)
    few = rng.gamma(2.0, 1.0, (8, 16))  # rank-deficient covariances (n < D) as with 1,000 x 2048 features
    expected = metrics.frechet_distance(*metrics.feature_statistics(few), *metrics.feature_statistics(ref[:10]))
    assert fid_to_reference(few, Reference(ref[:10])) == pytest.approx(expected, rel=1e-8)


def test_half_sample_spread_estimates_the_sampling_sd_and_pairs_models():
    """The spread of FID over random halves matches the SD of FID over independent sample sets."""
    from demo.evaluate import Reference, fid_to_reference, half_sample_spread
    rng = np.random.default_rng(1)
    D, n = 6, 200
    ref = Reference(rng.normal(0, 1, (400, D)))
    draw = lambda: rng.normal(0.3, 1.2, (n, D))  # noqa: E731
    true_sd = np.std([fid_to_reference(draw(), ref) for _ in range(300)], ddof=1)
    x = draw()
    spread = half_sample_spread({"a": x, "b": x.copy(), "c": x + 0.05}, ref, n_subsets=200, seed=0,
                                pairs=[("b", "a"), ("c", "a")])
    assert 0.7 < spread["sd"]["a"] / true_sd < 1.4
    assert spread["diff_sd"]["b-a"] == 0.0  # identical samples: no spread in the difference
    assert 0 < spread["diff_sd"]["c-a"] < spread["sd"]["a"]  # paired halves: the shared noise cancels
    with pytest.raises(ValueError, match="same number"):
        half_sample_spread({"a": x, "b": x[:10]}, ref, 3, 0)


def test_reference_features_are_used_only_for_the_same_images(tmp_path):
    from demo.evaluate import images_sha256, load_reference_features
    from libs.atomic_io import atomic_savez
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    feats = np.random.default_rng(1).random((4, 16)).astype(np.float16)
    atomic_savez(tmp_path / "ref.npz", {"features": feats, "images_sha256": np.asarray(images_sha256(images))})
    loaded, note = load_reference_features(tmp_path / "ref.npz", images_sha256(images))
    assert loaded.dtype == np.float64 and np.array_equal(loaded, feats.astype(np.float64)) and "same images" in note
    other = images.copy()
    other[0, 0, 0, 0] ^= 1  # one pixel differs
    assert load_reference_features(tmp_path / "ref.npz", images_sha256(other))[0] is None
    assert load_reference_features(tmp_path / "absent.npz", images_sha256(images))[0] is None


def test_select_rows_spreads_evenly():
    from demo.evaluate import select_rows
    rows = select_rows(2000, 1000)
    assert len(rows) == 1000 and rows[0] == 0 and np.all(np.diff(rows) == 2)
    labels = np.repeat(np.arange(10), 200)
    assert np.array_equal(np.bincount(labels[rows]), np.full(10, 100))  # class-sorted rows stay balanced
    assert np.array_equal(select_rows(50, 0), np.arange(50)) and np.array_equal(select_rows(50, 80), np.arange(50))


def test_nll_summary_intervals_and_paired_differences(tmp_path):
    from demo.report import nll_summary, verdict
    from libs.atomic_io import atomic_savez
    from libs.evaluation.nll import t_interval
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.5, (300, 2))
    nll = np.stack([base, base - 0.01 + rng.normal(0, 0.005, base.shape), base + rng.normal(0, 0.005, base.shape)])
    atomic_savez(tmp_path / "nll.npz", {"names": np.asarray(["backbone", "ka_mig", "control"]), "nll": nll,
                                         "ratios": np.asarray([0.3, 0.7]), "seed": np.asarray(0)})
    s = nll_summary(tmp_path / "nll.npz")
    assert s["models"]["ka_mig"]["overall"] == t_interval(nll[1].mean(1))
    d = s["differences"]["ka_mig-control"]["overall"]
    assert d["hi"] < 0 and d["mean"] == pytest.approx(-0.01, abs=0.002)
    assert "better than" in verdict(d, "KA-MIG", "control", "nats")
    assert "NOT distinguishable" in verdict(s["differences"]["control-backbone"]["overall"], "c", "b", "nats")
    assert set(s["differences"]) == {"ka_mig-control", "ka_mig-backbone", "control-backbone"}
    assert len(s["differences"]["ka_mig-control"]["per_ratio"]) == 2


def test_line_chart_draws_bands_and_lines():
    from demo.figures import line_chart, nice_ticks
    assert nice_ticks(0.0, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(3.1, 3.9, 5)[0] >= 3.1
    img = line_chart([{"label": "a", "x": [0.1, 0.5, 0.9], "y": [1.0, 2.0, 3.0], "lo": [0.5, 1.5, 2.5],
                       "hi": [1.5, 2.5, 3.5], "color": (255, 0, 0)}], "t", "x", "y", size=(300, 200))
    px = np.asarray(img)
    red = (px[..., 0] > 200) & (px[..., 1] < 60) & (px[..., 2] < 60)
    band = (px[..., 0] > 230) & (px[..., 1] > 150) & (px[..., 1] < 230)  # translucent red over white
    assert red.sum() > 100 and band.sum() > 1000 and img.size[1] == 200 and img.size[0] > 300


# ----------------------------------------------------------------------------- the drivers, end to end


def png_decodes(path) -> tuple:
    with Image.open(path) as im:
        im.load()
        return im.size


def fake_fashion_mnist(folder, train_per_class=5, test_per_class=3):
    """Random 28x28 'images' in the four idx files of Fashion-MNIST (the real data is never needed)."""
    from demo.fashion_mnist import write_idx_folder
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), n)).astype(np.uint8)
        splits[split] = (rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8), labels)
    return write_idx_folder(folder, splits)


def run_side_by_side(commands: dict, logs: Path, timeout: int = 900) -> dict:
    """Runs `python <argv>` for every named argv at once (each stage uses 1 thread: two of them share 2 cores);
    -> {name: CompletedProcess} with stdout and stderr read back from files under `logs` (no pipe to drain)."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, argv in commands.items():
        out, err = open(logs / f"{name}.out", "w"), open(logs / f"{name}.err", "w")
        procs[name] = (subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=out, stderr=err, text=True), out, err)
    done = {}
    for name, (proc, out, err) in procs.items():
        proc.wait(timeout=timeout)
        out.close(), err.close()
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, (logs / f"{name}.out").read_text(),
                                                 (logs / f"{name}.err").read_text())
    return done


@pytest.fixture(scope="module")
def autonat_smoke(tmp_path_factory):
    """`python -m demo.run_demo --smoke` and `python -m demo.make_assets` at tiny size, side by side (the demo runs
    on the committed weights), on small idx files written here. -> (root folder, {name: CompletedProcess})."""
    root = tmp_path_factory.mktemp("smoke")
    idx = fake_fashion_mnist(root / "idx")
    commands = {
        "demo": ["-m", "demo.run_demo", "--smoke", "--out", str(root / "demo/out"), "--data", str(root / "demo/data"),
                 "--fashion-mnist", str(idx), "--threads", "1"],
        "assets": ["-m", "demo.make_assets", "--config", "configs/demo_fashion_smoke.py", "--assets",
                   str(root / "assets/assets"), "--work", str(root / "assets/work"), "--data",
                   str(root / "assets/data"), "--fashion-mnist", str(idx), "--threads", "1",
                   "--config.train.n_steps=2", "--config.train.batch_size=8", "--config.train.log_interval=1",
                   "--config.train.save_interval=1"]}
    return root, run_side_by_side(commands, root / "logs")


def test_demo_smoke_run_writes_every_artifact(autonat_smoke):
    """`python -m demo.run_demo --smoke`: every real script runs at tiny size on small idx files written here."""
    root, procs = autonat_smoke
    out, data, proc = root / "demo/out", root / "demo/data", procs["demo"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from configs import demo_fashion_smoke
    config = demo_fashion_smoke.get_config()
    d, C = config.demo, config.model.num_classes
    # data, tokens, graphs
    assert len(list((data / "train").rglob("*.png"))) == C * d.train_per_class
    assert len(list((data / "test").rglob("*.png"))) == C * d.heldout_per_class
    assert json.loads((out / "tokens" / "test" / "meta.json").read_text())["num_rows"] == C * d.heldout_per_class
    for name in ("codebook_co_occurrence_norm_self_50.pkl", "codebook_replace_graph_norm_self.pkl",
                 "incompatibility.npz"):
        assert (out / "graphs" / name).is_file()
    # the control and KA-MIG trained the same way
    for run in ("control", "ka_mig"):
        assert (out / "runs" / run / "model_ema.safetensors").is_file()
        assert len((out / "runs" / run / "log.csv").read_text().splitlines()) == 1 + config.train.n_steps
    control = load_file(out / "runs" / "control" / "model_ema.safetensors")
    assert not any(k.startswith("graph_layer.") for k in control)
    # NLL of the three models on the same held-out tokens
    with np.load(out / "nll.npz") as z:
        assert z["names"].tolist() == ["backbone", "control", "ka_mig"]
        assert z["nll"].shape == (3, C * d.heldout_per_class, len(d.nll_ratios)) and np.isfinite(z["nll"]).all()
        assert "seconds" not in z.files  # no times in result files: the same inputs give the same bytes
    # samples (same labels), FID
    labels = [np.load(out / "samples" / m / "samples.npz")["labels"] for m in ("backbone", "control", "ka_mig")]
    assert all(np.array_equal(labels[0], lab) for lab in labels) and len(labels[0]) == d.fid_samples
    fid = json.loads((out / "fid.json").read_text())
    assert set(fid["models"]) == {"backbone", "control", "ka_mig"} and "ka_mig-control" in fid["differences"]
    assert fid["n_reference"] == C * d.fid_reference_per_class and "seconds" not in json.dumps(fid)
    assert "computed by this run" in fid["reference"]["features"]  # committed features describe other images
    for m in fid["models"].values():
        assert math.isfinite(m["fid"]) and m["lo"] <= m["fid"] <= m["hi"]
    # figures, metrics, summary
    for name in ("grid_backbone.png", "grid_control.png", "grid_ka_mig.png", "comparison.png", "curves.png"):
        png_decodes(out / name)
    metrics = json.loads((out / "metrics.json").read_text())
    nll = metrics["nll"]
    assert set(nll["differences"]) == {"ka_mig-control", "ka_mig-backbone", "control-backbone"}
    o = nll["models"]["ka_mig"]["overall"]
    assert o["lo"] <= o["mean"] <= o["hi"] and o["n"] == C * d.heldout_per_class
    beyond = nll["differences"]["ka_mig-control"]["overall"]["hi"] < 0
    assert metrics["verdicts"]["nll ka_mig-control beyond noise"] == beyond
    stages = ["data", "tokens_train", "tokens_heldout", "graphs", "train_control", "train_ka_mig", "nll",
              "samples_backbone", "samples_control", "samples_ka_mig", "fid"]
    assert list(metrics["stage_seconds"]) == stages
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert logs == [f"{i + 1:02d}_{s}.log" for i, s in enumerate(stages)]
    summary = (out / "summary.txt").read_text()
    assert "Held-out masked-token NLL" in summary and "KA-MIG - control" in summary and summary in proc.stdout


def test_make_assets_recipe_smoke(autonat_smoke):
    """`python -m demo.make_assets` at tiny size on small idx files: weights that load strictly, the held-out curve,
    the FID reference features and a true manifest."""
    from configs import demo_fashion_smoke
    from libs.models.autonat import AutoNAT
    from libs.models.factory import backbone_config, load_tokenizer
    from libs.checkpoint import file_sha256, load_strict
    root, procs = autonat_smoke
    assets, proc = root / "assets/assets", procs["assets"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((assets / "manifest.json").read_text())
    assert list(manifest["stage_seconds"]) == ["data", "tokenizer", "tokens_train", "tokens_heldout", "backbone",
                                               "heldout_curve", "fid_reference"]
    for name, info in manifest["files"].items():
        assert file_sha256(assets / name) == info["sha256"]
    config = demo_fashion_smoke.get_config()
    assert sorted(manifest["files"]) == ["autonat_demo.safetensors", "fid_reference_test.npz", "vqgan_demo.safetensors"]
    load_tokenizer(config.tokenizer, checkpoint=assets / "vqgan_demo.safetensors")
    assert json.loads((assets / "vqgan_demo.safetensors.json").read_text())["report"] == manifest["tokenizer"]
    load_strict(AutoNAT(backbone_config(config.model)), load_file(assets / "autonat_demo.safetensors"))
    assert manifest["backbone"]["steps"] == 2 and (assets / "autonat_demo_log.csv").is_file()
    curve = (assets / "autonat_demo_heldout_curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,images,train_loss,raw_nll") and len(curve) == 3  # steps 1 and 2
    png_decodes(assets / "autonat_demo_heldout_curve.png")
    n_ref = config.model.num_classes * config.demo.fid_reference_per_class
    with np.load(assets / "fid_reference_test.npz") as z:
        assert z["features"].shape == (n_ref, 2048) and z["files"].shape == (n_ref,)


def test_thread_choice_follows_the_cores_busy_now():
    """All cores on an idle machine, 1 when other work keeps half of them busy, the asked number otherwise."""
    import os

    from demo.pipeline import busy_cores, pick_threads
    cores = len(os.sched_getaffinity(0))
    assert pick_threads(busy=0.0)[0] == cores and pick_threads(busy=cores / 2)[0] == 1
    assert pick_threads(3, busy=cores)[0] == 3
    assert 0.0 <= busy_cores(0.05) <= (os.cpu_count() or 1) + 1e-9


def test_maskgit_host_recipe_and_demo_smoke(tmp_path):
    """`make demo-assets BACKBONE=maskgit` and `make demo BACKBONE=maskgit`, tiny and side by side (the demo on the
    committed MaskGIT weights): the MaskGIT backbone is pretrained with MaskGIT's objective on the committed tokenizer
    (reused, not retrained), named after itself next to the AutoNAT files, and the demo measures backbone / control /
    KA-MaskGIT / shuffled-graph KA-MaskGIT."""
    import shutil
    from configs import demo_fashion_maskgit_smoke
    from libs.checkpoint import file_sha256, load_state_dict_file, load_strict
    from libs.models.maskgit import MaskGIT, maskgit_config
    assets, idx, out = tmp_path / "assets", fake_fashion_mnist(tmp_path / "idx"), tmp_path / "out"
    assets.mkdir()
    for name in ("vqgan_demo.safetensors", "vqgan_demo.safetensors.json"):
        shutil.copy(REPO / "demo/assets/fashion" / name, assets)
    commands = {
        "assets": ["-m", "demo.make_assets", "--backbone", "maskgit", "--config", "configs/demo_fashion_maskgit_smoke.py",
                   "--assets", str(assets), "--work", str(tmp_path / "work"), "--data", str(tmp_path / "data"),
                   "--fashion-mnist", str(idx), "--threads", "1", "--config.train.n_steps=2",
                   "--config.train.batch_size=8", "--config.train.log_interval=1", "--config.train.save_interval=1"],
        "demo": ["-m", "demo.run_demo", "--backbone", "maskgit", "--smoke", "--out", str(out), "--data",
                 str(tmp_path / "data_demo"), "--fashion-mnist", str(idx), "--threads", "1",
                 "--config.demo.fid_samples=10"]}
    for name, proc in run_side_by_side(commands, tmp_path / "logs").items():
        assert proc.returncode == 0, f"{name}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"

    manifest = json.loads((assets / "maskgit_demo_manifest.json").read_text())
    assert list(manifest["stage_seconds"]) == ["data", "tokens_train", "tokens_heldout", "backbone", "heldout_curve"]
    assert not (assets / "manifest.json").exists()  # the AutoNAT manifest is not touched
    assert manifest["files"]["vqgan_demo.safetensors"]["sha256"] == \
        file_sha256(REPO / "demo/assets/fashion/vqgan_demo.safetensors")
    config = demo_fashion_maskgit_smoke.get_config()
    load_strict(MaskGIT(maskgit_config(config.model)), load_state_dict_file(assets / "maskgit_demo.safetensors"))
    assert len((assets / "maskgit_demo_heldout_curve.csv").read_text().splitlines()) == 3
    ckpt = torch.load(tmp_path / "work/backbone/checkpoints/step_0000002.pt", map_location="cpu", weights_only=True)
    t = ckpt["config"]["train"]  # MaskGIT's own recipe
    assert (t["mode"], t["mask_schedule"], t["min_mask_rate"], tuple(t["betas"]), t["weight_decay"]) == \
        ("pretrain", "cosine", 0.5, (0.9, 0.96), 0.045)

    models = json.loads((out / "models.json").read_text())
    assert [(m["name"], m["kind"]) for m in models] == [("backbone", "maskgit"), ("control", "ka_maskgit"),
                                                       ("ka_mig", "ka_maskgit"), ("shuffled", "ka_maskgit")]
    assert models[0]["checkpoint"] == str(REPO / "demo/assets/fashion/maskgit_demo.safetensors")
    assert any("graphs_shuffled" in o for o in models[3]["overrides"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["host"] == "KA-MaskGIT" and "ka_mig-shuffled" in metrics["nll"]["differences"]
    assert "fid ka_mig-shuffled" in metrics["verdicts"]
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("=" * 100 + "\nKA-MaskGIT CPU demo") and "KA-MaskGIT - KA-MaskGIT, shuffled" in summary
