"""Sample provenance: fingerprint.json, refused / resumed / overwritten reruns, early input checks, pixels."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import generate_img
import generate_npz
from libs.config import load_config_file
from libs.errors import BadInput, MissingInput
from libs.sampling import generation, provenance
from libs.sampling.generation import class_labels
from tests.helpers import write_reference_stats


def npz_args(root, overrides, out, *extra):
    return ["--checkpoint", str(root / "ka_mig.pth"), "--num-samples", "5", "--batch-size", "2", "--device", "cpu",
            "--no-fid", "--out", str(out), *overrides, *extra]


@pytest.fixture
def count_sampling(monkeypatch):
    """Counts the batches sample_images is asked for, in both scripts."""
    calls = []
    real = generation.sample_images

    def counting(*a, **k):
        calls.append(len(a[2]))
        return real(*a, **k)
    monkeypatch.setattr(generate_npz, "sample_images", counting)
    monkeypatch.setattr(generate_img, "sample_images", counting)
    return calls


def pngs_of(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_rerun_with_other_settings_is_refused_before_sampling(tiny_assets, tmp_path, count_sampling):
    root, overrides = tiny_assets
    out = tmp_path / "run"
    generate_npz.main(npz_args(root, overrides, out, "--seed", "3"))
    fp = json.loads((out / "fingerprint.json").read_text())["fingerprint"]
    assert fp["seed"] == 3 and fp["model"] == "ka_mig" and fp["num_images"] == 5
    assert fp["sampler_version"] == provenance.SAMPLER_VERSION and fp["pixels"] == "truncate"
    assert len(fp["checkpoint_sha256"]) == 64 and len(fp["tokenizer_sha256"]) == 64
    assert set(fp["graphs_sha256"]) == {"co", "sim", "incompat"}
    assert fp["schedule"]["name"] == "autonat" and fp["model_config"]["depth"] == 4
    before, calls = pngs_of(out / "samples"), len(count_sampling)
    with pytest.raises(BadInput) as err:
        generate_npz.main(npz_args(root, overrides, out, "--seed", "4", "--schedule", "maskgit", "--steps", "3"))
    msg = str(err.value)
    assert "seed: 3 -> 4" in msg and "schedule.name" in msg and "--overwrite" in msg and "--out" in msg
    assert "\n" not in msg
    assert len(count_sampling) == calls and pngs_of(out / "samples") == before  # nothing sampled or touched
    # the same settings resume: nothing left to sample
    generate_npz.main(npz_args(root, overrides, out, "--seed", "3"))
    assert len(count_sampling) == calls
    # --overwrite: the run equals a fresh run with the new settings into an empty folder
    new = ["--seed", "4", "--schedule", "maskgit", "--steps", "3"]
    generate_npz.main(npz_args(root, overrides, out, *new, "--overwrite"))
    generate_npz.main(npz_args(root, overrides, tmp_path / "fresh", *new))
    assert pngs_of(out / "samples") == pngs_of(tmp_path / "fresh" / "samples") != before
    a, b = np.load(out / "samples.npz"), np.load(tmp_path / "fresh" / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert json.loads((out / "fingerprint.json").read_text())["fingerprint"]["seed"] == 4


@pytest.mark.parametrize("change", [["--precision", "bf16"], ["--labels", "random"], ["--num-samples", "4"],
                                    ["--config.sample.pixels=round"], ["--cpu-kernels", "default"],
                                    ["--model", "autonat"]])
def test_every_setting_is_part_of_the_fingerprint(tiny_assets, tmp_path, change):
    root, overrides = tiny_assets
    fingerprint = {}

    def capture(*a, **k):  # the fingerprint a run would check, without sampling anything
        fingerprint[len(fingerprint)] = provenance.sampling_fingerprint(*a, **k)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generate_npz, "sampling_fingerprint", capture)
        for extra in ([], change):
            if "autonat" in extra:
                extra = extra + ["--checkpoint", str(root / "backbone.pth")]
            with pytest.raises(KeyboardInterrupt):
                generate_npz.main(npz_args(root, overrides, tmp_path / "x", *extra))
    diff = provenance.fingerprint_diff(fingerprint[0], fingerprint[1])
    assert diff, change


def fingerprint_inputs(root):
    """(tiny config reading the tiny_assets under root, the other keyword arguments of sampling_fingerprint)."""
    cfg = load_config_file("configs/tiny.py")
    with cfg.unlocked():
        cfg.tokenizer.checkpoint = str(root / "vq.ckpt")
        cfg.graph.dir = str(root / "graphs")
    schedule = generation.schedule_from_config(cfg.sample)
    kw = dict(kind="ka_mig", schedule=schedule, seed=0, label_mode="balanced", labels=np.arange(4),
              precision="fp32", cpu_kernels="default", pixels="truncate", device=torch.device("cpu"))
    return cfg, kw


def test_changed_checkpoint_or_graph_content_is_a_different_fingerprint(tiny_assets, tmp_path):
    root, overrides = tiny_assets
    cfg, kw = fingerprint_inputs(root)
    base = provenance.sampling_fingerprint(cfg, checkpoint=root / "ka_mig.pth", **kw)
    copy = tmp_path / "copy.pth"
    copy.write_bytes((root / "ka_mig.pth").read_bytes())
    assert provenance.sampling_fingerprint(cfg, checkpoint=copy, **kw) == base  # content, not the path
    copy.write_bytes((root / "backbone.pth").read_bytes())
    assert provenance.fingerprint_diff(base, provenance.sampling_fingerprint(cfg, checkpoint=copy, **kw))[0] \
        .startswith("checkpoint_sha256")
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    for f in (root / "graphs").iterdir():
        (graphs / f.name).write_bytes(f.read_bytes())
    with cfg.unlocked():
        cfg.graph.dir = str(graphs)
    (graphs / "incompatibility.npz").write_bytes((graphs / "incompatibility.npz").read_bytes() + b"\0")
    diff = provenance.fingerprint_diff(base, provenance.sampling_fingerprint(cfg, checkpoint=root / "ka_mig.pth", **kw))
    assert [d.split(":")[0] for d in diff] == ["graphs_sha256.incompat"]


def test_samples_npz_and_metrics_carry_labels_and_fingerprint(tiny_assets, tmp_path, use_fid_extractor):
    root, overrides = tiny_assets
    ref = write_reference_stats(tmp_path / "ref.npz", use_fid_extractor)
    out = tmp_path / "run"
    args = npz_args(root, overrides, out, "--labels", "random", "--seed", "5", "--ref-stats", str(ref))
    generate_npz.main([a for a in args if a != "--no-fid"])
    stored = json.loads((out / "fingerprint.json").read_text())
    npz = np.load(out / "samples.npz")
    labels = class_labels(5, 4, "random", 5)
    assert np.array_equal(npz["labels"], labels) and npz["arr_0"].shape[0] == len(labels)
    assert provenance.labels_sha256(npz["labels"]) == stored["fingerprint"]["labels"]["sha256"]
    assert json.loads(str(npz["fingerprint"])) == stored["fingerprint"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fingerprint"] == stored["fingerprint"] and metrics["pixels"] == "truncate"
    assert stored["files"]["checkpoint"] == str(root / "ka_mig.pth")


def test_output_without_fingerprint_is_refused(tiny_assets, tmp_path, count_sampling):
    root, overrides = tiny_assets
    out = tmp_path / "old"
    (out / "samples").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out / "samples" / "000000.png")
    with pytest.raises(BadInput, match="without a fingerprint.json"):
        generate_npz.main(npz_args(root, overrides, out))
    assert not count_sampling
    generate_npz.main(npz_args(root, overrides, out, "--overwrite"))
    assert len(list((out / "samples").glob("*.png"))) == 5


def write_stats(path, mu, sigma, **extra):
    np.savez(path, mu=mu, sigma=sigma, **extra)
    return path


@pytest.mark.parametrize("kind", ["nan_mu", "inf_sigma", "wrong_dim", "no_sigma", "not_npz", "missing"])
def test_reference_statistics_are_checked_before_the_first_sample(tiny_assets, tmp_path, count_sampling, kind):
    root, overrides = tiny_assets
    path = tmp_path / "ref.npz"
    mu, sigma = np.zeros(2048), np.eye(2048)
    if kind == "nan_mu":
        mu[5] = np.nan
        write_stats(path, mu, sigma)
    elif kind == "inf_sigma":
        sigma[3, 4] = np.inf
        write_stats(path, mu, sigma)
    elif kind == "wrong_dim":
        write_stats(path, np.zeros(64), np.eye(64))
    elif kind == "no_sigma":
        np.savez(path, mu=mu)
    elif kind == "not_npz":
        path.write_bytes(b"garbage")
    error = MissingInput if kind == "missing" else BadInput
    args = [a for a in npz_args(root, overrides, tmp_path / "out", "--ref-stats", str(path)) if a != "--no-fid"]
    with pytest.raises(error) as err:
        generate_npz.main(args)
    assert str(path) in str(err.value)
    if kind in ("nan_mu", "inf_sigma"):
        assert "NaN or infinite" in str(err.value)
    assert not count_sampling and not (tmp_path / "out").exists()


def test_unwritable_outputs_are_refused_before_sampling(tiny_assets, tmp_path, count_sampling):
    root, overrides = tiny_assets
    (tmp_path / "file").write_text("a file where the output folder should go")
    with pytest.raises(BadInput, match="not a folder"):
        generate_npz.main(npz_args(root, overrides, tmp_path / "file"))
    (tmp_path / "run" / "metrics.json").mkdir(parents=True)  # a folder where a result file goes
    with pytest.raises(BadInput, match="metrics.json: it is a folder"):
        generate_npz.main(npz_args(root, overrides, tmp_path / "run"))
    with pytest.raises(BadInput, match="not a folder"):
        generate_img.main(["--checkpoint", str(root / "ka_mig.pth"), "--classes", "1", "--out",
                           str(tmp_path / "file"), "--device", "cpu", *overrides])
    assert not count_sampling


def test_pixels_truncate_and_round(monkeypatch):
    values = torch.tensor([0.0, 0.5 / 255, 0.999 / 255, 1.5 / 255, 0.5, 254.6 / 255, 1.0])
    x = values.view(1, 1, 1, -1).expand(1, 3, 1, -1)
    assert generation.to_uint8(x, "truncate")[0, 0, 0].tolist() == [0, 0, 0, 1, 127, 254, 255]
    assert generation.to_uint8(x, "round")[0, 0, 0].tolist() == [0, 0, 1, 2, 128, 255, 255]
    assert torch.equal(generation.to_uint8(x, "truncate"), (x * 255).to(torch.uint8))  # the paper's expression
    with pytest.raises(BadInput, match="pixels"):
        generation.to_uint8(x, "nearest")

    class Decoder:  # sample_images quantises whatever the tokenizer decodes
        def decode(self, ids):
            return x.expand(ids.shape[0], -1, -1, -1)
    monkeypatch.setattr(generation, "generate", lambda model, cls, *a, **k: torch.zeros(cls.shape[0], 4))
    model = type("M", (), {"cfg": type("C", (), {"seq_len": 4}), "mask_token_id": 0, "null_class_id": 0})()
    cls = torch.zeros(2, dtype=torch.long)
    trunc = generation.sample_images(model, Decoder(), cls, None, None, pixels="truncate")
    rounded = generation.sample_images(model, Decoder(), cls, None, None, pixels="round")
    assert trunc.shape == (2, 1, 7, 3) and trunc[0, 0, :, 0].tolist() == [0, 0, 0, 1, 127, 254, 255]
    assert rounded[0, 0, :, 0].tolist() == [0, 0, 1, 2, 128, 255, 255]


def test_pixels_config_defaults():
    assert load_config_file("configs/autonat_t8_strategy.py").pixels == "truncate"
    assert load_config_file("configs/ka_mig_l.py").sample.pixels == "truncate"
    assert load_config_file("configs/demo.py").sample.pixels == "round"


def test_generate_npz_uses_the_configured_pixels(tiny_assets, tmp_path):
    root, overrides = tiny_assets
    generate_npz.main(npz_args(root, overrides, tmp_path / "t"))
    generate_npz.main(npz_args(root, overrides, tmp_path / "r", "--config.sample.pixels=round"))
    t, r = np.load(tmp_path / "t" / "samples.npz")["arr_0"], np.load(tmp_path / "r" / "samples.npz")["arr_0"]
    diff = r.astype(int) - t.astype(int)
    assert diff.min() >= 0 and diff.max() <= 1 and diff.any()  # rounding is truncation or one level up
    with pytest.raises(BadInput, match="pixels"):
        generate_npz.main(npz_args(root, overrides, tmp_path / "x", "--config.sample.pixels=nearest"))


def test_generate_img_folder_is_deterministic_and_checked(tiny_assets, tmp_path, count_sampling):
    root, overrides = tiny_assets
    args = ["--checkpoint", str(root / "ka_mig.pth"), "--classes", "0", "2", "--per-class", "2", "--batch-size", "3",
            "--out", str(tmp_path), "--device", "cpu", *overrides]
    run = generate_img.main(args)
    assert run.parent == tmp_path and run.name.startswith("ka_mig_seed0_")
    stamps = {p.name: p.stat().st_mtime_ns for p in run.glob("0*.png")}
    calls = len(count_sampling)
    assert generate_img.main(args) == run and len(count_sampling) == calls  # same settings: PNGs reused
    assert {p.name: p.stat().st_mtime_ns for p in run.glob("0*.png")} == stamps
    (run / "00001_class0.png").write_bytes(b"broken")  # an unreadable PNG is sampled again
    generate_img.main(args)
    assert len(count_sampling) == calls + 1
    other = generate_img.main(args + ["--seed", "1"])
    assert other != run and other.name.startswith("ka_mig_seed1_")
    stored = json.loads((run / "fingerprint.json").read_text())
    stored["fingerprint"]["pixels"] = "round"  # a folder whose fingerprint does not match its name
    (run / "fingerprint.json").write_text(json.dumps(stored))
    with pytest.raises(BadInput, match="pixels"):
        generate_img.main(args)
    generate_img.main(args + ["--overwrite"])
    assert json.loads((run / "fingerprint.json").read_text())["fingerprint"]["pixels"] == "truncate"


def test_checkpoint_rewritten_in_place_is_a_different_fingerprint(tiny_assets, tmp_path):
    """Same path, inode, size and mtime, other content: the content decides (it is hashed on every run)."""
    root, overrides = tiny_assets
    cfg, kw = fingerprint_inputs(root)
    ckpt = tmp_path / "ka_mig.pth"
    ckpt.write_bytes((root / "ka_mig.pth").read_bytes())
    first = provenance.sampling_fingerprint(cfg, checkpoint=ckpt, **kw)
    assert provenance.sampling_fingerprint(cfg, checkpoint=ckpt, **kw) == first
    st = ckpt.stat()
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(ckpt, "r+b") as f:  # the same file, rewritten in place: same inode and size
        f.write(data)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime
    now = ckpt.stat()
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    diff = provenance.fingerprint_diff(first, provenance.sampling_fingerprint(cfg, checkpoint=ckpt, **kw))
    assert [d.split(":")[0] for d in diff] == ["checkpoint_sha256"]
