"""Precision and compilation of the token model: bf16/fp16 autocast against fp32 (one forward and every step of
a sampling run), torch.compile against eager, and compiled models' state dicts loading strictly into eager ones."""
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from libs.checkpoint import load_state_dict_file, load_strict
from libs.errors import BadInput
from libs.models.factory import for_sampling
from libs.sampling.decoding import maskgit_schedule, schedule_from_config
from libs.sampling.generation import PRECISIONS, compile_token_model, index_generators, sample_images
from tests.helpers import randomise_fusion, tiny_backbone, tiny_ka_mig, tiny_vqgan

# inductor compiles C++ kernels on CPU: without a compiler torch.compile cannot run here
NO_COMPILER = shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None
needs_compiler = pytest.mark.skipif(NO_COMPILER, reason="torch.compile (inductor) on CPU needs a C++ compiler "
                                                        "(g++ / clang++), none on PATH")


def models():
    """{name: callable (ids, class_ids) -> logits}: the bare backbone and a KA-MIG with non-zero fusion (cached)."""
    ka_mig, _ = tiny_ka_mig()
    randomise_fusion(ka_mig)
    return {"autonat": tiny_backbone(), "ka_mig": for_sampling(ka_mig)}


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 33, (8, 16), generator=g), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])


# Stated tolerances of autocast against fp32 on the tiny models (logits reach about 0.5 in absolute value):
# max |difference| <= 1e-2 for bf16 (8-bit mantissa; measured 2.6e-3), <= 2e-3 for fp16 (measured 4e-4), and the
# softmax distributions within 1e-2 in total variation.
TOLERANCES = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_logits_are_close_to_fp32(dtype):
    ids, cls = batch()
    for name, model in models().items():
        with torch.no_grad():
            ref = model(ids, cls).float()
            with torch.autocast("cpu", dtype=dtype):
                low = model(ids, cls)
        assert low.dtype == dtype, name  # autocast did run the linears in the low precision
        low = low.float()
        assert not torch.equal(low, ref)
        assert float((low - ref).abs().max()) <= TOLERANCES[dtype], name
        tv = (torch.softmax(low, -1) - torch.softmax(ref, -1)).abs().sum(-1).max() / 2
        assert float(tv) <= 1e-2, name


class AgainstFp32:
    """A token model that answers under the autocast in force and records, per call, the dtype of its logits and
    their max |difference| to the same call with autocast off (fp32)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):  # cfg, mask_token_id, null_class_id of the wrapped model
        return getattr(self.model, name)

    def __call__(self, ids, class_ids):
        low = self.model(ids, class_ids)
        with torch.autocast("cpu", enabled=False):
            ref = self.model(ids, class_ids)
        self.calls.append((low.dtype, float((low.float() - ref).abs().max())))
        return low


def finite_decoder(tokenizer):
    """`tokenizer` whose decode() records whether each decoded batch [B,3,H,W] is finite (a list it appends to)."""
    finite, decode = [], tokenizer.decode

    def checked(ids):
        images = decode(ids)
        finite.append(bool(torch.isfinite(images).all()))
        return images

    tokenizer.decode = checked
    return finite


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_sampling_logits_stay_within_the_stated_tolerance_at_every_step(precision):
    from configs import tiny
    tokenizer = tiny_vqgan()
    finite = finite_decoder(tokenizer)
    schedules = {"maskgit": maskgit_schedule(4, guidance_scale=3.0),  # guided: [cond; uncond] batches
                 "autonat": schedule_from_config(tiny.get_config().sample)}
    cls = torch.tensor([0, 1, 2, 3, 1])
    dtype = PRECISIONS[precision]
    for name, model in models().items():
        for kind, schedule in schedules.items():
            wrapped = AgainstFp32(model)
            images = sample_images(wrapped, tokenizer, cls, schedule, index_generators(range(5), 7, "cpu"),
                                   precision)
            assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
            assert len(wrapped.calls) == schedule.steps, (name, kind)
            assert {d for d, _ in wrapped.calls} == {dtype or torch.float32}, (name, kind)  # autocast was on
            worst = max(diff for _, diff in wrapped.calls)
            assert worst <= (TOLERANCES[dtype] if dtype else 0.0), (name, kind, worst)
            assert dtype is None or worst > 0, (name, kind)  # the low precision did round
    assert finite and all(finite)  # the tokenizer decoded finite images (in fp32) every time


@needs_compiler
def test_compiled_token_model_matches_eager_and_keeps_its_state_dict():
    ids, cls = batch(1)
    for name, model in models().items():
        module = getattr(model, "model", model)
        keys = list(module.state_dict())
        with torch.no_grad():
            eager = model(ids, cls)
            compile_token_model(model)
            compiled = model(ids, cls)
            compiled_small = model(ids[:3], cls[:3])  # another batch size (the last batch of a run)
        assert all(getattr(block, "_compiled_call_impl", None) is not None for block in module.blocks), name
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
        torch.testing.assert_close(compiled_small, eager[:3], atol=1e-5, rtol=0)
        assert list(module.state_dict()) == keys  # block-wise compilation renames nothing


def test_state_dict_of_a_torch_compile_wrapper_loads_strictly_into_an_eager_model(tmp_path):
    model, _ = tiny_ka_mig()
    randomise_fusion(model)
    wrapped = torch.compile(model)  # wrapping only; nothing is compiled until it is called
    state = wrapped.state_dict()
    assert all(k.startswith("_orig_mod.") for k in state)
    eager, _ = tiny_ka_mig(seed=5)
    with pytest.warns(UserWarning, match="_orig_mod"):
        load_strict(eager, state, source="compiled")
    for k, v in model.state_dict().items():
        assert torch.equal(eager.state_dict()[k], v), k
    torch.save(state, tmp_path / "compiled.pth")  # and through a file, as a training run would save it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_state_dict_file(tmp_path / "compiled.pth")
    assert any("_orig_mod" in str(w.message) for w in caught)
    assert list(loaded) == list(model.state_dict())
    fresh, _ = tiny_ka_mig(seed=6)
    load_strict(fresh, loaded)
    assert torch.equal(fresh.graph_layer.zero_convs[0].weight, model.graph_layer.zero_convs[0].weight)


@needs_compiler
def test_generate_img_compile_flag(tiny_assets, tmp_path):
    import generate_img
    root, overrides = tiny_assets
    args = ["--checkpoint", str(root / "ka_mig.pth"), "--classes", "2", "--per-class", "2", "--device", "cpu",
            "--schedule", "maskgit", "--steps", "3", *overrides]
    with pytest.raises(BadInput, match="--compile needs plain linear layers"):
        generate_img.main(args + ["--out", str(tmp_path / "x"), "--compile", "--cpu-kernels", "onednn"])
    run_dir = generate_img.main(args + ["--out", str(tmp_path / "c"), "--compile"])
    fp = json.loads((run_dir / "fingerprint.json").read_text())["fingerprint"]
    assert fp["compile"] is True and fp["cpu_kernels"] == "default"
    eager = generate_img.main(args + ["--out", str(tmp_path / "e"), "--cpu-kernels", "default"])
    fp_eager = json.loads((eager / "fingerprint.json").read_text())["fingerprint"]
    assert "compile" not in fp_eager and eager.name != run_dir.name
    assert len(list(run_dir.glob("0*.png"))) == 2


def test_generate_img_samples_with_each_precision_flag(tiny_assets, tmp_path):
    import generate_img
    root, overrides = tiny_assets
    args = ["--checkpoint", str(root / "ka_mig.pth"), "--classes", "2", "--per-class", "2", "--device", "cpu",
            "--schedule", "maskgit", "--steps", "3", "--cfg", "2", *overrides]
    runs = {}
    for precision in PRECISIONS:
        runs[precision] = generate_img.main(args + ["--out", str(tmp_path / precision), "--precision", precision])
        fp = json.loads((runs[precision] / "fingerprint.json").read_text())["fingerprint"]
        assert fp["precision"] == precision
        pngs = sorted(runs[precision].glob("0*.png"))
        assert len(pngs) == 2 and all(np.asarray(Image.open(p)).shape == (8, 8, 3) for p in pngs)
    assert len({run.name for run in runs.values()}) == len(PRECISIONS)  # each precision is its own run folder
