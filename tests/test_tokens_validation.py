"""Malformed token datasets: one validating loader (libs.data.tokens.load_tokens) refuses them in one line, and
every reader (training, graph building, the demo's held-out evaluation, generate_img's captions) goes through it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from libs.data.tokens import (MissingTokenDatasetError, TokenDatasetError, check_meta, load_tokens,
                              load_tokens_for_model, write_token_dataset)
from libs.errors import BadInput, MissingInput, one_line
from tests.helpers import load_build_graphs_cli, tiny_config

REPO = Path(__file__).resolve().parents[1]
META = dict(codebook_size=32, grid=4, num_classes=4, class_names=list("abcd"))


def good_dataset(path, n=24, seed=0):
    """A valid token dataset of the tiny config's sizes (32 codes, 4x4 tokens, 4 classes) at `path`."""
    rng = np.random.default_rng(seed)
    write_token_dataset(path, rng.integers(0, 32, (n, 16)), rng.integers(0, 4, n), META)
    return path


def edit_meta(path, change):
    """Rewrites path/meta.json as change(meta) (a JSON value of any kind)."""
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(change(meta)))


# each variant: (how to break a good dataset, the file the error must name, words the error must hold)
VARIANTS = {
    "meta_list": (lambda d: edit_meta(d, lambda m: [1, 2]), "meta.json", "JSON list"),
    "meta_not_json": (lambda d: (d / "meta.json").write_text('{"grid": 4,'), "meta.json", "not valid JSON"),
    "grid_string": (lambda d: edit_meta(d, lambda m: {**m, "grid": "4"}), "meta.json", 'grid = "4"'),
    "codebook_string": (lambda d: edit_meta(d, lambda m: {**m, "codebook_size": "32"}), "meta.json",
                        'codebook_size = "32"'),
    "classes_float": (lambda d: edit_meta(d, lambda m: {**m, "num_classes": 4.0}), "meta.json", "num_classes = 4.0"),
    "rows_bool": (lambda d: edit_meta(d, lambda m: {**m, "num_rows": True}), "meta.json", "num_rows = true"),
    "grid_zero": (lambda d: edit_meta(d, lambda m: {**m, "grid": 0}), "meta.json", "grid = 0"),
    "names_short": (lambda d: edit_meta(d, lambda m: {**m, "class_names": ["a"]}), "meta.json",
                    "1 class_names for num_classes = 4"),
    "names_not_strings": (lambda d: edit_meta(d, lambda m: {**m, "class_names": [1, 2, 3, 4]}), "meta.json",
                          "list of strings"),
    "tokens_empty_file": (lambda d: (d / "tokens.npy").write_bytes(b""), "tokens.npy", "EOFError"),
    "labels_empty_file": (lambda d: (d / "labels.npy").write_bytes(b""), "labels.npy", "EOFError"),
    "tokens_truncated": (lambda d: (d / "tokens.npy").write_bytes((d / "tokens.npy").read_bytes()[:200]),
                         "tokens.npy", "unreadable token ids"),
    "tokens_missing": (lambda d: (d / "tokens.npy").unlink(), "tokens.npy", "missing"),
    "tokens_float": (lambda d: np.save(d / "tokens.npy", np.load(d / "tokens.npy").astype(np.float32) + 0.7),
                     "tokens.npy", "float32"),
    "labels_float": (lambda d: np.save(d / "labels.npy", np.load(d / "labels.npy") + 0.5), "labels.npy", "float64"),
    "labels_bool": (lambda d: np.save(d / "labels.npy", np.load(d / "labels.npy") > 1), "labels.npy", "bool"),
    "tokens_npz": (lambda d: np.savez(open(d / "tokens.npy", "wb"), a=np.zeros(3)), "tokens.npy", ".npz archive"),
    "tokens_objects": (lambda d: np.save(d / "tokens.npy", np.array([{}, {}], dtype=object), allow_pickle=True),
                       "tokens.npy", "unreadable token ids"),
    "no_rows": (lambda d: write_token_dataset(d, np.zeros((0, 16), np.uint16), np.zeros(0, np.int64), META),
                "", "no token maps"),
}


@pytest.fixture
def broken(tmp_path, request):
    """(dataset path, file named, words) of the variant named by the test's `variant` parameter."""
    breaks, file, words = VARIANTS[request.param]
    path = good_dataset(tmp_path / request.param)
    breaks(path)
    return path, file, words


def assert_refused(error, path, file, words):
    """The error is one line naming the dataset's file and saying what is wrong."""
    text = one_line(error)
    assert isinstance(error, TokenDatasetError) and "\n" not in str(error), text
    assert str(path / file if file else path) in text and words in text, text


@pytest.mark.parametrize("broken", list(VARIANTS), indirect=True)
def test_loader_refuses_in_one_line(broken):
    path, file, words = broken
    with pytest.raises(TokenDatasetError) as err:
        load_tokens(path)
    assert_refused(err.value, path, file, words)


@pytest.mark.parametrize("broken", ["meta_list", "codebook_string", "tokens_empty_file", "tokens_float",
                                    "labels_float", "no_rows"], indirect=True)
def test_every_reader_refuses(broken, tmp_path):
    """Training, graph building and the held-out evaluation refuse it before any work; no graph is written."""
    import train_graph
    from demo.evaluate import heldout_tokens
    path, file, words = broken
    config = tiny_config(tmp_path)
    config.data.path = str(path)
    readers = {"train_graph": lambda: train_graph.load_training_tokens(config),
               "demo.evaluate": lambda: heldout_tokens(path, config),
               "build_graphs": lambda: load_build_graphs_cli().main(
                   ["--config", "configs/tiny.py", "--tokens", str(path), "--out", str(tmp_path / "g")])}
    for name, read in readers.items():
        with pytest.raises(TokenDatasetError) as err:
            read()
        assert_refused(err.value, path, file, words)
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").iterdir())


@pytest.mark.parametrize("broken", ["meta_list", "names_short"], indirect=True)
def test_grid_captions_refuse_a_malformed_meta(broken, tmp_path):
    from libs.sampling.generation import class_names_of
    path, file, words = broken
    config = tiny_config(tmp_path)
    config.data.path = str(path)
    with pytest.raises(TokenDatasetError) as err:
        class_names_of(config)
    assert_refused(err.value, path, file, words)


def test_grid_captions_are_the_model_classes(tmp_path):
    from libs.sampling.generation import class_names_of
    config = tiny_config(tmp_path)
    assert class_names_of(config) is None  # no dataset given: plain "class i" captions
    config.data.path = str(good_dataset(tmp_path / "ok"))
    assert class_names_of(config) == list("abcd")
    config.model.num_classes = 5
    with pytest.raises(BadInput, match=r"names 4 classes but the model has 5 \(config.model.num_classes\)"):
        class_names_of(config)


def test_paper_format_is_checked_too(tmp_path):
    np.save(tmp_path / "float.npy", np.zeros((3, 17), np.float32))
    with pytest.raises(TokenDatasetError, match="float32, expected integers"):
        load_tokens(tmp_path / "float.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 17), np.int64))
    with pytest.raises(TokenDatasetError, match="no token maps"):
        load_tokens(tmp_path / "empty.npy")
    (tmp_path / "zero.npy").write_bytes(b"")
    with pytest.raises(TokenDatasetError, match="EOFError"):
        load_tokens(tmp_path / "zero.npy")


def test_meta_check_lists_every_problem():
    with pytest.raises(TokenDatasetError) as err:
        check_meta({"grid": "4", "codebook_size": -1, "num_classes": 2, "class_names": ["a"], "note": "kept"}, "m")
    assert str(err.value) == ('m: codebook_size = -1 (expected an integer >= 1); grid = "4" (expected an integer '
                              '>= 1); 1 class_names for num_classes = 2')
    meta = {"codebook_size": 8, "grid": None, "num_classes": 2, "class_names": ["a", "b"], "skipped": []}
    assert check_meta(meta, "m") is meta  # null sizes are derived from the arrays


def test_dataset_against_the_model_names_both_sides(tmp_path):
    config = tiny_config(tmp_path)  # 32 codes, 16 tokens, 4 classes
    good = good_dataset(tmp_path / "ok")
    tokens, labels, meta = load_tokens_for_model(good, config.model)
    assert tokens.shape == (24, 16) and meta["num_classes"] == 4
    rng = np.random.default_rng(1)
    cases = {
        "codebook": (rng.integers(0, 16, (8, 16)), dict(META, codebook_size=16),
                     "16-code tokenizer, but 32 codes were expected (config.model.codebook_size)"),
        "grid": (rng.integers(0, 32, (8, 9)), dict(META, grid=3), "has 9 tokens per image (grid 3x3) but the "
                                                                  "model expects 16 (config.model.seq_len)"),
        "classes": (rng.integers(0, 32, (8, 16)), dict(META, num_classes=5, class_names=list("abcde")),
                    "has 5 classes (meta.json num_classes) but the model has 4 (config.model.num_classes)"),
    }
    for name, (tokens, meta, message) in cases.items():
        write_token_dataset(tmp_path / name, tokens, np.arange(8) % 4, meta)
        with pytest.raises(TokenDatasetError) as err:
            load_tokens_for_model(tmp_path / name, config.model)
        assert message in str(err.value), name
    with pytest.raises(MissingTokenDatasetError, match="set config.data.path"):
        load_tokens_for_model("", config.model)


def test_scripts_end_with_one_line_and_status_2(tmp_path):
    """The entry scripts themselves: exit 2, one line `error: ...` naming the file, no traceback."""
    path = good_dataset(tmp_path / "ds")
    np.save(path / "labels.npy", np.load(path / "labels.npy").astype(np.float64) + 0.5)
    commands = [["-m", "graph_construction.build_graphs", "--config", "configs/tiny.py", "--tokens", str(path),
                 "--out", str(tmp_path / "g")],
                ["train_graph.py", "--config", "configs/tiny.py", f"--config.data.path={path}",
                 f"--config.output_dir={tmp_path / 'out'}", "--config.train.n_steps=1"]]
    for cmd in commands:
        run = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert lines[-1].startswith("error: ") and str(path / "labels.npy") in lines[-1] and "float64" in lines[-1]
    assert not (tmp_path / "g").exists() or not list((tmp_path / "g").glob("*.pkl"))


# ----------------------------------------------------------------------------- the other inputs of a training run


def test_training_checks_periodic_fid_inputs_before_the_first_step(tmp_path, monkeypatch):
    """With train.fid_interval > 0 the tokenizer and the reference statistics are read before the trainer exists."""
    import torch

    import train_graph
    from tests.helpers import tiny_vqgan

    def no_trainer(*a, **k):
        raise AssertionError("the trainer was built before the periodic FID inputs were checked")
    monkeypatch.setattr(train_graph, "Trainer", no_trainer)
    torch.save(tiny_vqgan().state_dict(), tmp_path / "vq.pth")
    base = ["--config", "configs/tiny.py", f"--config.data.path={good_dataset(tmp_path / 'ds')}",
            f"--config.output_dir={tmp_path / 'out'}", "--config.train.fid_interval=1",
            f"--config.train.fid_ref_stats={tmp_path / 'absent.npz'}"]
    cases = [([], BadInput, "set --config.tokenizer.checkpoint"),
             ([f"--config.tokenizer.checkpoint={tmp_path / 'nope.pth'}"], MissingInput,
              "nope.pth"),
             ([f"--config.tokenizer.checkpoint={tmp_path / 'vq.pth'}", "--config.tokenizer.codebook_size=64"],
              BadInput, "codebook 64"),
             ([f"--config.tokenizer.checkpoint={tmp_path / 'vq.pth'}"], MissingInput,
              "absent.npz")]
    for flags, error, words in cases:
        with pytest.raises(error, match=words):
            train_graph.main(base + flags)
