"""The pipeline's files are byte-reproducible (token dataset with its chunks, graph files with their sidecars),
and the memory-mapped token merge ends with DiskFull on a full disk, leaving no temp file."""
import errno
import hashlib
import os
import time
from pathlib import Path

import pytest
import torch

import extract_imagenet_feature
from libs.config import load_config_file
from libs.data.tokens import load_tokens
from libs.models.factory import tokenizer_config
from libs.models.vqgan import VQGAN
from tests.helpers import load_build_graphs_cli, make_image_tree, write_random_token_dir


def tree_sha256(root: Path) -> dict:
    """{relative path: sha256} of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def move_clock_ahead(monkeypatch, seconds=3600.0):
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)


@pytest.fixture(scope="module")
def images_and_tokenizer(tmp_path_factory):
    work = tmp_path_factory.mktemp("repro_tokens")
    data = make_image_tree(work / "data")
    torch.manual_seed(0)
    model = VQGAN(tokenizer_config(load_config_file("configs/tiny.py").tokenizer)).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.mul_(0.4)
    ckpt = work / "tiny_vqgan.pt"
    torch.save(model.state_dict(), ckpt)
    return data, ckpt


def tokenize(data, ckpt, out, *extra):
    return extract_imagenet_feature.main(
        ["--path", str(data), "--split", "train", "--out", str(out), "--config", "configs/tiny.py",
         f"--config.tokenizer.checkpoint={ckpt}", "--chunk-size", "2", "--batch-size", "3", "--workers", "0",
         "--device", "cpu", *extra])


def test_two_tokenizations_give_identical_bytes(images_and_tokenizer, tmp_path, monkeypatch):
    data, ckpt = images_and_tokenizer
    assert tokenize(data, ckpt, tmp_path / "a", "--keep-partial") == 0
    move_clock_ahead(monkeypatch)  # file times must not reach the bytes (zip member dates of the chunks)
    assert tokenize(data, ckpt, tmp_path / "b", "--keep-partial") == 0
    a, b = tree_sha256(tmp_path / "a"), tree_sha256(tmp_path / "b")
    assert {"tokens.npy", "labels.npy", "meta.json"} <= set(a)
    assert any(name.endswith(".npz") for name in a)  # the per-chunk files are compared too
    assert a == b, [k for k in a if a.get(k) != b.get(k)]


def test_token_merge_on_a_full_disk_is_disk_full_without_temp_files(images_and_tokenizer, tmp_path, monkeypatch,
                                                                    capsys):
    data, ckpt = images_and_tokenizer

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)  # the disk fills up when tokens.npy is reserved
    capsys.readouterr()
    out = tmp_path / "full"
    assert tokenize(data, ckpt, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no space left on device while writing") and "tokens.npy" in err[-1]
    assert not (out / "tokens.npy").exists() and not (out / "meta.json").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert tokenize(data, ckpt, out) == 0  # rerun once there is space: the finished chunks are reused
    tokens, labels, _ = load_tokens(out)
    assert tokens.shape[0] == labels.shape[0] > 0


def test_two_graph_builds_give_identical_bytes(tmp_path, monkeypatch):
    cli = load_build_graphs_cli()
    write_random_token_dir(tmp_path / "ds", N=80, grid=4, K=24, C=3)
    args = ["--tokens", str(tmp_path / "ds"), "--max-images", "50", "--seed", "1", "--write-sample-tokens",
            "--num-threads", "1"]
    cli.main(args + ["--out", str(tmp_path / "g1")])
    move_clock_ahead(monkeypatch)
    cli.main(args + ["--out", str(tmp_path / "g2")])
    a, b = tree_sha256(tmp_path / "g1"), tree_sha256(tmp_path / "g2")
    assert len(a) == 7  # three graphs, three .json sidecars, the token sample
    assert a == b, [k for k in a if a.get(k) != b.get(k)]
    for name in a:
        if name.endswith(".json"):
            text = (tmp_path / "g1" / name).read_text()
            assert str(tmp_path / "g1") not in text  # no output location (it differs between runs)


def test_edge_graph_pickle_bytes_do_not_depend_on_memory_addresses(tmp_path):
    from libs.graphs.files import load_edge_graph, save_edge_graph
    index = torch.tensor([[0, 1, 2, 0, 1, 2], [1, 2, 0, 0, 1, 2]])
    weight = torch.rand(6, dtype=torch.float64)
    save_edge_graph(tmp_path / "a.pkl", index, weight)
    save_edge_graph(tmp_path / "b.pkl", index.clone(), weight.clone())  # same values, other storages
    assert (tmp_path / "a.pkl").read_bytes() == (tmp_path / "b.pkl").read_bytes()
    i2, w2, n = load_edge_graph(tmp_path / "b.pkl", dtype=None)
    assert torch.equal(i2, index) and torch.equal(w2, weight) and n == 3
