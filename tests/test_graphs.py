"""Knowledge graphs (docs/reference.md#knowledge-graphs): vectorised builders against plain-loop references."""
import math

import numpy as np
import pytest
import torch

from libs.graphs import recipes as G

# ----------------------------------------------------------------------------- loop references


def ref_counts(maps, K, neighbourhood=8):
    """Ordered (centre, neighbour) pair counts by visiting every position of every map."""
    if neighbourhood == 8:
        offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    else:
        offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    counts = np.zeros((K, K), dtype=np.int64)
    for m in maps:
        h, w = m.shape
        for y in range(h):
            for x in range(w):
                for dy, dx in offsets:
                    if 0 <= y + dy < h and 0 <= x + dx < w:
                        counts[m[y, x], m[y + dy, x + dx]] += 1
    return counts


def ref_scale(edges, K):
    """edges: list of (src, dst, weight) in row-major order; appends self-loops and scales by out-degree."""
    edges = list(edges) + [(i, i, 1.0) for i in range(K)]
    out_deg = [0] * K
    for s, _, _ in edges:
        out_deg[s] += 1
    index = np.array([[s for s, _, _ in edges], [d for _, d, _ in edges]], dtype=np.int64)
    weight = np.array([w / math.sqrt(out_deg[s] * out_deg[d]) for s, d, w in edges])
    return index, weight


def ref_co_graph(counts, ratio):
    """Row by row: torch.topk (CPU) of the row's non-zero off-diagonal counts as a float32 vector in id order."""
    K = counts.shape[0]
    edges = []
    for i in range(K):
        ids = [j for j in range(K) if j != i and counts[i, j] > 0]
        if not ids:
            continue
        k = max(1, int(len(ids) * ratio))
        v = torch.tensor([float(counts[i, j]) for j in ids], dtype=torch.float32)  # 1-D, one row at a time
        kept = sorted(ids[p] for p in torch.topk(v, k).indices.tolist())
        edges += [(i, j, float(counts[i, j])) for j in kept]
    return ref_scale(edges, K)


def ref_histograms(maps, K):
    hist = np.zeros((K, maps.shape[1] * maps.shape[2]), dtype=np.int64)
    for m in maps:
        for p, t in enumerate(m.ravel()):
            hist[t, p] += 1
    return hist


def ref_js(p, q, measure):
    js = 0.0
    for a, b in zip(p, q):
        m = (a + b) / 2
        js += 0.5 * a * math.log(a / m) + 0.5 * b * math.log(b / m)
    js = max(js, 0.0)
    return math.sqrt(js) if measure == "distance" else js


def ref_similarity(hist, k, alpha, measure="divergence", frobenius_norm=False, ties=None):
    """The released recipe by default: min-max rows, (no norm step), softmax, JS divergence, k nearest.

    `ties` (a list) receives the rows whose k-th and (k+1)-th smallest values agree to 1e-12 relative:
    there the neighbour depends on float rounding (e.g. two tokens whose histograms are permutations of
    each other against a third), so only the weights can be compared.
    """
    K, L = hist.shape
    rows = []
    for r in hist.astype(float).tolist():
        lo, hi = min(r), max(r)
        rows.append([(v - lo) / (hi - lo) if hi > lo else 0.0 for v in r])
    frob = math.sqrt(sum(v * v for r in rows for v in r))
    if frobenius_norm and frob > 0:
        rows = [[v / frob for v in r] for r in rows]
    dists = []
    for r in rows:
        e = [math.exp(v - max(r)) for v in r]
        dists.append([v / sum(e) for v in e])
    edges = []
    for i in range(K):
        d = sorted((ref_js(dists[i], dists[j], measure), j) for j in range(K) if j != i)
        if ties is not None and k < len(d) and math.isclose(d[k - 1][0], d[k][0], rel_tol=1e-12, abs_tol=1e-300):
            ties.append(i)
        edges += sorted((i, j, math.exp(-alpha * v)) for v, j in d[:k])
    return ref_scale(edges, K)


def assert_similarity_equal(index, weight, ref_index, ref_weight, ties, k):
    """Same edges except in the rows of `ties` (mathematically tied cut-off); same weights everywhere."""
    K = index.shape[1] // (k + 1)
    own = np.ones(index.shape[1], dtype=bool)
    own[-K:] = False
    exact = ~np.isin(index[0], ties) | ~own
    assert np.array_equal(index[:, exact], ref_index[:, exact])
    np.testing.assert_allclose(weight[exact], ref_weight[exact], rtol=1e-9)
    for i in ties:  # tied rows: the kept weights are equal up to rounding whichever tied token is kept
        rows = own & (index[0] == i)
        np.testing.assert_allclose(np.sort(weight[rows]), np.sort(ref_weight[rows]), rtol=1e-9)


def ref_dense_incompatibility(maps, labels, C, K):
    """The paper's dense G_p [C,L,K]: 1/|I| on the tokens never seen at (class, position)."""
    L = maps.shape[1] * maps.shape[2]
    dense = np.zeros((C, L, K))
    for c in range(C):
        for i in range(L):
            seen = {int(m.ravel()[i]) for m, lab in zip(maps, labels) if lab == c}
            never = [t for t in range(K) if t not in seen]
            for t in never:
                dense[c, i, t] = 1.0 / len(never)
    return dense


CASES = [  # (N, h, w, K, seed)
    (6, 3, 3, 7, 0), (9, 4, 5, 12, 1), (4, 1, 6, 5, 2), (5, 5, 1, 9, 3), (30, 3, 4, 10, 4),
]


def random_maps(N, h, w, K, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, K, size=(N, h, w)).astype(np.uint16)


# ----------------------------------------------------------------------------- G_co


@pytest.mark.parametrize("neighbourhood", [8, 4])
@pytest.mark.parametrize("case", CASES)
def test_co_occurrence_counts_equal_loops_including_borders(case, neighbourhood):
    N, h, w, K, seed = case
    maps = random_maps(*case)
    expected = ref_counts(maps, K, neighbourhood)
    for chunk, threads in ((3, 1), (1000, 2), (2, 2)):
        got = G.co_occurrence_counts(maps, K, neighbourhood, chunk=chunk, num_threads=threads)
        assert got.dtype == np.int64 and np.array_equal(got, expected)


def test_co_occurrence_counts_corner_pairs():
    maps = np.array([[[0, 1], [2, 3]]])  # every pair of a 2x2 map is adjacent (8-neighbourhood)
    counts = G.co_occurrence_counts(maps, 4)
    assert np.array_equal(counts, 1 - np.eye(4, dtype=np.int64))
    counts4 = G.co_occurrence_counts(maps, 4, neighbourhood=4)
    assert counts4[0, 3] == counts4[1, 2] == 0 and counts4[0, 1] == counts4[0, 2] == 1


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("case", CASES)
def test_co_occurrence_graph_equals_loops(case, ratio):
    maps = random_maps(*case)
    counts = G.co_occurrence_counts(maps, case[3])
    counts[0, :] = 0  # a token without neighbours keeps only its self-loop
    counts[:, 0] = 0
    index, weight = G.co_occurrence_graph(counts, ratio)
    ref_index, ref_weight = ref_co_graph(counts, ratio)
    assert index.dtype == np.int64 and weight.dtype == np.float32
    assert np.array_equal(index, ref_index)
    np.testing.assert_allclose(weight, ref_weight, rtol=1e-6)


def test_co_occurrence_ties_follow_torch_topk_not_the_smaller_id():
    counts = np.array([[0, 5, 0, 5, 5, 5],  # candidates 1, 3, 4, 5 all tie at 5; k = int(4 * 0.3) = 1
                       [5, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0], [5, 1, 0, 0, 0, 0], [5, 0, 0, 0, 0, 0],
                       [5, 0, 0, 0, 0, 0]])
    index, weight = G.co_occurrence_graph(counts, ratio=0.3)
    src, dst = index
    # torch.topk([5, 5, 5, 5], 1) on CPU returns position 2 (torch 2.14): id 4, not the smaller id 1
    picked = int(torch.topk(torch.tensor([5.0, 5, 5, 5]), 1).indices)
    assert dst[src == 0].tolist() == [[1, 3, 4, 5][picked], 0] == [4, 0]
    assert dst[src == 1].tolist() == [0, 1]  # no tie: the largest count wins
    assert dst[src == 2].tolist() == [1, 2]  # one candidate: max(1, int(0.3)) = 1
    ref_index, ref_weight = ref_co_graph(counts, 0.3)
    assert np.array_equal(index, ref_index)
    np.testing.assert_allclose(weight, ref_weight, rtol=1e-6)


@pytest.mark.parametrize("chunk_elements", [1, 7, 1 << 22])
@pytest.mark.parametrize("K,levels,seed", [(40, 3, 0), (130, 4, 1), (300, 2, 2)])
def test_co_occurrence_topk_selection_vectorised_equals_row_by_row(K, levels, seed, chunk_elements):
    """Tie-heavy counts with zeros: grouped, chunked topk calls keep the same entries as one call per row."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, levels, size=(K, K)) * rng.integers(1, 3, size=(K, K))  # many ties, many zeros
    counts[3] = 0  # a row without co-occurrences
    np.fill_diagonal(counts, 0)
    nnz = (counts > 0).sum(1)
    k_row = np.where(nnz > 0, np.maximum(1, (nnz * 0.05).astype(np.int64)), 0)
    keep = G.top_counts_mask(counts, k_row, chunk_elements=chunk_elements)
    for i in range(K):
        ids = np.nonzero(counts[i])[0]
        if len(ids) == 0:
            assert not keep[i].any()
            continue
        picked = torch.topk(torch.from_numpy(counts[i, ids].astype(np.float32)), int(k_row[i])).indices.numpy()
        assert np.array_equal(np.nonzero(keep[i])[0], np.sort(ids[picked])), i


# ----------------------------------------------------------------------------- G_s


@pytest.mark.parametrize("case", CASES)
def test_position_histograms_equal_loops(case):
    maps = random_maps(*case)
    assert np.array_equal(G.position_histograms(maps, case[3], chunk=2), ref_histograms(maps, case[3]))


@pytest.mark.parametrize("measure,frobenius_norm", [("divergence", False), ("distance", False),
                                                    ("divergence", True), ("distance", True)])
@pytest.mark.parametrize("case", CASES)
def test_similarity_graph_equals_loops(case, measure, frobenius_norm):
    maps = random_maps(*case)
    hist = ref_histograms(maps, case[3])
    for k, alpha in ((2, 5.0), (3, 50.0)):
        index, weight = G.similarity_graph(hist, k, alpha, measure, frobenius_norm=frobenius_norm, chunk=4)
        ties = []
        ref_index, ref_weight = ref_similarity(hist, k, alpha, measure, frobenius_norm, ties)
        assert_similarity_equal(index, weight, ref_index, ref_weight, ties, k)


def test_similarity_default_is_the_divergence_without_the_norm_step():
    """The defaults (function and config) are the released recipe; the norm step changes the graph."""
    from libs.config import load_config_file
    recipe = load_config_file("configs/ka_mig_l.py").graph.recipe
    assert recipe.sim_measure == "divergence" and recipe.sim_frobenius_norm is False
    maps = random_maps(30, 4, 4, 10, 5)
    hist = ref_histograms(maps, 10)
    index, weight = G.similarity_graph(hist, 2, 5.0)
    ref_index, ref_weight = ref_similarity(hist, 2, 5.0, "divergence", frobenius_norm=False)
    assert np.array_equal(index, ref_index)
    np.testing.assert_allclose(weight, ref_weight, rtol=1e-9)
    _, normed = G.similarity_graph(hist, 2, 5.0, frobenius_norm=True)
    _, distance = G.similarity_graph(hist, 2, 5.0, "distance")
    own = index[0] != index[1]
    assert np.all(normed[own] > weight[own]) and np.all(distance[own] < weight[own])
    p = G.position_distributions(hist)
    np.testing.assert_allclose(p[0], np.exp((hist[0] - hist[0].min()) / np.ptp(hist[0]))
                               / np.exp((hist[0] - hist[0].min()) / np.ptp(hist[0])).sum(), rtol=1e-12)


def test_similarity_with_absent_and_constant_tokens_has_no_nan():
    hist = np.zeros((6, 4), dtype=np.int64)
    hist[0] = [5, 0, 0, 1]
    hist[1] = [3, 3, 3, 3]  # constant row -> zeros -> uniform, like the absent tokens 3..5
    hist[2] = [0, 9, 0, 0]
    for measure, frobenius_norm in (("divergence", False), ("distance", True)):
        index, weight = G.similarity_graph(hist, k=2, alpha=5.0, measure=measure, frobenius_norm=frobenius_norm)
        assert np.isfinite(weight).all()
        ref_index, ref_weight = ref_similarity(hist, 2, 5.0, measure, frobenius_norm)
        assert np.array_equal(index, ref_index)
        np.testing.assert_allclose(weight, ref_weight, rtol=1e-9)
        src, dst = index
        assert dst[src == 1].tolist() == [3, 4, 1]  # uniform rows tie at 0: the smaller ids win


def test_jensen_shannon_is_accurate_for_near_identical_distributions():
    rng = np.random.default_rng(0)
    p = G.position_distributions(rng.random((3, 256)))
    js = G.jensen_shannon(p, p.copy())
    assert np.all(js.diagonal() == 0)
    q = np.exp(np.log(p) + 1e-6 * rng.standard_normal((3, 256)))
    q /= q.sum(1, keepdims=True)
    ref = [ref_js(a.tolist(), b.tolist(), "divergence") for a, b in zip(p, q)]  # ~1e-12
    np.testing.assert_allclose(G.jensen_shannon(p, q).diagonal(), ref, rtol=1e-3)
    full = G.jensen_shannon_matrix(p, chunk=2, num_threads=2)
    np.testing.assert_allclose(full, G.jensen_shannon(p, p), rtol=1e-9, atol=1e-18)


# ----------------------------------------------------------------------------- G_p


@pytest.mark.parametrize("case", [(40, 3, 3, 7, 0), (25, 4, 5, 12, 1), (60, 2, 2, 11, 2)])
def test_incompatibility_equals_dense_loops_and_projects_the_same(case):
    N, h, w, K, seed = case
    C = 3
    maps = random_maps(*case)
    labels = np.random.default_rng(seed).integers(0, C, size=N)
    dense = ref_dense_incompatibility(maps, labels, C, K)  # [C,L,K]
    packed = G.occurrence_bits(maps, labels, C, K, chunk=7)
    assert packed.dtype == np.uint8 and packed.shape == (C, h * w, math.ceil(K / 8))
    rows = G.incompatibility_rows(G.unpack_occurrence(packed, K), np.float64)
    np.testing.assert_allclose(rows, dense, rtol=0, atol=1e-12)
    sums = dense.sum(-1)
    assert np.allclose(sums[(dense > 0).any(-1)], 1.0) and np.all(sums[~(dense > 0).any(-1)] == 0)
    assert np.array_equal(G.dense_to_occurrence(dense), packed)
    assert np.array_equal(G.dense_to_occurrence(torch.from_numpy(dense).float()), packed)
    W = torch.randn(K, 16, generator=torch.Generator().manual_seed(seed))
    compact = G.incompatibility_rows(G.unpack_occurrence_torch(torch.from_numpy(packed), K)) @ W
    assert float((compact - torch.from_numpy(dense).float() @ W).abs().max()) <= 1e-6


def test_rows_sum_to_one_or_zero_and_null_class_convention():
    K, C = 9, 2
    maps = np.tile(np.arange(9).reshape(1, 3, 3), (4, 1, 1))  # class 0 sees one token per position
    maps[2:] = np.random.default_rng(0).integers(0, K, size=(2, 3, 3))
    labels = np.array([0, 0, 1, 1])
    occurs = G.unpack_occurrence(G.occurrence_bits(maps, labels, C, K), K)  # [C,L,K]
    rows = G.incompatibility_rows(occurs)
    assert rows.shape == (C, 9, K) and np.allclose(rows[0].sum(-1), 1.0)
    assert np.allclose(rows[0][np.arange(9), np.arange(9)], 0) and np.allclose(rows[0][0, 1:], 1 / 8)
    all_seen = np.ones((1, 9, K), dtype=bool)  # the null class / a dense all-zero block
    assert np.all(G.incompatibility_rows(all_seen) == 0)
    assert np.array_equal(G.dense_to_occurrence(np.zeros((1, 9, K))), np.packbits(all_seen, -1, bitorder="little"))
    torch_rows = G.incompatibility_rows(torch.from_numpy(occurs))
    assert torch_rows.dtype == torch.float32 and torch.equal(torch_rows, torch.from_numpy(rows))


@pytest.mark.parametrize("K", [1, 7, 8, 11, 1024])
def test_bit_packing_round_trip_numpy_and_torch(K):
    occurs = np.random.default_rng(K).random((3, 5, K)) < 0.5
    packed = np.packbits(occurs, axis=-1, bitorder="little")
    assert np.array_equal(G.unpack_occurrence(packed, K), occurs)
    t = G.unpack_occurrence(torch.from_numpy(packed), K)
    assert t.dtype == torch.bool and torch.equal(t, torch.from_numpy(occurs))
    assert np.array_equal(G.dense_to_occurrence(~occurs * 1.0), packed)


# ----------------------------------------------------------------------------- sampling and bad input


def test_sample_image_indices_seeded_sorted_unique():
    a = G.sample_image_indices(1000, 50, seed=3)
    assert np.array_equal(a, G.sample_image_indices(1000, 50, seed=3))
    assert not np.array_equal(a, G.sample_image_indices(1000, 50, seed=4))
    assert len(np.unique(a)) == 50 and np.all(np.diff(a) > 0) and a.max() < 1000
    assert np.array_equal(G.sample_image_indices(10, 50), np.arange(10))
    assert np.array_equal(G.sample_image_indices(10, None), np.arange(10))


def test_bad_input_raises_clear_value_errors():
    maps = random_maps(4, 3, 3, 5, 0)
    with pytest.raises(ValueError, match=r"\[N,h,w\]"):
        G.co_occurrence_counts(maps.reshape(4, 9), 5)
    with pytest.raises(ValueError, match="outside the codebook"):
        G.co_occurrence_counts(maps, 4)
    with pytest.raises(ValueError, match="outside the codebook"):
        G.position_histograms(maps, 3)
    with pytest.raises(ValueError, match="outside the codebook"):
        G.occurrence_bits(maps, np.zeros(4, int), 2, 4)
    with pytest.raises(ValueError, match="integer"):
        G.co_occurrence_counts(maps.astype(float), 5)
    with pytest.raises(ValueError, match="neighbourhood"):
        G.co_occurrence_counts(maps, 5, neighbourhood=6)
    with pytest.raises(ValueError, match="labels"):
        G.occurrence_bits(maps, np.zeros(3, int), 2, 5)
    with pytest.raises(ValueError, match="null class"):
        G.occurrence_bits(maps, np.array([0, 1, 2, 0]), 2, 5)
    with pytest.raises(ValueError, match="square"):
        G.co_occurrence_graph(np.zeros((3, 4)), 0.05)
    with pytest.raises(ValueError, match="ratio"):
        G.co_occurrence_graph(np.zeros((3, 3)), ratio=0)
    with pytest.raises(ValueError, match="k must be"):
        G.similarity_graph(np.ones((3, 4)), k=3, alpha=5.0, measure="distance")
    with pytest.raises(ValueError, match="measure"):
        G.similarity_graph(np.ones((3, 4)), k=2, alpha=5.0, measure="kl")
