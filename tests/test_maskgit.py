"""MaskGIT equals the official JAX/Flax release: converted fixture checkpoints reproduce its logits, token ids,
pixels and decodes (tests/fixtures/maskgit/, made by tools/make_maskgit_fixtures.py; no JAX needed here)."""
import json
import math
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from libs.checkpoint import load_state_dict_file, load_strict, weights_format, weights_metadata
from libs.cli import run_main
from libs.config import load_config_file
from libs.models.factory import tokenizer_config
from libs.models.maskgit import MaskGIT, MaskGITConfig, maskgit_config
from libs.models.vqgan import VQGAN, VQGANConfig
from libs.sampling import maskgit_decode
from libs.sampling.decoding import generate, maskgit_schedule, schedule_from_config
from tools import convert_maskgit
from tools.make_maskgit_fixtures import SIZE_KEYS

FIXTURES = Path("tests/fixtures/maskgit")
TOKENIZER, TRANSFORMER = FIXTURES / "tokenizer_tiny.msgpack", FIXTURES / "transformer_tiny.msgpack"
DECODES = ("det_T8", "det_T12", "det_T16", "noise_T12", "edit_T12")


@pytest.fixture(scope="module")
def official():
    with np.load(FIXTURES / "official.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def sizes(official):
    return dict(zip(SIZE_KEYS, official["sizes"].tolist()))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The two fixture checkpoints converted by the command line into a temp folder: {kind: path}."""
    out = tmp_path_factory.mktemp("converted")
    with pytest.raises(SystemExit) as done:
        run_main(convert_maskgit.main, ["--tokenizer", str(TOKENIZER), "--transformer", str(TRANSFORMER),
                                        "--out", str(out), "--resolution", "8"])
    assert done.value.code == 0
    return {"tokenizer": out / "tokenizer_tiny.safetensors", "transformer": out / "transformer_tiny.safetensors"}


@pytest.fixture(scope="module")
def transformer(converted, sizes):
    """MaskGIT built from the fixture's sizes (not from the converter) and loaded strictly."""
    cfg = MaskGITConfig(codebook_size=sizes["codebook_size"], seq_len=(sizes["image_size"] // sizes["patch_size"]) ** 2,
                        num_classes=sizes["num_classes"], embed_dim=sizes["embed_dim"], depth=sizes["depth"],
                        num_heads=sizes["num_heads"], mlp_ratio=sizes["intermediate_size"] / sizes["embed_dim"])
    model = MaskGIT(cfg)
    load_strict(model, load_state_dict_file(converted["transformer"]), source="converted transformer")
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(converted, sizes):
    cfg = VQGANConfig(channels=sizes["filters"], channel_mult=(2, 1), num_res_blocks=sizes["num_res_blocks"],
                      embed_dim=sizes["embedding_dim"], codebook_size=sizes["codebook_size"],
                      resolution=sizes["image_size"])
    model = VQGAN(cfg)
    load_strict(model, load_state_dict_file(converted["tokenizer"]), source="converted tokenizer")
    return model.eval()


def nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------- transformer and tokenizer


def test_transformer_logits_match_official(transformer, official):
    tokens = torch.from_numpy(official["logit_tokens"])  # [MASK] as -1 (rows 0, 1) and as V-1 (row 3)
    with torch.no_grad():
        logits = transformer.forward_tokens(tokens)
    np.testing.assert_allclose(logits.numpy(), official["logits"], atol=1e-4, rtol=0)
    assert np.abs(official["logits"]).max() > 10  # far from a trivially small output
    K = transformer.codebook_size
    ids = torch.where(tokens[:, 1:] < 0, transformer.mask_token_id, tokens[:, 1:])
    with torch.no_grad():
        restricted = transformer(ids, tokens[:, 0] - K)
    assert restricted.shape == (4, 16, K)  # code columns only, class position dropped (the release's inference)
    np.testing.assert_allclose(restricted.numpy(), official["logits"][:, 1:, :K], atol=1e-4, rtol=0)


def test_mask_and_class_token_ids(transformer):
    cfg = transformer.cfg
    assert cfg.vocab_size == 64 + 10 + 1 and cfg.mask_token_id == cfg.vocab_size - 1
    assert transformer.class_tokens(torch.tensor([0, 9, cfg.null_class_id])).view(-1).tolist() == [64, 73, 74]
    tokens = torch.tensor([[64] + [-1] * 16])
    with torch.no_grad():
        assert torch.equal(transformer.forward_tokens(tokens), transformer.forward_tokens(tokens % cfg.vocab_size))


def test_tokenizer_ids_and_pixels_match_official(tokenizer, official):
    images = torch.from_numpy(official["images"]).permute(0, 3, 1, 2)
    assert torch.equal(tokenizer.encode(images), torch.from_numpy(official["ids"]))
    assert len(np.unique(official["ids"])) > 10
    ids = torch.from_numpy(official["ids"])
    with torch.no_grad():
        raw = tokenizer.decoder(tokenizer.quantize.lookup(ids))
    np.testing.assert_allclose(nhwc(raw), official["pixels"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(nhwc(tokenizer.decode(ids)), np.clip(official["pixels"], 0, 1), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- decodes


def replay(official, name, K):
    """(class ids, init ids, decode kwargs) of a recorded official decode; its noise replayed when recorded."""
    inputs = torch.from_numpy(official[f"{name}_inputs"])
    steps, start = (int(v) for v in official[f"{name}_meta"])
    ids = inputs[:, 1:].clone()
    kwargs = dict(steps=steps, start_iter=start, choice_temperature=float(official[f"{name}_temperature"]))
    if name.startswith("det"):
        kwargs["sample_temperature"] = 0.0  # with choice temperature 0: the deterministic limit
    else:
        noise = {kind: torch.from_numpy(official[f"{name}_{kind}"])[:, :, 1:] for kind in ("sample", "choice")}
        kwargs["noise"] = lambda kind, step, shape: noise[kind][step - start]  # class position dropped
    return inputs[:, 0] - K, ids, kwargs


@pytest.mark.parametrize("name", DECODES)
def test_decodes_match_official(transformer, tokenizer, official, name):
    classes, ids, kwargs = replay(official, name, transformer.codebook_size)
    ids[ids < 0] = transformer.mask_token_id
    record = []
    out = maskgit_decode.decode(transformer, classes, seq_len=16, mask_token_id=transformer.mask_token_id,
                                init_ids=ids, record=record, **kwargs)
    seqs = official[f"{name}_seqs"][:, :, 1:]  # [B,T,L] the release's sampled ids of every step
    start = kwargs["start_iter"]
    assert len(record) == kwargs["steps"] - start
    for i, step_ids in enumerate(record):
        assert np.array_equal(step_ids.numpy(), seqs[:, start + i]), f"step {start + i}"
    assert np.array_equal(out.numpy(), seqs[:, -1])
    with torch.no_grad():
        pixels = tokenizer.decoder(tokenizer.quantize.lookup(out.view(-1, 4, 4)))
    np.testing.assert_allclose(nhwc(pixels), official[f"{name}_pixels"], atol=1e-4, rtol=0)


def test_fixture_decodes_exercise_the_schedule(official):
    """The recorded decodes are not degenerate: tokens change over the steps, and the editing run keeps its
    known tokens."""
    seqs = official["noise_T12_seqs"][:, :, 1:]
    assert (seqs[:, 0] != seqs[:, -1]).any()
    edit_in, edit_out = official["edit_T12_inputs"][:, 1:], official["edit_T12_seqs"][:, -1, 1:]
    known = edit_in >= 0
    assert np.array_equal(edit_out[known], edit_in[known]) and (~known).any()


@pytest.mark.parametrize("steps", [8, 12])
def test_repo_maskgit_schedule_is_the_official_sampler(transformer, steps):
    """decoding.generate with its maskgit schedule (no guidance) draws the same noise and gives the same ids."""
    classes = torch.arange(6) % 10
    common = dict(seq_len=16, mask_token_id=transformer.mask_token_id)
    for seed in range(3):
        ours = generate(transformer, classes, maskgit_schedule(steps, 0.0, temp=4.5), null_class_id=10,
                        generator=torch.Generator().manual_seed(seed), **common)
        release = maskgit_decode.decode(transformer, classes, steps=steps,
                                        generator=torch.Generator().manual_seed(seed), **common)
        assert torch.equal(ours, release)


# ----------------------------------------------------------------------------- sampler invariants


def test_schedule_arithmetic():
    r = maskgit_decode.progress(7, 12)  # 8/12 = 2/3: the float32 cosine is just below 0.5
    ratio = maskgit_decode.cosine_mask_ratio(r)
    assert ratio.dtype == torch.float32 and ratio.item() == np.float32(0.49999997)
    n = torch.tensor([256, 256, 16, 3])
    masked = torch.tensor([256, 100, 2, 3])
    assert maskgit_decode.mask_lengths(n, masked, ratio).tolist() == [127, 99, 1, 1]  # floor, then clamps
    last = maskgit_decode.cosine_mask_ratio(maskgit_decode.progress(11, 12))
    assert last.item() == pytest.approx(1e-6)  # cos(pi/2) clipped to the floor of the schedule
    conf = torch.tensor([[0.0, -1.0, -1.0, math.inf], [0.5, 0.1, 0.2, 0.3]])
    # strict "below the cut-off": the tie at -1 keeps both; row 2 masks its 2 lowest
    assert maskgit_decode.remask(conf, torch.tensor([1, 2])).tolist() == [[False, False, False, False],
                                                                         [False, True, True, False]]


def test_decode_invariants(transformer):
    K, mask = transformer.codebook_size, transformer.mask_token_id
    classes = torch.tensor([0, 3, 9])
    record = []
    out = maskgit_decode.decode(transformer, classes, seq_len=16, mask_token_id=mask, steps=8,
                                generator=torch.Generator().manual_seed(1), record=record)
    assert out.shape == (3, 16) and 0 <= int(out.min()) and int(out.max()) < K
    again = maskgit_decode.decode(transformer, classes, seq_len=16, mask_token_id=mask, steps=8,
                                  generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    per_sample = maskgit_decode.decode(transformer, classes, seq_len=16, mask_token_id=mask, steps=8,
                                       generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    alone = maskgit_decode.decode(transformer, classes[1:2], seq_len=16, mask_token_id=mask, steps=8,
                                  generator=[torch.Generator().manual_seed(6)])
    assert torch.equal(per_sample[1:2], alone)  # a sample's noise does not depend on its batch
    init = out.clone()
    init[:, :5] = mask
    edited = maskgit_decode.decode(transformer, classes, seq_len=16, mask_token_id=mask, steps=4, init_ids=init,
                                   generator=torch.Generator().manual_seed(2))
    assert torch.equal(edited[:, 5:], out[:, 5:])  # known tokens kept
    with pytest.raises(ValueError, match="start_iter"):
        maskgit_decode.decode(transformer, classes, seq_len=16, mask_token_id=mask, steps=4, start_iter=4)


def test_decode_counts_follow_the_schedule(transformer):
    """After step t, exactly max(1, min(#masked - 1, floor(16 cos(pi/2 (t+1)/T)))) places are [MASK] again."""
    mask, steps = transformer.mask_token_id, 12
    calls = []

    def model(ids, classes):
        calls.append((ids == mask).sum(1))
        return transformer(ids, classes)

    maskgit_decode.decode(model, torch.tensor([1, 2]), seq_len=16, mask_token_id=mask, steps=steps,
                          generator=torch.Generator().manual_seed(0))
    masked = torch.tensor([16, 16])
    for t in range(steps - 1):
        ratio = maskgit_decode.cosine_mask_ratio(maskgit_decode.progress(t, steps))
        masked = maskgit_decode.mask_lengths(torch.tensor([16, 16]), masked, ratio)
        assert torch.equal(calls[t + 1], masked), f"step {t}"
    assert calls[8].tolist() == [7, 7]  # 2/3 of the way: floor(16 * 0.49999997) = 7, not 8


def test_guidance_uses_the_masked_class_token(transformer):
    mask = transformer.mask_token_id
    ids = torch.full((2, 16), mask)
    with torch.no_grad():
        uncond = transformer(ids, torch.full((2,), transformer.null_class_id))
        tokens = torch.cat([torch.full((2, 1), mask), ids], dim=1)
        expected = transformer.forward_tokens(tokens)[:, 1:, :transformer.codebook_size]
    assert torch.equal(uncond, expected)
    common = dict(seq_len=16, mask_token_id=mask, steps=4, null_class_id=transformer.null_class_id)
    plain = maskgit_decode.decode(transformer, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0),
                                  **common)
    zero = maskgit_decode.decode(transformer, torch.tensor([1, 2]), guidance=[0.0] * 4,
                                 generator=torch.Generator().manual_seed(0), **common)
    guided = maskgit_decode.decode(transformer, torch.tensor([1, 2]), guidance=[0.0, 2.0, 4.0, 8.0],
                                   generator=torch.Generator().manual_seed(0), **common)
    assert torch.equal(plain, zero) and not torch.equal(plain, guided)


def test_config_builds_the_release_sizes():
    config = load_config_file("configs/maskgit.py")
    with torch.device("meta"):
        model = MaskGIT(maskgit_config(config.model))
        tok = VQGAN(tokenizer_config(config.tokenizer))
    assert sum(p.numel() for p in model.parameters()) == 172_457_193  # + the tokenizer's 54.5M: the 227M cited
    assert model.cfg.vocab_size == 2025 and model.cfg.intermediate_size == 3072 and model.cfg.num_heads == 16
    assert tok.codebook_size == 1024 and tok.grid_size == 16
    schedule = schedule_from_config(config.sample)
    assert schedule.steps == 16 and schedule.guidance == [0.0] * 16 and schedule.sample_temps == [1.0] * 16
    assert schedule.conf_temps[0] == pytest.approx(4.5 * 15 / 16)
    with pytest.raises(ValueError, match="graph"):
        maskgit_config({**dict(config.model), "graph": 1})


# ----------------------------------------------------------------------------- converter


def convert_error(capsys, *args):
    """The converter's exit status and its stderr line."""
    with pytest.raises(SystemExit) as done:
        run_main(convert_maskgit.main, list(args))
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return done.value.code, err


def test_converter_writes_loadable_state_dicts(converted):
    state = load_state_dict_file(converted["transformer"])
    assert weights_format(converted["transformer"]) == "safetensors"  # weights only, no pickle
    config = json.loads(weights_metadata(converted["transformer"])["config"])["model"]
    assert set(state) == set(MaskGIT(MaskGITConfig(**config)).state_dict())  # the config in it builds the model
    assert json.loads(weights_metadata(converted["tokenizer"])["config"])["tokenizer"]["resolution"] == 8
    assert state["layers.0.attention.query.weight"].shape == (64, 64)
    assert converted["tokenizer"].name == "tokenizer_tiny.safetensors"
    assert convert_maskgit.output_name(Path("x/maskgit_imagenet256_checkpoint")) == "maskgit_imagenet256.safetensors"


def test_converter_missing_truncated_and_foreign_files(capsys, tmp_path, converted):
    out = str(tmp_path / "out")
    missing = tmp_path / "absent_checkpoint"
    code, err = convert_error(capsys, "--transformer", str(missing), "--out", out)
    assert code == 2 and err.startswith("error: ") and str(missing) in err and "not found" in err

    truncated = tmp_path / "cut_checkpoint"
    truncated.write_bytes(TRANSFORMER.read_bytes()[:100_000])
    code, err = convert_error(capsys, "--transformer", str(truncated), "--out", out)
    assert code == 2 and str(truncated) in err and "not a readable Flax msgpack checkpoint" in err

    code, err = convert_error(capsys, "--tokenizer", str(converted["tokenizer"]), "--out", out)  # a torch file
    assert code == 2 and str(converted["tokenizer"]) in err and "not a" in err

    code, err = convert_error(capsys, "--tokenizer", str(TRANSFORMER), "--out", out)  # the other checkpoint
    assert code == 2 and str(TRANSFORMER) in err and "not a MaskGIT VQGAN tokenizer checkpoint" in err
    code, err = convert_error(capsys, "--transformer", str(TOKENIZER), "--out", out)
    assert code == 2 and str(TOKENIZER) in err and "not a MaskGIT transformer checkpoint" in err

    listing = tmp_path / "list_checkpoint"
    listing.write_bytes(msgpack.packb([1, 2, 3]))
    code, err = convert_error(capsys, "--transformer", str(listing), "--out", out)
    assert code == 2 and str(listing) in err and "not a Flax variable tree" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_converter_refuses_extra_tensors(tmp_path, capsys):
    tree = msgpack.unpackb(TRANSFORMER.read_bytes(), raw=False, strict_map_key=False)
    tree["params"]["MlmLayer_0"]["extra"] = tree["params"]["MlmLayer_0"]["mlm_ln"]
    extra = tmp_path / "extra_checkpoint"
    extra.write_bytes(msgpack.packb(tree))
    code, err = convert_error(capsys, "--transformer", str(extra), "--out", str(tmp_path / "out"),
                              "--codebook-size", "64")
    assert code == 2 and str(extra) in err and "unexpected: mlm_layer.extra." in err


def test_msgpack_reader_chunks_scalars_and_bfloat16(tmp_path):
    """The flax.serialization encodings besides plain arrays: chunked arrays, numpy scalars, bfloat16."""
    def ext(array, code=1):
        packed = msgpack.packb((list(array.shape), array.dtype.name, array.tobytes()), use_bin_type=True)
        return msgpack.ExtType(code, packed)

    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact: small integers
    bf16_ext = msgpack.ExtType(1, msgpack.packb(([2, 3], "bfloat16", bf16.tobytes()), use_bin_type=True))
    chunked = {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 3},
               "chunks": {"0": ext(values.reshape(-1)[:4]), "1": ext(values.reshape(-1)[4:])}}
    path = tmp_path / "tree.msgpack"
    path.write_bytes(msgpack.packb({"params": {"a": chunked, "b": ext(np.array(2.5, np.float32), 3),
                                               "c": bf16_ext}}, use_bin_type=True))
    tree = convert_maskgit.read_flax_msgpack(path, "a test tree")
    assert np.array_equal(tree["a"], values) and tree["b"] == np.float32(2.5)
    assert tree["c"].dtype == np.float32 and np.array_equal(tree["c"], values)
    assert struct.unpack("<f", tree["b"].tobytes())[0] == 2.5
