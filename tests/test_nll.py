"""Held-out masked-token NLL (libs/evaluation/nll.py) and its confidence intervals."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from libs.evaluation import nll as N
from tests.helpers import C, K, L, randomise_fusion, tiny_backbone, tiny_ka_mig

RATIOS = (0.1, 0.5, 0.9)


def tokens_and_labels(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, K, (n, L), generator=g), torch.randint(0, C, (n,), generator=g)


def naive_nll(model, tokens, labels, ratios, seed):
    """One image and one ratio at a time, the masks drawn as the docstring says: the oracle."""
    scores = torch.rand(len(tokens), L, generator=torch.Generator().manual_seed(seed))
    out = np.zeros((len(tokens), len(ratios)))
    for i in range(len(tokens)):
        order = scores[i].argsort()  # places from the lowest score up
        for j, r in enumerate(ratios):
            m = min(max(round(L * r), 1), L)
            masked = order[:m]
            ids = tokens[i].clone()
            ids[masked] = model.mask_token_id
            with torch.no_grad():
                logits = model(ids[None], labels[i:i + 1])[0]  # [L,K]
            total = sum(-F.log_softmax(logits[p].double(), -1)[tokens[i, p]] for p in masked.tolist())
            out[i, j] = float(total) / m
    return out


@pytest.mark.parametrize("kind", ["autonat", "ka_mig"])
def test_masked_nll_equals_a_per_image_loop(kind):
    if kind == "autonat":
        model = tiny_backbone(seed=1).eval()
    else:
        model, _ = tiny_ka_mig()
        randomise_fusion(model)  # non-zero graph terms, so KA-MIG differs from its backbone
    tokens, labels = tokens_and_labels()
    fast = N.masked_nll(model, tokens, labels, RATIOS, seed=5, batch_size=5)  # batches cut across images
    np.testing.assert_allclose(fast, naive_nll(model, tokens, labels, RATIOS, seed=5), rtol=0, atol=1e-5)
    assert fast.shape == (12, 3) and fast.dtype == np.float64
    assert np.all(fast > 0)
    assert not np.allclose(fast[:, 0], fast[:, 2])  # ratios give different numbers
    assert not np.allclose(N.masked_nll(model, tokens, labels, RATIOS, seed=6), fast)  # masks follow the seed


def test_masks_are_nested_seeded_and_prefix_stable():
    masks = N.fixed_masks(7, L, RATIOS, seed=3)  # [R,N,L]
    assert masks.shape == (3, 7, L)
    assert masks.sum(-1).tolist() == [[c] * 7 for c in N.masked_counts(L, RATIOS)]
    assert N.masked_counts(L, (0.01, 0.5, 1.0)) == [1, 8, 16]
    assert torch.all(masks[0] <= masks[1]) and torch.all(masks[1] <= masks[2])  # nested over ratios
    assert torch.equal(N.fixed_masks(4, L, RATIOS, seed=3), masks[:, :4])  # a prefix keeps its masks
    assert not torch.equal(N.fixed_masks(7, L, RATIOS, seed=4), masks)


def test_masked_nll_refuses_a_training_model_and_bad_ratios():
    model = tiny_backbone().train()
    tokens, labels = tokens_and_labels(2)
    with pytest.raises(ValueError, match="eval mode"):
        N.masked_nll(model, tokens, labels, RATIOS)
    with pytest.raises(ValueError, match="mask ratios"):
        N.masked_nll(model.eval(), tokens, labels, (0.0, 0.5))
    with pytest.raises(ValueError, match="labels"):
        N.masked_nll(model, tokens, labels[:1], RATIOS)


def test_a_better_model_gets_a_lower_nll():
    """A model that knows the tokens (logits peaked on the true ids) beats a uniform one by the expected margin."""
    tokens, labels = tokens_and_labels(6)

    class Oracle:
        mask_token_id, training = K, False

        def __init__(self, peak):
            self.peak = peak

        def __call__(self, ids, cls):  # one batch holds every image (batch_size=6 below)
            return torch.zeros(ids.shape[0], L, K).scatter_(-1, tokens[..., None], self.peak)

    uniform = N.masked_nll(Oracle(0.0), tokens, labels, RATIOS, batch_size=6)
    assert np.allclose(uniform, math.log(K))
    peaked = N.masked_nll(Oracle(5.0), tokens, labels, RATIOS, batch_size=6)
    assert np.allclose(peaked, -math.log(math.exp(5) / (math.exp(5) + K - 1)))


# ----------------------------------------------------------------------------- intervals


def test_t_interval_known_answer():
    ci = N.t_interval([1, 2, 3, 4, 5])
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) * sd / sqrt(n)
    assert ci["mean"] == 3 and ci["n"] == 5
    assert ci["lo"] == pytest.approx(3 - half, abs=1e-12) and ci["hi"] == pytest.approx(3 + half, abs=1e-12)
    wide = N.t_interval([1, 2, 3, 4, 5], level=0.99)
    assert wide["hi"] - wide["lo"] > ci["hi"] - ci["lo"]
    one = N.t_interval([2.0])
    assert one["mean"] == 2.0 and math.isinf(one["hi"])
    with pytest.raises(ValueError):
        N.t_interval([1.0, float("nan")])


def test_bootstrap_interval_agrees_with_t_on_a_large_sample_and_is_seeded():
    x = np.random.default_rng(0).normal(1.0, 2.0, 400)
    t, b = N.t_interval(x), N.bootstrap_interval(x, n_boot=4000, seed=1)
    assert b["mean"] == t["mean"]
    assert abs((b["hi"] - b["lo"]) / (t["hi"] - t["lo"]) - 1) < 0.1
    assert N.bootstrap_interval(x, n_boot=500, seed=1) == N.bootstrap_interval(x, n_boot=500, seed=1)
    flat = N.bootstrap_interval(np.full(10, 3.0), n_boot=100)
    assert flat["lo"] == flat["hi"] == 3.0


def test_paired_difference_uses_the_pairing():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 1.0, 200)  # large between-image spread
    a, b = base - 0.02 + rng.normal(0, 0.01, 200), base
    paired = N.paired_difference(a, b)
    assert paired["hi"] < 0 and N.excludes_zero(paired)  # a clear, small, consistent improvement
    unpaired_half = 1.96 * math.sqrt(a.var(ddof=1) / 200 + b.var(ddof=1) / 200)
    assert unpaired_half > 0.02 > (paired["hi"] - paired["lo"]) / 2  # ignoring the pairing would hide it
    assert not N.excludes_zero(N.paired_difference(base + rng.normal(0, 0.01, 200), base))
    with pytest.raises(ValueError, match="same shape"):
        N.paired_difference(a, b[:10])
