"""Tokens, graphs and the sampling tokenizer must come from one tokenizer: training in ka_mig mode refuses a token
dataset whose meta.json names another tokenizer than the graph sidecars, sampling with graphs refuses a tokenizer
checkpoint other than the one the graphs' tokens were made with; a side without a record is not refused."""
import json
import shutil

import pytest
import torch

import generate_img
import generate_npz
import train_graph
from libs.checkpoint import file_sha256
from libs.cli import run_main
from libs.errors import BadInput
from libs.graphs.files import GRAPH_FILES, graph_paths, meta_path
from tests.helpers import tiny_config, tiny_vqgan, write_training_token_dir


def record_tokenizer(folder, sha: str, names=tuple(GRAPH_FILES)):
    """Adds tokenizer_sha256 = sha to the sidecars of the graphs `names` of `folder` (the graph files unchanged)."""
    for name in names:
        sidecar = meta_path(graph_paths(folder)[name])
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "tokenizer_sha256": sha}))


def token_dir(path, sha=None):
    """The tiny training token dataset at `path`, its meta.json recording tokenizer sha256 `sha` (or none)."""
    write_training_token_dir(path)
    if sha is not None:
        meta = json.loads((path / "meta.json").read_text())
        (path / "meta.json").write_text(json.dumps({**meta, "tokenizer_sha256": sha}))
    return path


@pytest.fixture
def setup(tiny_assets, tmp_path):
    """(tiny assets root, overrides, sha256 of its tokenizer A, path and sha256 of another tokenizer B, a copy of
    its graph folder whose sidecars record tokenizer B)."""
    root, overrides = tiny_assets
    other = tmp_path / "vq_b.ckpt"
    torch.save({"state_dict": tiny_vqgan(seed=1).state_dict()}, other)
    graphs = tmp_path / "graphs"
    shutil.copytree(root / "graphs", graphs)
    sha_b = file_sha256(other)
    record_tokenizer(graphs, sha_b)
    return root, overrides, file_sha256(root / "vq.ckpt"), other, sha_b, graphs


def with_graphs(overrides, graphs):
    """The tiny overrides with config.graph.dir replaced by `graphs`."""
    return [o for o in overrides if not o.startswith("--config.graph.dir=")] + [f"--config.graph.dir={graphs}"]


# ----------------------------------------------------------------------------- training


def test_train_graph_refuses_tokens_of_another_tokenizer_than_the_graphs_before_any_step(setup, tmp_path, capsys):
    root, overrides, sha_a, _, sha_b, graphs = setup
    tokens = token_dir(tmp_path / "tokens", sha_a)
    args = [*with_graphs(overrides, graphs), f"--config.data.path={tokens}", f"--config.output_dir={tmp_path / 'out'}",
            "--config.train.mode=ka_mig", f"--config.train.init_checkpoint={root / 'backbone.pth'}",
            "--config.train.n_steps=2"]
    with pytest.raises(SystemExit) as exit_:
        run_main(train_graph.main, args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert f"token dataset {tokens / 'meta.json'} has tokenizer sha256 {sha_a[:12]}" in err[0]
    assert f"tokenizer sha256 {sha_b[:12]} ({meta_path(graph_paths(graphs)['co'])})" in err[0]
    assert not (tmp_path / "out").exists()  # refused before the run folder, let alone a step


def test_training_tokens_pass_when_the_tokenizers_agree_or_a_side_has_no_record(setup, tmp_path):
    _, _, sha_a, _, sha_b, graphs = setup

    def config_for(tokens, mode="ka_mig", **use):
        config = tiny_config(tmp_path, mode)
        config.data.path, config.graph.dir = str(tokens), str(graphs)
        for key, on in use.items():
            config.graph[key] = on
        return config
    mismatched = token_dir(tmp_path / "tok_a", sha_a)
    with pytest.raises(BadInput, match="tokenizer sha256"):
        train_graph.load_training_tokens(config_for(mismatched))
    assert len(train_graph.load_training_tokens(config_for(token_dir(tmp_path / "tok_b", sha_b)))[0]) == 512
    assert len(train_graph.load_training_tokens(config_for(token_dir(tmp_path / "tok_none")))[0]) == 512
    assert len(train_graph.load_training_tokens(config_for(mismatched, "pretrain"))[0]) == 512  # no graphs read
    record_tokenizer(graphs, "", ["co"])  # G_co without a record: G_s and G_p still name tokenizer B
    with pytest.raises(BadInput, match=GRAPH_FILES["sim"]):
        train_graph.load_training_tokens(config_for(mismatched))
    assert len(train_graph.load_training_tokens(config_for(mismatched, use_sim=False, use_incompat=False))[0]) == 512


# ----------------------------------------------------------------------------- sampling


def test_generate_img_refuses_a_tokenizer_other_than_the_graphs_and_fingerprints_the_one_hash(setup, tmp_path,
                                                                                             capsys):
    root, overrides, sha_a, other, sha_b, graphs = setup
    args = ["--checkpoint", str(root / "ka_mig.pth"), "--classes", "1", "--per-class", "1", "--out",
            str(tmp_path / "img"), "--device", "cpu", *with_graphs(overrides, graphs)]
    with pytest.raises(SystemExit) as exit_:
        run_main(generate_img.main, args)  # tokenizer A, graphs of tokenizer B
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(err) == 1
    assert f"tokenizer checkpoint {root / 'vq.ckpt'} (config.tokenizer.checkpoint) has tokenizer sha256 " \
           f"{sha_a[:12]}" in err[0] and f"{sha_b[:12]} ({meta_path(graph_paths(graphs)['co'])})" in err[0]
    assert not list((tmp_path / "img").glob("ka_mig_seed*"))  # refused before the run folder
    run_dir = generate_img.main(args + [f"--config.tokenizer.checkpoint={other}"])  # tokenizer B: samples
    assert json.loads((run_dir / "fingerprint.json").read_text())["fingerprint"]["tokenizer_sha256"] == sha_b
    # the bare backbone reads no graph: tokenizer A is not refused
    bare = generate_img.main(["--model", "autonat", "--checkpoint", str(root / "backbone.pth"), "--classes", "1",
                              "--per-class", "1", "--out", str(tmp_path / "bare"), "--device", "cpu",
                              *with_graphs(overrides, graphs)])
    assert len(list(bare.glob("0*.png"))) == 1


def test_generate_npz_refuses_a_tokenizer_other_than_the_graphs(setup, tmp_path):
    root, overrides, sha_a, _, sha_b, graphs = setup
    args = ["--checkpoint", str(root / "ka_mig.pth"), "--num-samples", "2", "--out", str(tmp_path / "npz"),
            "--no-fid", "--device", "cpu", *with_graphs(overrides, graphs)]
    with pytest.raises(BadInput, match=f"has tokenizer sha256 {sha_a[:12]} but the graphs were built from tokens "
                                       f"of tokenizer sha256 {sha_b[:12]}"):
        generate_npz.main(args)
    assert not (tmp_path / "npz" / "samples.npz").exists()


def test_periodic_fid_refuses_a_tokenizer_other_than_the_training_tokens(setup, tmp_path):
    root, _, sha_a, other, sha_b, _ = setup

    def config_for(tokens, fid_interval, checkpoint):
        config = tiny_config(tmp_path, "pretrain", fid_interval=fid_interval)
        config.data.path, config.tokenizer.checkpoint = str(tokens), str(checkpoint)
        return config
    tokens_b = token_dir(tmp_path / "tok_b", sha_b)
    with pytest.raises(BadInput) as e:
        train_graph.load_training_tokens(config_for(tokens_b, 5, root / "vq.ckpt"))
    assert str(e.value) == (f"periodic FID would decode with tokenizer checkpoint {root / 'vq.ckpt'} (config.tokenizer."
                            f"checkpoint, sha256 {sha_a[:12]}) but token dataset {tokens_b / 'meta.json'} records "
                            f"tokens of tokenizer sha256 {sha_b[:12]}: set config.tokenizer.checkpoint to the "
                            f"tokenizer that made the tokens")
    assert len(train_graph.load_training_tokens(config_for(tokens_b, 5, other))[0]) == 512  # the same tokenizer
    assert len(train_graph.load_training_tokens(config_for(tokens_b, 0, root / "vq.ckpt"))[0]) == 512  # no FID
    tokens_none = token_dir(tmp_path / "tok_none")
    assert len(train_graph.load_training_tokens(config_for(tokens_none, 5, root / "vq.ckpt"))[0]) == 512


def test_strategy_search_refuses_a_tokenizer_other_than_the_graphs_before_reading_anything_else(setup, tmp_path):
    from libs.sampling import strategy_search
    root, overrides, sha_a, _, sha_b, graphs = setup
    args = ["--checkpoint", str(root / "ka_mig.pth"), "--num-samples", "4", "--out", str(tmp_path / "search"),
            "--ref-stats", str(tmp_path / "absent.npz"), "--device", "cpu", *with_graphs(overrides, graphs)]
    with pytest.raises(BadInput, match=f"has tokenizer sha256 {sha_a[:12]} but the graphs were built from tokens "
                                       f"of tokenizer sha256 {sha_b[:12]}"):
        strategy_search.main(args)
    assert not (tmp_path / "search").exists()
