"""Sample-quality metrics on Inception features: FID, precision/recall, Inception Score
(docs/reference.md#evaluation-protocol).

Pure functions: float64 where the statistic needs it, no file I/O. Features are [N, D] arrays.
"""
import numpy as np
import torch
from scipy.linalg import lapack


def _as_float64(x, name: str) -> np.ndarray:
    """`x` (numpy array or tensor) as a float64 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _check_features(x, name: str) -> None:
    """Raises unless `x` is a 2-D [N, D] feature array."""
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] feature array, got shape {tuple(x.shape)}")


def feature_statistics(features):
    """(mu [D], sigma [D,D]) in float64 of features [N, D]; sigma is the unbiased (N-1) covariance."""
    x = _as_float64(features, "features")
    _check_features(x, "features")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    mu = x.mean(axis=0)  # [D]
    sigma = np.cov(x, rowvar=False)  # [D, D]
    return mu, sigma


def _psd_factor(a: np.ndarray) -> np.ndarray:
    """F [D, r] with F F^T = a (to round-off) for a symmetric PSD a, r its numerical rank: pivoted Cholesky."""
    # LAPACK pstrf stops when the largest remaining pivot is below D * eps * max(diag(a)) (tol=-1), so
    # round-off directions of a singular covariance are dropped; it costs O(D^2 r), cheap for N << D
    c, piv, rank, info = lapack.dpstrf((a + a.T) / 2, lower=1, tol=-1.0)
    if info < 0:
        raise ValueError(f"pivoted Cholesky failed (LAPACK info {info})")
    f = np.zeros((a.shape[0], rank))
    f[piv - 1] = np.tril(c)[:, :rank]  # undo the pivoting: rows back in feature order
    return f


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).
    """
    mu1, mu2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    sigma1, sigma2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    if mu1.ndim != 1 or mu2.ndim != 1:
        raise ValueError(f"mu1 and mu2 must be 1-D, got shapes {mu1.shape} and {mu2.shape}")
    if mu1.shape[0] != mu2.shape[0]:
        raise ValueError(f"feature dimension mismatch: mu1 has {mu1.shape[0]}, mu2 has {mu2.shape[0]}")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"feature dimension mismatch: {name} has shape {s.shape}, means have dimension {d}")
    # tr((S1 S2)^{1/2}) without a matrix square root: with S_i = F_i F_i^T (F_i [D, r_i] from a pivoted
    # Cholesky, r_i the numerical rank), the non-zero eigenvalues of S1 S2 = F1 (F1^T F2) F2^T equal those of
    # G G^T with G = F1^T F2 [r1, r2] (AB and BA share non-zero eigenvalues), a symmetric PSD matrix, so
    # tr((S1 S2)^{1/2}) = sum sqrt(eigvalsh(G G^T)). Taking F1 as the lower-rank factor makes G G^T
    # generically full rank, so no eigenvalue sits at round-off level where sqrt would amplify the noise
    # (self-FID of a rank-deficient set ~1e-12, where sqrt(eigvalsh(S1^{1/2} S2 S1^{1/2})) gives ~1e-3 in
    # 2048-d). Everything stays real: no complex parts to drop, no eps*I offset that shifts the value when
    # a covariance is singular (N < D); two Cholesky + one eigvalsh of [D, D] cost a fraction of
    # scipy.linalg.sqrtm's Schur method (and of eigh-based square roots), and agree with both to ~1e-10.
    f1, f2 = _psd_factor(sigma1), _psd_factor(sigma2)  # [D, r1], [D, r2]
    if f1.shape[1] > f2.shape[1]:
        f1, f2 = f2, f1  # tr((S1 S2)^{1/2}) = tr((S2 S1)^{1/2})
    g = f1.T @ f2  # [r1, r2], r1 <= r2
    eig = np.linalg.eigvalsh(g @ g.T) if g.size else np.zeros(0)  # [r1]
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _to_tensor(x, name: str, device, dtype) -> torch.Tensor:
    """Features as a [N, D] tensor on `device` in `dtype`."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] feature array, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=dtype)


def _chunk_rows(n_cols: int, max_elements: int) -> int:
    """Rows per chunk so that a [rows, n_cols] distance block stays under max_elements entries."""
    return max(1, max_elements // max(1, n_cols))


def manifold_radii(feats: torch.Tensor, k: int = 3, max_elements: int = 2 ** 26) -> torch.Tensor:
    """Radius of each point's k-NN ball: distance to its k-th nearest neighbour in `feats`, self excluded."""
    n = feats.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k={k} nearest neighbours need more than k points, got {n}")
    radii = torch.empty(n, dtype=feats.dtype, device=feats.device)
    rows = _chunk_rows(n, max_elements)
    for i in range(0, n, rows):
        d = torch.cdist(feats[i:i + rows], feats)  # [r, n]
        idx = torch.arange(d.shape[0], device=feats.device)
        d[idx, idx + i] = -1.0  # self always sorts first, so index k below is the k-th other point
        radii[i:i + rows] = torch.kthvalue(d, k + 1, dim=1).values  # [r]
    return radii


def fraction_in_manifold(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor,
                         max_elements: int = 2 ** 26) -> float:
    """Fraction of `queries` lying within distance radii[j] of some manifold point j."""
    inside = 0
    rows = _chunk_rows(manifold.shape[0], max_elements)
    for i in range(0, queries.shape[0], rows):
        d = torch.cdist(queries[i:i + rows], manifold)  # [r, n_manifold]
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(real_feats, fake_feats, k: int = 3, device=None, dtype=torch.float32,
                     max_elements: int = 2 ** 26):
    """(precision, recall) with k-NN manifolds as the ADM evaluator (Kynkaanniemi et al. 2019).

    precision = fraction of fake points inside the real manifold (union of balls around each real point
    with radius its distance to its k-th nearest real neighbour); recall = the same with roles swapped.
    Distances are computed in chunks of at most `max_elements` entries (50K x 50K fits).
    """
    if device is None:
        device = real_feats.device if isinstance(real_feats, torch.Tensor) else "cpu"
    real = _to_tensor(real_feats, "real_feats", device, dtype)  # [Nr, D]
    fake = _to_tensor(fake_feats, "fake_feats", device, dtype)  # [Nf, D]
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimension mismatch: real features have {real.shape[1]}, "
                         f"fake features have {fake.shape[1]}")
    real_radii = manifold_radii(real, k, max_elements)  # [Nr]
    fake_radii = manifold_radii(fake, k, max_elements)  # [Nf]
    precision = fraction_in_manifold(real, real_radii, fake, max_elements)
    recall = fraction_in_manifold(fake, fake_radii, real, max_elements)
    return precision, recall


def inception_score(scores, splits: int = 10, kind: str = "logits") -> float:
    """Inception Score exp(E_x KL(p(y|x) || p(y))), averaged over `splits` equal parts (as ADM, 50K / 10).

    `scores` [N, C] are logits (kind='logits', softmax taken here) or class probabilities (kind='probs').
    """
    x = _as_float64(scores, "scores")
    _check_features(x, "scores")
    if kind == "logits":
        x = x - x.max(axis=1, keepdims=True)
        p = np.exp(x)
        p /= p.sum(axis=1, keepdims=True)  # [N, C] softmax
    elif kind == "probs":
        if np.any(x < 0) or not np.allclose(x.sum(axis=1), 1.0, atol=1e-6):
            raise ValueError("kind='probs' needs non-negative rows summing to 1")
        p = x
    else:
        raise ValueError(f"kind must be 'logits' or 'probs', got {kind!r}")
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must be between 1 and the number of samples ({p.shape[0]}), got {splits}")
    values = []
    for part in np.array_split(p, splits):  # [n_i, C] each
        py = part.mean(axis=0, keepdims=True)  # [1, C] marginal
        # 0 * log(0 / q) = 0: only positive p(y|x) contribute
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0).sum(axis=1)  # [n_i]
        values.append(np.exp(kl.mean()))
    return float(np.mean(values))
