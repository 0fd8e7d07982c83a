"""The released graph recipe on a small token set: build_graphs with its default flags gives the stored G_co and G_s.

tests/fixtures/graph_recipe/ (README there) holds a paper-format token file (400 maps, 48 codes) and the two
graphs that the recipe behind the released files makes from it: G_co with torch.topk's ties, G_s with the
Jensen-Shannon divergence and no norm step.
"""
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from libs.graphs import recipes as G
from libs.graphs.files import load_edge_graph

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "graph_recipe"
CO, SIM = "codebook_co_occurrence_norm_self_50.pkl", "codebook_replace_graph_norm_self.pkl"
EXPECTED = {CO: "expected_co_occurrence.pkl", SIM: "expected_similarity.pkl"}


def load_expected(name):
    with open(FIXTURE / EXPECTED[name], "rb") as f:
        index, weight = pickle.load(f)
    return index, weight


def fixture_maps():
    tokens = np.load(FIXTURE / "tokens.npy")  # int64 [400, 1 + 256]: label, then the 16x16 ids
    return tokens[:, 1:].reshape(-1, 16, 16)


def assert_same_graph(index, weight, ref_index, ref_weight):
    assert index.dtype == torch.long and weight.dtype == ref_weight.dtype
    assert torch.equal(index, ref_index)  # same edges, same order
    rel = ((weight.double() - ref_weight.double()).abs() / ref_weight.double().abs()).max()
    assert float(rel) <= 1e-6


def test_build_graphs_default_flags_reproduce_the_fixture(tmp_path):
    out = tmp_path / "graph_prior"
    cmd = [sys.executable, "-m", "graph_construction.build_graphs", "--tokens", str(FIXTURE / "tokens.npy"),
           "--out", str(out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for name in (CO, SIM):
        index, weight, n = load_edge_graph(out / name, dtype=None)
        assert n == 48
        assert_same_graph(index, weight, *load_expected(name))


def test_fixture_ties_are_torch_topk_ties_not_smaller_ids():
    """Rows 6 and 25 tie at the cut-off; the recipe keeps 46 (not 41) and 32 (not 41)."""
    counts = G.co_occurrence_counts(fixture_maps(), 48)
    np.fill_diagonal(counts, 0)
    assert counts[6, 46] == counts[6, 41] == 371 and counts[25, 32] == counts[25, 41] == 447
    index, weight = G.co_occurrence_graph(counts, 0.05)
    src, dst = index
    assert 46 in dst[src == 6] and 41 not in dst[src == 6]
    assert 32 in dst[src == 25] and 41 not in dst[src == 25]
    assert_same_graph(torch.from_numpy(index), torch.from_numpy(weight), *load_expected(CO))


def test_fixture_similarity_needs_the_divergence_without_the_norm_step():
    hist = G.position_histograms(fixture_maps(), 48)
    ref_index, ref_weight = load_expected(SIM)
    index, weight = G.similarity_graph(hist, 2, 5.0)
    assert_same_graph(torch.from_numpy(index), torch.from_numpy(weight), ref_index, ref_weight)
    for measure, frobenius_norm in (("distance", False), ("divergence", True), ("distance", True)):
        index, weight = G.similarity_graph(hist, 2, 5.0, measure, frobenius_norm=frobenius_norm)
        assert not np.allclose(weight, ref_weight.numpy(), rtol=1e-6)
