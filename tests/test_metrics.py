"""FID / precision-recall / IS maths and the fid_stats library with a tiny stand-in feature extractor."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from libs.evaluation import fid_stats, metrics


def random_cov(rng, d, n=None):
    """A random SPD covariance [d,d] (or the sample covariance of n points, singular if n <= d)."""
    a = rng.standard_normal((n or 2 * d, d))
    return np.cov(a, rowvar=False) + (0 if n else 0.1 * np.eye(d))


def reference_fid_sqrtm(mu1, s1, mu2, s2):
    """Textbook FID with scipy's Schur-based sqrtm (well-conditioned inputs only)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def reference_fid_eigvals(mu1, s1, mu2, s2):
    """FID via the (real, non-negative) eigenvalues of the non-symmetric product S1 S2."""
    ev = np.linalg.eigvals(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


# ---------------------------------------------------------------- Frechet distance

def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    for n, d in [(500, 32), (100, 256)]:  # full rank, and singular (N < D) covariance
        mu, sigma = metrics.feature_statistics(rng.standard_normal((n, d)) * 3 + 1)
        assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_equal_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(1)
    sigma = random_cov(rng, 48)
    mu1, mu2 = rng.standard_normal(48), rng.standard_normal(48)
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert metrics.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-9, abs=1e-6)


def test_fid_matches_float64_references_on_random_covariances():
    rng = np.random.default_rng(2)
    for d in (8, 64):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) + 0.5
        s1, s2 = random_cov(rng, d), random_cov(rng, d) * 2
        got = metrics.frechet_distance(mu1, s1, mu2, s2)
        assert got == pytest.approx(reference_fid_sqrtm(mu1, s1, mu2, s2), rel=1e-8)
        assert got == pytest.approx(reference_fid_eigvals(mu1, s1, mu2, s2), rel=1e-8)
    # ill-conditioned (condition number ~1e8, like Inception feature covariances)
    scale = np.diag(np.logspace(0, -4, d))
    s1c, s2c = scale @ s1 @ scale, scale @ s2 @ scale
    got = metrics.frechet_distance(mu1, s1c, mu2, s2c)
    assert got == pytest.approx(reference_fid_sqrtm(mu1, s1c, mu2, s2c), rel=1e-8)
    # accepts float32 tensors, computes in float64
    t = metrics.frechet_distance(torch.tensor(mu1, dtype=torch.float32), torch.tensor(s1), mu2, s2)
    assert t == pytest.approx(metrics.frechet_distance(mu1.astype(np.float32), s1, mu2, s2), rel=1e-12)


def test_fid_singular_covariances_stay_real_and_close_to_reference():
    rng = np.random.default_rng(3)
    d = 64
    x, y = rng.standard_normal((40, d)), rng.standard_normal((50, d)) + 0.2  # both rank deficient
    mu1, s1 = metrics.feature_statistics(x)
    mu2, s2 = metrics.feature_statistics(y)
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float) and math.isfinite(got)
    assert got == pytest.approx(reference_fid_eigvals(mu1, s1, mu2, s2), rel=1e-6)
    full = random_cov(rng, d)  # one full rank, one rank deficient, either order
    assert metrics.frechet_distance(mu1, full, mu2, s2) == pytest.approx(reference_fid_sqrtm(mu1, full, mu2, s2), rel=1e-6)
    assert metrics.frechet_distance(mu1, s1, mu2, full) == pytest.approx(metrics.frechet_distance(mu2, full, mu1, s1))
    # identical samples: zero covariance, FID is the squared mean distance
    zero = np.zeros((d, d))
    assert metrics.frechet_distance(mu1, zero, mu2, zero) == pytest.approx(float(np.sum((mu1 - mu2) ** 2)))


def test_fid_dimension_mismatch_names_both_dims():
    with pytest.raises(ValueError, match="mu1 has 2048, mu2 has 64"):
        metrics.frechet_distance(np.zeros(2048), np.eye(2048), np.zeros(64), np.eye(64))
    with pytest.raises(ValueError, match=r"sigma2 has shape \(3, 3\).*dimension 4"):
        metrics.frechet_distance(np.zeros(4), np.eye(4), np.zeros(4), np.eye(3))


def test_feature_statistics_matches_numpy_and_rejects_one_sample():
    x = np.random.default_rng(4).standard_normal((30, 5)).astype(np.float32)
    mu, sigma = metrics.feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.shape == (5, 5)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.feature_statistics(x[:1])


# ---------------------------------------------------------------- precision / recall

def brute_force_pr(real, fake, k):
    """Precision/recall with explicit loops in float64 (the definition, no batching)."""
    def dist(a, b):
        return math.sqrt(sum((float(u) - float(v)) ** 2 for u, v in zip(a, b)))

    def radii(x):
        return [sorted(dist(x[i], x[j]) for j in range(len(x)) if j != i)[k - 1] for i in range(len(x))]

    def frac(manifold, r, queries):
        return sum(any(dist(q, m) <= r[j] for j, m in enumerate(manifold)) for q in queries) / len(queries)
    return frac(real, radii(real), fake), frac(fake, radii(fake), real)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(5)
    real = rng.standard_normal((40, 6))
    fake = rng.standard_normal((30, 6)) * 1.5 + 0.7  # partly outside the real manifold and vice versa
    expected = brute_force_pr(real, fake, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    got = metrics.precision_recall(real, fake, k=k, dtype=torch.float64)
    assert got == pytest.approx(expected, abs=1e-12)
    # tiny chunks exercise the batching; float32 default gives the same fractions here
    assert metrics.precision_recall(real, fake, k=k, dtype=torch.float64, max_elements=37) == pytest.approx(expected)
    assert metrics.precision_recall(torch.tensor(real), torch.tensor(fake), k=k) == pytest.approx(expected)


def test_precision_recall_same_set_is_one_and_errors():
    x = np.random.default_rng(6).standard_normal((20, 4))
    assert metrics.precision_recall(x, x) == (1.0, 1.0)
    with pytest.raises(ValueError, match="real features have 4, fake features have 3"):
        metrics.precision_recall(x, x[:, :3])
    with pytest.raises(ValueError, match="more than k"):
        metrics.precision_recall(x[:3], x, k=3)


# ---------------------------------------------------------------- Inception Score

def test_inception_score_known_distributions():
    c = 10
    uniform = np.full((50, c), 1.0 / c)
    assert metrics.inception_score(uniform, splits=5, kind="probs") == pytest.approx(1.0)
    assert metrics.inception_score(np.zeros((50, c)), splits=5) == pytest.approx(1.0)  # uniform logits
    onehot = np.eye(c)[np.arange(100) % c]  # every split of 10 holds each class once
    assert metrics.inception_score(onehot, splits=10, kind="probs") == pytest.approx(c)
    assert metrics.inception_score(onehot * 100.0, splits=10) == pytest.approx(c, rel=1e-6)  # near one-hot logits
    same = np.eye(c)[np.zeros(20, dtype=int)]  # confident but one class: IS 1
    assert metrics.inception_score(same, splits=2, kind="probs") == pytest.approx(1.0)


def test_inception_score_errors():
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(np.zeros((5, 3)), splits=10)
    with pytest.raises(ValueError, match="kind"):
        metrics.inception_score(np.zeros((5, 3)), kind="softmax")
    with pytest.raises(ValueError, match="sum"):
        metrics.inception_score(np.ones((5, 3)), splits=1, kind="probs")


# ---------------------------------------------------------------- fid_stats with a stand-in extractor

class TinyExtractor:
    """Stand-in for FeatureExtractor: 8 cheap features of uint8 [B,H,W,3] batches; optional 5 'logits'."""

    def __init__(self, dims=8, logits=False):
        self.dims, self.logits, self.source, self.calls = dims, logits, "tiny-test-extractor", 0

    def features(self, images):
        self.calls += 1
        x = torch.as_tensor(images).double() / 255  # [B,H,W,3]
        assert images.dtype == torch.uint8 or images.dtype == np.uint8
        f = torch.cat([x.mean((1, 2)), x.std((1, 2)), x[:, :1, :1].flatten(1)], 1)[:, :self.dims]  # [B,<=9]
        f = torch.nn.functional.pad(f, (0, self.dims - f.shape[1]))
        return f.numpy(), (f[:, :5].numpy() * 10 if self.logits else None)


def random_images(n, h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def write_folder(path, images):
    path.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(path / f"{i:06d}.png")
    return path


def test_image_sources_folder_and_npz_agree(tmp_path):
    images = random_images(7)
    folder = write_folder(tmp_path / "imgs", images)
    (folder / "notes.txt").write_text("ignored")
    np.savez(tmp_path / "imgs.npz", arr_0=images, labels=np.arange(7))
    np.savez_compressed(tmp_path / "imgs_c.npz", arr_0=images)
    for src in (folder, tmp_path / "imgs.npz", tmp_path / "imgs_c.npz"):
        source = fid_stats.load_image_batch_source(src)
        assert len(source) == 7
        batches = list(source.batches(3))
        assert [b.shape[0] for b in batches] == [3, 3, 1] and all(b.dtype == np.uint8 for b in batches)
        np.testing.assert_array_equal(np.concatenate(batches), images)


def test_image_source_bad_inputs(tmp_path):
    np.savez(tmp_path / "no_arr0.npz", images=random_images(2))
    with pytest.raises(ValueError, match=r"no 'arr_0' array.*\['images'\]"):
        fid_stats.load_image_batch_source(tmp_path / "no_arr0.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="arr_0 must be uint8"):
        fid_stats.load_image_batch_source(tmp_path / "float.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        fid_stats.load_image_batch_source(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="images not found"):
        fid_stats.load_image_batch_source(tmp_path / "nowhere")
    folder = write_folder(tmp_path / "mixed", random_images(2))
    Image.fromarray(random_images(1, 5, 5)[0]).save(folder / "zz.png")
    with pytest.raises(ValueError, match="differ in size"):
        list(fid_stats.load_image_batch_source(folder).batches(10))


def test_quantize_uint8_rounds_like_saved_png(tmp_path):
    from torchvision.utils import save_image
    x = torch.rand(2, 3, 5, 6)
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.5 / 255])
    q = fid_stats.quantize_uint8(x)  # [2,5,6,3]
    for i in range(2):
        save_image(x[i], tmp_path / f"{i}.png")
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"{i}.png")), q[i].numpy())
    u = random_images(2)
    assert fid_stats.quantize_uint8(u) is not None and torch.equal(fid_stats.quantize_uint8(u), torch.from_numpy(u))
    with pytest.raises(ValueError, match=r"in \[0,1\]"):
        fid_stats.quantize_uint8(x * 2 - 1)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((5, 6, 3), np.uint8), "4-D"),
    (np.zeros((2, 3, 5, 6), np.uint8), r"\[B,H,W,3\]"),
    (np.zeros((2, 5, 6, 3), np.float32), r"float \[B,3,H,W\]"),
    (np.zeros((2, 5, 6, 3), np.int32), "uint8"),
])
def test_bad_image_batches_are_refused(bad, message):
    from libs.evaluation.inception import image_batch  # the check FeatureExtractor.preprocess runs
    for check in (fid_stats.quantize_uint8, image_batch):
        with pytest.raises(ValueError, match=message):
            check(bad)


def test_reference_stats_roundtrip_and_adm_layout(tmp_path):
    ex = TinyExtractor()
    images = random_images(12)
    stats = fid_stats.compute_reference_stats(images, ex, batch_size=5, save_features=True, progress=False)
    out = fid_stats.save_reference_stats(tmp_path / "ref.npz", stats)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]  # atomic: no temp files left
    loaded = fid_stats.load_reference_stats(out)
    np.testing.assert_array_equal(loaded["mu"], stats["mu"])
    np.testing.assert_array_equal(loaded["sigma"], stats["sigma"])
    assert loaded["features"].shape == (12, 8) and loaded["inception_weights"] == ex.source
    # ADM's reference batch layout: arr_0 images + mu/sigma (+ mu_s/sigma_s), loaded as is
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=stats["mu"], sigma=stats["sigma"],
             mu_s=np.zeros(3), sigma_s=np.eye(3))
    adm = fid_stats.load_reference_stats(tmp_path / "adm.npz")
    assert adm["features"] is None and adm["inception_weights"] is None
    adm = fid_stats.load_reference_stats(tmp_path / "adm.npz", extractor=ex)  # features from its images
    assert adm["features_from"] == "arr_0 images"
    np.testing.assert_allclose(adm["features"], loaded["features"], rtol=1e-6)


def test_load_reference_stats_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)reference statistics not found: .*missing\.npz.*libs\.evaluation\.fid_stats"):
        fid_stats.load_reference_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(4), arr_0=random_images(2))
    with pytest.raises(ValueError, match=r"missing \['sigma'\]"):
        fid_stats.load_reference_stats(tmp_path / "nosigma.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(ValueError, match="sigma"):
        fid_stats.load_reference_stats(tmp_path / "shape.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        fid_stats.load_reference_stats(tmp_path / "single.npy")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an .npz file of reference statistics"):
        fid_stats.load_reference_stats(tmp_path / "junk.npz")


def test_compute_metrics_self_and_inputs():
    ex = TinyExtractor(logits=True)
    images = random_images(20)
    ref = fid_stats.compute_reference_stats(images, ex, save_features=True, progress=False)
    res = fid_stats.compute_metrics(images, ref, ex, num_expected=20, batch_size=6, progress=False)
    assert abs(res["fid"]) < 1e-6 and res["n"] == 20
    assert res["precision"] == 1.0 and res["recall"] == 1.0
    assert res["inception_score"] is not None and res["inception_weights"] == ex.source
    # float [N,3,H,W] in [0,1] and an iterable of batches give the same numbers after uint8 quantisation
    floats = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    res_f = fid_stats.compute_metrics(iter(torch.split(floats, 7)), ref, ex, num_expected=20, progress=False)
    assert res_f["fid"] == pytest.approx(res["fid"], abs=1e-9)
    # without reference features / logits these are reported as unavailable
    no_feats = {k: v for k, v in ref.items() if k != "features"}
    res2 = fid_stats.compute_metrics(images, no_feats, TinyExtractor(), progress=False)
    assert res2["precision"] is None and res2["recall"] is None and res2["inception_score"] is None
    assert len(res2["notes"]) == 2
    res3 = fid_stats.compute_metrics(images, {**ref, "inception_weights": "pt_inception"}, ex, progress=False)
    assert any("computed with Inception weights 'pt_inception'" in n for n in res3["notes"])


def test_compute_metrics_bad_inputs():
    ex = TinyExtractor()
    images = random_images(6)
    ref = fid_stats.compute_reference_stats(images, ex, progress=False)
    ex.calls = 0
    with pytest.raises(ValueError, match="fewer samples than expected: got 6, expected 10"):
        fid_stats.compute_metrics(images, ref, ex, num_expected=10, progress=False)
    assert ex.calls == 0  # known length: fails before any feature extraction
    with pytest.raises(ValueError, match="fewer samples than expected: got 6, expected exactly 10"):
        fid_stats.compute_metrics((images[i:i + 4] for i in range(0, 6, 4)), ref, ex, num_expected=10, progress=False)
    with pytest.raises(ValueError, match="reference statistics have 8, the Inception extractor gives 2048"):
        fid_stats.compute_metrics(images, ref, TinyExtractor(dims=2048), progress=False)
    with pytest.raises(ValueError, match="reference statistics have no 'sigma'"):
        fid_stats.compute_metrics(images, {"mu": ref["mu"]}, ex, progress=False)
    with pytest.raises(ValueError, match=r"uint8 images must be \[B,H,W,3\]"):
        fid_stats.compute_metrics(images.transpose(0, 3, 1, 2).copy(), ref, ex, progress=False)



def test_fid_stats_cli_rejects_bad_images_before_loading_a_network(tmp_path):
    out = tmp_path / "ref.npz"
    with pytest.raises(FileNotFoundError, match="images not found"):
        fid_stats.main(["--images", str(tmp_path / "nothing"), "--out", str(out)])
    np.savez(tmp_path / "bad.npz", images=random_images(2))
    with pytest.raises(ValueError, match="no 'arr_0'"):
        fid_stats.main(["--images", str(tmp_path / "bad.npz"), "--out", str(out)])
    assert not out.exists()
