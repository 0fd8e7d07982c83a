"""Tokenizer: shapes, ranges, nearest-code quantisation, strict load round trip, bad input."""
import pytest
import torch

from libs.checkpoint import MissingAssetError, load_state_dict_file, load_strict
from libs.models.factory import load_tokenizer, tokenizer_config
from configs import tiny
from tests.helpers import tiny_vqgan


def test_encode_decode_shapes_and_ranges():
    model = tiny_vqgan()
    images = torch.rand(3, 3, 8, 8)
    ids = model.encode(images)
    assert ids.shape == (3, 4, 4) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 32
    out = model.decode(ids)
    assert out.shape == (3, 3, 8, 8)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(model.decode(ids.view(3, 16)), out)


def test_quantizer_picks_nearest_code_brute_force():
    model = tiny_vqgan(codebook_size=32)
    z = torch.randn(2, 8, 4, 4)
    ids = model.quantize.quantize(z)
    codes = model.quantize.embedding.weight
    for b in range(2):
        for i in range(4):
            for j in range(4):
                dist = ((codes - z[b, :, i, j]) ** 2).sum(1)
                assert int(ids[b, i, j]) == int(dist.argmin())


def test_decode_refuses_mask_ids():
    model = tiny_vqgan()
    with pytest.raises(ValueError, match="token ids must lie in"):
        model.decode(torch.full((1, 4, 4), 32))


def test_strict_load_round_trip_and_state_dict_key(tmp_path):
    a, b = tiny_vqgan(seed=0), tiny_vqgan(seed=1)
    torch.save({"state_dict": a.state_dict()}, tmp_path / "vq.ckpt")
    torch.save(a.state_dict(), tmp_path / "bare.ckpt")
    for name in ("vq.ckpt", "bare.ckpt"):
        load_strict(b, load_state_dict_file(tmp_path / name))
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k
    cfg = tiny.get_config().tokenizer
    loaded = load_tokenizer(cfg, checkpoint=tmp_path / "vq.ckpt")
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(loaded.encode(x), a.encode(x))
    assert tokenizer_config(cfg).grid_size == 4


def test_missing_checkpoint_names_file_folder_and_readme(tmp_path):
    path = tmp_path / "assets" / "vqgan_jax_strongaug.ckpt"
    with pytest.raises(MissingAssetError) as err:
        load_tokenizer(tiny.get_config().tokenizer, checkpoint=path)
    msg = str(err.value)
    assert "vqgan_jax_strongaug.ckpt" in msg and str(path.parent) in msg and "README" in msg


def test_wrong_architecture_lists_first_mismatches(tmp_path):
    torch.save(tiny_vqgan(codebook_size=64).state_dict(), tmp_path / "other.ckpt")
    with pytest.raises(ValueError) as err:
        load_strict(tiny_vqgan(codebook_size=32), load_state_dict_file(tmp_path / "other.ckpt"), "other.ckpt")
    assert "quantize.embedding.weight" in str(err.value) and "(32, 8)" in str(err.value)
