"""Offline FID Inception: the default_1.pt -> pytorch-fid conversion, the feature pipeline, `python -m libs.evaluation.fid_stats`.

The converted network is built once per module into a tmp cache (never into the real assets/).
"""
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from libs.atomic_io import atomic_save_safetensors
from libs.evaluation import fid_stats, inception
from libs.checkpoint import MissingAssetError


@pytest.fixture(scope="module")
def no_pt_weights(tmp_path_factory):
    """Points the default pt_inception path at a missing file, so the offline conversion is what gets used."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inception, "PT_INCEPTION_WEIGHTS", tmp_path_factory.mktemp("assets") / "absent.pth")
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("inception") / "converted.pth"


@pytest.fixture(scope="module")
def extractor(no_pt_weights, cache):
    """FeatureExtractor with default_1.pt converted now and cached in a tmp file."""
    ex = inception.load_feature_extractor(cache=cache)
    assert cache.is_file()
    return ex


@pytest.fixture(scope="module")
def ts_tensors():
    return inception.load_torchscript_tensors(inception.torchscript_path())


@pytest.fixture(scope="module")
def fake_pt_weights(extractor, cache, tmp_path_factory):
    """A pt_inception-style file: the converted conv/bn weights plus a random 1008-way fc layer."""
    state = dict(torch.load(cache, weights_only=True)["state_dict"])
    g = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.01
    state["fc.bias"] = torch.randn(1008, generator=g) * 0.01
    path = tmp_path_factory.mktemp("pt") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path, state


def random_uint8(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_layer_map_uses_every_torchscript_tensor_exactly_once(ts_tensors):
    name_map = inception.tensor_name_map()
    assert len(inception.conv_layer_map()) == 94
    assert len(ts_tensors) == 376 and set(name_map) == set(ts_tensors)  # each TorchScript tensor mapped
    assert len(set(name_map.values())) == 376  # ... onto distinct pytorch-fid tensors
    net = inception.build_fid_inception()
    sd = net.state_dict()
    fillable = {k for k in sd if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(name_map.values()) | {k for k in fillable if k.endswith("bn.weight")} == fillable
    assert all(tuple(ts_tensors[t].shape) == tuple(sd[p].shape) for t, p in name_map.items())
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))

    state = inception.convert_torchscript_state(ts_tensors, net)
    assert all(torch.equal(state[p], ts_tensors[t]) for t, p in name_map.items())
    assert all(torch.all(v == 1) for k, v in state.items() if k.endswith("bn.weight"))
    assert set(state) == set(sd) - {"fc.weight", "fc.bias"}

    one = next(iter(ts_tensors))
    with pytest.raises(ValueError, match="missing"):
        inception.convert_torchscript_state({k: v for k, v in ts_tensors.items() if k != one}, net)
    with pytest.raises(ValueError, match="unmapped"):
        inception.convert_torchscript_state({**ts_tensors, "net.layers.fc.weight": torch.zeros(1)}, net)
    with pytest.raises(ValueError, match="shape of net.layers.conv.weight"):
        inception.convert_torchscript_state({**ts_tensors, "net.layers.conv.weight": torch.zeros(32, 3, 5, 5)}, net)


def test_converted_weights_reproduce_torchscript_features(extractor):
    """The proof that the offline weights are the standard ones: same 2048-d pool3 as default_1.pt's forward."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(str(inception.torchscript_path()), map_location="cpu").eval()
    x = extractor.preprocess(random_uint8(2, 64, 48, seed=1))  # [2,3,299,299] in [-1,1]
    assert x.shape == (2, 3, 299, 299) and x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        want = ts(x)  # [2,2048]
        got, logits = extractor(x)
    diff = (got - want).abs().max().item()
    print(f"\nconverted vs TorchScript default_1.pt: max abs pool3 diff {diff:.3g} (|features| max "
          f"{want.abs().max().item():.3g})")
    assert got.shape == (2, 2048) and logits is None
    assert diff < 1e-4


def test_pipeline_matches_pytorch_fid_inceptionv3(extractor, cache):
    """Our resize/normalise/forward equals pytorch_fid.inception.InceptionV3 (weights injected, no download)."""
    from pytorch_fid.inception import InceptionV3
    state = dict(torch.load(cache, weights_only=True)["state_dict"])
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # unused by pool3
    with mock.patch("pytorch_fid.inception.load_state_dict_from_url", return_value=state) as fetch:
        ref_net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    assert fetch.called
    images = random_uint8(2, 40, 56, seed=2)  # [2,H,W,3]
    with torch.no_grad():
        want = ref_net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)[0].flatten(1)  # [2,2048]
    pool, logits = extractor.features(images)
    assert pool.dtype == np.float64 and pool.shape == (2, 2048) and logits is None
    np.testing.assert_allclose(pool, want.double().numpy(), rtol=0, atol=1e-6)
    assert extractor.source == inception.SOURCE_CONVERTED and not extractor.has_logits


def test_input_checks(extractor):
    with pytest.raises(ValueError, match=r"in \[0,1\]"):
        extractor.features(torch.rand(1, 3, 8, 8) * 2 - 1)
    with pytest.raises(ValueError, match=r"uint8 images must be \[B,H,W,3\]"):
        extractor.features(np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="4-D"):
        extractor.features(np.zeros((8, 8, 3), np.uint8))


def test_full_fp32_turns_tf32_off_and_restores():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision)
    with inception.full_fp32(torch.device("cuda")):  # flags only: runs without a GPU
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with inception.full_fp32(torch.device("cpu")):
        assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_cache_pt_inception_and_missing_weights(extractor, cache, fake_pt_weights, no_pt_weights, tmp_path):
    # the cache is enough: no TorchScript needed the second time
    state = inception.converted_state(cache, torchscript=tmp_path / "absent_default_1.pt")
    net_state = extractor.net.state_dict()
    assert set(state) == set(net_state) and all(torch.equal(v, net_state[k]) for k, v in state.items())
    # a damaged cache is converted again (with a warning) and rewritten
    bad = tmp_path / "bad_cache.pth"
    bad.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"\(unreadable\); converting again"):
        inception.converted_state(bad)
    assert torch.load(bad, weights_only=True)["source"] == inception.SOURCE_CONVERTED
    # pytorch-fid's own weight file (here: converted conv weights + a random fc) gives logits too
    path, pt_state = fake_pt_weights
    pt = inception.load_feature_extractor(weights=path)
    assert pt.source == inception.SOURCE_PT_INCEPTION and pt.has_logits
    assert all(torch.equal(v, net_state[k]) for k, v in pt.net.state_dict().items() if not k.startswith("fc."))
    pool, logits = pt.features(random_uint8(1, 32, 32, seed=3))
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008)
    w, b = pt_state["fc.weight"].double().numpy(), pt_state["fc.bias"].double().numpy()
    np.testing.assert_allclose(logits, pool @ w.T + b, atol=1e-5)
    # the same weights as .safetensors load alike (told by content)
    atomic_save_safetensors(pt_state, tmp_path / "pt_inception.safetensors")
    st = inception.load_feature_extractor(weights=tmp_path / "pt_inception.safetensors")
    assert st.has_logits and all(torch.equal(v, pt.net.state_dict()[k]) for k, v in st.net.state_dict().items())
    # an explicit weights path must exist; a wrong file is named
    with pytest.raises(MissingAssetError, match="pt_inception-2015-12-05-6726825d.pth"):
        inception.load_feature_extractor(weights=tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not match pytorch-fid's FID Inception"):
        inception.load_feature_extractor(weights=tmp_path / "wrong.pth")


def test_fid_stats_cli_folder_and_npz_agree(extractor, cache, fake_pt_weights, tmp_path, capsys):
    """`python -m libs.evaluation.fid_stats` (its main) on a folder and on an npz of the same images: same statistics."""
    images = random_uint8(4, 24, 32, seed=4)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:06d}.png")
    np.savez(tmp_path / "imgs.npz", arr_0=images, labels=np.arange(4))
    common = ["--batch-size", "2", "--device", "cpu", "--no-progress", "--save-features"]

    # offline converted weights (tmp cache), from the folder
    fid_stats.main(["--images", str(folder), "--out", str(tmp_path / "ref_dir.npz"),
                    "--inception-cache", str(cache)] + common)
    # from the npz, with a pt_inception-style file given by flag (same conv weights)
    fid_stats.main(["--images", str(tmp_path / "imgs.npz"), "--out", str(tmp_path / "ref_npz.npz"),
                    "--inception-weights", str(fake_pt_weights[0])] + common)
    assert "wrote" in capsys.readouterr().out
    a = fid_stats.load_reference_stats(tmp_path / "ref_dir.npz")
    b = fid_stats.load_reference_stats(tmp_path / "ref_npz.npz")
    assert a["mu"].shape == (2048,) and a["sigma"].shape == (2048, 2048) and a["features"].shape == (4, 2048)
    np.testing.assert_allclose(a["mu"], b["mu"], atol=1e-6)
    np.testing.assert_allclose(a["sigma"], b["sigma"], atol=1e-6)
    assert a["inception_weights"] == inception.SOURCE_CONVERTED and b["inception_weights"] == "pt_inception"

    # the generation script's path: metrics of the same images against these stats
    res = fid_stats.compute_metrics(fid_stats.load_image_batch_source(tmp_path / "imgs.npz"), a, extractor,
                                    num_expected=4, batch_size=2, progress=False)
    assert abs(res["fid"]) < 1e-6 and res["precision"] == 1.0 and res["recall"] == 1.0
    assert res["inception_score"] is None and res["inception_weights"] == inception.SOURCE_CONVERTED
    assert any("inception score: unavailable" in n for n in res["notes"])

