"""Graph files: the released pickles (load, oracle for the recipe), lossless saving, G_p files, the CLI."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from libs.config import load_config_file
from libs.graphs import recipes as G
from libs.graphs.files import (load_edge_graph, load_incompatibility, meta_path, sample_tokens, save_edge_graph,
                                save_incompatibility, save_sample_tokens)
from tests.helpers import OFFICIAL_GRAPHS, load_build_graphs_cli, write_random_token_dir

REPO = Path(__file__).resolve().parents[1]
CO, SIM = "codebook_co_occurrence_norm_self_50.pkl", "codebook_replace_graph_norm_self.pkl"
PAPER = load_config_file("configs/ka_mig_l.py").graph.recipe  # the paper's graph recipe
SIM_RECIPE = dict(k=PAPER.sim_k, alpha=PAPER.sim_alpha, measure=PAPER.sim_measure,
                  frobenius_norm=PAPER.sim_frobenius_norm)


# ----------------------------------------------------------------------------- released graphs


@pytest.mark.parametrize("name,edges,dtype", [(CO, 53_193, torch.float32), (SIM, 3_072, torch.float64)])
def test_released_pickles_load_and_resave_losslessly(tmp_path, name, edges, dtype):
    index, weight, n = load_edge_graph(OFFICIAL_GRAPHS / name, dtype=None)
    assert n == 1024 and index.dtype == torch.long and index.shape == (2, edges)
    assert weight.dtype == dtype and weight.shape == (edges,)
    assert load_edge_graph(OFFICIAL_GRAPHS / name)[1].dtype == torch.float32  # default for the model
    save_edge_graph(tmp_path / name, index, weight, {"note": "copy"})
    index2, weight2, n2 = load_edge_graph(tmp_path / name, dtype=None)
    assert n2 == 1024 and torch.equal(index2, index) and weight2.dtype == dtype
    assert torch.equal(weight2.view(torch.uint8), weight.view(torch.uint8))  # bitwise
    with open(tmp_path / name, "rb") as f:  # the paper's code reads ours with a plain pickle.load
        plain = pickle.load(f)
    assert torch.equal(plain[0], index) and torch.equal(plain[1], weight)
    assert json.loads(meta_path(tmp_path / name).read_text())["num_edges"] == edges


@pytest.mark.parametrize("name", [CO, SIM])
def test_released_graphs_follow_our_layout_and_edge_count_scaling(name):
    """Exact oracle: rebuilding from the released raw weights with our scaling gives the file back."""
    index, weight, K = load_edge_graph(OFFICIAL_GRAPHS / name, dtype=None)
    src, dst = index.numpy()
    w = weight.double().numpy()
    c = np.bincount(src, minlength=K)  # out-edges incl. the self-loop
    own = src != dst
    assert np.array_equal(src[~own], np.arange(K)) and np.array_equal(dst[~own], np.arange(K))
    assert not own[-K:].any()  # self-loops of 0..K-1 come last
    assert np.all(np.diff(src[own] * K + dst[own]) > 0)  # own edges in row-major order
    np.testing.assert_allclose(w[~own], 1.0 / c, rtol=1e-6)
    raw = w[own] * np.sqrt(c[src[own]] * c[dst[own]])
    if name == CO:  # raw weights are integer co-occurrence counts
        np.testing.assert_allclose(raw, np.round(raw), rtol=1e-6)
        raw = np.round(raw)
        in_deg = np.bincount(dst, minlength=K)
        assert np.abs(w[own] * np.sqrt(in_deg[src[own]] * in_deg[dst[own]]) % 1).max() > 0.1  # not in-degree
    rebuilt_index, rebuilt = G.add_self_loops_and_scale(src[own], dst[own], raw, K, dtype=np.float64)
    assert np.array_equal(rebuilt_index, index.numpy())
    np.testing.assert_allclose(rebuilt, w, rtol=3e-7 if name == CO else 1e-12)


def test_released_co_occurrence_degree_matches_default_ratio():
    index, _, K = load_edge_graph(OFFICIAL_GRAPHS / CO)
    kept = np.bincount(index[0].numpy(), minlength=K) - 1  # without the self-loop
    assert kept.max() == int((K - 1) * PAPER.co_ratio) == 51  # a token next to all 1023 others
    assert set(np.unique(kept).tolist()) <= {49, 50, 51}  # int(nnz*0.05) for nnz in 980..1023
    assert (K - 1) * 0.0498 < 51 <= (K - 1) * 0.0508  # only ratios in [51/1023, 52/1023) give this


def test_released_similarity_weights_rule_out_the_norm_step_with_the_divergence():
    """The default recipe is the divergence without the norm step; with the norm step it could not give the file."""
    assert (PAPER.sim_measure, PAPER.sim_frobenius_norm) == ("divergence", False)
    index, weight, K = load_edge_graph(OFFICIAL_GRAPHS / SIM, dtype=None)
    own = index[0] != index[1]
    js = -torch.log(weight[own] * 3) / PAPER.sim_alpha  # c = 3 for every node: weight = exp(-5 JS) / 3
    assert float(js.min()) > 0 and abs(float(js.max()) - 0.00556) < 1e-5
    # after a division by the Frobenius norm (1024 non-constant rows of max 1) every entry lies in
    # [0, 1/32] before the softmax, so the log-ratios of two distributions span at most 2/32 and the
    # divergence, about Var(log p/q)/8, stays near 1/(8*1024) = 0.00012; the released ones reach 0.0056
    assert float(js.max()) > 40 / (8 * 1024)


# ----------------------------------------------------------------------------- edge graph I/O errors


def test_numpy_pickles_load_too(tmp_path):
    path = tmp_path / "g.pkl"
    with open(path, "wb") as f:
        pickle.dump([np.array([[0, 1, 1], [1, 0, 1]]), np.array([0.5, 0.5, 1.0])], f)
    index, weight, n = load_edge_graph(path)
    assert index.dtype == torch.long and weight.dtype == torch.float32 and n == 2


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_edge_graph_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pkl(.|\n)*graph_construction\.build_graphs"):
        load_edge_graph(tmp_path / "nope.pkl")
    cases = {"garbage.pkl": b"not a pickle", "evil.pkl": pickle.dumps([Evil(), Evil()]),
             "dict.pkl": pickle.dumps({"a": 1}),
             "shape.pkl": pickle.dumps([torch.zeros(3, 2).long(), torch.zeros(2)]),
             "weight.pkl": pickle.dumps([torch.zeros(2, 3).long(), torch.zeros(4)]),
             "float_index.pkl": pickle.dumps([torch.zeros(2, 3), torch.zeros(3)])}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load_edge_graph(tmp_path / name)
    with pytest.raises(ValueError, match="edge_index must be"):
        save_edge_graph(tmp_path / "x.pkl", np.zeros((3, 2), int), np.zeros(2))


# ----------------------------------------------------------------------------- G_p files


def incompat_case(seed=0, N=50, grid=3, K=11, C=3):
    rng = np.random.default_rng(seed)
    maps = rng.integers(0, K, size=(N, grid, grid))
    labels = rng.integers(0, C, size=N)
    return maps, labels, G.occurrence_bits(maps, labels, C, K)


def test_incompatibility_npz_and_dense_files_load_the_same(tmp_path):
    maps, labels, packed = incompat_case()
    save_incompatibility(tmp_path / "incompatibility.npz", packed, {"codebook_size": 11, "grid": 3})
    got = load_incompatibility(tmp_path / "incompatibility.npz")
    assert got["packed"].dtype == torch.uint8 and torch.equal(got["packed"], torch.from_numpy(packed))
    assert (got["codebook_size"], got["seq_len"], got["num_classes"]) == (11, 9, 3)
    assert got["meta"]["grid"] == 3 and json.loads(meta_path(tmp_path / "incompatibility.npz").read_text())
    dense = G.incompatibility_rows(G.unpack_occurrence(packed, 11))  # the paper's [C,L,K] tensor
    torch.save(torch.from_numpy(dense), tmp_path / "dense.pt")
    np.save(tmp_path / "dense.npy", dense)
    for name in ("dense.pt", "dense.npy"):
        d = load_incompatibility(tmp_path / name)
        assert torch.equal(d["packed"], got["packed"]) and (d["codebook_size"], d["num_classes"]) == (11, 3)
    with_null = np.concatenate([dense, np.zeros((1,) + dense.shape[1:], dense.dtype)])  # [C+1,L,K]
    torch.save(torch.from_numpy(with_null), tmp_path / "with_null.pt")
    d = load_incompatibility(tmp_path / "with_null.pt", num_classes=3)
    assert d["num_classes"] == 3 and torch.equal(d["packed"], got["packed"])
    assert load_incompatibility(tmp_path / "with_null.pt")["num_classes"] == 4
    with pytest.raises(ValueError, match="holds 3 classes"):
        load_incompatibility(tmp_path / "dense.pt", num_classes=2)


def test_incompatibility_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"incompatibility\.npz(.|\n)*graph_construction\.build_graphs"):
        load_incompatibility(tmp_path / "incompatibility.npz")
    _, _, packed = incompat_case()
    with pytest.raises(ValueError, match="codebook_size"):
        save_incompatibility(tmp_path / "a.npz", packed, {"codebook_size": 30})
    with pytest.raises(ValueError, match="grid"):
        save_incompatibility(tmp_path / "a.npz", packed, {"codebook_size": 11, "grid": 4})
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"bad\.npz"):
        load_incompatibility(tmp_path / "bad.npz")
    torch.save(torch.zeros(3, 4), tmp_path / "flat.pt")
    with pytest.raises(ValueError, match=r"flat\.pt"):
        load_incompatibility(tmp_path / "flat.pt")


def test_sample_tokens_dict_and_writer(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 100, size=(30, 4)).astype(np.uint16)
    sample = sample_tokens(tokens, max_images=10, seed=1)
    assert list(sample) == G.sample_image_indices(30, 10, 1).tolist()
    assert all(v == tokens[i].tolist() and type(v[0]) is int for i, v in sample.items())
    save_sample_tokens(tmp_path / "train_img_50K_token.pkl", sample)
    with open(tmp_path / "train_img_50K_token.pkl", "rb") as f:
        assert pickle.load(f) == sample


# ----------------------------------------------------------------------------- CLI


def test_cli_end_to_end_writes_every_file_with_metadata(tmp_path):
    pytest.importorskip("libs.data.tokens")
    tokens, labels = write_random_token_dir(tmp_path / "ds")
    out = tmp_path / "graph_prior"
    cmd = [sys.executable, "-m", "graph_construction.build_graphs", "--tokens", str(tmp_path / "ds"),
           "--out", str(out), "--max-images", "50", "--seed", "3", "--co-ratio", "0.2", "--write-sample-tokens"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    maps = tokens.reshape(-1, 4, 4)
    sample = maps[G.sample_image_indices(len(maps), 50, 3)]
    index, weight, n = load_edge_graph(out / CO, dtype=None)
    ref_index, ref_weight = G.co_occurrence_graph(G.co_occurrence_counts(sample, 40), 0.2)
    assert n == 40 and np.array_equal(index.numpy(), ref_index) and np.array_equal(weight.numpy(), ref_weight)
    index, weight, _ = load_edge_graph(out / SIM, dtype=None)
    ref_index, ref_weight = G.similarity_graph(G.position_histograms(sample, 40), **SIM_RECIPE)
    assert np.array_equal(index.numpy(), ref_index) and np.array_equal(weight.numpy(), ref_weight)
    incompat = load_incompatibility(out / "incompatibility.npz")
    assert np.array_equal(incompat["packed"].numpy(), G.occurrence_bits(maps, labels, 5, 40))
    assert (incompat["num_classes"], incompat["seq_len"], incompat["codebook_size"]) == (5, 16, 40)
    for name, graph in ((CO, "co_occurrence"), (SIM, "similarity"), ("incompatibility.npz", "incompatibility")):
        meta = json.loads(meta_path(out / name).read_text())
        assert meta["recipe"]["graph"] == graph and meta["codebook_size"] == 40 and meta["grid"] == 4
        assert meta["source_dataset"] == str((tmp_path / "ds").resolve()) and meta["num_maps_total"] == 120
        assert meta["num_maps_used"] == (120 if graph == "incompatibility" else 50)
    assert json.loads(meta_path(out / CO).read_text())["recipe"]["ratio"] == 0.2
    sim_recipe = json.loads(meta_path(out / SIM).read_text())["recipe"]
    assert sim_recipe["frobenius_norm"] is False and "divergence" in sim_recipe["measure"]
    assert "Frobenius" not in sim_recipe["normalisation"]
    with open(out / "train_img_50_token.pkl", "rb") as f:
        assert pickle.load(f) == sample_tokens(tokens, 50, 3)
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_cli_one_graph_and_bad_flags(tmp_path, capsys):
    pytest.importorskip("libs.data.tokens")
    cli = load_build_graphs_cli()
    write_random_token_dir(tmp_path / "ds", N=30, grid=3, K=10, C=2)
    written = cli.main(["--tokens", str(tmp_path / "ds"), "--out", str(tmp_path / "o"), "--graphs", "sim",
                        "--num-threads", "1"])
    assert set(written) == {"sim"} and sorted(p.name for p in (tmp_path / "o").iterdir()) == [SIM, SIM + ".json"]
    with pytest.raises(SystemExit):
        cli.main(["--tokens", str(tmp_path / "ds"), "--graphs", "co,foo"])
    assert "--graphs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="num_classes|labels|classes"):
        cli.main(["--tokens", str(tmp_path / "ds"), "--out", str(tmp_path / "o2"), "--graphs", "incompat",
                  "--num-classes", "1"])


def test_cli_recipe_flags_select_the_similarity_variants(tmp_path):
    pytest.importorskip("libs.data.tokens")
    cli = load_build_graphs_cli()
    tokens, _ = write_random_token_dir(tmp_path / "ds", N=60, grid=4, K=20, C=2)
    hist = G.position_histograms(tokens.reshape(-1, 4, 4), 20)
    variants = {"default": ([], "divergence", False), "norm": (["--sim-frobenius-norm"], "divergence", True),
                "distance": (["--sim-measure", "distance"], "distance", False),
                "both": (["--sim-measure", "distance", "--config.graph.recipe.sim_frobenius_norm=true"],
                         "distance", True),
                "flag_wins": (["--config.graph.recipe.sim_frobenius_norm=true", "--no-sim-frobenius-norm"],
                              "divergence", False)}
    for name, (flags, measure, frobenius_norm) in variants.items():
        cli.main(["--tokens", str(tmp_path / "ds"), "--out", str(tmp_path / name), "--graphs", "sim"] + flags)
        index, weight, _ = load_edge_graph(tmp_path / name / SIM, dtype=None)
        ref_index, ref_weight = G.similarity_graph(hist, PAPER.sim_k, PAPER.sim_alpha, measure,
                                                   frobenius_norm=frobenius_norm)
        assert np.array_equal(index.numpy(), ref_index) and np.array_equal(weight.numpy(), ref_weight), name
        assert json.loads(meta_path(tmp_path / name / SIM).read_text())["recipe"]["frobenius_norm"] is frobenius_norm
    args = cli.parse_args(["--tokens", "t"])
    assert (args.sim_measure, args.sim_frobenius_norm) == ("divergence", False)


def test_cli_reads_the_paper_token_format(tmp_path):
    pytest.importorskip("libs.data.tokens")
    cli = load_build_graphs_cli()
    tokens, labels = write_random_token_dir(tmp_path / "ds", N=40, grid=3, K=12, C=3)
    np.save(tmp_path / "paper.npy", np.concatenate([labels[:, None], tokens.astype(np.int64)], 1))  # [N, 1+L]
    for src, out in ((tmp_path / "ds", "a"), (tmp_path / "paper.npy", "b")):
        cli.main(["--tokens", str(src), "--out", str(tmp_path / out), "--graphs", "incompat,co",
                  "--codebook-size", "12", "--num-classes", "3"])
    a, b = (load_incompatibility(tmp_path / d / "incompatibility.npz") for d in "ab")
    assert torch.equal(a["packed"], b["packed"])
    assert torch.equal(load_edge_graph(tmp_path / "a" / CO)[1], load_edge_graph(tmp_path / "b" / CO)[1])


def test_built_graph_files_plug_into_the_ka_mig_model(tmp_path):
    from libs.models.ka_mig import KAMIG, GraphConfig
    from tests.helpers import tiny_backbone

    K, grid, C = 32, 4, 4
    rng = np.random.default_rng(0)
    maps, labels = rng.integers(0, K, size=(200, grid, grid)), rng.integers(0, C, size=200)
    save_edge_graph(tmp_path / CO, *G.co_occurrence_graph(G.co_occurrence_counts(maps, K), PAPER.co_ratio))
    save_edge_graph(tmp_path / SIM, *G.similarity_graph(G.position_histograms(maps, K), **SIM_RECIPE))
    save_incompatibility(tmp_path / "g_p.npz", G.occurrence_bits(maps, labels, C, K), {"codebook_size": K})
    graphs = {"co": load_edge_graph(tmp_path / CO), "sim": load_edge_graph(tmp_path / SIM),
              "incompat": load_incompatibility(tmp_path / "g_p.npz", num_classes=C)["packed"]}
    backbone = tiny_backbone(codebook_size=K, seq_len=grid * grid, num_classes=C)
    model = KAMIG(backbone.cfg, GraphConfig(), graphs).eval()
    ids = torch.from_numpy(maps[:3].reshape(3, -1))
    out = model(ids, torch.tensor([0, 3, C]))  # includes the null class
    assert out.shape == (3, grid * grid, K) and torch.isfinite(out).all()
