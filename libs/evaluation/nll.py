"""Held-out masked-token NLL with fixed seeded masks, and confidence intervals of means and paired differences.

Pure functions: a model, token rows and labels in, numbers out; no file I/O.

The NLL of image n at mask ratio r: mask m = clamp(round(L r), 1, L) of its L positions, chosen by a fixed seeded
random order (the same for every model, so models are compared on identical inputs), replace them by [MASK],
run the model with the image's true class (no label dropout, no label smoothing, eval mode), and average
-log p(true token) over the masked positions. The masks of one image are nested across ratios: they come from
one random ranking of its positions (the m lowest-ranked places are masked), which makes the curves over ratios
smoother without changing what each point estimates. The ranking of image n depends only on `seed` and n (rows
of one seeded [N,L] draw), so a prefix of a token set gets the same masks as the whole set.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from libs.nonfinite import NonFiniteLogits, autocast_precision, what_to_try


def masked_counts(seq_len: int, ratios) -> list:
    """Masked places per image at each ratio: clamp(round(L r), 1, L)."""
    return [min(max(int(round(seq_len * float(r))), 1), seq_len) for r in ratios]


def fixed_masks(num_images: int, seq_len: int, ratios, seed: int) -> torch.Tensor:
    """Bool masks [R,N,L]: for ratio j, the masked_counts[j] lowest-ranked places of each image's seeded ranking."""
    scores = torch.rand(num_images, seq_len, generator=torch.Generator().manual_seed(int(seed)))  # [N,L]
    rank = scores.argsort(dim=1).argsort(dim=1)  # rank of each place in the image's random order
    counts = torch.tensor(masked_counts(seq_len, ratios))  # [R]
    return rank[None] < counts[:, None, None]  # [R,N,L]


@torch.no_grad()
def masked_nll(model, tokens, labels, ratios, seed: int = 0, batch_size: int = 256, mask_token_id: int = None,
               device="cpu") -> np.ndarray:
    """Per-image, per-ratio masked-token NLL (nats), float64 [N,R].

    model: callable (ids [B,L] with [MASK] = mask_token_id, class ids [B]) -> logits [B,L,K] (an AutoNAT, a
    KAMIG, a FusionCache); it must be in eval mode (dropout would make the numbers random). tokens [N,L] ints,
    labels [N] class ids (the true classes; never the null class unless given). mask_token_id defaults to
    `model.mask_token_id`. Results do not depend on batch_size beyond float rounding.

    Raises libs.nonfinite.NonFiniteLogits (naming the images, the mask ratio and the autocast precision) when
    the model's logits turn NaN/inf: NaN/inf logits anywhere in a row make its NLL non-finite, which is checked on
    the numbers already copied to the host, once per batch.
    """
    if getattr(model, "training", False):
        raise ValueError("masked_nll needs the model in eval mode (dropout would make the NLL random)")
    tokens = torch.as_tensor(np.asarray(tokens)).long()
    labels = torch.as_tensor(np.asarray(labels)).long().view(-1)
    if tokens.ndim != 2 or labels.shape[0] != tokens.shape[0]:
        raise ValueError(f"tokens must be [N,L] with labels [N], got {tuple(tokens.shape)} and {tuple(labels.shape)}")
    ratios = [float(r) for r in ratios]
    if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
        raise ValueError(f"mask ratios must lie in (0, 1], got {ratios}")
    mask_id = int(model.mask_token_id if mask_token_id is None else mask_token_id)
    N, L = tokens.shape
    masks = fixed_masks(N, L, ratios, seed)  # [R,N,L]
    out = np.empty((N, len(ratios)), dtype=np.float64)
    for s in range(0, N, batch_size):
        ids, cls = tokens[s:s + batch_size].to(device), labels[s:s + batch_size].to(device)
        for j in range(len(ratios)):
            mask = masks[j, s:s + batch_size].to(device)  # [B,L]
            logits = model(torch.where(mask, torch.full_like(ids, mask_id), ids), cls)  # [B,L,K]
            logp = F.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None])[..., 0]  # [B,L]
            nll = -(logp * mask).sum(1) / mask.sum(1)  # mean over the masked places
            out[s:s + batch_size, j] = nll.double().cpu().numpy()
        check_finite_nll(out[s:s + batch_size], s, ratios, torch.device(device).type)
    return out


def check_finite_nll(nll: np.ndarray, first: int, ratios, device_type: str):
    """NonFiniteLogits naming the first image (index `first` + row) and mask ratio of `nll` [B,R] that is not
    finite, with the autocast precision in use and what to try; nothing when all are finite."""
    bad = np.argwhere(~np.isfinite(nll))  # [n,2] (row, ratio index)
    if not len(bad):
        return
    row, j = bad[0]
    precision = autocast_precision(device_type)
    raise NonFiniteLogits(f"held-out NLL stopped: the model's logits turned NaN/inf for image {first + row} at mask "
                          f"ratio {ratios[j]} ({len(bad)} of {nll.size} values in images {first}.."
                          f"{first + len(nll) - 1}) under precision {precision}; {what_to_try(precision)}",
                          precision=precision)


# ----------------------------------------------------------------------------- intervals


def t_interval(values, level: float = 0.95) -> dict:
    """Mean of `values` [n] with its two-sided Student-t confidence interval (n - 1 degrees of freedom).

    -> {'mean', 'lo', 'hi', 'n', 'sd', 'se', 'level', 'method'}; n = 1 gives an infinite interval.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError("t_interval needs at least one value, all finite")
    n, mean = x.size, float(x.mean())
    sd = float(x.std(ddof=1)) if n > 1 else math.inf
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se if n > 1 else math.inf
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": int(n), "sd": sd, "se": se,
            "level": level, "method": "t"}


def bootstrap_interval(values, level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> dict:
    """Mean of `values` [n] with a percentile bootstrap interval (n_boot resamples of the n values, seeded)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_interval needs at least one value, all finite")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for s in range(0, n_boot, 1000):  # chunks keep the index matrix small
        k = min(1000, n_boot - s)
        means[s:s + k] = x[rng.integers(0, x.size, (k, x.size))].mean(1)
    lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return {"mean": float(x.mean()), "lo": float(lo), "hi": float(hi), "n": int(x.size),
            "sd": float(x.std(ddof=1)) if x.size > 1 else math.inf, "se": float(means.std(ddof=1)),
            "level": level, "method": f"percentile bootstrap, {n_boot} resamples, seed {seed}"}


def paired_difference(a, b, level: float = 0.95) -> dict:
    """t interval of the mean of a - b over paired values (the same images under two models)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    return t_interval(a - b, level)


def excludes_zero(interval: dict) -> bool:
    """True when the interval lies entirely on one side of 0."""
    return interval["lo"] > 0 or interval["hi"] < 0
