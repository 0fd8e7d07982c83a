"""demo/evaluate.py ends a user error in one line `error: ...` and exit status 2, found before any evaluation.

Each case runs the real entry point in-process (run_main); the inputs are small files, and the inputs the check
must not reach (token datasets, held-out images, weights) are absent, so a case passes only when its error is
found first.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from demo import evaluate
from libs.cli import run_main

REPO = Path(__file__).resolve().parents[1]
CONFIG = ["--config", "configs/demo_fashion.py"]


def run_evaluate(argv, capsys, monkeypatch) -> str:
    """The stderr of `python -m demo.evaluate <argv>` after asserting it exited with status 2 in one line."""
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as stop:
        run_main(evaluate.main, argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def write_models(tmp_path, content) -> Path:
    """A models file holding `content` (JSON-encoded unless bytes/str)."""
    path = tmp_path / "models.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def entry(**changes) -> dict:
    """A valid backbone entry (default checkpoint) with `changes`."""
    return {"name": "backbone", "label": "backbone", "kind": "autonat", "checkpoint": None, "overrides": [],
            **changes}


MODELS_CASES = {
    "not JSON": (b"{name: backbone", ["not JSON"]),
    "a dict": ({"name": "backbone", "kind": "autonat"}, ["non-empty list", "JSON dict"]),
    "a list of strings": (["backbone", "ka_mig"], ["entry 0", '"backbone"', "not an object"]),
    "empty list": ([], ["non-empty list", "empty list"]),
    "lacks keys": ([{"name": "x", "kind": "autonat"}], ["entry 0", "['checkpoint', 'overrides']"]),
    "unknown kind": ([entry(kind="bogus")], ["model backbone", "kind='bogus'", "ka_mig"]),
    "other backbone's kind": ([entry(kind="maskgit")], ["model backbone", "'maskgit'", "config.backbone"]),
    "unknown override key": ([entry(overrides=["--config.nope=1"])], ["model backbone", "config.nope"]),
    "override value of another type": ([entry(overrides=["--config.model.depth=deep"])],
                                       ["model backbone", "config.model.depth=deep"]),
    "override not --config": ([entry(overrides=["--depth=2"])], ["model backbone", "--depth=2"]),
    "overrides a string": ([entry(overrides="--config.seed=1")], ["model backbone", "overrides=", "list"]),
    "missing checkpoint": ([entry(checkpoint="/nonexistent/ckpt.safetensors")],
                           ["model backbone", "/nonexistent/ckpt.safetensors", "not found"]),
    "duplicate names": ([entry(), entry()], ["names must differ"]),
    "second entry bad": ([entry(), entry(name="b", kind="bogus")], ["model b", "kind='bogus'"]),
}


@pytest.mark.parametrize("what", ["nll", "fid", "diagnostics"])
@pytest.mark.parametrize("case", list(MODELS_CASES))
def test_bad_models_file_is_one_line_before_any_work(case, what, tmp_path, capsys, monkeypatch):
    content, expected = MODELS_CASES[case]
    models = write_models(tmp_path, content)
    absent = tmp_path / "absent"  # tokens, samples and images the check must not reach
    inputs = {"nll": ["--tokens", str(absent)], "diagnostics": ["--tokens", str(absent)],
              "fid": ["--samples", str(absent), "--heldout", str(absent)]}[what]
    line = run_evaluate([what, *CONFIG, "--models", str(models), *inputs, "--out", str(tmp_path / "o" / "out")],
                        capsys, monkeypatch)
    assert str(models) in line
    for piece in expected:
        assert piece in line, line
    assert not (tmp_path / "o").exists()


def test_missing_models_file(tmp_path, capsys, monkeypatch):
    models = tmp_path / "nope.json"
    line = run_evaluate(["nll", *CONFIG, "--models", str(models), "--tokens", str(tmp_path),
                         "--out", str(tmp_path / "nll.npz")], capsys, monkeypatch)
    assert line.startswith(f"error: --models {models}: no such file")


@pytest.mark.parametrize("what", ["nll", "fid", "curve", "reference", "diagnostics"])
def test_unwritable_out_fails_before_any_work(what, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "w" / "afile"
    afile.parent.mkdir()
    afile.write_text("a file, not a folder")
    absent = str(tmp_path / "absent")
    inputs = {"nll": ["--models", absent, "--tokens", absent], "diagnostics": ["--models", absent, "--tokens", absent],
              "fid": ["--models", absent, "--samples", absent, "--heldout", absent],
              "curve": ["--run", absent, "--tokens", absent], "reference": ["--heldout", absent]}[what]
    line = run_evaluate([what, *CONFIG, *inputs, "--out", str(afile / "out.npz")], capsys, monkeypatch)
    assert line == f"error: cannot write {afile / 'out.npz'}: {afile} exists and is not a folder"


def write_checkpoint(run: Path, step: int, weights: dict, mode: str):
    """A train_graph.py-like checkpoints/step_<n>.pt holding `weights` as raw and EMA weights."""
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "model": weights, "ema": weights, "config": {"train": {"mode": mode}}},
               run / "checkpoints" / f"step_{step:07d}.pt")


@pytest.mark.parametrize("mode, weights", [
    ("ka_mig", {"graph_layer.co_graph_layer.weight": torch.zeros(2, 2)}),  # a KA-MIG graph-training run
    ("pretrain", {"graph_layer.co_graph_layer.weight": torch.zeros(2, 2)}),  # weights of another model
    ("ka_mig", {}),  # the mode alone tells
])
def test_curve_of_a_graph_run_names_the_run_kind(mode, weights, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    write_checkpoint(run, 10, weights, mode)
    line = run_evaluate(["curve", *CONFIG, "--run", str(run), "--tokens", str(tmp_path / "absent"),
                         "--out", str(tmp_path / "curve.csv")], capsys, monkeypatch)
    assert "step_0000010.pt is not a backbone pretraining checkpoint" in line, line
    assert f"train.mode={mode}" in line and "train.mode=pretrain" in line
    if weights:
        assert "graph_layer.co_graph_layer.weight" in line


def write_samples(root: Path, names=("backbone",)):
    for name in names:
        (root / name).mkdir(parents=True)
        np.savez(root / name / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), labels=np.zeros(2, np.int64))


@pytest.mark.parametrize("content, expected", [
    ({"features": np.zeros((2, 4), np.float16)}, "lacks ['images_sha256'] (has ['features'])"),
    ({"images_sha256": np.asarray("0" * 64)}, "lacks ['features'] (has ['images_sha256'])"),
    (b"not an npz", "not an .npz file"),
])
def test_reference_features_without_its_keys(content, expected, tmp_path, capsys, monkeypatch):
    ref = tmp_path / "ref.npz"
    if isinstance(content, bytes):
        ref.write_bytes(content)
    else:
        np.savez(ref, **content)
    write_samples(tmp_path / "samples")
    line = run_evaluate(["fid", *CONFIG, "--models", str(write_models(tmp_path, [entry()])),
                         "--samples", str(tmp_path / "samples"), "--heldout", str(tmp_path / "absent"),
                         "--reference-features", str(ref), "--out", str(tmp_path / "fid.json")], capsys, monkeypatch)
    assert line.startswith(f"error: --reference-features {ref}: {expected}"), line


def test_reference_features_check_reads_the_keys():
    """load_reference_features itself raises BadInput (not KeyError) for a file without images_sha256."""
    from libs.errors import BadInput
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ref.npz"
        np.savez(path, features=np.zeros((2, 4)))
        with pytest.raises(BadInput, match="lacks \\['images_sha256'\\]"):
            evaluate.load_reference_features(path, "0" * 64)


@pytest.mark.parametrize("present, bad", [((), "backbone"), (("backbone",), "ka_mig")])
def test_missing_samples_before_reference_features(present, bad, tmp_path, capsys, monkeypatch):
    write_samples(tmp_path / "samples", present)
    models = write_models(tmp_path, [entry(), entry(name="ka_mig", label="KA-MIG")])
    line = run_evaluate(["fid", *CONFIG, "--models", str(models), "--samples", str(tmp_path / "samples"),
                         "--heldout", str(tmp_path / "absent"), "--out", str(tmp_path / "fid.json")],
                        capsys, monkeypatch)
    assert line == f"error: no samples for model {bad}: {tmp_path / 'samples' / bad / 'samples.npz'}"


def test_samples_file_without_labels(tmp_path, capsys, monkeypatch):
    (tmp_path / "samples" / "backbone").mkdir(parents=True)
    npz = tmp_path / "samples" / "backbone" / "samples.npz"
    np.savez(npz, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    line = run_evaluate(["fid", *CONFIG, "--models", str(write_models(tmp_path, [entry()])),
                         "--samples", str(tmp_path / "samples"), "--heldout", str(tmp_path / "absent"),
                         "--out", str(tmp_path / "fid.json")], capsys, monkeypatch)
    assert line.startswith(f"error: {npz}: lacks ['labels']"), line


def test_valid_models_file_reads_back(tmp_path):
    """A well-formed models file passes the checks and reads back unchanged."""
    from libs.config import load_config_file
    config = load_config_file(REPO / "configs/demo_fashion.py")
    entries = [entry(), entry(name="control", kind="ka_mig", overrides=["--config.graph.use_co=false",
                                                                        "--config.seed=3"])]
    assert evaluate.read_models(write_models(tmp_path, entries), config) == entries
